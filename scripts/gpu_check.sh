#!/usr/bin/env bash
# GPU verification, for a machine with an NVIDIA GPU and CuPy installed:
#   1. compile every kernel through CuPy for this GPU,
#   2. the GPU test suite (tests/gpu: every CUDA op vs its NumPy reference, the whole model,
#      no allocation after the first step, a 200-step training run vs NumPy),
#   3. compute-sanitizer memcheck, racecheck, initcheck and synccheck over
#      scripts/gpu_kernel_smoke.py (every kernel once, CuPy's memory pool off).
# Writes a JSON summary to $OUT/gpu_check.json when $OUT is set, else docs/results/gpu_check.json,
# and the logs next to it. Exit status 0 only when every stage passed.
# Environment: PYTHON (default: .venv/bin/python if present, else python), PYTEST_ARGS,
# SANITIZER_TOOLS (default "memcheck racecheck initcheck synccheck").
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
RESULTS="${OUT:-docs/results}"
LOGS="$RESULTS/gpu_check_logs"
mkdir -p "$LOGS"
TOOLS="${SANITIZER_TOOLS:-memcheck racecheck initcheck synccheck}"

SAN=""
for c in compute-sanitizer /usr/local/cuda/bin/compute-sanitizer; do
    if command -v "$c" >/dev/null 2>&1; then SAN="$(command -v "$c")"; break; fi
done

t0=$(date +%s)
echo "== precompile"
"$PYTHON" -m cllm_gpu.kernels --precompile >"$LOGS/precompile.log" 2>&1
pre_rc=$?
echo "   rc=$pre_rc"

echo "== GPU test suite"
# shellcheck disable=SC2086
"$PYTHON" -m pytest -q tests/gpu tests/test_kernels_compile.py -rs \
    --junitxml="$LOGS/gpu_tests.xml" ${PYTEST_ARGS:-} >"$LOGS/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 3 "$LOGS/gpu_tests.log"

declare -A SAN_RC
for tool in $TOOLS; do
    if [[ -z "$SAN" ]]; then SAN_RC[$tool]=skipped; continue; fi
    echo "== compute-sanitizer --tool $tool"
    extra=()
    [[ "$tool" == "racecheck" ]] && extra=(--racecheck-report all)
    "$SAN" --tool "$tool" "${extra[@]}" --error-exitcode 99 --print-limit 50 \
        "$PYTHON" scripts/gpu_kernel_smoke.py >"$LOGS/sanitizer_$tool.log" 2>&1
    SAN_RC[$tool]=$?
    echo "   rc=${SAN_RC[$tool]}"
done

san_json="{"
sep=""
for tool in $TOOLS; do
    san_json+="$sep\"$tool\": \"${SAN_RC[$tool]}\""
    sep=", "
done
san_json+="}"

"$PYTHON" - "$RESULTS/gpu_check.json" "$LOGS" "$pre_rc" "$tests_rc" "$san_json" \
    "$(( $(date +%s) - t0 ))" "${SAN:-none}" <<'PY'
import json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, logs, pre_rc, tests_rc, san, secs, san_path = sys.argv[1:8]
logs = Path(logs)
summary = {"precompile_rc": int(pre_rc), "tests_rc": int(tests_rc), "seconds": int(secs),
           "compute_sanitizer": san_path}
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
for tool, rc in json.loads(san).items():
    entry = {"rc": rc}
    log = logs / f"sanitizer_{tool}.log"
    if log.is_file():
        m = re.findall(r"ERROR SUMMARY: (\d+) error", log.read_text(errors="replace"))
        entry["errors"] = int(m[-1]) if m else None
    sanitizer[tool] = entry
summary["sanitizer"] = sanitizer
try:
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    summary["gpu"] = name.decode() if isinstance(name, bytes) else name
    summary["cupy"] = cupy.__version__
except Exception as e:
    summary["gpu"] = f"unknown ({e})"
ok = (summary["precompile_rc"] == 0 and summary["tests_rc"] == 0
      and all(v["rc"] in ("0", "skipped") for v in sanitizer.values()))
summary["ok"] = ok
Path(out).write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
sys.exit(0 if ok else 1)
PY
