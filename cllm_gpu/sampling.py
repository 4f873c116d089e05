"""Autoregressive sampling with temperature and top-k."""
from __future__ import annotations

import numpy as np

from .errors import ConfigError


def sample_tokens(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, rng: np.random.Generator | None = None) -> list[int]:
    """Extend `prompt_ids` (a list of ints, at least one) by max_new_tokens tokens.
    temperature 0 means greedy decoding."""
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    rng = rng or np.random.default_rng()
    ids = [int(i) for i in prompt_ids] or [0]
    V, bs = model.cfg.vocab_size, model.cfg.block_size
    for _ in range(max_new_tokens):
        ctx = np.asarray(ids[-bs:], dtype=np.int64)[None, :]
        logits = model.last_logits(ctx)[0].astype(np.float64)
        if temperature == 0:
            ids.append(int(np.argmax(logits)))
            continue
        logits = logits / temperature
        if top_k is not None and top_k < V:
            kth = np.partition(logits, -top_k)[-top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        ids.append(int(rng.choice(V, p=p)))
    return ids
