"""CUDA kernels without a GPU: every kernels_cu/*.cu compiles with NVRTC (every template
instantiation the launchers use) for sm_80 and sm_90, and every kernel file has its op module
with CUDA launchers and its GPU test file."""
import importlib
import re
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


def test_kernel_files_present():
    assert (REPO / "kernels_cu" / "common.cuh").is_file()
    assert set(STEMS) == set(kernels.NAME_EXPRESSIONS), \
        "kernels_cu/*.cu and kernels.NAME_EXPRESSIONS disagree"
    assert kernels.kernels_dir() == REPO / "kernels_cu"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stem", STEMS)
def test_compiles_with_nvrtc(stem, arch):
    _nvrtc_or_skip()
    r = kernels.compile_nvrtc(stem, arch)
    assert set(r["lowered_names"]) == set(kernels.NAME_EXPRESSIONS[stem])
    assert all(r["lowered_names"].values())
    assert r["size"] > 0
    assert "warning" not in (r["log"] or "").lower(), r["log"]


def test_sm90_cubin_compiles_without_register_spills():
    """compile_all_nvrtc to sm_90 machine code; ptxas reports no spills for any kernel (the
    attention kernels keep D/4-wide rows in registers; a spill would make them much slower)."""
    _nvrtc_or_skip()
    res = kernels.compile_all_nvrtc("sm_90", ["--ptxas-options=-v"])
    assert set(res) == set(STEMS)
    bad = {s: r["error"] for s, r in res.items() if not r["ok"]}
    assert not bad, bad
    spills = []
    for stem, r in res.items():
        entry = None
        for line in (r["log"] or "").splitlines():
            m = re.search(r"Compiling entry function '([^']+)'", line)
            if m:
                entry = m.group(1)
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and (int(m.group(1)) or int(m.group(2))):
                spills.append((stem, entry, line.strip()))
    assert not spills, spills


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
    # every kernel instantiation listed for the file is launched somewhere in the module
    for ne in kernels.NAME_EXPRESSIONS[stem]:
        base = ne.split("<")[0]
        assert base in src, f"{ne} is never launched from cllm_gpu/ops/{stem}.py"
    assert (REPO / "tests" / "gpu" / f"test_{stem}_cuda.py").is_file(), \
        f"missing tests/gpu/test_{stem}_cuda.py"
