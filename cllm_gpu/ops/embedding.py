"""Token + position embedding.

forward:  out[b, t] = wte[idx[b, t]] + wpe[t]            idx (B, T) int -> out (B, T, C)
backward: dwte[idx[b, t]] += dout[b, t]; dwpe[t] += sum_b dout[b, t]   (accumulates)
wpe / dwpe None: a model without position embeddings (pos_emb "none"): the token embedding
alone, any T.
"""
import numpy as np

from . import _cuda as _cu
from ._common import check_array, check_float, is_device_array


def _check(idx, wte, wpe):
    check_array("idx", idx, ndim=2, contiguous=False)
    if idx.dtype.kind not in "iu":
        raise ValueError(f"idx: expected an integer array, got {idx.dtype}")
    check_array("wte", wte, ndim=2)
    _check_vocabulary("wte", wte)
    if wpe is None:
        return
    check_array("wpe", wpe, shape=(None, wte.shape[1]), dtype=wte.dtype)
    if idx.shape[1] > wpe.shape[0]:
        raise ValueError(f"idx: sequence length {idx.shape[1]} exceeds block_size {wpe.shape[0]}")


def _check_vocabulary(name, table):
    """A table of no rows has no id to look up (the device would write NaN rows, NumPy raise an
    IndexError): refused on both backends, whatever the batch."""
    if table.shape[0] == 0:
        raise ValueError(f"{name}: empty vocabulary (0 rows)")


def embedding_forward_ref(idx, wte, wpe, out=None):
    B, T = idx.shape
    if out is None:
        out = np.empty((B, T, wte.shape[1]), dtype=wte.dtype)
    np.take(wte, idx, axis=0, out=out)
    if wpe is not None:
        out += wpe[:T]
    return out


def embedding_backward_ref(dout, idx, dwte, dwpe):
    B, T, C = dout.shape
    if B * T == 0:   # no positions: nothing to add (as the launcher)
        return
    # Group positions by token id (stable sort), sum each group, add once per id: repeated ids
    # accumulate correctly, in a fixed order, without np.add.at's slow unbuffered loop.
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")
    ids = flat[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    dwte[ids[starts]] += np.add.reduceat(dout.reshape(B * T, C)[order], starts, axis=0)
    if dwpe is not None:
        dwpe[:T] += dout.sum(axis=0)


def embedding_forward(idx, wte, wpe, out=None):
    _check(idx, wte, wpe)
    if is_device_array(wte):
        return embedding_forward_cuda(idx, wte, wpe, out)
    return embedding_forward_ref(idx, wte, wpe, out)


def embedding_backward(dout, idx, dwte, dwpe):
    check_array("idx", idx, ndim=2, contiguous=False)
    check_array("dwte", dwte, ndim=2)
    _check_vocabulary("dwte", dwte)
    B, T = idx.shape
    check_array("dout", dout, shape=(B, T, dwte.shape[1]), dtype=dwte.dtype)
    if dwpe is not None:
        check_array("dwpe", dwpe, shape=(None, dwte.shape[1]), dtype=dwte.dtype)
    if is_device_array(dwte):
        return embedding_backward_cuda(dout, idx, dwte, dwpe)
    return embedding_backward_ref(dout, idx, dwte, dwpe)


# ---- CUDA launcher (kernels_cu/embedding.cu)
# forward: grid-stride over B*T*C outputs. backward: dwpe by one thread per (t, c) summing over
# b in order; dwte by (channel chunk, vocab partition id % P) blocks that scan the positions in
# order and add each matching dout row into its dwte row: every dwte element is updated by one
# thread in a fixed order, so the result is bitwise reproducible (no float atomics).
# Token ids outside [0, V) are not checked on the host (that would sync): the forward writes
# NaN for them and the backward skips them (ids of a wider type than int32 are clamped on the
# device, not wrapped, so one past int32 is out of range too: _cuda.device_int32). Without wpe
# the forward kernel runs with with_wpe = 0 (wte stands in for the pointer it never reads) and
# the dwpe kernel is skipped. An output overlapping an input is refused (in general a race:
# other threads read what it overwrites).

_WTE_THREADS = 128      # channels per block of the dwte kernel (multiple of 32)
_WTE_TARGET_BLOCKS = 2048


def embedding_forward_cuda(idx, wte, wpe, out=None):
    _cu.require_device(wte=wte, **({} if wpe is None else {"wpe": wpe}))
    check_float("wte", wte)
    idx = _cu.device_int32("idx", idx)
    B, T = idx.shape
    V, C = wte.shape
    out = _cu.out_array("out", out, (B, T, C), wte.dtype)
    _cu.check_disjoint("out", out, idx=idx, wte=wte, wpe=wpe)
    n = B * T * C
    if n == 0:
        return out
    k = _cu.kernel("embedding", f"embedding_forward_kernel<{_cu.ctype(wte.dtype)}>")
    k((_cu.grid_stride_blocks(n),), (_cu.THREADS,),
      (idx, wte, wte if wpe is None else wpe, out, _cu.i64(B * T), _cu.i32(T), _cu.i32(C),
       _cu.i32(V), _cu.i32(wpe is not None)))
    return out


def embedding_backward_cuda(dout, idx, dwte, dwpe):
    _cu.require_device(dout=dout, dwte=dwte, **({} if dwpe is None else {"dwpe": dwpe}))
    check_array("dwte", dwte, ndim=2)
    check_float("dwte", dwte)
    idx = _cu.device_int32("idx", idx)
    B, T = idx.shape
    V, C = dwte.shape
    if dwpe is not None and T > dwpe.shape[0]:
        raise ValueError(f"idx: sequence length {T} exceeds dwpe rows {dwpe.shape[0]}")
    _cu.check_disjoint("dwte", dwte, dout=dout, idx=idx)
    if dwpe is not None:
        _cu.check_disjoint("dwpe", dwpe, dout=dout)
    N = B * T
    if N == 0 or C == 0:
        return
    _cu.check_int32_loop("idx", N, 32, "positions")   # the dwte kernel's warps, 32 at a time
    t = _cu.ctype(dwte.dtype)
    if dwpe is not None:
        k = _cu.kernel("embedding", f"embedding_backward_wpe_kernel<{t}>")
        k((_cu.grid_stride_blocks(T * C),), (_cu.THREADS,),
          (dout, dwpe, _cu.i32(B), _cu.i32(T), _cu.i32(C)))
    chunks = _cu.ceil_div(C, _WTE_THREADS)
    parts = max(1, min(V, _WTE_TARGET_BLOCKS // chunks))
    k = _cu.kernel("embedding", f"embedding_backward_wte_kernel<{t}>")
    k((chunks, parts), (_WTE_THREADS,),
      (dout, idx, dwte, _cu.i32(N), _cu.i32(C), _cu.i32(V), _cu.i32(parts)))
