import math

import numpy as np
import pytest

from cllm_gpu.ops.grad_norm import clip_factor, grad_norm


def test_grad_norm_matches_formula():
    g = np.array([3.0, 4.0, 0.0])
    assert grad_norm(g) == 5.0
    r = np.random.default_rng(0).normal(size=10_001).astype(np.float32)
    assert grad_norm(r) == pytest.approx(math.sqrt(float((r.astype(np.float64) ** 2).sum())),
                                         rel=1e-6)


def test_clip_factor():
    assert clip_factor(0.5, 1.0) == 1.0
    assert clip_factor(4.0, 1.0) == pytest.approx(1.0 / (4.0 + 1e-6))
    assert math.isnan(clip_factor(float("inf"), 1.0))  # NaN tells AdamW to skip the step
    with pytest.raises(ValueError, match="max_norm"):
        clip_factor(1.0, 0.0)
