"""Run the CUDA launchers of cllm_gpu/ops on the emulated kernels and compare with the NumPy
references, reusing the checks (and tolerances) of tests/gpu/ on small shapes.

    python tests/cuda_emulator/run_emulated.py GROUP [GROUP ...]

Prints one `PASS <check> <seconds>` or `FAIL <check>: <error>` line per check and a final
`SUMMARY passed=N failed=M`; exits 1 when any check failed. Installs a fake `cupy`: run it in
a process of its own (tests/test_kernels_emulated.py does).
"""
import sys
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "gpu"))

from cuda_emulator import fake_cupy  # noqa: E402

cp = fake_cupy.install()

import numpy as np  # noqa: E402

import test_adamw_cuda as t_adamw  # noqa: E402  (tests/gpu, imported with the fake cupy)
import test_attention_cuda as t_att  # noqa: E402
import test_cast_cuda as t_cast  # noqa: E402
import test_embedding_cuda as t_emb  # noqa: E402
import test_gelu_cuda as t_gelu  # noqa: E402
import test_grad_norm_cuda as t_gn  # noqa: E402
import test_layernorm_cuda as t_ln  # noqa: E402
import test_softmax_xent_cuda as t_xent  # noqa: E402
from cllm_gpu.kernels import ATTENTION_HEAD_DIMS, NAME_EXPRESSIONS  # noqa: E402
from cllm_gpu.ops.attention import attention_backward, attention_forward  # noqa: E402

F32, F64 = np.float32, np.float64


def order_independent(fn, name):
    """fn() -> list of host arrays; the same bits with the threads of every block scheduled in
    ascending and in descending order (a missing barrier shows up as a difference)."""
    def check():
        fake_cupy.ORDER["reverse"] = 0
        a = fn()
        fake_cupy.ORDER["reverse"] = 1
        try:
            b = fn()
        finally:
            fake_cupy.ORDER["reverse"] = 0
        for x, y in zip(a, b):
            assert x.tobytes() == y.tobytes(), f"{name}: result depends on thread order"
    return check


def attention_runs(B, T, H, D, precision):
    def fn():
        qkv, dout = t_att._inputs(B, T, H, D, np.float32)
        Q, G = cp.asarray(qkv), cp.asarray(dout)
        out, lse = attention_forward(Q, H, precision=precision)
        dqkv = attention_backward(G, Q, out, lse, H, precision=precision)
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
    checks += [
        ("attention bf16 D=8 falls back to the fp32 kernels",
         t_att.test_attention_bf16_without_mma_kernel_runs_the_fp32_kernels),
        ("attention bf16 rejects float64 and misaligned arrays",
         t_att.test_attention_bf16_rejects_float64_and_misaligned_arrays),
        ("attention bf16 peaked softmax (T=300)",
         t_att.test_attention_bf16_softmax_is_peaked_without_overflow),
    ]
    return checks


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
    return checks


def _other():
    c = []
    for dt in (F32, F64):
        for N, C in ((1, 1), (1, 768), (17, 31), (40, 130)):
            c.append((f"layernorm {dt.__name__} N={N} C={C}",
                      lambda dt=dt, N=N, C=C: t_ln.test_layernorm_matches_reference(dt, N, C)))
    for N, C in ((1, 1), (17, 31)):
        c.append((f"layernorm bf16_out N={N} C={C}",
                  lambda N=N, C=C: t_ln.test_layernorm_bf16_out_is_the_rounded_fp32_output(N, C)))
    for dt in (F32, F64):
        for N, V in ((1, 1), (17, 7), (9, 1004), (3, 5001)):
            c.append((f"softmax_xent {dt.__name__} N={N} V={V}",
                      lambda dt=dt, N=N, V=V: t_xent.test_softmax_xent_matches_reference(dt, N, V)))
    c += [("softmax_xent vector and scalar paths agree",
           t_xent.test_softmax_xent_vector_and_scalar_paths_agree),
          ("softmax_xent out-of-range target", t_xent.test_softmax_xent_out_of_range_target_is_nan),
          ("softmax_xent large logits", t_xent.test_softmax_xent_large_logits_stable),
          ("softmax_xent NaN logit", t_xent.test_softmax_xent_nan_logit_gives_nan_loss)]
    for dt in (F32, F64):
        for P in (1, 17, 5003):
            for kind in ("one", "float", "device"):
                for step in (1, 7):
                    c.append((f"adamw {dt.__name__} P={P} scale={kind} step={step}",
                              lambda dt=dt, P=P, kind=kind, step=step:
                              t_adamw.test_adamw_matches_reference(dt, P, kind, step)))
        for bad in (np.nan, np.inf):
            c.append((f"adamw {dt.__name__} non-finite scale {bad} skips",
                      lambda dt=dt, bad=bad: t_adamw.test_adamw_nonfinite_device_scale_skips_step(bad, dt)))
        for step in (1, 7, 1000):
            c.append((f"adamw {dt.__name__} hyper buffer == by value, step {step}",
                      lambda dt=dt, step=step: t_adamw.test_adamw_hyper_buffer_bitwise_equals_by_value(dt, step)))
    c.append(("grad_norm -> clip_factor -> adamw on device",
              t_adamw.test_clip_pipeline_on_device_without_host_sync_values))
    for dt in (F32, F64):
        for n in (1, 17, 4096, 70_001):
            c.append((f"grad_norm {dt.__name__} n={n}",
                      lambda dt=dt, n=n: t_gn.test_grad_norm_matches_reference(dt, n)))
        for norm in (0.0, 0.5, 1.0, 10.0, np.inf, np.nan):
            c.append((f"clip_factor {dt.__name__} norm={norm}",
                      lambda dt=dt, norm=norm: t_gn.test_clip_factor_matches_reference(dt, norm)))
    c.append(("grad_norm zero and non-finite", t_gn.test_grad_norm_zero_and_nonfinite))
    for dt in (F32, F64):
        for shp in ((1, 1, 1, 1), (4, 17, 7, 33), (3, 9, 300, 130)):
            c.append((f"embedding {dt.__name__} B,T,V,C={shp}",
                      lambda dt=dt, shp=shp: t_emb.test_embedding_matches_reference(dt, *shp)))
    c.append(("embedding out-of-range id", t_emb.test_embedding_out_of_range_id_gives_nan_not_a_crash))
    for dt in (F32, F64):
        for shp in ((1,), (17,), (255, 3)):
            c.append((f"gelu {dt.__name__} shape={shp}",
                      lambda dt=dt, shp=shp: t_gelu.test_gelu_matches_reference(dt, shp)))
    for shp in ((1, 1), (33, 65)):
        c.append((f"gelu fused bias + bf16_out shape={shp}",
                  lambda shp=shp: t_gelu.test_gelu_fused_bias_and_bf16_out(shp)))
    for n in (1, 255, 10_003):
        c.append((f"cast to/from bf16 n={n}", lambda n=n: t_cast.test_to_bf16_bits_equal_host_rounding(n)))
    c.append(("cast NaN stays NaN", t_cast.test_nan_stays_nan))
    return c


# ---------------------------------------------------------------- mutants: the checks must fail
def _mutants():
    from cuda_emulator import build
    att_src = build.kernels.kernel_source("attention")
    header = (Path(build.__file__).parent / "emu_runtime.h").read_text()

    def sub(text, old, new):
        assert text.count(old) == 1, f"mutation anchor not found once: {old!r}"
        return text.replace(old, new)

    only32 = [n for n in NAME_EXPRESSIONS["attention"] if n.endswith("<32>")]
    only128 = [n for n in NAME_EXPRESSIONS["attention"] if n.endswith("<128>")]
    bf16 = lambda: t_att._check_bf16(1, 65, 2, 32)  # noqa: E731
    mutants = [
        # the kernel's use of the PTX conventions, each broken once
        ("kernel: cvt.rn.bf16x2 operands swapped",
         dict(src=sub(att_src, '"f"(hi), "f"(lo)', '"f"(lo), "f"(hi)'), only=only32), bf16),
        ("kernel: A fragment registers 1 and 2 swapped",
         dict(src=sub(att_src, "a[1] = mma_row_pair(p + 8 * LD);\n    a[2] = mma_row_pair(p + 8);",
                      "a[2] = mma_row_pair(p + 8 * LD);\n    a[1] = mma_row_pair(p + 8);"),
              only=only32), bf16),
        ("kernel: B fragment (cols) registers swapped",
         dict(src=sub(att_src, "b0 = mma_col_pair(p, LD);\n    b1 = mma_col_pair(p + 8 * LD, LD);",
                      "b1 = mma_col_pair(p, LD);\n    b0 = mma_col_pair(p + 8 * LD, LD);"),
              only=only32), bf16),
        ("kernel: accumulator-to-A repack with c0/c1 tiles swapped",
         dict(src=sub(att_src, "a[0] = cllm_pack_bf16x2(c0[0], c0[1]);",
                      "a[0] = cllm_pack_bf16x2(c1[0], c1[1]);"), only=only32), bf16),
        # the emulator's layout, broken once: C/D rows g and g + 8 exchanged
        ("emulator: C/D fragment rows swapped",
         dict(header=sub(header, "row = i < 2 ? g : g + 8;", "row = i < 2 ? g + 8 : g;"),
              only=only32), bf16),
        # a missing barrier: the next key tile overwrites K, V while other threads still read
        ("kernel: fp32 forward without the tile-reuse __syncthreads",
         dict(src=sub(att_src, "        __syncthreads();  // the previous tile is no longer read\n"
                               "        att_load_tile<D, BC>(Ks",
                      "        att_load_tile<D, BC>(Ks"), only=only128),
         order_independent(attention_runs(1, 130, 1, 128, "fp32"), "fp32")),
    ]
    checks = []
    for name, override, fn in mutants:
        def check(override=override, fn=fn, name=name):
            fake_cupy.OVERRIDE["attention"] = override
            fake_cupy._libs.pop("attention", None)
            try:
                fn()
            except (AssertionError, RuntimeError) as e:
                print(f"  caught: {str(e).splitlines()[0][:160]}")
                return
            finally:
                fake_cupy.OVERRIDE.pop("attention", None)
                fake_cupy._libs.pop("attention", None)
            raise AssertionError(f"mutant not caught: {name}")
        checks.append((f"mutant caught: {name}", check))
    return checks


GROUPS = {"attention_bf16": _att_bf16, "attention_fp32": _att_fp32, "other": _other,
          "mutants": _mutants}


def main(argv):
    groups = argv or list(GROUPS)
    passed = failed = 0
    t_all = time.time()
    for g in groups:
        for name, fn in GROUPS[g]():
            t0 = time.time()
            try:
                fn()
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
