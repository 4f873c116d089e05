"""Linear layer y = x @ W + b with input-major W (HF GPT-2 Conv1D layout).

forward:  x (N, Cin), weight (Cin, Cout), bias (Cout,) -> out (N, Cout)
backward: dout (N, Cout) -> dx (N, Cin); dweight (Cin, Cout), dbias (Cout,) accumulated (+=)

The matrix products go to BLAS (NumPy) or cuBLAS (CuPy) through the array module's matmul,
so there is no hand-written kernel for this op.
"""
from ._common import check_array, check_float, xp_of


def linear_forward(x, weight, bias=None, out=None):
    check_array("x", x, ndim=2)
    check_float("x", x)
    check_array("weight", weight, shape=(x.shape[1], None), dtype=x.dtype)
    if bias is not None:
        check_array("bias", bias, shape=(weight.shape[1],), dtype=x.dtype)
    xp = xp_of(x)
    out = xp.matmul(x, weight, out=out)
    if bias is not None:
        out += bias
    return out


def linear_backward(dout, x, weight, dweight, dbias=None, dx=None):
    N, Cin = x.shape
    Cout = weight.shape[1]
    check_array("dout", dout, shape=(N, Cout), dtype=x.dtype)
    check_array("dweight", dweight, shape=(Cin, Cout), dtype=x.dtype)
    xp = xp_of(x)
    # x^T @ dout straight into a scratch then add: BLAS gemm with beta=1 is not exposed by matmul.
    dweight += xp.matmul(x.T, dout)
    if dbias is not None:
        dbias += dout.sum(axis=0)
    return xp.matmul(dout, weight.T, out=dx)
