"""kill -9 / resume on the CUDA backend (docs/reliability.md): a run killed several times and
resumed from its newest verified checkpoint ends with the uninterrupted run's weights, bit for
bit (every kernel is deterministic, cuBLAS is run-to-run deterministic on one GPU with a fixed
workspace), in fp32 and in bf16 mixed precision, with and without the CUDA graph."""
import pytest

from test_reliability import kill_9_and_resume_is_bitwise_exact

cp = pytest.importorskip("cupy")

STEPS = 60


@pytest.fixture(scope="module")
def data(token_dir):
    return token_dir("a stitch in time saves nine. " * 300, "rel_cuda")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--precision", "bf16", "--cuda-graph"]])
def test_kill_9_and_resume_on_the_gpu_is_bitwise_exact(data, tmp_path, extra):
    kill_9_and_resume_is_bitwise_exact(data, tmp_path, ["--backend", "cuda", "--dtype", "float32",
                                                        *extra], STEPS)
