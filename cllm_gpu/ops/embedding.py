"""Token + position embedding.

forward:  out[b, t] = wte[idx[b, t]] + wpe[t]            idx (B, T) int -> out (B, T, C)
backward: dwte[idx[b, t]] += dout[b, t]; dwpe[t] += sum_b dout[b, t]   (accumulates)
"""
import numpy as np

from ._common import check_array, is_device_array


def _check(idx, wte, wpe):
    check_array("idx", idx, ndim=2, contiguous=False)
    if idx.dtype.kind not in "iu":
        raise ValueError(f"idx: expected an integer array, got {idx.dtype}")
    check_array("wte", wte, ndim=2)
    check_array("wpe", wpe, shape=(None, wte.shape[1]), dtype=wte.dtype)
    if idx.shape[1] > wpe.shape[0]:
        raise ValueError(f"idx: sequence length {idx.shape[1]} exceeds block_size {wpe.shape[0]}")


def embedding_forward_ref(idx, wte, wpe, out=None):
    B, T = idx.shape
    if out is None:
        out = np.empty((B, T, wte.shape[1]), dtype=wte.dtype)
    np.take(wte, idx, axis=0, out=out)
    out += wpe[:T]
    return out


def embedding_backward_ref(dout, idx, dwte, dwpe):
    B, T, C = dout.shape
    # np.add.at is unbuffered, so repeated token ids accumulate correctly (and in a fixed order).
    np.add.at(dwte, idx.reshape(-1), dout.reshape(B * T, C))
    dwpe[:T] += dout.sum(axis=0)


def embedding_forward(idx, wte, wpe, out=None):
    _check(idx, wte, wpe)
    if is_device_array(wte):
        return embedding_forward_cuda(idx, wte, wpe, out)
    return embedding_forward_ref(idx, wte, wpe, out)


def embedding_backward(dout, idx, dwte, dwpe):
    B, T = idx.shape
    check_array("dout", dout, shape=(B, T, dwte.shape[1]), dtype=dwte.dtype)
    check_array("dwpe", dwpe, shape=(None, dwte.shape[1]), dtype=dwte.dtype)
    if is_device_array(dwte):
        return embedding_backward_cuda(dout, idx, dwte, dwpe)
    return embedding_backward_ref(dout, idx, dwte, dwpe)
