"""Autoregressive sampling with temperature and top-k."""
from __future__ import annotations

import numbers

import numpy as np

from .errors import CLLMError, ConfigError


def check_sampling(temperature: float, top_k: int | None, prompt: str | None = None):
    """Refuse settings that cannot sample (before any work: a run checks them before training)."""
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real):
        raise ConfigError(f"temperature must be a number >= 0, got {temperature!r}",
                          ["temperature"])
    if not temperature >= 0:  # NaN too
        raise ConfigError(f"temperature must be >= 0, got {temperature}", ["temperature"])
    if temperature == float("inf"):
        # (l - max) / inf is 0 for every id: top-k keeps all of them (ties), and -inf / inf is
        # NaN for the ids never drawn (a tokenizer's gaps); state.json cannot record it either
        raise ConfigError(f"temperature must be finite, got {temperature}", ["temperature"])
    if top_k is not None and (isinstance(top_k, (bool, np.bool_))
                              or not isinstance(top_k, numbers.Integral)):
        raise ConfigError(f"top_k must be an integer >= 1 or None, got {top_k!r}", ["top_k"])
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}", ["top_k"])
    if prompt is not None:
        _check_prompt(prompt)


def _check_prompt(prompt: str):
    """Text every tokenizer can take: argv bytes that are not UTF-8 reach Python as lone
    surrogates (U+DC80..U+DCFF for bytes 0x80..0xFF), which no UTF-8 encoder accepts."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(prompt[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raise ConfigError(f"the prompt is not UTF-8 text: {what} at character {e.start}") \
            from None


def longest_context(prompt_tokens: int, max_new_tokens: int, block_size: int) -> int:
    """The most tokens one forward of sample_tokens reads (the (1, t) forward-only cache it
    makes: model.inference_cache_bytes; the capacity of its model.Decoder's key/value cache):
    each draw reads the context before it, the last block_size tokens of the prompt (at least
    one token) and the draws so far, so the last draw reads prompt + max_new_tokens - 1 of
    them; 0 when nothing is drawn."""
    if max_new_tokens < 1:
        return 0
    return min(max(prompt_tokens, 1) + max_new_tokens - 1, block_size)


def start_ids(tokenizer, prompt: str) -> list[int]:
    """The ids sample_text starts from: the prompt's; an empty prompt starts a document, with
    the end-of-text token where the tokenizer has one (else id 0)."""
    eot = getattr(tokenizer, "eot_id", None)
    return [int(i) for i in tokenizer.encode(prompt)] or [0 if eot is None else eot]


def sample_tokens(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, rng: np.random.Generator | None = None,
                  stop_id: int | None = None, vocab_size: int | None = None,
                  unused_ids=None) -> list[int]:
    """Extend `prompt_ids` (a list of ints, at least one) by up to max_new_tokens tokens, from
    the model's vocabulary only (never a padding id). temperature 0 means greedy decoding.
    stop_id (the end-of-text id): generation ends when it is drawn; it is not appended.
    vocab_size: the tokenizer's vocabulary size (None: the model's); ids at or past it are
    never drawn (a model may have more rows than its data's tokenizer has tokens: train
    --vocab-size 300 on byte data; the tokenizer's decode refuses those ids). unused_ids: ids
    below it that have no token (a Hugging Face tokenizer's gaps), never drawn either."""
    check_sampling(temperature, top_k)
    rng = rng or np.random.default_rng()
    ids = [int(i) for i in prompt_ids] or [0]
    V, bs = model.cfg.vocab_size, model.cfg.block_size
    if vocab_size is not None:
        if vocab_size < 1:
            raise ConfigError(f"the tokenizer's vocab_size must be >= 1, got {vocab_size}")
        V = min(V, int(vocab_size))
    unused = np.asarray([] if unused_ids is None else unused_ids, dtype=np.int64)
    unused = unused[(unused >= 0) & (unused < V)]
    if len(np.unique(unused)) == V:
        raise ConfigError(f"none of the model's {V} ids has a token in the tokenizer; nothing "
                          f"to sample")
    # CLLMModel.last_logits keeps its last forward's (1, t) cache: dropped when the sample
    # ends, drawn or refused (a duck-typed model without the method is left as it is)
    release = getattr(model, "release_last_logits_cache", None)
    # incremental decoding (model.Decoder: a KVCache of the longest context, one position per
    # draw) where the model offers it; else a full forward of the context per draw
    make_decoder = getattr(model, "decoder", None)
    decoder = make_decoder(longest_context(len(ids), max_new_tokens, bs)) \
        if make_decoder is not None and max_new_tokens > 0 else None
    try:
        for _ in range(max_new_tokens):
            if decoder is not None:
                logits = decoder.next_logits(ids[-bs:])
            else:
                logits = model.last_logits(np.asarray(ids[-bs:], dtype=np.int64)[None, :])
            logits = logits[0, :V].astype(np.float64)
            if not np.isfinite(logits).all():  # NaN: argmax 0, rng.choice a ValueError
                raise CLLMError("the model's next-token logits are not finite (NaN or Inf): its "
                                "weights have diverged; nothing to sample")
            logits[unused] = -np.inf  # probability 0; never the argmax (some id is a token)
            if temperature == 0:
                nxt = int(np.argmax(logits))
            else:
                # shifted before the division: (l - max) / T is 0 or below (-inf at worst) for any
                # T > 0, where l / T overflows to inf for a tiny T and inf - inf is NaN
                with np.errstate(over="ignore"):
                    z = (logits - logits.max()) / temperature
                if top_k is not None and top_k < V:
                    kth = np.partition(z, -top_k)[-top_k]
                    z = np.where(z < kth, -np.inf, z)
                p = np.exp(z)
                p /= p.sum()
                nxt = int(rng.choice(V, p=p))
            if nxt == stop_id:
                break
            ids.append(nxt)
    finally:
        if release is not None:
            release()
    return ids


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 1.0,
                top_k: int | None = None, rng: np.random.Generator | None = None,
                stop_at_eot: bool = True) -> str:
    """The prompt and its sampled continuation, as text. An empty prompt starts a document:
    the context is the end-of-text token where the tokenizer has one. stop_at_eot: the
    continuation ends at the first end-of-text token (else it is shown as <|endoftext|>)."""
    check_sampling(temperature, top_k, prompt)
    eot = getattr(tokenizer, "eot_id", None)
    start = start_ids(tokenizer, prompt)
    out = sample_tokens(model, start, max_new_tokens, temperature, top_k, rng,
                        stop_id=eot if stop_at_eot else None, vocab_size=tokenizer.vocab_size,
                        unused_ids=getattr(tokenizer, "unused_ids", None))
    return prompt + _continuation(tokenizer, out[:len(start)], out[len(start):], bool(prompt))


def _continuation(tokenizer, start, new, after_prompt: bool) -> str:
    """The text the new tokens add. After a prompt: what they add to the prompt's decoding,
    as decoders join tokens to the ones before (a SentencePiece '▁world' is ' world' after
    'Hello' but 'world' alone; WordPiece's '##ing' joins its word). An empty prompt starts a
    document: the new tokens alone, decoded as a text's start."""
    if not after_prompt or not new:
        return tokenizer.decode(new)
    head, full = tokenizer.decode(start), tokenizer.decode(start + new)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)
