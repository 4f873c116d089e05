#!/usr/bin/env python3
"""Per-op microbenchmarks against the machine's limits, one JSON line per op and shape.

Memory-bound ops (softmax_xent, adamw, layernorm forward/backward): achieved bytes/s over the
device's measured copy bandwidth (a large device-to-device copy, counted as read + write).
Attention forward + backward: achieved FLOP/s (causal: half the T x T work counted) next to
torch.nn.functional.scaled_dot_product_attention on the same shapes when PyTorch is present.

Runs on the GPU (CUDA kernels, timed with CUDA events) or, with --device cpu, on the NumPy
references (timed with perf_counter) so the harness itself is exercised anywhere.

    python scripts/bench_kernels.py --device cuda --out docs/results/kernels.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cllm_gpu import ops  # noqa: E402
from cllm_gpu.backend import cuda_available  # noqa: E402


class Timer:
    def __init__(self, xp):
        self.xp = xp

    def __call__(self, fn, reps):
        fn()  # warm-up (compiles kernels, grows the memory pool)
        if self.xp is np:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t0) / reps
        cp = self.xp
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps


def copy_bandwidth(xp, timer, nbytes=1 << 30):
    n = nbytes // 4
    a = xp.ones(n, dtype=np.float32)
    b = xp.empty_like(a)
    t = timer(lambda: xp.copyto(b, a), 10)
    return 2 * a.nbytes / t


def rand(xp, shape, dtype=np.float32, seed=0):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="small shapes (quick check of the harness)")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = ap.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if cuda_available() else "cpu")
    if device == "cuda":
        import cupy as xp
    else:
        xp = np
    timer = Timer(xp)
    reps = args.reps
    bw = copy_bandwidth(xp, timer, (1 << 26) if args.small else (1 << 30))
    lines = []

    def emit(rec):
        rec.update(device=device, date=time.strftime("%Y-%m-%d"))
        print(json.dumps(rec), flush=True)
        lines.append(rec)

    emit({"op": "copy", "bytes_per_s": bw})
    # softmax-cross-entropy: read logits, write dlogits in place (+ targets, losses: negligible)
    N, V = (256, 50257) if args.small else (16 * 1024, 50257)
    logits = rand(xp, (N, V))
    targets = xp.asarray(np.random.default_rng(1).integers(0, V, N).astype(np.int32))
    t = timer(lambda: ops.softmax_xent(logits, targets, 1.0 / N, dlogits=logits), reps)
    emit({"op": "softmax_xent", "shape": [N, V], "ms": t * 1e3,
          "bytes_per_s": 2 * logits.nbytes / t, "of_copy_bw": 2 * logits.nbytes / t / bw})
    # AdamW over a GPT-2-124M-sized arena: read p, g, m, v, mask; write p, m, v
    P = (1 << 20) if args.small else 124_475_904
    p, g, m, v = (rand(xp, (P,), seed=i) for i in range(4))
    v = abs(v)
    mask = xp.ones(P, dtype=np.float32)
    t = timer(lambda: ops.adamw_update(p, g, m, v, mask, 1e-4, 0.9, 0.95, 1e-8, 0.1, 10), reps)
    emit({"op": "adamw", "params": P, "ms": t * 1e3, "bytes_per_s": 8 * p.nbytes / t,
          "of_copy_bw": 8 * p.nbytes / t / bw})
    # LayerNorm at GPT-2 124M activation size
    R, C = (2048, 768) if args.small else (16 * 1024, 768)
    x, w, b, dy = rand(xp, (R, C)), rand(xp, (C,), seed=1), rand(xp, (C,), seed=2), rand(xp, (R, C), seed=3)
    out, mean, rstd = ops.layernorm_forward(x, w, b)
    t = timer(lambda: ops.layernorm_forward(x, w, b, 1e-5, out, mean, rstd), reps)
    emit({"op": "layernorm_forward", "shape": [R, C], "ms": t * 1e3,
          "bytes_per_s": 2 * x.nbytes / t, "of_copy_bw": 2 * x.nbytes / t / bw})
    dw, db, dx = xp.zeros_like(w), xp.zeros_like(b), xp.empty_like(x)
    t = timer(lambda: ops.layernorm_backward(dy, x, w, mean, rstd, dw, db, dx), reps)
    emit({"op": "layernorm_backward", "shape": [R, C], "ms": t * 1e3,
          "bytes_per_s": 3 * x.nbytes / t, "of_copy_bw": 3 * x.nbytes / t / bw})
    # attention forward + backward, causal
    shapes = [(2, 256, 4, 64)] if args.small else [(16, 1024, 12, 64), (8, 2048, 12, 64),
                                                    (4, 4096, 16, 128)]
    for B, T, H, D in shapes:
        qkv = rand(xp, (B, T, 3 * H * D), seed=4)
        dout = rand(xp, (B, T, H * D), seed=5)
        o, lse = ops.attention_forward(qkv, H)
        dqkv = xp.empty_like(qkv)

        def fwd_bwd():
            ops.attention_forward(qkv, H, o, lse)
            ops.attention_backward(dout, qkv, o, lse, H, dqkv)
        t = timer(fwd_bwd, max(3, reps // 4))
        flops = 3.5 * 2 * 2 * B * H * T * T * D / 2  # fwd 2 GEMM-equivalents, bwd 5; causal half
        rec = {"op": "attention_fwd_bwd", "shape": [B, T, H, D], "ms": t * 1e3,
               "flop_per_s": flops / t}
        try:
            import torch
            import torch.nn.functional as F
            tdev = "cuda" if device == "cuda" else "cpu"
            q, k, vv = (torch.randn(B, H, T, D, device=tdev, requires_grad=True) for _ in range(3))
            g = torch.randn(B, H, T, D, device=tdev)

            def sdpa():
                y = F.scaled_dot_product_attention(q, k, vv, is_causal=True)
                y.backward(g)
            sdpa()
            if tdev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = max(3, reps // 4)
            for _ in range(n):
                sdpa()
            if tdev == "cuda":
                torch.cuda.synchronize()
            ts = (time.perf_counter() - t0) / n
            rec.update(sdpa_fp32_ms=ts * 1e3, of_sdpa_fp32=ts / t)
            if tdev == "cuda":
                qb, kb, vb = (a.detach().bfloat16().requires_grad_() for a in (q, k, vv))
                gb = g.bfloat16()

                def sdpa_bf16():
                    F.scaled_dot_product_attention(qb, kb, vb, is_causal=True).backward(gb)
                sdpa_bf16()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    sdpa_bf16()
                torch.cuda.synchronize()
                tb = (time.perf_counter() - t0) / n
                rec.update(sdpa_flash_bf16_ms=tb * 1e3, of_sdpa_flash_bf16=tb / t)
        except ImportError:
            pass
        emit(rec)
    if args.out:
        with open(args.out, "a") as f:
            for rec in lines:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
