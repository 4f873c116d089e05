#!/usr/bin/env python3
"""What a GPU result was measured on, and how long the kernels take to compile there.

    python3 scripts/gpu_env.py env --out env.json      # one JSON object: GPU, driver, CUDA
                                                        # runtime, NVRTC, CuPy, NumPy, PyTorch,
                                                        # nvcc, compute-sanitizer, ncu, commit
    python3 scripts/gpu_env.py compile --out c.jsonl   # every kernels_cu file compiled through
                                                        # CuPy (NVRTC), one JSON line per file
                                                        # as it finishes: seconds (and per
                                                        # module: attention is one per head
                                                        # dim), and per kernel registers, local
                                                        # (spill) bytes, shared; [--jobs N]:
                                                        # N worker processes at once (default:
                                                        # the cores, up to 16)

Each probe is guarded: a missing tool is recorded as missing, never a crash. `env` prints one
summary line; `compile` prints one line per file and exits 1 if any module failed.
`record_fields()` is the short form the benchmark scripts put into every JSON record.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cllm_gpu.json_text import to_json  # noqa: E402  (standard library only)


def source_commit() -> str | None:
    """The commit the checkout was made from: $CLLM_COMMIT (the session script sets it), else
    .whl/COMMIT (scripts/gpu_prepare.sh writes it just before each call), else git. The stamp
    comes before git because the device's copy of the tree may hold a .git of another commit
    (on the H200 on 2026-12-04 it held the session's starting commit, so call 2's tree, one
    commit later, was named "00957fbcd79d+dirty"); where git names another commit than the
    stamp, both are given, so a stamp gone stale here shows too."""
    if os.environ.get("CLLM_COMMIT"):
        return os.environ["CLLM_COMMIT"]
    git_view = None
    try:
        r = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                           text=True, cwd=ROOT, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, cwd=ROOT, timeout=10)
            git_view = r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    stamp_file = ROOT / ".whl" / "COMMIT"
    stamp = stamp_file.read_text().strip() if stamp_file.is_file() else ""
    if not stamp:
        return git_view
    return stamp if git_view in (None, stamp) else f"{stamp} (git here: {git_view})"


def _run(cmd, timeout=30) -> str | None:
    """First non-empty output of a command, or None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return f"error: {type(e).__name__}"
    return (r.stdout or r.stderr).strip() or None


def _version_line(text):
    """The line of a `--version` output that holds the version ("release ..." for nvcc)."""
    if not text:
        return None
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return next((l for l in lines if "release" in l), lines[-1])


def _cupy_info() -> dict:
    try:
        import cupy
    except Exception as e:
        return {"cupy_error": f"{type(e).__name__}: {e}"[:300]}
    info = {"cupy": cupy.__version__}
    rt = cupy.cuda.runtime
    for key, fn in (("cuda_runtime", "runtimeGetVersion"), ("cuda_driver", "driverGetVersion"),
                    ("gpu_count", "getDeviceCount")):
        try:
            info[key] = getattr(rt, fn)()
        except Exception as e:
            info[key] = f"error: {type(e).__name__}: {e}"[:200]
    try:
        from cupy.cuda import nvrtc
        info["nvrtc"] = ".".join(str(v) for v in nvrtc.getVersion())
    except Exception as e:
        info["nvrtc"] = f"error: {type(e).__name__}"
    try:
        from cllm_gpu.backend import cuda_device_name  # in the try: a failing import is recorded
        p = rt.getDeviceProperties(0)
        info["gpu"] = cuda_device_name(0)
        info["compute_capability"] = f"{p.get('major')}.{p.get('minor')}"
        for k in ("multiProcessorCount", "totalGlobalMem", "l2CacheSize",
                  "sharedMemPerBlockOptin", "clockRate", "memoryClockRate", "memoryBusWidth"):
            if k in p:
                info[k] = p[k]
    except Exception as e:
        info["gpu_error"] = f"{type(e).__name__}: {e}"[:300]
    return info


def _torch_info() -> dict:
    try:
        import torch
    except Exception as e:
        return {"torch": None, "torch_error": f"{type(e).__name__}"}
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        info["torch_cuda_available"] = bool(torch.cuda.is_available())
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception as e:
        info["torch_cuda_error"] = f"{type(e).__name__}: {e}"[:200]
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    return info


def _module_version(name):
    try:
        mod = __import__(name)
        return getattr(mod, "__version__", "importable")
    except Exception:
        return None


def environment() -> dict:
    import numpy
    env = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": source_commit(), "host": platform.node(), "machine": platform.machine(),
           "kernel": platform.release(), "python": sys.version.split()[0],
           "python_executable": sys.executable, "numpy": numpy.__version__}
    env["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm,clocks.max.mem,power.limit,persistence_mode,"
                              "compute_mode", "--format=csv,noheader"])
    env.update(_cupy_info())
    env.update(_torch_info())
    env["nvcc"] = _version_line(_run(["nvcc", "--version"]))
    env["compute_sanitizer"] = _version_line(_run(["compute-sanitizer", "--version"]))
    env["ncu"] = _version_line(_run(["ncu", "--version"]))
    env["nsys"] = shutil.which("nsys")
    for mod in ("pytest", "hypothesis", "nvtx", "safetensors", "tokenizers"):
        env[mod] = _module_version(mod)
    env["cupy_cache_dir"] = os.environ.get("CUPY_CACHE_DIR")
    env["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return env


def record_fields(device: str) -> dict:
    """The few environment fields every benchmark record carries (cheap to collect)."""
    import numpy
    out = {"commit": source_commit(), "numpy": numpy.__version__}
    if device == "cpu":   # the NumPy path's threads (cllm_gpu/ops/host_threads.py)
        from cllm_gpu.ops.host_threads import host_threads
        out["cpu_threads"] = host_threads()
    if device == "cuda":
        try:
            import cupy
            out.update(cupy=cupy.__version__,
                       cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                       cuda_driver=cupy.cuda.runtime.driverGetVersion())
        except Exception as e:
            out["cupy_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


KERNEL_ATTRIBUTES = ("num_regs", "local_size_bytes", "shared_size_bytes",
                     "max_threads_per_block")


def _compile_module(stem: str, names: tuple) -> dict:
    """Compile one module through the launchers' path (kernels.get_module: CuPy, which also
    writes its disk cache); its seconds and each kernel's resources, or the error."""
    from cllm_gpu import kernels
    t0 = time.perf_counter()
    try:
        mod = kernels.get_module(stem, (), names)
        res = {"seconds": round(time.perf_counter() - t0, 3), "kernels": {}}
        for name in names:
            fn = mod.get_function(name)
            res["kernels"][name] = {k: getattr(fn, k, None) for k in KERNEL_ATTRIBUTES}
        return res
    except Exception as e:
        return {"seconds": round(time.perf_counter() - t0, 3),
                "error": f"{type(e).__name__}: {e}"[:2000]}


def _warm_worker():
    """A worker's start-up before its first module is timed: CuPy imported, the CUDA context
    made, NVRTC's version read (CuPy compiles an empty program for it once per process)."""
    try:
        import cupy
        from cupy.cuda import compiler
        cupy.cuda.Device().compute_capability
        compiler._get_nvrtc_version()
    except Exception:   # the module's own compile then says what is wrong
        pass


def _compile_all(jobs: int):
    """Yield (stem, names, result) for every module: in this process, or with jobs > 1 in
    that many worker processes at once (NVRTC compiles on one core; the attention file is one
    module per head dim, ~11-12.5 s each), as they finish. A module that failed in a worker is
    compiled again here (a worker that could not make a CUDA context, e.g. on a GPU in
    exclusive-process mode, fails where this process does not)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from cllm_gpu import kernels
    todo = [(stem, names) for stem in kernels.NAME_EXPRESSIONS
            for names in kernels.module_groups(stem)]
    if jobs <= 1:
        for stem, names in todo:
            yield stem, names, _compile_module(stem, names)
        return
    todo.sort(key=lambda sn: -len(sn[1]))   # the largest first: the wall is the slowest one
    failed = []
    # spawn: each worker a fresh process with its own CUDA context (none forked)
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), initializer=_warm_worker,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_compile_module, stem, names): (stem, names)
                   for stem, names in todo}
        for f in as_completed(futures):
            stem, names = futures[f]
            try:
                res = f.result()
            except Exception as e:   # the worker died
                res = {"error": f"{type(e).__name__}: {e}"[:2000]}
            if "error" in res:
                failed.append((stem, names, res))
            else:
                yield stem, names, res
    for stem, names, res in failed:
        print(f"  module {names[0]} failed in a worker ({res['error'].splitlines()[0][:160]}); "
              f"compiling it in this process", flush=True)
        yield stem, names, _compile_module(stem, names)


def compile_times(out_path: str | None, jobs: int = 1) -> int:
    """Compile every kernel file module by module as get_kernel builds them
    (kernels.module_groups), cold, and time it; one JSON line per file, written as soon as its
    last module is done, with each module's seconds and each kernel's resources."""
    from cllm_gpu import kernels
    failed = 0
    t0 = time.perf_counter()
    pending = {stem: len(kernels.module_groups(stem)) for stem in kernels.NAME_EXPRESSIONS}
    recs = {stem: {"stem": stem, "instantiations": len(kernels.NAME_EXPRESSIONS[stem]),
                   "modules": [], "kernels": {}} for stem in kernels.NAME_EXPRESSIONS}
    for stem, names, res in _compile_all(jobs):
        rec = recs[stem]
        rec["modules"].append({"first": names[0], "instantiations": len(names),
                               "seconds": res.get("seconds")})
        rec["kernels"].update(res.get("kernels", {}))
        if "error" in res:
            rec.setdefault("error", res["error"])
        if len(names) < len(kernels.NAME_EXPRESSIONS[stem]):  # a cut-short stage keeps these
            print(f"  module {names[0]}: {len(names)} kernels {res.get('seconds')} s"
                  + ("  ERROR" if "error" in res else ""), flush=True)
        pending[stem] -= 1
        if pending[stem]:
            continue
        rec["seconds"] = round(sum(m["seconds"] or 0 for m in rec["modules"]), 3)
        failed += "error" in rec
        if out_path:
            with open(out_path, "a") as f:
                f.write(to_json(rec) + "\n")
        regs = [v["num_regs"] for v in rec["kernels"].values()
                if isinstance(v.get("num_regs"), int)]
        print(f"compiled {stem:13s} {rec['seconds']:7.2f} s"
              + (f"  max regs {max(regs)}" if regs else "")
              + (f"  ERROR {rec['error'].splitlines()[0][:200]}" if "error" in rec else ""),
              flush=True)
    print(f"compile: {len(recs)} files in {time.perf_counter() - t0:.1f} s wall "
          f"({jobs} process{'es' if jobs > 1 else ''}), {failed} file(s) failed", flush=True)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The command line main() parses (the docs' command lines are checked against it:
    tests/test_docs_cite_real_flags.py)."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["env", "compile"])
    ap.add_argument("--out", default=None, help="env: write the JSON object here; compile: "
                    "append one JSON line per module here (default: print only)")
    ap.add_argument("--jobs", type=int, default=0, help="compile: this many worker processes "
                    "compile the modules at once (default: the cores, up to 16; 1: all in this "
                    "process)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.what == "compile":
        jobs = args.jobs or min(16, len(os.sched_getaffinity(0)))
        return compile_times(args.out, jobs)
    env = environment()
    if args.out:
        Path(args.out).write_text(to_json(env, indent=1) + "\n")
    print(f"gpu {env.get('gpu')} (cc {env.get('compute_capability')}), driver "
          f"{env.get('cuda_driver')}, CUDA runtime {env.get('cuda_runtime')}, NVRTC "
          f"{env.get('nvrtc')}, CuPy {env.get('cupy')}, NumPy {env.get('numpy')}, torch "
          f"{env.get('torch')}, nvcc {env.get('nvcc')}, compute-sanitizer "
          f"{env.get('compute_sanitizer')}, ncu {env.get('ncu')}, nvtx {env.get('nvtx')}, "
          f"commit {env.get('commit')}", flush=True)
    return 0 if isinstance(env.get("gpu_count"), int) and env["gpu_count"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
