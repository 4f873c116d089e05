"""GELU, tanh approximation (GPT-2): y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

forward:  x (any shape) -> out (same shape)
backward: dout, x -> dx

The forward can take the preceding linear layer's bias (bias (C,), x (..., C)): x += bias is
written back into x (the backward needs the pre-activation) in the same pass, so the MLP's
4C-wide activation is not read and written once more just for the bias. A bf16 `out` (bf16
storage, ops/cast.py; float32 x) gets the output rounded to bf16, for the MLP projection's
bf16 GEMM.
"""
import math

import numpy as np

from . import _cuda as _cu
from ._common import CHUNK, check_array, check_float, is_device_array
from .cast import check_storage, is_bf16, round_bf16
from .host_threads import run_chunks

GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def _gelu_forward_chunk(x, y):
    np.multiply(x, x, out=y)
    y *= GELU_CUBIC * GELU_SCALE
    y += GELU_SCALE
    y *= x
    np.tanh(y, out=y)
    y += 1.0
    y *= x
    y *= 0.5


def _gelu_backward_chunk(dout, x, dx, t, p, q):
    # d/dx = 0.5 (1 + t) [1 + x (1 - t) u'] = (1 + t) [0.5 + h (1 - t)],
    # t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3), h = 0.5 x u'
    np.multiply(x, x, out=p)                 # x^2
    np.multiply(p, GELU_CUBIC * GELU_SCALE, out=t)
    t += GELU_SCALE
    t *= x
    np.tanh(t, out=t)
    p *= 1.5 * GELU_CUBIC * GELU_SCALE       # temporaries stay in cache: chunks are small
    p += 0.5 * GELU_SCALE
    p *= x                                   # h
    np.multiply(p, t, out=q)
    p -= q                                   # h (1 - t)
    p += 0.5
    t += 1.0
    p *= t
    np.multiply(p, dout, out=dx)


def gelu_forward_ref(x, out=None, bias=None):
    if out is None:
        out = np.empty_like(x)
    if x.size == 0:
        return out
    bf16_out = is_bf16(out)
    # chunks of whole rows when there is a bias: x += bias while the chunk is in cache
    width = x.shape[-1] if bias is not None else 1
    xr, yr = x.reshape(-1, width), out.reshape(-1, width)
    step = max(1, CHUNK // width)

    def rows(c, s, _):
        xs, ys = xr[s], yr[s]
        if bias is not None:
            xs += bias
        xf, yf = xs.reshape(-1), ys.reshape(-1)
        _gelu_forward_chunk(xf, yf)
        if bf16_out:
            round_bf16(yf, out=yf)

    run_chunks(xr.shape[0], step, rows)
    return out


def gelu_backward_ref(dout, x, dx=None, dbias=None):
    out = dx
    if out is None or is_bf16(out):
        dx = np.empty_like(x)  # the float gradient first: the bias sums and the rounding read it
    xf, df, of = x.reshape(-1), dout.reshape(-1), dx.reshape(-1)

    def chunk(c, s, tpq):
        n = s.stop - s.start
        _gelu_backward_chunk(df[s], xf[s], of[s], *(a[:n] for a in tpq))

    run_chunks(xf.size, CHUNK, chunk,
               scratch=lambda: np.empty((3, min(CHUNK, xf.size)), dtype=x.dtype))
    if dbias is not None:
        dbias += dx.reshape(-1, x.shape[-1]).sum(axis=0)
    if out is None or out is dx:
        return dx
    out[...] = round_bf16(dx)
    return out


def gelu_forward(x, out=None, bias=None):
    """out (x's shape; x's dtype, or bf16 storage for a bf16 out); with bias, x += bias first."""
    check_array("x", x)
    check_float("x", x)
    if bias is not None:
        check_array("bias", bias, shape=(x.shape[-1] if x.ndim else 1,), dtype=x.dtype)
    if out is not None:
        check_array("out", out, shape=x.shape)
        check_storage("out", out, x)
    if is_device_array(x):
        return gelu_forward_cuda(x, out, bias)
    return gelu_forward_ref(x, out, bias)


def gelu_backward(dout, x, dx=None, dbias=None):
    """dx = dout * gelu'(x) (x's dtype, or bf16 storage for a bf16 dx: the copy the preceding
    linear layer's GEMMs read); with dbias (C,) for x (..., C), also dbias += the column sums
    of dx (that layer's bias gradient) in the same pass."""
    check_array("x", x)
    check_float("x", x)
    check_array("dout", dout, shape=x.shape, dtype=x.dtype)
    if dx is not None:
        check_array("dx", dx, shape=x.shape)
        check_storage("dx", dx, x)
    if dbias is not None:
        check_array("dbias", dbias, shape=(x.shape[-1],), dtype=x.dtype)
    if is_device_array(x):
        return gelu_backward_cuda(dout, x, dx, dbias)
    return gelu_backward_ref(dout, x, dx, dbias)


# ---- CUDA launcher (kernels_cu/gelu.cu): elementwise grid-stride kernels, float32/float64.
# out may be x and dx may be dout (in place).


def gelu_forward_cuda(x, out=None, bias=None):
    _cu.require_device(x=x)
    out = _cu.out_array("out", out, x.shape, out.dtype if out is not None else x.dtype)
    if bias is not None:
        _cu.require_device(bias=bias)
    n = x.size
    if n:
        t = _cu.ctype(x.dtype)
        k = _cu.kernel("gelu", f"gelu_forward_kernel<{t}, {_cu.out_ctype(out, x.dtype)}>")
        # without a bias the kernel never reads its bias pointer: x stands in for it
        k((_cu.grid_stride_blocks(n),), (_cu.THREADS,),
          (x, x if bias is None else bias, out, _cu.i64(n), _cu.i32(x.shape[-1]),
           _cu.i32(bias is not None)))
    return out


def gelu_backward_cuda(dout, x, dx=None, dbias=None):
    import cupy
    _cu.require_device(dout=dout, x=x)
    dx = _cu.out_array("dx", dx, x.shape, dx.dtype if dx is not None else x.dtype)
    n = x.size
    if n == 0:
        return dx
    t = _cu.ctype(x.dtype)
    if dbias is None and not is_bf16(dx):
        k = _cu.kernel("gelu", f"gelu_backward_kernel<{t}>")
        k((_cu.grid_stride_blocks(n),), (_cu.THREADS,), (dout, x, dx, _cu.i64(n)))
        return dx
    # the fused kernel: a bf16 dx and/or the bias gradient's column sums (rows x C)
    if dbias is not None:
        _cu.require_device(dbias=dbias)
    C = x.shape[-1]
    N = n // C
    rows, chunks = _cu.colsum_chunks(N)
    partial = cupy.empty((chunks, C), dtype=x.dtype)
    k = _cu.kernel("gelu", f"gelu_bias_backward_kernel<{t}, {_cu.out_ctype(dx, x.dtype)}>")
    k((_cu.ceil_div(C, 32), chunks), (256,),
      (dout, x, dx, partial, _cu.i32(N), _cu.i32(C), _cu.i32(rows)))
    if dbias is not None:
        _cu.colsum_finalize("gelu", partial, C, chunks, dbias)
    return dx
