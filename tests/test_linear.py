import numpy as np

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
