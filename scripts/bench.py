#!/usr/bin/env python3
"""Training throughput of cllm-gpu next to an equivalent PyTorch GPT-2, in the same process.

One JSON line per configuration: tokens/s, ms/step, MFU (on a GPU, against the peak named in
the line), peak memory, and the same figures for PyTorch (SDPA attention, AdamW; eager and,
with --torch-compile, torch.compile) with the ratios. Both sides train on the same batches with
the same optimizer settings; the ratio is the number that matters.

    python scripts/bench.py                       # CPU: tiny and cpu-small
    python scripts/bench.py --device cuda         # GPU: tiny, shakespeare-char, gpt2-124m
    python scripts/bench.py --configs cpu-small --steps 20 --out docs/results/bench.jsonl
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cllm_gpu import CLLMModel, ModelConfig, TrainConfig  # noqa: E402
from cllm_gpu.backend import cuda_available  # noqa: E402
from cllm_gpu.trainer import training_step  # noqa: E402

CONFIGS = {
    # name: (ModelConfig kwargs, batch size)
    "tiny": (dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64), 8),
    "cpu-small": (dict(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=256), 8),
    "shakespeare-char": (dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 64),
    "gpt2-124m": (dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 16),
}
# Dense peaks (no sparsity) from NVIDIA's data sheets, by GPU name substring.
PEAK_TFLOPS = {"H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
               "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
               "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}}


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        return None


def make_batches(cfg, B, n, seed=0):
    rng = np.random.default_rng(seed)
    T = cfg.block_size
    out = []
    for _ in range(n):
        a = rng.integers(0, cfg.vocab_size, size=(B, T + 1))
        out.append((a[:, :-1], a[:, 1:]))
    return out


def sync(device):
    if device == "cuda":
        import cupy
        cupy.cuda.Device().synchronize()


def bench_ours(cfg, B, batches, warmup, device):
    backend = "cuda" if device == "cuda" else "numpy"
    model = CLLMModel(cfg, backend=backend, dtype="float32", seed=0)
    tc = TrainConfig(batch_size=B, learning_rate=1e-4, min_lr=1e-5)
    pool = None
    if device == "cuda":
        import cupy
        pool = cupy.get_default_memory_pool()
    losses = []
    for i, (x, y) in enumerate(batches[:warmup]):
        losses.append(training_step(model, [(x, y)], tc, 1e-4, i + 1)[0])
    sync(device)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches[warmup:]):
        losses.append(training_step(model, [(x, y)], tc, 1e-4, warmup + i + 1)[0])
    sync(device)
    dt = time.perf_counter() - t0
    steps = len(batches) - warmup
    res = {"tokens_per_s": steps * B * cfg.block_size / dt, "ms_per_step": 1000 * dt / steps,
           "final_loss": losses[-1]}
    if pool is not None:
        res["peak_mem_bytes"] = int(pool.total_bytes())
    else:
        c = model._caches[(B, cfg.block_size)]
        res["state_bytes"] = int(4 * model.params.data.nbytes + sum(
            a.nbytes for v in vars(c).values() for a in (v if isinstance(v, list) else [v])
            if hasattr(a, "nbytes")))
    return res


def bench_torch(cfg, B, batches, warmup, device, compile_):
    import torch
    from cllm_gpu.torch_ref import build_torch_gpt
    ref = CLLMModel(cfg, backend="numpy", dtype="float32", seed=0)
    model = build_torch_gpt(cfg, ref.state_dict(), device=device)
    opt = model.optimizer(1e-4, 0.1, (0.9, 0.95), 1e-8, fused=True if device == "cuda" else None)
    fwd = torch.compile(model) if compile_ else model
    dev_batches = [(torch.as_tensor(x, device=device), torch.as_tensor(y, device=device))
                   for x, y in batches]

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for x, y in dev_batches[:warmup]:
        step(x, y)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x, y in dev_batches[warmup:]:
        loss = step(x, y)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    steps = len(batches) - warmup
    res = {"tokens_per_s": steps * B * cfg.block_size / dt, "ms_per_step": 1000 * dt / steps,
           "final_loss": float(loss.item())}
    if device == "cuda":
        res["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated())
    return res


def device_info(device):
    if device == "cuda":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return name
    return f"{platform.processor() or platform.machine()} CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--configs", default=None, help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=0, help="override the config's batch size")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = ap.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    names = args.configs.split(",") if args.configs else (
        ["tiny", "shakespeare-char", "gpt2-124m"] if device == "cuda" else ["tiny", "cpu-small"])
    try:
        import torch
        have_torch = not args.no_torch
        if device == "cpu":
            torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    except ImportError:
        have_torch = False
    dev_name = device_info(device)
    for name in names:
        if name not in CONFIGS:
            ap.error(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
        kw, B = CONFIGS[name]
        B = args.batch_size or B
        cfg = ModelConfig(**kw)
        batches = make_batches(cfg, B, args.warmup + args.steps)
        line = {"config": name, "device": dev_name, "commit": git_commit(),
                "date": time.strftime("%Y-%m-%d"), "batch_size": B, "seq_len": cfg.block_size,
                "params": cfg.num_params(), "dtype": "float32",
                "flops_per_token": cfg.flops_per_token(cfg.block_size)}
        line["cllm"] = bench_ours(cfg, B, batches, args.warmup, device)
        if device == "cuda":
            peaks = next((v for k, v in PEAK_TFLOPS.items() if k in dev_name), None)
            if peaks:
                line["mfu_peak"] = f"fp32 non-tensor-core {peaks['fp32']} TFLOP/s"
                line["cllm"]["mfu"] = line["flops_per_token"] * line["cllm"]["tokens_per_s"] / (
                    peaks["fp32"] * 1e12)
        if have_torch:
            import torch
            line["torch_version"] = torch.__version__
            line["torch_eager"] = bench_torch(cfg, B, batches, args.warmup, device, False)
            line["ratio_vs_torch_eager"] = (line["cllm"]["tokens_per_s"]
                                            / line["torch_eager"]["tokens_per_s"])
            if args.torch_compile:
                try:
                    line["torch_compile"] = bench_torch(cfg, B, batches, args.warmup, device, True)
                    line["ratio_vs_torch_compile"] = (line["cllm"]["tokens_per_s"]
                                                      / line["torch_compile"]["tokens_per_s"])
                except Exception as e:  # torch.compile needs a C compiler / Triton
                    line["torch_compile"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        text = json.dumps(line)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
