# Sourced by train.sh and test.sh: create .venv (Python 3.10+) and install the package into it,
# with CuPy when `nvidia-smi` finds a GPU. EXTRAS may name more extras (comma-separated).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
# python3 may be older where a newer python3.X is installed beside it: say which was found
# and how to name another
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
    found="not found"
    command -v "$PYTHON" >/dev/null 2>&1 && found="$("$PYTHON" --version 2>&1 | head -n 1)"
    echo "cllm-gpu needs Python 3.10+, and $PYTHON is $found: name a newer interpreter" \
         "with PYTHON, e.g. PYTHON=python3.12 $0" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
extras="${EXTRAS:-}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "GPU found: $(nvidia-smi -L | head -n 1); installing with CuPy (cuda12 extra)"
    extras="${extras:+$extras,}cuda12"
fi
stamp=".venv/.cllm-installed-$(cat pyproject.toml | cksum | cut -d' ' -f1)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
    # A .venv without pip is made again: on Debian/Ubuntu without python3-venv, `python -m
    # venv` leaves .venv/bin/python and fails at ensurepip, and once that package is installed
    # the next run must not reuse the pip-less venv ("No module named pip")
    if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m venv .venv
    fi
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
    rm -f .venv/.cllm-installed-*
    touch "$stamp"
fi
