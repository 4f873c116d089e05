"""cllm-gpu: train GPT-style language models on NVIDIA GPUs (CuPy + CUDA kernels) or any CPU
(NumPy), computing the same functions on both."""
from .config import ModelConfig, TrainConfig
from .errors import CLLMError
from .model import CLLMModel

__version__ = "0.1.0"


def __getattr__(name):  # the trainer pulls in data/checkpoint code; import it on first use
    if name == "GpuTrainer":
        from .trainer import GpuTrainer
        return GpuTrainer
    raise AttributeError(name)


__all__ = ["ModelConfig", "TrainConfig", "CLLMModel", "GpuTrainer", "CLLMError", "__version__"]
