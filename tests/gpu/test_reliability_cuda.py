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


def newest_step(run):
    """The step of the newest checkpoint in `run` (0: none yet)."""
    found = ckpt.list_checkpoints(run)
    return ckpt.checkpoint_step(found[0]) if found else 0


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
    run, kills, resumed = tmp_path / "run", 0, 0
    rng = np.random.default_rng(0)
    interval_s = ref_time / STEPS * 5  # at most one checkpoint interval (start-up included)
    for attempt in range(4):
        before = newest_step(run)
        resume = ["--resume"] if before else []
        resumed += bool(resume)
        p = popen_train(data, run, *args, *resume)
        if attempt < 3:
            # Kill only once this attempt has saved a checkpoint of its own, then at a random
            # moment of the next interval (mid-step or mid-save): each kill follows real work,
            # so the next attempt really resumes. A time-based kill could land in every
            # attempt's start-up and leave nothing to resume.
            deadline = time.perf_counter() + 300
            while (p.poll() is None and newest_step(run) <= before
                   and time.perf_counter() < deadline):
                time.sleep(0.01)
            time.sleep(float(rng.uniform(0, interval_s)))
            if p.poll() is None:
                p.kill()
                p.communicate()
                kills += 1
                for ck in ckpt.list_checkpoints(run):
                    ckpt.verify_checkpoint(ck)
                continue
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        break
    got, path = final_weights(run)
    assert path.name == f"ckpt-{STEPS:08d}" and kills >= 1 and resumed >= 1, (kills, resumed)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
