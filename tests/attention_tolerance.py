"""Tolerances for comparing bf16 attention (precision="bf16") with the reference, shared by the
CPU tests (tests/test_attention.py) and the GPU / emulator tests of the tensor-core kernels
(tests/gpu/test_attention_cuda.py): the scale of each result's fp32 rounding (the sum of the
absolute values of its terms) and the most one flipped bf16 rounding can move it. Computed in
float64 from the unrounded inputs: error scales, not a second implementation of the op."""
import math

import numpy as np

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


def lse_bound(qkv, H):
    """Per (b, h, row): the largest change of a score from rounding q and k to bf16,
    delta_i = (2u + u^2) * scale * max_j sum_d |q_id k_jd|; bounds the lse error (with or
    without a distance bias: the bias is added in fp32, unrounded)."""
    D = qkv.shape[2] // 3 // H
    q, k, _ = split64(qkv, H)
    qk = np.abs(q) @ np.abs(k).swapaxes(-1, -2) / math.sqrt(D)
    qk[..., np.triu(np.ones(qk.shape[-2:], bool), 1)] = 0
    return (2 * U + U * U) * qk.max(-1)


def backward_magnitudes(dout, qkv, out, lse, H, slopes=None):
    """(mags, flips) for dq, dk, dv (each (B, T, C)): the sum of the absolute values of each
    gradient's terms (dP - Delta cancels, exactly so in row 0, so the scale is that of its
    terms, not of the result), and the largest change from flipping one bf16 rounding of P or
    dS (1 ulp <= 2^-7 relative), which fp32 differences before a rounding can cause.
    slopes: the distance bias's m_h (H,), as given to the op."""
    B, T, C3 = qkv.shape
    D = C3 // 3 // H
    scale = 1 / math.sqrt(D)
    q, k, v = split64(qkv, H)
    s = q @ k.swapaxes(-1, -2) * scale
    if slopes is not None:
        ij = np.arange(T)[None, :] - np.arange(T)[:, None]           # j - i
        s = s + np.asarray(slopes, np.float64)[:, None, None] * ij
    s[..., np.triu(np.ones((T, T), bool), 1)] = -np.inf
    p = np.exp(s - lse.astype(np.float64)[..., None])
    do, o = heads64(dout, H), heads64(out, H)
    ds_mag = p * (np.abs(do) @ np.abs(v).swapaxes(-1, -2)
                  + (np.abs(do) * np.abs(o)).sum(-1, keepdims=True))
    mags = (ds_mag @ np.abs(k) * scale, ds_mag.swapaxes(-1, -2) @ np.abs(q) * scale,
            p.swapaxes(-1, -2) @ np.abs(do))
    flip_ds = 2.0 ** -7 * ds_mag.max() * scale
    flips = (flip_ds * np.abs(k).max(), flip_ds * np.abs(q).max(), 2.0 ** -7 * np.abs(do).max())
    return [unheads(a) for a in mags], flips


def assert_equal_up_to_fp32(got, want, mag, flip, name, rel=1e-5, heads=1):
    """got == want up to fp32 rounding (`rel` of `mag`, the sum of the absolute values of the
    terms), except that a few elements (a P or dS value whose fp32 computation landed next to a
    bf16 rounding midpoint) may be off by up to `flip` per flipped rounding.

    Flips are counted per head-row: got and want are (B, T, heads * D), and a flipped P_ij or
    dS_ij of head h moves only head h's D columns of row i (out, dq) or j (dk, dv); at most
    2 + 2% of the B * T * heads head-rows may be off. A value x rounded to bf16 flips with
    probability |delta| / ulp_bf16(x) for a kernel - reference difference delta before the
    rounding (on a GPU ~1e-7..3e-7 of x, rms: exp2f <= 2 ulp, the tensor cores' sums and the
    fp32 roundings of the exponent, against NumPy's exp, <= 2.4 ulp measured, and BLAS sums),
    so the rate per head-row does not depend on how many heads share a row, while counting
    whole rows made the allowance shrink as 1 / H. scripts/bf16_flip_model.py perturbs the
    exact pre-rounding values of the tests' own inputs by such differences (s - m, dP and Delta
    off by s_err u x the sum of their terms' magnitudes, the exps by 1.3 ulp rms, u = 2^-24):
    at s_err = 1 / 2 / 3 the thinnest case, dv at B, T, H, D = 1, 1024, 2, 128, uses 0.33 /
    0.65 / 0.91 of this allowance (0.62 / 1.25 / 1.73 of 2 + 2% of rows), and 5, 130, 12, 64
    0.13 / 0.21 / 0.31 (1.33 / 2.13 / 3.27 of rows); the model over-counts: with NumPy fp32's
    own differences from float64 (s_err 0.48, exp 0.58 ulp, measured) it predicts 1.1-3x the
    rows the real NumPy fp32 reference flips against float64 (5, 130, 12, 64: 9 against 8 dv
    rows; 1, 1024, 2, 128: 3 against 1). s_err: NumPy's sums ~0.15-0.2 (measured), the
    exponent's roundings ~0.5, a tensor-core sum truncating its aligned terms ~0.3 with guard
    bits, up to ~2 without."""
    err = np.abs(np.asarray(got).astype(np.float64) - want)
    assert np.isfinite(err).all(), f"{name}: non-finite values (unwritten or NaN)"
    fp32_tol = rel * mag
    off = (err > fp32_tol).reshape(*err.shape[:-1], heads, -1).any(axis=-1)  # one head-row a flip
    assert off.sum() <= 2 + 0.02 * off.size, \
        f"{name}: {off.sum()} of {off.size} head-rows beyond fp32 rounding"
    assert (err <= fp32_tol + 2 * flip).all(), f"{name}: max err {err.max()} > bf16 flips {flip}"
