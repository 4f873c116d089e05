#!/usr/bin/env bash
# Profile a few training steps on the GPU, per NVTX range and per kernel.
#
#   scripts/profile.sh [PROFILE_DIR] [extra `cllm-gpu train` flags]
#   e.g. scripts/profile.sh /tmp/prof --n-layer 12 --n-head 12 --n-embd 768 --block-size 1024 \
#            --vocab-size 50304 --batch-size 16 --precision bf16      # a GPT-2 124M bf16 step
#
# Nsight Compute (ncu) runs the same short training job once per phase, keeping only the kernels
# launched inside that NVTX range (domain `cllm`: a step's top-level ranges, forward,
# classifier (the LM head's GEMMs and softmax-cross-entropy, forward and backward), backward
# and optimizer), and records each kernel's GPU time; scripts/profile_table.py then writes
# PROFILE_DIR/profile.md, a per-range, per-kernel table of GPU milliseconds per step, after
# every range (a run cut short keeps the ranges it finished). Where Nsight Systems (nsys) exists
# it also records a timeline (PROFILE_DIR/train.nsys-rep) with its NVTX and kernel summaries.
# Everything goes under PROFILE_DIR (default ./profile_out); the environment's OUT is not
# touched (scripts/gpu_session.sh keeps its results there).
# Environment: PYTHON [python3], PROFILE_STEPS [3] training steps per run (the first one
# compiles and allocates; kernel GPU times are the same in every step), PROFILE_DATA a prepared
# data directory [prepared from the embedded default corpus into PROFILE_DIR/data],
# PROFILE_RANGES [forward classifier backward optimizer], PROFILE_NSYS [1: the Nsight Systems
# timeline where nsys exists; 0: ncu only].
# Needs: a GPU, ncu on the PATH, the `profile` extra (nvtx) importable.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PROFILE_DIR="${1:-$ROOT/profile_out}"
shift || true
PY="${PYTHON:-python3}"
STEPS="${PROFILE_STEPS:-3}"
RANGES="${PROFILE_RANGES:-forward classifier backward optimizer}"
mkdir -p "$PROFILE_DIR" || exit 1
if ! "$PY" -c 'import nvtx' 2>/dev/null; then
    echo "error: the nvtx package is missing (pip install 'cllm-gpu[profile]', or carry the" \
         "wheel that scripts/gpu_prepare.sh makes)" >&2
    exit 1
fi
DATA="${PROFILE_DATA:-$PROFILE_DIR/data}"
if [[ ! -f "$DATA/meta.json" ]]; then
    "$PY" -m cllm_gpu prepare default --out "$DATA" >/dev/null || exit 1
fi
TRAIN=("$PY" -m cllm_gpu train --data "$DATA" --out "$PROFILE_DIR/run" --max-steps "$STEPS"
       --log-interval 1 --eval-interval 0 --checkpoint-interval 0 --sample-tokens 0
       --no-final-checkpoint --backend cuda "$@")
if [[ "${PROFILE_NSYS:-1}" != 0 ]] && command -v nsys >/dev/null 2>&1; then
    rm -rf "$PROFILE_DIR/run"
    nsys profile --trace=cuda,nvtx,cublas --sample=none --force-overwrite=true \
        -o "$PROFILE_DIR/train" "${TRAIN[@]}" \
        && nsys stats --report nvtx_sum,cuda_gpu_kern_sum --format csv --force-export=true \
            -o "$PROFILE_DIR/nsys" "$PROFILE_DIR/train.nsys-rep"
fi
if ! command -v ncu >/dev/null 2>&1; then
    echo "ncu not found; only the Nsight Systems report (if any) was written" >&2
    exit 1
fi
failed=0 done_ranges=() table_rc=1
write_table() {  # the table of the ranges profiled so far; its exit status
    "$PY" "$ROOT/scripts/profile_table.py" "$PROFILE_DIR" --steps "$STEPS" \
        --ranges "${done_ranges[@]}" >"$PROFILE_DIR/profile.md.tmp"
    local rc=$?
    mv -f "$PROFILE_DIR/profile.md.tmp" "$PROFILE_DIR/profile.md"
    return $rc
}
for range in $RANGES; do
    rm -rf "$PROFILE_DIR/run"
    echo "ncu: range $range, $STEPS steps"
    # --print-units base: times in nanoseconds, whatever their size; --clock-control none:
    # the card's clocks as they are (a lent machine's settings are not ours to change);
    # --cache-control none: each kernel finds in L2 what the step's last kernel left there, as
    # in training (ncu's default flushes the caches before every kernel, which would slow the
    # small memory-bound kernels whose 16K x 768 bf16 inputs fit in the H200's L2)
    if ! ncu --nvtx --nvtx-include "cllm@${range}/" --clock-control none --cache-control none \
            --metrics gpu__time_duration.sum --csv --page raw --print-units base \
            --log-file "$PROFILE_DIR/ncu_${range}.log" "${TRAIN[@]}" \
            >"$PROFILE_DIR/ncu_${range}.csv"; then
        echo "ncu failed for range $range: see $PROFILE_DIR/ncu_${range}.log" >&2
        failed=1
    fi
    done_ranges+=("$range")
    write_table
    table_rc=$?
    # ncu that may not read the GPU's counters runs the whole job and profiles nothing, and one
    # whose profiler library does not load (a gVisor machine, KINDS.md) profiles nothing
    # either: so would every later range
    if grep -qsE "ERR_NVGPUCTRPERM|Failed to initialize the profiler" \
            "$PROFILE_DIR/ncu_${range}.log" "$PROFILE_DIR/ncu_${range}.csv"; then
        echo "ncu cannot profile on this machine (no access to the GPU's performance counters," \
             "or its profiler did not load: ncu_${range}.log): the ranges after $range are" \
             "left out" >&2
        break
    fi
done
(( table_rc == 0 )) || failed=1
echo "wrote $PROFILE_DIR/profile.md"
cat "$PROFILE_DIR/profile.md"
exit $failed
