#!/usr/bin/env python3
"""Data-parallel training throughput on the CPU: `cllm-gpu train` in one process and under
`mpiexec -n N`, the same model and global batch, tokens/s from each run's metrics.jsonl
(the median of its progress windows after the first). One JSON line per run.

    python scripts/bench_dist.py                        # cpu-small, 1 and 2 ranks
    python scripts/bench_dist.py --ranks 1,2 --steps 40 --out docs/results/dist_cpu.jsonl

Threads (CLLM_CPU_THREADS, and BLAS's): one process gets all the cores (or --threads); each of
N ranks gets cores / N, so the ranks do not oversubscribe the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cllm_gpu.json_text import to_json  # noqa: E402
from cllm_gpu.plot import read_metrics  # noqa: E402

MODELS = {  # the cpu-small configuration of scripts/bench.py
    "cpu-small": ["--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--block-size", "256"],
    "tiny": ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64"],
}


def run(ranks, data, model, global_batch, micro, steps, threads, zero, out_dir):
    K = global_batch // (ranks * micro)
    env = dict(os.environ, PYTHONPATH=str(ROOT), CLLM_CPU_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "cllm_gpu", "train", "--data", str(data), "--out", str(out_dir),
           *MODELS[model], "--batch-size", str(micro), "--grad-accum-steps", str(K),
           "--max-steps", str(steps), "--log-interval", str(max(1, steps // 4)),
           "--eval-interval", "0", "--checkpoint-interval", "0", "--sample-tokens", "0",
           "--backend", "numpy", "--zero", str(zero)]
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        cmd = [str(mpiexec if mpiexec.exists() else shutil.which("mpiexec")), "-n", str(ranks),
               *cmd]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    tps = [r["tokens_per_s"] for r in read_metrics(out_dir)["train"] if r["step"] > 1]
    return {"ranks": ranks, "blas_threads": threads, "zero": zero, "model": model,
            "global_batch": global_batch, "micro_batch": micro, "grad_accum_steps": K,
            "steps": steps, "tokens_per_s": statistics.median(tps), "wall_s": round(wall, 2)}


def build_parser() -> argparse.ArgumentParser:
    """The command line main() parses (the docs' command lines are checked against it:
    tests/test_docs_cite_real_flags.py)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="cpu-small")
    ap.add_argument("--ranks", default="1,2", help="comma-separated world sizes (default %(default)s)")
    ap.add_argument("--global-batch", type=int, default=16, help="sequences per step (default %(default)s)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch (default %(default)s)")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per run (default %(default)s)")
    ap.add_argument("--zero", type=int, choices=[0, 1], default=0, help="ZeRO stage (default %(default)s)")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="cores shared by the ranks (default %(default)s)")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    from cllm_gpu.data import prepare
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip() or None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare("default", tmp / "data", max_bytes=1_000_000)
        for n in (int(x) for x in args.ranks.split(",")):
            rec = run(n, tmp / "data", args.model, args.global_batch, args.micro_batch,
                      args.steps, max(1, args.cores // n), args.zero, tmp / f"run{n}")
            rec.update(commit=commit, machine=f"{platform.machine()}, {os.cpu_count()} cores",
                       load_avg_1min=round(os.getloadavg()[0], 2),
                       date=time.strftime("%Y-%m-%d"))
            line = to_json(rec)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
