"""What a CUDA-graph capture of the training step allocates, and what that is at GPT-2 124M.

cuda_graph.StepGraph holds every block the capture allocates until the capture has ended, so the
graph's private pool holds the SUM of the step's temporaries; before that, blocks were reused
inside the capture and the pool held about their PEAK live bytes. This script

1. captures the emulated step (every kernel emulated, fake_cupy) at small configs, recording
   each allocation's size and the cllm_gpu line that made it (fake_graph.AllocationTrace), and
   runs the same step body plainly to record when each block is released;
2. checks that `temporaries(...)` below, the size formula of each allocation site read from the
   launchers, predicts those allocations exactly (site, bytes, order);
3. evaluates the formulas at GPT-2 124M (B 16, T 1024, C 768, 12 layers, 12 heads, V 50,304),
   which the emulator cannot run, with the allocations' release points taken from the traces,
   next to the activation cache's bytes.

    python tests/cuda_emulator/capture_memory.py            (prints the tables)

Sizes are rounded as CuPy's pool rounds them (512 bytes). Installs a fake `cupy`: run it in a
process of its own.
"""
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

from cuda_emulator import fake_cupy, fake_graph  # noqa: E402

cp = fake_cupy.install()

import json  # noqa: E402
import math  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402

from cllm_gpu import CLLMModel, ModelConfig, TrainConfig  # noqa: E402
from cllm_gpu.cuda_graph import StepGraph  # noqa: E402
from cllm_gpu.model import ActivationCache  # noqa: E402
from cllm_gpu.model import activation_cache_bytes as model_activation_cache_bytes  # noqa: E402,E501
from cllm_gpu.ops import _cuda  # noqa: E402
from cllm_gpu.ops.attention import set_attention_backward  # noqa: E402
from cllm_gpu.ops.grad_norm import _NORM_ELEMS_PER_THREAD, _NORM_MAX_BLOCKS  # noqa: E402
from cllm_gpu.train_step import StepValues  # noqa: E402

POOL_ROUND = 512   # CuPy's MemoryPool rounds every allocation up to a multiple of 512 bytes
GPT2 = dict(B=16, T=1024, C=768, H=12, L=12, V=50304)
# (precision, attention backward variant): the variant matters only for bf16's tensor cores
RUNS = [("fp32", "two-pass"), ("bf16", "two-pass"), ("bf16", "atomic-dq")]
# the emulated configs the formulas are checked against (head dim 32: the tensor-core kernels,
# as GPT-2's 64; N = B T past 64 rows: more than one column-sum chunk, 72 rows being two.
# Below the attention tiles (64, 128) only the chunk count changes what a launcher allocates:
# T 48 (three chunks) cost 6 of the script's 29 CPU seconds for no other allocation path)
SMALL = [dict(B=2, T=16, C=64, H=2, L=2, V=97), dict(B=3, T=24, C=96, H=3, L=3, V=97)]


def temporaries(B, T, C, H, L, n_params, precision, variant, V=None):
    """[(site, bytes)] in allocation order for one step of one micro-batch: what each launcher
    allocates (ops/*.py), as the model's forward, classifier, backward and the optimizer call
    them (V: the classifier allocates nothing of its size). Site names are the launcher's file,
    function and array."""
    f64 = 8
    # (the attention backward's Delta and atomic-dq's fp32 dQ sums, and the column-sum
    # partials of the LayerNorm, GELU and dropout-bias backwards, are in the activation cache:
    # ActivationCache.attn_scratch and colsum_scratch)
    out = [("model.py classifier losses.sum", f64)]
    G = max(1, min(_NORM_MAX_BLOCKS, math.ceil(n_params / (_cuda.THREADS * _NORM_ELEMS_PER_THREAD))))
    out += [("grad_norm.py grad_norm_cuda partials", G * f64),
            ("grad_norm.py grad_norm_cuda bad", G * f64)]
    return out


def pooled(nbytes):
    return -(-max(nbytes, 1) // POOL_ROUND) * POOL_ROUND


def peak_live(sizes, freed):
    """The most bytes held at once when block i is held from its allocation until `freed[i]`
    allocations have been made (None: to the end)."""
    return max(sum(s for i, (s, f) in enumerate(zip(sizes, freed))
                   if i <= j and (f is None or f > j)) for j in range(len(sizes)))


def _site(block):
    """From the step body inward (the capture's frames above it differ from a plain run's)."""
    site = block["site"]
    return site[next(i for i, s in enumerate(site) if s.endswith(" training_step")):]


def trace(s, precision, variant):
    """(captured blocks, plain blocks, model) of one step at small config s."""
    set_attention_backward(variant)
    cfg = ModelConfig(vocab_size=s["V"], block_size=s["T"], n_layer=s["L"], n_head=s["H"],
                      n_embd=s["C"])
    m = CLLMModel(cfg, backend="cuda", dtype="float32", seed=4, precision=precision)
    tc = TrainConfig(batch_size=s["B"], precision=precision, grad_clip=1.0, cuda_graph=True)
    logs = []
    g = StepGraph(m, tc, StepValues(m.xp), logs.append)
    rng = np.random.default_rng(0)
    b = m.check_batch(rng.integers(0, s["V"], (s["B"], s["T"])),
                      rng.integers(0, s["V"], (s["B"], s["T"])))
    g.step([b], 1e-3, 1, b.n_valid)               # warm-up
    with fake_graph.AllocationTrace() as cap:
        g.step([b], 1e-3, 2, b.n_valid)           # captured
    assert g.graph is not None, logs
    captured = [x for x in cap.blocks if any(" _capture_and_launch" in f for f in x["site"])]
    assert [x["bytes"] for x in captured] == g.pool.sizes, "the pool saw other allocations"
    with fake_graph.AllocationTrace() as plain:   # the same body, un-captured: release times
        with g.stream:
            g._body()
    assert [(x["bytes"], _site(x)) for x in captured] == \
        [(x["bytes"], _site(x)) for x in plain.blocks], "capture and plain step allocate apart"
    return captured, plain.blocks, m


def _short(site):
    path, func = site[-1].split(" ")
    return f"{Path(path.split(':')[0]).name} {func}"


def activation_cache_bytes(s, model):
    """Bytes of the activation cache at shape s with the model's dtypes (counted, not made:
    each array pool-rounded), checked equal to model.activation_cache_bytes, the arithmetic
    the trainer's memory check uses (here with the device's bf16 storage, uint16)."""
    total = [0]

    def empty(shape, dtype):
        total[0] += pooled(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        return types.SimpleNamespace(shape=shape, dtype=np.dtype(dtype))
    cfg = ModelConfig(vocab_size=s["V"], block_size=s["T"], n_layer=s["L"], n_head=s["H"],
                      n_embd=s["C"])
    ActivationCache(types.SimpleNamespace(empty=empty), cfg, s["B"], s["T"], model.dtype,
                    model.mm_dtype)
    want = model_activation_cache_bytes(cfg, s["B"], s["T"], model.dtype, model.mm_dtype, True)
    assert total[0] == want, (s, total[0], want)
    return total[0]


def gpt2_params():
    s = GPT2
    C, L, V = s["C"], s["L"], s["V"]
    return V * C + 1024 * C + L * (12 * C * C + 13 * C) + 2 * C


def main():
    rows = []
    for precision, variant in RUNS:
        release = None
        for s in SMALL:
            captured, plain, model = trace(s, precision, variant)
            n_params = model.params.data.size
            want = temporaries(**s, n_params=n_params, precision=precision, variant=variant)
            got = [(_short(_site(x)), x["bytes"]) for x in captured]
            assert [w[1] for w in want] == [g[1] for g in got], (precision, variant, s, want, got)
            for (wsite, _), (gsite, _) in zip(want, got):   # "file function" of the launcher
                assert wsite.startswith(gsite), (wsite, gsite)
            release = [x["freed"] for x in plain]
            activation_cache_bytes(s, model)  # the trainer's estimate at the emulated shapes
            small_sum = sum(pooled(x["bytes"]) for x in captured)
            small_peak = peak_live([pooled(x["bytes"]) for x in captured], release)
            print(f"{precision} {variant} at {s}: {len(captured)} allocations, sum {small_sum} B,"
                  f" peak live {small_peak} B (formulas match the capture)")
        # at GPT-2 124M the same allocations in the same order, released at the same points:
        # none is made per layer (the per-layer workspaces are in the activation cache), so
        # the count does not depend on the sizes
        big = temporaries(**{k: GPT2[k] for k in ("B", "T", "C", "H", "L")},
                          n_params=gpt2_params(), precision=precision, variant=variant)
        assert len(big) == len(release), (big, release)
        freed = release
        sizes = [pooled(b) for _, b in big]
        total, peak = sum(sizes), peak_live(sizes, freed)
        cache = activation_cache_bytes(GPT2, model)
        by_site = {}
        for site, b in big:
            by_site[site] = by_site.get(site, 0) + pooled(b)
        rows.append((precision, variant, total, peak, cache, by_site, max(sizes)))
    print(f"\nGPT-2 124M, B {GPT2['B']} x T {GPT2['T']}, one micro-batch "
          f"({gpt2_params():,} parameters):")
    for precision, variant, total, peak, cache, by_site, _ in rows:
        print(f"{precision} {variant}: sum {total / 2**10:.1f} KiB, peak live {peak / 2**10:.1f} "
              f"KiB, activation cache {cache / 2**30:.2f} GiB (sum = {100 * total / cache:.5f} %)")
        for site, b in sorted(by_site.items(), key=lambda kv: -kv[1]):
            print(f"    {site}: {b / 2**10:.1f} KiB")
    print(json.dumps({f"{p} {v}": {"sum": t, "peak": pk, "cache": c, "largest": big,
                                   "sites": sorted(sites)}
                      for p, v, t, pk, c, sites, big in rows}))


if __name__ == "__main__":
    main()
