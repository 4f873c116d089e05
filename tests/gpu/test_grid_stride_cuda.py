"""The grid-stride kernels' later loop iterations: AdamW, the casts, dropout, GELU, the
embedding forward and wpe gradient, atomic-dq's dQ cast. Their launchers cap the grid at
_cuda.MAX_GRID_STRIDE_BLOCKS (65,536 blocks of 256 threads), so a thread goes round its loop a
second time only past 16.7 M elements, a size no other check reaches (the largest here is
1 M, the emulator's some thousands): a stride of twice the grid, or a loop that stops after
its first pass, passed them all. With the cap lowered to 3 blocks (odd, and more than one, so
that gridDim counts) the ops' own checks run again on shapes where every thread takes several
iterations."""
import contextlib

import numpy as np
import pytest

import test_adamw_cuda as t_adamw
import test_attention_cuda as t_att
import test_cast_cuda as t_cast
import test_dropout_cuda as t_drop
import test_embedding_cuda as t_emb
import test_gelu_cuda as t_gelu
from cllm_gpu.ops import _cuda

pytest.importorskip("cupy")

CAP = 3


@contextlib.contextmanager
def grid_stride_cap(blocks=CAP):
    old = _cuda.MAX_GRID_STRIDE_BLOCKS
    _cuda.MAX_GRID_STRIDE_BLOCKS = blocks
    try:
        yield
    finally:
        _cuda.MAX_GRID_STRIDE_BLOCKS = old


# (name, check): each check's arrays span at least 2 x CAP x 256 elements (or groups of 4)
CHECKS = [
    ("adamw float32", lambda: t_adamw.test_adamw_matches_reference(np.float32, 5003, 0.37, 7)),
    ("adamw float64", lambda: t_adamw.test_adamw_matches_reference(np.float64, 5003, 1.0, 1)),
    ("adamw bf16 copy", lambda: t_adamw.test_adamw_writes_the_bf16_copy(5003, True)),
    ("cast to and from bf16", lambda: t_cast.test_to_bf16_bits_equal_host_rounding(10_003)),
    ("dropout float32",
     lambda: t_drop.test_dropout_masks_bit_identical_to_the_reference(np.float32, 10_003, 0.5)),
    ("gelu forward and backward",
     lambda: t_gelu.test_gelu_matches_reference(np.float32, (37, 301))),
    ("gelu fused bias and bf16 out",
     lambda: t_gelu.test_gelu_fused_bias_and_bf16_out((33, 65), np.float32)),
    ("embedding forward and wpe gradient",
     lambda: t_emb.test_embedding_matches_reference(np.float32, 3, 9, 300, 130)),
    ("attention atomic-dq dQ cast to bf16",
     lambda: t_att.test_attention_dqkv_bf16_is_the_bf16_copy_of_dqkv(
         1, 200, 2, 16, "atomic-dq", "alibi", True)),
]


def run_capped(check):
    with grid_stride_cap():
        assert _cuda.grid_stride_blocks(10**6) == CAP  # the launchers read the module's cap
        check()


@pytest.mark.parametrize("name,check", CHECKS, ids=[n for n, _ in CHECKS])
def test_grid_stride_kernels_with_several_iterations_per_thread(name, check):
    run_capped(check)
