"""The CLLM model: GPT-2 architecture over arenas, with an activation cache and a full backward.

Parameters, gradients and the two Adam moments each live in one flat buffer ("arena") with the
same layout; every named parameter is a view into it. Parameter gradients accumulate (+=) into
the gradient arena, so K micro-batches sum; activation gradients are written (=) into the
activation cache's scratch.

One batch goes through the model in four calls, the same on both backends:
    batch = model.check_batch(idx, targets)   # host checks: shapes, token ids in range
    B, T = model.set_batch(batch)             # upload into this shape's activation cache
    model.forward(B, T)                       # embeddings, blocks, final LayerNorm
    loss_sum = model.classifier(B, T, dloss)  # logits + softmax-xent, fused with its backward
    model.backward(B, T)                      # the rest of the backward, from d loss / d lnf
forward, classifier and backward only compute: they read the batch from the cache's buffers,
which set_batch (or code that fills `batch_buffers` itself, the CUDA-graph step) has written.

Precision is decided once: the activation cache allocates each buffer in its storage dtype
(bf16 storage for tensors that only matrix products read, when precision="bf16") and every op
reads from the arrays it is handed what to compute.

Inference (logits, last_logits: sampling) runs the same forward into a forward-only
InferenceCache instead: no backward scratch, and one block's buffers for all blocks. Sampling on
the NumPy backend decodes incrementally (Decoder): a prefill forward that keeps each block's K
and V (KVCache), then one position per token.
"""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import ops
from .backend import HostMemory, available_memory, format_bytes, resolve_backend
from .config import ModelConfig, choice
from .errors import CheckpointError, ConfigError, DataError, ModelTooLargeError
from .nvtx_ranges import nvtx_range
from .ops._common import is_device_array
from .ops.host_threads import single_threaded_blas
from .sampling import longest_context

PRECISIONS = ("fp32", "bf16")
ARENA_ALIGN = 64  # elements: every parameter starts on a 256-byte boundary (fp32) for vector loads
# Bytes of logits alive at once in the classifier: cache-sized on the CPU; on the GPU enough for
# GPT-2 124M's whole batch in bf16 (16 K x 50,304 x 2 B = 1.6 GB: one chunk, so one
# wte-gradient GEMM instead of a read-modify-write of the (V, C) gradient per chunk).
CLASSIFIER_CHUNK_BYTES = {"numpy": 4 << 20, "cuda": 2 << 30}

# A block's tensors: (short name used in the code, HF GPT-2 name suffix, shape in units of C)
BLOCK_TENSORS = (
    ("ln1_w", "ln_1.weight", (1,)), ("ln1_b", "ln_1.bias", (1,)),
    ("qkv_w", "attn.c_attn.weight", (1, 3)), ("qkv_b", "attn.c_attn.bias", (3,)),
    ("attn_proj_w", "attn.c_proj.weight", (1, 1)), ("attn_proj_b", "attn.c_proj.bias", (1,)),
    ("ln2_w", "ln_2.weight", (1,)), ("ln2_b", "ln_2.bias", (1,)),
    ("fc_w", "mlp.c_fc.weight", (1, 4)), ("fc_b", "mlp.c_fc.bias", (4,)),
    ("mlp_proj_w", "mlp.c_proj.weight", (4, 1)), ("mlp_proj_b", "mlp.c_proj.bias", (1,)),
)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple
    offset: int
    decay: bool  # AdamW weight decay applies (2-D weights only)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def param_layout(cfg: ModelConfig) -> tuple[list[ParamSpec], int]:
    """HF GPT-2 names and shapes in a fixed order (no wpe with pos_emb "none"); returns
    (specs, arena length). wte has padded_vocab_size rows (the rows past vocab_size are
    padding: see ModelConfig)."""
    C, V = cfg.n_embd, cfg.padded_vocab_size
    shapes = [("transformer.wte.weight", (V, C))]
    if cfg.pos_emb == "learned":
        shapes.append(("transformer.wpe.weight", (cfg.block_size, C)))
    for i in range(cfg.n_layer):
        shapes += [(f"transformer.h.{i}.{suffix}", tuple(C * k for k in units))
                   for _, suffix, units in BLOCK_TENSORS]
    shapes += [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))]
    specs, off = [], 0
    for name, shape in shapes:
        specs.append(ParamSpec(name, shape, off, len(shape) == 2))
        off += int(np.prod(shape))
        off = (off + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN
    return specs, off


def arena_length(cfg: ModelConfig) -> int:
    """param_layout's arena length by arithmetic, without building the layout (a million
    layers take a minute to lay out; this takes no time): each tensor rounded up to
    ARENA_ALIGN elements."""
    def aligned(n):
        return (n + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN
    C = cfg.n_embd
    block = sum(aligned(math.prod(C * k for k in units)) for _, _, units in BLOCK_TENSORS)
    wpe = aligned(cfg.block_size * C) if cfg.pos_emb == "learned" else 0
    return aligned(cfg.padded_vocab_size * C) + wpe + cfg.n_layer * block + 2 * aligned(C)


def parameter_state_bytes(cfg: ModelConfig, dtype, precision: str, on_gpu: bool,
                          adam_moments: bool = True) -> int:
    """Bytes CLLMModel allocates for its parameter state, where the arenas live (the host on
    the NumPy backend): parameters, gradients, the two Adam moments (unless adam_moments is
    False: ZeRO-1's model) and the weight-decay mask in `dtype`, the bf16 weight copy with
    precision "bf16" (in its storage: 2 bytes on the GPU, a float32 on the host); on the NumPy
    backend also the float64 initial values drawn on the host (init_params)."""
    n, itemsize = arena_length(cfg), np.dtype(dtype).itemsize
    copy = np.dtype(ops.bf16_storage_dtype(on_gpu)).itemsize if precision == "bf16" else 0
    total = n * ((5 if adam_moments else 3) * itemsize + copy)
    return total if on_gpu else total + 8 * cfg.num_params()


def memory_available(xp, host: HostMemory | None = None) -> tuple[int | None, str]:
    """(bytes this rank may take, where they are, in words): the GPU's free memory (a device
    per rank), or on the NumPy backend the host's, read now, or with `host` (the ranks of one
    host, read before any of them allocated) one rank's share of it: they all take theirs from
    the same memory."""
    if xp is not np:
        return available_memory(xp), "GPU memory is free"
    if host is None or host.ranks == 1:
        return (available_memory(np) if host is None else host.free,
                "host memory is available (NumPy backend)")
    return host.share, (f"host memory is available to each of the {host.ranks} ranks on one "
                        f"host ({format_bytes(host.free)} between them; NumPy backend)")


def check_kernels_take(cfg: ModelConfig, dtype, xp):
    """ConfigError when the CUDA kernels cannot run cfg in dtype: the LayerNorm backward holds
    a row in registers (n_embd at most 4096 float32, 2048 float64 channels). The trainer
    checks it before it touches the run directory, as CLLMModel does when built: checked only
    there, an --overwrite refused for it had deleted the old run first."""
    if xp is np:
        return
    try:
        ops.layernorm_backward_team(cfg.n_embd, np.dtype(dtype))
    except ValueError as e:
        raise ConfigError(f"n_embd {cfg.n_embd} on the GPU: {e}") from None


# check_model_fits's advice: train's flags (a checkpoint's model is not the user's to shrink)
SMALLER_MODEL_ADVICE = "use a smaller model (--n-layer, --n-embd)"


def check_model_fits(cfg: ModelConfig, dtype, precision: str, xp, adam_moments: bool = True,
                     host: HostMemory | None = None):
    """ModelTooLargeError when the parameter state alone exceeds the memory available
    (memory_available(xp, host)), before anything is built: a huge config fails in a moment
    rather than after minutes of layout (activations come on top of this, per batch shape:
    check_training_fits)."""
    on_gpu = xp is not np
    need = parameter_state_bytes(cfg, dtype, precision, on_gpu, adam_moments)
    free, where = memory_available(xp, host)
    if free is None or need <= free:
        return
    raise ModelTooLargeError(
        f"the model does not fit: {cfg.num_params():,} parameters need {format_bytes(need)} for "
        f"weights, gradients{' and Adam moments' if adam_moments else ''} "
        f"({np.dtype(dtype).name}"
        f"{', bf16 weight copy' if precision == 'bf16' else ''}), but {format_bytes(free)} of "
        f"{where}; {SMALLER_MODEL_ADVICE}")


# CuPy's memory pool rounds every allocation up to a multiple of this many bytes
POOL_ROUND = 512
# Device memory a training step takes beyond the arenas and the activation cache, kept free by
# check_training_fits: cuBLAS's own workspace (32 MiB is its recommended size on Hopper, 4 MiB
# before), the step's temporaries (the loss sum and the grad norm's partials: 16.5 KiB,
# tests/cuda_emulator/capture_memory.py), the per-step values, the kernels' code, and room for
# the pool's fragmentation. 256 MiB: under 1 % of a 40 GB card.
GPU_WORKSPACE_MARGIN = 256 << 20


def separate_mm_storage(dtype, mm_dtype) -> bool:
    """Whether the tensors only matrix products read have storage of their own (mm_dtype: bf16
    storage), rather than being arrays of the model's dtype."""
    return not (np.dtype(mm_dtype) == np.dtype(dtype) and mm_dtype.metadata is None)


def branch_grad_buffered(cfg: ModelConfig, dtype, mm_dtype) -> bool:
    """Whether the activation cache has a dbranch buffer: a residual branch's gradient is
    written there for the branch's GEMMs with dropout (the masked gradient) or bf16 matrix
    products (the copy is the cast); otherwise the GEMMs read the residual stream's gradient
    itself (CLLMModel._branch_grad). ActivationCache allocates by it and
    activation_cache_arrays counts by it."""
    return cfg.dropout > 0 or separate_mm_storage(dtype, mm_dtype)


def _layer_array_bytes(cfg: ModelConfig, B: int, T: int, dtype, mm_dtype) -> list[int]:
    """Bytes of each array LayerActivations(B, T) allocates, in its order."""
    C, H, N = cfg.n_embd, cfg.n_head, B * T
    e, mm = np.dtype(dtype).itemsize, np.dtype(mm_dtype).itemsize
    bf16_attention = ops.attention_bf16_inputs(C // H)
    attn = mm if bf16_attention else e          # qkv, att: bf16 where the kernels read it
    layer = [N * C * e, N * C * mm, N * e, N * e, 3 * N * C * attn, N * C * attn, B * H * T * e]
    if separate_mm_storage(dtype, mm_dtype) and not bf16_attention:
        layer.append(N * C * mm)                # att_mm: the bf16 copy of a float att
    return layer + [N * C * e, N * C * mm, N * e, N * e, 4 * N * C * mm, 4 * N * C * mm]


def activation_cache_arrays(cfg: ModelConfig, B: int, T: int, dtype, mm_dtype,
                            on_gpu: bool) -> list[tuple[int, int]]:
    """[(bytes, count)] of the arrays ActivationCache(cfg, B, T, dtype, mm_dtype) allocates,
    by arithmetic (nothing is made): what ActivationCache and LayerActivations allocate, in
    their order. tests/cuda_emulator/run_cuda_path.py checks it against the allocations of a
    first training step on the fake CuPy."""
    C, H, L, V, N = cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.padded_vocab_size, B * T
    e, mm = np.dtype(dtype).itemsize, np.dtype(mm_dtype).itemsize
    bf16_attention = ops.attention_bf16_inputs(C // H)
    attn = mm if bf16_attention else e          # datt: bf16 where the kernels read it
    layer = _layer_array_bytes(cfg, B, T, dtype, mm_dtype)
    budget = CLASSIFIER_CHUNK_BYTES["cuda" if on_gpu else "numpy"]
    rows = max(1, min(N, budget // max(V * mm, 1)))
    rest = [N * 4, N * 4,                                   # idx, targets (int32)
            N * C * e, N * C * mm, N * e, N * e,            # x_final, lnf and its statistics
            rows * V * mm, N * e,                           # a logits chunk, the losses
            N * C * mm, N * C * mm, N * C * e, N * C * e, N * C * mm,  # dlnf proj dx dx_mid dln
            N * C * attn, 3 * N * C * mm]                   # datt, dqkv
    if on_gpu:
        dq_sums = ops.is_bf16(np.empty(0, mm_dtype)) and bf16_attention  # fp32 dQ sums
        rest.append(4 * ops.attention_backward_scratch_size(B, T, C, H, dq_sums))
        rest.append(e * max(ops.layernorm_backward_scratch_size(N, C),
                            ops.gelu_backward_scratch_size(N, 4 * C),
                            ops.dropout_bias_backward_scratch_size(N, 3 * C)))
    rest.append(4 * N * C * mm)                              # dfc
    if branch_grad_buffered(cfg, dtype, mm_dtype):
        rest.append(N * C * mm)                              # dbranch
    return [(b, L) for b in layer] + [(b, 1) for b in rest]


def inference_cache_arrays(cfg: ModelConfig, B: int, T: int, dtype, mm_dtype,
                           on_gpu: bool) -> list[tuple[int, int]]:
    """[(bytes, count)] of the arrays InferenceCache(cfg, B, T, dtype, mm_dtype) allocates, by
    arithmetic, in its order: one block's LayerActivations (shared by every block), the token
    ids, the branch GEMMs' output and the final LayerNorm's output and statistics (the last
    block's output goes into the shared block input). The same on both backends (on_gpu is
    taken for activation_cache_arrays' signature: no GPU-only scratch here).
    tests/cuda_emulator/run_cuda_path.py checks it against the allocations of last_logits on
    the fake CuPy, tests/test_model.py against the NumPy backend's."""
    C, N = cfg.n_embd, B * T
    e, mm = np.dtype(dtype).itemsize, np.dtype(mm_dtype).itemsize
    rest = [N * 4, N * C * mm, N * C * mm, N * e, N * e]    # idx, proj, lnf and its statistics
    return [(b, 1) for b in _layer_array_bytes(cfg, B, T, dtype, mm_dtype) + rest]


def _pooled_bytes(arrays, on_gpu: bool) -> int:
    """The bytes of [(bytes, count)], each array rounded up as CuPy's pool rounds it on the
    GPU: exactly what the pool hands out for them."""
    def pooled(n):
        return -(-n // POOL_ROUND) * POOL_ROUND if on_gpu else n
    return sum(pooled(b) * count for b, count in arrays)


def activation_cache_bytes(cfg: ModelConfig, B: int, T: int, dtype, mm_dtype,
                           on_gpu: bool) -> int:
    """The bytes of activation_cache_arrays, each array rounded up as CuPy's pool rounds it on
    the GPU: exactly what the pool hands out for the cache."""
    return _pooled_bytes(activation_cache_arrays(cfg, B, T, dtype, mm_dtype, on_gpu), on_gpu)


def inference_cache_bytes(cfg: ModelConfig, B: int, T: int, dtype, mm_dtype,
                          on_gpu: bool) -> int:
    """The bytes of inference_cache_arrays, pool-rounded on the GPU: what last_logits and
    logits allocate for a (B, T) forward."""
    return _pooled_bytes(inference_cache_arrays(cfg, B, T, dtype, mm_dtype, on_gpu), on_gpu)


def _matmul_dtype(dtype, precision: str, on_gpu: bool):
    """The dtype the matrix products' operands are stored in: bf16 storage with precision
    "bf16", else the model's dtype."""
    return ops.bf16_storage_dtype(on_gpu) if precision == "bf16" else np.dtype(dtype)


def check_training_fits(cfg: ModelConfig, dtype, precision: str, xp, batch_size: int, T: int,
                        grad_accum_steps: int = 1, world: int = 1, zero: int = 0,
                        host: HostMemory | None = None, sample_tokens: int = 0,
                        prompt_tokens: int = 1):
    """ModelTooLargeError naming --batch-size when a training step of batch_size sequences of T
    tokens (the micro-batch of one rank: the activation cache's shape) needs more memory than
    is available, before anything is allocated. Counted: the parameter state
    (parameter_state_bytes; with ZeRO-1 the model holds no full Adam moments), data
    parallelism's gradient shard (and ZeRO-1's moment shards), the activation cache
    (activation_cache_bytes) and on the GPU GPU_WORKSPACE_MARGIN, against
    memory_available(xp, host) (with `host`, the NumPy backend's ranks of one host each get
    their share). With sample_tokens > 0, the end-of-run sample after a prompt of
    prompt_tokens tokens: its (1, t) inference cache (inference_cache_bytes: no backward
    scratch, one block's buffers) of the longest context it reads (sampling.longest_context),
    on the NumPy backend with the incremental decoder's key/value cache and step buffers of
    that context (decoder_bytes), replaces the training cache, which is released before it,
    so the larger of the two counts; when the sample's is the one that does not fit, the
    refusal names --sample-tokens, and a batch's refusal names with the largest batch the
    most --sample-tokens that fit where the sample fits at no batch (the advice of one refusal
    passes: no second refusal follows it). On the NumPy backend the ops' temporaries are not
    counted: the check refuses only runs that cannot fit."""
    on_gpu = xp is not np
    free, where = memory_available(xp, host)
    if free is None:
        return
    mm_dtype = _matmul_dtype(dtype, precision, on_gpu)
    itemsize = np.dtype(dtype).itemsize
    sharded = world > 1 and zero  # ZeRO-1: the model is built without the full moments
    state = parameter_state_bytes(cfg, dtype, precision, on_gpu, adam_moments=not sharded)
    # what stays while training: the NumPy backend's float64 initial values are gone by then
    resident = state if on_gpu else state - 8 * cfg.num_params()
    shard = 0
    if world > 1:  # a rank's share of each bucket: at most one element over arena / world
        shard = (arena_length(cfg) // world + cfg.n_layer + 2) * itemsize * (3 if zero else 1)
    margin = GPU_WORKSPACE_MARGIN if on_gpu else 0

    # without the activation cache: the set-up's peak, which no batch or --seq-len changes:
    # the model's build (on the NumPy backend with the initial values), or the state with the
    # shards data parallelism makes after it (the initial values are gone by then)
    build = (state, 0) if state >= resident + shard else (resident, shard)
    fixed = sum(build) + margin
    beside = resident + shard + margin  # what stays beside the training and sample caches

    def sample_cache(tokens):
        ctx = longest_context(prompt_tokens, tokens, cfg.block_size)
        if not ctx:
            return 0
        forward = inference_cache_bytes(cfg, 1, ctx, dtype, mm_dtype, on_gpu)
        # the NumPy backend's incremental decoding (CLLMModel.decoder) holds its KVCache and
        # step buffers beside a prefill's forward cache
        return forward if on_gpu else forward + decoder_bytes(cfg, ctx, dtype, mm_dtype)
    # what the sample's bytes are, as its refusals name them
    sample_caches = "forward-only cache needs" if on_gpu else \
        "forward-only and key/value caches need"

    def need(b):
        cache = activation_cache_bytes(cfg, b, T, dtype, mm_dtype, on_gpu)
        return max(fixed, beside + cache), cache
    if fixed > free:
        _refuse_training_state(cfg, *build, zero, margin, free, where)
    total, cache = need(batch_size)
    if total <= free:
        _check_sample_fits(cfg, free, beside, cache, sample_tokens, prompt_tokens, where,
                           sample_cache, sample_caches)
        return
    # the batch's advice counts the sample: the training cache is released before it, so the
    # most --sample-tokens that fit beside the state fit with any batch that fits
    tokens = _most_sample_tokens(sample_tokens, lambda n: beside + sample_cache(n) <= free)
    if need(1)[0] <= free:  # the largest micro-batch that fits
        lo = _largest_that_fits(lambda b: need(b)[0] <= free, 1, batch_size)
        keep = -(-batch_size * grad_accum_steps // lo)
        advice = (f"use --batch-size {lo} or less and --grad-accum-steps {keep} for about the "
                  f"same batch")
    else:
        advice = "even --batch-size 1 does not fit: use a shorter --seq-len or a smaller model"
    if tokens < sample_tokens:
        advice += _sample_advice(tokens, sample_tokens, sample_cache(sample_tokens),
                                 sample_caches)
    dp = f" + {format_bytes(shard)} gradient shard" if shard else ""
    raise ModelTooLargeError(
        f"--batch-size {batch_size:,} at {T:,} tokens per sequence does not fit: the "
        f"activation cache needs {format_bytes(cache)}, on top of {format_bytes(resident)} of "
        f"parameter state{dp}{f' and {format_bytes(margin)} of workspace' if margin else ''} "
        f"({format_bytes(total)} in all), but {format_bytes(free)} of {where}; {advice}")


def _largest_that_fits(fits, lo: int, hi: int) -> int:
    """The largest n in [lo, hi) for which fits(n) holds, given fits(lo) and not fits(hi), fits
    false from some n on (the memory a batch or a sample needs grows with it)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _most_sample_tokens(sample_tokens, fits):
    """The most --sample-tokens, up to sample_tokens, for which fits(tokens) holds (0 when
    none does; fits(0) is taken to hold): the sample's cache grows with its tokens."""
    if sample_tokens < 1 or fits(sample_tokens):
        return max(sample_tokens, 0)
    return _largest_that_fits(fits, 0, sample_tokens)


def _sample_advice(tokens, sample_tokens, cache, caches_need):
    """The end of a batch refusal's advice when the end-of-run sample fits at no batch: the
    most --sample-tokens that fit (`tokens`), or 0 to skip it."""
    why = (f"(the end-of-run sample of {sample_tokens:,} tokens fits at no batch: its "
           f"{caches_need} {format_bytes(cache)})")
    if tokens:
        return (f", with --sample-tokens {tokens} or less {why} or --sample-tokens 0 to skip "
                f"the sample")
    return f", with --sample-tokens 0 to skip the sample {why} or a shorter --prompt"


def _check_sample_fits(cfg, free, beside, training_cache, sample_tokens, prompt_tokens, where,
                       sample_cache, caches_need):
    """check_training_fits' refusal of an end-of-run sample whose (1, t) forward-only cache
    (sample_cache(tokens): inference_cache_bytes, on the NumPy backend with the decoder's
    decoder_bytes; caches_need: their name in the message), with `beside` (the state, shards and
    workspace that stay), needs more than `free`: the training step fits, so the advice is
    the most --sample-tokens that fits, or 0."""
    def fits(tokens):  # the training cache is released before the sample: the larger counts
        return beside + max(training_cache, sample_cache(tokens)) <= free
    lo = _most_sample_tokens(sample_tokens, fits)
    if lo == max(sample_tokens, 0):
        return
    cache = sample_cache(sample_tokens)
    ctx = longest_context(prompt_tokens, sample_tokens, cfg.block_size)
    advice = (f"use --sample-tokens {lo} or less, or --sample-tokens 0 to skip the sample"
              if lo else "use a shorter --prompt, or --sample-tokens 0 to skip the sample")
    raise ModelTooLargeError(
        f"the end-of-run sample does not fit: --sample-tokens {sample_tokens:,} after a "
        f"{prompt_tokens:,}-token prompt reads up to {ctx:,} tokens at once, whose "
        f"{caches_need} {format_bytes(cache)} (training's activation cache, "
        f"{format_bytes(training_cache)}, is released before it), on top of "
        f"{format_bytes(beside)} of everything else training holds "
        f"({format_bytes(beside + cache)} in all), but {format_bytes(free)} of {where}; {advice}")


def _refuse_training_state(cfg, state, shard, zero, margin, free, where):
    """check_training_fits' refusal when the memory is short before any activation: the
    parameter state with data parallelism's shards (ZeRO-1's model holds no full moments: the
    moment shards are its only ones) and the workspace. No --batch-size or --seq-len helps
    then."""
    what = "gradient shard and ZeRO-1 moment shards" if zero else "gradient shard"
    dp = f" + {format_bytes(shard)} of {what}" if shard else ""
    raise ModelTooLargeError(
        f"the model does not fit for training: {cfg.num_params():,} parameters need "
        f"{format_bytes(state)} of parameter state{dp}"
        f"{f' + {format_bytes(margin)} of workspace' if margin else ''}"
        f" ({format_bytes(state + shard + margin)} in all) before any activation, but "
        f"{format_bytes(free)} of {where}; no --batch-size fits: use a smaller model (--n-layer, "
        f"--n-embd)")


def check_eval_fits(cfg: ModelConfig, dtype, precision: str, xp, batch_size: int, T: int,
                    batches: int | None, length_flag: str = "--seq-len"):
    """ModelTooLargeError naming --batch-size when the activation cache of an evaluation batch
    (batch_size sequences of T tokens: what eval_loss_sum's forward fills) does not fit in the
    memory available now, with the model already loaded, before the cache is allocated. On the
    NumPy backend NumPy takes each array of a too large cache lazily and the kernel's
    out-of-memory killer ended the run in the forward, with no line. The advice keeps about
    the same tokens: a batch that fits, and --batches for the rest (batches None: a command
    of one batch, gradcheck's; length_flag: the flag that sets T there)."""
    on_gpu = xp is not np
    free, where = memory_available(xp)
    if free is None:
        return
    mm_dtype = _matmul_dtype(dtype, precision, on_gpu)
    margin = GPU_WORKSPACE_MARGIN if on_gpu else 0

    def need(b):
        return activation_cache_bytes(cfg, b, T, dtype, mm_dtype, on_gpu) + margin
    if need(batch_size) <= free:
        return
    if need(1) <= free:  # the largest batch that fits
        lo = _largest_that_fits(lambda b: need(b) <= free, 1, batch_size)
        # the flags' values as they are typed (no thousands separator: `--batch-size 94,931`
        # is no int)
        advice = (f"use --batch-size {lo} or less" if batches is None else
                  f"use --batch-size {lo} or less and --batches "
                  f"{-(-batch_size * batches // lo)} for about the same tokens")
    else:
        advice = f"even --batch-size 1 does not fit: use a shorter {length_flag}"
    raise ModelTooLargeError(
        f"--batch-size {batch_size:,} at {T:,} tokens per sequence does not fit: its "
        f"activation cache needs {format_bytes(need(batch_size) - margin)}"
        f"{f' and {format_bytes(margin)} of workspace' if margin else ''}, but "
        f"{format_bytes(free)} of {where} beside the model; {advice}")


class Arena:
    """One flat buffer plus named views into it, laid out by `param_layout`; `blocks[l]` holds
    block l's views by short name (`arena.blocks[l].qkv_w` is transformer.h.l.attn.c_attn.weight)."""

    def __init__(self, xp, specs, length, dtype, n_layer):
        self.data = xp.zeros(length, dtype=dtype)
        self.views = {s.name: self.data[s.offset:s.offset + s.size].reshape(s.shape) for s in specs}
        self.blocks = [BlockTensors(self, l) for l in range(n_layer)]

    def __getitem__(self, name):
        return self.views[name]


class BlockTensors:
    """One transformer block's tensors in one arena, by short name (see BLOCK_TENSORS)."""
    __slots__ = tuple(field for field, _, _ in BLOCK_TENSORS)

    def __init__(self, arena, l):
        for field, suffix, _ in BLOCK_TENSORS:
            setattr(self, field, arena[f"transformer.h.{l}.{suffix}"])


class LayerActivations:
    """What block l's backward reads, saved by its forward. x: the block's input (B, T, C);
    x_mid: after the attention half; ln*, fc_gelu: matrix-product inputs (storage `mm`); fc:
    c_fc's product without its bias (storage `mm`: the GEMM writes it, GELU reads it);
    qkv, att: in storage `mm` where the attention kernels read bf16
    (ops.attention_bf16_inputs), else float; att_mm: the attention output as the projection's
    operand (att itself, or att's bf16 copy in bf16 mode with a float att)."""

    def __init__(self, e, m, B, T, cfg):
        C, H = cfg.n_embd, cfg.n_head
        N = B * T
        self.x = e(B, T, C)
        self.ln1, self.ln1_mean, self.ln1_rstd = m(B, T, C), e(N), e(N)
        bf16_attention = ops.attention_bf16_inputs(C // H)
        self.qkv = (m if bf16_attention else e)(B, T, 3 * C)
        # the attention output: one bf16 array where the tensor-core kernels run (the
        # projection's operand and the backward's O); else float, plus a bf16 copy in bf16
        self.att, self.lse = (m if bf16_attention else e)(B, T, C), e(B, H, T)
        self.att_mm = m(B, T, C) if m is not e and not bf16_attention else self.att
        self.x_mid = e(B, T, C)
        self.ln2, self.ln2_mean, self.ln2_rstd = m(B, T, C), e(N), e(N)
        self.fc = m(B, T, 4 * C)          # c_fc's product (GELU adds the bias), GELU's input
        self.fc_gelu = m(B, T, 4 * C)


class ActivationCache:
    """Every tensor the backward pass reads, plus the scratch it writes, for one (B, T).

    dtype: the float dtype of the model; mm_dtype: the storage of tensors whose only readers
    are matrix products (bf16 storage with precision="bf16", else dtype)."""

    def __init__(self, xp, cfg: ModelConfig, B: int, T: int, dtype, mm_dtype):
        C, L, V = cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size
        N = B * T
        e = lambda *shape: xp.empty(shape, dtype=dtype)  # noqa: E731
        m = e if not separate_mm_storage(dtype, mm_dtype) \
            else (lambda *shape: xp.empty(shape, dtype=mm_dtype))  # noqa: E731
        self.B, self.T = B, T
        self.idx = xp.empty((B, T), dtype=np.int32)
        self.targets = xp.empty((B, T), dtype=np.int32)
        self.layers = [LayerActivations(e, m, B, T, cfg) for _ in range(L)]
        self.x_final = e(B, T, C)                          # the last block's output
        self.lnf, self.lnf_mean, self.lnf_rstd = m(B, T, C), e(N), e(N)
        # The classifier runs over row chunks: only (rows, V) logits exist at a time (in the
        # matrix products' storage: bf16 in bf16), turned into dlogits in place and consumed
        # at once.
        budget = CLASSIFIER_CHUNK_BYTES["numpy" if xp is np else "cuda"]
        self.classifier_rows = max(1, min(N, budget // max(V * np.dtype(mm_dtype).itemsize, 1)))
        self.logits = m(self.classifier_rows, V)
        self.losses = e(N)
        # backward scratch (activation gradients are written, not accumulated)
        # d loss / d (lnf, ln_1, ln_2): written by the classifier's and c_fc's, c_attn's backward
        # GEMMs in their storage (bf16 in bf16: the rounding PyTorch autocast makes), read once
        # by a LayerNorm backward
        self.dlnf = m(B, T, C)
        self.proj = m(B, T, C)   # a branch's last GEMM output (attn / mlp c_proj), no bias yet
        self.dx = e(B, T, C)                               # d loss / d (a block's output, input)
        self.dx_mid = e(B, T, C)
        self.dln = m(B, T, C)
        # the attention's dout, written by c_proj's backward GEMM: bf16 where qkv is (rounded
        # once by the GEMM, as the attention kernels would round it)
        self.datt = (m if ops.attention_bf16_inputs(C // cfg.n_head) else e)(B, T, C)
        # d loss / d qkv in c_attn's GEMMs' storage: the attention backward writes it (bf16 in
        # bf16, rounded by the kernels) and c_attn's bias gradient is its column sums
        self.dqkv = m(B, T, 3 * C)
        # the CUDA attention backward's workspace (Delta; the tensor-core kernels' fp32 dQ
        # sums for a bf16 dqkv with the atomic-dq backward), one for all layers: made here, not
        # per launch, so that a CUDA-graph capture (which holds every block it allocates until
        # it ends) allocates none of it
        dq_sums = ops.is_bf16(self.dqkv) and ops.attention_bf16_inputs(C // cfg.n_head)
        self.attn_scratch = None if xp is np else xp.empty(
            ops.attention_backward_scratch_size(B, T, C, cfg.n_head, dq_sums), dtype=np.float32)
        # the column sums' per-chunk partials of the LayerNorm, GELU and dropout-bias backwards
        # (bias and LayerNorm parameter gradients), one for all of a step's calls (they run in
        # order on one stream), for the same reason; the widest is the GELU's, over 4C columns
        self.colsum_scratch = None if xp is np else xp.empty(max(
            ops.layernorm_backward_scratch_size(N, C), ops.gelu_backward_scratch_size(N, 4 * C),
            ops.dropout_bias_backward_scratch_size(N, 3 * C)), dtype=dtype)
        # d loss / d gelu output, written by the MLP projection's backward GEMM (in its storage)
        # and turned into d loss / d c_fc output in place by the GELU backward
        self.dfc = m(B, T, 4 * C)
        # a residual branch's (masked) gradient, as its GEMMs read it; None where they read
        # the residual stream's gradient itself (float matrix products, no dropout)
        self.dbranch = m(N, C) if branch_grad_buffered(cfg, dtype, mm_dtype) else None
        self.dropout = None                                # the last forward's DropoutContext
        self.stage = HostStaging(xp)
        self.kv = None                                     # training and eval: no KVCache


class InferenceCache:
    """What a forward alone writes for one (B, T), for inference (CLLMModel.logits and
    last_logits): the token ids, ONE block's LayerActivations that every block uses in turn,
    the branch GEMMs' output (proj) and the final LayerNorm's output and statistics. No
    targets, classifier logits chunk, losses or backward scratch: nothing runs after the
    forward but the caller's GEMM of lnf with wte.

    One set of block buffers is safe because the forward of block l reads only what block l
    wrote and its input (x, ln1 and its statistics), which block l - 1 (or the embeddings)
    wrote as its last op; block l's last op (the MLP's residual add and the next LayerNorm)
    reads x_mid and proj and writes x, ln1, ln1_mean, ln1_rstd, none of which it reads, and
    every earlier reader of x and ln1 in block l ran before it (in order on the host, or on
    the one CUDA stream). The last block's output goes into that x as well (x_final: nothing
    reads it after the final LayerNorm, which the same op computes). A backward would need
    every block's buffers: eval and training use ActivationCache."""

    def __init__(self, xp, cfg: ModelConfig, B: int, T: int, dtype, mm_dtype):
        C, N = cfg.n_embd, B * T
        e = lambda *shape: xp.empty(shape, dtype=dtype)  # noqa: E731
        m = e if not separate_mm_storage(dtype, mm_dtype) \
            else (lambda *shape: xp.empty(shape, dtype=mm_dtype))  # noqa: E731
        self.B, self.T = B, T
        block = LayerActivations(e, m, B, T, cfg)
        self.layers = [block] * cfg.n_layer
        self.idx = xp.empty((B, T), dtype=np.int32)
        self.proj = m(B, T, C)
        self.x_final = block.x
        self.lnf, self.lnf_mean, self.lnf_rstd = m(B, T, C), e(N), e(N)
        self.dropout = None                                # inference: never a mask
        self.stage = HostStaging(xp)
        self.kv = None      # a KVCache while a decoder's prefill or step runs in this cache


class KVCache:
    """Every block's attention keys and values of the tokens decoded so far (Decoder): (1, H,
    capacity, D) float arrays per block, as the attention's matrix products read them
    (ops.attention_keys_values: bf16-rounded values where a bf16 model's attention rounds its
    operands). stepping False: a prefill forward runs the full attention and keep() copies
    its K, V; True: a step of one position appends its K, V and attends over the kept ones."""

    def __init__(self, model, capacity: int):
        cfg = model.cfg
        H, D = cfg.n_head, cfg.n_embd // cfg.n_head
        self.n_head, self.precision, self.slopes = H, model.precision, model.attn_slopes
        self.k = [model.xp.empty((1, H, capacity, D), dtype=model.dtype)
                  for _ in range(cfg.n_layer)]
        self.v = [model.xp.empty_like(k) for k in self.k]
        self.length = 0          # the positions kept (a forward sets it when it ends)
        self.stepping = False

    def keep(self, l, qkv):
        """A prefill's block l: the K, V of its (1, T, 3C) qkv into positions [0, T)."""
        k, v = ops.attention_keys_values(qkv, self.n_head, self.precision)
        T = k.shape[2]
        self.k[l][:, :, :T], self.v[l][:, :, :T] = k, v

    def attend(self, l, qkv, att, att_mm):
        """A step's block l: the new position's K, V appended, its attention output (1, 1, C)
        written into att (float, or bf16 storage) and, where it is another array, its bf16 copy
        att_mm, as attention_forward writes them."""
        t = self.length + 1
        k, v = ops.attention_keys_values(qkv, self.n_head, self.precision)
        self.k[l][:, :, t - 1:t], self.v[l][:, :, t - 1:t] = k, v
        y = ops.attention_decode_ref(qkv, self.k[l][:, :, :t], self.v[l][:, :, :t],
                                     self.n_head, self.precision, self.slopes)
        if ops.is_bf16(att):
            ops.to_bf16(y, out=att)
        else:
            att[...] = y
            if att_mm is not att:
                ops.to_bf16(y, out=att_mm)


def kv_cache_bytes(cfg: ModelConfig, T: int, dtype) -> int:
    """The bytes of a KVCache of T positions: each block's K and V in the model's dtype."""
    return 2 * cfg.n_layer * T * cfg.n_embd * np.dtype(dtype).itemsize


def decoder_bytes(cfg: ModelConfig, T: int, dtype, mm_dtype) -> int:
    """What a Decoder of capacity T allocates (NumPy backend): its KVCache and its one-position
    step buffers (a (1, 1) InferenceCache)."""
    return kv_cache_bytes(cfg, T, dtype) + inference_cache_bytes(cfg, 1, 1, dtype, mm_dtype,
                                                                 False)


class Decoder:
    """Next-token logits of a context that grows by one token per call (sampling.sample_tokens),
    by incremental decoding: a prefill forward of a context (CLLMModel.last_logits' forward,
    keeping each block's K, V in a KVCache of `capacity` positions), then one position per
    call through every block (CLLMModel._decode_step): O(t) work per token where the full
    forward is O(t^2) attention and t rows of every matrix product. A context that is not the
    kept one plus one token (the first; a window that slid past block_size, whose positions
    all shifted) is a prefill again: the full forward of it, as last_logits always did."""

    def __init__(self, model, capacity: int):
        self.model = model
        self.kv = KVCache(model, capacity)
        self.step = InferenceCache(model.xp, model.cfg, 1, 1, model.dtype, model.mm_dtype)
        self.ids: list[int] = []            # the tokens whose K, V are kept

    def next_logits(self, ctx) -> np.ndarray:
        """(1, vocab_size) host logits of the token after ctx (a list of ids). A context
        last_logits refuses is refused (past block_size with learned positions); one past the
        capacity is last_logits' full forward (a step there has no room for its K, V)."""
        m, n, capacity = self.model, len(self.ids), self.kv.k[0].shape[2]
        batch = m.check_batch(np.asarray(ctx)[None, :])
        if n and len(ctx) == n + 1 and n < capacity and ctx[:n] == self.ids:
            m.release_last_logits_cache()   # the prefill's (1, t) cache: not needed again
            # the last id of the context checked above: checked already
            token = Batch(np.ascontiguousarray(batch.idx[:, -1:]), None, 0)
            # kept again once the step ended: one interrupted after it appended K, V and
            # counted the position leaves kv past ids, and a step from there is wrong
            ids, self.ids = self.ids, []
            out = m._decode_step(self.kv, self.step, token)
            ids.append(int(ctx[-1]))
            self.ids = ids
            return out
        self.ids = []
        if len(ctx) > capacity:
            return m.last_logits(batch.idx)   # past the capacity: nothing to keep
        out = m._last_logits(batch, self.kv)
        self.ids = [int(i) for i in ctx]
        return out


@dataclass(frozen=True)
class Batch:
    """Token ids checked against a model (CLLMModel.check_batch): idx and targets (B, T) int32
    host arrays (targets None for inference; -1 marks an ignored target), and n_valid, the
    number of targets that count."""
    idx: np.ndarray
    targets: np.ndarray | None
    n_valid: int

    @property
    def shape(self):
        return self.idx.shape


@dataclass(frozen=True)
class DropoutContext:
    """What a training forward's dropout masks are keyed by (ops/dropout.py): the run's seed,
    the optimizer step (an int, or the step buffer's float64 slot, so that a CUDA-graph replay
    draws each step's masks) and the micro-batch's index in the global batch."""
    seed: int
    step: object
    micro: int = 0

    def key(self, layer: int, site: int) -> ops.DropoutKey:
        return ops.DropoutKey(self.seed, self.step, ops.site_id(layer, site), self.micro)


class HostStaging:
    """Host -> device copies that do not make the host wait for the GPU (token ids, the
    per-step values).

    A plain copy from pageable memory waits for the stream to drain (a sync every step). On the
    CUDA path the values go through pinned host buffers with an asynchronous copy instead; two
    buffers per destination alternate, and a buffer is refilled only after the event recorded
    behind its previous copy has fired (so the host runs at most two steps ahead there).

    A buffer also outlives its HostStaging until its last copy has run (`_IN_FLIGHT`): CuPy's
    pinned pool hands a freed block to the next `empty_pinned` of its size class at once, so an
    evicted cache's pending copy would otherwise read the next cache's ids.

    A slot is found by its destination's id() and holds the destination, so no other array can
    take that id while the slot lives; a HostStaging keeps a slot per destination it ever saw,
    so an owner whose destinations change drops it with them (cuda_graph.StepGraph._rekey)."""

    # (event, pinned buffer) of copies that may still be reading their buffer, oldest first
    _IN_FLIGHT: collections.deque = collections.deque()

    def __init__(self, xp):
        self.xp = xp
        self.slots = {}

    def upload(self, dst, host):
        if self.xp is np or hasattr(host, "__cuda_array_interface__"):
            dst[...] = host.reshape(dst.shape)  # host -> host, or already on the device
            return
        import cupy
        import cupyx
        in_flight = HostStaging._IN_FLIGHT
        while in_flight and in_flight[0][0].done:  # before allocating: released blocks reused
            in_flight.popleft()
        key = (id(dst), dst.shape)
        slots = self.slots.get(key)
        if slots is None:
            slots = self.slots[key] = {
                "bufs": [cupyx.empty_pinned(dst.shape, dtype=dst.dtype) for _ in range(2)],
                "events": [None, None], "next": 0, "dst": dst}
        i = slots["next"]
        slots["next"] = 1 - i
        if slots["events"][i] is not None:
            slots["events"][i].synchronize()
        buf = slots["bufs"][i]
        np.copyto(buf, host.reshape(dst.shape), casting="unsafe")
        stream = cupy.cuda.get_current_stream()
        dst.set(buf, stream=stream)
        ev = cupy.cuda.Event(disable_timing=True)
        ev.record(stream)
        slots["events"][i] = ev
        in_flight.append((ev, buf))


def init_params(cfg: ModelConfig, seed: int) -> dict:
    """GPT-2 initialisation, drawn on the host in float64 so every backend and dtype starts from
    the same numbers: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 * n_layer),
    zero biases, unit LayerNorm gains."""
    rng = np.random.default_rng(seed)
    specs, _ = param_layout(cfg)
    out = {}
    for s in specs:
        if s.name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            out[s.name] = np.ones(s.shape)
        elif len(s.shape) == 1:
            out[s.name] = np.zeros(s.shape)
        else:
            std = 0.02
            if s.name.endswith("c_proj.weight"):
                std /= math.sqrt(2 * cfg.n_layer)
            # wte: only the vocabulary's rows are drawn, the padding is zero, so a padded
            # model starts from the numbers of the unpadded one with the same seed
            rows = cfg.vocab_size if s.name == "transformer.wte.weight" else s.shape[0]
            out[s.name] = np.zeros(s.shape)
            out[s.name][:rows] = rng.normal(0.0, std, size=(rows,) + s.shape[1:])
    return out


def _blas_held_on_host(method):
    """On the NumPy backend the method runs with BLAS held at one thread (ops/host_threads.py):
    between the ops' parallel regions BLAS's own idle threads would spin on the cores the ops'
    threads use. Nested holds (a training step's) are counted, not repeated."""
    @functools.wraps(method)
    def held(self, *args, **kwargs):
        with self.host_blas_held():
            return method(self, *args, **kwargs)
    return held


class CLLMModel:
    """A GPT-2 style model of a ModelConfig (docs/design.md, Python API).

    backend: "numpy", "cuda" or "auto" (CUDA where CuPy and a GPU are present); dtype:
    "float32" or "float64", of the parameters and the computation; seed: the initial weights'
    (drawn in float64: every backend and dtype starts from the same numbers, rounded).
    The API: state_dict() (host copies, HF GPT-2 names), load_state_dict(sd) (strict),
    loss_and_grads(idx, targets) ((B, T) int token ids, targets -1 ignored: the mean loss and
    {name: gradient}), logits(idx) ((B, T, vocab_size)). Bad input raises a CLLMError
    subclass (ConfigError, DataError, CheckpointError)."""

    def __init__(self, cfg: ModelConfig, backend: str = "auto", dtype: str = "float32",
                 seed: int = 0, precision: str = "fp32", adam_moments: bool = True):
        """precision: "fp32" computes everything in `dtype`; "bf16" (dtype float32 only) is
        mixed precision: the matrix products take bf16 copies of their operands (weights
        refreshed after each optimizer step, activations and gradients cast where produced)
        and accumulate in fp32 (tensor cores on the GPU); parameters, gradients, Adam moments,
        LayerNorm, softmax and the residual stream stay float32.
        adam_moments=False: no moment arenas (adam_m, adam_v are None), for a model whose
        optimizer state lives elsewhere: ZeRO-1's DataParallel holds the rank's shards."""
        if not isinstance(cfg, ModelConfig):
            raise ConfigError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        # a copy, validated again: the caller's object may be changed after (the next model
        # built from it), and these arenas stay the shape of this one
        cfg = dataclasses.replace(cfg)
        # as TrainConfig's fields: a 0-d array (np.array("fp32") equals "fp32") was kept as
        # the model's precision, and one for dtype failed in np.dtype with a TypeError
        dtype = choice("dtype", dtype, ("float32", "float64"), "'float32' or 'float64'")
        precision = choice("precision", precision, PRECISIONS,
                           f"one of {', '.join(PRECISIONS)}")
        if precision == "bf16" and dtype != "float32":
            raise ConfigError("precision 'bf16' needs dtype 'float32' (fp32 master weights)")
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) \
                or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        self.cfg = cfg
        self.precision = precision
        self.backend, self.xp = resolve_backend(backend)
        self.dtype = np.dtype(dtype)
        check_kernels_take(cfg, self.dtype, self.xp)
        # the storage of what only matrix products read: bf16 copies, or the float dtype itself
        self.mm_dtype = _matmul_dtype(self.dtype, precision, self.xp is not np)
        check_model_fits(cfg, self.dtype, precision, self.xp, adam_moments)
        self.specs, self.arena_size = param_layout(cfg)
        # where each block's and ln_f's tensors start in the arenas (the backward reports
        # gradients final from these offsets on: data parallelism's buckets)
        offset = {s.name: s.offset for s in self.specs}
        self.block_offsets = [offset[f"transformer.h.{l}.ln_1.weight"] for l in range(cfg.n_layer)]
        self.lnf_offset = offset["transformer.ln_f.weight"]
        arena = lambda dt: Arena(self.xp, self.specs, self.arena_size, dt, cfg.n_layer)  # noqa: E731
        self.params = arena(self.dtype)
        # the weights the matrix products read: a bf16 copy, or the parameters themselves
        self.params_mm = arena(self.mm_dtype) if precision == "bf16" else self.params
        self.grads = arena(self.dtype)
        self.adam_m = arena(self.dtype) if adam_moments else None
        self.adam_v = arena(self.dtype) if adam_moments else None
        mask = np.zeros(self.arena_size, dtype=self.dtype)
        for s in self.specs:
            if s.decay:
                mask[s.offset:s.offset + s.size] = 1.0
        self.decay_mask = self.xp.asarray(mask)
        # the attention's distance bias: per-head slopes in the model's dtype, or None
        slopes = ops.attention_slopes(cfg.attn_bias, cfg.n_head)
        self.attn_slopes = None if slopes is None else self.xp.asarray(slopes, dtype=self.dtype)
        self.load_state_dict(init_params(cfg, seed))
        self._caches: dict = {}
        self._last_logits_key = None  # the key of last_logits' cache in _caches
        self._training_key = None     # the (B, T) of the last backward: the cache kept longest

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {s.name: self._to_host(self.params[s.name]).copy() for s in self.specs}

    def load_state_dict(self, sd: dict):
        """Strict: unknown, missing or mis-shaped entries, and entries that are not real
        numbers (strings, objects, complex), raise CheckpointError before anything is
        written. Real dtypes (floats, integers, bool) are converted to the model's, as
        torch's load_state_dict does; values are taken as they are (non-finite included)."""
        if not isinstance(sd, collections.abc.Mapping):
            raise CheckpointError(f"expected a state dict {{name: array}}, got "
                                  f"{type(sd).__name__}")
        names = {s.name for s in self.specs}
        unknown = sorted(set(sd) - names)
        missing = sorted(names - set(sd))
        if unknown:
            raise CheckpointError(f"unknown parameter(s): {', '.join(unknown[:5])}")
        if missing:
            raise CheckpointError(f"missing parameter(s): {', '.join(missing[:5])}")
        host = {s.name: self._checked_entry(s, sd[s.name]) for s in self.specs}
        for s in self.specs:
            self.params[s.name][...] = self.xp.asarray(host[s.name], dtype=self.dtype)
        self.params_updated()

    @staticmethod
    def _checked_entry(spec, a) -> np.ndarray:
        """One load_state_dict entry as a host array of real numbers in spec's shape."""
        try:
            if hasattr(a, "__cuda_array_interface__") and callable(getattr(a, "get", None)):
                a = a.get()  # a CuPy array: CuPy refuses np.asarray's implicit copy to the host
            a = np.asarray(a)
        except (TypeError, ValueError, RuntimeError) as e:  # e.g. a torch tensor needing grad
            raise CheckpointError(f"{spec.name}: not an array ({e})") from None
        if tuple(a.shape) != spec.shape:
            raise CheckpointError(f"{spec.name}: expected shape {spec.shape}, got {tuple(a.shape)}")
        # float64 takes every real dtype (bool, ints, floats) by value; complex, object,
        # strings are not a parameter's values (they would drop their imaginary part, turn
        # None into NaN, or fail half-way through the copy)
        if not np.can_cast(a.dtype, np.float64, casting="same_kind"):
            raise CheckpointError(f"{spec.name}: expected real numbers, got dtype {a.dtype}")
        return a

    def host_blas_held(self):
        """A context holding BLAS at one thread on the NumPy backend (ops/host_threads.py);
        nothing on the GPU."""
        return single_threaded_blas() if self.xp is np else contextlib.nullcontext()

    def params_updated(self):
        """Call after changing the parameter arena in place (loading weights, ZeRO's sharded
        update and all-gather): refreshes the copies derived from it (the bf16 weights of
        precision="bf16") with one cast pass over the arena. `adamw_update` needs no call: its
        launch writes the copy itself."""
        if self.params_mm is not self.params:
            ops.to_bf16(self.params.data, out=self.params_mm.data)

    def adamw_update(self, hyper, beta1, beta2, eps):
        """AdamW over the whole arena in one launch (ops.adamw_update; hyper: the step's (5,)
        values on the model's side). A bf16 model's weight copy is written by the same launch,
        from each updated parameter, instead of by a cast pass re-reading the arena after it."""
        if self.adam_m is None:
            raise ConfigError("this model holds no Adam moments (adam_moments=False: ZeRO-1's "
                              "DataParallel.adamw_update updates its shards)")
        bf16 = self.params_mm.data if self.params_mm is not self.params else None
        ops.adamw_update(self.params.data, self.grads.data, self.adam_m.data, self.adam_v.data,
                         self.decay_mask, hyper, beta1, beta2, eps, params_bf16=bf16)

    def named_grads(self) -> dict:
        return {s.name: self._to_host(self.grads[s.name]).copy() for s in self.specs}

    def _to_host(self, a):
        return a.get() if is_device_array(a) else a

    def zero_grad(self):
        self.grads.data.fill(0)

    # ---------------------------------------------------------------- the batch seam
    def check_batch(self, idx, targets=None) -> Batch:
        """Validate token ids on the host: (B, T) integers with 1 <= T <= cfg.max_seq_len
        (block_size with learned positions, any T without), ids in [0, vocab_size) (targets
        may be -1: ignored). Raises DataError naming what is wrong."""
        idx = self._check_tokens("idx", idx, False)
        n_valid = 0
        if targets is not None:
            targets = self._check_tokens("targets", targets, True)
            if targets.shape != idx.shape:
                raise DataError(f"targets: expected shape {idx.shape}, got {targets.shape}")
            n_valid = int((targets >= 0).sum())
        return Batch(idx, targets, n_valid)

    def set_batch(self, batch: Batch) -> tuple[int, int]:
        """Upload a checked batch into the activation cache of its shape (created on first
        use); returns (B, T) for forward / classifier / backward."""
        if not isinstance(batch, Batch):
            raise TypeError("set_batch: expected a Batch from check_batch()")
        B, T = batch.shape
        c = self._cache_for(B, T)
        c.stage.upload(c.idx, batch.idx)
        if batch.targets is not None:
            c.stage.upload(c.targets, batch.targets)
        return B, T

    def batch_buffers(self, B: int, T: int):
        """(idx, targets): the (B, T) int32 arrays forward and classifier read the batch from,
        for code that fills them itself (the CUDA-graph step copies micro-batches into them on
        the device); check the ids with check_batch first."""
        c = self._cache_for(B, T)
        return c.idx, c.targets

    def _cache_for(self, B, T, inference=False) -> ActivationCache | InferenceCache:
        """The cache of (B, T), made on first use: a training one (key (B, T)), or with
        inference=True a forward-only InferenceCache (key ("inference", B, T))."""
        key = ("inference", B, T) if inference else (B, T)
        c = self._caches.get(key)
        if c is None:
            if len(self._caches) >= 2:  # keep the training shape and one other (eval/sampling)
                self._caches.pop(self._eviction_victim())
            kind = InferenceCache if inference else ActivationCache
            c = kind(self.xp, self.cfg, B, T, self.dtype, self.mm_dtype)
            self._caches[key] = c
        return c

    def _eviction_victim(self):
        """The key of the cache to drop for a new one: a forward-only cache first (a fraction
        of a training cache to make again; logits and last_logits use one at a time), then
        one that is not the last backward's (an evaluation's: the next training step needs
        the backward's, and on the GPU its CUDA graph points into it), then the oldest.
        Dropping the oldest alone dropped the training cache when a sample followed logits,
        and when logits or a second evaluation shape followed an evaluation at another shape
        (the next step rebuilt it: with --cuda-graph, a warm-up step and a second capture)."""
        keys = list(self._caches)
        return next((k for k in keys if k[0] == "inference"),
                    next((k for k in keys if k != self._training_key), keys[0]))

    def release_activations(self):
        """Drop every cache, training and forward-only (their memory goes back to the pool; the
        next batch of a shape builds its cache again): the trainer's final sample needs none
        of training's, and the step after it none of the sample's."""
        self._caches.clear()

    def _cache(self, B, T) -> ActivationCache:
        c = self._caches.get((B, T))
        if c is None:
            raise ValueError(f"no batch of shape {(B, T)} was set (call set_batch first)")
        return c

    def _check_tokens(self, name, a, allow_ignore) -> np.ndarray:
        try:
            a = a.get() if is_device_array(a) else np.asarray(a)
        except ValueError:  # NumPy's "inhomogeneous shape" of a ragged list
            raise DataError(f"{name}: expected shape (B, T): rows of different lengths") \
                from None
        if a.ndim != 2:
            raise DataError(f"{name}: expected shape (B, T), got {tuple(a.shape)}")
        if a.dtype.kind not in "iu":
            raise DataError(f"{name}: expected integer token ids, got {a.dtype}")
        B, T = a.shape
        if B < 1 or T < 1:
            raise DataError(f"{name}: empty batch {tuple(a.shape)}")
        if self.cfg.max_seq_len is not None and T > self.cfg.max_seq_len:
            raise DataError(f"{name}: sequence length {T} exceeds block_size {self.cfg.block_size} "
                            f"(learned position embeddings end there; a model trained with "
                            f"pos_emb 'none' takes longer sequences)")
        lo, hi = int(a.min()), int(a.max())
        if hi >= self.cfg.vocab_size or lo < (-1 if allow_ignore else 0):
            bad = hi if hi >= self.cfg.vocab_size else lo
            raise DataError(f"{name}: token id {bad} out of range [0, {self.cfg.vocab_size})")
        return np.ascontiguousarray(a, dtype=np.int32)

    # ---------------------------------------------------------------- passes
    def forward(self, B: int, T: int, dropout: DropoutContext | None = None):
        """Embeddings, the blocks and the final LayerNorm of the batch set for (B, T), into its
        activation cache (`lnf` is the classifier's input). dropout: a training forward's mask
        key (with cfg.dropout > 0, nanoGPT's places: the embedding sum, the attention
        probabilities, each residual branch); None (evaluation): no dropout. The
        backward uses the same masks, regenerated."""
        self._forward(self._cache(B, T), dropout)

    @_blas_held_on_host
    def _forward(self, c, dropout: DropoutContext | None, position: int = 0):
        """forward into the cache c (an ActivationCache, or an InferenceCache whose blocks share
        one set of buffers: the order of the reads and writes here is what makes that safe).
        position: the position of c's first token (a decoding step's: KVCache), 0 otherwise."""
        P = self.params
        c.dropout = dropout if self.cfg.dropout > 0 else None
        wpe = P.views.get("transformer.wpe.weight")
        if wpe is not None and position:
            wpe = wpe[position:]               # rows from the token's position on: contiguous
        with nvtx_range("forward"):
            x0, p0 = c.layers[0].x, self.params.blocks[0]
            ops.embedding_forward(c.idx, P["transformer.wte.weight"], wpe, out=x0)
            ops.dropout(x0, *self._drop(c, 0, ops.EMBED), out=x0)
            ops.layernorm_forward(x0, p0.ln1_w, p0.ln1_b, self.cfg.ln_eps, c.layers[0].ln1,
                                  c.layers[0].ln1_mean, c.layers[0].ln1_rstd)
            for l in range(self.cfg.n_layer):
                with nvtx_range(f"block.{l}.forward"):
                    self._block_forward(l, c)

    def _block_forward(self, l, c):
        """Block l from its ln_1 output (already written: by the embeddings' LayerNorm or the
        previous block) to the next LayerNorm's output: each residual add is fused with the
        LayerNorm that reads its result, and adds the branch's last bias (its GEMM adds none)."""
        p, w, a = self.params.blocks[l], self.params_mm.blocks[l], c.layers[l]
        H, eps = self.cfg.n_head, self.cfg.ln_eps
        # x_mid = x + drop(attn_proj(attention(qkv(ln_1(x)))));  ln_2 = LN(x_mid)   (B, T, .)
        # (B, T, 3C); a bf16 qkv takes the bias's bf16 copy: the GEMM adds its product to it
        ops.linear_forward(a.ln1, w.qkv_w, w.qkv_b if ops.is_bf16(a.qkv) else p.qkv_b, out=a.qkv)
        # att: bf16 where the tensor-core kernels run (the projection's operand and the
        # backward's O); else float, and in bf16 mode its bf16 copy att_mm
        if c.kv is not None and c.kv.stepping:  # one new position against the kept K, V
            c.kv.attend(l, a.qkv, a.att, a.att_mm)
        else:
            ops.attention_forward(a.qkv, H, out=a.att, lse=a.lse, precision=self.precision,
                                  slopes=self.attn_slopes,
                                  dropout=self._drop(c, l, ops.ATTN_PROBS),
                                  out_mm=None if a.att_mm is a.att else a.att_mm)
            if c.kv is not None:                # a prefill: keep this block's K, V
                c.kv.keep(l, a.qkv)
        ops.linear_forward(a.att_mm, w.attn_proj_w, None, out=c.proj)
        ops.residual_layernorm_forward(a.x, c.proj, p.ln2_w, p.ln2_b, eps, a.x_mid, a.ln2,
                                       a.ln2_mean, a.ln2_rstd, p.attn_proj_b,
                                       *self._drop(c, l, ops.ATTN_RESID))
        # x_out = x_mid + drop(mlp_proj(gelu(fc(ln_2))));  the next LN (ln_1 of block l + 1,
        # or ln_f) of x_out.  (fc's bias is added by the GELU, forward and backward)
        ops.linear_forward(a.ln2, w.fc_w, None, out=a.fc)                      # (B, T, 4C)
        ops.gelu_forward(a.fc, out=a.fc_gelu, bias=p.fc_b)
        ops.linear_forward(a.fc_gelu, w.mlp_proj_w, None, out=c.proj)
        if l + 1 < self.cfg.n_layer:
            n, pn = c.layers[l + 1], self.params.blocks[l + 1]
            x_out, ln_w, ln_b, ln, mean, rstd = (n.x, pn.ln1_w, pn.ln1_b, n.ln1, n.ln1_mean,
                                                 n.ln1_rstd)
        else:
            x_out, ln, mean, rstd = c.x_final, c.lnf, c.lnf_mean, c.lnf_rstd
            ln_w, ln_b = self.params["transformer.ln_f.weight"], self.params["transformer.ln_f.bias"]
        ops.residual_layernorm_forward(a.x_mid, c.proj, ln_w, ln_b, eps, x_out, ln, mean, rstd,
                                       p.mlp_proj_b, *self._drop(c, l, ops.MLP_RESID))

    def _drop(self, c, layer, site):
        """(p, key) of one dropout site for the forward in the cache c; (0, None) when off."""
        if c.dropout is None:
            return 0.0, None
        return self.cfg.dropout, c.dropout.key(layer, site)

    def _branch_grad(self, c, grad, layer, site, dbias):
        """A residual branch's gradient in one pass: dropout (the forward's mask, regenerated)
        of the residual stream's gradient, in the branch's matrix-product storage (c.dbranch),
        and its column sums added into the branch's last bias gradient. Without dropout and
        with float matrix products, the branch's GEMMs read the gradient itself (its copy in
        c.dbranch would be the same bits: one pass fewer per branch); a model whose every
        branch gradient goes as it is has no c.dbranch (branch_grad_buffered)."""
        rows = grad.reshape(-1, grad.shape[-1])
        p, key = self._drop(c, layer, site)
        as_is = p == 0.0 and (c.dbranch is None or not ops.is_bf16(c.dbranch)
                              and c.dbranch.dtype == rows.dtype)
        out = ops.dropout_bias_backward(rows, p, key, None if as_is else c.dbranch, dbias,
                                        scratch=c.colsum_scratch)
        return rows if as_is else out

    @_blas_held_on_host
    def classifier(self, B: int, T: int, dloss=None):
        """logits = lnf @ wte^T and the fused softmax-cross-entropy against the batch's targets,
        one row chunk at a time; returns the summed loss over the counted targets (a 0-d array
        of the backend). With dloss (the weight of each position's loss: a float, or a
        1-element float64 array such as the step buffer's slot), also the classifier's backward,
        chunk by chunk before the next chunk overwrites the logits: d loss / d lnf for
        `backward`, and wte.grad += dlogits^T lnf (accumulated)."""
        c = self._cache(B, T)
        wte = self.params_mm["transformer.wte.weight"]
        lnf = c.lnf.reshape(B * T, -1)
        targets, dlnf = c.targets.reshape(-1), c.dlnf.reshape(B * T, -1)
        N, R = B * T, c.classifier_rows
        with nvtx_range("classifier"):
            for r0 in range(0, N, R):
                r1 = min(N, r0 + R)
                logits, lnf_rows = c.logits[:r1 - r0], lnf[r0:r1]
                ops.gemm(lnf_rows, wte, logits, trans_b=True)
                ops.softmax_xent(logits, targets[r0:r1], 1.0 if dloss is None else dloss,
                                 losses=c.losses[r0:r1],
                                 dlogits=None if dloss is None else logits,
                                 need_grad=dloss is not None, vocab_size=self.cfg.vocab_size)
                if dloss is not None:  # logits now hold dlogits, in the storage wte has
                    ops.gemm(logits, wte, dlnf[r0:r1])
                    ops.gemm(logits, lnf_rows, self.grads["transformer.wte.weight"],
                             trans_a=True, accumulate=True)
            return c.losses.sum(dtype=np.float64)

    @_blas_held_on_host
    def backward(self, B: int, T: int, on_grads_ready=None):
        """Accumulate the gradients of the last forward + classifier(dloss) of (B, T) into the
        gradient arena. on_grads_ready(offset), if given, is called as soon as the gradients
        at arena offsets >= offset are final (after ln_f, after each block, after the
        embeddings: offset 0), so data parallelism can reduce them during the rest."""
        c, P, G = self._cache(B, T), self.params, self.grads
        self._training_key = (B, T)
        ready = on_grads_ready or (lambda offset: None)
        with nvtx_range("backward"):
            ops.layernorm_backward(c.dlnf, c.x_final, P["transformer.ln_f.weight"], c.lnf_mean,
                                   c.lnf_rstd, G["transformer.ln_f.weight"],
                                   G["transformer.ln_f.bias"], dx=c.dx, scratch=c.colsum_scratch)
            ready(self.lnf_offset)
            for l in reversed(range(self.cfg.n_layer)):
                with nvtx_range(f"block.{l}.backward"):
                    self._block_backward(l, c)   # c.dx: d loss / d (block output -> input)
                ready(self.block_offsets[l])
            ops.dropout(c.dx, *self._drop(c, 0, ops.EMBED), out=c.dx)
            ops.embedding_backward(c.dx, c.idx, G["transformer.wte.weight"],
                                   G.views.get("transformer.wpe.weight"))
            ready(0)

    def _block_backward(self, l, c):
        p, w, g, a = (self.params.blocks[l], self.params_mm.blocks[l], self.grads.blocks[l],
                      c.layers[l])
        # MLP: x_out = x_mid + drop(mlp_proj(gelu(fc(ln_2(x_mid)))))      c.dx: d / d x_out
        ops.linear_backward(self._branch_grad(c, c.dx, l, ops.MLP_RESID, g.mlp_proj_b),
                            a.fc_gelu, w.mlp_proj_w, g.mlp_proj_w, None, dx=c.dfc)
        # the GELU's gradient, in place in the c_fc GEMMs' storage, with c_fc's bias gradient
        ops.gelu_backward(c.dfc, a.fc, dx=c.dfc, dbias=g.fc_b, bias=p.fc_b,
                          scratch=c.colsum_scratch)
        ops.linear_backward(c.dfc, a.ln2, w.fc_w, g.fc_w, None, dx=c.dln)
        ops.layernorm_backward(c.dln, a.x_mid, p.ln2_w, a.ln2_mean, a.ln2_rstd, g.ln2_w, g.ln2_b,
                               dx=c.dx_mid, dresidual=c.dx, scratch=c.colsum_scratch)  # d/d x_mid
        # attention: x_mid = x + drop(attn_proj(attention(qkv(ln_1(x)))))
        ops.linear_backward(self._branch_grad(c, c.dx_mid, l, ops.ATTN_RESID, g.attn_proj_b),
                            a.att_mm, w.attn_proj_w, g.attn_proj_w, None, dx=c.datt)
        # dqkv, then c_attn's bias gradient from it (the column sums of what the GEMMs read)
        ops.attention_backward(c.datt, a.qkv, a.att, a.lse, self.cfg.n_head, dqkv=c.dqkv,
                               precision=self.precision, slopes=self.attn_slopes,
                               dropout=self._drop(c, l, ops.ATTN_PROBS), scratch=c.attn_scratch)
        dqkv = c.dqkv.reshape(-1, c.dqkv.shape[-1])
        ops.dropout_bias_backward(dqkv, 0.0, None, None, g.qkv_b, scratch=c.colsum_scratch)
        ops.linear_backward(dqkv, a.ln1, w.qkv_w, g.qkv_w, None, dx=c.dln)
        ops.layernorm_backward(c.dln, a.x, p.ln1_w, a.ln1_mean, a.ln1_rstd, g.ln1_w, g.ln1_b,
                               dx=c.dx, dresidual=c.dx_mid, scratch=c.colsum_scratch)  # d / d x

    # ---------------------------------------------------------------- public API
    def loss_and_grads(self, idx, targets, dropout: DropoutContext | None = None):
        """Mean loss over non-ignored targets and {name: host gradient} for one batch; with a
        DropoutContext (and cfg.dropout > 0), through that training forward's dropout masks.
        A batch whose targets are all ignored has loss 0.0 and zero gradients."""
        batch = self.check_batch(idx, self._check_targets_given(targets))
        self.zero_grad()
        B, T = self.set_batch(batch)
        self.forward(B, T, dropout=dropout)
        loss_sum = self.classifier(B, T, dloss=1.0 / max(batch.n_valid, 1))
        self.backward(B, T)
        return float(loss_sum) / max(batch.n_valid, 1), self.named_grads()

    @staticmethod
    def _check_targets_given(targets):
        """targets as given, refused when None: check_batch takes None (inference), but a loss
        without targets would read the ones left in the cache by the previous batch."""
        if targets is None:
            raise DataError("targets: expected integer token ids (B, T), got None")
        return targets

    def logits(self, idx):
        """Logits (B, T, vocab_size) as a host array (allocated here: for inference), through a
        forward-only InferenceCache."""
        batch = self.check_batch(idx)
        B, T = batch.shape
        out = self._logits_of(self._infer(batch).lnf.reshape(B * T, -1))
        return self._to_host(out).reshape(B, T, self.cfg.vocab_size)

    def last_logits(self, idx):
        """Logits of the last position only, (B, vocab_size) host array (for sampling), through
        a forward-only InferenceCache (inference_cache_bytes). Sampling's context grows by a
        token per call, a new shape each time: the previous call's cache is dropped before this
        one's is made, so one is held, not two (the memory check counts one)."""
        return self._last_logits(self.check_batch(idx))

    def _last_logits(self, batch: Batch, kv: KVCache | None = None):
        """last_logits of a checked batch; kv: a Decoder's KVCache, which the forward fills
        with each block's K, V (a prefill)."""
        key = ("inference",) + batch.shape
        if key != self._last_logits_key:
            self._caches.pop(self._last_logits_key, None)
            self._last_logits_key = key
        last = self._infer(batch, kv).lnf[:, -1]
        return self._to_host(self._logits_of(self.xp.ascontiguousarray(last)))

    def decoder(self, capacity: int) -> Decoder | None:
        """A Decoder keeping up to `capacity` positions (sampling: longest_context), or None on
        the CUDA backend, where sampling keeps a full forward per token (a GPU runs a 1,024-token
        forward in milliseconds; the step's one-query attention has no kernel)."""
        return Decoder(self, capacity) if self.xp is np else None

    def _decode_step(self, kv: KVCache, c: InferenceCache, token: Batch):
        """(1, vocab_size) host logits after one more token (a checked (1, 1) batch) at position
        kv.length, through the step buffers c, with the attention over kv's keys and values."""
        c.stage.upload(c.idx, token.idx)
        c.kv, kv.stepping = kv, True
        try:
            self._forward(c, None, position=kv.length)
        finally:
            c.kv, kv.stepping = None, False
        kv.length += 1
        return self._to_host(self._logits_of(c.lnf.reshape(1, -1)))

    def release_last_logits_cache(self):
        """Drop last_logits' forward-only cache (sample_tokens calls it when a sample ends, so
        a library caller's sample leaves no (1, t) cache beside the training one: 54.1 MiB at
        GPT-2 124M's 1,024 tokens in fp32); the training cache and logits' stay."""
        self._caches.pop(self._last_logits_key, None)
        self._last_logits_key = None

    def _infer(self, batch: Batch, kv: KVCache | None = None) -> InferenceCache:
        """The forward (no dropout) of a checked batch in the InferenceCache of its shape;
        kv: a KVCache the forward keeps each block's K, V in (a Decoder's prefill)."""
        c = self._cache_for(*batch.shape, inference=True)
        c.stage.upload(c.idx, batch.idx)
        c.kv = kv
        try:
            self._forward(c, None)
        finally:
            c.kv = None
        if kv is not None:
            kv.length = batch.shape[1]
        return c

    def _logits_of(self, lnf_rows):
        """(rows, vocab_size) float logits of final-LayerNorm rows (in matmul storage); the
        padding rows of wte are left out, so no caller ever sees (or samples) a padding id."""
        wte = self.params_mm["transformer.wte.weight"][:self.cfg.vocab_size]
        return ops.gemm(lnf_rows, wte, trans_b=True)

    def eval_loss_sum(self, idx, targets, dropout: DropoutContext | None = None):
        """(summed loss, count) without touching gradients; for validation (dropout None: off)."""
        batch = self.check_batch(idx, self._check_targets_given(targets))
        B, T = self.set_batch(batch)
        self.forward(B, T, dropout=dropout)
        return self.classifier(B, T), batch.n_valid
