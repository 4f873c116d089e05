"""Dense float64 versions of the bf16 attention (precision="bf16"), shared by the CPU tests of
the NumPy bf16 reference (tests/test_attention.py) and the GPU tests of the tensor-core kernels
(tests/gpu/test_attention_cuda.py): the same roundings as ops/attention.py, computed on whole
(T x T) matrices, plus the magnitudes that set how far fp32 summation order may move a result."""
import math

import numpy as np

from cllm_gpu.ops.attention import BF16_KEY_TILE
from cllm_gpu.ops.cast import round_bf16

U = 2.0 ** -8  # bf16 unit roundoff: 8 significant bits (spacing 2^-7 in [1, 2)), to nearest


def split64(a, H):
    """(B, T, 3C) -> q, k, v as float64 (B, H, T, D)."""
    B, T, C3 = a.shape
    return a.astype(np.float64).reshape(B, T, 3, H, C3 // 3 // H).transpose(2, 0, 3, 1, 4)


def heads64(a, H):
    B, T, C = a.shape
    return a.astype(np.float64).reshape(B, T, H, C // H).transpose(0, 2, 1, 3)


def unheads(a):
    B, H, T, D = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def rb(x):
    """float64 -> float32 -> nearest bf16, as float64."""
    return round_bf16(np.asarray(x, dtype=np.float32)).astype(np.float64)


def dense_bf16_forward(qkv, H, tile=BF16_KEY_TILE):
    """The bf16 forward as one dense (T x T) float64 computation: per key j, the kernel rounds
    exp(s_ij - M_ij) with M_ij the running max of row i after the key tile holding j, then
    rescales by exp(M_ij - m_i) (the product of the later tiles' alphas); l is unrounded."""
    B, T, C3 = qkv.shape
    D = C3 // 3 // H
    q, k, v = split64(round_bf16(qkv), H)
    s = q @ k.swapaxes(-1, -2) * np.float32(1 / math.sqrt(D))
    s[..., np.triu(np.ones((T, T), bool), 1)] = -np.inf
    nt = -(-T // tile)
    padded = np.full(s.shape[:-1] + (nt * tile,), -np.inf)
    padded[..., :T] = s
    running = np.maximum.accumulate(padded.reshape(s.shape[:-1] + (nt, tile)).max(-1), axis=-1)
    m = running.max(-1, keepdims=True)
    M = np.repeat(running, tile, axis=-1)[..., :T]
    w = np.where(np.isfinite(M), np.exp(M - m), 0.0)  # tiles past row i: -inf, no keys there
    l = np.exp(s - m).sum(-1, keepdims=True)  # noqa: E741
    out = (rb(np.exp(s - M)) * w) @ v / l
    return unheads(out), (m + np.log(l))[..., 0], v


def dense_bf16_backward(dout, qkv, out, lse, H):
    """The bf16 backward as dense float64 matrices. Returns (dq, dk, dv) (B, T, C); for each the
    sum of the absolute values of its terms (the scale of its fp32 rounding: dP - Delta cancels,
    exactly so in row 0); and the largest change from flipping one bf16 rounding of P or dS
    (1 ulp <= 2^-7 relative) -- fp32 differences before a rounding can flip it."""
    B, T, C3 = qkv.shape
    D = C3 // 3 // H
    scale = np.float32(1 / math.sqrt(D))
    q, k, v = split64(round_bf16(qkv), H)
    s = q @ k.swapaxes(-1, -2) * scale
    s[..., np.triu(np.ones((T, T), bool), 1)] = -np.inf
    p = np.exp(s - lse.astype(np.float64)[..., None])
    do = heads64(round_bf16(dout), H)
    delta = (do * heads64(out, H)).sum(-1, keepdims=True)
    dp = do @ v.swapaxes(-1, -2)
    ds = rb(p * (dp - delta))
    dq, dk, dv = ds @ k * scale, ds.swapaxes(-1, -2) @ q * scale, rb(p).swapaxes(-1, -2) @ do
    ds_mag = p * (np.abs(do) @ np.abs(v).swapaxes(-1, -2)
                  + (np.abs(do) * np.abs(heads64(out, H))).sum(-1, keepdims=True))
    mags = (ds_mag @ np.abs(k) * scale, ds_mag.swapaxes(-1, -2) @ np.abs(q) * scale,
            p.swapaxes(-1, -2) @ np.abs(do))
    flip_ds = 2.0 ** -7 * np.abs(ds).max() * scale
    flips = (flip_ds * np.abs(k).max(), flip_ds * np.abs(q).max(), 2.0 ** -7 * np.abs(do).max())
    return ([unheads(a) for a in (dq, dk, dv)], [unheads(a) for a in mags], flips)


def assert_equal_up_to_fp32(got, want, mag, flip, name, rel=1e-5):
    """got == want up to fp32 rounding (`rel` of `mag`, the sum of the absolute values of the
    terms), except that a few elements (a P or dS value whose fp32 computation landed next to a
    bf16 rounding midpoint) may be off by up to `flip` per flipped rounding."""
    err = np.abs(np.asarray(got).astype(np.float64) - want)
    assert np.isfinite(err).all(), f"{name}: non-finite values (unwritten or NaN)"
    fp32_tol = rel * mag
    rows_off = (err > fp32_tol).any(axis=-1)  # a flip moves (part of) one output row
    assert rows_off.sum() <= 2 + 0.02 * rows_off.size, \
        f"{name}: {rows_off.sum()} of {rows_off.size} rows beyond fp32 rounding"
    assert (err <= fp32_tol + 2 * flip).all(), f"{name}: max err {err.max()} > bf16 flips {flip}"




def lse_bound(qkv, H):
    """Per (b, h, row): the largest change of a score from rounding q and k to bf16,
    delta_i = (2u + u^2) * scale * max_j sum_d |q_id k_jd|; bounds the lse error."""
    D = qkv.shape[2] // 3 // H
    q, k, _ = split64(qkv, H)
    qk = np.abs(q) @ np.abs(k).swapaxes(-1, -2) / math.sqrt(D)
    qk[..., np.triu(np.ones(qk.shape[-2:], bool), 1)] = 0
    return (2 * U + U * U) * qk.max(-1)
