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
