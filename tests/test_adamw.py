import numpy as np

from cllm_gpu.ops.adamw import adamw_update


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
