import numpy as np
import pytest

from cllm_gpu.ops.softmax_xent import softmax_xent, softmax_xent_ref
from gpu_util import assert_bitwise_equal, assert_close, poison, tol

cp = pytest.importorskip("cupy")


def _inputs(N, V, dtype, seed=0, ignore_every=5):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(N, V)) * 3).astype(dtype)
    t = rng.integers(0, V, size=N).astype(np.int32)
    t[::ignore_every] = -1
    if N > 1:
        t[1] = V - 1  # last column (vector tail)
    return logits, t


# V: 1, odd (scalar loads), 50257 (GPT-2, scalar), 50304 (multiple of 4: vector loads),
# > 128k with a tail
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,V", [(1, 1), (17, 7), (64, 50257), (33, 50304), (3, 131075)])
def test_softmax_xent_matches_reference(dtype, N, V):
    logits, t = _inputs(N, V, dtype)
    dloss = 1.0 / max(int((t >= 0).sum()), 1)
    l_ref, g_ref = softmax_xent_ref(logits.astype(np.float64), t, dloss)
    rtol, floor = tol(dtype)
    L = cp.asarray(logits)
    losses, dlog = poison((N,), dtype), poison((N, V), dtype)
    r = softmax_xent(L, cp.asarray(t), dloss, losses=losses, dlogits=dlog)
    assert r[0] is losses and r[1] is dlog
    assert_close(losses, l_ref, rtol, floor, "losses")
    assert_close(dlog, g_ref, rtol * 5, floor, "dlogits")
    assert (cp.asnumpy(losses)[t < 0] == 0).all()
    assert (cp.asnumpy(dlog)[t < 0] == 0).all()

    # in place (dlogits is the logits buffer), int64 targets, determinism
    L2 = L.copy()
    l2, g2 = softmax_xent(L2, cp.asarray(t.astype(np.int64)), dloss, dlogits=L2)
    assert g2 is L2
    assert_bitwise_equal(l2, losses, "losses")
    assert_bitwise_equal(g2, dlog, "dlogits in place")

    # dloss read through a pointer (a float64 slot of the trainer's step buffer): the same
    L4 = L.copy()
    _, g4 = softmax_xent(L4, cp.asarray(t), cp.asarray(np.array([dloss])), dlogits=L4)
    assert_bitwise_equal(g4, dlog, "dlogits with dloss from device memory")

    # loss only: logits untouched
    L3 = L.copy()
    l3, g3 = softmax_xent(L3, cp.asarray(t), dloss, need_grad=False)
    assert g3 is None
    assert_bitwise_equal(l3, losses, "losses (no grad)")
    assert_bitwise_equal(L3, L, "logits untouched")


# (V, n_vocab): vector path with the boundary inside a 4-wide pack, GPT-2's padding (50257 of
# 50304), scalar path (odd V), a single real column
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,V,n_vocab", [(9, 64, 57), (5, 50304, 50257), (7, 13, 6), (3, 8, 1)])
def test_softmax_xent_padded_vocabulary(dtype, N, V, n_vocab):
    """Columns >= n_vocab are padding: losses and dlogits equal the unpadded problem's and the
    padding gets an exact zero gradient, whatever it holds (here logits that would dominate the
    softmax if they were read); a target in the padding is out of range (NaN)."""
    real, t = _inputs(N, n_vocab, dtype)
    logits = np.full((N, V), 80.0, dtype=dtype)
    logits[:, :n_vocab] = real
    dloss = 1.0 / max(int((t >= 0).sum()), 1)
    l_ref, g_ref = softmax_xent_ref(real.astype(np.float64), t, dloss)
    rtol, floor = tol(dtype)
    losses, dlog = poison((N,), dtype), poison((N, V), dtype)
    softmax_xent(cp.asarray(logits), cp.asarray(t), dloss, losses=losses, dlogits=dlog,
                 vocab_size=n_vocab)
    assert_close(losses, l_ref, rtol, floor, "losses")
    assert_close(dlog[:, :n_vocab], g_ref, rtol * 5, floor, "dlogits")
    assert (cp.asnumpy(dlog)[:, n_vocab:] == 0).all()
    # in place, and loss only: the same bits
    L = cp.asarray(logits)
    l2, g2 = softmax_xent(L, cp.asarray(t), dloss, dlogits=L, vocab_size=n_vocab)
    assert_bitwise_equal(l2, losses, "losses in place")
    assert_bitwise_equal(g2, dlog, "dlogits in place")
    l3, _ = softmax_xent(cp.asarray(logits), cp.asarray(t), dloss, need_grad=False,
                         vocab_size=n_vocab)
    assert_bitwise_equal(l3, losses, "losses (no grad)")
    bad = t.copy()
    bad[0] = n_vocab  # the first padding column
    l4, _ = softmax_xent(cp.asarray(logits), cp.asarray(bad), dloss, vocab_size=n_vocab)
    assert np.isnan(cp.asnumpy(l4)[0])


def test_softmax_xent_vector_and_scalar_paths_agree():
    """Same row through the 16-byte path (aligned) and the scalar path (offset by one element)."""
    V = 50304
    logits, t = _inputs(4, V, np.float32, seed=3, ignore_every=100)
    buf = cp.zeros(4 * V + 1, dtype=np.float32)
    un = buf[1:].reshape(4, V)  # 4-byte offset: not 16-byte aligned
    un[...] = cp.asarray(logits)
    la, ga = softmax_xent(cp.asarray(logits), cp.asarray(t), 0.25)
    lb, gb = softmax_xent(un, cp.asarray(t), 0.25)
    assert_close(lb, cp.asnumpy(la), 1e-6, 1e-7, "losses")
    assert_close(gb, cp.asnumpy(ga), 1e-5, 1e-7, "dlogits")


def test_softmax_xent_out_of_range_target_is_nan():
    logits = cp.zeros((2, 10), dtype=np.float32)
    losses, g = softmax_xent(logits, cp.asarray(np.array([3, 10], dtype=np.int32)), 1.0)
    l = cp.asnumpy(losses)
    assert np.isfinite(l[0]) and np.isnan(l[1])
    assert np.isnan(cp.asnumpy(g)[1]).all()


def test_softmax_xent_every_negative_target_is_ignored():
    """Any negative int32 target is ignored (loss 0, a zero row, the logits never read), as
    in the reference, not only -1; row 0's -2 would otherwise read before the logits."""
    logits, _ = _inputs(4, 10, np.float32)
    t = np.array([-2, 3, -7, np.iinfo(np.int32).min], dtype=np.int32)
    losses, g = softmax_xent(cp.asarray(logits), cp.asarray(t), 1.0)
    l_ref, g_ref = softmax_xent_ref(logits, t, 1.0)
    l, g = cp.asnumpy(losses), cp.asnumpy(g)
    assert (l[t < 0] == 0).all() and (g[t < 0] == 0).all()
    assert_close(losses, l_ref, 1e-6, 1e-7, "losses")
    assert_close(cp.asarray(g), g_ref, 1e-5, 1e-7, "dlogits")


def test_softmax_xent_large_logits_stable():
    logits = cp.asarray(np.array([[1e4, 0.0, -1e4], [-1e30, -1e30, 0.0]], dtype=np.float32))
    losses, g = softmax_xent(logits, cp.asarray(np.array([0, 2], dtype=np.int32)), 1.0)
    np.testing.assert_allclose(cp.asnumpy(losses), [0.0, 0.0], atol=1e-6)
    assert np.isfinite(cp.asnumpy(g)).all()


@pytest.mark.parametrize("offset", [1e4, 1e6, 1e30])
def test_softmax_xent_loss_of_logits_with_a_large_common_offset(offset):
    """A diverging run's logits: a common offset of 1e4..1e30 over spreads of a few units. The
    loss is log(sum) + (max - x_target): the difference first, exact in float32 where the two
    logits are close. (log(sum) + max) - x_target lost log(sum) to the rounding of max: 2e-2
    off at 1e6, and 0 for log(V) when all logits are equal at 1e30."""
    rng = np.random.default_rng(3)
    V = 1000
    spread = 0.0 if offset == 1e30 else 1.0   # 1e30 + N(0, 1) rounds to 1e30: all equal
    x = (offset + spread * rng.normal(size=(4, V))).astype(np.float32)
    t = np.arange(4, dtype=np.int32)
    x[t, t] += np.float32(5 * spread)          # a confident, right prediction
    x64 = x.astype(np.float64)
    m = x64.max(axis=1)
    want = np.log(np.exp(x64 - m[:, None]).sum(axis=1)) + (m - x64[t, t])
    losses, g = softmax_xent(cp.asarray(x), cp.asarray(t), 1.0)
    np.testing.assert_allclose(cp.asnumpy(losses), want, rtol=1e-5)
    np.testing.assert_allclose(softmax_xent_ref(x, t, 1.0)[0], want, rtol=1e-5)
    assert np.isfinite(cp.asnumpy(g)).all()


def test_softmax_xent_nan_logit_gives_nan_loss():
    """V < 512: a thread owns one element; a NaN there must survive the cross-thread merge."""
    x = np.random.default_rng(0).normal(size=(2, 300)).astype(np.float32)
    x[0, 77] = np.nan
    losses, _ = softmax_xent(cp.asarray(x), cp.asarray(np.array([3, 3], dtype=np.int32)), 1.0)
    l = cp.asnumpy(losses)
    assert np.isnan(l[0]) and np.isfinite(l[1])


@pytest.mark.parametrize("V", [1, 7, 300, 1024])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_softmax_xent_nonfinite_logits_match_the_reference(V, bad):
    """A NaN or inf logit: a scored row's loss and dlogits are non-finite where the reference's
    are (NaN reaches the grad norm, the trainer's non-finite check), finite where they are (a
    -inf logit off the target); an ignored row gets loss 0 and exact zeros on both sides (the
    reference's 0 * NaN gave a NaN row before). V = 1, odd (scalar loads), 300 (< one thread
    per column of a 512-thread block), 1024 (vector loads)."""
    rng = np.random.default_rng(V)
    x = rng.normal(size=(4, V)).astype(np.float32)
    for row in (0, 2):   # scored row 0, ignored row 2
        x[row, V // 2] = bad
    t = np.array([0, V - 1, -1, -1], dtype=np.int32)
    with np.errstate(invalid="ignore", over="ignore"):
        l_ref, g_ref = softmax_xent_ref(x.copy(), t, 0.5)
    losses, g = softmax_xent(cp.asarray(x), cp.asarray(t), 0.5)
    l, g = cp.asnumpy(losses), cp.asnumpy(g)
    assert (np.isnan(l) == np.isnan(l_ref)).all() and (np.isinf(l) == np.isinf(l_ref)).all()
    assert (np.isnan(g) == np.isnan(g_ref)).all() and (np.isinf(g) == np.isinf(g_ref)).all()
    assert l[2] == 0 and l_ref[2] == 0
    zeros = np.zeros(V, np.float32).tobytes()
    assert g[2].tobytes() == zeros and g_ref[2].tobytes() == zeros
    rtol, floor = tol(np.float32)
    assert_close(g[1], g_ref[1], rtol * 5, floor, "dlogits of the clean row")


@pytest.mark.parametrize("N,V,n_vocab", [(1, 1, 1), (17, 7, 7), (5, 50304, 50257), (9, 1000, 1000)])
def test_softmax_xent_bf16_logits(N, V, n_vocab):
    """bf16 logits (the classifier's bf16 GEMM output), float32 losses, bf16 dlogits in place:
    against the reference on the same bf16 values; the 16-byte (8 x bf16) path and the scalar
    path (rows not a multiple of 8 or not aligned) agree to the fp32 reordering of the row sums
    and one bf16 step."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, BF16_HOST_DTYPE, bf16_bits, bits_to_float
    logits, t = _inputs(N, V, np.float32, seed=4)
    t = np.where(t >= n_vocab, n_vocab - 1, t).astype(np.int32)
    bits = bf16_bits(logits)
    host = bits_to_float(bits).view(BF16_HOST_DTYPE)
    dloss = 1.0 / max(int((t >= 0).sum()), 1)
    l_ref, g_ref = softmax_xent_ref(host.copy(), t, dloss, vocab_size=n_vocab)
    L = cp.asarray(bits)
    assert L.dtype == BF16_DEVICE_DTYPE
    losses = poison((N,), np.float32)
    lo, g = softmax_xent(L, cp.asarray(t), dloss, losses=losses, dlogits=L, vocab_size=n_vocab)
    assert lo is losses and g is L
    rtol, floor = tol(np.float32)
    assert_close(losses, l_ref, rtol, floor, "losses")
    got = bits_to_float(cp.asnumpy(g))
    want = bits_to_float(bf16_bits(g_ref.view(np.float32)))
    # at most one bf16 ulp where the kernel's fp32 value (online sum, exp(x - m) * (1 / s), the
    # device's expf) and NumPy's land on either side of a bf16 midpoint: one ulp is 2^-7 of
    # the binade's base, so up to 2^-7 |want| (2^-8 would admit no flip at all). At V = 50,304
    # a flip is rare but not negligible: modelled, ~5% of runs flip one of the 5 rows' logits
    assert (np.abs(got - want) <= 2.0 ** -7 * np.abs(want) + 1e-30).all()
    if V % 8 == 0:  # the same rows through the scalar path: offset by one element
        # Its threads take other columns (one at a time, not 8 consecutive), so each row's
        # max and sum of exps are added in another order: not the same bits (on the emulator 13
        # of 270 losses differed over 30 seeds, 2 dlogits), the float32 paths' tolerance for
        # the losses (test_softmax_xent_vector_and_scalar_paths_agree), one bf16 step for the
        # dlogits rounded from them.
        buf = cp.zeros(N * V + 1, dtype=BF16_DEVICE_DTYPE)
        un = buf[1:].reshape(N, V)
        un[...] = cp.asarray(bits)
        lo2, g2 = softmax_xent(un, cp.asarray(t), dloss, dlogits=un, vocab_size=n_vocab)
        assert_close(lo2, cp.asnumpy(losses), 1e-6, 1e-7, "losses, scalar path")
        got2 = bits_to_float(cp.asnumpy(g2))
        assert (np.abs(got2 - got) <= 2.0 ** -7 * np.abs(got) + 1e-30).all(), "dlogits"


@pytest.mark.parametrize("dtype,target", [(np.int64, 2**32 + 3), (np.uint32, 2**31 + 3),
                                          (np.int64, -2**32 + 3)])
def test_softmax_xent_wide_targets_past_int32_are_out_of_range_or_ignored(dtype, target):
    """Targets of a wider type are narrowed to the kernel's int32 clamped, not wrapped: past
    int32 an id stays out of range (NaN loss), below it negative (ignored). Wrapped, 2^32 + 3
    was the valid target 3, 2^31 + 3 (uint32) a negative, ignored one, and -2^32 + 3 the
    target 3."""
    logits = cp.zeros((2, 10), dtype=np.float32)
    losses, g = softmax_xent(logits, cp.asarray(np.array([3, target], dtype=dtype)), 1.0)
    l, g = cp.asnumpy(losses), cp.asnumpy(g)
    assert np.isfinite(l[0])
    if target >= 0:
        assert np.isnan(l[1]) and np.isnan(g[1]).all()
    else:
        assert l[1] == 0 and (g[1] == 0).all()


def test_softmax_xent_refuses_outputs_over_inputs():
    """losses over the logits (other blocks read them), dlogits over the targets or dloss
    (every block reads dloss) race; dlogits = logits stays allowed (in place)."""
    N, V = 4, 8
    logits, t = _inputs(N, V, np.float32)
    L, T = cp.asarray(logits), cp.asarray(t)
    with pytest.raises(ValueError, match="losses: must not overlap logits"):
        softmax_xent(L, T, 1.0, losses=L.reshape(-1)[:N])
    arena = cp.zeros(N * V + N, np.float32)
    targets = arena[N * V:].view(np.int32)
    targets[...] = T
    with pytest.raises(ValueError, match="dlogits: must not overlap targets"):
        softmax_xent(L, targets, 1.0, dlogits=arena[N:].reshape(N, V))
    dloss = cp.zeros(N * V // 2, np.float64)
    with pytest.raises(ValueError, match="dlogits: must not overlap dloss"):
        softmax_xent(L, T, dloss[:1], dlogits=dloss.view(np.float32).reshape(N, V))
    # dlogits over the logits a row on: block r writes row r + 1's logits while block r + 1
    # reads them (only dlogits = logits itself is in place)
    rows = cp.zeros((N + 1) * V, np.float32)
    rows[:N * V] = L.reshape(-1)
    with pytest.raises(ValueError, match="dlogits: must be logits itself"):
        softmax_xent(rows[:N * V].reshape(N, V), T, 1.0, dlogits=rows[V:].reshape(N, V))
