"""ModelConfig (GPT-2 field names) and TrainConfig, validated on construction."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from .errors import ConfigError


# numbers.Integral / Real take NumPy's scalars too (np.int64 from np.arange, np.float32);
# the value is stored as a Python int / float (configs go into state.json). bool is no size.
def _int_field(obj, name, minimum):
    v = getattr(obj, name)
    whole = isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real)
                                                and float(v).is_integer())
    if isinstance(v, bool) or not whole:
        raise ConfigError(f"{name} must be an integer, got {v!r}", [name])
    v = int(v)
    setattr(obj, name, v)
    if v < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {v}", [name])


def _float_field(obj, name, lo=None, hi=None, lo_open=False, hi_open=False):
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {v!r}", [name])
    v = float(v)
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {v}", [name])
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}", [name])
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ConfigError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}", [name])
    setattr(obj, name, v)


def choice(name, v, choices, words) -> str:
    """`v`, one of `choices` (strings), as a plain str. A NumPy dtype is taken by its name
    (CLLMModel takes dtype=np.dtype("float64")); other non-strings are refused: a 0-d array
    equals its string, and state.json cannot hold one (json.dumps fails at the first
    checkpoint, after the steps before it ran)."""
    if isinstance(v, np.dtype):
        v = v.name
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(f"{name} must be {words}, got {v!r}", [name])
    return str(v)


def _choice_field(obj, name, choices, words):
    """A field that is one of `choices` (strings), stored as a plain str (choice)."""
    setattr(obj, name, choice(name, getattr(obj, name), choices, words))


class _Config:
    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # missing required fields
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ATTN_BIASES = ("none", "alibi", "lattice")
POS_EMBS = ("learned", "none")


@dataclass
class ModelConfig(_Config):
    """GPT-2's fields, plus options (absent from older checkpoints: the defaults apply):
    padded_vocab_size and dropout (at their fields below), and
    attn_bias: "none" | "alibi" | "lattice": a per-head distance bias -m_h (i - j) on the
        attention scores (ALiBi slopes 2^(-8h/H); lattice slopes 1/p_h, p_h the h-th prime).
    pos_emb: "learned" (transformer.wpe.weight) | "none" (no position parameter: positions
        come only from the causal mask and the bias).
    block_size is the training length, and with learned positions also the longest sequence
    the model accepts; with pos_emb "none" evaluation and sampling may run longer ones."""
    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    # Rows of transformer.wte.weight, >= vocab_size (0: = vocab_size). Rows past vocab_size are
    # padding for the kernels (GPT-2's 50,257 -> 50,304): zero at init, never an input, never
    # scored (the softmax-cross-entropy ignores their logits), never sampled, dropped on export.
    # 0 is resolved here, so dataclasses.replace(cfg, vocab_size=...) keeps the old rows: pass
    # padded_vocab_size=0 with it for an unpadded config.
    padded_vocab_size: int = 0
    # Dropout probability in training (nanoGPT's places: the embedding sum, the attention
    # probabilities, each residual branch); off in evaluation and sampling.
    dropout: float = 0.0
    # Attention distance bias (docs/attention_bias.md) and where positions come from.
    attn_bias: str = "none"
    pos_emb: str = "learned"
    ln_eps: ClassVar[float] = 1e-5  # LayerNorm epsilon (GPT-2's; fixed, not a field)

    def __post_init__(self):
        _int_field(self, "vocab_size", 1)
        _int_field(self, "padded_vocab_size", 0)
        if self.padded_vocab_size == 0:
            self.padded_vocab_size = self.vocab_size
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(f"padded_vocab_size ({self.padded_vocab_size}) must be >= "
                              f"vocab_size ({self.vocab_size})",
                              ["padded_vocab_size", "vocab_size"])
        _int_field(self, "block_size", 1)
        _int_field(self, "n_layer", 1)
        _int_field(self, "n_head", 1)
        _int_field(self, "n_embd", 1)
        for name in ("vocab_size", "padded_vocab_size"):
            if getattr(self, name) > 2**32 - 1:
                raise ConfigError(f"{name} must be < 2**32, got {getattr(self, name)}", [name])
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
                ["n_embd", "n_head"])
        _float_field(self, "dropout", 0.0, 1.0, hi_open=True)
        _choice_field(self, "attn_bias", ATTN_BIASES, f"one of {', '.join(ATTN_BIASES)}")
        _choice_field(self, "pos_emb", POS_EMBS, f"one of {', '.join(POS_EMBS)}")

    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence the model accepts: block_size with learned positions, None
        (no limit) without them."""
        return self.block_size if self.pos_emb == "learned" else None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self) -> int:
        """Parameters as stored (the padded wte rows included)."""
        C, V, L = self.n_embd, self.padded_vocab_size, self.n_layer
        per_block = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * 4 * C + 4 * C) \
            + (4 * C * C + C)
        return V * C + self._wpe_params() + L * per_block + 2 * C

    def _wpe_params(self) -> int:
        return self.block_size * self.n_embd if self.pos_emb == "learned" else 0

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, the PaLM / nanoGPT count: 6 * N (N = parameters without
        wpe; the tied wte counts once, as the classifier, padding included: the GPU computes
        those logits) + 12 * L * C * T for attention (the distance bias, a few operations per
        score, is not counted). llm.c counts attention as 6 * L * C * T (and wpe in N): its
        MFU is lower than this one for the same run."""
        C, L = self.n_embd, self.n_layer
        n = self.num_params() - self._wpe_params()
        return 6 * n + 12 * L * C * seq_len


@dataclass
class TrainConfig(_Config):
    batch_size: int = 8             # sequences per micro-batch
    seq_len: int = 0                # 0 = the model's block_size
    grad_accum_steps: int = 1       # micro-batches per optimizer step
    max_steps: int = 2000
    learning_rate: float = 1e-3     # peak, after warm-up
    min_lr: float = 1e-4            # end of the cosine decay
    warmup_steps: int = 100
    lr_decay_steps: int = 0         # 0 = max_steps
    weight_decay: float = 0.1       # on 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0          # global grad-norm clip; 0 disables
    eval_interval: int = 250        # steps between validation passes; 0 disables
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 500  # 0 = only at the end
    keep_checkpoints: int = 3
    seed: int = 1337
    dtype: str = "float32"
    precision: str = "fp32"         # "fp32" | "bf16" (mixed: bf16 matmul operands, fp32 masters)
    on_nonfinite: str = "stop"      # "stop" | "skip"
    max_nonfinite_skips: int = 5
    cuda_graph: bool = False        # CUDA: capture the whole step in a CUDA graph and replay it
    final_checkpoint: bool = True   # save a checkpoint when the run ends (signals always save)
    # data parallelism (several ranks; docs/distributed.md)
    zero: int = 0                   # 1: ZeRO-1, Adam moments sharded across the ranks
    overlap_comm: bool = True       # reduce gradient buckets while the backward still runs
    bucket_mb: float = 25.0         # gradient bucket size
    dist_timeout: float = 300.0     # seconds without progress before a rank ends the job

    def __post_init__(self):
        for name, lo in (("batch_size", 1), ("seq_len", 0), ("grad_accum_steps", 1),
                         ("max_steps", 0), ("warmup_steps", 0), ("lr_decay_steps", 0),
                         ("eval_interval", 0), ("eval_batches", 1), ("log_interval", 1),
                         ("checkpoint_interval", 0), ("keep_checkpoints", 1), ("seed", 0),
                         ("max_nonfinite_skips", 0)):
            _int_field(self, name, lo)
        _float_field(self, "learning_rate", 0.0, lo_open=True)
        _float_field(self, "min_lr", 0.0)
        _float_field(self, "weight_decay", 0.0)
        _float_field(self, "beta1", 0.0, 1.0, hi_open=True)
        _float_field(self, "beta2", 0.0, 1.0, hi_open=True)
        _float_field(self, "eps", 0.0, lo_open=True)
        _float_field(self, "grad_clip", 0.0)
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must be <= learning_rate "
                              f"({self.learning_rate})", ["min_lr", "learning_rate"])
        _choice_field(self, "dtype", ("float32", "float64"), "'float32' or 'float64'")
        _choice_field(self, "precision", ("fp32", "bf16"), "'fp32' or 'bf16'")
        if self.precision == "bf16" and self.dtype != "float32":
            raise ConfigError("precision 'bf16' needs dtype 'float32' (fp32 master weights)",
                              ["precision", "dtype"])
        _choice_field(self, "on_nonfinite", ("stop", "skip"), "'stop' or 'skip'")
        for name in ("cuda_graph", "final_checkpoint", "overlap_comm"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}",
                                  [name])
            setattr(self, name, bool(getattr(self, name)))
        if isinstance(self.zero, (bool, np.ndarray)) or self.zero not in (0, 1):
            raise ConfigError(f"zero must be 0 or 1, got {self.zero!r}", ["zero"])
        _int_field(self, "zero", 0)
        _float_field(self, "bucket_mb", 0.0, lo_open=True)
        _float_field(self, "dist_timeout", 0.0, lo_open=True)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        decay = self.lr_decay_steps or self.max_steps
        if step >= decay:
            return self.min_lr
        span = max(1, decay - self.warmup_steps)
        ratio = (step - self.warmup_steps) / span
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return self.min_lr + coeff * (self.learning_rate - self.min_lr)
