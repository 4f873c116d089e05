"""LayerNorm over the last dimension.

forward:  x (N, C), weight (C,), bias (C,) -> out (N, C), mean (N,), rstd (N,)
backward: dout (N, C) -> dx (N, C); dweight, dbias (C,) are accumulated (+=)
"""
import numpy as np

from ._common import check_array, check_float, is_device_array


def layernorm_forward_ref(x, weight, bias, eps=1e-5, out=None, mean=None, rstd=None):
    mu = x.mean(axis=-1)
    xc = x - mu[:, None]
    var = np.einsum("ij,ij->i", xc, xc) / x.shape[1]
    r = 1.0 / np.sqrt(var + eps)
    xc *= r[:, None]
    xc *= weight
    xc += bias
    if out is None:
        out = xc
    else:
        out[...] = xc
    if mean is None:
        mean = mu.astype(x.dtype, copy=False)
    else:
        mean[...] = mu
    if rstd is None:
        rstd = r.astype(x.dtype, copy=False)
    else:
        rstd[...] = r
    return out, mean, rstd


def layernorm_backward_ref(dout, x, weight, mean, rstd, dweight, dbias, dx=None):
    xhat = (x - mean[:, None]) * rstd[:, None]
    dbias += dout.sum(axis=0)
    dweight += np.einsum("ij,ij->j", dout, xhat)
    dxhat = dout * weight
    C = x.shape[1]
    a = dxhat.sum(axis=1) / C
    b = np.einsum("ij,ij->i", dxhat, xhat) / C
    xhat *= b[:, None]
    dxhat -= a[:, None]
    dxhat -= xhat
    dxhat *= rstd[:, None]
    if dx is None:
        return dxhat
    dx[...] = dxhat
    return dx


def _check_params(x, weight, bias):
    check_array("x", x, ndim=2)
    check_float("x", x)
    C = x.shape[1]
    check_array("weight", weight, shape=(C,), dtype=x.dtype)
    check_array("bias", bias, shape=(C,), dtype=x.dtype)


def layernorm_forward(x, weight, bias, eps=1e-5, out=None, mean=None, rstd=None):
    _check_params(x, weight, bias)
    if is_device_array(x):
        return layernorm_forward_cuda(x, weight, bias, eps, out, mean, rstd)
    return layernorm_forward_ref(x, weight, bias, eps, out, mean, rstd)


def layernorm_backward(dout, x, weight, mean, rstd, dweight, dbias, dx=None):
    _check_params(x, weight, dbias)
    N, C = x.shape
    check_array("dout", dout, shape=(N, C), dtype=x.dtype)
    check_array("mean", mean, shape=(N,), dtype=x.dtype)
    check_array("rstd", rstd, shape=(N,), dtype=x.dtype)
    check_array("dweight", dweight, shape=(C,), dtype=x.dtype)
    if is_device_array(x):
        return layernorm_backward_cuda(dout, x, weight, mean, rstd, dweight, dbias, dx)
    return layernorm_backward_ref(dout, x, weight, mean, rstd, dweight, dbias, dx)
