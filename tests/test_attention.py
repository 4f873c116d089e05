import math

import numpy as np
import pytest

from attention_tolerance import U, heads64, lse_bound, split64
from cllm_gpu.ops import attention as attention_module
from cllm_gpu.ops.attention import (attention_backward, attention_backward_ref, attention_forward,
                                    attention_forward_ref, attention_slopes)
from cllm_gpu.ops.dropout import ATTN_PROBS, DropoutKey, keep_rows, philox4x32_10, site_id
from fd import assert_grad_close


def plain_attention(qkv, H, slopes=None, keep=None, p=0.0):
    """Straightforward per-head causal softmax attention, loops and all; slopes: the distance
    bias, score(i, j) = q_i . k_j / sqrt(D) - m_h (i - j); keep (B, H, T, T) bool: the
    dropout mask on the probabilities (kept ones scaled by 1 / (1 - p))."""
    p_drop = p
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
                if slopes is not None:
                    s = s - slopes[h] * (i - np.arange(i + 1))
                m = s.max()
                p = np.exp(s - m)
                lse[b, h, i] = m + math.log(p.sum())
                w = p / p.sum()
                if keep is not None:
                    w = w * keep[b, h, i, :i + 1] / (1 - p_drop)
                out[b, i, h * D:(h + 1) * D] = w @ v[:i + 1]
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


def test_bf16_without_a_tensor_core_head_dim_computes_fp32():
    """precision="bf16" at a head dim without a tensor-core kernel (8) computes what "fp32"
    computes, as the GPU's fp32 kernels do there (tests/gpu: ..._runs_the_fp32_kernels), so
    the NumPy and CUDA bf16 models agree; a tensor-core head dim (16) rounds its operands."""
    for D, same in ((8, True), (16, False)):
        qkv, dout = _bf16_inputs(2, 45, 2, D)
        o1, l1 = attention_forward(qkv, 2, precision="bf16")
        o2, l2 = attention_forward(qkv, 2)
        assert np.array_equal(o1, o2) == same and np.array_equal(l1, l2) == same
        g1 = attention_backward(dout, qkv, o1, l1, 2, precision="bf16")
        g2 = attention_backward(dout, qkv, o2, l2, 2)
        assert np.array_equal(g1, g2) == same


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


def test_bf16_storage_inputs_are_the_rounded_float_inputs():
    """qkv and dout in bf16 storage (what the bf16 model stores) give the bits float32 ones
    give: precision="bf16" rounds every operand read from them anyway. out, lse, dqkv stay
    float32; bf16 storage needs precision="bf16"."""
    from cllm_gpu.ops.cast import is_bf16, to_bf16
    qkv, dout = _bf16_inputs(1, 70, 2, 32)
    q16 = to_bf16(qkv)
    drop = (0.25, DROP_KEY)
    m = attention_slopes("alibi", 2).astype(np.float32)
    o1, l1 = attention_forward(qkv, 2, precision="bf16", slopes=m, dropout=drop)
    o2, l2 = attention_forward(q16, 2, precision="bf16", slopes=m, dropout=drop)
    assert not any(is_bf16(a) for a in (o2, l2))
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(l1, l2)
    d1 = attention_backward(dout, qkv, o1, l1, 2, precision="bf16", slopes=m, dropout=drop)
    d2 = attention_backward(to_bf16(dout), q16, o2, l2, 2, precision="bf16", slopes=m,
                            dropout=drop)
    assert not is_bf16(d2)
    np.testing.assert_array_equal(d1, d2)
    with pytest.raises(ValueError, match="qkv: bf16 storage needs precision='bf16'"):
        attention_forward(q16, 2)
    with pytest.raises(ValueError, match="dout: bf16 storage needs precision='bf16'"):
        attention_backward(to_bf16(dout), qkv, o1, l1, 2)


def test_bf16_causality_future_tokens_do_not_matter():
    qkv, _ = _bf16_inputs(1, 80, 2, 16)
    a, la = attention_forward(qkv, 2, precision="bf16")
    qkv2 = qkv.copy()
    qkv2[:, 70:] += 3.0
    b, lb = attention_forward(qkv2, 2, precision="bf16")
    np.testing.assert_array_equal(a[:, :70], b[:, :70])
    np.testing.assert_array_equal(la[..., :70], lb[..., :70])


def test_bf16_out_alone_and_the_backward_reads_o_in_bf16():
    """precision="bf16": a bf16 out (the bf16 model's) holds out_mm's bits and lse is
    unchanged; the backward's Delta sums the bf16-rounded O, so a float out and its bf16 copy
    give the same dqkv (and the fp32 backward still reads the float O). A bf16 out is refused
    in fp32 and beside an out_mm."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, is_bf16, round_bf16, to_bf16
    B, T, H, D = 2, 70, 2, 32
    qkv, dout = _bf16_inputs(B, T, H, D)
    m = attention_slopes("alibi", H).astype(np.float32)
    drop = (0.25, DROP_KEY)
    o1, l1 = attention_forward(qkv, H, precision="bf16", slopes=m, dropout=drop)
    alone = np.full(o1.shape, np.nan, dtype=BF16_HOST_DTYPE)
    o2, l2 = attention_forward(qkv, H, out=alone, precision="bf16", slopes=m, dropout=drop)
    assert o2 is alone and is_bf16(alone)
    assert alone.tobytes() == to_bf16(o1).tobytes()
    np.testing.assert_array_equal(l2, l1)
    g = [attention_backward(dout, qkv, o, l1, H, precision="bf16", slopes=m, dropout=drop)
         for o in (o1, alone)]
    np.testing.assert_array_equal(g[0], g[1])
    assert not np.array_equal(o1, round_bf16(o1))   # (O did need rounding)
    g32 = attention_backward(dout, qkv, o1, l1, H, precision="fp32", slopes=m, dropout=drop)
    g32r = attention_backward(dout, qkv, round_bf16(o1), l1, H, precision="fp32", slopes=m,
                              dropout=drop)
    assert not np.array_equal(g32, g32r)            # fp32 reads the float O as it is
    with pytest.raises(ValueError, match="out: bf16 storage needs precision='bf16'"):
        attention_forward(qkv, H, out=alone)
    with pytest.raises(ValueError, match="out_mm None"):
        attention_forward(qkv, H, out=alone, precision="bf16",
                          out_mm=np.empty(o1.shape, BF16_HOST_DTYPE))
    with pytest.raises(ValueError, match="out: bf16 storage needs precision='bf16'"):
        attention_backward(dout, qkv, alone, l1, H)


def test_out_mm_is_the_bf16_copy_of_out():
    """out_mm receives to_bf16(out) bit for bit (both precisions, with a bias and dropout);
    out and lse are those of a call without it. A bad out_mm is rejected, naming it."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, is_bf16, to_bf16
    B, T, H, D = 2, 70, 2, 32
    qkv, _ = _bf16_inputs(B, T, H, D)
    m = attention_slopes("lattice", H).astype(np.float32)
    drop = (0.25, DROP_KEY)
    for precision in ("fp32", "bf16"):
        o1, l1 = attention_forward(qkv, H, precision=precision, slopes=m, dropout=drop)
        out, mm = np.empty_like(o1), np.full(o1.shape, np.nan, dtype=BF16_HOST_DTYPE)
        o2, l2 = attention_forward(qkv, H, out=out, precision=precision, slopes=m,
                                   dropout=drop, out_mm=mm)
        assert o2 is out and is_bf16(mm)
        np.testing.assert_array_equal(o2, o1)
        np.testing.assert_array_equal(l2, l1)
        assert mm.tobytes() == to_bf16(o1).tobytes()
        assert not np.array_equal(mm, o1)  # rounded, not a copy
    shape, n = (B, T, H * D), B * T * H * D
    buf = np.zeros(n + B * H * T, dtype=BF16_HOST_DTYPE)
    mm = buf[:n].reshape(shape)
    for bad, kw, match in (
            (np.zeros(shape, np.float32), {}, "out_mm: expected bf16 storage"),
            (np.zeros((B, T + 1, H * D), BF16_HOST_DTYPE), {}, r"out_mm: expected shape"),
            (mm, dict(out=mm.view(np.float32)), "out_mm: must not overlap out"),
            (mm, dict(lse=buf[n - 1:n - 1 + B * H * T].view(np.float32).reshape(B, H, T)),
             "out_mm: must not overlap lse")):
        with pytest.raises(ValueError, match=match):
            attention_forward(qkv, H, out_mm=bad, **kw)
    with pytest.raises(ValueError, match="out_mm: must not overlap qkv"):
        attention_forward(qkv, H, out_mm=qkv.reshape(-1)[:n].view(BF16_HOST_DTYPE)
                          .reshape(shape))
    with pytest.raises(ValueError, match="out_mm: a bf16 out_mm needs float32 values"):
        attention_forward(qkv.astype(np.float64), H, out_mm=np.zeros(shape, BF16_HOST_DTYPE))


def test_backward_into_bf16_dqkv_is_the_rounded_float_dqkv():
    """A bf16 dqkv receives round_bf16 of the float dqkv bit for bit (with a bias and
    dropout, bf16 and float32 storage of qkv and dout). A bad one is rejected, naming it."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, is_bf16, round_bf16, to_bf16
    B, T, H, D = 2, 70, 2, 32
    qkv, dout = _bf16_inputs(B, T, H, D)
    m = attention_slopes("alibi", H).astype(np.float32)
    drop = (0.25, DROP_KEY)
    for q, g in ((qkv, dout), (to_bf16(qkv), to_bf16(dout))):
        out, lse = attention_forward(q, H, precision="bf16", slopes=m, dropout=drop)
        f = attention_backward(g, q, out, lse, H, precision="bf16", slopes=m, dropout=drop)
        mm = np.full(f.shape, np.nan, dtype=BF16_HOST_DTYPE)
        r = attention_backward(g, q, out, lse, H, dqkv=mm, precision="bf16", slopes=m,
                               dropout=drop)
        assert r is mm and is_bf16(mm)
        assert mm.tobytes() == round_bf16(f).tobytes()
        assert not np.array_equal(mm, f)  # rounded, not a copy
    out, lse = attention_forward(qkv, H, precision="bf16")
    shape, n = (B, T, 3 * H * D), B * T * 3 * H * D
    for bad, precision, kw, match in (
            (np.zeros(shape, BF16_HOST_DTYPE), "fp32", {}, "dqkv: bf16 storage needs precision"),
            (np.zeros((B, T + 1, 3 * H * D), BF16_HOST_DTYPE), "bf16", {}, "dqkv: expected shape"),
            (qkv.reshape(-1)[:n].view(BF16_HOST_DTYPE).reshape(shape), "bf16", {},
             "dqkv: must not overlap qkv")):
        with pytest.raises(ValueError, match=match):
            attention_backward(dout, qkv, out, lse, H, dqkv=bad, precision=precision, **kw)
    buf = np.zeros(n, BF16_HOST_DTYPE)   # dout inside a bf16 dqkv
    d_in = buf[:dout.size].view(np.float32).reshape(dout.shape)
    d_in[...] = dout
    with pytest.raises(ValueError, match="dqkv: must not overlap dout"):
        attention_backward(d_in, qkv, out, lse, H, dqkv=buf.reshape(shape), precision="bf16")


# ---- the distance bias (ALiBi, lattice): score(i, j) = q_i . k_j / sqrt(D) - m_h (i - j)
def test_slopes_are_alibi_and_reciprocal_primes():
    np.testing.assert_array_equal(attention_slopes("alibi", 8), 2.0 ** -np.arange(1, 9))
    np.testing.assert_array_equal(attention_slopes("alibi", 4),
                                  [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8])
    # H not a power of two: the one geometric sequence (docs/attention_bias.md), not BLOOM's
    # interleaving (2^-4, 2^-8, then 2^-2 at H = 3), also where torch is absent
    np.testing.assert_allclose(attention_slopes("alibi", 3), 2.0 ** -np.array([8 / 3, 16 / 3, 8]),
                               rtol=1e-15)
    np.testing.assert_allclose(attention_slopes("lattice", 6),
                               [1 / 2, 1 / 3, 1 / 5, 1 / 7, 1 / 11, 1 / 13], rtol=1e-15)
    assert attention_slopes("lattice", 25)[-1] == 1 / 97  # the 25th prime
    assert attention_slopes("none", 4) is None
    with pytest.raises(ValueError, match="attn_bias"):
        attention_slopes("rope", 4)


# T = 150 spans two query blocks (ATTN_BLOCK = 128) of the reference: the bias of blocks off
# the diagonal is built too (smaller blocks: test_blocks_of_the_reference_...)
@pytest.mark.parametrize("kind", ["alibi", "lattice"])
@pytest.mark.parametrize("B,T,H,D", [(2, 5, 2, 3), (1, 1, 1, 4), (1, 150, 3, 2)])
def test_biased_forward_matches_loops(kind, B, T, H, D):
    rng = np.random.default_rng(11)
    qkv = rng.normal(size=(B, T, 3 * H * D))
    m = attention_slopes(kind, H)
    out, lse = attention_forward(qkv, H, slopes=m)
    want_out, want_lse = plain_attention(qkv, H, m)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)
    if T > 1:
        assert not np.allclose(out, attention_forward(qkv, H)[0])  # the bias does something


def test_bias_alone_is_a_closed_form_softmax_over_distances():
    """q = 0: every score is the bias alone, so row i weights key j by
    e^(-m (i - j)) / sum_{j' <= i} e^(-m (i - j')), and lse_i = log of that sum."""
    B, T, H, D = 1, 40, 2, 4
    rng = np.random.default_rng(12)
    qkv = rng.normal(size=(B, T, 3 * H * D))
    qkv[..., :H * D] = 0
    m = attention_slopes("lattice", H)
    out, lse = attention_forward(qkv, H, slopes=m)
    v = qkv[0, :, 2 * H * D:].reshape(T, H, D)
    for h in range(H):
        for i in (0, 1, 17, 39):
            w = np.exp(-m[h] * (i - np.arange(i + 1)))
            np.testing.assert_allclose(lse[0, h, i], np.log(w.sum()), rtol=1e-13)
            np.testing.assert_allclose(out[0, i, h * D:(h + 1) * D], w @ v[:i + 1, h] / w.sum(),
                                       rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["alibi", "lattice"])
def test_biased_backward_finite_differences(kind):
    rng = np.random.default_rng(13)
    B, T, H, D = 2, 7, 3, 2
    qkv = rng.normal(size=(B, T, 3 * H * D))
    R = rng.normal(size=(B, T, H * D))
    m = attention_slopes(kind, H)
    out, lse = attention_forward(qkv, H, slopes=m)
    dqkv = attention_backward(R, qkv, out, lse, H, slopes=m)
    loss = lambda: float((plain_attention(qkv, H, m)[0] * R).sum())  # noqa: E731
    assert_grad_close(loss, qkv, dqkv, n=60)


def test_biased_float32_far_keys_flush_to_zero_and_match_float64():
    """T = 300, m = 1/2: keys more than ~175 back have e^(s) below the smallest normal float32;
    the reference gives them probability 0 (no subnormals), which moves nothing measurable."""
    rng = np.random.default_rng(15)
    B, T, H, D = 1, 300, 2, 8
    qkv = rng.normal(size=(B, T, 3 * H * D))
    dout = rng.normal(size=(B, T, H * D))
    m = attention_slopes("lattice", H)
    o64, l64 = attention_forward(qkv, H, slopes=m)
    d64 = attention_backward(dout, qkv, o64, l64, H, slopes=m)
    q32, m32 = qkv.astype(np.float32), m.astype(np.float32)
    o32, l32 = attention_forward(q32, H, slopes=m32)
    d32 = attention_backward(dout.astype(np.float32), q32, o32, l32, H, slopes=m32)
    np.testing.assert_allclose(o32, o64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(l32, l64, rtol=1e-5)
    np.testing.assert_allclose(d32, d64, rtol=1e-3, atol=1e-4)


def test_biased_attention_holds_nothing_t_by_t():
    """With a distance bias the reference builds each block's bias from its (rows, keys)
    distances and masks only the diagonal part, as the plain path: nothing T x T, during or
    after the call (docs/attention_bias.md). It cached a full-width causal mask per block and
    distance matrices, so forward + backward at T = 2048 kept 2 T^2 float64s (67 MB) after
    returning, in a process-wide cache: `eval --seq-len 16000` of a tiny alibi model peaked
    at 1.66 GB, 150 MB without the bias."""
    import gc
    import tracemalloc
    rng = np.random.default_rng(16)
    B, T, H, D = 1, 2048, 2, 4
    qkv = rng.normal(size=(B, T, 3 * H * D))
    dout = rng.normal(size=(B, T, H * D))
    m = attention_slopes("alibi", H)
    attention_module._mask_cache.clear()
    gc.collect()
    tracemalloc.start()
    try:
        out, lse = attention_forward(qkv, H, slopes=m)
        dqkv = attention_backward(dout, qkv, out, lse, H, slopes=m)
        del out, lse, dqkv
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    t_by_t = T * T * 8
    # a block's working arrays: a few (H, T, 64) float64s (2 MB each here)
    assert held < t_by_t / 64, (held, t_by_t)
    assert peak < t_by_t / 2, (peak, t_by_t)


def test_biased_attention_is_causal():
    rng = np.random.default_rng(14)
    H = 2
    qkv = rng.normal(size=(1, 12, 6 * H))
    m = attention_slopes("alibi", H)
    a, _ = attention_forward(qkv, H, slopes=m)
    qkv2 = qkv.copy()
    qkv2[:, 7:] += 3.0
    b, _ = attention_forward(qkv2, H, slopes=m)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])


def test_slopes_argument_is_checked():
    qkv = np.zeros((1, 4, 12))
    with pytest.raises(ValueError, match="slopes"):
        attention_forward(qkv, 2, slopes=np.ones(3))
    with pytest.raises(ValueError, match="slopes"):
        attention_forward(qkv, 2, slopes=np.ones(2, dtype=np.float32))  # qkv is float64
    out, lse = attention_forward(qkv, 2)
    with pytest.raises(ValueError, match="slopes"):
        attention_backward(qkv[..., :4], qkv, out, lse, 2, slopes=np.ones((2, 1)))


@pytest.mark.parametrize("kind", ["alibi", "lattice"])
@pytest.mark.parametrize("B,T,H,D", [(2, 77, 2, 32), (1, 150, 2, 16)])
def test_bf16_biased_reference_within_bf16_tolerance_of_fp32(kind, B, T, H, D):
    """The bias is added in fp32 to the fp32 product: the bf16 tolerances of
    test_bf16_reference_within_bf16_tolerance_of_fp32 hold unchanged (rounding q and k moves a
    score by at most delta_i whatever is added to it)."""
    _bf16_within_tolerance_of_fp32(B, T, H, D, slopes=attention_slopes(kind, H))


def _bf16_within_tolerance_of_fp32(B, T, H, D, slopes=None, dropout=None):
    """The norm-wise and elementwise bounds of test_bf16_reference_within_bf16_tolerance_of_fp32
    for the bf16 reference against float64, with a distance bias (slopes, float64) and/or a
    dropout (the same mask in both)."""
    qkv, dout = _bf16_inputs(B, T, H, D)
    m32 = None if slopes is None else slopes.astype(np.float32)
    out, lse = attention_forward_ref(qkv, H, precision="bf16", slopes=m32, dropout=dropout)
    q64, d64 = qkv.astype(np.float64), dout.astype(np.float64)
    o_ref, lse_ref = attention_forward_ref(q64, H, slopes=slopes, dropout=dropout)
    np.testing.assert_array_less(np.abs(lse - lse_ref), lse_bound(qkv, H) + 1e-5)
    assert U / 16 < _rel(out, o_ref) <= 4 * U
    dqkv = attention_backward_ref(dout, qkv, out, lse, H, precision="bf16", slopes=m32,
                                  dropout=dropout)
    want = attention_backward_ref(d64, q64, o_ref, lse_ref, H, slopes=slopes, dropout=dropout)
    C = H * D
    for i, name in enumerate(("dq", "dk", "dv")):
        g, w = dqkv[..., i * C:(i + 1) * C].astype(np.float64), want[..., i * C:(i + 1) * C]
        assert U / 16 < _rel(g, w) <= 6 * U, name
        assert np.abs(g - w).max() <= 12 * U * np.abs(w).max() + 1e-5, name


# ---- dropout on the attention probabilities: out_i = sum_j keep_ij / (1 - p) P_ij v_j
DROP_KEY = DropoutKey(seed=4, step=9, site=site_id(1, ATTN_PROBS), micro=3)


def element_keep(B, H, T, p, key):
    """(B, H, T, T): the mask from the contract, element by element: element
    e = ((b H + h) T + i) T + j is kept when word e % 4 of Philox(counter = (e // 4 low, high,
    site, micro), key = (seed, step)) >= round(p 2^32)."""
    e = np.arange(B * H * T * T, dtype=np.uint64)        # C order of (B, H, T, T)
    g = e // np.uint64(4)
    words = np.stack(philox4x32_10(g.astype(np.uint32), (g >> np.uint64(32)).astype(np.uint32),
                                   key.site, key.micro, key.seed, key.step))
    word = words[(e % np.uint64(4)).astype(np.intp), np.arange(e.size)]
    return (word >= round(p * 2 ** 32)).reshape(B, H, T, T)


# T = 70: rows longer than a Philox group, T = 5: shorter (blocks off the diagonal:
# test_blocks_of_the_reference_compute_what_one_block_does)
@pytest.mark.parametrize("B,T,H,D,kind", [(2, 5, 2, 3, "none"), (1, 70, 2, 2, "none"),
                                          (1, 70, 2, 2, "alibi")])
def test_dropout_forward_matches_loops_with_the_element_formula(B, T, H, D, kind):
    rng = np.random.default_rng(16)
    qkv = rng.normal(size=(B, T, 3 * H * D))
    m = attention_slopes(kind, H)
    p = 0.3
    keep = element_keep(B, H, T, p, DROP_KEY)
    out, lse = attention_forward(qkv, H, slopes=m, dropout=(p, DROP_KEY))
    want_out, want_lse = plain_attention(qkv, H, m, keep, p)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)   # the undropped softmax
    assert not np.allclose(out, attention_forward(qkv, H, slopes=m)[0])


@pytest.mark.parametrize("kind", ["none", "lattice"])
def test_dropout_backward_finite_differences(kind):
    """The mask is a function of the key only: finite differences through the same mask."""
    rng = np.random.default_rng(17)
    B, T, H, D = 2, 7, 3, 2
    qkv = rng.normal(size=(B, T, 3 * H * D))
    R = rng.normal(size=(B, T, H * D))
    m = attention_slopes(kind, H)
    p = 0.4
    keep = element_keep(B, H, T, p, DROP_KEY)
    assert 0 < keep[:, :, np.tril_indices(T)[0], np.tril_indices(T)[1]].mean() < 1
    out, lse = attention_forward(qkv, H, slopes=m, dropout=(p, DROP_KEY))
    dqkv = attention_backward(R, qkv, out, lse, H, slopes=m, dropout=(p, DROP_KEY))
    loss = lambda: float((plain_attention(qkv, H, m, keep, p)[0] * R).sum())  # noqa: E731
    assert_grad_close(loss, qkv, dqkv, n=60)


def test_dropout_mask_rate_within_binomial_bounds():
    """The kept fraction of the (B, H, T, T) mask the reference draws, on and below the
    diagonal (the scores that exist): Binomial(n, 1 - p), within 5 standard deviations; with V
    all ones each output is its row's kept probability mass / (1 - p), whose mean is 1."""
    B, T, H, D, p = 4, 256, 4, 2, 0.2
    qkv = np.zeros((B, T, 3 * H * D))
    qkv[..., 2 * H * D:] = 1.0
    out, _ = attention_forward(qkv, H, dropout=(p, DROP_KEY))
    # with q = k = 0, row i's output is (kept keys of row i) / ((i + 1)(1 - p)): the counts
    kept = np.rint(out[..., ::D].transpose(0, 2, 1) * (np.arange(T) + 1) * (1 - p))
    n = B * H * T * (T + 1) // 2
    mean, sd = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(kept.sum() - mean) <= 5 * sd, (kept.sum(), mean, sd)
    keep = keep_rows(np.arange(B * H * T).reshape(B, H, T) * T, T, p, DROP_KEY)
    np.testing.assert_array_equal(kept, (keep & np.tril(np.ones((T, T), bool))).sum(-1))


@pytest.mark.parametrize("B,T,H,D", [(2, 77, 2, 32), (1, 150, 2, 16)])
def test_dropout_bf16_reference_within_bf16_tolerance_of_fp32(B, T, H, D):
    """The same mask in both precisions: the bf16 tolerances hold unchanged, a dropped P being
    exactly zero in both (the kept ones scaled in fp32)."""
    _bf16_within_tolerance_of_fp32(B, T, H, D, dropout=(0.25, DROP_KEY))


# The reference goes in blocks of ATTN_BLOCK query rows (forward) and keys (backward), and on
# NumPy in groups of batch elements. T = 70 in blocks of 16: five blocks, the last one short;
# the bias and the dropout mask of blocks off the diagonal, dQ summed over key blocks; one
# batch element per group: the dropout mask of the second group
@pytest.mark.parametrize("kind,p", [("none", 0.0), ("alibi", 0.0), ("none", 0.3),
                                    ("lattice", 0.3)])
def test_blocks_of_the_reference_compute_what_one_block_does(monkeypatch, kind, p):
    rng = np.random.default_rng(19)
    B, T, H, D = 2, 70, 2, 3
    qkv = rng.normal(size=(B, T, 3 * H * D))
    R = rng.normal(size=(B, T, H * D))
    m = attention_slopes(kind, H)
    drop = (p, DROP_KEY) if p else None

    def run():
        out, lse = attention_forward(qkv, H, slopes=m, dropout=drop)
        return out, lse, attention_backward(R, qkv, out, lse, H, slopes=m, dropout=drop)

    monkeypatch.setattr(attention_module, "ATTN_BLOCK", T)
    monkeypatch.setattr(attention_module, "ATTN_GROUP_BYTES", 1 << 30)
    whole = run()
    monkeypatch.setattr(attention_module, "ATTN_BLOCK", 16)
    monkeypatch.setattr(attention_module, "ATTN_GROUP_BYTES", 1)
    for got, want in zip(run(), whole):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)


def test_dropout_argument_is_checked_and_p_zero_draws_nothing():
    qkv = np.random.default_rng(18).normal(size=(1, 9, 12))
    plain = attention_forward(qkv, 2)
    for off in (None, (0.0, None)):
        got = attention_forward(qkv, 2, dropout=off)
        np.testing.assert_array_equal(got[0], plain[0])
    with pytest.raises(ValueError, match="dropout p"):
        attention_forward(qkv, 2, dropout=(1.0, DROP_KEY))
    with pytest.raises(TypeError, match="DropoutKey"):
        attention_forward(qkv, 2, dropout=(0.5, (1, 2)))
    with pytest.raises(TypeError, match="dropout"):
        attention_forward(qkv, 2, dropout=0.5)


def test_backward_variant_is_read_from_the_environment_at_each_call(monkeypatch):
    """The bf16 GPU backward's variant: CLLM_ATTN_BACKWARD (unset or empty: "two-pass"), read
    whenever a backward launches; set_attention_backward overrides it until reset with None;
    a bad value is a one-line ConfigError naming where it came from."""
    from cllm_gpu.errors import ConfigError
    from cllm_gpu.ops.attention import (BACKWARD_ENV, BACKWARD_VARIANTS,
                                        attention_backward_variant, set_attention_backward)
    assert BACKWARD_ENV == "CLLM_ATTN_BACKWARD"
    assert BACKWARD_VARIANTS == ("two-pass", "atomic-dq")
    monkeypatch.delenv(BACKWARD_ENV, raising=False)
    assert set_attention_backward(None) is None  # (no choice was set)
    assert attention_backward_variant() == "two-pass"
    monkeypatch.setenv(BACKWARD_ENV, "")
    assert attention_backward_variant() == "two-pass"
    monkeypatch.setenv(BACKWARD_ENV, "atomic-dq")
    assert attention_backward_variant() == "atomic-dq"
    monkeypatch.setenv(BACKWARD_ENV, "atomic")
    with pytest.raises(ConfigError) as e:
        attention_backward_variant()
    assert str(e.value) == ("CLLM_ATTN_BACKWARD: expected one of two-pass, atomic-dq, "
                            "got 'atomic'")
    try:
        assert set_attention_backward("two-pass") is None
        assert attention_backward_variant() == "two-pass"   # the bad environment is not read
        assert set_attention_backward("atomic-dq") == "two-pass"
        assert attention_backward_variant() == "atomic-dq"
        with pytest.raises(ConfigError, match="variant: expected one of two-pass, atomic-dq"):
            set_attention_backward("fast")
        assert attention_backward_variant() == "atomic-dq"  # unchanged by the bad call
    finally:
        assert set_attention_backward(None) == "atomic-dq"
    monkeypatch.setenv(BACKWARD_ENV, "atomic-dq")
    assert attention_backward_variant() == "atomic-dq"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("B,T", [(2, 4), (0, 4)])
@pytest.mark.parametrize("n_head,C3,match", [(2, 0, "head dim 0"), (0, 48, "at least 1 head")])
def test_no_heads_or_head_dim_0_is_refused_before_dispatch(B, T, n_head, C3, match, precision):
    """n_head = 0 or a head dim of 0: one ValueError from the public check, on both backends,
    whatever B and T (before: ZeroDivisionError, from the check's modulo by n_head on both
    backends, from 1 / sqrt(D) on NumPy; the launcher returned an unwritten lse for D = 0)."""
    qkv = np.zeros((B, T, C3), np.float32)
    with pytest.raises(ValueError, match=match):
        attention_forward(qkv, n_head, precision=precision)
    C = C3 // 3
    with pytest.raises(ValueError, match=match):
        attention_backward(np.zeros((B, T, C), np.float32), qkv, np.zeros((B, T, C), np.float32),
                           np.zeros((B, max(n_head, 1), T), np.float32), n_head,
                           precision=precision)


@pytest.mark.parametrize("transposed", [False, True])
def test_score_bias_is_the_causal_mask_plus_the_distance_bias_over_the_whole_block(transposed):
    """_score_bias adds the causal mask to only the part of a block with masked keys: over
    every block shape and offset the attention passes give it (one query row, keys before,
    on and after the diagonal, blocks wider and taller), its values are those of the mask
    over the whole block plus m_h (j - i)."""
    from cllm_gpu.ops.attention import _causal_bias, _key_distance, _score_bias
    slopes = np.array([0.5, 1 / 3])
    for rows in (1, 2, 5):
        for cols in (1, 2, 5, 7):
            for offset in range(-cols - 1, rows + cols + 1):
                want = (_causal_bias(np, rows, cols, offset, np.float64, transposed)
                        + slopes[:, None, None]
                        * _key_distance(rows, cols, offset, np.dtype(np.float64), transposed))
                got = _score_bias(np, rows, cols, offset, np.float64, slopes, transposed)
                np.testing.assert_array_equal(got, want, err_msg=f"{rows, cols, offset}")
