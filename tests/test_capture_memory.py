"""What a CUDA-graph capture of the training step allocates (tests/cuda_emulator/
capture_memory.py): the emulated capture's allocations must be exactly the size formulas of
its sites, and at GPT-2 124M (B 16, T 1024) they must be small next to the activation cache.
The capture holds every block it allocates until it ends (cuda_graph.py), so a per-layer
temporary allocated in the capture would be held twelve times: the attention backward's Delta
and atomic-dq's fp32 dQ sums (48 MiB a layer in bf16) live in the activation cache instead."""
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
        # held together: the column-sum partials of 25 LayerNorm, 24 dropout-bias and 12
        # GELU backwards (256 chunks of 16 K rows), 118.5 MiB; no block of a token's size
        assert run["sum"] < 0.02 * run["cache"], (name, run)
        assert run["largest"] <= 256 * 4 * 768 * 4, (name, run)
