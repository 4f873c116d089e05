import numpy as np
import pytest

from cllm_gpu.ops.embedding import embedding_backward, embedding_forward
from fd import assert_grad_close


def test_forward_and_backward_with_repeated_ids():
    rng = np.random.default_rng(6)
    wte, wpe = rng.normal(size=(5, 3)), rng.normal(size=(8, 3))
    idx = np.array([[1, 1, 4, 0], [4, 4, 4, 2]])
    out = embedding_forward(idx, wte, wpe)
    np.testing.assert_allclose(out, wte[idx] + wpe[None, :4], rtol=1e-15)
    R = rng.normal(size=out.shape)
    loss = lambda: float(((wte[idx] + wpe[None, :4]) * R).sum())  # noqa: E731
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    embedding_backward(R, idx, dwte, dwpe)
    assert_grad_close(loss, wte, dwte, n=15)
    assert_grad_close(loss, wpe, dwpe, n=24)
    assert np.all(dwpe[4:] == 0)


def test_sequence_longer_than_block_raises():
    with pytest.raises(ValueError, match="block_size"):
        embedding_forward(np.zeros((1, 9), dtype=np.int64), np.zeros((5, 3)), np.zeros((8, 3)))


def test_without_position_embedding_any_length():
    """wpe None (pos_emb "none"): the token embedding alone, for any T; dwte as before."""
    rng = np.random.default_rng(7)
    wte = rng.normal(size=(5, 3))
    idx = rng.integers(0, 5, size=(2, 40))
    out = embedding_forward(idx, wte, None)
    np.testing.assert_array_equal(out, wte[idx])
    R = rng.normal(size=out.shape)
    dwte = np.zeros_like(wte)
    embedding_backward(R, idx, dwte, None)
    np.testing.assert_allclose(dwte, np.array([R[idx == v].sum(0) for v in range(5)]),
                               rtol=1e-12, atol=1e-14)


def test_backward_accumulates_into_both_gradients():
    """dwte and dwpe are added to (micro-batches sum their gradients), not overwritten."""
    rng = np.random.default_rng(8)
    idx = np.array([[3, 0, 3], [1, 3, 2]])
    R = rng.normal(size=(2, 3, 4))
    dwte0, dwpe0 = rng.normal(size=(5, 4)), rng.normal(size=(6, 4))
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    embedding_backward(R, idx, dwte, dwpe)
    want_wte = dwte0 + np.array([R[idx == v].sum(0) for v in range(5)])
    want_wpe = dwpe0.copy()
    want_wpe[:3] += R.sum(axis=0)
    np.testing.assert_allclose(dwte, want_wte, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(dwpe, want_wpe, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("with_wpe", [True, False])
@pytest.mark.parametrize("B,T,C", [(0, 4, 8), (2, 0, 8), (0, 0, 8), (2, 4, 0)])
def test_no_positions_or_channels_output_empty_and_gradients_unchanged(B, T, C, with_wpe):
    """B * T = 0 (or C = 0): what the CUDA launcher does (tests/gpu/test_empty_inputs_cuda.py):
    an empty output and the accumulated gradients left as they were (the NumPy backward
    indexed the first of no sorted ids: IndexError)."""
    idx = np.zeros((B, T), dtype=np.int32)
    wte, wpe = np.full((5, C), 1.5), (np.full((4, C), 0.5) if with_wpe else None)
    out = embedding_forward(idx, wte, wpe)
    assert (out.shape, out.dtype) == ((B, T, C), wte.dtype)
    dwte = np.full((5, C), 2.5)
    dwpe = np.full((4, C), 2.5) if with_wpe else None
    assert embedding_backward(np.ones((B, T, C)), idx, dwte, dwpe) is None
    assert (dwte == 2.5).all()
    assert dwpe is None or (dwpe == 2.5).all()


@pytest.mark.parametrize("B,T", [(2, 3), (0, 3)])
def test_empty_vocabulary_is_refused_by_forward_and_backward(B, T):
    """A table of no rows: one ValueError before dispatch, whatever the batch (NumPy raised an
    IndexError, the device wrote NaN rows: no id can be in range)."""
    idx = np.zeros((B, T), dtype=np.int32)
    with pytest.raises(ValueError, match="wte: empty vocabulary"):
        embedding_forward(idx, np.zeros((0, 4)), np.zeros((8, 4)))
    with pytest.raises(ValueError, match="dwte: empty vocabulary"):
        embedding_backward(np.zeros((B, T, 4)), idx, np.zeros((0, 4)), np.zeros((8, 4)))
