import numpy as np
import pytest

from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, bf16_bits, bits_to_float, from_bf16, to_bf16
from gpu_util import assert_bitwise_equal

cp = pytest.importorskip("cupy")


@pytest.mark.parametrize("n", [1, 255, 100_003])
def test_to_bf16_bits_equal_host_rounding(n):
    rng = np.random.default_rng(n)
    x = (rng.normal(size=n) * 10.0 ** rng.integers(-30, 30, size=n)).astype(np.float32)
    x[: min(n, 4)] = np.array([np.inf, -np.inf, 0.0, -0.0], np.float32)[: min(n, 4)]
    out = cp.full(n, 0xFFFF, dtype=BF16_DEVICE_DTYPE)
    assert to_bf16(cp.asarray(x), out=out) is out
    np.testing.assert_array_equal(cp.asnumpy(out), bf16_bits(x))
    back = from_bf16(out)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(cp.asnumpy(back).view(np.uint32),
                                  bf16_bits(x).astype(np.uint32) << 16)
    assert_bitwise_equal(to_bf16(cp.asarray(x)), out)


def test_to_bf16_rounding_boundaries_equal_host_rounding():
    """Every bf16 value's upper half with each lower half that decides its rounding (0, 1,
    0x7FFF, the tie 0x8000, 0x8001, 0xFFFF): ties to even at every exponent, the carry into the
    next binade and past the largest finite value into inf, denormals (kept: CuPy's -ftz=true
    does not reach the inline cvt.rn.bf16.f32, written without .ftz), NaNs of every payload
    (the same NaN-ness only: the GPU's NaN bits are the hardware's, the host keeps sign and top
    bits)."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    x = (hi[:, None] | lows[None, :]).reshape(-1).view(np.float32)
    got = cp.asnumpy(to_bf16(cp.asarray(x)))
    want = bf16_bits(x)
    nan = np.isnan(x)
    bad = np.flatnonzero((got != want) & ~nan)
    assert bad.size == 0, [(hex(x.view(np.uint32)[i]), hex(got[i]), hex(want[i]))
                           for i in bad[:8]]
    assert np.isnan(bits_to_float(got[nan])).all()
    denormal = (x.view(np.uint32) & 0x7F800000) == 0
    assert (got[denormal] & 0x7FFF).any()   # kept, not flushed to zero


def test_nan_stays_nan():
    x = cp.asarray(np.array([np.nan, -np.nan, 1.0], np.float32))
    back = cp.asnumpy(from_bf16(to_bf16(x)))
    assert np.isnan(back[:2]).all() and back[2] == 1.0


def test_cast_rejects_wrong_dtypes():
    with pytest.raises(ValueError, match="float32"):
        to_bf16(cp.zeros(4, dtype=np.float64))
    with pytest.raises(ValueError, match="out"):
        to_bf16(cp.zeros(4, dtype=np.float32), out=cp.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="uint16"):
        from_bf16(cp.zeros(4, dtype=np.float32))


def test_cast_refuses_a_device_x_of_another_dtype():
    """On the device the launchers alone check x's dtype: a float64 x to bf16, or a float32 x
    read as bf16 bits, would be reinterpreted by the kernel, not converted."""
    with pytest.raises(ValueError, match="x: expected dtype float32"):
        to_bf16(cp.zeros(8, np.float64))
    with pytest.raises(ValueError, match="x: expected dtype uint16"):
        from_bf16(cp.zeros(8, np.float32))


def test_cast_refuses_an_out_over_x():
    """out and x differ in element size: a thread writing out[i] overwrites elements of x that
    other threads read, even with out at x's own address."""
    n = 64
    arena = cp.zeros(n, dtype=np.float32)
    with pytest.raises(ValueError, match="out: must not overlap x"):
        to_bf16(arena, out=arena.view(BF16_DEVICE_DTYPE)[:n])
    bits = cp.zeros(2 * n, dtype=BF16_DEVICE_DTYPE)
    with pytest.raises(ValueError, match="out: must not overlap x"):
        from_bf16(bits[n:], out=bits.view(np.float32)[:n])
