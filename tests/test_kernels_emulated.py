"""The real CUDA kernels (kernels_cu/*.cu, compiled with g++ against a CPU emulation of CUDA:
tests/cuda_emulator/) launched by the real CuPy launchers against a fake CuPy, compared with
the NumPy references with the checks and tolerances of tests/gpu/. No GPU needed.

Covers every op and every NAME_EXPRESSIONS instantiation (bf16 tensor-core attention included,
its PTX mma/cvt emulated from the PTX ISA's fragment layouts), bitwise determinism and
independence of the thread scheduling order; `test_emulated_checks_catch_mutants` shows the
checks fail on broken fragment layouts, a swapped cvt operand order and a missing barrier;
`test_emulated_model_end_to_end` runs the whole CLLMModel(backend="cuda") on the emulated
kernels (uint16 bf16 storage, GEMMs through a cublasGemmEx stand-in on the raw pointers).
Each run is a subprocess: the emulator installs a fake `cupy` module."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "cuda_emulator" / "run_emulated.py"

pytestmark = [pytest.mark.ci_required("emulator"),
              pytest.mark.skipif(shutil.which("g++") is None,
                                 reason="g++ not found: the CUDA emulator compiles the kernels with it")]


def _run(*groups):
    r = subprocess.run([sys.executable, str(SCRIPT), *groups], capture_output=True, text=True,
                       timeout=900)
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert r.returncode == 0, ("\n".join(fails) or r.stdout[-3000:]) + "\n" + r.stderr[-3000:]
    assert "failed=0" in r.stdout
    return r.stdout


def test_emulated_kernels_match_references():
    out = _run("attention_bf16", "attention_fp32", "other")
    assert "never launched: []" in out
    assert "PASS attention bf16 mma D=128 T=130" in out


def test_emulated_checks_catch_mutants():
    out = _run("mutants")
    assert out.count("PASS mutant caught") == 6


def test_emulated_model_end_to_end():
    """tests/gpu/test_model_cuda.py's loss/gradient checks (fp32 vs float64, bf16 vs the NumPy
    bf16 path and float64), trainer.training_step, logits and gpu_kernel_smoke.py --quick, on
    the emulator; and mutants of the CUDA path (bf16 weight refresh, GEMM flags) are caught."""
    out = _run("model")
    assert "PASS model bf16 loss+grads vs numpy bf16 and float64 T=17 (head dim 32)" in out
    assert "PASS scripts/gpu_kernel_smoke.py --quick" in out
    assert out.count("PASS mutant caught") == 4
