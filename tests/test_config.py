"""ModelConfig and TrainConfig bounds (cllm_gpu/config.py): each field at the last value it
accepts and the first it refuses, the error naming the field. A mutation audit moved each
bound by one (batch_size 0, dropout 1.0, learning_rate 0, beta 1.0, eps 0, ...) and most of
those changes passed every test."""
import json

import numpy as np
import pytest

from cllm_gpu import ModelConfig, TrainConfig
from cllm_gpu.errors import ConfigError

# (field, last accepted, first refused, the refusal's words)
TRAIN_BOUNDS = [
    ("batch_size", 1, 0, "must be >= 1"),
    ("seq_len", 0, -1, "must be >= 0"),
    ("grad_accum_steps", 1, 0, "must be >= 1"),
    ("max_steps", 0, -1, "must be >= 0"),
    ("warmup_steps", 0, -1, "must be >= 0"),
    ("lr_decay_steps", 0, -1, "must be >= 0"),
    ("eval_interval", 0, -1, "must be >= 0"),
    ("eval_batches", 1, 0, "must be >= 1"),
    ("log_interval", 1, 0, "must be >= 1"),
    ("checkpoint_interval", 0, -1, "must be >= 0"),
    ("keep_checkpoints", 1, 0, "must be >= 1"),
    ("seed", 0, -1, "must be >= 0"),
    ("max_nonfinite_skips", 0, -1, "must be >= 0"),
    ("learning_rate", 1e-12, 0.0, "must be > 0"),     # lr 0 trains nothing
    ("weight_decay", 0.0, -1e-12, "must be >= 0"),
    ("beta1", 0.0, -1e-12, "must be >= 0"),
    ("beta1", 0.999999, 1.0, "must be < 1"),          # beta 1: the moment never moves
    ("beta2", 0.999999, 1.0, "must be < 1"),          # and Adam's bias correction divides by 0
    ("eps", 1e-30, 0.0, "must be > 0"),
    ("grad_clip", 0.0, -1e-12, "must be >= 0"),
    ("bucket_mb", 1e-6, 0.0, "must be > 0"),
    ("dist_timeout", 1e-3, 0.0, "must be > 0"),
    ("zero", 1, 2, "must be 0 or 1"),
]


@pytest.mark.parametrize("field,ok,bad,words", TRAIN_BOUNDS)
def test_train_config_bounds(field, ok, bad, words):
    base = dict(min_lr=0.0) if field == "learning_rate" else {}
    assert getattr(TrainConfig(**base, **{field: ok}), field) == ok
    with pytest.raises(ConfigError, match=rf"^{field} {words}"):
        TrainConfig(**base, **{field: bad})


def test_min_lr_may_equal_but_not_exceed_the_peak():
    """min_lr == learning_rate is a constant schedule (allowed); above it the 'decay' rises."""
    tc = TrainConfig(learning_rate=1e-3, min_lr=1e-3, warmup_steps=0, max_steps=10)
    assert [tc.lr_at(s) for s in (0, 5, 10)] == [1e-3] * 3
    with pytest.raises(ConfigError, match=r"^min_lr \(0\.002\) must be <= learning_rate"):
        TrainConfig(learning_rate=1e-3, min_lr=2e-3)


def test_bf16_needs_float32_masters_and_bools_are_not_sizes():
    assert TrainConfig(precision="bf16", dtype="float32").precision == "bf16"
    with pytest.raises(ConfigError, match=r"precision 'bf16' needs dtype 'float32'"):
        TrainConfig(precision="bf16", dtype="float64")
    with pytest.raises(ConfigError, match=r"^batch_size must be an integer, got True"):
        TrainConfig(batch_size=True)
    with pytest.raises(ConfigError, match=r"^n_layer must be an integer, got True"):
        ModelConfig(n_layer=True)


MODEL_BOUNDS = [
    ("vocab_size", 1, 0, "must be >= 1"),
    ("vocab_size", 2**32 - 1, 2**32, "must be < 2\\*\\*32"),  # token ids are uint32
    ("block_size", 1, 0, "must be >= 1"),
    ("n_layer", 1, 0, "must be >= 1"),
    ("dropout", 0.0, -1e-12, "must be >= 0"),
    ("dropout", 0.999, 1.0, "must be < 1"),           # p = 1 scales the kept nothing by 1/0
]


SMALL = dict(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)


@pytest.mark.parametrize("field,ok,bad,words", MODEL_BOUNDS)
def test_model_config_bounds(field, ok, bad, words):
    assert getattr(ModelConfig(**{**SMALL, field: ok}), field) == ok
    with pytest.raises(ConfigError, match=rf"^{field} {words}"):
        ModelConfig(**{**SMALL, field: bad})


# (config class, field, a value equal to a valid choice that is no str)
NOT_STR_CHOICES = [
    (TrainConfig, "precision", np.array("fp32")),
    (TrainConfig, "on_nonfinite", np.array("skip")),
    (ModelConfig, "attn_bias", np.array("alibi")),
    (ModelConfig, "pos_emb", np.array("none")),
]


@pytest.mark.parametrize("cls,field,value", NOT_STR_CHOICES)
def test_choice_fields_take_strings_only(cls, field, value):
    """A 0-d NumPy array compares equal to its string, so `value not in choices` passed it and
    the config kept the array: state.json could not be written (TypeError in json.dumps) at
    the first checkpoint, after the steps before it had run. An array of several strings
    raised NumPy's 'truth value of an array is ambiguous' (zero's too)."""
    with pytest.raises(ConfigError, match=rf"^{field} must be .*, got array"):
        cls(**{field: value})
    with pytest.raises(ConfigError, match=rf"^{field} must be "):
        cls(**{field: np.array([str(value), "x"])})
    assert getattr(cls(**{field: np.str_(value)}), field).__class__ is str


def test_dtype_takes_a_numpy_dtype_as_its_name():
    """CLLMModel takes dtype=np.dtype('float64'); TrainConfig kept it as a dtype object and a
    whole run trained before its final checkpoint failed to write state.json (TypeError: Object
    of type Float64DType is not JSON serializable), leaving no checkpoint."""
    tc = TrainConfig(dtype=np.dtype("float64"))
    assert tc.dtype == "float64" and tc.dtype.__class__ is str
    json.dumps(tc.to_dict())
    for bad in (np.float64, np.dtype("int32"), np.array(["float32", "float64"])):
        with pytest.raises(ConfigError, match=r"^dtype must be 'float32' or 'float64'"):
            TrainConfig(dtype=bad)
    with pytest.raises(ConfigError, match=r"^zero must be 0 or 1, got array"):
        TrainConfig(zero=np.array([0, 1]))


def test_a_replace_of_vocab_size_keeps_the_padding_unless_given_0():
    """ModelConfig resolves padded_vocab_size 0 to vocab_size, so dataclasses.replace(cfg,
    vocab_size=...) keeps the old rows, as docs/design.md says: a smaller vocabulary stays
    padded to them (only wasteful: the padding is never scored, sampled or exported), a larger
    one is refused, and padded_vocab_size=0 with the new vocab_size gives the unpadded
    config."""
    import dataclasses
    cfg = ModelConfig(vocab_size=256, block_size=8, n_layer=1, n_head=1, n_embd=8)
    assert dataclasses.replace(cfg, vocab_size=100).padded_vocab_size == 256
    with pytest.raises(ConfigError, match=r"padded_vocab_size \(256\) must be >= vocab_size "
                                          r"\(512\)"):
        dataclasses.replace(cfg, vocab_size=512)
    bigger = dataclasses.replace(cfg, vocab_size=512, padded_vocab_size=0)
    assert bigger == ModelConfig(vocab_size=512, block_size=8, n_layer=1, n_head=1, n_embd=8)


def test_the_cosine_decay_ends_at_lr_decay_steps_not_max_steps():
    """lr_decay_steps, where given, is where the rate reaches min_lr, before max_steps; a
    decay that ends where the warm-up ends is at min_lr from that step (mutation audit: the
    schedule ignoring lr_decay_steps, and min_lr only past the decay's end, passed every
    test; the latter gave the peak rate at step 10 here)."""
    tc = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=0, max_steps=100,
                     lr_decay_steps=50)
    assert tc.lr_at(25) == pytest.approx(0.55)  # half-way through the cosine
    assert [tc.lr_at(s) for s in (50, 75, 99)] == [0.1] * 3
    tc = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=20,
                     lr_decay_steps=10)
    assert tc.lr_at(9) == 1.0 and [tc.lr_at(s) for s in (10, 11)] == [0.1] * 2


def test_flops_per_token_is_nanogpts_count_for_gpt2_124m():
    """nanoGPT's estimate_mfu count for GPT-2 124M (vocab padded to 50,304): 6 N + 12 L C T,
    N without wpe (docs/benchmarks.md). The bench test checking it needs torch (mutation
    audit: 6 L C T for attention, and N with wpe, passed every test without torch)."""
    cfg = ModelConfig(vocab_size=50257, padded_vocab_size=50304, block_size=1024, n_layer=12,
                      n_head=12, n_embd=768)
    assert cfg.flops_per_token(1024) == 6 * 123_689_472 + 12 * 12 * 768 * 1024 == 855_383_040


@pytest.mark.parametrize("value", ["64", 64.5, True, None])
def test_a_padded_vocab_size_that_is_no_integer_is_refused_naming_it(value):
    """padded_vocab_size is checked as the other sizes are (mutation audit: without its
    check every test passed; "64" was then a TypeError from the comparison with vocab_size,
    None a TypeError too)."""
    with pytest.raises(ConfigError, match=rf"^padded_vocab_size must be an integer, got "
                                          rf"{value!r}$"):
        ModelConfig(vocab_size=10, padded_vocab_size=value)
    assert ModelConfig(vocab_size=10, padded_vocab_size=np.int64(64)).padded_vocab_size == 64


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig])
def test_from_dict_names_every_unknown_field(cls):
    """A state.json field this version does not know is named, all of them in order (mutation
    audit: without the check, Python's TypeError named only the first: "__init__() got an
    unexpected keyword argument")."""
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}: unknown field\(s\) "
                                          rf"fused_adam, zz_top$"):
        cls.from_dict({"zz_top": 1, "fused_adam": True})
