"""Causal multi-head self-attention on the fused q, k, v projection.

forward:  qkv (B, T, 3C) [q | k | v, each C = H * D wide] -> out (B, T, C), lse (B, H, T)
          lse[b, h, i] = log sum_{j <= i} exp(q_i . k_j / sqrt(D))
backward: dout (B, T, C), qkv, out, lse -> dqkv (B, T, 3C)
          The probabilities are recomputed from lse; nothing T x T survives the forward.
"""
import math

import numpy as np

from ._common import check_array, check_float, is_device_array

_mask_cache = {}


def _causal_bias(T, dtype):
    """(T, T) additive mask: 0 on and below the diagonal, -inf above (cached per T, dtype)."""
    key = (T, np.dtype(dtype))
    m = _mask_cache.get(key)
    if m is None:
        m = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
        _mask_cache[key] = m
    return m


def _split_heads(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    # (B, T, 3, H, D) -> (3, B, H, T, D), contiguous so that matmul runs batched BLAS gemms.
    s = np.ascontiguousarray(qkv.reshape(B, T, 3, n_head, D).transpose(2, 0, 3, 1, 4))
    return s[0], s[1], s[2]


def _merge_heads(y):
    B, H, T, D = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def _probs(q, k, lse_or_none, scale):
    """Scaled causal scores turned into probabilities. With lse given, P = exp(S - lse)."""
    T = q.shape[2]
    s = np.matmul(q, k.transpose(0, 1, 3, 2))
    s *= scale
    s += _causal_bias(T, s.dtype)
    if lse_or_none is None:
        m = s.max(axis=-1, keepdims=True)
        s -= m
        np.exp(s, out=s)
        l = s.sum(axis=-1, keepdims=True)
        s /= l
        return s, (m + np.log(l))[..., 0]
    s -= lse_or_none[..., None]
    np.exp(s, out=s)
    return s, None


def attention_forward_ref(qkv, n_head, out=None, lse=None):
    B, T, C3 = qkv.shape
    D = C3 // 3 // n_head
    q, k, v = _split_heads(qkv, n_head)
    p, lse_new = _probs(q, k, None, 1.0 / math.sqrt(D))
    y = _merge_heads(np.matmul(p, v))
    if out is None:
        out = np.ascontiguousarray(y)
    else:
        out[...] = y
    if lse is None:
        lse = lse_new.astype(qkv.dtype, copy=False)
    else:
        lse[...] = lse_new
    return out, lse


def attention_backward_ref(dout, qkv, out, lse, n_head, dqkv=None):
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    scale = 1.0 / math.sqrt(D)
    q, k, v = _split_heads(qkv, n_head)
    do = np.ascontiguousarray(dout.reshape(B, T, n_head, D).transpose(0, 2, 1, 3))
    o = out.reshape(B, T, n_head, D).transpose(0, 2, 1, 3)
    p, _ = _probs(q, k, lse, scale)
    dv = np.matmul(p.transpose(0, 1, 3, 2), do)
    dp = np.matmul(do, v.transpose(0, 1, 3, 2))
    delta = np.einsum("bhtd,bhtd->bht", do, o)  # rowsum(dO * O) == rowsum(P * dP)
    dp -= delta[..., None]
    dp *= p  # dS (masked entries have p == 0)
    dp *= scale
    dq = np.matmul(dp, k)
    dk = np.matmul(dp.transpose(0, 1, 3, 2), q)
    if dqkv is None:
        dqkv = np.empty_like(qkv)
    view = dqkv.reshape(B, T, 3, n_head, D)
    view[:, :, 0] = dq.transpose(0, 2, 1, 3)
    view[:, :, 1] = dk.transpose(0, 2, 1, 3)
    view[:, :, 2] = dv.transpose(0, 2, 1, 3)
    return dqkv


def _check(qkv, n_head):
    check_array("qkv", qkv, ndim=3)
    check_float("qkv", qkv)
    C3 = qkv.shape[2]
    if C3 % 3 or (C3 // 3) % n_head:
        raise ValueError(f"qkv: last dim {C3} is not 3 * n_head({n_head}) * head_dim")


def attention_forward(qkv, n_head, out=None, lse=None):
    _check(qkv, n_head)
    if is_device_array(qkv):
        return attention_forward_cuda(qkv, n_head, out, lse)
    return attention_forward_ref(qkv, n_head, out, lse)


def attention_backward(dout, qkv, out, lse, n_head, dqkv=None):
    _check(qkv, n_head)
    B, T, C3 = qkv.shape
    check_array("dout", dout, shape=(B, T, C3 // 3), dtype=qkv.dtype)
    check_array("out", out, shape=(B, T, C3 // 3), dtype=qkv.dtype)
    check_array("lse", lse, shape=(B, n_head, T))
    if is_device_array(qkv):
        return attention_backward_cuda(dout, qkv, out, lse, n_head, dqkv)
    return attention_backward_ref(dout, qkv, out, lse, n_head, dqkv)
