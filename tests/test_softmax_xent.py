import numpy as np
import pytest

from cllm_gpu.ops.softmax_xent import softmax_xent
from fd import assert_grad_close


def plain_xent(logits, targets):
    losses = np.zeros(len(targets))
    for i, t in enumerate(targets):
        if t >= 0:
            z = logits[i] - logits[i].max()
            losses[i] = np.log(np.exp(z).sum()) - z[t]
    return losses


def test_losses_and_gradient():
    rng = np.random.default_rng(11)
    logits = rng.normal(scale=3, size=(9, 7))
    targets = np.array([0, 6, -1, 3, 3, -1, 1, 2, 5])
    n = (targets >= 0).sum()
    losses, dlogits = softmax_xent(logits.copy(), targets, 1.0 / n)
    np.testing.assert_allclose(losses, plain_xent(logits, targets), rtol=1e-13)
    assert np.all(losses[targets < 0] == 0) and np.all(dlogits[targets < 0] == 0)
    loss = lambda: float(plain_xent(logits, targets).sum() / n)  # noqa: E731
    assert_grad_close(loss, logits, dlogits, n=63)


def test_in_place_and_large_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    buf = logits.copy()
    losses, d = softmax_xent(buf, np.array([0, 2]), 0.5, dlogits=buf)
    assert d is buf and np.all(np.isfinite(d))
    np.testing.assert_allclose(losses, [0.0, np.log(3)], rtol=1e-6)
    np.testing.assert_allclose(d[1], np.array([1, 1, -2]) / 3 * 0.5, rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_ignored_rows_get_exact_zeros_whatever_their_logits(bad):
    """An ignored row (target -1) is no part of the loss: loss 0 and a gradient of exact
    zeros (+0.0) even where its logits are NaN or inf, as the CUDA kernel (which never reads
    such a row) writes; a scored row with a NaN logit still gives NaN. 0 * NaN made NaN rows
    here (and -0.0 for negative entries) before."""
    logits = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    logits[0, 2] = bad
    logits[1, 4] = np.nan
    with np.errstate(invalid="ignore"):
        losses, d = softmax_xent(logits, np.array([-1, 3, 0]), 0.5)
    assert losses[0] == 0 and d[0].tobytes() == np.zeros(6, np.float32).tobytes()
    assert np.isnan(losses[1]) and np.isnan(d[1]).all()
    assert np.isfinite(losses[2]) and np.isfinite(d[2]).all()


def test_bad_targets_shape():
    with pytest.raises(ValueError, match="targets"):
        softmax_xent(np.zeros((3, 4)), np.zeros(2, dtype=np.int64), 1.0)


def test_dloss_from_a_float64_array_equals_the_float():
    """The trainer passes dloss as a slot of its per-step buffer (a kernel reads it through a
    pointer); a float and a 1-element float64 array give the same result."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 11)).astype(np.float32)
    targets = np.array([1, -1, 10, 0, 3])
    _, d1 = softmax_xent(logits.copy(), targets, 0.25)
    _, d2 = softmax_xent(logits.copy(), targets, np.array([0.25]))
    np.testing.assert_array_equal(d1, d2)
    for bad in (np.array([0.25, 1.0]), np.array([0.25], np.float32)):
        with pytest.raises(ValueError, match="dloss"):
            softmax_xent(logits.copy(), targets, bad)


def test_padded_columns_are_not_scored_and_get_no_gradient():
    """vocab_size < V: the padding columns take no part in the softmax (the result is the
    unpadded problem's, even with padding logits that would dominate) and get zero dlogits."""
    rng = np.random.default_rng(5)
    real = rng.normal(scale=2, size=(6, 7))
    targets = np.array([0, 6, -1, 3, 2, 5])
    padded = np.concatenate([real, np.full((6, 5), 40.0)], axis=1)
    l_ref, d_ref = softmax_xent(real.copy(), targets, 0.2)
    losses, d = softmax_xent(padded.copy(), targets, 0.2, vocab_size=7)
    np.testing.assert_allclose(losses, l_ref, rtol=1e-14)
    np.testing.assert_allclose(d[:, :7], d_ref, rtol=1e-14)
    assert d.shape == (6, 12) and np.all(d[:, 7:] == 0)
    buf = padded.copy()
    _, d2 = softmax_xent(buf, targets, 0.2, dlogits=buf, vocab_size=7)  # in place
    assert d2 is buf
    np.testing.assert_array_equal(d2, d)
    with pytest.raises(ValueError, match="vocab_size"):
        softmax_xent(padded.copy(), targets, 0.2, vocab_size=13)
    # vocab_size equal to the columns is no padding: the unpadded result, not a refusal
    l_all, d_all = softmax_xent(real.copy(), targets, 0.2, vocab_size=7)
    np.testing.assert_array_equal(l_all, l_ref)
    np.testing.assert_array_equal(d_all, d_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_past_one_chunk_with_a_ragged_last_chunk_are_all_computed(dtype):
    """The NumPy reference runs in chunks of whole rows (CHUNK // V of them) over the host
    threads: with 300 rows of 512 columns (chunks of 128, 128, 44) every row, the last
    partial chunk's included, gets its loss and gradient, the ones a single pass gives."""
    from cllm_gpu.ops._common import CHUNK
    N, V = 300, 512
    rows = CHUNK // V
    assert N > 2 * rows and N % rows  # more than one chunk, the last one ragged
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2, size=(N, V)).astype(dtype)
    targets = rng.integers(0, V, size=N)
    targets[::7] = -1
    losses = np.full(N, np.nan, dtype=dtype)
    dlogits = np.full((N, V), np.nan, dtype=dtype)
    softmax_xent(logits, targets, 0.5, losses=losses, dlogits=dlogits)
    np.testing.assert_allclose(losses, plain_xent(logits.astype(np.float64), targets),
                               rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(N), np.maximum(targets, 0)] -= 1
    p[targets < 0] = 0
    np.testing.assert_allclose(dlogits, 0.5 * p, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-7)


def test_bf16_logits_give_float32_losses_and_rounded_bf16_dlogits():
    """bf16 storage (a bf16 GEMM's output): the softmax and the losses in float32 on the bf16
    values, dlogits rounded to bf16 and written in place in bf16 storage."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, is_bf16, round_bf16
    rng = np.random.default_rng(5)
    x = round_bf16((rng.normal(size=(6, 37)) * 4).astype(np.float32))
    targets = np.array([3, -1, 36, 0, 17, 5])
    want_l, want_d = softmax_xent(x.copy(), targets, 0.2)
    buf = x.copy().view(BF16_HOST_DTYPE)
    losses, d = softmax_xent(buf, targets, 0.2, dlogits=buf)
    assert d is buf and is_bf16(d) and losses.dtype == np.float32 and not is_bf16(losses)
    np.testing.assert_array_equal(losses, want_l)
    np.testing.assert_array_equal(d, round_bf16(want_d))
    t30 = np.minimum(targets, 29)  # padding columns [30, 37): outside the softmax
    losses2, _ = softmax_xent(x.copy().view(BF16_HOST_DTYPE), t30, 0.2, vocab_size=30)
    want2, _ = softmax_xent(x[:, :30].copy(), t30, 0.2)
    np.testing.assert_array_equal(losses2, want2)


@pytest.mark.parametrize("need_grad", [True, False])
@pytest.mark.parametrize("N", [2, 0])
def test_empty_vocabulary_is_refused_before_dispatch(N, need_grad):
    """V = 0: the launcher's ValueError, now one check for both backends, whatever N (the
    NumPy path gave NumPy's 'zero-size array to reduction operation maximum' for N > 0 and
    empty results for N = 0)."""
    with pytest.raises(ValueError, match="logits: empty vocabulary"):
        softmax_xent(np.zeros((N, 0), np.float32), np.zeros(N, np.int32), 1.0,
                     need_grad=need_grad)



def test_a_vocabulary_wider_than_one_chunk_is_one_row_per_chunk():
    """V past CHUNK elements (a 100k-token vocabulary): CHUNK // V rounds to 0 rows, which must
    be 1 (0 was a ZeroDivisionError in run_chunks)."""
    from cllm_gpu.ops._common import CHUNK
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, CHUNK + 3))
    targets = np.array([0, CHUNK + 2, -1])
    losses, dlogits = softmax_xent(logits.copy(), targets, 1.0)
    np.testing.assert_allclose(losses, plain_xent(logits, targets), rtol=1e-12)
    assert np.all(dlogits[2] == 0) and np.allclose(dlogits[:2].sum(axis=1), 0, atol=1e-12)
