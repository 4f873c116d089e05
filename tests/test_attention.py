import math

import numpy as np
import pytest

from attention_tolerance import U, heads64, lse_bound, split64
from cllm_gpu.ops.attention import (attention_backward, attention_backward_ref, attention_forward,
                                    attention_forward_ref)
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


# ---- precision="bf16": bf16-rounded matmul operands, fp32 accumulation
BF16_SHAPES = [(2, 37, 2, 16), (1, 130, 2, 64), (2, 77, 1, 32), (1, 200, 2, 48), (1, 150, 1, 128),
               (1, 1, 1, 16), (3, 64, 1, 80)]


def _bf16_inputs(B, T, H, D, seed=0):
    rng = np.random.default_rng(seed + 7 * T + D)
    qkv = (rng.normal(size=(B, T, 3 * H * D)) * 1.5).astype(np.float32)
    dout = rng.normal(size=(B, T, H * D)).astype(np.float32)
    return qkv, dout


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("B,T,H,D", BF16_SHAPES)
def test_bf16_reference_within_bf16_tolerance_of_fp32(B, T, H, D):
    """Tolerances, with u = 2^-8 the bf16 unit roundoff:
    - forward, per row i (rigorous, first order in nothing): rounding q and k perturbs each
      score by at most delta_i = (2u + u^2) * scale * max_j sum_d |q_id k_jd|, so
      |lse error| <= delta_i, the softmax weights move by at most e^(2 delta_i) - 1 in l1 norm,
      and rounding P and V adds at most (1 + u)^2 - 1 relative: |out error| <=
      (e^(2 delta_i) - 1 + 2u + u^2) * max_{j<=i} |v_j| per column (+ fp32 slack 1e-5).
      Norm-wise: 4 rounded operands (q, k, P, v) on every path, each <= u: <= 4u.
    - backward, norm-wise: each gradient is a first-order sum of perturbations from at most 6
      rounded operands (q, k via P; dO, v via dP; dS; k or q), each <= u relative: <= 6u;
      elementwise <= 12u of the largest |gradient| (2x for the cancellation in dP - Delta).
    The bf16 path must also really differ from fp32 (> u/16 norm-wise)."""
    qkv, dout = _bf16_inputs(B, T, H, D)
    out, lse = attention_forward_ref(qkv, H, precision="bf16")
    q64, d64 = qkv.astype(np.float64), dout.astype(np.float64)
    o_ref, lse_ref = attention_forward_ref(q64, H)
    v = split64(qkv, H)[2]
    delta = lse_bound(qkv, H)                                    # (B, H, T)
    np.testing.assert_array_less(np.abs(lse - lse_ref), delta + 1e-5)
    vmax = np.maximum.accumulate(np.abs(v), axis=2)              # max_{j<=i} |v_jd|
    bound = (np.expm1(2 * delta)[..., None] + 2 * U + U * U) * vmax + 1e-5
    np.testing.assert_array_less(np.abs(heads64(out, H) - heads64(o_ref, H)), bound)
    if T > 1:
        assert U / 16 < _rel(out, o_ref) <= 4 * U

    dqkv = attention_backward_ref(dout, qkv, out, lse, H, precision="bf16")
    want = attention_backward_ref(d64, q64, o_ref, lse_ref, H)
    C = H * D
    for i, name in enumerate(("dq", "dk", "dv")):
        g, w = dqkv[..., i * C:(i + 1) * C].astype(np.float64), want[..., i * C:(i + 1) * C]
        if T > 1:
            assert U / 16 < _rel(g, w) <= 6 * U, name
        assert np.abs(g - w).max() <= 12 * U * np.abs(w).max() + 1e-5, name


def test_bf16_precision_argument_is_checked():
    qkv, dout = _bf16_inputs(1, 5, 1, 16)
    with pytest.raises(ValueError, match="float32"):
        attention_forward(qkv.astype(np.float64), 1, precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        attention_forward(qkv, 1, precision="fp16")
    out, lse = attention_forward(qkv, 1)
    with pytest.raises(ValueError, match="float32"):
        attention_backward(dout.astype(np.float64), qkv.astype(np.float64), out.astype(np.float64),
                           lse.astype(np.float64), 1, precision="bf16")


def test_bf16_public_functions_dispatch_to_the_bf16_reference():
    qkv, dout = _bf16_inputs(2, 70, 2, 32)
    out, lse = attention_forward(qkv, 2, precision="bf16")
    o2, l2 = attention_forward_ref(qkv, 2, precision="bf16")
    np.testing.assert_array_equal(out, o2)
    np.testing.assert_array_equal(lse, l2)
    d1 = attention_backward(dout, qkv, out, lse, 2, precision="bf16")
    np.testing.assert_array_equal(d1, attention_backward_ref(dout, qkv, out, lse, 2,
                                                             precision="bf16"))
    assert not np.array_equal(out, attention_forward(qkv, 2)[0])  # fp32 is the default


def test_bf16_causality_future_tokens_do_not_matter():
    qkv, _ = _bf16_inputs(1, 80, 2, 16)
    a, la = attention_forward(qkv, 2, precision="bf16")
    qkv2 = qkv.copy()
    qkv2[:, 70:] += 3.0
    b, lb = attention_forward(qkv2, 2, precision="bf16")
    np.testing.assert_array_equal(a[:, :70], b[:, :70])
    np.testing.assert_array_equal(la[..., :70], lb[..., :70])
