"""cllm_gpu/backend.py: the backend choice, the GPU's data-sheet peak, and the host memory
that available_memory reads from /proc and the cgroup files (test_model.py's
test_host_memory_under_a_cgroup_limit_does_not_count_the_page_cache has the limit cases).
Each test here kills mutants of backend.py that passed every other test (mutation audit h30p)."""
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from cllm_gpu import backend
from cllm_gpu.errors import ConfigError

GIB = 2**30


def _fake_cupy(available=True, gpu_name=b"NVIDIA H100 80GB HBM3"):
    """What backend.py reads of CuPy: is_available, the device's id and its properties (CuPy
    gives the name as bytes)."""
    runtime = SimpleNamespace(getDeviceProperties=lambda dev: {"name": gpu_name})
    cuda = SimpleNamespace(is_available=lambda: available, runtime=runtime,
                           Device=lambda: SimpleNamespace(id=0))
    return SimpleNamespace(cuda=cuda, __version__="fake")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "", None])
def test_an_unknown_backend_name_is_refused(name):
    with pytest.raises(ConfigError, match="backend must be 'numpy', 'cuda' or 'auto'"):
        backend.resolve_backend(name)


def test_auto_takes_the_gpu_when_there_is_one_and_numpy_otherwise(monkeypatch):
    cupy = _fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    assert backend.resolve_backend("auto") == ("cuda", cupy)
    assert backend.resolve_backend("cuda") == ("cuda", cupy)
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(available=False))
    assert backend.resolve_backend("auto") == ("numpy", np)
    assert backend.resolve_backend("numpy") == ("numpy", np)


@pytest.mark.parametrize("cupy", [_fake_cupy(available=False), None],
                         ids=["no GPU", "no CuPy"])
def test_cuda_without_a_gpu_or_cupy_is_a_config_error(monkeypatch, cupy):
    """CuPy installed on a machine without a GPU (is_available False) or not installed at all
    (None in sys.modules: the import fails): no GPU to run on, one ConfigError."""
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    assert backend.cuda_available() is False
    with pytest.raises(ConfigError, match="backend 'cuda' requested but CuPy or a CUDA GPU"):
        backend.resolve_backend("cuda")


def test_the_device_peak_reads_cupys_bytes_name(monkeypatch):
    """CuPy's getDeviceProperties gives the name as bytes (a str from another CuPy is taken
    as it is): either way the GPU's peak is found."""
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(gpu_name=b"NVIDIA H100 80GB HBM3"))
    assert backend.device_peak_tflops("bf16") == 989.4
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(gpu_name="NVIDIA A100-SXM4-40GB"))
    assert backend.device_peak_tflops("fp32") == 19.5


@pytest.fixture
def host(tmp_path, monkeypatch):
    """write(relative path, text) under a fake /proc/meminfo, /proc/self/cgroup and cgroup
    root; MemAvailable 4 GiB + SwapFree 2 GiB unless a test writes another meminfo."""
    monkeypatch.setattr(backend, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(backend, "CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setattr(backend, "SELF_CGROUP", str(tmp_path / "self_cgroup"))

    def write(rel, text):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    write("meminfo", f"MemTotal: {64 * GIB // 1024} kB\nMemAvailable: {4 * GIB // 1024} kB\n"
                     f"SwapFree: {2 * GIB // 1024} kB\n")
    return write


def test_host_memory_is_memavailable_plus_free_swap(host):
    assert backend.available_memory(np) == 6 * GIB   # no cgroup files: no cap


def test_a_meminfo_without_memavailable_makes_no_check(host):
    """Kernels before 3.14 have no MemAvailable: None (no check), not a KeyError."""
    host("meminfo", f"MemTotal: {64 * GIB // 1024} kB\nMemFree: {GIB // 1024} kB\n"
                    "SwapFree: 0 kB\n")
    assert backend.available_memory(np) is None


def test_a_cgroup_limit_caps_the_host_memory_never_raises_it(host):
    host("self_cgroup", "0::/\n")
    host("cgroup/memory.max", f"{100 * GIB}\n")   # room under the limit: 99 GiB
    host("cgroup/memory.current", f"{1 * GIB}\n")
    host("cgroup/memory.stat", "file 0\n")
    assert backend.available_memory(np) == 6 * GIB
    host("cgroup/memory.max", f"{3 * GIB}\n")
    assert backend.available_memory(np) == 2 * GIB


def test_without_proc_self_cgroup_the_roots_limit_still_applies(host):
    """No /proc/self/cgroup to read (a restricted /proc): the limit at the hierarchy's root
    still caps, rather than an OSError ending the run."""
    host("cgroup/memory.max", f"{3 * GIB}\n")
    host("cgroup/memory.current", f"{1 * GIB}\n")
    host("cgroup/memory.stat", "file 0\n")
    assert backend.available_memory(np) == 2 * GIB


def test_a_v1_memory_hierarchy_mounted_with_another_controller_is_found(host):
    """cgroup v1 lists the controllers of a hierarchy comma-separated in /proc/self/cgroup."""
    host("self_cgroup", "5:hugetlb,memory:/job\n0::/\n")
    host("cgroup/memory/job/memory.limit_in_bytes", f"{3 * GIB}\n")
    host("cgroup/memory/job/memory.usage_in_bytes", f"{2 * GIB}\n")
    host("cgroup/memory/job/memory.stat", f"total_cache {GIB}\n")
    assert backend.available_memory(np) == 2 * GIB


def test_an_unreadable_cgroup_level_caps_nothing_and_the_others_still_do(host):
    """A level whose usage file says nothing a number can be read from is skipped (no
    ValueError), and the levels above it still cap."""
    host("self_cgroup", "0::/job\n")
    host("cgroup/job/memory.max", f"{GIB}\n")
    host("cgroup/job/memory.current", "")
    host("cgroup/job/memory.stat", "file 0\n")
    host("cgroup/memory.max", f"{5 * GIB}\n")
    host("cgroup/memory.current", f"{2 * GIB}\n")
    host("cgroup/memory.stat", "file 0\n")
    assert backend.available_memory(np) == 3 * GIB
