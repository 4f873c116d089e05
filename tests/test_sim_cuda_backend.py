"""The CUDA backend's Python code path (deferred loss reads, device-side clip and skip, pinned
token staging, device arenas in checkpoints, the CUDA-graph step through a simulated capture)
against a simulated device on the CPU."""
import json
import subprocess
import sys
from pathlib import Path


def test_cuda_code_path_on_a_simulated_device():
    script = Path(__file__).parent / "sim_cuda_backend.py"
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"same_losses_as_numpy": 12, "resume_exact": True, "nonfinite_skip": True,
                   "nonfinite_stop": True, "bf16_same_losses_as_numpy": 12,
                   "graph_same_losses_as_numpy": 11, "graph_accumulation_and_resume": True,
                   "graph_rekey_after_eviction": True,
                   "graph_nonfinite_skip": True, "graph_fallback": True,
                   "graph_bf16": True}
