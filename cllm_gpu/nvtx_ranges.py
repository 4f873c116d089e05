"""NVTX ranges for profilers (Nsight Systems / Compute). A no-op when the `nvtx` package is absent
or when CLLM_NVTX=0."""
import contextlib
import os

try:
    import nvtx as _nvtx
except Exception:  # the `profile` extra is optional
    _nvtx = None

_enabled = _nvtx is not None and os.environ.get("CLLM_NVTX", "1") != "0"


if _enabled:
    def nvtx_range(name: str):
        return _nvtx.annotate(name, domain="cllm")
else:
    def nvtx_range(name: str):
        return contextlib.nullcontext()
