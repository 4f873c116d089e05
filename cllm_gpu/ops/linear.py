"""Linear layer y = x @ W + b with input-major W (HF GPT-2 Conv1D layout).

forward:  x (N, Cin), weight (Cin, Cout), bias (Cout,) -> out (N, Cout)
backward: dout (N, Cout) -> dx (N, Cin); dweight (Cin, Cout), dbias (Cout,) accumulated (+=)

x, weight and the products' dout are float32/float64, or bf16 storage (ops/cast.py) for the
mixed-precision path: then out, dx and dweight are float32 and the bias gradient is summed
from the float32 dout while the products use its bf16 copy `dout_lp`. The matrix products are
`ops.gemm` (BLAS / cuBLAS), so there is no hand-written kernel for this op.
"""
import numpy as np

from ._common import check_array
from .gemm import gemm


def _float_dtype(a):
    """The dtype of the float32/float64 results computed from operand `a`."""
    if a.dtype in (np.float32, np.float64):
        return a.dtype
    return np.dtype(np.float32)  # bf16 storage operands accumulate into float32


def linear_forward(x, weight, bias=None, out=None):
    check_array("x", x, ndim=2)
    check_array("weight", weight, shape=(x.shape[1], None), dtype=x.dtype)
    if bias is not None:
        check_array("bias", bias, shape=(weight.shape[1],), dtype=_float_dtype(x))
    out = gemm(x, weight, out)
    if bias is not None:
        out += bias
    return out


def linear_backward(dout, x, weight, dweight, dbias=None, dx=None, dout_lp=None):
    N, Cin = x.shape
    Cout = weight.shape[1]
    fdt = _float_dtype(x)
    check_array("dout", dout, shape=(N, Cout), dtype=fdt)
    check_array("dweight", dweight, shape=(Cin, Cout), dtype=fdt)
    g = dout
    if dout_lp is not None:
        g = check_array("dout_lp", dout_lp, shape=(N, Cout), dtype=x.dtype)
    elif x.dtype != fdt:
        raise ValueError("linear_backward: bf16 operands need dout_lp (the bf16 copy of dout)")
    gemm(x, g, dweight, trans_a=True, accumulate=True)   # dW += x^T @ dout
    if dbias is not None:
        dbias += dout.sum(axis=0)
    return gemm(g, weight, dx, trans_b=True)             # dx = dout @ W^T
