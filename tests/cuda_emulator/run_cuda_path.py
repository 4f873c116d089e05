"""The CUDA backend's Python code path (GpuTrainer, the CUDA-graph step) on the fake CuPy in
reference-launchers mode (fake_graph.py): every launcher is its NumPy reference, so a run on
the "device" must give the NumPy run's losses bit for bit, and a captured step replayed from
the recorded work must give the un-captured step's. The kernels themselves are checked by
run_emulated.py on the emulated kernels.

    python tests/cuda_emulator/run_cuda_path.py [SCENARIO ...]

Prints one JSON line {scenario: "ok" | "FAIL: ..."}; tests/test_cuda_path_emulated.py runs it
once and has one test per scenario. Installs a fake `cupy`: run it in a process of its own.
"""
import contextlib
import json
import sys
import tempfile
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

from cuda_emulator import fake_cupy, fake_graph  # noqa: E402

cp = fake_cupy.install(launchers="reference")

import numpy as np  # noqa: E402

from cllm_gpu import CLLMModel, GpuTrainer, ModelConfig, TrainConfig  # noqa: E402
from cllm_gpu.data import prepare  # noqa: E402
from cllm_gpu.errors import NonFiniteError  # noqa: E402

CFG = ModelConfig(vocab_size=257, block_size=16, n_layer=2, n_head=2, n_embd=16)  # bytes + end-of-text
# head dim 16: the bf16 model's qkv in bf16 (a tensor-core attention reads it), so its bias is
# filled in by the device path, captured and replayed
CFG_MMA = ModelConfig(vocab_size=257, block_size=16, n_layer=2, n_head=2, n_embd=32)
TMP = Path(tempfile.mkdtemp())
LINES: list = []


def data():
    d = TMP / "tok"
    if not (d / "meta.json").exists():
        (TMP / "t.txt").write_text("the simulated device trains like the host. " * 200)
        prepare(TMP / "t.txt", d)
    return d


def trainer(backend, out, resume=None, cfg=None, final_sample=None, **kw):
    tc = dict(batch_size=3, max_steps=12, eval_interval=6, eval_batches=2, log_interval=5,
              checkpoint_interval=6, dtype="float64", warmup_steps=2)
    tc.update(kw)
    n = 0
    while resume is None and (TMP / out).exists():  # a scenario run twice (mutants): fresh dir
        n += 1
        out = f"{out.rsplit('~', 1)[0]}~{n}"
    return GpuTrainer(None if resume else cfg or CFG, TrainConfig(**tc), data(), TMP / out,
                      backend=backend, resume=TMP / resume if resume else None,
                      log=LINES.append, final_sample=final_sample)


_REF = {}


def reference(**kw):
    """The NumPy run with these settings (cached)."""
    key = repr(sorted(kw.items()))
    if key not in _REF:
        _REF[key] = trainer("numpy", f"np_{len(_REF)}", **kw).train()
    return _REF[key]


def graph_run_in_two_halves(out):
    """The losses of a 12-step CUDA-graph run in `out` stopped after 6 steps and resumed, each
    half replaying its capture 5 times (a fallback to the un-captured step would give the
    same losses)."""
    part = trainer("cuda", out, cuda_graph=True)
    first = part.train(max_steps=6)["losses"]
    rest = trainer("cuda", out, resume=out, cuda_graph=True)
    losses = first + rest.train()["losses"]
    assert part._graph.replays == 5 and rest._graph.replays == 5
    return losses


def same_state(a, b):
    for name in ("params", "adam_m", "adam_v"):
        x, y = (np.asarray(getattr(t.model, name).data.get()) for t in (a, b))
        assert x.tobytes() == y.tobytes(), f"{name} differs"


# ---------------------------------------------------------------- scenarios
def device_path_equals_numpy():
    """Deferred figure reads, pinned staging of ids, the step buffer: the NumPy run's losses,
    validation loss and metrics, bit for bit."""
    ref = reference()
    t = trainer("cuda", "dev")
    assert t.backend == "cuda" and any("emulator" in line for line in LINES)
    s = t.train()
    assert s["losses"] == ref["losses"] and s["val_loss"] == ref["val_loss"]
    recs = [json.loads(line) for line in (TMP / "dev" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 5, 10, 12]


def resume_is_exact():
    part = trainer("cuda", "part").train(max_steps=6)
    rest = trainer("cuda", "part", resume="part").train()
    assert part["losses"] + rest["losses"] == reference()["losses"]


def graph_replays_equal_numpy():
    """One un-captured warm-up step, one capture, a replay for every later step, with eval and
    checkpoints between replays: a value frozen at capture (lr, Adam step, ids, dloss) or a
    figure read from a buffer a later replay rewrote would change the losses."""
    ref = reference()
    launches0 = fake_graph.CAPTURE.launches
    t = trainer("cuda", "graph", cuda_graph=True)
    s = t.train()
    g = t._graph
    assert s["losses"] == ref["losses"] and s["val_loss"] == ref["val_loss"]
    assert g.warmups == 1 and g.captures == 1 and g.replays == 11
    assert fake_graph.CAPTURE.launches - launches0 == 11
    plain = trainer("cuda", "graph_plain")
    plain.train()
    same_state(t, plain)


def graph_accumulation_and_resume():
    ref_k2 = reference(grad_accum_steps=2, max_steps=5)
    t = trainer("cuda", "graph_k2", grad_accum_steps=2, max_steps=5, cuda_graph=True)
    assert t.train()["losses"] == ref_k2["losses"] and t._graph.replays == 4
    assert graph_run_in_two_halves("gpart") == reference()["losses"]


def graph_replays_across_ignored_counts():
    """Batches with different numbers of ignored targets replay one capture (the loss weight
    is read from the step buffer, not frozen into the graph)."""
    def with_ignored(t):
        get_batch, rng = t.data.get_batch, np.random.default_rng(4)

        def batch(split, B, T, r):
            idx, tgt = get_batch(split, B, T, r)
            tgt = tgt.copy()
            if split == "train":
                tgt.reshape(-1)[rng.choice(tgt.size, size=int(rng.integers(0, tgt.size // 2)),
                                           replace=False)] = -1
            return idx, tgt
        t.data.get_batch = batch
        return t
    a = with_ignored(trainer("numpy", "ign_np")).train()
    t = with_ignored(trainer("cuda", "ign_graph", cuda_graph=True))
    s = t.train()
    # the captured path first: an un-captured fallback would give the NumPy losses regardless
    assert t._graph.captures == 1 and t._graph.replays == 11, "not replayed"
    assert s["losses"] == a["losses"], "losses differ"


def graph_rekey_after_eviction():
    """Sampling between steps evicts the training shape's activation cache (new batch
    buffers): the graph is set up again (a warm-up step, a new capture), not replayed stale."""
    runs = []
    for kw in ({}, {"cuda_graph": True}):
        t = trainer("cuda", f"evict_{len(runs)}", **kw)
        first = t.train(max_steps=5)["losses"]
        text = t.sample("the ", 20, temperature=0)
        runs.append((t, first + t.train()["losses"], text))
    (_, plain_losses, plain_text), (t, graph_losses, graph_text) = runs
    assert graph_losses == plain_losses and graph_text == plain_text
    assert t._graph.warmups == 2 and t._graph.captures == 2 and t._graph.replays == 10


def graph_kept_through_eval_and_logits_at_other_shapes():
    """A library caller's evaluation at another shape, then logits, between CUDA-graph steps:
    the model keeps the last backward's cache (the training shape) and drops the evaluation's
    for the logits', so the graph replays on (one warm-up, one capture), and the losses, eval
    losses and logits are the un-captured run's bit for bit. Before, the oldest cache went,
    the training one: a warm-up step and a second capture after it."""
    runs = []
    ids = (np.arange(16).reshape(2, 8) * 7) % CFG.vocab_size
    for kw in ({}, {"cuda_graph": True}):
        t = trainer("cuda", f"keep_{len(runs)}", **kw)
        first = t.train(max_steps=5)["losses"]
        s, n = t.model.eval_loss_sum(ids, ids[:, ::-1])
        logits = t.model.logits(ids[:1, :5])
        runs.append((t, first + t.train()["losses"], float(s), logits.tobytes()))
    (_, *plain), (t, *graph) = runs
    assert graph == plain, "not the un-captured run's losses, eval loss or logits"
    assert (t._graph.warmups, t._graph.captures, t._graph.replays) == (1, 1, 11), \
        (t._graph.warmups, t._graph.captures, t._graph.replays)


def _poisoned(out, **kw):
    """Step 7 made non-finite through a parameter written between steps (restored after); the
    update must not be applied."""
    t = trainer("cuda", out, on_nonfinite="skip", **kw)
    w, orig_step = t.model.params["transformer.h.0.mlp.c_fc.weight"], t.train_step

    def step():
        if t.step != 6:
            return orig_step()
        before, keep = t.model.state_dict(), float(w[1, 2])
        w[1, 2] = np.inf
        with np.errstate(all="ignore"):
            orig_step()
        w[1, 2] = keep
        after = t.model.state_dict()
        assert all(np.array_equal(before[k], after[k]) for k in before), "update applied"
    t.train_step = step
    return t, t.train()


def graph_nonfinite_step_skipped():
    n0 = len(LINES)
    t_plain, s_plain = _poisoned("nan_plain")
    t_graph, s_graph = _poisoned("nan_graph", cuda_graph=True)
    assert s_graph["losses"] == s_plain["losses"] and len(s_plain["losses"]) == 11
    assert s_graph["step"] == s_plain["step"] == 12   # the bad step still counts
    assert t_plain.nonfinite_skips == t_graph.nonfinite_skips == 1
    assert t_graph._graph.replays == 11
    assert sum("step 7" in line and "skipped" in line for line in LINES[n0:]) == 2


def graph_capture_failure_falls_back():
    """Capture unsupported, or a device->host read inside the step: one warning each, and
    training goes on un-captured with the same numbers."""
    ref = reference()
    for how in ("begin", "sync"):
        n0 = len(LINES)
        fake_graph.Stream.fail_begin = "stream capture unsupported here (fake)" \
            if how == "begin" else None
        t = trainer("cuda", f"gfail_{how}", cuda_graph=True)
        if how == "sync":
            orig_bw = t.model.backward

            def backward(B, T, t=t, orig_bw=orig_bw):
                orig_bw(B, T)
                float(t.model.grads.data.sum())
            t.model.backward = backward
        try:
            s = t.train()
        finally:
            fake_graph.Stream.fail_begin = None
        assert s["losses"] == ref["losses"], how
        warn = [line for line in LINES[n0:] if "warning" in line and "CUDA graph" in line]
        want = "unsupported here" if how == "begin" else "during stream capture"
        assert len(warn) == 1 and want in warn[0], (how, warn)
        assert not t._graph.active and t._graph.replays == 0


def bf16_device_path_equals_numpy():
    """precision="bf16": casts, bf16 caches and the weight copy on the device path give the
    NumPy bf16 run's losses exactly, captured or not; head dims 8 (a float qkv) and 16 (a
    bf16 qkv, its bias filled in by the device path before c_attn's GEMM adds to it)."""
    for cfg in (CFG, CFG_MMA):
        ref16 = reference(dtype="float32", precision="bf16", cfg=cfg)
        assert ref16["losses"] != reference(dtype="float32", cfg=cfg)["losses"]
        assert trainer("cuda", "dev16", dtype="float32", precision="bf16",
                       cfg=cfg).train()["losses"] == ref16["losses"]
        g = trainer("cuda", "graph16", dtype="float32", precision="bf16", cuda_graph=True,
                    cfg=cfg)
        assert g.train()["losses"] == ref16["losses"] and g._graph.replays == 11


def nonfinite_policy_on_the_device():
    """A non-finite gradient on the device path: the update is skipped on the device, found at
    the next log point and named with its step and first bad parameter (skip), or the run
    stops with a checkpoint (stop)."""
    for policy in ("skip", "stop"):
        t = trainer("cuda", f"nan_{policy}", on_nonfinite=policy, max_nonfinite_skips=3)
        orig = t.model.backward

        def backward(B, T, t=t, orig=orig):
            orig(B, T)
            if t.step == 6:  # inside the 7th step (the counter moves after it)
                t.model.grads["transformer.h.0.mlp.c_fc.weight"][1, 2] = np.inf
        t.model.backward = backward
        if policy == "skip":
            s = t.train()
            assert s["step"] == 12 and t.nonfinite_skips == 1 and len(s["losses"]) == 11
            assert any("step 7" in line and "h.0.mlp.c_fc.weight" in line and "skipped" in line
                       for line in LINES)
        else:
            try:
                t.train()
                raise AssertionError("no NonFiniteError")
            except NonFiniteError as e:
                assert "step 7" in str(e) and "h.0.mlp.c_fc.weight" in str(e), str(e)


def dropout_device_path_and_graph_equal_numpy():
    """Dropout (embedding, residual branches): the device path and the captured graph draw the
    NumPy run's masks, step after step (the step that keys them is read from the step buffer
    at each replay); resume stays exact; K = 2 micro-batches get distinct masks."""
    global CFG
    plain = reference()["losses"]
    saved, CFG = CFG, ModelConfig(**{**CFG.to_dict(), "dropout": 0.2})
    try:
        ref = trainer("numpy", "drop_np").train()
        assert ref["losses"] != plain
        assert trainer("cuda", "drop_dev").train()["losses"] == ref["losses"]
        g = trainer("cuda", "drop_graph", cuda_graph=True)
        assert g.train()["losses"] == ref["losses"] and g._graph.replays == 11
        assert graph_run_in_two_halves("drop_part") == ref["losses"]
        k2 = trainer("numpy", "drop_k2_np", grad_accum_steps=2, max_steps=4).train()
        g2 = trainer("cuda", "drop_k2_graph", grad_accum_steps=2, max_steps=4, cuda_graph=True)
        assert g2.train()["losses"] == k2["losses"] and g2._graph.replays == 3
    finally:
        CFG = saved


def frozen_loss_weight_is_caught():
    """A mutant of the old design: the loss weight 1 / valid targets passed by value (a host
    float frozen into the captured launch) instead of through the step buffer. The scenario
    with varying ignored counts must fail on it."""
    from cllm_gpu import train_step
    orig_set, orig_step = train_step.StepValues.set_inputs, train_step.training_step
    frozen = {}

    def set_inputs(self, tc, lr, step, n_valid):
        frozen["dloss"] = 1.0 / max(n_valid, 1)
        return orig_set(self, tc, lr, step, n_valid)

    def step_with_host_dloss(model, micro_batches, tc, sv):
        classifier = model.classifier
        model.classifier = lambda B, T, dloss=None: classifier(B, T, dloss=frozen["dloss"])
        try:
            orig_step(model, micro_batches, tc, sv)
        finally:
            model.classifier = classifier
    train_step.StepValues.set_inputs = set_inputs
    cuda_graph = __import__("cllm_gpu.cuda_graph", fromlist=["training_step"])
    cuda_graph.training_step = step_with_host_dloss
    try:
        graph_replays_across_ignored_counts()
    except AssertionError as e:
        if str(e) == "losses differ":   # caught by the numbers, with the step replayed
            return
        raise
    finally:
        train_step.StepValues.set_inputs, cuda_graph.training_step = orig_set, orig_step
    raise AssertionError("a loss weight frozen into the graph was not caught")


def wide_rows_rejected_at_construction():
    """The CUDA LayerNorm backward holds a row in registers (at most 4096 float32 or 2048
    float64 channels): a wider model fails when it is built, with one line naming n_embd, not
    at its first backward."""
    from cllm_gpu.errors import ConfigError
    for n_embd, dtype in ((4096 + 64, "float32"), (2048 + 64, "float64")):
        cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=1, n_embd=n_embd)
        try:
            CLLMModel(cfg, backend="cuda", dtype=dtype)
        except ConfigError as e:
            assert str(e).startswith(f"n_embd {n_embd} on the GPU"), e
        else:
            raise AssertionError(f"n_embd {n_embd} {dtype} was accepted")


def wide_rows_refused_before_overwrite():
    """A trainer refused for n_embd on the GPU leaves the run in --out as it was: the check ran
    in CLLMModel, after --overwrite had deleted the old run's checkpoints and metrics.jsonl (a
    run directory of ['ckpt-00000002', 'metrics.jsonl'] was left empty)."""
    from cllm_gpu.errors import ConfigError
    t = trainer("cuda", "overwritten", max_steps=2, eval_interval=0)
    t.train()
    before = sorted(p.name for p in t.out_dir.iterdir())
    assert "ckpt-00000002" in before and "metrics.jsonl" in before, before
    wide = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=1, n_embd=2048 + 64)
    try:
        GpuTrainer(wide, TrainConfig(batch_size=1, max_steps=2, eval_interval=0,
                                     dtype="float64"), data(), t.out_dir, backend="cuda",
                   log=LINES.append, overwrite=True)
    except ConfigError as e:
        assert str(e).startswith("n_embd 2112 on the GPU"), e
    else:
        raise AssertionError("n_embd 2112 float64 accepted on the GPU")
    after = sorted(p.name for p in t.out_dir.iterdir())
    assert after == before, (before, after)


def nccl_data_parallel_at_world_size_1():
    """tests/gpu/test_data_parallel_cuda.py's world-size-1 checks on the fake NCCL (CuPy 14's
    cupy.cuda.nccl: the unique id is bytes, NcclCommunicator refuses anything else; every
    collective a copy): NCCLComm set up as the GPU test does, then the data-parallel step
    (plain, ZeRO-1, no overlap with small buckets) bitwise the single-device step. The TCP
    store is replaced by its one-rank result (the fake has no cupyx.distributed;
    tests/test_distributed.py runs the real store)."""
    sys.path.insert(0, str(TESTS / "gpu"))
    from cllm_gpu import distributed
    import test_data_parallel_cuda as t_dp
    orig = distributed.tcp_store_exchange
    distributed.tcp_store_exchange = lambda launch, key, value, timeout: value
    try:
        comm = distributed.NCCLComm(distributed.Launch(0, 1, 0, 1, "torchrun-style",
                                                       "127.0.0.1", 29500))
    finally:
        distributed.tcp_store_exchange = orig
    for dp_args in ({}, {"zero": 1}, {"overlap": False, "bucket_mb": 0.05},
                    {"zero": 1, "bucket_mb": 0.05}):
        t_dp.test_nccl_step_at_world_size_1_is_the_single_gpu_step_bitwise(comm, dp_args)


def nccl_unavailable_is_a_config_error():
    """A CUDA launch of two ranks where CuPy has no NCCL (its nccl.available False: no NCCL
    wheel): `connect` fails at once with one ConfigError naming the wheel, before any unique id
    is exchanged (nothing to wait on for the other rank), and registers no communicator."""
    from cllm_gpu import distributed
    from cllm_gpu.errors import ConfigError
    nccl = cp.cuda.nccl
    exchanged = []
    orig_exchange = distributed.exchange_unique_id
    distributed.exchange_unique_id = lambda *a, **k: exchanged.append(a)
    nccl.available = False
    active = list(distributed._ACTIVE)
    try:
        distributed.connect(distributed.Launch(0, 2, 0, 1, "torchrun-style", "127.0.0.1", 29500),
                            "cuda")
    except ConfigError as e:
        assert str(e).startswith("NCCL is not available to CuPy: install the NCCL wheel"), e
    else:
        raise AssertionError("a CUDA launch without NCCL was accepted")
    finally:
        nccl.available = True
        distributed.exchange_unique_id = orig_exchange
    assert exchanged == [] and distributed._ACTIVE == active, (exchanged, distributed._ACTIVE)


def mfu_against_the_gpus_peak():
    """The run summary's MFU on a GPU of known peak (the fake device named as an H100 SXM
    board; every other scenario's name is no GPU's, so no MFU): the model's FLOPs per token at
    the run's T times tokens/s over the data sheet's dense peak of the step's kind (fp32 for
    float64 or float32 without TF32, tf32 with CUPY_TF32=1, bf16 for precision="bf16"), in
    the result and in the summary line."""
    import os
    rt = cp.cuda.runtime
    own = rt.getDeviceProperties
    rt.getDeviceProperties = lambda device: {**own(device), "name": b"NVIDIA H100 80GB HBM3"}
    tf32 = os.environ.pop("CUPY_TF32", None)
    try:
        for kw, env, kind, peak in (({}, None, "fp32", 67.0),
                                    ({"dtype": "float32"}, "1", "tf32", 494.7),
                                    ({"dtype": "float32", "precision": "bf16"}, None, "bf16",
                                     989.4)):
            if env:
                os.environ["CUPY_TF32"] = env
            LINES.clear()
            t = trainer("cuda", "mfu", max_steps=3, **kw)
            s = t.train()
            os.environ.pop("CUPY_TF32", None)
            assert s["mfu_peak"] == f"{kind} {peak:g} TFLOP/s", s["mfu_peak"]
            want = CFG.flops_per_token(t.T) * s["tokens_per_s"] / (peak * 1e12)
            assert abs(s["mfu"] - want) <= 1e-12 * want, (s["mfu"], want)
            line = next(x for x in LINES if x.startswith("summary:"))
            assert f"MFU {100 * want:.1f}% of {kind} {peak:g} TFLOP/s" in line, line
    finally:
        rt.getDeviceProperties = own
        os.environ.pop("CUPY_TF32", None)
        if tf32 is not None:
            os.environ["CUPY_TF32"] = tf32


@contextlib.contextmanager
def _device_memory(pool_of, mem_get_info=None):
    """The fake CuPy with `pool_of` as its get_default_memory_pool (and `mem_get_info` as the
    runtime's cudaMemGetInfo, which the fake does not have), both as they were after."""
    rt, before = cp.cuda.runtime, getattr(cp, "get_default_memory_pool", None)
    cp.get_default_memory_pool = pool_of
    if mem_get_info is not None:
        rt.memGetInfo = mem_get_info
    try:
        yield
    finally:
        if mem_get_info is not None:
            del rt.memGetInfo
        if before is None:
            del cp.get_default_memory_pool
        else:
            cp.get_default_memory_pool = before


def model_too_large_for_the_device_memory():
    """The size check before a model's layout on the GPU (backend.available_memory: the
    device's free memory, cudaMemGetInfo, plus what CuPy's pool holds unused): refused with
    the GPU's message when the parameter state needs more (5 float32 arenas and the bf16
    weight copy in the device's storage per parameter), built when it needs exactly that much. Without
    memGetInfo (the fake's own runtime) no check is made."""
    from cllm_gpu.errors import ModelTooLargeError
    from cllm_gpu.model import arena_length
    from cllm_gpu.ops import bf16_storage_dtype
    # (the device's bf16 storage: uint16 on a GPU, the host's tagged float32 in this fake's
    # reference-launchers mode)
    need = arena_length(CFG) * (5 * 4 + np.dtype(bf16_storage_dtype(True)).itemsize)
    device_free, pool_free = need - 1000, 999

    class Pool:
        def free_bytes(self):
            return pool_free
    with _device_memory(Pool, lambda: (device_free, 10 * need)):
        try:
            CLLMModel(CFG, backend="cuda", dtype="float32", precision="bf16")
        except ModelTooLargeError as e:
            assert "GPU memory is free" in str(e) and "bf16 weight copy" in str(e), e
        else:
            raise AssertionError(f"{need} bytes needed, {need - 1} free: the model was built")
        pool_free = 1000
        CLLMModel(CFG, backend="cuda", dtype="float32", precision="bf16")


def _step_one_allocations(t):
    """(bytes the activation cache took, bytes of everything else) in t's first training step,
    each allocation rounded as CuPy's pool rounds it."""
    from cllm_gpu.model import POOL_ROUND
    with fake_graph.AllocationTrace() as trace:
        t.train_step()
    pooled = [(-(-b["bytes"] // POOL_ROUND) * POOL_ROUND, b["site"]) for b in trace.blocks]
    cache = sum(n for n, site in pooled if any(f.endswith(" _cache_for") for f in site))
    return cache, sum(n for n, _ in pooled) - cache


def activation_cache_estimate_is_exact():
    """model.activation_cache_bytes (arithmetic on the config, B, T and the dtypes) equals what
    the first training step allocates for the activation cache, pool-rounded, on the device
    path at several shapes and precisions (fp32 float64, fp32 float32, bf16 with the float and
    with the bf16 attention inputs, odd B and T), with and without dropout (a float model
    without it has no dbranch buffer: branch_grad_buffered). (The step's other allocations
    here are the reference launchers' NumPy temporaries; the CUDA launchers' are measured by
    capture_memory.py.)"""
    from cllm_gpu.model import activation_cache_bytes
    from cllm_gpu.ops import bf16_storage_dtype
    drop, drop_mma = (ModelConfig(**{**c.to_dict(), "dropout": 0.2}) for c in (CFG, CFG_MMA))
    for n, (cfg, kw) in enumerate([
            (CFG, dict(batch_size=3, dtype="float64")),
            (CFG, dict(batch_size=5, seq_len=11, dtype="float32")),
            (CFG, dict(batch_size=2, dtype="float32", precision="bf16")),
            (CFG_MMA, dict(batch_size=3, seq_len=13, dtype="float32", precision="bf16")),
            (drop, dict(batch_size=3, seq_len=13, dtype="float32")),
            (drop_mma, dict(batch_size=2, dtype="float32", precision="bf16"))]):
        t = trainer("cuda", f"cache_est_{n}", cfg=cfg, **kw)
        mm = bf16_storage_dtype(True) if kw.get("precision") == "bf16" else np.dtype(kw["dtype"])
        want = activation_cache_bytes(cfg, kw["batch_size"], t.T, np.dtype(kw["dtype"]), mm, True)
        cache, _ = _step_one_allocations(t)
        assert cache == want, (cfg, kw, cache, want)


def memory_test_on_the_fake_pool():
    """tests/gpu/test_memory_cuda.py's first-step check at its small configs (fp32 head dim 32,
    bf16 head dims 64 and 8) on the fake CuPy with a default pool counting its live
    allocations: the cache set_batch makes is exactly activation_cache_bytes, the parameter
    state parameter_state_bytes plus the arenas' rounding, the step's peak beyond them within
    GPU_WORKSPACE_MARGIN (the fake has no cudaMemGetInfo: the device-wide figure is the GPU's
    alone); and the forward-only cache of logits / last_logits exactly inference_cache_bytes.
    GPT-2 124M runs on the GPU only."""
    sys.path.insert(0, str(TESTS / "gpu"))
    import test_memory_cuda as t_mem
    pool, allocated = fake_graph.LivePool(), fake_graph.allocated

    def counted(a, nbytes):
        pool.add(a, nbytes)
        allocated(a, nbytes)
    fake_graph.allocated = counted
    try:
        with _device_memory(lambda: pool):
            for case in t_mem.SMALL:
                t_mem.test_first_step_memory_is_what_the_check_counts(case)
                t_mem.test_the_inference_cache_is_what_the_check_counts(case)
    finally:
        fake_graph.allocated = allocated


def _peak_held(blocks, counted):
    """The most bytes of `counted` blocks (AllocationTrace's, pool-rounded) held at once."""
    from cllm_gpu.model import POOL_ROUND
    held = peak = 0
    events = []
    for i, b in enumerate(blocks):
        if counted(b):
            n = -(-b["bytes"] // POOL_ROUND) * POOL_ROUND
            events.append((i, 1, n))   # the i-th allocation
            if b["freed"] is not None:  # released before the freed-th allocation
                events.append((b["freed"], 0, -n))
    for _, _, n in sorted(events):  # at one index the releases come first
        held += n
        peak = max(peak, held)
    return peak


def sample_holds_one_inference_cache():
    """The end-of-run sample after a tiny training batch (1 x 4 tokens): its contexts grow by
    a token per draw, each a new (1, t) forward-only cache; at most one is held at a time, so the
    sample's peak is the forward-only cache of its longest context (16, the block size), as
    inference_cache_bytes counts it. Before, the previous draw's cache was kept beside the
    next (the model keeps two shapes): the peak was two caches (GPT-2 124M fp32 at 1,024
    tokens: 1.6 GiB where check_training_fits' batch-1 cache and margin were 1.05 GiB); until
    2026-12-03 each was a full training cache. The sampled text is the NumPy run's (seeded)."""
    from cllm_gpu.model import inference_cache_bytes
    kw = dict(batch_size=1, seq_len=4, max_steps=2, eval_interval=0)
    t = trainer("cuda", "sample_mem", **kw)
    t.train()
    with fake_graph.AllocationTrace() as trace:
        text = t.sample("the ", 20, temperature=0.8, seed=3)
    want = trainer("numpy", "sample_mem_np", **kw)
    want.train()
    assert text == want.sample("the ", 20, temperature=0.8, seed=3), "not the NumPy sample"
    peak = _peak_held(trace.blocks, lambda b: any(f.endswith(" _cache_for") for f in b["site"]))
    f64 = np.dtype(np.float64)
    longest = inference_cache_bytes(CFG, 1, CFG.block_size, f64, f64, True)
    assert peak == longest, (peak, longest, inference_cache_bytes(CFG, 1, 15, f64, f64, True))


def inference_cache_estimate_is_exact():
    """model.inference_cache_bytes equals what logits and last_logits allocate for their
    forward-only cache on the device path (pool-rounded), at several shapes, precisions and
    forward variants (dropout, alibi and lattice without wpe, the bf16 attention inputs and a
    float att with its bf16 copy); the cache holds one block's buffers for every block; and
    the logits equal, bit for bit, those of the forward into the training cache (which
    logits / last_logits used before 2026-12-03) and the NumPy model's."""
    from cllm_gpu.model import InferenceCache, inference_cache_bytes
    cases = [(CFG, "float64", "fp32", {}), (CFG, "float32", "fp32", {"dropout": 0.2}),
             (CFG, "float32", "bf16", {}), (CFG_MMA, "float32", "bf16", {"dropout": 0.2}),
             (CFG, "float32", "fp32", {"attn_bias": "alibi", "pos_emb": "none"}),
             (CFG_MMA, "float32", "bf16", {"attn_bias": "lattice", "pos_emb": "none"})]
    for base, dtype, precision, over in cases:
        cfg = ModelConfig(**{**base.to_dict(), **over})
        dev, host = (CLLMModel(cfg, backend=b, dtype=dtype, precision=precision, seed=1)
                     for b in ("cuda", "numpy"))
        for m in (dev, host):  # weights scaled up: logits that differ between tokens
            m.load_state_dict({k: v * 20 if v.ndim == 2 else v
                               for k, v in m.state_dict().items()})
        ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(3, 11))
        for B, T, call in ((1, 16, "last_logits"), (3, 11, "logits")):
            idx = ids[:B, :T] if T <= 11 else np.resize(ids, (B, T))
            with fake_graph.AllocationTrace() as trace:
                got = getattr(dev, call)(idx)
            cache = sum(-(-b["bytes"] // 512) * 512 for b in trace.blocks
                        if any(f.endswith(" _cache_for") for f in b["site"]))
            want = inference_cache_bytes(cfg, B, T, np.dtype(dtype), dev.mm_dtype, True)
            assert cache == want, (cfg, precision, B, T, cache, want)
            c = dev._caches[("inference", B, T)]
            assert isinstance(c, InferenceCache) and all(a is c.layers[0] for a in c.layers)
            np.testing.assert_array_equal(got, getattr(host, call)(idx))
            # the forward into the training cache of the shape
            dev.set_batch(dev.check_batch(idx))
            dev.forward(B, T)
            lnf = dev._cache(B, T).lnf
            rows = cp.ascontiguousarray(lnf[:, -1]) if call == "last_logits" else \
                lnf.reshape(B * T, -1)
            np.testing.assert_array_equal(got.reshape(rows.shape[0], -1),
                                          dev._to_host(dev._logits_of(rows)))


class _DeviceOutOfMemory(MemoryError):
    """The fake device's out-of-memory (CuPy's OutOfMemoryError is a MemoryError too)."""


def final_sample_past_the_device_memory():
    """A device with room for a training step of 1 x 2 tokens but not for the end-of-run
    sample's longest context (the prompt "the " and 20 tokens: 16, the block size; 1 x 4
    until the sample's cache was forward-only, 2026-12-03, which made it smaller): refused
    by GpuTrainer at set-up naming --sample-tokens, with the most that fits; that many
    sample within the memory. Before, the check counted the training cache only: it passed,
    training ran, and the sample ran out of memory after the whole run. The fake device
    holds `free` bytes (live allocations, pool-rounded: fake_graph.LivePool, whose cached
    blocks and the device's remainder are what the check reads); the workspace margin is
    64 KiB here, as the fake's step and sample need beyond the state and the cache (35 and
    25 KiB, measured), where the GPU's 256 MiB would hide this config's 98 KiB."""
    from cllm_gpu import model as model_mod
    from cllm_gpu.errors import ModelTooLargeError
    from cllm_gpu.model import activation_cache_bytes, inference_cache_bytes, parameter_state_bytes
    f64 = np.dtype(np.float64)
    margin, prompt = 64 << 10, "the "   # 4 byte tokens
    state = parameter_state_bytes(CFG, f64, "fp32", True)
    # the training cache of 1 x 2 tokens is the sample cache of an 11-token context
    train = activation_cache_bytes(CFG, 1, 2, f64, f64, True)
    assert train == inference_cache_bytes(CFG, 1, 11, f64, f64, True) \
        < inference_cache_bytes(CFG, 1, 12, f64, f64, True), train
    free = state + train + margin
    kw = dict(batch_size=1, seq_len=2, max_steps=2, eval_interval=0)
    pool, allocated = fake_graph.LivePool(), fake_graph.allocated

    def counted(a, nbytes):
        pool.add(a, nbytes)
        if pool.used > free:
            raise _DeviceOutOfMemory(f"{pool.used:,} bytes live, {free:,} on the device")
        allocated(a, nbytes)

    def final_sample(tokens):
        return dict(prompt=prompt, tokens=tokens, temperature=0.8, top_k=40)
    own_margin, model_mod.GPU_WORKSPACE_MARGIN = model_mod.GPU_WORKSPACE_MARGIN, margin
    fake_graph.allocated = counted
    try:
        # the device's free memory: what the pool has not taken (cudaMemGetInfo's)
        with _device_memory(lambda: pool, lambda: (free - pool.total, 10 * free)):
            try:
                t = trainer("cuda", "sample_oom", final_sample=final_sample(20), **kw)
            except ModelTooLargeError as e:
                msg = str(e)
            else:
                t.train()
                try:
                    t.sample(prompt, 20)
                except _DeviceOutOfMemory as e:
                    raise AssertionError(f"the check passed, training ran, the sample ran out "
                                         f"of memory: {e}") from None
                raise AssertionError("the check passed and the sample fitted: a wrong setup")
            assert msg.startswith("the end-of-run sample does not fit: --sample-tokens 20 "
                                  "after a 4-token prompt reads up to 16 tokens"), msg
            assert "--sample-tokens 0 to skip the sample" in msg and "\n" not in msg, msg
            assert "use --sample-tokens 8 or less" in msg, msg  # 4 + 8 - 1 = 11 tokens
            t = trainer("cuda", "sample_fits", final_sample=final_sample(8), **kw)
            t.train()
            text = t.sample(prompt, 8)
    finally:
        fake_graph.allocated = allocated
        model_mod.GPU_WORKSPACE_MARGIN = own_margin
    assert text.startswith(prompt) and pool.total <= free, (text, pool.total, free)


def final_sample_after_the_cuda_graph():
    """The end-of-run sample of a --cuda-graph run (captured, replayed) on the fake device of
    final_sample_past_the_device_memory, with the most --sample-tokens the check passes: it
    samples within the memory, its peak no higher than the un-captured run's (which holds a
    few KiB more: the reference launchers' caches), and the run trains on after it with the
    plain run's losses (the graph set up again: a warm-up step, a new capture). Before, the
    graph (its private pool, the batch buffers it was captured on, here also the training
    cache its recorded work holds, where a GPU graph holds pointers into it) stayed through
    the sample, beside the sample's cache: 762,368 bytes live on a device of 761,856."""
    from cllm_gpu import model as model_mod
    from cllm_gpu.model import activation_cache_bytes, parameter_state_bytes
    f64 = np.dtype(np.float64)
    # a margin that holds the captured step: the fake graph keeps every temporary of the
    # reference launchers (155 KiB here; a GPU graph's pool, 16.5 KiB per micro-batch at
    # GPT-2 124M: capture_memory.py)
    margin, prompt = 192 << 10, "the "
    free = (parameter_state_bytes(CFG, f64, "fp32", True)
            + activation_cache_bytes(CFG, 1, 2, f64, f64, True) + margin)
    kw = dict(batch_size=1, seq_len=2, max_steps=3, eval_interval=0, checkpoint_interval=0)
    final_sample = dict(prompt=prompt, tokens=8, temperature=0.8, top_k=40)
    allocated, n0 = fake_graph.allocated, len(LINES)
    own_margin, model_mod.GPU_WORKSPACE_MARGIN = model_mod.GPU_WORKSPACE_MARGIN, margin
    runs = {}
    try:
        for graph in (False, True):
            pool, sampling = fake_graph.LivePool(), []   # sampling: [the most live bytes at a malloc]

            def counted(a, nbytes, pool=pool, sampling=sampling):
                pool.add(a, nbytes)
                if sampling:
                    sampling[0] = max(sampling[0], pool.used)
                if pool.used > free:
                    raise _DeviceOutOfMemory(f"{pool.used:,} bytes live, {free:,} on the "
                                             f"device")
                allocated(a, nbytes)
            fake_graph.allocated = counted
            with _device_memory(lambda pool=pool: pool,
                                lambda pool=pool: (free - pool.total, 10 * free)):
                t = trainer("cuda", f"graph_sample_{graph}", final_sample=final_sample,
                            cuda_graph=graph, **kw)
                first = t.train()["losses"]
                sampling.append(0)
                try:
                    text = t.sample(prompt, 8, seed=5)
                except _DeviceOutOfMemory as e:
                    raise AssertionError(f"cuda_graph={graph}: the check passed, the sample "
                                         f"ran out of memory: {e}") from None
                peak = sampling.pop()
                rest = t.train(max_steps=6)["losses"]
            runs[graph] = (first + rest, text, peak, t._graph)
    finally:
        fake_graph.allocated = allocated
        model_mod.GPU_WORKSPACE_MARGIN = own_margin
    (plain_losses, plain_text, plain_peak, _), (losses, text, peak, g) = runs[False], runs[True]
    assert peak <= plain_peak <= free, (peak, plain_peak, free)
    assert text == plain_text and losses == plain_losses, "not the plain run's"
    # 3 steps, a sample, 3 steps: each time a warm-up, a capture (launched) and a replay
    assert (g.warmups, g.captures, g.replays) == (2, 2, 4), (g.warmups, g.captures, g.replays)
    assert not [line for line in LINES[n0:] if "warning" in line], LINES[n0:]


def batch_too_large_for_the_device_memory():
    """A model that fits with a batch whose activation cache does not: refused by GpuTrainer in
    one line naming --batch-size and --grad-accum-steps with the numbers, before the run
    directory exists (before: the size check passed and step 1 allocated the cache past the
    free memory: an OOM on a GPU); with exactly enough memory free, the run trains."""
    from cllm_gpu.errors import ModelTooLargeError
    from cllm_gpu.model import (GPU_WORKSPACE_MARGIN, activation_cache_bytes,
                                parameter_state_bytes)
    B, T = 6, CFG.block_size
    state = parameter_state_bytes(CFG, np.float64, "fp32", True)
    cache = activation_cache_bytes(CFG, B, T, np.dtype(np.float64), np.dtype(np.float64), True)
    free = [state + cache + GPU_WORKSPACE_MARGIN - 1]

    class Pool:
        def free_bytes(self):
            return 0
    with _device_memory(Pool, lambda: (free[0], 10 * free[0])):
        out = TMP / "too_big_batch"
        try:
            trainer("cuda", "too_big_batch", batch_size=B, grad_accum_steps=2)
        except ModelTooLargeError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith(f"--batch-size {B} at {T} tokens"), msg
            assert "GPU memory is free" in msg and "--grad-accum-steps" in msg, msg
            assert not out.exists(), "the run directory was made before the refusal"
        else:
            raise AssertionError(f"{free[0]} bytes free, {free[0] + 1} needed: not refused")
        # the advice: the largest batch that fits, and the accumulation keeping the batch
        smaller = activation_cache_bytes(CFG, 5, T, np.dtype(np.float64),
                                         np.dtype(np.float64), True)
        assert smaller < cache and "--batch-size 5 or less and --grad-accum-steps 3" in msg, msg
        free[0] += 1
        t = trainer("cuda", "fits_batch", batch_size=B, grad_accum_steps=2, max_steps=1)
        got, _ = _step_one_allocations(t)
        assert got == cache, (got, cache)


def graph_setup_failure_falls_back():
    """The CUDA graph's set-up itself failing (StepGraph's constructor: the non-blocking stream,
    the step's buffers): one warning naming the error, and training un-captured with the NumPy
    run's losses."""
    from cllm_gpu import cuda_graph
    own = cuda_graph.StepGraph

    def broken(*args, **kwargs):
        raise RuntimeError("no stream for the graph (fake)")
    cuda_graph.StepGraph = broken
    try:
        n0 = len(LINES)
        t = trainer("cuda", "gsetup", cuda_graph=True)
        s = t.train()
    finally:
        cuda_graph.StepGraph = own
    assert t._graph is None and s["losses"] == reference()["losses"]
    warn = [line for line in LINES[n0:] if "CUDA graph" in line]
    assert warn == ["warning: CUDA graph set-up failed (RuntimeError: no stream for the graph "
                    "(fake)); continuing without a CUDA graph"], warn


def graph_step_refuses_mixed_micro_batches():
    """StepGraph.step with micro-batches of two shapes, or one without targets: a DataError
    before any device work (the step counters unchanged)."""
    from cllm_gpu.errors import DataError
    t = trainer("cuda", "gmixed", cuda_graph=True)
    m, g = t.model, t._graph
    ids = np.zeros((3, 8), dtype=np.int64)
    whole = m.check_batch(ids, ids)
    for bad, what in ((m.check_batch(ids[:, :4], ids[:, :4]), "shape (3, 8)"),
                      (m.check_batch(ids), "needs targets")):
        try:
            g.step([whole, bad], 1e-3, 1, 48)
        except DataError as e:
            assert what in str(e), e
        else:
            raise AssertionError(f"mixed micro-batches accepted ({what})")
    assert (g.captures, g.replays, g.warmups) == (0, 0, 0)


def graph_second_signal_mid_step():
    """A second Ctrl-C (a KeyboardInterrupt out of train()) in a step of the CUDA graph, as
    docs/reliability.md describes it for the Python API. In step 2's capture (work recorded,
    none run) or in a replayed step's data draw (before the graph's launch) the step never
    happened: train() again goes on exactly (it refused, the trainer marked torn: a step with
    a graph counted as begun from its start, and a capture's recorded update as begun). After
    the launch the parameters moved, and train() refuses."""
    from cllm_gpu.errors import CLLMError
    # where: (steps before the interrupted one, the method patched, graph launches by then:
    # step 2's capture launches once, step 3 replays, step 4's launch only past its draw)
    cases = {"capture": (1, "adamw_update", 0), "draw": (3, "get_batch", 2),
             "launch": (3, "outputs", 3)}
    for where, (before, method, launched) in cases.items():
        t = trainer("cuda", f"gsig_{where}", cuda_graph=True)
        first = t.train(max_steps=before)["losses"]
        owner = {"adamw_update": t.model, "get_batch": t.data, "outputs": t.step_values}[method]
        real = getattr(owner, method)

        def interrupted(*args, **kwargs):
            if t.step == before and (method != "get_batch" or args[0] == "train"):
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        setattr(owner, method, interrupted)
        try:
            t.train()
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError(f"no interrupt ({where})")
        setattr(owner, method, real)
        assert t.step == before and t._graph.replays == launched, (where, t.step,
                                                                   t._graph.replays)
        if where != "launch":
            assert first + t.train()["losses"] == reference()["losses"], where
            continue
        try:
            t.train()
        except CLLMError as e:
            assert "step 4 was interrupted" in str(e), e
        else:
            raise AssertionError("train() went on after an interrupt past the graph's launch")

SCENARIOS = {f.__name__: f for f in (
    device_path_equals_numpy, resume_is_exact, graph_replays_equal_numpy,
    graph_accumulation_and_resume, graph_replays_across_ignored_counts,
    graph_rekey_after_eviction, graph_kept_through_eval_and_logits_at_other_shapes,
    graph_nonfinite_step_skipped, graph_capture_failure_falls_back,
    bf16_device_path_equals_numpy, nonfinite_policy_on_the_device,
    dropout_device_path_and_graph_equal_numpy, frozen_loss_weight_is_caught,
    wide_rows_rejected_at_construction, wide_rows_refused_before_overwrite,
    nccl_data_parallel_at_world_size_1, nccl_unavailable_is_a_config_error,
    mfu_against_the_gpus_peak, model_too_large_for_the_device_memory,
    activation_cache_estimate_is_exact, inference_cache_estimate_is_exact,
    memory_test_on_the_fake_pool,
    batch_too_large_for_the_device_memory, sample_holds_one_inference_cache,
    final_sample_past_the_device_memory, final_sample_after_the_cuda_graph,
    graph_setup_failure_falls_back,
    graph_step_refuses_mixed_micro_batches, graph_second_signal_mid_step)}


def main(names):
    results = {}
    for name in names or SCENARIOS:
        try:
            SCENARIOS[name]()
            results[name] = "ok"
        except Exception as e:
            tb = traceback.format_exc().strip().splitlines()
            results[name] = f"FAIL: {type(e).__name__}: {str(e)[:400]} | " + " / ".join(tb[-4:])
    print(json.dumps(results))
    return 0 if all(v == "ok" for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
