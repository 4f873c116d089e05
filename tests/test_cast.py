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
