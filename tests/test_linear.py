import numpy as np
import pytest

from cllm_gpu.ops.linear import linear_backward, linear_forward
from fd import assert_grad_close


def test_forward_and_backward():
    rng = np.random.default_rng(5)
    x, W, b = rng.normal(size=(6, 4)), rng.normal(size=(4, 3)), rng.normal(size=3)
    np.testing.assert_allclose(linear_forward(x, W, b), x @ W + b, rtol=1e-14)
    R = rng.normal(size=(6, 3))
    loss = lambda: float(((x @ W + b) * R).sum())  # noqa: E731
    dW, db = np.zeros_like(W), np.zeros_like(b)
    dx = linear_backward(R, x, W, dW, db)
    assert_grad_close(loss, x, dx, n=24)
    assert_grad_close(loss, W, dW, n=12)
    assert_grad_close(loss, b, db, n=3)
    # accumulation: a second call adds
    linear_backward(R, x, W, dW, db)
    np.testing.assert_allclose(dW, 2 * (x.T @ R), rtol=1e-13)


def test_bf16_out_is_the_product_plus_the_bf16_bias_rounded_once():
    """A bf16 weight and a bf16 out (qkv in the bf16 model): out starts as the bias's bf16
    copy and the GEMM adds the fp32 product to it, one rounding (bf16(x W + bf16(b)), as
    cuBLASLt's bias epilogue under PyTorch autocast); without a bias the GEMM writes bf16."""
    from cllm_gpu.ops.cast import is_bf16, round_bf16, to_bf16
    rng = np.random.default_rng(8)
    x = to_bf16(rng.normal(size=(2, 6, 16)).astype(np.float32))
    W = to_bf16(rng.normal(size=(16, 12)).astype(np.float32))
    b = rng.normal(size=12).astype(np.float32)
    out = to_bf16(np.zeros((2, 6, 12), np.float32))
    assert linear_forward(x, W, to_bf16(b), out=out) is out and is_bf16(out)
    # the product as linear_forward makes it, one (12, 16) x (16, 12) call: a (2, 6, 16)
    # matmul makes one call per sequence, and BLAS may round a row by its place in the call
    y = (x.view(np.float32).reshape(12, 16) @ W.view(np.float32)).reshape(2, 6, 12)
    np.testing.assert_array_equal(out, round_bf16(y + round_bf16(b)))
    assert not np.array_equal(out, round_bf16(y + b))   # the bias was rounded first
    linear_forward(x, W, None, out=out)
    np.testing.assert_array_equal(out, round_bf16(y))
    # a float out takes a float bias and adds it to the fp32 product
    np.testing.assert_array_equal(linear_forward(x, W, b), y + b)
    for bias, o in ((b, out), (to_bf16(b), None), (to_bf16(b[:5]), out)):
        with pytest.raises(ValueError, match="bias"):
            linear_forward(x, W, bias, out=o)
    # an out over x is refused before the bias fill writes it
    W16 = to_bf16(rng.normal(size=(16, 16)).astype(np.float32))
    x_before = x.copy()
    with pytest.raises(ValueError, match="out: must not overlap"):
        linear_forward(x, W16, to_bf16(rng.normal(size=16).astype(np.float32)), out=x)
    np.testing.assert_array_equal(x, x_before)


def test_bf16_dx_is_the_fp32_product_rounded_once():
    """A bf16 dx (the attention's dout in the bf16 model): dout @ W^T rounded once."""
    from cllm_gpu.ops.cast import is_bf16, round_bf16, to_bf16
    rng = np.random.default_rng(9)
    x = to_bf16(rng.normal(size=(6, 16)).astype(np.float32))
    W = to_bf16(rng.normal(size=(16, 12)).astype(np.float32))
    d = to_bf16(rng.normal(size=(6, 12)).astype(np.float32))
    dW = np.zeros((16, 12), np.float32)
    dx = to_bf16(np.zeros((6, 16), np.float32))
    assert linear_backward(d, x, W, dW, dx=dx) is dx and is_bf16(dx)
    np.testing.assert_array_equal(dx, round_bf16(d.view(np.float32) @ W.view(np.float32).T))
    with pytest.raises(ValueError, match="bf16 weight"):
        linear_backward(d.view(np.float32).copy(), x.view(np.float32), W.view(np.float32), dW,
                        dx=dx)
    # a strided bf16 dx would be written through a reshaped copy and lost: refused
    big = to_bf16(np.zeros((2, 5, 16), np.float32))
    with pytest.raises(ValueError, match="dx: must be C-contiguous"):
        linear_backward(d, x, W, dW, dx=big[:, :3, :])


def test_bf16_weight_bias_gradient_is_summed_from_the_float_dout():
    """A float32 dout with a bf16 weight: the products read its bf16 copy (in scratch), the
    bias gradient sums the float32 dout itself (not the rounded copy)."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, to_bf16
    rng = np.random.default_rng(10)
    x = to_bf16(rng.normal(size=(7, 16)).astype(np.float32))
    W = to_bf16(rng.normal(size=(16, 12)).astype(np.float32))
    d = rng.normal(size=(7, 12)).astype(np.float32)
    dW, db = np.zeros((16, 12), np.float32), np.zeros(12, np.float32)
    linear_backward(d, x, W, dW, db, scratch=np.empty(7 * 16, BF16_HOST_DTYPE))
    np.testing.assert_allclose(db, d.astype(np.float64).sum(axis=0), rtol=1e-6, atol=1e-6)
    # the copy's sums differ by far more than that tolerance: the check can tell them apart
    copy_sums = to_bf16(d).view(np.float32).astype(np.float64).sum(axis=0)
    assert np.abs(copy_sums - d.astype(np.float64).sum(axis=0)).max() > 1e-3


@pytest.mark.parametrize("N", [2, 0])
@pytest.mark.parametrize("Cin,Cout", [(0, 3), (4, 0), (0, 0)])
def test_no_input_or_output_features_is_refused_before_dispatch(N, Cin, Cout):
    """A weight with no input or output features: one ValueError from the public functions on
    both backends, whatever N (before: 'cannot reshape array of size 0 into shape (0)' from the
    rows' (-1, 0) view, NumPy's or CuPy's)."""
    weight = np.ones((Cin, Cout))
    with pytest.raises(ValueError, match="a linear layer needs input and output features"):
        linear_forward(np.ones((N, Cin)), weight, np.ones(Cout))
    with pytest.raises(ValueError, match="a linear layer needs input and output features"):
        linear_backward(np.ones((N, Cout)), np.ones((N, Cin)), weight, np.zeros((Cin, Cout)),
                        np.zeros(Cout))



@pytest.mark.parametrize("shape, dtype", [((2, 3), np.float32), ((1, 3), np.float32),
                                          ((3,), np.float64)])
def test_bias_gradient_of_another_shape_or_dtype_is_refused(shape, dtype):
    """dbias is checked as dweight is: (Cout,) in the float dtype. A (2, Cout) one got the
    column sums broadcast into both rows, a float64 one silently took the float32 sums."""
    d, x, W = (np.ones(s, np.float32) for s in ((4, 3), (4, 8), (8, 3)))
    dW, db = np.zeros((8, 3), np.float32), np.zeros(shape, dtype)
    with pytest.raises(ValueError, match="dbias: expected"):
        linear_backward(d, x, W, dW, db)
    assert not db.any() and not dW.any()   # refused before anything is added
