"""Finite-difference helpers for op tests (float64, fourth-order central differences)."""
import numpy as np


def numeric_grad(f, x, h=1e-4, picks=None, rng=None):
    """d f() / d x at the flat indices `picks` (all when None); f reads x in place."""
    flat = x.reshape(-1)
    idxs = range(flat.size) if picks is None else picks
    out = []
    for i in idxs:
        old = flat[i]
        vals = {}
        for k in (-2, -1, 1, 2):
            flat[i] = old + k * h
            vals[k] = f()
        flat[i] = old
        out.append((8 * (vals[1] - vals[-1]) - (vals[2] - vals[-2])) / (12 * h))
    return np.array(out)


def assert_grad_close(f, x, analytic, n=20, rng=None, rtol=1e-7, atol=1e-9, h=1e-4):
    rng = rng or np.random.default_rng(0)
    picks = rng.choice(x.size, size=min(n, x.size), replace=False)
    num = numeric_grad(f, x, h=h, picks=picks)
    ana = analytic.reshape(-1)[picks]
    np.testing.assert_allclose(ana, num, rtol=rtol, atol=atol)
