"""The training step captured in a CUDA graph (TrainConfig.cuda_graph) against the un-captured
step on the GPU: bitwise the same losses, grad norms, parameters and Adam moments across a
learning-rate warm-up, with evaluation and checkpoints between replays; a non-finite step is
still skipped and reported; the graph is really replayed; a failed capture falls back."""
import json

import numpy as np
import pytest

from cllm_gpu import GpuTrainer, ModelConfig, TrainConfig

cp = pytest.importorskip("cupy")

CFG = ModelConfig(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=64)
STEPS = 14


@pytest.fixture(scope="module")
def data(token_dir):
    words = ["graph", "replay", "capture", "stream", "kernel", "launch", "warm", "step"]
    return token_dir(" ".join(np.random.default_rng(1).choice(words, size=6000)), "graph")


def _run(data, out, before_step=None, then=None, **kw):
    """Train STEPS steps; returns (trainer, summary, [(step, loss, grad_norm)], log lines).
    before_step(trainer) may return a callable to run after that step."""
    tc = dict(batch_size=4, max_steps=STEPS, warmup_steps=5, learning_rate=3e-3, min_lr=3e-4,
              eval_interval=7, eval_batches=2, log_interval=5, checkpoint_interval=7,
              on_nonfinite="skip", dtype="float32", seed=5)
    tc.update(kw)
    lines = []
    tr = GpuTrainer(CFG, TrainConfig(**tc), data, out, backend="cuda", log=lines.append)
    figures = []
    resolve = tr._resolve

    def recording_resolve():
        rs = resolve()
        figures.extend((r["step"], r["loss"], r["grad_norm"]) for r in rs)
        return rs
    tr._resolve = recording_resolve
    if before_step is not None:
        step = tr.train_step

        def wrapped():
            after = before_step(tr)
            r = step()
            if after is not None:
                after()
            return r
        tr.train_step = wrapped
    summary = tr.train()
    if then is not None:
        then(tr)
        summary = dict(summary, more=tr.train(max_steps=STEPS + 6))
    return tr, summary, figures, lines


def _assert_same_state(a, b):
    for name in ("params", "adam_m", "adam_v"):
        x = cp.asnumpy(getattr(a.model, name).data)
        y = cp.asnumpy(getattr(b.model, name).data)
        assert x.tobytes() == y.tobytes(), f"{name} differs"


@pytest.mark.parametrize("K,precision", [(1, "fp32"), (2, "fp32"), (1, "bf16")])
def test_graph_step_bitwise_equals_uncaptured(data, tmp_path, K, precision):
    kw = dict(grad_accum_steps=K, precision=precision)
    plain, s_plain, f_plain, _ = _run(data, tmp_path / "plain", **kw)
    graph, s_graph, f_graph, lines = _run(data, tmp_path / "graph", cuda_graph=True, **kw)
    assert not any(l.startswith("warning") for l in lines), lines
    assert graph._graph.active and graph._graph.captures == 1 and graph._graph.warmups == 1
    assert graph._graph.replays == STEPS - 1          # every step after the warm-up
    assert sum("CUDA graph: captured" in l for l in lines) == 1
    assert len(f_graph) == STEPS and f_graph == f_plain   # losses and grad norms, bit for bit
    assert s_graph["losses"] == s_plain["losses"]
    assert s_graph["val_loss"] == s_plain["val_loss"]
    _assert_same_state(plain, graph)
    # evaluation, sampling and the checkpoints between and after replays saw the same state
    assert graph.evaluate() == plain.evaluate()
    assert graph.sample("graph ", 12, temperature=0) == plain.sample("graph ", 12, temperature=0)
    for step in (7, STEPS):
        a = json.loads((tmp_path / "plain" / f"ckpt-{step:08d}" / "state.json").read_text())
        b = json.loads((tmp_path / "graph" / f"ckpt-{step:08d}" / "state.json").read_text())
        assert a["val_loss"] == b["val_loss"] and a["step"] == b["step"] == step
        for f in ("model.safetensors", "optimizer.safetensors"):
            assert (tmp_path / "plain" / f"ckpt-{step:08d}" / f).read_bytes() == \
                (tmp_path / "graph" / f"ckpt-{step:08d}" / f).read_bytes(), (step, f)


def _poison_step_7(tr):
    """Make step 7 non-finite through a parameter (written between replays, restored after)."""
    if tr.step != 6:
        return None
    w = tr.model.params["transformer.h.0.mlp.c_fc.weight"]
    keep = float(w[1, 2])
    before = tr.model.state_dict()
    w[1, 2] = np.inf

    def restore():
        w[1, 2] = keep
        after = tr.model.state_dict()
        assert all(np.array_equal(before[k], after[k]) for k in before), "bad step applied"
    return restore


def test_graph_nonfinite_step_is_skipped_and_reported(data, tmp_path):
    plain, s_plain, f_plain, l_plain = _run(data, tmp_path / "plain", before_step=_poison_step_7)
    graph, s_graph, f_graph, l_graph = _run(data, tmp_path / "graph", before_step=_poison_step_7,
                                            cuda_graph=True)
    assert graph._graph.replays == STEPS - 1
    for tr, lines in ((plain, l_plain), (graph, l_graph)):
        assert tr.nonfinite_skips == 1
        assert sum("step 7" in l and "skipped" in l for l in lines) == 1, lines
    assert s_graph["losses"] == s_plain["losses"] and len(s_graph["losses"]) == STEPS - 1
    assert [f for f in f_graph if f[0] != 7] == [f for f in f_plain if f[0] != 7]
    _assert_same_state(plain, graph)


def test_graph_set_up_again_after_the_cache_is_evicted(data, tmp_path):
    """Sampling (other shapes) drops the training shape's activation cache; the next step must
    not replay the graph over freed buffers: one more warm-up step and a new capture."""
    def sample(tr):
        tr.sample("graph ", 40, temperature=0)
    plain, s_plain, _, _ = _run(data, tmp_path / "plain", then=sample)
    graph, s_graph, _, _ = _run(data, tmp_path / "graph", then=sample, cuda_graph=True)
    assert s_graph["more"]["losses"] == s_plain["more"]["losses"]
    assert graph._graph.warmups == 2 and graph._graph.captures == 2
    assert graph._graph.replays == STEPS + 6 - 2
    _assert_same_state(plain, graph)


def test_failed_capture_falls_back_with_one_warning(data, tmp_path):
    """A stream synchronize inside the step is illegal during capture: the capture fails, one
    warning, and training goes on un-captured with the same numbers."""
    def syncing(tr):
        backward = tr.model.backward

        def b(B, T):
            backward(B, T)
            cp.cuda.get_current_stream().synchronize()
        tr.model.backward = b
        return None

    def first(tr):
        if tr.step == 0:
            syncing(tr)
    plain, s_plain, f_plain, _ = _run(data, tmp_path / "plain")
    graph, s_graph, f_graph, lines = _run(data, tmp_path / "graph", before_step=first,
                                          cuda_graph=True)
    warn = [l for l in lines if l.startswith("warning") and "CUDA graph" in l]
    assert len(warn) == 1, lines
    assert not graph._graph.active and graph._graph.replays == 0
    assert f_graph == f_plain and s_graph["losses"] == s_plain["losses"]
    _assert_same_state(plain, graph)


def _ignore_some_targets(tr):
    """Every batch gets a different number of ignored (-1) targets from then on."""
    get_batch = tr.data.get_batch
    rng = np.random.default_rng(11)

    def with_ignored(split, B, T, r):
        idx, tgt = get_batch(split, B, T, r)
        tgt = tgt.copy()
        tgt.reshape(-1)[rng.choice(tgt.size, size=int(rng.integers(0, tgt.size // 2)),
                                   replace=False)] = -1
        return idx, tgt
    tr.data.get_batch = with_ignored


def test_graph_replays_across_batches_with_different_ignored_counts(data, tmp_path):
    """The loss weight 1 / (valid targets) is read from the step buffer, not frozen into the
    graph: batches with different counts of ignored targets replay one capture, bitwise equal
    to the un-captured steps."""
    def setup(tr):
        if tr.step == 0:
            _ignore_some_targets(tr)
    plain, s_plain, f_plain, _ = _run(data, tmp_path / "plain", before_step=setup)
    graph, s_graph, f_graph, _ = _run(data, tmp_path / "graph", before_step=setup,
                                      cuda_graph=True)
    assert graph._graph.captures == 1 and graph._graph.replays == STEPS - 1
    assert f_graph == f_plain and s_graph["losses"] == s_plain["losses"]
    _assert_same_state(plain, graph)
