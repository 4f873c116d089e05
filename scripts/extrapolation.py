#!/usr/bin/env python3
"""Length extrapolation of the attention biases: train the same small model with learned
positions, with ALiBi and with lattice slopes (no position embedding: pos_emb "none"), on the
same data, batches and steps; then the validation loss at the training length T and, for the
models without learned positions, at 2T and 4T (docs/attention_bias.md).

    python scripts/extrapolation.py                              # embedded corpus, CPU
    python scripts/extrapolation.py --data DIR --steps 1500 --out runs/extrapolation

One JSON line per configuration: the final training loss and, on N fixed validation windows of
4T + 1 tokens, the mean loss over the first T, 2T and 4T positions of each window, and per
position bucket ([0, T), [T, 2T), [2T, 4T)). A causal model's logits at position p depend only
on tokens 0..p, so the mean over the first L positions of a 4T forward is exactly the loss of
length-L sequences that start at the same tokens: one forward per window gives all three.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cllm_gpu import CLLMModel, GpuTrainer, ModelConfig, TrainConfig  # noqa: E402
from cllm_gpu.data import TokenDataset, prepare  # noqa: E402
from cllm_gpu.json_text import to_json  # noqa: E402

VARIANTS = {  # name: (attn_bias, pos_emb)
    "learned": ("none", "learned"),
    "alibi": ("alibi", "none"),
    "lattice": ("lattice", "none"),
    "nope": ("none", "none"),  # neither: positions only from the causal mask (a control)
}


def window_losses(model: CLLMModel, val: np.ndarray, starts, L: int, batch: int) -> np.ndarray:
    """(len(starts), L) per-position cross-entropy of windows val[s:s + L + 1]."""
    rows = []
    for b0 in range(0, len(starts), batch):
        buf = np.stack([np.asarray(val[s:s + L + 1]) for s in starts[b0:b0 + batch]])
        idx, tgt = buf[:, :-1].astype(np.int64), buf[:, 1:]
        logits = model.logits(idx).astype(np.float64)
        m = logits.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
        rows.append(lse - np.take_along_axis(logits, tgt[..., None], -1)[..., 0])
    return np.concatenate(rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line main() parses (the docs' command lines are checked against it:
    tests/test_docs_cite_real_flags.py)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="token directory (default: the embedded corpus, "
                    "prepared into OUT/data)")
    ap.add_argument("--out", default="runs/extrapolation", help="run directories (default %(default)s)")
    ap.add_argument("--variants", default="learned,alibi,lattice,nope",
                    help=f"comma-separated, of {', '.join(VARIANTS)} (default %(default)s)")
    ap.add_argument("--n-layer", type=int, default=4, help="(default %(default)s)")
    ap.add_argument("--n-head", type=int, default=4, help="(default %(default)s)")
    ap.add_argument("--n-embd", type=int, default=128, help="(default %(default)s)")
    ap.add_argument("--block-size", type=int, default=128, help="training length T (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16, help="(default %(default)s)")
    ap.add_argument("--steps", type=int, default=600, help="(default %(default)s)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default %(default)s)")
    ap.add_argument("--windows", type=int, default=128, help="validation windows of 4T + 1 tokens "
                    "(default %(default)s)")
    ap.add_argument("--backend", choices=["auto", "cuda", "numpy"], default="auto")
    ap.add_argument("--seed", type=int, default=1337)
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)

    out = Path(args.out)
    data_dir = Path(args.data) if args.data else out / "data"
    if not args.data and not (data_dir / "meta.json").exists():
        prepare("default", data_dir)
    ds = TokenDataset(data_dir)
    T = args.block_size
    val = ds.splits["val"]
    if val.size < 4 * T + 2:
        sys.exit(f"error: {data_dir}: the val split ({val.size} tokens) is shorter than 4T + 1")
    starts = np.random.default_rng(args.seed + 7).integers(0, val.size - 4 * T - 1,
                                                           size=args.windows)
    tc = TrainConfig(batch_size=args.batch_size, max_steps=args.steps, learning_rate=args.lr,
                     min_lr=args.lr / 10, warmup_steps=min(50, args.steps // 10),
                     eval_interval=0, log_interval=max(1, args.steps // 6),
                     checkpoint_interval=0, keep_checkpoints=1, seed=args.seed)
    for name in args.variants.split(","):
        attn_bias, pos_emb = VARIANTS[name]
        cfg = ModelConfig(vocab_size=ds.vocab_size, block_size=T, n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd, attn_bias=attn_bias,
                          pos_emb=pos_emb)
        t0 = time.time()
        trainer = GpuTrainer(cfg, tc, data_dir, out / name, backend=args.backend, overwrite=True,
                             log=lambda msg, n=name: print(f"[{n}] {msg}", file=sys.stderr,
                                                           flush=True))
        summary = trainer.train()
        L = T if pos_emb == "learned" else 4 * T
        per_pos = window_losses(trainer.model, val, starts, L, args.batch_size).mean(0)
        rec = {"variant": name, "attn_bias": attn_bias, "pos_emb": pos_emb, "T": T,
               "steps": args.steps, "params": cfg.num_params(),
               "train_loss_last20": float(np.mean(summary["losses"][-20:])),
               "val_loss": {f"{k}T": float(per_pos[:k * T].mean()) for k in (1, 2, 4)
                            if k * T <= L},
               "val_loss_positions": {f"[{a}T,{b}T)": float(per_pos[a * T:b * T].mean())
                                      for a, b in ((0, 1), (1, 2), (2, 4)) if b * T <= L},
               "windows": args.windows, "backend": trainer.backend, "data": str(data_dir),
               "seconds": round(time.time() - t0, 1)}
        print(to_json(rec), flush=True)


if __name__ == "__main__":
    main()
