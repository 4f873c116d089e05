"""CUDA kernels without a GPU: every kernels_cu/*.cu compiles with NVRTC (every template
instantiation the launchers use) for sm_80 and sm_90, and every kernel file has its op module
with CUDA launchers and its GPU test file."""
import functools
import importlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from cllm_gpu import kernels

REPO = Path(__file__).resolve().parent.parent
ARCHS = ["compute_80", "compute_90"]
pytestmark = pytest.mark.ci_required("nvrtc")


def _nvrtc_or_skip():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as e:  # cupy or the NVRTC library missing: nothing to compile with
        pytest.skip(f"cupy.cuda.nvrtc unavailable ({type(e).__name__}: {e}); install the dev "
                    "extra (cupy-cuda12x + nvidia-cuda-nvrtc-cu12)")
    return nvrtc


STEMS = sorted(p.stem for p in (REPO / "kernels_cu").glob("*.cu"))


def _in_parallel(fn, items) -> list:
    """[fn(item) for item in items], one item per core at a time: each compile (an nvcc
    process, or NVRTC, which runs without the GIL) is single-threaded, and attention's nine
    modules one after another took most of a minute on CI's two cores."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        return list(pool.map(fn, items))


def test_kernel_files_present():
    assert (REPO / "kernels_cu" / "common.cuh").is_file()
    assert set(STEMS) == set(kernels.NAME_EXPRESSIONS), \
        "kernels_cu/*.cu and kernels.NAME_EXPRESSIONS disagree"
    assert kernels.kernels_dir() == REPO / "kernels_cu"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stem", STEMS)
def test_compiles_with_nvrtc(stem, arch):
    """Each module get_kernel compiles (kernels.module_groups) compiles by itself."""
    _nvrtc_or_skip()
    groups = kernels.module_groups(stem)
    for names, r in zip(groups, _in_parallel(
            lambda names: kernels.compile_nvrtc(stem, arch, names=names), groups)):
        assert set(r["lowered_names"]) == set(names)
        assert all(r["lowered_names"].values())
        assert r["size"] > 0
        assert "warning" not in (r["log"] or "").lower(), r["log"]


def test_module_groups():
    """Every instantiation is in exactly one module; attention's are one module per head dim
    (the one without a head dim apart), every other file's one module."""
    for stem in STEMS:
        groups = kernels.module_groups(stem)
        flat = [n for g in groups for n in g]
        assert sorted(flat) == sorted(kernels.NAME_EXPRESSIONS[stem]), stem
        assert len(flat) == len(set(flat)), stem
        if stem != "attention":
            assert len(groups) == 1, stem
    att = kernels.module_groups("attention")
    first = [{kernels.split_name_expression(n)[1][0] for n in g} for g in att]
    assert first == [{str(d)} for d in kernels.ATTENTION_HEAD_DIMS] + [{"float"}]
    assert max(len(g) for g in att) == 21


def test_a_launch_compiles_its_module_only(monkeypatch):
    """get_kernel of a D = 64 attention kernel builds the D = 64 module (no GPU needed: the
    module is a stand-in recording what it was asked to compile)."""
    built = []

    class Module:
        def get_function(self, name):
            return name
    monkeypatch.setattr(kernels, "get_module",
                        lambda stem, defines, names: built.append((stem, defines, names))
                        or Module())
    monkeypatch.setattr(kernels, "_functions", {})
    d64 = tuple(n for n in kernels.NAME_EXPRESSIONS["attention"]
                if kernels.split_name_expression(n)[1][0] == "64")
    assert len(d64) == 21
    for name in ("attention_forward_mma_kernel<64>", "attention_backward_dkv_kernel<64, true>"):
        assert kernels.kernel_build("attention", name) == ((), d64)
        assert kernels.get_kernel("attention", name) == name
    gelu = tuple(kernels.NAME_EXPRESSIONS["gelu"])
    assert kernels.get_kernel("gelu", gelu[0]) == gelu[0]
    assert built == [("attention", (), d64)] * 2 + [("gelu", (), gelu)]
    with pytest.raises(KeyError, match="not an instantiation listed"):
        kernels.get_kernel("attention", "attention_forward_kernel<24>")
    # precompile_cupy builds every module, each once (get_module keeps them)
    built.clear()
    monkeypatch.setattr(kernels, "_functions", {})
    modules = {}

    def get_module(stem, defines, names):
        if (stem, defines, names) not in modules:
            built.append((stem, names))
            modules[stem, defines, names] = Module()
        return modules[stem, defines, names]
    monkeypatch.setattr(kernels, "get_module", get_module)
    assert kernels.precompile_cupy() == {s: len(n) for s, n in kernels.NAME_EXPRESSIONS.items()}
    assert built == [(s, g) for s in kernels.NAME_EXPRESSIONS for g in kernels.module_groups(s)]


def _sm90_resources():
    """{stem: {name expression: ptxas resources}} for every kernel file, each module
    (kernels.module_groups) compiled once to sm_90 machine code, as get_kernel compiles it
    (cached with the CUDA emulator's builds, which ask for the same: tests/cuda_emulator/
    build.py)."""
    _nvrtc_or_skip()
    from cuda_emulator import build
    res = {}
    for stem in STEMS:
        for names in kernels.module_groups(stem):
            r = build.resources(stem, names=names)
            if r is None:
                pytest.skip("NVRTC could not compile for sm_90 here")
            res.setdefault(stem, {}).update(r)
    return res


def test_sm90_cubin_compiles_without_register_spills():
    """Every instantiation compiles to sm_90 machine code and ptxas reports no spills (the
    attention kernels keep D/4-wide rows in registers; a spill would make them much slower)."""
    res = _sm90_resources()
    assert {n for r in res.values() for n in r} == \
        {n for s in STEMS for n in kernels.NAME_EXPRESSIONS[s]}
    spills = [(n, r) for rs in res.values() for n, r in rs.items()
              if r["spill_stores"] or r["spill_loads"]]
    assert not spills, spills


# Spills CUDA 13's ptxas reports (nvcc 13 -cubin for sm_90 with CuPy's -ftz=true, each module
# as get_kernel builds it: kernels.module_groups) where NVRTC 12.9 reports none: {name: bytes
# of spill stores at most}. Any other spill, or one that grows, fails.
#   forward D = 64: 2 blocks of 8 warps at 128 registers; the alternatives (130 registers and
#     1 block, or 64-query blocks) are a GPU measurement (kernels_cu/attention.cu AttnMmaCfg);
#   forward D = 80, 96 with the bias, dkv D = 48 and D = 16 with the bias: ptxas's own choice
#     under -ftz=true (none without it), no target;
#   the fp32 kernels' backward at D <= 32 (fallback head dims, not an mma kernel's).
# (The float64 LayerNorm backward spilled 20 bytes until h29a's change; nvcc 13.0 shows 0.)
CUDA13_KNOWN_SPILLS = {
    "attention_forward_mma_kernel<64, false>": 16, "attention_forward_mma_kernel<64, true>": 76,
    "attention_forward_mma_kernel<80, true>": 64, "attention_forward_mma_kernel<96, true>": 16,
    "attention_backward_dkv_mma_kernel<48, false, float>": 8,
    "attention_backward_dkv_mma_kernel<48, false, cllm_bf16>": 12,  # its bf16-dqkv twin
    "attention_backward_dkv_mma_kernel<16, true, float>": 4,
    "attention_backward_dkv_mma_kernel<16, true, cllm_bf16>": 4,
    "attention_backward_dq_kernel<16, false>": 12, "attention_backward_dq_kernel<16, true>": 4,
    "attention_backward_dq_kernel<32, true>": 12,
    "attention_backward_dkv_kernel<16, false>": 16, "attention_backward_dkv_kernel<16, true>": 24,
}


def nvcc13_cubin(source, stem, names, options=(), ptx=False):
    """(CUBIN bytes, the compile's CompletedProcess[, its PTX text]) of `source` with the
    instantiations `names`, from CUDA 13's nvcc for sm_90 with the options CuPy adds
    (kernels.CUPY_ADDED_OPTIONS) and `options`; skips without a CUDA 13 nvcc on the PATH. The
    GPU image's CuPy compiles with NVRTC 13, the same compiler inside. ptx: also the PTX that
    ptxas compiled (nvcc's intermediate file, kept: no second compile)."""
    import shutil
    import subprocess
    import tempfile
    nvcc = shutil.which("nvcc")
    if nvcc is None or "release 13" not in subprocess.run([nvcc, "--version"],
                                                          capture_output=True, text=True).stdout:
        pytest.skip("no CUDA 13 nvcc on the PATH")
    src = source + "\n" + "\n".join(
        f"static void* cllm_take_{i} = (void*)&{n};" for i, n in enumerate(names))
    with tempfile.TemporaryDirectory() as d:
        cu = Path(d) / f"{stem}.cu"
        cu.write_text(src)
        keep = ("--keep", "--keep-dir", d) if ptx else ()
        r = subprocess.run([nvcc, "-cubin", "-arch=sm_90", *kernels.CUPY_ADDED_OPTIONS,
                            *options, *keep, "-o", str(cu.with_suffix(".cubin")), str(cu)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        cubin = cu.with_suffix(".cubin").read_bytes()
        return (cubin, r, cu.with_suffix(".ptx").read_text()) if ptx else (cubin, r)


@functools.lru_cache(maxsize=None)
def _cuda13_resources(stem, names=None, options=()):
    """{demangled kernel name: {"registers", "smem" (static bytes), "spill_stores",
    "spill_loads", "max_threads", "min_blocks"}} from nvcc 13's sm_90 ptxas (-v) for one kernel file with
    every instantiation its launchers use (or the tuple `names`, compiled with `options`),
    compiled with the options CuPy adds (kernels.CUPY_ADDED_OPTIONS); the last two are the
    launch bounds as compiled (the PTX's .maxntid / .minnctapersm; None / 0 when absent).
    One compile per module serves the spill and the resource tests."""
    names = kernels.NAME_EXPRESSIONS[stem] if names is None else names
    _, r, ptx = nvcc13_cubin(kernels.kernel_source(stem), stem, names,
                             ("-Xptxas", "-v", *options), ptx=True)
    bounds = kernels.ptx_launch_bounds(ptx)
    res, entry, props = {}, None, None
    for line in r.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            entry = m.group(1)
            threads, blocks = bounds.get(entry, (None, 0))
            res[entry] = {"registers": 0, "smem": 0, "spill_stores": 0, "spill_loads": 0,
                          "max_threads": threads, "min_blocks": blocks}
        elif m := re.search(r"Function properties for (\S+)", line):
            props = m.group(1)  # an entry, or a called (noinline) function: counted apart
        elif (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)) \
                and props == entry:
            res[entry].update(spill_stores=int(m.group(1)), spill_loads=int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and entry is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            res[entry].update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
    return {kernel_name(m): v for m, v in res.items()}


def _cuda13_spills(stem, names=None, options=()):
    """{demangled kernel name: bytes of spill stores} of the kernels nvcc 13's sm_90 ptxas
    spills in (stores or loads; _cuda13_resources)."""
    res = _cuda13_resources(stem, None if names is None else tuple(names), tuple(options))
    return {n: r["spill_stores"] for n, r in res.items() if r["spill_stores"] or r["spill_loads"]}


def kernel_name(mangled: str) -> str:
    """A kernel's mangled name as 'name<args>' without spaces, every template argument
    written out (c++filt): '_Z12adamw_kernelIfLb0EEv...' -> 'adamw_kernel<float,false>'."""
    d = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    return d.split("(")[0].removeprefix("void ").replace(" ", "")


@pytest.mark.ci_required("nvcc13")
@pytest.mark.parametrize("stem", sorted(kernels.NAME_EXPRESSIONS))
def test_sm90_cuda13_spills_only_the_known_ones(stem):
    """The GPU image's CuPy compiles with NVRTC 13, whose ptxas allocates differently from the
    NVRTC 12.9 of the test above: every spill it reports must be a known one, no larger (each
    module compiled apart, as on the GPU: ptxas's choices depend on what else is in it)."""
    known = {k.replace(" ", ""): b for k, b in CUDA13_KNOWN_SPILLS.items()}
    spills = {}
    # (the modules get_kernel compiles)
    for found in _in_parallel(lambda names: _cuda13_spills(stem, names),
                              kernels.module_groups(stem)):
        spills.update(found)
    unknown = {n: b for n, b in spills.items() if b > known.get(n, 0)}
    assert not unknown, f"new or grown spills under CUDA 13 ptxas: {unknown}"


SM90_STATIC_SMEM = 48 * 1024     # static shared memory, and dynamic without the opt-in
SM90_SMEM_PER_BLOCK = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin
SM90_SMEM_PER_SM = 228 * 1024     # of which 1 KiB is reserved per resident block


@pytest.mark.ci_required("nvcc13")
@pytest.mark.parametrize("stem", sorted(kernels.NAME_EXPRESSIONS))
def test_sm90_cuda13_resources_fit_every_launch(stem):
    """What the GPU checks at a launch, with the registers of the compiler the GPU image uses
    (NVRTC 13; nvcc 13 here), every module as get_kernel builds it: each kernel declares
    __launch_bounds__ (the emulator refuses a launch above it, as the GPU does), its registers
    x its largest block (x the blocks per SM it declares) fit the 64 K of an SM, its static
    shared memory the 48 KiB a launch takes without the opt-in. The tensor-core attention
    kernels: no static shared memory (attention._mma_launch raises the kernel's limit only
    for dynamic bytes above 48 KiB: with static bytes a smaller launch would fail too), and
    static + the launcher's dynamic bytes within the 227 KiB of a block and, for the declared
    blocks per SM, the SM's 228 KiB."""
    from cuda_emulator.fake_cupy import REGISTERS_PER_BLOCK, registers_per_block
    from cllm_gpu.ops.attention import _mma_smem_bytes
    res = {}
    for found in _in_parallel(lambda names: _cuda13_resources(stem, names, ()),
                              kernels.module_groups(stem)):
        res.update(found)
    assert len(res) == len(kernels.NAME_EXPRESSIONS[stem])
    kinds = ("forward", "backward_dq", "backward_dkv", "backward")
    bad = []
    for name, r in sorted(res.items()):
        if r["max_threads"] is None:
            bad.append(f"{name}: no __launch_bounds__")
            continue
        blocks = max(1, r["min_blocks"])
        need = registers_per_block(r["registers"], r["max_threads"]) * blocks
        if need > REGISTERS_PER_BLOCK:
            bad.append(f"{name}: {r['registers']} registers x {r['max_threads']} threads x "
                       f"{blocks} blocks = {need} > {REGISTERS_PER_BLOCK}")
        if r["smem"] > SM90_STATIC_SMEM:
            bad.append(f"{name}: {r['smem']} bytes of static shared memory")
        base, targs = kernels.split_name_expression(name)
        if "_mma_kernel" in base and base != "attention_backward_delta_kernel":
            dyn = _mma_smem_bytes(int(targs[0]))[kinds.index(
                base[len("attention_"):-len("_mma_kernel")])]
            if r["smem"]:
                bad.append(f"{name}: {r['smem']} bytes of static shared memory beside "
                           f"{dyn} dynamic")
            if r["smem"] + dyn > SM90_SMEM_PER_BLOCK \
                    or blocks * (r["smem"] + dyn + 1024) > SM90_SMEM_PER_SM:
                bad.append(f"{name}: {r['smem']} + {dyn} bytes of shared memory x {blocks} "
                           f"blocks")
    assert not bad, bad

# ---- compile-time settings (kernels.SETTINGS): the D = 64 forward built as 4 warps x 3 blocks,
# and as 4 warps of two 16-row m-tiles x 2 blocks
D64_FWD_4X3 = (("CLLM_ATTN_FWD_MIN_BLOCKS_D64", 3), ("CLLM_ATTN_FWD_WARPS_D64", 4))
D64_FWD_M2 = (("CLLM_ATTN_FWD_MIN_BLOCKS_D64", 2), ("CLLM_ATTN_FWD_MTILES_D64", 2),
              ("CLLM_ATTN_FWD_WARPS_D64", 4))
# (build, threads per block, blocks per SM it declares)
D64_FWD_BUILDS = [(D64_FWD_4X3, 128, 3), (D64_FWD_M2, 128, 2)]


def test_setting_defaults_are_the_sources():
    """Each setting's default is its kernel file's `#ifndef` value (the launcher assumes it
    when no -D option is given), and it names instantiations the file has."""
    for stem, settings in kernels.SETTINGS.items():
        src = (REPO / "kernels_cu" / f"{stem}.cu").read_text()
        for name, default in settings.items():
            m = re.search(rf"^#ifndef {name}\n#define {name} (\d+)\n#endif$", src, re.M)
            assert m and int(m.group(1)) == default, name
        assert set(kernels.SETTING_KERNELS[stem]) <= set(kernels.NAME_EXPRESSIONS[stem])


def test_use_settings_selects_the_build_and_the_launcher_follows():
    from cllm_gpu.ops.attention import _mma_forward_mtiles, _mma_forward_warps, _mma_smem_bytes
    names = kernels.SETTING_KERNELS["attention"]
    every = kernels.kernel_build("attention", "attention_backward_dq_mma_kernel<64>")[1]
    assert set(names) < set(every)  # (the D = 64 module)
    assert kernels.kernel_build("attention", names[0]) == ((), every)
    assert [_mma_forward_warps(d) for d in (16, 48, 64, 80, 128)] == [8, 8, 8, 4, 4]
    kernels.use_settings("attention", **dict(D64_FWD_4X3))
    try:
        assert kernels.setting("attention", "CLLM_ATTN_FWD_WARPS_D64") == 4
        assert [_mma_forward_warps(d) for d in (16, 48, 64, 80, 128)] == [8, 8, 4, 4, 4]
        for n in names:  # the setting's kernels from a module of their own; the rest as before
            assert kernels.kernel_build("attention", n) == (D64_FWD_4X3, names)
        assert kernels.kernel_build("attention", "attention_backward_dq_mma_kernel<64>") == \
            ((), every)
        assert kernels.define_options(D64_FWD_4X3) == ("-DCLLM_ATTN_FWD_MIN_BLOCKS_D64=3",
                                                       "-DCLLM_ATTN_FWD_WARPS_D64=4")
        # one value back at its default: only the other is a -D option
        kernels.use_settings("attention", CLLM_ATTN_FWD_WARPS_D64=4)
        assert kernels.kernel_build("attention", names[0])[0] == \
            (("CLLM_ATTN_FWD_WARPS_D64", 4),)
        with pytest.raises(ValueError, match="no compile-time setting 'CLLM_ATTN_FWD_WARPS_D32'"):
            kernels.use_settings("attention", CLLM_ATTN_FWD_WARPS_D32=4)
        with pytest.raises(ValueError, match="expected an int"):
            kernels.use_settings("attention", CLLM_ATTN_FWD_WARPS_D64="4")
    finally:
        kernels.use_settings("attention")
    assert kernels.kernel_build("attention", names[0]) == ((), every)
    assert _mma_forward_warps(64) == 8
    kernels.use_settings("attention", CLLM_ATTN_FWD_WARPS_D64=8, CLLM_ATTN_FWD_MIN_BLOCKS_D64=2)
    assert kernels.kernel_build("attention", names[0]) == ((), every)  # the defaults: no -D
    # two m-tiles per warp: 128 queries per 4-warp block, the Q rows in shared memory too
    assert _mma_forward_mtiles(64) == 1 and _mma_smem_bytes(64)[0] == 4 * 64 * 144
    kernels.use_settings("attention", **dict(D64_FWD_M2))
    try:
        assert [_mma_forward_mtiles(d) for d in (48, 64, 80)] == [1, 2, 1]
        assert _mma_forward_warps(64) == 4
        assert _mma_smem_bytes(64)[0] == (4 * 64 + 128) * 144
        assert _mma_smem_bytes(48)[0] == 4 * 64 * 112
        # (the blocks per SM at their default: no -D option)
        assert kernels.kernel_build("attention", names[0]) == (D64_FWD_M2[1:], names)
    finally:
        kernels.use_settings("attention")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("build,threads,blocks", D64_FWD_BUILDS)
def test_attention_forward_d64_builds_compile_with_nvrtc(arch, build, threads, blocks):
    _nvrtc_or_skip()
    names = kernels.SETTING_KERNELS["attention"]
    r = kernels.compile_source_nvrtc(kernels.kernel_source("attention"), "attention.cu", names,
                                     arch, kernels.define_options(build))
    assert set(r["lowered_names"]) == set(names) and all(r["lowered_names"].values())
    assert "warning" not in (r["log"] or "").lower(), r["log"]
    bounds = kernels.ptx_launch_bounds(r["ptx"])
    assert {bounds[r["lowered_names"][n]] for n in names} == {(threads, blocks)}


def test_settings_change_only_their_kernels():
    """The -D options leave every other kernel's code as it is (a sample of them: the mma
    kernels the D = 64 model also runs, and other head dims' forwards): a launch of those may
    come from the default module whatever the settings."""
    _nvrtc_or_skip()
    names = ["attention_backward_dq_mma_kernel<64>", "attention_backward_dkv_mma_kernel<64, true>",
             "attention_forward_mma_kernel<48>", "attention_forward_mma_kernel<128, true>"]
    src = kernels.kernel_source("attention")

    def entries(options):
        ptx = kernels.compile_source_nvrtc(src, "attention.cu", names, "compute_90", options)["ptx"]
        return dict(re.findall(r"\.entry\s+(\w+)(.*?\n\})", ptx, re.S))
    default = entries(())
    assert len(default) == len(names)
    for build, _, _ in D64_FWD_BUILDS:
        assert entries(kernels.define_options(build)) == default


@pytest.mark.parametrize("build,threads,blocks", D64_FWD_BUILDS)
def test_sm90_attention_forward_d64_builds_resources(build, threads, blocks):
    """The 4-warp builds: 128 threads, their blocks per SM within the register file and the
    shared memory, no spill (NVRTC's sm_90 ptxas)."""
    _nvrtc_or_skip()
    from cuda_emulator import build as emu_build
    from cuda_emulator.fake_cupy import REGISTERS_PER_BLOCK, registers_per_block
    from cllm_gpu.ops.attention import _mma_smem_bytes
    names = kernels.SETTING_KERNELS["attention"]
    res = emu_build.resources("attention", names=names, defines=build)
    if res is None:
        pytest.skip("NVRTC could not compile for sm_90 here")
    assert set(res) == set(names)
    kernels.use_settings("attention", **dict(build))
    try:
        smem = _mma_smem_bytes(64)[0]
    finally:
        kernels.use_settings("attention")
    for name, r in res.items():
        assert (r["max_threads"], r["min_blocks"]) == (threads, blocks), name
        assert not (r["spill_stores"] or r["spill_loads"]), (name, r)
        assert blocks * registers_per_block(r["registers"], threads) <= REGISTERS_PER_BLOCK, \
            (name, r)
        assert blocks * (r["smem"] + smem + 1024) <= 228 * 1024, (name, r, smem)


@pytest.mark.ci_required("nvcc13")
@pytest.mark.parametrize("build,known", [(D64_FWD_4X3, {}), (D64_FWD_M2, {
    "attention_forward_mma_kernel<64,true>": 12})])
def test_sm90_cuda13_attention_forward_d64_builds_spill_less(build, known):
    """CUDA 13's ptxas spills the default D = 64 forward (CUDA13_KNOWN_SPILLS: 16 and 76
    bytes); the 4-warp, 3-block build spills nothing, the 2-m-tile, 2-block one (255
    registers, Q's fragments read from shared memory per tile: in registers it spilled 32
    bytes with the bias before -ftz=true) 12 bytes with the bias; nothing grows."""
    names = kernels.SETTING_KERNELS["attention"]
    spills = _cuda13_spills("attention", names, kernels.define_options(build))
    assert {n: b for n, b in spills.items() if b > known.get(n, 0)} == {}, spills


def test_sm90_registers_fit_the_launch_bounds():
    """Every kernel declares __launch_bounds__ (the emulator refuses a launch above it, as the
    GPU does), its registers (sm_90 ptxas) x its maximum block fit the 64 K registers of an
    SM, and where a minimum of resident blocks is declared, that many blocks fit."""
    from cuda_emulator.fake_cupy import REGISTERS_PER_BLOCK, registers_per_block
    res = _sm90_resources()
    bad = []
    for rs in res.values():
        for name, r in rs.items():
            if r["max_threads"] is None:
                bad.append(f"{name}: no __launch_bounds__")
                continue
            need = registers_per_block(r["registers"], r["max_threads"]) * max(1, r["min_blocks"])
            if need > REGISTERS_PER_BLOCK:
                bad.append(f"{name}: {r['registers']} registers x {r['max_threads']} threads x "
                           f"{max(1, r['min_blocks'])} blocks = {need} > {REGISTERS_PER_BLOCK}")
    assert not bad, bad
    # the occupancy targets set in attention.cu (AttnMmaCfg) hold
    att = res["attention"]
    # (the forward at D = 64: 2 blocks of 8 warps, 128 queries each)
    assert att["attention_forward_mma_kernel<64>"]["max_threads"] == 256
    assert att["attention_forward_mma_kernel<64>"]["min_blocks"] == 2
    assert att["attention_forward_mma_kernel<64>"]["registers"] <= 128


def test_sm90_mma_attention_shared_memory_fits_the_resident_blocks():
    """The mma attention kernels' dynamic shared memory (the launcher's bytes, double-buffered
    cp.async tiles) plus any static part: at most 227 KiB per block, and where a minimum of
    resident blocks is declared, that many blocks within the SM's 228 KiB (1 KiB of it
    reserved per block)."""
    from cllm_gpu.ops.attention import _has_mma, _mma_smem_bytes
    att = _sm90_resources()["attention"]
    kinds = ("forward", "backward_dq", "backward_dkv", "backward")
    bad = []
    for name, r in att.items():
        base, targs = kernels.split_name_expression(name)
        if "_mma_" not in base:
            continue
        D = int(targs[0])
        assert _has_mma(D)
        dyn = _mma_smem_bytes(D)[kinds.index(base[len("attention_"):-len("_mma_kernel")])]
        per_block = r["smem"] + dyn
        blocks = max(1, r["min_blocks"])
        if per_block > 227 * 1024 or blocks * (per_block + 1024) > 228 * 1024:
            bad.append(f"{name}: {per_block} B x {blocks} blocks")
    assert not bad, bad


def test_kernel_launch_bounds_parse():
    src = ("template <int D>\n__global__ void __launch_bounds__(MMA_THREADS, Cfg<D>::MIN)\n"
           "k1(const float* x) {}\n__global__ void __launch_bounds__(256) k2(int n) {}\n"
           "__global__ void k3(float* y) {}\n")
    assert kernels.kernel_launch_bounds(src) == {"k1": ("MMA_THREADS", "Cfg<D>::MIN"),
                                                 "k2": ("256", None)}
    assert kernels.kernel_signatures(src) == {"k1": (["D"], ["const float* x"]),
                                              "k2": ([], ["int n"]), "k3": ([], ["float* y"])}
    src = "template <int D, bool BIAS = false>\n__global__ void k(const float* x) {}\n"
    assert kernels.kernel_signatures(src) == {"k": (["D", "BIAS"], ["const float* x"])}
    assert kernels.kernel_template_defaults(src) == {"k": {"BIAS": "false"}}


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_bug_kernels_are_real_cuda(arch):
    """The emulator's planted-bug kernels (tests/cuda_emulator/planted.cu) compile with NVRTC:
    the bugs they plant are bugs of valid CUDA, not emulator-only constructs."""
    _nvrtc_or_skip()
    path = REPO / "tests" / "cuda_emulator" / "planted.cu"
    src = path.read_text()
    names = sorted(kernels.kernel_signatures(src))
    r = kernels.compile_source_nvrtc(src, "planted.cu", names, arch)
    assert set(r["lowered_names"]) == set(names) and all(r["lowered_names"].values())
    assert "warning" not in (r["log"] or "").lower(), r["log"]


def test_source_inlines_common_header_with_line_markers():
    src = kernels.kernel_source("gelu")
    assert not re.search(r'^\s*#\s*include\s*"common\.cuh"', src, re.M)
    assert "CLLM_COMMON_CUH" in src
    assert src.startswith('#line 1 "gelu.cu"')
    assert '#line 1 "common.cuh"' in src
    # the line after the include maps back to its own line number in gelu.cu
    lines = (REPO / "kernels_cu" / "gelu.cu").read_text().splitlines()
    inc = next(i for i, l in enumerate(lines, 1) if l.startswith('#include "common.cuh"'))
    assert f'#line {inc + 1} "gelu.cu"' in src


def _line_mapped(text: str) -> list:
    """[(file, line number, text)] for each line of a source carrying #line markers."""
    out, where = [], None
    for line in text.splitlines():
        m = re.match(r'#line (\d+) "([^"]+)"', line)
        if m:
            where = [m.group(2), int(m.group(1))]
            continue
        if where is not None:
            out.append((where[0], where[1], line))
            where[1] += 1
    return out


@pytest.mark.parametrize("stem", STEMS)
def test_emulator_source_keeps_kernel_line_numbers(stem):
    """The emulator's C++ (tests/cuda_emulator/build.py) names each kernel line by its own
    kernels_cu line number: a multi-line asm statement translated into one line used to pull
    every line below it up (attention.cu: 10 lines by the end), so sanitizer messages and
    the CLLM_EMU_COVERAGE counts named the wrong lines."""
    from cuda_emulator import build
    text, _ = build.emulated_source(stem)
    files = {f"{stem}.cu": (REPO / "kernels_cu" / f"{stem}.cu").read_text().splitlines(),
             "common.cuh": (REPO / "kernels_cu" / "common.cuh").read_text().splitlines()}
    checked = 0
    for name, n, line in _line_mapped(text):
        if (name not in files or "cllm_emu" in line or "CLLM_EMU_" in line
                or line.strip() in ("", ";")):
            continue  # translated lines (asm, __shared__) and the launch wrappers
        if n > len(files[name]):
            break  # past the kernel file's end: the launch wrappers follow
        assert files[name][n - 1] == line, f"{name}:{n} is {files[name][n - 1]!r}, not {line!r}"
        checked += 1
    assert checked > 0.8 * len(files[f"{stem}.cu"])


def test_compile_error_names_file_and_line():
    _nvrtc_or_skip()
    bad = '#line 1 "broken.cu"\n__global__ void k(float* x) {\n  x[0] = undefined_name;\n}\n'
    with pytest.raises(kernels.KernelCompileError) as ei:
        kernels.compile_source_nvrtc(bad, "broken.cu", (), "compute_90")
    msg = str(ei.value)
    assert msg.startswith("kernels_cu/broken.cu for compute_90: broken.cu(2): error"), msg
    assert "undefined_name" in msg


def test_arch_option_validation():
    assert kernels._arch_option("90") == "--gpu-architecture=sm_90"
    assert kernels._arch_option("compute_80") == "--gpu-architecture=compute_80"
    with pytest.raises(ValueError):
        kernels._arch_option("hopper")


def test_precompile_cli_without_gpu(capsys):
    _nvrtc_or_skip()
    rc = kernels.main(["--precompile", "--nvrtc", "--arch", "compute_90"])
    out = capsys.readouterr().out
    assert rc == 0
    for stem in STEMS:
        assert re.search(rf"compute_90\s+{stem}\s+ok", out), out


@pytest.mark.parametrize("stem", STEMS)
def test_each_kernel_file_has_launchers_and_gpu_test(stem):
    mod = importlib.import_module(f"cllm_gpu.ops.{stem}")
    launchers = [n for n in dir(mod) if n.endswith("_cuda") and callable(getattr(mod, n))]
    assert launchers, f"cllm_gpu/ops/{stem}.py defines no *_cuda launcher"
    src = (REPO / "cllm_gpu" / "ops" / f"{stem}.py").read_text()
    # every *_cuda name the public functions dispatch to is defined
    for name in set(re.findall(r"\b(\w+_cuda)\(", src)):
        assert hasattr(mod, name), f"cllm_gpu/ops/{stem}.py calls undefined {name}"
    # every kernel instantiation listed for the file is launched somewhere in the module,
    # directly or through the shared launcher of a common.cuh kernel (ops/_cuda.py)
    shared = {"cllm_colsum_finalize_kernel": f'_cu.colsum_finalize("{stem}"'}
    for ne in kernels.NAME_EXPRESSIONS[stem]:
        base = ne.split("<")[0]
        assert base in src or shared.get(base, base) in src, \
            f"{ne} is never launched from cllm_gpu/ops/{stem}.py"
    assert (REPO / "tests" / "gpu" / f"test_{stem}_cuda.py").is_file(), \
        f"missing tests/gpu/test_{stem}_cuda.py"


def _ptx_entry(ptx: str, mangled_prefix: str) -> list:
    """The instructions (opcode, [operands]) of the PTX entry whose name starts so."""
    body = re.search(r"\.entry " + re.escape(mangled_prefix) + r"\w*\(.*?\n\}", ptx, re.S)
    assert body, mangled_prefix
    out = []
    for line in body.group(0).splitlines():
        if m := re.match(r"\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)\s+([^;]*);", line):
            out.append((m.group(1), [o.strip() for o in m.group(2).split(",")]))
    return out


@pytest.mark.ci_required("nvcc13")
def test_layernorm_backward_adds_dresidual_in_the_fma_that_applies_rstd():
    """An ordinary row's dx + dresidual is fma(t', rstd, dresidual), rounded once, as before
    the rows of tiny rstd were read scaled (h29a): written t rstd post (post 1 there), NVVM
    fused post instead, fma(post, t rstd, dresidual), rounding t rstd apart: other bits for
    every model's backward. Read in nvcc 13's PTX (the GPU image's NVRTC 13) of the float32
    backward: every FMA whose result is stored to global memory takes as a multiplicand the
    register that scales x - mean into xhat (r: rstd, or rstd / k on the scaled rows)."""
    _, _, ptx = nvcc13_cubin(kernels.kernel_source("layernorm"), "layernorm",
                             ["layernorm_backward_kernel<float, float>"], ptx=True)
    code = _ptx_entry(ptx, "_Z25layernorm_backward_kernelIffE")
    made = {ops[0]: (op, ops[1:]) for op, ops in code if ops and ops[0].startswith("%f")}
    op_of = lambda reg: made.get(reg, ("", []))[0]  # noqa: E731
    # xhat = r (x xs - xm) (before h29a r (x - mean)): a mul whose other operand is a sub
    # of a mul or a load (t's is a sub of a sub: dxhat - a - xhat b)
    r = {a for op, ops in code if op.startswith("mul.") and op.endswith(".f32")
         for a, b in (ops[1:], ops[2:0:-1]) if op_of(b).startswith("sub.")
         and op_of(made[b][1][0]).startswith(("mul.", "ld."))}
    assert len(r) == 1, r
    stored = [ops[1] for op, ops in code if op.startswith("st.global") and op.endswith(".f32")]
    fmas = [(s, made[s][1]) for s in stored if op_of(s).startswith("fma.")]
    assert fmas, "no FMA stored: dx + dresidual not contracted"
    bad = [(s, ops) for s, ops in fmas if not r & set(ops[:2])]
    assert not bad, f"dx + dresidual FMAs not multiplying by r = {r}: {bad}"
