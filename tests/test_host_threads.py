"""The NumPy path's worker threads (cllm_gpu/ops/host_threads.py): pieces run concurrently,
errors surface, nesting runs inline, BLAS is held at one thread and given back, and every
threaded op and a whole training step give the same bits at 1, 2 and 3 threads."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cllm_gpu import CLLMModel, ModelConfig, TrainConfig, ops
from cllm_gpu.ops import host_threads
from cllm_gpu.ops.adamw import adamw_hyperparams
from cllm_gpu.train_step import StepValues, training_step

THREAD_COUNTS = (1, 2, 3)


@pytest.fixture
def threads():
    """set(n): use n host threads for the rest of the test; the count is restored after."""
    old = host_threads.host_threads()
    yield host_threads.set_host_threads
    host_threads.set_host_threads(old)


@pytest.mark.parametrize("n,parts", [(0, 1), (1, 1), (5, 2), (7, 3), (64, 5)])
def test_split_covers_the_range_in_near_equal_contiguous_pieces(n, parts):
    pieces = host_threads.split(n, parts)
    assert len(pieces) == parts
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    sizes = [hi - lo for lo, hi in pieces]
    assert max(sizes) - min(sizes) <= 1


def test_pieces_run_concurrently_on_distinct_threads(threads):
    threads(3)
    barrier = threading.Barrier(3, timeout=20)  # times out (and fails) if pieces run in turn
    seen = {}

    def piece(lo, hi):
        seen[(lo, hi)] = threading.get_ident()
        barrier.wait()

    assert host_threads.run_parts(3, piece) == 3
    assert sorted(seen) == [(0, 1), (1, 2), (2, 3)]
    assert len(set(seen.values())) == 3
    assert seen[(0, 1)] == threading.get_ident()   # the first piece runs in the caller



def test_a_larger_thread_count_gets_a_larger_pool(threads):
    """set_host_threads replaces the worker pool made for the old count: a pool of 1 worker
    kept at 3 threads would run the pieces in turn. Mutation audit (h30p): keeping the old
    pool passed, the pool being first made at 3 threads in every test."""
    threads(2)
    host_threads.run_parts(2, lambda lo, hi: None)   # the pool made for 2: one worker
    threads(3)
    barrier = threading.Barrier(3, timeout=10)  # times out (and fails) if pieces run in turn
    assert host_threads.run_parts(3, lambda lo, hi: barrier.wait()) == 3

def test_the_first_failing_piece_raises_after_every_piece_finished(threads):
    threads(3)
    finished = []

    def piece(lo, hi):
        if lo == 1:
            raise ValueError("piece one")
        if lo == 0:
            raise KeyError("piece zero, raised first in the caller")
        threading.Event().wait(0.3)   # a worker's piece, still running when the others failed
        finished.append(lo)

    with pytest.raises(KeyError, match="piece zero"):
        host_threads.run_parts(3, piece)
    assert finished == [2]
    seen = []   # the pool still works after a failure
    host_threads.run_parts(3, lambda lo, hi: seen.append(lo))
    assert sorted(seen) == [0, 1, 2]


def test_a_nested_call_runs_inline_in_its_piece(threads):
    threads(2)
    inner = []

    def piece(lo, hi):
        me = threading.get_ident()
        host_threads.run_parts(8, lambda a, b: inner.append((a, b, threading.get_ident() == me)))

    host_threads.run_parts(2, piece)
    assert sorted(inner) == [(0, 8, True), (0, 8, True)]


def test_threads_bound_and_one_thread_run_in_the_caller(threads):
    threads(3)
    idents = []
    assert host_threads.run_parts(5, lambda lo, hi: idents.append((lo, hi)), threads=1) == 1
    assert idents == [(0, 5)]
    threads(1)
    caller = []
    assert host_threads.run_parts(4, lambda lo, hi: caller.append(threading.get_ident())) == 1
    assert caller == [threading.get_ident()]
    assert host_threads.run_parts(0, lambda lo, hi: caller.append(None)) == 0
    assert len(caller) == 1


def _blas_threads():
    from threadpoolctl import threadpool_info
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def _need_threaded_blas():
    if not _blas_threads() or max(_blas_threads()) < 2:
        pytest.skip("threadpoolctl finds no multi-threaded BLAS in this NumPy")


def test_blas_is_held_at_one_thread_and_given_back(threads):
    _need_threaded_blas()
    before = _blas_threads()
    threads(2)
    inside = []
    with host_threads.single_threaded_blas():
        inside.append(_blas_threads())
        host_threads.run_parts(2, lambda lo, hi: None)   # a nested hold keeps it held
        inside.append(_blas_threads())
    assert inside == [[1] * len(before)] * 2
    assert _blas_threads() == before
    threads(1)   # one host thread: BLAS on one thread too, in a whole-range piece
    host_threads.run_parts(3, lambda lo, hi: inside.append(_blas_threads()))
    assert inside[-1] == [1] * len(before)
    assert _blas_threads() == before


def test_the_last_hold_out_restores_blas_from_a_thread_that_did_not_set_the_limit(threads):
    """A enters (sets the limit: threadpoolctl 3.8 makes A OpenBLAS's controlling thread), B
    enters, A leaves: the hold stays (counted: B still runs held); B leaves last and restores.
    Without B taking control first its restore was ignored silently, and BLAS stayed at one
    thread for the rest of the process. The threads meet on events, so the order is the same
    at every run; A lives until B is out (threadpoolctl gives control to any thread once the
    controlling one has ended)."""
    _need_threaded_blas()
    before = _blas_threads()
    a_in, a_out, b_in, b_out = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with host_threads.single_threaded_blas():
            a_in.set()
            b_in.wait(10)
        a_out.set()
        b_out.wait(10)

    def thread_b():
        a_in.wait(10)
        with host_threads.single_threaded_blas():
            b_in.set()
            a_out.wait(10)
            seen["b after a left"] = (_blas_threads(), host_threads._holds,
                                      host_threads._limiter is not None)
        seen["after both"] = (_blas_threads(), host_threads._holds,
                              host_threads._limiter is not None)
        b_out.set()

    ts = [threading.Thread(target=f) for f in (thread_a, thread_b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert seen == {"b after a left": ([1] * len(before), 1, True),
                    "after both": (before, 0, False)}
    assert _blas_threads() == before


def test_a_hold_in_another_python_thread_holds_blas_too(threads):
    """threadpoolctl 3.8 lets only the first thread that set OpenBLAS's (process-wide) limit
    set it again, until a `with` block of its own ends; the holds' limit()/restore calls never
    ended one, so after the main thread's first hold a hold in any other thread silently did
    nothing: a model run in a worker thread ran BLAS on 2 threads and gave other bits than
    in the main thread (logits differing in the last place, every gradient of a step)."""
    _need_threaded_blas()
    threads(2)
    model = CLLMModel(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2,
                                  n_embd=32), backend="numpy", dtype="float32", seed=0)
    idx = np.random.default_rng(0).integers(0, 64, size=(4, 16))
    seen = {}

    def run(where):
        with host_threads.single_threaded_blas():
            seen[where, "blas"] = _blas_threads()
        seen[where, "logits"] = model.logits(idx)
        seen[where, "grads"] = model.loss_and_grads(idx, idx)[1]

    run("main")
    worker = threading.Thread(target=run, args=("worker",))
    worker.start()
    worker.join(60)
    assert seen["worker", "blas"] == seen["main", "blas"] == [1] * len(_blas_threads())
    assert np.array_equal(seen["worker", "logits"], seen["main", "logits"])
    assert all(np.array_equal(g, seen["main", "grads"][k])
               for k, g in seen["worker", "grads"].items())
    assert max(_blas_threads()) >= 2   # given back


def _model_spying_on_blas_at(monkeypatch, threads, op_name):
    """A tiny NumPy model with 2 host threads, and the list that ops.<op_name> (not itself a
    threaded op: it sees only its callers' holds) appends BLAS's thread counts to at each call."""
    _need_threaded_blas()
    threads(2)
    model = CLLMModel(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2,
                                  n_embd=32), backend="numpy", seed=0)
    seen = []
    real = getattr(ops, op_name)

    def spy(*args, **kwargs):
        seen.append(_blas_threads())
        return real(*args, **kwargs)
    monkeypatch.setattr(ops, op_name, spy)
    return model, seen


def test_the_model_holds_blas_outside_a_training_step(monkeypatch, threads):
    """eval and sampling run forward / classifier without training_step's hold: they hold it
    themselves (BLAS's idle threads would otherwise spin between the ops' regions)."""
    model, seen = _model_spying_on_blas_at(monkeypatch, threads, "softmax_xent")
    idx = np.zeros((2, 16), dtype=np.int64)
    model.eval_loss_sum(idx, idx)
    assert seen and all(max(s) == 1 for s in seen)
    assert max(_blas_threads()) >= 2


def test_a_bad_thread_count_is_a_one_line_error(monkeypatch, threads):
    with pytest.raises(ValueError, match="positive integer"):
        host_threads.set_host_threads(0)
    monkeypatch.setattr(host_threads, "_count", None)
    monkeypatch.setenv(host_threads.ENV_VAR, "many")
    with pytest.raises(ValueError, match="CLLM_CPU_THREADS: expected a positive integer"):
        host_threads.host_threads()
    monkeypatch.setenv(host_threads.ENV_VAR, "3")
    assert host_threads.host_threads() == 3


def test_a_bad_count_in_the_environment_stops_train_with_one_line(tmp_path):
    env = dict(os.environ, CLLM_CPU_THREADS="0")
    r = subprocess.run([sys.executable, "-m", "cllm_gpu", "train", "--backend", "numpy",
                        "--max-steps", "1", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: CLLM_CPU_THREADS: expected a positive integer, got '0'"]


def test_a_bad_count_in_the_environment_leaves_the_run_overwrite_would_replace(tmp_path,
                                                                             token_dir):
    """The count was first read when the model was built, after --overwrite had deleted the
    run in --out: a run of ckpt-00000001 and metrics.jsonl was left empty by the refusal."""
    from cllm_gpu import GpuTrainer
    data = token_dir("the quick brown fox jumps over the lazy dog " * 40, "threads")
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    GpuTrainer(cfg, TrainConfig(batch_size=2, max_steps=1, eval_interval=0), data,
               tmp_path / "run", backend="numpy", log=lambda line: None).train()
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "ckpt-00000001" in before and "metrics.jsonl" in before, before
    r = subprocess.run([sys.executable, "-m", "cllm_gpu", "train", "--backend", "numpy",
                        "--max-steps", "1", "--data", str(data), "--out", str(tmp_path / "run"),
                        "--overwrite", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                        "--block-size", "16", "--batch-size", "2", "--eval-interval", "0"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, CLLM_CPU_THREADS="0"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: CLLM_CPU_THREADS: expected a positive integer, got '0'"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_the_start_up_line_names_the_thread_count(threads):
    from cllm_gpu.backend import describe_backend
    threads(3)
    assert "3 threads, CLLM_CPU_THREADS to change" in describe_backend("numpy")


def test_without_threadpoolctl_the_default_is_one_thread(monkeypatch, threads):
    monkeypatch.delenv(host_threads.ENV_VAR, raising=False)
    monkeypatch.setattr(host_threads, "_blas", False)   # what a failed import leaves
    monkeypatch.setattr(host_threads, "_count", None)
    assert host_threads.host_threads() == 1
    monkeypatch.setenv(host_threads.ENV_VAR, "2")       # asked for: still honoured
    monkeypatch.setattr(host_threads, "_count", None)
    assert host_threads.host_threads() == 2


def test_the_default_shares_the_cores_among_the_ranks_of_this_host(monkeypatch, threads):
    cores = host_threads._cores()
    monkeypatch.delenv(host_threads.ENV_VAR, raising=False)
    for var in host_threads.LOCAL_RANKS_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(host_threads, "_count", None)
    assert host_threads.host_threads() == cores
    monkeypatch.setattr(host_threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(host_threads.os, "cpu_count", lambda: 8)
    monkeypatch.setenv("MPI_LOCALNRANKS", "3")            # MPICH's Hydra
    monkeypatch.setattr(host_threads, "_count", None)
    assert host_threads.host_threads() == 2
    monkeypatch.delenv("MPI_LOCALNRANKS")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "16")  # Open MPI: more ranks than cores
    monkeypatch.setattr(host_threads, "_count", None)
    assert host_threads.host_threads() == 1
    # a launcher that bound each rank to its own cores: all of them are this rank's
    monkeypatch.setattr(host_threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(host_threads, "_count", None)
    assert host_threads.host_threads() == 4


# ---- every threaded op: the same bits at every thread count (shapes of several chunks/pieces)

def _run_at_each_count(threads, compute):
    results = []
    for n in THREAD_COUNTS:
        threads(n)
        results.append([np.array(a, copy=True) for a in compute()])
    for n, res in zip(THREAD_COUNTS[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], res)):
            assert np.array_equal(a, b), f"output {i} differs at {n} threads"


def _rng():
    return np.random.default_rng(7)


def test_gelu_is_bitwise_the_same_at_every_thread_count(threads):
    x0, d = _rng().standard_normal((2, 300, 512)).astype(np.float32)   # 3 chunks of 64 K
    bias = _rng().standard_normal(512).astype(np.float32)

    def compute():
        x, dbias = x0.copy(), np.zeros(512, np.float32)
        y = ops.gelu_forward(x, bias=bias)
        dx = ops.gelu_backward(d, x, dbias=dbias)
        return y, x, dx, dbias
    _run_at_each_count(threads, compute)


def test_layernorm_is_bitwise_the_same_at_every_thread_count(threads):
    # 9 chunks of 512 rows: column sums added in any order but the chunks' would show
    x, y, d, r = _rng().standard_normal((4, 4100, 256)).astype(np.float32)
    w, b, yb = _rng().standard_normal((3, 256)).astype(np.float32)

    def compute():
        s, out = np.empty_like(x), np.empty_like(x)
        mean, rstd = np.empty(4100, np.float32), np.empty(4100, np.float32)
        ops.residual_layernorm_forward(x, y, w, b, 1e-5, sum_out=s, out=out, mean=mean,
                                       rstd=rstd, y_bias=yb)
        dw, db = np.zeros(256, np.float32), np.zeros(256, np.float32)
        dx = ops.layernorm_backward(d, s, w, mean, rstd, dw, db, dresidual=r)
        return s, out, mean, rstd, dx, dw, db
    _run_at_each_count(threads, compute)


def test_adamw_is_bitwise_the_same_at_every_thread_count(threads):
    p0, g, m0, v0 = _rng().standard_normal((4, 200_003)).astype(np.float32)  # 4 chunks
    mask = (np.arange(p0.size) % 3 > 0).astype(np.float32)
    hyper = adamw_hyperparams(1e-3, 0.9, 0.95, 0.1, 3, grad_scale=0.5)

    def compute():
        p, m, v = p0.copy(), m0.copy(), np.abs(v0)
        ops.adamw_update(p, g, m, v, mask, hyper, 0.9, 0.95, 1e-8)
        return p, m, v
    _run_at_each_count(threads, compute)


def test_softmax_xent_is_bitwise_the_same_at_every_thread_count_and_as_one_chunk(threads):
    # 700 rows of 300 (218 rows per chunk: 4 chunks, the last one ragged), padded columns,
    # ignored rows, in place
    from cllm_gpu.ops.softmax_xent import _softmax_xent_rows
    logits = (_rng().standard_normal((700, 300)) * 4).astype(np.float32)
    targets = _rng().integers(-1, 290, size=700)

    def compute():
        lg = logits.copy()
        losses, dlogits = ops.softmax_xent(lg, targets, 1 / 700, dlogits=lg, vocab_size=290)
        return losses, dlogits, ops.softmax_xent(logits, targets, 0.5, need_grad=False)[0]
    _run_at_each_count(threads, compute)
    whole = _softmax_xent_rows(logits.copy(), targets, 1 / 700, vocab_size=290)
    for a, b in zip(whole, compute()):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_dropout_is_bitwise_the_same_at_every_thread_count(threads):
    x = _rng().standard_normal((300, 702)).astype(np.float32)  # 4 chunks; the last one ragged
    key = ops.DropoutKey(seed=5, step=3, site=ops.site_id(1, ops.MLP_RESID))

    def compute():
        out, dbias = np.empty_like(x), np.zeros(702, np.float32)
        ops.dropout_bias_backward(x, 0.2, key, out, dbias)
        return ops.dropout(x, 0.2, key), out, dbias
    _run_at_each_count(threads, compute)


@pytest.mark.parametrize("trans_a,trans_b,accumulate,bf16",
                         [(False, False, False, False), (True, False, True, False),
                          (False, True, False, False), (False, True, True, True),
                          (False, False, False, True)])
def test_gemm_and_linear_are_bitwise_the_same_at_every_thread_count(threads, trans_a, trans_b,
                                                                    accumulate, bf16):
    # 640 x 256 x 160 = 26 M multiply-adds: split (>= 2^24) into up to 6 pieces of 2^22
    rng = _rng()
    a = rng.standard_normal((640, 256)).astype(np.float32)
    b = rng.standard_normal((256, 160)).astype(np.float32)
    c0 = rng.standard_normal((640, 160)).astype(np.float32)
    w = rng.standard_normal((256, 160)).astype(np.float32)
    if bf16:
        a, b, w = ops.to_bf16(a), ops.to_bf16(b), ops.to_bf16(w)
    a_op, b_op = (a.T.copy() if trans_a else a), (b.T.copy() if trans_b else b)

    def compute():
        c = ops.to_bf16(c0) if bf16 else c0.copy()
        ops.gemm(a_op, b_op, c, trans_a=trans_a, trans_b=trans_b, accumulate=accumulate)
        dw, db = np.ones((256, 160), np.float32), np.zeros(160, np.float32)
        dx = ops.linear_backward(c0 if not bf16 else ops.to_bf16(c0), a, w, dw,
                                 None if bf16 else db)
        return c, dw, db, dx
    _run_at_each_count(threads, compute)


def test_a_narrow_deep_gemm_gives_the_same_bits_on_32_threads(threads):
    """Pieces stay >= 2^22 multiply-adds: smaller ones (64 rows of this product, at 17+
    threads) went to other BLAS kernels and rounded differently."""
    rng = _rng()
    a = rng.standard_normal((2048, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 8)).astype(np.float32)
    outs = []
    for n in (1, 32):
        threads(n)
        outs.append(ops.gemm(a, b, np.empty((2048, 8), np.float32)))
    assert np.array_equal(outs[0], outs[1])


def test_gemm_and_linear_refuse_an_out_that_overlaps_an_input():
    a = np.ones((64, 64), np.float32)
    with pytest.raises(ValueError, match="out overlaps an operand"):
        ops.gemm(a, a[:, :64], a)
    w, dw = np.ones((64, 32), np.float32), np.zeros((64, 32), np.float32)
    d = np.ones((64, 64), np.float32)
    with pytest.raises(ValueError, match="dx: must not overlap"):
        ops.linear_backward(d[:, :32].copy(), d, w, dw, dx=d)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_is_bitwise_the_same_at_every_thread_count(threads, precision):
    B, T, H, D = 3, 256, 4, 16   # 3 batch groups (one element's scores fill the 512 KB)
    qkv = _rng().standard_normal((B, T, 3 * H * D)).astype(np.float32)
    dout = _rng().standard_normal((B, T, H * D)).astype(np.float32)
    slopes = ops.attention_slopes("alibi", H).astype(np.float32) if precision == "fp32" else None

    def compute():
        out, lse = ops.attention_forward(qkv, H, precision=precision, slopes=slopes)
        dqkv = ops.attention_backward(dout, qkv, out, lse, H, precision=precision,
                                      slopes=slopes)
        return out, lse, dqkv
    _run_at_each_count(threads, compute)


def test_a_training_step_is_bitwise_the_same_at_every_thread_count(threads):
    # GELU in 4 chunks, AdamW in 7, the larger GEMMs in pieces (2 threads: the backward's side
    # by side); dropout on
    cfg = ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=128,
                      dropout=0.1)
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 64, size=(8, 65)) for _ in range(2)]

    def compute():
        model = CLLMModel(cfg, backend="numpy", dtype="float32", seed=0)
        tc = TrainConfig(batch_size=8, learning_rate=1e-3, min_lr=1e-4)
        sv = StepValues(model.xp)
        for step, a in enumerate(batches, start=1):
            batch = model.check_batch(a[:, :-1], a[:, 1:])
            sv.set_inputs(tc, 1e-3, step, batch.n_valid)
            training_step(model, [model.set_batch(batch)], tc, sv)
        return model.params.data, model.adam_m.data, model.adam_v.data, sv.outputs()
    _run_at_each_count(threads, compute)


def test_cpu_benchmark_records_name_the_thread_count(tmp_path):
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "bench.jsonl"
    r = subprocess.run([sys.executable, str(root / "scripts" / "bench.py"), "--device", "cpu",
                        "--configs", "micro", "--steps", "2", "--rounds", "1", "--warmup", "1",
                        "--no-torch", "--out", str(out)],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, CLLM_CPU_THREADS="3"))
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["cpu_threads"] == 3 and rec["cllm"]["tokens_per_s"] > 0


def test_a_training_step_holds_blas_at_one_thread_through_its_optimizer(monkeypatch, threads):
    """training_step holds BLAS at one thread for the whole step, past the forward and the
    classifier (which hold it themselves): the gradient norm, the clip and AdamW too (mutation
    audit: the step without its hold passed every other test)."""
    model, seen = _model_spying_on_blas_at(monkeypatch, threads, "clip_factor")
    tc = TrainConfig()
    batch = model.check_batch(np.zeros((2, 16), dtype=np.int64), np.ones((2, 16), dtype=np.int64))
    sv = StepValues(np)
    sv.set_inputs(tc, 1e-3, 1, batch.n_valid)
    training_step(model, [model.set_batch(batch)], tc, sv)
    assert len(seen) == 1 and max(seen[0]) == 1
    assert max(_blas_threads()) >= 2


def test_a_training_steps_blas_calls_do_not_depend_on_the_thread_count(threads, monkeypatch):
    """The bitwise tests above pass on any CPU whose BLAS rounds a row the same wherever it
    falls in a call, as Skylake-X's OpenBLAS kernels did while gemm still cut rows by the
    thread count; on Haswell/Zen kernels they failed. This one holds on every CPU: the calls
    a training step makes to np.matmul (each stacked product counted as its matrices: NumPy
    makes one BLAS call per matrix) are the same multiset at every thread count, so no row's
    bits can move with it."""
    from collections import Counter
    real_matmul = np.matmul
    calls = Counter()

    def recording_matmul(a, b, *args, **kwargs):
        a_, b_ = np.asarray(a), np.asarray(b)
        per_matrix = (a_.shape[-2:], b_.shape[-2:], a_.strides[-2:], b_.strides[-2:],
                      a_.dtype.str)
        calls[per_matrix] += int(np.prod(np.broadcast_shapes(a_.shape[:-2], b_.shape[:-2]),
                                         dtype=np.int64)) if a_.ndim > 2 or b_.ndim > 2 else 1
        return real_matmul(a, b, *args, **kwargs)

    cfg = ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=256,
                      dropout=0.1)
    a = np.random.default_rng(3).integers(0, 64, size=(16, 65))
    seen = []
    for n in THREAD_COUNTS:
        threads(n)
        model = CLLMModel(cfg, backend="numpy", dtype="float32", seed=0)
        tc = TrainConfig(batch_size=16, learning_rate=1e-3, min_lr=1e-4)
        sv = StepValues(model.xp)
        batch = model.check_batch(a[:, :-1], a[:, 1:])
        sv.set_inputs(tc, 1e-3, 1, batch.n_valid)
        calls.clear()
        monkeypatch.setattr(np, "matmul", recording_matmul)
        try:
            training_step(model, [model.set_batch(batch)], tc, sv)
        finally:
            monkeypatch.setattr(np, "matmul", real_matmul)
        seen.append(Counter(calls))
    for n, got in zip(THREAD_COUNTS[1:], seen[1:]):
        assert got == seen[0], f"BLAS calls differ at {n} threads: {got - seen[0]} " \
                               f"in place of {seen[0] - got}"
    # the step's largest products are cut into several pieces (else this tests nothing)
    assert any(len(a) == 2 and a[0] < 16 * 64 and b == (256, 4 * 256) for a, b, *_ in seen[0])
