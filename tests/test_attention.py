import math

import numpy as np
import pytest

from cllm_gpu.ops.attention import attention_backward, attention_forward
from fd import assert_grad_close


def plain_attention(qkv, H):
    """Straightforward per-head causal softmax attention, loops and all."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // H
    out = np.zeros((B, T, C))
    lse = np.zeros((B, H, T))
    for b in range(B):
        for h in range(H):
            q = qkv[b, :, h * D:(h + 1) * D]
            k = qkv[b, :, C + h * D:C + (h + 1) * D]
            v = qkv[b, :, 2 * C + h * D:2 * C + (h + 1) * D]
            for i in range(T):
                s = q[i] @ k[:i + 1].T / math.sqrt(D)
                m = s.max()
                p = np.exp(s - m)
                lse[b, h, i] = m + math.log(p.sum())
                out[b, i, h * D:(h + 1) * D] = (p / p.sum()) @ v[:i + 1]
    return out, lse


@pytest.mark.parametrize("B,T,H,D", [(2, 5, 2, 3), (1, 1, 1, 4), (1, 17, 3, 2)])
def test_forward_matches_loops(B, T, H, D):
    rng = np.random.default_rng(7)
    qkv = rng.normal(size=(B, T, 3 * H * D))
    out, lse = attention_forward(qkv, H)
    want_out, want_lse = plain_attention(qkv, H)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


def test_float32_close_to_float64():
    rng = np.random.default_rng(8)
    qkv = rng.normal(size=(2, 33, 3 * 16))
    o64, l64 = attention_forward(qkv, 4)
    o32, l32 = attention_forward(qkv.astype(np.float32), 4)
    assert o32.dtype == np.float32 and l32.dtype == np.float32
    np.testing.assert_allclose(o32, o64, rtol=1e-4, atol=1e-5)


def test_backward_finite_differences():
    rng = np.random.default_rng(9)
    B, T, H, D = 2, 6, 2, 3
    qkv = rng.normal(size=(B, T, 3 * H * D))
    R = rng.normal(size=(B, T, H * D))
    out, lse = attention_forward(qkv, H)
    dqkv = attention_backward(R, qkv, out, lse, H)
    loss = lambda: float((plain_attention(qkv, H)[0] * R).sum())  # noqa: E731
    assert_grad_close(loss, qkv, dqkv, n=60)


def test_causality_future_tokens_do_not_matter():
    rng = np.random.default_rng(10)
    qkv = rng.normal(size=(1, 8, 12))
    a, _ = attention_forward(qkv, 2)
    qkv2 = qkv.copy()
    qkv2[:, 5:] += 3.0
    b, _ = attention_forward(qkv2, 2)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
