"""One module per op; each holds the NumPy reference and the CuPy launcher with one signature.
The public function of each op dispatches on where its arrays live (host -> NumPy, device ->
CUDA kernel)."""
from .adamw import adamw_update
from .attention import attention_backward, attention_forward
from .embedding import embedding_backward, embedding_forward
from .gelu import gelu_backward, gelu_forward
from .grad_norm import clip_factor, grad_norm
from .layernorm import layernorm_backward, layernorm_forward
from .linear import linear_backward, linear_forward
from .softmax_xent import softmax_xent

__all__ = [
    "adamw_update", "attention_backward", "attention_forward", "clip_factor",
    "embedding_backward", "embedding_forward", "gelu_backward", "gelu_forward", "grad_norm",
    "layernorm_backward", "layernorm_forward", "linear_backward", "linear_forward",
    "softmax_xent",
]
