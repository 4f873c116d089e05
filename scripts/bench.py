#!/usr/bin/env python3
"""Training throughput of cllm-gpu next to an equivalent PyTorch GPT-2, in the same process.

One JSON line per configuration, appended to --out as soon as it is measured: tokens/s, ms/step,
MFU (on a GPU, against the peak named in the line), device memory reserved, and the same figures for
PyTorch (SDPA attention, AdamW) eager with the ratio. With --torch-compile a second line per
configuration (`"variant": "torch_compile"`, `torch_compile_mode`) follows, measured last: ours
again, interleaved with the torch.compile model, so a slow cold Inductor compile costs nothing
already measured. --torch-compile-mode reduce-overhead (Inductor's code replayed in CUDA
graphs) is the like-for-like of --cuda-graph.
A configuration that fails gives a line with "error"; a PyTorch side that fails gives
{"error": ...} in its place and our figures still stand. Both sides train on the same batches
with the same optimizer settings, timed in rounds whose order of sides is reversed every other
round (ABBA); the ratio is the number that matters. PyTorch's line names the SDPA backend its
attention ran (`sdpa_backend`, read off the profiler in a warm-up step; none is forced).
docs/benchmarks.md ("What the GPU figures mean") says what each figure counts.

    python scripts/bench.py                       # CPU: tiny and cpu-small
    python scripts/bench.py --device cuda         # GPU: tiny, shakespeare-char, gpt2-124m
    python scripts/bench.py --configs cpu-small --steps 20 --out docs/results/bench.jsonl
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cllm_gpu import CLLMModel, ModelConfig, TrainConfig  # noqa: E402
from cllm_gpu.backend import cuda_available, device_peaks  # noqa: E402
from cllm_gpu.json_text import to_json  # noqa: E402
from cllm_gpu.train_step import StepValues, training_step  # noqa: E402
from gpu_env import record_fields  # noqa: E402  (scripts/gpu_env.py, beside this file)

CONFIGS = {
    # name: (ModelConfig kwargs, batch size); micro: seconds per step on the CUDA emulator
    "micro": (dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32), 2),
    "tiny": (dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64), 8),
    "cpu-small": (dict(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=256), 8),
    "shakespeare-char": (dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 64),
    "gpt2-124m": (dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 16),
}


# torch.compile's modes (--torch-compile-mode)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# the modes that replay Inductor's code in CUDA graphs: each training step's start is marked
# (the graphs may reuse the last step's outputs), and no warm-up step is probed (it records)
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def make_batches(cfg, B, n, seed=0):
    rng = np.random.default_rng(seed)
    T = cfg.block_size
    out = []
    for _ in range(n):
        a = rng.integers(0, cfg.vocab_size, size=(B, T + 1))
        out.append((a[:, :-1], a[:, 1:]))
    return out


def sync(device):
    if device == "cuda":
        import cupy
        cupy.cuda.Device().synchronize()


class OursRunner:
    """cllm-gpu: one training step = train_step.training_step (forward, backward, clip, AdamW),
    the step's scalars in a StepValues buffer, as the trainer runs it; with cuda_graph, the
    trainer's captured step (cuda_graph.StepGraph)."""

    def __init__(self, cfg, B, device, precision, cuda_graph=False):
        self.device, self.B, self.cfg = device, B, cfg
        self.model = CLLMModel(cfg, backend="cuda" if device == "cuda" else "numpy",
                               dtype="float32", seed=0, precision=precision)
        self.tc = TrainConfig(batch_size=B, learning_rate=1e-4, min_lr=1e-5,
                              precision=precision, cuda_graph=cuda_graph)
        self.sv = StepValues(self.model.xp)
        self.n = 0
        self.out = None
        self.graph = None
        if cuda_graph and device == "cuda":
            from cllm_gpu.cuda_graph import StepGraph
            self.graph = StepGraph(self.model, self.tc, self.sv,
                                   lambda msg: print(msg, file=sys.stderr))

    def step(self, x, y):
        self.n += 1
        batch = self.model.check_batch(x, y)
        out = None
        if self.graph is not None and self.graph.active:  # None: the capture failed
            out = self.graph.step([batch], 1e-4, self.n, batch.n_valid)
        if out is None:
            self.sv.set_inputs(self.tc, 1e-4, self.n, batch.n_valid)
            training_step(self.model, [self.model.set_batch(batch)], self.tc, self.sv)
            out = self.sv.outputs()
        self.out = out

    def sync(self):
        sync(self.device)

    def extra(self):
        res = {"final_loss": StepValues.read_outputs(self.out)["loss"]}
        if self.graph is not None:
            res["cuda_graph"] = {"captures": self.graph.captures, "replays": self.graph.replays,
                                 "active": self.graph.active}
        if self.device == "cuda":
            import cupy
            # What CuPy's pools took from the device: they keep every block until freed
            # explicitly (release_cached_memory does, before the runners are built), so this
            # is their high-water mark, comparable to PyTorch's max_memory_reserved. The
            # captured step's private pool counts too.
            pools = [cupy.get_default_memory_pool()]
            if self.graph is not None and self.graph.pool is not None:
                pools.append(self.graph.pool)
            res["mem_reserved_bytes"] = int(sum(p.total_bytes() for p in pools))
        else:
            m = self.model
            c = m._caches[(self.B, self.cfg.block_size)]
            res["state_bytes"] = int(4 * m.params.data.nbytes + sum(
                a.nbytes for v in vars(c).values() for a in (v if isinstance(v, list) else [v])
                if hasattr(a, "nbytes")))
        return res


class TorchRunner:
    """The same model in PyTorch: SDPA attention, AdamW (fused on CUDA), grad-norm clip;
    precision="bf16": the forward under torch.autocast(bfloat16), PyTorch's own mixed
    precision (bf16 matmul and attention operands, fp32 weights and optimizer)."""

    def __init__(self, cfg, B, device, compile_, precision, compile_mode="default"):
        import torch
        from cllm_gpu.torch_ref import build_torch_gpt
        self.torch, self.device = torch, device
        ref = CLLMModel(cfg, backend="numpy", dtype="float32", seed=0)
        self.model = build_torch_gpt(cfg, ref.state_dict(), device=device)
        self.opt = self.model.optimizer(1e-4, 0.1, (0.9, 0.95), 1e-8,
                                        fused=True if device == "cuda" else None)
        # modes "reduce-overhead" and "max-autotune": Inductor's code in CUDA graphs (forward
        # and backward), the like of our --cuda-graph step
        self.fwd = (torch.compile(self.model, mode=compile_mode) if compile_ else self.model)
        self.mark_step = compile_ and compile_mode in CUDA_GRAPH_COMPILE_MODES
        self.loss = None
        self.autocast = precision == "bf16"
        # the SDPA backend PyTorch's attention ran (flash, efficient, cudnn, math: the aten op
        # the profiler saw), read off one untimed step: measure_config sets probe_next for the
        # first warm-up step (nothing forces a backend, so the line says which one it was)
        self.probe_next, self.sdpa_backend = False, None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def step(self, x, y):
        if self.probe_next:
            from bench_kernels import sdpa_backend
            self.probe_next = False
            self.sdpa_backend = sdpa_backend(lambda: self.run_step(x, y))
            return
        self.run_step(x, y)

    def run_step(self, x, y):
        t = self.torch
        if self.mark_step:  # a new training step: the graphs may reuse the last one's outputs
            t.compiler.cudagraph_mark_step_begin()
        x, y = self.upload(x), self.upload(y)
        self.opt.zero_grad(set_to_none=True)
        with t.autocast(self.device, dtype=t.bfloat16, enabled=self.autocast):
            loss = self.fwd(x, y)
        loss.backward()
        t.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.loss = loss

    def upload(self, a):
        """A batch array as a tensor on the device. On CUDA from pinned memory by an
        asynchronous copy, as nanoGPT does and as ours does (model.HostStaging): a copy from
        pageable memory makes the host wait for the stream to drain, a sync every step that
        only PyTorch's side would pay."""
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        if self.device != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def extra(self):
        res = {"final_loss": float(self.loss.item())}
        if self.sdpa_backend is not None:
            res["sdpa_backend"] = self.sdpa_backend
        if self.device == "cuda":
            res["mem_reserved_bytes"] = int(self.torch.cuda.max_memory_reserved())
            res["mem_peak_allocated_bytes"] = int(self.torch.cuda.max_memory_allocated())
        return res


def run_interleaved(runners, batches, warmup, rounds, errors):
    """Warm every runner up, then time them in alternating rounds over the same batches, so
    that a machine's drift (other tenants, clocks) hits all of them alike: the runners' order
    reversed every other round (ABBA), so neither side always runs first after the pause
    (a GPU's clocks ramp up from idle) or always right after the other. Per runner: median
    ms/step over the rounds. A runner that raises is dropped, its error put in `errors`."""
    def drop(k, e):
        errors[k] = {"error": f"{type(e).__name__}: {e}"[:500]}
        runners.pop(k)
        print(f"{k} failed: {errors[k]['error']}", file=sys.stderr)

    for k, r in list(runners.items()):
        try:
            for x, y in batches[:warmup]:
                r.step(x, y)
            r.sync()
        except Exception as e:
            drop(k, e)
    timed = batches[warmup:]
    per_round = max(1, len(timed) // rounds)
    times = {k: [] for k in runners}
    order = list(runners)
    for i in range(rounds):
        chunk = timed[i * per_round:(i + 1) * per_round] or timed[:per_round]
        for k in order if i % 2 == 0 else order[::-1]:
            if k not in runners:   # dropped in an earlier round
                continue
            r = runners[k]
            # let the other side's thread pools (OpenBLAS, OpenMP) stop spinning first: their
            # busy-waiting would otherwise be charged to whoever runs next
            time.sleep(0.3)
            try:
                t0 = time.perf_counter()
                for x, y in chunk:
                    r.step(x, y)
                r.sync()
            except Exception as e:
                drop(k, e)
                times.pop(k)
                continue
            times[k].append(1000 * (time.perf_counter() - t0) / len(chunk))
    return {k: float(np.median(v)) for k, v in times.items()}, times


def release_cached_memory(device):
    """Hand the blocks CuPy's pool and PyTorch's caching allocator hold but no longer use back
    to the device, before runners are built: both keep freed blocks (a previous configuration's
    model, the eager PyTorch model before torch.compile's), and each side's reserved-memory
    figure would count them."""
    gc.collect()
    if device != "cuda":
        return
    import cupy
    cupy.get_default_memory_pool().free_all_blocks()
    try:
        import torch
    except ImportError:
        return
    torch.cuda.empty_cache()


def device_info(device):
    if device == "cuda":
        from cllm_gpu.backend import cuda_device_name
        return cuda_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU"


def build_parser() -> argparse.ArgumentParser:
    """The command line main() parses (the docs' command lines are checked against it:
    tests/test_docs_cite_real_flags.py)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--configs", default=None, help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds the steps are split into (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=0, help="override the config's batch size")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    ap.add_argument("--torch-compile", action="store_true",
                    help="also time torch.compile, last, in a second line per configuration")
    ap.add_argument("--torch-compile-mode", default="default", choices=COMPILE_MODES,
                    help="torch.compile's mode: reduce-overhead runs Inductor's code in CUDA "
                         "graphs, the like of --cuda-graph (default %(default)s)")
    ap.add_argument("--tf32", action="store_true",
                    help="GPU: float32 matmuls in TF32 on tensor cores, on both sides")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: our mixed precision against PyTorch autocast(bfloat16); MFU "
                         "against the bf16 tensor-core peak (default %(default)s)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="GPU: our step captured in a CUDA graph and replayed (train --cuda-graph)")
    ap.add_argument("--out", default=None,
                    help="append each JSON line to this file as soon as it is measured")
    return ap


def main():
    ap = build_parser()
    args = ap.parse_args()
    for flag, least in (("steps", 1), ("rounds", 1), ("warmup", 0)):
        if getattr(args, flag) < least:
            ap.error(f"--{flag} must be >= {least}, got {getattr(args, flag)}")
    if args.cuda_graph and args.warmup < 2:
        # StepGraph runs a new shape's first step un-captured and captures the second: with
        # fewer warm-up steps the capture would be timed as a step
        print(f"--cuda-graph: --warmup {args.warmup} raised to 2 (step 1 warms up, step 2 is "
              "captured; neither may be timed)", file=sys.stderr)
        args.warmup = 2
    if args.tf32:
        from cllm_gpu.backend import enable_tf32
        enable_tf32()
    device = args.device
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    names = args.configs.split(",") if args.configs else (
        ["tiny", "shakespeare-char", "gpt2-124m"] if device == "cuda" else ["tiny", "cpu-small"])
    have_torch = False
    if not args.no_torch:
        try:
            import torch
            have_torch = True
            torch.backends.cuda.matmul.allow_tf32 = args.tf32
            if device == "cpu":
                torch.set_num_threads(len(os.sched_getaffinity(0)))
        except ImportError:
            pass
    dev_name = device_info(device)
    for name in names:
        if name not in CONFIGS:
            ap.error(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    env_fields = record_fields(device)
    for name in names:
        kw, B = CONFIGS[name]
        B = args.batch_size or B
        base = {"config": name, "device": dev_name, **env_fields,
                "date": time.strftime("%Y-%m-%d"), "batch_size": B,
                "precision": args.precision, "tf32": args.tf32, "cuda_graph": args.cuda_graph}
        try:
            measure_config(ModelConfig(**kw), B, args, device, dev_name, have_torch, base)
        except Exception as e:  # one configuration's failure must not cost the others
            traceback.print_exc()
            emit({**base, "error": f"{type(e).__name__}: {e}"[:500]}, args.out)


def emit(line, out):
    text = to_json(line)
    print(text, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def measure_config(cfg, B, args, device, dev_name, have_torch, base):
    """Time ours against PyTorch eager and write that line; then, with --torch-compile, ours
    against torch.compile (compiled last) and write a second line."""
    batches = make_batches(cfg, B, args.warmup + args.steps)
    line = {**base, "seq_len": cfg.block_size, "params": cfg.num_params(), "dtype": "float32",
            "flops_per_token": cfg.flops_per_token(cfg.block_size)}
    peaks = device_peaks(dev_name)
    kind = "bf16" if args.precision == "bf16" else "tf32" if args.tf32 else "fp32"
    if device == "cuda" and peaks:
        line["mfu_peak"] = (f"fp32 non-tensor-core {peaks['fp32']} TFLOP/s" if kind == "fp32"
                            else f"{kind} dense {peaks[kind]} TFLOP/s")
    release_cached_memory(device)
    ours = OursRunner(cfg, B, device, args.precision, args.cuda_graph)
    runners, errors = {"cllm": ours}, {}
    if have_torch:
        import torch
        line["torch_version"] = torch.__version__
        try:
            runners["torch_eager"] = TorchRunner(cfg, B, device, False, args.precision)
            runners["torch_eager"].probe_next = args.warmup > 0  # never a timed step
        except Exception as e:
            errors["torch_eager"] = {"error": f"{type(e).__name__}: {e}"[:500]}

    def measure(runners, line):
        ms, all_ms = run_interleaved(runners, batches, args.warmup, args.rounds, errors)
        if "cllm" not in ms:
            raise RuntimeError(f"our side failed: {errors['cllm']['error']}")
        tokens = B * cfg.block_size
        for k, r in runners.items():
            line[k] = {"tokens_per_s": 1000 * tokens / ms[k], "ms_per_step": ms[k],
                       "ms_per_step_rounds": [round(t, 2) for t in all_ms[k]], **r.extra()}
            if device == "cuda" and peaks:
                line[k]["mfu"] = line["flops_per_token"] * line[k]["tokens_per_s"] / (
                    peaks[kind] * 1e12)
            if k != "cllm":
                line[f"ratio_vs_{k}"] = ms[k] / ms["cllm"]
        for k, err in errors.items():
            if k != "cllm" and k not in runners:
                line[k] = err
        emit(line, args.out)

    measure(runners, line)
    if not (have_torch and args.torch_compile):
        return
    # torch.compile last: a cold Inductor compile can take minutes; everything above is written
    runners.pop("torch_eager", None)
    release_cached_memory(device)  # the eager model's blocks: not torch.compile's memory
    comp_line = {**{k: v for k, v in line.items() if k not in ("cllm", "torch_eager")
                    and not k.startswith("ratio_vs_")}, "variant": "torch_compile",
                 "torch_compile_mode": args.torch_compile_mode}
    try:
        t0 = time.perf_counter()
        runners["torch_compile"] = TorchRunner(cfg, B, device, True, args.precision,
                                               args.torch_compile_mode)
        runners["torch_compile"].step(*batches[0])  # compile now
        runners["torch_compile"].sync()
        # the backend of the compiled graph's attention, off its first warm-up step; not in
        # the modes with CUDA graphs, whose first steps after the compile record the graphs
        runners["torch_compile"].probe_next = args.warmup > 0 and args.torch_compile_mode \
            not in CUDA_GRAPH_COMPILE_MODES
        comp_line["torch_compile_first_step_s"] = round(time.perf_counter() - t0, 2)
    except Exception as e:  # torch.compile needs a C compiler / Triton
        runners.pop("torch_compile", None)
        errors["torch_compile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    errors.pop("torch_eager", None)
    measure(runners, comp_line)


if __name__ == "__main__":
    main()
