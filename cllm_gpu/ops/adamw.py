"""AdamW over whole arenas (one call updates every parameter).

params, grads, m, v, decay_mask: flat (P,) arrays of one float dtype, same layout.
grad_scale multiplies the gradient first (the grad-norm clip factor folded in).
Decoupled weight decay: p -= lr * wd * mask * p, then the bias-corrected Adam step.
A non-finite grad_scale (the trainer's signal for a NaN/Inf loss or gradient norm) leaves
params and moments untouched: the step is not applied.
"""
import numpy as np

from ._common import check_array, check_float, is_device_array


def adamw_update_ref(params, grads, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, step,
                     grad_scale=1.0):
    if not np.isfinite(grad_scale):
        return
    g = grads * grad_scale if grad_scale != 1.0 else grads
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    params -= (lr * weight_decay) * decay_mask * params
    params -= lr * (m / bc1) / (np.sqrt(v / bc2) + eps)


def adamw_update(params, grads, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, step,
                 grad_scale=1.0):
    check_array("params", params, ndim=1)
    check_float("params", params)
    for name, a in (("grads", grads), ("m", m), ("v", v), ("decay_mask", decay_mask)):
        check_array(name, a, shape=params.shape, dtype=params.dtype)
    if step < 1:
        raise ValueError(f"step: must be >= 1, got {step}")
    if is_device_array(params):
        return adamw_update_cuda(params, grads, m, v, decay_mask, lr, beta1, beta2, eps,
                                 weight_decay, step, grad_scale)
    return adamw_update_ref(params, grads, m, v, decay_mask, lr, beta1, beta2, eps,
                            weight_decay, step, grad_scale)
