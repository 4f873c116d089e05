"""What a CUDA-graph capture of the training step allocates (tests/cuda_emulator/
capture_memory.py): the emulated capture's allocations must be exactly the size formulas of
its sites, and at GPT-2 124M (B 16, T 1024) they must be small next to the activation cache.
The capture holds every block it allocates until it ends (cuda_graph.py), so a per-layer
temporary allocated in the capture would be held twelve times: the attention backward's
workspace (Delta, atomic-dq's fp32 dQ sums: 48 MiB a layer in bf16) and the column-sum partials
of the LayerNorm, GELU and dropout-bias backwards (118.5 MiB a micro-batch at 124M) live in the
activation cache instead; what is left is the loss sum and the gradient norm's partials."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "cuda_emulator" / "capture_memory.py"


def test_capture_allocates_only_small_blocks():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    runs = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(runs) == ["bf16 atomic-dq", "bf16 two-pass", "fp32 two-pass"]
    for name, run in runs.items():
        # only the loss sum and the gradient norm's per-block partials and flags (at most
        # _NORM_MAX_BLOCKS = 1024 float64 each), 16.5 KiB in all; no block of a token's size
        assert run["sites"] == ["grad_norm.py grad_norm_cuda bad",
                                "grad_norm.py grad_norm_cuda partials",
                                "model.py classifier losses.sum"], (name, run)
        assert run["largest"] <= 1024 * 8, (name, run)
        assert run["sum"] <= 2 * 1024 * 8 + 512, (name, run)
