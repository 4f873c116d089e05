"""Global L2 norm of the whole gradient arena, and the clip factor the trainer derives from it.

grad_norm:   grads (P,) -> out (2,) float64 [L2 norm, index of the first non-finite element
             or -1], on grads' side (host or device); squared=True: the sum of squares instead
             of its root (data parallelism adds the shards' sums, then takes the root). The index comes from the same pass over
             the arena, so a non-finite step can name its first bad parameter without a second
             pass. CUDA: a deterministic two-stage reduction in float64 (fixed grid for a given
             size, fixed-order block reductions): bitwise reproducible, no host sync.
clip_factor: norm, loss (1-element float64 arrays), max_norm -> out (1,) float64: the AdamW
             grad_scale, min(1, max_norm / (norm + 1e-6)) (1 when max_norm <= 0: no clipping),
             and NaN when the norm or the loss is not finite, which makes AdamW skip the step.
Both write into the trainer's per-step buffer (train_step.StepValues) on both backends.
"""
import math

import numpy as np

from . import _cuda as _cu
from ._common import check_array, check_float, is_device_array
from .host_threads import run_chunks

CLIP_EPS = 1e-6
GRAD_NORM_CHUNK = 1 << 18   # elements per dot of the NumPy reference
_NO_BAD = -1.0


def _first_nonfinite(grads) -> int:
    bad = ~np.isfinite(grads)
    return int(np.argmax(bad)) if bad.any() else -1


def grad_norm_ref(grads, out=None, squared=False):
    out = np.empty(2, dtype=np.float64) if out is None else out
    # BLAS's dot splits a long vector over BLAS's threads, and its sum then depends on their
    # number: fixed chunks, each one dot (BLAS held at one thread), added in order. Squares are
    # summed in float64, as the kernel does: float32 ones overflow from |g| > 1.8e19, a finite
    # gradient whose norm the trainer would take for non-finite
    n_chunks = max(1, -(-grads.size // GRAD_NORM_CHUNK))
    partial = np.zeros(n_chunks, dtype=np.float64)
    widen = grads.dtype != np.float64

    def chunk(c, s, tmp):
        x = grads[s]
        if widen:
            x = tmp[:s.stop - s.start]
            np.copyto(x, grads[s])
        partial[c] = np.dot(x, x)

    run_chunks(grads.size, GRAD_NORM_CHUNK, chunk,
               scratch=(lambda: np.empty(min(GRAD_NORM_CHUNK, grads.size))) if widen else None)
    sumsq = float(np.add.reduce(partial))
    norm = sumsq if squared else math.sqrt(sumsq)
    out[0] = norm
    out[1] = _NO_BAD if math.isfinite(norm) else _first_nonfinite(grads)
    return out


def grad_norm(grads, out=None, squared=False):
    check_array("grads", grads, ndim=1)
    check_float("grads", grads)
    if out is not None:
        _check_slot("out", out, grads, 2)
    if is_device_array(grads):
        return grad_norm_cuda(grads, out, squared)
    return grad_norm_ref(grads, out, squared)


def clip_factor_ref(norm, loss, max_norm, out=None, eps=CLIP_EPS):
    out = np.empty(1, dtype=np.float64) if out is None else out
    n, lo = float(np.asarray(norm).reshape(-1)[0]), float(np.asarray(loss).reshape(-1)[0])
    if not (math.isfinite(n) and math.isfinite(lo)):
        out[0] = math.nan
    else:
        out[0] = min(1.0, max_norm / (n + eps)) if max_norm > 0 else 1.0
    return out


def clip_factor(norm, loss, max_norm, out=None, eps=CLIP_EPS):
    """out[0] = the AdamW grad_scale for this norm and loss (see the module docstring)."""
    for name, a in (("norm", norm), ("loss", loss)):
        _check_slot(name, a, norm, 1)
    if out is not None:
        _check_slot("out", out, norm, 1)
    if is_device_array(norm):
        return clip_factor_cuda(norm, loss, max_norm, out, eps)
    return clip_factor_ref(norm, loss, max_norm, out, eps)


def _check_slot(name, a, like, size):
    """A size-element float64 array (a slot of the per-step buffer) on `like`'s side."""
    check_array(name, a, dtype=np.float64, contiguous=True)
    if a.size != size:
        raise ValueError(f"{name}: expected {size} float64 element(s), got shape {tuple(a.shape)}")
    if is_device_array(a) != is_device_array(like):
        raise ValueError(f"{name}: must be on the same side (host or device) as the input")


# ---- CUDA launcher (kernels_cu/grad_norm.cu)
# Stage 1: G blocks (G a function of the size only) sum squares in float64 with a grid-stride
# loop and fixed-order block reductions, and keep the smallest non-finite index they saw;
# stage 2: one block combines the G partials -> out. clip_factor_cuda: one thread.
_NORM_MAX_BLOCKS = 1024
_NORM_ELEMS_PER_THREAD = 16


def grad_norm_cuda(grads, out=None, squared=False):
    import cupy
    _cu.require_device(grads=grads)
    n = grads.size
    out = cupy.empty(2, dtype=np.float64) if out is None else out
    t = _cu.ctype(grads.dtype)
    G = max(1, min(_NORM_MAX_BLOCKS, _cu.ceil_div(n, _cu.THREADS * _NORM_ELEMS_PER_THREAD)))
    partials = cupy.empty((G,), dtype=np.float64)
    bad = cupy.empty((G,), dtype=np.int64)
    _cu.kernel("grad_norm", f"sumsq_partial_kernel<{t}>")(
        (G,), (_cu.THREADS,), (grads, _cu.i64(n), partials, bad))
    _cu.kernel("grad_norm", "sumsq_finalize_kernel")(
        (1,), (1024,), (partials, bad, _cu.i32(G), _cu.i32(1 if squared else 0), out))
    return out


def clip_factor_cuda(norm, loss, max_norm, out=None, eps=CLIP_EPS):
    import cupy
    _cu.require_device(norm=norm, loss=loss)
    out = cupy.empty(1, dtype=np.float64) if out is None else out
    _cu.kernel("grad_norm", "clip_factor_kernel")(
        (1,), (32,), (norm, loss, np.float64(max_norm), np.float64(eps), out))
    return out
