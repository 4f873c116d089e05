#!/usr/bin/env python3
"""Train the same configuration with cllm-gpu and with an equivalent PyTorch model, side by side,
and compare the validation curves (issue 14: nanoGPT's shakespeare-char result, scaled down for
a CPU). Both start from the same weights, see the same batches in the same order and follow the
same schedule; only the kernels, the summation orders and the dropout masks differ
(cllm_gpu.torch_ref.train_torch says exactly what is shared).

    python scripts/compare_torch.py --data data/shakespeare            # the preset, scaled down
    python scripts/compare_torch.py --data DIR --n-layer 6 --n-embd 384 --steps 5000  # full

Writes OUT/compare.jsonl (one record per run: its validation curve and final loss), with
--plot a PNG of both curves, and prints one line: final validation losses and ours - torch.
Needs PyTorch (`pip install torch`, the CPU wheel will do; no cllm-gpu extra brings it)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cllm_gpu import GpuTrainer, ModelConfig, TrainConfig  # noqa: E402
from cllm_gpu.cli import PRESETS  # noqa: E402
from cllm_gpu.data import TokenDataset  # noqa: E402
from cllm_gpu.json_text import to_json  # noqa: E402
from cllm_gpu.plot import read_metrics  # noqa: E402
from cllm_gpu.trainer import EXIT_INTERRUPTED  # noqa: E402

# The preset scaled down for 2 CPU cores (about 10 minutes per model): nanoGPT's own CPU
# suggestion for this data (4 layers, 4 heads, 128 embd, block 64), with the preset's dropout,
# optimizer and schedule shape.
SCALED = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, steps=1000,
              eval_interval=100, eval_batches=20, warmup_steps=50)


def configs(args, vocab_size: int):
    model, train, _ = PRESETS["shakespeare-char"]
    mc = ModelConfig(vocab_size=vocab_size, **dict(model, n_layer=args.n_layer,
                                                     n_head=args.n_head, n_embd=args.n_embd,
                                                     block_size=args.block_size,
                                                     dropout=args.dropout))
    tc = TrainConfig(**dict(train, batch_size=args.batch_size, max_steps=args.steps,
                            lr_decay_steps=args.steps, eval_interval=args.eval_interval,
                            eval_batches=args.eval_batches, warmup_steps=args.warmup_steps,
                            log_interval=max(1, args.steps // 10), checkpoint_interval=0,
                            keep_checkpoints=1, final_checkpoint=False, seed=args.seed))
    return mc, tc


def run_ours(mc, tc, data, out: Path, log) -> dict:
    t0 = time.perf_counter()
    trainer = GpuTrainer(mc, tc, data, out, backend="numpy", overwrite=True, log=log)
    summary = trainer.train()
    if summary["status"] == "interrupted":
        # the trainer took the SIGINT / SIGTERM to save and return: stop here, as `cllm-gpu
        # train` does, rather than run PyTorch's half and record a cut-short curve against it
        log(f"stopped at step {summary['step']}: no comparison written")
        raise SystemExit(EXIT_INTERRUPTED.get(summary["signal"], 130))
    # read as `plot` reads it: a val loss written as null (not finite) is NaN, so that the
    # summary line and the plot's label format it
    val = [(r["step"], r["val_loss"]) for r in read_metrics(out)["eval"]]
    return {"val": val, "seconds": time.perf_counter() - t0}


def compare(args, log=print) -> list[dict]:
    from cllm_gpu.torch_ref import train_torch
    mc, tc = configs(args, TokenDataset(args.data).vocab_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {"cllm-gpu": run_ours(mc, tc, args.data, out / "ours",
                                 lambda m: log(f"[cllm-gpu] {m}")),
            "torch": train_torch(mc, tc, args.data, log=log)}
    recs = []
    for name, r in runs.items():
        recs.append({"impl": name, "model_config": mc.to_dict(), "steps": tc.max_steps,
                     "batch_size": tc.batch_size, "data": str(args.data), "val": r["val"],
                     "final_val_loss": r["val"][-1][1], "seconds": round(r["seconds"], 1)})
    with open(out / "compare.jsonl", "a") as f:
        for rec in recs:
            f.write(to_json(rec) + "\n")
    return recs


def plot(recs, path):
    """Both validation curves in one PNG (needs matplotlib: the `plot` extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in recs:
        steps, losses = zip(*r["val"])
        ax.plot(steps, losses, marker="o", ms=3,
                label=f"{r['impl']} (final {r['final_val_loss']:.4f})")
    mc = recs[0]["model_config"]
    ax.set(xlabel="step", ylabel="validation loss (nats per token)",
           title=f"{mc['n_layer']} layers, {mc['n_head']} heads, {mc['n_embd']} embd, block "
                 f"{mc['block_size']}, batch {recs[0]['batch_size']}, dropout {mc['dropout']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def require_torch():
    """PyTorch's half runs second: without torch the script trained ours (about 10 minutes at
    the default size) and then died on `import torch`. Checked before anything is trained."""
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("error: compare_torch.py needs PyTorch for its second run (pip install "
                         "torch; the CPU wheel will do): nothing was trained")


def build_parser() -> argparse.ArgumentParser:
    """The command line main() parses (the docs' command lines are checked against it:
    tests/test_docs_cite_real_flags.py)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="token directory from `cllm-gpu prepare`")
    ap.add_argument("--out", default="runs/compare_torch", help="(default %(default)s)")
    for k, v in SCALED.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v,
                        help="(default %(default)s)")
    ap.add_argument("--dropout", type=float, default=PRESETS["shakespeare-char"][0]["dropout"],
                    help="(default %(default)s: the preset's)")
    ap.add_argument("--seed", type=int, default=1337, help="(default %(default)s)")
    ap.add_argument("--plot", default=None, metavar="PNG",
                    help="also draw both validation curves into PNG (needs matplotlib)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    require_torch()
    recs = compare(args)
    if args.plot:
        plot(recs, args.plot)
    ours, torch_ = (r["final_val_loss"] for r in recs)
    print(f"final val loss: cllm-gpu {ours:.4f}, torch {torch_:.4f}, "
          f"cllm-gpu - torch {ours - torch_:+.4f}")


if __name__ == "__main__":
    main()
