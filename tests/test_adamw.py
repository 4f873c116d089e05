import numpy as np
import pytest

from cllm_gpu.ops.adamw import HYPER_SIZE, adamw_hyperparams, adamw_update


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
        hyper = adamw_hyperparams(1e-2, 0.9, 0.95, 0.1, t, grad_scale=0.7)
        adamw_update(p, g, m, v, mask, hyper, 0.9, 0.95, 1e-8)
        ref = plain_adamw(*ref[:1], g, *ref[1:], mask, 1e-2, 0.9, 0.95, 1e-8, 0.1, t, 0.7)
    for got, want in zip((p, m, v), ref):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_scale_skips_the_step(bad):
    p, g = np.ones(8), np.ones(8)
    m, v, mask = np.zeros(8), np.zeros(8), np.ones(8)
    adamw_update(p, g, m, v, mask, adamw_hyperparams(0.1, 0.9, 0.95, 0.1, 1, grad_scale=bad),
                 0.9, 0.95, 1e-8)
    assert np.all(p == 1) and np.all(m == 0) and np.all(v == 0)


def test_hyper_layout_and_checks():
    h = adamw_hyperparams(0.5, 0.9, 0.99, 0.1, 3, grad_scale=0.25)
    assert h.dtype == np.float64 and h.shape == (HYPER_SIZE,)
    assert h.tolist() == [0.5, 0.5 * 0.1, 1 - 0.9 ** 3, 1 - 0.99 ** 3, 0.25]
    out = np.zeros(7)
    assert adamw_hyperparams(0.5, 0.9, 0.99, 0.1, 3, out=out) is out and out[4] == 1.0
    with pytest.raises(ValueError, match="step"):
        adamw_hyperparams(0.5, 0.9, 0.99, 0.1, 0)
    a = [np.ones(8, np.float32) for _ in range(5)]
    for bad in (np.zeros(4), np.zeros(HYPER_SIZE, np.float32)):
        with pytest.raises(ValueError, match="hyper"):
            adamw_update(*a, bad, 0.9, 0.95, 1e-8)
