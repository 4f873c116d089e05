import numpy as np
import pytest

from cllm_gpu.ops._common import CHUNK
from cllm_gpu.ops.adamw import HYPER_SIZE, adamw_hyperparams, adamw_update
from cllm_gpu.ops.cast import BF16_HOST_DTYPE, is_bf16, to_bf16


def plain_adamw(p, g, m, v, mask, lr, b1, b2, eps, wd, t, scale):
    g = g * scale
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * wd * mask * p
    p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p, m, v


@pytest.mark.parametrize("P", [1000, 2 * CHUNK + 7])   # one chunk; chunks over the threads
def test_matches_formula_over_steps(P):
    rng = np.random.default_rng(12)
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


def _fp32_state(P, masked, seed=3):
    rng = np.random.default_rng(seed)
    p = (rng.normal(size=P) * 0.02).astype(np.float32)
    g = rng.normal(size=P).astype(np.float32)
    m = (rng.normal(size=P) * 0.1).astype(np.float32)
    v = (rng.random(size=P) * 0.01).astype(np.float32)
    mask = (rng.random(size=P) < 0.7).astype(np.float32) if masked else np.zeros(P, np.float32)
    return [p, g, m, v, mask]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("P", [1, 3 * CHUNK + 5])   # several chunks over the threads, a short tail
def test_bf16_copy_is_the_rounding_of_the_updated_params(masked, P):
    """params_bf16 ends bitwise equal to to_bf16(params) (every element written: poisoned
    with NaN first), and params and moments are bitwise what the update without it gives."""
    state, plain = _fp32_state(P, masked), _fp32_state(P, masked)
    hyper = adamw_hyperparams(3e-3, 0.9, 0.95, 0.1, 4, grad_scale=0.37)
    copy = to_bf16(np.full(P, np.nan, np.float32))
    adamw_update(*state, hyper, 0.9, 0.95, 1e-8, params_bf16=copy)
    adamw_update(*plain, hyper, 0.9, 0.95, 1e-8)
    assert is_bf16(copy)
    np.testing.assert_array_equal(copy.view(np.uint32), to_bf16(state[0]).view(np.uint32))
    for got, want in zip(state, plain):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert not np.array_equal(state[0], _fp32_state(P, masked)[0])  # the step moved params


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skipped_step_leaves_the_bf16_copy_untouched(bad):
    state = _fp32_state(100, True)
    before = [a.copy() for a in state]
    copy = to_bf16(np.full(100, 7.0, np.float32))   # not the params' rounding: any write shows
    adamw_update(*state, adamw_hyperparams(0.1, 0.9, 0.95, 0.1, 2, grad_scale=bad),
                 0.9, 0.95, 1e-8, params_bf16=copy)
    assert np.all(copy == 7.0)
    for got, want in zip(state, before):
        np.testing.assert_array_equal(got, want)


def test_bad_bf16_copy_is_refused():
    state = _fp32_state(8, True)
    hyper = adamw_hyperparams(0.1, 0.9, 0.95, 0.1, 1)
    cases = [(np.zeros(8, np.float32), "bf16 storage"),          # plain float32 values
             (to_bf16(np.zeros(9, np.float32)), "shape"),
             (to_bf16(np.zeros(16, np.float32))[::2], "C-contiguous"),
             (state[0].view(BF16_HOST_DTYPE), "overlap"),       # params themselves
             (np.zeros(8, np.uint16), "expected dtype float32")]  # device storage on the host
    for bad, msg in cases:
        with pytest.raises(ValueError, match=f"params_bf16: .*{msg}"):
            adamw_update(*state, hyper, 0.9, 0.95, 1e-8, params_bf16=bad)
    f64 = [a.astype(np.float64) for a in state]
    with pytest.raises(ValueError, match="params_bf16: a bf16 copy needs float32 params"):
        adamw_update(*f64, hyper, 0.9, 0.95, 1e-8, params_bf16=to_bf16(np.zeros(8, np.float32)))
    assert np.array_equal(state[0], _fp32_state(8, True)[0])  # nothing ran


@pytest.mark.parametrize("g_max", [1e19, 1e20, 3e38])
def test_clipped_huge_float32_gradients_step_as_the_clipped_gradient(g_max):
    """A diverging run's gradient of 1e20, clipped by grad_scale = 1 / norm: the moments see
    the scaled gradient (~1), as the kernel computes g * scale first. Squaring the raw float32
    gradient overflowed past 1.8e19: v = inf, no update, and v stayed inf for good; at 1e19
    (scale^2 (1 - beta2) ~1e-41, subnormal) v lost 3 digits."""
    P = 9
    g = (g_max * np.linspace(-1, 1, P)).astype(np.float32)
    scale = 1.0 / float(np.linalg.norm(g.astype(np.float64)))
    p, m, v = np.ones(P, np.float32), np.zeros(P, np.float32), np.zeros(P, np.float32)
    mask = np.ones(P, np.float32)
    adamw_update(p, g, m, v, mask, adamw_hyperparams(1e-3, 0.9, 0.95, 0.1, 1, scale),
                 0.9, 0.95, 1e-8)
    want = plain_adamw(np.ones(P), g.astype(np.float64), np.zeros(P), np.zeros(P), np.ones(P),
                       1e-3, 0.9, 0.95, 1e-8, 0.1, 1, scale)
    for got, w, name in zip((p, m, v), want, "pmv"):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-12, err_msg=name)
