"""Global L2 norm of the whole gradient arena: grads (P,) -> scalar (sum of squares, sqrt).

Return types differ by backend, on purpose:
- NumPy (`grad_norm_ref`): a Python float.
- CUDA (`grad_norm_cuda`): a 0-d CuPy array of the arena's dtype that stays on the device,
  so a training step needs no host sync; `float(norm)` (a sync) only when logging.
  Summed in float64 by a deterministic two-stage reduction (fixed grid for a given size,
  fixed-order block reductions): bitwise reproducible.

`clip_factor(norm, max_norm)` turns a norm into the AdamW grad_scale, min(1, max_norm /
(norm + 1e-6)) -- the trainer's clip rule; on CUDA a tiny kernel writes it to a 0-d device
array (NaN when the norm is not finite, which makes the CUDA AdamW skip the step), to be passed
as `adamw_update(..., grad_scale=factor)`.
"""
import numpy as np

from ._common import check_array, check_float, is_device_array


def grad_norm_ref(grads):
    return float(np.sqrt(np.dot(grads, grads)))


def grad_norm(grads):
    check_array("grads", grads, ndim=1)
    check_float("grads", grads)
    if is_device_array(grads):
        return grad_norm_cuda(grads)
    return grad_norm_ref(grads)


CLIP_EPS = 1e-6


def clip_factor_ref(norm, max_norm, eps=CLIP_EPS):
    """min(1, max_norm / (norm + eps)); NaN for a non-finite norm."""
    norm = float(norm)
    if not np.isfinite(norm):
        return float("nan")
    return min(1.0, max_norm / (norm + eps))


def clip_factor(norm, max_norm, eps=CLIP_EPS):
    if max_norm <= 0:
        raise ValueError(f"max_norm: must be > 0, got {max_norm}")
    if is_device_array(norm):
        return clip_factor_cuda(norm, max_norm, eps)
    return clip_factor_ref(norm, max_norm, eps)


# ---- CUDA launcher (kernels_cu/grad_norm.cu)
# Stage 1: G blocks (G a function of the size only) sum squares in float64 with a grid-stride
# loop and a fixed-order block reduction; stage 2: one block sums the G partials -> sqrt into a
# 0-d device array. clip_factor_cuda: one thread, reads the norm on the device.
from . import _cuda as _cu  # noqa: E402

_NORM_MAX_BLOCKS = 1024
_NORM_ELEMS_PER_THREAD = 16


def grad_norm_cuda(grads):
    import cupy
    _cu.require_device(grads=grads)
    n = grads.size
    t = _cu.ctype(grads.dtype)
    G = max(1, min(_NORM_MAX_BLOCKS, _cu.ceil_div(n, _cu.THREADS * _NORM_ELEMS_PER_THREAD)))
    partials = cupy.empty((G,), dtype=np.float64)
    out = cupy.empty((), dtype=grads.dtype)
    _cu.kernel("grad_norm", f"sumsq_partial_kernel<{t}>")(
        (G,), (_cu.THREADS,), (grads, _cu.i64(n), partials))
    _cu.kernel("grad_norm", f"sumsq_finalize_kernel<{t}>")(
        (1,), (1024,), (partials, _cu.i32(G), out))
    return out


def clip_factor_cuda(norm_dev, max_norm, eps=CLIP_EPS):
    """0-d device array min(1, max_norm / (norm + eps)) (NaN if the norm is not finite)."""
    import cupy
    _cu.require_device(norm=norm_dev)
    if norm_dev.size != 1:
        raise ValueError(f"norm: expected a 0-d or 1-element device array, "
                         f"got shape {tuple(norm_dev.shape)}")
    check_float("norm", norm_dev)
    dt = norm_dev.dtype
    norm1 = cupy.ascontiguousarray(norm_dev.reshape(1))
    out = cupy.empty((), dtype=dt)
    _cu.kernel("grad_norm", f"clip_factor_kernel<{_cu.ctype(dt)}>")(
        (1,), (32,), (norm1, _cu.scalar(dt, max_norm), _cu.scalar(dt, eps), out))
    return out
