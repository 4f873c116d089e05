"""Causal multi-head self-attention on the fused q, k, v projection.

forward:  qkv (B, T, 3C) [q | k | v, each C = H * D wide] -> out (B, T, C), lse (B, H, T)
          lse[b, h, i] = log sum_{j <= i} exp(s_ij),  s_ij = q_i . k_j / sqrt(D) - m_h (i - j)
          out_mm (optional, bf16 storage, (B, T, C)): out rounded to bf16 as well, bitwise
          to_bf16(out), the output projection's operand; the tensor-core forward stores it from
          the registers that hold out (no cast pass over out), every other path casts out.
          With precision="bf16", out itself may be bf16 storage (and out_mm None): the same
          bf16 values, and no float output at all (the bf16 model's: its backward reads it).
backward: dout (B, T, C), qkv, out, lse -> dqkv (B, T, 3C)
          The probabilities are recomputed from lse; nothing T x T survives the forward.
          In bf16, Delta = rowsum(dO * O) is an fp32 sum of the bf16-rounded dO and O (out
          float or bf16 storage: the same result), as FlashAttention-2 reads its bf16 O.
          dqkv may come in bf16 storage (precision="bf16" only; the bf16 model's c_attn GEMM
          operand): each value rounded once from the fp32 value a float dqkv would hold,
          bitwise to_bf16 of it. The tensor-core kernels store it so themselves (no fp32 dqkv
          and no cast pass; atomic-dq sums dQ in an fp32 scratch and rounds it after), every
          other path computes float and casts.
slopes:   None (no bias, m_h = 0) or the per-head slopes m_h, an (H,) array of qkv's dtype on
          qkv's backend: a distance bias on the scores (ALiBi, lattice; `attention_slopes`),
          computed per score and never stored as a T x T tensor (the reference builds it per
          block of query rows; the kernels per score from m_h and j - i).
dropout:  None, or (p, key) (a DropoutKey, ops/dropout.py): nanoGPT's dropout on the attention
          probabilities, out_i = sum_j keep_ij / (1 - p) P_ij v_j. The mask covers the
          (B, H, T, T) score matrix in C order (element ((b H + h) T + i) T + j of the key's
          stream) and is never stored: each pass draws it per score (the backward regenerates
          the forward's). lse and the softmax are of the undropped probabilities; pass the
          forward's dropout to the backward. p == 0 draws nothing.
precision: "fp32" (default) computes in the arrays' dtype. "bf16" (float32 arrays only) runs
          every matrix product on bf16-rounded operands with fp32 accumulation (tensor cores on
          the GPU); softmax, lse, Delta and the float outputs are fp32. qkv and dout may also come
          in bf16 storage (ops/cast.py; the bf16 model stores them so, see
          `attention_bf16_inputs`): the operands the kernels would round float32 ones to, at half
          the bytes. The GPU's tensor-core kernels read only bf16 qkv and dout (float32 ones
          are rounded into temporaries first). Head dims without a tensor-core kernel compute
          what "fp32" computes under "bf16", on both backends (the GPU runs its fp32 kernels).

One reference (`attention_forward_ref`, `attention_backward_ref`) serves both precisions and
both array modules (NumPy, and CuPy where no kernel fits: float64, odd head dims). The forward
takes query rows in blocks of ATTN_BLOCK, each against keys [0, end of block]; the backward
takes keys in such blocks, each against queries [start of block, T), so dK and dV are written
once and straight into dqkv. Most of the work above the diagonal is never done, and the
matrix products write into their destinations. The forward holds a block's scores
transposed, S^T (keys x queries): the softmax's max and sums over the keys then run down the
columns, vectorized across the queries, and the per-query max broadcasts along rows (~15%
faster on NumPy than the row-major scores). On NumPy the batch goes in groups whose
(G, H, ATTN_BLOCK, T) score scratch fits in L2 (ATTN_GROUP_BYTES): the elementwise passes over
the scores run there, and the matrix products are one BLAS call per (b, h) either way. In
bf16 the forward visits each block's keys in tiles of BF16_KEY_TILE with an online softmax,
rounding P = exp(s - m) against the running max m of the tiles seen so far, exactly as the
tensor-core kernel does (the rounding of P depends on m); in fp32 one tile spans every key, so
the online softmax is the plain one.
"""
import math
import os
import warnings

import numpy as np

from ..config import ATTN_BIASES
from ..errors import ConfigError
from . import _cuda as _cu
from ._common import check_array, check_float, is_device_array, overlaps, xp_of
from .cast import BF16_DEVICE_DTYPE, float_dtype, from_bf16, is_bf16, round_bf16, to_bf16
from .host_threads import run_chunks
from .dropout import (check_key as check_dropout_key, kernel_args as dropout_kernel_args,
                      keep_rows, threshold as dropout_threshold)

PRECISIONS = ("fp32", "bf16")
ATTN_BLOCK = 128     # query rows (forward) / keys (backward) per block of the reference
ATTN_GROUP_BYTES = 1 << 19   # the NumPy reference's score scratch per batch group (in L2)
BF16_KEY_TILE = 64   # MMA_FWD_BC in attention.cu: keys per online-softmax tile in bf16


def attention_slopes(kind, n_head):
    """The per-head slopes m_h of a distance bias, float64 (H,); None for "none".
    "alibi": m_h = 2^(-8h/H), h = 1..H (Press et al., ALiBi; BLOOM's slopes only when H is a
    power of two: for other H BLOOM interleaves two sequences, docs/attention_bias.md);
    "lattice": m_h = 1/p_h, the reciprocals of the first H primes 2, 3, 5, 7, ..."""
    if kind not in ATTN_BIASES:
        raise ValueError(f"attn_bias: expected one of {ATTN_BIASES}, got {kind!r}")
    if kind == "none":
        return None
    if kind == "alibi":
        return 2.0 ** (-8.0 * np.arange(1, n_head + 1) / n_head)
    return 1.0 / np.array(_primes(n_head), dtype=np.float64)


def _primes(n):
    found = []
    c = 2
    while len(found) < n:
        if all(c % p for p in found if p * p <= c):
            found.append(c)
        c += 1
    return found


_mask_cache = {}


def _causal_bias(xp, rows, cols, offset, dtype, transposed=False):
    """(rows, cols) additive mask for query rows r0 + i and keys c0 + j (offset = r0 - c0):
    0 where the key is at or before the query, -inf after it; transposed: its (cols, rows)
    transpose, for the forward's S^T (cached, contiguous)."""
    key = (xp.__name__, rows, cols, offset, np.dtype(dtype), transposed)
    m = _mask_cache.get(key)
    if m is None:
        m = np.triu(np.full((rows, cols), -np.inf, dtype=dtype), k=offset + 1)
        m = xp.asarray(np.ascontiguousarray(m.T) if transposed else m)
        _mask_cache[key] = m
    return m


def _key_distance(rows, cols, offset, dtype, transposed=False):
    """(rows, cols) host array of j - i (key minus query position), as _causal_bias's."""
    d = (np.arange(cols)[None, :] - np.arange(rows)[:, None] - offset).astype(dtype)
    return np.ascontiguousarray(d.T) if transposed else d


def _score_bias(xp, rows, cols, offset, dtype, slopes, transposed=False):
    """(H, rows, cols) ((H, cols, rows) transposed): what the scores of query rows r0 + i and
    keys c0 + j get added with slopes (H,): m_h (j - i), and -inf where j > i + offset (the
    causal mask). Built per call, nothing cached: a block's are (H, 64, keys) (or keys x 64),
    and caching them (full-width masks and distances, per block) held T^2 floats per length.
    The mask is added only to the part that has masked keys (as the plain path masks the
    diagonal block): -inf + finite = -inf, and 0 + x = x, so the values are those of mask +
    m_h (j - i) over the whole block."""
    bias = slopes[:, None, None] * xp.asarray(
        _key_distance(rows, cols, offset, np.dtype(dtype), transposed))
    k0 = max(offset, 0)                    # the first key masked for some row: offset + 1
    r1 = min(rows, cols - offset)          # rows from r1 on see every key of the block
    if k0 < cols and r1 > 0:
        mask = _causal_bias(xp, r1, cols - k0, offset - k0, dtype, transposed)
        if transposed:
            bias[:, k0:, :r1] += mask
        else:
            bias[:, :r1, k0:] += mask
    return bias


def _flush_underflow(s):
    """Scores whose exp would be subnormal become -inf (probability 0, an error below the
    smallest normal float). With a distance bias far keys score -m (i - j), e.g. -100 at
    distance 200 and m = 1/2, and x86 arithmetic on subnormal operands is slow (measured:
    the fp32 forward + backward at T = 512, lattice slopes, took 1.5x as long without this)."""
    s[s < math.log(np.finfo(s.dtype).tiny)] = -np.inf


def _dropout_p(dropout):
    """p of an attention's dropout argument (None or (p, key)), checked: 0.0 when off."""
    if dropout is None:
        return 0.0
    dropout_threshold(dropout[0])
    return float(dropout[0])


def _keep(xp, dropout, shape, r0, r1, c0, c1, b0=0):
    """(B, H, r1 - r0, c1 - c0) bool keep mask of query rows [r0, r1) x keys [c0, c1) of the
    score matrices of batch elements [b0, b0 + B) (drawn on the host), or None when the
    dropout is off."""
    if _dropout_p(dropout) == 0.0:
        return None
    B, H, T = shape
    rows = (b0 * H + np.arange(B * H, dtype=np.int64)).reshape(B, H, 1) * T + np.arange(r0, r1)
    return xp.asarray(keep_rows(rows * T + c0, c1 - c0, *dropout))


def _head_views(qkv, n_head):
    """q, k, v as (B, H, T, D) strided views of qkv (B, T, 3C): no copy. Each (T, D) matrix
    has row stride 3C, which BLAS takes as its leading dimension."""
    B, T, C3 = qkv.shape
    v5 = qkv.reshape(B, T, 3, n_head, C3 // 3 // n_head).transpose(2, 0, 3, 1, 4)
    return v5[0], v5[1], v5[2]


def _heads(a, n_head):
    """(B, T, C) -> (B, H, T, D) view."""
    B, T, C = a.shape
    return a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def _blocks(T):
    for r0 in range(0, T, ATTN_BLOCK):
        yield r0, min(T, r0 + ATTN_BLOCK)


def _dot_last(a, b):
    """sum(a * b) over the last axis, the sum as a matrix-vector product (BLAS; ~1.3x
    `.sum(axis=-1)` on the (B, T, H, D) rows of Delta, and the same bits on NumPy and CuPy)."""
    xp = xp_of(a)
    return xp.matmul(a * b, xp.ones(a.shape[-1], dtype=a.dtype))


def _check_precision(precision, qkv):
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if is_bf16(qkv):
        if precision != "bf16":
            raise ValueError("qkv: bf16 storage needs precision='bf16'")
    elif precision == "bf16" and np.dtype(qkv.dtype) != np.float32:
        raise ValueError(f"precision='bf16' needs float32 arrays, got {np.dtype(qkv.dtype)}")


def attention_bf16_inputs(head_dim):
    """Whether a precision="bf16" model stores the attention's inputs qkv and dout in bf16
    storage for this head dim: where the GPU has a tensor-core kernel (which reads them in
    bf16); other head dims run the fp32 kernels on float ones. The same answer on both
    backends, so the NumPy and CUDA models agree."""
    return _has_mma(head_dim)


def _operands(qkv, n_head, precision):
    """(q, k, v, rnd, post): the (B, H, T, D) operands, the rounding of matrix-product
    operands (identity in fp32) and the score scale still to apply after Q K^T: fp32 folds
    the scale into q once; bf16 rounds q first and scales the fp32 products, as the kernel."""
    D = qkv.shape[2] // 3 // n_head
    scale = qkv.dtype.type(1.0 / math.sqrt(D))
    if precision == "bf16":
        q, k, v = _head_views(round_bf16(qkv), n_head)
        return q, k, v, round_bf16, scale
    q, k, v = _head_views(qkv, n_head)
    return q * scale, k, v, (lambda a: a), None


def _computed_precision(precision, qkv, n_head):
    """What the reference computes: "bf16" only for head dims with a tensor-core kernel; other
    head dims compute what precision="fp32" does, as the GPU's fp32 kernels do for them (so the
    NumPy and CUDA bf16 models agree at every head dim)."""
    D = qkv.shape[2] // 3 // n_head
    return "bf16" if precision == "bf16" and _has_mma(D) else "fp32"


def _batch_groups(xp, B, n_head, T):
    """Batch elements per group of the NumPy reference: the group's (G, H, ATTN_BLOCK, T) score
    scratch within ATTN_GROUP_BYTES, so the elementwise passes over it run in L2 (the matrix
    products are one BLAS call per (b, h) either way); all of B at once on CuPy."""
    if xp is not np:
        return max(B, 1)
    per_b = n_head * min(ATTN_BLOCK, T) * T * 4
    return max(1, min(B, ATTN_GROUP_BYTES // max(per_b, 1)))


def attention_forward_ref(qkv, n_head, out=None, lse=None, precision="fp32", slopes=None,
                          dropout=None, out_mm=None):
    """The dropout zeroes dropped entries of the (bf16-rounded) P that multiplies V and scales
    the row's output by 1 / (1 - p) after the division by the undropped row sum, as the
    kernels do (masking a rounded value is exact in both precisions). out_mm: out cast into
    it once it is complete."""
    _check_precision(precision, qkv)
    if out is not None and is_bf16(out):   # a bf16 output alone: the float one, cast into it
        _, lse = attention_forward_ref(qkv, n_head, None, lse, precision, slopes, dropout,
                                       out_mm=out)
        return out, lse
    precision = _computed_precision(precision, qkv, n_head)
    qkv = _float_values(qkv)
    xp = xp_of(qkv)
    B, T, C3 = qkv.shape
    if out is None:
        out = xp.empty((B, T, C3 // 3), dtype=qkv.dtype)
    if lse is None:
        lse = xp.empty((B, n_head, T), dtype=qkv.dtype)
    G = _batch_groups(xp, B, n_head, T)
    tile = BF16_KEY_TILE if precision == "bf16" else T

    def group(c, g, scratch):   # batch elements g; scratch: the piece's score, row-sum buffers
        _forward_group(qkv[g], n_head, out[g], lse[g], precision, slopes, dropout, g.start,
                       scratch)

    run_chunks(B, G, group, threads=None if xp is np else 1,
               scratch=lambda: (xp.empty((G, n_head, min(tile, T), min(ATTN_BLOCK, T)),
                                         dtype=qkv.dtype),
                                xp.empty((G, T, n_head), dtype=qkv.dtype)))
    if out_mm is not None:
        to_bf16(out, out=out_mm)
    return out, lse


def _forward_group(qkv, n_head, out, lse, precision, slopes, dropout, b0, scratch):
    """attention_forward_ref on the batch elements [b0, b0 + len(qkv)) (the dropout mask's
    offset); scratch: the score and row-sum buffers, sized for the largest group."""
    p_drop = _dropout_p(dropout)
    xp = xp_of(qkv)
    B, T, C3 = qkv.shape
    D = C3 // 3 // n_head
    q, k, v, rnd, post = _operands(qkv, n_head, precision)
    qt = q.swapaxes(-1, -2)
    y = _heads(out, n_head)
    tile = BF16_KEY_TILE if precision == "bf16" else T
    scores = scratch[0][:B]                           # S^T: (B, H, keys, rows)
    ones = xp.ones(min(tile, T), dtype=qkv.dtype)   # row sums as vector-matrix products
    row_sum = scratch[1][:B].transpose(0, 2, 1)       # (B, H, T) view
    for r0, r1 in _blocks(T):
        n = r1 - r0
        m = l = acc = None  # running max (B, H, 1, n), sum (B, H, n), output of the tiles
        for c0 in range(0, r1, tile):   # every tile holding a key <= some row of the block
            c1 = min(r1, c0 + tile)      # keys >= r1 are masked for all these rows
            s = xp.matmul(k[..., c0:c1, :], qt[..., r0:r1], out=scores[..., :c1 - c0, :n])
            if post is not None:
                s *= post
            if slopes is not None:
                s += _score_bias(xp, n, c1 - c0, r0 - c0, s.dtype, slopes, transposed=True)
            elif c1 > r0 + 1:            # the mask: only the keys > r0
                d0 = max(r0, c0)
                s[..., d0 - c0:, :] += _causal_bias(xp, n, c1 - d0, r0 - d0, s.dtype,
                                                     transposed=True)
            m_new = s.max(axis=-2, keepdims=True)
            if m is not None:
                m_new = xp.maximum(m, m_new)
            m_sub = xp.where(m_new == -np.inf, 0, m_new)  # a row with every key masked: no NaN
            s -= m_sub
            if slopes is not None:
                _flush_underflow(s)
            p = xp.exp(s, out=s)
            keep = _keep(xp, dropout, (B, n_head, T), r0, r1, c0, c1, b0)
            only = m is None and c1 == r1    # one tile: P V straight into out
            pt = rnd(p) if keep is None else xp.where(keep.swapaxes(-1, -2), rnd(p), 0)
            pv = xp.matmul(pt.swapaxes(-1, -2), v[..., c0:c1, :],
                           out=y[..., r0:r1, :] if only else None)
            p_sum = xp.matmul(ones[:c1 - c0], p)
            l, acc = _merge_tile(xp, m, l, acc, m_sub, p_sum, pv)  # noqa: E741
            m = m_new
        if not only:
            y[..., r0:r1, :] = acc
        row_sum[..., r0:r1] = l
        lse[..., r0:r1] = m[..., 0, :] + xp.log(l)
    # out / l over the contiguous (B, T, H, D) output at once, not per block of strided rows
    out4 = out.reshape(B, T, n_head, D)
    xp.divide(out4, row_sum.transpose(0, 2, 1)[..., None], out=out4)
    if p_drop:
        out *= qkv.dtype.type(1.0 / (1.0 - p_drop))


def _merge_tile(xp, m, l, acc, m_sub, p_sum, pv):  # noqa: E741
    """The online softmax's running row sums l and unnormalised output acc after one more key
    tile, whose p = exp(s - m_sub) summed to p_sum and gave P V = pv: the earlier tiles'
    taken from the running max m to m_sub (m None: this is the first tile)."""
    if m is None:
        return p_sum, pv
    alpha = xp.exp(m - m_sub)[..., 0, :]
    return l * alpha + p_sum, acc * alpha[..., None] + pv


def attention_keys_values(qkv, n_head, precision="fp32"):
    """(k, v): the (B, H, T, D) keys and values of qkv (B, T, 3C) as the reference's matrix
    products read them (bf16-rounded where it computes in bf16; views of qkv in fp32): what
    incremental decoding keeps (attention_decode_ref's k, v)."""
    _check_precision(precision, qkv)
    precision = _computed_precision(precision, qkv, n_head)
    _, k, v, _, _ = _operands(_float_values(qkv), n_head, precision)
    return k, v


def attention_decode_ref(qkv, k, v, n_head, precision="fp32", slopes=None):
    """The attention output (B, 1, C), float, of ONE new query, the last of t positions, over
    kept keys and values k, v (B, H, t, D) (attention_keys_values of every position, the new
    one's included): what attention_forward_ref computes for the last row of the t-token qkv,
    by the same operations on the same operands (the bias m_h (j - i), the underflow flush,
    in bf16 the online softmax over BF16_KEY_TILE key tiles with P rounded against the
    running max). Only the matrix products' summation order differs (one query, not a block
    of them), i.e. fp32 rounding. No dropout: inference."""
    _check_precision(precision, qkv)
    precision = _computed_precision(precision, qkv, n_head)
    qkv = _float_values(qkv)
    xp = xp_of(qkv)
    B, _, C3 = qkv.shape
    t = k.shape[2]
    q, _, _, rnd, post = _operands(qkv, n_head, precision)
    s = xp.matmul(k, q.swapaxes(-1, -2))              # S^T: (B, H, keys, 1)
    if post is not None:
        s *= post
    if slopes is not None:   # m_h (j - i) of keys j = 0..t-1 and the query i = t - 1
        s += slopes[:, None, None] * xp.asarray(_key_distance(1, t, t - 1, s.dtype, True))
    tile = BF16_KEY_TILE if precision == "bf16" else t
    ones = xp.ones(min(tile, t), dtype=qkv.dtype)
    m = l = acc = None  # noqa: E741   running max (B, H, 1, 1), sum (B, H, 1), output
    for c0 in range(0, t, tile):
        c1 = min(t, c0 + tile)
        m_new = s[..., c0:c1, :].max(axis=-2, keepdims=True)
        if m is not None:
            m_new = xp.maximum(m, m_new)
        st = s[..., c0:c1, :] - m_new
        if slopes is not None:
            _flush_underflow(st)
        p = xp.exp(st, out=st)
        pv = xp.matmul(rnd(p).swapaxes(-1, -2), v[..., c0:c1, :])   # (B, H, 1, D)
        p_sum = xp.matmul(ones[:c1 - c0], p)                         # (B, H, 1)
        l, acc = _merge_tile(xp, m, l, acc, m_new, p_sum, pv)  # noqa: E741
        m = m_new
    y = acc / l[..., None]                                           # (B, H, 1, D)
    return xp.ascontiguousarray(y.transpose(0, 2, 1, 3)).reshape(B, 1, C3 // 3)


def attention_backward_ref(dout, qkv, out, lse, n_head, dqkv=None, precision="fp32",
                           slopes=None, dropout=None, scratch=None):
    """With dropout (keep_ij, r = 1 / (1 - p)): dV_j = r sum_i bf16(keep_ij P_ij) dO_i (the
    scale applied to the fp32 sum), dS_ij = P_ij (keep_ij r dP_ij - Delta_i) with dP = dO V^T
    and Delta_i = dO_i . O_i of the dropped output. A bf16 dqkv: the float result rounded.

    Keys go in blocks (outer loop), each against the queries at or after its first key: dK and
    dV of a block are written once, straight into dqkv; dQ accumulates over the key blocks.
    scratch: the CUDA launcher's workspace, unused here (the signature is the launcher's)."""
    _check_precision(precision, qkv)
    precision = _computed_precision(precision, qkv, n_head)
    qkv, dout, out = _float_values(qkv), _float_values(dout), _float_values(out)
    xp = xp_of(qkv)
    B, T = qkv.shape[:2]
    if dqkv is None:
        dqkv = xp.empty_like(qkv)
    bf16_out = is_bf16(dqkv)   # host bf16 storage (the CUDA launcher casts a device one)
    G = _batch_groups(xp, B, n_head, T)
    cols = min(ATTN_BLOCK, T)

    def group(c, g, scratch):   # batch elements g; scratch: the piece's P and dP / dS buffers
        _backward_group(dout[g], qkv[g], out[g], lse[g], n_head, dqkv[g], precision, slopes,
                        dropout, g.start, scratch)
        if bf16_out:   # computed in the float32 values of the host bf16 storage, rounded once
            round_bf16(dqkv[g], out=dqkv[g])

    run_chunks(B, G, group, threads=None if xp is np else 1,
               scratch=lambda: tuple(xp.empty((G, n_head, T, cols), dtype=qkv.dtype)
                                     for _ in range(2)))
    return dqkv


def _backward_group(dout, qkv, out, lse, n_head, dqkv, precision, slopes, dropout, b0,
                    scratch):
    """attention_backward_ref on the batch elements [b0, b0 + len(qkv)), as _forward_group."""
    p_drop = _dropout_p(dropout)
    r_drop = qkv.dtype.type(1.0 / (1.0 - p_drop))
    xp = xp_of(qkv)
    B, T = qkv.shape[:2]
    D = qkv.shape[2] // 3 // n_head
    scale = qkv.dtype.type(1.0 / math.sqrt(D))
    q, k, v, rnd, post = _operands(qkv, n_head, precision)
    dout_r = rnd(dout)
    do = _heads(dout_r, n_head)
    # Delta_i = dO_i . O_i == sum_j P_ij dP_ij, with dO rounded as in dP and O as the bf16
    # forward stores it (an fp32 sum): (B, H, T)
    delta = _dot_last(dout_r.reshape(B, T, n_head, D), rnd(out).reshape(B, T, n_head, D))
    delta = delta.transpose(0, 2, 1)
    dq, dk, dv = _head_views(dqkv, n_head)      # written in place, (B, H, T, D) views
    scores, dprobs = scratch[0][:B], scratch[1][:B]
    for c0, c1 in _blocks(T):
        n = c1 - c0                              # keys [c0, c1) x queries [c0, T)
        s = xp.matmul(q[..., c0:, :], k[..., c0:c1, :].swapaxes(-1, -2),
                      out=scores[..., :T - c0, :n])
        if post is not None:
            s *= post
        if slopes is None:
            s[..., :n, :] += _causal_bias(xp, n, n, 0, s.dtype)  # later queries see every key
        else:
            s += _score_bias(xp, T - c0, n, 0, s.dtype, slopes)
        s -= lse[..., c0:, None]
        if slopes is not None:
            _flush_underflow(s)
        p = xp.exp(s, out=s)
        keep = _keep(xp, dropout, (B, n_head, T), c0, T, c0, c1, b0)
        pd = p if keep is None else xp.where(keep, p, 0)   # dropped, unscaled
        xp.matmul(rnd(pd).swapaxes(-1, -2), do[..., c0:, :], out=dv[..., c0:c1, :])
        ds = xp.matmul(do[..., c0:, :], v[..., c0:c1, :].swapaxes(-1, -2),
                       out=dprobs[..., :T - c0, :n])
        if keep is not None:
            ds = xp.where(keep, ds * r_drop, 0).astype(ds.dtype, copy=False)
        ds -= delta[..., c0:, None]
        ds *= p                                   # dS / scale (masked entries have p == 0)
        ds = rnd(ds)
        xp.matmul(ds.swapaxes(-1, -2), q[..., c0:, :], out=dk[..., c0:c1, :])
        if c0 == 0:                               # the first key block reaches every query
            xp.matmul(ds, k[..., c0:c1, :], out=dq)
        else:
            dq[..., c0:, :] += xp.matmul(ds, k[..., c0:c1, :])
    dq *= scale
    if post is not None:
        dk *= post
    if p_drop:
        dv *= r_drop


def _reference_storage(qkv, dout=None):
    """The reference reads a bf16 qkv or dout on the host only (float32 values); on the device
    only the tensor-core kernels read them (uint16 bits)."""
    for name, a in (("qkv", qkv), ("dout", dout)):
        if a is not None and a.dtype == BF16_DEVICE_DTYPE:
            raise ValueError(f"{name}: a device bf16 {name} needs a head dim with a "
                             f"tensor-core kernel (a multiple of 16 up to 128)")


def _float_values(a):
    """A reference input as plain float: a host bf16 array's float32 values (exact: precision
    "bf16" rounds them to themselves), without the bf16 tag; any other array as it is."""
    _reference_storage(a)
    return a.view(np.float32) if is_bf16(a) else a


def _check(qkv, n_head, slopes, dropout=None):
    check_array("qkv", qkv, ndim=3)
    if not is_bf16(qkv):
        check_float("qkv", qkv)
    C3 = qkv.shape[2]
    # an int: a float one named no kernel (head dim 16.0) and True ran as one head on the
    # device, where NumPy's reshape refused both
    if isinstance(n_head, bool) or not isinstance(n_head, (int, np.integer)):
        raise TypeError(f"n_head: expected an int, got {n_head!r}")
    if n_head < 1:
        raise ValueError(f"n_head: expected at least 1 head, got {n_head}")
    if C3 == 0:   # no scores to take a softmax of (lse undefined): both backends, whatever B, T
        raise ValueError("qkv: head dim 0 (last dim 0)")
    if C3 % 3 or (C3 // 3) % n_head:
        raise ValueError(f"qkv: last dim {C3} is not 3 * n_head({n_head}) * head_dim")
    if slopes is not None:
        check_array("slopes", slopes, shape=(n_head,), dtype=float_dtype(qkv))
        if is_device_array(slopes) != is_device_array(qkv):
            raise ValueError("slopes: must live where qkv does (both NumPy or both CuPy arrays)")
    if dropout is not None:
        if not (isinstance(dropout, tuple) and len(dropout) == 2):
            raise TypeError(f"dropout: expected None or (p, key), got {dropout!r}")
        if _dropout_p(dropout) > 0.0:
            check_dropout_key(dropout[1], qkv)


def attention_forward(qkv, n_head, out=None, lse=None, precision="fp32", slopes=None,
                      dropout=None, out_mm=None):
    """out (B, T, C), lse (B, H, T) of causal attention on qkv (B, T, 3C); slopes (H,): the
    distance bias -m_h (i - j) on the scores (None: no bias); dropout: None or (p, key), the
    dropout of the attention probabilities (module docstring); out_mm: None, or a bf16-storage
    (B, T, C) array (ops/cast.py; float32 out only) that also receives bf16(out), bitwise
    `to_bf16(out)` (module docstring).

    precision="bf16": bf16-operand, fp32-accumulate matrix products (float32 arrays only) for
    head dims with a tensor-core kernel (multiples of 16 up to 128: those kernels on the GPU);
    other head dims compute what precision="fp32" does on both backends (the GPU's fp32
    kernels)."""
    _check(qkv, n_head, slopes, dropout)
    _check_precision(precision, qkv)
    if out is not None and is_bf16(out):
        if precision != "bf16" or out_mm is not None:
            raise ValueError("out: bf16 storage needs precision='bf16' and out_mm None (out is "
                             "then the bf16 output itself)")
        B, T, C3 = qkv.shape
        _check_bf16_output("out", out, (B, T, C3 // 3), qkv, lse=lse, slopes=slopes)
    if is_device_array(qkv):
        return attention_forward_cuda(qkv, n_head, out, lse, precision, slopes, dropout, out_mm)
    if out_mm is not None:
        _check_out_mm(out_mm, qkv, out=out, lse=lse, slopes=slopes)
    return attention_forward_ref(qkv, n_head, out, lse, precision, slopes, dropout, out_mm)


def _check_out_mm(out_mm, qkv, **others):
    """out_mm: bf16 storage, out's shape (B, T, C) (_check_bf16_output)."""
    B, T, C3 = qkv.shape
    if not is_bf16(out_mm):
        raise ValueError(f"out_mm: expected bf16 storage (ops/cast.py), got {out_mm.dtype}")
    _check_bf16_output("out_mm", out_mm, (B, T, C3 // 3), qkv, **others)


def _check_bf16_output(name, a, shape, qkv, **others):
    """A bf16-storage output `a` (out_mm, a bf16 dqkv): `shape`, where qkv lives, the float
    outputs float32 (what the bf16 values are rounded from); overlapping none of qkv and
    `others` (the op's other inputs and outputs, None where absent)."""
    check_array(name, a, shape=shape)
    if is_device_array(a) != is_device_array(qkv):
        raise ValueError(f"{name}: must live where qkv does (both NumPy or both CuPy arrays)")
    if float_dtype(qkv) != np.float32:
        raise ValueError(f"{name}: a bf16 {name} needs float32 values, got {float_dtype(qkv)}")
    for other, b in dict(qkv=qkv, **others).items():
        if b is not None and overlaps(a, b):
            raise ValueError(f"{name}: must not overlap {other}")


def attention_backward(dout, qkv, out, lse, n_head, dqkv=None, precision="fp32", slopes=None,
                       dropout=None, scratch=None):
    """dqkv (B, T, 3C) from dout (B, T, C) and the forward's qkv, out, lse; precision, slopes
    and dropout as in attention_forward (pass the forward's: the same key redraws its mask).
    dqkv: None, a float array, or (precision="bf16") bf16 storage (ops/cast.py) that receives
    the gradient rounded once, bitwise `to_bf16` of the float one (module docstring).
    scratch: on CUDA, a float32 device array of `attention_backward_scratch_size` elements
    for the launch's temporaries (Delta, atomic-dq's dQ sums), so that nothing is allocated
    here (a CUDA-graph capture holds every block it allocates); None: allocated per call. The
    NumPy path ignores it."""
    _check(qkv, n_head, slopes, dropout)
    _check_precision(precision, qkv)
    B, T, C3 = qkv.shape
    if is_bf16(dout):
        check_array("dout", dout, shape=(B, T, C3 // 3))
        if precision != "bf16":
            raise ValueError("dout: bf16 storage needs precision='bf16'")
    else:
        check_array("dout", dout, shape=(B, T, C3 // 3), dtype=float_dtype(qkv))
    if is_bf16(out):  # the bf16 forward's output (its O for Delta)
        check_array("out", out, shape=(B, T, C3 // 3))
        if precision != "bf16":
            raise ValueError("out: bf16 storage needs precision='bf16'")
    else:
        check_array("out", out, shape=(B, T, C3 // 3), dtype=float_dtype(qkv))
    check_array("lse", lse, shape=(B, n_head, T))
    if dqkv is not None and is_bf16(dqkv):
        if precision != "bf16":
            raise ValueError("dqkv: bf16 storage needs precision='bf16'")
        _check_bf16_output("dqkv", dqkv, (B, T, C3), qkv, dout=dout, out=out, lse=lse,
                           slopes=slopes)
    if is_device_array(qkv):
        return attention_backward_cuda(dout, qkv, out, lse, n_head, dqkv, precision, slopes,
                                       dropout, scratch)
    return attention_backward_ref(dout, qkv, out, lse, n_head, dqkv, precision, slopes, dropout)


def attention_backward_scratch_size(B, T, C, n_head, dq_sums) -> int:
    """float32 elements of attention_backward's `scratch` for (B, T, C) with n_head heads:
    dq_sums (a bf16 dqkv, which the atomic-dq backward sums dQ for in fp32): the (B, T, C) sums
    first, then Delta (B, n_head, T), each starting on a 256-byte boundary."""
    return _scratch_delta_offset(B, T, C, dq_sums) + B * n_head * T


def _scratch_delta_offset(B, T, C, dq_sums):
    return -(-B * T * C // 64) * 64 if dq_sums else 0


def _backward_scratch(scratch, B, T, C, H, dq_sums):
    """(delta (B, H, T), dQ sums (B, T, C) or None) as float32 device arrays: views of
    `scratch`, or allocated when it is None."""
    import cupy
    if scratch is None:
        return (cupy.empty((B, H, T), dtype=np.float32),
                cupy.empty((B, T, C), dtype=np.float32) if dq_sums else None)
    _cu.check_scratch(scratch, attention_backward_scratch_size(B, T, C, H, dq_sums), np.float32)
    start = _scratch_delta_offset(B, T, C, dq_sums)
    return (scratch[start:start + B * H * T].reshape(B, H, T),
            scratch[:B * T * C].reshape(B, T, C) if dq_sums else None)


# ---- CUDA launcher (kernels_cu/attention.cu)
# float32 with head dims in kernels.ATTENTION_HEAD_DIMS (8, 16, 32, 48, 64, 80, 96, 128): tiled
# FlashAttention-2 style kernels (online softmax in the forward, lse saved; the backward
# recomputes P from lse: a dq kernel (also writing Delta = rowsum(dO * O)) then a dk/dv kernel,
# no float atomics, bitwise reproducible; nothing T x T in device memory).
# float64, or a head dim without a kernel: the reference above on CuPy arrays (cuBLAS batched
# matmuls over query blocks) -- for verification and odd shapes, not for speed; a head dim
# without a kernel warns once.
# precision="bf16" (float32): the tensor-core kernels (*_mma_kernel, bf16 operands, fp32
# accumulators, same three passes, also deterministic) for head dims that are multiples of 16 up
# to 128 with an instantiation in kernels.NAME_EXPRESSIONS; any other head dim falls back to the
# fp32 path above (fp32 kernels or the reference), i.e. computes what precision="fp32" does.
# The bf16 backward comes in two variants (attention_backward_variant): "two-pass" (the default:
# the dq kernel, then the dkv kernel; seven matrix products, S and dP computed twice, no
# atomics: bitwise reproducible) and "atomic-dq" (a delta kernel writing Delta and zeroing dQ,
# then one kernel per key block doing dkv's work and dQ += dS K with fp32 atomicAdd: five
# products; dK, dV bitwise the two-pass kernels', dQ rounded in the order the blocks' atomics
# land, so not reproducible bit for bit between runs).
# slopes: every kernel has a `<D, true>` instantiation that adds m_h (j - i) per score, reading
# the H slopes from the device array; `<D>` is the plain kernel (not one instruction more).
# dropout: run-time arguments of every kernel (threshold 0: off, a block-uniform branch; no
# further instantiations); each pass draws the keep bit of each score it uses from Philox.


_ATT_ROWS = 32  # ATT_ROWS in attention.cu: queries (forward, dq) or keys (dkv) per block
_MMA_ROWS = 64  # MMA_ROWS in attention.cu: the same for the bf16 tensor-core backward kernels
_MMA_THREADS = 128


def _mma_forward_warps(D):
    """AttnMmaCfg<D>::FWD_WARPS in attention.cu: warps per forward block; at D = 64 the
    compile-time setting the kernel is compiled with now (kernels.SETTINGS)."""
    if D == 64:
        from ..kernels import setting
        return setting("attention", "CLLM_ATTN_FWD_WARPS_D64")
    return 8 if D < 64 else 4


def _mma_forward_mtiles(D):
    """AttnMmaCfg<D>::FWD_MTILES: 16-row m-tiles per forward warp (a setting at D = 64, else 1);
    a forward block covers 16 * warps * m-tiles queries."""
    if D == 64:
        from ..kernels import setting
        return setting("attention", "CLLM_ATTN_FWD_MTILES_D64")
    return 1


def _mma_smem_bytes(D):
    """AttnMmaCfg<D>'s FWD_SMEM, DQ_SMEM, DKV_SMEM, ATOMIC_SMEM in attention.cu: the dynamic
    shared memory of the forward, dq, dkv and atomic-dq backward tensor-core kernels
    (double-buffered tiles of pitch D + 8 bf16; the forward's K, V tiles 64 rows, plus its
    block's Q rows with several m-tiles per warp; dq's key tile 64 rows, 32 above D = 64; dkv's
    query tile 64, 32 to D = 96, else 16; the atomic-dq kernel's dS tile 64 keys x that query
    tile, pitch + 8)."""
    pitch = (D + 8) * 2
    dq_rows = 64 if D <= 64 else 32
    dkv_rows = 64 if D <= 64 else (32 if D <= 96 else 16)
    mtiles = _mma_forward_mtiles(D)
    q_rows = 16 * _mma_forward_warps(D) * mtiles if mtiles > 1 else 0
    dkv = (2 * _MMA_ROWS + 4 * dkv_rows) * pitch + 16 * dkv_rows
    return ((4 * 64 + q_rows) * pitch, 4 * dq_rows * pitch, dkv,
            dkv + _MMA_ROWS * (dkv_rows + 8) * 2)


BACKWARD_VARIANTS = ("two-pass", "atomic-dq")  # the first is the default
BACKWARD_ENV = "CLLM_ATTN_BACKWARD"
_backward_choice = None  # set_attention_backward's variant; None: the environment's


def _check_backward_variant(variant, where):
    if variant not in BACKWARD_VARIANTS:
        raise ConfigError(f"{where}: expected one of {', '.join(BACKWARD_VARIANTS)}, "
                          f"got {variant!r}")
    return variant


def attention_backward_variant():
    """The bf16 tensor-core backward the next launch runs: set_attention_backward's choice,
    else the environment's CLLM_ATTN_BACKWARD ("two-pass" or "atomic-dq"; unset or empty:
    "two-pass"), read at every launch. A bad value raises ConfigError."""
    if _backward_choice is not None:
        return _backward_choice
    env = os.environ.get(BACKWARD_ENV, "")
    return _check_backward_variant(env, BACKWARD_ENV) if env else BACKWARD_VARIANTS[0]


def set_attention_backward(variant):
    """Run the bf16 backward as `variant` ("two-pass", "atomic-dq") from now on, whatever
    CLLM_ATTN_BACKWARD says; None: back to the environment's choice. Returns the previous
    setting (a variant or None), for tests and benchmarks to restore."""
    global _backward_choice
    old = _backward_choice
    _backward_choice = None if variant is None else _check_backward_variant(variant, "variant")
    return old


_STATIC_SMEM_LIMIT = 48 * 1024  # dynamic shared memory above it needs the kernel attribute


def _mma_launch(kernel, D, slopes, smem, grid, block, args, bf16_out=False):
    """Launch a tensor-core kernel with `smem` bytes of dynamic shared memory, raising the
    kernel's limit first where it is above the 48 KiB default (once per kernel: the attribute
    stays set, so a CUDA-graph capture after the warm-up step sets nothing). bf16_out: the
    backward kernels' <D, bias, cllm_bf16> instantiation, which stores a bf16 dqkv."""
    name = (f"{kernel}<{D}, {'false' if slopes is None else 'true'}, cllm_bf16>" if bf16_out
            else _kernel_name(kernel, D, slopes))
    k = _cu.kernel("attention", name)
    if smem > _STATIC_SMEM_LIMIT and k.max_dynamic_shared_size_bytes < smem:
        k.max_dynamic_shared_size_bytes = smem
    k(grid, block, args, shared_mem=smem)


_warned_dims = set()


def _cuda_head_dim_ok(dtype, D):
    from ..kernels import ATTENTION_HEAD_DIMS
    if dtype != np.float32:
        return False
    if D not in ATTENTION_HEAD_DIMS:
        if D not in _warned_dims:
            _warned_dims.add(D)
            warnings.warn(f"attention: no CUDA kernel for head dim {D} (have "
                          f"{ATTENTION_HEAD_DIMS}); using the CuPy reference", stacklevel=3)
        return False
    return True


def _dims(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    return B, T, C, n_head, C // n_head


def _has_mma(D):
    from ..kernels import NAME_EXPRESSIONS
    return f"attention_forward_mma_kernel<{D}>" in NAME_EXPRESSIONS["attention"]


def _check_aligned16(**arrays):
    """The mma kernels stage tiles with 16-byte loads: the arrays they read that way must start
    on a 16-byte boundary (row offsets are multiples of 16 bytes since C % 16 == 0)."""
    for name, a in arrays.items():
        if a.data.ptr % 16:
            raise ValueError(f"{name}: precision='bf16' needs a 16-byte aligned array, got data "
                             f"pointer {a.data.ptr:#x} (pass a fresh or copied array)")


def _kernel_name(kernel, D, slopes):
    """The instantiation of `kernel` for head dim D: <D>, or <D, true> with the bias."""
    return f"{kernel}<{D}{'' if slopes is None else ', true'}>"


def _slopes_arg(slopes, lse):
    """The kernels' `slopes` pointer: the plain instantiations never read it, but a kernel
    argument must be an array; lse (float32, on the device) stands in."""
    return lse if slopes is None else slopes


def _check_grid(B, H):
    if B * H > 65535:
        raise ValueError(f"attention: batch * n_head = {B * H} exceeds the CUDA grid limit 65535")


def _dropout_args(lse, dropout):
    """The kernels' trailing dropout arguments (seed, step pointer, site, micro, threshold,
    1 / (1 - p)); threshold 0 when off: the kernels draw nothing."""
    p = _dropout_p(dropout)
    return dropout_kernel_args(lse, p, dropout[1] if p else None)


def _mma_operand(name, a):
    """qkv, dout or (backward) out as the tensor-core kernels read it: bf16 storage (a float32
    array rounded into a temporary: what tests and benchmarks pass; the bf16 model passes bf16),
    16-byte aligned."""
    a16 = a if is_bf16(a) else to_bf16(a)
    _check_aligned16(**{name: a16})
    return a16


def attention_forward_cuda(qkv, n_head, out=None, lse=None, precision="fp32", slopes=None,
                           dropout=None, out_mm=None):
    _cu.require_device(qkv=qkv)
    _check_precision(precision, qkv)
    B, T, C, H, D = _dims(qkv, n_head)
    fdt = float_dtype(qkv)
    # a bf16 out (precision "bf16", checked by attention_forward): the tensor-core forward
    # writes it as its out_mm, alone (no float output); the other paths a float output cast
    bf16_only = out is not None and is_bf16(out)
    if bf16_only:
        _cu.require_device(out=out)
        if not _has_mma(D):
            _, lse = attention_forward_cuda(qkv, n_head, None, lse, precision, slopes, dropout,
                                            out_mm=out)
            return out, lse
        out, out_mm = None, out
    else:
        out = _cu.out_array("out", out, (B, T, C), fdt)
    lse = _cu.out_array("lse", lse, (B, H, T), fdt)
    for name, a in (("out", out), ("lse", lse)):
        if a is not None:   # (every block reads qkv's keys and the slopes)
            _cu.check_disjoint(name, a, qkv=qkv, slopes=slopes)
    if out is not None:
        _cu.check_disjoint("out", out, lse=lse)
    if out_mm is not None:
        _cu.require_device(out_mm=out_mm)
        _check_out_mm(out_mm, qkv, out=out, lse=lse, slopes=slopes)
    if precision == "bf16" and not _has_mma(D):
        _reference_storage(qkv)
    if B * T * C == 0:
        return (out_mm if bf16_only else out), lse
    if precision == "bf16" and _has_mma(D):
        _check_grid(B, H)
        qkv = _mma_operand("qkv", qkv)
        if out_mm is not None and out_mm.data.ptr % 4:
            raise ValueError(f"out_mm: needs a 4-byte aligned array (the kernel stores bf16 "
                             f"pairs), got data pointer {out_mm.data.ptr:#x}")
        warps = _mma_forward_warps(D)
        # write_mm: 0 the float out only, 1 both, 2 the bf16 one only; an unwritten pointer's
        # stand-in is an array of its type (qkv for out_mm, lse for out), never written
        mode = 2 if bf16_only else (0 if out_mm is None else 1)
        _mma_launch("attention_forward_mma_kernel", D, slopes, _mma_smem_bytes(D)[0],
                    (_cu.ceil_div(T, 16 * warps * _mma_forward_mtiles(D)), B * H),
                    (32 * warps,),
                    (qkv, lse if bf16_only else out, lse, qkv if out_mm is None else out_mm,
                     _cu.i32(mode), _cu.i32(T), _cu.i32(H),
                     np.float32(1.0 / math.sqrt(D)), _slopes_arg(slopes, lse),
                     *_dropout_args(lse, dropout)))
        return (out_mm if bf16_only else out), lse
    if not _cuda_head_dim_ok(qkv.dtype, D):
        return attention_forward_ref(qkv, n_head, out, lse, slopes=slopes, dropout=dropout,
                                     out_mm=out_mm)
    _check_grid(B, H)
    k = _cu.kernel("attention", _kernel_name("attention_forward_kernel", D, slopes))
    k((_cu.ceil_div(T, _ATT_ROWS), B * H), (128,),
      (qkv, out, lse, _cu.i32(T), _cu.i32(H), np.float32(1.0 / math.sqrt(D)),
       _slopes_arg(slopes, lse), *_dropout_args(lse, dropout)))
    if out_mm is not None:  # the fp32 kernel writes no bf16: one cast pass
        to_bf16(out, out=out_mm)
    return out, lse


def attention_backward_cuda(dout, qkv, out, lse, n_head, dqkv=None, precision="fp32",
                            slopes=None, dropout=None, scratch=None):
    _cu.require_device(dout=dout, qkv=qkv, out=out, lse=lse)
    _check_precision(precision, qkv)
    B, T, C, H, D = _dims(qkv, n_head)
    fdt = float_dtype(qkv)
    check_array("lse", lse, shape=(B, H, T), dtype=fdt)
    bf16_out = dqkv is not None and is_bf16(dqkv)
    if bf16_out:
        _cu.require_device(dqkv=dqkv)   # (checked by attention_backward)
    else:
        dqkv = _cu.out_array("dqkv", dqkv, (B, T, 3 * C), fdt)
    _cu.check_disjoint("dqkv", dqkv, qkv=qkv, dout=dout, out=out, lse=lse, slopes=slopes)
    if scratch is not None:
        _cu.check_disjoint("scratch", scratch, qkv=qkv, dout=dout, out=out, lse=lse,
                           slopes=slopes, dqkv=dqkv)
    if precision == "bf16" and not _has_mma(D):
        _reference_storage(qkv, dout)
    if B * T * C == 0:
        return dqkv
    if precision == "bf16" and _has_mma(D):
        variant = attention_backward_variant()
        _check_grid(B, H)
        # O in bf16 as well: Delta sums the bf16 dO and O (a float O rounded into a temporary)
        qkv, dout, out = (_mma_operand(n, a) for n, a in (("qkv", qkv), ("dout", dout),
                                                          ("out", out)))
        if bf16_out and dqkv.data.ptr % 4:
            raise ValueError(f"dqkv: a bf16 dqkv needs a 4-byte aligned array (the kernels store "
                             f"bf16 pairs), got data pointer {dqkv.data.ptr:#x}")
        delta, dq_sums = _backward_scratch(scratch, B, T, C, H,
                                           bf16_out and variant == "atomic-dq")
        grid = (_cu.ceil_div(T, _MMA_ROWS), B * H)
        scale = np.float32(1.0 / math.sqrt(D))
        m = _slopes_arg(slopes, lse)
        drop = _dropout_args(lse, dropout)
        _, dq_smem, dkv_smem, atomic_smem = _mma_smem_bytes(D)
        rest = (_cu.i32(T), _cu.i32(H), scale, m, *drop)
        if variant == "atomic-dq":
            # dQ's fp32 sums: dqkv's Q slot (row pitch 3C), or for a bf16 dqkv a (B, T, C)
            # scratch (pitch C); zeroed by the delta kernel (which writes Delta) for the key
            # blocks' atomicAdds
            dq_acc = dq_sums if bf16_out else dqkv
            _cu.kernel("attention", f"attention_backward_delta_kernel<{D}>")(
                (_cu.ceil_div(T, 32), B * H), (_MMA_THREADS,),
                (out, dout, delta, dq_acc, _cu.i32(C if bf16_out else 3 * C), _cu.i32(T),
                 _cu.i32(H)))
            _mma_launch("attention_backward_mma_kernel", D, slopes, atomic_smem, grid,
                        (_MMA_THREADS,), (qkv, dout, lse, delta, dqkv, *rest, dq_acc),
                        bf16_out)
            if bf16_out:   # the fp32 sums rounded into dqkv's Q columns
                pairs = B * T * C // 2
                _cu.kernel("attention", "attention_dq_to_bf16_kernel<float>")(
                    (_cu.grid_stride_blocks(pairs),), (_cu.THREADS,),
                    (dq_acc, dqkv, _cu.i64(pairs), _cu.i32(C)))
            return dqkv
        # the dq kernel also writes Delta, which the dkv kernel reads
        _mma_launch("attention_backward_dq_mma_kernel", D, slopes, dq_smem, grid,
                    (_MMA_THREADS,), (qkv, out, dout, lse, delta, dqkv, *rest), bf16_out)
        _mma_launch("attention_backward_dkv_mma_kernel", D, slopes, dkv_smem, grid,
                    (_MMA_THREADS,), (qkv, dout, lse, delta, dqkv, *rest), bf16_out)
        return dqkv
    if is_bf16(out):   # the fp32 kernels and the reference read a float O
        out = from_bf16(out)
    if bf16_out:   # the fp32 kernels and the reference write float: one cast pass
        to_bf16(attention_backward_cuda(dout, qkv, out, lse, n_head, None, precision, slopes,
                                        dropout, scratch), out=dqkv)
        return dqkv
    if not _cuda_head_dim_ok(qkv.dtype, D):
        return attention_backward_ref(dout, qkv, out, lse, n_head, dqkv, slopes=slopes,
                                      dropout=dropout)
    _check_grid(B, H)
    delta = _backward_scratch(scratch, B, T, C, H, False)[0]
    grid = (_cu.ceil_div(T, _ATT_ROWS), B * H)
    scale = np.float32(1.0 / math.sqrt(D))
    m = _slopes_arg(slopes, lse)
    drop = _dropout_args(lse, dropout)
    _cu.kernel("attention", _kernel_name("attention_backward_dq_kernel", D, slopes))(
        grid, (128,),
        (qkv, out, dout, lse, delta, dqkv, _cu.i32(T), _cu.i32(H), scale, m, *drop))
    _cu.kernel("attention", _kernel_name("attention_backward_dkv_kernel", D, slopes))(
        grid, (128,), (qkv, dout, lse, delta, dqkv, _cu.i32(T), _cu.i32(H), scale, m, *drop))
    return dqkv
