"""Fused softmax + cross-entropy: per-row loss and dlogits in one pass over the logits.

logits (N, V), targets (N,) int (-1 = ignored), dloss (scalar: the weight of each row's loss,
usually 1 / number of non-ignored rows) -> losses (N,) [0 for ignored rows],
dlogits (N, V) = (softmax(logits) - onehot(target)) * dloss [0 for ignored rows].
dlogits may be the logits buffer itself (in place).
"""
import numpy as np

from ._common import check_array, check_float, is_device_array


def softmax_xent_ref(logits, targets, dloss, losses=None, dlogits=None, need_grad=True):
    N, V = logits.shape
    valid = targets >= 0
    tgt = np.where(valid, targets, 0)
    m = logits.max(axis=1, keepdims=True)
    z = logits - m
    e = np.exp(z)
    s = e.sum(axis=1)
    lse = np.log(s)
    row_loss = lse - z[np.arange(N), tgt]
    row_loss = np.where(valid, row_loss, 0.0).astype(logits.dtype, copy=False)
    if losses is None:
        losses = row_loss
    else:
        losses[...] = row_loss
    if not need_grad:
        return losses, None
    e /= s[:, None]
    e[np.arange(N), tgt] -= 1.0
    e *= (dloss * valid)[:, None].astype(logits.dtype)
    if dlogits is None:
        dlogits = e
    else:
        dlogits[...] = e
    return losses, dlogits


def _check(logits, targets):
    check_array("logits", logits, ndim=2)
    check_float("logits", logits)
    check_array("targets", targets, shape=(logits.shape[0],), contiguous=False)
    if targets.dtype.kind not in "iu":
        raise ValueError(f"targets: expected an integer array, got {targets.dtype}")


def softmax_xent(logits, targets, dloss, losses=None, dlogits=None, need_grad=True):
    _check(logits, targets)
    if is_device_array(logits):
        return softmax_xent_cuda(logits, targets, dloss, losses, dlogits, need_grad)
    return softmax_xent_ref(logits, targets, dloss, losses, dlogits, need_grad)
