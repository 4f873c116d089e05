#!/usr/bin/env bash
# Set up .venv, prepare the embedded default corpus, train a small model and print a sample.
# Extra arguments go to `cllm-gpu train` (see `cllm-gpu train --help`); with --resume it
# continues the previous run in runs/default instead of starting over, and a run named with
# --out is the user's: trained as `cllm-gpu train --out` trains it (refused where it holds
# checkpoints), never started over.
set -euo pipefail
source "$(dirname "$0")/_setup_venv.sh"
.venv/bin/cllm-gpu prepare default --out data/default
# A new demo run each time (the previous demo run's checkpoints are replaced), unless resuming
# or training into another --out (before, `--out runs/mine` deleted that run's checkpoints)
fresh=(--overwrite)
for a in "$@"; do
    case "$a" in --resume | --resume=* | --out | --out=*) fresh=() ;; esac
done
exec .venv/bin/cllm-gpu train --data data/default --out runs/default "${fresh[@]}" "$@"
