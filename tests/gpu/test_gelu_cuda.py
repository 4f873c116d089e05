import numpy as np
import pytest

from cllm_gpu.ops.gelu import gelu_backward, gelu_backward_ref, gelu_forward, gelu_forward_ref
from gpu_util import assert_bitwise_equal, assert_close, poison, tol

cp = pytest.importorskip("cupy")


def tanh_error(d, x, dtype):
    """An absolute bound on dout * gelu'(x)'s error from tanh's (4 ulp of |t| <= 1: the GPU's
    tanhf is within 2), amplified where 1 + t or 1 - t^2 cancels (x below about -2.5: gelu'
    relative error up to ~1e-4 per ulp of t), plus what fusing a product into a sum there
    changes (fma: one rounding fewer). Without it a lone element there (no larger one to lift
    the floor) failed rtol 2e-5 once a*b + c was contracted (CLLM_EMU_FP_CONTRACT=1)."""
    if dtype != np.float32:
        return 0.0
    x = np.asarray(x, np.float64)
    return np.abs(d) * (1 + np.abs(x) * (1 + 3 * 0.044715 * x * x)) * 4 * 2.0 ** -24


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (17,), (255, 3), (1000, 333)])
def test_gelu_matches_reference(dtype, shape):
    rng = np.random.default_rng(1)
    x = (rng.normal(scale=3, size=shape)).astype(dtype)
    d = rng.normal(size=shape).astype(dtype)
    xd, dd = cp.asarray(x), cp.asarray(d)
    rtol, floor = tol(dtype)
    out = poison(shape, dtype)
    assert gelu_forward(xd, out=out) is out
    assert_close(out, gelu_forward_ref(x.astype(np.float64)), rtol, floor, "gelu forward")
    dx = poison(shape, dtype)
    assert gelu_backward(dd, xd, dx=dx) is dx
    assert_close(dx, gelu_backward_ref(d.astype(np.float64), x.astype(np.float64)), rtol, floor,
                 "gelu backward", atol=tanh_error(d, x, dtype))
    # allocating variants, in place, determinism
    assert_bitwise_equal(gelu_forward(xd), out)
    d2 = dd.copy()
    assert gelu_backward(d2, xd, dx=d2) is d2
    assert_bitwise_equal(d2, dx)
    x2 = xd.copy()
    gelu_forward(x2, out=x2)
    assert_bitwise_equal(x2, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_derivative_at_huge_inputs_is_1_or_0(dtype):
    """|x| past sqrt(max) (1.9e19 in float32, 1.3e154 in float64), a diverging run's MLP
    pre-activation: x^2 overflows in u' while 1 - tanh^2 is exactly 0; the derivative is 1 or 0
    (NaN came of 0 * inf), in the plain kernel and the fused one (bias, bf16 storage)."""
    big = [1e4, 1e19, 2e19, 1e30] + ([3e38] if dtype == np.float32 else [1e160, 1e300])
    x = np.array(big + [-v for v in big], dtype=dtype).reshape(2, -1)
    want = np.array([[1.0] * len(big), [0.0] * len(big)], dtype)
    ones = cp.ones(x.shape, dtype=dtype)
    np.testing.assert_array_equal(cp.asnumpy(gelu_backward(ones, cp.asarray(x))), want)
    bias = cp.zeros(x.shape[1], dtype=dtype)
    dbias = cp.zeros(x.shape[1], dtype=dtype)
    got = gelu_backward(ones, cp.asarray(x), dbias=dbias, bias=bias)
    np.testing.assert_array_equal(cp.asnumpy(got), want)
    np.testing.assert_array_equal(cp.asnumpy(dbias), want.sum(axis=0))
    np.testing.assert_array_equal(cp.asnumpy(gelu_forward(cp.asarray(x))),
                                  np.where(x > 0, x, 0).astype(dtype))


def test_gelu_rejects_bad_out():
    x = cp.zeros((4, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="out"):
        gelu_forward(x, out=cp.zeros((4, 5), dtype=np.float64))
    with pytest.raises(ValueError, match="dout"):
        gelu_backward(cp.zeros((5, 4), dtype=np.float32), x)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gelu_refuses_an_output_over_an_input_in_other_storage(with_bias):
    """An output over an input in bf16 storage (float32 elements twice as wide: a thread would
    write elements others read), or over one shifted by an element, is refused: only out = x
    and dx = dout or x, in the same storage, are in place."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE
    shape = (33, 65)
    n = shape[0] * shape[1]
    b = cp.zeros(shape[-1], np.float32) if with_bias else None
    arena = cp.zeros(n + 1, np.float32)
    x16 = arena.view(BF16_DEVICE_DTYPE)[:n].reshape(shape)
    d16 = cp.zeros(shape, BF16_DEVICE_DTYPE)
    over = arena[:n].reshape(shape)
    with pytest.raises(ValueError, match="out: must be x itself"):
        gelu_forward(x16, out=over, bias=b)
    with pytest.raises(ValueError, match="dx: must be x itself"):
        gelu_backward(d16, x16, dx=over, bias=b)
    with pytest.raises(ValueError, match="dx: must be dout itself"):
        gelu_backward(x16, d16, dx=over, bias=b)
    x = arena[:n].reshape(shape)
    with pytest.raises(ValueError, match="out: must be x itself"):
        gelu_forward(x, out=arena[1:].reshape(shape), bias=b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (33, 65), (1024, 3072)])
def test_gelu_fused_bias_and_bf16_out(shape, dtype):
    """The forward adding the bias itself, in each compute type (float64: the double model's
    c_fc, gelu_forward_kernel<double, double, double> with its bias), and for float32 also
    into a bf16 out."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, bf16_bits
    rng = np.random.default_rng(2)
    x = rng.normal(scale=2, size=shape).astype(dtype)
    b = rng.normal(size=shape[-1]).astype(dtype)
    rtol, floor = tol(dtype)
    X = cp.asarray(x)
    out = poison(shape, dtype)
    gelu_forward(X, out=out, bias=cp.asarray(b))
    assert_bitwise_equal(X, cp.asarray(x), "x left alone (the backward adds the bias itself)")
    assert_close(out, gelu_forward_ref(x.astype(np.float64) + b), rtol, floor, "gelu(x + b)")
    if dtype != np.float32:   # bf16 storage is float32's alone (check_storage)
        return
    X2 = cp.asarray(x)
    out16 = cp.full(shape, 0xFFFF, dtype=BF16_DEVICE_DTYPE)
    gelu_forward(X2, out=out16, bias=cp.asarray(b))  # a bf16 out: rounded output
    assert_bitwise_equal(X2, X)
    got, want = cp.asnumpy(out16), bf16_bits(cp.asnumpy(out))
    assert (np.abs(got.astype(np.int32) - want.astype(np.int32)) <= 1).all()
    assert (got != want).sum() <= max(1, got.size // 10_000)


# 2049 and 4100 rows: more than 32 chunks of 64 rows (33 and 65), so the finalize's lanes go
# round their loop over chunks a second and third time (colsum_chunks; CLLM_FINALIZE_LANES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 31), (130, 3072), (2049, 8), (4100, 40)])
@pytest.mark.parametrize("storage", ["float32", "bf16", "float64"])
def test_gelu_backward_with_bias_gradient(shape, storage):
    """The fused backward (dx in float or bf16 storage + the bias gradient's column sums in a
    fixed order), its gradient taken at x + bias, against the reference. storage: dx's (bf16:
    float32 inputs); float64 runs the double instantiation."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, bits_to_float
    rng = np.random.default_rng(9)
    bf16 = storage == "bf16"
    dt = np.float64 if storage == "float64" else np.float32
    x, d = (rng.normal(scale=2, size=shape).astype(dt) for _ in range(2))
    b = rng.normal(size=shape[-1]).astype(dt)
    want = gelu_backward_ref(d.astype(np.float64), x.astype(np.float64) + b)
    rtol, floor = tol(dt)
    dx = cp.full(shape, 0xFFFF, BF16_DEVICE_DTYPE) if bf16 else poison(shape, dt)
    db = cp.ones(shape[-1], dt)
    assert gelu_backward(cp.asarray(d), cp.asarray(x), dx=dx, dbias=db, bias=cp.asarray(b)) is dx
    got = bits_to_float(cp.asnumpy(dx)) if bf16 else dx
    assert_close(got, want, 2.0 ** -8 if bf16 else rtol, floor, "dx",
                 atol=tanh_error(d, x.astype(np.float64) + b, dt))
    assert_close(db, 1 + want.sum(axis=0), 1e-5, 1e-5 * np.sqrt(shape[0]), "dbias")
    db2 = cp.ones(shape[-1], dt)
    gelu_backward(cp.asarray(d), cp.asarray(x), dx=dx, dbias=db2, bias=cp.asarray(b))
    assert_bitwise_equal(db2, db, "dbias rerun")


@pytest.mark.parametrize("shape", [(1, 1), (37, 31), (130, 3072)])
def test_gelu_bf16_inputs_are_the_float32_kernels_on_their_values(shape):
    """x and dout in bf16 storage (in the bf16 model: c_fc's product and the MLP projection's
    dx, each written by its GEMM) with the fp32 bias: bitwise what the float32 kernels give on
    the same values, the outputs rounded once; the backward in place, as the model runs it."""
    from cllm_gpu.ops.cast import from_bf16, to_bf16
    rng = np.random.default_rng(11)
    x16 = to_bf16(cp.asarray(rng.normal(scale=2, size=shape).astype(np.float32)))
    d16 = to_bf16(cp.asarray(rng.normal(size=shape).astype(np.float32)))
    b = cp.asarray(rng.normal(size=shape[-1]).astype(np.float32))
    xf, df, x_before = from_bf16(x16), from_bf16(d16), x16.copy()
    y = gelu_forward(x16, bias=b)
    assert y.dtype == np.float32
    assert_bitwise_equal(y, gelu_forward(xf, bias=b), "forward, float32 out")
    y16 = gelu_forward(x16, out=cp.full(shape, 0xFFFF, x16.dtype), bias=b)
    assert_bitwise_equal(y16, to_bf16(y), "forward, bf16 out")
    want_db = cp.zeros(shape[-1], np.float32)
    want = gelu_backward(df, xf, bias=b, dbias=want_db)
    assert_bitwise_equal(gelu_backward(d16, x16, bias=b), want, "backward, float32 dx")
    db = cp.zeros(shape[-1], np.float32)
    assert gelu_backward(d16, x16, dx=d16, bias=b, dbias=db) is d16
    assert_bitwise_equal(d16, to_bf16(want), "backward in place into bf16")
    assert_bitwise_equal(db, want_db, "dbias")
    assert_bitwise_equal(x16, x_before, "x left alone")
    rtol, floor = tol(np.float32)
    ref = gelu_backward_ref(cp.asnumpy(df).astype(np.float64),
                            cp.asnumpy(xf).astype(np.float64) + cp.asnumpy(b))
    assert_close(want, ref, rtol, floor, "float32 kernel on bf16 values vs float64")


@pytest.mark.parametrize("shape", [(1, 1), (37, 31)])
def test_gelu_backward_into_a_bf16_dx_without_a_bias(shape):
    """A bf16 dx from float32 inputs with no bias and no bias gradient takes the fused kernel
    (the plain one writes float elements only): the float32 gradient rounded once, as with a
    zero bias (x + 0 is x). Mutation audit (h30p): sending this case to the plain kernel passed
    every emulated check."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, to_bf16
    rng = np.random.default_rng(5)
    x, d = (cp.asarray(rng.normal(scale=2, size=shape).astype(np.float32)) for _ in range(2))
    want = gelu_backward(d, x, bias=cp.zeros(shape[-1], np.float32))
    dx = cp.full(shape, 0xFFFF, BF16_DEVICE_DTYPE)
    assert gelu_backward(d, x, dx=dx) is dx
    assert_bitwise_equal(dx, to_bf16(want), "bf16 dx without a bias")


def test_gelu_refuses_an_output_over_the_bias():
    """Every row reads the bias: out (forward) or dx (backward) over it races."""
    N, C = 5, 8
    x, d = cp.ones((N, C), np.float32), cp.ones((N, C), np.float32)
    out = cp.zeros((N, C), np.float32)
    with pytest.raises(ValueError, match="out: must not overlap bias"):
        gelu_forward(x, out=out, bias=out[0])
    with pytest.raises(ValueError, match="dx: must not overlap bias"):
        gelu_backward(d, x, dx=out, bias=out[N - 1])


@pytest.mark.parametrize("storage", ["float32", "bf16", "float64"])
def test_gelu_backward_in_a_given_scratch(storage):
    """The bias gradient's partial column sums in a caller's scratch (the model's activation
    cache, so a CUDA-graph capture allocates none of them): the same bits as partials allocated
    per call, dirty scratch or not; a scratch of another dtype, too small, misaligned or over an
    input is refused before any launch, on the plain path (no bias, no sums) too."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE
    from cllm_gpu.ops.gelu import gelu_backward_scratch_size
    N, C = 130, 40                       # 3 chunks of 64 rows
    rng = np.random.default_rng(11)
    bf16 = storage == "bf16"
    dt = np.float64 if storage == "float64" else np.float32
    X, D = (cp.asarray(rng.normal(scale=2, size=(N, C)).astype(dt)) for _ in range(2))
    Bs = cp.asarray(rng.normal(size=C).astype(dt))

    def run(scratch, dout=D, fused=True):
        dx = cp.full((N, C), 0xFFFF, BF16_DEVICE_DTYPE) if bf16 else poison((N, C), dt)
        db = cp.ones(C, dt)
        gelu_backward(dout, X, dx=dx, dbias=db if fused else None, bias=Bs if fused else None,
                      scratch=scratch)
        return dx, db
    n = gelu_backward_scratch_size(N, C)
    scratch = cp.full(n + 64, np.nan, dt)   # dirty: every element is written
    for got, want, what in zip(run(scratch), run(None), ("dx", "dbias")):
        assert_bitwise_equal(got, want, f"{what}: given scratch vs allocated")
    other = np.float64 if dt == np.float32 else np.float32
    for fused in (True, False):
        for bad, why in ((cp.zeros(n, other), np.dtype(dt).name),
                         (cp.zeros(n - 1, dt), f"at least {n}"),
                         (scratch[1:], "256-byte aligned")):
            with pytest.raises(ValueError, match=why):
                run(bad, fused=fused)
        with pytest.raises(ValueError, match="scratch: must not overlap dout"):
            run(D.reshape(-1), fused=fused)
