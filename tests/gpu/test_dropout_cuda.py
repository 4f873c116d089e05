import numpy as np
import pytest

from cllm_gpu.ops.dropout import DropoutKey, dropout, dropout_add, dropout_ref, keep_mask, site_id
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
    base = rng.normal(size=n).astype(dtype)
    key = DropoutKey(seed=1337, step=41, site=site_id(3, 2), micro=1)
    want = dropout_ref(x, p, key)
    X = cp.asarray(x)
    out = poison((n,), dtype)
    assert dropout(X, p, key, out=out) is out
    assert_bitwise_equal(out, want, "dropout")
    slot = DropoutKey(seed=1337, step=cp.asarray(np.array([41.0])), site=site_id(3, 2), micro=1)
    assert_bitwise_equal(dropout(X, p, slot), want, "dropout, step from device memory")
    got = dropout_add(cp.asarray(base), X, p, key)
    assert_bitwise_equal(got, base + want, "dropout_add")
    keep = keep_mask(0, n, p, key)
    assert ((cp.asnumpy(out) != 0) | ~keep).all() and (cp.asnumpy(out)[~keep] == 0).all()
