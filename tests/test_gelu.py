import math

import numpy as np
import pytest

from cllm_gpu.ops.gelu import gelu_backward, gelu_forward
from fd import assert_grad_close


def plain_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-14), (np.float32, 1e-6)])
def test_forward_matches_formula(dtype, tol):
    x = np.linspace(-6, 6, 301).astype(dtype).reshape(7, 43)
    y = gelu_forward(x)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, plain_gelu(x.astype(np.float64)), rtol=tol, atol=tol)


def test_backward_finite_differences():
    rng = np.random.default_rng(3)
    x = rng.normal(scale=2, size=(6, 11))
    R = rng.normal(size=x.shape)
    dx = gelu_backward(R, x)
    assert_grad_close(lambda: float((plain_gelu(x) * R).sum()), x, dx, n=66)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_inputs_give_x_and_the_derivative_1_or_0(dtype):
    """Where tanh saturates, gelu(x) = x (x > 0) or 0 and gelu'(x) = 1 or 0, as the kernel and
    PyTorch give. The float32 reference gave NaN derivatives from |x| ~ 1.8e13 (0.5 x u'
    overflowed before it met the exact 0 of 1 - t), then from 1.9e19 (x^2 itself overflowed:
    0 * inf), and inf for x > 1.7e38 ((1 + t) x before the 0.5)."""
    big = [1e6, 1e13, 1e15, 1e19, 2e19, 1e30] + ([3e38] if dtype == np.float32 else [1e150,
                                                                                      1e200])
    x = np.array(big + [-v for v in big], dtype=dtype)
    n = len(big)
    with np.errstate(over="ignore", invalid="ignore"):  # x^3 inside tanh's argument
        y, dx = gelu_forward(x), gelu_backward(np.ones_like(x), x)
    np.testing.assert_array_equal(y, np.concatenate([x[:n], np.zeros(n, dtype)]))
    np.testing.assert_array_equal(dx, np.array([1.0] * n + [0.0] * n, dtype))



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_nan_leaves_the_derivative_at_saturated_inputs_beside_it_alone(dtype):
    """A NaN input's derivative is NaN; a saturated one beside it in the same chunk is still 1
    or 0, as on its own (the kernel's is per element). The x^2 clamp, kept to chunks whose
    max(x^2) is inf, was skipped where a NaN made that max NaN: x^2 = inf then gave NaN."""
    big = 3e38 if dtype == np.float32 else 1e200
    x = np.array([np.nan, big, -big, 1.0], dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        dx = gelu_backward(np.ones_like(x), x)
    assert np.isnan(dx[0])
    np.testing.assert_array_equal(dx[1:3], np.array([1.0, 0.0], dtype))
    np.testing.assert_allclose(dx[3], gelu_backward(np.ones(1, dtype), x[3:])[0], rtol=0)


def test_backward_in_place_aliasing():
    rng = np.random.default_rng(4)
    x, d = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    want = gelu_backward(d, x)
    got = gelu_backward(d, x, dx=d)
    assert got is d
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_in_place(with_bias):
    """out = x: the same bits as into a fresh out (a bare x is read from a copy of each chunk,
    since the chain writes y before its last read of x); 70 K elements span several chunks."""
    rng = np.random.default_rng(5)
    x = rng.normal(scale=2, size=(70, 1000)).astype(np.float32)
    bias = rng.normal(size=1000).astype(np.float32) if with_bias else None
    want = gelu_forward(x, bias=bias)
    got = gelu_forward(x, out=x, bias=bias)
    assert got is x
    np.testing.assert_array_equal(got, want)


def test_bias_is_added_by_both_passes_and_x_is_left_alone():
    """With the c_fc bias, forward and backward each add it to x (the GEMM's bare product)
    themselves: the forward writes nothing back, the backward's gradient is taken at x + b."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 9))
    b, d = rng.normal(size=9), rng.normal(size=(6, 9))
    x0 = x.copy()
    y = gelu_forward(x, bias=b)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_allclose(y, plain_gelu(x0 + b), rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(gelu_backward(d, x, bias=b), gelu_backward(d, x + b))
    assert_grad_close(lambda: float((plain_gelu(x + b) * d).sum()), x,
                      gelu_backward(d, x, bias=b), n=54)
    for bad in ({"bias": np.zeros(8)}, {"bias": np.zeros(9, np.float32)}):
        with pytest.raises(ValueError, match="bias"):
            gelu_forward(x, **bad)
        with pytest.raises(ValueError, match="bias"):
            gelu_backward(d, x, **bad)


def test_bf16_input_computes_in_float32():
    """x and dout in bf16 storage (what a bf16-output GEMM writes): the passes compute in
    float32 from the stored values (exactly a float32 array of them) and add the fp32 bias
    unrounded; the outputs are float32 or, into bf16 storage, rounded once."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, is_bf16, round_bf16
    rng = np.random.default_rng(7)
    xf = round_bf16(rng.normal(size=(8, 24)).astype(np.float32))
    df = round_bf16(rng.normal(size=(8, 24)).astype(np.float32))
    b = rng.normal(size=24).astype(np.float32)
    x16, d16 = xf.astype(BF16_HOST_DTYPE), df.astype(BF16_HOST_DTYPE)
    y = gelu_forward(x16, bias=b)
    assert not is_bf16(y) and y.dtype == np.float32
    np.testing.assert_array_equal(y, gelu_forward(xf + b))
    out = np.empty(xf.shape, BF16_HOST_DTYPE)
    np.testing.assert_array_equal(gelu_forward(x16, out=out, bias=b), round_bf16(y))
    want = gelu_backward(df, xf + b)
    db = np.zeros(24, np.float32)
    got = gelu_backward(d16, x16, dx=d16, bias=b, dbias=db)   # in place, as the model runs it
    assert got is d16 and is_bf16(got)
    np.testing.assert_array_equal(got, round_bf16(want))
    np.testing.assert_allclose(db, want.sum(axis=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dout"):
        gelu_backward(df.astype(np.float64), x16)


def test_forward_into_bf16_out_is_rounded_float32():
    """A bf16 `out` (bf16 storage) decides the output's rounding; no flag."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, is_bf16, round_bf16
    x = np.random.default_rng(6).normal(size=(4, 33)).astype(np.float32)
    out = np.empty(x.shape, BF16_HOST_DTYPE)
    y = gelu_forward(x.copy(), out=out)
    assert y is out and is_bf16(y)
    np.testing.assert_array_equal(y, round_bf16(gelu_forward(x.copy())))
    with pytest.raises(ValueError, match="float32"):
        gelu_forward(x.astype(np.float64), out=out.astype(BF16_HOST_DTYPE))


def test_backward_with_bias_gradient_and_bf16_dx():
    """dbias += column sums of dx (from the float values), dx rounded for a bf16 dx."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, is_bf16, round_bf16
    rng = np.random.default_rng(8)
    x, d = (rng.normal(size=(2, 5, 12)).astype(np.float32) for _ in range(2))
    want = gelu_backward(d, x)
    db = np.ones(12, np.float32)
    out = np.empty(x.shape, BF16_HOST_DTYPE)
    assert gelu_backward(d, x, dx=out, dbias=db) is out and is_bf16(out)
    np.testing.assert_array_equal(out, round_bf16(want))
    np.testing.assert_allclose(db, 1 + want.reshape(-1, 12).sum(axis=0), rtol=1e-6)
    db2 = np.zeros(12, np.float32)
    np.testing.assert_array_equal(gelu_backward(d, x, dbias=db2), want)
    with pytest.raises(ValueError, match="dbias"):
        gelu_backward(d, x, dbias=np.zeros(5, np.float32))


def test_backward_numpy_path_ignores_scratch():
    """scratch is the CUDA launcher's workspace: on NumPy arrays any value is ignored (the
    same bits, the array untouched)."""
    rng = np.random.default_rng(4)
    x, d, bias = rng.normal(size=(9, 5)), rng.normal(size=(9, 5)), rng.normal(size=5)
    runs = []
    for scratch in (None, np.full(3, np.nan, np.float32)):
        db = np.ones(5)
        runs.append((gelu_backward(d, x, dbias=db, bias=bias, scratch=scratch), db))
        if scratch is not None:
            assert np.isnan(scratch).all()
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
