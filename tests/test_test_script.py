"""scripts/test.sh spreads the suite over the cores where no GPU is (pytest-xdist), runs it in one
process where CLLM_TEST_WORKERS=1, and refuses a worker count that is not a positive integer.

Each case runs the script itself on one small test, with a PATH that finds no nvidia-smi. The
script's set-up is a no-op only where .venv was installed from this pyproject with the dev extra
(as scripts/test.sh and .ci/run leave it); elsewhere it would install, so the cases skip.
"""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ONE_TEST = "tests/test_sampling.py::test_greedy_top_1_seed_and_tiny_temperatures"


def _venv_is_set_up():
    # _setup_venv.sh's stamp: .venv/.cllm-installed-<cksum of pyproject.toml>-<extras>
    stamps = list((ROOT / ".venv").glob(".cllm-installed-*-dev"))
    if not stamps:
        return False
    out = subprocess.run(["cksum", str(ROOT / "pyproject.toml")], capture_output=True, text=True)
    return any(s.name == f".cllm-installed-{out.stdout.split()[0]}-dev" for s in stamps)


pytestmark = pytest.mark.skipif(not _venv_is_set_up(),
                                reason=".venv is not set up for this pyproject (run scripts/test.sh)")


def _run_test_script(workers=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "CLLM_CI_")) and k != "CLLM_TEST_WORKERS"}
    env["PATH"] = "/usr/bin:/bin"       # no nvidia-smi: the script sees no GPU
    if workers is not None:
        env["CLLM_TEST_WORKERS"] = workers
    return subprocess.run(["bash", str(ROOT / "scripts" / "test.sh"), "-v", "-p", "no:cacheprovider",
                           ONE_TEST], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_without_a_gpu_one_worker_per_usable_core():
    cores = len(os.sched_getaffinity(0))
    proc = _run_test_script()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if cores > 1:
        assert f"created: {cores}/{cores} workers" in proc.stdout, proc.stdout
    else:
        assert "workers" not in proc.stdout, proc.stdout
    assert "1 passed" in proc.stdout


def test_workers_1_runs_in_one_process():
    proc = _run_test_script("1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "workers" not in proc.stdout and "1 passed" in proc.stdout, proc.stdout


@pytest.mark.parametrize("bad", ["0", "two", "-3", "2.5"])
def test_a_bad_worker_count_is_one_line_and_no_run(bad):
    proc = _run_test_script(bad)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        f"CLLM_TEST_WORKERS must be a positive integer, got '{bad}'"
    assert "passed" not in proc.stdout
