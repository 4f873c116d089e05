import math
import warnings

import numpy as np
import pytest

from attention_tolerance import U, assert_equal_up_to_fp32, backward_magnitudes, lse_bound, split64
from cllm_gpu.kernels import ATTENTION_HEAD_DIMS, NAME_EXPRESSIONS
from cllm_gpu.ops.attention import (attention_backward, attention_backward_ref, attention_forward,
                                    attention_forward_ref)
from gpu_util import assert_bitwise_equal, assert_close, host, poison, rel_err

cp = pytest.importorskip("cupy")

# fp32 tolerances: scores and softmax in fp32 with exp/log (a few ulp each), sums over up to
# T keys: elementwise bound rtol 1e-4 plus 1e-5 x the tensor's max magnitude; norm-wise relative
# error of every output <= 1e-5.
RTOL, FLOOR, NORM_TOL = 1e-4, 1e-5, 1e-5


def _inputs(B, T, H, D, dtype, seed=0):
    rng = np.random.default_rng(seed + T + D)
    qkv = (rng.normal(size=(B, T, 3 * H * D)) * 1.5).astype(dtype)
    dout = rng.normal(size=(B, T, H * D)).astype(dtype)
    return qkv, dout


def _check(B, T, H, D, dtype=np.float32, rtol=RTOL, floor=FLOOR, norm_tol=NORM_TOL):
    qkv, dout = _inputs(B, T, H, D, dtype)
    q64, d64 = qkv.astype(np.float64), dout.astype(np.float64)
    o_ref, lse_ref = attention_forward_ref(q64, H)
    dqkv_ref = attention_backward_ref(d64, q64, o_ref, lse_ref, H)

    Q, G = cp.asarray(qkv), cp.asarray(dout)
    out, lse = poison((B, T, H * D), dtype), poison((B, H, T), dtype)
    r = attention_forward(Q, H, out=out, lse=lse)
    assert r[0] is out and r[1] is lse
    assert_close(out, o_ref, rtol, floor, "out")
    assert_close(lse, lse_ref, rtol, floor, "lse")
    assert rel_err(out, o_ref) <= norm_tol

    dqkv = poison((B, T, 3 * H * D), dtype)
    assert attention_backward(G, Q, out, lse, H, dqkv=dqkv) is dqkv
    C = H * D
    grads = (("dq", slice(0, C)), ("dk", slice(C, 2 * C)), ("dv", slice(2 * C, 3 * C)))
    if T == 1:
        # one key: P = 1 and Delta = dP, so dS = 0 and dq = dk = 0 exactly; the reference holds
        # only roundoff there (~1e-15), so compare those with an absolute fp32 bound instead
        v = q64[..., 2 * C:].reshape(B, T, H, D)
        bound = 1e-6 * (np.abs(d64.reshape(B, T, H, D)) * np.abs(v)).sum(-1).max() \
            * np.abs(q64[..., :2 * C]).max()
        dqk = host(dqkv[..., :2 * C])
        assert np.isfinite(dqk).all() and np.abs(dqk).max() <= bound, (np.abs(dqk).max(), bound)
        grads = grads[2:]
    for name, sl in grads:
        assert_close(dqkv[..., sl], dqkv_ref[..., sl], rtol, floor, name)
        assert rel_err(dqkv[..., sl], dqkv_ref[..., sl]) <= norm_tol, name

    # bitwise determinism of both passes
    o2, l2 = attention_forward(Q, H)
    assert_bitwise_equal(o2, out, "out")
    assert_bitwise_equal(l2, lse, "lse")
    assert_bitwise_equal(attention_backward(G, Q, out, lse, H), dqkv, "dqkv")


@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("T", [1, 17, 64, 255, 1024])
def test_attention_matches_reference(T, D):
    B, H = (2, 2) if T < 1024 else (1, 2)
    _check(B, T, H, D)


@pytest.mark.parametrize("D", [d for d in ATTENTION_HEAD_DIMS if d not in (32, 64, 128)])
def test_attention_other_head_dims(D):
    _check(3, 97, 3, D)


def test_attention_many_heads_and_batches():
    _check(5, 130, 12, 64)


def test_attention_float64_runs_the_reference_on_cupy():
    _check(2, 37, 2, 32, dtype=np.float64, rtol=1e-10, floor=1e-12, norm_tol=1e-11)


def test_attention_unsupported_head_dim_falls_back_with_warning():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _check(2, 19, 2, 12)  # D = 12: the reference on CuPy arrays
    assert any("head dim 12" in str(x.message) for x in w)


def test_attention_rejects_overlapping_dqkv():
    qkv, dout = _inputs(1, 8, 1, 32, np.float32)
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    out, lse = attention_forward(Q, 1)
    with pytest.raises(ValueError, match="overlap"):
        attention_backward(G, Q, out, lse, 1, dqkv=Q)


def test_attention_softmax_is_peaked_without_overflow():
    """Large scores (|s| ~ 1e3): the online softmax must not overflow."""
    B, T, H, D = 1, 300, 1, 64
    qkv, dout = _inputs(B, T, H, D, np.float32)
    qkv *= 30
    q64 = qkv.astype(np.float64)
    o_ref, lse_ref = attention_forward_ref(q64, H)
    out, lse = attention_forward(cp.asarray(qkv), H)
    assert np.isfinite(cp.asnumpy(out)).all()
    assert rel_err(lse, lse_ref) <= 1e-5
    assert rel_err(out, o_ref) <= 1e-3 * math.sqrt(T)  # near-argmax: fp32 ties may flip


# ---- precision="bf16": the tensor-core (mma) kernels
MMA_DIMS = [d for d in ATTENTION_HEAD_DIMS
            if f"attention_forward_mma_kernel<{d}>" in NAME_EXPRESSIONS["attention"]]
# Against the NumPy bf16 reference the kernels differ only in fp32 summation order (and the
# tensor cores' accumulation), 1e-4 of the sum of the terms' magnitudes, except where such a
# difference flips one bf16 rounding of P or dS (a value next to a rounding midpoint): that moves
# one output row by at most 2^-7 of the rounded term, on a few rows only.
MMA_FP32_TOL = 1e-4


def _check_bf16(B, T, H, D):
    qkv, dout = _inputs(B, T, H, D, np.float32)
    C = H * D
    o_b, l_b = attention_forward_ref(qkv, H, precision="bf16")
    q64, d64 = qkv.astype(np.float64), dout.astype(np.float64)
    o64, l64 = attention_forward_ref(q64, H)
    dqkv64 = attention_backward_ref(d64, q64, o64, l64, H)

    Q, G = cp.asarray(qkv), cp.asarray(dout)
    out, lse = poison((B, T, C)), poison((B, H, T))
    r = attention_forward(Q, H, out=out, lse=lse, precision="bf16")
    assert r[0] is out and r[1] is lse
    vmax = float(np.abs(split64(qkv, H)[2]).max())
    assert_equal_up_to_fp32(host(out), o_b, vmax, 2.0 ** -7 * vmax, "out",  # convex comb. of v
                            rel=MMA_FP32_TOL)
    np.testing.assert_allclose(host(lse), l_b, rtol=1e-5, atol=1e-4)
    # against the fp32 math: the bf16 tolerances derived in tests/test_attention.py
    assert np.all(np.abs(host(lse) - l64) <= lse_bound(qkv, H) + 1e-4), "lse vs fp32"
    if T > 1:
        assert rel_err(out, o64) <= 4 * U

    dqkv = poison((B, T, 3 * C))
    assert attention_backward(G, Q, out, lse, H, dqkv=dqkv, precision="bf16") is dqkv
    oh, lh = host(out), host(lse)  # the reference backward from the kernel's own forward
    want = attention_backward_ref(dout, qkv, oh, lh, H, precision="bf16")
    mags, flips = backward_magnitudes(dout, qkv, oh, lh, H)
    for i, name in enumerate(("dq", "dk", "dv")):
        sl = slice(i * C, (i + 1) * C)
        assert_equal_up_to_fp32(host(dqkv[..., sl]), want[..., sl], mags[i], flips[i], name,
                                rel=MMA_FP32_TOL)
        w = dqkv64[..., sl]
        assert np.abs(host(dqkv[..., sl]) - w).max() <= 12 * U * np.abs(w).max() + 1e-5, name
        if T > 1:
            assert rel_err(dqkv[..., sl], w) <= 6 * U, name

    # bitwise determinism of both passes
    o2, l2 = attention_forward(Q, H, precision="bf16")
    assert_bitwise_equal(o2, out, "out")
    assert_bitwise_equal(l2, lse, "lse")
    assert_bitwise_equal(attention_backward(G, Q, out, lse, H, precision="bf16"), dqkv, "dqkv")


@pytest.mark.parametrize("D", MMA_DIMS)
@pytest.mark.parametrize("T", [1, 17, 64, 65, 255])
def test_attention_bf16_mma_matches_references(T, D):
    _check_bf16(2, T, 2, D)


@pytest.mark.parametrize("D", [64, 128])
def test_attention_bf16_mma_long_sequence(D):
    _check_bf16(1, 1024, 2, D)


def test_attention_bf16_mma_many_heads_and_batches():
    _check_bf16(5, 130, 12, 64)


def test_attention_bf16_mma_covers_the_supported_head_dims():
    assert set(MMA_DIMS) >= {32, 64, 128}
    assert set(MMA_DIMS) == {d for d in ATTENTION_HEAD_DIMS if d % 16 == 0 and d <= 128}


def test_attention_bf16_without_mma_kernel_runs_the_fp32_kernels():
    B, T, H, D = 2, 45, 2, 8  # no mma instantiation for D = 8
    assert D not in MMA_DIMS
    qkv, dout = _inputs(B, T, H, D, np.float32)
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    o1, l1 = attention_forward(Q, H, precision="bf16")
    o2, l2 = attention_forward(Q, H)
    assert_bitwise_equal(o1, o2, "out")
    assert_bitwise_equal(l1, l2, "lse")
    assert_bitwise_equal(attention_backward(G, Q, o1, l1, H, precision="bf16"),
                         attention_backward(G, Q, o2, l2, H), "dqkv")


def test_attention_bf16_rejects_float64_and_misaligned_arrays():
    qkv, dout = _inputs(1, 8, 1, 32, np.float64)
    with pytest.raises(ValueError, match="float32"):
        attention_forward(cp.asarray(qkv), 1, precision="bf16")
    n = qkv.size
    buf = cp.zeros(n + 1, dtype=np.float32)
    Q = buf[1:].reshape(qkv.shape)  # contiguous, 4 bytes past a 16-byte boundary
    Q[...] = cp.asarray(qkv.astype(np.float32))
    with pytest.raises(ValueError, match="16-byte"):
        attention_forward(Q, 1, precision="bf16")


def test_attention_bf16_softmax_is_peaked_without_overflow():
    """Large scores (|s| ~ 1e3): the online softmax must not overflow."""
    B, T, H, D = 1, 300, 1, 64
    qkv, _ = _inputs(B, T, H, D, np.float32)
    qkv *= 30
    o_b, l_b = attention_forward_ref(qkv, H, precision="bf16")
    out, lse = attention_forward(cp.asarray(qkv), H, precision="bf16")
    assert np.isfinite(host(out)).all()
    assert rel_err(lse, l_b) <= 1e-5
    assert rel_err(out, o_b) <= 1e-3 * math.sqrt(T)  # near-argmax: fp32 ties may flip
