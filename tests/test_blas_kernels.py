"""The NumPy path's bitwise BLAS tests, run again under the other OpenBLAS kernels this CPU can
execute (OPENBLAS_CORETYPE, in a child pytest).

Why: OpenBLAS picks its kernels by the CPU, and CI's CPU changes between sessions. The kernel
sets round a row by where it falls in the call in different ways (OpenBLAS 0.3.31, one BLAS
thread, (m, 96) x (96, 40) against the first m rows of a 260-row call: Haswell's sgemm differs
for every m but multiples of 12, its dgemm and Katmai's sgemm and dgemm for odd m, Nehalem's
dgemm for m not a multiple of 4, Sandybridge's only at m = 1, where NumPy calls gemv). Tests
that compared products of different call shapes passed on AVX-512 machines (SkylakeX kernels)
and failed on the first one without (Haswell kernels; commit 2a07034). Here every machine with
AVX2 also checks the Haswell kernels, and every one with AVX the Sandybridge ones, whatever its
own default. (SkylakeX's kernels are not listed: a CPU without AVX-512, such as the AMD EPYC
of 2026-12-02 whose default is Haswell, stops with SIGILL under them.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# OpenBLAS's name for a kernel set -> the CPU flags (/proc/cpuinfo) it needs
KERNELS = {"Haswell": {"avx2", "fma"}, "Sandybridge": {"avx"}}
# the tests that compare the NumPy path's products bit for bit (thread counts, row pieces, a
# reference built from the same BLAS calls)
BITWISE_FILES = ["tests/test_host_threads.py", "tests/test_gemm.py", "tests/test_linear.py",
                 "tests/test_dropout.py"]


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                 if line.startswith("flags")), set())


def _openblas_core() -> str | None:
    """The kernel set NumPy's OpenBLAS runs in this process, or None when NumPy's BLAS is not
    an OpenBLAS that names it (threadpoolctl's architecture)."""
    import numpy  # noqa: F401  (threadpoolctl sees only loaded libraries)
    from threadpoolctl import threadpool_info
    blas = [i for i in threadpool_info() if i["internal_api"] == "openblas"]
    return blas[0].get("architecture") if blas else None


@pytest.mark.slow
@pytest.mark.parametrize("core", sorted(KERNELS))
def test_bitwise_blas_tests_pass_under_another_openblas_kernel(core):
    missing = KERNELS[core] - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)} for OpenBLAS's {core} kernels")
    here = _openblas_core()
    if here is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS that names its kernels")
    if here == core:
        pytest.skip(f"{core} is this process's kernel set: the suite itself runs these tests")
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OPENBLAS_CORETYPE": core, "PYTHONPATH": path}
    probe = ("import numpy, threadpoolctl\n"
             "print([i.get('architecture') for i in threadpoolctl.threadpool_info()\n"
             "       if i['internal_api'] == 'openblas'][0])")
    took = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, timeout=120)
    assert took.returncode == 0, took.stderr[-2000:]
    if took.stdout.strip() != core:   # an OpenBLAS built for one CPU ignores the variable
        pytest.skip(f"OPENBLAS_CORETYPE={core} gave {took.stdout.strip()}: no runtime choice")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *BITWISE_FILES], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"under OPENBLAS_CORETYPE={core}:\n{p.stdout[-4000:]}"
