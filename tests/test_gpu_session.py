"""scripts/gpu_session.sh, end to end, on a stand-in GPU machine: a harness bug must show here,
not in a lent GPU slot.

The stand-in (tests/gpu_standin/): `python3` is this interpreter with the CUDA emulator's fake
CuPy installed at the first `import cupy` (the real kernels_cu sources compiled with g++ under
the real launchers), and `nvidia-smi`, `nvcc`, `compute-sanitizer` and `ncu` are small scripts
that run the program they are given and answer in the real tools' formats. The GPU suite is
replaced by planted tests (a pass, a failure, a skip, a test past its soft limit, one that
ignores it, a slow one), the benchmarks use the `micro` configuration, and the profile stage
installs a carried (hand-made) `nvtx` wheel as the real call does; that package records the
ranges the training run opens, and the stand-in ncu reports kernels only for an opened range.

Checked: what $OUT holds when the session is killed in the middle of a stage; both calls'
verdict lines, records and log archives after full runs (the profile covering every top-level
range of a training step); time limits (a stage past its limit is TIMEOUT, a stage with no
budget left is SKIP_BUDGET, nothing is left running afterwards); an unusable sanitizer skips
the sanitizer stages; a python without pip gets the wheel unzipped; the tests a call 1 cut short
did not reach are carried (gpu_session_report.py after-call1, the step between the calls) and
run by call 2, and only those.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from cllm_gpu.kernels import NAME_EXPRESSIONS

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "gpu_standin"
SESSION = ROOT / "scripts" / "gpu_session.sh"

# CI must run it (a skip fails there: tests/conftest.py): a harness bug found on the GPU costs
# the lent slot
pytestmark = [pytest.mark.ci_required("emulator"),
              pytest.mark.skipif(shutil.which("g++") is None or shutil.which("timeout") is None,
                                 reason="the stand-in needs g++ (CUDA emulator) and timeout")]

PLANTED_TESTS = '''
import time
import pytest

from cllm_gpu.kernels import NAME_EXPRESSIONS


def test_passes():
    pass


def test_fails():
    assert 1 == 2, "planted failure"


@pytest.mark.skip(reason="planted skip")
def test_skipped():
    pass


def test_soft_hang():  # SIGALRM ends it: a failure
    time.sleep(60)


def test_hard_hang():  # swallows the soft limit, as a CUDA sync on a hung kernel would
    while True:
        try:
            time.sleep(60)
        except BaseException:
            pass


def test_zz_after_hang():  # reached only by the rerun after the hard hang
    pass


@pytest.mark.slow
def test_slow_one():
    pass
'''

# A skipped stage's seconds: gpu_session.sh times stages with `date +%s` (whole seconds), so a
# skip of a few ms reads 1 s when a second ticks over between its two clock reads (about 1 skip
# in 100 under load here: test_both_calls_end_to_end failed 1 run in 8); a stage that ran
# pytest or a tool takes seconds.
SKIP_S = r"[01] s"

# a training step's top-level NVTX ranges (domain cllm), in order: what the profile must cover
STEP_RANGES = ["forward", "classifier", "backward", "optimizer"]

WAITING_TESTS = '''
import time


def test_a_passes():
    pass


def test_b_waits():
    time.sleep(120)
'''

# call 1 is cut in the middle of each pytest stage (PLANTED_WAIT_S long, past the stage's cap);
# call 2 runs what it did not reach (no wait then)
CUT_TESTS = '''
import os
import time

import pytest

WAIT_S = float(os.environ.get("PLANTED_WAIT_S", "0"))


def test_a_passes():
    pass


def test_b_waits():
    time.sleep(WAIT_S)


def test_c_passes():
    pass


@pytest.mark.slow
def test_slow_a_passes():
    pass


@pytest.mark.slow
def test_slow_b_waits():
    time.sleep(WAIT_S)
'''


FAKE_NVTX = '''import contextlib
import os

__version__ = "0.0.0"
_stacks = {}  # domain: the push/pop ranges open in it


@contextlib.contextmanager
def annotate(message=None, color=None, domain=None, category=None):
    """A push/pop range; with FAKE_NVTX_LOG set (the stand-in ncu sets it), each push appends
    the domain's stack as ncu's --nvtx-include spells it: "cllm@forward/block.0.forward/"."""
    stack = _stacks.setdefault(domain, [])
    stack.append(message)
    if os.environ.get("FAKE_NVTX_LOG"):
        with open(os.environ["FAKE_NVTX_LOG"], "a") as f:
            f.write(f"{domain}@{'/'.join(stack)}/\\n")
    try:
        yield
    finally:
        stack.pop()
'''


def fake_nvtx_wheel(folder: Path) -> Path:
    """A pure-Python `nvtx` wheel (annotate() records the ranges for the stand-in ncu), standing
    in for the real one that scripts/gpu_prepare.sh downloads; installed by the profile stage
    with pip --no-index, or unzipped where the python has no pip."""
    import base64
    import hashlib
    files = {
        "nvtx/__init__.py": FAKE_NVTX,
        "nvtx-0.0.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: nvtx\nVersion: 0.0.0\n",
        "nvtx-0.0.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
                                      "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files["nvtx-0.0.0.dist-info/RECORD"] = "\n".join(record + ["nvtx-0.0.0.dist-info/RECORD,,"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nvtx-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """(environment, folder): the stand-in machine and the planted inputs."""
    d = tmp_path_factory.mktemp("standin")
    py = d / "python3"
    py.write_text(f'#!/bin/sh\nPYTHONPATH="{STANDIN}${{PYTHONPATH:+:$PYTHONPATH}}" '
                  f'exec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    for name, text in (("planted", PLANTED_TESTS), ("waiting", WAITING_TESTS),
                       ("cut", CUT_TESTS)):
        (d / name).mkdir()
        (d / name / f"test_{name}.py").write_text(text)
    fake_nvtx_wheel(d / "whl")
    (d / "carried_nothing").mkdir()  # gpu_prepare.sh --after-call1 after a call 1 that finished
    (d / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 300)
    subprocess.run([sys.executable, "-m", "cllm_gpu", "prepare", str(d / "corpus.txt"),
                    "--out", str(d / "tok")], check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    (d / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUT", "FAKE_SANITIZER"))}
    env.update(
        PATH=f"{STANDIN / 'bin'}{os.pathsep}{os.environ['PATH']}", PYTHON=str(py),
        TMPDIR=str(d / "tmp"), PACK_EVERY_S="1", GPU_TESTS=str(d / "planted"),
        TEST_TIME_LIMIT_S="2", TEST_HARD_GRACE_S="1", SMOKE_ARGS="--quick --only gelu",
        BENCH_BIG="micro", BENCH_SMALL="micro", BENCH_TINY="micro", BENCH_STEPS="1",
        BENCH_WARMUP="1", BENCH_ROUNDS="1", KERNELS_ARGS="--size tiny --reps 2 --no-torch",
        WHEEL_DIR=str(d / "whl"), PROFILE_DATA=str(d / "tok"), PROFILE_STEPS="1",
        CALL1_PROGRESS=str(d / "carried_nothing"),
        # not the checkout's data/tinyshakespeare, which a lent slot puts there to carry it:
        # with it the stand-in trained the preset on the emulator and call 2 ran out of time
        SHAKESPEARE_TEXT=str(d / "no_text_carried" / "input.txt"),
        PROFILE_ARGS="--n-layer 1 --n-head 2 --n-embd 32 --block-size 16 --batch-size 2 "
                     "--precision bf16",
        PYTHONPATH="",
        # TMPDIR moves the emulator's build cache too: keep the one test_kernels_emulated uses
        CLLM_EMU_CACHE=os.environ.get("CLLM_EMU_CACHE",
                                      str(Path(tempfile.gettempdir()) / "cllm_emu_cache")))
    return env, d


def session_pids(sid):
    """Processes still alive in the process session `sid` (the harness and all it started:
    `timeout` puts its command in a process group of its own, but not a session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid):
    """SIGKILL every process of the session, as the device tool ends a command at its limit."""
    for _ in range(20):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def start(env, out, **extra):
    out.mkdir(parents=True, exist_ok=True)
    e = {**env, "OUT": str(out), **{k: str(v) for k, v in extra.items()}}
    return subprocess.Popen(["bash", str(SESSION)], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout=240):
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        raise
    left = session_pids(proc.pid)  # every stage's processes ended with the call
    kill_session(proc.pid)
    assert not left, f"processes left running after the session: {left}"
    # bash's own errors in the harness ("gpu_session.sh: line 222: ...: No such file or
    # directory" from a second stop_packer after $WORK was removed): a harness bug
    harness_errors = re.findall(r"^.*gpu_session\.sh: line \d+: .*$", text, re.M)
    assert not harness_errors, harness_errors
    return proc.returncode, text


def check_out_folder(out: Path):
    """What the device tool brings back: at most 8 plain files (the harness writes them at the
    top), plain names, 16 MiB each, 64 MiB in all."""
    files = sorted(out.iterdir())
    assert len(files) <= 8, files
    for f in files:
        assert f.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", f.name), f
        assert f.stat().st_size <= 16 << 20, (f, f.stat().st_size)
    assert sum(f.stat().st_size for f in files) <= 64 << 20
    return {f.name for f in files}


def members(tgz: Path) -> dict:
    with tarfile.open(tgz) as t:
        return {m.name: (t.extractfile(m).read().decode(errors="replace") if m.isfile() else "")
                for m in t.getmembers()}


def stage(record, name):
    return next(s for s in record["stages"] if s["stage"] == name)


def torch_importable():
    return subprocess.run([sys.executable, "-c", "import torch"],
                          capture_output=True).returncode == 0


def test_killed_in_the_middle_of_a_stage_leaves_results_in_out(standin, tmp_path):
    env, d = standin
    out = tmp_path / "out"
    proc = start(env, out, CALL=1, GPU_TESTS=d / "waiting", TEST_TIME_LIMIT_S=300)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:  # kill once the tests stage is under way and its first result was packed into OUT
        deadline = time.time() + 120
        while time.time() < deadline:
            tgz = out / "logs_call1.tgz"
            if tgz.is_file():
                try:
                    if "test_a_passes" in members(tgz).get("logs/tests_progress.jsonl", ""):
                        break
                except (tarfile.TarError, EOFError, OSError):
                    pass  # (a tgz of an earlier pack is replaced by rename: never half-written)
            time.sleep(0.2)
        else:
            raise AssertionError("the tests stage never got going:\n" + "".join(lines))
    finally:
        kill_session(proc.pid)
    proc.wait(timeout=10)
    names = check_out_folder(out)
    assert {"call1.json", "logs_call1.tgz"} <= names, names
    assert not any(n.startswith("bench") for n in names)
    rec = json.loads((out / "call1.json").read_text())
    assert rec["complete"] is False and rec["tag"] == "call1"
    assert [(s["stage"], s["verdict"]) for s in rec["stages"]] == [("env", "PASS"),
                                                                   ("compile", "PASS")]
    assert "emulator" in rec["env"]["gpu"] and len(rec["compile"]) == len(NAME_EXPRESSIONS)
    logs = members(out / "logs_call1.tgz")
    assert {"logs/env.log", "logs/compile.log", "logs/tests.log"} <= set(logs)
    progress = [json.loads(l) for l in logs["logs/tests_progress.jsonl"].splitlines()]
    assert [(p["nodeid"].split("::")[1], p["outcome"]) for p in progress] == [
        ("test_a_passes", "passed")]
    text = "".join(lines)
    assert "STAGE env: PASS" in text and "STAGE compile: PASS" in text and "STAGE tests" not in text


def test_both_calls_end_to_end(standin, tmp_path):
    """Call 1 and call 2 side by side (two cores, half the wall time): every stage's verdict,
    the records and the log archives. Beside them (mostly asleep): a call 1 cut in the middle
    of both pytest stages, the step between the calls on its files, and a call 2 that runs
    the tests call 1 did not reach."""
    env, d = standin
    p1 = start(env, tmp_path / "out1", CALL=1, FAKE_SANITIZER_MEMCHECK="2 0",
               FAKE_SANITIZER_RACECHECK="0 1")
    p2 = start(env, tmp_path / "out2", CALL=2, BENCH_ARGS="--no-torch")
    cut1 = start(env, tmp_path / "cut1", CALL=1, STAGES="tests tests_slow", GPU_TESTS=d / "cut",
                 PLANTED_WAIT_S=60, TEST_TIME_LIMIT_S=300, SLOW_TEST_TIME_LIMIT_S=300, CAP_tests=5,
                 CAP_tests_slow=5, MIN_STAGE_S=1)
    carried = check_cut_call1_and_carry(*finish(cut1, timeout=60), tmp_path / "cut1",
                                        tmp_path / "carried")
    cut2 = start(env, tmp_path / "cut2", CALL=2, STAGES="tests tests_slow", GPU_TESTS=d / "cut",
                 CALL1_PROGRESS=carried)
    check_call2_runs_what_call1_did_not_reach(*finish(cut2, timeout=60), tmp_path / "cut2")
    rc1, text1 = finish(p1)
    rc2, text2 = finish(p2)

    # ---- call 1
    out = tmp_path / "out1"
    assert rc1 == 1, text1
    assert len(text1) < 12_000  # the device tool returns the last 12,000 characters
    for want in ("STAGE env: PASS", "STAGE compile: PASS", "STAGE tests: FAIL",
                 "FAILED test_planted.py::test_fails", "HUNG test_planted.py::test_hard_hang",
                 "STAGE sanitizer_probe: PASS",
                 "STAGE memcheck: PASS (rc 99", "0 kernel errors, 2 CUDA API errors",
                 "STAGE racecheck: FAIL", "first kernel error: Invalid __global__ write",
                 "STAGE tests_slow: PASS", "RESULT call1: NOT OK; not passed: tests racecheck"):
        assert want in text1, (want, text1)
    assert check_out_folder(out) == {"call1.json", "bench_call1.jsonl", "logs_call1.tgz"}
    rec = json.loads((out / "call1.json").read_text())
    assert rec["complete"] is True and rec["ok"] is False
    assert [s["stage"] for s in rec["stages"]] == ["env", "compile", "tests", "sanitizer_probe",
                                                   "memcheck", "racecheck", "bench_bf16",
                                                   "tests_slow"]
    tests = stage(rec, "tests")
    assert tests["counts"] == {"passed": 2, "failed": 2, "skipped": 1, "hung": 1}, tests
    assert [t.split("::")[1] for t in tests["failed"]] == ["test_fails", "test_soft_hang"]
    assert stage(rec, "memcheck")["api_errors"] == 2
    assert stage(rec, "racecheck")["kernel_errors"] == 1
    bench = [json.loads(l) for l in (out / "bench_call1.jsonl").read_text().splitlines()]
    assert len(bench) == 1 and bench[0]["config"] == "micro" and bench[0]["precision"] == "bf16"
    assert bench[0]["cllm"]["tokens_per_s"] > 0 and bench[0]["commit"]
    # what CuPy's pools hold (the stand-in's default pool counts the live allocations)
    assert bench[0]["cllm"]["mem_reserved_bytes"] > 0, bench[0]["cllm"]
    if torch_importable():  # CPU PyTorch cannot run the "cuda" side: an error line, ours kept
        assert bench[0]["torch_eager"]["error"]
        assert "STAGE bench_bf16: FAIL" in text1 and "torch_eager ERROR" in text1
    logs = members(out / "logs_call1.tgz")
    assert not logs.get("logs/report_errors.log")  # the verdict helper never failed
    assert logs["logs/tests_hang_1.txt"].startswith("HUNG test_planted.py::test_hard_hang")
    assert "test_zz_after_hang" in logs["logs/tests_2.xml"]  # the rerun's JUnit XML
    assert "FAILED" not in logs["logs/tests_slow.log"]
    assert "Invalid __global__ write" in logs["logs/racecheck.log"]
    assert "ran gelu float32" in logs["logs/memcheck.log"]  # the real smoke driver ran

    # ---- call 2
    out = tmp_path / "out2"
    assert rc2 == 0, text2
    verdicts = re.findall(r"^STAGE (\w+): (\w+)", text2, re.M)
    assert verdicts == [("env", "PASS"), ("compile", "PASS"), ("tests", "SKIP"),
                        ("tests_slow", "SKIP"), ("bench_kernels", "PASS"),
                        ("profile", "PASS"), ("bench_fp32", "PASS"), ("bench_graph", "PASS"),
                        ("bench_tf32", "PASS"), ("bench_compile", "PASS"),
                        ("bench_graph_compile", "PASS"), ("shakespeare", "SKIP")], text2
    assert re.search(r"micro bf16 graph: cllm [\d,]+ tok/s, graph captures 1 replays \d", text2)
    assert "no text at" in text2  # the preset exists; no text was carried
    # call 1 finished both pytest stages: gpu_prepare.sh --after-call1 carried nothing
    assert len(re.findall(r"^STAGE tests(_slow)?: SKIP \(rc 0, " + SKIP_S + r" of \d+ s\) "
                          r"call 1 finished it \(gpu_prepare.sh --after-call1 carried nothing "
                          r"for it\)$",
                          text2, re.M)) == 2, text2
    assert "RESULT call2: OK" in text2
    assert check_out_folder(out) == {"call2.json", "bench_call2.jsonl", "kernels_call2.jsonl",
                                     "profile_call2.md", "logs_call2.tgz"}
    bench = [json.loads(l) for l in (out / "bench_call2.jsonl").read_text().splitlines()]
    assert [(b["precision"], b["tf32"], b["cuda_graph"]) for b in bench] == [
        ("fp32", False, False), ("bf16", False, True), ("fp32", True, False),
        ("bf16", False, False), ("bf16", False, True)]
    kernels = [json.loads(l) for l in (out / "kernels_call2.jsonl").read_text().splitlines()]
    # first the D = 64 attention forward's block shapes (--attn-fwd-variants), the backward's
    # variants (--attn-bwd-variants), then the ops
    assert [k["op"] for k in kernels] == ["attention_fwd_bf16_d64_variant"] * 6 + [
        "attention_bwd_bf16_variant"] * 4 + [
        "copy", "softmax_xent", "adamw", "layernorm_forward", "layernorm_backward",
        "bias_fill", "gemm", "attention_fwd_bwd", "attention_fwd_bwd_lattice", "attention_fwd_bwd_bf16",
        "attention_fwd_bwd_bf16_lattice"]
    variants = kernels[:6]
    assert [(k["variant"], k["bias"], k["max_threads"], k["mtiles"]) for k in variants] == [
        ("8x2", "none", 256, 1), ("4x3", "none", 128, 1), ("4x2-m2", "none", 128, 2),
        ("8x2", "lattice", 256, 1), ("4x3", "lattice", 128, 1), ("4x2-m2", "lattice", 128, 2)]
    assert all(k["same_bits_as_8x2"] and k["fwd_ms"] > 0 and k["fwd_bwd_ms"] > 0
               for k in variants)
    assert re.search(r"attention fwd D=64 4x3 lattice [\d.]+ ms \([\d.]+ of 8x2; fwd\+bwd "
                     r"[\d.]+\)", text2), text2
    bwd = kernels[6:10]
    assert [(k["variant"], k["bias"]) for k in bwd] == [
        ("two-pass", "none"), ("atomic-dq", "none"), ("two-pass", "lattice"),
        ("atomic-dq", "lattice")]
    assert all(k["dkv_same_bits_as_two_pass"] and k["bwd_ms"] > 0 and k["fwd_bwd_ms"] > 0
               and k["dq_rel_diff_from_two_pass"] <= k["dq_rel_tol"] for k in bwd)
    assert set(bwd[1]["kernels"]) == {"attention_backward_delta_kernel",
                                      "attention_backward_mma_kernel"}
    assert re.search(r"attention bwd D=64 atomic-dq lattice [\d.]+ ms \([\d.]+ of two-pass; "
                     r"fwd\+bwd [\d.]+\)", text2), text2
    assert all("bias_cost" in k for k in kernels if k["op"].endswith("_lattice"))
    assert not any("error" in k for k in kernels)
    assert not members(out / "logs_call2.tgz").get("logs/report_errors.log")
    # the profile covers every top-level range a training step opens, in step order (the
    # stand-in ncu reports kernels only for a range the program opened, and logs those it did)
    table = (out / "profile_call2.md").read_text()
    assert list(dict.fromkeys(re.findall(r"^\| (\w+) \| `", table, re.M))) == STEP_RANGES, table
    for rng in STEP_RANGES:
        assert f"| {rng} | `gelu_forward_kernel<float, float>` | 1 | 0.002 | 75.0% |" in table
    logs = members(out / "logs_call2.tgz")
    assert "no pip in" not in logs["logs/profile.log"]  # this python has pip: pip installs
    ncu_log = logs["logs/ncu_forward.log"]
    opened = re.search(r"top-level ranges opened: (.*)", ncu_log).group(1).split()
    assert sorted(opened) == sorted(f"cllm@{r}/" for r in STEP_RANGES), opened


def check_cut_call1_and_carry(rc, text, out, carried):
    """A call 1 cut at each pytest stage's cap (each ran one test, the next was running), then
    the step between the calls on its files: each stage's progress file carried, and what call
    2 will do said. Returns the carried folder."""
    assert rc == 1, text
    for name in ("tests", "tests_slow"):
        assert re.search(rf"STAGE {name}: TIMEOUT \(rc 124, \d+ s of 5 s\) 1 passed", text), text
    stale = carried / "tests_progress.jsonl"  # an earlier run's file: replaced
    stale.parent.mkdir()
    stale.write_text('{"nodeid": "test_cut.py::test_c_passes", "outcome": "passed"}\n')
    r = subprocess.run([sys.executable, ROOT / "scripts" / "gpu_session_report.py",
                        "after-call1", "--results", out, "--into", carried],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not r.stderr, r.stdout + r.stderr
    for name, running in (("tests", "test_b_waits"), ("tests_slow", "test_slow_b_waits")):
        assert (f"{name}: TIMEOUT in call 1, 1 test done (1 passed); call 2 runs the rest "
                f"(test_cut.py::{running} was running when it was cut: call 2 runs it again)"
                in r.stdout), r.stdout
        lines = [json.loads(l) for l in (carried / f"{name}_progress.jsonl").read_text()
                 .splitlines()]
        assert [(p["nodeid"].split("::")[1], p["outcome"]) for p in lines] == [
            (running.replace("_b_waits", "_a_passes"), "passed")], lines
    return carried


def check_call2_runs_what_call1_did_not_reach(rc, text, out):
    """Call 2 with call 1's progress carried: each pytest stage runs exactly the tests call 1
    did not reach, its verdict and record count those, and say how many call 1 had done."""
    assert rc == 0, text
    assert re.search(r"STAGE tests: PASS \(rc 0, .*\) 2 passed; slowest .*; call 1 had done 1$",
                     text, re.M), text
    assert re.search(r"STAGE tests_slow: PASS \(rc 0, .*\) 1 passed; slowest .*; call 1 had "
                     r"done 1$", text, re.M), text
    rec = json.loads((out / "call2.json").read_text())
    assert stage(rec, "tests")["counts"] == {"passed": 2, "failed": 0, "skipped": 0, "hung": 0}
    assert stage(rec, "tests_slow")["counts"]["passed"] == 1
    assert stage(rec, "tests")["call1_done"] == stage(rec, "tests_slow")["call1_done"] == 1
    logs = members(out / "logs_call2.tgz")
    ran = {name: re.findall(r'<testcase [^>]*name="(\w+)"', logs[f"logs/{name}_1.xml"])
           for name in ("tests", "tests_slow")}
    assert ran == {"tests": ["test_b_waits", "test_c_passes"],
                   "tests_slow": ["test_slow_b_waits"]}, ran
    # the stage's progress file: call 1's lines, then call 2's
    progress = [json.loads(l)["nodeid"].split("::")[1]
                for l in logs["logs/tests_progress.jsonl"].splitlines()]
    assert progress == ["test_a_passes", "test_b_waits", "test_c_passes"], progress


def test_call2_env_keeps_its_cap_when_tests_are_carried(standin, tmp_path):
    """Call 2 on a fresh machine (BUDGET_S 200) with call 1's tests carried: the later stages'
    floors (tests 30, the benchmarks 115, compile 30) would leave env 15 s of its 40, and an env
    cut short stops the call. The call is ended as soon as env's limit is said."""
    env, d = standin
    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / "tests_progress.jsonl").write_text("")
    proc = start(env, tmp_path / "out", CALL=2, BUDGET_S=200, CALL1_PROGRESS=carried)
    try:
        line = ""
        for line in proc.stdout:
            if line.startswith("== env"):
                break
    finally:
        kill_session(proc.pid)
    proc.wait(timeout=10)
    assert re.match(r"== env \(limit 40 s, \d+ s of the budget left\)", line), line



def test_the_memory_tests_pass_on_the_standin(standin, tmp_path):
    """tests/gpu/test_memory_cuda.py's small configs, as the tests stage runs them, pass on the
    stand-in: its CuPy default pool counts the live device allocations as CuPy's does. Before
    (h30x's dry run of call 1 with that file) the stand-in's pool answered 0 for every figure,
    and all three failed with a cache of 0 bytes, so a dry run with the real file read FAIL
    where the GPU would pass."""
    env, _ = standin
    r = subprocess.run(
        [env["PYTHON"], "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
         "tests/gpu/test_memory_cuda.py", "-k", "not gpt2", f"--basetemp={tmp_path / 'bt'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # every small config ran and passed (none skipped): the three cache checks and the
    # inference cache's (h31a)
    assert r.returncode == 0 and " passed" in r.stdout and "skipped" not in r.stdout, \
        r.stdout[-3000:] + r.stderr[-2000:]


def test_after_call1_carries_the_unfinished_test_stages(tmp_path):
    """The step between the calls on call 1's record and log archive: a stage that finished
    (PASS, FAIL) carries nothing; one cut (TIMEOUT), without budget (SKIP_BUDGET) or never
    reached (absent: the call was cut first) carries its progress, whole lines only, empty
    when it never started; without call1.json both stages are carried empty."""
    def after_call1(stages, progress=None, record=True, logs=()):
        res = tmp_path / "res"
        shutil.rmtree(res, ignore_errors=True)
        res.mkdir()
        if record:
            (res / "call1.json").write_text(json.dumps(
                {"tag": "call1", "stages": [{"stage": k, "verdict": v} for k, v in stages]}))
        if progress is not None:
            (res / "logs").mkdir()
            for name, text in progress.items():
                (res / "logs" / f"{name}_progress.jsonl").write_text(text)
            for name in logs:  # the hung tests' tracebacks, the pytest runs' JUnit XML
                (res / "logs" / name).write_text("HUNG t.py::c: no result\n")
            with tarfile.open(res / "logs_call1.tgz", "w:gz") as t:
                t.add(res / "logs", arcname="logs")
        r = subprocess.run([sys.executable, ROOT / "scripts" / "gpu_session_report.py",
                            "after-call1", "--results", res, "--into", tmp_path / "carried"],
                           capture_output=True, text=True, timeout=30)
        carried = {f.name: f.read_text() for f in (tmp_path / "carried").iterdir()} \
            if (tmp_path / "carried").is_dir() else None
        return r.returncode, r.stdout + r.stderr, carried

    done = ('{"nodeid": "t.py::a", "when": "call", "outcome": "passed"}\n'
            '{"nodeid": "t.py::b", "when": "call", "outcome": "failed", "message": "x"}\n'
            '{"nodeid": "t.py::c", "when": "call", "outcome": "hung"}\n{"nodeid": "t.py::d", "wh')
    rc, text, carried = after_call1([("tests", "FAIL"), ("tests_slow", "PASS")],
                                    {"tests": done, "tests_slow": done})
    assert rc == 0 and carried == {}, text
    assert "tests: FAIL in call 1: nothing carried, call 2 skips it" in text
    assert "tests_slow: PASS in call 1: nothing carried, call 2 skips it" in text
    # a FAIL whose last run ended at a hung test (too little time left, or its fourth run): the
    # tests after it were not reached; one that ran on after the hang finished
    rc, text, carried = after_call1([("tests", "FAIL"), ("tests_slow", "PASS")], {"tests": done},
                                    logs=["tests_hang_1.txt", "tests_2.xml", "tests_hang_2.txt"])
    assert rc == 0 and set(carried) == {"tests_progress.jsonl"}, text
    assert ("tests: FAIL in call 1 (its last run ended at a hung test, not run on after it), 3 "
            "tests done (1 passed, 1 failed, 1 hung); call 2 runs the rest") in text, text
    rc, text, carried = after_call1([("tests", "FAIL"), ("tests_slow", "PASS")], {"tests": done},
                                    logs=["tests_hang_1.txt", "tests_2.xml"])
    assert rc == 0 and carried == {}, text
    assert "tests: FAIL in call 1: nothing carried, call 2 skips it" in text
    rc, text, carried = after_call1([("tests", "SKIP_BUDGET")], {"tests": done})
    assert rc == 0, text
    assert carried == {"tests_progress.jsonl": "".join(done.splitlines(keepends=True)[:3]),
                       "tests_slow_progress.jsonl": ""}, carried
    assert ("tests: SKIP_BUDGET in call 1, 3 tests done (1 passed, 1 failed, 1 hung); call 2 "
            "runs the rest") in text
    assert ("tests_slow: not recorded (the call was cut before the stage ended) in call 1, 0 "
            "tests done; call 2 runs all of it") in text
    # the cut came after the running test's outcome was written (its teardown): --skip-done
    # leaves it out, so it is not announced as run again
    rc, text, carried = after_call1([("tests", "TIMEOUT")], {"tests": done},
                                    logs=["tests_hang.txt"])
    assert rc == 0 and "tests: TIMEOUT in call 1, 3 tests done" in text, text
    assert "was running when it was cut" not in text, text
    rc, text, carried = after_call1([("tests", "TIMEOUT")], record=False)
    assert rc == 0 and set(carried.values()) == {""}, text
    assert "no call1.json" in text and text.count("no logs_call1.tgz in") == 2
    # the record of another call: refused, nothing carried
    (tmp_path / "res" / "call1.json").write_text('{"tag": "call2", "stages": []}')
    r = subprocess.run([sys.executable, ROOT / "scripts" / "gpu_session_report.py",
                        "after-call1", "--results", tmp_path / "res", "--into",
                        tmp_path / "carried"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "the record of 'call2', not call 1" in r.stderr, r.stderr
    assert not (tmp_path / "carried").exists()  # (what the run before carried is gone)


def test_time_limits_budget_and_an_unusable_sanitizer(standin, tmp_path):
    env, d = standin
    # a stage past its cap is cut (TIMEOUT) and leaves nothing running; the next stage finds
    # too little budget left (SKIP_BUDGET)
    p = start(env, tmp_path / "a", CALL=1, STAGES="tests bench_bf16", GPU_TESTS=d / "waiting",
              TEST_TIME_LIMIT_S=0, CAP_tests=6, FLOOR_bench_bf16=0, BUDGET_S=20,
              MIN_STAGE_S=10, FINAL_RESERVE_S=5)
    rc, text = finish(p, timeout=60)
    assert rc == 1, text
    assert re.search(r"STAGE tests: TIMEOUT \(rc 124, \d+ s of 6 s\) 1 passed", text), text
    assert re.search(r"STAGE bench_bf16: SKIP_BUDGET .*s of the budget left", text), text
    assert "no time for: bench_bf16" in text
    # a machine where compute-sanitizer cannot run: the probe says so, the tools are skipped
    p = start(env, tmp_path / "b", CALL=1, STAGES="sanitizer_probe memcheck racecheck",
              FAKE_SANITIZER_UNSUPPORTED=1)
    rc, text = finish(p, timeout=60)
    assert rc == 1, text
    assert "STAGE sanitizer_probe: FAIL (rc 1, " in text and "Device not supported" in text
    assert len(re.findall(r"SKIP \(rc 0, " + SKIP_S + " of", text)) == 2, text
    assert "the sanitizer probe did not pass" in text
    # past --print-limit (1000): a kernel error the tool counted but did not print fails the
    # stage, however many API records filled the limit
    p = start(env, tmp_path / "d", CALL=1, STAGES="sanitizer_probe racecheck",
              FAKE_SANITIZER_RACECHECK="1000 1")
    rc, text = finish(p, timeout=60)
    assert rc == 1, text
    assert re.search(r"STAGE racecheck: FAIL \(rc 99, .*\) 0 kernel errors, 1000 CUDA API errors "
                     r"\(ERROR SUMMARY 1001\); 1 error past --print-limit, not printed", text), text
    # the attention forward's and backward's variants hanging: each cut at KERNELS_VARIANTS_S
    # with an error record, the other kernel benchmarks still run, the stage fails
    hang = tmp_path / "python3"
    hang.write_text(f'#!/bin/sh\ncase "$*" in *--attn-fwd-variants*|*--attn-bwd-variants*) '
                    f'sleep 60 ;; esac\nexec "{env["PYTHON"]}" "$@"\n')
    hang.chmod(0o755)
    p = start(env, tmp_path / "c", CALL=2, STAGES="bench_kernels", PYTHON=hang,
              KERNELS_VARIANTS_S=2)
    rc, text = finish(p, timeout=60)
    assert rc == 1, text
    assert re.search(r"STAGE bench_kernels: FAIL \(rc 1, .*\) 13 records, 2 errors", text), text
    assert "attention_fwd_bf16_d64_variant : ERROR timed out after 2 s" in text
    assert "attention_bwd_bf16_variant : ERROR timed out after 2 s" in text


def test_stage_limits_keep_the_later_floors_and_the_final_reserve(standin, tmp_path):
    """limit_for's arithmetic, read from each stage's "== NAME (limit N s" line (the stages
    here skip at once: no sanitizer probe passed): a stage gets at most what is left of the
    budget less FINAL_RESERVE_S and the floors of the stages after it (not its own), up to its
    cap; a floor never goes past what is left; under MIN_STAGE_S a stage is not started.
    (Seconds tick while the call runs: each limit may be a little under the sum.)"""
    env, _ = standin

    def limits(name, **kw):
        rc, text = finish(start(env, tmp_path / name, CALL="check", **kw), timeout=60)
        return {m[0]: int(m[1]) for m in re.findall(r"^== (\w+) \(limit (\d+) s", text, re.M)}, \
            text
    got, text = limits("a", STAGES="memcheck racecheck initcheck", BUDGET_S=300,
                       FINAL_RESERVE_S=10, CAP_memcheck=1000, CAP_racecheck=1000,
                       FLOOR_memcheck=30, FLOOR_racecheck=50, FLOOR_initcheck=40)
    assert 196 <= got["memcheck"] <= 200, text      # 300 - 10 - (50 + 40)
    assert 246 <= got["racecheck"] <= 250, text     # 300 - 10 - 40
    assert 286 <= got["initcheck"] <= 290, text     # 300 - 10, under its cap 900
    # a floor above what is left gets what is left
    got, text = limits("b", STAGES="memcheck", BUDGET_S=30, FINAL_RESERVE_S=10,
                       FLOOR_memcheck=50)
    assert 16 <= got["memcheck"] <= 20, text
    # 5 s left, under MIN_STAGE_S: not started
    got, text = limits("c", STAGES="memcheck", BUDGET_S=15, FINAL_RESERVE_S=10, MIN_STAGE_S=10)
    assert not got and "STAGE memcheck: SKIP_BUDGET" in text, text


def test_a_stage_whose_first_command_uses_its_limit_is_a_timeout(standin, tmp_path):
    """nvidia-smi hanging takes all of env's limit: the stage's later commands find no time
    left and do not run (tmo answers 124 for them), so the stage is a TIMEOUT, not the PASS
    of a command that never ran, and the call stops there."""
    env, _ = standin
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text("#!/bin/sh\nsleep 60\n")
    (tools / "nvidia-smi").chmod(0o755)
    p = start({**env, "PATH": f"{tools}{os.pathsep}{env['PATH']}"}, tmp_path / "out", CALL=1,
              STAGES="env compile", CAP_env=2)
    rc, text = finish(p, timeout=60)
    assert rc == 1 and re.search(r"STAGE env: TIMEOUT \(rc 124, ", text), text
    assert "STOP: no usable CUDA device" in text and "STAGE compile" not in text, text
    # the same with the report helper failing: the shell's own verdict from the exit status
    broken = tmp_path / "python3"
    broken.write_text(f'#!/bin/sh\ncase "$*" in *gpu_session_report.py\\ stage*) exit 1 ;; esac\n'
                      f'exec "{env["PYTHON"]}" "$@"\n')
    broken.chmod(0o755)
    p = start({**env, "PATH": f"{tools}{os.pathsep}{env['PATH']}"}, tmp_path / "out2", CALL=1,
              STAGES="env", CAP_env=2, PYTHON=broken)
    rc, text = finish(p, timeout=60)
    assert rc == 1 and "STAGE env: TIMEOUT (rc 124; the report helper failed" in text, text


def noisy_call(standin, tmp_path, source, stages, limit):
    """Call 1 running `stages` on a test file `source` against OUT_FILE_MAX_BYTES `limit`:
    its log archive, checked under the limit, as {member: text}."""
    env, _ = standin
    tests = tmp_path / "noisy"
    tests.mkdir()
    (tests / "test_noisy.py").write_text(source)
    p = start(env, tmp_path / "out", CALL=1, STAGES=stages, GPU_TESTS=tests,
              OUT_FILE_MAX_BYTES=limit)
    rc, text = finish(p, timeout=120)
    assert rc == 1 and f"STAGE {stages.split()[-1]}: FAIL" in text, text
    check_out_folder(tmp_path / "out")
    tgz = tmp_path / "out" / "logs_call1.tgz"
    assert tgz.stat().st_size <= limit, tgz.stat().st_size
    return members(tgz)


def test_a_log_archive_over_the_out_file_limit_is_packed_again_with_cut_logs(standin,
                                                                              tmp_path):
    """The device tool brings back no file over 16 MiB (OUT_FILE_MAX_BYTES), so a
    logs_<tag>.tgz over it would lose every log: a test printing 600 kB of incompressible text
    (in tests.log) against a 100 kB limit gives an archive under the limit whose logs keep
    their heads and tails, and a cut mark. Seen failing on the old pack_logs: a 344 kB
    archive."""
    logs = noisy_call(standin, tmp_path, "import os\n\ndef test_noisy():\n"
                      "    print('HEAD-OF-THE-LOG ' + os.urandom(300_000).hex() + "
                      "' TAIL-OF-THE-LOG')\n    assert False, 'planted noisy failure'\n",
                      "tests", 100_000)
    log = logs["logs/tests.log"]
    assert "bytes cut here by gpu_session.sh" in log, log[:2000]
    assert "HEAD-OF-THE-LOG" in log and "TAIL-OF-THE-LOG" in log   # both ends of the output
    assert "1 failed" in log.rstrip().splitlines()[-1], log[-2000:]  # and the last line
    assert "planted noisy failure" in log      # the short summary at its end is kept
    assert "tests_progress.jsonl" in " ".join(logs)   # small files whole
    assert json.loads(logs["logs/tests_progress.jsonl"].splitlines()[0])["outcome"] == "failed"


def test_logs_each_under_the_out_file_limit_but_over_it_together_are_cut(standin, tmp_path):
    """The cut is by each log's share of the limit, not by the limit: tests.log and
    tests_slow.log each hold a test's 120 kB of output, under a 125 kB limit one by one, ~140
    kB packed together; the archive is cut under the limit (cutting only logs over the whole
    limit left it over it, and so lost every log)."""
    noisy = "    print(os.urandom(60_000).hex())\n    assert False, 'planted noisy failure'\n"
    logs = noisy_call(standin, tmp_path, "import os\n\nimport pytest\n\n"
                      f"def test_noisy():\n{noisy}\n"
                      f"@pytest.mark.slow\ndef test_noisy_and_slow():\n{noisy}",
                      "tests tests_slow", 125_000)
    for name in ("logs/tests.log", "logs/tests_slow.log"):
        assert "bytes cut here by gpu_session.sh" in logs[name], logs[name][-2000:]
        assert "1 failed" in logs[name].rstrip().splitlines()[-1], logs[name][-2000:]


def test_logs_that_do_not_compress_are_cut_under_the_out_file_limit(standin, tmp_path):
    """Each log over an even share of half the limit is cut to it: the other half holds each
    log's cut mark and tar header, so the archive fits where gzip shrinks nothing. 300 logs of 1,000 random bytes
    (written by the stage's test into the session's logs folder) against a 100 kB limit: a
    56 kB archive; cut to shares of the whole limit (the mutation audit's survivor), 106 kB,
    over the limit, and every log would be lost."""
    logs = noisy_call(standin, tmp_path, "import os\n\ndef test_noisy():\n"
                      "    noise = os.path.join(os.environ['GPU_SESSION_WORK'], 'logs', 'noise')\n"
                      "    os.makedirs(noise)\n"
                      "    for i in range(300):\n"
                      "        with open(os.path.join(noise, f'{i}.bin'), 'wb') as f:\n"
                      "            f.write(os.urandom(1000))\n"
                      "    assert False, 'planted noisy failure'\n", "tests", 100_000)
    noise = [text for name, text in logs.items() if name.startswith("logs/noise/")]
    assert len(noise) == 300, sorted(logs)
    assert sum("bytes cut here by gpu_session.sh" in text for text in noise) == 300
    assert "planted noisy failure" in logs["logs/tests.log"]


def test_kernel_variants_that_fail_without_a_record_fail_the_stage(standin, tmp_path):
    """A variants process that dies without writing its error record (a crash in the driver,
    a kill): the other kernel benchmarks' records are all clean, and the stage still fails,
    on the variants' exit status."""
    env, _ = standin
    crash = tmp_path / "python3"
    crash.write_text(f'#!/bin/sh\ncase "$*" in *--attn-fwd-variants*|*--attn-bwd-variants*) '
                     f'exit 3 ;; esac\nexec "{env["PYTHON"]}" "$@"\n')
    crash.chmod(0o755)
    p = start(env, tmp_path / "out", CALL=2, STAGES="bench_kernels", PYTHON=crash)
    rc, text = finish(p, timeout=120)
    assert rc == 1, text
    assert re.search(r"STAGE bench_kernels: FAIL \(rc 1, .*\) 11 records, 0 errors", text), text


def test_profile_on_a_python_without_pip_unpacks_the_wheel(standin, tmp_path):
    """The device's python may lack pip: the profile stage then unzips the carried wheel."""
    env, d = standin
    (tmp_path / "nopip" / "pip").mkdir(parents=True)
    (tmp_path / "nopip" / "pip" / "__init__.py").write_text(
        'raise ImportError("no pip on this stand-in")\n')
    py = tmp_path / "python3"
    py.write_text(f'#!/bin/sh\nPYTHONPATH="{tmp_path / "nopip"}${{PYTHONPATH:+:$PYTHONPATH}}" '
                  f'exec "{env["PYTHON"]}" "$@"\n')
    py.chmod(0o755)
    assert subprocess.run([py, "-c", "import pip"], capture_output=True).returncode != 0
    p = start(env, tmp_path / "out", CALL=2, STAGES="profile", PYTHON=py,
              PROFILE_RANGES="classifier")
    rc, text = finish(p, timeout=120)
    assert rc == 0 and "STAGE profile: PASS" in text, text
    log = members(tmp_path / "out" / "logs_call2.tgz")["logs/profile.log"]
    assert "no pip in" in log and "unpacking nvtx-0.0.0-py3-none-any.whl" in log, log
    table = (tmp_path / "out" / "profile_call2.md").read_text()
    assert "| classifier | `gelu_forward_kernel<float, float>` |" in table, table


def test_the_session_profile_runs_no_nsight_systems_timeline(standin, tmp_path):
    """Where nsys exists, profile.sh first records a whole training run's timeline; in the
    session none of its files come back and that run would come out of the stage's cap before
    the first ncu range, so the profile stage leaves nsys out (PROFILE_NSYS=0)."""
    env, d = standin
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nsys").write_text(f'#!/bin/sh\necho "$*" >>"{tmp_path}/nsys_ran"\nexit 0\n')
    (tools / "nsys").chmod(0o755)
    p = start({**env, "PATH": f"{tools}{os.pathsep}{env['PATH']}"}, tmp_path / "out", CALL=2,
              STAGES="profile", PROFILE_RANGES="classifier")
    rc, text = finish(p, timeout=120)
    assert rc == 0 and "STAGE profile: PASS" in text, text
    assert not (tmp_path / "nsys_ran").exists(), (tmp_path / "nsys_ran").read_text()
    table = (tmp_path / "out" / "profile_call2.md").read_text()
    assert "| classifier | `gelu_forward_kernel<float, float>` |" in table, table


@pytest.mark.parametrize("fake, said", [("1", "ERR_NVGPUCTRPERM"),
                                         ("library", "Failed to initialize the profiler")])
def test_a_profile_without_counter_permission_stops_after_its_first_range(standin, tmp_path,
                                                                          fake, said):
    """ncu on a machine whose GPU counters it may not read runs the whole training job, says
    ERR_NVGPUCTRPERM and profiles nothing: no later range could do better, so profile.sh stops
    there (not one more training run per range) and the verdict says why. The same where
    ncu's profiler does not load at all ('Failed to initialize the profiler: LibraryNotLoaded',
    a gVisor H200 machine in KINDS.md): before h33c each of the four ranges ran ncu again."""
    env, d = standin
    p = start(env, tmp_path / "out", CALL=2, STAGES="profile", FAKE_NCU_NO_PERMISSION=fake,
              PROFILE_RANGES="forward classifier backward optimizer")
    rc, text = finish(p, timeout=120)
    assert rc == 1 and "STAGE profile: FAIL" in text and said in text, text
    logs = members(tmp_path / "out" / "logs_call2.tgz")
    assert "ncu: range forward" in logs["logs/profile.log"], logs["logs/profile.log"]
    assert "ncu: range classifier" not in logs["logs/profile.log"], logs["logs/profile.log"]
    assert "logs/ncu_classifier.log" not in logs


def test_a_profile_cut_short_keeps_the_ranges_it_finished(standin, tmp_path):
    """profile.md is rewritten after every range: the second range's training run hangs, the
    stage is cut at its cap, and the table holds the first range."""
    env, d = standin
    hang = tmp_path / "python3"
    hang.write_text(f'#!/bin/sh\ncase "$*" in *"cllm_gpu train"*)\n'
                    f'  [ -e "{tmp_path}/ran" ] && sleep 60; touch "{tmp_path}/ran" ;;\nesac\n'
                    f'exec "{env["PYTHON"]}" "$@"\n')
    hang.chmod(0o755)
    # the cap must outlast the first range's stand-in training run: 8 s did not under load
    # (coverage and other jobs on 2 cores: "no profile table"); the hang is 60 s
    p = start(env, tmp_path / "out", CALL=2, STAGES="profile", PYTHON=hang, CAP_profile=20,
              PROFILE_RANGES="classifier optimizer")
    rc, text = finish(p, timeout=60)
    assert rc == 1 and re.search(r"STAGE profile: TIMEOUT \(rc 124, .*\) classifier", text), text
    table = (tmp_path / "out" / "profile_call2.md").read_text()
    assert "| classifier | `gelu_forward_kernel<float, float>` |" in table, table
    assert "| optimizer |" not in table


def _script_module(name):
    """scripts/<name>.py imported as a module (scripts/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_table_reads_the_report_from_the_csv_or_the_log(tmp_path, capsys):
    """ncu's report in ncu_RANGE.csv (its stdout), or in ncu_RANGE.log should ncu send it to
    --log-file with its own messages while the training log fills the .csv."""
    table = _script_module("profile_table")
    report = ('"ID","Kernel Name","gpu__time_duration.sum"\n"","","usecond"\n'
              '"0","void gemm_kernel<bf16>(int)","2"\n"1","void gemm_kernel<bf16>(int)","3"\n')
    (tmp_path / "ncu_block.0.forward.csv").write_text("==PROF== done\n" + report)
    (tmp_path / "ncu_classifier.csv").write_text("step 1 | loss 10.8\n")
    (tmp_path / "ncu_classifier.log").write_text("==PROF== Connected to process\n" + report)
    assert table.main([str(tmp_path), "--steps", "2", "--ranges", "block.0.forward",
                       "classifier", "backward"]) == 0
    out = capsys.readouterr().out
    for rng in ("block.0.forward", "classifier"):
        assert f"| {rng} | `gemm_kernel<bf16>` | 1 | 0.003 | 100.0% |" in out, out
    assert "| backward |" not in out


def test_profile_table_sums_each_kernels_time_per_step_largest_first(tmp_path, capsys):
    """Per range: each kernel's launches and time summed over its launches, divided by the
    profiled steps; rows largest first; the share is of the range's whole time (the rows add
    up to 100%). A report without a units row is in nanoseconds (profile.sh asks for base
    units)."""
    table = _script_module("profile_table")
    head = '"ID","Kernel Name","gpu__time_duration.sum"\n'
    rows = [("void gelu_kernel(float *)", "1,000"), ("void gemm_kernel<bf16>(int)", "2,000"),
            ("void gemm_kernel<bf16>(int)", "4,000"), ("void gelu_kernel(float *)", "1,000")]
    (tmp_path / "ncu_forward.csv").write_text(
        head + "".join(f'"{i}","{name}","{ns}"\n' for i, (name, ns) in enumerate(rows)))
    assert table.main([str(tmp_path), "--steps", "2", "--ranges", "forward"]) == 0
    out = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| forward |")]
    assert out == ["| forward | `gemm_kernel<bf16>` | 1 | 0.003 | 75.0% |",
                   "| forward | `gelu_kernel` | 1 | 0.001 | 25.0% |"], out


def test_profile_table_keeps_template_value_arguments_in_kernel_names(tmp_path, capsys):
    """ncu demangles a template's value arguments with a cast, "(int)64", "(bool)1" (as
    NVIDIA's tools print PyTorch's `vectorized_elementwise_kernel<(int)4, ...>`): the name ends
    at the parameter list, the first "(" outside the template arguments, so the attention
    forward with and without the bias stay two rows, and no name is cut at "<(". The report:
    ncu's raw page with base units (header, units row, thousands separators)."""
    table = _script_module("profile_table")
    rows = [("void attention_forward_mma_kernel<(int)64, (bool)0>(const cllm_bf16 *, float *, "
             "int, int)", "1,200"),
            ("void attention_forward_mma_kernel<(int)64, (bool)1>(const cllm_bf16 *, float *, "
             "int, int)", "1,300"),
            ("void softmax_xent_kernel<float, cllm_bf16, (int)8>(const cllm_bf16 *, int)", "500"),
            ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1"
             "_execute_segment_k_off_kernel__5x_cublas", "2,000")]
    report = ['"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
              '"Block Size","Grid Size","Device","CC","gpu__time_duration.sum"',
              '"","","","","","","","","","","","nsecond"']
    report += [f'"{i}","1","python3","host","{name}","1","7","(128, 1, 1)","(96, 1, 1)","0",'
               f'"9.0","{ns}"' for i, (name, ns) in enumerate(rows)]
    (tmp_path / "ncu_forward.csv").write_text("\n".join(report) + "\n")
    assert table.main([str(tmp_path), "--ranges", "forward"]) == 0
    out = capsys.readouterr().out
    for name, ms in (("attention_forward_mma_kernel<(int)64, (bool)0>", "0.001"),
                     ("attention_forward_mma_kernel<(int)64, (bool)1>", "0.001"),
                     ("softmax_xent_kernel<float, cllm_bf16, (int)8>", "0.001"),
                     (rows[3][0][:70], "0.002")):   # a long name: its first 70 characters
        assert f"| forward | `{name}` | 1 | {ms} |" in out, out


def test_verdicts_on_report_excerpts(tmp_path):
    """The verdict helper on report excerpts in compute-sanitizer's formats ('Program hit'
    (CUDA API) records apart from kernel errors; racecheck's own summary line), on a
    --cuda-graph benchmark record whose step was never captured, and on the attention forward's
    block-shape variant records."""
    rep = _script_module("gpu_session_report")
    memcheck = """========= COMPUTE-SANITIZER
========= Program hit cudaErrorNotSupported (error 801) due to "operation not supported" on CUDA API call to cudaMallocAsync.
=========     Saved host backtrace up to driver entry point at error
========= Invalid __global__ read of size 4 bytes
=========     at layernorm_forward_kernel<float, float>(...)+0x1b0
=========     by thread (31,0,0) in block (3,0,0)
========= ERROR SUMMARY: 2 errors
"""
    c = rep.sanitizer_counts(memcheck)
    assert (c["errors"], c["api_errors"], c["kernel_errors"]) == (2, 1, 1)
    assert c["first_kernel_error"] == "Invalid __global__ read of size 4 bytes"
    racecheck = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at attention_backward_dq_kernel<64>(...)+0x2c0
=========     and Read access at attention_backward_dq_kernel<64>(...)+0x310 [4 hazards]
=========
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""
    c = rep.sanitizer_counts(racecheck)
    assert (c["errors"], c["kernel_errors"]) == (None, 1)
    assert c["first_kernel_error"].startswith("Error: Race reported between Write access")
    # past --print-limit the total is followed by a count of the records not printed (the
    # real tool's two lines): those may be kernel errors, so the stage cannot pass
    head = "========= COMPUTE-SANITIZER\n" + "".join(
        memcheck.splitlines(keepends=True)[1:3]) * 3
    limited = (head + "========= ERROR SUMMARY: 5 errors\n========= ERROR SUMMARY: 2 errors "
               "were not printed. Use --print-limit option to adjust the number of printed "
               "errors\n")
    c = rep.sanitizer_counts(limited)
    assert (c["errors"], c["api_errors"], c["kernel_errors"], c["unprinted"]) == (5, 3, 0, 2)
    rep.LOGS = tmp_path
    verdict, detail, _, _ = rep.judge_sanitizer("memcheck", "99", limited + "all kernels ran\n")
    assert verdict == "FAIL" and "2 errors past --print-limit" in detail, detail
    verdict, _, _, _ = rep.judge_sanitizer("memcheck", "99", head + "all kernels ran\n"
                                           "========= ERROR SUMMARY: 3 errors\n")
    assert verdict == "PASS"
    clean = "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    assert rep.sanitizer_counts(clean)["kernel_errors"] == 0
    assert rep.sanitizer_counts("========= Error: Device not supported.\n")["kernel_errors"] is None
    rep.RES, rep.TAG = tmp_path, "call2"
    (tmp_path / "bench_call2.jsonl").write_text(json.dumps(
        {"config": "tiny", "precision": "bf16", "tf32": False, "cuda_graph": True,
         "cllm": {"tokens_per_s": 1e5, "cuda_graph": {"captures": 0, "replays": 0}}}) + "\n")
    verdict, _, lines, extra = rep.judge_bench("bench_graph", "0", "", 0)
    assert verdict == "FAIL" and extra["errors"] == 1
    assert "ERROR the step was never captured" in lines[0]
    # a torch.compile line names its mode where it is not the default (bench_graph_compile)
    (tmp_path / "bench_call2.jsonl").write_text(json.dumps(
        {"config": "tiny", "precision": "bf16", "tf32": False, "cuda_graph": True,
         "variant": "torch_compile", "torch_compile_mode": "reduce-overhead",
         "cllm": {"tokens_per_s": 1e5, "cuda_graph": {"captures": 1, "replays": 5}},
         "torch_compile": {"tokens_per_s": 5e4}, "ratio_vs_torch_compile": 2.0}) + "\n")
    verdict, _, lines, _ = rep.judge_bench("bench_graph_compile", "0", "", 0)
    assert verdict == "PASS", lines
    assert lines[0].startswith("  tiny bf16 graph [torch_compile reduce-overhead]: "), lines
    assert "torch_compile ratio 2.00" in lines[0], lines
    # the attention forward's block-shape variants: a build whose bits differ from the
    # default's fails the stage; so does the variants' process timing out (the shell's record)
    var = dict(op="attention_fwd_bf16_d64_variant", bias="none", fwd_ms=0.2, fwd_of_8x2=1.0,
               fwd_bwd_of_8x2=1.0, same_bits_as_8x2=True)
    recs = [{**var, "variant": "8x2"}, {**var, "variant": "4x3", "fwd_of_8x2": 0.95}]
    (tmp_path / "kernels_call2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    verdict, _, lines, extra = rep.judge_bench_kernels("bench_kernels", "0", "", 0)
    assert verdict == "PASS" and extra == {"records": 2, "errors": 0}, lines
    assert "attention fwd D=64 4x3 none 0.200 ms (0.95 of 8x2; fwd+bwd 1.00)" in lines[0]
    recs[1]["same_bits_as_8x2"] = False
    recs.append({"op": "attention_fwd_bf16_d64_variant", "error": "timed out after 20 s"})
    (tmp_path / "kernels_call2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    verdict, _, lines, extra = rep.judge_bench_kernels("bench_kernels", "0", "", 0)
    assert verdict == "FAIL" and extra["errors"] == 2, lines
    assert "4x3 none: out or lse differ from 8x2's bits" in "\n".join(lines)
    assert "ERROR timed out after 20 s" in lines[-1]
    # the backward's variants: dK, dV not two-pass's bits, or dQ beyond the record's tolerance
    # (or missing), fail the stage
    bvar = dict(op="attention_bwd_bf16_variant", bias="none", shape=[16, 1024, 12, 64],
                bwd_ms=2.0, bwd_of_two_pass=1.0, fwd_bwd_of_two_pass=1.0,
                dkv_same_bits_as_two_pass=True, dq_rel_diff_from_two_pass=0.0, dq_rel_tol=1e-3)
    recs = [{**bvar, "variant": "two-pass"},
            {**bvar, "variant": "atomic-dq", "bwd_of_two_pass": 0.8,
             "dq_rel_diff_from_two_pass": 2e-7}]
    (tmp_path / "kernels_call2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    verdict, _, lines, extra = rep.judge_bench_kernels("bench_kernels", "0", "", 0)
    assert verdict == "PASS" and extra == {"records": 2, "errors": 0}, lines
    assert "attention bwd D=64 atomic-dq none 2.000 ms (0.80 of two-pass; fwd+bwd 1.00)" in \
        lines[0]
    for bad, why in (({"dkv_same_bits_as_two_pass": False}, "dK, dV differ from two-pass's bits"),
                     ({"dq_rel_diff_from_two_pass": 0.01}, "dQ 0.01 from two-pass's"),
                     ({"dq_rel_diff_from_two_pass": None}, "dQ None from two-pass's")):
        (tmp_path / "kernels_call2.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in (recs[0], {**recs[1], **bad})))
        verdict, _, lines, extra = rep.judge_bench_kernels("bench_kernels", "0", "", 0)
        assert verdict == "FAIL" and extra["errors"] == 1, lines
        assert f"atomic-dq none: {why}" in "\n".join(lines), lines
    # c_attn's bias fill as words: bits other than the plain broadcast copy's fail the stage
    fill = dict(op="bias_fill", shape=[16384, 2304], ms=0.04, of_copy_bw=0.44,
                elementwise_ms=0.18, elementwise_of_copy_bw=0.1, same_bits_as_elementwise=True)
    for same, verdict_wanted in ((True, "PASS"), (False, "FAIL")):
        (tmp_path / "kernels_call2.jsonl").write_text(
            json.dumps({**fill, "same_bits_as_elementwise": same}) + "\n")
        verdict, _, lines, extra = rep.judge_bench_kernels("bench_kernels", "0", "", 0)
        assert verdict == verdict_wanted and extra["errors"] == (not same), lines
    assert "bias_fill: the word fill's bits differ" in "\n".join(lines), lines
    # the attention records beside SDPA: fp32 against SDPA fp32, bf16 against SDPA flash bf16
    att = {"shape": [16, 1024, 12, 64], "ms": 1.0, "flop_per_s": 4e13, "of_sdpa_fp32": 1.25,
           "of_sdpa_flash_bf16": 0.25}
    (tmp_path / "kernels_call2.jsonl").write_text("".join(
        json.dumps({**att, "op": op}) + "\n" for op in ("attention_fwd_bwd_lattice",
                                                        "attention_fwd_bwd_bf16")))
    verdict, _, lines, _ = rep.judge_bench_kernels("bench_kernels", "0", "", 0)
    assert verdict == "PASS", lines
    assert "attention_fwd_bwd_lattice(16, 1024, 12, 64) 40.0 TF/s (1.25 of sdpa_fp32)" in \
        lines[0] and "attention_fwd_bwd_bf16(16, 1024, 12, 64) 40.0 TF/s (0.25 of " \
        "sdpa_flash_bf16)" in lines[0], lines
    # with the backend torch ran each SDPA case with (bench_kernels.sdpa_backend)
    (tmp_path / "kernels_call2.jsonl").write_text(json.dumps(
        {**att, "op": "attention_fwd_bwd", "sdpa_fp32_backend": "efficient"}) + "\n")
    verdict, _, lines, _ = rep.judge_bench_kernels("bench_kernels", "0", "", 0)
    assert "40.0 TF/s (1.25 of sdpa_fp32 [efficient])" in lines[0], lines


@pytest.mark.parametrize("jobs", [1, 2])
def test_compile_stage_records_every_module_and_kernel(tmp_path, jobs):
    """gpu_env.py compile on the stand-in, in this process or in 2 worker processes: one
    record per file (written when its last module is done), with every module's seconds and
    every kernel's resources."""
    out = tmp_path / "c.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_env.py"), "compile",
                        "--jobs", str(jobs), "--out", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": f"{STANDIN}:{ROOT}"})
    assert r.returncode == 0, r.stdout + r.stderr
    from cllm_gpu import kernels
    n_modules = sum(len(kernels.module_groups(s)) for s in NAME_EXPRESSIONS)
    assert f"({jobs} process" in r.stdout and "0 file(s) failed" in r.stdout
    recs = sorted((json.loads(line) for line in out.read_text().splitlines()),
                  key=lambda rec: list(NAME_EXPRESSIONS).index(rec["stem"]))
    assert [rec["stem"] for rec in recs] == list(NAME_EXPRESSIONS)
    mods = [m for rec in recs for m in rec["modules"]]
    assert len(mods) == n_modules and all(isinstance(m["seconds"], float) for m in mods)
    for rec in recs:
        assert sorted(rec["kernels"]) == sorted(NAME_EXPRESSIONS[rec["stem"]])
        assert all(v["max_threads_per_block"] for v in rec["kernels"].values())


def test_compile_modules_failed_in_a_worker_are_compiled_again_in_the_stage(monkeypatch, capsys):
    """A worker that fails (e.g. no CUDA context on a GPU in exclusive-process mode) does not
    fail the stage: its module is compiled again in the stage's own process."""
    import concurrent.futures
    gpu_env = _script_module("gpu_env")
    here = []

    def compile_module(stem, names):
        here.append(names[0])
        return {"seconds": 0.5, "kernels": {n: {"num_regs": 32} for n in names}}

    class InlinePool:   # each job run at once; the first one's worker "dies"
        def __init__(self, **kw):
            self.jobs = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args):
            f = concurrent.futures.Future()
            self.jobs += 1
            if self.jobs == 1:
                f.set_exception(RuntimeError("cudaErrorDevicesUnavailable"))
            else:
                f.set_result(fn(*args))
            return f
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InlinePool)
    monkeypatch.setattr(gpu_env, "_compile_module", compile_module)
    done = list(gpu_env._compile_all(jobs=2))
    from cllm_gpu import kernels
    modules = [(s, n) for s in NAME_EXPRESSIONS for n in kernels.module_groups(s)]
    assert sorted((s, n) for s, n, _ in done) == sorted(modules)   # each once
    assert all("error" not in r for _, _, r in done)
    first = max(modules, key=lambda sn: len(sn[1]))[1][0]   # submitted first: the largest
    assert here[-1] == first and here.count(first) == 1
    assert f"module {first} failed in a worker (RuntimeError: cudaErrorDevicesUnavailable)" \
        in capsys.readouterr().out
