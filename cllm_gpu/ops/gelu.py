"""GELU, tanh approximation (GPT-2): y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

forward:  x (..., C), bias None or (C,) -> out = gelu(x [+ bias]) (x's shape)
backward: dout, x, bias -> dx = dout * gelu'(x [+ bias]); dbias (C,) += column sums of dx

The bias is the preceding linear layer's (c_fc's): its GEMM writes the bare product and both
passes add the bias themselves, so the MLP's 4C-wide activation is neither read and written once
more for the bias nor stored twice; the backward recomputes the same fp32 sum the forward used.
Storage: x, dout float32/float64, or bf16 (ops/cast.py: what a bf16 GEMM wrote; computed in
float32); out and dx the float dtype, or bf16 for a reader that is a bf16 matrix product (the
MLP projection; c_fc's backward GEMMs), rounded once from the fp32 result.
"""
import math

import numpy as np

from . import _cuda as _cu
from ._common import CHUNK, check_array, check_float, is_device_array
from .cast import check_storage, float_dtype, is_bf16, round_bf16
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
    y *= 0.5                                 # exact; before x: (1 + t) x overflows past 1.7e38
    y *= x


def _gelu_backward_chunk(dout, x, dx, t, p, q):
    # d/dx = 0.5 (1 + t) + [x (1 - t) (1 + t)] 0.5 u',  t = tanh(u),
    # u = sqrt(2/pi) (x + 0.044715 x^3), u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    # (1 - t)(1 + t) is exactly 0 where tanh saturates: taken before x and u', whose product
    # overflows from |x| ~ 1.8e13 in float32 (inf * 0 was NaN where the derivative is 1 or 0);
    # x^2 itself overflows from |x| ~ 1.9e19: held at the largest finite value (tanh's
    # argument is still +-inf there, and u' finite); only in a chunk that has one (max is a
    # third of minimum's time: the clamp on every chunk cost the backward ~9 %), or a NaN,
    # whose max is NaN and may hide an inf beside it
    np.multiply(x, x, out=p)                 # x^2
    if not p.max() < np.inf:
        np.minimum(p, np.finfo(p.dtype).max, out=p)
    np.multiply(p, GELU_CUBIC * GELU_SCALE, out=t)
    t += GELU_SCALE
    t *= x
    np.tanh(t, out=t)
    p *= 1.5 * GELU_CUBIC * GELU_SCALE       # temporaries stay in cache: chunks are small
    p += 0.5 * GELU_SCALE                    # 0.5 u'
    np.subtract(1.0, t, out=q)
    t += 1.0
    q *= t                                   # (1 - t)(1 + t)
    q *= x
    q *= p
    t *= 0.5
    q += t
    np.multiply(q, dout, out=dx)


def _row_chunks(x, bias, scratch_rows):
    """(rows view, rows per chunk, scratch factory) for a chunked pass over x: whole rows of
    width C when a bias is added (the sum built per chunk, in cache), else flat chunks."""
    width = _row_width(x) if bias is not None else 1
    step = max(1, CHUNK // width)
    fdt = float_dtype(x)
    return (x.reshape(-1, width), step,
            lambda: np.empty((scratch_rows, min(step, x.size // max(width, 1)) * width), fdt))


def _plus_bias(xs, bias, pre):
    """The chunk xs (rows, C) plus bias in the scratch row `pre`, flat; xs flat without a bias."""
    if bias is None:
        return xs.reshape(-1)
    p = pre[:xs.size].reshape(xs.shape)
    np.add(xs, bias, out=p)
    return p.reshape(-1)


def gelu_forward_ref(x, out=None, bias=None):
    if out is None:
        out = np.empty(x.shape, float_dtype(x))
    if x.size == 0:
        return out
    bf16_out = is_bf16(out)
    xr, step, scratch = _row_chunks(x, bias, 1)
    yr = out.reshape(xr.shape)
    # out is x: the chain writes y before it last reads x, so a bare x is read from a copy
    copy_x = bias is None and np.may_share_memory(out, x)

    def rows(c, s, pre):
        yf = yr[s].reshape(-1)
        if copy_x:
            xs = pre[0][:yf.size]
            xs[...] = xr[s].reshape(-1)
        else:
            xs = _plus_bias(xr[s], bias, pre[0])
        _gelu_forward_chunk(xs, yf)
        if bf16_out:
            round_bf16(yf, out=yf)

    run_chunks(xr.shape[0], step, rows, scratch=scratch)
    return out


def gelu_backward_ref(dout, x, dx=None, dbias=None, bias=None, scratch=None):
    # scratch: the CUDA launcher's workspace, unused here (the signature is the launcher's);
    # the name is reused below for the row chunks' buffers
    out = dx
    if out is None or is_bf16(out):  # the float gradient first: the bias sums and the rounding read it
        dx = np.empty(x.shape, float_dtype(x))
    if x.size == 0:
        return dx if out is None else out
    xr, step, scratch = _row_chunks(x, bias, 4)
    dr, gr = dout.reshape(xr.shape), dx.reshape(xr.shape)

    def rows(c, s, tmp):
        g = gr[s].reshape(-1)
        n = g.size
        _gelu_backward_chunk(dr[s].reshape(-1), _plus_bias(xr[s], bias, tmp[3]), g,
                             *(a[:n] for a in tmp[:3]))

    run_chunks(xr.shape[0], step, rows, scratch=scratch)
    if dbias is not None:
        dbias += dx.reshape(-1, _row_width(x)).sum(axis=0)
    if out is None or out is dx:
        return dx
    out[...] = round_bf16(dx)
    return out


def _row_width(x):
    """C of x (..., C): the bias's length and the kernels' row width; 1 for a 0-d x (one
    element, as the NumPy path takes it)."""
    return x.shape[-1] if x.ndim else 1


def _check_input(name, x):
    check_array(name, x)
    if not is_bf16(x):
        check_float(name, x)


def gelu_forward(x, out=None, bias=None):
    """out = gelu(x [+ bias]) (x's shape; the float dtype, or bf16 storage for a bf16 out);
    x is not modified. bias (C,) for x (..., C), in the float dtype."""
    _check_input("x", x)
    if bias is not None:
        check_array("bias", bias, shape=(_row_width(x),), dtype=float_dtype(x))
    if out is not None:
        check_array("out", out, shape=x.shape)
        check_storage("out", out, x)
    if is_device_array(x):
        return gelu_forward_cuda(x, out, bias)
    return gelu_forward_ref(x, out, bias)


def gelu_backward(dout, x, dx=None, dbias=None, bias=None, scratch=None):
    """dx = dout * gelu'(x [+ bias]) (the float dtype, or bf16 storage for a bf16 dx: the
    operand the preceding linear layer's GEMMs read); dout in x's storage; bias: the forward's.
    With dbias (C,) for x (..., C), also dbias += the column sums of dx (that layer's bias
    gradient, summed before any rounding) in the same pass.
    scratch: on CUDA, a 1-d device array of the float dtype and `gelu_backward_scratch_size`
    elements for the bias gradient's partial column sums, so that nothing is allocated here (a
    CUDA-graph capture holds every block it allocates); None: allocated per call. The NumPy
    path ignores it."""
    _check_input("x", x)
    check_array("dout", dout, shape=x.shape, dtype=x.dtype)
    fdt = float_dtype(x)
    if dx is not None:
        check_array("dx", dx, shape=x.shape)
        check_storage("dx", dx, x)
    for name, v in (("bias", bias), ("dbias", dbias)):
        if v is not None:
            check_array(name, v, shape=(_row_width(x),), dtype=fdt)
    if is_device_array(x):
        return gelu_backward_cuda(dout, x, dx, dbias, bias, scratch)
    return gelu_backward_ref(dout, x, dx, dbias, bias)


# ---- CUDA launcher (kernels_cu/gelu.cu): <compute type, input storage, output storage>;
# out may be x and dx may be dout or x in the same storage (in place: each element is read,
# then written, by one thread); any other overlap is refused.


def gelu_forward_cuda(x, out=None, bias=None):
    _cu.require_device(x=x)
    fdt = float_dtype(x)
    out = _cu.out_array("out", out, x.shape, out.dtype if out is not None else fdt)
    if bias is not None:
        _cu.require_device(bias=bias)
    _cu.check_in_place("out", out, x=x)
    _cu.check_disjoint("out", out, bias=bias)   # every row reads the bias
    n = x.size
    if n:
        t = _cu.ctype(fdt)
        k = _cu.kernel("gelu", f"gelu_forward_kernel<{t}, {_cu.out_ctype(x, fdt)}, "
                               f"{_cu.out_ctype(out, fdt)}>")
        # without a bias the kernel never reads its bias pointer: out stands in for it
        k((_cu.grid_stride_blocks(n),), (_cu.THREADS,),
          (x, out if bias is None else bias, out, _cu.i64(n), _cu.i32(_row_width(x)),
           _cu.i32(bias is not None)))
    return out


def gelu_backward_scratch_size(N: int, C: int) -> int:
    """Elements (of the float dtype) of gelu_backward's `scratch` for x of N rows of C: the
    fused kernel's partial column sums."""
    return _cu.colsum_scratch_size(N, C)


def gelu_backward_cuda(dout, x, dx=None, dbias=None, bias=None, scratch=None):
    _cu.require_device(dout=dout, x=x)
    fdt = float_dtype(x)
    dx = _cu.out_array("dx", dx, x.shape, dx.dtype if dx is not None else fdt)
    _cu.check_in_place("dx", dx, dout=dout, x=x)
    _cu.check_disjoint("dx", dx, bias=bias)
    n = x.size
    if n == 0:
        return dx
    t = _cu.ctype(fdt)
    C = _row_width(x)
    N = n // C

    def partials():
        return _cu.colsum_partials(scratch, N, C, 1, fdt, dout=dout, x=x, dx=dx, dbias=dbias,
                                   bias=bias)
    if dbias is None and bias is None and not is_bf16(dx) and not is_bf16(x):
        if scratch is not None:   # checked, though the plain kernel sums nothing
            partials()
        k = _cu.kernel("gelu", f"gelu_backward_kernel<{t}>")
        k((_cu.grid_stride_blocks(n),), (_cu.THREADS,), (dout, x, dx, _cu.i64(n)))
        return dx
    # the fused kernel, over (rows, C): the bias, bf16 storage and/or the bias gradient's
    # column sums (per-chunk partials, then a fixed-order finalize)
    _cu.require_device(**{k: v for k, v in (("bias", bias), ("dbias", dbias)) if v is not None})
    rows, chunks = _cu.colsum_chunks(N)
    partial = partials()
    k = _cu.kernel("gelu", f"gelu_bias_backward_kernel<{t}, {_cu.out_ctype(x, fdt)}, "
                           f"{_cu.out_ctype(dx, fdt)}>")
    k((_cu.ceil_div(C, 32), chunks), (256,),
      (dout, x, partial if bias is None else bias, dx, partial, _cu.i32(N), _cu.i32(C),
       _cu.i32(rows), _cu.i32(bias is not None)))
    if dbias is not None:
        _cu.colsum_finalize("gelu", partial, C, chunks, dbias)
    return dx
