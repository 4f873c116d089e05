"""The CUDA code path of the model and trainer, run on the CPU against a simulated device.

A stand-in `cupy` module whose "device arrays" are a NumPy subclass, and whose CUDA launchers
are replaced by the NumPy references, runs everything the CUDA backend does in Python: the
device-side clip factor and skip, the deferred reading of losses at log points, pinned staging
of token ids, checkpoints from device arenas, resume, and the CUDA-graph step (cuda_graph.py)
through a simulated stream capture that records device work and replays it (_Capture). Numerically it is the NumPy path, so its
losses must equal the NumPy backend's exactly. The kernels themselves are checked on a GPU
(tests/gpu); this checks the code around them on any machine. Run in its own process
(tests/test_sim_cuda_backend.py): it installs the stand-in into sys.modules.
"""
import contextlib
import json
import sys
import tempfile
import types
import weakref
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Capture:
    """Simulated CUDA stream capture (FakeStream.begin_capture .. end_capture).

    While active, device work is recorded as thunks that a FakeGraph's launch() replays, as a
    real capture records kernels: every ufunc on device arrays, every launcher (`*_cuda`), the
    device-array methods that write (fill, setitem, copy) and the stand-in's argmax/where. The
    work also runs once, eagerly, to give results their shapes; end_capture() then restores
    every device array that existed before the capture and poisons the ones created during it,
    because a real capture runs nothing. What replays see is what their recorded arguments
    point to at replay time: a value baked into Python at capture shows up as a stale number.
    Device->host reads during a capture raise (and invalidate it), and device allocations
    during a capture must come from the allocator set by cupy.cuda.using_allocator (the
    private pool)."""
    active = False
    invalidated = False
    depth = 0            # > 0 inside a launcher: its inner NumPy work belongs to its thunk
    thunks: list = []
    created: list = []   # device arrays allocated during the capture
    allocator = None     # set by cupy.cuda.using_allocator
    live: list = []      # weak references to every device array created by dev()


REC = _Capture()


def _recording():
    return REC.active and REC.depth == 0


def _plain(x):
    return x.view(np.ndarray) if isinstance(x, DevArr) else x


def _created(a):
    """Register a device array allocated now; during a capture it must use the private pool."""
    if REC.active:
        assert REC.allocator is not None, "device allocation during capture outside a private pool"
        REC.allocator(max(a.nbytes, 1))
        REC.created.append(a)
    REC.live.append(weakref.ref(a))
    return a


def _no_read_in_capture(what):
    if _recording():
        REC.invalidated = True
        raise RuntimeError(f"simulated: {what} (a device->host read) during stream capture")


class DevArr(np.ndarray):
    """A 'device' array: NumPy memory, but is_device_array() says yes."""

    def get(self):
        _no_read_in_capture("get()")
        return np.array(self)

    def set(self, arr, stream=None):
        self[...] = arr

    def __float__(self):
        _no_read_in_capture("float()")
        return float(self.view(np.ndarray))

    def __int__(self):
        _no_read_in_capture("int()")
        return int(self.view(np.ndarray))

    def __getitem__(self, key):
        res = super().__getitem__(key)
        if not isinstance(res, np.ndarray):  # CuPy indexes to 0-d device views, not host scalars
            res = super().__getitem__((key if isinstance(key, tuple) else (key,)) + (Ellipsis,))
        return res

    def __setitem__(self, key, value):
        super().__setitem__(key, _plain(value))  # device to device: no host read
        if _recording():
            me = self.view(np.ndarray)
            REC.thunks.append(lambda: me.__setitem__(key, _plain(value)))

    def fill(self, value):
        super().fill(value)
        if _recording():
            me = self.view(np.ndarray)
            REC.thunks.append(lambda: me.fill(value))

    def copy(self, order="C"):
        res = super().copy(order)
        if _recording():
            _created(res)
            src, dst = self.view(np.ndarray), res.view(np.ndarray)
            REC.thunks.append(lambda: np.copyto(dst, src))
        return res

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        args = tuple(_plain(i) for i in inputs)
        out = kw.get("out")
        if out is not None:
            kw["out"] = tuple(_plain(o) for o in out)
        res = getattr(ufunc, method)(*args, **kw)
        if out is not None:
            result = out[0] if len(out) == 1 else out
        elif isinstance(res, np.ndarray):
            result = res.view(DevArr)
        else:
            result = res  # a scalar (0-d result) or None (ufunc.at), as NumPy gives
        if _recording():
            if out is None and res is not None:
                # CuPy gives 0-d device arrays, never host scalars: the thunk refills this one
                result = _created(dev(np.asarray(res)) if not isinstance(result, DevArr)
                                  else result)
                target = (result.view(np.ndarray),)
                REC.thunks.append(lambda: getattr(ufunc, method)(*args, out=target, **kw))
            else:
                REC.thunks.append(lambda: getattr(ufunc, method)(*args, **kw))
        return result


def dev(a):
    return _created(np.asarray(a).view(DevArr))


def _recorded_function(fn):
    """A cupy-level function (argmax, where): returns a device array; recorded in a capture."""
    def call(*a, **k):
        pa = tuple(_plain(x) for x in a)
        result = dev(np.array(fn(*pa, **k)))
        if _recording():
            dst = result.view(np.ndarray)
            REC.thunks.append(lambda: np.copyto(dst, fn(*pa, **k)))
        return result
    return call


def _flat(res):
    return list(res) if isinstance(res, (tuple, list)) else [res]


def _recorded_launcher(fn):
    """A CUDA launcher: one recorded unit; a replay re-runs it and refreshes what it returned."""
    def launch(*a, **k):
        REC.depth += 1
        try:
            res = fn(*a, **k)
        finally:
            REC.depth -= 1
        if _recording():
            def thunk():
                new = fn(*a, **k)
                for old, now in zip(_flat(res), _flat(new)):
                    if isinstance(old, np.ndarray) and old is not now:
                        np.copyto(old.view(np.ndarray), now)
            REC.thunks.append(thunk)
        return res
    launch.__wrapped__ = fn
    return launch


class FakeGraph:
    launches = 0

    def __init__(self, thunks):
        self.thunks = thunks

    def launch(self, stream=None):
        assert not REC.active
        FakeGraph.launches += 1
        for t in self.thunks:
            t()

    def upload(self, stream=None):
        pass


class FakeStream:
    """cupy.cuda.Stream: a context manager that makes it current, events, and capture."""
    captures = 0
    fail_begin = None    # a message: begin_capture raises it (capture unsupported)
    stack: list = []

    def __init__(self, non_blocking=False, null=False):
        self.null = null

    def __enter__(self):
        FakeStream.stack.append(self)
        return self

    def __exit__(self, *exc):
        FakeStream.stack.pop()

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        assert event.done

    def synchronize(self):
        pass

    def is_capturing(self):
        return REC.active

    def begin_capture(self, mode=None):
        if FakeStream.fail_begin:
            raise RuntimeError(FakeStream.fail_begin)
        assert not self.null, "capture on the legacy default stream is not allowed"
        assert _current_stream() is self, "capturing a stream that is not the current one"
        assert not REC.active
        REC.snapshot = [(a, np.array(a)) for a in (r() for r in REC.live) if a is not None]
        REC.live[:] = [r for r in REC.live if r() is not None]
        REC.thunks, REC.created, REC.invalidated = [], [], False
        REC.active = True

    def end_capture(self):
        assert REC.active
        REC.active = False
        for a, saved in REC.snapshot:   # a real capture ran nothing
            np.copyto(a.view(np.ndarray), saved)
        for a in REC.created:
            p = a.view(np.ndarray)
            p[...] = np.nan if p.dtype.kind == "f" else (True if p.dtype.kind == "b" else -12345)
        REC.snapshot, REC.created = [], []
        if REC.invalidated:
            raise RuntimeError("simulated: stream capture invalidated")
        FakeStream.captures += 1
        return FakeGraph(REC.thunks)


NULL_STREAM = FakeStream(null=True)


def _current_stream():
    return FakeStream.stack[-1] if FakeStream.stack else NULL_STREAM


class FakeMemoryPool:
    def __init__(self):
        self.allocated = 0

    def malloc(self, nbytes):
        self.allocated += nbytes

    def free_all_blocks(self):
        pass


@contextlib.contextmanager
def using_allocator(allocator):
    prev, REC.allocator = REC.allocator, allocator
    try:
        yield
    finally:
        REC.allocator = prev


class Event:
    recorded = 0

    def __init__(self, disable_timing=False):
        self.done = False

    def record(self, stream=None):
        Event.recorded += 1
        self.done = True

    def synchronize(self):
        assert self.done


cupy = types.ModuleType("cupy")
cupy.__version__ = "simulated"
cupy.ndarray = DevArr
for name in ("matmul", "add", "isfinite", "where", "minimum", "argmax", "nan"):
    setattr(cupy, name, getattr(np, name))
cupy.empty = lambda shape, dtype=np.float32: dev(
    np.full(shape, np.nan, dtype) if np.dtype(dtype).kind == "f" else np.empty(shape, dtype))
cupy.zeros = lambda shape, dtype=np.float32: dev(np.zeros(shape, dtype))
cupy.ones = lambda shape, dtype=np.float32: dev(np.ones(shape, dtype))
cupy.asarray = lambda a, dtype=None: dev(np.array(a, dtype=dtype))
cupy.ascontiguousarray = lambda a, dtype=None: dev(np.ascontiguousarray(a, dtype=dtype))
cupy.cuda = types.SimpleNamespace(
    is_available=lambda: True,
    Device=lambda *a: types.SimpleNamespace(id=0, synchronize=lambda: None),
    runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"simulated GPU"}),
    get_current_stream=lambda: None, Event=Event)
# streams, capture and the private pool of the CUDA-graph step (see _Capture)
cupy.cuda.Stream = FakeStream
cupy.cuda.get_current_stream = _current_stream
cupy.cuda.MemoryPool = FakeMemoryPool
cupy.cuda.using_allocator = using_allocator
cupy.argmax, cupy.where = _recorded_function(np.argmax), _recorded_function(np.where)
cupyx = types.ModuleType("cupyx")
cupyx.empty_pinned = lambda shape, dtype=np.float32: np.empty(shape, dtype)
sys.modules["cupy"], sys.modules["cupyx"] = cupy, cupyx

from cllm_gpu.ops import _common  # noqa: E402

_common._cupy = cupy
import importlib  # noqa: E402

# (the package exports functions named like some modules: fetch the modules themselves)
adamw, attention, embedding, gelu, grad_norm, layernorm, softmax_xent = (
    importlib.import_module(f"cllm_gpu.ops.{n}") for n in
    ("adamw", "attention", "embedding", "gelu", "grad_norm", "layernorm", "softmax_xent"))

# The launchers are replaced by the references (same signatures), except where the CUDA
# launcher's contract differs: grad_norm and clip_factor return 0-d device arrays, and AdamW
# takes its grad_scale as a device array.
for mod, names in ((embedding, ("embedding_forward", "embedding_backward")),
                   (layernorm, ("layernorm_forward", "layernorm_backward")),
                   (gelu, ("gelu_forward", "gelu_backward")),
                   (attention, ("attention_forward", "attention_backward")),
                   (softmax_xent, ("softmax_xent",))):
    for n in names:
        setattr(mod, n + "_cuda", getattr(mod, n + "_ref"))
grad_norm.grad_norm_cuda = lambda g: dev(np.array(grad_norm.grad_norm_ref(g), dtype=g.dtype))
grad_norm.clip_factor_cuda = lambda norm, max_norm, eps=grad_norm.CLIP_EPS: dev(
    np.array(grad_norm.clip_factor_ref(norm, max_norm, eps), dtype=norm.dtype))


def _adamw_sim(params, grads, m, v, mask, lr, b1, b2, eps, wd, step, grad_scale=1.0,
               hyper=None):
    gs = float(np.asarray(grad_scale).reshape(-1)[0])
    # hyper: read when the launch runs (at replay, for a captured one), as the kernel does
    adamw.adamw_update_ref(params, grads, m, v, mask, lr, b1, b2, eps, wd, step, gs,
                           hyper=None if hyper is None else np.array(hyper))


adamw.adamw_update_cuda = _adamw_sim

# bf16 storage is the NumPy path's (float32 values) and the products are NumPy's: cuBLAS's
# argument mapping is checked in tests/test_gemm.py, the kernels on a GPU.
cast, gemm, ops_pkg = (importlib.import_module(f"cllm_gpu.{n}") for n in
                       ("ops.cast", "ops.gemm", "ops"))
cast.to_bf16_cuda = cast.to_bf16_ref
cast.bf16_storage_dtype = ops_pkg.bf16_storage_dtype = lambda on_device: np.dtype(np.float32)
gemm.gemm_cuda = gemm.gemm_ref

# every launcher is one recorded unit of a simulated capture (see _Capture)
for _mod in (adamw, attention, embedding, gelu, grad_norm, layernorm, softmax_xent, cast, gemm):
    for _name in [n for n in vars(_mod) if n.endswith("_cuda") and callable(getattr(_mod, n))]:
        setattr(_mod, _name, _recorded_launcher(getattr(_mod, _name)))

from cllm_gpu import GpuTrainer, ModelConfig, TrainConfig  # noqa: E402
from cllm_gpu.data import prepare  # noqa: E402
from cllm_gpu.errors import NonFiniteError  # noqa: E402

CFG = ModelConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16)
lines = []


def trainer(backend, out, data, resume=None, **kw):
    tc = dict(batch_size=3, max_steps=12, eval_interval=6, eval_batches=2, log_interval=5,
              checkpoint_interval=6, dtype="float64", warmup_steps=2)
    tc.update(kw)
    return GpuTrainer(None if resume else CFG, TrainConfig(**tc), data, out, backend=backend,
                      resume=resume, log=lines.append)


def main():
    tmp = Path(tempfile.mkdtemp())
    (tmp / "t.txt").write_text("the simulated device trains like the host. " * 200)
    prepare(tmp / "t.txt", tmp / "tok")
    data = tmp / "tok"
    results = {}

    ref = trainer("numpy", tmp / "np", data).train()
    sim_tr = trainer("cuda", tmp / "sim", data)
    assert sim_tr.backend == "cuda" and any("simulated GPU" in l for l in lines)
    sim = sim_tr.train()
    assert sim["losses"] == ref["losses"], (sim["losses"], ref["losses"])
    assert sim["val_loss"] == ref["val_loss"]
    assert Event.recorded >= 12  # token ids went through the pinned staging path
    recs = [json.loads(l) for l in (tmp / "sim" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 5, 10, 12]
    results["same_losses_as_numpy"] = len(sim["losses"])

    # resume on the device path continues exactly
    part = trainer("cuda", tmp / "part", data).train(max_steps=6)
    rest = trainer("cuda", tmp / "part", data, resume=tmp / "part").train()
    assert part["losses"] + rest["losses"] == ref["losses"]
    results["resume_exact"] = True

    # CUDA graph: one un-captured warm-up step, one capture, replays for every later step, with
    # eval and checkpoints between replays. The simulated capture replays the recorded work, so
    # a value baked in at capture (lr, Adam step, token ids) or a figure read from a buffer a
    # later replay rewrote would change the losses.
    launches0 = FakeGraph.launches
    g_tr = trainer("cuda", tmp / "graph", data, cuda_graph=True)
    g = g_tr.train()
    assert g["losses"] == ref["losses"], (g["losses"], ref["losses"])
    assert g["val_loss"] == ref["val_loss"]
    assert FakeStream.captures == 1 and g_tr._graph.warmups == 1 and g_tr._graph.captures == 1
    assert FakeGraph.launches - launches0 == g_tr._graph.replays == 11
    assert sum("CUDA graph: captured" in l for l in lines) == 1
    a, b = sim_tr.model.state_dict(), g_tr.model.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    results["graph_same_losses_as_numpy"] = g_tr._graph.replays

    # gradient accumulation: the micro-batches' ids are copied into the batch buffers inside
    # the graph; resume in graph mode continues exactly
    ref_k2 = trainer("numpy", tmp / "np_k2", data, grad_accum_steps=2, max_steps=5).train()
    gk_tr = trainer("cuda", tmp / "graph_k2", data, grad_accum_steps=2, max_steps=5,
                    cuda_graph=True)
    assert gk_tr.train()["losses"] == ref_k2["losses"] and gk_tr._graph.replays == 4
    part = trainer("cuda", tmp / "gpart", data, cuda_graph=True).train(max_steps=6)
    rest_tr = trainer("cuda", tmp / "gpart", data, resume=tmp / "gpart", cuda_graph=True)
    assert part["losses"] + rest_tr.train()["losses"] == ref["losses"]
    assert rest_tr._graph.replays == 5
    results["graph_accumulation_and_resume"] = True

    # sampling between steps evicts the training shape's activation cache (new batch buffers):
    # the graph is set up again (a warm-up step, a new capture) instead of replaying stale ones
    runs = []
    for kw in ({}, {"cuda_graph": True}):
        t = trainer("cuda", tmp / f"evict_{len(runs)}", data, **kw)
        first = t.train(max_steps=5)["losses"]
        text = t.sample("the ", 20, temperature=0)
        runs.append((t, first + t.train()["losses"], text))
    (_, plain_losses, plain_text), (t, graph_losses, graph_text) = runs
    assert graph_losses == plain_losses and graph_text == plain_text
    assert t._graph.warmups == 2 and t._graph.captures == 2 and t._graph.replays == 10
    results["graph_rekey_after_eviction"] = True

    # a non-finite step under the graph: skipped on the device and reported, as un-captured
    def poisoned(out, **kw):
        t = trainer("cuda", tmp / out, data, on_nonfinite="skip", **kw)
        w, orig_step = t.model.params["transformer.h.0.mlp.c_fc.weight"], t.train_step

        def step():
            if t.step != 6:
                return orig_step()
            before, keep = t.model.state_dict(), float(w[1, 2])
            w[1, 2] = np.inf      # between replays, as any code may write the arenas
            with np.errstate(all="ignore"):
                r = orig_step()
            w[1, 2] = keep
            after = t.model.state_dict()
            assert all(np.array_equal(before[k], after[k]) for k in before), "applied"
            return r
        t.train_step = step
        return t, t.train()
    n0 = len(lines)
    t_plain, s_plain = poisoned("nan_plain")
    t_graph, s_graph = poisoned("nan_graph", cuda_graph=True)
    assert s_graph["losses"] == s_plain["losses"] and len(s_plain["losses"]) == 11
    assert t_plain.nonfinite_skips == t_graph.nonfinite_skips == 1
    assert t_graph._graph.replays == 11
    assert sum("step 7" in l and "skipped" in l for l in lines[n0:]) == 2
    results["graph_nonfinite_skip"] = True

    # capture fails: one warning, and training goes on un-captured with the same numbers
    for how in ("begin", "sync"):
        n0 = len(lines)
        FakeStream.fail_begin = "stream capture unsupported here (simulated)" \
            if how == "begin" else None
        t = trainer("cuda", tmp / f"gfail_{how}", data, cuda_graph=True)
        if how == "sync":  # a device->host read inside the step: not capturable
            orig_bw = t.model.backward

            def backward(B, T, t=t, orig_bw=orig_bw):
                orig_bw(B, T)
                float(t.model.grads.data.sum())
            t.model.backward = backward
        s = t.train()
        FakeStream.fail_begin = None
        assert s["losses"] == ref["losses"], how
        warn = [l for l in lines[n0:] if "warning" in l and "CUDA graph" in l]
        want = "unsupported here" if how == "begin" else "during stream capture"
        assert len(warn) == 1 and want in warn[0], (how, warn)
        assert not t._graph.active and t._graph.replays == 0
    results["graph_fallback"] = True

    # bf16 mixed precision: the device path's casts, bf16 caches and weight copies give the
    # NumPy bf16 run's losses exactly
    ref16 = trainer("numpy", tmp / "np16", data, dtype="float32", precision="bf16").train()
    sim16 = trainer("cuda", tmp / "sim16", data, dtype="float32", precision="bf16").train()
    assert sim16["losses"] == ref16["losses"], (sim16["losses"], ref16["losses"])
    assert ref16["losses"] != trainer("numpy", tmp / "np32", data, dtype="float32").train()["losses"]
    results["bf16_same_losses_as_numpy"] = len(sim16["losses"])
    # the graph captures the bf16 weight refresh (params_updated) with the rest of the step
    g16 = trainer("cuda", tmp / "graph16", data, dtype="float32", precision="bf16",
                  cuda_graph=True)
    assert g16.train()["losses"] == ref16["losses"] and g16._graph.replays == 11
    results["graph_bf16"] = True

    # a non-finite step on the device path: update skipped on the device, found at the next
    # log point, named with its step and first bad parameter
    for policy in ("skip", "stop"):
        t = trainer("cuda", tmp / f"nan_{policy}", data, on_nonfinite=policy,
                    max_nonfinite_skips=3)
        orig = t.model.forward

        def forward(idx, tgt=None, dloss=None, t=t, orig=orig):
            s = orig(idx, tgt, dloss)
            if t.step == 6 and tgt is not None:  # the 7th step (the counter moves first)
                t.model.grads["transformer.h.0.mlp.c_fc.weight"][1, 2] = np.inf
            return s
        t.model.forward = forward
        before = {}
        orig_step = t.train_step

        def step(t=t, orig_step=orig_step):
            if t.step == 6:
                before.update(t.model.state_dict())
            r = orig_step()
            if t.step == 7:
                after = t.model.state_dict()
                assert all(np.array_equal(before[k], after[k]) for k in before), "applied"
            return r
        t.train_step = step
        if policy == "skip":
            s = t.train()
            assert s["step"] == 12 and t.nonfinite_skips == 1
            assert any("step 7" in l and "h.0.mlp.c_fc.weight" in l and "skipped" in l
                       for l in lines)
        else:
            try:
                t.train()
                raise AssertionError("no NonFiniteError")
            except NonFiniteError as e:
                assert "step 7" in str(e) and "h.0.mlp.c_fc.weight" in str(e), str(e)
        results[f"nonfinite_{policy}"] = True
    print(json.dumps(results))


if __name__ == "__main__":
    main()
