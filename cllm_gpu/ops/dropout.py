"""Inverted dropout with a counter-based generator (Philox4x32-10, as in cuRAND and
FlashAttention): a mask is a pure function of its key and the element's index, so the backward
regenerates it instead of storing it, runs are reproducible from the seed whatever the launch
order, resume stays bitwise exact, and the NumPy reference and the CUDA kernels draw the same
bits.

dropout:     x (any shape), p, key -> out = x * keep / (1 - p)   (the backward: the same call
             on the gradient)
dropout_bias_backward: a residual branch's gradient in one pass: dsum (N, C) -> out (N, C) =
             dropout(dsum) in out's storage (bf16 for the branch's bf16 GEMMs, or float), and
             dbias (C,) += the column sums of dropout(dsum) (the branch's last bias); out None:
             the column sums only, of a float or a bf16-storage dsum (a gradient already in
             its GEMMs' storage, e.g. the attention's bf16 dqkv: the sums of the rounded
             values, in fp32)
keep_mask:   the boolean mask of elements [start, start + n) of a key's stream (reference);
             keep_rows: the same for many runs of n elements at once (the attention reference)
p == 0: no random numbers are drawn (dropout returns x). The residual adds with their dropout
are fused into the LayerNorm that follows them (ops.residual_layernorm_forward).

DropoutKey(seed, step, site, micro): Philox key = (seed_word(seed), step), counter = (element // 4 as 64
bits, site, micro); element e of the stream is kept when word e % 4 of that draw is >=
threshold = round(p * 2^32). seed: the run's seed (any int >= 0; seed_word folds it into the
key's 32 bits); step: the optimizer step (an int, or a
1-element float64 array on the arrays' side, the trainer's step buffer slot: the kernel reads it
through a pointer, so a step captured in a CUDA graph replays with each step's masks); site:
which dropout (`site_id(layer, SITE)`); micro: the micro-batch within the step. An int step,
site and micro are 32-bit words: outside [0, 2**32) the ops raise ValueError. Elements are
flat indices in C order of the array the mask covers (for attention probabilities, the
(B, H, T, T) score matrix).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _cuda as _cu
from ._common import CHUNK, check_array, check_float, is_device_array
from .cast import check_storage, float_dtype, is_bf16, round_bf16
from .host_threads import run_chunks

EMBED, ATTN_PROBS, ATTN_RESID, MLP_RESID = range(4)   # the dropout sites of a block / the model
SITES = 4

# Elements per chunk of the NumPy reference: Philox's uint64 temporaries stay in L2, its ~140
# ufunc calls per chunk are paid on 64 K elements at a time, and the chunks go to the host
# threads; a multiple of 4, so each chunk starts a draw of 4 words ((2048, 256) float32, one
# thread: the whole array at once 16.1 ms, chunks of 16 K 9.9, 64 K 6.8-7.0, 256 K 8.5)
DROPOUT_CHUNK = CHUNK

PHILOX_M0, PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
PHILOX_W0, PHILOX_W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)


def site_id(layer: int, site: int) -> int:
    """The stream of one dropout: embedding (layer 0, EMBED), or a block's ATTN_PROBS,
    ATTN_RESID, MLP_RESID."""
    return layer * SITES + site


def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser: a bijection of the 32-bit words with fmix32(0) = 0."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def seed_word(seed: int) -> int:
    """The seed's 32-bit Philox key word: a seed below 2^32 is its own (its masks as before);
    the 32-bit words above fold in through fmix32, so seeds that differ only above bit 31
    (1 and 2^32 + 1: other initial weights and batches) draw other masks too, where taking the
    low 32 bits gave them the same ones. Below 2^64, seeds with the same low word always get
    different key words (fmix32 is a bijection); otherwise two seeds share masks only by a
    collision of the hash, as 32 bits of key must allow."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"dropout seed must be >= 0, got {seed}")
    fold, high = 0, seed >> 32
    for shift in range(32 * ((high.bit_length() - 1) // 32), -1, -32):  # highest word first:
        fold = fmix32(fold ^ ((high >> shift) & 0xFFFFFFFF))      # a zero word still mixes
    return (seed & 0xFFFFFFFF) ^ fold


@dataclass(frozen=True)
class DropoutKey:
    seed: int
    step: object          # int, or a 1-element float64 array (see the module docstring)
    site: int
    micro: int = 0

    def step_value(self) -> int:
        s = self.step
        return int(float(np.asarray(s.get() if is_device_array(s) else s).reshape(-1)[0])) \
            if hasattr(s, "shape") else int(s)


def threshold(p: float) -> int:
    """Keep when a uniform 32-bit word is >= this: P(keep) = 1 - p (to 2^-32)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    return min(int(round(p * 2.0 ** 32)), 2 ** 32 - 1)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 arrays (broadcast); returns the four output words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint32) for c in (c0, c1, c2, c3))
    k0, k1 = np.uint32(k0), np.uint32(k1)
    with np.errstate(over="ignore"):
        for r in range(10):
            if r:
                k0, k1 = k0 + PHILOX_W0, k1 + PHILOX_W1
            p0 = PHILOX_M0 * c0.astype(np.uint64)
            p1 = PHILOX_M1 * c2.astype(np.uint64)
            hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), p0.astype(np.uint32)
            hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), p1.astype(np.uint32)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def keep_mask(start: int, n: int, p: float, key: DropoutKey) -> np.ndarray:
    """(n,) bool: elements [start, start + n) of the key's stream that are kept."""
    return keep_rows(np.array(start), n, p, key)


def keep_rows(starts, n: int, p: float, key: DropoutKey) -> np.ndarray:
    """(*starts.shape, n) bool: for each start (an int64 array of element indices), whether
    elements start, ..., start + n - 1 of the key's stream are kept; one Philox call per group
    of 4 elements of each run (the attention reference: one run per query row of a block)."""
    starts = np.asarray(starts, dtype=np.int64)
    t = np.uint32(threshold(p))
    g0 = (starts // 4).astype(np.uint64)[..., None]                   # (..., 1)
    g = g0 + np.arange((n + 3) // 4 + 1, dtype=np.uint64)             # every group a run touches
    words = philox4x32_10(g.astype(np.uint32), (g >> np.uint64(32)).astype(np.uint32),
                          key.site, key.micro, seed_word(key.seed), key.step_value())
    u = np.stack(words, axis=-1).reshape(*starts.shape, -1)           # the runs' words in order
    if not (starts % 4).any():   # every run starts a group: its words are the first n
        return u[..., :n] >= t
    offset = (starts % 4)[..., None] + np.arange(n)
    return np.take_along_axis(u, offset, axis=-1) >= t


def _scale(p, dtype):
    return np.dtype(dtype).type(1.0 / (1.0 - p))


def dropout_ref(x, p, key, out=None):
    if out is None:
        out = np.empty_like(x)
    xf, of = x.reshape(-1), out.reshape(-1)
    scale = _scale(p, x.dtype)

    def chunk(c, s, _):   # the stream is counter-based: a chunk draws its own elements' words
        keep = keep_mask(s.start, s.stop - s.start, p, key)
        np.multiply(xf[s], scale, out=of[s])
        np.copyto(of[s], 0, where=~keep)

    run_chunks(xf.size, DROPOUT_CHUNK, chunk)
    return out


def dropout_bias_backward_ref(dsum, p, key, out, dbias, scratch=None):
    # scratch: the CUDA launcher's workspace, unused here (the signature is the launcher's)
    bf16_out = out is not None and is_bf16(out)
    dsum = dsum.view(np.float32) if is_bf16(dsum) else dsum   # a bf16 dsum's float values
    g = dsum if p == 0.0 else dropout_ref(dsum, p, key, out=None if bf16_out else out)
    N, C = g.shape
    rows = max(1, CHUNK // max(C, 1))
    n_chunks = -(-N // rows)
    # per chunk of rows: the column sums as a matrix-vector product (BLAS gemv: 0.25 -> ~0.2 ms
    # against `.sum(axis=0)` at (2048, 256), and nearer float64), added in chunk order below
    col_sums = np.empty((n_chunks, C), dtype=g.dtype)

    ones = np.ones(min(rows, N), dtype=g.dtype)

    def chunk(c, s, _):   # out (rounded for a bf16 out) and the column sums of rows s
        np.matmul(ones[:s.stop - s.start], g[s], out=col_sums[c])
        if bf16_out:
            out[s] = round_bf16(g[s].astype(np.float32, copy=False))
        elif out is not None and g is not out:
            out[s] = g[s]

    # one thread: a call is ~0.2 ms at (2048, 256), below what a parallel region costs
    run_chunks(N, rows, chunk, threads=1)
    for c in range(n_chunks):
        dbias += col_sums[c]
    return out


def dropout_bias_backward(dsum, p, key, out, dbias, scratch=None):
    """out = dropout(dsum) (out's storage), dbias += its column sums; dsum, out (N, C). out
    None: dbias only; dsum may then be in bf16 storage (dbias float32).
    scratch: on CUDA, a 1-d device array of dbias's dtype and
    `dropout_bias_backward_scratch_size` elements for the partial column sums, so that nothing
    is allocated here (a CUDA-graph capture holds every block it allocates); None: allocated
    per call. The NumPy path ignores it."""
    check_array("dsum", dsum, ndim=2)
    if is_bf16(dsum):
        if out is not None:
            raise ValueError("out: a bf16 dsum takes out=None (its column sums only)")
    else:
        check_float("dsum", dsum)
    N, C = dsum.shape
    if out is not None:
        check_array("out", out, shape=(N, C))
        check_storage("out", out, dsum)
    check_array("dbias", dbias, shape=(C,), dtype=float_dtype(dsum))
    threshold(p)
    if p > 0.0:
        check_key(key, dsum)
    if is_device_array(dsum):
        return dropout_bias_backward_cuda(dsum, p, key, out, dbias, scratch)
    return dropout_bias_backward_ref(dsum, p, key, out, dbias)


def _check(name, x, out, like=None):
    check_array(name, x)
    check_float(name, x)
    if like is not None:
        check_array(name, x, shape=like.shape, dtype=like.dtype)
    if out is not None:
        check_array("out", out, shape=x.shape, dtype=x.dtype)


def check_key(key, x):
    if not isinstance(key, DropoutKey):
        raise TypeError(f"key: expected a DropoutKey, got {type(key).__name__}")
    if hasattr(key.step, "shape"):
        check_array("key.step", key.step, dtype=np.float64)
        if key.step.size != 1 or is_device_array(key.step) != is_device_array(x):
            raise ValueError("key.step: expected an int or a 1-element float64 array on the "
                             "arrays' side")
    # Philox counter and key words: a value outside uint32 was an OverflowError on the NumPy
    # path and, for an int step, a double -> unsigned conversion out of range in the kernels
    # (undefined; another mask); a step array's value is the trainer's and is not read here
    for field in ("site", "micro") + (() if hasattr(key.step, "shape") else ("step",)):
        v = getattr(key, field)
        if not 0 <= int(v) < 2**32:
            raise ValueError(f"key.{field}: expected 0 .. 2**32 - 1 (a 32-bit Philox word), "
                             f"got {v}")


def dropout(x, p, key, out=None):
    """x * keep / (1 - p) (see the module docstring); p == 0 returns x (or copies into out)."""
    _check("x", x, out)
    threshold(p)
    if p == 0.0:
        if out is None:
            return x
        out[...] = x
        return out
    check_key(key, x)
    if is_device_array(x):
        return dropout_cuda(x, p, key, out)
    return dropout_ref(x, p, key, out)


# ---- CUDA launcher (kernels_cu/dropout.cu): grid-stride over groups of 4 elements; out may be
# x itself (in place), no other overlap
_NO_STEP = {}  # a float64 zero per device: the step pointer of a launch that draws nothing


def kernel_args(x, p, key):
    """(seed, step pointer, site, micro, threshold, scale): the dropout arguments of a kernel
    (dropout.cu, and the kernels that fuse a dropout: layernorm.cu); p == 0 gives arguments
    that draw nothing (threshold 0 keeps everything, scale 1)."""
    import cupy
    u32 = np.uint32
    if p == 0.0:
        dev = cupy.cuda.Device().id
        if dev not in _NO_STEP:
            _NO_STEP[dev] = cupy.zeros(1, dtype=np.float64)
        return u32(0), _NO_STEP[dev], u32(0), u32(0), u32(0), _scale(0.0, x.dtype)
    step = key.step if hasattr(key.step, "shape") else cupy.full(1, float(key.step), np.float64)
    return (u32(seed_word(key.seed)), step, u32(key.site), u32(key.micro), u32(threshold(p)),
            _scale(p, x.dtype))


def dropout_cuda(x, p, key, out=None):
    _cu.require_device(x=x)
    out = _cu.out_array("out", out, x.shape, x.dtype)
    _cu.check_in_place("out", out, x=x)   # a thread reads x[i] and then writes out[i]
    n = x.size
    if n:
        k = _cu.kernel("dropout", f"dropout_kernel<{_cu.ctype(x.dtype)}>")
        k((_cu.grid_stride_blocks(_cu.ceil_div(n, 4)),), (_cu.THREADS,),
          (x, out, _cu.i64(n), *kernel_args(x, p, key)))
    return out


def dropout_bias_backward_scratch_size(N: int, C: int) -> int:
    """Elements (of dbias's dtype) of dropout_bias_backward's `scratch` for dsum (N, C): the
    partial column sums."""
    return _cu.colsum_scratch_size(N, C)


def dropout_bias_backward_cuda(dsum, p, key, out, dbias, scratch=None):
    _cu.require_device(dsum=dsum, dbias=dbias)
    if out is not None:
        _cu.require_device(out=out)
        _cu.check_in_place("out", out, dsum=dsum)
    N, C = dsum.shape
    if N == 0 or C == 0:
        return out
    # <compute type, out's storage (CllmNoOutput: none), dsum's storage>
    fdt = float_dtype(dsum)
    t = _cu.ctype(fdt)
    o = "CllmNoOutput" if out is None else _cu.out_ctype(out, fdt)
    rows, chunks = _cu.colsum_chunks(N)
    partial = _cu.colsum_partials(scratch, N, C, 1, dbias.dtype, dsum=dsum, out=out,
                                  dbias=dbias)
    k = _cu.kernel("dropout", f"dropout_bias_backward_kernel<{t}, {o}, "
                              f"{_cu.out_ctype(dsum, fdt)}>")
    # without out, dsum stands in for the unwritten pointer (a kernel argument is an array)
    k((_cu.ceil_div(C, 32), chunks), (256,),
      (dsum, dsum if out is None else out, partial, _cu.i32(N), _cu.i32(C), _cu.i32(rows),
       _cu.i32(p > 0), *kernel_args(dbias, p, key)))
    _cu.colsum_finalize("dropout", partial, C, chunks, dbias)
    return out
