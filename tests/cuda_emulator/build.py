"""Compile the real kernels_cu sources for the CPU emulator (emu_runtime.h).

The source is exactly `cllm_gpu.kernels.kernel_source(stem)`, transformed only where g++
cannot take CUDA text:
- every inline PTX `asm(...)` statement becomes a call to the emulation of that instruction
  (emu_runtime.h), its operands bound by the statement's own operand list (so an operand order
  mistake in the kernel stays a mistake in the emulation); an instruction without an emulation
  is a build error; an empty `asm volatile("" : "+r"(x))` (a compiler barrier) emits nothing;
- every `__shared__` declaration becomes a reference to the block's copy in the emulator's
  shared arena (`extern __shared__` arrays: the launch's dynamic shared memory).
Then per NAME_EXPRESSIONS instantiation a body (its arguments unpacked from a `void**` by the
kernel's parsed C signature, as cuLaunchKernel does) and an `extern "C"` launch wrapper that
passes the kernel's `__launch_bounds__`.

The kernel code is compiled with -fsanitize=thread (every load and store calls back into the
emulator's access checks; no TSan runtime is linked) and -fsanitize=bounds,alignment (reported
through the emulator too), and device functions are always inlined, so a warp collective's call
site is its own return address. The runtime (emu_runtime.cpp) is compiled once per variant,
optimised and not instrumented, and linked into every kernel library.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from cllm_gpu import kernels  # noqa: E402

CXX = os.environ.get("CXX", "g++")
# -fno-strict-aliasing: the kernels reinterpret bf16 pairs as 32-bit words, as CUDA allows.
# -fsanitize=thread: instrumentation only (the __tsan_* callbacks are emu_runtime.h's).
# -fsanitize=bounds,alignment: an out-of-range index into a fixed-size (register or shared)
# array, or a misaligned vector load/store, fails the launch with file and line.
# No cross-jumping, tail merging or identical-code folding: two call sites of a collective
# must stay two call instructions.
CXXFLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-w", "-fno-strict-aliasing",
            "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0",
            "-fsanitize=bounds,alignment", "-fno-sanitize-recover=all",
            "-fno-crossjumping", "-fno-tree-tail-merge", "-fno-ipa-icf", "-fno-thread-jumps",
            # each library keeps its own kernels, statics and runtime (mutants load beside the
            # real build): export only the launch wrappers, no process-wide unique symbols
            "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-fno-gnu-unique"]
# CLLM_EMU_FP_CONTRACT=1: the kernel code with a*b + c contracted into FMA instructions, as
# NVRTC and nvcc do by default (--fmad=true: fma.rn.f32 across statements). GCC picks its own
# pairs, not NVVM's: a second opinion on the bitwise checks, not a model (docs/emulator.md).
# (GCC forms FMAs in a pass that -O1 leaves out: -fexpensive-optimizations turns it on.)
FP_CONTRACT_FLAGS = ["-mfma", "-ffp-contract=fast", "-fexpensive-optimizations"]
# CLLM_EMU_COVERAGE=DIR: gcov instrumentation of the real kernels' code (coverage_dir), not
# optimised: at -O1 GCC turns short ifs into selects and those lines get no count at all
# (grad_norm.cu's clip factor; 866 executable kernel lines against 1,066 at -O0)
COVERAGE_FLAGS = ["--coverage", "-O0"]
LDFLAGS = ["-shared", "-pthread"]  # no sanitizer runtime: the emulator defines the callbacks
RUNTIME_FLAGS = ["-std=c++20", "-O2", "-fPIC", "-pthread", "-w", "-fno-strict-aliasing",
                 "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-fno-gnu-unique"]



def kernel_flags() -> list:
    """The g++ flags of kernel code: CXXFLAGS, with FP_CONTRACT_FLAGS under
    CLLM_EMU_FP_CONTRACT=1 (the CPU must have FMA3)."""
    if os.environ.get("CLLM_EMU_FP_CONTRACT", "0") in ("", "0"):
        return CXXFLAGS
    if sys.platform == "linux" and " fma " not in Path("/proc/cpuinfo").read_text():
        raise RuntimeError("CLLM_EMU_FP_CONTRACT=1: this CPU has no FMA instructions")
    return CXXFLAGS + FP_CONTRACT_FLAGS


signatures = kernels.kernel_signatures
split_name = kernels.split_name_expression
launch_bounds = kernels.kernel_launch_bounds


def param_type(decl: str, tmap: dict) -> tuple[str, str]:
    """'const T* x' -> ('const float*', 'x') with T substituted."""
    words = decl.replace("*", " * ").split()
    pname, ty = words[-1], words[:-1]
    ty = [tmap.get(w, w) for w in ty]
    return " ".join(ty).replace(" *", "*"), pname


# ---------------------------------------------------------------- asm -> emulation calls
def _scan_parens(src: str, start: int) -> int:
    """Index just past the ')' matching the '(' at src[start], skipping string literals."""
    depth, i = 0, start
    while i < len(src):
        ch = src[i]
        if ch == '"':
            i += 1
            while src[i] != '"':
                i += 2 if src[i] == "\\" else 1
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced asm statement")


def _split_top(s: str, sep: str) -> list[str]:
    parts, depth, cur, i = [], 0, "", 0
    while i < len(s):
        ch = s[i]
        if ch == '"':
            j = i + 1
            while s[j] != '"':
                j += 2 if s[j] == "\\" else 1
            cur += s[i:j + 1]
            i = j + 1
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    return parts


def _operands(section: str):
    out = []
    for op in _split_top(section, ","):
        op = op.strip()
        if not op:
            continue
        m = re.fullmatch(r'"([^"]*)"\s*\((.*)\)', op, re.S)
        if not m:
            raise ValueError(f"cannot parse asm operand {op!r}")
        out.append((m.group(1), m.group(2).strip()))
    return out


def _translate_asm(body: str) -> str:
    """The C++ for one asm statement's parenthesised body."""
    sections = _split_top(body, ":")
    template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', sections[0]))
    template = template.replace("\\n", " ").replace("\\t", " ").strip().rstrip(";").strip()
    outs = _operands(sections[1]) if len(sections) > 1 else []
    ins = _operands(sections[2]) if len(sections) > 2 else []
    ops = [e for _, e in outs] + [e for _, e in ins]
    mnemonic, _, rest = template.partition(" ")
    if not template:  # asm volatile("" : "+r"(x)): a compiler barrier on x, no instruction
        return ";"
    # operand list: %n or {%n, %m, ...}
    groups = []
    for g in _split_top(rest, ","):
        nums = [ops[int(n)] for n in re.findall(r"%(\d+)", g)]
        if "[" in g and not re.fullmatch(r"\s*\[\s*%\d+\s*\]\s*", g):
            raise ValueError(f"address operand {g.strip()!r}: only [%n] is emulated")
        if "{" in g:
            groups.append(nums)
        elif nums:
            groups.append(nums[0])
        elif g.strip():
            groups.append(g.strip())  # an immediate (cp.async's cp-size, wait_group's N)
    p = lambda e: f"({e})"  # noqa: E731
    if mnemonic == "cvt.rn.bf16.f32":
        d, a = groups
        return f"{p(d)} = ::cllm_emu::ptx_cvt_rn_bf16_f32({a});"
    if mnemonic == "cvt.rn.bf16x2.f32":
        d, a, b = groups
        return f"{p(d)} = ::cllm_emu::ptx_cvt_rn_bf16x2_f32({a}, {b});"
    if mnemonic == "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32":
        d, a, b, c = groups
        assert len(d) == 4 and len(a) == 4 and len(b) == 2 and len(c) == 4, template
        return ("{ const ::cllm_emu::F4 emu_d = "
                f"::cllm_emu::ptx_mma_m16n8k16_row_col_f32_bf16_bf16_f32({', '.join(a + b + c)}); "
                + " ".join(f"{p(e)} = emu_d.v[{i}];" for i, e in enumerate(d)) + " }")
    m = re.fullmatch(r"ldmatrix\.sync\.aligned\.m8n8\.x([124])(\.trans)?\.shared(?:::cta)?"
                     r"\.b16", mnemonic)
    if m:
        d, addr = groups
        assert len(d) == int(m.group(1)), template
        return ("{ const ::cllm_emu::U4 emu_r = ::cllm_emu::ptx_ldmatrix_m8n8_b16("
                f"{addr}, {m.group(1)}, {int(bool(m.group(2)))}); "
                + " ".join(f"{p(e)} = emu_r.v[{i}];" for i, e in enumerate(d)) + " }")
    m = re.fullmatch(r"cp\.async\.(ca|cg)\.shared(?:::cta)?\.global(?:\.L2::(?:64|128|256)B)?",
                     mnemonic)
    if m:
        dst, src, size, *src_size = groups
        src_size = src_size[0] if src_size else size
        return (f"::cllm_emu::ptx_cp_async({dst}, (const void*)({src}), "
                f"{size}, {src_size}, {int(m.group(1) == 'cg')});")
    if mnemonic == "cp.async.commit_group":
        return "::cllm_emu::ptx_cp_async_commit_group();"
    if mnemonic == "cp.async.wait_group":
        (n,) = groups
        return f"::cllm_emu::ptx_cp_async_wait_group({n});"
    if mnemonic == "cp.async.wait_all":
        return "::cllm_emu::ptx_cp_async_wait_group(-1);"
    raise ValueError(f"no CPU emulation for the PTX instruction {mnemonic!r}")


ASM_RE = re.compile(r"\basm\s*(?:volatile\s*)?\(")
COMMENT_OR_STRING_RE = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:[^"\\\n]|\\.)*"', re.S)
SHARED_RE = re.compile(r"__shared__\s+(?:__align__\((\d+)\)\s+)?([^;()]*?)\b(\w+)\s*"
                       r"((?:\[[^\]]*\])+)\s*;")
DYN_SHARED_RE = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([^;()]*?)\b(\w+)"
                           r"\s*\[\s*\]\s*;")


def emulated_source(stem: str, src: str | None = None, header: str | None = None,
                    only=None, names=None, defines=()) -> tuple[str, dict]:
    """(C++ source, {name expression: wrapper index}) for kernels_cu/<stem>.cu, or for the
    given source text / runtime header (mutation tests); `only`: a subset of the
    instantiations (a smaller, faster build); `names`: the instantiations of a source that is
    not in kernels_cu (default NAME_EXPRESSIONS[stem]); `defines`: compile-time settings
    ((macro, value), ...: kernels.kernel_build), defined ahead of the source as -D would."""
    src = kernels.kernel_source(stem) if src is None else src
    src = "".join(f"#define {k} {v}\n" for k, v in defines) + src
    out, pos, n_asm = [], 0, 0
    quoted = [c.span() for c in COMMENT_OR_STRING_RE.finditer(src)]
    for m in ASM_RE.finditer(src):
        if m.start() < pos or any(a <= m.start() < b for a, b in quoted):
            continue  # (an "asm (...)" in a comment is prose: it ate the text to the next ';')
        end = _scan_parens(src, m.end() - 1)
        semi = src.index(";", end)
        out.append(src[pos:m.start()])
        # the statement's line breaks kept after its one-line translation: the lines below
        # it keep their kernels_cu numbers (#line), in messages and in coverage counts
        out.append(_translate_asm(src[m.end():end - 1]) + "\n" * src.count("\n", m.start(), semi))
        pos = semi + 1
        n_asm += 1
    out.append(src[pos:])
    text = "".join(out)
    text = DYN_SHARED_RE.sub(
        lambda m: f"CLLM_EMU_SHARED_DYNAMIC({m.group(1).strip()}, {m.group(2)});", text)
    text = SHARED_RE.sub(
        lambda m: f"CLLM_EMU_SHARED({m.group(2).strip()}, {m.group(3)}, {m.group(4)}, "
                  f"{m.group(1) or 1});", text)
    code = COMMENT_OR_STRING_RE.sub("", text)
    if "__shared__" in code or re.search(r"\basm\b", code):
        raise ValueError(f"{stem}: a __shared__ or asm the emulator build did not translate")
    sigs = signatures(src)
    bounds = launch_bounds(src)
    defaults = kernels.kernel_template_defaults(src)  # names may omit defaulted arguments
    wrappers, symbols = [], {}
    for i, name in enumerate(names if names is not None else kernels.NAME_EXPRESSIONS[stem]):
        if only is not None and name not in only:
            continue
        base, targs = split_name(name)
        tparams, params = sigs[base]
        tmap = {**defaults.get(base, {}), **dict(zip(tparams, targs))}
        args = []
        for j, decl in enumerate(params):
            ty, _ = param_type(decl, tmap)
            args.append(f"*reinterpret_cast<{ty}*>(a[{j}])")
        # the launch bounds with the template arguments substituted (C++ evaluates them)
        mt, mb = bounds.get(base, ("0", None))
        mt, mb = (_substitute(e, tmap) if e else "0" for e in (mt, mb))
        symbols[name] = i
        wrappers.append(
            f"CLLM_EMU_HOST_CODE static void cllm_emu_body_{i}(void** a) {{ "
            f"{name}({', '.join(args)}); }}\n"
            f'{EXPORT} int cllm_emu_kernel_{i}(const unsigned* g, const unsigned* b, void** a, '
            f"const ::cllm_emu::LaunchOptions* o) {{\n    return ::cllm_emu::launch("
            f"{json.dumps(name)}, g, b, o, cllm_emu_body_{i}, a, (int)({mt}));\n}}\n"
            f"{EXPORT} void cllm_emu_bounds_{i}(int* out) {{ out[0] = (int)({mt}); "
            f"out[1] = (int)({mb}); }}\n")
    header = (HERE / "emu_runtime.h").read_text() if header is None else header
    # the wrappers' lines are not the kernel file's (messages, coverage)
    full = (header + "\n" + text + "\n" + '#line 1 "cllm_emu_wrappers"\n' + "".join(wrappers)
            + f"{EXPORT} const char* cllm_emu_error() {{ return ::cllm_emu::last_error(); }}\n")
    return full, symbols


EXPORT = 'extern "C" __attribute__((visibility("default"))) CLLM_EMU_HOST_CODE'


def _substitute(expr: str, tmap: dict) -> str:
    """A launch-bounds expression with template parameter names replaced by their values."""
    return re.sub(r"\b\w+\b", lambda m: tmap.get(m.group(0), m.group(0)), expr)


def cache_dir() -> Path:
    d = Path(os.environ.get("CLLM_EMU_CACHE", Path(tempfile.gettempdir()) / "cllm_emu_cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def runtime_source(header: str | None = None, part: str | None = None,
                   name: str = "emu_runtime.cpp") -> str:
    """A runtime translation unit (emu_runtime.cpp or emu_ptx.cpp) after the header's shared
    declarations; `header`, `part`: mutated texts, for the tests that break the emulator on
    purpose."""
    header = (HERE / "emu_runtime.h").read_text() if header is None else header
    part = (HERE / name).read_text() if part is None else part
    return "#define CLLM_EMU_RUNTIME_IMPL\n" + header + "\n" + part


def _compile(text: str, flags: list, out: Path, what: str) -> None:
    """Compile `text` to the object `out` (the source is kept beside it, for debugging)."""
    uniq = f"{os.getpid()}-{threading.get_ident()}"
    cpp = out.with_suffix(f".{uniq}.cpp")
    cpp.write_text(text)
    tmp = out.with_suffix(f".{uniq}.tmp")
    r = subprocess.run([CXX, *flags, "-c", "-o", str(tmp), str(cpp)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"g++ failed for {what}:\n{r.stderr[-6000:]}")
    os.replace(cpp, out.with_suffix(".cpp"))
    os.replace(tmp, out)


def runtime_objects(header: str | None = None, runtime: str | None = None,
                    ptx: str | None = None) -> list[Path]:
    """The compiled runtime (cached by content): emu_runtime.cpp and emu_ptx.cpp, linked into
    every kernel library."""
    objs = []
    for name, part in (("emu_runtime.cpp", runtime), ("emu_ptx.cpp", ptx)):
        text = runtime_source(header, part, name)
        key = hashlib.sha256((text + " ".join([CXX, *RUNTIME_FLAGS])).encode()).hexdigest()[:20]
        obj = cache_dir() / f"{Path(name).stem}-{key}.o"
        if not obj.exists():
            _compile(text, RUNTIME_FLAGS, obj, name)
        objs.append(obj)
    return objs


def build(stem: str, src: str | None = None, header: str | None = None,
          only=None, names=None, runtime: str | None = None,
          ptx: str | None = None, defines=()) -> tuple[Path, dict]:
    """Compile (cached by content hash) and return (shared library path, symbols). `header`,
    `runtime`, `ptx`: mutated texts of emu_runtime.h, emu_runtime.cpp, emu_ptx.cpp;
    `defines`: compile-time settings (emulated_source)."""
    text, symbols = emulated_source(stem, src, header, only, names, defines)
    rt = runtime_objects(header, runtime, ptx)
    # coverage counts the real kernels only: a mutant's lines are not the kernel's
    cov = coverage_dir() if src is None and header is runtime is ptx is None else None
    flags, ldflags = kernel_flags(), LDFLAGS
    if cov is not None:
        flags, ldflags = flags + COVERAGE_FLAGS, ldflags + COVERAGE_FLAGS
    key = hashlib.sha256((text + " ".join(o.name for o in rt)
                          + " ".join([CXX, *flags, *ldflags]) + str(cov or "")).encode())
    so = cache_dir() / f"{stem}-{key.hexdigest()[:20]}.so"
    if not so.exists():
        # under coverage the object (its .gcno, and at exit the .gcda) goes to the coverage
        # directory and stays there
        obj = (so if cov is None else cov / so.name).with_suffix(
            f".{os.getpid()}-{threading.get_ident()}.o")
        _compile(text, flags, obj, stem)
        tmp = so.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
        r = subprocess.run([CXX, *ldflags, "-o", str(tmp), str(obj), *map(str, rt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"linking {stem} failed:\n{r.stderr[-6000:]}")
        if cov is None:
            obj.unlink()
        os.replace(tmp, so)
    return so, symbols


def coverage_dir() -> Path | None:
    """CLLM_EMU_COVERAGE=DIR: the directory the kernel builds' gcov notes and counts go to
    (tests/cuda_emulator/kernel_coverage.py reads them back), or None (the default build)."""
    d = os.environ.get("CLLM_EMU_COVERAGE", "")
    if not d:
        return None
    path = Path(d).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


_NO_RESOURCES: set = set()  # keys NVRTC could not give counts for in this process

_RESOURCES_SCRIPT = """
import json, sys
from cllm_gpu import kernels
stem, names, path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
options = json.loads(sys.argv[4])
src = open(path).read()
print(json.dumps(kernels.ptxas_resources(src, stem + ".cu", names, "sm_90", options)))
"""


def resources(stem: str, src: str | None = None, names=None, defines=()):
    """{name expression: {"registers", "smem", ...}} from NVRTC's sm_90 ptxas for a kernel file
    (cached in cache_dir() by content), or None where NVRTC is unavailable (CLLM_EMU_NO_NVRTC=1
    says so too). A mutated kernels_cu source (a test's OVERRIDE) is checked against the
    unmutated file's counts: compiling every mutant would take minutes. `names`: the
    instantiations of one module (kernels.kernel_build: a module_groups one, or with
    compile-time settings `defines` those built with them); a real file's default: all."""
    real = stem in kernels.NAME_EXPRESSIONS
    if real:
        src = kernels.kernel_source(stem)
        names = kernels.NAME_EXPRESSIONS[stem] if names is None else names
    names = list(names)
    options = list(kernels.define_options(defines))
    # (the parser's own text is in the key: a new field re-runs NVRTC; so are the options
    # compile_source_nvrtc adds)
    parser = "".join(inspect.getsource(f) for f in (kernels.ptxas_resources,
                                                      kernels.ptx_launch_bounds))
    added = " ".join(kernels.NVRTC_OPTIONS + kernels.CUPY_NVRTC_ADDED_OPTIONS)
    key = hashlib.sha256((src + "\n".join(names) + "sm_90" + " ".join(options) + added
                          + parser).encode()).hexdigest()[:20]
    path = cache_dir() / f"resources-{stem}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    if os.environ.get("CLLM_EMU_NO_NVRTC") or key in _NO_RESOURCES:
        return None
    # NVRTC through the real cupy, in a process of its own (this one may hold the fake)
    with tempfile.NamedTemporaryFile("w", suffix=".cu", delete=False) as f:
        f.write(src)
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        r = subprocess.run([sys.executable, "-c", _RESOURCES_SCRIPT, stem, json.dumps(names),
                            f.name, json.dumps(options)], capture_output=True, text=True,
                           env=env)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        if "KernelCompileError" in r.stderr:
            raise RuntimeError(f"NVRTC failed for {stem}:\n{r.stderr[-4000:]}")
        _NO_RESOURCES.add(key)  # (asked again at every kernel lookup: ~0.2 s per subprocess)
        return None  # no cupy or no NVRTC library here
    res = json.loads(r.stdout)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(res, indent=0, sort_keys=True))
    os.replace(tmp, path)
    return res


def build_all(stems=None, jobs: int = 2) -> dict:
    """Build every stem, `jobs` compilers at a time (each in its own process)."""
    from concurrent.futures import ThreadPoolExecutor
    stems = list(stems or kernels.NAME_EXPRESSIONS)
    with ThreadPoolExecutor(jobs) as ex:
        res = dict(zip(stems, ex.map(build, stems)))
    return res


if __name__ == "__main__":
    if shutil.which(CXX) is None:
        sys.exit(f"{CXX} not found")
    for stem, (so, syms) in build_all(sys.argv[1:] or None).items():
        print(stem, so, len(syms))
    print(json.dumps({"ok": True}))
