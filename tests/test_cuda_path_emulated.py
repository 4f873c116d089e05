"""The CUDA backend's Python code path (trainer, deferred figure reads, pinned staging, the step
buffer, the CUDA-graph capture and replay, resume, the non-finite policy) on the emulator's fake
CuPy in reference-launchers mode: every launcher is its NumPy reference, so results must equal
the NumPy path's bit for bit (tests/cuda_emulator/run_cuda_path.py). One test per scenario;
the scenarios run once, in a process of their own (the fake CuPy replaces `cupy`)."""
from pathlib import Path

import pytest
from cuda_emulator.results import script_results

SCRIPT = Path(__file__).parent / "cuda_emulator" / "run_cuda_path.py"
SCENARIOS = ["device_path_equals_numpy", "resume_is_exact", "graph_replays_equal_numpy",
             "graph_accumulation_and_resume", "graph_replays_across_ignored_counts",
             "graph_rekey_after_eviction", "graph_kept_through_eval_and_logits_at_other_shapes",
             "graph_nonfinite_step_skipped",
             "graph_capture_failure_falls_back", "bf16_device_path_equals_numpy",
             "nonfinite_policy_on_the_device", "dropout_device_path_and_graph_equal_numpy",
             "frozen_loss_weight_is_caught", "wide_rows_rejected_at_construction",
             "wide_rows_refused_before_overwrite",
             "nccl_data_parallel_at_world_size_1", "nccl_unavailable_is_a_config_error",
             "mfu_against_the_gpus_peak",
             "model_too_large_for_the_device_memory",
             "activation_cache_estimate_is_exact", "inference_cache_estimate_is_exact",
             "memory_test_on_the_fake_pool",
             "batch_too_large_for_the_device_memory", "sample_holds_one_inference_cache",
             "final_sample_past_the_device_memory", "final_sample_after_the_cuda_graph",
             "graph_setup_failure_falls_back",
             "graph_step_refuses_mixed_micro_batches", "graph_second_signal_mid_step"]


@pytest.fixture(scope="module")
def results():
    return script_results(SCRIPT, SCENARIOS, "scenario")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_cuda_path_scenario(results, scenario):
    assert results[scenario] == "ok", results[scenario]
