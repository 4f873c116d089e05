"""Global L2 norm of the whole gradient arena: grads (P,) -> scalar (sum of squares, sqrt)."""
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
