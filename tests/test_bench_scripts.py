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


def test_torch_runner_uploads_batches_without_a_sync(monkeypatch):
    """On CUDA, PyTorch's batch goes to the device from pinned memory by a non-blocking copy,
    as ours does (model.HostStaging): a copy from pageable memory waits for the GPU to finish
    the previous step, a sync per step charged to PyTorch's side only. Run on the CPU with the
    runner told it is on CUDA and the device copy recorded instead of made."""
    import numpy as np

    import bench
    from cllm_gpu import ModelConfig
    kw, B = bench.CONFIGS["micro"]
    cfg = ModelConfig(**kw)
    runner = bench.TorchRunner(cfg, B, "cpu", False, "fp32")
    runner.device = "cuda"
    pinned, copies = [], []

    def pin_memory(self):
        pinned.append(self)
        return self

    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args[:1] == ("cuda",) or kwargs.get("device") == "cuda":
            copies.append((any(self is p for p in pinned), kwargs.get("non_blocking", False)))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch, "as_tensor", lambda a, device=None, **kw: (
        copies.append((False, False)) or torch.from_numpy(np.asarray(a))))
    x, y = bench.make_batches(cfg, B, 1)[0]
    runner.step(x, y)
    assert copies == [(True, True), (True, True)], copies
    assert np.isfinite(float(runner.loss.detach()))
