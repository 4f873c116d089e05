#!/usr/bin/env bash
# Prepare what a lent GPU call carries beside the working tree (docs/gpu.md), into .whl/
# (ignored by git, so it travels only when the device tool's `carry` names it):
#   - the `nvtx` wheel for the device's Python 3.12 on x86-64: the device has no registry, and
#     its nvidia-nvtx package holds only the C headers, so without this `import nvtx` fails
#     there and profile.sh sees no NVTX ranges (scripts/gpu_session.sh installs it into a
#     temporary folder for the profile stage: pip --no-index, or unzipped where its python
#     has no pip);
#   - .whl/COMMIT: the commit the tree is at (+dirty when tracked files differ), since the
#     device's copy of the tree has no .git or, as on 2026-12-04, the .git of an older commit;
#     every GPU record carries it (gpu_env.source_commit reads it before git);
#   - .whl/progress/: with --after-call1 DIR (DIR: where call 1's files came back), the progress
#     file of each pytest stage call 1 did not finish (TIMEOUT, SKIP_BUDGET, cut before it, or
#     a FAIL that stopped at a hung test),
#     so that call 2 runs the tests call 1 did not reach; a line per stage says what call 2
#     will do. Without --after-call1 the folder is removed: nothing stale reaches a call 1.
# Run it here, in the checkout the device tool sends, just before each call.
# Exits 1 when what would travel (tracked and untracked-not-ignored files, shared/, and the
# carried paths: CARRY, default ".whl", plus data/tinyshakespeare when it is there) is over the
# device tool's limit (TREE_LIMIT_MIB, 64); prints the carry list to pass.
#   usage: [PYTHON=python3] [NVTX_VERSION=<Dockerfile's>] [CARRY="paths"] scripts/gpu_prepare.sh
#          [--after-call1 DIR]
set -euo pipefail
after_call1=""
case "${1:-}" in
    "") ;;
    --after-call1)  # (a folder named relative to where this was started)
        after_call1="$(cd "${2:-/nonexistent}" 2>/dev/null && pwd)" || {
            echo "error: --after-call1 needs the folder call 1's files came back in" \
                 "(got '${2:-}')" >&2; exit 2; } ;;
    *) echo "error: unknown argument '$1' (usage: scripts/gpu_prepare.sh [--after-call1 DIR])" >&2
       exit 2 ;;
esac
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# the version the Docker image installs (one pin for both)
NVTX_VERSION="${NVTX_VERSION:-$(sed -n 's/^ARG NVTX_VERSION=//p' Dockerfile)}"
[[ -n "$NVTX_VERSION" ]] || { echo "error: no ARG NVTX_VERSION in Dockerfile" >&2; exit 1; }
mkdir -p .whl
if ! compgen -G ".whl/nvtx-$NVTX_VERSION-cp312-*.whl" >/dev/null; then
    rm -f .whl/nvtx-*.whl
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "nvtx==$NVTX_VERSION"
fi
commit="$(git rev-parse --short=12 HEAD)"
git diff --quiet HEAD -- || commit="$commit+dirty"
echo "$commit" >.whl/COMMIT
rm -rf .whl/progress
if [[ -n "$after_call1" ]]; then
    "$PYTHON" scripts/gpu_session_report.py after-call1 --results "$after_call1" \
        --into .whl/progress
fi
ls -l .whl
# The device tool's 64 MiB (TREE_LIMIT_MIB) is for all that travels, not the carry alone:
# tracked and untracked-not-ignored files, a shared/ folder in the checkout, and the carried
# paths (.whl; data/tinyshakespeare for the shakespeare stage, when it is there). Over it, the
# call is refused, at the cost of a machine start out of the slot's 15 minutes.
if [[ -z "${CARRY:-}" ]]; then
    CARRY=".whl"
    if [[ -d data/tinyshakespeare ]]; then CARRY="$CARRY data/tinyshakespeare"; fi
fi
read -r -a carry <<<"$CARRY"
for p in "${carry[@]}"; do
    [[ -e "$p" ]] || { echo "error: carried path '$p' is not there" >&2; exit 1; }
done
tree_paths() {  # NUL-separated: what travels without a carry
    git ls-files -z -co --exclude-standard
    if [[ -d shared ]]; then printf 'shared\0'; fi
}
bytes_of() {  # NUL-separated paths on stdin -> their bytes (apparent sizes, each file once; a
    # tracked file deleted in the tree counts nothing)
    { du -cb --files0-from=- 2>/dev/null || true; } | tail -n 1 | cut -f1
}
tree_bytes="$(tree_paths | bytes_of)"
carry_bytes="$(printf '%s\0' "${carry[@]}" | bytes_of)"
all_bytes="$({ tree_paths; printf '%s\0' "${carry[@]}"; } | bytes_of)"
limit_mib="${TREE_LIMIT_MIB:-64}"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
sizes="tree $(mib "$tree_bytes"), carried $(mib "$carry_bytes")"
if (( all_bytes > limit_mib * 1024 * 1024 )); then
    echo "error: $(mib "$all_bytes") would travel ($sizes), over the device tool's limit of" \
         "$limit_mib MiB for the working tree and carry: ignore or carry less" >&2
    exit 1
fi
carry_json="$(printf '"%s", ' "${carry[@]}")"
echo "ready: pass carry [${carry_json%, }] to the device tool ($(mib "$all_bytes") travel:" \
     "$sizes, of $limit_mib MiB)"
