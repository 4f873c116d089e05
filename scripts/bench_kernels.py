#!/usr/bin/env python3
"""Per-op microbenchmarks against the machine's limits, one JSON line per op and shape.

Memory-bound ops (softmax_xent, adamw, layernorm forward/backward): achieved bytes/s over the
device's measured copy bandwidth (a large device-to-device copy, counted as read + write).
Attention forward + backward: achieved FLOP/s (causal: half the T x T work counted), for the
fp32 kernels ("attention_fwd_bwd") and the bf16 tensor-core kernels (precision="bf16",
"attention_fwd_bwd_bf16"), next to torch.nn.functional.scaled_dot_product_attention on the same
shapes when PyTorch is present (fp32, and flash bf16 on a GPU). The same with the lattice
distance bias ("..._lattice", slopes 1/p_h), with `bias_cost` = its time over the plain
kernels' minus 1 (docs/attention_bias.md).

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


def sdpa_times(device, B, T, H, D, n):
    """Seconds per causal forward + backward of torch's scaled_dot_product_attention on the
    same shape: {"sdpa_fp32": t} and on a GPU also {"sdpa_flash_bf16": t}; {} without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    tdev = "cuda" if device == "cuda" else "cpu"
    q, k, vv = (torch.randn(B, H, T, D, device=tdev, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, T, D, device=tdev)

    def timed(fn):
        fn()
        if tdev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if tdev == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    out = {"sdpa_fp32": timed(lambda: F.scaled_dot_product_attention(
        q, k, vv, is_causal=True).backward(g))}
    if tdev == "cuda":
        qb, kb, vb = (a.detach().bfloat16().requires_grad_() for a in (q, k, vv))
        gb = g.bfloat16()
        out["sdpa_flash_bf16"] = timed(lambda: F.scaled_dot_product_attention(
            qb, kb, vb, is_causal=True).backward(gb))
    return out


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
    # GEMMs at GPT-2 124M's linear-layer shapes (M tokens x K in -> N out): ops.gemm in fp32
    # and bf16 (cuBLAS GemmEx; bf16 on tensor cores), next to torch.matmul in bf16
    M = 2048 if args.small else 16 * 1024
    for K, Nout in ((768, 2304), (768, 3072), (3072, 768)):
        a32, b32 = rand(xp, (M, K), seed=6), rand(xp, (K, Nout), seed=7)
        a16, b16 = ops.to_bf16(a32), ops.to_bf16(b32)
        c = xp.empty((M, Nout), dtype=np.float32)
        flops = 2.0 * M * K * Nout
        t32 = timer(lambda: ops.gemm(a32, b32, c), reps)
        t16 = timer(lambda: ops.gemm(a16, b16, c), reps)
        rec = {"op": "gemm", "shape": [M, K, Nout], "fp32_ms": t32 * 1e3,
               "fp32_flop_per_s": flops / t32, "bf16_ms": t16 * 1e3,
               "bf16_flop_per_s": flops / t16}
        if device == "cuda":
            try:
                import torch
                ta, tb = (torch.randn(*s, device="cuda", dtype=torch.bfloat16)
                          for s in ((M, K), (K, Nout)))
                torch.matmul(ta, tb)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(reps):
                    torch.matmul(ta, tb)
                torch.cuda.synchronize()
                tt = (time.perf_counter() - t0) / reps
                rec.update(torch_bf16_ms=tt * 1e3, of_torch_bf16=tt / t16)
            except ImportError:
                pass
        emit(rec)
    # attention forward + backward, causal
    shapes = [(2, 256, 4, 64)] if args.small else [(16, 1024, 12, 64), (8, 2048, 12, 64),
                                                    (4, 4096, 16, 128)]
    for B, T, H, D in shapes:
        qkv = rand(xp, (B, T, 3 * H * D), seed=4)
        dout = rand(xp, (B, T, H * D), seed=5)
        flops = 3.5 * 2 * 2 * B * H * T * T * D / 2  # fwd 2 GEMM-equivalents, bwd 5; causal half
        n = max(3, reps // 4)
        sdpa = sdpa_times(device, B, T, H, D, n)
        lattice = xp.asarray(ops.attention_slopes("lattice", H), dtype=qkv.dtype)
        for op, precision in (("attention_fwd_bwd", "fp32"), ("attention_fwd_bwd_bf16", "bf16")):
            plain_t = None
            for slopes in (None, lattice):
                o, lse = ops.attention_forward(qkv, H, precision=precision, slopes=slopes)
                dqkv = xp.empty_like(qkv)

                def fwd_bwd():
                    ops.attention_forward(qkv, H, o, lse, precision=precision, slopes=slopes)
                    ops.attention_backward(dout, qkv, o, lse, H, dqkv, precision=precision,
                                           slopes=slopes)
                t = timer(fwd_bwd, n)
                rec = {"op": op if slopes is None else op + "_lattice", "shape": [B, T, H, D],
                       "ms": t * 1e3, "flop_per_s": flops / t}
                if slopes is None:
                    plain_t = t
                else:
                    rec["bias_cost"] = t / plain_t - 1
                for k, ts in sdpa.items():
                    rec.update({f"{k}_ms": ts * 1e3, f"of_{k}": ts / t})
                emit(rec)
    if args.out:
        with open(args.out, "a") as f:
            for rec in lines:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
