"""One module per op; each holds the NumPy reference and the CuPy launcher with one signature.
The public function of each op dispatches on where its arrays live (host -> NumPy, device ->
CUDA kernel)."""
from .adamw import adamw_update
from .attention import (attention_backward, attention_backward_scratch_size,
                        attention_bf16_inputs, attention_decode_ref, attention_forward,
                        attention_keys_values, attention_slopes)
from .cast import bf16_storage_dtype, cast_like, from_bf16, is_bf16, to_bf16
from .dropout import (ATTN_PROBS, ATTN_RESID, EMBED, MLP_RESID, DropoutKey, dropout,
                      dropout_bias_backward, dropout_bias_backward_scratch_size, site_id)
from .embedding import embedding_backward, embedding_forward
from .gelu import gelu_backward, gelu_backward_scratch_size, gelu_forward
from .gemm import gemm
from .grad_norm import clip_factor, grad_norm
from .layernorm import (layernorm_backward, layernorm_backward_scratch_size,
                        layernorm_backward_team, layernorm_forward, residual_layernorm_forward)
from .linear import linear_backward, linear_forward
from .softmax_xent import softmax_xent

__all__ = [
    "adamw_update", "attention_backward", "attention_backward_scratch_size",
    "attention_bf16_inputs", "attention_decode_ref", "attention_forward",
    "attention_keys_values", "attention_slopes",
    "ATTN_PROBS", "ATTN_RESID",
    "bf16_storage_dtype", "cast_like", "clip_factor", "dropout",
    "dropout_bias_backward", "dropout_bias_backward_scratch_size", "DropoutKey", "EMBED",
    "embedding_backward", "embedding_forward",
    "from_bf16", "gelu_backward", "gelu_backward_scratch_size", "gelu_forward", "gemm",
    "grad_norm", "is_bf16",
    "layernorm_backward", "layernorm_backward_scratch_size", "layernorm_backward_team",
    "layernorm_forward", "linear_backward", "linear_forward",
    "MLP_RESID", "residual_layernorm_forward", "site_id", "softmax_xent", "to_bf16",
]
