#!/usr/bin/env bash
# Set up .venv with the test dependencies and run the test suite (GPU tests skip without a GPU).
# Extra arguments go to pytest.
set -euo pipefail
EXTRAS=dev
source "$(dirname "$0")/_setup_venv.sh"
# -rfEs: the reason for every skip, failure and error is printed at the end
exec .venv/bin/python -m pytest -q -rfEs "$@"
