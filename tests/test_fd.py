"""The finite-difference helper the op tests compare their gradients with (tests/fd.py): it
must agree with a derivative known in closed form and must fail on a wrong gradient. Before
these tests, an assert_grad_close that compared the analytic gradient with itself, checked
only element 0, or had its tolerance loosened to 1e-2 passed every op test."""
import numpy as np
import pytest

from fd import assert_grad_close, numeric_grad


def _sin_sum(x):
    """f(x) = sum(sin(3x)), df/dx = 3 cos(3x): f''' = -27 cos(3x) is large, so a second-order
    difference (error h^2 f''' / 6 ~ 5e-8 at h = 1e-4) is told apart from a fourth-order one."""
    return (lambda: float(np.sin(3 * x).sum())), 3 * np.cos(3 * x)


def test_numeric_grad_is_the_fourth_order_central_difference():
    x = np.random.default_rng(0).uniform(-1, 1, size=(3, 5))
    f, exact = _sin_sum(x)
    before = x.copy()
    num = numeric_grad(f, x)  # its default step, 1e-4
    np.testing.assert_allclose(num, exact.reshape(-1), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(x, before)  # every element put back
    picks = [7, 2]
    np.testing.assert_allclose(numeric_grad(f, x, picks=picks),
                               exact.reshape(-1)[picks], rtol=0, atol=1e-10)


def test_assert_grad_close_passes_the_true_gradient_and_fails_a_wrong_element():
    x = np.random.default_rng(1).uniform(-1, 1, size=(4, 6))
    f, exact = _sin_sum(x)
    assert_grad_close(f, x, exact, n=x.size)
    wrong = exact.copy()
    wrong.reshape(-1)[17] *= 1 + 1e-4  # one element, not the first, off by 1e-4
    with pytest.raises(AssertionError, match="Mismatched elements: 1 / 24"):
        assert_grad_close(f, x, wrong, n=x.size)
