import numpy as np
import pytest

from cllm_gpu.ops.dropout import DropoutKey, dropout, dropout_ref, keep_mask, site_id
from gpu_util import assert_bitwise_equal, poison

cp = pytest.importorskip("cupy")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 3, 4, 1025, 100_003])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_masks_bit_identical_to_the_reference(dtype, n, p):
    """The kernel and the NumPy reference draw the same Philox mask (bitwise), with the step
    given as an int or read from a float64 device slot (the trainer's step buffer)."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=n).astype(dtype)
    key = DropoutKey(seed=1337, step=41, site=site_id(3, 2), micro=1)
    want = dropout_ref(x, p, key)
    X = cp.asarray(x)
    out = poison((n,), dtype)
    assert dropout(X, p, key, out=out) is out
    assert_bitwise_equal(out, want, "dropout")
    slot = DropoutKey(seed=1337, step=cp.asarray(np.array([41.0])), site=site_id(3, 2), micro=1)
    assert_bitwise_equal(dropout(X, p, slot), want, "dropout, step from device memory")
    keep = keep_mask(0, n, p, key)
    assert ((cp.asnumpy(out) != 0) | ~keep).all() and (cp.asnumpy(out)[~keep] == 0).all()


def test_dropout_seed_past_32_bits_draws_the_reference_mask():
    """A seed of 2^32 + 1: the kernel draws the NumPy reference's mask (the key word both take
    from seed_word), not seed 1's (the launcher passed seed & 0xFFFFFFFF, and the reference
    refused the seed)."""
    x = np.random.default_rng(5).normal(size=4099).astype(np.float32)
    key = DropoutKey(seed=2**32 + 1, step=7, site=site_id(1, 1), micro=0)
    want = dropout_ref(x, 0.5, key)
    assert_bitwise_equal(dropout(cp.asarray(x), 0.5, key), want, "dropout, seed 2^32 + 1")
    low = dropout_ref(x, 0.5, DropoutKey(seed=1, step=7, site=site_id(1, 1), micro=0))
    assert ((want != 0) != (low != 0)).mean() > 0.4


# 2049 and 4100 rows: more than 32 chunks of 64 rows (33 and 65), so the finalize's lanes go
# round their loop over chunks a second and third time (colsum_chunks; CLLM_FINALIZE_LANES)
@pytest.mark.parametrize("N,C", [(1, 1), (37, 31), (130, 768), (2049, 8), (4100, 40)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("storage", ["float32", "bf16", "float64"])
def test_dropout_bias_backward_matches_reference(N, C, p, storage):
    """The branch-gradient kernel: the masked gradient bitwise the reference's (rounded to bf16
    for a bf16 out, as cvt.rn does), and the bias gradient's column sums (fixed-order partials:
    bitwise reproducible) against float64. storage: out's (bf16: float32 gradient in);
    float64 runs the double instantiation."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, bf16_bits
    from cllm_gpu.ops.dropout import dropout_bias_backward
    bf16 = storage == "bf16"
    dt = np.float64 if storage == "float64" else np.float32
    g = np.random.default_rng(N + C).normal(size=(N, C)).astype(dt)
    key = DropoutKey(seed=2, step=5, site=site_id(1, 3))
    want = g if p == 0 else dropout_ref(g, p, key)
    out = cp.full((N, C), 0xFFFF, BF16_DEVICE_DTYPE) if bf16 else poison((N, C), dt)
    db = cp.ones(C, dt)
    dropout_bias_backward(cp.asarray(g), p, key, out, db)
    if bf16:
        np.testing.assert_array_equal(cp.asnumpy(out), bf16_bits(want))
    else:
        assert_bitwise_equal(out, want, "masked gradient")
    np.testing.assert_allclose(cp.asnumpy(db), 1 + want.astype(np.float64).sum(axis=0),
                               rtol=1e-5, atol=1e-5)
    db2 = cp.ones(C, dt)
    dropout_bias_backward(cp.asarray(g), p, key, out, db2)
    assert_bitwise_equal(db2, db, "bias gradient, rerun")


@pytest.mark.parametrize("N,C", [(1, 1), (37, 31), (130, 768)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("storage", ["float32", "bf16", "float64"])
def test_dropout_bias_backward_column_sums_only(N, C, p, storage):
    """out=None: the bias gradient alone, bitwise what the call with an out adds (the same
    fixed-order partials); a bf16 dsum (storage "bf16"): bitwise the sums of its float values."""
    from cllm_gpu.ops.cast import from_bf16, to_bf16
    from cllm_gpu.ops.dropout import dropout_bias_backward
    dt = np.float64 if storage == "float64" else np.float32
    G = cp.asarray(np.random.default_rng(N + C).normal(size=(N, C)).astype(dt))
    key = DropoutKey(seed=2, step=5, site=site_id(1, 3))
    dsum = G
    if storage == "bf16":
        dsum = to_bf16(G)
        G = from_bf16(dsum)    # its float values
    db, db_only = cp.ones(C, dt), cp.ones(C, dt)
    dropout_bias_backward(G, p, key, poison((N, C), dt), db)
    assert dropout_bias_backward(dsum, p, key, None, db_only) is None
    assert_bitwise_equal(db_only, db, "column sums only")


def test_dropout_in_place_or_refused_over_x():
    """out = x is in place (each thread reads x[i], then writes out[i]): the reference's bits.
    out over x shifted by an element races (a thread overwrites x[i + 1] another one reads)."""
    n, p = 1025, 0.3
    x = np.random.default_rng(5).normal(size=n).astype(np.float32)
    key = DropoutKey(seed=9, step=2, site=site_id(0, 0))
    X = cp.asarray(x)
    assert dropout(X, p, key, out=X) is X
    assert_bitwise_equal(X, dropout_ref(x, p, key), "dropout in place")
    arena = cp.asarray(np.r_[x, 0].astype(np.float32))
    with pytest.raises(ValueError, match="out: must be x itself"):
        dropout(arena[:n], p, key, out=arena[1:])
    # the bias backward's out over dsum a column on: a thread overwrites what another reads
    from cllm_gpu.ops.dropout import dropout_bias_backward
    N, C = 41, 25
    sums = cp.asarray(np.r_[x[:N * C], 0].astype(np.float32))
    with pytest.raises(ValueError, match="out: must be dsum itself"):
        dropout_bias_backward(sums[:N * C].reshape(N, C), p, key, sums[1:].reshape(N, C),
                              cp.zeros(C, np.float32))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("storage", ["float32", "bf16", "float64"])
def test_dropout_bias_backward_in_a_given_scratch(p, storage):
    """The bias gradient's partial column sums in a caller's scratch (the model's activation
    cache, so a CUDA-graph capture allocates none of them): the same bits as partials allocated
    per call, dirty scratch or not, with an out and without; a scratch of another dtype, too
    small, misaligned or over an input is refused before any launch."""
    from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE
    from cllm_gpu.ops.dropout import dropout_bias_backward, dropout_bias_backward_scratch_size
    N, C = 130, 40                       # 3 chunks of 64 rows
    bf16 = storage == "bf16"
    dt = np.float64 if storage == "float64" else np.float32
    G = cp.asarray(np.random.default_rng(5).normal(size=(N, C)).astype(dt))
    key = DropoutKey(seed=2, step=5, site=site_id(1, 3))

    def run(scratch, with_out=True):
        out = None if not with_out else \
            cp.full((N, C), 0xFFFF, BF16_DEVICE_DTYPE) if bf16 else poison((N, C), dt)
        db = cp.ones(C, dt)
        dropout_bias_backward(G, p, key, out, db, scratch=scratch)
        return (db,) if out is None else (out, db)
    n = dropout_bias_backward_scratch_size(N, C)
    scratch = cp.full(n + 64, np.nan, dt)   # dirty: every element is written
    for with_out in (True, False):
        for got, want in zip(run(scratch, with_out), run(None, with_out)):
            assert_bitwise_equal(got, want, f"given scratch vs allocated, out {with_out}")
    other = np.float64 if dt == np.float32 else np.float32
    for bad, why in ((cp.zeros(n, other), np.dtype(dt).name),
                     (cp.zeros(n - 1, dt), f"at least {n}"),
                     (scratch[1:], "256-byte aligned")):
        with pytest.raises(ValueError, match=why):
            run(bad)
    with pytest.raises(ValueError, match="scratch: must not overlap dsum"):
        run(G.reshape(-1))
