import numpy as np
import pytest

from cllm_gpu.ops.adamw import adamw_hyperparams, adamw_update, adamw_update_ref
from cllm_gpu.ops.grad_norm import clip_factor, grad_norm
from gpu_util import assert_bitwise_equal, assert_close, tol

cp = pytest.importorskip("cupy")

HP = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _state(P, dtype, seed=0):
    rng = np.random.default_rng(seed)
    p = (rng.normal(size=P) * 0.02).astype(dtype)
    g = rng.normal(size=P).astype(dtype)
    m = (rng.normal(size=P) * 0.1).astype(dtype)
    v = (rng.random(size=P) * 0.01).astype(dtype)
    mask = (rng.random(size=P) < 0.7).astype(dtype)
    return p, g, m, v, mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("P", [1, 17, 1_000_003])
@pytest.mark.parametrize("scale_kind", ["one", "float", "device"])
@pytest.mark.parametrize("step", [1, 7])
def test_adamw_matches_reference(dtype, P, scale_kind, step):
    p, g, m, v, mask = _state(P, dtype)
    scale = {"one": 1.0, "float": 0.37, "device": 0.37}[scale_kind]
    ref = [a.astype(np.float64) for a in (p, g, m, v, mask)]
    adamw_update_ref(*ref, **HP, step=step, grad_scale=scale)
    D = [cp.asarray(a) for a in (p, g, m, v, mask)]
    gs = cp.asarray(np.array(scale, dtype=dtype)) if scale_kind == "device" else scale
    adamw_update(*D, **HP, step=step, grad_scale=gs)
    rtol, floor = tol(dtype)
    for name, got, want in zip(("params", "grads", "m", "v"), D[:4], ref[:4]):
        assert_close(got, want, rtol, floor, name)
    assert_bitwise_equal(D[1], g, "grads untouched")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_nonfinite_device_scale_skips_step(bad, dtype):
    p, g, m, v, mask = _state(4097, dtype)
    D = [cp.asarray(a) for a in (p, g, m, v, mask)]
    adamw_update(*D, **HP, step=3, grad_scale=cp.asarray(np.array([bad], dtype=dtype)))
    for name, got, want in zip(("params", "m", "v"), (D[0], D[2], D[3]), (p, m, v)):
        assert_bitwise_equal(got, want, name)


def test_clip_pipeline_on_device_without_host_sync_values():
    """grad_norm -> clip_factor -> adamw, all on the device; an inf gradient skips the step."""
    p, g, m, v, mask = _state(10_000, np.float32)
    D = [cp.asarray(a) for a in (p, g, m, v, mask)]
    norm = grad_norm(D[1])
    f = clip_factor(norm, 1.0)
    assert isinstance(f, cp.ndarray) and f.shape == ()
    want = min(1.0, 1.0 / (float(np.linalg.norm(g.astype(np.float64))) + 1e-6))
    assert abs(float(f) - want) <= 1e-6 * want
    ref = [a.astype(np.float64) for a in (p, g, m, v, mask)]
    adamw_update_ref(*ref, **HP, step=1, grad_scale=want)
    adamw_update(*D, **HP, step=1, grad_scale=f)
    assert_close(D[0], ref[0], 2e-5, 2e-6, "params")
    # inf gradient: norm inf -> factor NaN -> step skipped
    D[1][5] = np.inf
    before = [a.copy() for a in (D[0], D[2], D[3])]
    f = clip_factor(grad_norm(D[1]), 1.0)
    assert np.isnan(float(f))
    adamw_update(*D, **HP, step=2, grad_scale=f)
    for a, b in zip((D[0], D[2], D[3]), before):
        assert_bitwise_equal(a, b)


def test_adamw_rejects_bad_scale_shape():
    D = [cp.zeros(8, dtype=np.float32) for _ in range(5)]
    with pytest.raises(ValueError, match="grad_scale"):
        adamw_update(*D, **HP, step=1, grad_scale=cp.ones(2, dtype=np.float32))


def _hyper(step, lr=HP["lr"]):
    return adamw_hyperparams(lr, HP["beta1"], HP["beta2"], HP["weight_decay"], step)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("step", [1, 7, 1000])
def test_adamw_hyper_buffer_bitwise_equals_by_value(dtype, step):
    """lr, lr * wd and the bias corrections read from a device buffer (the CUDA-graph path):
    bitwise the update of the by-value launch."""
    state = _state(100_003, dtype, seed=step)
    A = [cp.asarray(a) for a in state]
    B = [cp.asarray(a) for a in state]
    scale = cp.asarray(np.array(0.37, dtype=dtype))
    adamw_update(*A, **HP, step=step, grad_scale=scale)
    adamw_update(*B, None, HP["beta1"], HP["beta2"], HP["eps"], None, None, grad_scale=scale,
                 hyper=cp.asarray(_hyper(step)))
    for name, a, b in zip(("params", "grads", "m", "v"), A[:4], B[:4]):
        assert_bitwise_equal(a, b, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_captured_in_a_graph_reads_hyper_at_each_replay(dtype):
    """One captured launch replayed with new per-step values written into `hyper`: each replay
    equals a by-value launch with that step's values (a launch argument would stay frozen)."""
    state = _state(50_001, dtype)
    G = [cp.asarray(a) for a in state]
    R = [cp.asarray(a) for a in state]
    hyper = cp.asarray(_hyper(1))
    stream = cp.cuda.Stream(non_blocking=False)
    with stream:
        adamw_update(*R, **HP, step=1, grad_scale=0.5)          # compiles the kernel
        adamw_update(*G, **dict(HP, lr=None, weight_decay=None), step=None, grad_scale=0.5,
                     hyper=hyper)
        stream.begin_capture()
        adamw_update(*G, **dict(HP, lr=None, weight_decay=None), step=None, grad_scale=0.5,
                     hyper=hyper)
        graph = stream.end_capture()
        for step, lr in ((2, 1e-3), (3, 4e-4), (4, 2e-3)):
            hyper[...] = cp.asarray(_hyper(step, lr=lr))
            graph.launch(stream)
            adamw_update(*R, **dict(HP, lr=lr), step=step, grad_scale=0.5)
    stream.synchronize()
    for name, a, b in zip(("params", "m", "v"), (G[0], G[2], G[3]), (R[0], R[2], R[3])):
        assert_bitwise_equal(a, b, name)


def test_adamw_rejects_bad_hyper():
    D = [cp.zeros(8, dtype=np.float32) for _ in range(5)]
    for bad in (cp.zeros(3, dtype=np.float64), cp.zeros(4, dtype=np.float32),
                np.zeros(4, dtype=np.float64)):
        with pytest.raises(ValueError, match="hyper"):
            adamw_update(*D, None, 0.9, 0.95, 1e-8, None, None, hyper=bad)
