"""ops.gemm on cuBLAS (GemmEx on raw pointers) against NumPy, for float32, float64 and bf16
operands, every transpose combination, beta = 0 and 1, shapes that are not tile multiples."""
import numpy as np
import pytest

from cllm_gpu.ops.cast import bf16_bits, round_bf16
from cllm_gpu.ops.gemm import gemm
from gpu_util import assert_bitwise_equal, assert_close, poison, rel_err

cp = pytest.importorskip("cupy")

SHAPES = [(1, 1, 1), (7, 5, 3), (33, 65, 17), (256, 768, 192), (1000, 50304 // 16, 64)]


def _operands(rng, M, N, K, ta, tb):
    a = rng.normal(size=(K, M) if ta else (M, K)).astype(np.float32)
    b = rng.normal(size=(N, K) if tb else (K, N)).astype(np.float32)
    return a, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_gemm_matches_numpy(shape, ta, tb, dtype):
    rng = np.random.default_rng(sum(shape))
    M, N, K = shape
    a, b = (x.astype(dtype) for x in _operands(rng, M, N, K, ta, tb))
    want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    out = poison((M, N), dtype)
    assert gemm(cp.asarray(a), cp.asarray(b), out, trans_a=ta, trans_b=tb) is out
    # fp32: K-term dot products, error ~ sqrt(K) ulp of the summands' magnitude
    floor = 1e-6 * np.sqrt(K) if dtype == np.float32 else 1e-14 * np.sqrt(K)
    assert_close(out, want, 0, floor, "gemm")
    c0 = rng.normal(size=(M, N)).astype(dtype)
    acc = cp.asarray(c0)
    gemm(cp.asarray(a), cp.asarray(b), acc, trans_a=ta, trans_b=tb, accumulate=True)
    assert_close(acc, want + c0, 0, 2 * floor, "gemm accumulate")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True)])
def test_bf16_gemm_matches_numpy_on_rounded_operands(shape, ta, tb):
    """bf16 x bf16 products are exact in fp32, so the only difference from NumPy's float64
    product of the same (rounded) values is the fp32 accumulation: sqrt(K) ulp."""
    rng = np.random.default_rng(7 + sum(shape))
    M, N, K = shape
    a, b = _operands(rng, M, N, K, ta, tb)
    want = (round_bf16(a.T if ta else a).astype(np.float64)
            @ round_bf16(b.T if tb else b).astype(np.float64))
    a16, b16 = cp.asarray(bf16_bits(a)), cp.asarray(bf16_bits(b))
    out = poison((M, N), np.float32)
    gemm(a16, b16, out, trans_a=ta, trans_b=tb)
    assert_close(out, want, 0, 1e-6 * np.sqrt(K), "bf16 gemm")
    # and against the unrounded fp32 product: bf16 inputs cost ~2^-8 relative per operand
    exact = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    assert rel_err(out, exact) < 1e-2
    out2 = poison((M, N), np.float32)
    gemm(a16, b16, out2, trans_a=ta, trans_b=tb)
    assert_bitwise_equal(out, out2, "bf16 gemm rerun")


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_bf16_gemm_into_bf16_out_is_the_fp32_product_rounded(shape):
    """A bf16 out (the classifier's logits; with accumulate, qkv): cuBLAS rounds its fp32
    accumulation once, so the result is the fp32 product's bf16 rounding, give or take one
    bf16 ulp where the fp32 sum lands within fp32 noise of a rounding midpoint."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, bits_to_float
    rng = np.random.default_rng(11 + sum(shape))
    M, N, K = shape
    a, b = _operands(rng, M, N, K, False, True)
    a16, b16 = cp.asarray(bf16_bits(a)), cp.asarray(bf16_bits(b))
    out32 = poison((M, N), np.float32)
    gemm(a16, b16, out32, trans_b=True)
    out16 = cp.full((M, N), 0xFFFF, dtype=BF16_DEVICE_DTYPE)
    gemm(a16, b16, out16, trans_b=True)
    got, want = bits_to_float(cp.asnumpy(out16)), bits_to_float(bf16_bits(cp.asnumpy(out32)))
    # one bf16 ulp is 2^-7 of its binade's base, so up to 2^-7 |want| (2^-8 admits no flip)
    assert (np.abs(got - want) <= 2.0 ** -7 * np.abs(want) + 1e-30).all()
    assert (got != want).mean() < 1e-3
    # accumulate (beta = 1) into a bf16 out (c_attn's qkv: out holds the bias's bf16 copy):
    # the bf16 C read as fp32, added to the fp32 product, the sum rounded once
    c0 = cp.asarray(bf16_bits(rng.normal(size=(M, N))))
    acc16 = c0.copy()
    gemm(a16, b16, acc16, trans_b=True, accumulate=True)
    got = bits_to_float(cp.asnumpy(acc16))
    want = bits_to_float(bf16_bits(cp.asnumpy(out32) + bits_to_float(cp.asnumpy(c0))))
    assert (np.abs(got - want) <= 2.0 ** -7 * np.abs(want) + 1e-30).all()
    assert (got != want).mean() < 1e-3


def test_gemm_rejects_mixed_and_overlapping():
    a = cp.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="unsupported"):
        gemm(a, cp.zeros((3, 2), np.uint16), cp.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="out"):
        gemm(a, cp.zeros((3, 2), np.float32), cp.zeros((2, 4), np.float32))
    x = cp.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        gemm(x, cp.zeros((4, 4), np.float32), x)
