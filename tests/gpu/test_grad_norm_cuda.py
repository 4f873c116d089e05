import numpy as np
import pytest

from cllm_gpu.ops.grad_norm import clip_factor, clip_factor_ref, grad_norm, grad_norm_ref
from gpu_util import assert_bitwise_equal

cp = pytest.importorskip("cupy")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 17, 4096, 1_000_003, (1 << 24) + 5])
def test_grad_norm_matches_reference(dtype, n):
    rng = np.random.default_rng(n)
    g = rng.normal(size=n).astype(dtype)
    want = grad_norm_ref(g.astype(np.float64))
    got = grad_norm(cp.asarray(g))
    assert isinstance(got, cp.ndarray) and got.shape == (2,) and got.dtype == np.float64
    assert abs(float(got[0]) - want[0]) <= 1e-13 * want[0]  # float64 sums in both
    assert float(got[1]) == -1
    assert_bitwise_equal(grad_norm(cp.asarray(g)), got, "grad_norm")


@pytest.mark.parametrize("n", [1000, 70_001])
def test_grad_norm_zero_and_nonfinite(n):
    """The norm of zeros is 0; a NaN or inf anywhere makes it non-finite, and the first bad
    index (the smallest, whichever block saw it) is reported from the same pass."""
    assert grad_norm(cp.zeros(n, dtype=np.float32)).get().tolist() == [0.0, -1.0]
    g = cp.ones(n, dtype=np.float32)
    g[n - 7] = np.inf
    g[n // 2 + 3] = np.nan
    r = grad_norm(g).get()
    assert np.isnan(r[0]) and r[1] == n // 2 + 3
    g[n // 2 + 3] = 1.0
    r = grad_norm(g).get()
    assert np.isinf(r[0]) and r[1] == n - 7


@pytest.mark.parametrize("n", [1000, 70_001])
def test_grad_norm_first_of_a_run_of_nonfinite_elements(n):
    """An overflow leaves many non-finite gradients: with a run longer than the grid stride,
    each thread meets several of them and must keep its first, not its last (the reported
    index is the minimum over threads of what each kept)."""
    g = cp.ones(n, dtype=np.float32)
    first = n // 3
    g[first:] = np.inf
    r = grad_norm(g).get()
    assert np.isinf(r[0]) and r[1] == first


@pytest.mark.parametrize("value", [1e20, 3e38])
def test_grad_norm_of_huge_finite_float32_is_finite_like_the_reference(value):
    """Squares summed in float64 on both sides: a finite float32 gradient past 1.8e19 has a
    finite norm on the GPU and in the NumPy reference (the reference's float32 dots gave inf,
    a non-finite step on the CPU where the GPU took a clipped one)."""
    g = np.ones(5000, np.float32)
    g[4321] = value
    want = grad_norm_ref(g)
    got = grad_norm(cp.asarray(g)).get()
    assert np.isfinite(want[0]) and want[1] == -1 and got[1] == -1
    assert abs(got[0] - want[0]) <= 1e-13 * want[0]


@pytest.mark.parametrize("norm", [0.0, 0.5, 1.0, 10.0, np.inf, np.nan])
@pytest.mark.parametrize("loss", [2.5, np.nan])
@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_clip_factor_matches_reference(norm, loss, max_norm):
    n, lo = np.array([norm]), np.array([loss])
    got = clip_factor(cp.asarray(n), cp.asarray(lo), max_norm)
    want = float(clip_factor_ref(n, lo, max_norm)[0])
    assert got.shape == (1,) and got.dtype == np.float64
    if np.isnan(want):
        assert np.isnan(float(got[0]))
    else:
        assert float(got[0]) == want
