"""tests/attention_tolerance.assert_equal_up_to_fp32, the GPU bf16 attention tests' comparison:
flips counted per head-row, and the allowance against the flips a GPU's fp32 differences are
modelled to cause (scripts/bf16_flip_model.py) at the GPU tests' widest shape."""
import sys
from pathlib import Path

import numpy as np
import pytest

from attention_tolerance import assert_equal_up_to_fp32

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bf16_flip_model  # noqa: E402


def _flipped(B, T, H, D, heads_per_row, n_rows):
    """want = 0, got off by one flip (> the fp32 tolerance) in `heads_per_row` heads of the
    first n_rows rows."""
    want = np.zeros((B, T, H * D))
    got = want.copy()
    rows = got.reshape(B * T, H, D)
    rows[:n_rows, :heads_per_row, 0] = 1e-3
    return got, want


def test_flip_allowance_counts_head_rows():
    """A flip moves one head's D columns of one row: 40 rows each off in one of 12 heads are 40
    of 1,200 head-rows (allowed 26, rejected), 20 are allowed; 2 rows off in every head are
    24 head-rows, allowed; 3 rows off in every head, 36, rejected."""
    B, T, H, D = 1, 100, 12, 4
    ok = dict(mag=1.0, flip=1e-3, name="x", rel=1e-4, heads=H)
    assert_equal_up_to_fp32(*_flipped(B, T, H, D, 1, 20), **ok)
    assert_equal_up_to_fp32(*_flipped(B, T, H, D, H, 2), **ok)
    for heads_per_row, n_rows in ((1, 40), (H, 3)):
        with pytest.raises(AssertionError, match="head-rows beyond fp32 rounding"):
            assert_equal_up_to_fp32(*_flipped(B, T, H, D, heads_per_row, n_rows), **ok)
    with pytest.raises(AssertionError, match="bf16 flips"):   # 3 flips' worth in one element
        assert_equal_up_to_fp32(*_flipped(B, T, H, D, 1, 1), mag=1.0, flip=3e-4, name="x",
                                rel=1e-4, heads=H)


def test_modelled_gpu_flips_fit_the_head_row_allowance():
    """tests/gpu's B, T, H, D = 5, 130, 12, 64 (test_attention_bf16_mma_many_heads_and_batches)
    with the kernel - NumPy differences modelled at s_err = 2 (u x the terms' magnitudes; a
    GPU: ~0.7-1, up to ~2-3 with truncating tensor-core sums) and exp 1.3 ulp rms: dv's flips
    exceed 2 + 2% of the 650 rows (what the check counted before: it failed), and fit 2 + 2%
    of the 7,800 head-rows with room (under 0.3 of it)."""
    rows = bf16_flip_model.run_case(5, 130, 12, 64, "none", False, [2.0], 1.3, 1)
    worst, worst_h, beyond = rows[2.0]
    assert not beyond
    assert worst["dv"] > 2 + 0.02 * 5 * 130
    assert max(worst_h.values()) <= 0.3 * (2 + 0.02 * 5 * 130 * 12)
