"""LayerNorm over the last dimension.

forward:  x (N, C), weight (C,), bias (C,) -> out (N, C), mean (N,), rstd (N,)
backward: dout (N, C) -> dx (N, C); dweight, dbias (C,) are accumulated (+=)

bf16_out=True (float32 x): out is written in bf16 storage (ops/cast.py), for an output whose
only reader is a bf16 matrix product; mean and rstd stay float32.
"""
import numpy as np

from ._common import check_array, check_float, is_device_array
from .cast import BF16_DEVICE_DTYPE, round_bf16


def layernorm_forward_ref(x, weight, bias, eps=1e-5, out=None, mean=None, rstd=None,
                          bf16_out=False):
    mu = x.mean(axis=-1)
    xc = x - mu[:, None]
    var = np.einsum("ij,ij->i", xc, xc) / x.shape[1]
    r = 1.0 / np.sqrt(var + eps)
    xc *= r[:, None]
    xc *= weight
    xc += bias
    if bf16_out:
        xc = round_bf16(xc)
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


def layernorm_forward(x, weight, bias, eps=1e-5, out=None, mean=None, rstd=None,
                      bf16_out=False):
    _check_params(x, weight, bias)
    if bf16_out and x.dtype != np.float32:
        raise ValueError(f"x: bf16_out needs float32 input, got {x.dtype}")
    if is_device_array(x):
        return layernorm_forward_cuda(x, weight, bias, eps, out, mean, rstd, bf16_out)
    return layernorm_forward_ref(x, weight, bias, eps, out, mean, rstd, bf16_out)


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


# ---- CUDA launcher (kernels_cu/layernorm.cu)
# forward: one warp per row. backward: per-(channel chunk, row chunk) partial sums of dbias and
# dweight into a scratch buffer, a second kernel adding them up in row-chunk order (bitwise
# reproducible, no atomics), then one warp per row for dx. The parameter kernels run first,
# so dx may alias dout or x.
from . import _cuda as _cu  # noqa: E402

_LN_ROWS_PER_BLOCK = 8  # LN_WARPS in layernorm.cu


def layernorm_forward_cuda(x, weight, bias, eps=1e-5, out=None, mean=None, rstd=None,
                           bf16_out=False):
    _cu.require_device(x=x, weight=weight, bias=bias)
    N, C = x.shape
    out = _cu.out_array("out", out, (N, C), BF16_DEVICE_DTYPE if bf16_out else x.dtype)
    mean = _cu.out_array("mean", mean, (N,), x.dtype)
    rstd = _cu.out_array("rstd", rstd, (N,), x.dtype)
    if N == 0:
        return out, mean, rstd
    if C == 0:
        raise ValueError("x: LayerNorm over 0 channels")
    t = _cu.ctype(x.dtype)
    k = _cu.kernel("layernorm", f"layernorm_forward_kernel<{t}, {'cllm_bf16' if bf16_out else t}>")
    k((_cu.ceil_div(N, _LN_ROWS_PER_BLOCK),), (32 * _LN_ROWS_PER_BLOCK,),
      (x, weight, bias, out, mean, rstd, _cu.i32(N), _cu.i32(C), _cu.scalar(x.dtype, eps)))
    return out, mean, rstd


def _ln_row_chunks(N):
    """Rows per partial-sum chunk and chunk count; a function of N only (determinism)."""
    rows = max(64, _cu.ceil_div(N, 512))
    return rows, _cu.ceil_div(N, rows)


def layernorm_backward_cuda(dout, x, weight, mean, rstd, dweight, dbias, dx=None):
    import cupy
    _cu.require_device(dout=dout, x=x, weight=weight, mean=mean, rstd=rstd, dweight=dweight,
                       dbias=dbias)
    N, C = x.shape
    dx = _cu.out_array("dx", dx, (N, C), x.dtype)
    if N == 0 or C == 0:  # nothing to add; C == 0 would also launch a grid of 0 blocks
        return dx
    t = _cu.ctype(x.dtype)
    rows, chunks = _ln_row_chunks(N)
    partial = cupy.empty((2, chunks, C), dtype=x.dtype)
    k = _cu.kernel("layernorm", f"layernorm_param_partials_kernel<{t}>")
    k((_cu.ceil_div(C, 32), chunks), (256,),
      (dout, x, mean, rstd, partial, _cu.i32(N), _cu.i32(C), _cu.i32(rows)))
    k = _cu.kernel("layernorm", f"layernorm_param_finalize_kernel<{t}>")
    k((_cu.ceil_div(C, _cu.THREADS),), (_cu.THREADS,),
      (partial, dweight, dbias, _cu.i32(C), _cu.i32(chunks)))
    k = _cu.kernel("layernorm", f"layernorm_dx_kernel<{t}>")
    k((_cu.ceil_div(N, _LN_ROWS_PER_BLOCK),), (32 * _LN_ROWS_PER_BLOCK,),
      (dout, x, weight, mean, rstd, dx, _cu.i32(N), _cu.i32(C)))
    return dx
