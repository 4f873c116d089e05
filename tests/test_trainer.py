import json
import math
import re
import shutil

import numpy as np
import pytest

from cllm_gpu import GpuTrainer, ModelConfig, TrainConfig
from cllm_gpu.backend import format_bytes, peak_tflops
from cllm_gpu.checkpoint import checkpoint_name
from cllm_gpu.errors import ConfigError, NonFiniteError
from cllm_gpu.train_step import StepValues
from cllm_gpu.trainer import RunClock, format_duration
from clihelp import strict_json_loads

TINY = ModelConfig(vocab_size=257, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def text_data(token_dir):
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    return token_dir(" ".join(np.random.default_rng(0).choice(words, size=4000)))


@pytest.fixture(scope="module")
def alphabet_data(token_dir):
    return token_dir("ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 400, "abc")


def quiet(*a, **k):
    pass


def test_lr_schedule_warmup_then_cosine():
    tc = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert tc.lr_at(0) == pytest.approx(0.1) and tc.lr_at(9) == pytest.approx(1.0)
    assert tc.lr_at(10) == pytest.approx(1.0)
    assert tc.lr_at(60) == pytest.approx(0.55)
    assert tc.lr_at(110) == pytest.approx(0.1) and tc.lr_at(500) == pytest.approx(0.1)
    lrs = [tc.lr_at(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_toy_next_letter_task_learned_to_100_percent(alphabet_data, tmp_path):
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=32)
    tc = TrainConfig(batch_size=8, max_steps=150, learning_rate=1e-2, min_lr=1e-3, warmup_steps=10,
                     eval_interval=0, log_interval=50)
    tr = GpuTrainer(cfg, tc, alphabet_data, tmp_path, backend="numpy", log=quiet)
    tr.train()
    idx, tgt = tr.data.get_batch("val", 16, 16, np.random.default_rng(9))
    pred = tr.model.logits(idx).argmax(-1)
    assert (pred == tgt).mean() == 1.0
    assert tr.sample("ABC", 10, temperature=0) == "ABCDEFGHIJKLM"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, MemoryError])
def test_a_set_up_stopped_after_it_made_the_run_directory_removes_it(text_data, tmp_path,
                                                                     monkeypatch, stop):
    """A set-up stopped after it made a new --out (a Ctrl-C or an error while the model is
    built) removes the run directory and the parents it made, its lock released first (mutation
    audit: without either cleanup, or without the record of the directories made, every test
    passed in one process, and the new directories stayed, .train-lock in them)."""
    import cllm_gpu.trainer as trainer

    def stopped(*a, **k):
        raise stop()
    monkeypatch.setattr(trainer, "CLLMModel", stopped)
    out = tmp_path / "new" / "run"
    tc = TrainConfig(batch_size=2, max_steps=1, eval_interval=0)
    with pytest.raises(stop):
        GpuTrainer(TINY, tc, text_data, out, backend="numpy", log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_a_second_train_call_takes_the_run_directorys_lock_again(text_data, tmp_path):
    """train() releases the run directory's lock at its end; a second train() of the same
    trainer takes it again, and is refused where another train holds it meanwhile (mutation
    audit: not taking it again, or going on without it, passed every test in one process)."""
    from cllm_gpu.errors import ConfigError
    from cllm_gpu.trainer import lock_run_dir, unlock_run_dir
    tc = TrainConfig(batch_size=2, max_steps=2, eval_interval=0, checkpoint_interval=0)
    tr = GpuTrainer(TINY, tc, text_data, tmp_path, backend="numpy", log=quiet)
    assert tr.train(max_steps=1)["step"] == 1
    other = lock_run_dir(tmp_path)  # another train's, now writing to the run directory
    try:
        with pytest.raises(ConfigError, match="another train .* is writing to this run "
                                              "directory"):
            tr.train(max_steps=2)
        assert tr.step == 1
    finally:
        unlock_run_dir(other, tmp_path)
    assert tr.train(max_steps=2)["step"] == 2


def test_the_run_directorys_lock_holds_its_holders_pid_alone(tmp_path):
    """A lock file left by a killed train (its pid in it) is taken over, and then names the
    new holder only (mutation audit: appending to it passed every test; a refused train then
    named 'pid 99999\\n<pid>')."""
    import os
    from cllm_gpu.trainer import RUN_LOCK, lock_run_dir, unlock_run_dir
    (tmp_path / RUN_LOCK).write_text("99999\n")
    held = lock_run_dir(tmp_path)
    try:
        assert (tmp_path / RUN_LOCK).read_text() == f"{os.getpid()}\n"
    finally:
        unlock_run_dir(held, tmp_path)


def test_a_lock_file_removed_by_its_holder_meanwhile_is_not_the_one_held(tmp_path,
                                                                        monkeypatch):
    """A holder that ends removes the lock file while it still holds it: a train that opened
    the file before then gets the lock of a file no longer there, which a third train would
    not meet. It opens the file again, and holds the one named .train-lock (mutation audit:
    keeping the removed file's lock passed every test)."""
    import fcntl
    import os
    from cllm_gpu.errors import ConfigError
    from cllm_gpu.trainer import RUN_LOCK, lock_run_dir, unlock_run_dir
    real_flock, calls = fcntl.flock, []

    def holder_ends_first(fd, op):
        calls.append(op)
        if len(calls) == 1:  # the holder removes the file we opened, then releases it
            (tmp_path / RUN_LOCK).unlink()
        return real_flock(fd, op)
    (tmp_path / RUN_LOCK).write_text("")
    monkeypatch.setattr(fcntl, "flock", holder_ends_first)
    held = lock_run_dir(tmp_path)
    monkeypatch.setattr(fcntl, "flock", real_flock)
    try:
        assert len(calls) == 2
        assert os.stat(tmp_path / RUN_LOCK).st_ino == os.fstat(held.fileno()).st_ino
        with pytest.raises(ConfigError, match="another train"):
            lock_run_dir(tmp_path)
    finally:
        unlock_run_dir(held, tmp_path)


def test_a_second_signal_of_another_kind_under_a_launcher_exits_at_once():
    """Under a launcher a repeat of the first signal within a second is that one stop, sent
    twice (directly and forwarded); another signal (a Ctrl-C after a SIGTERM) is a second
    one: exit at once (mutation audit: taking any second signal within the second for the
    first's repeat passed every test)."""
    import signal
    import time
    import types
    from cllm_gpu.trainer import GpuTrainer
    tr = types.SimpleNamespace(_launched=True, _stop_signal=signal.SIGTERM,
                               _signal_at=time.monotonic(), log=quiet)
    assert GpuTrainer._on_signal(tr, signal.SIGTERM, None) is None  # the same one, again
    with pytest.raises(KeyboardInterrupt):
        GpuTrainer._on_signal(tr, signal.SIGINT, None)


def test_accumulation_equals_big_batch_float64(text_data, tmp_path):
    def run(B, K, out):
        tc = TrainConfig(batch_size=B, grad_accum_steps=K, max_steps=1, eval_interval=0,
                         dtype="float64", warmup_steps=0, grad_clip=0.0)
        tr = GpuTrainer(TINY, tc, text_data, out, backend="numpy", log=quiet)
        tr.train_step()
        return tr.model.state_dict()
    a, b = run(8, 1, tmp_path / "a"), run(2, 4, tmp_path / "b")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-14, err_msg=k)


def test_resume_is_exact_float64(text_data, tmp_path):
    kw = dict(batch_size=4, max_steps=12, eval_interval=5, eval_batches=2, log_interval=1,
              checkpoint_interval=6, dtype="float64", warmup_steps=3)
    full = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path / "full", backend="numpy",
                      log=quiet).train()
    part = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path / "part", backend="numpy",
                      log=quiet).train(max_steps=6)
    assert part["losses"] == full["losses"][:6]
    rest = GpuTrainer(None, TrainConfig(**kw), text_data, tmp_path / "part", backend="numpy",
                      resume=tmp_path / "part", log=quiet).train()
    assert part["losses"] + rest["losses"] == full["losses"]  # bit-identical, step for step
    assert rest["val_loss"] == full["val_loss"]


def test_best_val_loss_of_the_whole_run_survives_a_resume(text_data, tmp_path):
    """The summary's best validation loss is the run's, not only the evaluations since the
    resume: a high learning rate makes the loss rise after its first steps, so the best
    evaluation falls before the resume. It agrees with what plot reads from metrics.jsonl. A
    checkpoint written before state.json carried the best still resumes (best: the evaluations
    since)."""
    from cllm_gpu.plot import read_metrics
    kw = dict(batch_size=2, max_steps=8, eval_interval=1, eval_batches=2, log_interval=1,
              checkpoint_interval=4, dtype="float64", warmup_steps=0, learning_rate=3.0,
              min_lr=3.0, grad_clip=0.0)
    full = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path / "full", backend="numpy",
                      log=quiet).train()
    # what makes this test: the best is before the resume, and is not the last before it
    assert full["best_val_step"] < 4
    GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path / "part", backend="numpy",
               log=quiet).train(max_steps=4)
    lines = []
    rest = GpuTrainer(None, TrainConfig(**kw), text_data, tmp_path / "part", backend="numpy",
                      resume=tmp_path / "part", log=lines.append).train()
    assert (rest["best_val_loss"], rest["best_val_step"]) == (full["best_val_loss"],
                                                              full["best_val_step"])
    assert f"best val loss {full['best_val_loss']:.4f} (step {full['best_val_step']})" \
        in lines[-1]
    evals = read_metrics(tmp_path / "part")["eval"]
    assert [r["step"] for r in evals] == list(range(1, 9))
    assert min((r["val_loss"], r["step"]) for r in evals) == (rest["best_val_loss"],
                                                              rest["best_val_step"])
    # the checkpoint at step 8 carries it on to a later resume
    state = json.loads((tmp_path / "part" / "ckpt-00000008" / "state.json").read_text())
    assert (state["best_val_loss"], state["best_val_step"]) == (full["best_val_loss"],
                                                                full["best_val_step"])

    old = tmp_path / "part" / "ckpt-00000004" / "state.json"
    state = json.loads(old.read_text())
    del state["best_val_loss"], state["best_val_step"]
    (tmp_path / "old").mkdir()
    import shutil
    shutil.copytree(old.parent, tmp_path / "old" / old.parent.name)
    (tmp_path / "old" / old.parent.name / "state.json").write_text(json.dumps(state))
    back = GpuTrainer(None, TrainConfig(**kw), text_data, tmp_path / "old", backend="numpy",
                      resume=tmp_path / "old", log=quiet).train()
    assert back["losses"] == rest["losses"]
    since = [r for r in evals if r["step"] > 4]
    assert (back["best_val_loss"], back["best_val_step"]) == min(
        (r["val_loss"], r["step"]) for r in since)


def test_weight_decay_only_on_2d_weights(text_data, tmp_path):
    tc = TrainConfig(batch_size=2, max_steps=1, eval_interval=0, weight_decay=0.5,
                     learning_rate=0.1, min_lr=0.0, warmup_steps=0, dtype="float64")
    tr = GpuTrainer(TINY, tc, text_data, tmp_path, backend="numpy", log=quiet)
    m = tr.model
    m.params.data[:] = 1.0
    tr.rng = np.random.default_rng(0)
    # zero gradient everywhere: only weight decay can move a parameter
    m.forward = lambda B, T, dropout=None: None
    m.classifier = lambda B, T, dloss=None: 0.0
    m.backward = lambda B, T: None
    tr.train_step()
    for s in m.specs:
        v = m.params[s.name]
        if len(s.shape) == 2:
            np.testing.assert_allclose(v, 1 - 0.1 * 0.5, err_msg=s.name)
        else:
            np.testing.assert_array_equal(v, 1.0, err_msg=s.name)


def test_grad_clip_bounds_the_update(text_data, tmp_path):
    tc = TrainConfig(batch_size=2, max_steps=1, eval_interval=0, grad_clip=1e-3, dtype="float64")
    tr = GpuTrainer(TINY, tc, text_data, tmp_path, backend="numpy", log=quiet)
    tr.train_step()
    r, = tr._resolve()
    assert r["grad_norm"] > 1e-3  # reported norm is the pre-clip norm
    # Adam's first step is sign-like, so check the moment instead: m = (1 - beta1) * clipped g
    m_norm = float(np.linalg.norm(tr.model.adam_m.data)) / (1 - tc.beta1)
    assert m_norm == pytest.approx(1e-3, rel=1e-3)


def test_metrics_log_and_progress(text_data, tmp_path):
    lines = []
    tc = TrainConfig(batch_size=2, max_steps=4, eval_interval=2, eval_batches=1, log_interval=2)
    summary = GpuTrainer(TINY, tc, text_data, tmp_path, backend="numpy", log=lines.append).train()
    progress = [l for l in lines if "tok/s" in l and "ms/step" in l and "lr" in l]
    assert len(progress) == 3
    assert all(re.search(r" \| elapsed \d+s \| eta \d+s$", l) for l in progress), progress
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 2, 4]
    assert [r["step"] for r in recs if r["type"] == "eval"] == [2, 4]
    assert all(math.isfinite(r["tokens_per_s"]) for r in recs if r["type"] == "train")
    assert recs[0]["type"] == "start" and recs[0]["step"] == 0  # where this run starts
    assert [r["tokens"] for r in recs] == [0, 32, 64, 64, 128, 128]  # 2 x 16 tokens a step
    # one summary line at the end: tokens, wall time, best validation loss, throughput
    best = min((r["val_loss"], r["step"]) for r in recs if r["type"] == "eval")
    assert lines[-1] == (f"summary: 4 steps in {format_duration(summary['wall_s'])} | 128 tokens "
                         f"seen | best val loss {best[0]:.4f} (step {best[1]}) | "
                         f"{summary['tokens_per_s']:,.0f} tok/s mean")
    assert summary["tokens_seen"] == 128 and summary["best_val_loss"] == best[0]
    assert summary["mfu"] is None  # MFU only on a GPU of known peak


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (187, "3m07s"), (3599, "59m59s"),
    (3600, "1h00m"), (7500, "2h05m"), (86399, "23h59m"), (86400, "1d00h"), (273600, "3d04h"),
    (math.nan, "?"), (math.inf, "?"), (-1, "?")])
def test_duration_format(seconds, text):
    assert format_duration(seconds) == text


def test_eta_and_summary_from_the_run_clock():
    """ETA = elapsed / steps done in this call x steps left; evaluation and checkpoint time
    counts in the ETA, not in the throughput; MFU shown where the trainer knows the peak."""
    t = [100.0]
    clock = RunClock(step=10, max_steps=110, tokens=1000, now=lambda: t[0])
    assert clock.progress(10) == "elapsed 0s | eta ?"
    t[0] = 110.0
    assert clock.progress(20) == "elapsed 10s | eta 1m30s"
    for step, loss in ((20, 2.5), (30, 2.0), (40, 2.2), (45, math.nan)):
        clock.val_loss(step, loss)
    with clock.aside():
        t[0] = 114.0
    t[0] = 120.0
    totals = clock.summary(40, 33_000, lambda tps: (tps / 8000, "bf16 989.4 TFLOP/s"))
    assert totals["tokens_per_s"] == 2000.0  # 32,000 tokens in 20 s - 4 s aside
    assert RunClock.summary_line(totals) == (
        "summary: 30 steps in 20s | 33,000 tokens seen | best val loss 2.0000 (step 30) | "
        "2,000 tok/s mean | MFU 25.0% of bf16 989.4 TFLOP/s")
    assert RunClock.summary_line(RunClock(0, 1, 0, now=lambda: 0.0).summary(
        0, 0, lambda tps: None)).startswith("summary: 0 steps in 0s | 0 tokens seen | no "
                                            "validation pass")
    assert RunClock.summary_line(RunClock(0, 1, 0, now=lambda: 0.0).summary(
        1, 64, lambda tps: None)).startswith("summary: 1 step in 0s")  # was "1 steps"


def test_peak_flops_by_gpu_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "fp32") == 19.5
    assert peak_tflops("Tesla T4", "fp32") is None
    assert peak_tflops("NVIDIA H200", "bf16") == 989.4  # the lent machine's name (SXM)
    # the H100 PCIe card clocks lower: it took the SXM board's 989.4; the NVL cards too
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert peak_tflops("NVIDIA H100 PCIe", "fp32") == 51.0
    assert peak_tflops("NVIDIA H100 NVL", "bf16") is None
    assert peak_tflops("NVIDIA H200 NVL", "bf16") is None


def _poison_after(tr, bad_steps):
    """Make the loss and one gradient non-finite on the given (0-based) optimizer steps."""
    orig = tr.model.classifier

    def classifier(B, T, dloss=None):
        s = orig(B, T, dloss)
        if tr.step in bad_steps:
            tr.model.grads["transformer.h.1.mlp.c_fc.weight"][0, 0] = np.nan
            return s * np.nan
        return s
    tr.model.classifier = classifier


def test_nonfinite_stop_saves_last_good_state(text_data, tmp_path):
    """The 4th step is non-finite: its update is not applied, it still counts as a step (as on
    the GPU, where the host learns of it later), and the run stops with a checkpoint of the
    unchanged state."""
    tc = TrainConfig(batch_size=2, max_steps=6, eval_interval=0, on_nonfinite="stop",
                     log_interval=1)
    tr = GpuTrainer(TINY, tc, text_data, tmp_path, backend="numpy", log=quiet)
    _poison_after(tr, {3})
    before = None
    with pytest.raises(NonFiniteError, match=r"step 4.*h\.1\.mlp\.c_fc\.weight"):
        orig_step = tr.train_step

        def step():
            nonlocal before
            before = tr.model.state_dict()
            return orig_step()
        tr.train_step = step
        tr.train()
    assert tr.step == 4
    after = tr.model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # bad step not applied
    assert (tmp_path / "ckpt-00000004" / "state.json").exists()


def test_nonfinite_skip_continues_up_to_limit(text_data, tmp_path):
    lines = []
    tc = TrainConfig(batch_size=2, max_steps=5, eval_interval=0, on_nonfinite="skip",
                     max_nonfinite_skips=2)
    tr = GpuTrainer(TINY, tc, text_data, tmp_path, backend="numpy", log=lines.append)
    _poison_after(tr, {1, 2})        # the 2nd and 3rd steps
    summary = tr.train()
    assert summary["step"] == 5 and len(summary["losses"]) == 3
    assert sum("batch skipped" in l for l in lines) == 2
    assert tr.nonfinite_skips == 2


def test_a_skipped_log_step_neither_lends_its_number_nor_slows_the_throughput(
        text_data, tmp_path, monkeypatch):
    """With --on-nonfinite skip, a log step whose batch is skipped was logged as that step with
    the figures of the last good one: the record said step 6 with step 5's loss and learning
    rate, and the tokens seen after step 6. And the window counted its time but not its
    tokens: at exactly 1 s a step the line said 1,500 ms/step and 42.7 tok/s, not 1,000 and
    64. The record is now the last good step's (step, loss, lr, tokens seen after it), and the
    window counts every step it ran. The clock moves 1 s per training step, nowhere else."""
    import functools
    import time

    from cllm_gpu import trainer
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(trainer, "RunClock", functools.partial(RunClock, now=lambda: now[0]))
    tc = TrainConfig(batch_size=4, max_steps=6, eval_interval=0, log_interval=3,
                     on_nonfinite="skip", final_checkpoint=False)
    logged = []
    tr = GpuTrainer(TINY, tc, text_data, tmp_path, backend="numpy", log=logged.append)
    _poison_after(tr, {5})  # the 6th step, a log step
    step = tr.train_step

    def one_second_step():
        step()
        now[0] += 1.0
    tr.train_step = one_second_step
    tr.train()
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 3, 5]
    assert [r["lr"] for r in train] == [tc.lr_at(s - 1) for s in (1, 3, 5)]
    assert [r["tokens"] for r in train] == [64, 192, 320]  # 4 x 16 tokens a step
    assert all(r["ms_per_step"] == 1000 and r["tokens_per_s"] == 64 for r in train), train
    assert [r["step"] for r in recs if r["type"] == "nonfinite"] == [6]
    # the progress line, as the record, is the last good step's (mutation audit: the line
    # alone under the skipped step's number passed every test)
    assert [int(m[1]) for m in map(re.compile(r"step +(\d+)/6 \| loss ").match, logged)
            if m] == [1, 3, 5], logged


def test_cuda_graph_ignored_on_numpy_with_one_line_and_saved(text_data, tmp_path):
    kw = dict(batch_size=2, max_steps=3, eval_interval=0, dtype="float64", warmup_steps=1)
    lines = []
    a = GpuTrainer(TINY, TrainConfig(cuda_graph=True, **kw), text_data, tmp_path / "a",
                   backend="numpy", log=lines.append)
    assert a._graph is None
    assert sum("cuda_graph" in l and "ignored" in l for l in lines) == 1
    b = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path / "b", backend="numpy",
                   log=quiet)
    assert a.train()["losses"] == b.train()["losses"]
    state = json.loads((tmp_path / "a" / "ckpt-00000003" / "state.json").read_text())
    assert state["train_config"]["cuda_graph"] is True
    assert TrainConfig.from_dict(state["train_config"]).cuda_graph is True


def test_bias_settings_are_checkpointed_and_old_checkpoints_load_as_defaults(text_data, tmp_path):
    """A lattice / no-position model resumes bit-exactly with its settings from state.json; a
    checkpoint written before the fields existed (none in its model_config) resumes as
    attn_bias "none", pos_emb "learned"."""
    kw = dict(batch_size=2, max_steps=4, eval_interval=0, log_interval=1, checkpoint_interval=2,
              dtype="float64", warmup_steps=1)
    cfg = ModelConfig(**{**TINY.to_dict(), "attn_bias": "lattice", "pos_emb": "none"})
    full = GpuTrainer(cfg, TrainConfig(**kw), text_data, tmp_path / "full", backend="numpy",
                      log=quiet).train()
    GpuTrainer(cfg, TrainConfig(**kw), text_data, tmp_path / "part", backend="numpy",
               log=quiet).train(max_steps=2)
    rest = GpuTrainer(None, TrainConfig(**kw), text_data, tmp_path / "part", backend="numpy",
                      resume=tmp_path / "part", log=quiet)
    assert rest.model_cfg == cfg and "transformer.wpe.weight" not in rest.model.params.views
    assert full["losses"][2:] == rest.train()["losses"]

    old = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path / "old", backend="numpy",
                     log=quiet)
    old.train(max_steps=2)
    state_path = tmp_path / "old" / "ckpt-00000002" / "state.json"
    state = json.loads(state_path.read_text())
    for field in ("attn_bias", "pos_emb"):
        del state["model_config"][field]
    state_path.write_text(json.dumps(state))
    back = GpuTrainer(None, TrainConfig(**kw), text_data, tmp_path / "old", backend="numpy",
                      resume=tmp_path / "old", log=quiet)
    assert back.model_cfg == TINY and (TINY.attn_bias, TINY.pos_emb) == ("none", "learned")


def test_dropout_run_resumes_bitwise(text_data, tmp_path):
    """Masks are a function of (seed, step, site, micro-batch): a dropout run stopped at a
    checkpoint and resumed continues bit for bit as the uninterrupted run."""
    kw = dict(batch_size=2, max_steps=4, eval_interval=0, log_interval=1, checkpoint_interval=2,
              warmup_steps=1, grad_accum_steps=2)
    cfg = ModelConfig(**{**TINY.to_dict(), "dropout": 0.3})
    full = GpuTrainer(cfg, TrainConfig(**kw), text_data, tmp_path / "full", backend="numpy",
                      log=quiet).train()
    GpuTrainer(cfg, TrainConfig(**kw), text_data, tmp_path / "part", backend="numpy",
               log=quiet).train(max_steps=2)
    rest = GpuTrainer(None, TrainConfig(**kw), text_data, tmp_path / "part", backend="numpy",
                      resume=tmp_path / "part", log=quiet).train()
    assert full["losses"][2:] == rest["losses"]
    plain = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path / "plain", backend="numpy",
                       log=quiet).train()
    assert plain["losses"][1:] != full["losses"][1:]


def test_accumulated_micro_batches_draw_their_own_dropout_masks(text_data, tmp_path):
    """Dropout on, 2 micro-batches in one process: micro-batch k's masks are keyed (seed, step,
    site, k) (ops/dropout.py; k * W + rank with W ranks), so the step's loss and gradient are the
    means of two hand-built ones, micro-batch 0 through DropoutContext(seed, 1, 0) and micro-batch
    1 through DropoutContext(seed, 1, 1), and not those with both at micro 0 (mutation audit: a
    key of the rank alone, ignoring k, was caught only by the MPI test, which skips without
    MPI)."""
    import copy

    from cllm_gpu import CLLMModel
    from cllm_gpu.model import DropoutContext
    cfg = ModelConfig(**{**TINY.to_dict(), "dropout": 0.3})
    B, K = 2, 2
    tc = TrainConfig(batch_size=B, grad_accum_steps=K, max_steps=1, eval_interval=0, seed=7,
                     dtype="float64", warmup_steps=0, grad_clip=0.0)
    tr = GpuTrainer(cfg, tc, text_data, tmp_path, backend="numpy", log=quiet)
    ref = CLLMModel(cfg, backend="numpy", dtype="float64")
    ref.load_state_dict(tr.model.state_dict())
    idx, tgt = tr.data.get_batch("train", B * K, tr.T, copy.deepcopy(tr.rng))
    assert (tgt >= 0).all()  # every micro-batch counts B * T targets: the step's mean is the
    tr.train_step()          # mean of the micro-batches' means
    loss, grads = tr._resolve()[0]["loss"], tr.model.named_grads()

    def by_hand(micros):
        parts = [ref.loss_and_grads(idx[k * B:(k + 1) * B], tgt[k * B:(k + 1) * B],
                                    dropout=DropoutContext(tc.seed, 1, micro))
                 for k, micro in enumerate(micros)]
        return (sum(p[0] for p in parts) / K,
                {n: sum(p[1][n] for p in parts) / K for n in grads})

    want_loss, want = by_hand([0, 1])
    assert loss == pytest.approx(want_loss, rel=1e-12)
    for n in grads:
        np.testing.assert_allclose(grads[n], want[n], rtol=1e-10, atol=1e-13, err_msg=n)
    # the two micro-batches' masks differ: the same rows through micro 0 twice give another step
    same_loss, same = by_hand([0, 0])
    assert same_loss != pytest.approx(want_loss, rel=1e-6)
    assert not np.allclose(same["transformer.wte.weight"], want["transformer.wte.weight"],
                           rtol=1e-6, atol=0)


def test_no_final_checkpoint_leaves_none(text_data, tmp_path):
    """final_checkpoint=False (--no-final-checkpoint: profiling and benchmark runs) writes no
    checkpoint at the end; interval checkpoints are still written."""
    kw = dict(batch_size=2, eval_interval=0, final_checkpoint=False)
    GpuTrainer(TINY, TrainConfig(max_steps=3, **kw), text_data, tmp_path / "a", backend="numpy",
               log=quiet).train()
    assert not list((tmp_path / "a").glob("ckpt-*"))
    GpuTrainer(TINY, TrainConfig(max_steps=5, checkpoint_interval=2, **kw), text_data,
               tmp_path / "b", backend="numpy", log=quiet).train()
    assert sorted(p.name for p in (tmp_path / "b").glob("ckpt-*")) == ["ckpt-00000002",
                                                                        "ckpt-00000004"]
    # the interval's checkpoint at the last step too (it was left to the final one, which
    # final_checkpoint=False does not write: a run of 4 steps ended with ckpt-2 only)
    GpuTrainer(TINY, TrainConfig(max_steps=4, checkpoint_interval=2, **kw), text_data,
               tmp_path / "c", backend="numpy", log=quiet).train()
    assert sorted(p.name for p in (tmp_path / "c").glob("ckpt-*")) == ["ckpt-00000002",
                                                                        "ckpt-00000004"]


def test_overwrite_starts_metrics_over_in_a_run_dir_without_checkpoints(text_data, tmp_path):
    """--overwrite ("start over there") removed metrics.jsonl only beside checkpoints: after a
    run that saved none (--no-final-checkpoint, or killed before its first checkpoint) the new
    run's records were appended to the old run's (scripts/compare_torch.py, which overwrites
    without checkpoints, then read both runs' validation losses as one)."""
    kw = dict(batch_size=2, eval_interval=0, log_interval=2)
    GpuTrainer(TINY, TrainConfig(max_steps=6, final_checkpoint=False, **kw), text_data, tmp_path,
               backend="numpy", log=quiet).train()
    GpuTrainer(TINY, TrainConfig(max_steps=2, seed=5, **kw), text_data, tmp_path,
               backend="numpy", log=quiet, overwrite=True).train()
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 2]


@pytest.mark.ci_required("torch")
@pytest.mark.parametrize("warmup,decay,max_steps", [(10, 0, 110), (3, 40, 60)])
def test_lr_schedule_is_pytorchs_linear_warmup_then_cosine_annealing(warmup, decay, max_steps):
    """Every step's learning rate equals PyTorch's LinearLR (1/warmup -> 1 over the warm-up)
    followed by CosineAnnealingLR down to min_lr at lr_decay_steps (or max_steps), then min_lr.
    Mutation audit: a linear decay in place of the cosine passed the schedule test above (it
    checks the midpoint, where the two agree) and the PyTorch training test (whose 5 steps
    have their decayed rate at the midpoint too)."""
    torch = pytest.importorskip("torch")
    tc = TrainConfig(learning_rate=3e-3, min_lr=2e-4, warmup_steps=warmup,
                     lr_decay_steps=decay, max_steps=max_steps)
    end = decay or max_steps
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.learning_rate)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0,
                                          total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=end - warmup,
                                                   eta_min=tc.min_lr)], milestones=[warmup])
    for step in range(end + 1):  # past T_max PyTorch's cosine rises again: ours stays at min_lr
        assert tc.lr_at(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), step
        opt.step()
        sched.step()
    assert all(tc.lr_at(step) == tc.min_lr for step in range(end, max_steps + 5))


def _val_loss_reference(tr) -> float:
    """The mean next-token cross-entropy over eval_batches batches of the val split drawn with
    the evaluation's own stream (seed + 1), from the model's logits (log-sum-exp here)."""
    tc, rng = tr.train_cfg, np.random.default_rng(tr.train_cfg.seed + 1)
    losses = []
    for _ in range(tc.eval_batches):
        idx, tgt = tr.data.get_batch("val", tc.batch_size, tr.T, rng)
        z = tr.model.logits(idx).astype(np.float64)
        zmax = z.max(-1, keepdims=True)
        lse = (zmax + np.log(np.exp(z - zmax).sum(-1, keepdims=True)))[..., 0]
        losses.append(lse - np.take_along_axis(z, tgt[..., None], -1)[..., 0])
    return float(np.mean(losses))


def test_evaluation_is_the_mean_loss_of_eval_batches_val_batches_also_at_the_last_step(
        text_data, tmp_path):
    """evaluate(): the mean token loss over eval_batches batches of val.bin (not train.bin),
    the same batches every time; a run evaluates every eval_interval steps and at its last
    step, and reports that last evaluation. Mutation audit: evaluating train.bin, one batch
    fewer, dividing by one token fewer, and no evaluation at a last step that is not a multiple
    of eval_interval all passed the trainer tests."""
    tc = TrainConfig(batch_size=2, max_steps=5, eval_interval=2, eval_batches=3, log_interval=5,
                     dtype="float64", final_checkpoint=False)
    tr = GpuTrainer(TINY, tc, text_data, tmp_path, backend="numpy", log=quiet)
    summary = tr.train()
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "eval"] == [2, 4, 5]
    want = _val_loss_reference(tr)
    assert summary["val_loss"] == pytest.approx(want, rel=1e-12, abs=0)
    assert tr.evaluate() == summary["val_loss"]  # the same batches every time


def test_tokens_seen_counts_every_micro_batch_and_survives_a_resume(text_data, tmp_path):
    """tokens_seen: batch_size x seq_len x grad_accum_steps tokens a step, carried on by a
    resume. Mutation audit: counting one micro-batch a step, and a resume starting the count
    at 0, passed the trainer tests (their runs accumulate no micro-batches; no resume compared
    the count)."""
    kw = dict(batch_size=2, grad_accum_steps=3, max_steps=4, eval_interval=0,
              checkpoint_interval=2, log_interval=1)
    summary = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path, backend="numpy",
                         log=quiet).train(max_steps=2)
    assert summary["tokens_seen"] == 2 * (2 * 3 * 16)
    rest = GpuTrainer(None, TrainConfig(**kw), text_data, tmp_path, backend="numpy",
                      resume=tmp_path, log=quiet)
    assert rest.tokens_seen == 2 * (2 * 3 * 16)
    assert rest.train()["tokens_seen"] == 4 * (2 * 3 * 16)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in recs if r["type"] == "train"] == [96, 192, 288, 384]


def test_a_resume_keeps_counting_the_nonfinite_skips_toward_the_limit(text_data, tmp_path):
    """max_nonfinite_skips is the run's, not each process's: one skip before the checkpoint
    and one after it reach a limit of 1, and the run stops. Mutation audit: a resume starting
    the count at 0 passed the trainer, checkpoint and reliability tests."""
    kw = dict(batch_size=2, max_steps=4, eval_interval=0, on_nonfinite="skip",
              max_nonfinite_skips=1, checkpoint_interval=2)
    tr = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path, backend="numpy", log=quiet)
    _poison_after(tr, {0})
    tr.train(max_steps=2)
    assert tr.nonfinite_skips == 1
    rest = GpuTrainer(None, TrainConfig(**kw), text_data, tmp_path, backend="numpy",
                      resume=tmp_path, log=quiet)
    _poison_after(rest, {2})
    with pytest.raises(NonFiniteError, match="step 3"):
        rest.train()
    assert rest.nonfinite_skips == 2


def _checkpoint_steps(run_dir):
    return sorted(int(p.name.split("-")[1]) for p in run_dir.glob("ckpt-*"))


def test_a_nonfinite_stop_never_prunes_the_checkpoints_before_it(text_data, tmp_path):
    """A non-finite stop's checkpoint may hold weights that have already diverged (a loss that
    blew up before it turned NaN): the checkpoints before it stay, whatever
    --keep-checkpoints, for a resume from an earlier one; and a stop with no update since the
    checkpoint resumed writes none (that one is the last good state). Before, a resume of the
    diverged state with a lower learning rate stopped at once and saved it again as a new step,
    and every such try pruned one more good checkpoint: after two, only diverged ones were
    left (seen with the CLI: ckpt-6, 8 -> 8, 9 -> 9, 10)."""
    # log_interval 1: the figures are read at every step, so a stop comes at the bad step
    kw = dict(batch_size=2, max_steps=10, eval_interval=0, checkpoint_interval=2,
              keep_checkpoints=2, log_interval=1, grad_clip=0.0)
    tr = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path, backend="numpy", log=quiet)
    tr.train(max_steps=6)
    assert _checkpoint_steps(tmp_path) == [4, 6]

    def resume_and_poison(bad_steps):
        rest = GpuTrainer(None, TrainConfig(**kw), text_data, tmp_path, backend="numpy",
                          resume=tmp_path, log=quiet)
        _poison_after(rest, bad_steps)
        with pytest.raises(NonFiniteError) as e:
            rest.train()
        return str(e.value)

    # the first step after the resume: nothing applied since ckpt-00000006, nothing saved
    msg = resume_and_poison({6})
    assert f"{tmp_path / 'ckpt-00000006'} holds the last good state" in msg, msg
    assert "a lower --learning-rate (it was 7e-05 at this step) or --grad-clip 1;" in msg, msg
    assert _checkpoint_steps(tmp_path) == [4, 6]
    # step 7 applied, step 8 not: that state is saved, the older checkpoints are all kept
    msg = resume_and_poison({7})
    assert f"last good state saved to {tmp_path / 'ckpt-00000008'}" in msg, msg
    assert _checkpoint_steps(tmp_path) == [4, 6, 8]
    # the next ordinary save prunes to --keep-checkpoints again
    GpuTrainer(None, TrainConfig(**kw), text_data, tmp_path, backend="numpy", resume=tmp_path,
               log=quiet).train()
    assert _checkpoint_steps(tmp_path) == [8, 10]


def test_a_nonfinite_stop_saves_a_checkpoint_only_when_none_holds_the_state(text_data,
                                                                            tmp_path):
    """Two cases the resume test above does not reach. A bad step right after a checkpoint
    saved in the same run: nothing applied since, so no new checkpoint (the save itself, not
    only a resume, marks the state as held). A bad first step of a new run: there is no
    checkpoint yet, so the initial state is saved (the line must name one that exists)."""
    kw = dict(batch_size=2, max_steps=10, eval_interval=0, checkpoint_interval=2,
              log_interval=1, grad_clip=0.0)
    for out, bad, want in [("saved_in_the_run", 2, "holds"), ("first_step", 0, "saved")]:
        tr = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path / out, backend="numpy",
                        log=quiet)
        _poison_after(tr, {bad})
        with pytest.raises(NonFiniteError) as e:
            tr.train()
        held = tmp_path / out / checkpoint_name(max(bad, 1))
        assert (f"{held} holds the last good state" if want == "holds" else
                f"last good state saved to {held};") in str(e.value), str(e.value)
        assert _checkpoint_steps(tmp_path / out) == [max(bad, 1)]


def test_a_nonfinite_step_read_with_later_good_ones_saves_their_state(text_data, tmp_path):
    """The figures are read every --log-interval steps (on a GPU the steps run ahead of the
    host): a bad step may be learnt of together with good steps after it, whose updates are
    in the parameters. The stop then saves that state, even when the bad step itself came
    right after a checkpoint: here ckpt-4, then step 5 bad and steps 6 to 8 applied, all
    read at step 8."""
    kw = dict(batch_size=2, max_steps=12, eval_interval=0, checkpoint_interval=4,
              log_interval=4, grad_clip=0.0)
    tr = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path, backend="numpy", log=quiet)
    _poison_after(tr, {4})
    with pytest.raises(NonFiniteError, match="at step 5 ") as e:
        tr.train()
    msg = str(e.value)
    assert f"last good state saved to {tmp_path / checkpoint_name(8)};" in msg, msg
    assert _checkpoint_steps(tmp_path) == [4, 8]


class _PeerOfRank0:
    """Rank 0's side of a 2-rank communicator whose rank 1 is waiting for the checkpoint
    write (it passes no error): records what rank 0 tells it."""

    def __init__(self):
        from cllm_gpu.distributed import Communicator
        self.comm = type("TwoRanks", (Communicator,), {"size": 2,
                                                       "allgather_host": self._gather})()
        self.told = []  # rank 0's message of each agree ("" for none)
        self._length = None  # agree's first gather (each rank's length) seen, its second due

    def _gather(self, x, timeout=None):
        x = np.asarray(x)
        if self._length is None:  # the lengths: 4 bytes, big-endian
            self._length = int.from_bytes(bytes(x), "big")
            if not self._length:  # no rank has an error: no second gather
                self.told.append("")
                self._length = None
        else:
            self.told.append(bytes(x[:self._length]).decode())
            self._length = None
        return np.stack([x, np.zeros_like(x)])


@pytest.mark.parametrize("fails", [False, True])
def test_rank_0s_checkpoint_write_tells_the_waiting_ranks_how_it_went(tmp_path, monkeypatch,
                                                                      fails):
    """With several ranks, the others wait for rank 0's write with no time limit: rank 0 tells
    them it is done, or (a full disk) that it failed, so that they end even under a launcher
    that does not kill every rank when one fails. (Under mpiexec rank 0's MPI_Abort ends them
    anyway: test_distributed_mpi's failing-write test reaches this branch but passes without
    it.) Rank 0 itself raises its own error, not the CollectiveError the telling raises."""
    import contextlib
    import errno
    from types import SimpleNamespace
    from cllm_gpu import checkpoint as ckpt
    peer = _PeerOfRank0()
    rank0 = SimpleNamespace(world=2, comm=peer.comm, out_dir=tmp_path, step=7,
                            train_cfg=SimpleNamespace(keep_checkpoints=3),
                            _hold=lambda what: contextlib.nullcontext(), _state=lambda: {},
                            _run_dir_held=contextlib.nullcontext)
    if fails:
        def disk_full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ckpt, "save_checkpoint", disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            GpuTrainer._write_checkpoint(rank0, {}, {}, {})
        assert peer.told == ["rank 0 could not write the checkpoint of step 7 (OSError): see "
                             "rank 0's error"]
    else:
        monkeypatch.setattr(ckpt, "save_checkpoint", lambda run_dir, step, *a, **k:
                            run_dir / ckpt.checkpoint_name(step))
        assert GpuTrainer._write_checkpoint(rank0, {}, {}, {}) == tmp_path / "ckpt-00000007"
        assert peer.told == [""]


def test_a_diverged_runs_metrics_and_checkpoint_are_strict_json(text_data, tmp_path):
    """A diverged model (weights finite but so large that the logits overflow; every step
    non-finite and skipped) evaluates to a non-finite val loss: metrics.jsonl's eval record and
    state.json's val_loss held json.dumps' NaN, which jq and other strict parsers refuse. Now
    null, and the checkpoint resumes (tests/test_plot.py: plot reads null as it read NaN)."""
    tc = TrainConfig(batch_size=2, max_steps=2, eval_interval=1, eval_batches=1,
                     on_nonfinite="skip", log_interval=1)
    tr = GpuTrainer(TINY, tc, text_data, tmp_path, backend="numpy", log=quiet)
    sd = tr.model.state_dict()
    sd["transformer.ln_f.weight"][:] = 0.0
    sd["transformer.ln_f.bias"][:] = 3e38                 # logits past float32: inf
    sd["transformer.wte.weight"] *= 100
    tr.model.load_state_dict(sd)
    summary = tr.train()
    assert tr.nonfinite_skips == 2 and not math.isfinite(summary["val_loss"])
    records = [strict_json_loads(line)
               for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["val_loss"] for r in evals] == [None, None]
    state = strict_json_loads((tmp_path / "ckpt-00000002" / "state.json").read_text())
    assert state["val_loss"] is None and state["best_val_loss"] is None
    rest = GpuTrainer(None, TrainConfig(**{**tc.to_dict(), "max_steps": 3}), text_data, tmp_path,
                      backend="numpy", resume=tmp_path, log=quiet)
    assert rest.step == 2


def test_pcg64_words_are_checked_for_0_to_2_128_minus_1_whatever_numpy_does():
    """The resume's own range check of the PCG64 words (NumPy 1.x wraps a negative one, NumPy 2
    refuses it): the resume tests cannot tell it from NumPy 2's own refusal, so on NumPy 2 a
    check of one word only, or at 2^127, passed them. Both words, both ends of the range; a
    real state of the run's generator passes, and so does a state that is not PCG64's shape
    (NumPy's setter refuses that one)."""
    from cllm_gpu.trainer import _check_pcg64_words
    state = np.random.default_rng(3).bit_generator.state
    _check_pcg64_words(state)
    for key in ("state", "inc"):
        for ok in (0, 2**127, 2**128 - 1):
            _check_pcg64_words({**state, "state": {**state["state"], key: ok}})
        for bad in (-1, 2**128):
            with pytest.raises(ValueError, match=rf"^{key} {bad} is not in 0\.\.2\^128-1$"):
                _check_pcg64_words({**state, "state": {**state["state"], key: bad}})
    for odd in (None, [], {"state": None}, {"state": {"state": "x"}}):
        _check_pcg64_words(odd)


def test_the_final_sample_does_not_hold_the_training_activations(alphabet_data, tmp_path):
    """The end-of-run sample builds (1, t) caches (forward-only since 2026-12-03), which the
    memory check counts in place of the training cache, not beside it: with the training
    cache kept, the first sampled token held both (GPT-2 124M fp32:
    0.8 MiB per prompt token on top of the training cache, past the 256 MiB margin at ~300
    prompt tokens). The trainer releases its caches before sampling and after it: no forward
    of the sample sees the training shape's cache, the sample's last one is gone when it
    returns, and the training step after it builds its own again."""
    tc = TrainConfig(batch_size=4, max_steps=2, eval_interval=0, log_interval=1,
                     checkpoint_interval=0, final_checkpoint=False, warmup_steps=1)
    tr = GpuTrainer(TINY, tc, alphabet_data, tmp_path, backend="numpy", log=quiet)
    tr.train()
    m, alive = tr.model, []
    assert (4, TINY.block_size) in m._caches
    forward = m._forward

    def recording(c, dropout, **position):
        alive.append(sorted(m._caches, key=str))
        return forward(c, dropout, **position)
    m._forward = recording
    tr.sample("ABCDEFGHIJKL", 3, temperature=0)
    assert len(alive) == 3 and all((4, TINY.block_size) not in shapes for shapes in alive), alive
    # one (1, t) cache at a time: the prompt's prefill makes one, dropped before the
    # incremental decoder's steps (their (1, 1) buffers are the decoder's own); before
    # decoding each draw's forward dropped the previous draw's (before that, the model kept
    # it: two of them, twice what the memory check counts)
    assert [len(shapes) for shapes in alive] == [1, 0, 0], alive
    # nor is the sample's last cache held beside the next step's: the memory check counts
    # the training cache and the sample's one at a time
    assert m._caches == {}, list(m._caches)
    tr.train(max_steps=3)
    assert (4, TINY.block_size) in m._caches



def test_only_dead_trainers_write_tests_are_removed_and_one_taken_is_no_error(tmp_path,
                                                                              monkeypatch):
    """--out's write tests (.write-test-<pid>-<object id>): a trainer's set-up removes those of
    processes no longer running, not a running one's (the pid is the first number, not the
    object id after it); and its own probe removed by another before it could (a trainer in
    another container, pid 1 there too, takes it for an earlier process's) is no error.
    Mutation audit: the object id read as the pid, and the removal of a missing probe as an
    error ("output directory is not writable"), passed every test."""
    import os
    import types
    from pathlib import Path

    from cllm_gpu import trainer as trainer_mod
    out = tmp_path / "run"
    out.mkdir()
    live, gone = os.getppid(), 2**22 + 1   # running; past Linux's largest pid_max
    for name in (f".write-test-{gone}-{live}", f".write-test-{live}-{gone}"):
        (out / name).touch()
    trainer_mod._remove_dead_write_probes(out)
    assert [p.name for p in out.iterdir()] == [f".write-test-{live}-{gone}"]
    (out / f".write-test-{live}-{gone}").unlink()
    write_bytes = Path.write_bytes

    def taken_at_once(self, data):  # another trainer's clean-up, right after the write
        write_bytes(self, data)
        if self.name.startswith(".write-test-"):
            os.unlink(self)
    monkeypatch.setattr(Path, "write_bytes", taken_at_once)
    GpuTrainer._check_out_dir(types.SimpleNamespace(out_dir=out))
    assert list(out.iterdir()) == []


class _PastTheChecks(Exception):
    """Raised by _AgreeRecorder: the construction got past the checks of _setup."""


class _AgreeRecorder:
    """A 2-rank communicator that records the error a rank brings to its first agree() and
    stops the construction there (nothing past _setup's checks is needed). Its gathers give
    this rank's row for both ranks (the other rank, on the same host, read the same), or the
    rows given (what every rank sent)."""
    name, timeout = "recorder", None

    def __init__(self, rows=None):
        self.errors, self.rows = [], rows

    def abort(self):
        pass

    def allgather_host(self, x, timeout=None):
        if self.rows is not None:
            return np.asarray(self.rows, dtype=np.float64)
        return np.repeat(np.asarray(x)[None], 2, axis=0)

    def agree(self, error, timeout=None):
        self.errors.append(error)
        raise _PastTheChecks

    def __getattr__(self, name):  # any other use of a communicator: past the checks too
        raise _PastTheChecks


@pytest.fixture
def host_memory(tmp_path, monkeypatch):
    """set(n): the host has n bytes available (a /proc/meminfo of n // 1024 kB, no swap, no
    cgroup limit), as every reader of backend.available_memory sees it."""
    from cllm_gpu import backend
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr(backend, "MEMINFO", str(meminfo))
    monkeypatch.setattr(backend, "CGROUP_ROOT", str(tmp_path / "no-cgroup"))
    monkeypatch.setattr(backend, "SELF_CGROUP", str(tmp_path / "no-self-cgroup"))

    def set_available(n):
        assert n % 1024 == 0, n
        meminfo.write_text(f"MemTotal: {4 * n // 1024} kB\nMemAvailable: {n // 1024} kB\n"
                           f"SwapFree: 0 kB\n")
    return set_available


def _setup_errors(data_dir, out, tc, local_size, rank=0, final_sample=None, rows=None,
                  cfg=TINY):
    """The errors `rank` of 2 ranks (local_size of them on its host) brings to the set-up's
    agree() on the NumPy backend: [] when its checks passed. rows: what the ranks read of
    their hosts' memory (agree_host_memory's gather: available bytes, ranks on the host)."""
    from cllm_gpu import distributed
    comm = _AgreeRecorder(rows)
    with pytest.raises(_PastTheChecks):
        GpuTrainer(cfg, tc, data_dir, out, backend="numpy", log=quiet,
                   launch=distributed.Launch(rank, 2, rank % local_size, local_size, "none"),
                   comm=comm, final_sample=final_sample)
    return [e for e in comm.errors if e]


@pytest.mark.parametrize("local_size,refused", [(1, False), (2, True)])
def test_the_host_batch_check_counts_the_ranks_on_this_host(text_data, tmp_path, monkeypatch,
                                                            host_memory, local_size, refused):
    """Rank 0 of 2 ranks: the token ids of a step (2 rows x 800 micro-batches per rank here,
    each 17 int64 and the model's two int32 copies of 16) are held by each rank on its host,
    so the check counts the ranks on this host (Launch.local_size), not the world: the memory
    here holds one rank's ids (and its model), so 1 rank on this host trains and 2 are
    refused (they hold theirs in the same memory at once)."""
    from cllm_gpu import distributed
    monkeypatch.setattr(distributed, "Watchdog", lambda *a, **k: None)
    one_rank = 2 * 800 * (17 * 8 + 2 * 16 * 4)
    host_memory(2 * one_rank - 1024)
    tc = TrainConfig(batch_size=2, grad_accum_steps=800, max_steps=1, eval_interval=0)
    errors = _setup_errors(text_data, tmp_path / "run", tc, local_size)
    if refused:
        assert len(errors) == 1 and errors[0].startswith(
            "a batch of 3,200 sequences of 17 tokens needs"), errors
    else:
        assert errors == [], errors



def test_the_host_checks_take_the_figures_the_ranks_agreed_on(text_data, tmp_path, monkeypatch,
                                                              host_memory):
    """The host memory checks of a data-parallel set-up compare with the figures the ranks
    agreed on (agree_host_memory: the tightest host per rank, read before any rank allocated),
    never with a rank's own reading or its own host's rank count. Rank 0, 2 ranks on its host
    (room for 100 ranks' token ids), the other host 1 rank with room for 1.5 (its tighter
    share is what every rank checks, with its 1 rank: the ids fit); then memory read at the
    check lower than what was agreed (others had allocated by then). Mutation audit: the ids
    of this host's 2 ranks checked against the other host's memory, the memory read again at
    the batch check, and the model check without the agreed share (its refusal naming the
    whole host's memory) each passed every test."""
    from cllm_gpu import distributed
    monkeypatch.setattr(distributed, "Watchdog", lambda *a, **k: None)
    one_rank = 2 * 8000 * (17 * 8 + 2 * 16 * 4)  # a rank's ids: 2 rows x 8,000 micro-batches
    tc = TrainConfig(batch_size=2, grad_accum_steps=8000, max_steps=1, eval_interval=0)
    room = _training_need(TINY, tc, TINY.block_size, world=2)  # one rank's model and step
    assert room < one_rank  # the other host's 1.5 x one rank's ids hold its model and step
    roomy, tight = 100 * one_rank, one_rank * 3 // 2
    host_memory(-(-roomy // 1024) * 1024)
    assert _setup_errors(text_data, tmp_path / "run", tc, 2,
                         rows=[[roomy, 2], [roomy, 2], [tight, 1]]) == []
    # read now: one rank's ids, not the 2 ranks' of this host (the model, which CLLMModel
    # checks against the memory there as it is built, fits in it)
    host_memory(one_rank // 1024 * 1024)
    assert _setup_errors(text_data, tmp_path / "run", tc, 2, rows=[[roomy, 2]] * 2) == []
    # a model past the memory (also as read now): refused against the share agreed on
    host_memory(room // 8 // 1024 * 1024)
    tc = TrainConfig(batch_size=1, max_steps=1, eval_interval=0)
    errors = _setup_errors(text_data, tmp_path / "run", tc, 2, rows=[[room // 8, 2]] * 2)
    assert len(errors) == 1 and errors[0].startswith("the model does not fit"), errors
    assert "available to each of the 2 ranks on one host" in errors[0], errors


def _training_need(cfg, tc, T, world, sample=(0, 1)):
    """The least host memory check_training_fits passes one rank of `world` (bisection on the
    memory it is told is available); sample: the final sample's (tokens, prompt tokens)."""
    from cllm_gpu import model as model_mod
    from cllm_gpu.errors import ModelTooLargeError
    real = model_mod.available_memory
    lo, hi = 0, 1 << 40
    try:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            model_mod.available_memory = lambda xp: mid
            try:
                model_mod.check_training_fits(cfg, tc.dtype, tc.precision, np, tc.batch_size, T,
                                              tc.grad_accum_steps, world, tc.zero, None,
                                              *sample)
                lo, hi = lo, mid
            except ModelTooLargeError:
                lo, hi = mid, hi
    finally:
        model_mod.available_memory = real
    return hi


@pytest.mark.parametrize("batch_size", [2, 64])  # refused for the model / for its cache
@pytest.mark.parametrize("local_size,refused", [(1, False), (2, True)])
def test_the_numpy_memory_check_counts_every_rank_on_this_host(text_data, tmp_path, monkeypatch,
                                                                host_memory, batch_size,
                                                                local_size, refused):
    """Rank 0 of 2 ranks on the NumPy backend, the host's memory 1.5 x what one rank's model
    and step need: the ranks of one host take theirs from the same memory, so 2 of them there
    are refused (each checked only its own need against it and passed: the host killed both
    in step 1; seen failing before), 1 (the other rank on another host) trains. The line says
    what each rank has: its share of the host's memory."""
    from cllm_gpu import distributed
    monkeypatch.setattr(distributed, "Watchdog", lambda *a, **k: None)
    tc = TrainConfig(batch_size=batch_size, max_steps=1, eval_interval=0)
    need = _training_need(TINY, tc, TINY.block_size, world=2)
    host = -(-need * 3 // 2 // 1024) * 1024
    host_memory(host)
    errors = _setup_errors(text_data, tmp_path / "run", tc, local_size)
    if not refused:
        assert errors == [], errors
        return
    share = f"{format_bytes(host // 2)} of host memory is available to each of the 2 ranks"
    assert len(errors) == 1 and share in errors[0], errors
    assert ("use a smaller model" in errors[0]) == (batch_size == 2), errors
    assert (f"--batch-size {batch_size} at" in errors[0]) == (batch_size == 64), errors


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_counts_the_final_sample_in_the_memory_check(text_data, tmp_path,
                                                                 monkeypatch, host_memory, rank):
    """Rank 0 draws the end-of-run sample, the other ranks none: with a host (one rank on it)
    whose memory holds a training step of 1 x 4 tokens but not the 128-token context of the
    sample's last draw, rank 0 brings the sample's refusal to the set-up's agreement and
    rank 1 nothing (counting rank 0's sample too, a rank would refuse memory its step fits).
    (A 128-token block: at TINY's 16 the sample's forward-only cache is smaller than the NumPy
    model's build, which holds the float64 initial values.)"""
    from cllm_gpu import distributed
    monkeypatch.setattr(distributed, "Watchdog", lambda *a, **k: None)
    cfg = ModelConfig(**{**TINY.to_dict(), "block_size": 128})
    tc = TrainConfig(batch_size=1, seq_len=4, max_steps=1, eval_interval=0)
    fs = {"prompt": "a", "tokens": 128, "temperature": 0.8, "top_k": 40}
    need = _training_need(cfg, tc, 4, world=2)
    assert _training_need(cfg, tc, 4, world=2, sample=(128, 1)) > need + 1024
    host_memory(-(-need // 1024) * 1024)
    errors = _setup_errors(text_data, tmp_path / "run", tc, 1, rank=rank, final_sample=fs,
                           cfg=cfg)
    if rank:
        assert errors == [], errors
    else:
        assert len(errors) == 1 and errors[0].startswith(
            "the end-of-run sample does not fit: --sample-tokens 128 after a 1-token prompt "
            "reads up to 128 tokens at once, whose forward-only and key/value caches need "
            ), errors  # the NumPy backend's sample decodes with a key/value cache beside


def test_a_resumed_prompt_its_tokenizer_cannot_encode_counts_as_a_whole_block(tmp_path,
                                                                               monkeypatch):
    """A resumed run's final sample is the one its state.json records, not checked against the
    data's tokenizer (a checkpoint that records no tokenizer resumed on data prepared with
    another; here the record is edited): a prompt the tokenizer cannot encode counts as the
    block size, the most a context holds, so its 3-token sample reads up to 128 tokens and is
    refused where the memory holds only the training step (a prompt of one token would read
    3, less than the training cache's 4: passed). (A 128-token block: at TINY's 16, the NumPy
    model's build, which holds the float64 initial values, outweighs the sample's
    forward-only cache.)"""
    tk = pytest.importorskip("tokenizers")
    from cllm_gpu import model as model_mod
    from cllm_gpu.data import prepare
    from cllm_gpu.errors import ModelTooLargeError
    tok = tk.Tokenizer(tk.models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2}))
    tok.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "words.json"))
    (tmp_path / "t.txt").write_text("a b a a b " * 200)
    prepare(tmp_path / "t.txt", tmp_path / "tok", tokenizer=str(tmp_path / "words.json"))
    cfg = ModelConfig(**{**TINY.to_dict(), "block_size": 128})
    tc = TrainConfig(batch_size=1, seq_len=4, max_steps=1, eval_interval=0)
    fs = {"prompt": "a b", "tokens": 3, "temperature": 0.8, "top_k": 40}
    GpuTrainer(cfg, tc, tmp_path / "tok", tmp_path / "run", backend="numpy", log=quiet,
               final_sample=fs).train()
    state = tmp_path / "run" / checkpoint_name(1) / "state.json"
    recorded = json.loads(state.read_text())
    recorded["final_sample"]["prompt"] = "a zzz"   # no 'zzz' and no unknown token
    state.write_text(json.dumps(recorded))
    need = _training_need(cfg, tc, 4, world=1)
    monkeypatch.setattr(model_mod, "available_memory", lambda xp: need)
    with pytest.raises(ModelTooLargeError) as e:
        GpuTrainer(None, TrainConfig(batch_size=1, seq_len=4, max_steps=2, eval_interval=0),
                   tmp_path / "tok", tmp_path / "run", backend="numpy", log=quiet,
                   resume=tmp_path / "run")
    assert str(e.value).startswith("the end-of-run sample does not fit: --sample-tokens 3 "
                                   "after a 128-token prompt reads up to 128 tokens"), e.value
    assert "use a shorter --prompt, or --sample-tokens 0" in str(e.value), e.value


@pytest.mark.parametrize("final_sample", [
    {"prompt": "a", "tokens": 5, "temperature": math.inf, "top_k": 40},
    {"prompt": "a", "tokens": 5, "temperature": 0.8, "top_k": 0},
    {"prompt": 1, "tokens": 5, "temperature": 0.8, "top_k": None},
    "a",
    {}])  # empty, as falsy as None: still refused (mutation audit h29ad: `if final_sample:`)
def test_final_sample_the_checkpoints_would_refuse_is_refused_before_training(
        text_data, tmp_path, final_sample):
    """state.json records final_sample and a checkpoint with a malformed one is refused on
    resume: a library caller's bad one made every checkpoint of the run unresumable (the CLI
    checks its flags; GpuTrainer now checks its argument by the same rule, before any step)."""
    from cllm_gpu.errors import ConfigError
    tc = TrainConfig(batch_size=2, max_steps=1, eval_interval=0)
    with pytest.raises(ConfigError, match="final_sample must be"):
        GpuTrainer(TINY, tc, text_data, tmp_path / "run", backend="numpy", log=quiet,
                   final_sample=final_sample)
    assert not (tmp_path / "run").exists()


def test_a_valid_final_sample_is_recorded_and_resumed(text_data, tmp_path):
    fs = {"prompt": "ab", "tokens": 3, "temperature": 0.0, "top_k": None}
    tc = TrainConfig(batch_size=2, max_steps=1, eval_interval=0)
    GpuTrainer(TINY, tc, text_data, tmp_path / "run", backend="numpy", log=quiet,
               final_sample=fs).train()
    tr = GpuTrainer(TINY, TrainConfig(batch_size=2, max_steps=2, eval_interval=0), text_data,
                    tmp_path / "run", backend="numpy", log=quiet, resume=tmp_path / "run")
    assert tr.final_sample == fs


# ---- StepValues: the per-step scalars the host writes and reads (train_step.py)
def test_a_steps_inputs_are_adams_hyperparameters_the_loss_weight_the_step_and_the_count():
    """[lr, lr * weight_decay, 1 - beta1^t, 1 - beta2^t, grad scale 1 (the step's clip
    replaces it), 1 / n_valid, t, n_valid], outputs untouched (mutation audit: beta1 and beta2
    swapped in Adam's bias corrections passed every other test: every step compared there is
    another step through the same inputs)."""
    tc = TrainConfig(beta1=0.8, beta2=0.95, weight_decay=0.1)
    sv = StepValues(np)
    sv.set_inputs(tc, 3e-4, 7, 40)
    assert sv.buf.tolist() == [3e-4, 3e-4 * 0.1, 1 - 0.8 ** 7, 1 - 0.95 ** 7, 1.0, 1 / 40, 7.0,
                               40.0, 0.0, 0.0, 0.0]
    sv.set_inputs(tc, 3e-4, 1, 0)  # no valid target: a loss weight of 1, not a division by 0
    assert sv.buf[StepValues.DLOSS:StepValues.VALID + 1].tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("loss,norm,bad,nonfinite", [
    (2.5, 1.0, -1.0, False),
    (2.5, 1.0, 0.0, True),      # the arena's first element (mutation audit: bad > 0 unseen)
    (2.5, 1.0, 17.0, True),
    (math.nan, 1.0, -1.0, True),  # a non-finite loss with a finite norm (mutation audit: the
    (2.5, math.inf, -1.0, True),  # loss-and-norm test as loss-or-norm unseen), and the reverse
])
def test_read_outputs_calls_a_step_nonfinite_when_any_output_says_so(loss, norm, bad, nonfinite):
    got = StepValues.read_outputs(np.array([loss, norm, bad]))
    assert got["nonfinite"] is nonfinite and got["bad"] == int(bad)
    assert got["grad_norm"] == norm and (got["loss"] == loss or math.isnan(loss))


def test_the_python_api_refuses_wrong_types_in_one_line(text_data, tmp_path):
    """Arguments of the wrong type are ConfigErrors naming the argument, before any work: a
    ModelConfig's dict raised AttributeError ('dict' object has no attribute 'vocab_size'),
    evaluate('test') a KeyError, train(max_steps='3') a TypeError from a comparison,
    train(max_steps=2.5) ran to step 3, sample(None) an AttributeError from the tokenizer,
    log='train.log' a TypeError after --overwrite had emptied the run directory."""
    tc = TrainConfig(batch_size=2, max_steps=2, eval_interval=0, log_interval=1)
    with pytest.raises(ConfigError, match=r"^model_cfg must be a ModelConfig \(or None\), got "
                                          r"dict"):
        GpuTrainer(TINY.to_dict(), tc, text_data, tmp_path / "a", backend="numpy", log=quiet)
    with pytest.raises(ConfigError, match=r"^train_cfg must be a TrainConfig, got dict"):
        GpuTrainer(TINY, tc.to_dict(), text_data, tmp_path / "a", backend="numpy", log=quiet)
    assert not (tmp_path / "a").exists()
    tr = GpuTrainer(TINY, tc, text_data, tmp_path / "r", backend="numpy", log=quiet)
    with pytest.raises(ConfigError, match=r"^split must be 'train' or 'val', got 'test'"):
        tr.evaluate("test")
    for bad in ("3", 2.5, -1, True):
        with pytest.raises(ConfigError, match=r"^max_steps must be an integer >= 0, got "):
            tr.train(max_steps=bad)
    assert tr.step == 0 and not list((tmp_path / "r").glob("ckpt-*"))
    assert tr.train(max_steps=np.int64(1))["step"] == 1
    with pytest.raises(ConfigError, match=r"^prompt must be text \(str\), got None"):
        tr.sample(None, max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"^max_new_tokens must be an integer >= 0, got 2.5"):
        tr.sample("a", max_new_tokens=2.5)
    assert tr.sample("a", max_new_tokens=np.int64(2)).startswith("a")
    # the bound is >= 0 (mutation audit h42i: >= 1 passed): no step to go, no new token
    assert tr.train(max_steps=0)["step"] == 1
    assert tr.sample("a", max_new_tokens=0) == "a"
    # a log that is no callable was first called after --overwrite had deleted the old run
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    with pytest.raises(ConfigError, match=r"^log must be callable \(a function taking each "
                                          r"line\), got 'train.log'"):
        GpuTrainer(TINY, tc, text_data, tmp_path / "r", backend="numpy", log="train.log",
                   overwrite=True)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before


def test_the_python_api_refuses_wrong_paths_flags_and_seeds_in_one_line(text_data, tmp_path):
    """The arguments test_the_python_api_refuses_wrong_types_in_one_line left out: a path that
    is None or a number was a TypeError from pathlib, overwrite='no' (a truthy string) deleted
    the earlier run's checkpoints, and sample(seed=-1) or seed=1.5 was NumPy's ValueError or
    TypeError, not the one-line error docs/design.md promises."""
    tc = TrainConfig(batch_size=2, max_steps=1, eval_interval=0, log_interval=1)
    first = GpuTrainer(TINY, tc, text_data, tmp_path / "r", backend="numpy", log=quiet)
    first.train()
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    for kw, message in [
            (dict(data_dir=None), r"^data_dir must be a path \(str or os.PathLike\), got None"),
            (dict(out_dir=3), r"^out_dir must be a path \(str or os.PathLike\), got 3"),
            (dict(resume=5), r"^resume must be a path \(str or os.PathLike\) or None, got 5"),
            (dict(init_from=b"x"),
             r"^init_from must be a path \(str or os.PathLike\) or None, got b'x'"),
            (dict(overwrite="no"), r"^overwrite must be True or False, got 'no'")]:
        args = dict(data_dir=text_data, out_dir=tmp_path / "r", **{"backend": "numpy"})
        args.update(kw)
        with pytest.raises(ConfigError, match=message):
            GpuTrainer(TINY, tc, log=quiet, **args)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before
    for bad in (-1, 1.5, "0", True):
        with pytest.raises(ConfigError, match=r"^seed must be an integer >= 0, got "):
            first.sample("a", max_new_tokens=2, seed=bad)
    assert first.sample("a", max_new_tokens=2, seed=np.int64(3)) == \
        first.sample("a", max_new_tokens=2, seed=3)


def test_a_trainer_keeps_its_own_model_config(text_data, tmp_path):
    """The next run built from the same ModelConfig object, changed (n_layer 2 -> 3): the first
    trainer held that object, so its train() failed (IndexError) and its save_checkpoint()
    wrote state.json with n_layer 3 beside 2 layers of weights, over its own checkpoint: the
    run could no longer be resumed."""
    cfg = ModelConfig(**TINY.to_dict())
    tc = TrainConfig(batch_size=2, max_steps=2, eval_interval=0, log_interval=1)
    first = GpuTrainer(cfg, tc, text_data, tmp_path / "a", backend="numpy", log=quiet)
    first.train(max_steps=1)
    cfg.n_layer = 3
    GpuTrainer(cfg, tc, text_data, tmp_path / "b", backend="numpy", log=quiet)
    assert first.train()["step"] == 2
    saved = first.save_checkpoint()
    assert json.loads((saved / "state.json").read_text())["model_config"] == TINY.to_dict()
    resumed = GpuTrainer(None, tc, text_data, tmp_path / "a", backend="numpy", log=quiet,
                         resume=saved)
    assert resumed.model_cfg == TINY and resumed.step == 2


def test_a_trainer_keeps_its_own_train_config(text_data, tmp_path):
    """The same for the TrainConfig: its dtype changed for the next run (float32 -> float64),
    the first trainer's next checkpoint recorded dtype float64 beside float32 tensors, and
    its resume was refused ('transformer.wte.weight is float32, the checkpoint's dtype is
    float64')."""
    tc = TrainConfig(batch_size=2, max_steps=2, eval_interval=0, log_interval=1)
    first = GpuTrainer(TINY, tc, text_data, tmp_path / "a", backend="numpy", log=quiet)
    first.train(max_steps=1)
    tc.dtype, tc.batch_size = "float64", 3
    GpuTrainer(TINY, tc, text_data, tmp_path / "b", backend="numpy", log=quiet)
    saved = first.train()["checkpoint"]
    state = json.loads((tmp_path / "a" / "ckpt-00000002" / "state.json").read_text())
    assert (state["dtype"], state["train_config"]["batch_size"]) == ("float32", 2)
    resumed = GpuTrainer(None, TrainConfig(batch_size=2, max_steps=2, eval_interval=0), text_data,
                         tmp_path / "a", backend="numpy", log=quiet, resume=saved)
    assert resumed.step == 2
    tc.learning_rate = -1.0
    with pytest.raises(ConfigError, match=r"^learning_rate must be > 0"):
        GpuTrainer(TINY, tc, text_data, tmp_path / "c", backend="numpy", log=quiet)


def test_a_trainer_keeps_its_own_final_sample_settings(text_data, tmp_path):
    """final_sample is checked when the trainer is made (a top_k of 0 recorded makes every
    checkpoint of the run unresumable), but the trainer kept the caller's dict: changed after
    (top_k 0 for the next run), the run's checkpoint recorded it and its resume found no
    verified checkpoint."""
    settings = {"prompt": "alpha", "tokens": 2, "temperature": 0.8, "top_k": 40}
    tc = TrainConfig(batch_size=2, max_steps=1, eval_interval=0)
    first = GpuTrainer(TINY, tc, text_data, tmp_path / "a", backend="numpy", log=quiet,
                       final_sample=settings)
    settings["top_k"] = 0
    saved = first.train()["checkpoint"]
    state = json.loads((tmp_path / "a" / "ckpt-00000001" / "state.json").read_text())
    assert state["final_sample"]["top_k"] == 40
    resumed = GpuTrainer(None, TrainConfig(batch_size=2, max_steps=2, eval_interval=0),
                         text_data, tmp_path / "a", backend="numpy", log=quiet, resume=saved)
    assert resumed.final_sample["top_k"] == 40


def test_save_checkpoint_outside_train_respects_another_trainers_lock(text_data, tmp_path):
    """The run directory's lock is held from the set-up to the end of train(); a checkpoint
    saved between train() calls wrote into the directory while another trainer held it (the
    stale trainer's ckpt-00000002 landed beside the resumed run's checkpoints, where the next
    resume might take it). Now it takes the lock for the write, or is refused by it."""
    tc = TrainConfig(batch_size=2, max_steps=2, eval_interval=0)
    first = GpuTrainer(TINY, tc, text_data, tmp_path, backend="numpy", log=quiet)
    first.train()
    other = GpuTrainer(None, TrainConfig(batch_size=2, max_steps=3, eval_interval=0), text_data,
                       tmp_path, backend="numpy", log=quiet, resume=tmp_path)
    other.train()
    holder = GpuTrainer(None, TrainConfig(batch_size=2, max_steps=4, eval_interval=0),
                        text_data, tmp_path, backend="numpy", log=quiet, resume=tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match=r"another train \(pid \d+\) is writing to this run "
                                          r"directory"):
        first.save_checkpoint()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    holder.train()   # its lock is released at the end of its train()
    assert first.save_checkpoint().name == "ckpt-00000002"
    assert not (tmp_path / ".train-lock").exists()


def test_save_checkpoint_and_train_again_after_the_run_directory_was_removed(text_data,
                                                                           tmp_path):
    """A run directory removed between train() calls: save_checkpoint() and train() again
    failed on opening its lock file ("cannot open the run directory's lock (No such file or
    directory)"), the trained model unsaved, where the checkpoint write itself made the
    directory. Now both make it again, saying so."""
    lines = []
    run = tmp_path / "run"
    tc = TrainConfig(batch_size=2, max_steps=2, eval_interval=0)
    trainer = GpuTrainer(TINY, tc, text_data, run, backend="numpy", log=lines.append)
    trainer.train()
    shutil.rmtree(run)
    saved = trainer.save_checkpoint()
    assert saved == run / "ckpt-00000002" and (saved / "state.json").is_file()
    assert any("was removed" in line and "made again" in line for line in lines)
    shutil.rmtree(run)
    assert trainer.train(max_steps=3)["checkpoint"] == str(run / "ckpt-00000003")
    assert not (run / ".train-lock").exists()


def test_a_resume_with_another_batch_size_measures_the_same_validation_set(text_data,
                                                                          tmp_path):
    """The validation set is eval_batches draws of the batch size the run started with
    (state.json's val_batch_size), whatever --batch-size a resume gives (smaller, to fit
    memory; larger; not a divisor): the same weights then have the same val loss, and the val
    curve in metrics.jsonl does not jump at the resume. Before, a resume drew eval_batches x
    its own batch size windows: the weights of step 2 measured 5.5262 at batch 4, 5.5248 at
    batch 2, 5.5340 at batch 8. A checkpoint written before val_batch_size was recorded keeps
    its train_config's batch size, the one its val losses were measured with."""
    kw = dict(batch_size=4, max_steps=2, eval_interval=2, eval_batches=3, dtype="float64",
              checkpoint_interval=2)
    first = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path / "run", backend="numpy",
                       log=quiet)
    val_loss = first.train()["val_loss"]
    ck = tmp_path / "run" / "ckpt-00000002"

    def resumed_val_loss(batch_size, resume):
        """evaluate() of a resume at batch_size, and the val_batch_size its checkpoints
        record."""
        tr = GpuTrainer(None, TrainConfig(**dict(kw, batch_size=batch_size)), text_data,
                        resume.parent, backend="numpy", resume=resume, log=quiet)
        loss_sum, rows = tr.model.eval_loss_sum, []

        def eval_loss_sum(idx, tgt):  # the rows each forward is given
            rows.append(len(idx))
            return loss_sum(idx, tgt)
        tr.model.eval_loss_sum = eval_loss_sum
        try:
            return tr.evaluate(), tr._state().get("val_batch_size")
        finally:
            tr._release_run_lock()
            # the activation cache's batch: regrouped to batch_size rows (the last padded)
            assert set(rows) == {batch_size}, rows
    for batch_size in (2, 3, 8):
        assert resumed_val_loss(batch_size, ck) == (pytest.approx(val_loss, rel=1e-12, abs=0),
                                                    4), batch_size
    assert json.loads((ck / "state.json").read_text())["val_batch_size"] == 4
    # a resume at batch size 2 checkpoints its own batch size in train_config, and the
    # validation set's (4) beside it: the resume of that checkpoint keeps 4
    GpuTrainer(None, TrainConfig(**dict(kw, batch_size=2, max_steps=3)), text_data,
               tmp_path / "run", backend="numpy", resume=ck, log=quiet).train()
    ck3 = tmp_path / "run" / "ckpt-00000003"
    assert json.loads((ck3 / "state.json").read_text())["train_config"]["batch_size"] == 2
    assert resumed_val_loss(3, ck3)[1] == 4

    import shutil
    old = tmp_path / "old" / ck.name
    shutil.copytree(ck, old)
    state = json.loads((old / "state.json").read_text())
    del state["val_batch_size"]
    (old / "state.json").write_text(json.dumps(state))
    assert resumed_val_loss(3, old) == (pytest.approx(val_loss, rel=1e-12, abs=0), 4)


def _second_sigint_in_step_4(tr, where: str):
    """Patch tr.model's `where` so that step 4 gets two SIGINTs there (after running it, for
    adamw_update: the update applied, the step not yet counted): the second one's
    KeyboardInterrupt leaves the step midway, as a Ctrl-C pressed twice does."""
    import os
    import signal
    orig = getattr(tr.model, where)

    def hit(*a, **k):
        if tr.step == 3 and not hit.done:
            hit.done = True
            if where == "adamw_update":
                orig(*a, **k)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            return None
        return orig(*a, **k)
    hit.done = False
    setattr(tr.model, where, hit)


@pytest.mark.parametrize("where", ["backward", "adamw_update"])
def test_train_again_after_a_second_signal_mid_step_goes_on_exactly_or_refuses(
        text_data, tmp_path, where):
    """A second Ctrl-C leaves a step midway (KeyboardInterrupt out of train()). Interrupted
    before its update, the step never happened: train() again on the same trainer runs it and
    the losses are an uninterrupted run's (before, its batch was skipped: the data position
    had moved for a step never counted). Interrupted in or after the update, the parameters
    are a step on from a count that says otherwise: train() and save_checkpoint() refuse in
    one line that says to resume from a checkpoint (before, training went on one step ahead,
    its Adam count and learning rate one behind)."""
    from cllm_gpu.errors import CLLMError
    kw = dict(batch_size=4, max_steps=6, eval_interval=0, log_interval=1,
              checkpoint_interval=0, final_checkpoint=False, dtype="float64", warmup_steps=0)
    full = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path / "full", backend="numpy",
                      log=quiet).train()
    tr = GpuTrainer(TINY, TrainConfig(**kw), text_data, tmp_path / "part", backend="numpy",
                    log=quiet)
    _second_sigint_in_step_4(tr, where)
    first = tr.train(max_steps=3)["losses"]
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    assert tr.step == 3
    if where == "backward":
        assert first + tr.train()["losses"] == full["losses"]  # bit-identical
        return
    for again in (tr.train, tr.save_checkpoint, tr.train_step):
        with pytest.raises(CLLMError, match=r"step 4 was interrupted .*resume"):
            again()
    assert not list((tmp_path / "part").glob("ckpt-*"))
