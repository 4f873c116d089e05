import numpy as np
import pytest

from cllm_gpu.ops.adamw import adamw_hyperparams, adamw_update, adamw_update_ref
from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE, bf16_bits, bits_to_float, to_bf16
from cllm_gpu.ops.grad_norm import clip_factor, grad_norm
from gpu_util import assert_bitwise_equal, assert_close, tol

cp = pytest.importorskip("cupy")

HP = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
BETAS = (HP["beta1"], HP["beta2"], HP["eps"])


def _state(P, dtype, seed=0):
    rng = np.random.default_rng(seed)
    p = (rng.normal(size=P) * 0.02).astype(dtype)
    g = rng.normal(size=P).astype(dtype)
    m = (rng.normal(size=P) * 0.1).astype(dtype)
    v = (rng.random(size=P) * 0.01).astype(dtype)
    mask = (rng.random(size=P) < 0.7).astype(dtype)
    return p, g, m, v, mask


def _hyper(step, grad_scale=1.0, lr=HP["lr"]):
    return adamw_hyperparams(lr, HP["beta1"], HP["beta2"], HP["weight_decay"], step, grad_scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("P", [1, 17, 1_000_003])
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("step", [1, 7])
def test_adamw_matches_reference(dtype, P, scale, step):
    p, g, m, v, mask = _state(P, dtype)
    ref = [a.astype(np.float64) for a in (p, g, m, v, mask)]
    adamw_update_ref(*ref, _hyper(step, scale), *BETAS)
    D = [cp.asarray(a) for a in (p, g, m, v, mask)]
    adamw_update(*D, cp.asarray(_hyper(step, scale)), *BETAS)
    rtol, floor = tol(dtype)
    for name, got, want in zip(("params", "grads", "m", "v"), D[:4], ref[:4]):
        assert_close(got, want, rtol, floor, name)
    assert_bitwise_equal(D[1], g, "grads untouched")


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("P", [1, 17, 1_000_003])
def test_adamw_writes_the_bf16_copy(P, masked):
    """params_bf16 (the <float, true> kernel): every element the bf16 rounding of the updated
    parameter, bitwise ops.to_bf16 of the kernel's own fp32 result (poisoned first); params and
    moments bitwise what the kernel without the copy writes, and close to the NumPy reference,
    whose own copy agrees to one bf16 step plus the fp32 params' own difference (below)."""
    p, g, m, v, mask = _state(P, np.float32)
    if not masked:
        mask[:] = 0
    hyper = _hyper(3, 0.37)
    D = [cp.asarray(a) for a in (p, g, m, v, mask)]
    plain = [cp.asarray(a) for a in (p, g, m, v, mask)]
    copy = cp.full(P, 0xFFFF, dtype=BF16_DEVICE_DTYPE)  # NaN bits
    adamw_update(*D, cp.asarray(hyper), *BETAS, params_bf16=copy)
    adamw_update(*plain, cp.asarray(hyper), *BETAS)
    assert_bitwise_equal(copy, to_bf16(D[0]), "params_bf16 = to_bf16(params)")
    assert_bitwise_equal(copy, bf16_bits(cp.asnumpy(D[0])), "params_bf16 = host rounding")
    for name, a, b in zip(("params", "grads", "m", "v"), D, plain):
        assert_bitwise_equal(a, b, name)
    ref = [a.copy() for a in (p, g, m, v, mask)]
    ref_copy = to_bf16(np.zeros(P, np.float32))
    adamw_update_ref(*ref, hyper, *BETAS, params_bf16=ref_copy)
    assert_close(D[0], ref[0], *tol(np.float32), "params")
    np.testing.assert_array_equal(ref_copy, bits_to_float(bf16_bits(ref[0])))
    # The two fp32 params a, b differ by up to the params tolerance (r |b| + f max|b|), and
    # |bf16(a) - bf16(b)| <= (1 + 2^-8) |a - b| + 2^-7 |b|: one bf16 step alone (rtol 2^-7,
    # floor 0) fails where an update cancels to near 0 (p - lr (u + wd p) ~ 1e-8: a few fp32
    # ulps of the operands are then a large part of it), one of 1,000,003 on the emulator.
    r, f = tol(np.float32)
    assert_close(bits_to_float(cp.asnumpy(copy)), ref_copy, (2.0 ** -7 + 2 * r) / (1 - 2.0 ** -8),
                 2 * f, "params_bf16")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_nonfinite_device_scale_skips_step(bad, dtype):
    """params, m, v and (float32) the bf16 copy bitwise unchanged."""
    p, g, m, v, mask = _state(4097, dtype)
    D = [cp.asarray(a) for a in (p, g, m, v, mask)]
    copy = cp.full(4097, 0x3F80, dtype=BF16_DEVICE_DTYPE) if dtype == np.float32 else None
    adamw_update(*D, cp.asarray(_hyper(3, bad)), *BETAS, params_bf16=copy)
    for name, got, want in zip(("params", "m", "v"), (D[0], D[2], D[3]), (p, m, v)):
        assert_bitwise_equal(got, want, name)
    if copy is not None:  # 1.0 everywhere: not the params' rounding, so any write shows
        assert bool((copy == 0x3F80).all()), "a skipped step wrote params_bf16"


def test_clip_pipeline_on_device_without_host_sync_values():
    """grad_norm -> clip_factor -> adamw through one per-step buffer on the device, as the
    trainer runs them; an inf gradient skips the step."""
    p, g, m, v, mask = _state(10_000, np.float32)
    D = [cp.asarray(a) for a in (p, g, m, v, mask)]
    buf = cp.asarray(np.concatenate([_hyper(1), [0.0, 2.5, 0.0, 0.0]]))  # hyper, -, loss, norm, bad
    hyper, scale, loss, norm_bad = buf[:5], buf[4:5], buf[6:7], buf[7:9]
    grad_norm(D[1], out=norm_bad)
    clip_factor(norm_bad[:1], loss, 1.0, out=scale)
    want = min(1.0, 1.0 / (float(np.linalg.norm(g.astype(np.float64))) + 1e-6))
    assert abs(float(scale[0]) - want) <= 1e-6 * want and float(norm_bad[1]) == -1
    ref = [a.astype(np.float64) for a in (p, g, m, v, mask)]
    adamw_update_ref(*ref, _hyper(1, want), *BETAS)
    adamw_update(*D, hyper, *BETAS)
    assert_close(D[0], ref[0], 2e-5, 2e-6, "params")
    # inf gradient: norm inf -> factor NaN -> step skipped; its index is reported
    D[1][5] = np.inf
    before = [a.copy() for a in (D[0], D[2], D[3])]
    grad_norm(D[1], out=norm_bad)
    clip_factor(norm_bad[:1], loss, 1.0, out=scale)
    assert np.isnan(float(scale[0])) and float(norm_bad[1]) == 5
    adamw_update(*D, hyper, *BETAS)
    for a, b in zip((D[0], D[2], D[3]), before):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype,bf16", [(np.float32, False), (np.float64, False),
                                        (np.float32, True)])
def test_adamw_captured_in_a_graph_reads_hyper_at_each_replay(dtype, bf16):
    """One captured launch replayed with new per-step values written into `hyper`: each replay
    equals a fresh launch with that step's values (a by-value argument would stay frozen);
    with the bf16 copy, the replays write it too."""
    state = _state(50_001, dtype)
    G = [cp.asarray(a) for a in state]
    R = [cp.asarray(a) for a in state]
    gc, rc = ((cp.zeros(50_001, dtype=BF16_DEVICE_DTYPE) for _ in range(2)) if bf16
              else (None, None))
    hyper = cp.asarray(_hyper(1, 0.5))
    stream = cp.cuda.Stream(non_blocking=False)
    with stream:
        adamw_update(*R, cp.asarray(_hyper(1, 0.5)), *BETAS, params_bf16=rc)  # compiles
        adamw_update(*G, hyper, *BETAS, params_bf16=gc)
        stream.begin_capture()
        adamw_update(*G, hyper, *BETAS, params_bf16=gc)
        graph = stream.end_capture()
        for step, lr in ((2, 1e-3), (3, 4e-4), (4, 2e-3)):
            hyper[...] = cp.asarray(_hyper(step, 0.5, lr=lr))
            graph.launch(stream)
            adamw_update(*R, cp.asarray(_hyper(step, 0.5, lr=lr)), *BETAS, params_bf16=rc)
    stream.synchronize()
    for name, a, b in zip(("params", "m", "v"), (G[0], G[2], G[3]), (R[0], R[2], R[3])):
        assert_bitwise_equal(a, b, name)
    if bf16:
        assert_bitwise_equal(gc, rc, "params_bf16")
        assert_bitwise_equal(gc, to_bf16(G[0]), "params_bf16 = to_bf16(params)")


def test_adamw_rejects_bad_hyper():
    D = [cp.zeros(8, dtype=np.float32) for _ in range(5)]
    for bad in (cp.zeros(4, dtype=np.float64), cp.zeros(5, dtype=np.float32),
                np.zeros(5, dtype=np.float64)):
        with pytest.raises(ValueError, match="hyper"):
            adamw_update(*D, bad, *BETAS)


def test_adamw_rejects_bad_params_bf16():
    D = [cp.zeros(8, dtype=np.float32) for _ in range(5)]
    hyper = cp.asarray(_hyper(1))
    cases = [(np.zeros(8, np.uint16), "same side"),                # a host array
             (cp.zeros(8, dtype=np.float32), "bf16 storage"),
             (cp.zeros(9, dtype=BF16_DEVICE_DTYPE), "shape"),
             (cp.zeros(16, dtype=BF16_DEVICE_DTYPE)[::2], "C-contiguous"),
             (D[0].view(BF16_DEVICE_DTYPE)[:8], "overlap")]          # the params' own bytes
    for bad, msg in cases:
        with pytest.raises(ValueError, match=f"params_bf16: .*{msg}"):
            adamw_update(*D, hyper, *BETAS, params_bf16=bad)
    D64 = [a.astype(np.float64) for a in D]
    with pytest.raises(ValueError, match="params_bf16: a bf16 copy needs float32 params"):
        adamw_update(*D64, hyper, *BETAS, params_bf16=cp.zeros(8, dtype=BF16_DEVICE_DTYPE))


def test_adamw_refuses_overlapping_arrays():
    """params, m and v are written (element i by the thread that reads element i of every
    array): one over another array's other elements, here shifted by one, or over hyper (which
    every thread reads), races."""
    P = 8
    arena = cp.zeros(4 * P + 1, dtype=np.float32)
    p, g, m, v = (arena[k * P:(k + 1) * P] for k in range(4))
    v_shifted = arena[3 * P + 1:]
    mask = cp.zeros(P, np.float32)
    hyper = cp.asarray(_hyper(1))
    for args, match in (((p, g, arena[1:P + 1], v, mask, hyper), "params: must not overlap m"),
                        ((p, v_shifted, m, v, mask, hyper), "v: must not overlap grads"),
                        ((p, g, m, v, v_shifted, hyper), "v: must not overlap decay_mask")):
        with pytest.raises(ValueError, match=match):
            adamw_update(*args, *BETAS)
    h64 = cp.zeros(P, dtype=np.float64)
    h64[:5] = hyper
    p64 = [cp.zeros(P, np.float64) for _ in range(4)]
    with pytest.raises(ValueError, match="params: must not overlap hyper"):
        adamw_update(h64, *p64[1:], p64[0], h64[:5], *BETAS)
