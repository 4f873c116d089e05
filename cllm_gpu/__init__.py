"""cllm-gpu: train GPT-style language models on NVIDIA GPUs (CuPy + CUDA kernels) or any CPU
(NumPy), computing the same functions on both."""
import importlib

__version__ = "0.1.0"

# Imported on first use (PEP 562): `import cllm_gpu` loads no NumPy or CuPy, so the CLI's
# entry point (__main__.run) starts its imports inside its Ctrl-C handling.
_EXPORTS = {"ModelConfig": ".config", "TrainConfig": ".config", "CLLMModel": ".model",
            "GpuTrainer": ".trainer", "CLLMError": ".errors"}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))  # a used export is in both


__all__ = ["ModelConfig", "TrainConfig", "CLLMModel", "GpuTrainer", "CLLMError", "__version__"]
