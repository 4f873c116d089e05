"""scripts/gpu_session_report.py's verdicts and record, one judge at a time, in this process.

tests/test_gpu_session.py runs the whole session on a stand-in machine (minutes); these pin each
judge's rule on a planted log, progress file or record in well under a second, so that a rule
that would let a failing stage PASS in a lent GPU slot fails here, whatever the stand-in
happens to print. Each case names the wrong rule it stops (a mutation audit found them all
passing the suite's fast tests).
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from clihelp import strict_json_loads

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def rep(tmp_path, monkeypatch):
    """scripts/gpu_session_report.py as a module, its work and results folders in tmp_path."""
    spec = importlib.util.spec_from_file_location(
        "gpu_session_report", ROOT / "scripts" / "gpu_session_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "logs").mkdir()
    monkeypatch.setattr(mod, "WORK", tmp_path)
    monkeypatch.setattr(mod, "RES", tmp_path)
    monkeypatch.setattr(mod, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(mod, "TAG", "call1")
    return mod


CLEAN = "========= COMPUTE-SANITIZER\nall kernels ran\n========= ERROR SUMMARY: 0 errors\n"


def test_sanitizer_stage_passes_only_on_a_clean_finished_run_with_the_tools_exit_status(rep):
    assert rep.judge_sanitizer("memcheck", "0", CLEAN)[0] == "PASS"
    # no ERROR SUMMARY (the tool died before its report): not a pass, whatever the exit status
    assert rep.judge_sanitizer("memcheck", "0", "all kernels ran\n")[0] == "FAIL"
    # the smoke driver did not get to its end
    assert rep.judge_sanitizer("memcheck", "0", CLEAN.replace("all kernels ran\n", ""))[0] \
        == "FAIL"
    # an exit status neither 0 nor --error-exitcode's 99: the program itself failed
    assert rep.judge_sanitizer("memcheck", "1", CLEAN)[0] == "FAIL"
    # cut at its limit: TIMEOUT (rc 124 from timeout, 137 from its -k KILL)
    for rc in ("124", "137"):
        assert rep.judge_sanitizer("memcheck", rc, CLEAN)[0] == "TIMEOUT"
        assert rep.base_verdict(rc) == "TIMEOUT"
    # racecheck's own summary counts where it says more than ERROR SUMMARY does
    race = CLEAN + "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
    assert rep.sanitizer_counts(race)["kernel_errors"] == 1
    assert rep.judge_sanitizer("racecheck", "99", race)[0] == "FAIL"


def test_sanitizer_probe_fails_on_a_kernel_error(rep):
    ok = ("========= COMPUTE-SANITIZER\nprobe ok\n========= Program hit cudaErrorNotSupported "
          "(error 801) on CUDA API call to cudaMallocAsync.\n========= ERROR SUMMARY: 1 error\n")
    assert rep.judge_sanitizer_probe("sanitizer_probe", "99", ok)[0] == "PASS"
    bad = ok.replace("1 error\n", "2 errors\n").replace(
        "probe ok\n", "probe ok\n========= Invalid __global__ read of size 4 bytes\n")
    assert rep.judge_sanitizer_probe("sanitizer_probe", "99", bad)[0] == "FAIL"


def progress(rep, name, *records):
    (rep.LOGS / f"{name}_progress.jsonl").write_text(
        "".join(json.dumps({"when": "call", "seconds": 0.1, **r}) + "\n" for r in records))


def test_pytest_stage_verdicts_from_progress_and_exit_status(rep):
    a, b = "t.py::a", "t.py::b"
    progress(rep, "tests", {"nodeid": a, "outcome": "passed", "seconds": 2.5},
             {"nodeid": b, "outcome": "passed"})
    assert rep.judge_tests("tests", "0", "")[:2] == ("PASS", "2 passed; slowest t.py::a 2.5 s")
    # pytest's "1 failed, 1 passed" (rc 1)
    progress(rep, "tests", {"nodeid": a, "outcome": "passed"}, {"nodeid": b, "outcome": "failed"})
    verdict, detail, lines, extra = rep.judge_tests("tests", "1", "")
    assert verdict == "FAIL" and extra["failed"] == [b] and lines == [f"FAILED {b}"], detail
    # the progress file's failure stands whatever the exit status says (a run ended by a hard
    # hang, a rerun passing the rest)
    assert rep.judge_tests("tests", "0", "")[0] == "FAIL"
    # a failed phase (setup, call, teardown) is the test's outcome even when a later one passed
    progress(rep, "tests", {"nodeid": a, "outcome": "failed", "when": "call"},
             {"nodeid": a, "outcome": "passed", "when": "teardown"})
    verdict, _, _, extra = rep.judge_tests("tests", "1", "")
    assert verdict == "FAIL" and extra["failed"] == [a] and extra["counts"]["passed"] == 0
    # a hung test (recorded by `gpu_session_report.py hung`), the later run passing the rest
    progress(rep, "tests", {"nodeid": a, "outcome": "hung"}, {"nodeid": b, "outcome": "passed"})
    assert rep.judge_tests("tests", "0", "")[0] == "FAIL"
    # every test that ran passed but pytest failed (a collection error in another file: rc 2)
    progress(rep, "tests", {"nodeid": a, "outcome": "passed"})
    assert rep.judge_tests("tests", "2", "")[0] == "FAIL"
    # cut at its limit
    assert rep.judge_tests("tests", "124", "")[0] == "TIMEOUT"
    # nothing verified: every test skipped
    progress(rep, "tests", {"nodeid": a, "outcome": "skipped"})
    verdict, detail, _, _ = rep.judge_tests("tests", "0", "")
    assert verdict == "FAIL" and detail.startswith("ALL SKIPPED"), detail


def bench_line(**kw):
    return {"config": "gpt2-124m", "precision": "bf16", "tf32": False, "cuda_graph": False,
            "cllm": {"tokens_per_s": 4.0e5, "mfu": 0.5}, "torch_eager": {"tokens_per_s": 3e5},
            "ratio_vs_torch_eager": 1.33, **kw}


def test_bench_stage_fails_on_no_record_or_any_error(rep):
    def judge(*records):
        (rep.RES / "bench_call1.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))
        return rep.judge_bench("bench_bf16", "0", "", 0)
    verdict, _, lines, extra = judge(bench_line())
    assert verdict == "PASS" and extra == {"records": 1, "errors": 0}, lines
    assert lines == ["  gpt2-124m bf16: cllm 400,000 tok/s, MFU 50.0%, torch_eager ratio 1.33"]
    # the SDPA backend PyTorch's attention ran, where bench.py read it
    probed = bench_line(torch_eager={"ms_per_step": 54.0, "sdpa_backend": "flash"})
    assert judge(probed)[2] == ["  gpt2-124m bf16: cllm 400,000 tok/s, MFU 50.0%, torch_eager "
                                "ratio 1.33 [sdpa flash]"]
    assert judge()[0] == "FAIL"   # rc 0 and no record: nothing measured
    assert judge(bench_line(error="RuntimeError: out of memory"))[0] == "FAIL"
    assert judge(bench_line(torch_eager={"error": "RuntimeError: x"}))[0] == "FAIL"


def test_kernels_stage_fails_on_no_record_or_a_dq_without_its_tolerance(rep):
    def judge(*records):
        (rep.RES / "kernels_call1.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))
        return rep.judge_bench_kernels("bench_kernels", "0", "", 0)
    assert judge({"op": "copy", "bytes_per_s": 4.0e12})[:2] == ("PASS", "1 records, 0 errors")
    assert judge()[0] == "FAIL"
    # a backward variant's record without its dQ tolerance cannot show dQ is right
    bwd = dict(op="attention_bwd_bf16_variant", variant="atomic-dq", bias="none",
               shape=[16, 1024, 12, 64], bwd_ms=2.0, bwd_of_two_pass=0.8,
               fwd_bwd_of_two_pass=0.9, dkv_same_bits_as_two_pass=True,
               dq_rel_diff_from_two_pass=2e-7)
    assert judge({**bwd, "dq_rel_tol": 1e-3})[0] == "PASS"
    assert judge(bwd)[0] == "FAIL"


def test_kernels_stage_lines_give_each_figure_with_its_unit(rep):
    """Every figure of the kernels stage's lines says what it is: the copy in GB/s, a
    memory-bound op as a fraction "of copy" bandwidth (a bare 0.85 read as seconds or TB/s
    before), GEMM in TFLOP/s with torch.matmul's time over ours (the record's
    `of_torch_bf16`, not shown before h33c), attention in TFLOP/s with SDPA's time over ours
    and its backend."""
    (rep.RES / "kernels_call1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"op": "copy", "bytes_per_s": 4.3e12},
        {"op": "adamw", "bytes_per_s": 3.7e12, "of_copy_bw": 0.86},
        {"op": "gemm", "shape": [16384, 768, 3072], "bf16_flop_per_s": 6.0e14,
         "of_torch_bf16": 0.95},
        {"op": "attention_fwd_bwd_bf16", "shape": [16, 1024, 12, 64], "flop_per_s": 2.5e14,
         "of_sdpa_flash_bf16": 0.55, "sdpa_flash_bf16_backend": "flash"})))
    verdict, _, lines, _ = rep.judge_bench_kernels("bench_kernels", "0", "", 0)
    assert verdict == "PASS"
    assert lines == ["  copy 4,300 GB/s; adamw 0.86 of copy; gemm(16384, 768, 3072) bf16 600 "
                     "TF/s (0.95 of torch_bf16); attention_fwd_bwd_bf16(16, 1024, 12, 64) "
                     "250.0 TF/s (0.55 of "
                     "sdpa_flash_bf16 [flash])"], lines


def test_kernels_stage_lines_say_why_pytorch_is_missing(rep):
    """A record whose PyTorch side failed (bench_kernels.py's `sdpa_error` on attention: flash
    not built for the device, no CUDA in torch; `torch_error` on a GEMM) has no ratio: the
    stage still passes (ours was measured) but its lines say why, once per distinct message
    (h33c's dry run: every attention record said 'AssertionError: Torch not compiled with CUDA
    enabled' and the lines showed only ours, as if PyTorch had never been asked)."""
    why = "sdpa_flash_bf16: RuntimeError: No available kernel"
    (rep.RES / "kernels_call1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"op": "attention_fwd_bwd_bf16", "shape": [16, 1024, 12, 64], "flop_per_s": 2.5e14,
         "of_sdpa_bf16": 0.6, "sdpa_bf16_backend": "cudnn", "sdpa_error": why},
        {"op": "attention_fwd_bwd_bf16_lattice", "shape": [16, 1024, 12, 64],
         "flop_per_s": 2.0e14, "sdpa_error": why},
        {"op": "gemm", "shape": [16384, 768, 3072], "bf16_flop_per_s": 6.0e14,
         "torch_error": "RuntimeError: CUDA error"})))
    verdict, _, lines, _ = rep.judge_bench_kernels("bench_kernels", "0", "", 0)
    assert verdict == "PASS"
    assert [l for l in lines if "_error" in l] == [
        f"  sdpa_error: {why}", "  torch_error: RuntimeError: CUDA error"], lines
    # with flash refused, torch's own bf16 choice is the ratio shown, with its backend
    assert "(0.60 of sdpa_bf16 [cudnn])" in lines[0], lines


def test_compile_stage_fails_on_a_module_that_did_not_compile(rep):
    (rep.WORK / "compile.jsonl").write_text(
        json.dumps({"stem": "gelu", "seconds": 1.0, "kernels": {}}) + "\n"
        + json.dumps({"stem": "attention", "seconds": 2.0, "error": "nvrtc: error"}) + "\n")
    verdict, _, lines, extra = rep.judge_compile("compile", "0", "")
    assert verdict == "FAIL" and extra["failed_modules"] == ["attention"], lines


def test_profile_stage_sums_ms_per_step_and_fails_on_no_table(rep):
    (rep.RES / "profile_call1.md").write_text(
        "| range | kernel | launches per step | ms per step | share of range |\n"
        "| --- | --- | ---: | ---: | ---: |\n"
        "| forward | `gemm` | 12 | 1.500 | 75.0% |\n| forward | `gelu` | 12 | 0.500 | 25.0% |\n"
        "| optimizer | `adamw` | 1 | 0.250 | 100.0% |\n")
    verdict, detail, _, extra = rep.judge_profile("profile", "0", "")
    assert verdict == "PASS" and extra["ms_per_step"] == {"forward": 2.0, "optimizer": 0.25}
    assert detail == "forward 2.00 ms/step, optimizer 0.25 ms/step"
    (rep.RES / "profile_call1.md").unlink()
    assert rep.judge_profile("profile", "0", "")[0] == "FAIL"


def test_a_profile_stage_that_failed_at_the_wheel_says_why(rep):
    """pip writes its refusal as 'ERROR: ...' (h33c's dry run: the carried cp312 nvtx wheel
    on the stand-in's Python 3.11); the verdict printed no reason, since error_lines looked
    for 'Error' and 'error:' only, and the stdout tail is all a lent slot's reply shows."""
    log = ("ERROR: nvtx-0.2.17-cp312-cp312-manylinux2014_x86_64.whl is not a supported wheel "
           "on this platform.\n")
    verdict, detail, lines, _ = rep.judge_profile("profile", "1", log)
    assert (verdict, detail) == ("FAIL", "no profile table")
    assert any("is not a supported wheel" in l for l in lines), lines
    # compute-sanitizer's 'ERROR SUMMARY' says no more than the lines before it: it must not
    # push 'Device not supported' out of the probe's two lines (test_gpu_session's
    # test_time_limits_budget_and_an_unusable_sanitizer caught a first '\bERROR\b' rule)
    unusable = ("========= Error: Device not supported.\n"
                "========= Error: Target application returned an error\n"
                "========= ERROR SUMMARY: 1 error\n")
    assert "Device not supported" in rep.error_lines(unusable, 2)[0]


def test_env_stage_fails_on_its_exit_status(rep):
    assert rep.judge_env("env", "0", "gpu NVIDIA H200 (cc 9.0)")[0] == "PASS"
    assert rep.judge_env("env", "1", "gpu None")[0] == "FAIL"


def stage_args(name, rc):
    return ["stage", "--name", name, "--rc", rc, "--seconds", "3", "--limit", "10"]


def test_the_record_names_device_and_commit_and_is_ok_only_when_every_stage_passed(
        rep, monkeypatch, capsys):
    monkeypatch.setenv("CLLM_COMMIT", "abc123def456")
    (rep.WORK / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "commit": "stale"}))
    assert rep.main(stage_args("env", "0")) == 0
    assert rep.main(["stage", "--name", "tests", "--rc", "-", "--seconds", "0",
                     "--limit", "0", "--skip-budget", "4"]) == 0
    assert rep.main(["summary"]) == 0
    rec = json.loads((rep.RES / "call1.json").read_text())
    assert (rec["device"], rec["commit"], rec["ok"]) == ("NVIDIA H200", "abc123def456", True)
    assert "RESULT call1: OK" in capsys.readouterr().out
    for rc, verdict in (("124", "TIMEOUT"), ("1", "FAIL")):
        (rep.WORK / "stages.jsonl").unlink()
        assert rep.main(stage_args("env", "0")) == 0
        assert rep.main(stage_args("shakespeare", rc)) == 0
        assert rep.main(["summary"]) == 3
        rec = json.loads((rep.RES / "call1.json").read_text())
        assert rec["ok"] is False and rec["stages"][1]["verdict"] == verdict
        assert "RESULT call1: NOT OK; not passed: shakespeare" in capsys.readouterr().out


def test_a_shakespeare_run_whose_val_loss_was_not_finite_is_judged_and_recorded_strictly(rep):
    """The trainer writes a non-finite val loss as null (strict JSON): the shakespeare verdict
    formatted it with :.4f (a TypeError, no verdict); and a NaN read from an older metrics file
    went into <tag>.json as json.dumps' NaN, which strict parsers refuse. Now 'not finite' in
    the detail and null in the record."""
    for val in ("null", "NaN"):
        (rep.RES / "shakespeare_call1.jsonl").write_text(
            '{"type": "train", "step": 10, "loss": 2.0}\n'
            f'{{"type": "eval", "step": 10, "val_loss": {val}}}\n')
        verdict, detail, _, extra = rep.judge_shakespeare("shakespeare", "0", "")
        want = "not finite" if val == "null" else "nan"
        assert verdict == "PASS" and f"val loss {want} at step 10" in detail, detail
        assert rep.main(stage_args("shakespeare", "0")) == 0
        rec = strict_json_loads((rep.RES / "call1.json").read_text())
        assert rec["stages"][-1]["val_loss"] is None


def test_the_stage_lines_and_the_record_are_strict_json_whatever_their_inputs_hold(rep):
    """Both files the report writes go through to_json: stages.jsonl (read back into the
    record, where to_json made its NaN null again, so the record alone could not show it) and
    <tag>.json, whose env.json and compile.jsonl parts are read with json.loads, which takes
    the NaN an older gpu_env.py wrote. A mutation audit left either writer on json.dumps
    unseen by the test above."""
    def refuse(name):
        raise ValueError(name)
    (rep.WORK / "env.json").write_text('{"gpu": "H200", "clock_mhz": NaN}\n')
    (rep.WORK / "compile.jsonl").write_text('{"kernel": "gelu", "seconds": Infinity}\n')
    (rep.RES / "shakespeare_call1.jsonl").write_text(
        '{"type": "eval", "step": 10, "val_loss": NaN}\n')
    assert rep.main(stage_args("shakespeare", "0")) == 0
    for line in (rep.WORK / "stages.jsonl").read_text().splitlines():
        assert json.loads(line, parse_constant=refuse)["val_loss"] is None
    rec = json.loads((rep.RES / "call1.json").read_text(), parse_constant=refuse)
    assert rec["env"]["clock_mhz"] is None and rec["compile"][0]["seconds"] is None


def test_the_summary_table_keeps_its_columns_for_the_longest_stage_name(rep, capsys):
    """The verdict column starts at one offset on every row: 'bench_graph_compile' (19
    characters) overflowed the 16-wide name column and shifted its row (h33c's dry run)."""
    for name in ("env", "bench_graph_compile", "sanitizer_probe"):
        assert rep.main(stage_args(name, "0")) == 0
    capsys.readouterr()
    rep.main(["summary"])
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("  ")]
    starts = {re.search(r" (PASS|FAIL) ", l).start() for l in rows}
    assert len(rows) == 3 and len(starts) == 1, rows
