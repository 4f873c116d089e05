"""Causal multi-head self-attention on the fused q, k, v projection.

forward:  qkv (B, T, 3C) [q | k | v, each C = H * D wide] -> out (B, T, C), lse (B, H, T)
          lse[b, h, i] = log sum_{j <= i} exp(q_i . k_j / sqrt(D))
backward: dout (B, T, C), qkv, out, lse -> dqkv (B, T, 3C)
          The probabilities are recomputed from lse; nothing T x T survives the forward.
precision: "fp32" (default) computes in the arrays' dtype. "bf16" (float32 arrays only) runs
          every matrix product on bf16-rounded operands with fp32 accumulation (tensor cores on
          the GPU); inputs, outputs, softmax, lse and Delta stay fp32 (see _forward_bf16_ref).
"""
import math

import numpy as np

from ._common import check_array, check_float, is_device_array
from .cast import round_bf16

_mask_cache = {}


def _causal_bias(T, dtype):
    """(T, T) additive mask: 0 on and below the diagonal, -inf above (cached per T, dtype)."""
    key = (T, np.dtype(dtype))
    m = _mask_cache.get(key)
    if m is None:
        m = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
        _mask_cache[key] = m
    return m


# Query rows are processed in blocks of ATTN_BLOCK: block r only needs keys [0, end of r], so
# the work above the diagonal (about half of it) is never done, and only the diagonal
# sub-block needs the mask. Also bounds the score scratch to (B*H, ATTN_BLOCK, T).
ATTN_BLOCK = 64


def _head_views(qkv, n_head):
    """q, k, v as (B, H, T, D) strided views of qkv (B, T, 3C): no copy. Each (T, D) matrix
    has row stride 3C, which BLAS takes as its leading dimension."""
    B, T, C3 = qkv.shape
    v5 = qkv.reshape(B, T, 3, n_head, C3 // 3 // n_head).transpose(2, 0, 3, 1, 4)
    return v5[0], v5[1], v5[2]


def _blocks(T):
    for r0 in range(0, T, ATTN_BLOCK):
        yield r0, min(T, r0 + ATTN_BLOCK)


def _block_scores(qs, k, r0, r1):
    """Scaled scores of query rows [r0, r1) against keys [0, r1), diagonal block masked."""
    s = np.matmul(qs[..., r0:r1, :], k[..., :r1, :].swapaxes(-1, -2))
    s[..., r0:r1] += _causal_bias(r1 - r0, s.dtype)
    return s


PRECISIONS = ("fp32", "bf16")


def _check_precision(precision, dtype):
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and np.dtype(dtype) != np.float32:
        raise ValueError(f"precision='bf16' needs float32 arrays, got {np.dtype(dtype)}")


def attention_forward_ref(qkv, n_head, out=None, lse=None, precision="fp32"):
    _check_precision(precision, qkv.dtype)
    if precision == "bf16":
        return _forward_bf16_ref(qkv, n_head, out, lse)
    B, T, C3 = qkv.shape
    D = C3 // 3 // n_head
    q, k, v = _head_views(qkv, n_head)
    qs = q * (1.0 / math.sqrt(D))
    if out is None:
        out = np.empty((B, T, C3 // 3), dtype=qkv.dtype)
    if lse is None:
        lse = np.empty((B, n_head, T), dtype=qkv.dtype)
    y = out.reshape(B, T, n_head, D).transpose(0, 2, 1, 3)  # (B, H, T, D) view of out
    for r0, r1 in _blocks(T):
        s = _block_scores(qs, k, r0, r1)
        m = s.max(axis=-1, keepdims=True)
        s -= m
        np.exp(s, out=s)
        l = s.sum(axis=-1, keepdims=True)
        yb = np.matmul(s, v[..., :r1, :], out=y[..., r0:r1, :])
        yb /= l  # normalise the (rows, D) output rather than the (rows, r1) probabilities
        np.log(l[..., 0], out=lse[..., r0:r1])
        lse[..., r0:r1] += m[..., 0]
    return out, lse


def attention_backward_ref(dout, qkv, out, lse, n_head, dqkv=None, precision="fp32"):
    _check_precision(precision, qkv.dtype)
    if precision == "bf16":
        return _backward_bf16_ref(dout, qkv, out, lse, n_head, dqkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    scale = 1.0 / math.sqrt(D)
    q, k, v = _head_views(qkv, n_head)
    qs = q * scale
    heads = lambda a: a.reshape(B, T, n_head, D).transpose(0, 2, 1, 3)  # noqa: E731
    do, o = heads(dout), heads(out)
    delta = np.einsum("bhtd,bhtd->bht", do, o)  # rowsum(dO * O) == rowsum(P * dP)
    if dqkv is None:
        dqkv = np.empty_like(qkv)
    dq, dk, dv = _head_views(dqkv, n_head)      # written in place, (B, H, T, D) views
    dk[...] = 0
    dv[...] = 0
    for r0, r1 in _blocks(T):
        p = _block_scores(qs, k, r0, r1)
        p -= lse[..., r0:r1, None]
        np.exp(p, out=p)
        dv[..., :r1, :] += np.matmul(p.swapaxes(-1, -2), do[..., r0:r1, :])
        ds = np.matmul(do[..., r0:r1, :], v[..., :r1, :].swapaxes(-1, -2))
        ds -= delta[..., r0:r1, None]
        ds *= p  # dS / scale (masked entries have p == 0)
        dqb = np.matmul(ds, k[..., :r1, :], out=dq[..., r0:r1, :])
        dqb *= scale
        dk[..., :r1, :] += np.matmul(ds.swapaxes(-1, -2), qs[..., r0:r1, :])
    return dqkv


# ---- bf16 reference: what the tensor-core kernels compute (attention.cu, "bf16 tensor-core
# variant"): operands of every matrix product rounded to bf16 (nearest even), products
# accumulated in fp32, everything else fp32. The forward's online softmax visits keys in tiles
# of BF16_KEY_TILE and rounds P = exp(s - m) against the running max m of the tiles seen so
# far, so the reference does exactly that (the rounding of P depends on m).
BF16_KEY_TILE = 64  # MMA_FWD_BC in attention.cu


def _forward_bf16_ref(qkv, n_head, out, lse):
    B, T, C3 = qkv.shape
    D = C3 // 3 // n_head
    scale = np.float32(1.0 / math.sqrt(D))
    q, k, v = _head_views(round_bf16(qkv), n_head)
    if out is None:
        out = np.empty((B, T, C3 // 3), dtype=np.float32)
    if lse is None:
        lse = np.empty((B, n_head, T), dtype=np.float32)
    y = out.reshape(B, T, n_head, D).transpose(0, 2, 1, 3)
    for r0, r1 in _blocks(T):
        rows = np.arange(r0, r1)[:, None]
        m = np.full((B, n_head, r1 - r0, 1), -np.inf, dtype=np.float32)
        l = np.zeros((B, n_head, r1 - r0, 1), dtype=np.float32)  # noqa: E741
        acc = np.zeros((B, n_head, r1 - r0, D), dtype=np.float32)
        for c0 in range(0, r1, BF16_KEY_TILE):  # every tile holding a key <= some row's index
            c1 = min(r1, c0 + BF16_KEY_TILE)    # keys >= r1 are masked for all these rows
            s = np.matmul(q[..., r0:r1, :], k[..., c0:c1, :].swapaxes(-1, -2)) * scale
            s[..., np.arange(c0, c1)[None, :] > rows] = -np.inf
            m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
            m_sub = np.where(m_new == -np.inf, np.float32(0), m_new)  # all-masked row: no NaN
            alpha = np.exp(m - m_sub)
            p = np.exp(s - m_sub)
            l = l * alpha + p.sum(axis=-1, keepdims=True)  # noqa: E741
            acc = acc * alpha + np.matmul(round_bf16(p), v[..., c0:c1, :])
            m = m_new
        y[..., r0:r1, :] = acc / l
        lse[..., r0:r1] = (m + np.log(l))[..., 0]
    return out, lse


def _backward_bf16_ref(dout, qkv, out, lse, n_head, dqkv):
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    scale = np.float32(1.0 / math.sqrt(D))
    q, k, v = _head_views(round_bf16(qkv), n_head)
    heads = lambda a: a.reshape(B, T, n_head, D).transpose(0, 2, 1, 3)  # noqa: E731
    do = heads(round_bf16(dout))
    # fp32, with dO rounded as in dP: Delta_i = sum_j P_ij dP_ij for the dP actually used
    delta = np.einsum("bhtd,bhtd->bht", do, heads(out))
    if dqkv is None:
        dqkv = np.empty_like(qkv)
    dq, dk, dv = _head_views(dqkv, n_head)
    dk[...] = 0
    dv[...] = 0
    for r0, r1 in _blocks(T):
        s = np.matmul(q[..., r0:r1, :], k[..., :r1, :].swapaxes(-1, -2)) * scale
        s[..., r0:r1] += _causal_bias(r1 - r0, s.dtype)
        p = np.exp(s - lse[..., r0:r1, None])
        dv[..., :r1, :] += np.matmul(round_bf16(p).swapaxes(-1, -2), do[..., r0:r1, :])
        dp = np.matmul(do[..., r0:r1, :], v[..., :r1, :].swapaxes(-1, -2))
        ds = round_bf16(p * (dp - delta[..., r0:r1, None]))  # dS / scale
        dq[..., r0:r1, :] = np.matmul(ds, k[..., :r1, :]) * scale
        dk[..., :r1, :] += np.matmul(ds.swapaxes(-1, -2), q[..., r0:r1, :])
    dk *= scale
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
    fp32 path (same as precision="fp32")."""
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
# float64, or a head dim without a kernel: a dense CuPy path (cuBLAS batched matmuls that
# materialise the (B, H, T, T) scores) computing the reference's math -- for verification and
# odd shapes, not for speed; a head dim without a kernel warns once.
# precision="bf16" (float32): the tensor-core kernels (*_mma_kernel, bf16 operands, fp32
# accumulators, same three passes, also deterministic) for head dims that are multiples of 16 up
# to 128 with an instantiation in kernels.NAME_EXPRESSIONS; any other head dim falls back to the
# fp32 path above (fp32 kernels or the dense path), i.e. computes what precision="fp32" does.
import warnings  # noqa: E402

from . import _cuda as _cu  # noqa: E402

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
                          f"{ATTENTION_HEAD_DIMS}); using the dense CuPy path", stacklevel=3)
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
        return _attention_forward_dense(qkv, n_head, out, lse)
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
        return _attention_backward_dense(dout, qkv, out, lse, n_head, dqkv)
    _check_grid(B, H)
    delta = cupy.empty((B, H, T), dtype=np.float32)
    grid = (_cu.ceil_div(T, _ATT_ROWS), B * H)
    scale = np.float32(1.0 / math.sqrt(D))
    _cu.kernel("attention", f"attention_backward_dq_kernel<{D}>")(
        grid, (128,), (qkv, out, dout, lse, delta, dqkv, _cu.i32(T), _cu.i32(H), scale))
    _cu.kernel("attention", f"attention_backward_dkv_kernel<{D}>")(
        grid, (128,), (qkv, dout, lse, delta, dqkv, _cu.i32(T), _cu.i32(H), scale))
    return dqkv


def _dense_split(qkv, n_head):
    B, T, C, H, D = _dims(qkv, n_head)
    s = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    return s[0], s[1], s[2]


def _dense_probs(q, k, lse_or_none, scale):
    import cupy
    T = q.shape[2]
    s = cupy.matmul(q, k.transpose(0, 1, 3, 2)) * scale
    s = cupy.where(cupy.triu(cupy.ones((T, T), dtype=bool), 1), -cupy.inf, s)
    if lse_or_none is None:
        m = s.max(axis=-1, keepdims=True)
        e = cupy.exp(s - m)
        l = e.sum(axis=-1, keepdims=True)  # noqa: E741
        return e / l, (m + cupy.log(l))[..., 0]
    return cupy.exp(s - lse_or_none[..., None]), None


def _attention_forward_dense(qkv, n_head, out, lse):
    import cupy
    B, T, C, H, D = _dims(qkv, n_head)
    q, k, v = _dense_split(qkv, n_head)
    p, lse_new = _dense_probs(q, k, None, 1.0 / math.sqrt(D))
    out[...] = cupy.matmul(p, v).transpose(0, 2, 1, 3).reshape(B, T, C)
    lse[...] = lse_new
    return out, lse


def _attention_backward_dense(dout, qkv, out, lse, n_head, dqkv):
    import cupy
    B, T, C, H, D = _dims(qkv, n_head)
    scale = 1.0 / math.sqrt(D)
    q, k, v = _dense_split(qkv, n_head)
    do = dout.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    o = out.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    p, _ = _dense_probs(q, k, lse, scale)
    dv = cupy.matmul(p.transpose(0, 1, 3, 2), do)
    dp = cupy.matmul(do, v.transpose(0, 1, 3, 2))
    delta = (do * o).sum(axis=-1)
    ds = (dp - delta[..., None]) * p * scale
    view = dqkv.reshape(B, T, 3, H, D)
    view[:, :, 0] = cupy.matmul(ds, k).transpose(0, 2, 1, 3)
    view[:, :, 1] = cupy.matmul(ds.transpose(0, 1, 3, 2), q).transpose(0, 2, 1, 3)
    view[:, :, 2] = dv.transpose(0, 2, 1, 3)
    return dqkv
