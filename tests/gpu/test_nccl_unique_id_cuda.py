"""A real NCCL unique id through torchrun's own store (h29d's fix, shown on the CPU with fake
ids by tests/test_distributed.py::test_nccl_unique_id_travels_through_torchruns_own_store).

`torchrun --nproc-per-node 2 --standalone` starts two ranks that meet in torchrun's agent store
(TORCHELASTIC_USE_AGENT_STORE=True, distributed.agent_store_exchange); rank 0's id is CuPy's
`cupy.cuda.nccl.get_unique_id()` itself, as NCCLComm makes it, and both ranks must get its
bytes. One GPU suffices: no communicator is made (NcclCommunicator between two ranks needs two
GPUs). torchrun is run as `python -m torch.distributed.run` in this Python, so the ranks import
this checkout and the torch beside it. Not run on the emulator: the ranks are processes of
their own and would import the real CuPy, not the fake."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

cp = pytest.importorskip("cupy")
ROOT = Path(__file__).resolve().parents[2]

_RANK = """
import hashlib
import sys
from pathlib import Path

from cupy.cuda import nccl
from cllm_gpu.distributed import detect_launch, exchange_unique_id, uid_channel
launch = detect_launch()
made = []


def make():
    made.append(nccl.get_unique_id())
    return made[0]


got = exchange_unique_id(launch, make if launch.rank == 0 else None, timeout=40)
sha = lambda b: hashlib.sha256(b).hexdigest()[:16]  # noqa: E731
# a file per rank: torchrun interleaves its ranks' stdout within a line
Path(sys.argv[1], f"rank{launch.rank}").write_text(" ".join(map(str, [
    uid_channel(launch).split(" ")[0], type(got).__name__, len(got), sha(got),
    sha(made[0]) if made else "-", int(got == bytes(len(got)))])))
"""


def test_real_nccl_unique_id_travels_through_torchruns_own_store(tmp_path):
    from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("NCCL not loadable by CuPy (nvidia-nccl-cu12 / -cu13 not installed)")
    if importlib.util.find_spec("torch") is None:
        pytest.skip("no torch in this Python: torchrun (torch.distributed.run) is missing")
    (tmp_path / "rank.py").write_text(_RANK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--standalone", str(tmp_path / "rank.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=55, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rank0, rank1 = ((tmp_path / f"rank{r}").read_text().split() for r in (0, 1))
    assert rank0[:3] == rank1[:3] == ["torchrun's", "bytes", "128"], (rank0, rank1)
    (_, _, _, got0, made, zeros), (_, _, _, got1, none, _) = rank0, rank1
    assert got0 == made and got1 == made and none == "-", (rank0, rank1)  # rank 0's NCCL id
    assert zeros == "0", f"NCCL gave an all-zero unique id: {rank0}"
