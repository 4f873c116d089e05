"""The emulator's fake CuPy promises nothing the real CuPy lacks (tests/cuda_emulator/surface.py):
every name it installs exists in CuPy, and no fake callable takes a keyword CuPy's does not. A
launcher that passed the emulated tests through such a name would fail on the first GPU run."""
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cuda_emulator import surface

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ci_required("nvrtc")   # CI installs cupy-cuda12x for NVRTC: real CuPy is there
def test_fake_cupy_names_and_keywords_exist_in_cupy():
    pytest.importorskip("cupy", reason="CuPy is not installed: nothing to compare the fake with")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_emulator" / "surface.py")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    counts = r.stdout.split("surface: ")[1].split()
    checked, compared = int(counts[0]), int(counts[3])
    in_code = int(r.stdout.split("mismatches; ")[1].split()[0])
    assert checked >= 80 and compared >= 20 and "0 mismatches" in r.stdout, r.stdout
    assert in_code >= 150, r.stdout   # the CuPy names cllm_gpu, scripts and tests/gpu spell
    assert "signature not found" not in r.stdout


@pytest.mark.ci_required("nvrtc")
def test_code_check_reports_a_cupy_name_cupy_lacks(tmp_path):
    """A GPU-only file misspelling a CuPy name (reached through `import cupy as cp`, a
    `from cupy.cuda import ...` alias, `pytest.importorskip("cupy")`, a `self.` attribute set
    to one, `getattr(cp, "name")`, or the NCCL shim, whose names exist here only in its
    extension) is reported, and so is a keyword a CuPy callable does not take; the names and
    keywords CuPy has are not (RawModule's parameters follow a default `options=()`)."""
    pytest.importorskip("cupy", reason="CuPy is not installed: nothing to compare with")
    f = tmp_path / "test_planted_cuda.py"
    f.write_text("import cupy as cp\nfrom cupy.cuda import nccl, runtime as rt\n"
                 "import pytest\nxp = pytest.importorskip('cupy')\n"
                 "cp.cuda.runtime.deviceSynchronize()\ncp.cuda.runtime.deviceSynchronise()\n"
                 "rt.getDeviceCount()\nnccl.NcclCommunicator\nnccl.NCCL_SUMM\n"
                 "xp.zeros(1)\nxp.cuda.Stream.null.synchronise()\n"
                 "xp.cuda.Stream(non_blocking=True)\nxp.cuda.Stream(nonblocking=True)\n"
                 "cp.RawModule(code='', options=(), name_expressions=['k'])\n"
                 "getattr(cp, 'zeroes')\ngetattr(nccl, 'NCCL_FLOAT32')\n"
                 "class Comm:\n    def __init__(self):\n        self.cp, self.nccl = cp, nccl\n"
                 "        self.cp.cuda.Event(disabletiming=True)\n"
                 "        self.nccl.groupStrat()\n        self.nccl.groupEnd()\n")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_emulator" / "surface.py"),
                        "--code", str(f)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1, r.stdout + r.stderr
    found = sorted(l.split(": ", 1)[1] for l in r.stdout.splitlines() if l.startswith("MISMATCH"))
    assert [l.split(" in CuPy")[0] for l in found] == [
        "cupy.cuda.Event takes no keyword 'disabletiming'",
        "cupy.cuda.Stream takes no keyword 'nonblocking'",
        "cupy.cuda.Stream.null.synchronise missing", "cupy.cuda.nccl.NCCL_SUMM missing",
        "cupy.cuda.nccl.groupStrat missing", "cupy.cuda.runtime.deviceSynchronise missing",
        "cupy.zeroes missing"], r.stdout


def test_surface_check_reports_what_the_real_module_lacks():
    # the check itself can fail: a name CuPy lacks, a keyword CuPy's callable lacks, and a
    # parameter CuPy requires that the fake lets a caller leave out
    def real_fn(shape, dtype=float):
        return None

    def fake_fn(shape, dtype=float, order="C"):
        return None

    def fake_lenient(shape=None, dtype=float):
        return None

    real = types.SimpleNamespace(cuda=types.SimpleNamespace(empty=real_fn, lenient=real_fn))
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        empty=fake_fn, lenient=fake_lenient, graph_launch=fake_fn))
    problems, seen = [], []
    surface._walk("cupy", fake, real, problems, seen)
    assert seen == ["cupy.cuda", "cupy.cuda.empty", "cupy.cuda.lenient", "cupy.cuda.graph_launch"]
    assert problems == [
        "cupy.cuda.empty: the fake takes ['order'], CuPy does not",
        "cupy.cuda.lenient: CuPy requires ['shape'], the fake does not",
        f"cupy.cuda.graph_launch: missing in CuPy {surface.REAL_VERSION[0]}",
    ]


def test_cython_docstring_signatures_are_read():
    fn = types.SimpleNamespace(__doc__="get(self, stream=None, order='C', out=None, blocking=True)"
                                       "\n\nReturn a host copy.")
    assert surface._params(fn) == ({"stream", "order", "out", "blocking"}, set())
    fn.__doc__ = "malloc(self, size_t size) -> MemoryPointer"
    assert surface._params(fn) == ({"size"}, {"size"})


def test_surface_check_reports_a_default_the_fake_picks_differently():
    # cupy.empty(shape) is float64 (dtype=float), as NumPy's: a fake defaulting to float32
    # gave a caller that leaves dtype out float32 arrays on the CPU and float64 on the GPU
    import numpy as np

    def real_empty(shape, dtype=float, order="C"):
        return None

    def fake_empty(shape, dtype=np.float32):
        return None

    def fake_same(shape, dtype=np.float64):
        return None
    real = types.SimpleNamespace(empty=real_empty, same=real_empty)
    fake = types.SimpleNamespace(empty=fake_empty, same=fake_same)
    problems = []
    surface._walk("cupy", fake, real, problems, [])
    assert problems == ["cupy.empty: the fake's default dtype=<class 'numpy.float32'>, "
                        "CuPy's <class 'float'>"]
