import numpy as np
import pytest

from cllm_gpu.ops.embedding import (embedding_backward, embedding_backward_ref, embedding_forward,
                                    embedding_forward_ref)
from gpu_util import assert_bitwise_equal, assert_close, poison, tol

cp = pytest.importorskip("cupy")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,T,V,C", [(1, 1, 1, 1), (4, 17, 7, 33), (8, 255, 50257, 768),
                                     (2, 1024, 97, 130), (3, 64, 50257, 64)])
def test_embedding_matches_reference(dtype, B, T, V, C):
    rng = np.random.default_rng(B * T)
    Tmax = T + 5
    idx = rng.integers(0, V, size=(B, T)).astype(np.int32)
    if idx.size > 8:
        idx.flat[::3] = idx.flat[0]  # heavy repeats of one id
    wte = rng.normal(size=(V, C)).astype(dtype)
    wpe = rng.normal(size=(Tmax, C)).astype(dtype)
    dout = rng.normal(size=(B, T, C)).astype(dtype)
    dwte0 = rng.normal(size=(V, C)).astype(dtype)
    dwpe0 = rng.normal(size=(Tmax, C)).astype(dtype)
    f64 = lambda a: a.astype(np.float64)  # noqa: E731
    rtol, floor = tol(dtype)

    out = poison((B, T, C), dtype)
    I = cp.asarray(idx)
    assert embedding_forward(I, cp.asarray(wte), cp.asarray(wpe), out=out) is out
    assert_close(out, embedding_forward_ref(idx, f64(wte), f64(wpe)), rtol, floor, "out")

    dwte_ref, dwpe_ref = f64(dwte0), f64(dwpe0)
    embedding_backward_ref(f64(dout), idx, dwte_ref, dwpe_ref)
    dwte, dwpe = cp.asarray(dwte0), cp.asarray(dwpe0)
    embedding_backward(cp.asarray(dout), I, dwte, dwpe)
    assert_close(dwte, dwte_ref, rtol * 5, floor * 5, "dwte")
    assert_close(dwpe, dwpe_ref, rtol * 5, floor * 5, "dwpe")

    # determinism (repeated ids accumulate in a fixed order); int64 ids accepted
    dwte2, dwpe2 = cp.asarray(dwte0), cp.asarray(dwpe0)
    embedding_backward(cp.asarray(dout), cp.asarray(idx.astype(np.int64)), dwte2, dwpe2)
    assert_bitwise_equal(dwte2, dwte, "dwte")
    assert_bitwise_equal(dwpe2, dwpe, "dwpe")


def test_embedding_out_of_range_id_gives_nan_not_a_crash():
    wte = cp.ones((5, 4), dtype=np.float32)
    wpe = cp.zeros((3, 4), dtype=np.float32)
    out = embedding_forward(cp.asarray(np.array([[0, 5, -2]], dtype=np.int32)), wte, wpe)
    o = cp.asnumpy(out)
    assert (o[0, 0] == 1).all() and np.isnan(o[0, 1:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_without_position_embedding(dtype):
    """wpe None (pos_emb "none"): out is wte[idx] bit for bit at any T, dwte as with wpe."""
    rng = np.random.default_rng(3)
    B, T, V, C = 3, 70, 11, 33
    idx = rng.integers(0, V, size=(B, T)).astype(np.int32)
    wte = rng.normal(size=(V, C)).astype(dtype)
    dout = rng.normal(size=(B, T, C)).astype(dtype)
    out = poison((B, T, C), dtype)
    assert embedding_forward(cp.asarray(idx), cp.asarray(wte), None, out=out) is out
    assert_bitwise_equal(out, wte[idx], "out")
    dwte_ref = np.zeros((V, C))
    embedding_backward_ref(dout.astype(np.float64), idx, dwte_ref, None)
    dwte = cp.zeros((V, C), dtype=dtype)
    embedding_backward(cp.asarray(dout), cp.asarray(idx), dwte, None)
    rtol, floor = tol(dtype)
    assert_close(dwte, dwte_ref, rtol * 5, floor * 5, "dwte")


def test_embedding_refuses_outputs_over_inputs():
    """Outputs over the rows other threads read race: the forward's out over wte (position 0
    writes row 0 while position 2 reads it as id 0's row) or wpe (batch 0 writes the rows
    batch 1 reads), the backward's dwte over dout (id 2's block adds dout row 0, which id 0's
    block writes), dwpe over dout shifted by an element."""
    V, C, B, T = 6, 4, 2, 3
    wte, wpe = cp.ones((V, C), np.float32), cp.zeros((B * T, C), np.float32)
    idx = cp.asarray(np.array([[2, 0, 1], [1, 2, 0]], dtype=np.int32))
    with pytest.raises(ValueError, match="out: must not overlap wte"):
        embedding_forward(idx, wte, wpe, out=wte.reshape(B, T, C))
    with pytest.raises(ValueError, match="out: must not overlap wpe"):
        embedding_forward(idx, wte, wpe, out=wpe.reshape(B, T, C))
    dwte = cp.zeros((V, C), np.float32)
    with pytest.raises(ValueError, match="dwte: must not overlap dout"):
        embedding_backward(dwte.reshape(B, T, C), idx, dwte, cp.zeros((T, C), np.float32))
    arena = cp.zeros(B * T * C + 1, np.float32)
    with pytest.raises(ValueError, match="dwpe: must not overlap dout"):
        embedding_backward(arena[:B * T * C].reshape(B, T, C), idx, cp.zeros((V, C), np.float32),
                           arena[1:T * C + 1].reshape(T, C))


def test_embedding_backward_refuses_more_positions_than_dwpe_rows():
    """T = dwpe's rows + 1: the position kernel would add row T - 1 past dwpe's end (the
    launcher's check is the only one: embedding_backward checks dwpe's columns only)."""
    V, C, B, T = 5, 4, 2, 4
    idx = cp.zeros((B, T), np.int32)
    with pytest.raises(ValueError, match=f"sequence length {T} exceeds dwpe rows {T - 1}"):
        embedding_backward(cp.ones((B, T, C), np.float32), idx, cp.zeros((V, C), np.float32),
                           cp.zeros((T - 1, C), np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_embedding_wide_ids_past_int32_give_nan_not_another_row(dtype):
    """Ids of a wider type are narrowed to the kernel's int32 clamped, not wrapped: 2^32 + 1
    would have read row 1."""
    wte = cp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    ids = np.array([[1, 2**32 + 1, 2**31, 2]], dtype=dtype)
    o = cp.asnumpy(embedding_forward(cp.asarray(ids), wte, None))
    np.testing.assert_array_equal(o[0, [0, 3]], cp.asnumpy(wte)[[1, 2]])
    assert np.isnan(o[0, 1:3]).all()


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.uint16, "int32 strided"])
def test_embedding_narrow_and_strided_ids_are_the_rows_they_name(dtype):
    """Ids of a narrower type, or int32 ids not contiguous in memory, are copied into the
    kernel's contiguous int32 (neither clamped nor reinterpreted): out = wte[ids] bit for bit
    (h27k: this conversion ran on no emulator check)."""
    wte = cp.asarray(np.random.default_rng(4).normal(size=(200, 6)).astype(np.float32))
    ids = np.array([[0, 199, 7, 128, 3, 255 % 200]])
    if dtype == "int32 strided":
        dev = cp.asarray(np.repeat(ids, 2, axis=1).astype(np.int32))[:, ::2]
        assert not dev.flags.c_contiguous
    else:
        dev = cp.asarray(ids.astype(dtype))
    out = cp.asnumpy(embedding_forward(dev, wte, None))
    np.testing.assert_array_equal(out[0], cp.asnumpy(wte)[ids[0]])
