"""Linear layer y = x @ W + b with input-major W (HF GPT-2 Conv1D layout).

forward:  x (..., Cin), weight (Cin, Cout), bias (Cout,) -> out (..., Cout)
backward: dout (..., Cout) -> dx (..., Cin); dweight (Cin, Cout), dbias (Cout,) accumulated (+=)

The weight's storage decides the products' precision: with a bf16 weight (ops/cast.py) the
products take bf16 operands and accumulate in fp32. An operand that is float32 while the weight
is bf16 is cast into `scratch` (a flat bf16 buffer, reused) first; the bias gradient is summed
from the float32 dout. dweight is float; out and dx are float, or with a bf16 weight bf16
storage for a reader that wants bf16 (qkv; the attention's dout), which the GEMM rounds once.
A bf16 out takes its bias in bf16 storage too (the bias's bf16 copy, beside the weights'): out
starts as the bias on every row and the GEMM adds its product to it (beta = 1), so out is
bf16(x W + bf16(b)) rounded once, what cuBLASLt's bias epilogue computes for PyTorch autocast,
with no fp32 product written and read back.
The matrix products are `ops.gemm` (BLAS / cuBLAS), so there is no hand-written kernel here.
"""
import numpy as np

from ._common import check_array, is_device_array, overlaps, xp_of
from .cast import cast_like, float_dtype, is_bf16
from .gemm import gemm
from .host_threads import host_threads, run_parts


def _rows(a, width):
    return a.reshape(-1, width)


def _features(weight):
    """(Cin, Cout) of a 2-d weight; a layer of no input or output features is refused here,
    for both backends (the (-1, 0) views of its rows failed with NumPy's / CuPy's 'cannot
    reshape')."""
    check_array("weight", weight, ndim=2)
    Cin, Cout = weight.shape
    if Cin == 0 or Cout == 0:
        raise ValueError(f"weight: a linear layer needs input and output features, got "
                         f"shape {tuple(weight.shape)}")
    return Cin, Cout


def fill_rows(rows, bias):
    """rows[...] = bias on every row of the C-contiguous (N, Cout) rows, bit for bit. On the
    device as 8-byte words where both arrays allow: CuPy broadcasts a copy one element per
    thread, each with its own index computation, so c_attn's bf16 fill at GPT-2 124M (16 K rows
    of 2,304 2-byte elements, 75 MB) ran at 0.42 TB/s on an H200, 0.18 ms a layer
    (docs/results/h200-2026-12-04/profile_call2.md); as words it is a quarter the elements."""
    row_bytes = rows.shape[-1] * rows.itemsize
    if (is_device_array(rows) and row_bytes % 8 == 0 and rows.data.ptr % 8 == 0
            and bias.data.ptr % 8 == 0):
        rows.view(np.uint64)[...] = bias.view(np.uint64)
    else:
        rows[...] = bias


def linear_forward(x, weight, bias=None, out=None, scratch=None):
    Cin, Cout = _features(weight)
    check_array("x", x)
    if x.ndim < 1 or x.shape[-1] != Cin:
        raise ValueError(f"x: expected shape (..., {Cin}), got {tuple(x.shape)}")
    fdt = float_dtype(weight)
    shape = x.shape[:-1] + (Cout,)
    bf16_out = out is not None and is_bf16(out)
    if out is not None:
        if bf16_out:
            check_array("out", out, shape=shape)
            if not is_bf16(weight):
                raise ValueError("out: a bf16 out needs a bf16 weight")
        else:
            check_array("out", out, shape=shape, dtype=fdt)
    if bias is not None:
        if is_bf16(bias) != bf16_out:
            raise ValueError("bias: a bf16 out takes the bias in bf16 storage, a float out a "
                             f"float bias; got {'bf16' if is_bf16(bias) else bias.dtype} for a "
                             f"{'bf16' if bf16_out else 'float'} out")
        check_array("bias", bias, shape=(Cout,), dtype=None if bf16_out else fdt)
    x2 = cast_like(_rows(x, Cin), weight, scratch)
    if bf16_out and bias is not None:
        if is_device_array(bias) != is_device_array(out):
            raise ValueError("bias: must live where out does (both host or both device)")
        rows = _rows(out, Cout)
        if any(overlaps(rows, a) for a in (x, x2, weight, bias)):  # before the fill writes out
            raise ValueError("out: must not overlap x, weight or bias")
        fill_rows(rows, bias)  # each row starts as the bias; the GEMM adds the product
        gemm(x2, weight, rows, accumulate=True)
        return out
    y = gemm(x2, weight, None if out is None else _rows(out, Cout))
    if bias is not None:
        y += bias
    return out if out is not None else y.reshape(shape)


def linear_backward(dout, x, weight, dweight, dbias=None, dx=None, scratch=None):
    """x: the forward's matrix-product operand (in the weight's storage). dout: float, or
    already in the weight's storage (a bf16 copy made by a fused kernel, which then also
    summed the bias gradient: dbias None)."""
    Cin, Cout = _features(weight)
    check_array("x", x)
    N = x.size // Cin
    fdt = float_dtype(weight)
    check_array("dout", dout)
    if is_bf16(dout) and is_bf16(weight):
        if dbias is not None:
            raise ValueError("linear_backward: a bias gradient is summed from a float dout, "
                             "not from its bf16 copy")
    else:
        check_array("dout", dout, dtype=fdt)
    if dout.size != N * Cout or dout.shape[-1] != Cout:
        raise ValueError(f"dout: expected shape (..., {Cout}) with {N} rows, got "
                         f"{tuple(dout.shape)}")
    check_array("dweight", dweight, shape=(Cin, Cout), dtype=fdt)
    if dbias is not None:
        check_array("dbias", dbias, shape=(Cout,), dtype=fdt)
    if dx is not None:
        if is_bf16(dx):  # a bf16 reader's dx (the attention's dout): the GEMM rounds once
            check_array("dx", dx)
            if not is_bf16(weight):
                raise ValueError("dx: a bf16 dx needs a bf16 weight")
        else:
            check_array("dx", dx, dtype=fdt)
        if dx.size != N * Cin:
            raise ValueError(f"dx: expected {N} rows of {Cin}, got {tuple(dx.shape)}")
    if dx is not None and any(overlaps(dx, a) for a in (dout, x, weight)):
        raise ValueError("dx: must not overlap dout, x or weight (the products read them while "
                         "dx is written)")
    x2, d2 = _rows(x, Cin), _rows(dout, Cout)
    if is_bf16(x2) != is_bf16(weight):
        raise ValueError("linear_backward: x must be in the weight's storage (the forward's "
                         "matrix-product operand)")
    g = cast_like(d2, weight, scratch)
    dx_rows = xp_of(x2).empty((N, Cin), dtype=fdt) if dx is None else _rows(dx, Cin)

    def weight_grad():
        gemm(x2, g, dweight, trans_a=True, accumulate=True)   # dW += x^T @ dout
        if dbias is not None:
            dbias[...] += d2.sum(axis=0)

    def input_grad():
        gemm(g, weight, dx_rows, trans_b=True)                # dx = dout @ W^T

    if not is_device_array(x2) and host_threads() == 2:
        # NumPy on 2 threads: the two products (equal FLOPs) side by side, one thread each,
        # rather than each split over both in turn: one parallel region, each GEMM whole
        # (cpu-small step, 2 cores: 418 -> 398 ms, median of 8 interleaved rounds). With more
        # threads each GEMM is split over all of them instead.
        run_parts(2, lambda i, _: (weight_grad, input_grad)[i]())
    else:
        weight_grad()
        input_grad()
    return dx if dx is not None else dx_rows.reshape(dout.shape[:-1] + (Cin,))
