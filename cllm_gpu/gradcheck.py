"""Finite-difference gradient check of the whole model (float64, central differences)."""
from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig
from .data import check_batch_fits
from .model import CLLMModel, DropoutContext, check_eval_fits


# |a| + |n| below which the error is measured against this floor: at 1e-8 a correct gradient
# of 3e-8 (a 16-layer model's) failed the 1e-6 tolerance on the differences' 2e-13 round-off
REL_FLOOR = 1e-5
# An element whose error at the step h is above this is measured again at h / the divisor,
# and the smaller error counts (see gradcheck_model)
RETRY_ABOVE = 1e-8
RETRY_STEP_DIVISOR = 10


def gradcheck_model(cfg: ModelConfig | None = None, batch: int = 2, seq_len: int | None = None,
                    samples_per_param: int = 3, h: float = 1e-3, seed: int = 0,
                    ignore_fraction: float = 0.1):
    """Compare analytic gradients with fourth-order central differences for `samples_per_param` random
    elements of every parameter tensor. Returns a list of
    (name, index, analytic, numeric, relative error) and the worst relative error.

    relative error = |a - n| / max(|a| + |n|, REL_FLOOR): symmetric; below the floor the
    error counts against the floor, as the differences themselves are only accurate to
    ~1e-12 absolute (float64 round-off eps |loss| / h at h = 1e-3, plus O(h^4)). An element
    off by more than RETRY_ABOVE at h is measured again at h / RETRY_STEP_DIVISOR, and the
    smaller error is its error (the O(h^4) term of a model a few channels wide).
    With cfg.dropout > 0 every loss goes through the same training-mode dropout masks (a fixed
    key), so the function differentiated is the one a training step differentiates."""
    cfg = cfg or ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    T = seq_len or cfg.block_size
    # int64 idx and targets, then beside them a float64 mask or the model's int32 copies
    check_batch_fits(batch, T, row_bytes=3 * T * 8)
    rng = np.random.default_rng(seed)
    # no Adam moments: nothing here reads them (they were 2/5 of the memory the check asked)
    model = CLLMModel(cfg, backend="numpy", dtype="float64", seed=seed, adam_moments=False)
    # Perturb LayerNorm gains and biases off their (1, 0) init so their gradients are generic.
    sd = model.state_dict()
    for k, v in sd.items():
        sd[k] = v + rng.normal(0, 0.1, v.shape) if v.ndim == 1 else v * 5
    model.load_state_dict(sd)
    del sd  # a copy of the weights, not held through the losses
    # the activation cache of the one (batch, T) shape every loss below runs at, against the
    # memory beside the model: NumPy takes it lazily, and `gradcheck --batch-size 1000000`
    # (25 GB at the default 8 tokens) was allocated on a 23 GB machine and filled until the
    # out-of-memory killer came
    check_eval_fits(cfg, model.dtype, "fp32", np, batch, T, None, length_flag="--block-size")
    idx = rng.integers(0, cfg.vocab_size, size=(batch, T))
    targets = rng.integers(0, cfg.vocab_size, size=(batch, T))
    targets[rng.random((batch, T)) < ignore_fraction] = -1
    if (targets >= 0).sum() == 0:
        targets[0, 0] = 0
    drop = DropoutContext(seed=seed, step=1) if cfg.dropout > 0 else None
    _, grads = model.loss_and_grads(idx, targets, dropout=drop)
    rows, worst = [], 0.0
    for spec in model.specs:
        view = model.params[spec.name]
        flat = view.reshape(-1)
        picks = rng.choice(flat.size, size=min(samples_per_param, flat.size), replace=False)
        for i in picks:
            i = int(i)
            ana = float(grads[spec.name].reshape(-1)[i])
            num = _central_difference(model, idx, targets, drop, flat, i, h)
            rel = _relative_error(ana, num)
            if rel > RETRY_ABOVE:
                # with 2 to 4 channels (n_embd) the loss curves so fast that the O(h^4)
                # truncation at h reached 5e-4 of a correct gradient (`gradcheck --n-embd 2`
                # failed for every seed). A correct gradient converges as h shrinks; a wrong
                # one stays off at both steps.
                num_small = _central_difference(model, idx, targets, drop, flat, i,
                                                h / RETRY_STEP_DIVISOR)
                rel_small = _relative_error(ana, num_small)
                if rel_small < rel:
                    num, rel = num_small, rel_small
            rows.append((spec.name, i, ana, float(num), float(rel)))
            worst = max(worst, rel)
    return rows, worst


def _central_difference(model, idx, targets, dropout, flat, i: int, h: float) -> float:
    """d loss / d flat[i] by the fourth-order central difference at step h: truncation
    O(h^4), so h can stay large enough that float64 round-off in the loss (~1e-16 / h) does
    not swamp small gradients. flat[i] is restored."""
    old = flat[i]
    f = {}
    for k in (-2, -1, 1, 2):
        flat[i] = old + k * h
        f[k] = _loss(model, idx, targets, dropout)
    flat[i] = old
    return (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h)


def _relative_error(ana: float, num: float) -> float:
    """inf where either is not finite: a NaN error compared below every tolerance and was
    dropped by max(), so a NaN gradient passed (`gradcheck` said PASS, max rel err 0)."""
    if not (math.isfinite(ana) and math.isfinite(num)):
        return math.inf
    return abs(ana - num) / max(abs(ana) + abs(num), REL_FLOOR)


def _loss(model, idx, targets, dropout):
    s, n = model.eval_loss_sum(idx, targets, dropout=dropout)
    return float(s) / n
