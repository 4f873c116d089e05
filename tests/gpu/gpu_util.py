"""Helpers for the GPU tests: poisoned outputs, tolerance checks, determinism."""
import numpy as np

try:
    import cupy as cp
except Exception:  # pragma: no cover - the conftest skips every test then
    cp = None


def poison(shape, dtype=np.float32):
    """A device array filled with NaN: any element a kernel fails to write shows up."""
    a = cp.empty(shape, dtype=dtype)
    a.fill(np.nan)
    return a


def host(a):
    return cp.asnumpy(a) if cp is not None and isinstance(a, cp.ndarray) else np.asarray(a)


def assert_close(got, want, rtol, floor, name="", atol=0.0):
    """Every element: |got - want| <= rtol * |want| + floor * max|want| + atol (floor covers the
    rounding of fp32 sums, whose absolute error scales with the tensor's magnitude; atol, a
    scalar or an array of want's shape, an error bound of the element's own), and got finite
    wherever want is."""
    got = host(got).astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    fin = np.isfinite(want)
    assert np.isfinite(got[fin]).all(), f"{name}: non-finite values where the reference is finite"
    scale = float(np.abs(want[fin]).max()) if fin.any() else 0.0
    err = np.abs(got - want)
    bound = rtol * np.abs(want) + floor * scale + atol
    bad = fin & ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(fin, err - bound, -np.inf)), want.shape)
        raise AssertionError(f"{name}: {int(bad.sum())} of {want.size} elements out of tolerance "
                             f"(rtol {rtol}, floor {floor} x {scale:.3g}); worst at {i}: "
                             f"got {got[i]!r}, want {want[i]!r}")


def rel_err(got, want):
    """Norm-wise relative error ||got - want|| / ||want||."""
    got = host(got).astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    d = np.linalg.norm(got - want)
    n = np.linalg.norm(want)
    return d / n if n > 0 else d


def assert_bitwise_equal(a, b, name=""):
    a, b = host(a), host(b)
    assert a.shape == b.shape and a.dtype == b.dtype, name
    assert a.tobytes() == b.tobytes(), f"{name}: runs differ (non-deterministic)"


# fp32 tolerances used across the op tests: elementwise ops ~ a few ulp (1.2e-7 each);
# reductions over n terms ~ sqrt(n) ulp in practice.
FP32_RTOL = 2e-5
FP32_FLOOR = 2e-6
FP64_RTOL = 1e-11
FP64_FLOOR = 1e-12


def tol(dtype):
    return (FP32_RTOL, FP32_FLOOR) if np.dtype(dtype) == np.float32 else (FP64_RTOL, FP64_FLOOR)
