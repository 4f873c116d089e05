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


def test_bf16_out_is_the_fp32_product_plus_bias_rounded_once():
    """A bf16 weight and a bf16 out: the GEMM's fp32 result goes to `acc`, then one pass adds
    the bias and rounds (qkv in the bf16 model); without a bias the GEMM writes bf16 itself."""
    from cllm_gpu.ops.cast import is_bf16, round_bf16, to_bf16
    rng = np.random.default_rng(8)
    x = to_bf16(rng.normal(size=(2, 6, 16)).astype(np.float32))
    W = to_bf16(rng.normal(size=(16, 12)).astype(np.float32))
    b = rng.normal(size=12).astype(np.float32)
    out = to_bf16(np.zeros((2, 6, 12), np.float32))
    acc = np.empty(200, np.float32)
    assert linear_forward(x, W, b, out=out, acc=acc) is out and is_bf16(out)
    y = x.view(np.float32) @ W.view(np.float32)
    np.testing.assert_array_equal(out, round_bf16(y + b))
    linear_forward(x, W, None, out=out)
    np.testing.assert_array_equal(out, round_bf16(y))
    with pytest.raises(ValueError, match="acc"):
        linear_forward(x, W, b, out=out)
    with pytest.raises(ValueError, match="acc"):
        linear_forward(x, W, b, out=out, acc=np.empty(10, np.float32))
    # acc is written while x and out are live: it may not share their memory
    with pytest.raises(ValueError, match="acc: must not overlap"):
        linear_forward(x, W, b, out=out, acc=out.view(np.float32).reshape(-1))
    with pytest.raises(ValueError, match="acc: must not overlap"):
        linear_forward(x, W, b, out=out, acc=x.view(np.float32).reshape(-1))


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
