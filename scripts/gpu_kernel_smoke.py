"""Run every CUDA kernel once on small, odd shapes (a driver for compute-sanitizer).

CuPy's memory pool is switched off so that every array is its own cudaMalloc and memcheck sees
out-of-bounds accesses at the array's edge (inside a pooled chunk it would not). Exits 0 when
everything ran and every result is finite; the values themselves are checked by tests/gpu.
Attention runs at T = 1, 45 and 130, at 130 also with the lattice distance bias (the
`<D, true>` kernels), at 45 also with dropout on the probabilities (the step from a device slot).
--quick: attention only for head dims 8, 48 and 128 (shared tiles of 128, 80 and 32 rows; the
bf16 tensor-core kernels for 48 and 128), for a short device slot. --only GROUP[,GROUP]: run
those groups alone (rerunning one sanitizer finding; the harness test). Prints one line per op
as it finishes, so a sanitizer log shows where a crash happened."""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout


GROUPS = ("gelu", "layernorm", "softmax_xent", "adamw", "embedding", "bf16", "attention")


def build_parser() -> argparse.ArgumentParser:
    """The command line main() parses (the docs' command lines are checked against it:
    tests/test_docs_cite_real_flags.py)."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="attention only for head dims 8, 48 and 128")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help="comma-separated groups to run (default: all of %(default)s)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    only = set(args.only.split(","))
    unknown = only - set(GROUPS)
    if unknown:
        ap.error(f"unknown group(s) {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    import cupy as cp
    from cllm_gpu import ops
    from cllm_gpu.kernels import ATTENTION_HEAD_DIMS
    from cllm_gpu.ops.adamw import adamw_hyperparams
    from cllm_gpu.ops.grad_norm import clip_factor

    cp.cuda.set_allocator(None)
    rng = np.random.default_rng(0)
    bad = []

    def dev(*shape, dtype=np.float32, scale=1.0):
        return cp.asarray((rng.normal(size=shape) * scale).astype(dtype))

    def finite(name, *arrays):
        for a in arrays:
            if not bool(cp.isfinite(a).all()):
                bad.append(name)
        print(f"  ran {name}", flush=True)

    for dt in (np.float32, np.float64):
        dn = np.dtype(dt).name
        x = dev(37, 45, dtype=dt)
        if "gelu" in only:
            y = ops.gelu_forward(x)
            finite(f"gelu {dn}", y, ops.gelu_backward(dev(37, 45, dtype=dt), x))
        if "layernorm" in only:
            w, b = dev(45, dtype=dt), dev(45, dtype=dt)
            out, mean, rstd = ops.layernorm_forward(x, w, b)
            dw, db = cp.zeros(45, dt), cp.zeros(45, dt)
            dx = ops.layernorm_backward(dev(37, 45, dtype=dt), x, w, mean, rstd, dw, db)
            finite(f"layernorm {dn}", out, dx, dw, db)
        if "softmax_xent" in only:
            for V in (1001, 1004):  # scalar and vector paths
                logits = dev(13, V, dtype=dt)
                t = cp.asarray(rng.integers(-1, V, size=13).astype(np.int32))
                losses, g = ops.softmax_xent(logits, t, cp.full(1, 1 / 13), dlogits=logits)
                finite(f"softmax_xent V={V} {dn}", losses, g)
        if "adamw" in only:
            P = 10_007
            p, g, m, v = dev(P, dtype=dt), dev(P, dtype=dt), dev(P, dtype=dt), cp.zeros(P, dt)
            mask = cp.ones(P, dt)
            # the trainer's per-step buffer: hyper (5), dloss, loss, norm, bad index
            step = cp.asarray(np.concatenate([adamw_hyperparams(1e-3, 0.9, 0.95, 0.1, 1),
                                              [1.0, 2.5, 0.0, 0.0]]))
            ops.grad_norm(g, out=step[7:9])
            clip_factor(step[7:8], step[6:7], 1.0, out=step[4:5])
            ops.adamw_update(p, g, m, v, mask, step[:5], 0.9, 0.95, 1e-8)
            finite(f"adamw/grad_norm/clip_factor {dn}", p, m, v, step)
        if "embedding" in only:
            for C in (19, 130):  # a partial warp; two channel chunks of the dwte kernel
                V, B, T = 50, 3, 7
                idx = cp.asarray(rng.integers(0, V, size=(B, T)).astype(np.int32))
                wte, wpe = dev(V, C, dtype=dt), dev(T + 2, C, dtype=dt)
                e = ops.embedding_forward(idx, wte, wpe)
                dwte, dwpe = cp.zeros((V, C), dt), cp.zeros((T + 2, C), dt)
                ops.embedding_backward(dev(B, T, C, dtype=dt), idx, dwte, dwpe)
                finite(f"embedding C={C} {dn}", e, dwte, dwpe)

    if "bf16" in only:  # casts, bf16 outputs, the fused c_fc bias, bf16 GEMMs, AdamW's copy
        x = dev(37, 45)
        x16 = ops.to_bf16(x)
        finite("cast", ops.from_bf16(x16))
        h16 = cp.empty((37, 45), dtype=ops.bf16_storage_dtype(True))
        ops.gelu_forward(x, out=h16, bias=dev(45))
        finite("gelu bias, bf16 out", x, ops.from_bf16(h16))
        d16, db = ops.to_bf16(dev(37, 45)), cp.zeros(45, np.float32)
        ops.gelu_forward(x16, out=h16, bias=dev(45))  # the bf16 model's MLP: bf16 in and out
        ops.gelu_backward(d16, x16, dx=d16, bias=dev(45), dbias=db)  # in place
        finite("gelu bf16 in, bias", ops.from_bf16(h16), ops.from_bf16(d16), db)
        ops.layernorm_forward(x, dev(45), dev(45), out=h16)
        finite("layernorm, bf16 out", ops.from_bf16(h16))
        c = ops.gemm(x16, ops.to_bf16(dev(45, 19)))
        ops.gemm(x16, ops.to_bf16(dev(19, 45)), c, trans_b=True, accumulate=True)
        finite("gemm bf16", c)
        P = 10_007  # AdamW writing the bf16 weight copy (adamw_kernel<float, true>)
        p, p16 = dev(P), cp.empty(P, dtype=ops.bf16_storage_dtype(True))
        ops.adamw_update(p, dev(P), dev(P), cp.zeros(P, np.float32), cp.ones(P, np.float32),
                         cp.asarray(adamw_hyperparams(1e-3, 0.9, 0.95, 0.1, 1)), 0.9, 0.95,
                         1e-8, params_bf16=p16)
        finite("adamw with the bf16 copy", p, ops.from_bf16(p16))

    if "attention" in only:
        lattice = cp.asarray(ops.attention_slopes("lattice", 2), dtype=np.float32)
        drop = (0.2, ops.DropoutKey(seed=1, step=cp.ones(1, np.float64),
                                    site=ops.site_id(0, ops.ATTN_PROBS)))
        for D in ((8, 48, 128) if args.quick else ATTENTION_HEAD_DIMS):
            for T in (1, 45, 130):
                B, H = 2, 2
                qkv = dev(B, T, 3 * H * D)
                # the distance-bias instantiations (<D, true>, reading the slopes) at T = 130,
                # dropout on the probabilities at T = 45
                variants = {130: ((None, None), (lattice, None)),
                            45: ((None, None), (None, drop))}.get(T, ((None, None),))
                for slopes, dropout in variants:
                    for precision in ("fp32", "bf16"):
                        out, lse = ops.attention_forward(qkv, H, precision=precision,
                                                         slopes=slopes, dropout=dropout)
                        dqkv = ops.attention_backward(dev(B, T, H * D), qkv, out, lse, H,
                                                      precision=precision, slopes=slopes,
                                                      dropout=dropout)
                        finite(f"attention {precision} D={D} T={T}"
                               + ("" if slopes is None else " lattice")
                               + ("" if dropout is None else " dropout"), out, lse, dqkv)
                    if D % 16 == 0:  # the bf16 model's way: a bf16 output alone, read back
                        o16 = cp.empty((B, T, H * D), ops.bf16_storage_dtype(True))
                        _, lse = ops.attention_forward(qkv, H, out=o16, precision="bf16",
                                                       slopes=slopes, dropout=dropout)
                        dqkv = ops.attention_backward(dev(B, T, H * D), qkv, o16, lse, H,
                                                      precision="bf16", slopes=slopes,
                                                      dropout=dropout)
                        finite(f"attention bf16 out D={D} T={T}", ops.from_bf16(o16), dqkv)
    cp.cuda.Device().synchronize()
    if bad:
        print("non-finite results from:", ", ".join(sorted(set(bad))), file=sys.stderr)
        return 1
    print("all kernels ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
