"""Incremental decoding (model.Decoder, KVCache; sampling.sample_tokens uses it on the NumPy
backend): each draw's next-token logits are those of the full forward of the context
(CLLMModel.last_logits, what every draw ran before), to rounding, at every step, before and
past the block_size boundary; sampled ids equal the full forward's for fixed seeds."""
import numpy as np
import pytest

from cllm_gpu import CLLMModel, ModelConfig
from cllm_gpu.model import Decoder, decoder_bytes
from cllm_gpu.sampling import longest_context, sample_tokens

BLOCK = 16
PROMPT = [3, 5, 7]
DRAWS = 24          # contexts of 3 .. 16 tokens, then 10 windows that slid past block_size
# (precision, attn_bias, pos_emb, n_embd): 2 heads; n_embd 64 gives head dim 32, which has a
# tensor-core kernel (a bf16 model's attention rounds q, k, v and P to bf16), 48 head dim 24,
# which has none (a bf16 model's attention computes in fp32 on a float qkv, att copied to bf16)
CASES = [(p, b, e, 64) for p in ("fp32", "bf16") for b in ("none", "alibi", "lattice")
         for e in ("learned", "none")] + [("bf16", "alibi", "learned", 48)]


def _model(precision, attn_bias="none", pos_emb="learned", n_embd=64, dtype="float32"):
    cfg = ModelConfig(vocab_size=67, block_size=BLOCK, n_layer=2, n_head=2, n_embd=n_embd,
                      attn_bias=attn_bias, pos_emb=pos_emb)
    m = CLLMModel(cfg, backend="numpy", dtype=dtype, precision=precision, seed=1)
    # weights scaled up: logits that differ between tokens (the initial ones are near 0)
    m.load_state_dict({k: v * 8 if v.ndim == 2 else v for k, v in m.state_dict().items()})
    return m


class FullForward:
    """The model as sample_tokens saw every model before incremental decoding: no decoder, a
    full forward of the context per draw."""

    def __init__(self, model):
        self.cfg, self.last_logits = model.cfg, model.last_logits
        self.release_last_logits_cache = model.release_last_logits_cache


@pytest.mark.parametrize("precision,attn_bias,pos_emb,n_embd", CASES)
def test_decoder_logits_are_the_full_forwards_at_every_step(precision, attn_bias, pos_emb,
                                                            n_embd, monkeypatch):
    """The logits of each draw's context from the decoder against last_logits' full forward of
    it. fp32: within 1e-5 of the largest logit (seen: 5e-7, the matrix products' summation
    order: one query row instead of a block of them). bf16: the same operations, but a value
    that lands near a bf16 rounding boundary may round the other way; the difference must
    stay a tenth of bf16's own error against a float64 model of the same weights (seen: 0 in
    most cases, 0.0015 against 0.035). The first 13 draws after the prompt are steps of one
    position; past block_size each draw's window slid (every position shifted): a prefill,
    the full forward as before."""
    m = _model(precision, attn_bias, pos_emb, n_embd)
    exact = _model("fp32", attn_bias, pos_emb, n_embd, dtype="float64")
    exact.load_state_dict(m.state_dict())
    steps = []
    step = m._decode_step
    monkeypatch.setattr(m, "_decode_step", lambda *a: steps.append(1) or step(*a))
    decoder = m.decoder(longest_context(len(PROMPT), DRAWS, BLOCK))
    ids, worst, bf16_error = list(PROMPT), 0.0, 0.0
    for _ in range(DRAWS):
        ctx = ids[-BLOCK:]
        got = decoder.next_logits(ctx)
        want = m.last_logits(np.asarray(ctx)[None, :])
        assert got.shape == want.shape == (1, 67) and got.dtype == want.dtype
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        bf16_error = max(bf16_error, float(np.abs(want - exact.last_logits(
            np.asarray(ctx)[None, :])).max() / np.abs(want).max()))
        ids.append(int(np.argmax(want)))
    assert len(steps) == BLOCK - len(PROMPT)
    if precision == "fp32":
        assert worst <= 1e-5, worst
    else:
        assert worst <= 0.1 * bf16_error, (worst, bf16_error)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("attn_bias", ["none", "alibi"])
def test_sampled_ids_are_the_full_forwards(precision, attn_bias):
    """sample_tokens with the decoder draws the ids the full forward per draw draws, for fixed
    seeds, at temperature 0 (greedy), 0.8 with top-k 5 and 1.5 with no top-k, across the
    block_size boundary."""
    m = _model(precision, attn_bias, "none" if attn_bias == "alibi" else "learned")
    for seed in range(3):
        for temperature, top_k in ((0.0, None), (0.8, 5), (1.5, None)):
            got = sample_tokens(m, PROMPT, DRAWS, temperature, top_k,
                                np.random.default_rng(seed))
            want = sample_tokens(FullForward(m), PROMPT, DRAWS, temperature, top_k,
                                 np.random.default_rng(seed))
            assert got == want, (seed, temperature, top_k)
            assert len(got) == len(PROMPT) + DRAWS


def test_sampling_steps_one_position_per_draw_and_stops_at_end_of_text(monkeypatch):
    """sample_tokens runs the decoder: one prefill of the prompt, then a step of one position
    per draw; drawing stop_id ends the sample there (not appended), as with the full forward."""
    m = _model("fp32")
    greedy = sample_tokens(FullForward(m), PROMPT, 8, 0.0)
    prefills, steps = [], []
    prefill, step = m._last_logits, m._decode_step
    monkeypatch.setattr(m, "_last_logits", lambda *a: prefills.append(a[0].shape) or prefill(*a))
    monkeypatch.setattr(m, "_decode_step", lambda *a: steps.append(1) or step(*a))
    assert sample_tokens(m, PROMPT, 8, 0.0) == greedy
    assert prefills == [(1, len(PROMPT))] and len(steps) == 7
    stop = greedy[len(PROMPT) + 4]
    first = greedy.index(stop, len(PROMPT))   # the first draw of that id
    assert sample_tokens(m, PROMPT, 8, 0.0, stop_id=stop) == greedy[:first] \
        == sample_tokens(FullForward(m), PROMPT, 8, 0.0, stop_id=stop)
    assert m._caches == {}   # the prefill's forward cache is not left behind


@pytest.mark.parametrize("precision,n_embd", [("fp32", 64), ("bf16", 64), ("bf16", 48)])
def test_decoder_bytes_are_what_a_decoder_allocates(precision, n_embd):
    """decoder_bytes (which check_training_fits counts for the NumPy backend's end-of-run
    sample beside the prefill's forward-only cache) is the bytes of the Decoder's arrays."""
    m = _model(precision, n_embd=n_embd)
    d = Decoder(m, 11)
    arrays = {id(a): a for holder in [d.kv, d.step, d.step.layers[0]]
              for a in vars(holder).values() if isinstance(a, np.ndarray)}
    arrays.update({id(a): a for a in d.kv.k + d.kv.v})
    assert sum(a.nbytes for a in arrays.values()) == decoder_bytes(m.cfg, 11, m.dtype,
                                                                   m.mm_dtype)


@pytest.mark.parametrize("precision,head_dim", [("fp32", 16), ("bf16", 32), ("bf16", 24)])
@pytest.mark.parametrize("bias", ["none", "alibi", "lattice"])
def test_one_query_attention_is_the_full_attentions_last_row(precision, head_dim, bias):
    """ops.attention_decode_ref of the last position over attention_keys_values of all T = 150
    (over two of the reference's 128-row blocks and three bf16 key tiles of 64) against
    attention_forward_ref's last row: within fp32 rounding (1e-6, the matrix products'
    summation order), bf16 included (its operands are the same bf16 values; P's rounding
    against the same running max)."""
    from cllm_gpu.ops import attention_decode_ref, attention_keys_values, attention_slopes
    from cllm_gpu.ops.attention import attention_forward_ref
    from cllm_gpu.ops.cast import to_bf16
    H, T = 2, 150
    qkv = np.random.default_rng(4).normal(0, 2, size=(2, T, 3 * H * head_dim)).astype(np.float32)
    if precision == "bf16" and head_dim % 16 == 0:
        qkv = to_bf16(qkv)      # the bf16 model's qkv storage where a tensor-core kernel reads it
    slopes = attention_slopes(bias, H)
    slopes = None if slopes is None else slopes.astype(np.float32)
    want, _ = attention_forward_ref(qkv, H, precision=precision, slopes=slopes)
    k, v = attention_keys_values(qkv, H, precision)
    got = attention_decode_ref(qkv[:, -1:], k, v, H, precision, slopes)
    assert got.shape == (2, 1, H * head_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want[:, -1:], rtol=1e-5, atol=1e-6)


def test_a_decoder_past_its_capacity_gives_the_full_forwards_logits():
    """CLLMModel.decoder(capacity) is public: a context longer than the capacity has no room
    for its K, V. Before, the step's write past the end was a NumPy slice of no positions, into
    which the new key broadcast without a word, and the attention left the new position out
    (0.40 of the largest logit off, the first token past it). Such a context is the full
    forward's, as last_logits."""
    m = _model("fp32")
    decoder = m.decoder(4)
    ctx = list(PROMPT)
    for token in (9, 11, 13, 2):            # contexts of 4 to 7 tokens: 3 past the capacity
        ctx.append(token)
        got = decoder.next_logits(ctx)
        want = m.last_logits(np.asarray(ctx)[None, :])
        error = float(np.abs(got - want).max() / np.abs(want).max())
        assert error <= 1e-5, (len(ctx), error)


def test_a_decoder_refuses_a_context_past_block_size_as_last_logits_does():
    """With learned positions a context past block_size has no position embedding: a decoder
    of a larger capacity stepped there with an empty slice of wpe, a ValueError traceback
    ("sequence length 1 exceeds block_size 0"); it is refused as last_logits refuses it."""
    from cllm_gpu.errors import DataError
    m = _model("fp32")
    decoder = m.decoder(BLOCK + 4)
    ctx = list(range(BLOCK))
    decoder.next_logits(ctx)
    with pytest.raises(DataError) as refused:
        decoder.next_logits(ctx + [1])
    with pytest.raises(DataError) as want:
        m.last_logits(np.asarray(ctx + [1])[None, :])
    assert str(refused.value) == str(want.value)


def _close(got, want):
    """fp32 logits of one context by the decoder and by the full forward: within 1e-5 of the
    largest (as test_decoder_logits_are_the_full_forwards_at_every_step)."""
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-5


def test_a_context_that_is_not_the_kept_one_plus_a_token_is_a_prefill():
    """Decoder.next_logits of any context is the full forward's: a context of one more token
    whose earlier ones are not the kept ones, one of two more tokens, one past the key/value
    capacity (8), and after that a one-token context (the kept positions are then none:
    stepping at the old length would read another context's keys) are forwards of their
    own; only the kept context plus one token is a step."""
    m = _model("fp32")
    decoder = m.decoder(8)
    steps = []
    step = m._decode_step
    m._decode_step = lambda *a: steps.append(1) or step(*a)
    contexts = [[3, 5, 7], [3, 5, 7, 9], [2, 5, 7, 9, 11], [2, 5, 7, 9, 11, 4, 6],
                list(range(1, 11)), [6], [6, 8]]
    for ctx in contexts:
        _close(decoder.next_logits(ctx), m.last_logits(np.asarray(ctx)[None, :]))
    assert len(steps) == 2          # [3, 5, 7, 9] and [6, 8]


def test_an_interrupted_prefill_leaves_no_kept_context_to_step_from(monkeypatch):
    """A prefill that ends in its first blocks (a Ctrl-C) has overwritten some blocks' kept
    keys and values: the next context, even the earlier kept one plus a token, is a full
    forward, not a step over them."""
    from cllm_gpu.model import KVCache
    m = _model("fp32")
    decoder = m.decoder(8)
    decoder.next_logits([3, 5, 7])
    keep = KVCache.keep

    def keep_block_0_only(self, l, qkv):
        if l > 0:
            raise KeyboardInterrupt
        keep(self, l, qkv)
    monkeypatch.setattr(KVCache, "keep", keep_block_0_only)
    with pytest.raises(KeyboardInterrupt):
        decoder.next_logits([1, 2, 4, 6, 8])
    monkeypatch.setattr(KVCache, "keep", keep)
    _close(decoder.next_logits([3, 5, 7, 9]), m.last_logits(np.asarray([[3, 5, 7, 9]])))


def test_the_prefills_forward_cache_is_dropped_at_the_first_step():
    """The prefill's (1, t) forward-only cache is not read by the steps after it: the first
    step drops it, so a sample holds the key/value cache and the step buffers only."""
    m = _model("fp32")
    decoder = m.decoder(8)
    decoder.next_logits([3, 5, 7])
    assert ("inference", 1, 3) in m._caches
    decoder.next_logits([3, 5, 7, 9])
    assert m._caches == {}


def test_an_interrupted_step_is_not_counted_as_kept(monkeypatch):
    """A step that ends before its logits (a Ctrl-C in the output projection) has already
    appended its keys and values and counted the position: the same context again was a
    step one position further on, over the token's keys twice (seen: logits 41% off the full
    forward's). It is a prefill instead, the full forward's logits."""
    m = _model("fp32")
    decoder = m.decoder(8)
    decoder.next_logits([3, 5, 7])

    def interrupted(rows):
        raise KeyboardInterrupt
    logits_of = m._logits_of
    monkeypatch.setattr(m, "_logits_of", interrupted)
    with pytest.raises(KeyboardInterrupt):
        decoder.next_logits([3, 5, 7, 9])
    monkeypatch.setattr(m, "_logits_of", logits_of)
    _close(decoder.next_logits([3, 5, 7, 9]), m.last_logits(np.asarray([[3, 5, 7, 9]])))
    _close(decoder.next_logits([3, 5, 7, 9, 2]), m.last_logits(np.asarray([[3, 5, 7, 9, 2]])))
