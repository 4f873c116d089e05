#!/usr/bin/env bash
# GPU verification, for a machine with an NVIDIA GPU and CuPy installed:
#   0. the environment (CuPy, CUDA runtime, GPU; one CuPy kernel compiles and runs),
#   1. compile every kernel through CuPy for this GPU,
#   2. the GPU test suite (tests/gpu: every CUDA op vs its NumPy reference, the whole model,
#      no allocation after the first step, a 200-step training run vs NumPy),
#   3. compute-sanitizer memcheck, racecheck, initcheck and synccheck over
#      scripts/gpu_kernel_smoke.py (every kernel once, CuPy's memory pool off).
#
# Lent GPU time is short, so the script is budget-aware:
#   QUICK=1   skip tests marked slow and tests/test_kernels_compile.py (CI compiles every kernel
#             with NVRTC already), run only memcheck and racecheck, on the smoke script's small
#             --quick shapes; the whole run stays under BUDGET_S (default 480 s).
#   Every stage runs under `timeout` (its own limit, cut to what is left of BUDGET_S), so a hung
#   stage cannot eat the slot; a stage with under 15 s left is skipped (SKIP_BUDGET, not ok).
#   Each stage prints one verdict line as soon as it ends, so a run cut short still says what
#   passed: "STAGE <name>: PASS|FAIL|TIMEOUT|SKIP|SKIP_BUDGET|ALL_SKIPPED (rc, seconds) detail".
# Writes a JSON summary to $OUT/gpu_check.json when $OUT is set, else docs/results/gpu_check.json
# (rewritten after every stage, so it exists even if the run is killed), and the logs next to
# it. Exit status 0 only when every stage that ran passed and none timed out.
# Environment: PYTHON (default: .venv/bin/python if present, else python), PYTEST_ARGS,
# QUICK, BUDGET_S, SANITIZER_TOOLS (default "memcheck racecheck initcheck synccheck"; QUICK:
# "memcheck racecheck"), PRECOMPILE_TIMEOUT, TESTS_TIMEOUT, SANITIZER_TIMEOUT (seconds each).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the checkout, no install needed
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
QUICK="${QUICK:-0}"
RESULTS="${OUT:-docs/results}"
LOGS="$RESULTS/gpu_check_logs"
mkdir -p "$LOGS"
: >"$LOGS/stages.tsv"
if [[ "$QUICK" == "1" ]]; then
    TOOLS="${SANITIZER_TOOLS:-memcheck racecheck}"
    BUDGET_S="${BUDGET_S:-480}"
    PRECOMPILE_TIMEOUT="${PRECOMPILE_TIMEOUT:-120}"
    TESTS_TIMEOUT="${TESTS_TIMEOUT:-270}"
    SANITIZER_TIMEOUT="${SANITIZER_TIMEOUT:-90}"
    TEST_PATHS=(tests/gpu)
    MARK=(-m "not slow")
    SMOKE_ARGS=(--quick)
else
    TOOLS="${SANITIZER_TOOLS:-memcheck racecheck initcheck synccheck}"
    BUDGET_S="${BUDGET_S:-7200}"
    PRECOMPILE_TIMEOUT="${PRECOMPILE_TIMEOUT:-300}"
    TESTS_TIMEOUT="${TESTS_TIMEOUT:-2400}"
    SANITIZER_TIMEOUT="${SANITIZER_TIMEOUT:-900}"
    TEST_PATHS=(tests/gpu tests/test_kernels_compile.py)
    MARK=()
    SMOKE_ARGS=()
fi

SAN=""
for c in compute-sanitizer /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
    if command -v "$c" >/dev/null 2>&1; then SAN="$(command -v "$c")"; break; fi
done

t0=$(date +%s)
deadline=$(( t0 + BUDGET_S ))
echo "gpu_check: QUICK=$QUICK budget ${BUDGET_S}s python=$PYTHON sanitizer=${SAN:-none} tools: $TOOLS"

summarize() {  # (re)write the JSON summary from $LOGS/stages.tsv; $1 = final (print + rc)
    "$PYTHON" - "$RESULTS/gpu_check.json" "$LOGS" "$(( $(date +%s) - t0 ))" "${SAN:-none}" \
        "$QUICK" "$1" <<'PY'
import json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, logs, secs, san_path, quick, final = sys.argv[1:7]
logs = Path(logs)
stages = {}
for line in (logs / "stages.tsv").read_text().splitlines():
    name, rc, verdict, s = line.split("\t")
    stages[name] = {"rc": rc, "verdict": verdict, "seconds": int(s)}
summary = {"quick": quick == "1", "seconds": int(secs), "compute_sanitizer": san_path,
           "complete": final == "1", "stages": stages}
pre = stages.get("precompile")
summary["precompile_rc"] = int(pre["rc"]) if pre and pre["rc"].lstrip("-").isdigit() else None
tst = stages.get("tests")
summary["tests_rc"] = int(tst["rc"]) if tst and tst["rc"].lstrip("-").isdigit() else None
try:
    root = ET.parse(logs / "gpu_tests.xml").getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    summary["tests"] = {k: sum(int(s.get(k, 0)) for s in suites)
                        for k in ("tests", "failures", "errors", "skipped")}
    summary["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}"
                               for s in suites for c in s.iter("testcase")
                               if c.find("failure") is not None or c.find("error") is not None]
except Exception as e:
    summary["tests"] = {"error": f"no junit xml: {e}"}
sanitizer = {}
for name, st in stages.items():
    if not name.startswith("sanitizer_"):
        continue
    tool = name[len("sanitizer_"):]
    entry = {"rc": st["rc"], "verdict": st["verdict"]}
    log = logs / f"sanitizer_{tool}.log"
    if log.is_file():
        m = re.findall(r"ERROR SUMMARY: (\d+) error", log.read_text(errors="replace"))
        entry["errors"] = int(m[-1]) if m else None
    sanitizer[tool] = entry
summary["sanitizer"] = sanitizer
if final == "1":
    try:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        summary["gpu"] = name.decode() if isinstance(name, bytes) else name
        summary["cupy"] = cupy.__version__
        summary["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    except Exception as e:
        summary["gpu"] = f"unknown ({e})"
t = summary["tests"]
ran = "tests" in t and t["tests"] > t["skipped"]  # every test skipped: no GPU was seen
ok = bool(stages) and all(st["verdict"] in ("PASS", "SKIP") for st in stages.values()) \
    and summary["precompile_rc"] == 0 and summary["tests_rc"] == 0 and ran
summary["ok"] = ok
Path(out).write_text(json.dumps(summary, indent=2) + "\n")
if final == "1":
    print(json.dumps(summary, indent=2))
sys.exit(0 if ok else 1)
PY
}

record() {  # name rc verdict seconds detail
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$LOGS/stages.tsv"
    echo "STAGE $1: $3 (rc=$2, ${4}s) $5"
    summarize 0 >/dev/null 2>&1
}

# run_stage NAME LIMIT LOG CMD...: runs CMD under timeout (LIMIT cut to the budget left)
run_stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local now left rc s verdict
    now=$(date +%s)
    left=$(( deadline - now ))
    (( limit > left )) && limit=$left
    if (( limit < 15 )); then
        record "$name" "-" SKIP_BUDGET 0 "(budget left ${left}s)"
        return
    fi
    echo "== $name (limit ${limit}s) -> $log"
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    s=$(( $(date +%s) - now ))
    if (( rc == 124 || rc == 137 )); then verdict=TIMEOUT
    elif (( rc == 0 )); then verdict=PASS
    else verdict=FAIL; fi
    STAGE_RC=$rc
    STAGE_VERDICT=$verdict
    STAGE_SECONDS=$s
}

finish() {
    trap - EXIT INT TERM
    echo "== summary"
    summarize 1
    exit $?
}
trap finish EXIT
trap 'echo "interrupted"; exit 130' INT TERM

# 0. environment: CuPy, CUDA runtime, the GPU, and one CuPy elementwise kernel (CuPy compiles its
#    own kernels with the CUDA headers: a machine without them fails here, in seconds)
STAGE_RC=-; STAGE_VERDICT=SKIP
run_stage env 60 "$LOGS/env.log" "$PYTHON" - <<'PY'
import sys, numpy, cupy
d = cupy.cuda.runtime.getDeviceProperties(0)
name = d["name"].decode() if isinstance(d["name"], bytes) else d["name"]
print(f"python {sys.version.split()[0]} numpy {numpy.__version__} cupy {cupy.__version__} "
      f"cuda runtime {cupy.cuda.runtime.runtimeGetVersion()} "
      f"driver {cupy.cuda.runtime.driverGetVersion()} gpu {name} sm_{d['major']}{d['minor']}")
assert int((cupy.arange(5) * 2).sum()) == 20
cupy.show_config()
PY
if [[ "$STAGE_VERDICT" != SKIP ]]; then
    detail=$(head -n 1 "$LOGS/env.log")
    [[ "$STAGE_RC" != 0 ]] && detail="$(tail -n 1 "$LOGS/env.log")"
    record env "$STAGE_RC" "$STAGE_VERDICT" "$STAGE_SECONDS" "${detail:0:300}"
fi

# 1. precompile
STAGE_RC=-; STAGE_VERDICT=SKIP
run_stage precompile "$PRECOMPILE_TIMEOUT" "$LOGS/precompile.log" \
    "$PYTHON" -m cllm_gpu.kernels --precompile
if [[ "$STAGE_VERDICT" != SKIP ]]; then
    detail=$(grep -m1 -E "error|Error" "$LOGS/precompile.log" || true)
    record precompile "$STAGE_RC" "$STAGE_VERDICT" "$STAGE_SECONDS" "${detail:0:200}"
fi

# 2. GPU tests (keep time for the sanitizers: they get at least 2 x 45 s of the budget)
reserve=0
[[ -n "$SAN" ]] && reserve=$(( 45 * $(wc -w <<<"$TOOLS") ))
tests_limit=$TESTS_TIMEOUT
left=$(( deadline - $(date +%s) - reserve ))
(( tests_limit > left )) && tests_limit=$left
STAGE_RC=-; STAGE_VERDICT=SKIP
# shellcheck disable=SC2086
run_stage tests "$tests_limit" "$LOGS/gpu_tests.log" \
    "$PYTHON" -m pytest -q -p no:cacheprovider "${TEST_PATHS[@]}" "${MARK[@]}" -rs \
    --durations=15 --junitxml="$LOGS/gpu_tests.xml" ${PYTEST_ARGS:-}
if [[ "$STAGE_VERDICT" != SKIP ]]; then
    last=$(grep -E "passed|failed|error" "$LOGS/gpu_tests.log" | tail -n 1)
    [[ -z "$last" ]] && last="last line: $(tail -n 1 "$LOGS/gpu_tests.log")"
    # every test skipped (no GPU seen, CuPy broken): rc 0, but nothing was verified
    [[ "$STAGE_VERDICT" == PASS && "$last" != *passed* ]] && STAGE_VERDICT=ALL_SKIPPED
    record tests "$STAGE_RC" "$STAGE_VERDICT" "$STAGE_SECONDS" "${last:0:300}"
    grep -E "^(FAILED|ERROR) " "$LOGS/gpu_tests.log" | head -n 30
fi

# 3. compute-sanitizer
for tool in $TOOLS; do
    if [[ -z "$SAN" ]]; then
        record "sanitizer_$tool" "-" SKIP 0 "(compute-sanitizer not found)"
        continue
    fi
    extra=()
    [[ "$tool" == "racecheck" ]] && extra=(--racecheck-report all)
    STAGE_RC=-; STAGE_VERDICT=SKIP
    run_stage "sanitizer_$tool" "$SANITIZER_TIMEOUT" "$LOGS/sanitizer_$tool.log" \
        "$SAN" --tool "$tool" "${extra[@]}" --error-exitcode 99 --print-limit 50 \
        "$PYTHON" scripts/gpu_kernel_smoke.py "${SMOKE_ARGS[@]}"
    if [[ "$STAGE_VERDICT" != SKIP ]]; then
        errs=$(grep -o "ERROR SUMMARY: [0-9]* error" "$LOGS/sanitizer_$tool.log" | tail -n 1)
        first=$(grep -m1 -E "^========= (Invalid|Race|Uninitialized|Barrier|Program hit|Error)" \
                "$LOGS/sanitizer_$tool.log" || true)
        record "sanitizer_$tool" "$STAGE_RC" "$STAGE_VERDICT" "$STAGE_SECONDS" \
            "${errs:-no ERROR SUMMARY} ${first:0:200}"
    fi
done
