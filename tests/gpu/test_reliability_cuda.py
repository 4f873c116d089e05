"""kill -9 / resume on the CUDA backend (docs/reliability.md): a run killed several times and
resumed from its newest verified checkpoint ends with the uninterrupted run's weights, bit for
bit (every kernel is deterministic, cuBLAS is run-to-run deterministic on one GPU with a fixed
workspace), in fp32 and in bf16 mixed precision, with and without the CUDA graph."""
import subprocess
import time

import numpy as np
import pytest

from cllm_gpu import checkpoint as ckpt
from test_reliability import final_weights, popen_train

cp = pytest.importorskip("cupy")

STEPS = 60


@pytest.fixture(scope="module")
def data(token_dir):
    return token_dir("a stitch in time saves nine. " * 300, "rel_cuda")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--precision", "bf16", "--cuda-graph"]])
def test_kill_9_and_resume_on_the_gpu_is_bitwise_exact(data, tmp_path, extra):
    args = ["--backend", "cuda", "--dtype", "float32", "--max-steps", STEPS,
            "--checkpoint-interval", 5, "--keep-checkpoints", 2, "--log-interval", 1000, *extra]
    ref = popen_train(data, tmp_path / "ref", *args)
    t0 = time.perf_counter()
    assert ref.wait(timeout=300) == 0, ref.communicate()[1]
    ref_time = time.perf_counter() - t0
    want, _ = final_weights(tmp_path / "ref")
    run, kills = tmp_path / "run", 0
    rng = np.random.default_rng(0)
    for attempt in range(4):
        resume = ["--resume"] if any(run.glob("ckpt-*")) else []
        p = popen_train(data, run, *args, *resume)
        try:
            p.wait(timeout=300 if attempt == 3 else float(rng.uniform(0.4, 0.8)) * ref_time)
            out, err = p.communicate()
            assert p.returncode == 0, err
            break
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            kills += 1
            for ck in ckpt.list_checkpoints(run):
                ckpt.verify_checkpoint(ck)
    got, path = final_weights(run)
    assert path.name == f"ckpt-{STEPS:08d}" and kills >= 1
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
