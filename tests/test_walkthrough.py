"""docs/finetune.md, run as written: its `cllm-gpu` commands (prepare with GPT-2's tokenizer
file, train --init-from, plot, export) and its transformers Python block, on a tiny random
GPT-2 with a small byte-level BPE tokenizer built here offline. Only the train line gets
tiny-run flags appended (later flags win in argparse)."""
import re
import shlex
from pathlib import Path

import pytest

from clihelp import ROOT, run_cli

DOC = ROOT / "docs" / "finetune.md"
TINY_RUN = ["--max-steps", "3", "--batch-size", "2", "--seq-len", "16", "--warmup-steps", "1",
            "--eval-interval", "0", "--sample-tokens", "0", "--backend", "numpy"]


def doc_blocks(lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def make_tiny_gpt2(d: Path, torch, transformers, tokenizers):
    d.mkdir()
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(["Once upon a time there was a small model. "] * 30,
                            vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok.save(str(d / "tokenizer.json"))
    torch.manual_seed(0)
    conf = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=16,
                                   n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(conf).save_pretrained(d)


@pytest.mark.ci_required("torch")
def test_finetune_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("matplotlib")  # the walkthrough's `cllm-gpu plot` line
    make_tiny_gpt2(tmp_path / "gpt2", torch, transformers, tokenizers)
    corpus = tmp_path / "my_corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"Story {i}. Once upon a time a model read a file. " * 20)

    ran = []
    for block in doc_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.startswith("cllm-gpu "):
                continue
            args = shlex.split(line)[1:]
            if args[0] == "train":
                args += TINY_RUN
            r = run_cli(*args, cwd=tmp_path)
            assert r.returncode == 0, (line, r.stdout, r.stderr)
            ran.append(args[0])
    assert ran == ["prepare", "train", "plot", "export"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "mine-hf").iterdir()}

    # the Python block in this process (transformers is imported already: seconds saved);
    # "mine-hf" is a local directory, so from_pretrained reads it and fetches nothing
    code, = doc_blocks("python")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(code, str(DOC), "exec"), {"__name__": "walkthrough"})
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time ") + 5
