"""tests/gpu: CUDA ops against their NumPy references. Every test here is marked `gpu` and is
skipped, with the reason, when CuPy is missing or no CUDA GPU is visible."""
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _skip_reason():
    try:
        import cupy
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"CuPy not importable ({type(e).__name__}: {e})"
    try:
        if not cupy.cuda.is_available():
            return "no CUDA GPU visible (cupy.cuda.is_available() is False)"
    except Exception as e:  # pragma: no cover
        return f"CUDA unavailable ({type(e).__name__}: {e})"
    return None


SKIP_REASON = _skip_reason()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if SKIP_REASON:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
