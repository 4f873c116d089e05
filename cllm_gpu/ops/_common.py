"""Shared helpers for op modules: array-module dispatch and launcher argument checks."""
import numpy as np

try:  # CuPy is optional; without it every array is a NumPy array.
    import cupy as _cupy
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None


def is_device_array(a) -> bool:
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def xp_of(a):
    """The array module (numpy or cupy) that owns `a`."""
    return _cupy if is_device_array(a) else np


def overlaps(a, b) -> bool:
    """Whether two arrays, both host or both device, may share memory (device: whether their
    byte ranges intersect)."""
    if not is_device_array(a):
        return bool(np.may_share_memory(a, b))
    if a.size == 0 or b.size == 0:
        return False
    a0, b0 = a.data.ptr, b.data.ptr
    return a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


def check_array(name, a, shape=None, dtype=None, ndim=None, contiguous=True):
    """Raise ValueError naming `name` when `a` has the wrong shape, dtype, rank or layout.

    `shape` entries may be None (any size)."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name}: expected an array, got {type(a).__name__}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(a.shape)}")
    if shape is not None:
        if len(shape) != a.ndim or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            want = tuple("?" if s is None else s for s in shape)
            raise ValueError(f"{name}: expected shape {want}, got {tuple(a.shape)}")
    if dtype is not None and a.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    return a


def check_float(name, a):
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: expected float32 or float64, got {a.dtype}")
    return a


# The NumPy references run long chains of elementwise ufuncs. Applied to whole arrays each
# ufunc streams the array through memory; applied to cache-sized chunks the whole chain runs in
# L2 (measured ~3x faster for GELU backward on a (2048, 1024) float32 array, 2 cores). 64 K
# rather than 32 K elements: the ops' threads (host_threads.py) hand the GIL to each other
# between ufunc calls, which costs less per element on larger calls (2 threads, GELU backward
# 5.5 -> 4.0 ms, AdamW over 3.3 M parameters 9.5 -> 7.1 ms).
CHUNK = 1 << 16
