"""The memory check's arithmetic against what a first training step really takes on the device.

check_training_fits (model.py) refuses a batch before anything is allocated, from
parameter_state_bytes, activation_cache_bytes (each array rounded as CuPy's pool rounds it) and
GPU_WORKSPACE_MARGIN. Here a CLLMModel is built and trained one step on CUDA, and CuPy's
default pool says what it took:

- the activation cache is made by set_batch (CLLMModel._cache_for: one ActivationCache per
  (B, T)); the pool's used_bytes grows by exactly activation_cache_bytes there;
- the step's peak beyond the parameter state and the cache (the pool's total_bytes after the
  step: CuPy keeps freed blocks cached, so it is at least the step's high-water mark) stays
  within GPU_WORKSPACE_MARGIN. The cuBLAS workspace the GEMMs use is ours
  (ops/gemm.py CUBLAS_WORKSPACE_BYTES, 32 MiB from CuPy's pool, made by the process's first
  GEMM) and is counted there; what cuBLAS allocates itself (its handle, its kernels' code) and
  the code of our kernels are outside the pool: the device's own free memory
  (cudaMemGetInfo) before the model and after the step counts them too, and the margin must
  cover that as well.

tests/cuda_emulator/run_cuda_path.py runs the small configs on the fake CuPy with a pool that
counts its live allocations (scenario `memory_test_on_the_fake_pool`; the fake has no
cudaMemGetInfo, so the device-wide figure is the GPU's alone); GPT-2 124M runs on the GPU only.
"""
import gc

import numpy as np
import pytest

from cllm_gpu import CLLMModel, ModelConfig, TrainConfig
from cllm_gpu.model import (GPU_WORKSPACE_MARGIN, activation_cache_bytes, inference_cache_bytes,
                            parameter_state_bytes)
from cllm_gpu.train_step import StepValues, training_step

cp = pytest.importorskip("cupy")

# (config, precision, B, T): head dim 32 in fp32; head dim 64 in bf16 (GPT-2's heads: the
# tensor-core attention reads bf16 qkv, Delta and dQ sums in attn_scratch) at a full block;
# head dim 8 in bf16 (float attention inputs and the output's bf16 copy att_mm); T 33 and 17
# are no tile's multiple
def _cfg(n_head, n_embd, block_size=64):
    return dict(vocab_size=97, block_size=block_size, n_layer=2, n_head=n_head, n_embd=n_embd)


SMALL = {"fp32-d32": (_cfg(2, 64), "fp32", 3, 33),
         "bf16-d64": (_cfg(2, 128), "bf16", 2, 64),
         "bf16-d8": (_cfg(4, 32, block_size=32), "bf16", 3, 17)}
GPT2_124M = (dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
             "bf16", 4, 1024)
CASES = {**SMALL, "gpt2-124m-bf16-b4": GPT2_124M}
MiB = 1 << 20


def _device_free():
    """cudaMemGetInfo's free bytes, or None where the runtime has none (the emulator's fake)."""
    mem_get_info = getattr(cp.cuda.runtime, "memGetInfo", None)
    return None if mem_get_info is None else int(mem_get_info()[0])


def _sync():
    cp.cuda.Device().synchronize()


def first_step_memory(cfg_kw, precision, B, T):
    """Build, set a batch, one training step; the pool's and the device's figures (bytes)."""
    pool = cp.get_default_memory_pool()
    gc.collect()               # arrays earlier tests dropped, then their cached blocks
    _sync()
    pool.free_all_blocks()
    used0, total0, free0 = pool.used_bytes(), pool.total_bytes(), _device_free()
    cfg = ModelConfig(**cfg_kw)
    model = CLLMModel(cfg, backend="cuda", dtype="float32", seed=0, precision=precision)
    tc = TrainConfig(batch_size=B, precision=precision, grad_clip=1.0)
    sv = StepValues(model.xp)
    rng = np.random.default_rng(0)
    batch = model.check_batch(rng.integers(0, cfg.vocab_size, (B, T)),
                              rng.integers(0, cfg.vocab_size, (B, T)))
    _sync()
    used_model = pool.used_bytes()
    model.set_batch(batch)                 # makes the (B, T) activation cache
    _sync()
    used_cache = pool.used_bytes()
    sv.set_inputs(tc, 1e-3, 1, batch.n_valid)
    training_step(model, [model.set_batch(batch)], tc, sv)
    loss = StepValues.read_outputs(sv.outputs())["loss"]
    _sync()
    free1 = _device_free()
    return dict(model=model, loss=loss, fragments=total0 - used0,
                params=used_model - used0, cache=used_cache - used_model,
                pool_peak=pool.total_bytes() - used0,
                device=None if free0 is None else free0 - free1)


@pytest.mark.parametrize("case", list(CASES))
def test_first_step_memory_is_what_the_check_counts(case):
    cfg_kw, precision, B, T = CASES[case]
    got = first_step_memory(cfg_kw, precision, B, T)
    model, cfg = got["model"], ModelConfig(**cfg_kw)
    assert np.isfinite(got["loss"]), got["loss"]
    # the activation cache: exactly the estimate (every array rounded as the pool rounds it)
    want_cache = activation_cache_bytes(cfg, B, T, model.dtype, model.mm_dtype, True)
    assert got["cache"] == want_cache, (case, got["cache"], want_cache)
    # the parameter state: the estimate plus each arena's rounding and the StepValues buffer
    want_params = parameter_state_bytes(cfg, model.dtype, precision, True)
    assert 0 <= got["params"] - want_params <= 8 * 512, (case, got["params"], want_params)
    base = got["params"] + got["cache"]
    beyond_pool = got["pool_peak"] - base  # temporaries' high-water, our cuBLAS workspace, and
    # the free fragments the pool held at the start (counted: the step could have used them)
    device = "n/a" if got["device"] is None else f"{(got['device'] - base) / MiB:.2f} MiB"
    print(f"{case}: params {got['params'] / MiB:.2f} MiB, cache {got['cache'] / MiB:.2f} MiB, "
          f"pool peak beyond them {beyond_pool / MiB:.2f} MiB (fragments at the start "
          f"{got['fragments'] / MiB:.2f} MiB), device-wide beyond them {device}, "
          f"margin {GPU_WORKSPACE_MARGIN / MiB:.0f} MiB")
    assert 0 <= beyond_pool <= GPU_WORKSPACE_MARGIN, (case, beyond_pool)
    if got["device"] is not None:  # the pool's blocks and what cuBLAS and the kernels hold
        assert got["device"] - base <= GPU_WORKSPACE_MARGIN, (case, got["device"] - base)


GPT2_CFG = GPT2_124M[0]
# (config, precision, B, T) of the forward-only cache: the small configs at their shapes, and
# GPT-2 124M's longest sampling context in both precisions (54.1 and 30.1 MiB by the
# arithmetic, where a training cache of that shape is 818.3 and 454.7 MiB at this unpadded
# vocabulary of 50,257; 818.5 and 454.75 MiB at the padded 50,304)
INFERENCE_CASES = {**SMALL,
                   "gpt2-124m-fp32-1x1024": (GPT2_CFG, "fp32", 1, 1024),
                   "gpt2-124m-bf16-1x1024": (GPT2_CFG, "bf16", 1, 1024)}


@pytest.mark.parametrize("case", list(INFERENCE_CASES))
def test_the_inference_cache_is_what_the_check_counts(case):
    """logits / last_logits' forward-only cache (InferenceCache: one block's buffers for every
    block, no backward scratch) takes exactly inference_cache_bytes from the pool, and its
    last-position logits equal, bit for bit, those of the forward into the training cache of
    the same shape (the kernels run in the same order on one stream, whichever buffers they
    are handed)."""
    cfg_kw, precision, B, T = INFERENCE_CASES[case]
    pool = cp.get_default_memory_pool()
    cfg = ModelConfig(**cfg_kw)
    model = CLLMModel(cfg, backend="cuda", dtype="float32", seed=0, precision=precision)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
    _sync()
    used0 = pool.used_bytes()
    model._cache_for(B, T, inference=True)
    _sync()
    got = pool.used_bytes() - used0
    want = inference_cache_bytes(cfg, B, T, model.dtype, model.mm_dtype, True)
    assert got == want, (case, got, want)
    last = model.last_logits(idx)
    assert np.isfinite(last).all()
    B_, T_ = model.set_batch(model.check_batch(idx))
    model.forward(B_, T_)
    lnf = model._cache(B, T).lnf
    want_last = model._to_host(model._logits_of(cp.ascontiguousarray(lnf[:, -1])))
    assert last.tobytes() == want_last.tobytes(), case
    print(f"{case}: inference cache {got / MiB:.2f} MiB, training cache "
          f"{activation_cache_bytes(cfg, B, T, model.dtype, model.mm_dtype, True) / MiB:.2f} MiB")
