#!/usr/bin/env bash
# Set up .venv, prepare the embedded default corpus, train a small model and print a sample.
# Extra arguments go to `cllm-gpu train` (see `cllm-gpu train --help`); with --resume it
# continues the previous run in runs/default instead of starting over.
set -euo pipefail
source "$(dirname "$0")/_setup_venv.sh"
.venv/bin/cllm-gpu prepare default --out data/default
# A new run each time (the previous demo run's checkpoints are replaced), unless resuming.
fresh=(--overwrite)
for a in "$@"; do [ "$a" = "--resume" ] && fresh=(); done
exec .venv/bin/cllm-gpu train --data data/default --out runs/default "${fresh[@]}" "$@"
