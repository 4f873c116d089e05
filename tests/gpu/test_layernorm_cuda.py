import numpy as np
import pytest

from cllm_gpu.ops.layernorm import (layernorm_backward, layernorm_backward_ref, layernorm_forward,
                                    layernorm_forward_ref)
from gpu_util import assert_bitwise_equal, assert_close, poison, tol

cp = pytest.importorskip("cupy")


def _inputs(N, C, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(N, C)) * 2 + 0.5).astype(dtype)
    w = rng.normal(size=C).astype(dtype)
    b = rng.normal(size=C).astype(dtype)
    dout = rng.normal(size=(N, C)).astype(dtype)
    dw0 = rng.normal(size=C).astype(dtype)
    db0 = rng.normal(size=C).astype(dtype)
    return x, w, b, dout, dw0, db0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# (130, 300): N past one block of rows (64) and not a multiple of it, C not a multiple of 32;
# C = 300 takes a 2-warp row team in float32, a 3-warp one in float64; 1600: 13 warps (float64);
# 2048: the largest float64 row (one 16-warp team); 2049 and 4099 rows: more than 32 chunks of
# 64 rows (33 and 65), so the finalize's lanes go round their loop over chunks a second and
# third time (colsum_chunks; CLLM_FINALIZE_LANES)
@pytest.mark.parametrize("N,C", [(1, 1), (1, 768), (17, 31), (130, 300), (255, 768),
                                 (1024, 1600), (3, 2048), (2049, 8), (4099, 64)])
def test_layernorm_matches_reference(dtype, N, C):
    x, w, b, dout, dw0, db0 = _inputs(N, C, dtype)
    f64 = lambda a: a.astype(np.float64)  # noqa: E731
    rtol, floor = tol(dtype)
    X, W, Bd, D = (cp.asarray(a) for a in (x, w, b, dout))
    out, mean, rstd = poison((N, C), dtype), poison((N,), dtype), poison((N,), dtype)
    r = layernorm_forward(X, W, Bd, 1e-5, out, mean, rstd)
    assert r[0] is out and r[1] is mean and r[2] is rstd
    o_ref, m_ref, s_ref = layernorm_forward_ref(f64(x), f64(w), f64(b), 1e-5)
    assert_close(out, o_ref, rtol, floor * 10, "out")
    assert_close(mean, m_ref, rtol, floor, "mean")
    assert_close(rstd, s_ref, rtol, floor, "rstd")

    dw, db = cp.asarray(dw0), cp.asarray(db0)
    dx = poison((N, C), dtype)
    assert layernorm_backward(D, X, W, mean, rstd, dw, db, dx=dx) is dx
    dw_ref, db_ref = f64(dw0), f64(db0)
    dx_ref = layernorm_backward_ref(f64(dout), f64(x), f64(w), m_ref, s_ref, dw_ref, db_ref)
    assert_close(dx, dx_ref, rtol * 5, floor * 10, "dx")
    assert_close(dw, dw_ref, rtol * 5, floor * 10, "dweight")
    assert_close(db, db_ref, rtol * 5, floor * 10, "dbias")

    # determinism: the same accumulation twice gives the same bits; dx may alias dout
    dw2, db2 = cp.asarray(dw0), cp.asarray(db0)
    D2 = D.copy()
    assert layernorm_backward(D2, X, W, mean, rstd, dw2, db2, dx=D2) is D2
    assert_bitwise_equal(dw2, dw, "dweight")
    assert_bitwise_equal(db2, db, "dbias")
    assert_bitwise_equal(D2, dx, "dx in place")
    o2, m2, s2 = layernorm_forward(X, W, Bd)
    assert_bitwise_equal(o2, out)
    assert_bitwise_equal(m2, mean)
    assert_bitwise_equal(s2, rstd)


def backward_outputs(N, C, dtype, seed=1):
    """[dx, dweight, dbias] as host arrays from one backward with a residual gradient."""
    x, w, _, dout, dw0, db0 = _inputs(N, C, dtype, seed)
    X = cp.asarray(x)
    _, mean, rstd = layernorm_forward(X, cp.asarray(w), cp.asarray(w))
    dw, db = cp.asarray(dw0), cp.asarray(db0)
    dres = cp.asarray(np.random.default_rng(seed + 1).normal(size=(N, C)).astype(dtype))
    dx = layernorm_backward(cp.asarray(dout), X, cp.asarray(w), mean, rstd, dw, db,
                            dresidual=dres)
    return [cp.asnumpy(a) for a in (dx, dw, db)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,C", [(17, 31), (130, 300)])
def test_layernorm_backward_dx_may_alias_its_inputs(dtype, N, C):
    """dx written over dout, over x or over dresidual gives the bits of a separate dx (each
    element is read by the thread that writes it, before it writes)."""
    x, w, _, dout, dw0, db0 = _inputs(N, C, dtype, seed=2)
    dres = np.random.default_rng(4).normal(size=(N, C)).astype(dtype)
    W = cp.asarray(w)
    _, mean, rstd = layernorm_forward(cp.asarray(x), W, W)

    def run(alias):
        D, X, R = cp.asarray(dout), cp.asarray(x), cp.asarray(dres)
        dx = {"dout": D, "x": X, "dresidual": R, None: poison((N, C), dtype)}[alias]
        dw, db = cp.asarray(dw0), cp.asarray(db0)
        assert layernorm_backward(D, X, W, mean, rstd, dw, db, dx=dx, dresidual=R) is dx
        return [cp.asnumpy(a) for a in (dx, dw, db)]

    want = run(None)
    for alias in ("dout", "x", "dresidual"):
        for got, ref, name in zip(run(alias), want, ("dx", "dweight", "dbias")):
            assert_bitwise_equal(got, ref, f"{name} with dx = {alias}")


def test_layernorm_backward_refuses_dx_over_an_input_in_other_storage():
    """dx over dout in bf16 storage (float32 elements twice as wide: a thread would write the
    dout elements of others), or over x shifted by a row, is refused: only dx = an input in
    the same storage is in place."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, bf16_bits
    N, C = 17, 31
    x, w, _, dout, _, _ = _inputs(N, C, np.float32, seed=2)
    W = cp.asarray(w)
    _, mean, rstd = layernorm_forward(cp.asarray(x), W, W)
    arena = cp.zeros((N + 1) * C, np.float32)
    d16 = arena.view(BF16_DEVICE_DTYPE)[:N * C].reshape(N, C)
    d16[...] = cp.asarray(bf16_bits(dout))
    zeros = cp.zeros(C, np.float32)
    with pytest.raises(ValueError, match="dx: must be dout itself"):
        layernorm_backward(d16, cp.asarray(x), W, mean, rstd, zeros, zeros.copy(),
                           dx=arena[:N * C].reshape(N, C))
    X = arena[:N * C].reshape(N, C)
    X[...] = cp.asarray(x)
    with pytest.raises(ValueError, match="dx: must be x itself"):
        layernorm_backward(cp.asarray(dout), X, W, mean, rstd, zeros, zeros.copy(),
                           dx=arena[C:].reshape(N, C))


def test_layernorm_shape_errors():
    X = cp.zeros((4, 8), dtype=np.float32)
    w = cp.ones(8, dtype=np.float32)
    with pytest.raises(ValueError, match="mean"):
        layernorm_forward(X, w, w, 1e-5, None, cp.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="weight"):
        layernorm_forward(X, cp.ones(7, dtype=np.float32), w)
    # the backward holds a row in the registers of at most 16 warps: 4096 float32 channels
    for dt, C in ((np.float32, 4097), (np.float64, 2049)):
        X, w = cp.zeros((2, C), dtype=dt), cp.ones(C, dtype=dt)
        m = cp.zeros(2, dtype=dt)
        with pytest.raises(ValueError, match="at most"):
            layernorm_backward(X, X, w, m, m, w.copy(), w.copy())


@pytest.mark.parametrize("N,C", [(1, 1), (17, 31), (1024, 768)])
def test_layernorm_bf16_out_is_the_rounded_fp32_output(N, C):
    """A bf16 out stores the same fp32 value rounded to bf16 (cvt.rn): bit-equal to rounding
    the fp32 kernel's output, except where that value sits within fp32 noise of a rounding
    tie (none expected in random data; allow 1 in 10^4)."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, bf16_bits
    x, w, b, *_ = _inputs(N, C, np.float32, seed=3)
    X, W, Bd = (cp.asarray(a) for a in (x, w, b))
    out32, mean32, rstd32 = layernorm_forward(X, W, Bd)
    out16 = cp.full((N, C), 0xFFFF, dtype=BF16_DEVICE_DTYPE)
    _, mean16, rstd16 = layernorm_forward(X, W, Bd, out=out16)  # a bf16 out: rounded
    got, want = cp.asnumpy(out16), bf16_bits(cp.asnumpy(out32))
    assert (got != want).sum() <= max(1, got.size // 10_000)
    assert (np.abs(got.astype(np.int32) - want.astype(np.int32)) <= 1).all()
    assert_bitwise_equal(mean16, mean32)
    assert_bitwise_equal(rstd16, rstd32)


@pytest.mark.parametrize("N,C", [(1, 1), (17, 31), (130, 300), (255, 768)])
def test_layernorm_backward_bf16_dout_is_the_float32_kernel_on_its_values(N, C):
    """dout in bf16 storage (the bf16 model's dln / dlnf, written by a bf16-output GEMM): dx,
    dweight and dbias are bitwise what the float32 kernel gives on the same values."""
    from cllm_gpu.ops.cast import from_bf16, to_bf16
    x, w, _, dout, dw0, db0 = _inputs(N, C, np.float32, seed=5)
    X, W = cp.asarray(x), cp.asarray(w)
    _, mean, rstd = layernorm_forward(X, W, W)
    d16 = to_bf16(cp.asarray(dout))
    dres = cp.asarray(np.random.default_rng(6).normal(size=(N, C)).astype(np.float32))

    def run(d):
        dw, db = cp.asarray(dw0), cp.asarray(db0)
        dx = layernorm_backward(d, X, W, mean, rstd, dw, db, dresidual=dres)
        return [cp.asnumpy(a) for a in (dx, dw, db)]

    for got, want, name in zip(run(d16), run(from_bf16(d16)), ("dx", "dweight", "dbias")):
        assert_bitwise_equal(got, want, f"{name} from a bf16 dout")
    with pytest.raises(ValueError, match="dout"):
        layernorm_backward(to_bf16(cp.asarray(dout)), X.astype(np.float64), W.astype(np.float64),
                           mean.astype(np.float64), rstd.astype(np.float64),
                           cp.zeros(C, np.float64), cp.zeros(C, np.float64))


@pytest.mark.parametrize("N,C", [(1, 1), (17, 31), (64, 768)])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("storage", ["float32", "bf16", "bf16-y", "bf16-y-float32-out",
                                     "float64"])
def test_residual_layernorm_matches_reference(N, C, p, storage):
    """The fused residual add (+ the branch's bias and dropout) + LayerNorm kernel against the
    reference composition: the sum bitwise (the same float ops, the same Philox mask), the
    LayerNorm output and statistics at the LayerNorm kernel's tolerance; and the LayerNorm
    backward with a residual gradient added in the same pass. storage: the LayerNorm output's
    (bf16: float32 inputs; bf16-y: the branch y in bf16 storage too, as the bf16 model's
    projection GEMMs write it; bf16-y-float32-out: that y with a float32 out); float64 runs
    the double instantiation."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, bf16_bits, bits_to_float, round_bf16
    from cllm_gpu.ops.dropout import DropoutKey
    from cllm_gpu.ops.layernorm import (residual_layernorm_forward,
                                        residual_layernorm_forward_ref)
    bf16, bf16_y = storage in ("bf16", "bf16-y"), storage.startswith("bf16-y")
    dt = np.float64 if storage == "float64" else np.float32
    x, w, b, dout, dw0, db0 = _inputs(N, C, dt, seed=5)
    y = np.random.default_rng(6).normal(size=(N, C)).astype(dt)
    if bf16_y:
        y = round_bf16(y)  # the values the bf16 storage holds
    yb = np.random.default_rng(7).normal(size=C).astype(dt)
    key = DropoutKey(11, cp.asarray(np.array([3.0])), 9, 0)
    s_ref, o_ref = np.empty_like(x), np.empty_like(x)
    m_ref, r_ref = np.empty(N, dt), np.empty(N, dt)
    residual_layernorm_forward_ref(x, y, w, b, 1e-5, s_ref, o_ref, m_ref, r_ref, yb, p,
                                   DropoutKey(11, 3, 9, 0))
    X, Y = cp.asarray(x), cp.asarray(bf16_bits(y) if bf16_y else y)
    S = poison((N, C), dt)
    O = cp.full((N, C), 0xFFFF, BF16_DEVICE_DTYPE) if bf16 else poison((N, C), dt)
    M, R = poison((N,), dt), poison((N,), dt)
    residual_layernorm_forward(X, Y, cp.asarray(w), cp.asarray(b), 1e-5, S, O, M, R,
                               cp.asarray(yb), p, key)
    assert_bitwise_equal(S, s_ref, "sum")
    rtol, floor = tol(dt)
    got = bits_to_float(cp.asnumpy(O)) if bf16 else O
    assert_close(got, o_ref, 2.0 ** -8 if bf16 else rtol, floor * 10, "out")
    assert_close(M, m_ref, rtol, floor, "mean")
    assert_close(R, r_ref, rtol, floor, "rstd")
    dres = np.random.default_rng(8).normal(size=(N, C)).astype(dt)
    dx_ref = layernorm_backward_ref(dout.astype(np.float64), s_ref.astype(np.float64),
                                    w.astype(np.float64), m_ref.astype(np.float64),
                                    r_ref.astype(np.float64), np.zeros(C), np.zeros(C),
                                    dresidual=dres.astype(np.float64))
    dx = poison((N, C), dt)
    layernorm_backward(cp.asarray(dout), S, cp.asarray(w), M, R, cp.zeros(C, dt),
                       cp.zeros(C, dt), dx=dx, dresidual=cp.asarray(dres))
    assert_close(dx, dx_ref, rtol * 5, floor * 10, "dx + dresidual")


def test_layernorm_forward_in_place_or_refused_over_its_inputs():
    """A warp reads its row, then writes the row of out: out = x in the same storage is in
    place (the out-of-place bits); out over x shifted by a row, out in bf16 storage over x
    (a row of it covers half a row of x another warp reads), out over the weight, mean or rstd
    over x race and are refused."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE
    N, C = 17, 31
    x, w, b, _, _, _ = _inputs(N, C, np.float32, seed=3)
    W, Bd = cp.asarray(w), cp.asarray(b)
    want = layernorm_forward(cp.asarray(x), W, Bd)
    X = cp.asarray(x)
    got = layernorm_forward(X, W, Bd, out=X)
    assert got[0] is X
    for g, r, name in zip(got, want, ("out", "mean", "rstd")):
        assert_bitwise_equal(g, r, f"{name}, out = x")
    arena = cp.asarray(np.r_[x.reshape(-1), np.zeros(C, np.float32)])
    X = arena[:N * C].reshape(N, C)
    for kw, match in ((dict(out=arena[C:].reshape(N, C)), "out: must be x itself"),
                      (dict(out=arena.view(BF16_DEVICE_DTYPE)[:N * C].reshape(N, C)),
                       "out: must be x itself"),
                      (dict(mean=arena[:N]), "mean: must not overlap x"),
                      (dict(rstd=arena[N * C - 1:N * C - 1 + N]), "rstd: must not overlap x")):
        with pytest.raises(ValueError, match=match):
            layernorm_forward(X, W, Bd, **kw)
    wide = cp.zeros(N * C, np.float32)
    with pytest.raises(ValueError, match="out: must not overlap weight"):
        layernorm_forward(cp.asarray(x), wide[:C], Bd, out=wide.reshape(N, C))


def test_residual_layernorm_refuses_outputs_over_the_sum_in_other_storage():
    """out in bf16 storage over sum_out (which the warps read back while others write out), or
    mean over sum_out, races; out = sum_out in the same storage is in place."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE
    from cllm_gpu.ops.layernorm import residual_layernorm_forward
    N, C = 17, 31
    x, w, b, y, _, _ = _inputs(N, C, np.float32, seed=4)
    X, Y, W, Bd = (cp.asarray(a) for a in (x, y, w, b))
    S, O = cp.zeros((N, C), np.float32), cp.zeros((N, C), np.float32)
    want = residual_layernorm_forward(X, Y, W, Bd, 1e-5, S, O, None, None)
    S2 = cp.zeros((N, C), np.float32)
    got = residual_layernorm_forward(X, Y, W, Bd, 1e-5, S2, S2, None, None)
    for g, r, name in zip(got, want, ("out", "mean", "rstd")):
        assert_bitwise_equal(g, r, f"{name}, out = sum_out")
    for kw, match in (
            (dict(out=S.view(BF16_DEVICE_DTYPE).reshape(-1)[:N * C].reshape(N, C)),
             "out: must be sum_out itself"),
            (dict(mean=S.reshape(-1)[:N]), "mean: must not overlap sum_out")):
        args = dict(out=O, mean=None, rstd=None) | kw
        with pytest.raises(ValueError, match=match):
            residual_layernorm_forward(X, Y, W, Bd, 1e-5, S, args["out"], args["mean"],
                                       args["rstd"])


def test_residual_layernorm_refuses_a_sum_over_y():
    """sum_out over y a row on: a warp writes its row of sums over the row of y the next warp
    reads."""
    from cllm_gpu.ops.layernorm import residual_layernorm_forward
    N, C = 17, 31
    x, w, b, y, _, _ = _inputs(N, C, np.float32, seed=4)
    X, W, Bd = (cp.asarray(a) for a in (x, w, b))
    arena = cp.zeros((N + 1) * C, np.float32)
    Y = arena[:N * C].reshape(N, C)
    Y[...] = cp.asarray(y)
    with pytest.raises(ValueError, match="sum_out: must not overlap y"):
        residual_layernorm_forward(X, Y, W, Bd, 1e-5, arena[C:].reshape(N, C),
                                   cp.zeros((N, C), np.float32), None, None)


def test_layernorm_forward_checks_a_given_mean_and_rstd():
    """mean and rstd given by the caller (the activation cache's) are checked by the launcher
    alone: a host, wrongly sized, other-dtype or strided one is refused before any launch."""
    N, C = 17, 31
    x, w, b, _, _, _ = _inputs(N, C, np.float32, seed=3)
    X, W, Bd = (cp.asarray(a) for a in (x, w, b))
    for name in ("mean", "rstd"):
        for bad, why in ((np.zeros(N, np.float32), "expected a CuPy"),
                         (cp.zeros(N + 1, np.float32), "expected shape"),
                         (cp.zeros(N, np.float64), "expected dtype float32"),
                         (cp.zeros(2 * N, np.float32)[::2], "must be C-contiguous")):
            with pytest.raises(ValueError, match=f"{name}: {why}"):
                layernorm_forward(X, W, Bd, **{name: bad})


def test_layernorm_refuses_a_host_residual_gradient_or_branch_bias():
    """dresidual (backward) and y_bias (residual forward) are device arrays like the rest; the
    backward's dx over the weight, mean or rstd (which other blocks read) is refused."""
    from cllm_gpu.ops.layernorm import residual_layernorm_forward
    N, C = 4, 8
    x, w, b, dout, _, _ = _inputs(N, C, np.float32, seed=6)
    X, W, Bd, D = (cp.asarray(a) for a in (x, w, b, dout))
    _, mean, rstd = layernorm_forward(X, W, Bd)
    with pytest.raises(ValueError, match="dresidual: expected a CuPy"):
        layernorm_backward(D, X, W, mean, rstd, cp.zeros(C, np.float32),
                           cp.zeros(C, np.float32), dresidual=np.zeros((N, C), np.float32))
    with pytest.raises(ValueError, match="y_bias: expected a CuPy"):
        residual_layernorm_forward(X, D, W, Bd, 1e-5, cp.zeros((N, C), np.float32),
                                   cp.zeros((N, C), np.float32), None, None,
                                   y_bias=np.zeros(C, np.float32))
    # (rows past the first block: a later block reads the weight the last row overwrote)
    N = 130
    x, w, b, dout, _, _ = _inputs(N, C, np.float32, seed=7)
    X, W, Bd, D = (cp.asarray(a) for a in (x, w, b, dout))
    _, mean, rstd = layernorm_forward(X, W, Bd)
    arena = cp.zeros((N + 1) * C, np.float32)
    arena[:C] = W
    with pytest.raises(ValueError, match="dx: must not overlap weight"):
        layernorm_backward(D, X, arena[:C], mean, rstd, cp.zeros(C, np.float32),
                           cp.zeros(C, np.float32), dx=arena[1:1 + N * C].reshape(N, C))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layernorm_backward_in_a_given_scratch(dtype):
    """The column sums' partials of dbias and dweight in a caller's scratch (the model's
    activation cache, so a CUDA-graph capture allocates none of them): the same bits as
    partials allocated per call, dirty scratch or not; a scratch of another dtype, too small,
    misaligned or over an input is refused before any launch."""
    from cllm_gpu.ops.layernorm import layernorm_backward_scratch_size
    N, C = 130, 40                       # 3 chunks of 64 rows
    x, w, b, dout, dw0, db0 = _inputs(N, C, dtype, seed=3)
    X, W, Bd, D, R = (cp.asarray(a) for a in (x, w, b, dout, dout[::-1].copy()))
    _, mean, rstd = layernorm_forward(X, W, Bd)

    def run(scratch, dout=D):
        dw, db, dx = cp.asarray(dw0), cp.asarray(db0), poison((N, C), dtype)
        layernorm_backward(dout, X, W, mean, rstd, dw, db, dx=dx, dresidual=R, scratch=scratch)
        return dx, dw, db
    n = layernorm_backward_scratch_size(N, C)
    scratch = cp.full(n + 64, np.nan, dtype)   # dirty: every element is written
    for got, want, what in zip(run(scratch), run(None), ("dx", "dweight", "dbias")):
        assert_bitwise_equal(got, want, f"{what}: given scratch vs allocated")
    other = np.float64 if dtype == np.float32 else np.float32
    for bad, why in ((cp.zeros(n, other), np.dtype(dtype).name),
                     (cp.zeros(n - 1, dtype), f"at least {n}"),
                     (scratch[1:], "256-byte aligned"),
                     (cp.zeros(2 * n, dtype)[::2], "scratch: expected a contiguous"),  # strided
                     (cp.zeros((2, n), dtype), "1-d")):
        with pytest.raises(ValueError, match=why):
            run(bad)
    with pytest.raises(ValueError, match="scratch: must not overlap dout"):
        run(D.reshape(-1))


def _overflowing_rows(C, rng):
    """float32 rows whose sum of squares overflows (a spread past ~6.7e17 at C = 768) or whose
    plain sum does (a mean past ~4.4e35), with finite LayerNorms: spreads 1e18 and 1e30,
    values up to 3e38, a mean of 1e36 with a spread of 1e33 (both sums overflow), a constant
    1e36 (only the plain sum), an ordinary row, and a row past the largest float (x - mean
    overflows too; 3/4 of it 3e38, the rest -3e38)."""
    wide = np.where(np.arange(C) % 4 == 0, -3e38, 3e38)[None]
    return np.concatenate([
        1e18 * rng.normal(size=(2, C)), 1e30 * rng.normal(size=(2, C)) + 1e29,
        rng.uniform(-3e38, 3e38, size=(2, C)), 1e36 + 1e33 * rng.normal(size=(2, C)),
        np.full((1, C), 1e36), rng.normal(size=(1, C)), wide]).astype(np.float32)


@pytest.mark.parametrize("fused", [False, True])
def test_layernorm_rows_whose_sums_overflow(fused):
    """The sum of squares of such a row was inf: rstd 0 and the output exactly the bias (a
    finite wrong answer); a row sum past the largest float made the mean inf and the row NaN.
    Such rows of finite values are now done again scaled by a power of two: the output within
    float32 rounding of the float64 LayerNorm on the same values (the 1e36 rows within the
    mean's own rounding, 4e-5 of the spread), mean and rstd the float64 ones (rstd below
    FLT_MIN, the 3e38 rows', a denormal: it was stored flushed to 0 under -ftz=true), and the
    backward from them the float64 one on every row: the rows of rstd below FLT_MIN (their
    xhat read 0: dweight without them, dx 0) and the row whose x - mean passes the largest
    float (xhat inf: dx NaN, dweight inf) are read scaled by a power of two. fused: the
    residual kernel (x + a zero branch), whose LayerNorm is the same row function."""
    from cllm_gpu.ops.layernorm import residual_layernorm_forward
    rng = np.random.default_rng(11)
    C = 768
    x = _overflowing_rows(C, rng)
    N = len(x)
    w, b = rng.normal(size=C).astype(np.float32), rng.normal(size=C).astype(np.float32)
    X, W, Bd = cp.asarray(x), cp.asarray(w), cp.asarray(b)
    out, mean, rstd = poison((N, C)), poison((N,)), poison((N,))
    if fused:
        residual_layernorm_forward(X, cp.zeros((N, C), np.float32), W, Bd, 1e-5,
                                   poison((N, C)), out, mean, rstd)
    else:
        layernorm_forward(X, W, Bd, 1e-5, out, mean, rstd)
    x64 = x.astype(np.float64)
    m64, r64 = x64.mean(-1), 1 / np.sqrt(x64.var(-1) + 1e-5)
    want = (x64 - m64[:, None]) * r64[:, None] * w + b
    assert_close(out, want, 0, 0, "out", atol=1e-3)
    assert_close(mean, m64, 0, 0, "mean", atol=1e-6 * np.abs(x64).max(-1))
    assert_close(rstd, r64, 1e-5, 0, "rstd")
    assert_bitwise_equal(out[8], Bd, "a constant row's output")

    _check_backward_against_float64(x, w, mean, rstd, rng)


def _check_backward_against_float64(x, w, mean, rstd, rng, dout_storage="float32",
                                    residual=False):
    """The kernel backward from the kernel's mean and rstd against the float64 backward from
    the float64 statistics of the same float32 rows x. dout is 2^40-sized so that dx, rstd
    times it (rstd ~4e-39 on the 3e38 rows), is a normal float: -ftz=true flushes a denormal
    result to 0, as everywhere. dout_storage "bf16": dout in bf16 storage (the bf16 model's
    dln and dlnf, layernorm_backward_kernel<float, cllm_bf16>), which the kernel reads exactly
    as the bf16 values it holds and computes with in float32 from there: the float64 backward
    runs on those rounded values, so the float32 dout's bounds hold unchanged (the rounding
    itself moves dbias by far more than its bound: checked), and dx, dweight and dbias are
    bitwise what the float32 instantiation gives on the same values. residual: a dresidual
    added in the same pass, rstd-sized in each row as dx is."""
    from cllm_gpu.ops.cast import from_bf16, to_bf16
    N, C = x.shape
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    m64, r64 = x64.mean(-1), 1 / np.sqrt(x64.var(-1) + 1e-5)
    scale = 2.0**40
    dout = (scale * rng.normal(size=(N, C))).astype(np.float32)
    D = cp.asarray(dout)
    if dout_storage == "bf16":
        D = to_bf16(D)
        dout, unrounded = cp.asnumpy(from_bf16(D)), dout   # the values D holds
    dres = None
    if residual:
        dres = (r64[:, None] * scale * rng.normal(size=(N, C))).astype(np.float32)
    X, W = cp.asarray(x), cp.asarray(w)

    def run(d):
        dw, db = cp.zeros(C, np.float32), cp.zeros(C, np.float32)
        dx = layernorm_backward(d, X, W, mean, rstd, dw, db,
                                dresidual=None if dres is None else cp.asarray(dres))
        return [cp.asnumpy(a) for a in (dx, dw, db)]

    dx, dw, db = got = run(D)
    dw64, db64 = np.zeros(C), np.zeros(C)
    dx64 = layernorm_backward_ref(dout.astype(np.float64), x64, w64, m64, r64, dw64, db64,
                                  dresidual=None if dres is None else dres.astype(np.float64))
    # dx is rstd-sized: compared in units of each row's rstd and of dout's scale
    assert_close(dx / r64[:, None], dx64 / r64[:, None], 0, 0, "dx", atol=1e-3 * scale)
    assert_close(dw, dw64, 0, 0, "dweight", atol=2e-3 * scale)
    assert_close(db, db64, 1e-5, 0, "dbias", atol=1e-5 * scale)
    if dout_storage == "bf16":
        moved = np.abs(unrounded.astype(np.float64).sum(0) - db64)
        assert (moved > 1e-5 * np.abs(db64) + 1e-5 * scale).any()   # (the bound sees bf16)
        for g, want, name in zip(got, run(from_bf16(D)), ("dx", "dweight", "dbias")):
            assert_bitwise_equal(g, want, f"{name} from a bf16 dout")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dout_storage", ["float32", "bf16"])
def test_layernorm_backward_of_rows_whose_sums_overflow(dout_storage, residual):
    """The backward of the rows of test_layernorm_rows_whose_sums_overflow in each dout
    storage (each its own kernel instantiation), plain and with a dresidual added in the same
    pass, against the float64 backward; most of these rows have an rstd below the overflow
    scale 2^-81 and are read scaled. With a bf16 dout that branch of
    layernorm_backward_kernel<float, cllm_bf16> (the bf16 model's) ran in no check before
    (emulator coverage, docs/emulator.md)."""
    rng = np.random.default_rng(17)
    C = 768
    x = _overflowing_rows(C, rng)
    w, b = rng.normal(size=C).astype(np.float32), rng.normal(size=C).astype(np.float32)
    _, mean, rstd = layernorm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), 1e-5)
    read_scaled = cp.asnumpy(rstd) < 2.0**-81
    assert read_scaled.sum() == 7 and not read_scaled[[0, 1, 8, 9]].any()  # (spreads >= 1e30)
    _check_backward_against_float64(x, w, mean, rstd, rng, dout_storage, residual)


def overflowing_float64_rows(C, rng):
    """float64 rows whose sum of squares overflows (a spread past ~1.5e152 at C = 768) or whose
    plain sum does (a mean past ~2.3e305): spreads 1e160 and 1e300, values up to 1e307 (rstd
    still a normal double), a mean of 1e306 with a spread of 1e303 (both sums overflow), a
    constant 1e306 (only the plain sum), an ordinary row."""
    return np.concatenate([
        1e160 * rng.normal(size=(2, C)), 1e300 * rng.normal(size=(2, C)) + 1e299,
        rng.uniform(-1e307, 1e307, size=(2, C)), 1e306 + 1e303 * rng.normal(size=(2, C)),
        np.full((1, C), 1e306), rng.normal(size=(1, C))])


@pytest.mark.parametrize("fused", [False, True])
def test_layernorm_float64_rows_whose_sums_overflow(fused):
    """The double kernels' own overflow scale (2^-529, not float32's 2^-81: with a scale too
    large for double the squares still overflowed, rstd 0 and the output the bias) against
    the LayerNorm in the host's long double, where none of these sums overflows. A mutation
    audit found the double scale's exponent free to change: only float32 rows were checked."""
    from cllm_gpu.ops.layernorm import residual_layernorm_forward
    if np.finfo(np.longdouble).maxexp <= np.finfo(np.float64).maxexp:
        pytest.skip("no long double wider than double here")
    rng = np.random.default_rng(13)
    C, F64 = 768, np.float64
    x = overflowing_float64_rows(C, rng)
    N = len(x)
    w, b = rng.normal(size=C), rng.normal(size=C)
    X, W, Bd = cp.asarray(x), cp.asarray(w), cp.asarray(b)
    out, mean, rstd = poison((N, C), F64), poison((N,), F64), poison((N,), F64)
    if fused:
        residual_layernorm_forward(X, cp.zeros((N, C), F64), W, Bd, 1e-5, poison((N, C), F64),
                                   out, mean, rstd)
    else:
        layernorm_forward(X, W, Bd, 1e-5, out, mean, rstd)
    xl = x.astype(np.longdouble)
    ml = xl.mean(-1)
    rl = 1 / np.sqrt(((xl - ml[:, None]) ** 2).mean(-1) + 1e-5)
    want = ((xl - ml[:, None]) * rl[:, None] * w + b).astype(F64)
    assert_close(out, want, 0, 0, "out", atol=1e-9)
    assert_close(mean, ml.astype(F64), 0, 0, "mean", atol=1e-14 * np.abs(x).max(-1))
    assert_close(rstd, rl.astype(F64), 1e-12, 0, "rstd")
    assert_bitwise_equal(out[8], Bd, "a constant row's output")


def test_layernorm_rows_with_a_nan_or_inf_stay_nan():
    """A NaN or inf in a row leaves its output, rstd and dx NaN (and dweight, which sums every
    row's dout * xhat), the other rows their own LayerNorm: the paths for rows whose sums
    overflow or whose rstd is tiny take only rows of finite values."""
    rng = np.random.default_rng(14)
    N, C = 5, 300
    x = rng.normal(size=(N, C)).astype(np.float32)
    x[1, 3], x[2, 0], x[3, 299] = np.nan, np.inf, -np.inf
    x[4] = rng.uniform(-3e38, 3e38, size=C)   # finite, std past 8.5e37: rstd a denormal
    w, b = rng.normal(size=C).astype(np.float32), rng.normal(size=C).astype(np.float32)
    out, mean, rstd = layernorm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), 1e-5,
                                        poison((N, C)), poison((N,)), poison((N,)))
    out, r = cp.asnumpy(out), cp.asnumpy(rstd)
    assert np.isnan(out[1:4]).all() and np.isnan(r[1:4]).all()
    assert np.isfinite(out[[0, 4]]).all() and (r[[0, 4]] > 0).all()
    dout = rng.normal(size=(N, C)).astype(np.float32)
    dw, db = cp.zeros(C, np.float32), cp.zeros(C, np.float32)
    dx = cp.asnumpy(layernorm_backward(cp.asarray(dout), cp.asarray(x), cp.asarray(w), mean,
                                       rstd, dw, db))
    assert np.isnan(dx[1:4]).all() and np.isfinite(dx[[0, 4]]).all()
    assert np.isnan(cp.asnumpy(dw)).all()
    assert_close(db, dout.astype(np.float64).sum(0), 1e-5, 0, "dbias", atol=1e-5)


def test_layernorm_rstd_below_flt_min_is_rounded_to_the_nearest_denormal():
    """rstd of rows of +-a (a = m 2^120 and m 2^121, m odd 65..127: std a, 8.6e37 to 3.4e38,
    every sum of the scaled row exact) is 1 / (a k) rounded to float32, times k = 2^-81 rounded
    to a denormal, bit for bit as IEEE float32 (NumPy) rounds it: -ftz=true flushed it to 0.
    These 64 rows cover rounding down, up, exact and both ties to even, dropping 1 and 2 bits
    (the integer rounding of ln_times_scale)."""
    C = 768
    a = np.array([m * 2.0**e for e in (120, 121) for m in range(65, 128, 2)], np.float32)
    sign = np.where((np.arange(C) // 32) % 2 == 0, 1, -1).astype(np.float32)  # (mean 0, exact)
    x = a[:, None] * sign
    k = np.float32(2.0**-81)
    want = (np.float32(1) / (a * k)) * k
    assert (want < np.finfo(np.float32).tiny).all() and (want > 0).all()
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    _, _, rstd = layernorm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), 1e-5)
    assert_bitwise_equal(rstd, want, "rstd below FLT_MIN")
    assert_bitwise_equal(layernorm_forward_ref(x, w, b, 1e-5)[2], want, "the NumPy path's rstd")


def test_layernorm_float64_rstd_below_dbl_min():
    """The same in float64 (k = 2^-529): rows of +-a, a = m 2^1016 and m 2^1017 (std past
    2^1022, rstd a double denormal; the GPU keeps double denormals, the emulator flushes them
    as x86's DAZ/FTZ do, so the integer rounding and reading of ln_times_scale / ln_unscale
    are what keep them): rstd bitwise IEEE's, and the backward (dout 2^40-sized: dx a normal
    double) the NumPy one from the exact statistics, mean 0 and rstd 1 / a."""
    C = 768
    a = np.array([m * 2.0**e for e in (1016, 1017) for m in range(65, 128, 2)])
    sign = np.where((np.arange(C) // 32) % 2 == 0, 1.0, -1.0)
    x = a[:, None] * sign
    k = 2.0**-529
    want = (1 / (a * k)) * k
    assert (want < np.finfo(np.float64).tiny).all() and (want > 0).all()
    rng = np.random.default_rng(15)
    w, b = rng.normal(size=C), rng.normal(size=C)
    X, W = cp.asarray(x), cp.asarray(w)
    _, mean, rstd = layernorm_forward(X, W, cp.asarray(b), 1e-5)
    assert_bitwise_equal(rstd, want, "float64 rstd below DBL_MIN")
    scale = 2.0**40
    dout = scale * rng.normal(size=x.shape)
    dw, db = cp.zeros(C), cp.zeros(C)
    dx = layernorm_backward(cp.asarray(dout), X, W, mean, rstd, dw, db)
    dw_ref, db_ref = np.zeros(C), np.zeros(C)
    dx_ref = layernorm_backward_ref(dout, x, w, np.zeros(len(a)), 1 / a, dw_ref, db_ref)
    assert_close(cp.asnumpy(dx) * a[:, None], dx_ref * a[:, None], 1e-12, 0, "dx",
                 atol=1e-12 * scale)
    assert_close(dw, dw_ref, 1e-12, 0, "dweight", atol=1e-12 * scale)
    assert_close(db, db_ref, 1e-12, 0, "dbias")


def _contraction():
    """How this build's kernels take a * b + c: "fma" (NVRTC and nvcc, --fmad=true), "none"
    (the default emulator build) or "gcc" (the emulator under CLLM_EMU_FP_CONTRACT=1: GCC
    picks its own pairs, docs/emulator.md; it fuses this add in no version of the kernel)."""
    import os
    if cp.__version__ != "emulated":   # (the fake CuPy's; a real one's is a number)
        return "fma"
    return "none" if os.environ.get("CLLM_EMU_FP_CONTRACT", "0") in ("", "0") else "gcc"


def test_layernorm_backward_ordinary_rows_add_dresidual_as_before():
    """An ordinary row's (rstd >= 2^-81) dx + dresidual is t rstd + dresidual rounded once
    where the compiler contracts (t = dxhat - a - xhat b): the FMA the kernel had before the
    rows of tiny rstd were read scaled. h29a's t rstd post (post 1: exact) made NVVM fuse
    post instead, fma(post, t rstd, dresidual): two roundings, other bits on every model's
    backward (nvcc 13 PTX; tests/test_kernels_compile.py reads it there: this check fails
    on h29a's kernel only on a GPU, the emulator does not fuse). Rows of x = mean = 0 (xhat
    0, so b = 0), weight 1 and dout small odd integers summing to 0 in every order (a = 0):
    t = dout exactly, and t rstd (28 bits) is inexact. Without a residual dx is t rstd
    rounded, bit for bit, on every build."""
    rng = np.random.default_rng(16)
    N, C = 8, 768
    half = rng.choice(np.arange(-15, 16, 2), size=(N, C // 2))
    dout = np.concatenate([half, -rng.permuted(half, axis=1)], 1).astype(np.float32)
    rstd = rng.uniform(300, 330, size=N).astype(np.float32)
    # |dres| in [1, 5000] and t rstd in [300, 5000]: their float64 sum is exact (under 40 bits)
    dres = (rng.choice([-1, 1], size=(N, C)) * rng.uniform(1, 5000, (N, C))).astype(np.float32)
    prod = dout.astype(np.float64) * rstd.astype(np.float64)[:, None]   # exact
    once = (prod + dres).astype(np.float32)
    twice = prod.astype(np.float32) + dres
    assert (once != twice).any()   # (the check can tell the two apart)
    X, W = cp.zeros((N, C), np.float32), cp.ones(C, np.float32)
    mean, R, D = cp.zeros(N, np.float32), cp.asarray(rstd), cp.asarray(dout)
    dw, db = cp.zeros(C, np.float32), cp.zeros(C, np.float32)
    assert_bitwise_equal(layernorm_backward(D, X, W, mean, R, dw, db), prod.astype(np.float32),
                         "dx without a residual")
    dx = cp.asnumpy(layernorm_backward(D, X, W, mean, R, dw, db, dresidual=cp.asarray(dres)))
    how = _contraction()
    bad = {"fma": dx != once, "none": dx != twice, "gcc": (dx != once) & (dx != twice)}[how]
    assert not bad.any(), (f"{bad.sum()} of {dx.size} dx + dresidual not rounded as "
                           f"t rstd + dresidual should be ({how})")
