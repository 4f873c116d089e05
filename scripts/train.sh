#!/usr/bin/env bash
# Set up .venv, prepare the embedded default corpus, train a small model and print a sample.
# Extra arguments go to `cllm-gpu train` (see `cllm-gpu train --help`).
set -euo pipefail
source "$(dirname "$0")/_setup_venv.sh"
.venv/bin/cllm-gpu prepare default --out data/default
exec .venv/bin/cllm-gpu train --data data/default --out runs/default "$@"
