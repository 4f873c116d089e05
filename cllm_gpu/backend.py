"""Backend choice: "numpy" (any CPU), "cuda" (CuPy + an NVIDIA GPU) or "auto"."""
import numpy as np

from .errors import ConfigError


def cuda_available() -> bool:
    try:
        import cupy
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def resolve_backend(name: str):
    """Return (backend_name, array_module)."""
    if name not in ("numpy", "cuda", "auto"):
        raise ConfigError(f"backend must be 'numpy', 'cuda' or 'auto', got {name!r}")
    if name == "auto":
        name = "cuda" if cuda_available() else "numpy"
    if name == "cuda":
        if not cuda_available():
            raise ConfigError("backend 'cuda' requested but CuPy or a CUDA GPU is not available "
                              "(install the cuda12/cuda13 extra, check nvidia-smi)")
        import cupy
        return "cuda", cupy
    return "numpy", np


def describe_backend(name: str) -> str:
    if name == "cuda":
        import cupy
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"CUDA backend on GPU {dev.id}: {gpu} (CuPy {cupy.__version__})"
    return f"NumPy backend on the CPU (numpy {np.__version__}; no CUDA GPU in use)"
