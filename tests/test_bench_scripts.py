"""The benchmark scripts' measuring code, on the CPU: that each side of a comparison is timed
doing the same work (scripts/bench.py, scripts/bench_kernels.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

# Skipped test by test, not with a module-level importorskip: a module skipped while it is
# collected has no test report, so tests/conftest.py's ci_required guard never saw it (without
# torch, CI with torch in CLLM_CI_REQUIRE passed with this whole file skipped).
try:
    import torch
    _NO_TORCH = None
except ModuleNotFoundError as e:
    torch, _NO_TORCH = None, f"could not import 'torch': {e}"
pytestmark = [pytest.mark.ci_required("torch"),
              pytest.mark.skipif(torch is None, reason=str(_NO_TORCH))]


def test_sdpa_cases_do_not_accumulate_gradients():
    """PyTorch's forward + backward is timed returning its gradients, as ours writes dqkv: with
    `.backward()` every call after the first adds its gradients into q.grad, k.grad and v.grad
    (three elementwise passes timed on PyTorch's side only)."""
    from torch.profiler import ProfilerActivity, profile

    import bench_kernels
    cases, fields, errors = bench_kernels.sdpa_cases("cpu", 1, 32, 2, 16)
    assert set(cases) == {"sdpa_fp32"} and not errors, (cases, errors)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            cases["sdpa_fp32"]()
    ops = {e.name for e in prof.events()}
    assert "aten::scaled_dot_product_attention" in ops
    assert "aten::add_" not in ops, "gradients accumulated between timed calls"


def test_sdpa_backend_is_the_one_torch_ran():
    """Each SDPA figure names the backend torch dispatched to (read off the profiler), so a
    ratio against "SDPA" says against which kernels: here the math backend forced, and
    torch's own choice on the CPU."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import bench_kernels
    q = torch.randn(1, 2, 32, 16)

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert bench_kernels.sdpa_backend(math) == "math"
    _, fields, _ = bench_kernels.sdpa_cases("cpu", 1, 32, 2, 16)
    assert fields["sdpa_fp32_backend"] in bench_kernels.SDPA_BACKEND_OPS.values(), fields
    assert fields["torch_version"] == torch.__version__


def test_attention_rows_interleave_ours_and_sdpa_for_every_rep(monkeypatch, tmp_path):
    """The attention records time --reps calls of each of ours and SDPA's, one call at a time,
    interleaved (each rep runs every case once), so a drift of clocks or temperature hits both
    sides of a ratio; every record names the SDPA backend it was compared with. Before, SDPA
    ran max(3, reps // 4) calls, all before ours."""
    import json

    import torch.nn.functional as F

    import bench_kernels
    from cllm_gpu import ops
    calls = []
    real_bwd, real_sdpa = ops.attention_backward, F.scaled_dot_product_attention

    def bwd(*a, precision="fp32", slopes=None, **kw):
        calls.append(("ours", precision, slopes is None))
        return real_bwd(*a, precision=precision, slopes=slopes, **kw)

    def sdpa(*a, **kw):
        calls.append(("sdpa",))
        return real_sdpa(*a, **kw)

    monkeypatch.setattr(ops, "attention_backward", bwd)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    reps = 6
    out = tmp_path / "kernels.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--device", "cpu", "--size", "tiny",
                                      "--reps", str(reps), "--out", str(out)])
    bench_kernels.main()
    timed = calls[-5 * reps:]  # 4 of ours (fp32, bf16; with and without the bias) and SDPA
    rounds = [timed[i:i + 5] for i in range(0, len(timed), 5)]
    assert all(len(set(r)) == 5 and ("sdpa",) in r for r in rounds), rounds
    assert calls.count(("sdpa",)) == reps + 2  # a warm-up and the backend's call first
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    att = [r for r in recs if r["op"].startswith("attention_fwd_bwd")]
    assert len(att) == 4 and all(
        "error" not in r and r["reps"] == reps and r["ms"] > 0 and r["sdpa_fp32_ms"] > 0
        and r["sdpa_fp32_backend"] in bench_kernels.SDPA_BACKEND_OPS.values() for r in att), att


def test_attention_rows_without_torch_time_ours_alone(monkeypatch, tmp_path):
    """Where torch cannot be imported (a venv with the dev extra only, as the GPU session's dry
    run on the stand-in uses), bench_kernels without --no-torch still writes every attention
    record, ours timed and no SDPA figure. Before, sdpa_cases returned its errors as a dict
    there and attention_rows' `+=` of a list raised TypeError after the other records."""
    import json

    import bench_kernels
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    out = tmp_path / "kernels.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--device", "cpu", "--size", "tiny",
                                      "--reps", "2", "--out", str(out)])
    bench_kernels.main()
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    att = [r for r in recs if r["op"].startswith("attention_fwd_bwd")]
    assert len(att) == 4 and all(
        "error" not in r and r["ms"] > 0 and not any(k.startswith("sdpa") for k in r)
        for r in att), att


def test_bandwidth_arrays_are_sized_above_the_l2(monkeypatch, tmp_path):
    """A bandwidth test whose arrays fit in the L2 reads them from there on every rep after the
    first and can beat the copy's DRAM rate (LayerNorm at GPT-2's 16K x 768 rows is 50 MB, an
    H200's L2). The copy and LayerNorm arrays are raised to at least L2_MULTIPLE x the L2 the
    device reports, and each bandwidth record says how many L2s its arrays are. Here on the
    NumPy path with a 1 MiB L2 reported (at 64 KiB, rounding the rows up to a multiple of
    1024 alone cleared 4 x the L2, and a count without L2_MULTIPLE passed)."""
    import json

    import bench_kernels
    l2 = 1 << 20
    monkeypatch.setattr(bench_kernels, "device_l2_bytes", lambda xp: l2)
    out = tmp_path / "kernels.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--device", "cpu", "--size", "tiny",
                                      "--reps", "1", "--no-torch", "--out", str(out)])
    bench_kernels.main()
    recs = {r["op"]: r for r in map(json.loads, out.read_text().splitlines())}
    multiple = bench_kernels.L2_MULTIPLE
    assert recs["copy"]["bytes"] >= multiple * l2, recs["copy"]
    for op in ("layernorm_forward", "layernorm_backward"):
        rows, cols = recs[op]["shape"]
        assert rows * cols * 4 >= multiple * l2 and recs[op]["array_of_l2"] >= multiple, recs[op]
    for op in ("copy", "softmax_xent", "adamw", "layernorm_forward"):
        assert recs[op]["l2_bytes"] == l2 and "error" not in recs[op], recs[op]


def test_bias_fill_record_times_the_word_fill_against_the_plain_copy(monkeypatch, tmp_path):
    """bench_kernels times c_attn's bias fill (ops/linear.py fill_rows) beside the plain
    broadcast copy it replaced, at the arena's alignment, and says whether their bits agree
    (the GPU session's report fails the stage when they do not). Here on the NumPy path."""
    import json

    import bench_kernels
    out = tmp_path / "kernels.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--device", "cpu", "--size", "tiny",
                                      "--reps", "1", "--no-torch", "--out", str(out)])
    bench_kernels.main()
    fill = [r for r in map(json.loads, out.read_text().splitlines()) if r["op"] == "bias_fill"]
    assert len(fill) == 1 and "error" not in fill[0], fill
    assert fill[0]["same_bits_as_elementwise"] is True and fill[0]["ms"] > 0, fill
    assert fill[0]["elementwise_ms"] > 0 and fill[0]["of_copy_bw"] > 0, fill


def test_kernel_records_name_the_gpu(tmp_path):
    """Every bench_kernels.py record names the GPU it ran on (`gpu`, beside "device": "cuda"),
    as bench.py's lines do: a kernels_call2.jsonl committed under docs/results/ is read on its
    own (docs/gpu.md: "the device and driver are in every record"); before h33c its records
    said only "cuda". Run on the stand-in GPU (the CUDA emulator), at the tiny size."""
    import json
    import os
    import subprocess
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root / "tests" / "gpu_standin"), str(root / "scripts"), str(root)]))
    out = tmp_path / "kernels.jsonl"
    r = subprocess.run([sys.executable, str(root / "scripts" / "bench_kernels.py"), "--device",
                        "cuda", "--size", "tiny", "--reps", "1", "--no-torch", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    name = subprocess.run(
        [sys.executable, "-c", "import cupy; n = cupy.cuda.runtime.getDeviceProperties(0)"
         "['name']; print(n.decode() if isinstance(n, bytes) else n)"],
        capture_output=True, text=True, env=env, check=True).stdout.strip()
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) >= 5 and name
    assert {(rec["device"], rec.get("gpu")) for rec in recs} == {("cuda", name)}, recs[0]


def test_torch_runner_uploads_batches_without_a_sync(monkeypatch):
    """On CUDA, PyTorch's batch goes to the device from pinned memory by a non-blocking copy,
    as ours does (model.HostStaging): a copy from pageable memory waits for the GPU to finish
    the previous step, a sync per step charged to PyTorch's side only. Run on the CPU with the
    runner told it is on CUDA and the device copy recorded instead of made."""
    import numpy as np

    import bench
    from cllm_gpu import ModelConfig
    kw, B = bench.CONFIGS["micro"]
    cfg = ModelConfig(**kw)
    runner = bench.TorchRunner(cfg, B, "cpu", False, "fp32")
    runner.device = "cuda"
    pinned, copies = [], []

    def pin_memory(self):
        pinned.append(self)
        return self

    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args[:1] == ("cuda",) or kwargs.get("device") == "cuda":
            copies.append((any(self is p for p in pinned), kwargs.get("non_blocking", False)))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch, "as_tensor", lambda a, device=None, **kw: (
        copies.append((False, False)) or torch.from_numpy(np.asarray(a))))
    x, y = bench.make_batches(cfg, B, 1)[0]
    runner.step(x, y)
    assert copies == [(True, True), (True, True)], copies
    assert np.isfinite(float(runner.loss.detach()))


def test_bf16_attention_benchmark_times_the_models_storage(monkeypatch, tmp_path):
    """The bf16 attention row times what the bf16 model runs and SDPA's bf16 does: O and dqkv
    in bf16 storage. With a float O the forward writes twice the bytes and the backward adds a
    pass rounding O into a temporary; with a float dqkv the kernels write twice the bytes."""
    import bench_kernels
    from cllm_gpu import ops
    seen = []
    real_fwd, real_bwd = ops.attention_forward, ops.attention_backward

    def fwd(qkv, H, out=None, *args, precision="fp32", **kw):
        if precision == "bf16":
            seen.append(("out", out is not None and ops.is_bf16(out)))
        return real_fwd(qkv, H, out, *args, precision=precision, **kw)

    def bwd(dout, qkv, out, lse, H, dqkv=None, *args, precision="fp32", **kw):
        if precision == "bf16":
            seen.append(("O read", ops.is_bf16(out)))
            seen.append(("dqkv", dqkv is not None and ops.is_bf16(dqkv)))
        return real_bwd(dout, qkv, out, lse, H, dqkv, *args, precision=precision, **kw)

    monkeypatch.setattr(ops, "attention_forward", fwd)
    monkeypatch.setattr(ops, "attention_backward", bwd)
    out = tmp_path / "kernels.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--device", "cpu", "--size", "tiny",
                                      "--reps", "1", "--no-torch", "--out", str(out)])
    bench_kernels.main()
    assert ops.attention_bf16_inputs(bench_kernels.SIZES["tiny"]["attention"][0][3])
    assert seen and all(ok for _, ok in seen), sorted(set(seen))
    import json
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    bf16 = [r for r in recs if r["op"].startswith("attention_fwd_bwd_bf16")]
    assert len(bf16) == 2 and all("error" not in r and r["ms"] > 0 for r in bf16), bf16


def test_bf16_gemm_benchmark_writes_bf16_like_torch(monkeypatch, tmp_path):
    """The bf16 GEMM set beside torch.matmul's bf16 (which writes a bf16 C) writes a bf16 C
    too: an fp32 C is twice the output bytes, at K = 768 a large part of the GEMM's time."""
    import json

    import bench_kernels
    from cllm_gpu import ops
    seen = []
    real = ops.gemm

    def gemm(a, b, out=None, *args, **kw):
        seen.append((ops.is_bf16(a), out is not None and ops.is_bf16(out)))
        return real(a, b, out, *args, **kw)

    monkeypatch.setattr(ops, "gemm", gemm)
    out = tmp_path / "kernels.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--device", "cpu", "--size", "tiny",
                                      "--reps", "1", "--no-torch", "--out", str(out)])
    bench_kernels.main()
    assert (True, True) in seen, sorted(set(seen))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    g = [r for r in recs if r["op"] == "gemm"]
    assert g and all("error" not in r and r["bf16_ms"] > 0 for r in g), g


def test_runners_are_built_after_the_memory_caches_are_released(monkeypatch):
    """Each side's device memory is what its allocator reserved (CuPy's pool total, PyTorch's
    max_memory_reserved), and both allocators keep freed blocks: a previous configuration's
    model, or the eager PyTorch model measured before torch.compile's. So the caches are handed
    back before every configuration's runners and before the torch.compile runner. Recorded
    with stand-in runners and allocators (the order of events), since there is no GPU here."""
    import types

    import bench
    from cllm_gpu import ModelConfig
    events = []

    class Pool:
        def free_all_blocks(self):
            events.append("cupy release")

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        get_default_memory_pool=Pool))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("torch release"))

    class Runner:
        def __init__(self, name):
            events.append(name)

        def step(self, x, y):
            pass

        def sync(self):
            pass

        def extra(self):
            return {}

    monkeypatch.setattr(bench, "OursRunner", lambda *a: Runner("ours"))
    monkeypatch.setattr(bench, "TorchRunner", lambda cfg, B, device, compile_, precision, *mode: Runner(
        "torch_compile" if compile_ else "torch_eager"))
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    monkeypatch.setattr(bench, "emit", lambda line, out: None)
    kw, B = bench.CONFIGS["micro"]
    args = types.SimpleNamespace(warmup=1, steps=2, rounds=1, precision="bf16", tf32=False,
                                 cuda_graph=False, torch_compile=True, out=None,
                                 torch_compile_mode="default")
    bench.measure_config(ModelConfig(**kw), B, args, "cuda", "stand-in GPU", True, {})
    release = ["cupy release", "torch release"]
    assert events == [*release, "ours", "torch_eager", *release, "torch_compile"], events


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_torch_compile_in_a_cuda_graph_mode_beside_our_cuda_graph(mode, monkeypatch):
    """--torch-compile-mode reduce-overhead (or max-autotune, which also replays CUDA graphs)
    compiles PyTorch's model with Inductor's code in CUDA graphs (the like of our --cuda-graph
    step, where eager PyTorch was the only other side), marks every training step's start for
    the graphs (max-autotune was left unmarked), and its line names the mode.
    torch.compile recorded instead of run (no GPU, and a cold Inductor compile takes minutes)."""
    import types

    import bench
    from cllm_gpu import ModelConfig
    compiled, marks, lines = [], [], []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    monkeypatch.setattr(bench, "emit", lambda line, out: lines.append(line))
    kw, B = bench.CONFIGS["micro"]
    args = types.SimpleNamespace(warmup=1, steps=2, rounds=1, precision="fp32", tf32=False,
                                 cuda_graph=False, torch_compile=True, out=None,
                                 torch_compile_mode=mode)
    bench.measure_config(ModelConfig(**kw), B, args, "cpu", "cpu", True, {})
    assert compiled == [{"mode": mode}], compiled
    assert len(marks) == 1 + args.warmup + args.steps, marks  # the compile's step, then each
    comp = lines[-1]
    assert comp["variant"] == "torch_compile" and comp["torch_compile_mode"] == mode
    assert comp["torch_compile"]["ms_per_step"] > 0 and "ratio_vs_torch_compile" in comp, comp


@pytest.mark.parametrize("mode,probed", [("default", True), ("max-autotune-no-cudagraphs", True),
                                         ("reduce-overhead", False), ("max-autotune", False)])
def test_torch_compile_line_names_the_sdpa_backend_except_in_cuda_graph_modes(mode, probed,
                                                                               monkeypatch):
    """torch.compile's line names its attention's SDPA backend, read off its first warm-up
    step, in the modes without CUDA graphs; in reduce-overhead and max-autotune the first
    steps after the compile record the graphs, and a profiled one is not read. torch.compile
    recorded instead of run, as above."""
    import types

    import bench
    from cllm_gpu import ModelConfig
    lines = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    monkeypatch.setattr(bench, "emit", lambda line, out: lines.append(line))
    kw, B = bench.CONFIGS["micro"]
    args = types.SimpleNamespace(warmup=1, steps=1, rounds=1, precision="fp32", tf32=False,
                                 cuda_graph=False, torch_compile=True, out=None,
                                 torch_compile_mode=mode)
    bench.measure_config(ModelConfig(**kw), B, args, "cpu", "cpu", True, {})
    comp = lines[-1]
    assert comp["variant"] == "torch_compile", comp
    assert ("sdpa_backend" in comp["torch_compile"]) == probed, comp["torch_compile"]


_VARIANTS_DRIVER = r'''
import json, sys
sys.argv = ["bench_kernels.py", "--device", "cuda", sys.argv[1], "--size", "tiny", "--reps", "1",
            "--no-torch"]
import bench_kernels
from cllm_gpu import ops
timing, seen = [False], set()
real_alternating = bench_kernels.time_alternating
def alternating(*a, **kw):
    timing[0] = True
    try:
        return real_alternating(*a, **kw)
    finally:
        timing[0] = False
bench_kernels.time_alternating = alternating
real_fwd, real_bwd = ops.attention_forward, ops.attention_backward
def fwd(qkv, H, out=None, *a, **kw):
    if timing[0]:
        seen.add(("out", out is not None and ops.is_bf16(out)))
    return real_fwd(qkv, H, out, *a, **kw)
def bwd(dout, qkv, out, lse, H, dqkv=None, *a, **kw):
    if timing[0]:
        seen.add(("O read", ops.is_bf16(out)))
        seen.add(("dqkv", dqkv is not None and ops.is_bf16(dqkv)))
    return real_bwd(dout, qkv, out, lse, H, dqkv, *a, **kw)
ops.attention_forward, ops.attention_backward = fwd, bwd
bench_kernels.main()
print("SEEN " + json.dumps(sorted(seen)))
'''


@pytest.mark.parametrize("flag", ["--attn-fwd-variants", "--attn-bwd-variants"])
def test_attention_variants_are_timed_in_the_models_storage(flag, tmp_path):
    """The variants' A/B times what the bf16 model runs: O and dqkv in bf16. With float ones
    every timed backward added a pass rounding O, both wrote twice the bytes, and atomic-dq
    wrote dQ straight into the float dqkv, skipping the fp32 scratch and the cast into the bf16
    dqkv that the model's step pays. Run on the stand-in GPU (the CUDA emulator), recording
    the storage of every attention call made while timing."""
    import os
    import subprocess
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root / "tests" / "gpu_standin"), str(root / "scripts"), str(root)]))
    driver = tmp_path / "driver.py"
    driver.write_text(_VARIANTS_DRIVER)
    r = subprocess.run([sys.executable, str(driver), flag], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [line for line in r.stdout.splitlines() if line.startswith("SEEN ")]
    import json
    seen = {tuple(x) for x in json.loads(seen[-1][5:])}
    assert seen == {("out", True), ("O read", True), ("dqkv", True)}, seen


def test_bench_line_figures_from_the_timed_rounds(monkeypatch):
    """scripts/bench.py's numbers on a scripted clock: ms_per_step is the median over the
    rounds of the timed steps only (warm-up excluded; each round's time includes the closing
    sync, since the steps run asynchronously), tokens/s counts B x T tokens per step, the
    ratio is PyTorch's ms over ours, and MFU is flops_per_token x tokens/s over the data-sheet
    peak of the precision measured (NVIDIA H200: bf16 989.4, TF32 494.7, fp32 67 TFLOP/s
    dense)."""
    import types

    import bench
    from cllm_gpu import ModelConfig
    clock = [0.0]
    # ms of each batch's step, by batch index: 2 warm-up steps, then two steps per round
    cost = {"cllm": [500.0, 500.0, 10.0, 10.0, 20.0, 20.0, 60.0, 60.0],
            "torch_eager": [500.0, 500.0] + [40.0] * 6}

    class Runner:   # a step queues its work; sync waits for it, as on a GPU
        def __init__(self, name):
            self.name, self.pending = name, 0.0

        def step(self, x, y):
            self.pending += cost[self.name][x] / 1e3

        def sync(self):
            clock[0] += self.pending
            self.pending = 0.0

        def extra(self):
            return {}

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        get_default_memory_pool=lambda: types.SimpleNamespace(free_all_blocks=lambda: None)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "OursRunner", lambda *a: Runner("cllm"))
    monkeypatch.setattr(bench, "TorchRunner", lambda *a: Runner("torch_eager"))
    monkeypatch.setattr(bench, "make_batches", lambda cfg, B, n: [(i, i) for i in range(n)])
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0],
                                                             sleep=lambda s: None))
    lines = []
    monkeypatch.setattr(bench, "emit", lambda line, out: lines.append(line))
    cfg = ModelConfig(**bench.CONFIGS["gpt2-124m"][0])
    # nanoGPT's estimate_mfu count for GPT-2 124M (vocab 50304): 6 N + 12 L C T, N without wpe
    assert cfg.flops_per_token(1024) == 6 * 123_689_472 + 12 * 12 * 768 * 1024 == 855_383_040
    B = 16
    for precision, tf32, peak in (("bf16", False, 989.4), ("fp32", True, 494.7),
                                  ("fp32", False, 67.0)):
        lines.clear()
        args = types.SimpleNamespace(warmup=2, steps=6, rounds=3, precision=precision, tf32=tf32,
                                     cuda_graph=False, torch_compile=False, out=None)
        bench.measure_config(cfg, B, args, "cuda", "NVIDIA H200", True, {})
        line, = lines
        ours = line["cllm"]
        assert ours["ms_per_step_rounds"] == [10.0, 20.0, 60.0]
        assert ours["ms_per_step"] == pytest.approx(20.0)   # the median, not the mean 30
        assert ours["tokens_per_s"] == pytest.approx(16 * 1024 / 0.020)
        assert line["ratio_vs_torch_eager"] == pytest.approx(2.0)
        assert ours["mfu"] == pytest.approx(855_383_040 * 16 * 1024 / 0.020 / (peak * 1e12))
        assert line["torch_eager"]["mfu"] == pytest.approx(ours["mfu"] / 2)
        assert f"{peak} TFLOP/s" in line["mfu_peak"], line["mfu_peak"]


def test_kernel_benchmark_figures_count_every_byte_and_flop(monkeypatch, tmp_path):
    """scripts/bench_kernels.py's bandwidth records count the bytes each op reads and writes
    (copy: read + write; softmax_xent: logits read, dlogits written in place; AdamW: p, g, m, v
    and the mask read, p, m, v written; LayerNorm forward: x read, out written; backward: dy, x
    read, dx written), float32 throughout, and a GEMM 2 M K N FLOPs: on a timer that says every
    call took 2 ms, bytes_per_s x 2 ms is that count."""
    import json

    import bench_kernels
    t = 2e-3

    def timer(fn, reps):
        fn()
        return t
    monkeypatch.setattr(bench_kernels, "Timer", lambda xp: timer)
    monkeypatch.setattr(bench_kernels, "device_l2_bytes", lambda xp: None)
    out = tmp_path / "kernels.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--device", "cpu", "--size", "tiny",
                                      "--reps", "1", "--no-torch", "--out", str(out)])
    bench_kernels.main()
    recs = {}
    for r in map(json.loads, out.read_text().splitlines()):
        recs.setdefault(r["op"], r)
    size = bench_kernels.SIZES["tiny"]
    (n, v), p, (rows, cols) = size["xent"], size["adamw"], size["ln"]
    want = {"copy": 2 * size["copy"], "softmax_xent": 2 * 4 * n * v, "adamw": 8 * 4 * p,
            "layernorm_forward": 2 * 4 * rows * cols, "layernorm_backward": 3 * 4 * rows * cols}
    for op, nbytes in want.items():
        assert "error" not in recs[op], recs[op]
        assert recs[op]["bytes_per_s"] * t == pytest.approx(nbytes), (op, recs[op])
        assert recs[op].get("of_copy_bw", 1.0) == pytest.approx(
            nbytes / want["copy"]), (op, recs[op])
    m, k, n_out = recs["gemm"]["shape"]
    assert recs["gemm"]["bf16_flop_per_s"] * t == pytest.approx(2 * m * k * n_out), recs["gemm"]


def test_interleaved_timings_are_medians(monkeypatch):
    """bench_kernels' per-case figures are the median over the reps (one slow rep, a clock
    change or another tenant, must not move them), with the minimum beside it; FLOP/s over
    the median."""
    import bench_kernels
    calls = {"a": iter([1.0, 2.0, 9.0]), "b": iter([3.0, 4.0, 4.5])}
    cases = {k: (k, lambda fn: next(calls[fn])) for k in calls}
    assert bench_kernels.time_interleaved(cases, 3, {}) == {"a": (2.0, 1.0), "b": (4.0, 3.0)}
    assert bench_kernels.timing_fields({"fwd": [1.0, 2.0, 9.0]}, {"fwd": 10.0}) == {
        "fwd_ms": 2000.0, "fwd_ms_min": 1000.0, "fwd_flop_per_s": 5.0}


def test_bench_lines_name_the_device_and_the_commit(monkeypatch, tmp_path):
    """Every bench.py line says what it was measured on and at which commit (a number from a
    lent slot without them cannot be placed): here the NumPy path, micro, one step."""
    import json

    import bench
    monkeypatch.setenv("CLLM_COMMIT", "0123456789ab")
    out = tmp_path / "bench.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--configs", "micro",
                                      "--steps", "1", "--warmup", "1", "--rounds", "1",
                                      "--no-torch", "--out", str(out)])
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    bench.main()
    line, = map(json.loads, out.read_text().splitlines())
    assert line["device"] == bench.device_info("cpu") and line["device"].endswith(" CPU")
    assert line["commit"] == "0123456789ab" and line["config"] == "micro", line
    assert line["cllm"]["tokens_per_s"] > 0 and "error" not in line, line


def test_torch_baseline_runs_each_linear_layer_as_nn_linear_does(monkeypatch):
    """The PyTorch side of bench.py is nanoGPT's model: each linear layer one addmm with its
    bias (F.linear, as nn.Linear runs it), not a product and a separate bias pass; and under
    autocast(bfloat16) its output bf16, as autocast makes nn.Linear's (a product added to an
    fp32 bias came out fp32: every activation after it stored and read at twice the bytes, a
    handicap only PyTorch's side paid). Counted with a dispatch mode on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cllm_gpu import CLLMModel, ModelConfig
    from cllm_gpu.torch_ref import build_torch_gpt

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.addmm, self.outputs, self.widened = [], [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.addmm.default:
                self.addmm.append(out.dtype)
                self.outputs.append(out)   # held, so no later tensor reuses its memory
            elif func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16 \
                    and any(args[0].data_ptr() == o.data_ptr() for o in self.outputs):
                self.widened += 1   # a linear layer's bf16 output copied to a wider dtype
            return out

    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    tm = build_torch_gpt(cfg, CLLMModel(cfg, backend="numpy", dtype="float32").state_dict())
    x = torch.randint(0, 64, (2, 16))
    for autocast, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), Record() as rec:
            tm(x, x)
        # c_attn, attn c_proj, c_fc, mlp c_proj per block (the classifier has no bias)
        assert rec.addmm == [dtype] * (4 * cfg.n_layer), (autocast, rec.addmm)
        assert rec.widened == 0, rec.widened


def test_timed_rounds_alternate_the_sides_abba(monkeypatch):
    """run_interleaved reverses the runners' order every other round, so neither side always
    starts first after the pause (a GPU idle for 0.3 s ramps its clocks up again) or always
    runs right after the other; each round times one chunk of batches on every side, and
    the warm-up steps are untimed."""
    import bench
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    ran = []

    class Runner:
        def __init__(self, name):
            self.name = name

        def step(self, x, y):
            ran.append((self.name, x))

        def sync(self):
            pass

    runners = {"cllm": Runner("cllm"), "torch_eager": Runner("torch_eager")}
    batches = [(i, i) for i in range(1 + 4)]
    ms, rounds = bench.run_interleaved(runners, batches, 1, 4, {})
    assert ran == [("cllm", 0), ("torch_eager", 0),       # warm-up
                   ("cllm", 1), ("torch_eager", 1), ("torch_eager", 2), ("cllm", 2),
                   ("cllm", 3), ("torch_eager", 3), ("torch_eager", 4), ("cllm", 4)], ran
    assert {k: len(v) for k, v in rounds.items()} == {"cllm": 4, "torch_eager": 4}


def test_a_side_failing_in_a_timed_round_is_dropped_and_the_other_still_timed(monkeypatch):
    """A side that raises in a timed round (PyTorch out of memory, say) loses its times and
    has its error recorded; the later rounds, whose ABBA order still names it, skip it and
    time the other side to the end (a KeyError there lost our own figure too)."""
    import bench
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)

    class Runner:
        def __init__(self, fail_at=None):
            self.steps, self.fail_at = 0, fail_at

        def step(self, x, y):
            self.steps += 1
            if self.steps == self.fail_at:
                raise RuntimeError("out of memory")

        def sync(self):
            pass

    runners = {"cllm": Runner(), "torch_eager": Runner(fail_at=3)}   # warm-up, round 1, 2
    errors = {}
    ms, rounds = bench.run_interleaved(runners, [(i, i) for i in range(1 + 4)], 1, 4, errors)
    assert list(ms) == ["cllm"] and len(rounds["cllm"]) == 4, rounds
    assert list(runners) == ["cllm"] and runners["cllm"].steps == 5
    assert errors == {"torch_eager": {"error": "RuntimeError: out of memory"}}


def test_the_torch_line_names_the_sdpa_backend_read_off_a_warm_up_step(monkeypatch):
    """Nothing forces PyTorch's attention backend in bench.py (a forced one that cannot run
    would cost the whole baseline), so its line says which one ran: the aten op the profiler
    saw in the first warm-up step, never in a timed one (with no warm-up, none is read)."""
    import types

    import bench
    import bench_kernels
    from cllm_gpu import ModelConfig
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    lines = []
    monkeypatch.setattr(bench, "emit", lambda line, out: lines.append(line))
    probed, torch_steps = [], []
    real = bench_kernels.sdpa_backend
    # each probe: the lines emitted and the PyTorch steps run before it (0: the first
    # warm-up step; a probe with warm-up steps run past it reads a timed step)
    monkeypatch.setattr(bench_kernels, "sdpa_backend",
                        lambda fn: probed.append((len(lines), len(torch_steps))) or real(fn))
    real_run_step = bench.TorchRunner.run_step
    monkeypatch.setattr(bench.TorchRunner, "run_step",
                        lambda self, x, y: torch_steps.append(1) or real_run_step(self, x, y))
    kw, B = bench.CONFIGS["micro"]
    for warmup in (2, 0):
        lines.clear()
        torch_steps.clear()
        args = types.SimpleNamespace(warmup=warmup, steps=2, rounds=1, precision="bf16",
                                     tf32=False, cuda_graph=False, torch_compile=False, out=None)
        bench.measure_config(ModelConfig(**kw), B, args, "cpu", "cpu", True, {})
        torch_side = lines[0]["torch_eager"]
        if warmup:
            assert torch_side["sdpa_backend"] in ("flash_cpu", "math"), torch_side
        else:
            assert "sdpa_backend" not in torch_side, torch_side
    assert probed == [(0, 0)], probed   # once, on the first step of the run with warm-up


def test_a_cuda_graph_run_keeps_the_capture_out_of_the_timed_steps(monkeypatch, capsys):
    """Our CUDA-graph step warms up on its first step and is captured on the second
    (cuda_graph.StepGraph), so bench.py --cuda-graph raises fewer than 2 warm-up steps to 2
    and says so: with one, the capture landed in the first timed round."""
    import bench
    seen = []
    monkeypatch.setattr(bench, "measure_config", lambda cfg, B, args, *a: seen.append(args.warmup))
    for flags, warmup in ((["--cuda-graph", "--warmup", "1"], 2), (["--warmup", "1"], 1),
                          (["--cuda-graph", "--warmup", "3"], 3)):
        seen.clear()
        monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--configs", "micro",
                                          "--no-torch", *flags])
        bench.main()
        assert seen == [warmup], (flags, seen)
    assert "--warmup 1 raised to 2" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--rounds", "0"], ["--warmup", "-1"]])
def test_bench_refuses_counts_that_time_nothing_in_one_line(flags, monkeypatch, capsys):
    """--steps 0 divided by zero in the timing loop and --rounds 0 gave NaN medians: each is
    refused before any model is built, one usage line, exit 2."""
    import bench
    monkeypatch.setattr(bench, "measure_config", lambda *a: pytest.fail("measured"))
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--configs", "micro",
                                      "--no-torch", *flags])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flags[0]} must be >= " in err and "Traceback" not in err, err
