"""AdamW over whole arenas (one call updates every parameter).

params, grads, m, v, decay_mask: flat (P,) arrays of one float dtype, same layout.
hyper: the per-step values [lr, lr * weight_decay, 1 - beta1^t, 1 - beta2^t, grad_scale] as a
(5,) float64 array on the params' side (host or device); `adamw_hyperparams` makes one. The
kernel reads them through a pointer, so a step captured in a CUDA graph replays with each
step's values (the trainer keeps them in its per-step buffer, train_step.StepValues).
grad_scale multiplies the gradient first (the grad-norm clip factor folded in). Decoupled
weight decay: p -= lr * wd * mask * p, then the bias-corrected Adam step. A non-finite
grad_scale (the trainer's signal for a NaN/Inf loss or gradient norm) leaves params and moments
untouched: the update is not applied.

params_bf16 (optional): a flat (P,) array in bf16 storage (ops/cast.py) on params' side, for
float32 params: the update also writes bf16(params) there, round to nearest even, bitwise what
`to_bf16(params)` gives after it: the weight copy a bf16 model's matrix products read, written
from the updated value in hand instead of by a second pass over the arena. A skipped step
leaves it untouched too (params are unchanged, so it still matches them).
"""
import numpy as np

from . import _cuda as _cu
from ._common import CHUNK, check_array, check_float, is_device_array, overlaps
from .cast import BF16_DEVICE_DTYPE, is_bf16, round_bf16
from .host_threads import run_chunks

HYPER_SIZE = 5
LR, LR_WD, BC1, BC2, GRAD_SCALE = range(HYPER_SIZE)


def adamw_hyperparams(lr, beta1, beta2, weight_decay, step, grad_scale=1.0, out=None):
    """[lr, lr * weight_decay, 1 - beta1^step, 1 - beta2^step, grad_scale] as float64 (a new
    (5,) host array, or written into `out`)."""
    if step < 1:
        raise ValueError(f"step: must be >= 1, got {step}")
    h = out if out is not None else np.empty(HYPER_SIZE, dtype=np.float64)
    h[:HYPER_SIZE] = (lr, lr * weight_decay, 1.0 - beta1 ** step, 1.0 - beta2 ** step,
                      grad_scale)
    return h


def adamw_update_ref(params, grads, m, v, decay_mask, hyper, beta1, beta2, eps,
                     params_bf16=None):
    if params_bf16 is not None:  # the host's bf16 storage: float32 values (ops/cast.py)
        check_array("params_bf16", params_bf16, shape=params.shape, dtype=np.float32)
    lr, lr_wd, bc1, bc2, grad_scale = (float(x) for x in np.asarray(hyper))
    if not np.isfinite(grad_scale):
        return
    dt = params.dtype.type
    # p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)  ==  p -= step_size * m / (sqrt(v) / sqrt(bc2) + eps)
    step_size, inv_sqrt_bc2 = dt(lr / bc1), dt(1.0 / np.sqrt(bc2))
    # g = grad * grad_scale before it is squared, as the kernel: a clipped float32 gradient
    # of 1e20 squared first overflowed (v = inf: no update, and v inf from then on)
    scale, one_minus_b1, one_minus_b2 = dt(grad_scale), dt(1.0 - beta1), dt(1.0 - beta2)
    scaled = scale != 1
    decay = dt(lr_wd)

    def adamw_chunk(p, g, ms, vs, mask, t, u, s):
        if scaled:                        # (g * 1 is g: no pass for an unclipped step)
            g = np.multiply(g, scale, out=u)
        ms *= dt(beta1)
        np.multiply(g, one_minus_b1, out=t)
        ms += t
        vs *= dt(beta2)
        np.multiply(g, g, out=t)
        t *= one_minus_b2
        vs += t
        np.multiply(mask, decay, out=t)   # decoupled weight decay on masked entries
        t *= p
        p -= t
        np.sqrt(vs, out=t)
        t *= inv_sqrt_bc2
        t += dt(eps)
        np.divide(ms, t, out=t)
        t *= step_size
        p -= t
        if params_bf16 is not None:  # rounded while the chunk is in cache
            round_bf16(p, out=params_bf16[s])

    def chunk(c, s, tmp):
        n = s.stop - s.start
        adamw_chunk(params[s], grads[s], m[s], v[s], decay_mask[s], tmp[0, :n], tmp[1, :n], s)

    run_chunks(params.size, CHUNK, chunk,
               scratch=lambda: np.empty((2, min(CHUNK, params.size)), dtype=params.dtype))


def adamw_update(params, grads, m, v, decay_mask, hyper, beta1, beta2, eps, params_bf16=None):
    check_array("params", params, ndim=1)
    check_float("params", params)
    for name, a in (("grads", grads), ("m", m), ("v", v), ("decay_mask", decay_mask)):
        check_array(name, a, shape=params.shape, dtype=params.dtype)
    check_array("hyper", hyper, shape=(HYPER_SIZE,), dtype=np.float64)
    if is_device_array(hyper) != is_device_array(params):
        raise ValueError("hyper: must be on the same side (host or device) as params")
    if params_bf16 is not None:
        _check_params_bf16(params_bf16, params)
    args = (params, grads, m, v, decay_mask, hyper, beta1, beta2, eps, params_bf16)
    if is_device_array(params):
        return adamw_update_cuda(*args)
    return adamw_update_ref(*args)


def _check_params_bf16(params_bf16, params):
    """The bf16 weight copy's checks (the storage dtype of its side is the CUDA launcher's)."""
    check_array("params_bf16", params_bf16, shape=params.shape)
    if is_device_array(params_bf16) != is_device_array(params):
        raise ValueError("params_bf16: must be on the same side (host or device) as params")
    if not is_bf16(params_bf16):
        raise ValueError(f"params_bf16: expected bf16 storage (ops.bf16_storage_dtype), "
                         f"got {params_bf16.dtype}")
    if params.dtype != np.float32:
        raise ValueError(f"params_bf16: a bf16 copy needs float32 params, got {params.dtype}")
    if overlaps(params_bf16, params):
        raise ValueError("params_bf16: must not overlap params")


# ---- CUDA launcher (kernels_cu/adamw.cu)
# One grid-stride launch over the whole arena, float32 or float64; the per-step values come
# through the `hyper` pointer. A non-finite grad_scale skips the step: params, m and v (and
# params_bf16) are left bitwise unchanged, as in the NumPy reference. With params_bf16 the
# <float, true> instantiation writes the bf16 copy in the same pass.
def adamw_update_cuda(params, grads, m, v, decay_mask, hyper, beta1, beta2, eps,
                      params_bf16=None):
    _cu.require_device(params=params, grads=grads, m=m, v=v, decay_mask=decay_mask, hyper=hyper)
    if params_bf16 is not None:
        _cu.require_device(params_bf16=params_bf16)
        check_array("params_bf16", params_bf16, shape=params.shape, dtype=BF16_DEVICE_DTYPE)
        check_array("params", params, dtype=np.float32)   # the <float, true> instantiation
    # each thread reads element i of every array and writes it back to params, m, v (and
    # params_bf16): a written array over another one's other elements, or over hyper (read by
    # every thread), races; the same storage in two roles (v as the gradient) races not but is
    # no AdamW update either: any overlap is refused
    written = [("params", params), ("m", m), ("v", v), ("params_bf16", params_bf16)]
    for k, (name, a) in enumerate(written):
        if a is not None:
            _cu.check_disjoint(name, a, grads=grads, decay_mask=decay_mask, hyper=hyper,
                               **dict(written[k + 1:]))
    n = params.size
    if n == 0:
        return
    dt = params.dtype
    s = lambda x: _cu.scalar(dt, x)  # noqa: E731
    name = (f"adamw_kernel<{_cu.ctype(dt)}>" if params_bf16 is None
            else "adamw_kernel<float, true>")
    k = _cu.kernel("adamw", name)
    # without a copy, params' bytes stand in for the unread pointer (a kernel argument is an
    # array of the parameter's type)
    k((_cu.grid_stride_blocks(n),), (_cu.THREADS,),
      (params, grads, m, v, decay_mask, _cu.i64(n), s(beta1), s(1.0 - beta1), s(beta2),
       s(1.0 - beta2), s(eps), hyper,
       params.view(BF16_DEVICE_DTYPE) if params_bf16 is None else params_bf16))
