#!/usr/bin/env bash
# Profile a few training steps on the GPU, per NVTX range and per kernel.
#
#   scripts/profile.sh [OUT_DIR] [extra `cllm-gpu train` flags]
#
# Nsight Compute (ncu) runs the same short training job once per phase, keeping only the kernels
# launched inside that NVTX range (domain `cllm`: forward, backward, optimizer), and records
# each kernel's GPU time; scripts/profile_table.py then writes OUT_DIR/profile.md, a
# per-range, per-kernel time table. Where Nsight Systems (nsys) exists it also records a
# timeline (OUT_DIR/train.nsys-rep) with its NVTX and kernel summaries.
# Needs: a GPU, ncu on the PATH, the `profile` extra (nvtx) installed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/profile_out}"
shift || true
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
"$PY" -c 'import nvtx' 2>/dev/null || { echo "error: the nvtx package is missing (pip install 'cllm-gpu[profile]')" >&2; exit 1; }
DATA="$OUT/data"
[ -f "$DATA/meta.json" ] || "$PY" -m cllm_gpu prepare default --out "$DATA" >/dev/null
# A short run: 8 steps; the first one includes kernel compilation (visible as its own launches).
TRAIN=("$PY" -m cllm_gpu train --data "$DATA" --out "$OUT/run" --max-steps 8 --log-interval 1
       --eval-interval 0 --checkpoint-interval 0 --sample-tokens 0 --backend cuda "$@")
if command -v nsys >/dev/null 2>&1; then
    rm -rf "$OUT/run"
    nsys profile --trace=cuda,nvtx,cublas --sample=none --force-overwrite=true \
        -o "$OUT/train" "${TRAIN[@]}"
    nsys stats --report nvtx_sum,cuda_gpu_kern_sum --format csv --force-export=true \
        -o "$OUT/nsys" "$OUT/train.nsys-rep" || true
fi
if ! command -v ncu >/dev/null 2>&1; then
    echo "ncu not found; only the Nsight Systems report (if any) was written" >&2
    exit 0
fi
for range in forward backward optimizer; do
    rm -rf "$OUT/run"
    ncu --nvtx --nvtx-include "cllm@${range}/" --clock-control none \
        --metrics gpu__time_duration.sum --csv --page raw \
        --log-file "$OUT/ncu_${range}.log" "${TRAIN[@]}" > "$OUT/ncu_${range}.csv"
done
"$PY" "$ROOT/scripts/profile_table.py" "$OUT" > "$OUT/profile.md"
echo "wrote $OUT/profile.md"
