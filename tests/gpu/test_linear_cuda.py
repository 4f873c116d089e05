"""ops.linear_forward on the CUDA path: a bf16 out with a bf16 bias (c_attn's qkv in the bf16
model) is the GEMM accumulated (beta = 1) onto the bias on every row; the bias's and out's
placement and overlaps are checked before out is written."""
import numpy as np
import pytest

from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, to_bf16
from cllm_gpu.ops.gemm import gemm
from cllm_gpu.ops.linear import linear_forward
from gpu_util import assert_bitwise_equal

cp = pytest.importorskip("cupy")


@pytest.mark.parametrize("offset", [5, 64])
@pytest.mark.parametrize("N,Cin,Cout", [(1, 1, 1), (17, 31, 45), (64, 96, 288)])
def test_bf16_out_with_a_bias_slice_is_gemm_onto_the_broadcast_bias(N, Cin, Cout, offset):
    """The bias a slice of a larger bf16 arena (as the bias's bf16 copy sits beside the
    weights'), at `offset` elements: out equals gemm(x, W, C, accumulate=True) on C = the bias
    tiled over N rows, bit for bit, and the arena around the bias is left alone. Offset 64 is
    the model's arena alignment: with rows of a multiple of 4 elements the fill copies 8-byte
    words (ops/linear.py); offset 5 and the other widths copy 2-byte elements."""
    rng = np.random.default_rng(N + Cin + Cout)
    X = to_bf16(cp.asarray(rng.normal(size=(N, Cin)).astype(np.float32)))
    W = to_bf16(cp.asarray(rng.normal(size=(Cin, Cout)).astype(np.float32)))
    arena = to_bf16(cp.asarray(rng.normal(size=offset + 2 * Cout + 7).astype(np.float32)))
    arena_before = arena.copy()
    bias = arena[offset:offset + Cout]
    C = cp.asarray(np.tile(cp.asnumpy(bias), (N, 1)))
    gemm(X, W, C, accumulate=True)
    out = cp.full((N, Cout), 0xFFFF, BF16_DEVICE_DTYPE)
    assert linear_forward(X, W, bias, out=out) is out
    assert_bitwise_equal(out, C, "out")
    assert_bitwise_equal(arena, arena_before, "the arena holding the bias")


def test_bf16_out_refuses_a_host_bias_and_overlaps_before_writing():
    rng = np.random.default_rng(3)
    X = to_bf16(cp.asarray(rng.normal(size=(6, 8)).astype(np.float32)))
    W = to_bf16(cp.asarray(rng.normal(size=(8, 8)).astype(np.float32)))
    b = to_bf16(cp.asarray(rng.normal(size=8).astype(np.float32)))
    out = cp.full((6, 8), 0xFFFF, BF16_DEVICE_DTYPE)
    with pytest.raises(ValueError, match="bias: must live where out does"):
        linear_forward(X, W, cp.asnumpy(b), out=out)
    x_before = X.copy()
    with pytest.raises(ValueError, match="out: must not overlap"):
        linear_forward(X, W, b, out=X)
    assert_bitwise_equal(X, x_before, "x left alone")
