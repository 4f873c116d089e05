"""AdamW over whole arenas (one call updates every parameter).

params, grads, m, v, decay_mask: flat (P,) arrays of one float dtype, same layout.
grad_scale multiplies the gradient first (the grad-norm clip factor folded in).
Decoupled weight decay: p -= lr * wd * mask * p, then the bias-corrected Adam step.
A non-finite grad_scale (the trainer's signal for a NaN/Inf loss or gradient norm) leaves
params and moments untouched: the step is not applied.

hyper (optional): the per-step values [lr, lr * weight_decay, 1 - beta1^step, 1 - beta2^step]
as a (4,) float64 array on the same side (host or device) as params; see `adamw_hyperparams`.
Given, it replaces lr, weight_decay and step (pass None for them): a CUDA-graph replay reads
the step's values from device memory instead of from launch arguments frozen at capture.
float64 whatever the params' dtype, so that they are the very numbers the by-value path
computes: both ways give bitwise the same update, on the host and on the device.
"""
import numpy as np

from ._common import CHUNK, check_array, check_float, chunk_slices, is_device_array

HYPER_SIZE = 4


def adamw_hyperparams(lr, beta1, beta2, weight_decay, step):
    """(4,) float64 host array [lr, lr * weight_decay, 1 - beta1^step, 1 - beta2^step]: the
    `hyper` layout, and the values every path of the update starts from."""
    if step < 1:
        raise ValueError(f"step: must be >= 1, got {step}")
    return np.array([lr, lr * weight_decay, 1.0 - beta1 ** step, 1.0 - beta2 ** step],
                    dtype=np.float64)


def adamw_update_ref(params, grads, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, step,
                     grad_scale=1.0, hyper=None):
    if not np.isfinite(grad_scale):
        return
    dt = params.dtype.type
    if hyper is None:
        lr_wd, bc1, bc2 = lr * weight_decay, 1.0 - beta1 ** step, 1.0 - beta2 ** step
    else:
        lr, lr_wd, bc1, bc2 = (float(x) for x in np.asarray(hyper))
    # p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)  ==  p -= step_size * m / (sqrt(v) / sqrt(bc2) + eps)
    step_size, inv_sqrt_bc2 = dt(lr / bc1), dt(1.0 / np.sqrt(bc2))
    g_scale1, g_scale2 = dt((1.0 - beta1) * grad_scale), dt((1.0 - beta2) * grad_scale ** 2)
    decay = dt(lr_wd)
    tmp = np.empty(min(CHUNK, params.size), dtype=params.dtype)
    for s in chunk_slices(params.size):
        p, g, ms, vs, t = params[s], grads[s], m[s], v[s], tmp[:s.stop - s.start]
        ms *= dt(beta1)
        np.multiply(g, g_scale1, out=t)
        ms += t
        vs *= dt(beta2)
        np.multiply(g, g, out=t)
        t *= g_scale2
        vs += t
        np.multiply(decay_mask[s], decay, out=t)   # decoupled weight decay on masked entries
        t *= p
        p -= t
        np.sqrt(vs, out=t)
        t *= inv_sqrt_bc2
        t += dt(eps)
        np.divide(ms, t, out=t)
        t *= step_size
        p -= t


def adamw_update(params, grads, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, step,
                 grad_scale=1.0, *, hyper=None):
    check_array("params", params, ndim=1)
    check_float("params", params)
    for name, a in (("grads", grads), ("m", m), ("v", v), ("decay_mask", decay_mask)):
        check_array(name, a, shape=params.shape, dtype=params.dtype)
    if hyper is None:
        if step < 1:
            raise ValueError(f"step: must be >= 1, got {step}")
    else:
        check_array("hyper", hyper, shape=(HYPER_SIZE,), dtype=np.float64)
        if is_device_array(hyper) != is_device_array(params):
            raise ValueError("hyper: must be on the same side (host or device) as params")
    if is_device_array(params):
        return adamw_update_cuda(params, grads, m, v, decay_mask, lr, beta1, beta2, eps,
                                 weight_decay, step, grad_scale, hyper=hyper)
    return adamw_update_ref(params, grads, m, v, decay_mask, lr, beta1, beta2, eps,
                            weight_decay, step, grad_scale, hyper=hyper)


# ---- CUDA launcher (kernels_cu/adamw.cu)
# One grid-stride launch over the whole arena, float32 or float64. grad_scale is a Python
# float or a 1-element device array (the clip factor computed on the device: no host sync);
# the kernel reads it through a pointer. A non-finite grad_scale (either kind) skips the step:
# params, m and v are left bitwise unchanged, as in the NumPy reference. With `hyper` the
# kernel reads lr, lr * wd and the bias corrections through a pointer too.
from . import _cuda as _cu  # noqa: E402


def adamw_update_cuda(params, grads, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, step,
                      grad_scale=1.0, hyper=None):
    _cu.require_device(params=params, grads=grads, m=m, v=v, decay_mask=decay_mask)
    dt = params.dtype
    t = _cu.ctype(dt)
    if is_device_array(grad_scale):
        if grad_scale.size != 1:
            raise ValueError(f"grad_scale: expected a 0-d or 1-element device array, "
                             f"got shape {tuple(grad_scale.shape)}")
        scale_arr = grad_scale if grad_scale.dtype == dt else grad_scale.astype(dt)
        scale_arr = scale_arr.reshape(1)
        use_ptr, scale_val = 1, 1.0
    else:
        scale_arr, use_ptr, scale_val = params, 0, float(grad_scale)
    if hyper is None:
        h = adamw_hyperparams(lr, beta1, beta2, weight_decay, step)
        import cupy  # the kernel does not read it: a zero-size array allocates nothing
        hyper_arr, use_hyper = cupy.empty(0, dtype=np.float64), 0
    else:
        _cu.require_device(hyper=hyper)
        check_array("hyper", hyper, shape=(HYPER_SIZE,), dtype=np.float64)
        h = np.zeros(HYPER_SIZE)               # by-value slots unused: read from hyper
        hyper_arr, use_hyper = hyper, 1
    n = params.size
    if n == 0:
        return
    s = lambda x: _cu.scalar(dt, x)  # noqa: E731
    k = _cu.kernel("adamw", f"adamw_kernel<{t}>")
    k((_cu.grid_stride_blocks(n),), (_cu.THREADS,),
      (params, grads, m, v, decay_mask, _cu.i64(n), s(h[0]), s(beta1), s(1.0 - beta1), s(beta2),
       s(1.0 - beta2), s(eps), s(h[1]), s(h[2]), s(h[3]), scale_arr,
       _cu.i32(use_ptr), s(scale_val), hyper_arr, _cu.i32(use_hyper)))
