#!/usr/bin/env bash
# Prepare what a lent GPU call carries beside the working tree (docs/gpu.md), into .whl/
# (ignored by git, so it travels only when the device tool's `carry` names it):
#   - the `nvtx` wheel for the device's Python 3.12 on x86-64: the device has no registry, and
#     its nvidia-nvtx package holds only the C headers, so without this `import nvtx` fails
#     there and profile.sh sees no NVTX ranges (scripts/gpu_session.sh installs it into a
#     temporary folder for the profile stage: pip --no-index, or unzipped where its python
#     has no pip);
#   - .whl/COMMIT: the commit the tree is at (+dirty when tracked files differ), since the
#     device's copy of the tree has no .git; every GPU record carries it.
# Run it here, in the checkout the device tool sends, just before the calls.
#   usage: [PYTHON=python3] [NVTX_VERSION=<Dockerfile's>] scripts/gpu_prepare.sh
set -euo pipefail
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
ls -l .whl
echo "ready: pass carry [\".whl\"] to the device tool ($(du -sh .whl | cut -f1) travel with the tree)"
