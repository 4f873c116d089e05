"""scripts/compare_torch.py's own control flow (the comparison itself runs, with torch, in
tests/test_torch_reference.py)."""
from __future__ import annotations

import argparse
import json
import importlib.util
import os
import signal
import sys
import types
from pathlib import Path

import pytest


def load_script():
    spec = importlib.util.spec_from_file_location(
        "compare_torch", Path(__file__).resolve().parent.parent / "scripts" / "compare_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_signal_during_our_run_stops_the_script_before_pytorchs(token_dir, monkeypatch):
    """SIGTERM (timeout, a scheduler) or Ctrl-C during cllm-gpu's half: the trainer saves and
    returns, and the script went on to train PyTorch's half (8 minutes at the documented size),
    then wrote compare.jsonl pairing the cut-short curve with the full one. It now exits 143 /
    130 as `cllm-gpu train` does, PyTorch's half never started, nothing recorded."""
    compare_torch = load_script()
    torch_ref = types.ModuleType("cllm_gpu.torch_ref")

    def train_torch(*a, **kw):
        raise AssertionError("PyTorch's run started after the stop")
    torch_ref.train_torch = train_torch
    monkeypatch.setitem(sys.modules, "cllm_gpu.torch_ref", torch_ref)
    data = token_dir("def f(x):\n    return x + 1\n" * 400, "compare_stop")
    out = data.parent / "cmp"
    args = argparse.Namespace(data=data, out=out, n_layer=1, n_head=1, n_embd=8, block_size=8,
                              batch_size=2, steps=50, eval_interval=10, eval_batches=1,
                              warmup_steps=1, dropout=0.0, seed=1)
    sent = []

    def log(line):  # the first progress line: the signal arrives mid-run
        if not sent and line.startswith("[cllm-gpu] step "):
            sent.append(line)
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        compare_torch.compare(args, log=log)
    assert stop.value.code == 143, sent
    assert not (out / "compare.jsonl").exists()
    assert list((out / "ours").glob("ckpt-*")), "the stopped run saved no checkpoint"


def test_the_comparison_records_each_sides_last_validation_loss(token_dir, monkeypatch):
    """compare.jsonl's final_val_loss is each curve's last point (the loss at the last step,
    the number the comparison is read by), not its first. PyTorch's side is a stand-in
    curve here."""
    compare_torch = load_script()
    torch_ref = types.ModuleType("cllm_gpu.torch_ref")
    torch_ref.train_torch = lambda *a, **kw: {"val": [(10, 3.0), (20, 2.5)], "seconds": 1.0}
    monkeypatch.setitem(sys.modules, "cllm_gpu.torch_ref", torch_ref)
    data = token_dir("def f(x):\n    return x + 1\n" * 400, "compare_final")
    args = argparse.Namespace(data=data, out=data.parent / "cmp", n_layer=1, n_head=1, n_embd=8,
                              block_size=8, batch_size=2, steps=20, eval_interval=10,
                              eval_batches=1, warmup_steps=1, dropout=0.0, seed=1)
    ours, theirs = compare_torch.compare(args, log=lambda line: None)
    assert theirs["impl"] == "torch" and theirs["final_val_loss"] == 2.5
    assert ours["impl"] == "cllm-gpu" and ours["val"][-1][0] == 20 and len(ours["val"]) >= 2
    assert ours["final_val_loss"] == ours["val"][-1][1] != ours["val"][0][1]


def test_a_val_loss_written_as_null_is_compared_as_nan(token_dir, monkeypatch, capsys, tmp_path):
    """The trainer writes a non-finite val loss as null (strict JSON; files written before held
    NaN): the script read it back as None and its summary line (and the plot's label) failed
    on f"{None:.4f}", a TypeError after both runs. It reads the file with `plot`'s reader
    (null as NaN), and compare.jsonl keeps it null. Our trainer is a stand-in writing such a
    curve here."""
    compare_torch = load_script()
    torch_ref = types.ModuleType("cllm_gpu.torch_ref")
    torch_ref.train_torch = lambda *a, **kw: {"val": [(10, 3.0), (20, 2.5)], "seconds": 1.0}
    monkeypatch.setitem(sys.modules, "cllm_gpu.torch_ref", torch_ref)

    class DivergedTrainer:
        def __init__(self, mc, tc, data, out, **kw):
            self.out = Path(out)

        def train(self):
            self.out.mkdir(parents=True, exist_ok=True)
            # what the trainer writes: a start record, a train record at step 1 (it always
            # logs step 1), then the evals, the last one diverged
            (self.out / "metrics.jsonl").write_text(
                '{"type": "start", "step": 0, "tokens": 0}\n'
                '{"type": "train", "step": 1, "loss": 4.2, "lr": 0.001, "tokens_per_s": 9.0}\n'
                '{"type": "eval", "step": 10, "val_loss": 2.75}\n'
                '{"type": "eval", "step": 20, "val_loss": null}\n')
            return {"status": "done", "step": 20}
    monkeypatch.setattr(compare_torch, "GpuTrainer", DivergedTrainer)
    monkeypatch.setattr(compare_torch, "require_torch", lambda: None)  # PyTorch's side stands in
    data = token_dir("def f(x):\n    return x + 1\n" * 400, "compare_null")
    compare_torch.main(["--data", str(data), "--out", str(tmp_path / "cmp")])
    assert capsys.readouterr().out.splitlines()[-1] == \
        "final val loss: cllm-gpu nan, torch 2.5000, cllm-gpu - torch +nan"
    ours = json.loads((tmp_path / "cmp" / "compare.jsonl").read_text().splitlines()[0])
    assert ours["val"] == [[10, 2.75], [20, None]] and ours["final_val_loss"] is None


def test_without_torch_the_script_stops_before_training_ours(token_dir, monkeypatch, tmp_path):
    """PyTorch's half runs second: without torch installed the script trained cllm-gpu's half
    (about 10 minutes at the documented size), then died on `import torch` with a traceback
    and wrote no comparison. It now says in one line that it needs PyTorch, before training."""
    compare_torch = load_script()
    monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` fails as if absent
    data = token_dir("def f(x):\n    return x + 1\n" * 400, "compare_no_torch")
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as stop:
        compare_torch.main(["--data", str(data), "--out", str(out), "--n-layer", "1",
                            "--n-head", "1", "--n-embd", "8", "--block-size", "8",
                            "--batch-size", "2", "--steps", "4", "--eval-interval", "2",
                            "--eval-batches", "1", "--warmup-steps", "1"])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "pip install torch" in message, message
    assert "\n" not in message
    assert not out.exists(), "cllm-gpu's half ran although PyTorch's cannot"
