"""The CUDA launchers refuse inputs their kernels cannot take (a pointer of another type, outputs
one launch races on, sizes past an int32 loop counter), before any launch, on the emulator's
fake CuPy with the real kernels (tests/cuda_emulator/run_launcher_checks.py, which says per
check what went wrong before). One test per check; the checks run once, in a process of their
own (the fake CuPy replaces `cupy`)."""
import shutil
from pathlib import Path

import pytest
from cuda_emulator.results import script_results

SCRIPT = Path(__file__).parent / "cuda_emulator" / "run_launcher_checks.py"
CHECKS = ["residual_layernorm_dropout_key", "layernorm_backward_dweight_is_dbias",
          "softmax_xent_columns_past_the_int32_loop",
          "embedding_backward_positions_past_the_int32_loop",
          "layernorm_forward_channels_past_the_int32_loop", "gelu_of_a_0d_array",
          "dropout_int_step_outside_uint32", "int_arguments_are_ints"]

pytestmark = [pytest.mark.ci_required("emulator"),
              pytest.mark.skipif(shutil.which("g++") is None,
                                 reason="g++ not found: the CUDA emulator compiles the kernels with it")]


@pytest.fixture(scope="module")
def results():
    return script_results(SCRIPT, CHECKS, "check")


@pytest.mark.parametrize("check", CHECKS)
def test_launcher_check(results, check):
    if results[check].startswith("skip: "):
        pytest.skip(results[check][len("skip: "):])
    assert results[check] == "ok", results[check]
