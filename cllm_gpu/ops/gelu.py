"""GELU, tanh approximation (GPT-2): y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

forward:  x (any shape) -> out (same shape)
backward: dout, x -> dx
"""
import math

import numpy as np

from ._common import check_array, check_float, is_device_array

GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def gelu_forward_ref(x, out=None):
    u = x * x
    u *= GELU_CUBIC * GELU_SCALE
    u += GELU_SCALE
    u *= x
    np.tanh(u, out=u)
    u += 1.0
    u *= x
    u *= 0.5
    if out is None:
        return u
    out[...] = u
    return out


def gelu_backward_ref(dout, x, dx=None):
    x2 = x * x
    t = x2 * (GELU_CUBIC * GELU_SCALE)
    t += GELU_SCALE
    t *= x
    np.tanh(t, out=t)
    # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    inner = x2
    inner *= 3.0 * GELU_CUBIC * GELU_SCALE
    inner += GELU_SCALE
    inner *= x
    inner *= 0.5
    sech2 = 1.0 - t * t
    inner *= sech2
    t += 1.0
    t *= 0.5
    t += inner
    t *= dout
    if dx is None:
        return t
    dx[...] = t
    return dx


def gelu_forward(x, out=None):
    check_array("x", x)
    check_float("x", x)
    if is_device_array(x):
        return gelu_forward_cuda(x, out)
    return gelu_forward_ref(x, out)


def gelu_backward(dout, x, dx=None):
    check_array("x", x)
    check_float("x", x)
    check_array("dout", dout, shape=x.shape, dtype=x.dtype)
    if is_device_array(x):
        return gelu_backward_cuda(dout, x, dx)
    return gelu_backward_ref(dout, x, dx)


# ---- CUDA launcher (kernels_cu/gelu.cu): elementwise grid-stride kernels, float32/float64.
# out may be x and dx may be dout (in place).
from . import _cuda as _cu  # noqa: E402


def gelu_forward_cuda(x, out=None):
    _cu.require_device(x=x)
    out = _cu.out_array("out", out, x.shape, x.dtype)
    n = x.size
    if n:
        k = _cu.kernel("gelu", f"gelu_forward_kernel<{_cu.ctype(x.dtype)}>")
        k((_cu.grid_stride_blocks(n),), (_cu.THREADS,), (x, out, _cu.i64(n)))
    return out


def gelu_backward_cuda(dout, x, dx=None):
    _cu.require_device(dout=dout, x=x)
    dx = _cu.out_array("dx", dx, x.shape, x.dtype)
    n = x.size
    if n:
        k = _cu.kernel("gelu", f"gelu_backward_kernel<{_cu.ctype(x.dtype)}>")
        k((_cu.grid_stride_blocks(n),), (_cu.THREADS,), (dout, x, dx, _cu.i64(n)))
    return dx
