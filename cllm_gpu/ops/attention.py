"""Causal multi-head self-attention on the fused q, k, v projection.

forward:  qkv (B, T, 3C) [q | k | v, each C = H * D wide] -> out (B, T, C), lse (B, H, T)
          lse[b, h, i] = log sum_{j <= i} exp(q_i . k_j / sqrt(D))
backward: dout (B, T, C), qkv, out, lse -> dqkv (B, T, 3C)
          The probabilities are recomputed from lse; nothing T x T survives the forward.
precision: "fp32" (default) computes in the arrays' dtype. "bf16" (float32 arrays only) runs
          every matrix product on bf16-rounded operands with fp32 accumulation (tensor cores on
          the GPU); inputs, outputs, softmax, lse and Delta stay fp32.

One reference (`attention_forward_ref`, `attention_backward_ref`) serves both precisions and
both array modules (NumPy, and CuPy where no kernel fits: float64, odd head dims). Query rows
go in blocks of ATTN_BLOCK: block r only needs keys [0, end of r], so the work above the
diagonal (about half of it) is never done, and the score scratch is (B, H, ATTN_BLOCK, T).
In bf16 the forward visits each block's keys in tiles of BF16_KEY_TILE with an online softmax,
rounding P = exp(s - m) against the running max m of the tiles seen so far, exactly as the
tensor-core kernel does (the rounding of P depends on m); in fp32 one tile spans every key, so
the online softmax is the plain one.
"""
import math
import warnings

import numpy as np

from . import _cuda as _cu
from ._common import check_array, check_float, is_device_array, xp_of
from .cast import round_bf16

PRECISIONS = ("fp32", "bf16")
ATTN_BLOCK = 64      # query rows per block of the reference
BF16_KEY_TILE = 64   # MMA_FWD_BC in attention.cu: keys per online-softmax tile in bf16

_mask_cache = {}


def _causal_bias(xp, rows, cols, offset, dtype):
    """(rows, cols) additive mask for query rows r0 + i and keys c0 + j (offset = r0 - c0):
    0 where the key is at or before the query, -inf after it (cached)."""
    key = (xp.__name__, rows, cols, offset, np.dtype(dtype))
    m = _mask_cache.get(key)
    if m is None:
        m = xp.asarray(np.triu(np.full((rows, cols), -np.inf, dtype=dtype), k=offset + 1))
        _mask_cache[key] = m
    return m


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


def _check_precision(precision, dtype):
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and np.dtype(dtype) != np.float32:
        raise ValueError(f"precision='bf16' needs float32 arrays, got {np.dtype(dtype)}")


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


def attention_forward_ref(qkv, n_head, out=None, lse=None, precision="fp32"):
    _check_precision(precision, qkv.dtype)
    xp = xp_of(qkv)
    B, T, C3 = qkv.shape
    q, k, v, rnd, post = _operands(qkv, n_head, precision)
    if out is None:
        out = xp.empty((B, T, C3 // 3), dtype=qkv.dtype)
    if lse is None:
        lse = xp.empty((B, n_head, T), dtype=qkv.dtype)
    y = _heads(out, n_head)
    tile = BF16_KEY_TILE if precision == "bf16" else T
    for r0, r1 in _blocks(T):
        m = l = acc = None  # running max, sum and output of the online softmax
        for c0 in range(0, r1, tile):   # every tile holding a key <= some row of the block
            c1 = min(r1, c0 + tile)      # keys >= r1 are masked for all these rows
            s = xp.matmul(q[..., r0:r1, :], k[..., c0:c1, :].swapaxes(-1, -2))
            if post is not None:
                s *= post
            if c1 > r0 + 1:
                s += _causal_bias(xp, r1 - r0, c1 - c0, r0 - c0, s.dtype)
            m_new = s.max(axis=-1, keepdims=True)
            if m is not None:
                m_new = xp.maximum(m, m_new)
            m_sub = xp.where(m_new == -np.inf, 0, m_new)  # a row with every key masked: no NaN
            s -= m_sub
            p = xp.exp(s, out=s)
            pv = xp.matmul(rnd(p), v[..., c0:c1, :])
            if m is None:
                l, acc = p.sum(axis=-1, keepdims=True), pv  # noqa: E741
            else:
                alpha = xp.exp(m - m_sub)
                l = l * alpha + p.sum(axis=-1, keepdims=True)  # noqa: E741
                acc = acc * alpha + pv
            m = m_new
        y[..., r0:r1, :] = acc / l
        lse[..., r0:r1] = (m + xp.log(l))[..., 0]
    return out, lse


def attention_backward_ref(dout, qkv, out, lse, n_head, dqkv=None, precision="fp32"):
    _check_precision(precision, qkv.dtype)
    xp = xp_of(qkv)
    T = qkv.shape[1]
    D = qkv.shape[2] // 3 // n_head
    scale = qkv.dtype.type(1.0 / math.sqrt(D))
    q, k, v, rnd, post = _operands(qkv, n_head, precision)
    do = _heads(rnd(dout), n_head)
    # Delta_i = dO_i . O_i == sum_j P_ij dP_ij, with dO rounded as in dP (fp32)
    delta = (do * _heads(out, n_head)).sum(axis=-1)
    if dqkv is None:
        dqkv = xp.empty_like(qkv)
    dq, dk, dv = _head_views(dqkv, n_head)      # written in place, (B, H, T, D) views
    dk[...] = 0
    dv[...] = 0
    for r0, r1 in _blocks(T):
        s = xp.matmul(q[..., r0:r1, :], k[..., :r1, :].swapaxes(-1, -2))
        if post is not None:
            s *= post
        s[..., r0:r1] += _causal_bias(xp, r1 - r0, r1 - r0, 0, s.dtype)
        s -= lse[..., r0:r1, None]
        p = xp.exp(s, out=s)
        dv[..., :r1, :] += xp.matmul(rnd(p).swapaxes(-1, -2), do[..., r0:r1, :])
        ds = xp.matmul(do[..., r0:r1, :], v[..., :r1, :].swapaxes(-1, -2))
        ds -= delta[..., r0:r1, None]
        ds *= p                                   # dS / scale (masked entries have p == 0)
        ds = rnd(ds)
        dq[..., r0:r1, :] = xp.matmul(ds, k[..., :r1, :]) * scale
        dk[..., :r1, :] += xp.matmul(ds.swapaxes(-1, -2), q[..., r0:r1, :])
    if post is not None:
        dk *= post
    return dqkv


def _check(qkv, n_head):
    check_array("qkv", qkv, ndim=3)
    check_float("qkv", qkv)
    C3 = qkv.shape[2]
    if C3 % 3 or (C3 // 3) % n_head:
        raise ValueError(f"qkv: last dim {C3} is not 3 * n_head({n_head}) * head_dim")


def attention_forward(qkv, n_head, out=None, lse=None, precision="fp32"):
    """out (B, T, C), lse (B, H, T) of causal attention on qkv (B, T, 3C).

    precision="bf16": bf16-operand, fp32-accumulate matrix products (float32 arrays only); on
    the GPU the tensor-core kernels for head dims that are multiples of 16 up to 128, else the
    fp32 kernels (which compute what precision="fp32" does)."""
    _check(qkv, n_head)
    _check_precision(precision, qkv.dtype)
    if is_device_array(qkv):
        return attention_forward_cuda(qkv, n_head, out, lse, precision)
    return attention_forward_ref(qkv, n_head, out, lse, precision)


def attention_backward(dout, qkv, out, lse, n_head, dqkv=None, precision="fp32"):
    """dqkv (B, T, 3C) from dout (B, T, C) and the forward's qkv, out, lse; precision as in
    attention_forward (pass the forward's)."""
    _check(qkv, n_head)
    _check_precision(precision, qkv.dtype)
    B, T, C3 = qkv.shape
    check_array("dout", dout, shape=(B, T, C3 // 3), dtype=qkv.dtype)
    check_array("out", out, shape=(B, T, C3 // 3), dtype=qkv.dtype)
    check_array("lse", lse, shape=(B, n_head, T))
    if is_device_array(qkv):
        return attention_backward_cuda(dout, qkv, out, lse, n_head, dqkv, precision)
    return attention_backward_ref(dout, qkv, out, lse, n_head, dqkv, precision)


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


_ATT_ROWS = 32  # ATT_ROWS in attention.cu: queries (forward, dq) or keys (dkv) per block
_MMA_ROWS = 64  # MMA_ROWS in attention.cu: the same for the bf16 tensor-core kernels
_MMA_THREADS = 128
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


def _check_grid(B, H):
    if B * H > 65535:
        raise ValueError(f"attention: batch * n_head = {B * H} exceeds the CUDA grid limit 65535")


def attention_forward_cuda(qkv, n_head, out=None, lse=None, precision="fp32"):
    _cu.require_device(qkv=qkv)
    _check_precision(precision, qkv.dtype)
    B, T, C, H, D = _dims(qkv, n_head)
    out = _cu.out_array("out", out, (B, T, C), qkv.dtype)
    lse = _cu.out_array("lse", lse, (B, H, T), qkv.dtype)
    for name, a in (("out", out), ("lse", lse)):
        if _cu.overlaps(a, qkv):
            raise ValueError(f"{name}: must not overlap qkv")
    if B * T * C == 0:
        return out, lse
    if precision == "bf16" and _has_mma(D):
        _check_grid(B, H)
        _check_aligned16(qkv=qkv)
        _cu.kernel("attention", f"attention_forward_mma_kernel<{D}>")(
            (_cu.ceil_div(T, _MMA_ROWS), B * H), (_MMA_THREADS,),
            (qkv, out, lse, _cu.i32(T), _cu.i32(H), np.float32(1.0 / math.sqrt(D))))
        return out, lse
    if not _cuda_head_dim_ok(qkv.dtype, D):
        return attention_forward_ref(qkv, n_head, out, lse)
    _check_grid(B, H)
    k = _cu.kernel("attention", f"attention_forward_kernel<{D}>")
    k((_cu.ceil_div(T, _ATT_ROWS), B * H), (128,),
      (qkv, out, lse, _cu.i32(T), _cu.i32(H), np.float32(1.0 / math.sqrt(D))))
    return out, lse


def attention_backward_cuda(dout, qkv, out, lse, n_head, dqkv=None, precision="fp32"):
    import cupy
    _cu.require_device(dout=dout, qkv=qkv, out=out, lse=lse)
    _check_precision(precision, qkv.dtype)
    B, T, C, H, D = _dims(qkv, n_head)
    check_array("lse", lse, shape=(B, H, T), dtype=qkv.dtype)
    dqkv = _cu.out_array("dqkv", dqkv, (B, T, 3 * C), qkv.dtype)
    for name, a in (("qkv", qkv), ("dout", dout), ("out", out), ("lse", lse)):
        if _cu.overlaps(dqkv, a):
            raise ValueError(f"dqkv: must not overlap {name}")
    if B * T * C == 0:
        return dqkv
    if precision == "bf16" and _has_mma(D):
        _check_grid(B, H)
        _check_aligned16(qkv=qkv, dout=dout)
        delta = cupy.empty((B, H, T), dtype=np.float32)
        grid = (_cu.ceil_div(T, _MMA_ROWS), B * H)
        scale = np.float32(1.0 / math.sqrt(D))
        # the dq kernel also writes Delta, which the dkv kernel reads
        _cu.kernel("attention", f"attention_backward_dq_mma_kernel<{D}>")(
            grid, (_MMA_THREADS,),
            (qkv, out, dout, lse, delta, dqkv, _cu.i32(T), _cu.i32(H), scale))
        _cu.kernel("attention", f"attention_backward_dkv_mma_kernel<{D}>")(
            grid, (_MMA_THREADS,), (qkv, dout, lse, delta, dqkv, _cu.i32(T), _cu.i32(H), scale))
        return dqkv
    if not _cuda_head_dim_ok(qkv.dtype, D):
        return attention_backward_ref(dout, qkv, out, lse, n_head, dqkv)
    _check_grid(B, H)
    delta = cupy.empty((B, H, T), dtype=np.float32)
    grid = (_cu.ceil_div(T, _ATT_ROWS), B * H)
    scale = np.float32(1.0 / math.sqrt(D))
    _cu.kernel("attention", f"attention_backward_dq_kernel<{D}>")(
        grid, (128,), (qkv, out, dout, lse, delta, dqkv, _cu.i32(T), _cu.i32(H), scale))
    _cu.kernel("attention", f"attention_backward_dkv_kernel<{D}>")(
        grid, (128,), (qkv, dout, lse, delta, dqkv, _cu.i32(T), _cu.i32(H), scale))
    return dqkv
