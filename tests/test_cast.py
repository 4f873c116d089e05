import numpy as np
import pytest

from cllm_gpu.ops.cast import bf16_bits, bits_to_float, round_bf16, to_bf16


def test_bits_of_known_values():
    x = np.array([1.0, -2.0, 0.0, -0.0, np.inf, -np.inf, 3.140625, 65280.0], np.float32)
    assert bf16_bits(x).tolist() == [0x3F80, 0xC000, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x4049,
                                     0x477F]
    assert np.isnan(bits_to_float(bf16_bits(np.array([np.nan], np.float32)))).all()


def test_round_to_nearest_even():
    one_ulp = 2.0 ** -7  # bf16 spacing in [1, 2)
    x = np.array([1 + one_ulp / 2, 1 + 1.5 * one_ulp, 1 + one_ulp / 2 + 2 ** -20,
                  1 + one_ulp / 2 - 2 ** -20], np.float32)
    # ties go to the even mantissa (1.0 and 1 + 2 ulp); off-tie values to the nearest
    np.testing.assert_array_equal(round_bf16(x), [1.0, 1 + 2 * one_ulp, 1 + one_ulp, 1.0])
    assert round_bf16(np.array([3.4e38], np.float32))[0] == np.inf  # past bf16's max


@pytest.mark.parametrize("seed", range(3))
def test_round_error_bound_and_idempotent(seed):
    x = np.random.default_rng(seed).normal(scale=10.0 ** seed, size=10_000).astype(np.float32)
    r = round_bf16(x)
    # 8 significant bits: spacing 2^-7 in [1, 2), so at most half of it, 2^-8, relative
    assert np.all(np.abs(r - x) <= np.abs(x) * 2.0 ** -8)
    assert np.abs(r - x).max() > np.abs(x).max() * 2.0 ** -10  # and it did round
    np.testing.assert_array_equal(round_bf16(r), r)
    np.testing.assert_array_equal(bf16_bits(r).astype(np.uint32) << 16, r.view(np.uint32))


def test_to_bf16_on_host_keeps_float32_storage():
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    out = np.empty_like(x)
    assert to_bf16(x, out=out) is out
    np.testing.assert_array_equal(out, round_bf16(x))
    with pytest.raises(ValueError, match="float32"):
        to_bf16(x.astype(np.float64))


def _from_bits(bits):
    return np.array(bits, np.uint32).view(np.float32)


# (float32 bits, bf16 bits) by the definition of round to nearest, ties to even, at the places
# the bit trick can go wrong: exact ties of both parities, a carry into the next binade and past
# the largest finite value into inf, denormals (kept, not flushed), signed zeros and infinities
EDGE_BITS = [
    (0x3F808000, 0x3F80), (0x3F818000, 0x3F82), (0xBF808000, 0xBF80), (0xBF818000, 0xBF82),
    (0x3F807FFF, 0x3F80), (0x3F808001, 0x3F81),
    (0x3FFF8000, 0x4000), (0x3FFFFFFF, 0x4000), (0x3F7F8000, 0x3F80),
    (0x7F7FFFFF, 0x7F80), (0x7F7F8000, 0x7F80), (0x7F7F7FFF, 0x7F7F), (0x7F7E8000, 0x7F7E),
    (0xFF7F8000, 0xFF80), (0xFF7F7FFF, 0xFF7F),
    (0x00000001, 0x0000), (0x00008000, 0x0000), (0x00008001, 0x0001), (0x00018000, 0x0002),
    (0x00010000, 0x0001), (0x007F8000, 0x0080), (0x007FFFFF, 0x0080), (0x807F8000, 0x8080),
    (0x80008000, 0x8000), (0x80018000, 0x8002),
    (0x00000000, 0x0000), (0x80000000, 0x8000), (0x7F800000, 0x7F80), (0xFF800000, 0xFF80),
]
# NaNs whose payload lies only in the low 16 bits (the rounding carry would make 0x7F800001 inf
# and 0x7FFFFFFF a -0), signalling and quiet, both signs: each must stay a NaN
NAN_BITS = [0x7F800001, 0x7F807FFF, 0x7F808000, 0x7F80FFFF, 0x7FBFFFFF, 0x7FC00000, 0x7FC00001,
            0x7FFF8000, 0x7FFFFFFF, 0xFF800001, 0xFF80FFFF, 0xFFC00000, 0xFFFFFFFF]


def test_edge_values_round_to_nearest_even():
    x = _from_bits([b for b, _ in EDGE_BITS])
    assert [hex(b) for b in bf16_bits(x)] == [hex(w) for _, w in EDGE_BITS]
    np.testing.assert_array_equal(round_bf16(x).view(np.uint32),
                                  np.array([w for _, w in EDGE_BITS], np.uint32) << 16)


def test_a_nan_stays_a_nan_with_its_sign():
    x = _from_bits(NAN_BITS)
    b = bf16_bits(x)
    assert np.isnan(bits_to_float(b)).all(), [hex(v) for v in b]
    assert ((b >> 15) == (np.array(NAN_BITS) >> 31)).all()   # the host keeps the sign
    assert (round_bf16(x).view(np.uint32) & 0xFFFF).max() == 0


def boundary_bits():
    """Every bf16 value's upper half with the lower halves that decide its rounding: 0, the
    smallest and largest below the tie, the tie, just above it, the largest (6 x 65,536
    float32 patterns: every exponent, denormals, infinities and NaNs of every payload)."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    return (hi[:, None] | lows[None, :]).reshape(-1).view(np.float32)


@pytest.mark.ci_required("torch")
def test_rounding_is_torchs_bfloat16_cast():
    """Bitwise PyTorch's `.to(torch.bfloat16)` on every rounding boundary and on random bit
    patterns, NaN aside: a NaN stays a NaN, but its bits differ among PyTorch's own paths (its
    vectorised CPU cast gives 0xFFFF, its scalar one 0x7FC0), so only NaN-ness is compared.
    bf16 -> float32 is exact: every one of the 65,536 patterns is torch's widening."""
    torch = pytest.importorskip("torch")
    rnd = np.random.default_rng(0).integers(0, 1 << 32, size=100_000, dtype=np.uint64)
    x = np.concatenate([boundary_bits(), rnd.astype(np.uint32).view(np.float32)])
    ours = bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bits_to_float(ours[nan])).all() and np.isnan(bits_to_float(theirs[nan])).all()
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = torch.from_numpy(every.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bits_to_float(every).view(np.uint32), widened.view(np.uint32))
