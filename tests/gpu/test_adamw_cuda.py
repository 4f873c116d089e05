import numpy as np
import pytest

from cllm_gpu.ops.adamw import adamw_hyperparams, adamw_update, adamw_update_ref
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


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_nonfinite_device_scale_skips_step(bad, dtype):
    p, g, m, v, mask = _state(4097, dtype)
    D = [cp.asarray(a) for a in (p, g, m, v, mask)]
    adamw_update(*D, cp.asarray(_hyper(3, bad)), *BETAS)
    for name, got, want in zip(("params", "m", "v"), (D[0], D[2], D[3]), (p, m, v)):
        assert_bitwise_equal(got, want, name)


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_captured_in_a_graph_reads_hyper_at_each_replay(dtype):
    """One captured launch replayed with new per-step values written into `hyper`: each replay
    equals a fresh launch with that step's values (a by-value argument would stay frozen)."""
    state = _state(50_001, dtype)
    G = [cp.asarray(a) for a in state]
    R = [cp.asarray(a) for a in state]
    hyper = cp.asarray(_hyper(1, 0.5))
    stream = cp.cuda.Stream(non_blocking=False)
    with stream:
        adamw_update(*R, cp.asarray(_hyper(1, 0.5)), *BETAS)      # compiles the kernel
        adamw_update(*G, hyper, *BETAS)
        stream.begin_capture()
        adamw_update(*G, hyper, *BETAS)
        graph = stream.end_capture()
        for step, lr in ((2, 1e-3), (3, 4e-4), (4, 2e-3)):
            hyper[...] = cp.asarray(_hyper(step, 0.5, lr=lr))
            graph.launch(stream)
            adamw_update(*R, cp.asarray(_hyper(step, 0.5, lr=lr)), *BETAS)
    stream.synchronize()
    for name, a, b in zip(("params", "m", "v"), (G[0], G[2], G[3]), (R[0], R[2], R[3])):
        assert_bitwise_equal(a, b, name)


def test_adamw_rejects_bad_hyper():
    D = [cp.zeros(8, dtype=np.float32) for _ in range(5)]
    for bad in (cp.zeros(4, dtype=np.float64), cp.zeros(5, dtype=np.float32),
                np.zeros(5, dtype=np.float64)):
        with pytest.raises(ValueError, match="hyper"):
            adamw_update(*D, bad, *BETAS)
