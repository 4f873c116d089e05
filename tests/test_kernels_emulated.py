"""The real CUDA kernels (kernels_cu/*.cu, compiled with g++ against a CPU emulation of CUDA:
tests/cuda_emulator/, docs/emulator.md) launched by the real CuPy launchers against a fake
CuPy, compared with the NumPy references with the checks and tolerances of tests/gpu/. No GPU
needed.

Covers every op and every NAME_EXPRESSIONS instantiation (bf16 tensor-core attention included,
its PTX mma/cvt emulated from the PTX ISA's fragment layouts), bitwise determinism and
independence of the thread and block order; every launch is also checked as a sanitizer would
(every memory access in bounds, no unsynchronised shared/global access pair, warp collectives
by call site, launch limits). `test_emulated_checks_catch_mutants` shows the checks fail on
broken fragment layouts, a swapped cvt operand order, a missing barrier, a wrong
key-query distance in the attention bias, the attention dropout's element index with
query and key exchanged or its keep bits not shared by a quad of lanes, and the LayerNorm
backward's teams adding their column sums with atomics in arrival order, and AdamW writing
the bf16 weight copy from the parameter before its update, and the attention forward storing
its bf16 copy of out, the backward its bf16 dqkv and atomic-dq's cast its bf16 dQ with the
halves of a pair swapped, and the column sums' finalize adding only its first 32 chunks;
`test_emulated_sanitizer_catches_planted_bugs` that each sanitizer check catches its planted
bug (tests/cuda_emulator/planted.cu and mutants of the real kernels) and passes its correct
twin (a plain read racing another thread's atomicAdd among them), that the emulated mma and
ldmatrix match the PTX ISA's formulas, and that a cp.async read before its wait_group (or
without the __syncthreads after it) fails;
`test_emulated_model_end_to_end` runs the whole CLLMModel(backend="cuda") on the emulated kernels (uint16 bf16 storage, GEMMs
through a cublasGemmEx stand-in on the raw pointers); `test_emulated_edge_shapes` (slow) the
sizes where indexing changes: T = 1024, B * H at the grid limit, V = 50,304 with N * V > 2**31,
and every launcher's launch configuration at GPT-2 1.5B shapes with a batch of 64 x 1024.
Each run is a subprocess: the emulator installs a fake `cupy` module."""
import importlib.util
import os
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
    assert "PASS attention bf16 mma lattice D=32 T=130" in out


def test_emulated_checks_catch_mutants():
    out = _run("mutants")
    assert out.count("PASS mutant caught") == 24
    assert "PASS mutant caught: kernel: GELU backward leaves out the bias" in out
    assert "PASS mutant caught: kernel: column-sum finalize adds only the first 32 chunks" in out
    assert "PASS mutant caught: kernel: LayerNorm backward teams' column sums" in out
    assert "PASS mutant caught: kernel: AdamW writes the bf16 copy of the parameter before" in out
    for line in ("bf16 forward cp.async wait_group 2 where tile n needs 1",
                 "bf16 forward without the barrier after the cp.async wait",
                 "bf16 dq prefetch into the buffer of the tile in use",
                 "bf16 dkv refills a Q, dO buffer without the barrier after its last read",
                 "bf16 forward's out_mm pair stored in swapped halves",
                 "bf16 forward stores the float output when only the bf16 one is asked for",
                 "bf16 backward's dqkv pair stored in swapped halves",
                 "atomic-dq's bf16 dQ cast stores a pair in swapped halves"):
        assert f"PASS mutant caught: kernel: {line}" in out, line


def test_emulated_model_end_to_end():
    """tests/gpu/test_model_cuda.py's loss/gradient checks (fp32 vs float64, bf16 vs the NumPy
    bf16 path and float64), trainer.training_step, logits and gpu_kernel_smoke.py --quick, on
    the emulator, the step captured in a CUDA graph against plain steps (through the cuBLAS
    calls the GEMM makes on a GPU); and mutants of the CUDA path (bf16 weight refresh, GEMM
    flags, cuBLAS through CuPy's wrapper, which refuses stream capture) are caught."""
    out = _run("model")
    assert "PASS model bf16 loss+grads vs numpy bf16 and float64 T=17 (head dim 32)" in out
    assert "PASS scripts/gpu_kernel_smoke.py --quick" in out
    assert "PASS CUDA graph step bf16 (K 2: capture, replays) = plain steps, bitwise" in out
    assert out.count("PASS mutant caught") == 5
    assert "PASS mutant caught: cublasSetStream_v2 through CuPy's cublas.setStream" in out


def test_emulated_sanitizer_catches_planted_bugs():
    """Each check of the emulator-as-sanitizer catches its planted bug with its own message
    and passes the correct twin (group `sanitizer` of run_emulated.py)."""
    out = _run("sanitizer")
    # (the register check SKIPs where NVRTC cannot give sm_90 register counts)
    assert out.count("PASS caught:") + out.count("SKIP caught:") == 40, out[-3000:]
    assert out.count("PASS passes:") == 20, out[-3000:]
    assert "PASS float denormals flushed to signed zero as -ftz=true does" in out
    for line in ("caught: shuffles from two call sites",          # 1. collectives by call site
                 "caught: kernel: fp32 forward reduces scores only under the causal mask",
                 "caught: lanes exchange through shared memory with only shuffles between",  # 2.
                 "caught: kernel: LayerNorm backward row sums in one buffer, not by row parity",
                 "caught: histogram without atomicAdd",            # 3. lost updates
                 "caught: count read by one thread while the block's threads atomicAdd to it",
                 "caught: total read by block 0 while the blocks atomicAdd to it",
                 "caught: float atomicAdd total depends on the block order",
                 "caught: kernel: wpe gradient parallel over the batch",
                 "caught: kernel: bf16 atomic-dq backward adds dQ with += (no atomic)",
                 "caught: kernel: bf16 atomic-dq backward reads dS without the barrier after",
                 "caught: register-hungry kernel without launch bounds, 1024 threads",  # 4.
                 "caught: kernel: bf16 dkv with a 32-query tile at D = 128",
                 "caught: scatter trusts its ids: writes 5000 rows past the output",  # 5.
                 "caught: kernel: embedding forward accepts id == V",
                 "passes: emulated mma matches the PTX ISA for every lane and register",  # 7.
                 "caught: emulator: A registers 1 and 2 exchanged (consistently with a kernel)",
                 "passes: emulated ldmatrix matches the PTX ISA (x1, x2, x4, .trans)",  # 8.
                 "caught: kernel: ldmatrix .x4 row addresses with A's matrix order exchanged",
                 "caught: ldmatrix reached by half the warp",
                 "passes: double-buffered cp.async tiles, wait_group 1 then __syncthreads",  # 9.
                 "caught: cp.async tiles read without cp.async.wait_group",
                 "caught: cp.async tiles with the __syncthreads before the wait, not after"):
        assert f"PASS {line}" in out, line


@pytest.mark.slow
def test_emulated_edge_shapes():
    """T = 1024 at head dims 64 and 128 (fp32 and bf16), B * H = 65,535 heads, and the
    softmax-cross-entropy at V = 50,304 with N * V > 2**31, in the kernel and through the
    model's row chunking: where a full run would take minutes, the blocks where the indexing
    is extreme; the launchers refusing a grid past the limit (B * H = 65,536 heads, 2**31
    softmax-cross-entropy rows); and every launcher's grid, block and shared memory at GPT-2
    1.5B shapes, batch 64 x 1024, against the GPU's limits (group `edges` of
    run_emulated.py)."""
    out = _run("edges")
    assert out.count("PASS ") == 13, out[-3000:]
    assert "PASS softmax_xent 2**31 rows in place refused by the launcher" in out
    assert "PASS model classifier at B*T*V > 2**31 through the row chunking" in out
    assert "PASS every launcher at GPT-2 1.5B shapes, batch 64 x 1024: launch limits" in out


_COVERAGE_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
import run_emulated  # noqa: F401  (installs the fake cupy)
import cupy as cp
import numpy as np
from cllm_gpu.ops.cast import to_bf16
to_bf16(cp.asarray(np.arange(300, dtype=np.float32)))
"""


def test_coverage_mode_counts_kernel_lines(tmp_path):
    """CLLM_EMU_COVERAGE=DIR (docs/emulator.md): the kernel builds carry gcov counters, and
    kernel_coverage.py maps them to kernels_cu lines: a run of float_to_bf16 alone executes its
    lines and reports bf16_to_float_kernel as never run."""
    cov = tmp_path / "cov"
    env = dict(os.environ, CLLM_EMU_COVERAGE=str(cov))
    r = subprocess.run([sys.executable, "-c", _COVERAGE_RUN, str(SCRIPT.parent)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("kernel_coverage",
                                                  SCRIPT.parent / "kernel_coverage.py")
    emu_coverage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu_coverage)
    res = emu_coverage.report(cov)["cast.cu"]
    src = (SCRIPT.parent.parent.parent / "kernels_cu" / "cast.cu").read_text().splitlines()
    never = {n for reg in res["never"] for n in reg["lines"]}
    to_bf16_line = next(i for i, l in enumerate(src, 1) if "cllm_store(out + i, x[i]);" in l)
    from_bf16_line = next(i for i, l in enumerate(src, 1) if "out[i] = cllm_load(x + i);" in l)
    assert to_bf16_line not in never and from_bf16_line in never, res
    assert [f.split("(")[0] for f in res["functions_never_run"]] == ["bf16_to_float_kernel"]
    assert res["executed"] < res["executable"]
