"""Run the CUDA launchers of cllm_gpu/ops on the emulated kernels and compare with the NumPy
references, reusing the checks (and tolerances) of tests/gpu/ on small shapes.

    python tests/cuda_emulator/run_emulated.py GROUP [GROUP ...]

Groups: attention_bf16, attention_fp32, other (the op checks of tests/gpu), mutants (broken
kernels must fail them), model (the whole CLLMModel on the CUDA path, its trainer step and
scripts/gpu_kernel_smoke.py, plus mutants of that path), sanitizer (planted bugs in small
kernels (planted.cu) and in the real ones that the emulator's checks must catch, their correct
twins that must pass, and the mma and ldmatrix instructions against the PTX ISA
(ptx_isa.py); cp.async's missing waits), edges (the
shapes where indexing changes: T = 1024, B * H near the grid limit, V = 50,304 with
N * V > 2**31; grids past the limit refused by the launchers; and every launcher's grid, block and shared memory at GPT-2 1.5B shapes with a
batch of 64 x 1024; slow).

Prints one `PASS <check> <seconds>` or `FAIL <check>: <error>` line per check (`SKIP` where a
check needs NVRTC and it is missing) and a final `SUMMARY passed=N failed=M`; exits 1 when any
check failed. Installs a fake `cupy`: run it in a process of its own
(tests/test_kernels_emulated.py does).
"""
import sys
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "gpu"))

from cuda_emulator import build, fake_cublas, fake_cupy  # noqa: E402

cp = fake_cupy.install()

import numpy as np  # noqa: E402

import test_adamw_cuda as t_adamw  # noqa: E402  (tests/gpu, imported with the fake cupy)
import test_attention_cuda as t_att  # noqa: E402
import test_cast_cuda as t_cast  # noqa: E402
import test_dropout_cuda as t_drop  # noqa: E402
import test_embedding_cuda as t_emb  # noqa: E402
import test_empty_inputs_cuda as t_empty  # noqa: E402
import test_gelu_cuda as t_gelu  # noqa: E402
import test_grad_norm_cuda as t_gn  # noqa: E402
import test_grid_stride_cuda as t_gs  # noqa: E402
import test_layernorm_cuda as t_ln  # noqa: E402
import test_linear_cuda as t_linear  # noqa: E402
import test_gemm_cuda as t_gemm  # noqa: E402
import test_model_cuda as t_model  # noqa: E402
import test_softmax_xent_cuda as t_xent  # noqa: E402
from gpu_util import assert_bitwise_equal, rel_err  # noqa: E402

from cllm_gpu import CLLMModel, ModelConfig, TrainConfig  # noqa: E402
from cllm_gpu.kernels import ATTENTION_HEAD_DIMS, NAME_EXPRESSIONS  # noqa: E402
import importlib  # noqa: E402

gemm_mod = importlib.import_module("cllm_gpu.ops.gemm")  # (cllm_gpu.ops.gemm is the function)
from cllm_gpu.ops.cast import bf16_bits  # noqa: E402
from cllm_gpu.sampling import sample_tokens  # noqa: E402
from cllm_gpu.train_step import StepValues, training_step  # noqa: E402
from cllm_gpu.ops.attention import (attention_backward, attention_backward_ref,  # noqa: E402
                                    attention_forward, attention_forward_ref)
from cllm_gpu.ops.softmax_xent import softmax_xent, softmax_xent_ref  # noqa: E402

F32, F64 = np.float32, np.float64


def order_independent(fn, name):
    """fn() -> list of host arrays; the same bits with the threads of every block, and the
    blocks of every grid, run in ascending and in descending order (a result that depends on
    the order, e.g. through float atomics, shows up as a difference)."""
    def check():
        a = fn()
        fake_cupy.ORDER.update(reverse=1, blocks=1)
        try:
            b = fn()
        finally:
            fake_cupy.ORDER.update(reverse=0, blocks=0)
        for x, y in zip(a, b):
            assert x.tobytes() == y.tobytes(), f"{name}: result depends on thread or block order"
    return check


def attention_runs(B, T, H, D, precision, bias="none", dropout=False, backward="two-pass"):
    """fn() -> [out, lse, dqkv] of one forward and backward; with the atomic-dq backward dK and
    dV only in place of dqkv (its dQ is summed in the order the blocks' atomics land)."""
    def fn():
        qkv, dout = t_att._inputs(B, T, H, D, np.float32)
        Q, G = cp.asarray(qkv), cp.asarray(dout)
        M = t_att._slopes(bias, H, np.float32)[1]
        drop = (t_att.DROP_P, t_att._drop_key()) if dropout else None
        out, lse = attention_forward(Q, H, precision=precision, slopes=M, dropout=drop)
        with t_att.backward_variant(backward):
            dqkv = attention_backward(G, Q, out, lse, H, precision=precision, slopes=M,
                                      dropout=drop)
        if backward == "atomic-dq":
            dqkv = dqkv[..., H * D:]
        return [cp.asnumpy(a) for a in (out, lse, dqkv)]
    return fn


def _att_bf16():
    mma_dims = [d for d in ATTENTION_HEAD_DIMS
                if f"attention_forward_mma_kernel<{d}>" in NAME_EXPRESSIONS["attention"]]
    checks = [("bf16 mma dims cover the supported head dims",
               t_att.test_attention_bf16_mma_covers_the_supported_head_dims)]
    for D in mma_dims:
        for T in (1, 17, 65, 130):
            B, H = (2, 2) if T <= 17 else (1, 2)
            checks.append((f"attention bf16 mma D={D} T={T} B={B} H={H}",
                           lambda B=B, T=T, H=H, D=D: t_att._check_bf16(B, T, H, D)))
    for D in (16, 64, 128):
        checks.append((f"attention bf16 mma D={D} T=130 thread-order independent",
                       order_independent(attention_runs(1, 130, 1, D, "bf16"), "bf16")))
    # the distance bias: every <D, true> mma instantiation, alibi and lattice alternating
    for n, D in enumerate(mma_dims):
        bias = ("alibi", "lattice")[n % 2]
        checks.append((f"attention bf16 mma {bias} D={D} T=65 B=1 H=2",
                       lambda D=D, bias=bias: t_att._check_bf16(1, 65, 2, D, bias=bias)))
    checks += [
        ("attention bf16 mma lattice D=32 T=130 (several tiles both ways)",
         lambda: t_att._check_bf16(1, 130, 2, 32, bias="lattice")),
        ("attention bf16 mma alibi D=64 T=130 thread-order independent",
         order_independent(attention_runs(1, 130, 1, 64, "bf16", "alibi"), "bf16 alibi")),
        # the D = 64 forward built with 4 warps x 3 blocks, and with 4 warps of 2 m-tiles x 2
        # blocks (kernels.SETTINGS): the default's bits
        *[(f"attention bf16 D=64 forward {build} = default: B={B} T={T} H={H} "
           f"{bias}{' dropout' if drop else ''}",
           lambda a=(build, B, T, H, bias, drop): t_att._check_d64_forward_build(*a))
          for build, B, T, H, bias, drop in (
              ("4x3", 1, 130, 2, "none", False), ("4x3", 2, 67, 1, "lattice", False),
              ("4x3", 1, 200, 1, "alibi", True), ("4x2-m2", 2, 1, 1, "none", False),
              ("4x2-m2", 1, 17, 2, "lattice", True), ("4x2-m2", 1, 128, 1, "alibi", False),
              ("4x2-m2", 1, 200, 1, "lattice", True))],
    ]
    # the model's bf16 storage (a bf16 att alone, a bf16 dqkv) with dropout, over several key
    # tiles (T = 70): instantiations the CLLM_EMU_COVERAGE run (docs/emulator.md) found never
    # running the bf16 store of out, the dq kernel's next-tile prefetch with a bf16 dqkv, or
    # the forward's dropout bits (D = 64 without the bias: GPT-2's heads)
    checks += [(f"attention bf16 storage (the model's) dropout D={D} T=70 B=1 H=2 {bias}",
                lambda D=D, bias=bias: t_att.check_bf16_storage(1, 70, 2, D, bias, dropout=True))
               for D in mma_dims for bias in ("none", "alibi")
               if (D, bias) not in ((16, "none"), (128, "alibi"))]
    checks += _att_atomic_dq(mma_dims)
    checks += [
        ("attention bf16 D=8 falls back to the fp32 kernels",
         t_att.test_attention_bf16_without_mma_kernel_runs_the_fp32_kernels),
        *[(f"attention bf16 qkv storage = float qkv D={D} {bias}",
           lambda D=D, bias=bias: t_att.test_attention_bf16_storage_equals_float_inputs(D, bias))
          for D, bias in ((16, "none"), (64, "alibi"), (128, "lattice"))],
        ("attention bf16 qkv storage needs a tensor-core head dim",
         t_att.test_attention_bf16_storage_needs_a_tensor_core_head_dim),
        ("attention bf16 rejects float64 and misaligned arrays",
         t_att.test_attention_bf16_rejects_float64_and_misaligned_arrays),
        *_att_dropout("bf16"),
        # out_mm: the mma forward stores bf16(out) from its registers (the D = 64 builds too);
        # the fp32 kernels and the CuPy reference cast out into it
        *[(f"attention out_mm = to_bf16(out): B={B} T={T} H={H} D={D} {prec} {bias}"
           f"{' dropout' if drop else ''}{' ' + build if build else ''}",
           lambda a=(B, T, H, D, prec, bias, drop, build):
               t_att.test_attention_out_mm_is_the_bf16_copy_of_out(*a))
          for B, T, H, D, prec, bias, drop, build in t_att.OUT_MM_CASES],
        ("attention out_mm rejects bad arrays", t_att.test_attention_out_mm_rejects_bad_arrays),
        ("attention bf16 backward without mma (D=8) reads a bf16 O as floats",
         t_att.test_attention_bf16_backward_without_mma_reads_o_as_its_float_values),
        *[(f"attention bf16 backward reads O in bf16: D={D} T={T} {bias}{' dropout' * drop}",
           lambda a=(D, T, bias, drop): t_att.test_attention_bf16_backward_reads_o_in_bf16(*a))
          for D, T, bias, drop in ((16, 65, "none", False), (64, 200, "lattice", True),
                                   (128, 77, "alibi", True))],
        # a bf16 dqkv: the backward kernels store it (atomic-dq: dK, dV; dQ by its cast
        # kernel); the fp32 kernels and the CuPy reference cast a float dqkv into it
        *[(f"attention dqkv bf16 = to_bf16(dqkv): B={B} T={T} H={H} D={D} {backward} {bias}"
           f"{' dropout' if drop else ''}",
           lambda a=(B, T, H, D, backward, bias, drop):
               t_att.test_attention_dqkv_bf16_is_the_bf16_copy_of_dqkv(*a))
          for B, T, H, D, backward, bias, drop in t_att.DQKV_BF16_CASES],
        ("attention dqkv bf16 rejects bad arrays",
         t_att.test_attention_dqkv_bf16_rejects_bad_arrays),
        ("attention bf16 peaked softmax (T=300)",
         t_att.test_attention_bf16_softmax_is_peaked_without_overflow),
    ]
    return checks


def _att_atomic_dq(mma_dims):
    """The atomic-dq backward (ops.attention.set_attention_backward): the two-pass kernels'
    tolerances, its dK and dV bitwise the two-pass kernels' (t_att._check_rerun); T around one
    64-key block and several; every head dim's kernel with and without the bias; dropout."""
    checks = []
    for n, D in enumerate((16, 64, 128)):
        for m, T in enumerate((1, 63, 64, 65, 200)):
            B, H = (2, 2) if T <= 65 else (1, 2)
            bias = ("none", "alibi")[(n + m) % 2]
            checks.append((f"attention bf16 atomic-dq D={D} T={T} B={B} H={H} {bias}",
                           lambda a=(B, T, H, D, bias):
                           t_att._check_bf16(*a, backward="atomic-dq")))
    for D in mma_dims:
        if D not in (16, 64, 128):
            for bias in ("none", "lattice"):
                checks.append((f"attention bf16 atomic-dq D={D} T=65 B=1 H=2 {bias}",
                               lambda D=D, bias=bias:
                               t_att._check_bf16(1, 65, 2, D, bias, backward="atomic-dq")))
    checks += [(f"attention bf16 atomic-dq dropout D={D} T={T} B=2 H=2 {bias}",
                lambda a=(T, D, bias): t_att._check_dropout(2, a[0], 2, a[1], "bf16", a[2],
                                                            backward="atomic-dq"))
               for T, D, bias in ((67, 16, "none"), (130, 64, "lattice"), (67, 128, "none"))]
    checks.append(("attention bf16 CLLM_ATTN_BACKWARD picks the backward's kernels at launch",
                   _backward_env_selects_the_kernels))
    checks.append(("attention bf16 atomic-dq D=64 T=130 out, lse, dK, dV thread-order "
                   "independent", order_independent(
                       attention_runs(1, 130, 2, 64, "bf16", "alibi", dropout=True,
                                      backward="atomic-dq"), "bf16 atomic-dq")))
    return checks


def _backward_env_selects_the_kernels():
    import os
    qkv, dout = t_att._inputs(1, 70, 2, 16, np.float32)
    Q, G = cp.asarray(qkv), cp.asarray(dout)
    out, lse = attention_forward(Q, 2, precision="bf16")
    kernels = {"two-pass": ["attention_backward_dq_mma_kernel<16>",
                            "attention_backward_dkv_mma_kernel<16>"],
               "atomic-dq": ["attention_backward_delta_kernel<16>",
                             "attention_backward_mma_kernel<16>"]}
    old = os.environ.get("CLLM_ATTN_BACKWARD")
    try:
        for env, variant in (("atomic-dq", "atomic-dq"), ("", "two-pass"),
                             ("two-pass", "two-pass"), ("atomic-dq", "atomic-dq")):
            os.environ["CLLM_ATTN_BACKWARD"] = env
            n = len(fake_cupy.launches)
            attention_backward(G, Q, out, lse, 2, precision="bf16")
            ran = [k for k, _, _ in fake_cupy.launches[n:] if k.startswith("attention")]
            assert ran == kernels[variant], (env, ran)
    finally:
        if old is None:
            os.environ.pop("CLLM_ATTN_BACKWARD", None)
        else:
            os.environ["CLLM_ATTN_BACKWARD"] = old


def _att_fp32():
    checks = []
    for D in ATTENTION_HEAD_DIMS:
        for T in (1, 17, 64, 65):
            B, H = (2, 2) if T <= 17 else (1, 2)
            checks.append((f"attention fp32 D={D} T={T} B={B} H={H}",
                           lambda B=B, T=T, H=H, D=D: t_att._check(B, T, H, D)))
    checks.append(("attention fp32 D=128 T=130 (several key tiles)",
                   lambda: t_att._check(1, 130, 1, 128)))
    for D in (32, 128):
        checks.append((f"attention fp32 D={D} T=130 thread-order independent",
                       order_independent(attention_runs(1, 130, 1, D, "fp32"), "fp32")))
    checks.append(("attention fp32 peaked softmax (T=300)",
                   t_att.test_attention_softmax_is_peaked_without_overflow))
    # the distance bias: every <D, true> fp32 instantiation, alibi and lattice alternating
    for n, D in enumerate(ATTENTION_HEAD_DIMS):
        bias = ("lattice", "alibi")[n % 2]
        checks.append((f"attention fp32 {bias} D={D} T=65 B=1 H=2",
                       lambda D=D, bias=bias: t_att._check(1, 65, 2, D, bias=bias)))
    checks += [
        ("attention fp32 alibi D=128 T=130 (several key tiles)",
         lambda: t_att._check(1, 130, 2, 128, bias="alibi")),
        ("attention fp32 lattice D=32 T=130 thread-order independent",
         order_independent(attention_runs(1, 130, 1, 32, "fp32", "lattice"), "fp32 lattice")),
        ("attention bias: each head reads its own slope (fp32, bf16)",
         t_att.test_attention_bias_slopes_are_read_per_head),
        ("attention bias rejects bad slopes", t_att.test_attention_bias_rejects_bad_slopes),
        *_att_dropout("fp32"),
        ("attention dropout p = 0 is the plain kernel (fp32, bf16)",
         t_att.test_attention_dropout_zero_is_the_plain_kernel),
        ("attention dropout rejects bad arguments",
         t_att.test_attention_dropout_rejects_bad_arguments),
    ]
    return checks


def _att_dropout(precision):
    """Dropout on the probabilities: T not a multiple of 4 and > 64 (several tiles both ways),
    with and without the bias, the kept pattern element by element, and the thread order."""
    return [
        (f"attention {precision} dropout D=16 T=67 B=2 H=2",
         lambda: t_att._check_dropout(2, 67, 2, 16, precision)),
        (f"attention {precision} dropout D=64 T=130 B=2 H=2",
         lambda: t_att._check_dropout(2, 130, 2, 64, precision)),
        (f"attention {precision} dropout alibi D=128 T=67 B=2 H=2",
         lambda: t_att._check_dropout(2, 67, 2, 128, precision, "alibi")),
        (f"attention {precision} dropout pattern D=32 T=130",
         lambda: t_att._check_dropout_pattern(130, 2, 32, precision)),
        (f"attention {precision} dropout pattern D=16 T=67",
         lambda: t_att._check_dropout_pattern(67, 2, 16, precision)),
        (f"attention {precision} dropout D=32 T=67 thread-order independent",
         order_independent(attention_runs(1, 67, 2, 32, precision, dropout=True),
                           f"{precision} dropout")),
    ]


def parametrized_tests(module):
    """(name, check) for every test function of a tests/gpu module, once per combination of
    its pytest.mark.parametrize values."""
    out = []
    for name, fn in vars(module).items():
        if not (name.startswith("test_") and callable(fn)):
            continue
        combos = [{}]
        for mark in getattr(fn, "pytestmark", []):
            if mark.name != "parametrize":
                continue
            names = [n.strip() for n in mark.args[0].split(",")]
            combos = [{**c, **dict(zip(names, v if len(names) > 1 else (v,)))}
                      for c in combos for v in mark.args[1]]
        out += [(f"{name} {c}" if c else name, lambda fn=fn, c=c: fn(**c)) for c in combos]
    return out


def _other():
    c = []
    for dt in (F32, F64):
        # N > 2048: more than 32 row chunks, the column sums' finalize loops more than once
        for N, C in ((1, 1), (1, 768), (17, 31), (40, 130), (130, 300), (3, 2048), (2049, 8),
                     (4099, 64)):
            c.append((f"layernorm {dt.__name__} N={N} C={C}",
                      lambda dt=dt, N=N, C=C: t_ln.test_layernorm_matches_reference(dt, N, C)))
        c.append((f"layernorm backward {dt.__name__} dx aliasing dout, x, dresidual",
                  lambda dt=dt: t_ln.test_layernorm_backward_dx_may_alias_its_inputs(dt, 130, 300)))
        c.append((f"layernorm backward {dt.__name__} N=130 C=300 thread-order independent",
                  order_independent(lambda dt=dt: t_ln.backward_outputs(130, 300, dt),
                                    "layernorm backward")))
    c.append(("layernorm shape errors", t_ln.test_layernorm_shape_errors))
    for fused in (False, True):
        c.append((f"layernorm rows whose sums overflow (float32) fused={fused}",
                  lambda fused=fused: t_ln.test_layernorm_rows_whose_sums_overflow(fused)))
        c.append((f"layernorm rows whose sums overflow (float64) fused={fused}",
                  lambda fused=fused: t_ln.test_layernorm_float64_rows_whose_sums_overflow(fused)))
    for st in ("float32", "bf16"):   # (bf16: the bf16 model's instantiation, its scaled rows)
        for residual in (False, True):
            c.append((f"layernorm backward of rows whose sums overflow dout={st} "
                      f"residual={residual}",
                      lambda st=st, residual=residual:
                      t_ln.test_layernorm_backward_of_rows_whose_sums_overflow(st, residual)))
    c.append(("layernorm rows with a NaN or inf stay NaN (forward, backward)",
              t_ln.test_layernorm_rows_with_a_nan_or_inf_stay_nan))
    c.append(("layernorm rstd below FLT_MIN rounded to the nearest denormal",
              t_ln.test_layernorm_rstd_below_flt_min_is_rounded_to_the_nearest_denormal))
    c.append(("layernorm float64 rstd below DBL_MIN (forward, backward)",
              t_ln.test_layernorm_float64_rstd_below_dbl_min))
    c.append(("layernorm backward: ordinary rows add dresidual as before",
              t_ln.test_layernorm_backward_ordinary_rows_add_dresidual_as_before))
    c.append(("layernorm backward refuses dx over an input in other storage",
              t_ln.test_layernorm_backward_refuses_dx_over_an_input_in_other_storage))
    for N, C in ((1, 1), (17, 31), (64, 768)):
        for p in (0.0, 0.2):
            for st in ("float32", "bf16", "float64"):
                for ln_st in (st, "bf16-y", "bf16-y-float32-out") if st == "bf16" else (st,):
                    c.append((f"residual_layernorm N={N} C={C} p={p} {ln_st}",
                              lambda N=N, C=C, p=p, st=ln_st:
                              t_ln.test_residual_layernorm_matches_reference(N, C, p, st)))
                c.append((f"dropout_bias_backward N={N} C={C} p={p} {st}",
                          lambda N=N, C=C, p=p, st=st:
                          t_drop.test_dropout_bias_backward_matches_reference(N, C, p, st)))
                c.append((f"dropout_bias_backward column sums only N={N} C={C} p={p} {st}",
                          lambda N=N, C=C, p=p, st=st:
                          t_drop.test_dropout_bias_backward_column_sums_only(N, C, p, st)))
    # N > 2048: more than 32 row chunks, the column sums' finalize loops more than once
    for N, C in ((2049, 8), (4100, 40)):
        for p in (0.0, 0.3):
            for st in ("float32", "bf16", "float64"):
                c.append((f"dropout_bias_backward N={N} C={C} p={p} {st}",
                          lambda N=N, C=C, p=p, st=st:
                          t_drop.test_dropout_bias_backward_matches_reference(N, C, p, st)))
    for N, C in ((1, 1), (17, 31), (130, 300)):
        c.append((f"layernorm backward bf16 dout N={N} C={C}",
                  lambda N=N, C=C:
                  t_ln.test_layernorm_backward_bf16_dout_is_the_float32_kernel_on_its_values(N, C)))
    for N, C in ((1, 1), (17, 31)):
        c.append((f"layernorm bf16_out N={N} C={C}",
                  lambda N=N, C=C: t_ln.test_layernorm_bf16_out_is_the_rounded_fp32_output(N, C)))
    for dt in (F32, F64):
        for N, V in ((1, 1), (17, 7), (9, 1004), (3, 5001)):
            c.append((f"softmax_xent {dt.__name__} N={N} V={V}",
                      lambda dt=dt, N=N, V=V: t_xent.test_softmax_xent_matches_reference(dt, N, V)))
        for N, V, n_vocab in ((9, 64, 57), (7, 13, 6), (3, 8, 1)):
            c.append((f"softmax_xent {dt.__name__} padded N={N} V={V} vocab={n_vocab}",
                      lambda dt=dt, N=N, V=V, n=n_vocab:
                      t_xent.test_softmax_xent_padded_vocabulary(dt, N, V, n)))
    for N, V, nv in ((1, 1, 1), (17, 7, 7), (3, 5000, 4990), (9, 1000, 1000)):
        c.append((f"softmax_xent bf16 logits N={N} V={V} vocab={nv}",
                  lambda N=N, V=V, nv=nv: t_xent.test_softmax_xent_bf16_logits(N, V, nv)))
    c += [("softmax_xent vector and scalar paths agree",
           t_xent.test_softmax_xent_vector_and_scalar_paths_agree),
          ("softmax_xent out-of-range target", t_xent.test_softmax_xent_out_of_range_target_is_nan),
          ("softmax_xent every negative target is ignored",
           t_xent.test_softmax_xent_every_negative_target_is_ignored),
          ("softmax_xent large logits", t_xent.test_softmax_xent_large_logits_stable),
          ("softmax_xent NaN logit", t_xent.test_softmax_xent_nan_logit_gives_nan_loss)]
    for offset in (1e4, 1e6, 1e30):
        c.append((f"softmax_xent logits with a common offset {offset:g}",
                  lambda o=offset: t_xent.test_softmax_xent_loss_of_logits_with_a_large_common_offset(o)))
    for V in (1, 7, 300, 1024):
        for bad in (np.nan, np.inf, -np.inf):
            c.append((f"softmax_xent V={V} {bad} logits in scored and ignored rows = reference",
                      lambda V=V, bad=bad:
                      t_xent.test_softmax_xent_nonfinite_logits_match_the_reference(V, bad)))
    for dt in (F32, F64):
        for P in (1, 17, 5003):
            for scale in (1.0, 0.37):
                for step in (1, 7):
                    c.append((f"adamw {dt.__name__} P={P} scale={scale} step={step}",
                              lambda dt=dt, P=P, scale=scale, step=step:
                              t_adamw.test_adamw_matches_reference(dt, P, scale, step)))
        for bad in (np.nan, np.inf):
            c.append((f"adamw {dt.__name__} non-finite scale {bad} skips",
                      lambda dt=dt, bad=bad: t_adamw.test_adamw_nonfinite_device_scale_skips_step(bad, dt)))
    for P in (1, 17, 5003):
        for masked in (True, False):
            c.append((f"adamw float32 P={P} masked={masked} writes the bf16 copy",
                      lambda P=P, masked=masked:
                      t_adamw.test_adamw_writes_the_bf16_copy(P, masked)))
    c.append(("adamw rejects a bad params_bf16", t_adamw.test_adamw_rejects_bad_params_bf16))
    c.append(("grad_norm -> clip_factor -> adamw through one step buffer",
              t_adamw.test_clip_pipeline_on_device_without_host_sync_values))
    c.append(("adamw rejects a bad hyper", t_adamw.test_adamw_rejects_bad_hyper))
    for dt in (F32, F64):
        for n in (1, 17, 4096, 70_001):
            c.append((f"grad_norm {dt.__name__} n={n}",
                      lambda dt=dt, n=n: t_gn.test_grad_norm_matches_reference(dt, n)))
    for norm in (0.0, 0.5, 1.0, 10.0, np.inf, np.nan):
        for loss in (2.5, np.nan):
            for max_norm in (1.0, 0.0):
                c.append((f"clip_factor norm={norm} loss={loss} max_norm={max_norm}",
                          lambda norm=norm, loss=loss, max_norm=max_norm:
                          t_gn.test_clip_factor_matches_reference(norm, loss, max_norm)))
    for n in (1000, 70_001):
        c.append((f"grad_norm zero and non-finite n={n}",
                  lambda n=n: t_gn.test_grad_norm_zero_and_nonfinite(n)))
    for n in (1000, 70_001):
        c.append((f"grad_norm first of a run of non-finite elements n={n}",
                  lambda n=n: t_gn.test_grad_norm_first_of_a_run_of_nonfinite_elements(n)))
    for value in (1e20, 3e38):
        c.append((f"grad_norm of a huge finite float32 {value} is finite like the reference",
                  lambda value=value:
                  t_gn.test_grad_norm_of_huge_finite_float32_is_finite_like_the_reference(value)))
    for dt in (F32, F64):
        for shp in ((1, 1, 1, 1), (4, 17, 7, 33), (3, 9, 300, 130)):
            c.append((f"embedding {dt.__name__} B,T,V,C={shp}",
                      lambda dt=dt, shp=shp: t_emb.test_embedding_matches_reference(dt, *shp)))
    c.append(("embedding out-of-range id", t_emb.test_embedding_out_of_range_id_gives_nan_not_a_crash))
    for dt in (F32, F64):
        c.append((f"embedding {dt.__name__} without wpe (pos_emb none)",
                  lambda dt=dt: t_emb.test_embedding_without_position_embedding(dt)))
    for dt in (F32, F64):
        for shp in ((1,), (17,), (255, 3)):
            c.append((f"gelu {dt.__name__} shape={shp}",
                      lambda dt=dt, shp=shp: t_gelu.test_gelu_matches_reference(dt, shp)))
    for shp in ((1, 1), (37, 31), (130, 300), (2049, 8), (4100, 40)):  # N > 2048: see layernorm
        for st in ("float32", "bf16", "float64"):
            c.append((f"gelu backward + bias gradient shape={shp} {st}",
                      lambda shp=shp, st=st: t_gelu.test_gelu_backward_with_bias_gradient(shp, st)))
    for shp in ((1, 1), (37, 31)):
        c.append((f"gelu backward into a bf16 dx without a bias shape={shp}",
                  lambda shp=shp: t_gelu.test_gelu_backward_into_a_bf16_dx_without_a_bias(shp)))
    for with_bias in (False, True):
        c.append((f"gelu refuses an output over an input in other storage bias={with_bias}",
                  lambda wb=with_bias:
                  t_gelu.test_gelu_refuses_an_output_over_an_input_in_other_storage(wb)))
    for dt in (F32, F64):
        for shp in ((1, 1), (33, 65)):
            c.append((f"gelu fused bias {dt.__name__}{' + bf16_out' * (dt is F32)} shape={shp}",
                      lambda shp=shp, dt=dt: t_gelu.test_gelu_fused_bias_and_bf16_out(shp, dt)))
    for shp in ((1, 1), (37, 31), (130, 300)):
        c.append((f"gelu bf16 inputs = float32 kernels on their values shape={shp}",
                  lambda shp=shp: t_gelu.test_gelu_bf16_inputs_are_the_float32_kernels_on_their_values(shp)))
    for n in (1, 255, 10_003):
        c.append((f"cast to/from bf16 n={n}", lambda n=n: t_cast.test_to_bf16_bits_equal_host_rounding(n)))
    c.append(("cast rounding boundaries (ties, inf, denormals, NaN payloads)",
              t_cast.test_to_bf16_rounding_boundaries_equal_host_rounding))
    c.append(("cast NaN stays NaN", t_cast.test_nan_stays_nan))
    for dt in (F32, F64):
        for n in (1, 3, 4, 1025):
            for p in (0.1, 0.5):
                c.append((f"dropout {dt.__name__} n={n} p={p} (masks bitwise = reference)",
                          lambda dt=dt, n=n, p=p:
                          t_drop.test_dropout_masks_bit_identical_to_the_reference(dt, n, p)))
    c.append(("dropout seed 2^32 + 1 (masks bitwise = reference, not seed 1's)",
              t_drop.test_dropout_seed_past_32_bits_draws_the_reference_mask))
    # (offset 64, 4 -> 12: the bias as 8-byte words, as the model's c_attn fills it)
    for N, Cin, Cout, offset in ((1, 1, 1, 5), (17, 31, 45, 5), (17, 31, 45, 64),
                                 (5, 4, 12, 64), (5, 4, 12, 5)):
        c.append((f"linear bf16 out + bf16 bias slice = gemm onto the bias N={N} {Cin}->{Cout} "
                  f"at offset {offset}",
                  lambda N=N, Cin=Cin, Cout=Cout, offset=offset:
                  t_linear.test_bf16_out_with_a_bias_slice_is_gemm_onto_the_broadcast_bias(
                      N, Cin, Cout, offset)))
    c.append(("linear bf16 out refuses a host bias and overlaps before writing",
              t_linear.test_bf16_out_refuses_a_host_bias_and_overlaps_before_writing))
    # the launchers refuse an output over an input where a kernel would race (each such
    # launch, let through, fails the emulator's race check); ids past int32 stay out of range
    c += [("cast refuses an out over x", t_cast.test_cast_refuses_an_out_over_x),
          ("dropout in place, or refused over x shifted",
           t_drop.test_dropout_in_place_or_refused_over_x),
          ("adamw refuses overlapping arrays", t_adamw.test_adamw_refuses_overlapping_arrays),
          ("embedding refuses outputs over inputs",
           t_emb.test_embedding_refuses_outputs_over_inputs),
          ("softmax_xent refuses outputs over inputs",
           t_xent.test_softmax_xent_refuses_outputs_over_inputs),
          ("layernorm forward in place, or refused over its inputs",
           t_ln.test_layernorm_forward_in_place_or_refused_over_its_inputs),
          ("residual layernorm refuses outputs over the sum in other storage",
           t_ln.test_residual_layernorm_refuses_outputs_over_the_sum_in_other_storage),
          ("gelu refuses an output over the bias", t_gelu.test_gelu_refuses_an_output_over_the_bias),
          ("gelu float32 derivative at huge inputs",
           lambda: t_gelu.test_gelu_derivative_at_huge_inputs_is_1_or_0(F32)),
          ("gelu float64 derivative at huge inputs",
           lambda: t_gelu.test_gelu_derivative_at_huge_inputs_is_1_or_0(F64)),
          ("layernorm refuses a host residual gradient or branch bias",
           t_ln.test_layernorm_refuses_a_host_residual_gradient_or_branch_bias),
          ("residual layernorm refuses a sum over y",
           t_ln.test_residual_layernorm_refuses_a_sum_over_y),
          ("layernorm forward refuses a bad given mean or rstd",
           t_ln.test_layernorm_forward_checks_a_given_mean_and_rstd),
          ("cast refuses a device x of another dtype",
           t_cast.test_cast_refuses_a_device_x_of_another_dtype),
          ("embedding backward refuses more positions than dwpe rows",
           t_emb.test_embedding_backward_refuses_more_positions_than_dwpe_rows)]
    for precision in ("fp32", "bf16"):
        c.append((f"attention {precision} refuses outputs over lse or the slopes",
                  lambda precision=precision:
                  t_att.test_attention_refuses_outputs_over_lse_or_the_slopes(precision)))
    for precision, backward in (("fp32", "two-pass"), ("bf16", "two-pass"),
                                ("bf16", "atomic-dq")):
        c.append((f"attention {precision} {backward} backward in a given scratch",
                  lambda precision=precision, backward=backward:
                  t_att.test_attention_backward_in_a_given_scratch(precision, backward)))
    # the column-sum launchers' partials in a caller's scratch (the activation cache's)
    for dt in (np.float32, np.float64):
        c.append((f"layernorm backward {dt.__name__} in a given scratch",
                  lambda dt=dt: t_ln.test_layernorm_backward_in_a_given_scratch(dt)))
    for storage in ("float32", "bf16", "float64"):
        c.append((f"gelu backward {storage} in a given scratch",
                  lambda storage=storage: t_gelu.test_gelu_backward_in_a_given_scratch(storage)))
        for p in (0.0, 0.3):
            c.append((f"dropout bias backward {storage} p={p} in a given scratch",
                      lambda storage=storage, p=p:
                      t_drop.test_dropout_bias_backward_in_a_given_scratch(p, storage)))
    for dt in (np.int64, np.uint64):
        c.append((f"embedding {dt.__name__} ids past int32 give NaN",
                  lambda dt=dt: t_emb.test_embedding_wide_ids_past_int32_give_nan_not_another_row(dt)))
    for dt in (np.int16, np.uint8, np.uint16, "int32 strided"):
        c.append((f"embedding {getattr(dt, '__name__', dt)} ids are the rows they name",
                  lambda dt=dt: t_emb.test_embedding_narrow_and_strided_ids_are_the_rows_they_name(dt)))
    # the grid-stride kernels with the launchers' grid cap lowered: several iterations a thread
    for name, check in t_gs.CHECKS:
        c.append((f"grid-stride {name}, grid capped at {t_gs.CAP} blocks",
                  lambda check=check: t_gs.run_capped(check)))
    for dt, target in ((np.int64, 2**32 + 3), (np.uint32, 2**31 + 3), (np.int64, -2**32 + 3)):
        c.append((f"softmax_xent {dt.__name__} target {target} out of range or ignored",
                  lambda dt=dt, target=target:
                  t_xent.test_softmax_xent_wide_targets_past_int32_are_out_of_range_or_ignored(
                      dt, target)))
    # inputs with no elements: the launchers' early returns, no launch
    c += [(f"empty inputs: {name}", check) for name, check in parametrized_tests(t_empty)]
    return c


# ---------------------------------------------------------------- the whole model
# CLLMModel(backend="cuda") end to end: every kernel emulated, bf16 stored as uint16 bits, the
# products through the cublasGemmEx stand-in (fake_cublas.py) on the raw pointers. The checks
# of tests/gpu/test_model_cuda.py run as they are, on its config (head dim 32) and on one with
# head dim 16 (the other mma instantiation a small model reaches); T = 17 is not a multiple of
# any tile.
CFG32 = dict(t_model.CFG)                                  # vocab 97, block 64, 2x2, n_embd 64
CFG16 = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)
# head dim 8: no tensor-core kernel; the bf16 model's other attention path (a float qkv and
# output, the output's bf16 copy, dqkv computed float and cast) end to end
CFG8 = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)


def _with_cfg(cfg, fn, *args):
    def run():
        saved = t_model.CFG
        t_model.CFG = cfg
        try:
            fn(*args)
        finally:
            t_model.CFG = saved
    return run


def _batches(cfg, K, B, T, seed):
    return [t_model._batch(cfg, B, T, seed + i) for i in range(K)]


def _graph_steps(precision, steps=3, K=2):
    """The training step captured in a CUDA graph on the emulated kernels and the real cuBLAS
    call path (fake_cublas.LibCublas): a warm-up step, one capture, replays, against plain
    steps of a second model from the same init: the parameters and Adam moments bit for bit.
    (run_cuda_path.py checks the graph step in reference-launchers mode, where the GEMM is its
    NumPy reference and never reaches cuBLAS.)"""
    def check():
        from cllm_gpu.cuda_graph import StepGraph
        cfg = ModelConfig(**CFG32)
        tc = TrainConfig(batch_size=2, grad_accum_steps=K, precision=precision, grad_clip=1.0,
                         cuda_graph=True)
        plain, graphed = (CLLMModel(cfg, backend="cuda", dtype="float32", seed=4,
                                    precision=precision) for _ in range(2))
        warnings = []
        graph = StepGraph(graphed, tc, StepValues(graphed.xp), warnings.append)
        sv_plain = StepValues(plain.xp)
        for step in range(1, steps + 1):
            batches = _batches(cfg, K, 2, 16, 50 * step)   # one shape: one capture
            figures = []
            for m in (plain, graphed):
                checked = [m.check_batch(*b) for b in batches]
                n_valid = sum(b.n_valid for b in checked)
                if m is graphed:
                    out = graph.step(checked, 3e-3, step, n_valid)
                    assert out is not None, warnings
                else:
                    sv_plain.set_inputs(tc, 3e-3, step, n_valid)
                    training_step(m, (m.set_batch(b) for b in checked), tc, sv_plain)
                    out = sv_plain.outputs()
                figures.append(StepValues.read_outputs(out))
            assert figures[0] == figures[1], (step, figures)
        assert graph.active and graph.warmups == 1 and graph.captures == 1, warnings
        assert graph.replays == steps - 1
        for name in ("params", "adam_m", "adam_v"):
            a, b = (getattr(m, name).data.get() for m in (plain, graphed))
            assert a.tobytes() == b.tobytes(), f"{name} differs"
    return check


def _through_cupys_cublas(fn):
    """The GEMM op's libcublas function `fn` (cublasGemmEx or cublasSetStream_v2) replaced by
    CuPy's wrapper of it (cupy_backends.cuda.libs.cublas, as CuPy 14 behaves: its setStream
    refuses stream capture and resets the workspace, and its gemmEx calls setStream first)."""
    from cupy_backends.cuda.libs import cublas
    wrapper = {"cublasGemmEx": cublas.gemmEx, "cublasSetStream_v2": cublas.setStream}[fn]
    lib = gemm_mod.libcublas

    class ThroughCupy:
        def __getattr__(self, name):
            return getattr(lib, name)

    def call(*args):
        wrapper(*args)
        return 0
    patched = ThroughCupy()
    setattr(patched, fn, call)
    return _patch(gemm_mod, "libcublas", patched)


def _model_thread_order(precision):
    """Two models, the threads of every block and the blocks of every grid run ascending in
    one and descending in the other: bitwise-equal loss and gradients."""
    def check():
        cfg = ModelConfig(**CFG32)
        idx, tgt = t_model._batch(cfg, 2, 33)
        runs = []
        for rev in (0, 1):
            fake_cupy.ORDER.update(reverse=rev, blocks=rev)
            try:
                m = CLLMModel(cfg, backend="cuda", dtype="float32", seed=1, precision=precision)
                runs.append(m.loss_and_grads(idx, tgt))
            finally:
                fake_cupy.ORDER.update(reverse=0, blocks=0)
        (la, ga), (lb, gb) = runs
        assert la == lb, (la, lb)
        for k in ga:
            assert_bitwise_equal(ga[k], gb[k], k)
    return check


def _bias_fill_copies_words():
    """The bf16 model's device forward (head dim 16: a bf16 qkv) issues one broadcast copy per
    layer, c_attn's bias onto every row of qkv before the GEMM adds to it (ops/linear.py), and it
    moves 8-byte words. A copy whose source has another shape or strides than its destination
    is CuPy's elementwise copy kernel, one element per thread with an index computation each;
    as 2-byte bf16 elements this fill ran at 0.42 TB/s on an H200 (0.18 ms a layer at GPT-2
    124M's 16 x 1024 rows of 2,304: docs/results/h200-2026-12-04/profile_call2.md). A copy
    between equal layouts is a memcpy (or nothing, onto itself) and is not counted."""
    cfg = ModelConfig(**CFG16)
    idx, tgt = t_model._batch(cfg, 2, 17)
    m = CLLMModel(cfg, backend="cuda", dtype="float32", seed=1, precision="bf16")
    m.zero_grad()
    B, T = m.set_batch(m.check_batch(idx, tgt))
    setitem, element_bytes = fake_cupy.FakeArr.__setitem__, []

    def recording(self, key, value):
        dst = self[key]
        if isinstance(value, np.ndarray) and (value.shape, value.strides) != (dst.shape,
                                                                              dst.strides):
            element_bytes.append(dst.dtype.itemsize)
        setitem(self, key, value)
    restore = _patch(fake_cupy.FakeArr, "__setitem__", recording)
    try:
        m.forward(B, T)
    finally:
        restore()
    assert element_bytes == [8] * cfg.n_layer, element_bytes


def _training_steps(precision, steps=4, K=2):
    """`trainer.training_step` (K micro-batches, clip 1.0, AdamW, bf16 weight refresh) on the
    device path against the NumPy path from the same init and batches. fp32 vs float64 and
    bf16 vs the NumPy bf16 path: per-step loss and grad norm, the final parameters; the bf16
    weight copy is the rounding of the masters bit for bit after every step."""
    def check():
        cfg = ModelConfig(**CFG32)
        tc = TrainConfig(batch_size=2, grad_accum_steps=K, precision=precision, grad_clip=1.0,
                         weight_decay=0.1)
        dev = CLLMModel(cfg, backend="cuda", dtype="float32", seed=3, precision=precision)
        ref = (CLLMModel(cfg, backend="numpy", dtype="float64", seed=3) if precision == "fp32"
               else CLLMModel(cfg, backend="numpy", dtype="float32", seed=3, precision="bf16"))
        # fp32: fp32 rounding vs float64 through a few Adam steps; bf16: the summation order
        # moves values across bf16 rounding boundaries (see the bf16 gradient test: 1e-2), and
        # with bf16 logits and dlogits (as llm.c) a bias element whose gradient is mostly that
        # noise takes an lr-sized Adam step of either sign: the small bias tensors (values of
        # order lr x steps) then differ by up to ~2e-2 norm-wise after 4 steps; bound 3e-2
        ltol, ptol = (1e-5, 1e-4) if precision == "fp32" else (2e-3, 3e-2)
        svs = {id(m): StepValues(m.xp) for m in (dev, ref)}
        for step in range(1, steps + 1):
            batches = _batches(cfg, K, 2, 17 + 4 * step, 100 * step)  # a new shape each step
            lr = 3e-3
            figures = []
            for m in (dev, ref):
                sv = svs[id(m)]
                checked = [m.check_batch(*b) for b in batches]
                sv.set_inputs(tc, lr, step, sum(b.n_valid for b in checked))
                training_step(m, (m.set_batch(b) for b in checked), tc, sv)
                out = sv.outputs()
                assert isinstance(out, cp.ndarray) == (m is dev), type(out)
                figures.append(StepValues.read_outputs(out))
            d, r = figures
            assert d["bad"] == -1 and r["bad"] == -1, (d, r)
            assert abs(d["loss"] - r["loss"]) <= ltol * abs(r["loss"]), (step, d, r)
            assert abs(d["grad_norm"] - r["grad_norm"]) <= 10 * ltol * abs(r["grad_norm"]), (step, d, r)
            if precision == "bf16":
                np.testing.assert_array_equal(dev.params_mm.data.get(),
                                              bf16_bits(dev.params.data.get()))
        sd, sr = dev.state_dict(), ref.state_dict()
        # The key third of c_attn.bias has an exactly zero gradient (a per-query constant added
        # to every score: softmax ignores it), so Adam turns rounding noise of either path into
        # steps of up to lr with arbitrary signs: compared in absolute terms, the rest relative.
        C = cfg.n_embd
        for l in range(cfg.n_layer):
            for d in (sd, sr):
                kb = d[f"transformer.h.{l}.attn.c_attn.bias"]
                assert np.abs(kb[C:2 * C]).max() <= 1.01 * lr * steps, np.abs(kb[C:2 * C]).max()
                d[f"transformer.h.{l}.attn.c_attn.bias"] = np.concatenate([kb[:C], kb[2 * C:]])
        bad = {k: rel_err(sd[k], sr[k]) for k in sr if not rel_err(sd[k], sr[k]) <= ptol}
        assert not bad, bad
        # the run moved the parameters (a training step that does nothing would pass the above)
        init = CLLMModel(cfg, backend="numpy", dtype="float64", seed=3).state_dict()
        assert rel_err(sd["transformer.h.0.mlp.c_fc.weight"],
                       init["transformer.h.0.mlp.c_fc.weight"]) > 10 * ptol
    return check


def _nonfinite_step(precision):
    """A non-finite gradient: the device-side clip factor is NaN, AdamW skips (params, moments
    and the bf16 copy bitwise unchanged) and `bad` is the arena index of the first bad value."""
    def check():
        cfg = ModelConfig(**CFG32)
        tc = TrainConfig(batch_size=2, precision=precision)
        m = CLLMModel(cfg, backend="cuda", dtype="float32", seed=0, precision=precision)
        batch = m.check_batch(*_batches(cfg, 1, 2, 17, 5)[0])
        sv = StepValues(cp)

        def step(n):
            sv.set_inputs(tc, 1e-3, n, batch.n_valid)
            training_step(m, [m.set_batch(batch)], tc, sv)
            return StepValues.read_outputs(sv.outputs())
        step(1)  # moments non-zero
        spec = next(s for s in m.specs if s.name == "transformer.h.1.attn.c_proj.weight")
        orig = m.backward

        def backward(B, T):
            orig(B, T)
            m.grads[spec.name][3, 4] = np.inf
        m.backward = backward
        before = [a.data.get() for a in (m.params, m.adam_m, m.adam_v, m.params_mm)]
        r = step(2)
        after = [a.data.get() for a in (m.params, m.adam_m, m.adam_v, m.params_mm)]
        for x, y in zip(before, after):
            assert x.tobytes() == y.tobytes(), "a non-finite step changed the state"
        assert r["bad"] == spec.offset + 3 * spec.shape[1] + 4, (r, spec.offset)
        assert r["nonfinite"] and not np.isfinite(r["grad_norm"]) and np.isfinite(r["loss"])
    return check


def _logits(precision):
    """model.logits, last_logits, eval_loss_sum and greedy sampling on the device path."""
    def check():
        cfg = ModelConfig(**CFG32)
        dev = CLLMModel(cfg, backend="cuda", dtype="float32", seed=2, precision=precision)
        ref = (CLLMModel(cfg, backend="numpy", dtype="float64", seed=2) if precision == "fp32"
               else CLLMModel(cfg, backend="numpy", dtype="float32", seed=2, precision="bf16"))
        tol = 1e-5 if precision == "fp32" else 1e-2
        idx, tgt = t_model._batch(cfg, 3, 17, seed=9)
        lg, lr_ = dev.logits(idx), ref.logits(idx)
        assert isinstance(lg, np.ndarray) and not isinstance(lg, cp.ndarray)
        assert lg.shape == (3, 17, cfg.vocab_size) and lg.dtype == np.float32
        assert rel_err(lg, lr_) <= tol, rel_err(lg, lr_)
        last = dev.last_logits(idx)
        assert last.shape == (3, cfg.vocab_size)
        np.testing.assert_allclose(last, lg[:, -1], rtol=1e-6, atol=1e-6)
        # the forward-only cache (one block's buffers for every block) gives the bits of the
        # forward into the training cache, which logits / last_logits used before 2026-12-03
        B, T = dev.set_batch(dev.check_batch(idx))
        dev.forward(B, T)
        lnf = dev._cache(B, T).lnf
        assert_bitwise_equal(lg.reshape(B * T, -1),
                             dev._to_host(dev._logits_of(lnf.reshape(B * T, -1))))
        assert_bitwise_equal(last, dev._to_host(dev._logits_of(cp.ascontiguousarray(lnf[:, -1]))))
        (sd, nd), (sr, nr) = dev.eval_loss_sum(idx, tgt), ref.eval_loss_sum(idx, tgt)
        assert nd == nr and abs(float(sd) - float(sr)) <= tol * abs(float(sr)), (sd, sr)
        if precision == "fp32":
            a = sample_tokens(dev, [5, 7], 6, temperature=0)
            b = sample_tokens(ref, [5, 7], 6, temperature=0)
            assert a == b, (a, b)
    return check


def _kernel_smoke():
    """scripts/gpu_kernel_smoke.py --quick (the compute-sanitizer driver) under the emulator."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "gpu_kernel_smoke", TESTS.parent / "scripts" / "gpu_kernel_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick"]) == 0
    assert fake_cupy.current_allocator["current"] is None  # it switched the pool off


def _model_mutant(name, patch, fn):
    """The model checks fail when the CUDA path is broken: `patch()` breaks it, returns undo."""
    def check():
        undo = patch()
        try:
            fn()
        except (AssertionError, fake_cublas.CUBLASError) as e:
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(f"  caught: {(str(e).strip() or type(e).__name__).splitlines()[0][:160]} "
                  f"({Path(where.filename).name}:{where.lineno})")
            return
        finally:
            undo()
        raise AssertionError(f"mutant not caught: {name}")
    return (f"mutant caught: {name}", check)


def _patch(obj, attr, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    return lambda: setattr(obj, attr, old)


def _adamw_without_bf16_copy():
    """ops.adamw_update drops its params_bf16 argument: the update runs, the copy goes stale."""
    import cllm_gpu.ops as ops_pkg
    orig = ops_pkg.adamw_update
    return _patch(ops_pkg, "adamw_update", lambda *a, params_bf16=None: orig(*a))


def _swap_gemm_transposes():
    """transa/transb exchanged, only in the calls where cuBLAS would still accept the shapes
    (m == n and valid leading dimensions): a wrong product, not an error, must be caught."""
    orig = gemm_mod.gemm_cublas_args

    def args(*a):
        r = list(orig(*a))
        ta, tb, m, n, k, lda, ldb = r[1], r[0], r[2], r[3], r[4], r[7], r[10]
        if m == n and ta != tb and lda >= (k if ta else m) and ldb >= (n if tb else k):
            r[0], r[1] = ta, tb
        return tuple(r)
    return _patch(gemm_mod, "gemm_cublas_args", args)


def _model():
    from cllm_gpu import model as model_mod
    c = []
    # ops.gemm through the GemmEx stand-in, tests/gpu/test_gemm_cuda.py on its small shapes
    for shape in t_gemm.SHAPES[:3]:
        for ta, tb in ((False, False), (True, False), (False, True), (True, True)):
            for dt in (F32, F64):
                c.append((f"gemm {dt.__name__} {shape} ta={ta} tb={tb}",
                          lambda s=shape, ta=ta, tb=tb, dt=dt:
                          t_gemm.test_float_gemm_matches_numpy(s, ta, tb, dt)))
        c.append((f"gemm bf16 -> bf16 out {shape}",
                  lambda s=shape: t_gemm.test_bf16_gemm_into_bf16_out_is_the_fp32_product_rounded(s)))
        for ta, tb in ((False, False), (True, False), (False, True), (True, True)):
            if (ta, tb) != (True, True):
                c.append((f"gemm bf16 {shape} ta={ta} tb={tb}",
                          lambda s=shape, ta=ta, tb=tb:
                          t_gemm.test_bf16_gemm_matches_numpy_on_rounded_operands(s, ta, tb)))
    c.append(("gemm rejects mixed and overlapping", t_gemm.test_gemm_rejects_mixed_and_overlapping))
    for T in (1, 17, 64):
        c.append((f"model fp32 loss+grads vs float64 T={T} (head dim 32)",
                  _with_cfg(CFG32, t_model.test_loss_and_grads_match_numpy_float64, T)))
    for T in (1, 17, 32):
        c.append((f"model fp32 loss+grads vs float64 T={T} (head dim 16)",
                  _with_cfg(CFG16, t_model.test_loss_and_grads_match_numpy_float64, T)))
    for prec in ("fp32", "bf16"):
        c.append((f"model {prec} with dropout: kernels' masks = NumPy's (loss+grads)",
                  lambda prec=prec: t_model.test_dropout_loss_and_grads_match_numpy(prec)))
    c.append(("model float64 cuda path vs numpy float64 (dense attention, double kernels)",
              t_model.test_cuda_float64_matches_numpy_float64))
    for T in (17, 64):
        c.append((f"model bf16 loss+grads vs numpy bf16 and float64 T={T} (head dim 32)",
                  _with_cfg(CFG32, t_model.test_bf16_loss_and_grads_match_numpy_bf16_and_float64, T)))
    for T in (17, 32):
        c.append((f"model bf16 loss+grads vs numpy bf16 and float64 T={T} (head dim 16)",
                  _with_cfg(CFG16, t_model.test_bf16_loss_and_grads_match_numpy_bf16_and_float64, T)))
    c.append(("model bf16 loss+grads vs numpy bf16 and float64 T=17 (head dim 8: fp32 attention)",
              _with_cfg(CFG8, t_model.test_bf16_loss_and_grads_match_numpy_bf16_and_float64, 17)))
    # attn_bias with pos_emb "none": the <32, true> kernels inside the model, T past block_size
    c.append(("model fp32 alibi, no wpe, T=72 > block_size vs float64",
              lambda: t_model.check_fp32_against_float64(
                  dict(CFG32, attn_bias="alibi", pos_emb="none"), 72)))
    c.append(("model bf16 lattice, no wpe, T=33 vs numpy bf16 and float64",
              lambda: t_model.check_bf16_against_numpy(
                  dict(CFG32, attn_bias="lattice", pos_emb="none"), 33)))
    for prec in ("fp32", "bf16"):
        # (stands in for test_loss_and_grads_bitwise_deterministic: the same, plus a reversed
        # thread schedule in the second run)
        c.append((f"model {prec} thread-order independent", _model_thread_order(prec)))
        c.append((f"training_step {prec} x4 (2 micro-batches, clip, AdamW) vs numpy",
                  _training_steps(prec)))
        c.append((f"training_step {prec} non-finite grad skips on the device",
                  _nonfinite_step(prec)))
        c.append((f"logits / last_logits / eval_loss_sum {prec}", _logits(prec)))
        c.append((f"CUDA graph step {prec} (K 2: capture, replays) = plain steps, bitwise",
                  _graph_steps(prec)))
    c.append(("model bf16 forward: one broadcast copy a layer (c_attn's bias), of 8-byte words",
              _bias_fill_copies_words))
    c.append(("scripts/gpu_kernel_smoke.py --quick", _kernel_smoke))
    c += [
        _model_mutant("bf16 weight copy not refreshed after the optimizer step "
                      "(AdamW not handed params_bf16)", _adamw_without_bf16_copy,
                      _training_steps("bf16", steps=1, K=1)),
        # (caught as an out-of-bounds operand read by the GemmEx stand-in's range check)
        _model_mutant("cublasGemmEx transa/transb exchanged", _swap_gemm_transposes,
                      _with_cfg(CFG32, t_model.test_loss_and_grads_match_numpy_float64, 17)),
        # CuPy's gemmEx sets the stream itself, which drops the fixed workspace
        _model_mutant("cublasGemmEx through CuPy's cublas.gemmEx",
                      lambda: _through_cupys_cublas("cublasGemmEx"), _graph_steps("fp32", 2)),
        # CuPy's setStream refuses while the stream is capturing: the step is never captured
        _model_mutant("cublasSetStream_v2 through CuPy's cublas.setStream",
                      lambda: _through_cupys_cublas("cublasSetStream_v2"),
                      _graph_steps("fp32", 2)),
        # beta = 0: a second micro-batch overwrites the first's weight gradients
        _model_mutant("GemmEx accumulate (beta = 1) dropped",
                      lambda: _patch(gemm_mod, "gemm_cuda",
                                     lambda a, b, out=None, ta=False, tb=False, acc=False,
                                     f=gemm_mod.gemm_cuda: f(a, b, out, ta, tb, False)),
                      _training_steps("fp32", steps=1, K=2)),
    ]
    return c


# ---------------------------------------------------------------- mutants: the checks must fail
def _mutants():
    att_src = build.kernels.kernel_source("attention")
    ptx = (Path(build.__file__).parent / "emu_ptx.cpp").read_text()

    def sub(text, old, new):
        assert text.count(old) == 1, f"mutation anchor not found once: {old!r}"
        return text.replace(old, new)

    only32 = [n for n in NAME_EXPRESSIONS["attention"] if n.endswith("<32>")]
    only32_bias = [n for n in NAME_EXPRESSIONS["attention"] if n.endswith("<32, true>")]
    only128 = [n for n in NAME_EXPRESSIONS["attention"] if n.endswith("<128>")]
    # what a D = 64 bf16-dqkv check launches (forward; float and bf16 backward; the dQ cast)
    only64_dqkv = [n for n in NAME_EXPRESSIONS["attention"]
                   if n.endswith(("<64>", "<64, false, cllm_bf16>", "attention_dq_to_bf16_kernel<float>"))]
    bf16 = lambda: t_att._check_bf16(1, 65, 2, 32)  # noqa: E731
    ln_src = build.kernels.kernel_source("layernorm")
    adamw_src = build.kernels.kernel_source("adamw")
    bf16_store = "        if constexpr (BF16_COPY) cllm_store(params_bf16 + i, p);\n"
    # the LayerNorm backward's teams adding their column sums with shared-memory atomics in
    # arrival order instead of in team order (C = 300: 8 teams of 2 warps in float32)
    ln_atomic = sub(sub(ln_src, "        col_sums[0][threadIdx.x] = db[j];\n"
                                "        col_sums[1][threadIdx.x] = dw[j];\n",
                        "        if (team == 0) { col_sums[0][tt] = T(0); col_sums[1][tt] = T(0); }\n"
                        "        __syncthreads();\n"
                        "        atomicAdd(&col_sums[0][tt], db[j]);\n"
                        "        atomicAdd(&col_sums[1][tt], dw[j]);\n"),
                    "for (int t = 0; t < teams; ++t) {", "for (int t = 0; t < 1; ++t) {")
    gelu_src = build.kernels.kernel_source("gelu")
    mutants = [
        # the kernel's use of the PTX conventions, each broken once
        ("kernel: cvt.rn.bf16x2 operands swapped",
         dict(src=sub(att_src, '"f"(hi), "f"(lo)', '"f"(lo), "f"(hi)'), only=only32), bf16),
        # ldmatrix's lane -> row address: each fragment register's matrix misplaced once
        ("kernel: ldmatrix A fragment registers 1 and 2 swapped",
         dict(src=sub(att_src, "(row0 + (lane & 15)) * LD + col0 + (lane >> 4) * 8",
                      "(row0 + (lane & 7) + (lane >> 4) * 8) * LD + col0 + (lane & 8)"),
              only=only32), bf16),
        ("kernel: ldmatrix B fragment (rows) registers swapped",
         dict(src=sub(att_src, "* LD + k0 + (lane & 8));", "* LD + k0 + ((lane & 8) ^ 8));"),
              only=only32), bf16),
        ("kernel: ldmatrix B fragment (cols, .trans) registers swapped",
         dict(src=sub(att_src, "(k0 + (lane & 15)) * LD", "(k0 + ((lane & 15) ^ 8)) * LD"),
              only=only32), bf16),
        ("kernel: accumulator-to-A repack with c0/c1 tiles swapped",
         dict(src=sub(att_src, "a[0] = cllm_pack_bf16x2(c0[0], c0[1]);",
                      "a[0] = cllm_pack_bf16x2(c1[0], c1[1]);"), only=only32), bf16),
        # the emulator's layout, broken once: C/D rows g and g + 8 exchanged
        ("emulator: C/D fragment rows swapped",
         dict(ptx=sub(ptx, "row = i < 2 ? g : g + 8;", "row = i < 2 ? g + 8 : g;"),
              only=only32), bf16),
        # the distance bias: one lane-offset slip in the dkv kernel's j - i
        ("kernel: bf16 dkv distance without the lane's query offset",
         dict(src=sub(att_src, "(float)(c0 - i0 - 2 * t)", "(float)(c0 - i0)"), only=only32_bias),
         lambda: t_att._check_bf16(1, 65, 2, 32, bias="alibi")),
        # the forward's per-warp tile skip (128-query blocks) also skipping the diagonal tile
        ("kernel: bf16 forward warp skips the tile holding its diagonal",
         dict(src=sub(att_src, "        if (j0 > warp_last_row) continue;\n",
                      "        if (j0 + BC > warp_last_row + 1) continue;\n"), only=only32), bf16),
        # the base-2 softmax: the dkv kernel's P from the natural-log lse
        ("kernel: bf16 dkv lse not converted to log2 units",
         dict(src=sub(att_src, "lse[(long long)bh * T + i] * ATTN_LOG2E : 0.0f;",
                      "lse[(long long)bh * T + i] : 0.0f;"), only=only32), bf16),
        # the dropout's element index with query and key exchanged (every kernel)
        ("kernel: dropout element index (bh T + j) T + i",
         dict(src=sub(att_src, "(row0 + (unsigned)i) * (unsigned)d.T + (unsigned)j",
                      "(row0 + (unsigned)j) * (unsigned)d.T + (unsigned)i"), only=only32),
         lambda: t_att._check_dropout_pattern(67, 2, 32, "bf16")),
        # the fp32 kernels' keep bits not exchanged within the quad (each lane keeps its own)
        ("kernel: fp32 dropout bits not shared by the quad",
         dict(src=sub(att_src, "return b2 | __shfl_xor_sync(CLLM_FULL_MASK, b2, 2);",
                      "return b;"), only=only32), lambda: t_att._check_dropout(1, 67, 2, 32)),
        # cp.async double buffering (the bf16 kernels' K, V and Q, dO tiles), each rule broken
        ("kernel: bf16 forward cp.async wait_group 2 where tile n needs 1",
         dict(src=sub(att_src, "mma_cp_async_wait<1>();   // this thread's copies of tile n",
                      "mma_cp_async_wait<2>();   // this thread's copies of tile n"),
              only=only32), bf16),
        ("kernel: bf16 forward without the barrier after the cp.async wait",
         dict(src=sub(att_src, "        __syncthreads();          // and every thread's\n", ""),
              only=only32), bf16),
        ("kernel: bf16 dq prefetch into the buffer of the tile in use",
         dict(src=sub(att_src, "mma_stage_tile_async<D, BC>(Kbuf + ((n + 1) & 1) * BC * LD",
                      "mma_stage_tile_async<D, BC>(Kbuf + (n & 1) * BC * LD"), only=only32),
         bf16),
        ("kernel: bf16 dkv refills a Q, dO buffer without the barrier after its last read",
         dict(src=sub(att_src, "        __syncthreads();  // Q, dO tile n - 1 is no longer read: "
                               "its buffers take tile n + 1\n", ""), only=only32),
         lambda: t_att._check_bf16(1, 130, 2, 32)),
        ("kernel: fp32 forward without the tile-reuse __syncthreads",
         dict(src=sub(att_src, "        __syncthreads();  // the previous tile is no longer read\n"
                               "        att_load_tile<D, BC>(Ks",
                      "        att_load_tile<D, BC>(Ks"), only=only128),
         order_independent(attention_runs(1, 130, 1, 128, "fp32"), "fp32")),
        # the forward's bf16 copy of out (out_mm) with the two values of a 4-byte store swapped
        ("kernel: bf16 forward's out_mm pair stored in swapped halves",
         dict(src=sub(att_src, "cllm_float_to_bf16_bits(o[mt][nd][2 * half] * inv) |",
                      "cllm_float_to_bf16_bits(o[mt][nd][2 * half + 1] * inv) |"),
              only=[n for n in NAME_EXPRESSIONS["attention"]
                    if n.startswith("attention_forward_mma_kernel<64")]),
         lambda: t_att._check_out_mm(2, 200, 2, 64, "bf16", "lattice", True)),
        # the forward with a bf16 out alone (write_mm 2) still storing the float output, into
        # the pointer that only stands in for it
        ("kernel: bf16 forward stores the float output when only the bf16 one is asked for",
         dict(src=sub(att_src, "if (mm_on != 2) {", "if (true) {"),
              only=[n for n in NAME_EXPRESSIONS["attention"]
                    if n.startswith("attention_forward_mma_kernel<64")]),
         lambda: t_att._check_out_mm(2, 200, 2, 64, "bf16", "lattice", True)),
        # the backward's bf16 dqkv (dq, dkv, atomic-dq's dK dV) with a pair's halves swapped,
        # and atomic-dq's cast of its fp32 dQ sums with a pair's halves swapped
        ("kernel: bf16 backward's dqkv pair stored in swapped halves",
         dict(src=sub(att_src, "= cllm_pack_bf16x2(lo, hi);", "= cllm_pack_bf16x2(hi, lo);"),
              only=only64_dqkv), lambda: t_att._check_dqkv_bf16(1, 65, 1, 64, "two-pass")),
        ("kernel: atomic-dq's bf16 dQ cast stores a pair in swapped halves",
         dict(src=sub(att_src, "cllm_pack_bf16x2(dq[2 * i], dq[2 * i + 1])",
                      "cllm_pack_bf16x2(dq[2 * i + 1], dq[2 * i])"), only=only64_dqkv),
         lambda: t_att._check_dqkv_bf16(1, 65, 1, 64, "atomic-dq")),
        ("kernel: LayerNorm backward teams' column sums by atomicAdd in arrival order",
         dict(stem="layernorm", src=ln_atomic),
         order_independent(lambda: t_ln.backward_outputs(130, 300, F32), "layernorm backward")),
        # the bf16 weight copy written from the parameter as loaded, before the update
        ("kernel: AdamW writes the bf16 copy of the parameter before its update",
         dict(stem="adamw", src=sub(sub(adamw_src, bf16_store, ""), "        T p = params[i];\n",
                                    "        T p = params[i];\n" + bf16_store)),
         lambda: t_adamw.test_adamw_writes_the_bf16_copy(5003, True)),
        # the GELU backward's gradient taken at c_fc's bare product, without the bias the
        # forward added (the pre-activation is recomputed, not stored)
        ("kernel: GELU backward leaves out the bias",
         dict(stem="gelu", src=sub(gelu_src, "has_bias ? bias[t.c] : T(0)", "T(0)")),
         lambda: t_gelu.test_gelu_backward_with_bias_gradient((37, 31), "bf16")),
        # the column sums' finalize (common.cuh) stopping after its lanes' first pass over the
        # chunks: only past 32 chunks (N > 2048) does a lane have a second
        ("kernel: column-sum finalize adds only the first 32 chunks",
         dict(stem="gelu", src=sub(gelu_src, "k < chunks; k += CLLM_FINALIZE_LANES",
                                   "k < chunks && k < CLLM_FINALIZE_LANES; "
                                   "k += CLLM_FINALIZE_LANES")),
         lambda: t_gelu.test_gelu_backward_with_bias_gradient((2049, 8), "float32")),
    ]
    checks = []
    for name, override, fn in mutants:
        def check(override=override, fn=fn, name=name):
            over = dict(override)
            stem = over.pop("stem", "attention")
            fake_cupy.OVERRIDE[stem] = over
            fake_cupy._libs.pop(stem, None)
            try:
                fn()
            except (AssertionError, RuntimeError) as e:
                print(f"  caught: {str(e).splitlines()[0][:160]}")
                return
            finally:
                fake_cupy.OVERRIDE.pop(stem, None)
                fake_cupy._libs.pop(stem, None)
            raise AssertionError(f"mutant not caught: {name}")
        checks.append((f"mutant caught: {name}", check))
    return checks


# ---------------------------------------------------------------- sanitizer: planted bugs
# Each planted bug must be caught with the named reason; its correct twin must pass. The real
# kernels' mutants below were not caught by the emulator before it checked memory accesses,
# call sites and launch limits (docs/emulator.md lists which check catches what).
PLANTED_SRC = (Path(__file__).parent / "planted.cu").read_text()
PLANTED_NAMES = sorted(build.signatures(PLANTED_SRC))


class Skip(Exception):
    """A check that cannot run here (it needs NVRTC's register counts)."""


def planted(name, ptx=None):
    """The emulated kernel `name` of planted.cu (with a mutated emu_ptx.cpp, if given)."""
    over = dict(src=PLANTED_SRC, names=PLANTED_NAMES)
    if ptx is not None:
        over["ptx"] = ptx
    if fake_cupy.OVERRIDE.get("planted") != over:
        fake_cupy.OVERRIDE["planted"] = over
        fake_cupy._libs.pop("planted", None)
    return fake_cupy.EmuKernel("planted", name)


def _caught(name, fn, expect):
    """fn() must fail, with `expect` in the first line of the message."""
    def check():
        try:
            fn()
        except (fake_cupy.LaunchError, AssertionError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            assert expect in msg, f"failed, but not with {expect!r}: {msg}"
            print(f"  caught: {msg[:240]}")
            return
        raise AssertionError(f"not caught: {name}")
    return (f"caught: {name}", check)


def _with_override(stem, fn, **over):
    """Run fn() on a variant build of kernels_cu/<stem>.cu (src=..., header=..., only=...)."""
    def run():
        fake_cupy.OVERRIDE[stem] = over
        fake_cupy._libs.pop(stem, None)
        try:
            fn()
        finally:
            fake_cupy.OVERRIDE.pop(stem, None)
            fake_cupy._libs.pop(stem, None)
    return run


def _sub(text, old, new):
    assert text.count(old) == 1, f"mutation anchor not found once: {old!r}"
    return text.replace(old, new)


def _dev(a):
    return cp.asarray(np.ascontiguousarray(a))


def _warp_sum_run(planted_flag):
    x = np.random.default_rng(1).normal(size=128).astype(F32)
    out = cp.zeros(128, F32)
    planted("divergent_shfl_kernel")((2,), (64,), (_dev(x), out, np.int32(planted_flag)))
    want = np.repeat(x.reshape(4, 32).astype(F64).sum(1), 32)
    np.testing.assert_allclose(cp.asnumpy(out), want, rtol=1e-5, atol=1e-5)


def _ballot_run(planted_flag):
    x = np.random.default_rng(2).normal(size=64).astype(F32)
    out = cp.zeros(64, np.uint32)
    planted("divergent_ballot_kernel")((1,), (64,), (_dev(x), out, np.int32(planted_flag)))
    bits = (x > 0.5).reshape(2, 32)
    want = np.repeat([sum(1 << l for l in range(32) if w[l]) for w in bits], 32)
    np.testing.assert_array_equal(cp.asnumpy(out), want)


def _mma_run(kernel, planted_flag=None, ptx=None):
    """ptx_isa.check_mma on the emulated mma (through planted.cu's kernel)."""
    from cuda_emulator import ptx_isa

    def run(a, b, c):
        d = cp.zeros((32, 4), F32)
        args = (_dev(a), _dev(b)) + ((_dev(c),) if planted_flag is None else ()) + (d,)
        if planted_flag is not None:
            args += (np.int32(planted_flag),)
        planted(kernel, ptx)((1,), (32,), args)
        d = cp.asnumpy(d)
        if planted_flag is not None:  # the divergent kernel has c = 0
            d = d + c
        return d
    bad = ptx_isa.check_mma(run)
    assert not bad, f"mma disagrees with the PTX ISA in {len(bad)} of 128 elements: {bad[0]}"


def _ldmatrix_probe(ptx=None):
    """ptx_isa.check_ldmatrix on the emulated ldmatrix (every shape, both layouts)."""
    from cuda_emulator import ptx_isa

    def run(rows, offs, num, trans):
        out = cp.zeros((32, 4), np.uint32)
        mode = 3 * int(trans) + {1: 0, 2: 1, 4: 2}[num]
        planted("ldmatrix_probe_kernel", ptx)((1,), (32,), (_dev(rows), _dev(offs), out,
                                                              np.int32(mode)))
        return cp.asnumpy(out)
    bad = ptx_isa.check_ldmatrix(run)
    assert not bad, f"ldmatrix disagrees with the PTX ISA in {len(bad)} registers: {bad[0]}"


def _bf16(M):
    """The bf16 bits of M (whose values are exact in bf16)."""
    return (np.ascontiguousarray(M, F32).view(np.uint32) >> 16).astype(np.uint16)


def _ldmatrix_probe_args(mode):
    return (cp.zeros(512, np.uint16), cp.zeros(32, np.int32), cp.zeros(128, np.uint32),
            np.int32(mode))


def _ldmatrix_mma_run(planted_flag):
    """A and B loaded with ldmatrix .x4 / .x2.trans must be exactly the mma fragments the
    PTX ISA's formulas give (ptx_isa.fragments), and D = A B."""
    from cuda_emulator import ptx_isa
    rng = np.random.default_rng(8)
    A = rng.integers(-8, 9, size=(16, 16)).astype(F32)
    B = rng.integers(-8, 9, size=(16, 8)).astype(F32)
    A[0, :] += 17.0
    a, b, _ = ptx_isa.fragments(A, B, np.zeros((16, 8), F32))
    frag = cp.zeros((32, 6), np.uint32)
    d = cp.zeros((32, 4), F32)
    planted("ldmatrix_mma_kernel")((1,), (32,), (_dev(_bf16(A)), _dev(_bf16(B)), frag, d,
                                                 np.int32(planted_flag)))
    got = cp.asnumpy(frag)
    want = np.concatenate([a, b], axis=1)
    bad = np.argwhere(got != want)
    assert not len(bad), (f"ldmatrix fragments disagree with the PTX ISA's mma layout in "
                          f"{len(bad)} of 192 registers: lane {bad[0][0]} register {bad[0][1]}")
    D = A.astype(F64) @ B
    want_d = np.array([[D[ptx_isa.cd_position(l, i)] for i in range(4)] for l in range(32)])
    np.testing.assert_array_equal(cp.asnumpy(d), want_d)


def _divergent_ldmatrix_run(planted_flag):
    from cuda_emulator import ptx_isa
    rows = np.random.default_rng(9).permutation(1 << 16)[:256].astype(np.uint16).reshape(32, 8)
    out = cp.zeros((32, 4), np.uint32)
    planted("divergent_ldmatrix_kernel")((1,), (32,), (_dev(rows), out, np.int32(planted_flag)))
    np.testing.assert_array_equal(cp.asnumpy(out),
                                  ptx_isa.ldmatrix_expected(rows, range(32), 4, False))


def _cp_async_run(planted_flag, tiles=3):
    x = np.random.default_rng(10).normal(size=(tiles, 64, 4)).astype(F32)
    out = cp.zeros(256, F32)
    planted("cp_async_tiles_kernel")((1,), (64,), (_dev(x), out, np.int32(tiles),
                                                   np.int32(planted_flag)))
    src = np.where((np.arange(64) > 0) & (np.arange(64) < 63), np.arange(64) - 1, np.arange(64))
    np.testing.assert_allclose(cp.asnumpy(out), x[:, src].sum(0).reshape(-1), rtol=1e-6)


def _cp_async_forms_run(planted_flag):
    x = np.random.default_rng(11).normal(size=128).astype(F32)
    out = cp.zeros(256, F32)
    planted("cp_async_forms_kernel")((1,), (32,), (_dev(x), out, np.int32(planted_flag)))
    n = np.arange(32)
    want = np.stack([x[n], x[2 * n], np.zeros(32, F32), x[4 * n], x[4 * n + 1], x[4 * n + 2],
                     x[4 * n + 3], x[n]], axis=1)
    np.testing.assert_array_equal(cp.asnumpy(out).reshape(32, 8), want)


def _denormal_probe():
    """-ftz=true (CuPy's option): a float product with a denormal operand or a denormal result
    is a zero of the product's sign; double products of the same values are kept; the
    caller's denormals are back after the launch."""
    tiny, small = 1e-40, 1e-20  # a float denormal; small * small is one
    a = np.array([tiny, -tiny, small, -small, tiny, 3.0] + [1.0] * 26, F32)
    b = np.array([1.0, 1.0, small, small, -1.0, 2.0] + [1.0] * 26, F32)
    p, pd = cp.zeros(32, F32), cp.zeros(32, F64)
    planted("denormal_probe_kernel")((1,), (32,), (_dev(a), _dev(b), p, _dev(a.astype(F64)),
                                                  _dev(b.astype(F64)), pd))
    p, pd = cp.asnumpy(p), cp.asnumpy(pd)
    want = a * b
    assert (want[:5] != 0).all(), "the host flushes denormals"
    assert (p[:5] == 0).all() and (np.signbit(p[:5]) == np.signbit(want[:5])).all(), p[:5]
    np.testing.assert_array_equal(p[5:], want[5:])
    np.testing.assert_array_equal(pd, a.astype(F64) * b.astype(F64))


def _shared_exchange_run(planted_flag):
    x = np.random.default_rng(3).normal(size=128).astype(F32)
    out = cp.zeros(128, F32)
    planted("warp_shared_exchange_kernel")((2,), (64,), (_dev(x), out, np.int32(planted_flag)))
    s = np.repeat(x.reshape(4, 32).astype(F64).sum(1), 32)
    np.testing.assert_allclose(cp.asnumpy(out), x[np.arange(128) ^ 1] + s, rtol=1e-5, atol=1e-5)


def _histogram_run(planted_flag):
    n = 300
    bins = np.random.default_rng(4).integers(0, 5, n).astype(np.int32)
    counts = cp.zeros(5, np.int32)
    planted("histogram_kernel")((5,), (64,), (_dev(bins), counts, np.int32(n),
                                              np.int32(planted_flag)))
    np.testing.assert_array_equal(cp.asnumpy(counts), np.bincount(bins, minlength=5))


def _read_then_atomic_run(planted_flag):
    x = np.random.default_rng(6).integers(-9, 10, 3 * 64).astype(np.int32)
    out = cp.zeros(6, np.int32)
    planted("read_then_atomic_kernel")((3,), (64,), (_dev(x), out, np.int32(planted_flag)))
    want = np.stack([np.zeros(3, np.int64), x.reshape(3, 64).sum(1)], 1).ravel()
    np.testing.assert_array_equal(cp.asnumpy(out), want)


def _total_read_while_added_run(planted_flag):
    x = np.random.default_rng(7).integers(-9, 10, 4 * 64).astype(np.int32)
    total, seen = cp.zeros(1, np.int32), cp.zeros(1, np.int32)
    planted("total_read_while_added_kernel")((4,), (64,), (_dev(x), total, seen,
                                                           np.int32(planted_flag)))
    assert int(cp.asnumpy(total)[0]) == int(x.sum()) and int(cp.asnumpy(seen)[0]) == 0


def _atomic_sum_runs():
    x = np.random.default_rng(5).normal(size=640).astype(F32) * 1e3
    total = cp.zeros(1, F32)
    planted("atomic_float_sum_kernel")((10,), (64,), (_dev(x), total, np.int32(640)))
    return [cp.asnumpy(total)]


def _launch(kernel, grid, block, args, **kw):
    return lambda: planted(kernel)(grid, block, args, **kw)


def _register_hungry(threads):
    def run():
        k = planted("register_hungry_kernel")
        if k.registers is None:
            raise Skip("NVRTC unavailable: no sm_90 register counts")
        n = threads
        x = cp.ones(96 * n, F32)
        k((1,), (threads,), (x, cp.zeros(96 * n, F32), np.int32(n)))
    return run


def _dynamic_shared(nbytes, attribute=None):
    def run():
        k = planted("dynamic_shared_kernel")
        if attribute is not None:
            k.max_dynamic_shared_size_bytes = attribute
        n = nbytes // 4
        x = np.arange(n, dtype=F32)
        out = cp.zeros(n, F32)
        k((1,), (128,), (_dev(x), out, np.int32(n)), shared_mem=nbytes)
        np.testing.assert_array_equal(cp.asnumpy(out), x[::-1])
    return run


def _gather_run(planted_flag, ids):
    rows, cols = 6, 32
    table = np.random.default_rng(6).normal(size=(rows, cols)).astype(F32)
    ids = np.asarray(ids, np.int32)
    out = cp.zeros((len(ids), cols), F32)
    planted("gather_rows_kernel")((len(ids),), (32,), (_dev(ids), _dev(table), out,
                                                       np.int32(rows), np.int32(cols),
                                                       np.int32(planted_flag)))
    o = cp.asnumpy(out)
    for r, i in enumerate(ids):
        if 0 <= i < rows:
            np.testing.assert_array_equal(o[r], table[i])
        else:
            assert np.isnan(o[r]).all()


def _scatter_run(planted_flag, ids):
    rows, cols = 6, 32
    ids = np.asarray(ids, np.int32)
    src = np.random.default_rng(7).normal(size=(len(ids), cols)).astype(F32)
    out = cp.zeros((rows, cols), F32)
    planted("scatter_rows_kernel")((len(ids),), (32,), (_dev(ids), _dev(src), out, np.int32(rows),
                                                        np.int32(cols), np.int32(planted_flag)))
    want = np.zeros((rows, cols), F32)
    for r, i in enumerate(ids):
        if 0 <= i < rows:
            want[i] = src[r]
    np.testing.assert_array_equal(cp.asnumpy(out), want)


def _oversized_block(name, threads):
    """A launcher that asks for `threads` threads per block for `name` (the rest unchanged)."""
    from cllm_gpu.ops import _cuda

    def patch():
        orig = _cuda.kernel

        def kernel(stem, n):
            k = orig(stem, n)
            if n != name:
                return k
            return lambda grid, block, args, **kw: k(grid, (threads,), args, **kw)
        _cuda.kernel = kernel
        return lambda: setattr(_cuda, "kernel", orig)
    return patch


def _patched(patch, fn):
    def run():
        undo = patch()
        try:
            fn()
        finally:
            undo()
    return run


def _sanitizer():
    att = build.kernels.kernel_source("attention")
    emb = build.kernels.kernel_source("embedding")
    ptx = (Path(build.__file__).parent / "emu_ptx.cpp").read_text()
    only32 = [n for n in NAME_EXPRESSIONS["attention"] if n.endswith("<32>")]
    only128 = [n for n in NAME_EXPRESSIONS["attention"] if n.endswith("<128>")]
    # the real kernels, each broken once
    quad_under_mask = _sub(_sub(att, "                part = quad_sum(part);\n", ""),
                           "(j <= i && j < T) ? bias.score(part, ",
                           "(j <= i && j < T) ? bias.score(quad_sum(part), ")
    reuse_sync = "        __syncthreads();  // the previous tile is no longer read\n"
    # (the bf16 forward's K, V buffer refilled by cp.async while the tile in it is read)
    mma_without_reuse_sync = _sub(att, "        __syncthreads();  // K, V tile n - 1 is no longer "
                                       "read: its buffers take tile n + 1\n", "")
    fp32_without_reuse_sync = _sub(att, reuse_sync + "        att_load_tile<D, BC>(Ks",
                                   "        att_load_tile<D, BC>(Ks")
    grid_stride = "for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; "
    wpe_racy = _sub(emb, grid_stride + "e < total; e += stride) {\n"
                         "        T acc = T(0);\n"
                         "        for (int b = 0; b < B; ++b) "
                         "acc += dout[(long long)b * total + e];\n"
                         "        dwpe[e] += acc;\n    }",
                    grid_stride + "e < B * total; e += stride)\n"
                                  "        dwpe[e % total] += dout[e];")
    # the kernel's query tile changed without the launcher's bytes (_mma_smem_bytes)
    dkv_70k = _sub(att, "DKV_BQ = D <= 64 ? 64 : (D <= 96 ? 32 : 16);",
                   "DKV_BQ = D <= 64 ? 64 : 32;")
    embedding_id_le_v = _sub(emb, "if (id >= 0 && id < V) {", "if (id >= 0 && id <= V) {")
    # the atomic-dq backward's dQ added with a plain += (key blocks meet on the same rows), and
    # its dS tile read without the barrier after the warps' stores
    dq_plain_add = _sub(_sub(att, "atomicAdd(dst + n * 8, acc[n][2 * half] * scale);",
                             "dst[n * 8] += acc[n][2 * half] * scale;"),
                        "atomicAdd(dst + n * 8 + 1, acc[n][2 * half + 1] * scale);",
                        "dst[n * 8 + 1] += acc[n][2 * half + 1] * scale;")
    ds_without_sync = _sub(att, "            __syncthreads();  // every meeting warp's dS rows "
                                "are in dSs\n", "")
    atomic_dq = lambda: t_att._check_bf16(1, 130, 1, 32, backward="atomic-dq")  # noqa: E731
    ln = build.kernels.kernel_source("layernorm")
    assert ln.count("row_sums[it & 1]") == 4
    ln_one_buffer = ln.replace("row_sums[it & 1]", "row_sums[0]")  # next row overwrites them
    c = []
    # 1. warp collectives meet by call site, with every lane
    c += [("passes: warp sum from one call site", lambda: _warp_sum_run(0)),
          _caught("shuffles from two call sites (lane-dependent branch)",
                  lambda: _warp_sum_run(1), "divergent warp collective"),
          ("passes: ballot from one call site", lambda: _ballot_run(0)),
          _caught("ballot from two call sites", lambda: _ballot_run(1),
                  "divergent warp collective"),
          ("passes: mma from one call site", lambda: _mma_run("divergent_mma_kernel", 0)),
          _caught("mma.sync.aligned from two call sites",
                  lambda: _mma_run("divergent_mma_kernel", 1), "divergent warp collective"),
          # the row's quad sum moved under the per-row causal mask: lanes of rows with fewer
          # keys skip it, the others still meet
          _caught("kernel: fp32 forward reduces scores only under the causal mask",
                  _with_override("attention", lambda: t_att._check(1, 17, 2, 32),
                                 src=quad_under_mask, only=only32), "divergent warp collective")]
    # 2. shared memory is ordered by barriers only (shuffles and mma order nothing)
    c += [("passes: lanes exchange through shared memory after __syncwarp",
           lambda: _shared_exchange_run(0)),
          _caught("lanes exchange through shared memory with only shuffles between",
                  lambda: _shared_exchange_run(1), "shared memory race (read after write)"),
          _caught("kernel: bf16 mma forward without the tile-reuse __syncthreads",
                  _with_override("attention", lambda: t_att._check_bf16(1, 130, 1, 32),
                                 src=mma_without_reuse_sync, only=only32),
                  "shared memory race (write after read)"),
          _caught("kernel: fp32 forward without the tile-reuse __syncthreads",
                  _with_override("attention", lambda: t_att._check(1, 130, 1, 128),
                                 src=fp32_without_reuse_sync, only=only128),
                  "shared memory race (write after read)"),
          # one __syncthreads per row is enough only with the row sums double-buffered
          _caught("kernel: LayerNorm backward row sums in one buffer, not by row parity",
                  _with_override("layernorm",
                                 lambda: t_ln.test_layernorm_backward_dx_may_alias_its_inputs(
                                     F32, 17, 300),
                                 src=ln_one_buffer), "shared memory race (write after read)")]
    # 3. blocks share no output without atomics; results do not depend on the block order
    c += [("passes: histogram with atomicAdd", lambda: _histogram_run(0)),
          _caught("histogram without atomicAdd (lost updates)", lambda: _histogram_run(1),
                  "global memory race"),
          # a plain read and an atomicAdd of one granule, unordered (the read first: before
          # the read was checked against later atomics, the ascending order missed it)
          ("passes: count read before a __syncthreads, then atomicAdds",
           lambda: _read_then_atomic_run(0)),
          _caught("count read by one thread while the block's threads atomicAdd to it",
                  lambda: _read_then_atomic_run(1), "shared memory race (write after read)"),
          ("passes: blocks atomicAdd to a total nobody reads", lambda: _total_read_while_added_run(0)),
          _caught("total read by block 0 while the blocks atomicAdd to it",
                  lambda: _total_read_while_added_run(1), "global memory race (write after read)"),
          _caught("float atomicAdd total depends on the block order",
                  order_independent(_atomic_sum_runs, "atomic float sum"), "block order"),
          _caught("kernel: wpe gradient parallel over the batch with += (no atomic)",
                  _with_override("embedding",
                                 lambda: t_emb.test_embedding_matches_reference(F32, 4, 17, 7, 33),
                                 src=wpe_racy), "global memory race"),
          _caught("kernel: bf16 atomic-dq backward adds dQ with += (no atomic)",
                  _with_override("attention", atomic_dq, src=dq_plain_add, only=only32),
                  "global memory race"),
          _caught("kernel: bf16 atomic-dq backward reads dS without the barrier after its "
                  "stores",
                  _with_override("attention", atomic_dq, src=ds_without_sync, only=only32),
                  "shared memory race")]
    # 4. launch limits
    c += [("passes: 64 threads within __launch_bounds__(64)",
           _launch("bounded_kernel", (2,), (64,), (cp.ones(128, F32), cp.zeros(128, F32)))),
          _caught("128 threads for __launch_bounds__(64)",
                  _launch("bounded_kernel", (1,), (128,), (cp.ones(128, F32), cp.zeros(128, F32))),
                  "exceed its __launch_bounds__(64)"),
          _caught("launcher: bf16 attention forward with 512 threads per block",
                  _patched(_oversized_block("attention_forward_mma_kernel<32>", 512),
                           lambda: t_att._check_bf16(1, 65, 2, 32)),
                  "exceed its __launch_bounds__(256)"),
          ("passes: register-hungry kernel, 256 threads", _register_hungry(256)),
          _caught("register-hungry kernel without launch bounds, 1024 threads",
                  _register_hungry(1024), "too many resources requested"),
          ("passes: 16 KB dynamic shared memory", _dynamic_shared(16 * 1024)),
          _caught("64 KB dynamic shared memory without the opt-in",
                  _dynamic_shared(64 * 1024), "without the opt-in"),
          ("passes: 64 KB dynamic shared memory with max_dynamic_shared_size_bytes",
           _dynamic_shared(64 * 1024, 64 * 1024)),
          _caught("max_dynamic_shared_size_bytes beyond the device",
                  _dynamic_shared(1024, 240 * 1024), "more than the"),
          _caught("kernel: bf16 dkv with a 32-query tile at D = 128 (70 KB) launched with the "
                  "16-query tile's 51 KB of dynamic shared memory",
                  _with_override("attention", lambda: t_att._check_bf16(1, 65, 1, 128),
                                 src=dkv_70k, only=only128), "past the end of `mma_smem`"),
          _caught("grid y = 65536 (batch * heads over the limit)",
                  lambda: fake_cupy.EmuKernel("attention", "attention_forward_kernel<8>")(
                      (1, 65536), (128,), (cp.zeros(1, F32), cp.zeros(1, F32), cp.zeros(1, F32),
                                           np.int32(1), np.int32(65536), np.float32(1),
                                           cp.zeros(1, F32), np.uint32(0), cp.zeros(1, F64),
                                           np.uint32(0), np.uint32(0), np.uint32(0),
                                           np.float32(1))),
                  "grid y = 65536 exceeds the limit 65535")]
    # 5. every access inside an argument array
    c += [("passes: gather checks ids against the row count",
           lambda: _gather_run(0, [0, 5, 6, 100, -40])),
          _caught("gather checks ids against the element count: reads 94 rows past the table",
                  # (only the table is read through ids; which allocation the emulator names
                  # beside the address depends on the heap layout, `out` is often next)
                  lambda: _gather_run(1, [0, 5, 100]), "gather_rows_kernel: out-of-bounds read"),
          ("passes: scatter checks its ids", lambda: _scatter_run(0, [3, 1, 6, 5000, -1])),
          _caught("scatter trusts its ids: writes 5000 rows past the output",
                  lambda: _scatter_run(1, [3, 5000]), "out-of-bounds write"),
          _caught("scatter trusts its ids: writes one row before the output",
                  lambda: _scatter_run(1, [3, -1]), "before the start of `out`"),
          # the id bound off by one: id == V reads the row after the table, which the guard
          # band (NaN) hid before, since an invalid id's output is NaN anyway
          _caught("kernel: embedding forward accepts id == V",
                  _with_override("embedding",
                                 t_emb.test_embedding_out_of_range_id_gives_nan_not_a_crash,
                                 src=embedding_id_le_v),
                  "past the end of `wte`")]
    # 7. the mma instruction against the PTX ISA's fragment formulas (ptx_isa.py)
    a_layout = "    const int g = lane >> 2, t = lane & 3;\n    row = (i == 0"
    swap_a12 = _sub(ptx, a_layout, "    { const int r = i >> 1; "
                                   "i = (r == 1 ? 2 : r == 2 ? 1 : r) * 2 + (i & 1); }\n"
                                   + a_layout)
    kernel_a12 = _sub(att, '"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3])',
                      '"r"(a[0]), "r"(a[2]), "r"(a[1]), "r"(a[3])')
    c += [("passes: emulated mma matches the PTX ISA for every lane and register",
           lambda: _mma_run("mma_probe_kernel")),
          # a layout error made in the same way by the emulator and by a kernel: the kernel's
          # checks pass (first line), only the ISA check can see it
          ("passes: kernel and emulator both exchanging A registers 1 and 2 agree",
           _with_override("attention", lambda: t_att._check_bf16(1, 65, 2, 32),
                          src=kernel_a12, ptx=swap_a12, only=only32)),
          _caught("emulator: A registers 1 and 2 exchanged (consistently with a kernel)",
                  lambda: _mma_run("mma_probe_kernel", ptx=swap_a12),
                  "disagrees with the PTX ISA"),
          _caught("emulator: B registers exchanged",
                  lambda: _mma_run("mma_probe_kernel", ptx=_sub(
                      ptx, "row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);",
                      "row = t * 2 + (i & 1) + (i >= 2 ? 0 : 8);")), "disagrees with the PTX ISA"),
          _caught("emulator: C/D rows exchanged",
                  lambda: _mma_run("mma_probe_kernel", ptx=_sub(
                      ptx, "row = i < 2 ? g : g + 8;", "row = i < 2 ? g + 8 : g;")),
                  "disagrees with the PTX ISA"),
          _caught("emulator: bf16 halves of a register exchanged",
                  lambda: _mma_run("mma_probe_kernel", ptx=_sub(
                      ptx, "A[row][col] = bf16_to_float((uint16_t)(i & 1 ? reg >> 16 : "
                           "reg & 0xffffu));",
                      "A[row][col] = bf16_to_float((uint16_t)(i & 1 ? reg & 0xffffu : "
                      "reg >> 16));")),
                  "disagrees with the PTX ISA")]
    # 8. ldmatrix against the PTX ISA; an mma operand loaded with it; call sites
    ld_rows = "memcpy(&e0, rows[8 * m + g] + 2 * (2 * t), 2);"
    c += [("passes: emulated ldmatrix matches the PTX ISA (x1, x2, x4, .trans)", _ldmatrix_probe),
          _caught("emulator: ldmatrix rows taken from lane % 8 instead of lane / 4",
                  lambda: _ldmatrix_probe(ptx=_sub(ptx, ld_rows, ld_rows.replace(
                      "[8 * m + g]", "[8 * m + (l & 7)]"))), "ldmatrix disagrees with the PTX ISA"),
          _caught("ldmatrix row addresses 8 bytes off the 16-byte alignment",
                  _launch("ldmatrix_probe_kernel", (1,), (32,), _ldmatrix_probe_args(6)),
                  "not 16-byte aligned"),
          _caught("ldmatrix on a global array's address",
                  _launch("ldmatrix_probe_kernel", (1,), (32,), _ldmatrix_probe_args(7)),
                  "not a shared-memory address"),
          ("passes: mma operands loaded with ldmatrix .x4 and .x2.trans",
           lambda: _ldmatrix_mma_run(0)),
          _caught("kernel: ldmatrix .x4 row addresses with A's matrix order exchanged",
                  lambda: _ldmatrix_mma_run(1), "disagree with the PTX ISA's mma layout"),
          ("passes: ldmatrix reached by the whole warp", lambda: _divergent_ldmatrix_run(0)),
          _caught("ldmatrix reached by half the warp", lambda: _divergent_ldmatrix_run(1),
                  "divergent warp collective")]
    # 9. cp.async: the destination is not there before the wait (and, for other threads, the
    # __syncthreads after it)
    c += [("passes: double-buffered cp.async tiles, wait_group 1 then __syncthreads",
           lambda: _cp_async_run(0)),
          _caught("cp.async tiles read without cp.async.wait_group", lambda: _cp_async_run(1),
                  "read of a pending cp.async destination"),
          _caught("cp.async tiles with wait_group 2 (the tile read is still in flight)",
                  lambda: _cp_async_run(2), "read of a pending cp.async destination"),
          _caught("cp.async tiles with the __syncthreads before the wait, not after",
                  lambda: _cp_async_run(3), "shared memory race (read after write)"),
          ("passes: cp.async.ca 4 and 8 bytes (src-size 4: zero fill), .cg 16, wait_all",
           lambda: _cp_async_forms_run(0)),
          _caught("cp.async source rewritten before the wait", lambda: _cp_async_forms_run(1),
                  "changed before the wait"),
          _caught("second cp.async into a pending destination", lambda: _cp_async_forms_run(2),
                  "write to a pending cp.async destination"),
          ("float denormals flushed to signed zero as -ftz=true does, doubles kept",
           _denormal_probe)]
    return c


# ---------------------------------------------------------------- edges: where indexing changes
# Run once, in CI's slow-marked test. Where a full run would take minutes on two cores, the
# emulator runs the blocks where the indexing is extreme (ONLY_BLOCKS) and the check compares
# the rows those blocks own: everything else those blocks read comes from references.
def _only(subset):
    """ONLY_BLOCKS from {kernel name (without template arguments): linear block indices}."""
    return lambda name, grid: subset.get(name.split("<")[0])


def _with_blocks(subset, fn):
    fake_cupy.ONLY_BLOCKS = _only(subset)
    try:
        return fn()
    finally:
        fake_cupy.ONLY_BLOCKS = None


def _att_fp32_t1024(D):
    """fp32 attention at T = 1024: the first and last query tiles of the forward and dq
    kernels (the last one sees all 1024 keys), the last key tile of the dkv kernel (its loop
    ends at T); dq and dkv read out and lse from the float64 reference."""
    def check():
        B, T, H = 1, 1024, 1
        qkv, dout = t_att._inputs(B, T, H, D, F32)
        q64, d64 = qkv.astype(F64), dout.astype(F64)
        o_ref, lse_ref = attention_forward_ref(q64, H)
        dqkv_ref = attention_backward_ref(d64, q64, o_ref, lse_ref, H)
        gx = T // 32  # ATT_ROWS rows per block; grid x runs the last query tile first
        subset = {"attention_forward_kernel": [0, gx - 1],
                  "attention_backward_dq_kernel": [0, gx - 1],
                  "attention_backward_dkv_kernel": [gx - 1]}
        Q, G = cp.asarray(qkv), cp.asarray(dout)
        out, lse = _with_blocks(subset, lambda: attention_forward(Q, H))
        dqkv = _with_blocks(subset, lambda: attention_backward(
            G, Q, cp.asarray(o_ref.astype(F32)), cp.asarray(lse_ref.astype(F32)), H))
        rows, last = np.r_[0:32, T - 32:T], np.r_[T - 32:T]
        C = H * D
        rt, fl = t_att.RTOL, t_att.FLOOR
        t_att.assert_close(cp.asnumpy(out)[:, rows], o_ref[:, rows], rt, fl, "out")
        t_att.assert_close(cp.asnumpy(lse)[..., rows], lse_ref[..., rows], rt, fl, "lse")
        g = cp.asnumpy(dqkv)
        t_att.assert_close(g[:, rows, :C], dqkv_ref[:, rows, :C], rt, fl, "dq")
        t_att.assert_close(g[:, last, C:], dqkv_ref[:, last, C:], rt, fl, "dk, dv")
    return check


def _att_grid_limit(D, precision):
    """B * H = 65535 heads (grid y at its limit), T = 2: the first and the last head."""
    def check():
        B, T, H = 13107, 2, 5
        qkv, dout = t_att._inputs(B, T, H, D, F32)
        kind = "_mma_kernel" if precision == "bf16" else "_kernel"
        subset = {f"attention_{k}{kind}": [0, B * H - 1] for k in ("forward", "backward_dq",
                                                                   "backward_dkv")}
        Q, G = cp.asarray(qkv), cp.asarray(dout)
        out, lse = _with_blocks(subset, lambda: attention_forward(Q, H, precision=precision))
        dqkv = _with_blocks(subset, lambda: attention_backward(G, Q, out, lse, H,
                                                               precision=precision))
        o, l, g = cp.asnumpy(out), cp.asnumpy(lse), cp.asnumpy(dqkv)
        C = H * D
        for b, h in ((0, 0), (B - 1, H - 1)):
            cols = np.r_[h * D:(h + 1) * D]
            q1 = np.concatenate([qkv[b:b + 1, :, k * C + cols] for k in range(3)], -1)
            d1 = dout[b:b + 1, :, cols]
            if precision == "bf16":
                o_r, l_r = attention_forward_ref(q1, 1, precision="bf16")
                g_r = attention_backward_ref(d1, q1, o[b:b + 1, :, cols], l[b:b + 1, h:h + 1],
                                             1, precision="bf16")
                rt, fl = 1e-3, 1e-3
            else:
                o_r, l_r = attention_forward_ref(q1.astype(F64), 1)
                g_r = attention_backward_ref(d1.astype(F64), q1.astype(F64), o_r, l_r, 1)
                rt, fl = t_att.RTOL, t_att.FLOOR
            t_att.assert_close(o[b:b + 1, :, cols], o_r, rt, fl, f"out head ({b}, {h})")
            t_att.assert_close(l[b:b + 1, h:h + 1], l_r, rt, fl, f"lse head ({b}, {h})")
            gh = np.concatenate([g[b:b + 1, :, k * C + cols] for k in range(3)], -1)
            t_att.assert_close(gh, g_r, rt, fl, f"dqkv head ({b}, {h})")
    return check


def _att_grid_over_limit():
    try:
        attention_forward(cp.zeros((16384, 1, 3 * 4 * 8), F32), 4)  # B * H = 65536
    except ValueError as e:
        assert "65535" in str(e), e
        return
    raise AssertionError("B * H = 65536 was launched")


def _xent_rows_over_limit(need_grad):
    """2**31 rows: one block per row is past the grid's x limit (2**31 - 1). The launcher
    refuses them before it allocates anything (sparse arrays: nothing is touched; losses, and
    dlogits in place, given as the model gives them) and before any launch. Before, the
    launch itself failed (a LaunchError here, a CUDA driver error on a GPU)."""
    def check():
        N = 2**31
        try:
            L = fake_cupy.sparse_zeros((N, 1), F32)
            t = fake_cupy.sparse_zeros((N,), np.int32)
            losses = fake_cupy.sparse_zeros((N,), F32)
        except (OSError, ValueError) as e:  # no address space for 3 x 8 GB of virtual memory
            raise Skip(f"sparse arrays of {N} rows refused: {e}")
        launched = len(fake_cupy.launches)
        try:
            softmax_xent(L, t, 1.0, losses=losses, dlogits=L if need_grad else None,
                         need_grad=need_grad)
        except ValueError as e:
            assert str(e) == (f"logits: {N} rows exceed the CUDA grid limit of {2**31 - 1} "
                              f"(one block per row)"), e
            assert len(fake_cupy.launches) == launched, "launched before refusing"
            return
        raise AssertionError(f"{N} rows were launched")
    return check


XENT_V = 50304


def _xent_huge(src=None):
    """softmax_xent on N x 50304 logits with N * V > 2**31 (a sparse array: only the rows run
    are ever touched): the first row, the first row whose elements start past 2**31, and the
    last, against the float64 reference on those rows, in place as the model calls it."""
    def check():
        V = XENT_V
        N = 2**31 // V + 3
        rows = [0, -(-2**31 // V), N - 1]
        assert rows[1] * V >= 2**31 > (rows[1] - 1) * V
        try:
            L = fake_cupy.sparse_zeros((N, V), F32)
        except (OSError, ValueError) as e:  # no address space for 8.6 GB of virtual memory
            raise Skip(f"sparse {N} x {V} mapping refused: {e}")
        rng = np.random.default_rng(8)
        x = (rng.normal(size=(len(rows), V)) * 3).astype(F32)
        t = np.full(N, -1, np.int32)
        t[rows] = rng.integers(0, V, len(rows))
        for r, xr in zip(rows, x):
            L.view(np.ndarray)[r] = xr
        dloss = 1.0 / len(rows)
        l_ref, g_ref = softmax_xent_ref(x.astype(F64), t[rows], dloss)
        if src is not None:
            fake_cupy.OVERRIDE["softmax_xent"] = dict(src=src)
            fake_cupy._libs.pop("softmax_xent", None)
        try:
            losses, _ = _with_blocks({"softmax_xent_kernel": rows},
                                     lambda: softmax_xent(L, cp.asarray(t), dloss, dlogits=L))
        finally:
            if src is not None:
                fake_cupy.OVERRIDE.pop("softmax_xent", None)
                fake_cupy._libs.pop("softmax_xent", None)
        rt, fl = t_xent.tol(F32)
        t_att.assert_close(cp.asnumpy(losses)[rows], l_ref, rt, fl, "losses")
        t_att.assert_close(L.view(np.ndarray)[rows], g_ref, rt * 5, fl, "dlogits")
    return check


def _classifier_chunks_huge():
    """CLLMModel.classifier at B * T * V > 2**31 (42 x 1024 positions, V = 50,304, fp32):
    the model's own row chunking (CLASSIFIER_CHUNK_BYTES) at that size. The softmax-xent kernel
    runs for real on the first and last row of every chunk; the three products of each chunk
    go through a stand-in that computes just those rows (products are checked by the gemm
    tests; here what is under test is the loop: offsets, chunk sizes, the in-place dlogits,
    and the accumulation into wte.grad). Checked: chunks tile [0, N) in order, every launch
    stays below 2**31 elements, and losses, dlnf and wte.grad of the rows run against float64."""
    def check():
        from cllm_gpu import model as model_mod
        import cllm_gpu.ops as ops_pkg
        B, T, V, C = 42, 1024, XENT_V, 8
        cfg = ModelConfig(vocab_size=V, block_size=T, n_layer=1, n_head=1, n_embd=C)
        m = CLLMModel(cfg, backend="cuda", dtype="float32", seed=0)
        N = B * T
        assert N * V > 2**31
        # a smaller chunk than the GPU's 2 GiB: the emulator's shadow memory takes 16 bytes
        # per byte (32 GiB for one 2 GiB logits chunk); the loop is the same at any budget
        budget = model_mod.CLASSIFIER_CHUNK_BYTES["cuda"]
        model_mod.CLASSIFIER_CHUNK_BYTES["cuda"] = 512 << 20
        rng = np.random.default_rng(9)
        lnf = rng.normal(size=(N, C)).astype(F32)
        tgt = rng.integers(0, V, N).astype(np.int32)
        tgt[::7] = -1  # some ignored positions
        try:
            m.set_batch(m.check_batch(np.zeros((B, T), np.int32), tgt.reshape(B, T)))
            c = m._cache(B, T)
        finally:
            model_mod.CLASSIFIER_CHUNK_BYTES["cuda"] = budget
        c.lnf.view(np.ndarray)[...] = lnf.reshape(c.lnf.shape)
        wte = m.params["transformer.wte.weight"].get().astype(F64)
        m.grads["transformer.wte.weight"][...] = 0
        R = c.classifier_rows
        chunks, dlnf_want = [], {}

        def gemm(a, b, out, trans_a=False, trans_b=False, accumulate=False):
            # the classifier's three products, on the chunk's first and last rows only
            A, Bm = a.view(np.ndarray), b.view(np.ndarray).astype(F64)
            o = out.view(np.ndarray)
            ends = [0, A.shape[0] - 1]  # rows of the chunk (dlogits or lnf rows)
            if trans_b:       # logits = lnf_rows @ wte^T: a new chunk starts
                r0 = (a.data.ptr - c.lnf.data.ptr) // (4 * C)
                chunks.append((r0, r0 + A.shape[0]))
                for i in ends:
                    o[i] = (A[i].astype(F64) @ Bm.T).astype(F32)
            elif not trans_a:  # dlnf rows = dlogits @ wte
                for i in ends:
                    o[i] = (A[i].astype(F64) @ Bm).astype(F32)
                    dlnf_want[chunks[-1][0] + i] = o[i].copy()
            else:              # wte.grad += dlogits^T @ lnf_rows
                assert accumulate
                for i in ends:
                    o += np.outer(A[i], Bm[i]).astype(F32)
            return out

        n_valid = int((tgt >= 0).sum())
        undo = _patch(ops_pkg, "gemm", gemm)
        fake_cupy.ONLY_BLOCKS = lambda name, grid: ([0, grid[0] - 1]
                                                    if name.startswith("softmax_xent") else None)
        start = len(fake_cupy.launches)
        try:
            m.classifier(B, T, dloss=1.0 / n_valid)
        finally:
            fake_cupy.ONLY_BLOCKS = None
            undo()
        # the loop: chunks of R rows tiling [0, N), each launch below 2**31 elements
        assert R * V < 2**31 and R == (512 << 20) // (4 * V) and N > 2 * R, R
        assert [r0 for r0, _ in chunks] == list(range(0, N, R)), chunks[:3]
        assert chunks[-1][1] == N and len(chunks) == -(-N // R), (chunks[-1], len(chunks))
        xent = [g for name, g, _ in fake_cupy.launches[start:] if name.startswith("softmax_xent")]
        assert len(xent) == len(chunks) and all(g[0] * V < 2**31 for g in xent)
        # the rows that ran, against float64
        rows = sorted({r for r0, r1 in chunks for r in (r0, r1 - 1)})
        logit = lnf[rows].astype(F64) @ wte.T
        l_ref, g_ref = softmax_xent_ref(logit, tgt[rows], 1.0 / n_valid)
        losses = c.losses.get()
        t_att.assert_close(losses[rows], l_ref, *t_xent.tol(F32), "losses")
        dl = np.stack([dlnf_want[r] for r in rows])
        t_att.assert_close(c.dlnf.get().reshape(N, C)[rows], dl, 0, 0, "dlnf written in place")
        t_att.assert_close(dl, g_ref @ wte, 1e-4, 1e-5, "dlnf")
        dw_want = g_ref.T @ lnf[rows].astype(F64)
        t_att.assert_close(m.grads["transformer.wte.weight"].get(), dw_want, 1e-4, 1e-5,
                           "wte.grad")
    return check


# GPT-2 1.5B (n_embd 1600, 25 heads of 64, 48 layers, vocabulary padded to 50,304) at a batch
# of 64 x 1024 tokens: the largest shapes the model's launches reach in this project's configs
GPT2_XL = ModelConfig(vocab_size=50257, padded_vocab_size=XENT_V, block_size=1024, n_layer=48,
                      n_head=25, n_embd=1600)
GPT2_XL_BATCH = 64


def _gpt2_xl_launch_limits():
    """Every launcher at GPT-2 1.5B shapes, batch 64 x 1024 (logits of 3.3e9 elements, a
    1.56e9-parameter arena for AdamW and the gradient norm), with every kernel instantiation
    family the launchers have: each launch's grid, block, registers and shared memory are
    checked as the GPU checks them (the fake's limits) without running a block (sparse
    arrays, nothing touched). A grid that overflows only at these sizes (grid y > 65,535,
    a block count past 2**31 - 1, a 32-bit argument past int32) fails here."""
    from cllm_gpu.ops import _cuda as _cu
    from cllm_gpu.ops.adamw import adamw_update_cuda
    from cllm_gpu.ops.attention import attention_backward_cuda, attention_forward_cuda
    from cllm_gpu.ops.attention import set_attention_backward
    from cllm_gpu.ops.cast import from_bf16_cuda, to_bf16_cuda
    from cllm_gpu.ops.dropout import DropoutKey, dropout_bias_backward_cuda, dropout_cuda
    from cllm_gpu.ops.embedding import embedding_backward_cuda, embedding_forward_cuda
    from cllm_gpu.ops.gelu import gelu_backward_cuda, gelu_forward_cuda
    from cllm_gpu.ops.grad_norm import clip_factor_cuda, grad_norm_cuda
    from cllm_gpu.ops.layernorm import (layernorm_backward_cuda, layernorm_forward_cuda,
                                        residual_layernorm_forward_cuda)
    from cllm_gpu.ops.softmax_xent import softmax_xent_cuda

    def check():
        cfg, B = GPT2_XL, GPT2_XL_BATCH
        T, C, H, V, P = cfg.block_size, cfg.n_embd, cfg.n_head, cfg.padded_vocab_size, \
            cfg.num_params()
        N, BF = B * T, np.uint16
        assert N * V > 2**31 and P > 1.5e9
        try:
            S = fake_cupy.sparse_zeros
            S((N, V), F32)
        except (OSError, ValueError) as e:  # no address space for 13 GB of virtual memory
            raise Skip(f"sparse {N} x {V} mapping refused: {e}")
        key = DropoutKey(seed=1, step=cp.zeros(1, F64), site=2)
        idx = S((B, T), np.int32)
        x, y, dx = S((N, C), F32), S((N, C), F32), S((N, C), F32)
        w, b = S((C,), F32), S((C,), F32)
        mean, rstd = S((N,), F32), S((N,), F32)
        h, h16, dh = S((N, 4 * C), F32), S((N, 4 * C), BF), S((N, 4 * C), F32)
        fake_cupy.ONLY_BLOCKS = lambda name, grid: []
        start = len(fake_cupy.launches)
        old = set_attention_backward(None)
        try:
            embedding_forward_cuda(idx, S((V, C), F32), S((T, C), F32), S((B, T, C), F32))
            embedding_backward_cuda(S((B, T, C), F32), idx, S((V, C), F32), S((T, C), F32))
            dropout_cuda(x, 0.1, key, out=x)
            for out in (S((N, C), F32), S((N, C), BF)):
                layernorm_forward_cuda(x, w, b, out=out, mean=mean, rstd=rstd)
            residual_layernorm_forward_cuda(x, S((N, C), BF), w, b, 1e-5, S((N, C), F32),
                                            S((N, C), BF), mean, rstd, y_bias=b, p=0.1, key=key)
            layernorm_backward_cuda(S((N, C), BF), x, w, mean, rstd, S((C,), F32), S((C,), F32),
                                    dx=dx, dresidual=y)
            for prec, qkv, o in (("fp32", S((B, T, 3 * C), F32), S((B, T, C), F32)),
                                 ("bf16", S((B, T, 3 * C), BF), S((B, T, C), BF))):
                lse = S((B, H, T), F32)
                attention_forward_cuda(qkv, H, out=o, lse=lse, precision=prec,
                                       slopes=S((H,), F32), dropout=(0.1, key))
                for variant in ("two-pass", "atomic-dq"):
                    set_attention_backward(variant)
                    attention_backward_cuda(S((B, T, C), o.dtype), qkv, o, lse, H,
                                            dqkv=S((B, T, 3 * C), o.dtype), precision=prec)
            gelu_forward_cuda(h, out=h16, bias=S((4 * C,), F32))
            gelu_backward_cuda(S((N, 4 * C), BF), h16, dx=dh, dbias=S((4 * C,), F32),
                               bias=S((4 * C,), F32))
            gelu_backward_cuda(S((N, 4 * C), F32), h, dx=dh)
            dropout_bias_backward_cuda(y, 0.1, key, S((N, C), BF), S((C,), F32))
            logits = S((N, V), F32)
            softmax_xent_cuda(logits, S((N,), np.int32), 1.0, dlogits=logits)
            arena = [S((P,), F32) for _ in range(5)]
            adamw_update_cuda(*arena, cp.zeros(5, F64), 0.9, 0.95, 1e-8,
                              params_bf16=S((P,), BF))
            norm = grad_norm_cuda(arena[1])
            clip_factor_cuda(norm, cp.zeros(1, F64), 1.0)
            from_bf16_cuda(to_bf16_cuda(arena[0], out=S((P,), BF)), out=arena[1])
        finally:
            fake_cupy.ONLY_BLOCKS = None
            set_attention_backward(old)
        launched = fake_cupy.launches[start:]
        for name, grid, block in launched:  # (the fake refused any launch past these)
            assert all(g <= m for g, m in zip(grid, fake_cupy.MAX_GRID)), (name, grid)
        # every kernel family of every file had a launch at these shapes
        bases = {n.split("<")[0] for ns in NAME_EXPRESSIONS.values() for n in ns}
        assert {n.split("<")[0] for n, _, _ in launched} == bases, \
            bases - {n.split("<")[0] for n, _, _ in launched}
        # the worst grids: one block per logits row, B * H heads on grid y, grid-stride caps
        worst = {}
        for name, grid, _ in launched:
            base = name.split("<")[0]
            worst[base] = tuple(max(a, g) for a, g in zip(worst.get(base, (0, 0, 0)), grid))
        assert worst["softmax_xent_kernel"] == (N, 1, 1)
        assert worst["attention_forward_mma_kernel"][1] == B * H == 1600
        assert worst["adamw_kernel"][0] == _cu.MAX_GRID_STRIDE_BLOCKS
        assert max(g[1] for g in worst.values()) == B * H
    return check


def _edges():
    xent = build.kernels.kernel_source("softmax_xent")
    c = []
    for D in (64, 128):
        c.append((f"attention fp32 T=1024 D={D} (first and last tiles)", _att_fp32_t1024(D)))
        c.append((f"attention bf16 mma T=1024 D={D}", lambda D=D: t_att._check_bf16(1, 1024, 1, D)))
    c += [("attention fp32 B*H=65535 D=8 (first and last head)", _att_grid_limit(8, "fp32")),
          ("attention bf16 mma B*H=65535 D=16 (first and last head)", _att_grid_limit(16, "bf16")),
          ("attention B*H=65536 refused by the launcher", _att_grid_over_limit),
          ("softmax_xent V=50304, N*V > 2**31 (rows 0, past 2**31, last)", _xent_huge()),
          ("softmax_xent 2**31 rows refused by the launcher", _xent_rows_over_limit(False)),
          ("softmax_xent 2**31 rows in place refused by the launcher",
           _xent_rows_over_limit(True)),
          # the row offset in 32-bit arithmetic: row * V wraps past 2**31
          _caught("kernel: softmax_xent row offset in int",
                  _xent_huge(_sub(_sub(xent, "const long long row = blockIdx.x;",
                                       "const int row = blockIdx.x;"),
                                  "const S* x = logits + row * (long long)V;",
                                  "const S* x = logits + row * V;")),
                  "before the start of `logits`"),
          ("model classifier at B*T*V > 2**31 through the row chunking",
           _classifier_chunks_huge()),
          ("every launcher at GPT-2 1.5B shapes, batch 64 x 1024: launch limits",
           _gpt2_xl_launch_limits())]
    return c


GROUPS = {"attention_bf16": _att_bf16, "attention_fp32": _att_fp32, "other": _other,
          "mutants": _mutants, "model": _model, "sanitizer": _sanitizer, "edges": _edges}


def main(argv):
    groups = argv or list(GROUPS)
    passed = failed = 0
    t_all = time.time()
    for g in groups:
        for name, fn in GROUPS[g]():
            t0 = time.time()
            try:
                fn()
            except Skip as e:
                print(f"SKIP {name}: {e}")
                continue
            except Exception as e:  # report every failing check, then fail the run
                failed += 1
                tb = traceback.format_exc().strip().splitlines()
                print(f"FAIL {name}: {type(e).__name__}: {str(e)[:600]}")
                print("    " + "\n    ".join(tb[-6:]))
            else:
                passed += 1
                print(f"PASS {name} {time.time() - t0:.2f}s")
            sys.stdout.flush()
    if set(groups) >= {"attention_bf16", "attention_fp32", "other"}:
        ran = {n for n, _, _ in fake_cupy.launches}
        missing = [n for s in NAME_EXPRESSIONS for n in NAME_EXPRESSIONS[s] if n not in ran]
        print(f"COVERAGE {len(ran)} instantiations launched; never launched: {missing}")
        if missing:
            failed += 1
    print(f"SUMMARY passed={passed} failed={failed} seconds={time.time() - t_all:.1f}")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
