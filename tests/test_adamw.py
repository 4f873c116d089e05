import numpy as np
import pytest

from cllm_gpu.ops.adamw import adamw_hyperparams, adamw_update


def plain_adamw(p, g, m, v, mask, lr, b1, b2, eps, wd, t, scale):
    g = g * scale
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * wd * mask * p
    p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p, m, v


def test_matches_formula_over_steps():
    rng = np.random.default_rng(12)
    P = 1000
    p, mask = rng.normal(size=P), (rng.random(P) < 0.5).astype(np.float64)
    m, v = np.zeros(P), np.zeros(P)
    ref = (p.copy(), m.copy(), v.copy())
    for t in range(1, 6):
        g = rng.normal(size=P)
        adamw_update(p, g, m, v, mask, 1e-2, 0.9, 0.95, 1e-8, 0.1, t, grad_scale=0.7)
        ref = plain_adamw(*ref[:1], g, *ref[1:], mask, 1e-2, 0.9, 0.95, 1e-8, 0.1, t, 0.7)
    for got, want in zip((p, m, v), ref):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_nonfinite_scale_skips_the_step():
    p, g = np.ones(8), np.ones(8)
    m, v, mask = np.zeros(8), np.zeros(8), np.ones(8)
    adamw_update(p, g, m, v, mask, 0.1, 0.9, 0.95, 1e-8, 0.1, 1, grad_scale=float("nan"))
    assert np.all(p == 1) and np.all(m == 0) and np.all(v == 0)


def _arrays(P, dtype, seed=3):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=P).astype(dtype), rng.normal(size=P).astype(dtype),
            (rng.normal(size=P) * 0.1).astype(dtype), (rng.random(P) * 0.01).astype(dtype),
            (rng.random(P) < 0.5).astype(dtype)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hyper_buffer_gives_the_same_update(dtype):
    """The per-step values from a `hyper` array (the CUDA-graph path) instead of lr, weight
    decay and step: bitwise the same update (they are the same doubles)."""
    for t, lr in ((1, 3e-3), (7, 1e-2), (1000, 2.5e-4)):
        a, b = _arrays(5000, dtype), _arrays(5000, dtype)
        adamw_update(*a, lr, 0.9, 0.95, 1e-8, 0.1, t, grad_scale=0.6)
        hyper = adamw_hyperparams(lr, 0.9, 0.95, 0.1, t)
        adamw_update(*b, None, 0.9, 0.95, 1e-8, None, None, grad_scale=0.6, hyper=hyper)
        for x, y in zip(a, b):
            assert x.tobytes() == y.tobytes()


def test_hyper_layout_and_checks():
    h = adamw_hyperparams(0.5, 0.9, 0.99, 0.1, 3)
    assert h.dtype == np.float64
    assert h.tolist() == [0.5, 0.5 * 0.1, 1 - 0.9 ** 3, 1 - 0.99 ** 3]
    with pytest.raises(ValueError, match="step"):
        adamw_hyperparams(0.5, 0.9, 0.99, 0.1, 0)
    a = _arrays(8, np.float32)
    with pytest.raises(ValueError, match="hyper"):
        adamw_update(*a, None, 0.9, 0.95, 1e-8, None, None, hyper=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="hyper"):
        adamw_update(*a, None, 0.9, 0.95, 1e-8, None, None, hyper=np.zeros(4, np.float32))
    # a skipped step (non-finite scale) stays skipped with a hyper array
    before = [x.copy() for x in a]
    adamw_update(*a, None, 0.9, 0.95, 1e-8, None, None, grad_scale=float("inf"),
                 hyper=adamw_hyperparams(0.1, 0.9, 0.95, 0.1, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, before))
