#!/usr/bin/env bash
# Everything a lent GPU slot should run, in one call, within a time budget (default 540 s):
#   1. QUICK=1 scripts/gpu_check.sh   (GPU suite, compute-sanitizer memcheck + racecheck)
#   2. scripts/bench.py --device cuda --precision bf16 on gpt2-124m and shakespeare-char
#      (PyTorch autocast eager and torch.compile beside)
#   3. scripts/bench_kernels.py --device cuda
#   4. scripts/bench.py fp32 on tiny, shakespeare-char, gpt2-124m; then tiny and
#      shakespeare-char in bf16 with --cuda-graph (where launch overhead matters); then
#      gpt2-124m with --tf32 on both sides
# Each stage gets a share of what is left and is cut by `timeout`, so one hung stage cannot eat
# the slot. Results: gpu_check.json, bench_gpu.jsonl, kernels_gpu.jsonl and one archive of all
# logs (gpu_session_logs.tgz) in $OUT (the device tool brings back at most 8 files from there),
# or in docs/results when OUT is unset.
#   usage: [BUDGET_S=540] [PYTHON=python3] scripts/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
RES="${OUT:-docs/results}"
WORK="$(mktemp -d)"
mkdir -p "$RES"
BUDGET="${BUDGET_S:-540}"
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
stage() {  # name, share of the remaining time (percent), command...
    local name=$1 share=$2 t t0 rc
    shift 2
    t=$(( $(left) * share / 100 ))
    if (( t < 20 )); then echo "STAGE $name: SKIP_BUDGET"; return; fi
    t0=$(date +%s)
    timeout -k 10 "$t" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    echo "STAGE $name: rc=$rc ($(( $(date +%s) - t0 )) s of $t s)"
    tail -n 4 "$WORK/$name.log"
}
"$PY" -c 'import cupy; print("cupy", cupy.__version__, "GPUs:", cupy.cuda.runtime.getDeviceCount())' \
    || { echo "no CuPy/GPU here"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# Order = priority: correctness, then the issue's targets (bf16 GPT-2 vs PyTorch, kernels
# vs the hardware), then the fp32 baseline, the graph speed-up, TF32.
stage gpu_check 45 env QUICK=1 BUDGET_S=$(( $(left) * 45 / 100 )) PYTHON="$PY" OUT="$WORK/check" \
    bash scripts/gpu_check.sh
stage bench_bf16 40 "$PY" scripts/bench.py --device cuda --configs gpt2-124m,shakespeare-char \
    --precision bf16 --torch-compile --steps 6 --warmup 2 --rounds 3 --out "$WORK/bench_gpu.jsonl"
stage bench_kernels 35 "$PY" scripts/bench_kernels.py --device cuda --reps 10 \
    --out "$WORK/kernels_gpu.jsonl"
stage bench 50 "$PY" scripts/bench.py --device cuda --configs tiny,shakespeare-char,gpt2-124m \
    --steps 6 --warmup 2 --rounds 3 --out "$WORK/bench_gpu.jsonl"
stage bench_graph 60 "$PY" scripts/bench.py --device cuda --configs tiny,shakespeare-char \
    --precision bf16 --cuda-graph --steps 20 --warmup 3 --rounds 4 --out "$WORK/bench_gpu.jsonl"
stage bench_tf32 100 "$PY" scripts/bench.py --device cuda --configs gpt2-124m --tf32 \
    --steps 6 --warmup 2 --rounds 3 --out "$WORK/bench_gpu.jsonl"
for f in "$WORK/check/gpu_check.json" "$WORK/bench_gpu.jsonl" "$WORK/kernels_gpu.jsonl"; do
    [ -f "$f" ] && cp "$f" "$RES/"
done
tar czf "$RES/gpu_session_logs.tgz" -C "$WORK" .
echo "done in $(( $(date +%s) - start )) s; results in $RES"
