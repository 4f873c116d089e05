import math

import numpy as np
import pytest

from cllm_gpu.ops.dropout import (DropoutKey, dropout, fmix32, keep_mask, philox4x32_10,
                                  seed_word, site_id, threshold)

# Random123's published known-answer vectors for Philox4x32-10 (counter, key, output)
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", PHILOX_KAT)
def test_philox_known_answers(ctr, key, want):
    got = philox4x32_10(*[np.array([c], np.uint32) for c in ctr], *key)
    assert tuple(int(w[0]) for w in got) == want


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_keep_rate_within_binomial_bounds(p):
    """Over 10^6 elements the kept count is Binomial(n, 1 - p): within 5 standard deviations."""
    n = 1_000_000
    kept = int(keep_mask(0, n, p, DropoutKey(seed=7, step=3, site=site_id(2, 1))).sum())
    mean, sd = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(kept - mean) <= 5 * sd, (kept, mean, sd)


def test_masks_are_a_function_of_the_key_and_index_only():
    key = DropoutKey(seed=1, step=5, site=3, micro=1)
    whole = keep_mask(0, 1003, 0.3, key)
    # any window of the stream is the same slice of it (start not a multiple of 4 included)
    for start, n in ((0, 1), (1, 6), (5, 400), (997, 6)):
        np.testing.assert_array_equal(keep_mask(start, n, 0.3, key), whole[start:start + n])
    # the step as a float64 slot (the trainer's step buffer) draws the same mask as the int
    slot = DropoutKey(seed=1, step=np.array([5.0]), site=3, micro=1)
    np.testing.assert_array_equal(keep_mask(0, 1003, 0.3, slot), whole)
    # every key field changes the mask
    for other in (DropoutKey(2, 5, 3, 1), DropoutKey(1, 6, 3, 1), DropoutKey(1, 5, 4, 1),
                  DropoutKey(1, 5, 3, 0)):
        assert (keep_mask(0, 1003, 0.3, other) != whole).mean() > 0.2


def test_seeds_past_32_bits_draw_their_own_masks():
    """--seed takes any int >= 0, and the initial weights and batches use all of it; the masks
    took the low 32 bits (the kernels' key & 0xFFFFFFFF: seeds 1 and 2^32 + 1 shared every mask)
    and the NumPy path refused such a seed (OverflowError in np.uint32). Now the higher words
    fold into the key word; a seed below 2^32 keys its masks with itself, as before."""
    for small in (0, 1, 1337, 2**32 - 1):
        assert seed_word(small) == small
    masks = {s: keep_mask(0, 4096, 0.5, DropoutKey(s, 3, 1, 0))
             for s in (1, 2**32 + 1, 2**33 + 1, 2**64 + 1, 2**96 + 2**64 + 1)}
    for a in masks:
        for b in masks:
            if a < b:
                assert (masks[a] != masks[b]).mean() > 0.4, (a, b)
    # the key word is what the mask is drawn with (the kernels take the same word)
    big = 2**40 + 7
    np.testing.assert_array_equal(masks[2**32 + 1],
                                  keep_mask(0, 4096, 0.5, DropoutKey(seed_word(2**32 + 1), 3, 1)))
    assert seed_word(big) != seed_word(7) and 0 <= seed_word(big) < 2**32
    # seeds with the same low word never share a key word below 2^64 (fmix32 is a bijection)
    assert len({seed_word((h << 32) | 5) for h in range(2000)}) == 2000



def test_seed_word_is_murmur3s_finaliser_folded_highest_word_first():
    """The key word of a seed past 2^32 is part of what a run's masks are: pinned to
    MurmurHash3's fmix32 by SMHasher's known answers for the empty key (MurmurHash3_x86_32 of
    no bytes with seed s is fmix32(s)). A mistyped constant or shift changed every such seed's
    masks unseen (an even multiplier also lost the bijection); the tests above compare masks
    with one another only. The words above the low one fold in highest first."""
    assert (fmix32(0), fmix32(1), fmix32(0xFFFFFFFF)) == (0, 0x514E28B7, 0x81F16F39)
    assert seed_word(2**32 + 1) == 1 ^ 0x514E28B7
    assert seed_word(0xFFFFFFFF << 32) == 0x81F16F39
    # two high words, a (bits 64..95) then b (bits 32..63): fmix32(fmix32(a) ^ b)
    a, b, low = 1, 0x514E28B7 ^ 0xFFFFFFFF, 5
    assert seed_word((a << 64) | (b << 32) | low) == low ^ 0x81F16F39

def test_dropout_scales_the_kept_elements_and_is_its_own_backward():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 33)).astype(np.float32)
    key = DropoutKey(seed=3, step=1, site=site_id(0, 0))
    y = dropout(x, 0.25, key)
    keep = keep_mask(0, x.size, 0.25, key).reshape(x.shape)
    np.testing.assert_array_equal(y[~keep], 0)
    np.testing.assert_array_equal(y[keep], x[keep] * np.float32(1 / 0.75))
    # d(sum(y * g)) / dx = g * keep / (1 - p): the same call on the gradient
    g = rng.normal(size=x.shape).astype(np.float32)
    np.testing.assert_array_equal(dropout(g, 0.25, key), np.where(keep, g * np.float32(1 / 0.75), 0))


def test_p_zero_draws_nothing_and_bad_p_raises():
    x = np.arange(6.0)
    assert dropout(x, 0.0, None) is x
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout p"):
            threshold(bad)
    with pytest.raises(TypeError, match="DropoutKey"):
        dropout(x, 0.5, (1, 2, 3))


def test_dropout_bias_backward_masks_casts_and_sums_columns():
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, round_bf16, to_bf16
    from cllm_gpu.ops.dropout import dropout_bias_backward
    rng = np.random.default_rng(4)
    g = rng.normal(size=(37, 24)).astype(np.float32)
    key = DropoutKey(seed=5, step=2, site=site_id(1, 2))
    for p in (0.0, 0.25):
        want = g if p == 0 else dropout(g, p, key)
        dbias = np.ones(24, np.float32)             # accumulates, does not overwrite
        out = np.empty(g.shape, BF16_HOST_DTYPE)
        assert dropout_bias_backward(g, p, key, out, dbias) is out
        np.testing.assert_array_equal(out, round_bf16(want))
        # float32 sums of 37 terms in the BLAS's order: bounded by the terms' magnitudes, not
        # by the sum's (a column that cancels to ~0.05 moved by 6e-7 with another kernel)
        exact = 1 + want.astype(np.float64).sum(axis=0)
        bound = 1e-6 * (1 + np.abs(want).astype(np.float64).sum(axis=0))
        assert np.all(np.abs(dbias - exact) <= bound), np.abs(dbias - exact) / bound
        out32 = np.empty_like(g)
        dropout_bias_backward(g, p, key, out32, np.zeros(24, np.float32))
        np.testing.assert_array_equal(out32, want)
        # out=None: the column sums alone, the same bits; of a bf16 dsum: of its values
        only = np.ones(24, np.float32)
        assert dropout_bias_backward(g, p, key, None, only) is None
        np.testing.assert_array_equal(only, dbias)
        g16, sums16, want16 = to_bf16(g), np.ones(24, np.float32), np.ones(24, np.float32)
        dropout_bias_backward(g16, p, key, None, sums16)
        dropout_bias_backward(g16.view(np.float32), p, key, out32, want16)
        np.testing.assert_array_equal(sums16, want16)
        assert not np.array_equal(sums16, dbias)   # the rounded values' sums
    with pytest.raises(ValueError, match="out: a bf16 dsum takes out=None"):
        dropout_bias_backward(to_bf16(g), 0.0, None, np.empty(g.shape, BF16_HOST_DTYPE),
                              np.zeros(24, np.float32))


def test_keep_mask_follows_the_documented_counter_layout():
    """Element e of a key's stream is word e % 4 of Philox4x32-10 at counter
    (e // 4 low word, e // 4 high word, site, micro) and key (seed, step), kept when >= the
    threshold (the layout the CUDA kernels draw; the other tests compare windows of one
    stream and masks of different keys, which a swap of site and micro kept equal)."""
    key = DropoutKey(seed=11, step=9, site=6, micro=2)
    start, n, p = (1 << 34) + 3, 10, 0.4          # a group index past 32 bits
    groups = np.arange(start // 4, (start + n - 1) // 4 + 1, dtype=np.uint64)
    words = philox4x32_10((groups & np.uint64(0xFFFFFFFF)).astype(np.uint32),
                          (groups >> np.uint64(32)).astype(np.uint32),
                          np.full(groups.size, 6, np.uint32), np.full(groups.size, 2, np.uint32),
                          11, 9)
    stream = np.stack(words, axis=-1).reshape(-1)  # the words of elements 4 * groups[0] on
    want = stream[start % 4:start % 4 + n] >= threshold(p)
    np.testing.assert_array_equal(keep_mask(start, n, p, key), want)


def test_keep_rows_is_keep_mask_per_start_aligned_or_not():
    """keep_rows (the attention reference's many runs at once) gives each run what keep_mask
    gives it, for starts that mix multiples of 4 and others (the attention's rows when T is
    not a multiple of 4; the aligned fast path must not take such a mix)."""
    from cllm_gpu.ops.dropout import keep_rows
    key = DropoutKey(seed=4, step=2, site=1, micro=3)
    starts = np.array([[0, 3, 8], [13, 20, 1001]])
    got = keep_rows(starts, 7, 0.3, key)
    want = np.array([[keep_mask(int(s), 7, 0.3, key) for s in row] for row in starts])
    np.testing.assert_array_equal(got, want)


def test_bias_backward_numpy_path_ignores_scratch():
    """scratch is the CUDA launcher's workspace: on NumPy arrays any value is ignored (the
    same bits, the array untouched)."""
    from cllm_gpu.ops.dropout import dropout_bias_backward
    g = np.random.default_rng(4).normal(size=(9, 5))
    key = DropoutKey(seed=1, step=2, site=site_id(0, 1))
    runs = []
    for scratch in (None, np.full(3, np.nan, np.float32)):
        out, db = np.empty((9, 5)), np.ones(5)
        dropout_bias_backward(g, 0.3, key, out, db, scratch=scratch)
        runs.append((out, db))
        if scratch is not None:
            assert np.isnan(scratch).all()
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("field, value", [("step", -1), ("step", 2**32), ("site", -1),
                                          ("micro", 2**32)])
def test_key_words_outside_uint32_are_refused(field, value):
    """step, site and micro are 32-bit Philox words: outside [0, 2**32) a ValueError naming the
    field (it was NumPy's OverflowError here, and for an int step on the device path a double
    -> unsigned conversion out of range in the kernel: tests/cuda_emulator/
    run_launcher_checks.py)."""
    fields = dict(seed=1, step=2, site=3, micro=0)
    fields[field] = value
    with pytest.raises(ValueError, match=f"key.{field}: expected 0 .. 2\\*\\*32 - 1"):
        dropout(np.ones(8), 0.5, DropoutKey(**fields))
