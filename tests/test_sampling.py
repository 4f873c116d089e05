"""sampling.py against its definition: draws follow softmax(logits / T) over the top k,
temperature 0 is greedy, a seed repeats a sample, the context is the last block_size tokens."""
from types import SimpleNamespace

import numpy as np
import pytest

from cllm_gpu.sampling import sample_tokens

# a skip for want of a package the dev extra installs (tokenizers) fails CI: tests/conftest.py
pytestmark = pytest.mark.ci_required("dev")

# 0.5 is both the 5th and the 6th largest value
LOGITS = np.array([2.0, 1.0, 0.5, 0.5, -1.0, 3.0, 0.0, 1.5], dtype=np.float32)


class FixedLogits:
    """A model whose next-token logits never change; records each context it is given."""

    def __init__(self, logits, block_size=4, pos_emb="learned"):
        self.logits = np.asarray(logits, dtype=np.float32)
        self.cfg = SimpleNamespace(vocab_size=len(self.logits), block_size=block_size,
                                   pos_emb=pos_emb,
                                   max_seq_len=block_size if pos_emb == "learned" else None)
        self.contexts = []

    def last_logits(self, idx):
        self.contexts.append(idx[0].tolist())
        return self.logits[None, :]


def softmax_top_k(logits, temperature, top_k):
    """The definition, written out: ties at the k-th largest value all stay (as nanoGPT)."""
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < len(z):
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    p = np.exp(z - z.max())
    return p / p.sum()


def chi2_bound(df, z=3.09):
    """The chi-square quantile at 1 - 0.001 (Wilson-Hilferty: within 1 % for df >= 1)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, None), (2.5, 3), (1.0, 4),
                                               (1.0, 5), (1.0, 7), (1.0, 8), (1.0, 100)])
def test_draws_follow_softmax_of_logits_over_temperature_within_the_top_k(temperature, top_k):
    """20,000 draws per setting: tokens outside the top k never come, the others at
    softmax(logits / T) (chi-square below its 0.999 quantile; a seed fixes the draws). k = 4
    keeps 4 tokens, k = 5 both tokens tied at the 5th value (6 tokens), k >= V all of them."""
    n = 20_000
    out = sample_tokens(FixedLogits(LOGITS), [0], n, temperature, top_k,
                        np.random.default_rng(11))[1:]
    counts = np.bincount(out, minlength=len(LOGITS))
    p = softmax_top_k(LOGITS, temperature, top_k)
    kept = p > 0
    assert kept.sum() == {None: 8, 3: 3, 4: 4, 5: 6, 7: 7, 8: 8, 100: 8}[top_k]
    assert not counts[~kept].any()
    expected = p[kept] * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi2 < chi2_bound(kept.sum() - 1), (counts, expected)


def test_greedy_top_1_seed_and_tiny_temperatures():
    """temperature 0: the first largest logit, whatever top_k; top_k = 1: only the largest
    (each of tied largest ones); the same seed, the same sample; a temperature so small that
    logits / T overflows is greedy (it was NaN probabilities: ValueError)."""
    tied = FixedLogits([1.0, 3.0, 3.0, 0.0])
    for top_k in (None, 1, 2, 10):
        assert sample_tokens(tied, [0], 5, 0.0, top_k) == [0, 1, 1, 1, 1, 1]
    out = sample_tokens(tied, [0], 400, 1.0, 1, np.random.default_rng(0))[1:]
    assert set(out) == {1, 2}
    model = FixedLogits(LOGITS)
    a = sample_tokens(model, [0], 50, 0.9, 5, np.random.default_rng(7))
    assert a == sample_tokens(model, [0], 50, 0.9, 5, np.random.default_rng(7))
    assert a != sample_tokens(model, [0], 50, 0.9, 5, np.random.default_rng(8))
    for temperature in (1e-300, 1e-320, 5e-324):
        assert sample_tokens(model, [0], 3, temperature, None,
                             np.random.default_rng(0)) == [0, 5, 5, 5]
        assert sample_tokens(model, [0], 3, temperature, 3, np.random.default_rng(0)) == \
            [0, 5, 5, 5]


@pytest.mark.parametrize("pos_emb", ["learned", "none"])
def test_the_context_is_the_last_block_size_tokens(pos_emb):
    """A prompt longer than block_size and a generation past it: each forward sees the last
    block_size tokens (as nanoGPT crops); shorter contexts whole. Also without position
    embeddings, where the model would take more (docs/attention_bias.md: the window stays
    block_size; mutation audit: an uncropped context for pos_emb "none" passed)."""
    model = FixedLogits(LOGITS, block_size=4, pos_emb=pos_emb)
    out = sample_tokens(model, list(range(6)), 5, 0.0)
    assert len(out) == 11
    assert model.contexts == [out[i - 4:i] for i in range(6, 11)]
    model.contexts.clear()
    out = sample_tokens(model, [3], 5, 0.0)
    assert model.contexts == [out[:i] if i < 4 else out[i - 4:i] for i in range(1, 6)]


@pytest.mark.parametrize("prompt,tokens", [("", 1), ("", 9), ("ab", 1), ("ab", 6), ("ab", 7),
                                           ("ab", 30), ("abcdefghij", 3), ("abcdefghij", 0)])
def test_longest_context_is_the_longest_the_sampler_reads(prompt, tokens):
    """The memory check (check_training_fits) counts the sample's (1, t) cache at
    longest_context(len(start_ids(...)), tokens, block_size): the longest context sample_text
    gives the model, below the block size, at it, with a prompt past it, an empty prompt (the
    end-of-text token) and no draw at all (0)."""
    from cllm_gpu.data import ByteTokenizer
    from cllm_gpu.sampling import longest_context, sample_text, start_ids
    model = FixedLogits(np.zeros(257), block_size=8)
    sample_text(model, ByteTokenizer(256), prompt, tokens, temperature=1.0,
                rng=np.random.default_rng(0), stop_at_eot=False)
    got = max((len(c) for c in model.contexts), default=0)
    n_prompt = len(start_ids(ByteTokenizer(256), prompt))
    assert n_prompt == max(len(prompt), 1)
    assert longest_context(n_prompt, tokens, 8) == got
    # an empty prompt is the end-of-text token: a prompt of 0 tokens counts as 1
    assert longest_context(0, tokens, 8) == longest_context(1, tokens, 8)


@pytest.mark.parametrize("decoder,vocab,prompt,want", [
    # SentencePiece-style (Llama, T5 tokenizer.json files): the space is the next token's
    ("metaspace", ["▁Hello", "▁world"], "Hello", "Hello world"),
    # WordPiece: '##ing' continues the word before it
    ("wordpiece", ["the", "play", "##ing"], "the play", "the playing"),
    # an empty prompt starts a document: decoded as a text's start
    ("metaspace", ["▁Hello", "▁world"], "", "world"),
])
def test_a_continuation_is_decoded_after_its_prompt(tmp_path, decoder, vocab, prompt, want):
    """sample_text decoded the new tokens alone: a tokenizer whose decoder strips a leading
    space ('Helloworld') or a WordPiece continuation ('the play##ing') printed text the model
    did not write. The continuation is what the new tokens add to the prompt's decoding."""
    tk = pytest.importorskip("tokenizers")
    from cllm_gpu.data import HFTokenizer
    from cllm_gpu.sampling import sample_text
    words = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(vocab)}}
    if decoder == "metaspace":
        tok = tk.Tokenizer(tk.models.WordLevel(words, unk_token="[UNK]"))
        tok.pre_tokenizer, tok.decoder = tk.pre_tokenizers.Metaspace(), tk.decoders.Metaspace()
    else:
        tok = tk.Tokenizer(tk.models.WordPiece(words, unk_token="[UNK]"))
        tok.pre_tokenizer, tok.decoder = tk.pre_tokenizers.Whitespace(), tk.decoders.WordPiece()
    tok.save(str(tmp_path / "tok.json"))
    tokenizer = HFTokenizer.load(tmp_path / "tok.json")
    logits = np.zeros(len(words), dtype=np.float32)
    logits[-1] = 10.0                       # the last word, always
    model = FixedLogits(logits)
    assert sample_text(model, tokenizer, prompt, 1, 0.0) == want


@pytest.mark.parametrize("eot_id,context", [(256, [256]), (None, [0])])
def test_an_empty_prompt_starts_a_document_at_end_of_text(eot_id, context):
    """sample_text with an empty prompt: the context is the end-of-text token (a document's
    start, as the data puts it after every document), or id 0 for data without one. Mutation
    audit: starting from id 0 always passed the sampling and CLI tests."""
    from cllm_gpu.data import ByteTokenizer
    from cllm_gpu.sampling import sample_text
    logits = np.zeros(257)
    logits[ord("a")] = 5.0
    model = FixedLogits(logits, block_size=8)
    assert sample_text(model, ByteTokenizer(eot_id), "", 3, temperature=0) == "aaa"
    assert model.contexts[0] == context


def test_a_prompts_end_of_text_reaches_the_model_as_end_of_text():
    """sample --prompt 'text<|endoftext|>' starts a new document after the text: the model
    sees end-of-text (256), as in the data it trained on, not the 13 bytes of its spelling.
    Mutation audit (h29p): sample_text encoding the prompt as a document passed every
    sampling and CLI test."""
    from cllm_gpu.data import ByteTokenizer
    from cllm_gpu.sampling import sample_text
    logits = np.zeros(257)
    logits[ord("a")] = 5.0
    model = FixedLogits(logits, block_size=8)
    assert sample_text(model, ByteTokenizer(), "b<|endoftext|>", 2, temperature=0) == (
        "b<|endoftext|>aa")
    assert model.contexts[0] == [ord("b"), 256]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_non_finite_logits_are_refused_not_sampled(bad, temperature):
    """A diverged model (NaN or Inf weights, e.g. a run trained on with --on-nonfinite skip):
    temperature > 0 was NumPy's 'Probabilities contain NaN' traceback from `sample` and from
    train's final sample, temperature 0 exit 0 with token 0 (argmax of NaN) every time. Found
    by argv fuzzing. Now one error naming it, whatever the temperature."""
    from cllm_gpu.errors import CLLMError
    logits = LOGITS.copy()
    logits[2] = bad
    with pytest.raises(CLLMError, match=r"the model's next-token logits are not finite"):
        sample_tokens(FixedLogits(logits), [0], 3, temperature, None, np.random.default_rng(0))


def test_only_ids_the_tokenizer_can_decode_are_drawn():
    """A model with more rows than its tokenizer has tokens (train --vocab-size 300 on byte
    data): the ids past the tokenizer's vocabulary are never drawn, at temperature 0 (where one
    of them has the largest logit) or above, with or without top-k. Before, `sample` drew them
    and the byte tokenizer printed them as other bytes (id & 0xFF)."""
    logits = np.concatenate([LOGITS, [9.0, 8.0]])  # ids 8 and 9: past a tokenizer of 8
    model = FixedLogits(logits)
    assert sample_tokens(model, [0], 5, 0.0, vocab_size=8)[1:] == [5] * 5
    for top_k in (None, 2, 100):
        out = sample_tokens(model, [0], 2_000, 1.0, top_k, np.random.default_rng(3),
                            vocab_size=8)[1:]
        assert max(out) < 8 and (top_k != 2 or set(out) == {0, 5})
    # a tokenizer larger than the model: the model's vocabulary bounds the draws, as before
    assert sample_tokens(model, [0], 3, 0.0, vocab_size=1000)[1:] == [8] * 3


@pytest.mark.parametrize("vocab_size", [0, -1])
def test_a_tokenizer_without_tokens_is_refused(vocab_size):
    """vocab_size 0 left no id to draw: argmax of no logits, a NumPy ValueError traceback (the
    check must not take 0 for 'no limit given': that is None)."""
    from cllm_gpu.errors import ConfigError
    with pytest.raises(ConfigError, match=rf"^the tokenizer's vocab_size must be >= 1, got "
                                          rf"{vocab_size}$"):
        sample_tokens(FixedLogits(LOGITS), [0], 3, 0.0, vocab_size=vocab_size)


def test_sample_text_never_prints_an_id_past_the_byte_tokenizer():
    """sample_text passes the tokenizer's vocabulary: greedy over a 300-token model whose best
    id is 290 (before: printed as '"', 290 & 0xFF) gives the best byte, 'A', instead."""
    from cllm_gpu.data import ByteTokenizer
    from cllm_gpu.sampling import sample_text
    logits = np.zeros(300, dtype=np.float32)
    logits[290], logits[ord("A")] = 5.0, 4.0
    out = sample_text(FixedLogits(logits), ByteTokenizer(), "x", 3, 0.0)
    assert out == "xAAA"


def _tokenizer_with_gaps(tmp_path):
    """A Hugging Face tokenizer whose ids 3 and 4 have no token (vocab_size 6): its decoder
    drops them silently ('a b' for [1, 3, 2])."""
    tk = pytest.importorskip("tokenizers")
    from cllm_gpu.data import HFTokenizer
    tok = tk.Tokenizer(tk.models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2, "c": 5},
                                           unk_token="a"))
    tok.pre_tokenizer, tok.decoder = tk.pre_tokenizers.WhitespaceSplit(), tk.decoders.WordPiece()
    tok.save(str(tmp_path / "gaps.json"))
    return HFTokenizer.load(tmp_path / "gaps.json")


def test_ids_in_the_tokenizers_gaps_are_never_drawn(tmp_path):
    """Sampling limited the draws to the tokenizer's id range but not its gaps: greedy over a
    model whose best id is the gap 3 printed nothing for each token (the library's decode drops
    it) and temperature > 0 drew the gaps too. Now their logits are masked: greedy takes the
    best id with a token, and no draw at any temperature or top-k is a gap; decode refuses a
    gap id instead of dropping it."""
    from cllm_gpu.errors import DataError
    from cllm_gpu.sampling import sample_text
    tok = _tokenizer_with_gaps(tmp_path)
    logits = np.array([0.0, 1.0, 2.0, 9.0, 8.0, 3.0], dtype=np.float32)
    model = FixedLogits(logits, block_size=8)
    assert sample_text(model, tok, "a", 3, 0.0, stop_at_eot=False) == "a c c c"
    assert tok.vocab_size == 6 and tok.unused_ids.tolist() == [3, 4]
    for top_k in (None, 1, 2, 6):
        out = sample_tokens(model, [1], 2_000, 1.0, top_k, np.random.default_rng(1),
                            vocab_size=tok.vocab_size, unused_ids=tok.unused_ids)[1:]
        assert not {3, 4} & set(out)
        assert set(out) == ({5} if top_k == 1 else {2, 5} if top_k == 2 else {0, 1, 2, 5})
    with pytest.raises(DataError, match=r"^token id 3 has no token in the file tokenizer"):
        tok.decode([1, 3, 2])


def test_a_tokenizer_with_no_token_among_the_models_ids_is_refused():
    """Every id the model has is a gap: nothing can be drawn (argmax of all -inf would be
    id 0, a gap): one error before any step."""
    from cllm_gpu.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^none of the model's 8 ids has a token"):
        sample_tokens(FixedLogits(LOGITS), [0], 3, 0.0, unused_ids=range(8))


def test_gap_ids_past_the_models_rows_or_given_twice_are_taken_as_they_are():
    """unused_ids are the tokenizer's gaps, below its vocab_size, which may pass the model's
    rows (a 4-row model, a 6-id tokenizer with gaps 3 and 4): the gap 4 is no id the model can
    draw, not an index into its logits (was an IndexError when kept); and an id given twice
    counts once (three gaps of four ids, one listed twice, leave id 1 to draw, and four ids
    listed with repeats leave none)."""
    from cllm_gpu.errors import ConfigError
    model = FixedLogits([0.0, 1.0, 2.0, 9.0])
    out = sample_tokens(model, [1], 3, 0.0, vocab_size=6, unused_ids=np.array([3, 4]))
    assert out == [1, 2, 2, 2]
    out = sample_tokens(model, [1], 3, 1.0, None, np.random.default_rng(0),
                        unused_ids=[0, 2, 3, 3])
    assert out == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match=r"^none of the model's 4 ids has a token"):
        sample_tokens(model, [1], 3, 0.0, unused_ids=[0, 1, 1, 2, 3, 3])


@pytest.mark.parametrize("top_k,unused_ids", [(None, None), (1, None), (None, [2])])
def test_an_infinite_temperature_is_refused_like_trains(top_k, unused_ids):
    """`sample --temperature inf` was accepted (train refused it: state.json cannot record
    it), and (l - max) / inf is 0 for every id: top_k 1 drew all 8 ids alike, and an id of a
    tokenizer's gap (-inf / inf = NaN) made NumPy's 'Probabilities contain NaN' traceback.
    Now one ConfigError before any forward, as train's."""
    from cllm_gpu.errors import ConfigError
    model = FixedLogits(LOGITS)
    with pytest.raises(ConfigError, match=r"^temperature must be finite, got inf$"):
        sample_tokens(model, [0], 3, np.inf, top_k, np.random.default_rng(0),
                      unused_ids=unused_ids)
    assert model.contexts == []


@pytest.mark.parametrize("temperature,top_k,words", [
    (0.8, 5.0, r"^top_k must be an integer >= 1 or None, got 5\.0$"),
    (0.8, True, r"^top_k must be an integer >= 1 or None, got True$"),
    (0.8, "5", r"^top_k must be an integer >= 1 or None, got '5'$"),
    ("0.8", 5, r"^temperature must be a number >= 0, got '0\.8'$"),
    (None, 5, r"^temperature must be a number >= 0, got None$"),
    (True, 5, r"^temperature must be a number >= 0, got True$"),  # not temperature 1
    (np.False_, 5, r"^temperature must be a number >= 0, got (np\.)?False_?$")])
def test_sampling_settings_of_the_wrong_type_are_refused_by_name(temperature, top_k, words):
    """From the Python API (GpuTrainer.sample, sample_tokens): top_k 5.0 passed the check and
    failed in np.partition (TypeError), True was taken as top_k 1, a string or None
    temperature raised TypeError from a comparison."""
    from cllm_gpu.errors import ConfigError
    model = FixedLogits(LOGITS)
    with pytest.raises(ConfigError, match=words):
        sample_tokens(model, [0], 3, temperature, top_k, np.random.default_rng(0))
    assert model.contexts == []
    assert len(sample_tokens(model, [0], 3, np.float32(0.5), np.int64(2),
                             np.random.default_rng(0))) == 4
