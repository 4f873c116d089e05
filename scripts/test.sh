#!/usr/bin/env bash
# Set up .venv with the test dependencies and run the test suite (GPU tests skip without a GPU).
# Extra arguments go to pytest.
# Without a GPU the suite runs on every core this process may use (pytest-xdist, --dist
# worksteal: an idle worker takes tests from a busy one's queue, so a file of long tests is not
# left on one worker); on 2 cores that took 657 s against 1193 s serial. Where a GPU is, it runs
# in one process: the GPU tests' timings and memory figures assume they have the device alone.
# CLLM_TEST_WORKERS=N sets the worker count (1: one process, no xdist).
set -euo pipefail
EXTRAS=dev
source "$(dirname "$0")/_setup_venv.sh"
if [ -n "${CLLM_TEST_WORKERS:-}" ]; then
    workers="$CLLM_TEST_WORKERS"
    [[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "CLLM_TEST_WORKERS must be a positive integer, got '$workers'" >&2; exit 2; }
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    workers=1
else
    workers="$(.venv/bin/python -c 'import os; print(len(os.sched_getaffinity(0)))')"
fi
parallel=()
if [ "$workers" -gt 1 ]; then
    parallel=(-n "$workers" --dist worksteal)
fi
# -rfEs: the reason for every skip, failure and error is printed at the end
exec .venv/bin/python -m pytest -q -rfEs ${parallel[@]+"${parallel[@]}"} "$@"
