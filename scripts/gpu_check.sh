#!/usr/bin/env bash
# The full GPU verification, for a machine with an NVIDIA GPU and CuPy, without a lent slot's
# time pressure: the environment, every kernel compiled through CuPy (timed), the whole GPU
# suite (tests/gpu, slow tests included; per-test time limit, JUnit XML), and compute-sanitizer
# memcheck, racecheck, initcheck and synccheck over scripts/gpu_kernel_smoke.py at every head
# dimension. It is scripts/gpu_session.sh with CALL=check (same stages, verdicts and output
# files; see that script's header); results go to $OUT, or ./gpu_out when OUT is unset.
#   usage: [BUDGET_S=7200] [PYTHON=python3] [STAGES="tests memcheck"] scripts/gpu_check.sh
exec env CALL=check bash "$(dirname "$0")/gpu_session.sh" "$@"
