"""Files written by real older versions (tests/fixtures/old_versions, README there: which commit
wrote each and how), read by today's code: train --resume, train on the old data, sample,
eval, export (loaded in transformers), train --init-from the export, and the tokenizer checks
that docs/usage.md and docs/design.md promise for checkpoints and data written before a field
was recorded. Other tests simulate old files by editing today's; these are the real ones."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cllm_gpu import checkpoint as ckpt
from clihelp import main_in_process, strict_json_loads

FIXTURES = Path(__file__).parent / "fixtures" / "old_versions"
# a new run of 2 steps (with --init-from: the export's model), then one of the fixtures' model
RUN_FLAGS = ("--batch-size", 2, "--max-steps", 2, "--eval-interval", 2, "--eval-batches", 1,
             "--backend", "numpy", "--sample-tokens", 0)
TINY_TRAIN = ("--n-layer", 1, "--n-head", 2, "--n-embd", 8, "--block-size", 16) + RUN_FLAGS


@pytest.fixture
def old(tmp_path, monkeypatch):
    """old(name) -> a copy of that fixture folder, made the working directory: its state.json
    records the data directory relative to where the old code ran (`data`)."""
    def copy(name: str) -> Path:
        where = tmp_path / name
        shutil.copytree(FIXTURES / name, where)
        monkeypatch.chdir(where)
        return where
    return copy


def _ok(capsys, *argv) -> tuple[str, list]:
    """cli.main in this process, exit 0: (stdout, the non-empty stderr lines)."""
    from cllm_gpu import cli
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, (argv, out, err)
    return out, [l for l in err.splitlines() if l]


def _state(run: Path) -> dict:
    return json.loads(sorted(run.glob("ckpt-*"))[-1].joinpath("state.json").read_text())


def _resume_on_todays_data(capsys, where: Path, run: str, *prepare_flags) -> tuple[Path, list]:
    """The fixture's corpus prepared by today's code (into where/today), then `train --resume
    RUN --data` it, which must fail: (that directory, the stderr lines)."""
    today = where / "today"
    assert main_in_process(capsys, "prepare", where / "corpus.txt", "--out", today,
                           *prepare_flags)[0] == 0
    code, err = main_in_process(capsys, "train", "--resume", run, "--data", today,
                                "--max-steps", 8, "--backend", "numpy")
    assert code == 1, err
    return today, err


def test_the_fixtures_are_the_old_formats_they_stand_for():
    """What makes each fixture old (so a regenerated one that lost it fails here), and their
    size: together under 200 KB."""
    byte_state = _state(FIXTURES / "byte_5748948" / "run")
    assert set(byte_state["model_config"]) == {"vocab_size", "block_size", "n_layer", "n_head",
                                               "n_embd"}
    assert byte_state["model_config"]["vocab_size"] == 256
    for missing in ("init_from", "best_val_loss", "final_sample", "world_size"):
        assert missing not in byte_state
    assert "tokenizer" not in byte_state["data"]
    byte_meta = json.loads((FIXTURES / "byte_5748948" / "data" / "meta.json").read_text())
    assert byte_meta["vocab_size"] == 256 and "eot_id" not in byte_meta
    bert_state = _state(FIXTURES / "bert_6ab7993" / "run")
    assert "tokenizer" not in bert_state["data"] and "final_sample" not in bert_state
    bert_meta = json.loads((FIXTURES / "bert_6ab7993" / "data" / "meta.json").read_text())
    assert "add_special_tokens" not in bert_meta and bert_meta["eot_id"] == 0
    train = np.fromfile(FIXTURES / "bert_6ab7993" / "data" / "train.bin", dtype=np.uint16)
    val = np.fromfile(FIXTURES / "bert_6ab7993" / "data" / "val.bin", dtype=np.uint16)
    assert train[0] == 1 and list(val[-2:]) == [2, 0]  # [CLS] ... [SEP] <|endoftext|>
    size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert size < 200_000, size


def test_a_first_day_run_resumes_samples_evaluates_exports_and_starts_another(
        old, capsys):
    """A run of 2026-11-29 (5748948): byte data of vocabulary 256 without end-of-text, a
    checkpoint of none of the later state.json fields, zero-padded ckpt-00000002. Every
    command works on it; the resumed checkpoint gains today's fields; data of today's byte
    tokenizer (vocabulary 257) is refused in one line, not trained on."""
    where = old("byte_5748948")
    out, err = _ok(capsys, "train", "--resume", "run", "--max-steps", 4, "--backend", "numpy")
    assert "resumed from run/ckpt-00000002 at step 2" in out, out
    state = _state(where / "run")
    assert state["step"] == 4 and state["data"]["dir"] == "data"
    # docs/usage.md: no final_sample recorded, 'the defaults' (the old run sampled 5 tokens
    # after 'the'); the summary's best covers the passes since the resume (step 4's only)
    assert state["final_sample"] == {"prompt": "", "tokens": 300, "temperature": 0.8,
                                     "top_k": 40}
    assert "--- sample ---\n" in out and state["best_val_step"] == 4
    assert f"best val loss {state['best_val_loss']:.4f} (step 4)" in out, out
    # the byte tokenizer without end-of-text, now recorded; the defaults the run had
    assert state["data"]["tokenizer"] == {"tokenizer": "byte", "vocab_size": 256,
                                          "eot_id": None}
    assert state["model_config"]["attn_bias"] == "none" and state["model_config"]["dropout"] == 0
    out, _ = _ok(capsys, "sample", "run", "--prompt", "the", "--max-new-tokens", 4,
                 "--backend", "numpy")
    assert out.startswith("the")
    result = strict_json_loads(_ok(capsys, "eval", "run", "--batches", 2, "--backend",
                                   "numpy")[0])
    assert result["step"] == 4 and 4 < result["loss"] < 7  # ln 256 = 5.55 at the start
    out, _ = _ok(capsys, "train", "--data", "data", "--out", "new", *TINY_TRAIN)
    assert _state(where / "new")["model_config"]["vocab_size"] == 256

    out, _ = _ok(capsys, "export", "run", "--hf", "hf")
    conf = json.loads((where / "hf" / "config.json").read_text())
    assert conf["vocab_size"] == 256 and conf["eos_token_id"] is None  # no end-of-text
    out, _ = _ok(capsys, "train", "--init-from", "hf", "--data", "data", "--out", "init",
                 *RUN_FLAGS)
    assert "initialized from hf" in out

    today, err = _resume_on_todays_data(capsys, where, "run")
    # the resumed checkpoint records the tokenizer it was trained with: named as another
    assert err == [
        f"error: {today} was prepared with another tokenizer (byte, vocab 257, end-of-text 256)"
        f" than the run run/ckpt-00000004 was trained with (byte, vocab 256, no end-of-text): "
        f"its ids mean other tokens; give --data a token directory prepared with the run's "
        f"tokenizer"], err
    assert ckpt.find_resumable(where / "run")[1]["step"] == 4


@pytest.mark.ci_required("torch")
def test_the_export_of_a_first_day_run_loads_in_transformers_with_its_logits(old, capsys):
    """The 2026-11-29 run (vocabulary 256, no end-of-text) exported today: transformers'
    GPT2LMHeadModel gives its logits, and the exported tokenizer spells <|endoftext|> as its 13
    bytes, as sample encodes a prompt with this data's tokenizer."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from cllm_gpu import CLLMModel, ModelConfig
    from cllm_gpu.data import TokenDataset, load_tokenizer
    where = old("byte_5748948")
    _ok(capsys, "export", "run", "--hf", "hf")
    model = transformers.GPT2LMHeadModel.from_pretrained(where / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(where / "hf")
    text = "the cat <|endoftext|>"
    ds = TokenDataset(where / "data")
    ids = tok(text).input_ids
    assert ids == load_tokenizer(ds.dir, ds.meta).encode(text).tolist() == list(text.encode())
    ck_dir, state, _ = ckpt.find_resumable(where / "run")
    ours = CLLMModel(ModelConfig.from_dict(state["model_config"]), backend="numpy")
    ours.load_state_dict(ckpt.load_model_params(ck_dir, ours.specs, state))
    idx = np.asarray([ids[:16]])  # block 16
    with torch.no_grad():
        theirs = model(torch.as_tensor(idx)).logits.numpy()
    mine = ours.logits(idx)
    assert theirs.shape == mine.shape == (1, 16, 256)
    np.testing.assert_allclose(theirs, mine, rtol=1e-5, atol=1e-5 * np.abs(mine).max())


@pytest.mark.ci_required("dev")
def test_resume_of_a_checkpoint_recording_no_tokenizer_notes_other_data(old, tmp_path, capsys):
    """docs/design.md: a checkpoint without data.tokenizer is not checked, 'a note says so when
    --data is given', as sample and eval print. train --resume --data OTHER of a real
    2026-12-01 checkpoint (6ab7993) trained on the other data without a word (the trainer
    dropped check_run_tokenizer's note); its own recorded data stays silent."""
    pytest.importorskip("tokenizers")
    where = old("bert_6ab7993")
    other = tmp_path / "other"
    shutil.copytree(where / "data", other)
    out, err = _ok(capsys, "train", "--resume", "run", "--data", other, "--max-steps", 4,
                   "--backend", "numpy", "--sample-tokens", 0)
    note = (f"note: run/ckpt-00000002: the checkpoint records no tokenizer (written before "
            f"they were recorded): {other}'s tokenizer is taken as the run's unchecked")
    assert note in out.splitlines(), out
    out, err = _ok(capsys, "train", "--resume", "run", "--max-steps", 6, "--backend", "numpy",
                   "--sample-tokens", 0)
    assert "records no tokenizer" not in out + "".join(err), out


@pytest.mark.ci_required("dev")
@pytest.mark.parametrize("name_of_own_data", ["absolute", "./data/"])
def test_resume_of_a_checkpoint_recording_no_tokenizer_knows_its_own_data_by_any_name(
        name_of_own_data, old, capsys):
    """The run's own data directory given to --data by another name than the recorded
    `data` (its absolute path, or ./data/) is not other data: no 'unchecked' note (the
    paths were compared as written)."""
    pytest.importorskip("tokenizers")
    where = old("bert_6ab7993")
    same = where / "data" if name_of_own_data == "absolute" else name_of_own_data
    out, err = _ok(capsys, "train", "--resume", "run", "--data", same, "--max-steps", 4,
                   "--backend", "numpy", "--sample-tokens", 0)
    assert "records no tokenizer" not in out + "".join(err), out


@pytest.mark.ci_required("dev")
def test_bert_style_data_of_before_the_rule_keeps_its_framing(old, capsys):
    """Data a user's tokenizer.json with a [CLS] $A [SEP] post-processor prepared on
    2026-12-01 (6ab7993): its documents carry both tokens (docs/design.md: 'data prepared
    before this was recorded has them in every document, and its prompts get them too').
    Today's run on it records that; the same source prepared again today leaves them out and
    is refused for that run, naming why; the export of the old run adds no note asking for
    add_special_tokens=False (the model was trained with them)."""
    pytest.importorskip("tokenizers")
    from cllm_gpu.data import TokenDataset, load_tokenizer
    where = old("bert_6ab7993")
    ds = TokenDataset(where / "data")
    tok = load_tokenizer(ds.dir, ds.meta)
    cls, sep = tok.encode("the")[0], tok.encode("the")[-1]
    assert (cls, sep) == (1, 2)  # the prompt framed as the documents were
    _ok(capsys, "train", "--data", "data", "--out", "new", *TINY_TRAIN)
    assert _state(where / "new")["data"]["tokenizer"]["add_special_tokens"] is True
    today, err = _resume_on_todays_data(capsys, where, "new", "--tokenizer",
                                        where / "data" / "tokenizer.json")
    assert err == [
        f"error: {today}'s documents leave out the tokenizer post-processor's tokens ([CLS], "
        f"[SEP]) that every document the run new/ckpt-00000002 was trained on carried "
        f"(prepared before 2026-12-02): the model never saw documents or prompts without "
        f"them; give --data the run's own token directory"], err
    out, _ = _ok(capsys, "export", "run", "--hf", "hf")
    assert "add_special_tokens=False" not in out and "tokenizer: file" in out, out
    out, _ = _ok(capsys, "sample", "run", "--prompt", "the", "--max-new-tokens", 4,
                 "--backend", "numpy")
    assert out.startswith("the")
    strict_json_loads(_ok(capsys, "eval", "run", "--batches", 1, "--backend", "numpy")[0])
