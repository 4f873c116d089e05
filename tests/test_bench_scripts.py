"""The benchmark scripts' measuring code, on the CPU: that each side of a comparison is timed
doing the same work (scripts/bench.py, scripts/bench_kernels.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

torch = pytest.importorskip("torch")


def test_sdpa_times_does_not_accumulate_gradients():
    """PyTorch's forward + backward is timed returning its gradients, as ours writes dqkv: with
    `.backward()` every call after the first adds its gradients into q.grad, k.grad and v.grad
    (three elementwise passes timed on PyTorch's side only)."""
    from torch.profiler import ProfilerActivity, profile

    import bench_kernels
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = bench_kernels.sdpa_times("cpu", 1, 32, 2, 16, 3)
    assert "sdpa_fp32" in out and out["sdpa_fp32"] > 0, out
    ops = {e.name for e in prof.events()}
    assert "aten::scaled_dot_product_attention" in ops
    assert "aten::add_" not in ops, "gradients accumulated between timed calls"
