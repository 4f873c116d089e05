"""Data parallelism on the GPU: the NCCL communicator (cupy.cuda.nccl, unique id over the TCP
store) at world size 1 runs the data-parallel step bitwise like the single-GPU step, with and
without ZeRO-1 and overlap; the all-reduce bandwidth of one GPU's NCCL calls is printed; with
two or more GPUs, `mpiexec -n 2` on the CUDA backend matches one GPU with the same global batch
(rounding, as on the CPU: tests/test_distributed_mpi.py)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cllm_gpu import CLLMModel, ModelConfig, TrainConfig
from cllm_gpu.data_parallel import DataParallel
from cllm_gpu.distributed import Launch, NCCLComm
from cllm_gpu.train_step import StepValues, training_step

cp = pytest.importorskip("cupy")
ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(vocab_size=256, block_size=32, n_layer=3, n_head=2, n_embd=64)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comm():
    from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("NCCL not loadable by CuPy (install the cuda12 or cuda13 extra: "
                    "nvidia-nccl-cu12 / -cu13)")
    return NCCLComm(Launch(0, 1, 0, 1, "torchrun-style", "127.0.0.1", _free_port()))


def _train(comm, dp_args, steps=5, K=2):
    tc = TrainConfig(grad_accum_steps=K, grad_clip=0.5, warmup_steps=0, max_steps=steps)
    model = CLLMModel(CFG, backend="cuda", seed=3)
    dp = DataParallel(model, comm, **dp_args) if dp_args is not None else None
    sv, rng, figures = StepValues(cp), np.random.default_rng(0), []
    for s in range(steps):
        tokens = rng.integers(0, CFG.vocab_size, size=(K, 4, CFG.block_size + 1))
        batches = [model.check_batch(t[:, :-1], t[:, 1:]) for t in tokens]
        sv.set_inputs(tc, tc.lr_at(s), s + 1, sum(b.n_valid for b in batches))
        training_step(model, (model.set_batch(b) for b in batches), tc, sv, dp=dp)
        figures.append(StepValues.read_outputs(sv.outputs()))
    return model.params.data.get(), figures


@pytest.mark.parametrize("dp_args", [{}, {"zero": 1}, {"overlap": False, "bucket_mb": 0.05},
                                     {"zero": 1, "bucket_mb": 0.05}])
def test_nccl_step_at_world_size_1_is_the_single_gpu_step_bitwise(comm, dp_args):
    ref_params, ref_figures = _train(comm, None)
    params, figures = _train(comm, dp_args)
    assert figures == ref_figures
    assert np.array_equal(params, ref_params)


def test_nccl_all_reduce_bandwidth_of_one_gpu(comm):
    """Time ncclAllReduce (in place, fp32) on one GPU for 1 MB .. 1 GB and print one JSON line
    per size: algorithm bandwidth (bytes / time). With one rank the ring moves nothing between
    GPUs (bus bandwidth 2 (n-1)/n x algbw = 0): this is the floor the call costs, a copy."""
    from cupy.cuda import nccl
    rows = []
    for mb in (1, 16, 256, 1024):
        n = mb * (1 << 20) // 4
        x = cp.ones(n, dtype=cp.float32)
        S = comm.stream
        for rep in range(2 + 10):
            if rep == 2:
                S.synchronize()
                t0 = time.perf_counter()
            comm.comm.allReduce(x.data.ptr, x.data.ptr, n, nccl.NCCL_FLOAT32, nccl.NCCL_SUM,
                                S.ptr)
        S.synchronize()
        dt = (time.perf_counter() - t0) / 10
        rows.append({"what": "nccl_allreduce_1gpu", "bytes": 4 * n, "us": round(dt * 1e6, 1),
                     "algbw_GBps": round(4 * n / dt / 1e9, 1)})
        print(json.dumps(rows[-1]))
    assert all(r["algbw_GBps"] > 0 for r in rows)


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no nvidia-smi")
def test_two_gpus_over_nccl_match_one_gpu(token_dir, tmp_path):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU: the 2-rank NCCL run needs two")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec (the dist extra)")
    words = ["nccl", "ring", "bucket", "shard", "rank", "stream", "event", "reduce"]
    data = token_dir(" ".join(np.random.default_rng(2).choice(words, size=6000)), "nccl")
    args = ["--data", str(data), "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
            "--block-size", "32", "--batch-size", "4", "--max-steps", "20", "--warmup-steps", "0",
            "--eval-interval", "0", "--log-interval", "5", "--sample-tokens", "0",
            "--backend", "cuda", "--bucket-mb", "0.05"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "cllm_gpu", "train", *args, "--out",
                    str(tmp_path / "one"), "--grad-accum-steps", "2"], check=True, env=env)
    subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "cllm_gpu", "train", *args,
                    "--out", str(tmp_path / "two"), "--zero", "1"], check=True, env=env,
                   timeout=600)
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / run / "metrics.jsonl"))
               if r["type"] == "train"] for run in ("one", "two")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
