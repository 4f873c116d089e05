"""Loading and compiling the CUDA kernels in `kernels_cu/`.

Each `kernels_cu/X.cu` holds the kernels of op X (launched from `cllm_gpu/ops/X.py`); they all
include `kernels_cu/common.cuh`. CuPy's kernel cache key covers the source string and options
but not files pulled in by `#include`, so `kernel_source` pastes the header into the source
(with `#line` markers, so compiler messages still name the right file and line).

- `get_kernel(stem, name)` compiles the module of `kernels_cu/<stem>.cu` that holds `name`
  once per process through `cupy.RawModule` and returns the kernel: the template instantiations
  listed in `NAME_EXPRESSIONS`, all at once, or for attention those of `name`'s head dim
  (`module_groups`); CuPy adds the `-arch` of the current device and
  `CUPY_NVRTC_ADDED_OPTIONS`, and caches the binary on disk.
- `compile_all_nvrtc(arch)` compiles every file with NVRTC directly: needs the NVRTC library
  (the `nvidia-cuda-nvrtc-cu12` wheel), not a GPU. CI and the Docker build use it.
- `python -m cllm_gpu.kernels --precompile`: on a GPU machine, compiles every module through
  CuPy (warming its cache); without a GPU, NVRTC-checks every file for sm_80 and sm_90.
- `use_settings(stem, **values)`: other values for a file's compile-time settings (`SETTINGS`,
  macros such as the D = 64 attention forward's block shape): the kernels that depend on them
  are then compiled with -D options in a module of their own, and their launchers read the
  values back with `setting`.

A compile failure raises `KernelCompileError` whose message starts with `file(line): error`.
"""
from __future__ import annotations

import argparse
import functools
import re
import struct
import sys
from pathlib import Path

from .json_text import to_json

#: every template instantiation a launcher uses, per kernel file (the file stem)
ATTENTION_HEAD_DIMS = (8, 16, 32, 48, 64, 80, 96, 128)

_MMA_HEAD_DIMS = [d for d in ATTENTION_HEAD_DIMS if d % 16 == 0 and d <= 128]
_FD = ("float", "double")
_OUT_TYPES = (("float", "float"), ("double", "double"), ("float", "cllm_bf16"))
NAME_EXPRESSIONS: dict[str, list[str]] = {
    # <float, true>: also writes the bf16 weight copy (precision="bf16")
    "adamw": [f"adamw_kernel<{t}>" for t in _FD] + ["adamw_kernel<float, true>"],
    # <head dim> and <head dim, true>: the same kernel with the distance bias (ALiBi, lattice)
    "attention": [f"attention_{k}_kernel<{d}{b}>" for d in ATTENTION_HEAD_DIMS
                  for b in ("", ", true") for k in ("forward", "backward_dq", "backward_dkv")]
                 # bf16 tensor-core variants (precision="bf16"): head dims multiple of 16 <= 128;
                 # backward: dq then dkv (two-pass), or delta then backward (atomic-dq)
                 + [f"attention_{k}_mma_kernel<{d}{b}>" for d in _MMA_HEAD_DIMS
                    for b in ("", ", true")
                    for k in ("forward", "backward_dq", "backward_dkv", "backward")]
                 # <D, bias, cllm_bf16>: the backward storing a bf16 dqkv (the bf16 model's)
                 + [f"attention_{k}_mma_kernel<{d}, {b}, cllm_bf16>" for d in _MMA_HEAD_DIMS
                    for b in ("false", "true") for k in ("backward_dq", "backward_dkv", "backward")]
                 + [f"attention_backward_delta_kernel<{d}>" for d in _MMA_HEAD_DIMS]
                 # atomic-dq into a bf16 dqkv: the fp32 dQ sums rounded into its Q columns
                 + ["attention_dq_to_bf16_kernel<float>"],
    "embedding": [f"{k}<{t}>" for t in _FD for k in (
        "embedding_forward_kernel", "embedding_backward_wpe_kernel",
        "embedding_backward_wte_kernel")],
    "cast": ["float_to_bf16_kernel", "bf16_to_float_kernel"],
    "dropout": [f"{k}<{t}>" for t in _FD
                for k in ("dropout_kernel", "cllm_colsum_finalize_kernel")]
               # <compute type, out's storage, dsum's storage>; CllmNoOutput: the column sums
               # only (out=None), of a float or a bf16 dsum
               + [f"dropout_bias_backward_kernel<{t}, {o}, {t}>" for t, o in _OUT_TYPES]
               + [f"dropout_bias_backward_kernel<{t}, CllmNoOutput, {t}>" for t in _FD]
               + ["dropout_bias_backward_kernel<float, CllmNoOutput, cllm_bf16>"],
    # <compute type, input storage, output storage>: bf16 input or output only with float32
    "gelu": [f"{k}<{t}, {i}, {o}>"
             for t, i, o in [(t, t, o) for t, o in _OUT_TYPES]
             + [("float", "cllm_bf16", o) for o in ("float", "cllm_bf16")]
             for k in ("gelu_forward_kernel", "gelu_bias_backward_kernel")]
            + [f"{k}<{t}>" for t in _FD for k in ("gelu_backward_kernel",
                                                   "cllm_colsum_finalize_kernel")],
    "grad_norm": [f"sumsq_partial_kernel<{t}>" for t in _FD]
                 + ["sumsq_finalize_kernel", "clip_factor_kernel"],
    "layernorm": [f"layernorm_forward_kernel<{t}, {o}>" for t, o in _OUT_TYPES]
                 # <compute type, y's storage (the branch), output storage>
                 + [f"residual_layernorm_forward_kernel<{t}, {y}, {o}>"
                    for t, y, o in [(t, t, o) for t, o in _OUT_TYPES]
                    + [("float", "cllm_bf16", o) for o in ("float", "cllm_bf16")]]
                 # the backward: <compute type, dout storage>
                 + [f"layernorm_backward_kernel<{t}, {o}>" for t, o in _OUT_TYPES]
                 + [f"cllm_colsum_finalize_kernel<{t}>" for t in _FD],
    # <compute type, logits storage, elements per 16-byte load (1: unaligned rows)>
    "softmax_xent": [f"softmax_xent_kernel<{t}, {st}, {v}>" for t, st, vec in (
        ("float", "float", 4), ("double", "double", 2), ("float", "cllm_bf16", 8))
        for v in (1, vec)],
}

#: Compile-time settings: macros a kernel file reads, with the value it defaults to (its
#: `#ifndef` block) and the instantiations whose code depends on them. `use_settings` picks
#: other values; a launch of one of those instantiations then comes from a module of its own,
#: compiled with the values as -D options (only those instantiations: ~1 s, not the ~11 s of
#: their head dim's module), and its launcher reads the same values back (`setting`), so a grid
#: is always the one the kernel was compiled for. Every other kernel comes from its default
#: module.
SETTINGS: dict[str, dict[str, int]] = {
    # the D = 64 bf16 forward's block: warps, blocks per SM its registers are budgeted for, and
    # 16-row m-tiles per warp (2: each K, V fragment loaded feeds two mma; queries per block =
    # 16 x warps x m-tiles) (attention.cu, AttnMmaCfg)
    "attention": {"CLLM_ATTN_FWD_WARPS_D64": 8, "CLLM_ATTN_FWD_MIN_BLOCKS_D64": 2,
                  "CLLM_ATTN_FWD_MTILES_D64": 1},
}
SETTING_KERNELS: dict[str, tuple[str, ...]] = {
    "attention": ("attention_forward_mma_kernel<64>", "attention_forward_mma_kernel<64, true>"),
}
_chosen: dict[str, dict[str, int]] = {}  # {stem: {macro: value}}: the non-default values


def _head_dim(name: str):
    """An attention instantiation's head dim (its first template argument where that is an
    integer; None for the others)."""
    targs = split_name_expression(name)[1]
    return int(targs[0]) if targs and targs[0].isdigit() else None


#: Kernel files compiled as several modules, one per group of instantiations: {stem: the
#: group key of a name expression}; any other file is one module. A launch compiles only its
#: kernel's group: attention's 154 instantiations take ~70-85 s of one CPU together, its
#: head-dim groups (21 at most) 11-12.5 s each, D = 64's 10.9 s (NVRTC 12.9, sm_90). The other
#: files take under 2 s whole.
MODULE_GROUP_KEY = {"attention": _head_dim}


@functools.lru_cache(maxsize=None)
def _module_groups(stem: str) -> dict[str, tuple[str, ...]]:
    groups: dict = {}
    key = MODULE_GROUP_KEY.get(stem)
    for name in NAME_EXPRESSIONS.get(stem, ()):
        groups.setdefault(key(name) if key else None, []).append(name)
    return {name: tuple(g) for g in groups.values() for name in g}


def module_groups(stem: str) -> list[tuple[str, ...]]:
    """The instantiations of NAME_EXPRESSIONS[stem] as the modules that compile them (default
    settings), in NAME_EXPRESSIONS order."""
    return list(dict.fromkeys(_module_groups(stem).values()))


def use_settings(stem: str, **values: int) -> None:
    """Compile and launch `stem`'s setting-dependent kernels with these values from now on
    (macros not named: their defaults; no values: all defaults). Meant for benchmarks and
    tests comparing builds in one process: a step captured in a CUDA graph keeps the kernels
    it was captured with."""
    known = SETTINGS.get(stem, {})
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"kernels_cu/{stem}.cu has no compile-time setting {unknown[0]!r} "
                         f"(known: {sorted(known)})")
    for name, v in values.items():
        if type(v) is not int:
            raise ValueError(f"{name}: expected an int, got {v!r}")
    _chosen[stem] = {k: v for k, v in values.items() if v != known[k]}


def setting(stem: str, name: str) -> int:
    """The value of compile-time setting `name` that `stem`'s kernels are compiled with now."""
    return _chosen.get(stem, {}).get(name, SETTINGS[stem][name])


def kernel_build(stem: str, name: str) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """(defines, instantiations) of the module a launch of `name` uses now: ((macro, value),
    ...) beyond the source's defaults (empty: a default module, `name`'s group of
    module_groups(stem); () for a name not listed), and the instantiations compiled with
    them."""
    chosen = _chosen.get(stem)
    if chosen and name in SETTING_KERNELS[stem]:
        return tuple(sorted(chosen.items())), SETTING_KERNELS[stem]
    return (), _module_groups(stem).get(name, ())


def define_options(defines) -> tuple[str, ...]:
    """NVRTC / nvcc options for ((macro, value), ...)."""
    return tuple(f"-D{k}={v}" for k, v in defines)


COMMON_HEADER = "common.cuh"
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"common\.cuh"\s*$', re.M)
NVRTC_OPTIONS = ("--std=c++17",)
#: What CuPy adds to the options of every NVRTC compile (cupy/cuda/compiler.py,
#: `_compile_with_cache_cuda`: `options += ('-ftz=true',)`, v14.0.1 to v14.2.0): single
#: precision denormals flushed to zero, which changes the machine code (registers, spills).
#: Every compile check here (NVRTC, ptxas_resources, the nvcc spill test) adds them, so it
#: looks at the binary the GPU runs; get_module does not (CuPy adds them itself).
CUPY_ADDED_OPTIONS = ("-ftz=true",)
#: ... and on its NVRTC path (without jitify, `_compile_using_nvrtc_no_warning`) this too:
#: functions without an execution space are device code (nvcc spells it otherwise, and the
#: nvcc spill test takes kernel addresses in host code, so it is NVRTC's alone).
CUPY_NVRTC_ADDED_OPTIONS = CUPY_ADDED_OPTIONS + ("--device-as-default-execution-space",)


class KernelCompileError(RuntimeError):
    """A kernel source failed to compile; the message names file and line."""


def kernels_dir() -> Path:
    """The directory holding the .cu sources: `<repo>/kernels_cu` for a source checkout or an
    editable install, else the `cllm_gpu.kernels_cu` package data of a regular install."""
    here = Path(__file__).resolve().parent.parent / "kernels_cu"
    if (here / COMMON_HEADER).is_file():
        return here
    try:
        from importlib.resources import files
        p = files("cllm_gpu.kernels_cu")
        cand = Path(str(p))
        if (cand / COMMON_HEADER).is_file():
            return cand
    except Exception:  # pragma: no cover - depends on how the package was installed
        pass
    raise FileNotFoundError(
        f"cannot find the CUDA kernel sources: looked in {here} and in the package "
        "'cllm_gpu.kernels_cu'; reinstall cllm-gpu or run from a source checkout")


def kernel_stems() -> list[str]:
    """Every kernel file (stem) present on disk, sorted."""
    return sorted(p.stem for p in kernels_dir().glob("*.cu"))


def kernel_source(stem: str) -> str:
    """The source of kernels_cu/<stem>.cu with common.cuh pasted in place of its #include."""
    d = kernels_dir()
    path = d / f"{stem}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"no kernel file {path}")
    text = path.read_text()
    header = (d / COMMON_HEADER).read_text()
    out, n_inc = [f'#line 1 "{stem}.cu"'], 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if _INCLUDE_RE.match(line):
            n_inc += 1
            if n_inc == 1:
                out.append(f'#line 1 "{COMMON_HEADER}"')
                out.append(header.rstrip("\n"))
            out.append(f'#line {lineno + 1} "{stem}.cu"')
        else:
            out.append(line)
    return "\n".join(out) + "\n"


# `__launch_bounds__(max threads[, min blocks per SM])`, arguments without parentheses
_SIG_RE = re.compile(r"(?:template\s*<([^>]*)>\s*)?__global__\s+void\s+"
                     r"(?:__launch_bounds__\(([^()]*)\)\s*)?(\w+)\s*\(([^)]*)\)")


def kernel_signatures(src: str) -> dict:
    """{kernel name: (template parameter names, [parameter declarations])} of every
    `__global__` function in a kernel source (for the tools that check or emulate launches)."""
    out = {}
    for m in _SIG_RE.finditer(src):
        tparams = ([p.split("=")[0].split()[-1] for p in m.group(1).split(",")]  # no defaults
                   if m.group(1) else [])
        params = [" ".join(p.split()) for p in m.group(4).split(",")]
        out[m.group(3)] = (tparams, params)
    return out


def kernel_template_defaults(src: str) -> dict:
    """{kernel name: {template parameter: default}} for the parameters declared with one
    (`template <int D, bool BIAS = false>` -> {'BIAS': 'false'})."""
    out = {}
    for m in _SIG_RE.finditer(src):
        pairs = [p.split("=") for p in (m.group(1) or "").split(",") if "=" in p]
        out[m.group(3)] = {k.split()[-1]: v.strip() for k, v in pairs}
    return out


def kernel_launch_bounds(src: str) -> dict:
    """{kernel name: (max threads expression, min blocks expression or None)} for every
    `__global__` function declared with `__launch_bounds__` (expressions as written, e.g.
    ('MMA_THREADS', 'AttnMmaCfg<D>::FWD_MIN_BLOCKS'))."""
    out = {}
    for m in _SIG_RE.finditer(src):
        if m.group(2) is not None:
            args = [" ".join(a.split()) for a in m.group(2).split(",")]
            out[m.group(3)] = (args[0], args[1] if len(args) > 1 else None)
    return out


def split_name_expression(name: str) -> tuple[str, list[str]]:
    """'attention_forward_kernel<64>' -> ('attention_forward_kernel', ['64'])."""
    base = name.split("<")[0]
    targs = [a.strip() for a in name.split("<", 1)[1].rstrip(">").split(",")] if "<" in name else []
    return base, targs


_ERR_RE = re.compile(r'^(?P<file>[^\s()]+)\((?P<line>\d+)\): (?P<kind>error|catastrophic error)'
                     r'(?P<msg>.*)$', re.M)


def _format_compile_error(stem: str, log: str, arch: str | None = None) -> str:
    m = _ERR_RE.search(log or "")
    head = (f"{m.group('file')}({m.group('line')}): {m.group('kind')}{m.group('msg')}"
            if m else "compilation failed")
    where = f" for {arch}" if arch else ""
    return (f"kernels_cu/{stem}.cu{where}: {head}\n--- compiler log ---\n"
            f"{(log or '').strip()}")


# ---------------------------------------------------------------- NVRTC (no GPU needed)
def _arch_option(arch: str) -> str:
    a = str(arch).strip()
    if a.isdigit():
        a = f"sm_{a}"
    if not re.fullmatch(r"(sm|compute)_\d+[a-z]?", a):
        raise ValueError(f"arch: expected 'sm_90', 'compute_90' or '90', got {arch!r}")
    return f"--gpu-architecture={a}"


def compile_source_nvrtc(source: str, filename: str, name_expressions=(), arch="sm_90",
                         extra_options=()) -> dict:
    """Compile one source string with NVRTC, with the options CuPy's would have
    (NVRTC_OPTIONS, CUPY_NVRTC_ADDED_OPTIONS, then `extra_options`); return {'log',
    'lowered_names', 'size', 'ptx', 'cubin'} ('cubin': the machine code, bytes, for an `sm_`
    arch; None for a `compute_` one, whose size is the PTX's).

    Raises KernelCompileError (message starts with file(line)) on failure. A compile is a pure
    function of its arguments, so a process compiles each (source, names, arch, options) once
    (the CI checks and the precompile command ask for the same ones)."""
    r = _compile_source_nvrtc(source, filename, tuple(name_expressions), arch,
                              tuple(extra_options))
    return {**r, "lowered_names": dict(r["lowered_names"])}


@functools.lru_cache(maxsize=64)
def _compile_source_nvrtc(source, filename, name_expressions, arch, extra_options) -> dict:
    from cupy.cuda import nvrtc
    stem = Path(filename).stem
    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        for ne in name_expressions:
            nvrtc.addNameExpression(prog, ne)
        opts = [_arch_option(arch), *NVRTC_OPTIONS, *CUPY_NVRTC_ADDED_OPTIONS, *extra_options]
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            raise KernelCompileError(_format_compile_error(stem, log or str(e), arch)) from None
        log = nvrtc.getProgramLog(prog)
        lowered = {ne: nvrtc.getLoweredName(prog, ne) for ne in name_expressions}
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        cubin = (_whole_cubin(nvrtc.getCUBIN(prog))
                 if _arch_option(arch).split("=")[1].startswith("sm_") else None)
        size = len(ptx) if cubin is None else len(cubin)
        return {"log": log, "lowered_names": lowered, "size": size, "ptx": ptx, "cubin": cubin}
    finally:
        nvrtc.destroyProgram(prog)


def _whole_cubin(cubin: bytes) -> bytes:
    """The CUBIN (an ELF file) as NVRTC wrote it: CuPy's getCUBIN (14.x) drops its last byte,
    taking it for the trailing NUL of a string as for PTX (nvdisasm then refuses the file).
    NVRTC's CUBIN ends with its program header table, whose last field (p_align, 8 bytes
    little-endian, a small power of two) ends in a zero byte: put it back where the header
    says the table ends one byte later."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("NVRTC's CUBIN is not a 64-bit ELF file")
    (phoff,) = struct.unpack_from("<Q", cubin, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", cubin, 0x36)
    end = phoff + phentsize * phnum
    if end == len(cubin) + 1:
        return cubin + b"\0"
    if end != len(cubin):
        raise ValueError(f"NVRTC's CUBIN: {len(cubin)} bytes, its program headers end at {end}")
    return cubin


def compile_nvrtc(stem: str, arch="sm_90", extra_options=(), names=None) -> dict:
    """NVRTC-compile kernels_cu/<stem>.cu with the instantiations `names` (None: every one in
    NAME_EXPRESSIONS; a module of module_groups(stem): what get_kernel compiles)."""
    return compile_source_nvrtc(kernel_source(stem), f"{stem}.cu",
                                NAME_EXPRESSIONS.get(stem, ()) if names is None else names,
                                arch, extra_options)


_PTXAS_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                             r"(\d+) bytes spill loads")
_PTXAS_USED_RE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


_PTX_ENTRY_RE = re.compile(r"\.entry\s+(\w+)\s*\(.*?\)(.*?)\{", re.S)


def ptx_launch_bounds(ptx: str) -> dict:
    """{mangled kernel name: (max threads per block or None, min blocks per SM or 0)} from the
    .maxntid / .minnctapersm directives the compiler emitted for __launch_bounds__."""
    out = {}
    for m in _PTX_ENTRY_RE.finditer(ptx):
        nt = re.search(r"\.maxntid\s+([\d,\s]+)", m.group(2))
        mb = re.search(r"\.minnctapersm\s+(\d+)", m.group(2))
        threads = None
        if nt:
            threads = 1
            for d in nt.group(1).replace(",", " ").split():
                threads *= int(d)
        out[m.group(1)] = (threads, int(mb.group(1)) if mb else 0)
    return out


def ptxas_resources(source: str, filename: str, name_expressions, arch: str = "sm_90",
                    extra_options=()) -> dict:
    """Per-kernel resources ptxas reports for `source` compiled to `arch` machine code (NVRTC
    with --ptxas-options=-v and `extra_options`; no GPU needed): {name expression:
    {"registers", "smem", "stack", "spill_stores", "spill_loads", "max_threads",
    "min_blocks"}} (bytes, except registers per thread; the last two are the launch bounds as
    compiled, None / 0 when absent)."""
    r = compile_source_nvrtc(source, filename, name_expressions, arch,
                             ["--ptxas-options=-v", *extra_options])
    by_mangled = {v: k for k, v in r["lowered_names"].items()}
    bounds = ptx_launch_bounds(r["ptx"] or "")
    out, cur = {}, None
    for line in (r["log"] or "").splitlines():
        m = _PTXAS_ENTRY_RE.search(line)
        if m:
            threads, blocks = bounds.get(m.group(1), (None, 0))
            cur = out.setdefault(by_mangled.get(m.group(1), m.group(1)), {
                "registers": 0, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0,
                "max_threads": threads, "min_blocks": blocks})
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL_RE.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                       spill_loads=int(m.group(3)))
        m = _PTXAS_USED_RE.search(line)
        if m:
            cur.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


def compile_all_nvrtc(arch: str = "sm_90", extra_options=()) -> dict:
    """Compile every kernels_cu/*.cu with NVRTC for `arch` (no GPU needed), module by module
    as get_kernel compiles them (module_groups).

    Returns {stem: {"ok": bool, "error": str | None, "log": str, "kernels": n, "size": bytes}}
    (log, kernels and size summed over the file's modules)."""
    results = {}
    for stem in kernel_stems():
        logs, n_kernels, size = [], 0, 0
        try:
            for names in module_groups(stem):
                r = compile_nvrtc(stem, arch, extra_options, names)
                logs.append(r["log"] or "")
                n_kernels += len(r["lowered_names"])
                size += r["size"]
            results[stem] = {"ok": True, "error": None, "log": "".join(logs),
                             "kernels": n_kernels, "size": size}
        except KernelCompileError as e:
            results[stem] = {"ok": False, "error": str(e), "log": "", "kernels": 0, "size": 0}
    return results


# ---------------------------------------------------------------- CuPy (GPU)
_modules: dict = {}
_functions: dict = {}


def get_module(stem: str, defines=(), names=None):
    """The compiled cupy.RawModule for kernels_cu/<stem>.cu holding the instantiations `names`
    (None: every one of NAME_EXPRESSIONS[stem]) compiled with the compile-time settings
    `defines` ((macro, value), ...; kernel_build gives both), compiled once per process."""
    if stem not in NAME_EXPRESSIONS:
        raise KeyError(f"unknown kernel file {stem!r}; known: {sorted(NAME_EXPRESSIONS)}")
    names = tuple(NAME_EXPRESSIONS[stem] if names is None else names)
    key = (stem, tuple(defines), names)
    mod = _modules.get(key)
    if mod is None:
        import cupy
        from cupy.cuda import compiler
        # (CuPy adds CUPY_NVRTC_ADDED_OPTIONS itself)
        mod = cupy.RawModule(code=kernel_source(stem),
                             options=NVRTC_OPTIONS + define_options(defines),
                             name_expressions=list(names))
        try:
            mod.compile()
        except compiler.CompileException as e:
            log = e.get_message() if hasattr(e, "get_message") else str(e)
            raise KernelCompileError(_format_compile_error(stem, log)) from None
        _modules[key] = mod
    return mod


def get_kernel(stem: str, name: str):
    """The kernel `name` (a name expression from NAME_EXPRESSIONS[stem]) as a RawKernel, from
    the module the current compile-time settings select (kernel_build): the first launch of
    a kernel compiles its module only (for attention, its head dim's kernels)."""
    defines, names = kernel_build(stem, name)
    key = (stem, defines, name)
    fn = _functions.get(key)
    if fn is None:
        if name not in NAME_EXPRESSIONS.get(stem, ()):
            raise KeyError(f"{name!r} is not an instantiation listed for kernels_cu/{stem}.cu")
        fn = get_module(stem, defines, names).get_function(name)
        _functions[key] = fn
    return fn


def precompile_cupy() -> dict:
    """Compile every module (module_groups) through CuPy on the current GPU (fills CuPy's
    on-disk cache)."""
    out = {}
    for stem in NAME_EXPRESSIONS:
        for name in NAME_EXPRESSIONS[stem]:
            get_kernel(stem, name)
        out[stem] = len(NAME_EXPRESSIONS[stem])
    return out


def _gpu_available() -> bool:
    try:
        import cupy
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def build_parser() -> argparse.ArgumentParser:
    """The command line main() parses (the docs' command lines are checked against it:
    tests/test_docs_cite_real_flags.py)."""
    ap = argparse.ArgumentParser(prog="python -m cllm_gpu.kernels",
                                 description="Compile the cllm-gpu CUDA kernels.")
    ap.add_argument("--precompile", action="store_true",
                    help="on a GPU: compile through CuPy (warms its cache); without one: "
                         "NVRTC-check every kernel for --arch")
    ap.add_argument("--arch", action="append", default=None,
                    help="NVRTC target(s) for the check without a GPU (default sm_80, sm_90)")
    ap.add_argument("--nvrtc", action="store_true", help="force the NVRTC check even on a GPU")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.precompile:
        ap.print_help()
        return 2
    summary, ok = {}, True
    if _gpu_available() and not args.nvrtc:
        try:
            summary["cupy"] = precompile_cupy()
        except KernelCompileError as e:
            print(str(e), file=sys.stderr)
            return 1
    else:
        for arch in args.arch or ["sm_80", "sm_90"]:
            res = compile_all_nvrtc(arch)
            summary[arch] = {s: {"ok": r["ok"], "kernels": r["kernels"]} for s, r in res.items()}
            for stem, r in res.items():
                if not r["ok"]:
                    ok = False
                    print(r["error"], file=sys.stderr)
    if args.json:
        print(to_json(summary, sort_keys=True))
    else:
        for target, files in summary.items():
            for stem, r in files.items():
                status = r if isinstance(r, int) else ("ok" if r["ok"] else "FAILED")
                print(f"{target:8s} {stem:14s} {status}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
