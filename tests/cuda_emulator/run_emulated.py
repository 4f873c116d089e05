"""Run the CUDA launchers of cllm_gpu/ops on the emulated kernels and compare with the NumPy
references, reusing the checks (and tolerances) of tests/gpu/ on small shapes.

    python tests/cuda_emulator/run_emulated.py GROUP [GROUP ...]

Groups: attention_bf16, attention_fp32, other (the op checks of tests/gpu), mutants (broken
kernels must fail them), model (the whole CLLMModel on the CUDA path, its trainer step and
scripts/gpu_kernel_smoke.py, plus mutants of that path).

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

from cuda_emulator import fake_cublas, fake_cupy  # noqa: E402

cp = fake_cupy.install()

import numpy as np  # noqa: E402

import test_adamw_cuda as t_adamw  # noqa: E402  (tests/gpu, imported with the fake cupy)
import test_attention_cuda as t_att  # noqa: E402
import test_cast_cuda as t_cast  # noqa: E402
import test_dropout_cuda as t_drop  # noqa: E402
import test_embedding_cuda as t_emb  # noqa: E402
import test_gelu_cuda as t_gelu  # noqa: E402
import test_grad_norm_cuda as t_gn  # noqa: E402
import test_layernorm_cuda as t_ln  # noqa: E402
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
        for N, V, n_vocab in ((9, 64, 57), (7, 13, 6), (3, 8, 1)):
            c.append((f"softmax_xent {dt.__name__} padded N={N} V={V} vocab={n_vocab}",
                      lambda dt=dt, N=N, V=V, n=n_vocab:
                      t_xent.test_softmax_xent_padded_vocabulary(dt, N, V, n)))
    c += [("softmax_xent vector and scalar paths agree",
           t_xent.test_softmax_xent_vector_and_scalar_paths_agree),
          ("softmax_xent out-of-range target", t_xent.test_softmax_xent_out_of_range_target_is_nan),
          ("softmax_xent large logits", t_xent.test_softmax_xent_large_logits_stable),
          ("softmax_xent NaN logit", t_xent.test_softmax_xent_nan_logit_gives_nan_loss)]
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
    for dt in (F32, F64):
        for n in (1, 3, 4, 1025):
            for p in (0.1, 0.5):
                c.append((f"dropout {dt.__name__} n={n} p={p} (masks bitwise = reference)",
                          lambda dt=dt, n=n, p=p:
                          t_drop.test_dropout_masks_bit_identical_to_the_reference(dt, n, p)))
    return c


# ---------------------------------------------------------------- the whole model
# CLLMModel(backend="cuda") end to end: every kernel emulated, bf16 stored as uint16 bits, the
# products through the cublasGemmEx stand-in (fake_cublas.py) on the raw pointers. The checks
# of tests/gpu/test_model_cuda.py run as they are, on its config (head dim 32) and on one with
# head dim 16 (the other mma instantiation a small model reaches); T = 17 is not a multiple of
# any tile.
CFG32 = dict(t_model.CFG)                                  # vocab 97, block 64, 2x2, n_embd 64
CFG16 = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)


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


def _model_thread_order(precision):
    """Two models, the threads of every block scheduled ascending in one and descending in the
    other: bitwise-equal loss and gradients (no result depends on a missing barrier)."""
    def check():
        cfg = ModelConfig(**CFG32)
        idx, tgt = t_model._batch(cfg, 2, 33)
        runs = []
        for rev in (0, 1):
            fake_cupy.ORDER["reverse"] = rev
            try:
                m = CLLMModel(cfg, backend="cuda", dtype="float32", seed=1, precision=precision)
                runs.append(m.loss_and_grads(idx, tgt))
            finally:
                fake_cupy.ORDER["reverse"] = 0
        (la, ga), (lb, gb) = runs
        assert la == lb, (la, lb)
        for k in ga:
            assert_bitwise_equal(ga[k], gb[k], k)
    return check


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
        # moves values across bf16 rounding boundaries (see the bf16 gradient test: 1e-2)
        ltol, ptol = (1e-5, 1e-4) if precision == "fp32" else (2e-3, 1e-2)
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
    assert fake_cupy.allocator["current"] is None  # it switched the pool off


def _model_mutant(name, patch, fn):
    """The model checks fail when the CUDA path is broken: `patch()` breaks it, returns undo."""
    def check():
        undo = patch()
        try:
            fn()
        except (AssertionError, fake_cublas.CUBLASError) as e:
            print(f"  caught: {str(e).strip().splitlines()[0][:160]}")
            return
        finally:
            undo()
        raise AssertionError(f"mutant not caught: {name}")
    return (f"mutant caught: {name}", check)


def _patch(obj, attr, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    return lambda: setattr(obj, attr, old)


def _cast_like_writes_nothing():
    """ops.cast_like hands back its scratch without casting into it (zeros)."""
    import cllm_gpu.ops as ops_pkg
    linear_mod = importlib.import_module("cllm_gpu.ops.linear")
    orig = ops_pkg.cast_like

    def broken(x, like, scratch):
        out = orig(x, like, scratch)
        if out is not x:
            out.fill(0)
        return out
    undo = [_patch(ops_pkg, "cast_like", broken), _patch(linear_mod, "cast_like", broken)]
    return lambda: [u() for u in undo]


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
    c.append(("model float64 cuda path vs numpy float64 (dense attention, double kernels)",
              t_model.test_cuda_float64_matches_numpy_float64))
    for T in (17, 64):
        c.append((f"model bf16 loss+grads vs numpy bf16 and float64 T={T} (head dim 32)",
                  _with_cfg(CFG32, t_model.test_bf16_loss_and_grads_match_numpy_bf16_and_float64, T)))
    for T in (17, 32):
        c.append((f"model bf16 loss+grads vs numpy bf16 and float64 T={T} (head dim 16)",
                  _with_cfg(CFG16, t_model.test_bf16_loss_and_grads_match_numpy_bf16_and_float64, T)))
    for prec in ("fp32", "bf16"):
        # (stands in for test_loss_and_grads_bitwise_deterministic: the same, plus a reversed
        # thread schedule in the second run)
        c.append((f"model {prec} thread-order independent", _model_thread_order(prec)))
        c.append((f"training_step {prec} x4 (2 micro-batches, clip, AdamW) vs numpy",
                  _training_steps(prec)))
        c.append((f"training_step {prec} non-finite grad skips on the device",
                  _nonfinite_step(prec)))
        c.append((f"logits / last_logits / eval_loss_sum {prec}", _logits(prec)))
    c.append(("scripts/gpu_kernel_smoke.py --quick", _kernel_smoke))
    bf16_grads = _with_cfg(CFG32, t_model.test_bf16_loss_and_grads_match_numpy_bf16_and_float64,
                           17)
    c += [
        _model_mutant("bf16 weight copy not refreshed after the optimizer step",
                      lambda: _patch(model_mod.CLLMModel, "params_updated", lambda self: None),
                      _training_steps("bf16", steps=1, K=1)),
        # (caught as an out-of-bounds operand read by the GemmEx stand-in's range check)
        _model_mutant("cublasGemmEx transa/transb exchanged", _swap_gemm_transposes,
                      _with_cfg(CFG32, t_model.test_loss_and_grads_match_numpy_float64, 17)),
        # beta = 0: a second micro-batch overwrites the first's weight gradients
        _model_mutant("GemmEx accumulate (beta = 1) dropped",
                      lambda: _patch(gemm_mod, "gemm_cuda",
                                     lambda a, b, out=None, ta=False, tb=False, acc=False,
                                     f=gemm_mod.gemm_cuda: f(a, b, out, ta, tb, False)),
                      _training_steps("fp32", steps=1, K=2)),
        _model_mutant("bf16 operand copies (attention output, dout, dlogits) never written",
                      _cast_like_writes_nothing, bf16_grads),
    ]
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
          "mutants": _mutants, "model": _model}


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
