#!/usr/bin/env python3
"""Per-op microbenchmarks against the machine's limits, one JSON line per op and shape.

Memory-bound ops (softmax_xent, adamw, layernorm forward/backward, c_attn's bf16 bias fill):
achieved bytes/s over the device's measured copy bandwidth (a large device-to-device copy,
counted as read + write; the bias fill's written bytes, with the plain copy's beside). On a
GPU the copy's and LayerNorm's arrays are at least L2_MULTIPLE (4) times the L2 the device
reports (LayerNorm's rows raised from GPT-2's 16K), so no rep reads what the last left in L2;
each bandwidth record carries `l2_bytes` and `array_of_l2`.
Attention forward + backward: achieved FLOP/s (causal: half the T x T work counted), for the
fp32 kernels ("attention_fwd_bwd") and the bf16 tensor-core kernels (precision="bf16",
"attention_fwd_bwd_bf16"), next to torch.nn.functional.scaled_dot_product_attention on the same
shapes when PyTorch is present: "sdpa_fp32" (torch's choice of backend), and on a GPU
"sdpa_flash_bf16" (FlashAttention's kernels forced) and "sdpa_bf16" (torch's choice), each with
the backend torch ran (`sdpa_*_backend`: flash, efficient, cudnn, math, read off the profiler).
The same with the lattice distance bias ("..._lattice", slopes 1/p_h), with `bias_cost` = its
time over the plain kernels' minus 1 (docs/attention_bias.md). Per shape, every case (ours and
SDPA's) runs --reps calls, each timed alone (CUDA events), the cases interleaved in ABBA order;
the records carry medians (`ms`, `{sdpa}_ms`) and ours' minimum.

Runs on the GPU (CUDA kernels, timed with CUDA events; inputs drawn on the GPU) or, with
--device cpu, on the NumPy references (timed with perf_counter) so the harness itself is
exercised anywhere. Each record is written (to stdout and --out) as soon as it is measured; an
op that fails gives a record with "error" and the others still run.

--attn-fwd-variants measures only the bf16 attention forward at head dim 64 in its
compile-time block shapes (kernels.SETTINGS; attention.cu AttnMmaCfg): 8 warps x 2 blocks per
SM (the default), 4 warps x 3, and 4 warps of two 16-row m-tiles each x 2 ("4x2-m2": each K, V
fragment loaded feeds two mma), at GPT-2's (16, 1024, 12, 64) (--size small, tiny: smaller),
with and without the lattice bias; forward alone and forward + backward (the backward's kernels
are the same in both), the variants alternating within each round. One record per variant and
bias ("op": "attention_fwd_bf16_d64_variant"): medians and minima over the rounds, the
kernel's registers and local (spill) bytes as the device reports them, and whether its out and
lse are the default's bit for bit. Both variant runs compare bits on float outputs, then time
with O and dqkv in bf16, as the bf16 model runs them.

--attn-bwd-variants measures only the bf16 attention backward in its two variants
(ops.attention.BACKWARD_VARIANTS, CLLM_ATTN_BACKWARD): "two-pass" (the default, dq then dkv
kernel: seven products, deterministic) and "atomic-dq" (a delta kernel, then one kernel doing
dK, dV and dQ by fp32 atomicAdd: five products), at the same shape as --attn-fwd-variants,
with and without the lattice bias; backward alone and forward + backward, the variants
alternating within each round. One record per variant and bias ("op":
"attention_bwd_bf16_variant"): medians and minima, the variant's kernels' registers and local
bytes, whether its dK and dV are two-pass's bit for bit and how far (norm-wise) its dQ is from
two-pass's.

    python scripts/bench_kernels.py --device cuda --out docs/results/kernels.jsonl
    python scripts/bench_kernels.py --device cuda --attn-fwd-variants --out ...
    python scripts/bench_kernels.py --device cuda --attn-bwd-variants --out ...
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cllm_gpu import kernels, ops  # noqa: E402
from cllm_gpu.backend import cuda_available, cuda_device_name  # noqa: E402
from cllm_gpu.json_text import to_json  # noqa: E402
from cllm_gpu.ops.adamw import adamw_hyperparams  # noqa: E402
from cllm_gpu.ops.linear import fill_rows  # noqa: E402
from gpu_env import record_fields  # noqa: E402  (scripts/gpu_env.py, beside this file)


class Timer:
    def __init__(self, xp):
        self.xp = xp

    def __call__(self, fn, reps):
        fn()  # warm-up (compiles kernels, grows the memory pool)
        if self.xp is np:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t0) / reps
        cp = self.xp
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps


def cpu_call_seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def call_timer(xp):
    """Seconds of one call of fn: CUDA events around it on CuPy's stream, waited for, on the
    GPU; perf_counter on the CPU."""
    if xp is np:
        return cpu_call_seconds

    def seconds(fn):
        start, stop = xp.cuda.Event(), xp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return xp.cuda.get_elapsed_time(start, stop) / 1e3
    return seconds


def torch_call_timer(device):
    """call_timer's like for PyTorch's work: torch.cuda events on PyTorch's stream."""
    if device != "cuda":
        return cpu_call_seconds
    import torch

    def seconds(fn):
        start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3
    return seconds


def time_interleaved(cases, reps, failed):
    """{key: (median, minimum seconds)} of each case's calls, timed one call at a time with the
    cases interleaved: every rep runs each case once, in ABBA order (reversed every other rep),
    so a drift of clocks or temperature hits all alike. cases: {key: (fn, seconds of one
    call)}, each warmed up already. A case whose call raises is dropped, its message put in
    failed[key]."""
    times = {k: [] for k in cases}
    order = list(cases)
    for r in range(reps):
        for k in order if r % 2 == 0 else order[::-1]:
            if k not in times:
                continue
            fn, seconds = cases[k]
            try:
                times[k].append(seconds(fn))
            except Exception as e:
                traceback.print_exc()
                failed[k] = f"{type(e).__name__}: {e}"[:500]
                del times[k]
    return {k: (float(np.median(ts)), min(ts)) for k, ts in times.items() if ts}


# every bandwidth test's arrays are at least this many times the device's L2
L2_MULTIPLE = 4


def device_l2_bytes(xp):
    """The GPU's L2 in bytes as the device reports it (cudaDeviceProp.l2CacheSize); None on
    the CPU or where it reports none."""
    if xp is np:
        return None
    props = xp.cuda.runtime.getDeviceProperties(0)
    return int(props.get("l2CacheSize") or 0) or None


def rows_above_l2(rows, row_bytes, l2):
    """rows, or more (a multiple of 1024) so that rows x row_bytes is at least L2_MULTIPLE x l2."""
    if not l2:
        return rows
    need = -(-L2_MULTIPLE * l2 // row_bytes)
    return max(rows, -(-need // 1024) * 1024)


def of_l2(array_bytes, l2):
    """A bandwidth record's {"l2_bytes", "array_of_l2"}: its arrays' size over the L2 ({} where
    the L2 is unknown)."""
    return {} if not l2 else {"l2_bytes": l2, "array_of_l2": array_bytes / l2}


def copy_bandwidth(xp, timer, nbytes):
    n = nbytes // 4
    a = xp.ones(n, dtype=np.float32)
    b = xp.empty_like(a)
    t = timer(lambda: xp.copyto(b, a), 10)
    return 2 * a.nbytes / t


def rand(xp, shape, seed=0):
    """float32 standard normals made where they are used: on the GPU, cuRAND through CuPy (the
    full sizes would be gigabytes of NumPy draws and host-to-device copies)."""
    if xp is np:
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return xp.random.RandomState(seed).standard_normal(shape, dtype=np.float32)


def randint(xp, high, n, seed=0):
    if xp is np:
        return np.random.default_rng(seed).integers(0, high, n).astype(np.int32)
    return xp.random.RandomState(seed).randint(0, high, size=n, dtype=np.int32)


# the aten op each SDPA backend runs its forward as: which one torch dispatched to, as the
# profiler sees it (left to choose, torch takes cuDNN's, FlashAttention's, the memory-efficient
# or the math kernels by dtype, shape, GPU and version)
SDPA_BACKEND_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def sdpa_backend(fn):
    """The SDPA backend(s) one call of fn ran ("flash", "efficient", "cudnn", "math", ...;
    comma-joined if several), from the aten ops the profiler recorded; "unknown" if none."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    seen = {SDPA_BACKEND_OPS[e.name] for e in prof.events() if e.name in SDPA_BACKEND_OPS}
    return ",".join(sorted(seen)) or "unknown"


def sdpa_cases(device, B, T, H, D):
    """torch's scaled_dot_product_attention, causal forward + backward, on the same shape:
    ({key: fn}, {key}_backend fields, errors) for "sdpa_fp32" (torch's choice of backend) and
    on a GPU "sdpa_flash_bf16" (FlashAttention's kernels forced) and "sdpa_bf16" (torch's
    choice in bf16); each fn run once already (warm) and its backend read off the profiler.
    ({}, {}, []) without torch; errors: a "key: TypeName: message" string for each case that
    failed to run."""
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}, {}, []
    tdev = "cuda" if device == "cuda" else "cpu"
    cases, fields, errors = {}, {"torch_version": torch.__version__}, []

    def fwd_bwd(q, k, v, g, backend=None):
        # the gradients returned, as ours writes dqkv: .backward() would add each into
        # q.grad, k.grad, v.grad from the second call on, three extra passes timed
        def run():
            return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                       (q, k, v), g)
        if backend is None:
            return run
        # one backend only, as the key says: otherwise torch may take another (an error here)
        def forced():
            with sdpa_kernel(backend):
                return run()
        return forced

    try:
        q, k, vv = (torch.randn(B, H, T, D, device=tdev, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, T, D, device=tdev)
        todo = {"sdpa_fp32": fwd_bwd(q, k, vv, g)}
        if tdev == "cuda":
            qb, kb, vb = (a.detach().bfloat16().requires_grad_() for a in (q, k, vv))
            gb = g.bfloat16()
            todo["sdpa_flash_bf16"] = fwd_bwd(qb, kb, vb, gb, SDPBackend.FLASH_ATTENTION)
            todo["sdpa_bf16"] = fwd_bwd(qb, kb, vb, gb)
    except Exception as e:
        return {}, fields, [f"{type(e).__name__}: {e}"[:300]]
    for key, fn in todo.items():
        try:
            fn()  # warm-up
            fields[f"{key}_backend"] = sdpa_backend(fn)
            cases[key] = fn
        except Exception as e:  # e.g. flash not available: the others stand
            errors.append(f"{key}: {type(e).__name__}: {e}"[:300])
    return cases, fields, errors


def torch_matmul_bf16(M, K, N, reps):
    """Seconds per torch.matmul of bf16 (M, K) x (K, N) on the GPU (cuBLAS through PyTorch)."""
    import torch
    ta, tb = (torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in ((M, K), (K, N)))
    torch.matmul(ta, tb)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(ta, tb)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


# sizes: full = GPT-2 124M at B 16, T 1024; small = a quick look; tiny = the harness's own
# checks on the CPU emulator (seconds). attn_fwd_variants: (B, T, H, D = 64), rounds (of
# --attn-fwd-variants and --attn-bwd-variants)
SIZES = {
    "full": dict(copy=1 << 30, xent=(16 * 1024, 50257), adamw=124_475_904, ln=(16 * 1024, 768),
                 gemm_m=16 * 1024, gemm_kn=((768, 2304), (768, 3072), (3072, 768)),
                 attention=((16, 1024, 12, 64), (8, 2048, 12, 64), (4, 4096, 16, 128)),
                 attn_fwd_variants=((16, 1024, 12, 64), 7), bias_fill=(16 * 1024, 2304)),
    "small": dict(copy=1 << 26, xent=(256, 50257), adamw=1 << 20, ln=(2048, 768), gemm_m=2048,
                  gemm_kn=((768, 2304), (768, 3072), (3072, 768)), attention=((2, 256, 4, 64),),
                  attn_fwd_variants=((2, 256, 4, 64), 3), bias_fill=(2048, 2304)),
    "tiny": dict(copy=1 << 16, xent=(8, 1000), adamw=4096, ln=(16, 96), gemm_m=32,
                 gemm_kn=((48, 64),), attention=((1, 32, 2, 16),),
                 attn_fwd_variants=((1, 80, 1, 64), 1), bias_fill=(16, 96)),
}

# the D = 64 bf16 forward's block shapes: {name: compile-time settings}; the first is the default
# (warps x blocks per SM, -m2: two 16-row m-tiles per warp)
ATTN_FWD_VARIANTS = {
    "8x2": dict(CLLM_ATTN_FWD_WARPS_D64=8, CLLM_ATTN_FWD_MIN_BLOCKS_D64=2),
    "4x3": dict(CLLM_ATTN_FWD_WARPS_D64=4, CLLM_ATTN_FWD_MIN_BLOCKS_D64=3),
    "4x2-m2": dict(CLLM_ATTN_FWD_WARPS_D64=4, CLLM_ATTN_FWD_MIN_BLOCKS_D64=2,
                   CLLM_ATTN_FWD_MTILES_D64=2),
}


def kernel_resources(name):
    """Registers per thread, local memory per thread (spills land there) and the block limit of
    a compiled attention kernel, as CuPy's RawKernel reports them (None where the kernel object
    has no such attribute)."""
    from cllm_gpu.ops import _cuda
    k = _cuda.kernel("attention", name)
    return {"registers": getattr(k, "num_regs", None),
            "local_bytes": getattr(k, "local_size_bytes", None),
            "max_threads": getattr(k, "max_threads_per_block", None)}


# the bf16 backward's variants: {name: its kernels at head dim D}; the first is the default
ATTN_BWD_KERNELS = {
    "two-pass": ("attention_backward_dq_mma_kernel", "attention_backward_dkv_mma_kernel"),
    "atomic-dq": ("attention_backward_delta_kernel", "attention_backward_mma_kernel"),
}
# dQ of atomic-dq against two-pass's, norm-wise: the two differ in fp32 summation order only
# (the same dS bits; ~1e-7), a wrong or missing tile by orders of magnitude more
ATTN_BWD_DQ_REL_TOL = 2.0 ** -10


class AttnVariantCase:
    """The bf16 attention's inputs at (B, T, H, D) with a bias ("none", "lattice"), its output
    buffers, and its forward and backward on them (whatever variant is selected when called)."""

    def __init__(self, xp, B, T, H, D, bias):
        C = H * D
        self.qkv = ops.to_bf16(rand(xp, (B, T, 3 * C), seed=4))
        self.dout = ops.to_bf16(rand(xp, (B, T, C), seed=5))
        self.slopes = (None if bias == "none" else
                       xp.asarray(ops.attention_slopes(bias, H), dtype=np.float32))
        self.o = xp.empty((B, T, C), dtype=np.float32)
        self.lse = xp.empty((B, H, T), dtype=np.float32)
        self.dqkv = xp.empty((B, T, 3 * C), dtype=np.float32)
        self.H = H

    def use_model_storage(self, xp):
        """O and dqkv in bf16 storage from here on, as the bf16 model has them (its att and
        dqkv), for the timed runs (the bitwise checks before compare the float outputs): a
        float O costs a float write and, in every backward, a pass rounding it into a
        temporary; a float dqkv twice the bytes, and atomic-dq would write dQ straight into it
        instead of into its fp32 scratch and the cast the model's bf16 dqkv needs."""
        mm = ops.bf16_storage_dtype(xp is not np)
        self.o = xp.empty(self.o.shape, dtype=mm)
        self.dqkv = xp.empty(self.dqkv.shape, dtype=mm)
        self.fwd()  # the backward alone reads this O

    def fwd(self):
        ops.attention_forward(self.qkv, self.H, self.o, self.lse, precision="bf16",
                              slopes=self.slopes)

    def bwd(self):
        ops.attention_backward(self.dout, self.qkv, self.o, self.lse, self.H, self.dqkv,
                               precision="bf16", slopes=self.slopes)

    def fwd_bwd(self):
        self.fwd()
        self.bwd()


def time_alternating(variants, select, rounds, timer, timed):
    """{variant: {key: [seconds per round]}} of each timed {key: (fn, reps)}, the variants taken
    in ABBA order within every round (select(v) switches to variant v first)."""
    times = {v: {k: [] for k in timed} for v in variants}
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            select(v)
            for k, (fn, reps) in timed.items():
                times[v][k].append(timer(fn, reps))
    return times


def timing_fields(times, flops):
    """A variant's record fields from its per-round times {key: [s]}: {key}_ms (median),
    {key}_ms_min and {key}_flop_per_s for each key (flops: {key: FLOP per call})."""
    out = {}
    for k, ts in times.items():
        med = float(np.median(ts))
        out.update({f"{k}_ms": med * 1e3, f"{k}_ms_min": min(ts) * 1e3,
                    f"{k}_flop_per_s": flops[k] / med})
    return out


def attn_bwd_variants(xp, timer, size, reps, emit):
    """Time the bf16 backward (and forward + backward) in each variant of ATTN_BWD_KERNELS on
    the same inputs, the variants alternating (ABBA) in every round; emit one record per variant
    and bias. Returns the (variant, bias) pairs whose dK, dV were not two-pass's bits or whose
    dQ was further than ATTN_BWD_DQ_REL_TOL from two-pass's."""
    from cllm_gpu.ops.attention import set_attention_backward
    (B, T, H, D), rounds = size["attn_fwd_variants"]
    C = H * D
    flops_fwd = 2 * 2 * B * H * T * T * D / 2  # QK^T and PV, causal half
    flops_bwd = 2.5 * flops_fwd                 # the 5 products a backward needs
    differ = []
    previous = set_attention_backward(None)
    try:
        for bias in ("none", "lattice"):
            case = AttnVariantCase(xp, B, T, H, D, bias)
            case.fwd()
            facts, first = {}, None
            for v, names in ATTN_BWD_KERNELS.items():  # compile, and compare the gradients
                set_attention_backward(v)
                case.dqkv.fill(np.nan)  # a row or head the variant failed to write shows as NaN
                case.bwd()
                got = xp.asnumpy(case.dqkv)
                first = got if first is None else first
                dq, dq0 = got[..., :C].astype(np.float64), first[..., :C].astype(np.float64)
                rel = float(np.linalg.norm(dq - dq0) / max(np.linalg.norm(dq0), 1e-30))
                same_kv = np.array_equal(got[..., C:].view(np.uint32),
                                         first[..., C:].view(np.uint32))
                suffix = "" if case.slopes is None else ", true"
                facts[v] = {"kernels": {n: kernel_resources(
                                n + (f"<{D}>" if "delta" in n else f"<{D}{suffix}>"))
                                for n in names},
                            "dkv_same_bits_as_two_pass": same_kv,
                            "dq_rel_diff_from_two_pass": rel if np.isfinite(rel) else None,
                            "dq_rel_tol": ATTN_BWD_DQ_REL_TOL}
                if not same_kv or not rel <= ATTN_BWD_DQ_REL_TOL:
                    differ.append((v, bias))
            order = list(ATTN_BWD_KERNELS)
            case.use_model_storage(xp)
            times = time_alternating(order, set_attention_backward, rounds, timer,
                                     {"bwd": (case.bwd, reps), "fwd_bwd": (case.fwd_bwd, reps)})
            base = {k: float(np.median(ts)) for k, ts in times[order[0]].items()}
            for v in order:
                med = {k: float(np.median(ts)) for k, ts in times[v].items()}
                emit({"op": "attention_bwd_bf16_variant", "variant": v, "bias": bias,
                      "shape": [B, T, H, D], "rounds": rounds, "reps": reps,
                      **timing_fields(times[v], {"bwd": flops_bwd,
                                                 "fwd_bwd": flops_fwd + flops_bwd}),
                      "bwd_of_two_pass": med["bwd"] / base["bwd"],
                      "fwd_bwd_of_two_pass": med["fwd_bwd"] / base["fwd_bwd"], **facts[v]})
    finally:
        set_attention_backward(previous)
    return differ


def attn_fwd_variants(xp, timer, size, reps, emit):
    """Time the D = 64 bf16 forward (and forward + backward) in each block shape of
    ATTN_FWD_VARIANTS on the same inputs, the variants alternating (ABBA) in every round; emit
    one record per variant and bias. Returns the (variant, bias) pairs whose out or lse were
    not the default's bits."""
    (B, T, H, D), rounds = size["attn_fwd_variants"]
    fwd_reps, fb_reps = 2 * reps, reps
    flops_fwd = 2 * 2 * B * H * T * T * D / 2  # QK^T and PV, causal half
    flops_fb = 3.5 * flops_fwd                  # + the backward's 5 products
    differ = []
    try:
        for bias in ("none", "lattice"):
            case = AttnVariantCase(xp, B, T, H, D, bias)
            name = f"attention_forward_mma_kernel<{D}{'' if case.slopes is None else ', true'}>"
            facts, first = {}, None
            for v, values in ATTN_FWD_VARIANTS.items():  # compile, and check the bits
                kernels.use_settings("attention", **values)
                case.o.fill(np.nan)     # a row or head the variant failed to write shows as NaN
                case.lse.fill(np.nan)
                case.fwd()
                got = (xp.asnumpy(case.o).view(np.uint32), xp.asnumpy(case.lse).view(np.uint32))
                first = first or got
                facts[v] = {**kernel_resources(name), "same_bits_as_8x2": all(
                    np.array_equal(a, b) for a, b in zip(got, first))}
                if not facts[v]["same_bits_as_8x2"]:
                    differ.append((v, bias))
            order = list(ATTN_FWD_VARIANTS)
            case.use_model_storage(xp)
            times = time_alternating(
                order, lambda v: kernels.use_settings("attention", **ATTN_FWD_VARIANTS[v]),
                rounds, timer, {"fwd": (case.fwd, fwd_reps), "fwd_bwd": (case.fwd_bwd, fb_reps)})
            base = {k: float(np.median(ts)) for k, ts in times[order[0]].items()}
            for v, values in ATTN_FWD_VARIANTS.items():
                med = {k: float(np.median(ts)) for k, ts in times[v].items()}
                emit({"op": "attention_fwd_bf16_d64_variant", "variant": v,
                      "warps": values["CLLM_ATTN_FWD_WARPS_D64"],
                      "min_blocks": values["CLLM_ATTN_FWD_MIN_BLOCKS_D64"],
                      "mtiles": values.get("CLLM_ATTN_FWD_MTILES_D64", 1), "bias": bias,
                      "shape": [B, T, H, D], "rounds": rounds, "reps": [fwd_reps, fb_reps],
                      **timing_fields(times[v], {"fwd": flops_fwd, "fwd_bwd": flops_fb}),
                      "fwd_of_8x2": med["fwd"] / base["fwd"],
                      "fwd_bwd_of_8x2": med["fwd_bwd"] / base["fwd_bwd"], **facts[v]})
    finally:
        kernels.use_settings("attention")
    return differ


ATTENTION_OPS = (("attention_fwd_bwd", "fp32"), ("attention_fwd_bwd_bf16", "bf16"))


def attention_case(xp, B, T, H, D, precision, bias):
    """A function running our causal attention forward + backward once at (B, T, H, D) (bias:
    "none", "lattice"), after one forward (compiles the kernels, sizes lse)."""
    qkv = rand(xp, (B, T, 3 * H * D), seed=4)
    dout = rand(xp, (B, T, H * D), seed=5)
    slopes = (None if bias == "none" else
              xp.asarray(ops.attention_slopes(bias, H), dtype=qkv.dtype))
    dqkv, o = xp.empty_like(qkv), None
    if precision == "bf16":  # the bf16 model's storage (no rounding pass timed)
        qkv, dout = ops.to_bf16(qkv), ops.to_bf16(dout)
        if ops.attention_bf16_inputs(D):
            # and its outputs, as the model and SDPA's bf16 write them: O in bf16 (a float O
            # costs a float write and, in the backward, a rounding pass into a temporary),
            # dqkv in bf16
            mm = ops.bf16_storage_dtype(xp is not np)
            o = xp.empty((B, T, H * D), dtype=mm)
            dqkv = xp.empty(qkv.shape, dtype=mm)
    o, lse = ops.attention_forward(qkv, H, o, precision=precision, slopes=slopes)

    def fwd_bwd():
        ops.attention_forward(qkv, H, o, lse, precision=precision, slopes=slopes)
        ops.attention_backward(dout, qkv, o, lse, H, dqkv, precision=precision, slopes=slopes)
    return fwd_bwd


def attention_rows(xp, device, shape, reps, with_torch, emit):
    """One record per op of ATTENTION_OPS and bias at shape (B, T, H, D): ms (median of reps
    calls, each timed alone), ms_min, FLOP/s, bias_cost = (time with the lattice bias) / (time
    without) - 1, and beside it each SDPA case's median ({key}_ms, of_{key} = its time over
    ours) and the backend torch ran it with ({key}_backend). Ours and SDPA's calls are
    interleaved (time_interleaved), so the ratios compare calls made under the same clocks."""
    B, T, H, D = shape
    flops = 3.5 * 2 * 2 * B * H * T * T * D / 2  # fwd 2 GEMMs, bwd 5; causal half
    ours_seconds = call_timer(xp)
    cases, failed, names = {}, {}, []
    for op, precision in ATTENTION_OPS:
        for bias in ("none", "lattice"):
            name = op if bias == "none" else f"{op}_{bias}"
            names.append((name, op))
            try:
                fn = attention_case(xp, B, T, H, D, precision, bias)
                fn()  # warm-up
                cases[name] = (fn, ours_seconds)
            except Exception as e:  # one op failing must not cost the others
                traceback.print_exc()
                failed[name] = f"{type(e).__name__}: {e}"[:500]
    sdpa_fns, sdpa_fields, sdpa_errors = (sdpa_cases(device, B, T, H, D) if with_torch
                                          else ({}, {}, []))
    if sdpa_fns:
        torch_seconds = torch_call_timer(device)
        cases.update({k: (fn, torch_seconds) for k, fn in sdpa_fns.items()})
    times = time_interleaved(cases, reps, failed)
    sdpa_errors += [f"{k}: {failed[k]}" for k in sdpa_fns if k in failed]
    for name, op in names:
        if name not in times:
            emit({"op": name, "shape": list(shape),
                  "error": failed.get(name, "no timed call")})
            continue
        t, t_min = times[name]
        rec = {"op": name, "shape": list(shape), "ms": t * 1e3, "ms_min": t_min * 1e3,
               "reps": reps, "flop_per_s": flops / t}
        if name != op and op in times:
            rec["bias_cost"] = t / times[op][0] - 1
        rec.update(sdpa_fields)
        for k in sdpa_fns:
            if k in times:
                rec.update({f"{k}_ms": times[k][0] * 1e3, f"of_{k}": times[k][0] / t})
        if sdpa_errors:
            rec["sdpa_error"] = "; ".join(sdpa_errors)[:500]
        emit(rec)


def build_parser() -> argparse.ArgumentParser:
    """The command line main() parses (the docs' command lines are checked against it:
    tests/test_docs_cite_real_flags.py)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions (default %(default)s)")
    ap.add_argument("--size", choices=list(SIZES), default="full",
                    help="full: GPT-2 124M shapes; small: a quick look; tiny: harness checks "
                         "(default %(default)s)")
    ap.add_argument("--small", action="store_true", help="the same as --size small")
    ap.add_argument("--no-torch", action="store_true",
                    help="skip the PyTorch figures (SDPA, torch.matmul) beside ours")
    ap.add_argument("--out", default=None,
                    help="append each JSON line to this file as soon as it is measured")
    ap.add_argument("--attn-fwd-variants", action="store_true",
                    help="measure only the bf16 attention forward at head dim 64 in its "
                         "compile-time block shapes, 8 warps x 2 blocks per SM (the default), "
                         "4 x 3 and 4 x 2 with two m-tiles per warp, alternating; needs the "
                         "CUDA kernels (default off)")
    ap.add_argument("--attn-bwd-variants", action="store_true",
                    help="measure only the bf16 attention backward in its two variants, "
                         "two-pass (the default) and atomic-dq (CLLM_ATTN_BACKWARD), "
                         "alternating, at the shape of --attn-fwd-variants; needs the CUDA "
                         "kernels (default off)")
    return ap


def main():
    ap = build_parser()
    args = ap.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if cuda_available() else "cpu")
    if args.attn_fwd_variants and args.attn_bwd_variants:
        ap.error("--attn-fwd-variants and --attn-bwd-variants: one per run")
    for flag in ("attn_fwd_variants", "attn_bwd_variants"):
        if getattr(args, flag) and device != "cuda":
            ap.error(f"--{flag.replace('_', '-')} times the CUDA kernels' variants: needs "
                     "--device cuda")
    if device == "cuda":
        import cupy as xp
    else:
        xp = np
    size = SIZES["small" if args.small else args.size]
    timer = Timer(xp)
    reps = args.reps
    env_fields = record_fields(device)
    if device == "cuda":  # "device" says cuda: which GPU, for a record read on its own
        env_fields["gpu"] = cuda_device_name(0)

    def emit(rec):
        rec.update(device=device, size=args.size if not args.small else "small",
                   date=time.strftime("%Y-%m-%d"), **env_fields)
        text = to_json(rec)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")

    def measure(op, shape, fn):
        """One record per op and shape; an op that fails gives an error record, not a crash."""
        try:
            rec = fn()
        except Exception as e:
            traceback.print_exc()
            rec = {"error": f"{type(e).__name__}: {e}"[:500]}
        emit({"op": op, "shape": shape, **rec})

    # the variants' runs: (flag, function, record op, what a differing variant means)
    for flag, run, op, wrong in (
            ("attn_fwd_variants", attn_fwd_variants, "attention_fwd_bf16_d64_variant",
             "the attention forward's out or lse differ from 8x2's"),
            ("attn_bwd_variants", attn_bwd_variants, "attention_bwd_bf16_variant",
             "the attention backward's dK, dV or dQ differ from two-pass's")):
        if not getattr(args, flag):
            continue
        try:
            differ = run(xp, timer, size, reps, emit)
        except Exception as e:
            traceback.print_exc()
            emit({"op": op, "shape": list(size["attn_fwd_variants"][0]),
                  "error": f"{type(e).__name__}: {e}"[:500]})
            sys.exit(1)
        if differ:
            sys.exit(f"error: {wrong} in {differ}")
        return

    bw = None
    # the bandwidth tests' arrays at least L2_MULTIPLE times the L2 (what the device reports):
    # from L2, a rep reading what the last one left there would beat the copy's DRAM rate
    l2 = device_l2_bytes(xp)
    copy_bytes = max(size["copy"], L2_MULTIPLE * (l2 or 0))

    def copy():
        nonlocal bw
        bw = copy_bandwidth(xp, timer, copy_bytes)
        return {"bytes": copy_bytes, "bytes_per_s": bw, **of_l2(copy_bytes, l2)}
    measure("copy", [copy_bytes], copy)
    bw = bw or float("nan")

    def xent():  # read logits, write dlogits in place (+ targets, losses: negligible)
        N, V = size["xent"]
        logits = rand(xp, (N, V))
        targets = randint(xp, V, N, seed=1)
        dloss = xp.full(1, 1.0 / N, dtype=np.float64)  # on the device, as the trainer has it
        t = timer(lambda: ops.softmax_xent(logits, targets, dloss, dlogits=logits), reps)
        return {"ms": t * 1e3, "bytes_per_s": 2 * logits.nbytes / t,
                "of_copy_bw": 2 * logits.nbytes / t / bw, **of_l2(logits.nbytes, l2)}
    measure("softmax_xent", list(size["xent"]), xent)

    def adamw():  # read p, g, m, v, mask; write p, m, v
        P = size["adamw"]
        p, g, m, v = (rand(xp, (P,), seed=i) for i in range(4))
        v = abs(v)
        mask = xp.ones(P, dtype=np.float32)
        hyper = xp.asarray(adamw_hyperparams(1e-4, 0.9, 0.95, 0.1, 10))
        t = timer(lambda: ops.adamw_update(p, g, m, v, mask, hyper, 0.9, 0.95, 1e-8), reps)
        return {"params": P, "ms": t * 1e3, "bytes_per_s": 8 * p.nbytes / t,
                "of_copy_bw": 8 * p.nbytes / t / bw, **of_l2(p.nbytes, l2)}
    measure("adamw", [size["adamw"]], adamw)

    # LayerNorm: GPT-2's width, its 16K rows (B 16 x T 1024) raised to fill L2_MULTIPLE x L2
    # per array (at 16K rows an array is 50 MB, about an H100 / H200 L2)
    R, C = size["ln"]
    R = rows_above_l2(R, C * 4, l2)
    ln = {}

    def ln_forward():
        x, w, b = rand(xp, (R, C)), rand(xp, (C,), seed=1), rand(xp, (C,), seed=2)
        out, mean, rstd = ops.layernorm_forward(x, w, b)
        ln.update(x=x, w=w, mean=mean, rstd=rstd)
        t = timer(lambda: ops.layernorm_forward(x, w, b, 1e-5, out, mean, rstd), reps)
        return {"ms": t * 1e3, "bytes_per_s": 2 * x.nbytes / t,
                "of_copy_bw": 2 * x.nbytes / t / bw, **of_l2(x.nbytes, l2)}
    measure("layernorm_forward", [R, C], ln_forward)

    def ln_backward():
        x, w = ln["x"], ln["w"]
        dy = rand(xp, (R, C), seed=3)
        dw, db, dx = xp.zeros_like(w), xp.zeros_like(w), xp.empty_like(x)
        t = timer(lambda: ops.layernorm_backward(dy, x, w, ln["mean"], ln["rstd"], dw, db, dx),
                  reps)
        return {"ms": t * 1e3, "bytes_per_s": 3 * x.nbytes / t,
                "of_copy_bw": 3 * x.nbytes / t / bw, **of_l2(x.nbytes, l2)}
    measure("layernorm_backward", [R, C], ln_backward)

    # c_attn's bias onto every row of the bf16 qkv before its GEMM adds to it (ops/linear.py:
    # fill_rows, 8-byte words) against the plain broadcast copy of 2-byte elements it replaced
    # (0.18 ms, 0.10 of copy at GPT-2 124M on an H200: docs/results/h200-2026-12-04); writes
    # only (the bias stays in cache). The bias at the arena's 64-element alignment.
    fill_n, fill_w = size["bias_fill"]
    fill_n = rows_above_l2(fill_n, fill_w * 2, l2)

    def bias_fill():
        bias = ops.to_bf16(rand(xp, (64 + fill_w,), seed=8))[64:]
        rows = xp.empty((fill_n, fill_w), dtype=ops.bf16_storage_dtype(xp is not np))
        plain = xp.empty_like(rows)
        t_plain = timer(lambda: plain.__setitem__(Ellipsis, bias), reps)
        t = timer(lambda: fill_rows(rows, bias), reps)
        return {"ms": t * 1e3, "bytes_per_s": rows.nbytes / t,
                "of_copy_bw": rows.nbytes / t / bw, "elementwise_ms": t_plain * 1e3,
                "elementwise_of_copy_bw": rows.nbytes / t_plain / bw,
                "same_bits_as_elementwise": bool((rows == plain).all()),
                **of_l2(rows.nbytes, l2)}
    measure("bias_fill", [fill_n, fill_w], bias_fill)

    # GEMMs at GPT-2 124M's linear-layer shapes (M tokens x K in -> N out): ops.gemm in fp32
    # and bf16 (cuBLAS GemmEx; bf16 on tensor cores), next to torch.matmul in bf16 (bf16 C
    # on both sides)
    M = size["gemm_m"]
    for K, Nout in size["gemm_kn"]:
        def gemm(K=K, Nout=Nout):
            a32, b32 = rand(xp, (M, K), seed=6), rand(xp, (K, Nout), seed=7)
            a16, b16 = ops.to_bf16(a32), ops.to_bf16(b32)
            c = xp.empty((M, Nout), dtype=np.float32)
            # bf16: C in bf16, as the model's forward GEMMs and torch.matmul write it (an fp32
            # C, the weight gradients' case, writes twice the bytes: bf16_fp32_out_*)
            c16 = xp.empty((M, Nout), dtype=ops.bf16_storage_dtype(xp is not np))
            flops = 2.0 * M * K * Nout
            t32 = timer(lambda: ops.gemm(a32, b32, c), reps)
            t16 = timer(lambda: ops.gemm(a16, b16, c16), reps)
            t16_32 = timer(lambda: ops.gemm(a16, b16, c), reps)
            rec = {"fp32_ms": t32 * 1e3, "fp32_flop_per_s": flops / t32, "bf16_ms": t16 * 1e3,
                   "bf16_flop_per_s": flops / t16, "bf16_fp32_out_ms": t16_32 * 1e3,
                   "bf16_fp32_out_flop_per_s": flops / t16_32}
            if device == "cuda" and not args.no_torch:
                try:
                    tt = torch_matmul_bf16(M, K, Nout, reps)
                    rec.update(torch_bf16_ms=tt * 1e3, of_torch_bf16=tt / t16)
                except ImportError:
                    pass
                except Exception as e:
                    rec["torch_error"] = f"{type(e).__name__}: {e}"[:300]
            return rec
        measure("gemm", [M, K, Nout], gemm)

    # attention forward + backward, causal, fp32 and bf16, each also with the lattice bias,
    # timed interleaved with SDPA's on the same shape
    for shape in size["attention"]:
        attention_rows(xp, device, shape, reps, not args.no_torch, emit)

if __name__ == "__main__":
    main()
