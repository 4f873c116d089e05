import math
import warnings
from contextlib import contextmanager

import numpy as np
import pytest

from attention_tolerance import U, assert_equal_up_to_fp32, backward_magnitudes, lse_bound, split64
from cllm_gpu import kernels
from cllm_gpu.kernels import ATTENTION_HEAD_DIMS, NAME_EXPRESSIONS
from cllm_gpu.ops import _cuda
from cllm_gpu.ops.attention import (attention_backward, attention_backward_ref, attention_forward,
                                    attention_forward_ref, attention_slopes,
                                    set_attention_backward)
from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, from_bf16, to_bf16
from cllm_gpu.ops.dropout import ATTN_PROBS, DropoutKey, keep_rows, site_id
from gpu_util import assert_bitwise_equal, assert_close, host, poison, rel_err

cp = pytest.importorskip("cupy")

# fp32 tolerances: scores and softmax in fp32 with exp/log (a few ulp each), sums over up to
# T keys: elementwise bound rtol 1e-4 plus 1e-5 x the tensor's max magnitude; norm-wise relative
# error of every output <= 1e-5.
RTOL, FLOOR, NORM_TOL = 1e-4, 1e-5, 1e-5


def _inputs(B, T, H, D, dtype, seed=0):
    rng = np.random.default_rng(seed + T + D)
    qkv = (rng.normal(size=(B, T, 3 * H * D)) * 1.5).astype(dtype)
    dout = rng.normal(size=(B, T, H * D)).astype(dtype)
    return qkv, dout


def _slopes(bias, H, dtype):
    """(float64 slopes for the reference, the op's slopes on the device) of a distance bias;
    (None, None) for bias "none"."""
    m = attention_slopes(bias, H)
    return (None, None) if m is None else (m, cp.asarray(m.astype(dtype)))


def _assert_one_key_dq_dk_zero(dqkv, q64, d64, H, keep_scale=1.0):
    """One key (T = 1): P = 1 and Delta = dP, so dS = 0 and dq = dk = 0 exactly, yet the float64
    reference holds only roundoff there (~1e-15) and the device's fp32 Delta - dP cancellation
    leaves ~1e-7 (seen on the H200), so a bound relative to the reference fails: bound dq, dk by
    fp32 rounding of the terms that cancel instead (|dO| |V|, times dropout's 1 / (1 - p) as
    keep_scale, times |Q|, |K|). dqkv: (B, 1, 3 * H * D); q64, d64 the float64 inputs."""
    B, T, C3 = q64.shape
    C = C3 // 3
    D = C // H
    v = q64[..., 2 * C:].reshape(B, T, H, D)
    bound = 1e-6 * keep_scale * (np.abs(d64.reshape(B, T, H, D)) * np.abs(v)).sum(-1).max() \
        * np.abs(q64[..., :2 * C]).max()
    dqk = host(dqkv[..., :2 * C])
    assert np.isfinite(dqk).all() and np.abs(dqk).max() <= bound, (np.abs(dqk).max(), bound)


def _check(B, T, H, D, dtype=np.float32, rtol=RTOL, floor=FLOOR, norm_tol=NORM_TOL,
           bias="none"):
    qkv, dout = _inputs(B, T, H, D, dtype)
    m64, M = _slopes(bias, H, dtype)
    q64, d64 = qkv.astype(np.float64), dout.astype(np.float64)
    o_ref, lse_ref = attention_forward_ref(q64, H, slopes=m64)
    dqkv_ref = attention_backward_ref(d64, q64, o_ref, lse_ref, H, slopes=m64)

    Q, G = cp.asarray(qkv), cp.asarray(dout)
    out, lse = poison((B, T, H * D), dtype), poison((B, H, T), dtype)
    r = attention_forward(Q, H, out=out, lse=lse, slopes=M)
    assert r[0] is out and r[1] is lse
    assert_close(out, o_ref, rtol, floor, "out")
    assert_close(lse, lse_ref, rtol, floor, "lse")
    assert rel_err(out, o_ref) <= norm_tol

    dqkv = poison((B, T, 3 * H * D), dtype)
    assert attention_backward(G, Q, out, lse, H, dqkv=dqkv, slopes=M) is dqkv
    C = H * D
    grads = (("dq", slice(0, C)), ("dk", slice(C, 2 * C)), ("dv", slice(2 * C, 3 * C)))
    if T == 1:
        _assert_one_key_dq_dk_zero(dqkv, q64, d64, H)
        grads = grads[2:]
    for name, sl in grads:
        assert_close(dqkv[..., sl], dqkv_ref[..., sl], rtol, floor, name)
        assert rel_err(dqkv[..., sl], dqkv_ref[..., sl]) <= norm_tol, name

    # bitwise determinism of both passes
    o2, l2 = attention_forward(Q, H, slopes=M)
    assert_bitwise_equal(o2, out, "out")
    assert_bitwise_equal(l2, lse, "lse")
    assert_bitwise_equal(attention_backward(G, Q, out, lse, H, slopes=M), dqkv, "dqkv")


@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("T", [1, 17, 64, 255, 1024])
def test_attention_matches_reference(T, D):
    B, H = (2, 2) if T < 1024 else (1, 2)
    _check(B, T, H, D)


@pytest.mark.parametrize("D", [d for d in ATTENTION_HEAD_DIMS if d not in (32, 64, 128)])
def test_attention_other_head_dims(D):
    _check(3, 97, 3, D)


def test_attention_many_heads_and_batches():
    _check(5, 130, 12, 64)


def test_attention_float64_runs_the_reference_on_cupy():
    _check(2, 37, 2, 32, dtype=np.float64, rtol=1e-10, floor=1e-12, norm_tol=1e-11)


def test_attention_unsupported_head_dim_falls_back_with_warning():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _check(2, 19, 2, 12)  # D = 12: the reference on CuPy arrays
    assert any("head dim 12" in str(x.message) for x in w)


def test_attention_rejects_overlapping_dqkv():
    qkv, dout = _inputs(1, 8, 1, 32, np.float32)
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    out, lse = attention_forward(Q, 1)
    with pytest.raises(ValueError, match="overlap"):
        attention_backward(G, Q, out, lse, 1, dqkv=Q)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_refuses_outputs_over_lse_or_the_slopes(precision):
    """Every block reads the slopes, and out and lse are written by blocks that do not read
    them back: out over lse, either over the slopes, or dqkv over the slopes races."""
    B, T, H, D = 1, 8, 2, 32
    qkv, dout = _inputs(B, T, H, D, np.float32)
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    M = cp.asarray(attention_slopes("alibi", H).astype(np.float32))
    both = cp.zeros(B * T * H * D + B * H * T, np.float32)
    out, lse = both[:B * T * H * D].reshape(B, T, H * D), both[-B * H * T:].reshape(B, H, T)
    with pytest.raises(ValueError, match="out: must not overlap lse"):
        attention_forward(Q, H, out=out, lse=both[-B * H * T - 1:-1].reshape(B, H, T),
                          precision=precision)
    with pytest.raises(ValueError, match="lse: must not overlap slopes"):
        attention_forward(Q, H, out=out, lse=lse, precision=precision,
                          slopes=lse.reshape(-1)[:H])
    o, l = attention_forward(Q, H, precision=precision, slopes=M)
    dqkv = cp.zeros((B, T, 3 * H * D), np.float32)
    with pytest.raises(ValueError, match="dqkv: must not overlap slopes"):
        attention_backward(G, Q, o, l, H, dqkv=dqkv, precision=precision,
                           slopes=dqkv.reshape(-1)[:H])
    # dqkv over dout (a block writes its rows' dQ while other blocks read those dO rows)
    with pytest.raises(ValueError, match="dqkv: must not overlap dout"):
        attention_backward(dqkv.reshape(-1)[:G.size].reshape(G.shape), Q, o, l, H, dqkv=dqkv,
                           precision=precision, slopes=M)


@pytest.mark.parametrize("precision,backward", [("fp32", "two-pass"), ("bf16", "two-pass"),
                                                ("bf16", "atomic-dq")])
def test_attention_backward_in_a_given_scratch(precision, backward):
    """The backward's workspace (Delta; atomic-dq's fp32 dQ sums for a bf16 dqkv) in a caller's
    scratch (the model's activation cache, so a CUDA-graph capture allocates none of it): the
    same bits as a workspace allocated per call, dirty scratch or not; a scratch of another
    dtype, too small, misaligned or over an input or dqkv is refused before any launch."""
    from cllm_gpu.ops.attention import attention_backward_scratch_size
    B, T, H, D = 2, 40, 2, 32
    C = H * D
    qkv, dout = _inputs(B, T, H, D, np.float32)
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    bf16 = precision == "bf16"
    with backward_variant(backward):
        out, lse = attention_forward(Q, H, precision=precision)

        def run(scratch):
            dqkv = cp.empty((B, T, 3 * C), BF16_DEVICE_DTYPE if bf16 else np.float32)
            return attention_backward(G, Q, out, lse, H, dqkv=dqkv, precision=precision,
                                      scratch=scratch)
        # the dQ sums only where a bf16 dqkv is summed by atomic-dq
        n = attention_backward_scratch_size(B, T, C, H, bf16 and backward == "atomic-dq")
        scratch = cp.full(n + 64, np.nan, np.float32)   # dirty: every element is written
        assert_bitwise_equal(run(scratch), run(None), "dqkv: given scratch vs allocated")
        # exactly n elements suffice (the size function covers every view the launch takes)
        assert_bitwise_equal(run(scratch[:n]), run(None), "dqkv: a scratch of exactly n")
        for bad, why in ((cp.zeros(n, np.float64), "float32"),
                         (cp.zeros(n - 1, np.float32), f"at least {n}"),
                         (scratch[1:], "256-byte aligned")):
            with pytest.raises(ValueError, match=why):
                run(bad)
        with pytest.raises(ValueError, match="scratch: must not overlap"):
            attention_backward(G, Q, out, lse, H, precision=precision,
                               scratch=G.reshape(-1))


def test_attention_softmax_is_peaked_without_overflow():
    """Large scores (|s| ~ 1e3): the online softmax must not overflow."""
    B, T, H, D = 1, 300, 1, 64
    qkv, dout = _inputs(B, T, H, D, np.float32)
    qkv *= 30
    q64 = qkv.astype(np.float64)
    o_ref, lse_ref = attention_forward_ref(q64, H)
    out, lse = attention_forward(cp.asarray(qkv), H)
    assert np.isfinite(cp.asnumpy(out)).all()
    assert rel_err(lse, lse_ref) <= 1e-5
    assert rel_err(out, o_ref) <= 1e-3 * math.sqrt(T)  # near-argmax: fp32 ties may flip


# ---- precision="bf16": the tensor-core (mma) kernels
MMA_DIMS = [d for d in ATTENTION_HEAD_DIMS
            if f"attention_forward_mma_kernel<{d}>" in NAME_EXPRESSIONS["attention"]]
# Against the NumPy bf16 reference the kernels differ only in fp32 summation order (and the
# tensor cores' accumulation), 1e-4 of the sum of the terms' magnitudes, except where such a
# difference flips one bf16 rounding of P or dS (a value next to a rounding midpoint): that moves
# one output row by at most 2^-7 of the rounded term, on a few rows only.
MMA_FP32_TOL = 1e-4


@contextmanager
def backward_variant(variant):
    """The bf16 backward runs as `variant` ("two-pass", "atomic-dq") inside the block."""
    old = set_attention_backward(variant)
    try:
        yield
    finally:
        set_attention_backward(old)


def _check_rerun(backward, run, dqkv, C):
    """A second backward on the same inputs: two-pass gives the same bits; atomic-dq the same
    dK and dV, which are also the two-pass kernels' bit for bit (the same loop over the same
    inputs), while its dQ is summed in the order the key blocks' atomics land."""
    with backward_variant(backward):
        again = run()
    if backward == "two-pass":
        assert_bitwise_equal(again, dqkv, "dqkv")
        return
    assert_bitwise_equal(again[..., C:], dqkv[..., C:], "dk, dv")
    with backward_variant("two-pass"):
        two_pass = run()
    assert_bitwise_equal(dqkv[..., C:], two_pass[..., C:], "dk, dv: atomic-dq vs two-pass")


def _check_bf16(B, T, H, D, bias="none", backward="two-pass"):
    """The bf16 kernels against the bf16 reference and the float64 math; `backward`: the
    variant of the backward (ops.attention.BACKWARD_VARIANTS), to the same tolerances."""
    qkv, dout = _inputs(B, T, H, D, np.float32)
    C = H * D
    m64, M = _slopes(bias, H, np.float32)
    m32 = None if m64 is None else m64.astype(np.float32)
    o_b, l_b = attention_forward_ref(qkv, H, precision="bf16", slopes=m32)
    q64, d64 = qkv.astype(np.float64), dout.astype(np.float64)
    o64, l64 = attention_forward_ref(q64, H, slopes=m64)
    dqkv64 = attention_backward_ref(d64, q64, o64, l64, H, slopes=m64)

    Q, G = cp.asarray(qkv), cp.asarray(dout)
    out, lse = poison((B, T, C)), poison((B, H, T))
    r = attention_forward(Q, H, out=out, lse=lse, precision="bf16", slopes=M)
    assert r[0] is out and r[1] is lse
    vmax = float(np.abs(split64(qkv, H)[2]).max())
    assert_equal_up_to_fp32(host(out), o_b, vmax, 2.0 ** -7 * vmax, "out",  # convex comb. of v
                            rel=MMA_FP32_TOL, heads=H)
    np.testing.assert_allclose(host(lse), l_b, rtol=1e-5, atol=1e-4)
    # against the fp32 math: the bf16 tolerances derived in tests/test_attention.py
    assert np.all(np.abs(host(lse) - l64) <= lse_bound(qkv, H) + 1e-4), "lse vs fp32"
    if T > 1:
        assert rel_err(out, o64) <= 4 * U

    dqkv = poison((B, T, 3 * C))
    with backward_variant(backward):
        assert attention_backward(G, Q, out, lse, H, dqkv=dqkv, precision="bf16",
                                  slopes=M) is dqkv
    oh, lh = host(out), host(lse)  # the reference backward from the kernel's own forward
    want = attention_backward_ref(dout, qkv, oh, lh, H, precision="bf16", slopes=m32)
    mags, flips = backward_magnitudes(dout, qkv, oh, lh, H, m64)
    for i, name in enumerate(("dq", "dk", "dv")):
        sl = slice(i * C, (i + 1) * C)
        assert_equal_up_to_fp32(host(dqkv[..., sl]), want[..., sl], mags[i], flips[i], name,
                                rel=MMA_FP32_TOL, heads=H)
        w = dqkv64[..., sl]
        assert np.abs(host(dqkv[..., sl]) - w).max() <= 12 * U * np.abs(w).max() + 1e-5, name
        if T > 1:
            assert rel_err(dqkv[..., sl], w) <= 6 * U, name

    # bitwise determinism of both passes
    o2, l2 = attention_forward(Q, H, precision="bf16", slopes=M)
    assert_bitwise_equal(o2, out, "out")
    assert_bitwise_equal(l2, lse, "lse")
    _check_rerun(backward, lambda: attention_backward(G, Q, out, lse, H, precision="bf16",
                                                      slopes=M), dqkv, C)


@pytest.mark.parametrize("D", MMA_DIMS)
@pytest.mark.parametrize("T", [1, 17, 64, 65, 255])
def test_attention_bf16_mma_matches_references(T, D):
    _check_bf16(2, T, 2, D)


@pytest.mark.parametrize("D", [64, 128])
def test_attention_bf16_mma_long_sequence(D):
    _check_bf16(1, 1024, 2, D)


@pytest.mark.parametrize("bias", ["none", "alibi"])
@pytest.mark.parametrize("D", [16, 64, 128])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200, 1024])
def test_attention_bf16_atomic_dq_backward_matches_references(T, D, bias):
    _check_bf16(2, T, 2, D, bias, backward="atomic-dq")


def test_attention_bf16_mma_many_heads_and_batches():
    _check_bf16(5, 130, 12, 64)


def test_attention_bf16_mma_covers_the_supported_head_dims():
    assert set(MMA_DIMS) >= {32, 64, 128}
    assert set(MMA_DIMS) == {d for d in ATTENTION_HEAD_DIMS if d % 16 == 0 and d <= 128}


def test_attention_bf16_without_mma_kernel_runs_the_fp32_kernels():
    B, T, H, D = 2, 45, 2, 8  # no mma instantiation for D = 8
    assert D not in MMA_DIMS
    qkv, dout = _inputs(B, T, H, D, np.float32)
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    o1, l1 = attention_forward(Q, H, precision="bf16")
    o2, l2 = attention_forward(Q, H)
    assert_bitwise_equal(o1, o2, "out")
    assert_bitwise_equal(l1, l2, "lse")
    assert_bitwise_equal(attention_backward(G, Q, o1, l1, H, precision="bf16"),
                         attention_backward(G, Q, o2, l2, H), "dqkv")


@pytest.mark.parametrize("D,bias", [(16, "none"), (64, "alibi"), (128, "lattice")])
def test_attention_bf16_storage_equals_float_inputs(D, bias):
    """A bf16 qkv and dout (the bf16 model's) give the bits float32 ones give (the launcher
    rounds those into temporaries): the same operands reach the tensor cores. With dropout."""
    B, T, H = 1, 77, 2
    qkv, dout = _inputs(B, T, H, D, np.float32)
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    Q16, G16 = to_bf16(Q), to_bf16(G)
    M = _slopes(bias, H, np.float32)[1]
    drop = (0.25, _drop_key())
    o1, l1 = attention_forward(Q, H, precision="bf16", slopes=M, dropout=drop)
    o2, l2 = attention_forward(Q16, H, precision="bf16", slopes=M, dropout=drop)
    assert o2.dtype == np.float32 and l2.dtype == np.float32
    assert_bitwise_equal(o1, o2, "out")
    assert_bitwise_equal(l1, l2, "lse")
    assert_bitwise_equal(attention_backward(G, Q, o1, l1, H, precision="bf16", slopes=M,
                                            dropout=drop),
                         attention_backward(G16, Q16, o2, l2, H, precision="bf16", slopes=M,
                                            dropout=drop), "dqkv")


def test_attention_bf16_storage_needs_a_tensor_core_head_dim():
    qkv, dout = _inputs(1, 8, 2, 8, np.float32)  # D = 8: the fp32 kernels, which read float
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    with pytest.raises(ValueError, match="qkv: .*tensor-core kernel"):
        attention_forward(to_bf16(Q), 2, precision="bf16")
    out, lse = attention_forward(Q, 2, precision="bf16")
    with pytest.raises(ValueError, match="dout: .*tensor-core kernel"):
        attention_backward(to_bf16(G), Q, out, lse, 2, precision="bf16")


def test_attention_bf16_rejects_float64_and_misaligned_arrays():
    qkv, dout = _inputs(1, 8, 1, 32, np.float64)
    with pytest.raises(ValueError, match="float32"):
        attention_forward(cp.asarray(qkv), 1, precision="bf16")
    n = qkv.size
    buf = cp.zeros(n + 1, dtype=BF16_DEVICE_DTYPE)
    Q = buf[1:].reshape(qkv.shape)  # a bf16 qkv, contiguous, 2 bytes past a 16-byte boundary
    to_bf16(cp.asarray(qkv.astype(np.float32)), out=Q)
    with pytest.raises(ValueError, match="16-byte"):
        attention_forward(Q, 1, precision="bf16")
    Q8 = cp.zeros(n + 4, dtype=BF16_DEVICE_DTYPE)[4:].reshape(qkv.shape)  # 8 bytes past one
    to_bf16(cp.asarray(qkv.astype(np.float32)), out=Q8)
    with pytest.raises(ValueError, match="16-byte"):
        attention_forward(Q8, 1, precision="bf16")
    # (a float32 qkv or dout is rounded into a fresh temporary: its alignment does not matter)
    Qa = to_bf16(cp.asarray(qkv.astype(np.float32)))
    out, lse = attention_forward(Qa, 1, precision="bf16")
    gbuf = cp.zeros(out.size + 1, dtype=BF16_DEVICE_DTYPE)
    G = gbuf[1:].reshape(out.shape)  # a bf16 dout 2 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match="16-byte"):
        attention_backward(G, Qa, out, lse, 1, precision="bf16")


def test_attention_bf16_softmax_is_peaked_without_overflow():
    """Large scores (|s| ~ 1e3): the online softmax must not overflow."""
    B, T, H, D = 1, 300, 1, 64
    qkv, _ = _inputs(B, T, H, D, np.float32)
    qkv *= 30
    o_b, l_b = attention_forward_ref(qkv, H, precision="bf16")
    out, lse = attention_forward(cp.asarray(qkv), H, precision="bf16")
    assert np.isfinite(host(out)).all()
    assert rel_err(lse, l_b) <= 1e-5
    assert rel_err(out, o_b) <= 1e-3 * math.sqrt(T)  # near-argmax: fp32 ties may flip


# ---- the distance bias (ALiBi, lattice): the <D, true> instantiations of every kernel
@pytest.mark.parametrize("bias", ["alibi", "lattice"])
@pytest.mark.parametrize("D", ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("T", [1, 65, 255])
def test_attention_bias_matches_reference(T, D, bias):
    _check(2, T, 3, D, bias=bias)


@pytest.mark.parametrize("bias", ["alibi", "lattice"])
@pytest.mark.parametrize("D", MMA_DIMS)
@pytest.mark.parametrize("T", [1, 65, 255])
def test_attention_bias_bf16_mma_matches_references(T, D, bias):
    _check_bf16(2, T, 3, D, bias=bias)


@pytest.mark.parametrize("bias", ["alibi", "lattice"])
def test_attention_bias_long_sequence(bias):
    """T = 4096, a length a model trained at 1024 is evaluated at: far keys get scores of
    -m (i - j) ~ -2000; the kernels' fp32 distances stay exact."""
    _check(1, 4096, 2, 64, bias=bias)
    _check_bf16(1, 4096, 2, 64, bias=bias)


def test_attention_bias_float64_runs_the_reference_on_cupy():
    _check(2, 37, 2, 32, dtype=np.float64, rtol=1e-10, floor=1e-12, norm_tol=1e-11, bias="alibi")


def test_attention_bias_slopes_are_read_per_head():
    """Permuting the heads' slopes permutes the heads' outputs: the kernel reads m_h of its own
    head (not the first, not a constant)."""
    B, T, H, D = 1, 70, 4, 32
    qkv, _ = _inputs(B, T, H, D, np.float32)
    one = qkv[..., :D].copy()  # every head's q, k and v: heads differ only in their slopes
    for part in range(3):
        for h in range(H):
            qkv[..., part * H * D + h * D:part * H * D + (h + 1) * D] = one
    m = attention_slopes("lattice", H).astype(np.float32)
    for prec in ("fp32", "bf16"):
        a, _ = attention_forward(cp.asarray(qkv), H, precision=prec, slopes=cp.asarray(m))
        b, _ = attention_forward(cp.asarray(qkv), H, precision=prec,
                                 slopes=cp.asarray(m[::-1].copy()))
        a, b = host(a).reshape(B, T, H, D), host(b).reshape(B, T, H, D)
        np.testing.assert_array_equal(a, b[:, :, ::-1])
        assert not np.array_equal(a[:, :, 0], a[:, :, 1]), prec


def test_attention_bias_rejects_bad_slopes():
    qkv, _ = _inputs(1, 8, 2, 32, np.float32)
    Q = cp.asarray(qkv)
    with pytest.raises(ValueError, match="slopes"):
        attention_forward(Q, 2, slopes=cp.ones(2, dtype=np.float64))
    with pytest.raises(ValueError, match="slopes"):
        attention_forward(Q, 2, slopes=np.ones(2, dtype=np.float32))  # host array


# ---- dropout on the attention probabilities (run-time arguments of every kernel)
DROP_P = 0.25


def _drop_key(device_step=True):
    """A fixed key; its step as the trainer passes it (a float64 device slot) or as an int
    (the reference's, on the host)."""
    step = cp.asarray(np.array([3.0])) if device_step else 3
    return DropoutKey(seed=11, step=step, site=site_id(1, ATTN_PROBS), micro=2)


def _check_dropout(B, T, H, D, precision="fp32", bias="none", backward="two-pass"):
    """The kernels with dropout on against the reference drawing the same mask, with the
    tolerances of _check (fp32: against float64) and _check_bf16 (bf16: against the bf16
    reference from the kernel's own forward; the magnitudes of the terms grow by 1 / (1 - p));
    and the same mask in every pass (bitwise reruns). `backward`: the bf16 backward's
    variant."""
    qkv, dout = _inputs(B, T, H, D, np.float32)
    C = H * D
    m64, M = _slopes(bias, H, np.float32)
    drop, drop_host = (DROP_P, _drop_key()), (DROP_P, _drop_key(device_step=False))
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    out, lse = attention_forward(Q, H, precision=precision, slopes=M, dropout=drop)

    def run():
        return attention_backward(G, Q, out, lse, H, precision=precision, slopes=M, dropout=drop)
    with backward_variant(backward):
        dqkv = run()
    if precision == "fp32":
        q64, d64 = qkv.astype(np.float64), dout.astype(np.float64)
        o_ref, lse_ref = attention_forward_ref(q64, H, slopes=m64, dropout=drop_host)
        dqkv_ref = attention_backward_ref(d64, q64, o_ref, lse_ref, H, slopes=m64,
                                          dropout=drop_host)
        assert_close(out, o_ref, RTOL, FLOOR, "out")
        assert_close(lse, lse_ref, RTOL, FLOOR, "lse")
        grads = {"dq": 0, "dk": 1, "dv": 2}
        if T == 1:
            _assert_one_key_dq_dk_zero(dqkv, q64, d64, H, keep_scale=1 / (1 - DROP_P))
            grads = {"dv": 2}
        for name, i in grads.items():
            sl = slice(i * C, (i + 1) * C)
            assert_close(dqkv[..., sl], dqkv_ref[..., sl], RTOL, FLOOR, name)
    else:
        m32 = None if m64 is None else m64.astype(np.float32)
        o_b, l_b = attention_forward_ref(qkv, H, precision="bf16", slopes=m32, dropout=drop_host)
        vmax = float(np.abs(split64(qkv, H)[2]).max()) / (1 - DROP_P)
        assert_equal_up_to_fp32(host(out), o_b, vmax, 2.0 ** -7 * vmax, "out", rel=MMA_FP32_TOL,
                                heads=H)
        np.testing.assert_allclose(host(lse), l_b, rtol=1e-5, atol=1e-4)
        oh, lh = host(out), host(lse)
        want = attention_backward_ref(dout, qkv, oh, lh, H, precision="bf16", slopes=m32,
                                      dropout=drop_host)
        mags, flips = backward_magnitudes(dout, qkv, oh, lh, H, m64)
        for i, name in enumerate(("dq", "dk", "dv")):
            sl = slice(i * C, (i + 1) * C)
            assert_equal_up_to_fp32(host(dqkv[..., sl]), want[..., sl],
                                    mags[i] / (1 - DROP_P), flips[i] / (1 - DROP_P), name,
                                    rel=MMA_FP32_TOL, heads=H)
    o2, l2 = attention_forward(Q, H, precision=precision, slopes=M, dropout=drop)
    assert_bitwise_equal(o2, out, "out")
    assert_bitwise_equal(l2, lse, "lse")
    _check_rerun(backward, run, dqkv, C)


def _check_dropout_pattern(T, H, D, precision="fp32"):
    """The kept/dropped pattern, element by element: with q = k = 0 every score is 0, so row i
    weighs its keys 1 / (i + 1); with v_j = 2^(j // D) e_(j % D) the output encodes the set
    of kept keys of each (row, column) as an integer, compared with the reference's mask
    (ops.dropout.keep_rows). With dO_i = e_(i % D) a single wrong bit moves dV_j by
    >= 1 / (T (1 - p)), far beyond the rounding of the sums."""
    assert T <= 24 * D  # the integers stay exact in fp32 (and powers of 2 in bf16)
    B = 2
    C = H * D
    qkv = np.zeros((B, T, 3 * C), np.float32)
    dout = np.zeros((B, T, C), np.float32)
    t = np.arange(T)
    for h in range(H):
        qkv[:, t, 2 * C + h * D + t % D] = 2.0 ** (t // D)
        dout[:, t, h * D + t % D] = 1.0
    drop = (DROP_P, _drop_key())
    out, lse = attention_forward(cp.asarray(qkv), H, precision=precision, dropout=drop)
    keep = keep_rows(np.arange(B * H * T).reshape(B, H, T) * T, T, DROP_P,
                     _drop_key(device_step=False))
    keep &= np.tril(np.ones((T, T), bool))
    code = keep @ np.where(t[:, None] % D == np.arange(D), 2.0 ** (t // D)[:, None], 0.0)
    got = host(out).reshape(B, T, H, D).transpose(0, 2, 1, 3) * (t[:, None] + 1) * (1 - DROP_P)
    bad = np.rint(got) != code                         # (B, H, T, D): kept keys, exactly
    assert not bad.any(), f"out: the kept keys of {bad.sum()} of {bad.size} (row, column) " \
        "pairs differ from the reference mask"
    assert (np.abs(got - code) <= 1e-5 * np.maximum(code, 1)).all()
    dqkv = attention_backward(cp.asarray(dout), cp.asarray(qkv), out, lse, H,
                              precision=precision, dropout=drop)
    want = attention_backward_ref(dout, qkv, host(out), host(lse), H, precision=precision,
                                  dropout=(DROP_P, _drop_key(device_step=False)))
    dv, dv_ref = host(dqkv[..., 2 * C:]), want[..., 2 * C:]
    assert np.abs(dv - dv_ref).max() <= 1e-2 / (T * (1 - DROP_P)), "dv: dropped pattern"


def check_bf16_storage(B, T, H, D, bias="none", dropout=False):
    """The model's bf16 attention (model.py): the forward writing a bf16 out alone, the
    backward a bf16 dqkv (two-pass), against the NumPy bf16 reference drawing the same mask,
    with _check_dropout's tolerances plus one bf16 rounding of each stored value."""
    qkv, dout = _inputs(B, T, H, D, np.float32)
    C = H * D
    m64, M = _slopes(bias, H, np.float32)
    m32 = None if m64 is None else m64.astype(np.float32)
    drop = (DROP_P, _drop_key()) if dropout else None
    drop_host = (DROP_P, _drop_key(device_step=False)) if dropout else None
    scale = 1 / (1 - DROP_P) if dropout else 1.0
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    out = cp.full((B, T, C), 0xFFFF, dtype=BF16_DEVICE_DTYPE)  # NaN bits
    lse = cp.full((B, H, T), np.nan, dtype=np.float32)
    attention_forward(Q, H, out=out, lse=lse, precision="bf16", slopes=M, dropout=drop)
    dqkv = cp.full((B, T, 3 * C), 0xFFFF, dtype=BF16_DEVICE_DTYPE)
    with backward_variant("two-pass"):
        attention_backward(G, Q, out, lse, H, dqkv=dqkv, precision="bf16", slopes=M,
                           dropout=drop)
    oh, lh = host(from_bf16(out)).astype(np.float32), host(lse)
    o_b, l_b = attention_forward_ref(qkv, H, precision="bf16", slopes=m32, dropout=drop_host)
    vmax = float(np.abs(split64(qkv, H)[2]).max()) * scale
    rel = MMA_FP32_TOL
    # rel * mag bounds the fp32 differences; U |want| / rel adds the bf16 store's rounding
    assert_equal_up_to_fp32(oh, o_b, vmax + U * np.abs(o_b) / rel,
                                  2.0 ** -7 * vmax, "out (bf16)", rel=rel, heads=H)
    np.testing.assert_allclose(lh, l_b, rtol=1e-5, atol=1e-4)
    want = attention_backward_ref(dout, qkv, oh, lh, H, precision="bf16", slopes=m32,
                                  dropout=drop_host)
    mags, flips = backward_magnitudes(dout, qkv, oh, lh, H, m64)
    got = host(from_bf16(dqkv))
    for i, name in enumerate(("dq", "dk", "dv")):
        sl = slice(i * C, (i + 1) * C)
        w = want[..., sl]
        assert_equal_up_to_fp32(got[..., sl], w, mags[i] * scale + U * np.abs(w) / rel,
                                      flips[i] * scale, f"{name} (bf16)", rel=rel, heads=H)



@pytest.mark.parametrize("bias", ["none", "alibi"])
@pytest.mark.parametrize("D", MMA_DIMS)
def test_attention_bf16_model_storage_with_dropout_over_key_tiles(D, bias):
    """The model's bf16 path (a bf16 out alone, a bf16 dqkv) with dropout over several key
    tiles: regions the emulator's coverage run found run only in other instantiations (the
    bf16 store of out at D = 64 without the bias, the dq kernel's next-tile prefetch with a
    bf16 dqkv, the forward's dropout bits); the emulator's attention_bf16 group runs it too."""
    check_bf16_storage(1, 70, 2, D, bias, dropout=True)


@pytest.mark.parametrize("T", [1, 67, 130])
@pytest.mark.parametrize("D", [16, 64, 128])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_dropout_matches_reference(precision, D, T):
    _check_dropout(2, T, 2, D, precision)


@pytest.mark.parametrize("bias", ["alibi", "lattice"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_dropout_with_bias_matches_reference(precision, bias):
    _check_dropout(2, 255, 3, 64, precision, bias)


@pytest.mark.parametrize("bias", ["none", "lattice"])
@pytest.mark.parametrize("T,D", [(67, 16), (200, 64), (130, 128)])
def test_attention_dropout_atomic_dq_backward_matches_reference(T, D, bias):
    _check_dropout(2, T, 2, D, "bf16", bias, backward="atomic-dq")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("T,D", [(67, 16), (130, 32), (1024, 64)])
def test_attention_dropout_pattern_is_the_reference_mask(precision, T, D):
    _check_dropout_pattern(T, 2, D, precision)


def test_attention_dropout_zero_is_the_plain_kernel():
    """p = 0 (or no dropout argument): the plain results, bitwise; p > 0 changes them."""
    qkv, dout = _inputs(1, 70, 2, 32, np.float32)
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    for precision in ("fp32", "bf16"):
        o1, l1 = attention_forward(Q, 2, precision=precision)
        o2, l2 = attention_forward(Q, 2, precision=precision, dropout=(0.0, None))
        assert_bitwise_equal(o2, o1, "out")
        assert_bitwise_equal(l2, l1, "lse")
        assert_bitwise_equal(attention_backward(G, Q, o2, l2, 2, precision=precision,
                                                dropout=(0.0, None)),
                             attention_backward(G, Q, o1, l1, 2, precision=precision), "dqkv")
        o3, l3 = attention_forward(Q, 2, precision=precision, dropout=(DROP_P, _drop_key()))
        assert_bitwise_equal(l3, l1, "lse (of the undropped probabilities)")
        assert not np.array_equal(host(o3), host(o1))


# The D = 64 forward's block shape is a compile-time setting (kernels.SETTINGS; attention.cu
# AttnMmaCfg): 4 warps x 3 blocks per SM instead of 8 x 2, or 4 warps of two 16-row m-tiles each
# (128 queries per block, Q staged in shared memory) x 2. Each 16-row m-tile meets the same key
# tiles in the same order, with the same operations per row, in every build, so the outputs are
# the default's, bit for bit.
D64_FWD_BUILDS = {
    "4x3": dict(CLLM_ATTN_FWD_WARPS_D64=4, CLLM_ATTN_FWD_MIN_BLOCKS_D64=3),
    "4x2-m2": dict(CLLM_ATTN_FWD_WARPS_D64=4, CLLM_ATTN_FWD_MIN_BLOCKS_D64=2,
                   CLLM_ATTN_FWD_MTILES_D64=2),
}


def _check_d64_forward_build(build, B, T, H, bias="none", dropout=False):
    qkv, _ = _inputs(B, T, H, 64, np.float32)
    Q = cp.asarray(qkv)
    M = _slopes(bias, H, np.float32)[1]
    drop = (DROP_P, _drop_key()) if dropout else None
    name = f"attention_forward_mma_kernel<64{'' if M is None else ', true'}>"
    o1, l1 = attention_forward(Q, H, precision="bf16", slopes=M, dropout=drop)
    assert _cuda.kernel("attention", name).max_threads_per_block == 256
    kernels.use_settings("attention", **D64_FWD_BUILDS[build])
    try:
        # the launch runs the 128-thread build (a 256-thread block would be refused)
        assert _cuda.kernel("attention", name).max_threads_per_block == 128
        out, lse = poison((B, T, H * 64)), poison((B, H, T))
        attention_forward(Q, H, out=out, lse=lse, precision="bf16", slopes=M, dropout=drop)
    finally:
        kernels.use_settings("attention")
    assert_bitwise_equal(out, o1, "out")
    assert_bitwise_equal(lse, l1, "lse")


@pytest.mark.parametrize("B,T,H,bias,dropout", [(1, 130, 2, "none", False),
                                                (2, 67, 1, "lattice", False),
                                                (1, 200, 1, "alibi", True)])
def test_attention_bf16_d64_forward_4_warps_is_bitwise_the_default(B, T, H, bias, dropout):
    _check_d64_forward_build("4x3", B, T, H, bias, dropout)


# two m-tiles per warp: T below, at and past one 128-query block, and not a multiple of 16
@pytest.mark.parametrize("B,T,H,bias,dropout", [(2, 1, 1, "none", False),
                                                (1, 17, 2, "lattice", True),
                                                (1, 128, 1, "alibi", False),
                                                (1, 200, 1, "lattice", True)])
def test_attention_bf16_d64_forward_2_mtiles_is_bitwise_the_default(B, T, H, bias, dropout):
    _check_d64_forward_build("4x2-m2", B, T, H, bias, dropout)


@pytest.mark.parametrize("build", [None, "4x2-m2"])
@pytest.mark.parametrize("bias", ["none", "lattice"])
def test_attention_bf16_d64_forward_builds_match_reference(build, bias):
    """Both the default D = 64 forward and the 2-m-tile build against the bf16 reference."""
    kernels.use_settings("attention", **(D64_FWD_BUILDS[build] if build else {}))
    try:
        _check_bf16(2, 300, 2, 64, bias=bias)
    finally:
        kernels.use_settings("attention")


# ---- out_mm: the bf16 copy of out (the bf16 model's output-projection operand)
def _check_out_mm(B, T, H, D, precision="bf16", bias="none", dropout=False, build=None):
    """out_mm is to_bf16(out) bit for bit, and out, lse are those of a forward without it: the
    tensor-core forward stores it from its registers (with `build`, a D = 64 forward build of
    D64_FWD_BUILDS), every other path casts out into it. In bf16 a bf16 out alone gets the
    same bits (the tensor-core forward writes no float output then)."""
    qkv, _ = _inputs(B, T, H, D, np.float32)
    Q = cp.asarray(qkv)
    M = _slopes(bias, H, np.float32)[1]
    drop = (DROP_P, _drop_key()) if dropout else None
    o1, l1 = attention_forward(Q, H, precision=precision, slopes=M, dropout=drop)
    out, lse = poison((B, T, H * D)), poison((B, H, T))
    mm = cp.full((B, T, H * D), 0xFFFF, dtype=BF16_DEVICE_DTYPE)  # NaN bits
    kernels.use_settings("attention", **(D64_FWD_BUILDS[build] if build else {}))
    try:
        if build:  # the 128-thread build runs
            name = f"attention_forward_mma_kernel<64{'' if M is None else ', true'}>"
            assert _cuda.kernel("attention", name).max_threads_per_block == 128
        r = attention_forward(Q, H, out=out, lse=lse, precision=precision, slopes=M,
                              dropout=drop, out_mm=mm)
    finally:
        kernels.use_settings("attention")
    assert r[0] is out and r[1] is lse
    assert_bitwise_equal(out, o1, "out")
    assert_bitwise_equal(lse, l1, "lse")
    assert_bitwise_equal(mm, to_bf16(o1), "out_mm")
    if precision == "bf16":  # out itself in bf16 storage: those bits, and no float output
        alone, lse2 = cp.full((B, T, H * D), 0xFFFF, dtype=BF16_DEVICE_DTYPE), poison((B, H, T))
        kernels.use_settings("attention", **(D64_FWD_BUILDS[build] if build else {}))
        try:
            r = attention_forward(Q, H, out=alone, lse=lse2, precision=precision, slopes=M,
                                  dropout=drop)
        finally:
            kernels.use_settings("attention")
        assert r[0] is alone and r[1] is lse2
        assert_bitwise_equal(alone, mm, "bf16 out alone")
        assert_bitwise_equal(lse2, l1, "lse with a bf16 out")


# the mma forward (T past one block and not a multiple of 128; bias, dropout), the D = 64
# builds, the fp32 kernels (fp32, or bf16 at D = 8) and the CuPy reference (D = 24): cast
OUT_MM_CASES = [(2, 200, 2, 64, "bf16", "lattice", True, None),
                (1, 130, 3, 16, "bf16", "none", False, None),
                (1, 77, 2, 128, "bf16", "alibi", True, None),
                (2, 1, 1, 80, "bf16", "none", False, None),
                (1, 200, 1, 64, "bf16", "alibi", True, "4x3"),
                (1, 200, 1, 64, "bf16", "lattice", True, "4x2-m2"),
                (1, 45, 2, 32, "fp32", "alibi", True, None),
                (1, 45, 2, 8, "bf16", "none", False, None),
                (1, 33, 1, 24, "bf16", "none", False, None)]


@pytest.mark.parametrize("B,T,H,D,precision,bias,dropout,build", OUT_MM_CASES)
def test_attention_out_mm_is_the_bf16_copy_of_out(B, T, H, D, precision, bias, dropout, build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # D = 24: no kernel, the reference on CuPy warns
        _check_out_mm(B, T, H, D, precision, bias, dropout, build)


@pytest.mark.parametrize("D,T,bias,dropout", [(16, 65, "none", False), (64, 200, "lattice", True),
                                              (128, 77, "alibi", True)])
def test_attention_bf16_backward_reads_o_in_bf16(D, T, bias, dropout):
    """The tensor-core backward's Delta sums the bf16 dO and O: a float O (rounded by the
    launcher) and the forward's bf16 O alone give the same dqkv bits (two-pass)."""
    B, H = 2, 2
    qkv, _ = _inputs(B, T, H, D, np.float32)
    Q = cp.asarray(qkv)
    M = _slopes(bias, H, np.float32)[1]
    drop = (DROP_P, _drop_key()) if dropout else None
    dout = cp.asarray(np.random.default_rng(5).normal(size=(B, T, H * D)).astype(np.float32))
    o32, lse = attention_forward(Q, H, precision="bf16", slopes=M, dropout=drop)
    o16, _ = attention_forward(Q, H, out=cp.empty((B, T, H * D), BF16_DEVICE_DTYPE),
                               precision="bf16", slopes=M, dropout=drop)
    g32, g16 = (attention_backward(dout, Q, o, lse, H, precision="bf16", slopes=M, dropout=drop)
                for o in (o32, o16))
    assert_bitwise_equal(g16, g32, "dqkv from the bf16 O")


def test_attention_bf16_backward_without_mma_reads_o_as_its_float_values():
    """At a head dim without a tensor-core kernel (8) the bf16 model's backward runs the fp32
    kernels, which read a float O: a bf16 O (the forward's rounding of its float O) is widened
    first, so dqkv is the backward from the float O rounded to bf16 (h27k: the widening ran
    on no emulator check)."""
    B, H, T, D = 2, 2, 33, 8
    qkv, _ = _inputs(B, T, H, D, np.float32)
    Q = cp.asarray(qkv)
    dout = cp.asarray(np.random.default_rng(6).normal(size=(B, T, H * D)).astype(np.float32))
    o32, lse = attention_forward(Q, H, precision="bf16")
    o16, _ = attention_forward(Q, H, out=cp.empty((B, T, H * D), BF16_DEVICE_DTYPE),
                               precision="bf16")
    g16 = attention_backward(dout, Q, o16, lse, H, precision="bf16")
    want = attention_backward(dout, Q, from_bf16(to_bf16(o32)), lse, H, precision="bf16")
    assert_bitwise_equal(g16, want, "dqkv from the bf16 O")

def test_attention_out_mm_rejects_bad_arrays():
    qkv, _ = _inputs(1, 8, 2, 32, np.float32)
    Q, shape = cp.asarray(qkv), (1, 8, 64)
    buf = cp.zeros(qkv.size + 1, dtype=BF16_DEVICE_DTYPE)
    for bad, match in ((cp.zeros(shape, np.float32), "out_mm: expected bf16 storage"),
                       (np.zeros(shape, BF16_DEVICE_DTYPE), "out_mm: expected a CuPy"),
                       (buf[1:1 + 512].reshape(shape), "out_mm: needs a 4-byte aligned"),
                       (Q.reshape(-1).view(BF16_DEVICE_DTYPE)[:512].reshape(shape),
                        "out_mm: must not overlap qkv")):
        with pytest.raises(ValueError, match=match):
            attention_forward(Q, 2, precision="bf16", out_mm=bad)
    out = cp.empty(shape, np.float32)
    with pytest.raises(ValueError, match="out_mm: must not overlap out"):
        attention_forward(Q, 2, out=out, precision="bf16",
                          out_mm=out.reshape(-1).view(BF16_DEVICE_DTYPE)[:512].reshape(shape))



# ---- a bf16 dqkv: the bf16 model's c_attn operand, stored by the backward kernels themselves
def _check_dqkv_bf16(B, T, H, D, backward="two-pass", bias="none", dropout=False):
    """A bf16 dqkv is to_bf16 of the float dqkv the same kernels write: bit for bit (two-pass,
    the fallbacks; atomic-dq's dK, dV); atomic-dq's dQ, summed in the order its atomics land,
    within one bf16 rounding plus the fp32 reordering tolerance of the float one."""
    qkv, dout = _inputs(B, T, H, D, np.float32)
    Q, G, C = cp.asarray(qkv), cp.asarray(dout), H * D
    m64, M = _slopes(bias, H, np.float32)
    drop = (DROP_P, _drop_key()) if dropout else None
    out, lse = attention_forward(Q, H, precision="bf16", slopes=M, dropout=drop)
    mm = cp.full((B, T, 3 * C), 0xFFFF, dtype=BF16_DEVICE_DTYPE)  # NaN bits
    with backward_variant(backward):
        f = attention_backward(G, Q, out, lse, H, precision="bf16", slopes=M, dropout=drop)
        r = attention_backward(G, Q, out, lse, H, dqkv=mm, precision="bf16", slopes=M,
                               dropout=drop)
    assert r is mm
    want = to_bf16(f)
    if backward == "two-pass":
        assert_bitwise_equal(mm, want, "dqkv")
        return
    assert_bitwise_equal(mm[..., C:], want[..., C:], "dk, dv")
    got, fq = host(from_bf16(mm[..., :C].copy())).astype(np.float64), host(f[..., :C])
    mags = backward_magnitudes(dout, qkv, host(out), host(lse), H, m64)[0][0]   # dq's
    mags = mags / (1 - DROP_P) if dropout else mags
    err = np.abs(got - fq)
    assert np.isfinite(err).all(), "dq: unwritten or NaN"
    assert (err <= U * np.abs(fq) + MMA_FP32_TOL * mags).all(), f"dq: max err {err.max()}"


# two-pass and atomic-dq at D 16 / 64 / 128 (T 1, 63, 65, 200; the bias, dropout); the fp32
# kernels (bf16 at D = 8) and the CuPy reference (D = 24): cast from a float dqkv; then T = 17
# for every <D, bias, true> instantiation not run above
DQKV_BF16_CASES = [(2, 65, 2, 16, "two-pass", "none", False),
                   (1, 200, 2, 64, "two-pass", "lattice", True),
                   (1, 63, 1, 128, "two-pass", "alibi", True),
                   (1, 1, 2, 64, "two-pass", "none", False),
                   (1, 200, 2, 16, "atomic-dq", "alibi", True),
                   (2, 65, 1, 64, "atomic-dq", "none", False),
                   (1, 63, 1, 128, "atomic-dq", "lattice", True),
                   (1, 1, 1, 16, "atomic-dq", "none", False),
                   (1, 45, 2, 8, "two-pass", "none", True),
                   (1, 33, 1, 24, "two-pass", "none", False)]
DQKV_BF16_CASES += [(1, 17, 1, D, backward, bias, False) for D in MMA_DIMS
                    for backward in ("two-pass", "atomic-dq") for bias in ("none", "alibi")
                    if not any(c[3] == D and c[4] == backward and (c[5] == "none") == (bias == "none")
                               for c in DQKV_BF16_CASES)]


@pytest.mark.parametrize("B,T,H,D,backward,bias,dropout", DQKV_BF16_CASES)
def test_attention_dqkv_bf16_is_the_bf16_copy_of_dqkv(B, T, H, D, backward, bias, dropout):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # D = 24: no kernel, the reference on CuPy warns
        _check_dqkv_bf16(B, T, H, D, backward, bias, dropout)


def test_attention_dqkv_bf16_rejects_bad_arrays():
    qkv, dout = _inputs(1, 8, 2, 32, np.float32)
    Q, G, shape = cp.asarray(qkv), cp.asarray(dout), (1, 8, 192)
    out, lse = attention_forward(Q, 2, precision="bf16")
    buf = cp.zeros(qkv.size + 1, dtype=BF16_DEVICE_DTYPE)
    for bad, precision, match in (
            (cp.zeros(shape, BF16_DEVICE_DTYPE), "fp32", "dqkv: bf16 storage needs precision"),
            (np.zeros(shape, BF16_DEVICE_DTYPE), "bf16", "dqkv: must live where qkv does"),
            (cp.zeros((1, 9, 192), BF16_DEVICE_DTYPE), "bf16", "dqkv: expected shape"),
            (buf[1:1 + qkv.size].reshape(shape), "bf16", "dqkv: a bf16 dqkv needs a 4-byte")):
        with pytest.raises(ValueError, match=match):
            attention_backward(G, Q, out, lse, 2, dqkv=bad, precision=precision)
    both = cp.zeros(qkv.size, np.float32)   # out in its first half, a bf16 dqkv over all of it
    out_in = both[:out.size].reshape(out.shape)
    out_in[...] = out
    with pytest.raises(ValueError, match="dqkv: must not overlap out"):
        attention_backward(G, Q, out_in, lse, 2, precision="bf16",
                           dqkv=both.view(BF16_DEVICE_DTYPE)[:qkv.size].reshape(shape))

def test_attention_dropout_rejects_bad_arguments():
    qkv, _ = _inputs(1, 8, 2, 32, np.float32)
    Q = cp.asarray(qkv)
    with pytest.raises(ValueError, match="dropout p"):
        attention_forward(Q, 2, dropout=(1.0, _drop_key()))
    with pytest.raises(TypeError, match="DropoutKey"):
        attention_forward(Q, 2, dropout=(0.5, (1, 2)))
    with pytest.raises(ValueError, match="key.step"):   # a host step slot for device arrays
        attention_forward(Q, 2, dropout=(0.5, DropoutKey(11, np.array([3.0]), 1)))
