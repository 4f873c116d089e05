import math

import numpy as np
import pytest

from cllm_gpu.ops.grad_norm import clip_factor, grad_norm


def test_grad_norm_matches_formula():
    norm, bad = grad_norm(np.array([3.0, 4.0, 0.0]))
    assert norm == 5.0 and bad == -1
    r = np.random.default_rng(0).normal(size=10_001).astype(np.float32)
    out = np.zeros(2)
    assert grad_norm(r, out=out) is out
    assert out[0] == pytest.approx(math.sqrt(float((r.astype(np.float64) ** 2).sum())), rel=1e-6)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_grad_norm_names_the_first_nonfinite_element(bad_value):
    g = np.ones(1000, np.float32)
    g[[417, 903]] = bad_value
    norm, bad = grad_norm(g)
    assert not math.isfinite(norm) and bad == 417


@pytest.mark.parametrize("value,n", [(1e20, 5000), (3e38, 1), (2e19, 1)])
def test_grad_norm_of_float32_sums_squares_in_float64(value, n):
    """A huge but finite float32 gradient has a finite norm (the CUDA kernel sums squares in
    float64; float32 squares overflowed to inf from |g| > 1.8e19, so the trainer saw a
    non-finite step naming no parameter; the GPU took a clipped step)."""
    g = np.full(n, value, np.float32)
    norm, bad = grad_norm(g)
    want = math.sqrt(n) * float(np.float32(value))
    assert norm == pytest.approx(want, rel=1e-12) and bad == -1


def _clip(norm, loss, max_norm):
    return float(clip_factor(np.array([norm]), np.array([loss]), max_norm)[0])


def test_clip_factor():
    assert _clip(0.5, 2.0, 1.0) == 1.0
    assert _clip(4.0, 2.0, 1.0) == pytest.approx(1.0 / (4.0 + 1e-6))
    assert _clip(4.0, 2.0, 0.0) == 1.0                 # max_norm 0: clipping off
    assert _clip(1e-6, 2.0, 1e-7) == pytest.approx(0.05, rel=1e-12)   # max_norm / (norm + 1e-6)
    # NaN tells AdamW to skip the step: a non-finite norm or loss, clipping on or off
    for norm, loss in ((math.inf, 2.0), (math.nan, 2.0), (1.0, math.nan), (1.0, math.inf)):
        for max_norm in (1.0, 0.0):
            assert math.isnan(_clip(norm, loss, max_norm))
    with pytest.raises(ValueError, match="norm"):
        clip_factor(np.array([1.0, 2.0]), np.array([1.0]), 1.0)
    with pytest.raises(ValueError, match="loss"):
        clip_factor(np.array([1.0]), np.array([1.0], np.float32), 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_norm_sums_every_chunk(dtype):
    """The NumPy reference sums squares in chunks of GRAD_NORM_CHUNK elements: an arena of two
    whole chunks and a short third one has the norm of all of its elements (the other tests'
    arenas fit in one chunk, so a sum of the first chunk alone passed them)."""
    from cllm_gpu.ops.grad_norm import GRAD_NORM_CHUNK
    g = np.random.default_rng(4).normal(size=2 * GRAD_NORM_CHUNK + 1001).astype(dtype)
    g[-1] = 1e3   # the last chunk weighs: ~0.1% of the sum of squares alone
    sumsq = math.fsum(float(v) ** 2 for v in g.astype(np.float64))
    assert grad_norm(g)[0] == pytest.approx(math.sqrt(sumsq), rel=1e-12)
    assert grad_norm(g, squared=True)[0] == pytest.approx(sumsq, rel=1e-12)
