import json
import os
import re
import threading
import time

import numpy as np
import pytest

from cllm_gpu.data import ByteTokenizer, TokenDataset, default_corpus_files, prepare
from cllm_gpu.errors import DataError
from clihelp import assert_one_line_error, main_in_process, run_cli
from lockrace import RacingThread
from prepare_memory import prepare_peak_growth

# a skip for want of a package the dev extra installs (tokenizers) fails CI: tests/conftest.py
pytestmark = pytest.mark.ci_required("dev")

_REAL_REPLACE = os.replace


def _renames_interrupted_after(monkeypatch, n: int, done: list):
    """os.replace made to raise KeyboardInterrupt (a Ctrl-C) in place of its rename number
    n + 1 (0-based n); `done` gets the name each rename before it put in place, then
    "interrupted"."""
    def rename(src, dst):
        if len(done) == n:
            done.append("interrupted")
            raise KeyboardInterrupt
        _REAL_REPLACE(src, dst)
        done.append(os.path.basename(dst))
    monkeypatch.setattr(os, "replace", rename)


def test_default_corpus_is_deterministic_and_offline(tmp_path):
    files = default_corpus_files(200_000)
    assert files == sorted(files) and files == default_corpus_files(200_000)
    meta = prepare("default", tmp_path, max_bytes=200_000)
    assert meta["source"] == "python-stdlib" and meta["vocab_size"] == 257
    assert meta["documents"] == meta["files"] == len(files)  # one document per module
    assert meta["dtype"] == "uint16"
    assert 2.5 < meta["unigram_entropy_nats"] < 5.55
    ds = TokenDataset(tmp_path)
    assert ds.num_tokens("train") == meta["train_tokens"] > ds.num_tokens("val") > 0
    assert isinstance(ds.splits["train"], np.memmap)  # memory-mapped, not loaded


# the body of a file writer that writes half its file and is killed (kill -9: no clean-up runs)
_HALF_THEN_KILLED = "    path.write_bytes(b'A' * 500)\n    os.kill(os.getpid(), 9)\n"


def _killed_while_writing(script, *args):
    """Runs `script` (after `import os, sys`; args as sys.argv[1:]) in a Python of its own from
    the repository root, which must end killed by SIGKILL."""
    import subprocess
    import sys
    from pathlib import Path
    killed = subprocess.run([sys.executable, "-c", "import os, sys\n" + script,
                             *map(str, args)], cwd=Path(__file__).resolve().parents[1],
                            timeout=120)
    assert killed.returncode == -9


def _all_ids(d):
    ds = TokenDataset(d)
    return np.concatenate([ds.splits["train"], ds.splits["val"]])


def test_prepare_folder_and_roundtrip(tmp_path):
    """A folder: one document per file (sorted), a .jsonl file one per line; end-of-text (the
    reserved byte-tokenizer id 256) after each document, recorded in meta.json."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_text("second file ünïcode")
    (src / "a.txt").write_text("first file")
    (src / "c.jsonl").write_text('{"text": "json one", "id": 1}\n\n{"text": "json\\ntwo"}\n')
    (src / "sub" / "d.txt").write_text("last")
    meta = prepare(src, tmp_path / "tok", val_fraction=0.2)
    assert meta["eot_id"] == 256 and meta["vocab_size"] == 257 and meta["documents"] == 5
    assert meta["files"] == 4
    ids = _all_ids(tmp_path / "tok")
    assert ByteTokenizer().decode(ids) == ("first file<|endoftext|>second file ünïcode"
                                           "<|endoftext|>json one<|endoftext|>json\ntwo"
                                           "<|endoftext|>last<|endoftext|>")
    assert (ids == 256).sum() == 5 and ids[-1] == 256


def _word_documents(path, n_docs, words_per_doc, seed=0):
    """A .jsonl corpus of n_docs documents of random words, ASCII and not."""
    rng = np.random.default_rng(seed)
    words = np.array("the quick brown fox jumps over a lazy dog while seven wizards hex "
                     "bright jackals ünïcode 日本語 😀".split())
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, words_per_doc))})
                            + "\n" for _ in range(n_docs)))
    return path


def test_prepare_holds_a_few_bytes_per_byte_of_text(tmp_path):
    """prepare made the whole token stream, copied it for each file and counted it through an
    int64 copy (8 bytes a token): its peak was 12.0 bytes per byte of this 5.8 MB corpus
    (tracemalloc), so a 2 GB corpus needed some 25 GB and was killed for memory. The text
    (Python's: 4 bytes a character in a document with an emoji) and the documents' ids are
    what it holds; the files are written, and counted, a chunk at a time (4.9 measured, 3.8
    since the .jsonl is read a line at a time)."""
    import tracemalloc
    src = _word_documents(tmp_path / "c.jsonl", 2000, 400)
    tracemalloc.start()
    try:
        meta = prepare(src, tmp_path / "tok", tokenizer="byte")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert meta["train_tokens"] + meta["val_tokens"] > 4_000_000  # bytes, end-of-texts
    assert peak < 8 * src.stat().st_size, peak / src.stat().st_size


def test_reading_a_jsonl_file_holds_its_documents_and_one_line(tmp_path):
    """A .jsonl file was read whole, decoded whole and split into a list of its lines, all
    held beside the documents parsed from them: a peak of 4.9 bytes a byte of this corpus
    (tracemalloc; 1.7 times the documents), prepare's peak. Read a line at a time, the
    documents are what is held (2.9 bytes a byte; the emoji make them 4 bytes a character)."""
    import sys
    import tracemalloc
    from cllm_gpu.data import read_documents
    src = _word_documents(tmp_path / "c.jsonl", 2000, 400)
    tracemalloc.start()
    try:
        docs = read_documents(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    held = sum(sys.getsizeof(d) for d in docs) + sys.getsizeof(docs)
    assert len(docs) == 2000
    assert peak < 1.25 * held, peak / held


def test_prepare_with_a_tokenizer_json_does_not_hold_the_librarys_encodings(tmp_path):
    """A Hugging Face tokenizer encoded the whole corpus in one call, whose encodings (their
    token strings, offsets and masks) were all held until converted: 120 bytes of memory a
    token over what was resident before (the peak, VmHWM), some 30 GB for a 1 GB corpus.
    Encoded a batch of documents at a time, a token costs its id and its text (14 to 17
    measured). In a Python of its own: its peak memory is its own."""
    _user_tokenizer(tmp_path / "user.json")
    src = _word_documents(tmp_path / "c.jsonl", 2000, 400)
    grown, tokens = prepare_peak_growth(src, tmp_path / "tok", tmp_path / "user.json")
    assert grown / tokens < 40, (grown, tokens)  # bytes of memory a token


@pytest.mark.parametrize("tokenizer", ["byte", "user"])
def test_token_files_are_the_documents_ids_across_chunks_and_batches(tmp_path, monkeypatch,
                                                                     tokenizer):
    """The token files are written a chunk at a time and a tokenizer.json encodes a batch of
    documents at a time: with chunks of 7 tokens and batches of 50 characters, documents cut
    across chunks, and the split between train.bin and val.bin inside a chunk, the files hold
    each document's own ids, end-of-text after each, and meta.json's unigram entropy is that
    of train.bin."""
    import cllm_gpu.data as data
    monkeypatch.setattr(data, "WRITE_CHUNK_TOKENS", 7)
    monkeypatch.setattr(data, "ENCODE_BATCH_CHARS", 50)
    src = _word_documents(tmp_path / "c.jsonl", 40, 9)
    docs = [json.loads(line)["text"] for line in src.read_text().splitlines()]
    if tokenizer == "byte":
        encode, spec = (lambda d: list(d.encode("utf-8"))), "byte"
    else:
        user = _user_tokenizer(tmp_path / "user.json")
        encode, spec = (lambda d: user.encode(d).ids), str(tmp_path / "user.json")
    meta = prepare(src, tmp_path / "tok", tokenizer=spec, val_fraction=0.3)
    want = [i for d in docs for i in (*encode(d), meta["eot_id"])]
    assert _all_ids(tmp_path / "tok").tolist() == want
    assert meta["val_tokens"] == int(len(want) * 0.3)
    counts = np.bincount(want[:meta["train_tokens"]])
    p = counts[counts > 0] / counts.sum()
    assert meta["unigram_entropy_nats"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


def test_the_token_blocks_let_go_of_each_documents_ids_as_they_copy_them(monkeypatch):
    """_token_blocks empties the list of encoded documents as it copies them into blocks, so
    a prepare never holds the token stream twice (mutation audit: keeping the list passed
    every test, the memory test's margin included): the list's entries are all None after,
    and the blocks are the stream, end-of-text after each document, little-endian."""
    import cllm_gpu.data as data
    monkeypatch.setattr(data, "WRITE_CHUNK_TOKENS", 4)
    encoded = [np.array([1, 2, 3], np.uint16), np.array([], np.uint16), np.array([4], np.uint16)]
    blocks = data._token_blocks(encoded, 9, np.uint16)
    assert encoded == [None, None, None]
    assert [b.tolist() for b in blocks] == [[1, 2, 3, 9], [9, 4, 9]]
    assert all(b.dtype == np.dtype("<u2") for b in blocks)


@pytest.mark.parametrize("lines,pattern", [
    (['{"text": "ok"}', '{"text": "fine"}', '{"text": broken'], r"c\.jsonl:3: not valid JSON"),
    # the column is the line's own: read with its newline, a record cut short was "at column
    # 1" (mutation audit)
    (['{"text": "ok"', '{"text": "fine"}'], r"c\.jsonl:1: not valid JSON \(Expecting ',' "
                                           r"delimiter at column 14\)$"),
    (['{"text": "ok"}', '{"body": "no text"}'], r"c\.jsonl:2: expected a JSON object with a "
                                               r"\"text\" field"),
    (['["text"]'], r"c\.jsonl:1: expected a JSON object"),
    (['{"text": 5}'], r"c\.jsonl:1: \"text\" must be a string, got int"),
    # each a traceback before 2026-12-02 (the h27j fuzz): a lone surrogate escape is valid JSON
    # but no UTF-8 text (UnicodeEncodeError in the tokenizer), and an integer of more than
    # 4300 digits is valid JSON that Python refuses to read (a ValueError, not a JSON error)
    (['{"text": "ok"}', '{"text": "ab\\ud800cd"}'],
     r"c\.jsonl:2: \"text\" is not Unicode text: a lone surrogate '\\ud800' at character 2"),
    (['{"text": "ok", "n": ' + "9" * 5000 + '}'], r"c\.jsonl:1: JSON integer too long to read "
                                                 r"\(more than 4300 digits\)$"),
])
def test_bad_jsonl_line_is_named_and_nothing_is_written(tmp_path, lines, pattern):
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=pattern):
        prepare(tmp_path / "c.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_data_prepared_before_end_of_text_keeps_working(tmp_path):
    """meta.json without eot_id (vocab 256, no end-of-text): read, trained on, sampled from."""
    from cllm_gpu import GpuTrainer, ModelConfig, TrainConfig
    from cllm_gpu.data import load_tokenizer
    d = tmp_path / "old"
    d.mkdir()
    ids = np.frombuffer(b"old data, bytes only. " * 40, dtype=np.uint8).astype("<u2")
    ids[:-80].tofile(d / "train.bin")
    ids[-80:].tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"version": 1, "tokenizer": "byte",
                                             "vocab_size": 256, "dtype": "uint16"}))
    ds = TokenDataset(d)
    tok = load_tokenizer(d, ds.meta)
    assert tok.eot_id is None and tok.vocab_size == 256
    cfg = ModelConfig(vocab_size=256, block_size=8, n_layer=1, n_head=1, n_embd=8)
    tr = GpuTrainer(cfg, TrainConfig(batch_size=2, max_steps=2, eval_interval=1,
                                     eval_batches=1), d, tmp_path / "run", backend="numpy",
                    log=lambda *a: None)
    assert np.isfinite(tr.train()["val_loss"])
    assert tr.sample("old", max_new_tokens=5).startswith("old")
    assert isinstance(tr.sample("", max_new_tokens=5), str)  # empty prompt: context [0]


def test_batches_are_shifted_windows(tmp_path):
    (tmp_path / "t.txt").write_text("".join(chr(65 + i % 26) for i in range(500)))
    prepare(tmp_path / "t.txt", tmp_path / "tok")
    ds = TokenDataset(tmp_path / "tok")
    x, y = ds.get_batch("train", 4, 10, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 10)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_a_ranks_part_of_the_global_batch_is_checked_against_the_memory_it_holds(
        tmp_path, monkeypatch):
    """With data parallelism each rank draws the whole global batch's windows and reads its
    own rows (get_batch's rows): the host-memory check counted the ids of all the windows
    drawn, refusing a rank's part that fits (4 ranks: 4 x the ids it holds). The memory is
    set here between the two: one rank's 2 windows of 11 ids (and the model's int32 copies
    of 10) fit, 8 windows would not."""
    from cllm_gpu import data
    (tmp_path / "t.txt").write_text("".join(chr(65 + i % 26) for i in range(500)))
    prepare(tmp_path / "t.txt", tmp_path / "tok")
    ds = TokenDataset(tmp_path / "tok")
    monkeypatch.setattr(data, "available_memory", lambda xp: 2 * (11 * 8 + 2 * 10 * 4))
    x, y = ds.get_batch("train", 8, 10, np.random.default_rng(0), rows=np.array([2, 3]))
    assert x.shape == y.shape == (2, 10)
    monkeypatch.setattr(data, "available_memory", lambda xp: 2 * (11 * 8 + 2 * 10 * 4) - 1)
    with pytest.raises(data.ConfigError, match="a batch of 2 sequences of 11 tokens"):
        TokenDataset(tmp_path / "tok").get_batch("train", 8, 10, np.random.default_rng(0), rows=np.array([0, 1]))



def test_the_host_batch_check_counts_the_models_int32_copies(tmp_path, monkeypatch):
    """A training step holds the int64 windows get_batch read AND the int32 idx and targets
    check_batch makes of every micro-batch (train_step builds them all before the step): the
    check counted the windows alone, so a batch needing up to twice the memory available
    passed it (then a MemoryError, or the kernel's OOM killer, after --overwrite had
    discarded the old run). Measured with tracemalloc at 256 windows of 256 tokens: a peak of
    1,142,804 bytes against the 526,336 counted. The memory is set one byte under the
    arrays the step holds: refused now."""
    from cllm_gpu import CLLMModel, ModelConfig, data
    (tmp_path / "t.txt").write_text("".join(chr(65 + i % 26) for i in range(500)))
    prepare(tmp_path / "t.txt", tmp_path / "tok")
    model = CLLMModel(ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2,
                                  n_embd=8), backend="numpy")
    B, K, T = 3, 2, 10
    idx, tgt = TokenDataset(tmp_path / "tok").get_batch("train", B * K, T,
                                                        np.random.default_rng(0))
    batches = [model.check_batch(idx[k * B:(k + 1) * B], tgt[k * B:(k + 1) * B])
               for k in range(K)]
    held = idx.base.nbytes + sum(b.idx.nbytes + b.targets.nbytes for b in batches)
    assert idx.base is tgt.base and held == B * K * ((T + 1) * 8 + 2 * T * 4)
    monkeypatch.setattr(data, "available_memory", lambda xp: held - 1)
    with pytest.raises(data.ConfigError, match=f"a batch of {B * K} sequences of {T + 1}"):
        TokenDataset(tmp_path / "tok").get_batch("train", B * K, T, np.random.default_rng(0))
    monkeypatch.setattr(data, "available_memory", lambda xp: held)
    TokenDataset(tmp_path / "tok").get_batch("train", B * K, T, np.random.default_rng(0))

def test_bpe_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 300)
    meta = prepare(tmp_path / "t.txt", tmp_path / "tok", tokenizer="bpe", bpe_vocab_size=300)
    assert meta["tokenizer"] == "bpe" and (tmp_path / "tok" / "tokenizer.json").exists()
    ds = TokenDataset(tmp_path / "tok")
    assert ds.vocab_size == meta["vocab_size"] <= 300
    from cllm_gpu.data import load_tokenizer as load
    tok = load(ds.dir, ds.meta)
    assert tok.eot_id == meta["eot_id"] and tok.decode([tok.eot_id]) == "<|endoftext|>"
    ids = _all_ids(ds.dir)
    assert (ids == meta["eot_id"]).sum() == 1 and ids[-1] == meta["eot_id"]
    # a tokenizer file that does not match the data's meta is refused
    from cllm_gpu.data import load_tokenizer
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match="does not match"):
        load_tokenizer(ds.dir, ds.meta)


def test_prepare_refuses_sizes_that_cannot_be_met(tmp_path):
    """--max-bytes 0 said "no Python sources found under ..."; --bpe-vocab-size below the 257
    base symbols silently gave 257. Both now name the setting; nothing is written."""
    with pytest.raises(DataError, match=r"^max_bytes must be >= 1, got 0$"):
        prepare("default", tmp_path / "a", max_bytes=0)
    pytest.importorskip("tokenizers")
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 30)
    with pytest.raises(DataError, match=r"^bpe_vocab_size must be >= 257 .*got 0$"):
        prepare(tmp_path / "t.txt", tmp_path / "b", tokenizer="bpe", bpe_vocab_size=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_val_fraction_0_is_refused_saying_how_to_hold_out_next_to_nothing(tmp_path):
    """--val-fraction 0 (no validation split) said only 'val_fraction must be in (0, 1), got
    0.0'. Every token directory keeps a val.bin (eval, the trainer's validation passes, the
    scripts read it, and an empty one is refused as damaged), so 0 stays refused, now saying
    what gets the run the user wanted: the smallest fraction holds out one token, and
    --eval-interval 0 never reads it. Nothing is written."""
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 30)
    with pytest.raises(DataError, match=r"^val_fraction must be in \(0, 1\), got 0.0; .*"
                                        r"--val-fraction 1e-9.* --eval-interval 0"):
        prepare(tmp_path / "t.txt", tmp_path / "a", val_fraction=0.0)
    assert not (tmp_path / "a").exists()
    with pytest.raises(DataError, match=r"^val_fraction must be in \(0, 1\), got 1.0$"):
        prepare(tmp_path / "t.txt", tmp_path / "a", val_fraction=1.0)
    meta = prepare(tmp_path / "t.txt", tmp_path / "a", val_fraction=1e-9)  # as it says
    assert (meta["train_tokens"], meta["val_tokens"]) == (24 * 30, 1)


@pytest.mark.parametrize("flags,message", [
    (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1), got 1.5"),
    (["--max-bytes", "0"], "--max-bytes must be >= 1, got 0"),
    (["--tokenizer", "bpe", "--bpe-vocab-size", "100"],
     "--bpe-vocab-size must be >= 257 (the 256 byte symbols and end-of-text), got 100"),
])
def test_prepare_refusals_name_the_flag(tmp_path, capsys, flags, message):
    """prepare's refusals of its flags named prepare()'s arguments (val_fraction, max_bytes,
    bpe_vocab_size), not the flags typed. Nothing is written."""
    if "bpe" in flags:
        pytest.importorskip("tokenizers")
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 30)
    source = "default" if "--max-bytes" in flags else tmp_path / "t.txt"
    code, err = main_in_process(capsys, "prepare", source, "--out", tmp_path / "d", *flags)
    assert (code, err) == (1, ["error: " + message]) and not (tmp_path / "d").exists()


def test_a_bpe_vocabulary_the_trainer_cannot_allocate_is_refused(tmp_path):
    """--bpe-vocab-size 2**30 or more: the tokenizers trainer allocates for it up front and
    the process aborted (SIGABRT, a Rust allocation failure and its stack) before 2026-12-02
    (the h27j fuzz). A subprocess: the abort would take pytest with it."""
    pytest.importorskip("tokenizers")
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 30)
    assert_one_line_error(run_cli("prepare", tmp_path / "t.txt", "--out", tmp_path / "b",
                                  "--tokenizer", "bpe", "--bpe-vocab-size", str(2**30)),
                          r"--bpe-vocab-size must be <= 16777216 \(2\*\*24\), got 1073741824")
    assert not (tmp_path / "b").exists()


@pytest.fixture
def good(tmp_path):
    (tmp_path / "t.txt").write_text("hello world " * 100)
    prepare(tmp_path / "t.txt", tmp_path / "tok")
    return tmp_path / "tok"


def _temporary(monkeypatch, out, name):
    """The temporary path write_files writes `out`/`name` under in this process, its random
    suffix fixed, so that a test can put something in the way there."""
    import cllm_gpu.data as data
    monkeypatch.setattr(data, "token_hex", lambda nbytes: "0" * 2 * nbytes)
    return data._temporary_path(out, name)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_a_failed_prepare_leaves_the_data_already_there_as_it_was(tmp_path, good, tokenizer,
                                                                   monkeypatch):
    """prepare renamed tokenizer.json and train.bin into place before writing val.bin and
    meta.json: a write failing there (disk full; here a directory in the way) left a directory
    with the new train.bin beside the old val.bin and meta.json (refused on reading, its old
    data gone). Now every file is written first and renamed into place only then."""
    if tokenizer == "bpe":
        pytest.importorskip("tokenizers")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    (tmp_path / "new.txt").write_text("another corpus altogether " * 50)
    in_the_way = _temporary(monkeypatch, good, "val.bin")
    in_the_way.mkdir()
    with pytest.raises(DataError, match=rf"{good}/val.bin: cannot write \(Is a directory\); "
                                        rf"{good} is as it was"):
        prepare(tmp_path / "new.txt", good, tokenizer=tokenizer, bpe_vocab_size=300)
    in_the_way.rmdir()
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    TokenDataset(good)
    # and the same prepare with nothing in the way writes the new data, tokenizer included
    meta = prepare(tmp_path / "new.txt", good, tokenizer=tokenizer, bpe_vocab_size=300)
    assert TokenDataset(good).num_tokens("train") == meta["train_tokens"]
    if tokenizer == "bpe":
        from cllm_gpu.data import load_tokenizer
        tok = load_tokenizer(good, meta)  # its SHA-256 checked against meta.json
        assert tok.decode(tok.encode("another corpus")) == "another corpus"
    assert not list(good.glob("*.tmp"))


@pytest.mark.parametrize("in_the_way", ["val.bin", "meta.json"])
def test_a_directory_where_prepare_renames_a_file_leaves_the_data_as_it_was(tmp_path, good,
                                                                              in_the_way):
    """A directory where a file goes (val.bin, meta.json): the writes succeeded and the rename
    failed midway, leaving the new train.bin beside the old files and a meta.json.tmp behind,
    with an error naming the .tmp (before 2026-12-02, the h27j fuzz). Now refused before
    anything is written, naming the file."""
    import shutil
    (good / in_the_way).unlink()
    (good / in_the_way).mkdir()
    before = {p.name: p.is_dir() or p.read_bytes() for p in good.iterdir()}
    (tmp_path / "new.txt").write_text("another corpus altogether " * 50)
    with pytest.raises(DataError, match=rf"^{good}/{in_the_way}: is a directory; {good} is "
                                        rf"as it was$"):
        prepare(tmp_path / "new.txt", good)
    assert {p.name: p.is_dir() or p.read_bytes() for p in good.iterdir()} == before
    shutil.rmtree(good / in_the_way)


def test_a_full_disk_while_prepare_writes_tokens_is_an_error(tmp_path, good, monkeypatch):
    """numpy's tofile(path) ignores the error of its final flush: train.bin's temporary on a
    full disk (here a link to /dev/full) lost its last bytes silently and prepare succeeded,
    meta.json counting tokens that were never written (before 2026-12-02, the h27j fuzz)."""
    import os
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    (tmp_path / "new.txt").write_text("another corpus altogether " * 50)
    full = _temporary(monkeypatch, good, "train.bin")
    full.symlink_to("/dev/full")
    with pytest.raises(DataError, match=rf"^{good}/train.bin: cannot write \(No space left on "
                                        rf"device\); {good} is as it was$"):
        prepare(tmp_path / "new.txt", good)
    assert not os.path.lexists(full)  # removed as any failed write's: read, it never ends
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_an_interrupted_prepare_leaves_no_temporary_files(tmp_path, good, monkeypatch):
    """Ctrl-C while prepare writes: the data there stays as it was and the temporary copies
    (train.bin's, as large as the corpus) are removed, not left beside it."""
    from pathlib import Path
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    (tmp_path / "new.txt").write_text("another corpus altogether " * 50)
    write_bytes, meta_json = Path.write_bytes, _temporary(monkeypatch, good, "meta.json")

    def interrupted_at_meta(path, data):
        if path == meta_json:
            raise KeyboardInterrupt
        return write_bytes(path, data)
    monkeypatch.setattr(Path, "write_bytes", interrupted_at_meta)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "new.txt", good)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_meta_json_is_the_last_file_prepare_puts_in_place(tmp_path, monkeypatch, tokenizer):
    """A directory with a meta.json is complete: train's other ranks wait for the default
    corpus's meta.json and then read the rest (cli._wait_for_default_data). prepare stopped
    after each of its renames in turn: meta.json was not among the renames done. Mutation
    audit: meta.json renamed into place first passed every test. Since h29s the renames done
    are undone after such a stop (this test had left them in place, a half-written directory
    the CLI called "nothing written"), and since h41f the directory prepare made is removed
    too, as export removes its own: no empty directory is left where there was none."""
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    done = []
    expected = {"train.bin", "val.bin", "meta.json"} | (
        {"tokenizer.json"} if tokenizer != "byte" else set())
    for n in range(len(expected)):
        done.clear()
        _renames_interrupted_after(monkeypatch, n, done)
        with pytest.raises(KeyboardInterrupt):
            prepare(tmp_path / "c.txt", tmp_path / f"stopped{n}", tokenizer=tokenizer,
                    bpe_vocab_size=300)
        monkeypatch.undo()
        assert len(done) == n + 1 and "meta.json" not in done, done
        assert not (tmp_path / f"stopped{n}").exists()
    prepare(tmp_path / "c.txt", tmp_path / "whole", tokenizer=tokenizer, bpe_vocab_size=300)
    assert {p.name for p in (tmp_path / "whole").iterdir()} == expected


@pytest.mark.parametrize("out", ["new/../stopped", "p/q/../r", "s/./t/"])
def test_a_failed_prepare_into_a_path_with_dot_dot_leaves_no_directory_it_made(tmp_path,
                                                                               monkeypatch,
                                                                               out):
    """`--out new/../stopped` makes new and stopped; a prepare that fails then removes both.
    Before, missing_dirs listed `new/..` among the directories to remove (it did not exist
    while new did not), its rmdir failed and stopped the clean-up there: the empty `new`
    stayed behind. `.` and a trailing slash pathlib drops: they were sound."""
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    _renames_interrupted_after(monkeypatch, 0, [])
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "c.txt", tmp_path / out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


@pytest.mark.parametrize("out", ["new/../keep", "new/../keep/", "new/../new/../keep"])
def test_a_failed_prepare_through_dot_dot_keeps_the_empty_directory_it_found(tmp_path,
                                                                            monkeypatch, out):
    """`--out new/../keep` where keep is an empty directory of the user's: prepare makes only
    new. Before, missing_dirs took `new/../keep` for a directory to make (nothing under the
    missing new exists for the kernel) and a prepare that failed removed the user's keep."""
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    (tmp_path / "keep").mkdir()
    _renames_interrupted_after(monkeypatch, 0, [])
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "c.txt", tmp_path / out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "keep"]
    assert not list((tmp_path / "keep").iterdir())


@pytest.mark.parametrize("links", ["hard links", "no hard links"])
@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_a_ctrl_c_between_prepares_renames_leaves_the_directory_as_it_was(tmp_path,
                                                                         monkeypatch, tokenizer,
                                                                         links):
    """A Ctrl-C (KeyboardInterrupt) landing between two of write_files' renames left the new
    train.bin (and val.bin) beside the old meta.json, and the temporaries not yet renamed
    behind, while the CLI said "nothing written" and write_files "never half replaced"
    (h29s; with equal token counts TokenDataset opened the mix). Re-preparing another corpus
    into a prepared directory, interrupted after each of its renames in turn: the directory
    holds its old files, byte for byte, nothing else; so too where the filesystem has no
    hard links (the replaced files are renamed aside instead)."""
    import errno
    import os
    if links == "no hard links":
        def no_hard_links(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_hard_links)
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    out = tmp_path / "tok"
    prepare(tmp_path / "c.txt", out, tokenizer=tokenizer, bpe_vocab_size=300)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "c.txt").write_text("another corpus altogether, of other words " * 70)
    done = []
    for n in range(len(before)):
        done.clear()
        _renames_interrupted_after(monkeypatch, n, done)
        with pytest.raises(KeyboardInterrupt):
            prepare(tmp_path / "c.txt", out, tokenizer=tokenizer, bpe_vocab_size=300)
        monkeypatch.setattr(os, "replace", _REAL_REPLACE)
        assert done[n] == "interrupted", done
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, (n, done)
    prepare(tmp_path / "c.txt", out, tokenizer=tokenizer, bpe_vocab_size=300)
    assert {p.name for p in out.iterdir()} == set(before)
    assert out.joinpath("meta.json").read_bytes() != before["meta.json"]


def test_a_rename_that_fails_midway_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    """An OSError from the second rename (EIO, a directory made in the way meanwhile) left
    the first file replaced and the rest's temporaries behind, and came out as a bare
    OSError. Now the first is put back: one line, the directory as it was."""
    import errno
    import os
    from cllm_gpu.data import write_files
    out = tmp_path / "d"
    out.mkdir()
    write_files(out, _token_files("old", 1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    replace, renames = os.replace, []

    def failing_second(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise OSError(errno.EIO, "Input/output error")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(DataError, match=rf"^{out}/val.bin: cannot put in place \(Input/output "
                                        rf"error\); {out} is as it was$"):
        write_files(out, _token_files("new", 2))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("links", ["hard links", "no hard links"])
def test_a_ctrl_c_between_renames_puts_back_links_where_files_go_as_links(tmp_path,
                                                                          monkeypatch, links):
    """A symbolic link where write_files puts a file (train.bin on other storage; a dangling
    one): a Ctrl-C between the renames puts back the link itself, not the file it names, nor
    nothing. Mutation audit (h29ab): the file kept by a hard link that follows the link (the
    link put back as a regular file), or the kept copy looked for with exists() (a dangling
    link taken for no file and removed), each passed every test."""
    import errno
    import os
    from cllm_gpu.data import write_files
    if links == "no hard links":
        def no_hard_links(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_hard_links)
    out, storage = tmp_path / "d", tmp_path / "storage"
    out.mkdir()
    storage.mkdir()
    old = _token_files("old", 1)
    (storage / "train.bin").write_bytes(old["train.bin"])
    (out / "train.bin").symlink_to(storage / "train.bin")
    (out / "val.bin").symlink_to(tmp_path / "gone")
    (out / "meta.json").write_bytes(old["meta.json"])

    def state():
        return {p.name: os.readlink(p) if p.is_symlink() else p.read_bytes()
                for p in out.iterdir()}
    before = state()
    done = []
    for n in range(3):
        done.clear()
        _renames_interrupted_after(monkeypatch, n, done)
        with pytest.raises(KeyboardInterrupt):
            write_files(out, _token_files("new", 2))
        monkeypatch.setattr(os, "replace", _REAL_REPLACE)
        assert done[n] == "interrupted", done
        assert state() == before, (n, done)
    assert (storage / "train.bin").read_bytes() == old["train.bin"]


def _written_in_halves(data: bytes, midway):
    """write_files content: the first half of `data`, then midway(), then the rest."""
    def write(path):
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
            f.flush()
            midway()
            f.write(data[len(data) // 2:])
    return write


def test_two_writers_into_one_directory_each_put_only_their_own_whole_files(tmp_path):
    """Two `train` runs started at once in a fresh checkout both prepare data/default. Both
    wrote train.bin.tmp, val.bin.tmp, meta.json.tmp: the second's rename moved the first's
    train.bin.tmp, still being written, into place, and the first failed on its own rename
    (FileNotFoundError: 13 of 20 pairs of real processes preparing the default corpus, the
    h28y audit), its temporaries left behind and train.bin holding the second's first half
    and its own second half. Here the first writer's train.bin triggers the second midway:
    each writer now has temporary names of its own, and the directory ends with the last
    complete writer's files, whole."""
    from cllm_gpu.data import write_files
    out = tmp_path / "d"
    out.mkdir()
    second = {"train.bin": b"B" * 1000, "meta.json": b"second"}
    first = {"train.bin": _written_in_halves(b"A" * 1000, lambda: write_files(out, second)),
             "meta.json": b"first"}
    write_files(out, first)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {"train.bin": b"A" * 1000,
                                                               "meta.json": b"first"}


def test_a_writer_renaming_while_another_does_leaves_one_writers_files(tmp_path, monkeypatch):
    """Both writers' temporaries complete, their renames interleaved: the first put its
    train.bin in place, the second all three of its files, then the first its val.bin and
    meta.json: the directory held the second's train.bin beside the first's meta.json (for
    the default corpus the same bytes; for two prepares of different corpora a meta.json whose
    counts do not match train.bin). The renames of one writer now exclude another's: the last
    to rename puts all its files."""
    import os
    from cllm_gpu.data import write_files
    out = tmp_path / "d"
    out.mkdir()
    replace, second = os.replace, None

    def renaming_while_the_second_writes(src, dst):
        nonlocal second
        replace(src, dst)
        if second is None:  # the first writer's first rename: the second writer runs now
            second = RacingThread(write_files, out, {
                name: b"second " + name.encode() for name in ("train.bin", "val.bin",
                                                               "meta.json")})
            second.start(monkeypatch)  # it finishes here, or waits for the first's renames
    monkeypatch.setattr(os, "replace", renaming_while_the_second_writes)
    write_files(out, {name: b"first " + name.encode()
                      for name in ("train.bin", "val.bin", "meta.json")})
    second.finish()
    monkeypatch.undo()
    assert second.waited == ["exclusive"]  # held off by the first writer's renames
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    writers = {content.split()[0] for content in files.values()}
    assert sorted(files) == ["meta.json", "train.bin", "val.bin"] and len(writers) == 1, files


def _token_files(source: str, token: int, n_train: int = 600, n_val: int = 60) -> dict:
    """write_files content of a byte-token directory whose every token is `token`; meta.json
    names `source`. Two of these with the same counts differ only in what they hold."""
    from cllm_gpu.data import json_bytes
    meta = {"version": 1, "tokenizer": "byte", "source": source, "vocab_size": 257,
            "eot_id": 256, "dtype": "uint16", "train_tokens": n_train, "val_tokens": n_val}
    return {"train.bin": np.full(n_train, token, dtype="<u2").tobytes(),
            "val.bin": np.full(n_val, token, dtype="<u2").tobytes(),
            "meta.json": json_bytes(meta)}


def test_a_reader_opening_the_data_while_a_writer_renames_sees_one_writers_files(
        tmp_path, monkeypatch):
    """A writer's renames exclude another writer's, but a reader (train, eval, sample opening
    the data) took none of it: reading meta.json before another prepare's renames and
    train.bin, val.bin after, it paired one writer's meta.json with the other's tokens; with
    the same token counts (the only check across files) nothing said so. Here the second
    writer runs right after the reader has read meta.json: the reader must see the first
    writer's files only, and the second's renames still land once the reader has opened
    them (open files and maps outlive a rename)."""
    import cllm_gpu.data as data
    out = tmp_path / "d"
    out.mkdir()
    data.write_files(out, _token_files("first", 1))
    read_meta, second = data.read_meta, None

    def reading_meta_while_the_second_writes(data_dir):
        nonlocal second
        meta = read_meta(data_dir)
        second = RacingThread(data.write_files, out, _token_files("second", 2))
        second.start(monkeypatch)  # it renames here, or waits for the reader's opens
        return meta
    monkeypatch.setattr(data, "read_meta", reading_meta_while_the_second_writes)
    ds = TokenDataset(out)
    monkeypatch.undo()
    second.finish()
    assert second.waited == ["exclusive"]  # held off by the reader's lock
    seen = {split: set(np.unique(ds.splits[split]).tolist()) for split in ("train", "val")}
    assert (ds.meta["source"], seen) == ("first", {"train": {1}, "val": {1}})
    later = TokenDataset(out)
    assert later.meta["source"] == "second" and set(np.unique(later.splits["train"])) == {2}


def test_readers_opening_the_data_at_once_do_not_wait_for_each_other(tmp_path, monkeypatch):
    """Every rank of a run opens the data at start: their locks are shared, so one reader
    between its opens (here: having read meta.json) keeps no other waiting; only a writer's
    renames wait for them."""
    import cllm_gpu.data as data
    out = tmp_path / "d"
    out.mkdir()
    data.write_files(out, _token_files("first", 1))
    read_meta, other = data.read_meta, []

    def reading_meta_while_another_reads(data_dir):
        meta = read_meta(data_dir)
        if not other:
            other.append(RacingThread(TokenDataset, out))
            other[0].start(monkeypatch)  # it reads here, or waits for this reader's lock
        return meta
    monkeypatch.setattr(data, "read_meta", reading_meta_while_another_reads)
    TokenDataset(out)
    finished_first = other[0].ended
    other[0].finish()
    assert (finished_first, other[0].waited) == (True, [])


def test_a_token_file_renamed_over_between_its_size_check_and_its_map_is_not_mapped(
        tmp_path, monkeypatch):
    """Where the directory cannot be locked (no flock: some network filesystems) a reader's
    opens still race a writer's renames. train.bin's size was checked against meta.json by
    name (stat), then the name mapped again: a train.bin renamed over in between was mapped
    at its own size, not the one checked, and the dataset held another count of tokens than
    meta.json says. Now the file checked is the file mapped."""
    import os
    import cllm_gpu.data as data
    out = tmp_path / "d"
    out.mkdir()
    data.write_files(out, _token_files("first", 1))
    (tmp_path / "other.bin").write_bytes(np.full(900, 2, dtype="<u2").tobytes())
    monkeypatch.setattr(data, "fcntl", None)
    memmap = np.memmap

    def renamed_over_first(filename, *args, **kwargs):
        if not (tmp_path / "other.bin").exists():
            return memmap(filename, *args, **kwargs)
        os.replace(tmp_path / "other.bin", out / "train.bin")
        return memmap(filename, *args, **kwargs)
    monkeypatch.setattr(np, "memmap", renamed_over_first)
    ds = TokenDataset(out)
    monkeypatch.undo()
    assert (out / "train.bin").stat().st_size == 1800  # renamed over while the reader read
    assert ds.num_tokens("train") == ds.meta["train_tokens"] == 600
    assert set(np.unique(ds.splits["train"]).tolist()) == {1}


def test_the_directory_lock_is_held_until_the_token_files_are_mapped(tmp_path, monkeypatch):
    """The reader's shared lock covers meta.json and the maps of train.bin and val.bin, not
    meta.json alone. Mutation audit (h29j): the lock released once meta.json was read, the
    files mapped after, passed every test: a writer waiting on the reader's lock renamed its
    files in between only if it won the race. Here the second writer starts right before the
    first map and the reader goes on once the writer has ended or waits on the lock (not after
    a second, which a writer the lock let through but slow to rename outlasted): it must be
    waiting, the maps the first writer's."""
    import cllm_gpu.data as data
    out = tmp_path / "d"
    out.mkdir()
    data.write_files(out, _token_files("first", 1))
    map_split, second = TokenDataset._map, []

    def mapping_while_the_second_writes(self, split):
        if not second:
            second.append(RacingThread(data.write_files, out, _token_files("second", 2)))
            second[0].start(monkeypatch)  # it renames here, or waits for the reader's maps
        return map_split(self, split)
    monkeypatch.setattr(TokenDataset, "_map", mapping_while_the_second_writes)
    ds = TokenDataset(out)
    monkeypatch.undo()
    second[0].finish()
    assert second[0].waited == ["exclusive"]  # held off by the reader's lock
    seen = {split: set(np.unique(ds.splits[split]).tolist()) for split in ("train", "val")}
    assert (ds.meta["source"], seen) == ("first", {"train": {1}, "val": {1}})
    assert TokenDataset(out).meta["source"] == "second"


def test_a_token_file_renamed_over_between_its_open_and_its_size_check_is_checked_as_opened(
        tmp_path, monkeypatch):
    """Unlocked (no flock), a train.bin renamed over after the reader opened it: the size
    checked against meta.json is the opened file's (fstat), the one mapped. Mutation audit
    (h29j): the size taken by name (path.stat()) passed every test; it read the new file's
    900 tokens against meta.json's 600 and refused good data (or mapped past the end of a
    shorter file) though the file the reader holds is whole."""
    from lockrace import rename_over_once_opened
    import cllm_gpu.data as data
    out = tmp_path / "d"
    out.mkdir()
    data.write_files(out, _token_files("first", 1))
    (tmp_path / "other.bin").write_bytes(np.full(900, 2, dtype="<u2").tobytes())
    monkeypatch.setattr(data, "fcntl", None)
    rename_over_once_opened(monkeypatch, data, out / "train.bin", tmp_path / "other.bin")
    ds = TokenDataset(out)
    monkeypatch.undo()
    assert (out / "train.bin").stat().st_size == 1800  # renamed over while the reader read
    assert ds.num_tokens("train") == ds.meta["train_tokens"] == 600
    assert set(np.unique(ds.splits["train"]).tolist()) == {1}


def test_a_token_file_that_cannot_be_opened_is_refused_in_one_line(good, monkeypatch):
    """A train.bin there but not readable (permissions; root reads anything, so the refusal is
    simulated): a DataError naming the file and the reason, not a traceback. Mutation audit
    (h29j): open's OSError let through passed every test."""
    import builtins
    from pathlib import Path
    import errno
    import cllm_gpu.data as data

    def refusing_train_bin(file, *args, **kwargs):
        if Path(file).name == "train.bin":
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)
    monkeypatch.setattr(data, "open", refusing_train_bin, raising=False)
    with pytest.raises(DataError, match=re.escape(f"{good / 'train.bin'}: cannot read "
                                                  f"(Permission denied)")):
        TokenDataset(good)


def test_temporaries_a_dead_writer_left_are_removed_a_live_ones_kept(tmp_path):
    """A writer killed (kill -9) midway leaves its temporaries, named by its pid: the next
    write into the directory removes them (train.bin's is as large as the corpus); those of
    a writer still running (another prepare into the same directory) are its work in
    progress and are kept, as are those of a writer in another pid namespace (another
    container's: its pid means nothing here), and files of other names are not touched."""
    import os
    import subprocess
    import sys
    from cllm_gpu.data import _pid_namespace, write_files
    from test_checkpoint import _finished_pid
    out = tmp_path / "d"
    out.mkdir()
    dead, here = _finished_pid(), _pid_namespace()
    elsewhere = "ffffffff" if here != "ffffffff" else "00000000"  # another container's
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [f".train.bin.{dead}.{here}.0123abcd.tmp",
                 f".meta.json.{dead}.{here}.0123abcd.tmp"]
        kept = [f".train.bin.{live.pid}.{here}.0123abcd.tmp",
                f".notes.txt.{dead}.{here}.0123abcd.tmp",
                f".train.bin.{dead}.{elsewhere}.0123abcd.tmp", "train.bin.tmp", "mine.txt"]
        for name in stale + kept:
            (out / name).write_bytes(b"partial")
        write_files(out, {"train.bin": b"new", "meta.json": b"{}"})
        assert sorted(p.name for p in out.iterdir()) == sorted(kept + ["train.bin",
                                                                       "meta.json"])
    finally:
        live.kill()
        live.wait()


def test_a_killed_writers_temporaries_are_gone_before_the_next_writer_writes(tmp_path):
    """A real writer killed midway (kill -9 while train.bin's temporary is half written) leaves
    it under the name write_files gives it; the next writer into the directory must read that
    name as a dead writer's and remove it before writing its own (on a disk the killed writer
    filled, its train.bin's temporary is the space this one needs). Mutation audit (h28ab): a
    temporary named by a pid that never reads as dead (0), and the clean-up run after the
    writes, both passed every test, whose stale temporaries were names written by hand."""
    from cllm_gpu.data import write_files
    out = tmp_path / "d"
    out.mkdir()
    _killed_while_writing(
        "from pathlib import Path; from cllm_gpu.data import write_files\n"
        "def half_then_killed(path):\n" + _HALF_THEN_KILLED +
        "write_files(Path(sys.argv[1]), {'train.bin': half_then_killed, 'meta.json': b'{}'})",
        out)
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".train.bin."), left
    seen_while_writing = []

    def write_noting_the_others(path):
        seen_while_writing.extend(p.name for p in out.iterdir() if p != path)
        path.write_bytes(b"new")
    write_files(out, {"train.bin": write_noting_the_others, "meta.json": b"{}"})
    assert seen_while_writing == []
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin"]


def test_a_byte_prepare_removes_a_killed_bpe_prepares_tokenizer_temporary(tmp_path):
    """A BPE prepare killed (kill -9) while writing train.bin leaves its temporaries of
    tokenizer.json and train.bin; a byte prepare into the same directory writes no
    tokenizer.json, and removed only the temporaries of the names it writes: the dead
    writer's .tokenizer.json.<pid>.*.tmp stayed for good (h30g's kill -9 fuzz; seen failing
    here before h30m). Every writer removes the dead writers' temporaries of every file a
    prepare may write."""
    import cllm_gpu.data as data
    from cllm_gpu.data import prepare
    src = tmp_path / "corpus.txt"
    src.write_text("a stitch in time saves nine. " * 200)
    out = tmp_path / "d"
    _killed_while_writing(
        "import cllm_gpu.data as data\n"
        "def half_then_killed(chunks, path):\n" + _HALF_THEN_KILLED +
        "data._write_chunks = half_then_killed\n"
        "data.prepare(sys.argv[1], sys.argv[2], tokenizer='bpe', bpe_vocab_size=300)",
        src, out)
    left = sorted(p.name for p in out.iterdir())
    assert [n.split(".")[1] for n in left] == ["tokenizer", "train"], left
    prepare(src, out, tokenizer="byte")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    prepare(src, out, tokenizer="bpe", bpe_vocab_size=300)  # PREPARE_FILES names them all
    assert sorted(p.name for p in out.iterdir()) == sorted(data.PREPARE_FILES)


def test_every_name_a_writer_may_write_has_dead_writers_temporaries_removed(tmp_path):
    """write_files' may_write: the names this kind of writer writes only at times (a BPE
    prepare's tokenizer.json, an export's tokenizer files) have a dead writer's temporaries
    removed as those of the files written now are; a live writer's of those names, and a
    dead writer's of other names, are kept."""
    import subprocess
    import sys
    from cllm_gpu.data import _pid_namespace, write_files
    from test_checkpoint import _finished_pid
    out = tmp_path / "d"
    out.mkdir()
    dead, here = _finished_pid(), _pid_namespace()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [f".tokenizer.json.{dead}.{here}.0123abcd.tmp",
                 f".train.bin.{dead}.{here}.0123abcd.tmp"]
        kept = [f".tokenizer.json.{live.pid}.{here}.0123abcd.tmp",
                f".notes.txt.{dead}.{here}.0123abcd.tmp"]
        for name in stale + kept:
            (out / name).write_bytes(b"partial")
        write_files(out, {"train.bin": b"new", "meta.json": b"{}"},
                    may_write=("tokenizer.json",))
        assert sorted(p.name for p in out.iterdir()) == sorted(kept + ["train.bin",
                                                                       "meta.json"])
    finally:
        live.kill()
        live.wait()


def test_a_writer_killed_between_its_renames_has_its_old_files_put_back_by_the_next(
        tmp_path, monkeypatch):
    """kill -9 between two renames left the new train.bin beside the old val.bin and
    meta.json, the replaced files kept hidden beside the temporaries not yet renamed; the next
    writer removed all of them as a dead writer's temporaries, so that its own renames failing
    midway left that mix "as it was" (h29af; seen failing: the directory held the new
    train.bin). Now the next writer puts the old files back first, under its lock, and removes
    the rest; its failed renames leave the old files, and its next write all its own."""
    import errno
    import os
    from cllm_gpu.data import write_files
    out = tmp_path / "d"
    out.mkdir()
    write_files(out, _token_files("old", 1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _killed_after_renames(out, 1)
    assert out.joinpath("train.bin").read_bytes() == _token_files("new", 2)["train.bin"]
    replace, renames = os.replace, []

    def failing_its_second(src, dst):  # of the next writer's renames in (not putting back)
        if str(src).endswith(".tmp"):
            renames.append(dst)
            if len(renames) == 2:
                raise OSError(errno.EIO, "Input/output error")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", failing_its_second)
    with pytest.raises(DataError, match="is as it was"):
        write_files(out, _token_files("next", 3))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    write_files(out, _token_files("next", 3))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == _token_files("next", 3)


def test_names_that_only_resemble_a_dead_writers_temporary_are_kept(tmp_path):
    """Only a name write_files itself makes (.NAME.PID.NAMESPACE.RANDOM.tmp, whole) is taken
    for a dead writer's temporary: a user's file whose name contains one, or has a part
    missing or extra, is not removed. Mutation audit (h28ab): the pattern searched for instead
    of matched whole, its random part widened to anything, or its pid made optional, each
    passed every test."""
    from cllm_gpu.data import _pid_namespace, write_files
    from test_checkpoint import _finished_pid
    out = tmp_path / "d"
    out.mkdir()
    dead, here = _finished_pid(), _pid_namespace()
    resembling = [f"copy.train.bin.{dead}.{here}.0123abcd.tmp",
                  f".train.bin.{dead}.{here}.0123abcd.tmp.keep",
                  f".train.bin.{dead}.{here}.0123abcd.old.tmp",
                  f".train.bin.{dead}.{here}.notahex8.tmp",
                  f".train.bin..{here}.0123abcd.tmp"]
    for name in resembling:
        (out / name).write_bytes(b"mine")
    write_files(out, {"train.bin": b"new"})
    assert sorted(p.name for p in out.iterdir()) == sorted(resembling + ["train.bin"])


@pytest.mark.parametrize("unlockable", ["no fcntl", "flock fails", "directory unopenable"])
def test_a_directory_that_cannot_be_locked_is_written_and_read_unlocked(tmp_path, monkeypatch,
                                                                         unlockable):
    """Where the directory cannot be locked (no fcntl off POSIX, a network filesystem without
    flock: ENOLCK, a directory that cannot be opened for reading) write_files renames
    unlocked, as before the lock, and TokenDataset opens the files unlocked: the files are
    written and read, not an error. Mutation audit (h28ab): either OSError in the lock
    (then _renaming_lock) re-raised passed every test."""
    import errno
    import os
    import cllm_gpu.data as data
    out = tmp_path / "d"
    out.mkdir()
    if unlockable == "no fcntl":
        monkeypatch.setattr(data, "fcntl", None)
    elif unlockable == "flock fails":
        def flock(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")
        monkeypatch.setattr(data.fcntl, "flock", flock)
    else:
        os_open = os.open

        def refusing_the_directory(path, flags, *args, **kwargs):
            if os.fspath(path) == os.fspath(out) and flags & os.O_DIRECTORY:
                raise OSError(errno.EACCES, "Permission denied")
            return os_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", refusing_the_directory)
    data.write_files(out, _token_files("written", 3))
    ds = TokenDataset(out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == _token_files("written", 3)
    assert ds.meta["source"] == "written" and ds.num_tokens("train") == 600


def test_without_proc_two_machines_still_have_different_pid_namespaces(monkeypatch):
    """Where /proc cannot be read (macOS, BSD) the machine's name is all that tells two
    writers sharing a directory over NFS apart: without it every such machine had the same
    namespace and took another's running writer for a dead one (its pid no process here).
    Mutation audit (h28ab): the host name dropped passed every test (on Linux boot_id differs
    per machine too)."""
    import os
    import socket
    from pathlib import Path
    import cllm_gpu.data as data

    def unreadable(*args, **kwargs):
        raise FileNotFoundError("no /proc here")
    monkeypatch.setattr(Path, "read_text", unreadable)
    monkeypatch.setattr(os, "readlink", unreadable)
    namespaces = set()
    for host in ("alpha", "beta"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        data._pid_namespace.cache_clear()
        namespaces.add(data._pid_namespace())
    monkeypatch.undo()
    data._pid_namespace.cache_clear()
    assert len(namespaces) == 2 and all(re.fullmatch("[0-9a-f]{8}", n) for n in namespaces)


def _in_a_new_pid_namespace() -> list:
    """The command prefix that runs a process in a pid namespace of its own (as a Docker
    container's, or another machine's, whose pids mean nothing here), or [] where unshare
    cannot make one."""
    import shutil
    import subprocess
    prefix = ["unshare", "--user", "--map-root-user", "--pid", "--fork"]
    if shutil.which("unshare") is None or subprocess.run(
            prefix + ["true"], capture_output=True).returncode != 0:
        return []
    return prefix


def test_a_writer_in_another_pid_namespace_leaves_a_running_writers_temporaries(tmp_path):
    """A writer in a Docker container beside one on the host, both writing one mounted data
    directory (or on two machines sharing it over NFS: two jobs' first `train` runs preparing
    data/default): each judged the other's temporaries by a pid that is no process in its own
    namespace, took them for a dead writer's and removed them; the running writer's rename then
    failed (FileNotFoundError). Here the second writer runs in a pid namespace of its own, in
    the middle of the first's write: the first's temporaries must survive it."""
    import subprocess
    import sys
    from pathlib import Path
    from cllm_gpu.data import write_files
    prefix = _in_a_new_pid_namespace()
    if not prefix:
        pytest.skip("needs unshare with user and pid namespaces")
    out = tmp_path / "d"
    out.mkdir()
    root = Path(__file__).resolve().parents[1]

    def second_writer_in_another_namespace():
        subprocess.run(prefix + [sys.executable, "-c", (
            "import sys; from pathlib import Path; from cllm_gpu.data import write_files; "
            "write_files(Path(sys.argv[1]), {'train.bin': b'B' * 1000, 'meta.json': b'second'})"),
            str(out)], cwd=root, check=True, timeout=60)
    write_files(out, {"train.bin": _written_in_halves(b"A" * 1000,
                                                      second_writer_in_another_namespace),
                      "meta.json": b"first"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {"train.bin": b"A" * 1000,
                                                               "meta.json": b"first"}


def test_missing_dir_and_files(tmp_path, good):
    with pytest.raises(DataError, match="not found"):
        TokenDataset(tmp_path / "nope")
    (good / "val.bin").unlink()
    with pytest.raises(DataError, match="val.bin: missing"):
        TokenDataset(good)


def test_empty_truncated_wrong_dtype(good):
    # "train.bin: empty", not "empty" alone: the latter matched this test's own tmp_path
    # (test_empty_...), so a refusal for any other reason passed (mutation audit, h29j: the
    # empty-file check dropped passed every test)
    (good / "train.bin").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{good / 'train.bin'}: empty")):
        TokenDataset(good)
    (good / "train.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="multiple of 2"):
        TokenDataset(good)
    np.arange(10, dtype=np.uint32).tofile(good / "train.bin")  # uint32 where meta says uint16
    with pytest.raises(DataError, match="meta.json says"):
        TokenDataset(good)


def test_token_ids_out_of_range(good):
    meta = json.loads((good / "meta.json").read_text())
    a = np.fromfile(good / "train.bin", dtype=np.uint16)
    a[17] = 300
    a.tofile(good / "train.bin")
    with pytest.raises(DataError, match="token id 300 >= vocab_size 257"):
        TokenDataset(good)
    assert meta["vocab_size"] == 257
    # a model with a larger vocabulary takes the data, but the data's own range still holds
    # (the check was against the model's 512: id 300 passed, then decoded as a byte)
    with pytest.raises(DataError, match="token id 300 >= vocab_size 257"):
        TokenDataset(good, vocab_size=512)


def test_bad_meta(good):
    (good / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        TokenDataset(good)
    (good / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 256,
                                                "dtype": "float32"}))
    with pytest.raises(DataError, match="dtype"):
        TokenDataset(good)


@pytest.mark.parametrize("fields,message", [
    ({"tokenizer_file": 5}, "tokenizer_file must be a file name in the data directory, got 5"),
    ({"tokenizer_file": "/etc/hostname"}, "tokenizer_file must be a file name in the data "
                                          "directory, got '/etc/hostname'"),
    ({"tokenizer_file": "../tokenizer.json"}, "tokenizer_file must be a file name"),
    ({"tokenizer_sha256": 5}, "tokenizer_sha256 must be a string, got 5"),
])
def test_meta_tokenizer_file_must_name_a_file_beside_the_data(good, fields, message):
    """meta.json's tokenizer_file was joined to the data directory unchecked: an integer was a
    TypeError traceback in sample, eval and export, and an absolute path made export copy that
    file (any file) as the exported tokenizer.json, exit 0."""
    meta = json.loads((good / "meta.json").read_text())
    (good / "meta.json").write_text(json.dumps({**meta, "tokenizer": "file", **fields}))
    with pytest.raises(DataError, match="meta.json: " + re.escape(message)):
        TokenDataset(good)


@pytest.mark.parametrize("value", ["false", 0, None])
def test_meta_add_special_tokens_must_be_true_or_false(good, value):
    """meta.json's add_special_tokens (whether prompts get the tokenizer post-processor's
    tokens, as the data's documents did) is passed to the `tokenizers` library: anything but
    true or false is refused in one line naming the file."""
    meta = json.loads((good / "meta.json").read_text())
    (good / "meta.json").write_text(json.dumps({**meta, "add_special_tokens": value}))
    with pytest.raises(DataError, match="meta.json: add_special_tokens must be true or false, "
                                        "got " + re.escape(repr(value))):
        TokenDataset(good)


@pytest.mark.parametrize("value", [5, None, ["<|endoftext|>"]])
def test_meta_eot_token_must_be_a_string(good, value):
    """meta.json's eot_token was taken unchecked: train, eval and resume ran with exit 0 and
    export wrote it into tokenizer_config.json as bos_token / eos_token (CLI fuzz, before
    2026-12-02)."""
    meta = json.loads((good / "meta.json").read_text())
    (good / "meta.json").write_text(json.dumps({**meta, "eot_token": value}))
    with pytest.raises(DataError, match="meta.json: eot_token must be a string, got "
                                        + re.escape(repr(value))):
        TokenDataset(good)


@pytest.mark.parametrize("meta,message", [
    ([1, 2], "expected a JSON object"),
    ({"vocab_size": 257, "dtype": "uint16"}, "missing field 'tokenizer'"),
    ({"tokenizer": "byte", "vocab_size": True, "dtype": "uint16"},
     "vocab_size must be a positive integer < 2**32, got True"),
    ({"tokenizer": "byte", "vocab_size": 0, "dtype": "uint16"},
     "vocab_size must be a positive integer < 2**32, got 0"),
    ({"tokenizer": "byte", "vocab_size": 65537, "dtype": "uint16"},
     "vocab_size 65537 does not fit dtype uint16"),
    ({"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16", "train_tokens": -1},
     "train_tokens must be a non-negative integer, got -1"),
    ({"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16", "val_tokens": False},
     "val_tokens must be a non-negative integer, got False"),
    ({"tokenizer": 7, "vocab_size": 257, "dtype": "uint16"}, "tokenizer must be a string"),
    ({"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16", "eot_id": 257},
     "eot_id must be a token id in [0, 257), got 257"),
    ({"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16", "eot_id": True},
     "eot_id must be a token id in [0, 257), got True"),
])
def test_bad_meta_fields_are_named(good, meta, message):
    """Each field check of meta.json refuses with the field and the value, before any token is
    read (the coverage audit found these branches run by no test)."""
    (good / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=re.escape(f"{good / 'meta.json'}: {message}")):
        TokenDataset(good)


def test_missing_meta_names_the_file_and_the_fix(good):
    (good / "meta.json").unlink()
    with pytest.raises(DataError, match=re.escape(f"{good / 'meta.json'}: missing (run "
                                                  f"`cllm-gpu prepare`)")):
        TokenDataset(good)


def test_data_shorter_than_one_block(good):
    ds = TokenDataset(good)
    with pytest.raises(DataError, match="shorter than one block"):
        ds.require_block(10_000)


def test_data_vocab_larger_than_model(good):
    with pytest.raises(DataError, match="exceeds the model"):
        TokenDataset(good, vocab_size=100)


def test_uint32_token_files(tmp_path):
    """Vocabularies above 65,535 are stored as uint32; ids are range-checked against it."""
    ids = np.arange(0, 70_000 * 40, 40, dtype=np.uint32) % 70_000
    ids[:-100].astype("<u4").tofile(tmp_path / "train.bin")
    ids[-100:].astype("<u4").tofile(tmp_path / "val.bin")
    meta = {"tokenizer": "bpe", "vocab_size": 70_000, "dtype": "uint32",
            "train_tokens": len(ids) - 100, "val_tokens": 100}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    ds = TokenDataset(tmp_path)
    x, y = ds.get_batch("train", 2, 16, np.random.default_rng(0))
    assert x.max() < 70_000 and (x >= 0).all() and x.dtype == np.int64
    a = np.fromfile(tmp_path / "val.bin", dtype="<u4")
    a[5] = 70_000
    a.tofile(tmp_path / "val.bin")
    with pytest.raises(DataError, match="token id 70000 >= vocab_size 70000"):
        TokenDataset(tmp_path)


@pytest.mark.parametrize("n_words,dtype", [(65534, "uint16"), (65535, "uint32")])
def test_prepare_switches_to_uint32_when_the_vocabulary_exceeds_65535(tmp_path, n_words, dtype):
    """docs/design.md: uint16 ids, uint32 when the vocabulary exceeds 65,535. A word-level
    tokenizer.json of n_words words plus end-of-text: vocabulary 65,535 (ids up to 65,534,
    uint16) or 65,536 (end-of-text is id 65,535, uint32); the highest ids come back."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    tok.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "words.json"))
    top = n_words - 1
    (tmp_path / "t.txt").write_text(" ".join(f"w{i}" for i in (top, 1, top, 2) * 5))
    meta = prepare(tmp_path / "t.txt", tmp_path / "tok", tokenizer=str(tmp_path / "words.json"),
                   val_fraction=0.25)
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (n_words + 1, n_words, dtype)
    assert (tmp_path / "tok" / "train.bin").stat().st_size == \
        meta["train_tokens"] * np.dtype(dtype).itemsize
    ids = _all_ids(tmp_path / "tok")
    assert ids.dtype == np.dtype(dtype)
    assert ids.tolist() == [top, 1, top, 2] * 5 + [n_words]


def _user_tokenizer(path, special=("<|endoftext|>",)):
    """A Hugging Face tokenizer.json built offline here (byte-level BPE), as a user has one."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.ByteLevelBPETokenizer()
    tok.train_from_iterator(["a user's own corpus, with words the user cares about. "] * 50,
                            vocab_size=320, min_frequency=2, special_tokens=list(special),
                            show_progress=False)
    tok.save(str(path))
    return tk.Tokenizer.from_file(str(path))


def test_user_tokenizer_file(tmp_path):
    """prepare --tokenizer PATH: any tokenizer.json, copied beside the data with its SHA-256;
    end-of-text is its <|endoftext|>; the data decodes back through it."""
    import hashlib
    from cllm_gpu.data import load_tokenizer
    user = _user_tokenizer(tmp_path / "user-tokenizer.json")
    src = tmp_path / "docs"
    src.mkdir()
    (src / "1.txt").write_text("words the user cares about")
    (src / "2.txt").write_text("ünïcode too")
    meta = prepare(src, tmp_path / "tok", tokenizer=str(tmp_path / "user-tokenizer.json"))
    raw = (tmp_path / "user-tokenizer.json").read_bytes()
    assert meta["tokenizer"] == "file" and meta["tokenizer_source"].endswith("user-tokenizer.json")
    assert meta["tokenizer_sha256"] == hashlib.sha256(raw).hexdigest()
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == raw
    assert meta["eot_id"] == user.token_to_id("<|endoftext|>")
    assert meta["vocab_size"] == user.get_vocab_size()
    ids = _all_ids(tmp_path / "tok")
    want = (user.encode("words the user cares about").ids + [meta["eot_id"]]
            + user.encode("ünïcode too").ids + [meta["eot_id"]])
    assert ids.tolist() == want
    tok = load_tokenizer(tmp_path / "tok", meta)
    assert tok.decode(ids) == "words the user cares about<|endoftext|>ünïcode too<|endoftext|>"


def test_a_user_tokenizer_in_a_directory_named_with_bytes_that_are_not_utf8(tmp_path):
    """prepare --tokenizer PATH where PATH holds a byte that is not UTF-8 (b'\\xff', the str
    '\\udcff' in Python): the tokenizers library takes a path only as UTF-8 text, and refused
    it ("cannot load tokenizer ('utf-8' codec can't encode character '\\udcff' ...)"). Now
    the bytes prepare reads (and copies beside the data) are the ones it loads, in one read."""
    import hashlib
    user_dir = tmp_path / os.fsdecode(b"tok\xff")
    user_dir.mkdir()
    user = _user_tokenizer(tmp_path / "u.json")  # the library cannot write there either
    (user_dir / "tokenizer.json").write_bytes((tmp_path / "u.json").read_bytes())
    (tmp_path / "1.txt").write_text("words the user cares about")
    meta = prepare(tmp_path / "1.txt", tmp_path / "out",
                   tokenizer=str(user_dir / "tokenizer.json"))
    raw = (user_dir / "tokenizer.json").read_bytes()
    assert meta["tokenizer"] == "file"
    assert meta["tokenizer_sha256"] == hashlib.sha256(raw).hexdigest()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == raw
    assert _all_ids(tmp_path / "out").tolist() == (
        user.encode("words the user cares about").ids + [meta["eot_id"]])


def test_a_token_directory_as_tokenizer_gives_the_tokenizer_its_data_was_prepared_with(tmp_path):
    """--tokenizer DIR of a token directory: its tokenizer.json was taken whatever meta.json
    said, and a byte prepare writes none, so after a BPE prepare and a byte prepare into one
    directory the earlier BPE's tokenizer.json was used (vocab 290 for data of vocab 257)
    without a word. The directory's meta.json decides: byte data is refused naming
    --tokenizer byte; a tokenizer.json is checked against its SHA-256."""
    src, d = tmp_path / "t.txt", tmp_path / "d"
    src.write_text("a stitch in time saves nine. " * 200)
    bpe = prepare(src, d, tokenizer="bpe", bpe_vocab_size=300)
    again = prepare(src, tmp_path / "again", tokenizer=str(d))
    assert (again["tokenizer_sha256"], again["vocab_size"]) == (bpe["tokenizer_sha256"],
                                                                bpe["vocab_size"])
    prepare(src, d, tokenizer="byte")
    (d / "tokenizer.json").write_bytes(b"{}")  # the BPE prepare's, as older versions left it
    with pytest.raises(DataError, match=rf"^--tokenizer {d}: a token directory prepared with the "
                                        rf"byte tokenizer \(a tokenizer.json there is an earlier "
                                        rf"prepare's\): give --tokenizer byte$"):
        prepare(src, tmp_path / "other", tokenizer=str(d))
    assert not (tmp_path / "other").exists()


def test_a_token_directory_as_tokenizer_keeps_its_end_of_text_token(tmp_path):
    """--tokenizer DIR of data prepared with --eot-token </s>: without --eot-token again,
    prepare looked for <|endoftext|> in its tokenizer and refused ("the tokenizer has no
    '<|endoftext|>' token"), though meta.json records </s>. The directory's own is the
    default; one given is still used."""
    user = _character_tokenizer(tmp_path / "chars.json", added=False)
    src = tmp_path / "t.txt"
    src.write_text("ab cd")
    first = prepare(src, tmp_path / "first", tokenizer=str(tmp_path / "chars.json"),
                    eot_token="</s>")
    again = prepare(src, tmp_path / "again", tokenizer=str(tmp_path / "first"))
    assert (again["eot_token"], again["eot_id"]) == ("</s>", first["eot_id"])
    assert again["eot_id"] == user.token_to_id("</s>")
    with pytest.raises(DataError, match="has no '<s>' token"):
        prepare(src, tmp_path / "other", tokenizer=str(tmp_path / "first"), eot_token="<s>")


def test_a_byte_prepare_removes_the_tokenizer_of_the_data_it_replaces(tmp_path, monkeypatch):
    """A byte prepare writes no tokenizer.json, and one into a directory an earlier BPE or
    tokenizer.json prepare wrote left that tokenizer.json beside the byte data: the file
    anything reads by name (`prepare --tokenizer DIR/tokenizer.json`, transformers) took for
    the data's tokenizer, a vocabulary of 300 for data of 257. Now it goes with the data it
    belonged to, once the new files are all in; a byte prepare that fails leaves it with the
    old data, and a tokenizer.json no earlier meta.json vouches for (the user's) stays."""
    pytest.importorskip("tokenizers")
    src, d = tmp_path / "t.txt", tmp_path / "d"
    src.write_text("a stitch in time saves nine. " * 200)
    prepare(src, d, tokenizer="bpe", bpe_vocab_size=300)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    in_the_way = _temporary(monkeypatch, d, "val.bin")
    in_the_way.mkdir()
    with pytest.raises(DataError, match="is as it was"):
        prepare(src, d, tokenizer="byte")
    in_the_way.rmdir()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    # nor one interrupted in its renames: the tokenizer goes only once they are all in
    # (mutation audit: removing it before them passed every test)
    done = []
    _renames_interrupted_after(monkeypatch, 1, done)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, d, tokenizer="byte")
    monkeypatch.setattr(os, "replace", _REAL_REPLACE)
    assert done[1] == "interrupted", done
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    prepare(src, d, tokenizer="byte")
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    users = b'{"the user\'s": "own file"}'
    (d / "tokenizer.json").write_bytes(users)
    prepare(src, d, tokenizer="byte")
    assert (d / "tokenizer.json").read_bytes() == users


def test_a_byte_prepare_keeps_a_tokenizer_json_meta_json_does_not_name(tmp_path):
    """Where the earlier data's meta.json names another tokenizer file (data another tool
    wrote, tokenizer_file "custom.json"), a tokenizer.json beside it is not that data's,
    even with the same bytes: a byte prepare keeps it (mutation audit: not reading
    tokenizer_file passed every test)."""
    pytest.importorskip("tokenizers")
    src, d = tmp_path / "t.txt", tmp_path / "d"
    src.write_text("a stitch in time saves nine. " * 200)
    prepare(src, d, tokenizer="bpe", bpe_vocab_size=300)
    meta = json.loads((d / "meta.json").read_text())
    (d / "custom.json").write_bytes((d / "tokenizer.json").read_bytes())
    (d / "meta.json").write_text(json.dumps(dict(meta, tokenizer_file="custom.json")))
    prepare(src, d, tokenizer="byte")
    assert (d / "tokenizer.json").read_bytes() == (d / "custom.json").read_bytes()


def test_a_byte_prepare_keeps_the_tokenizer_json_an_earlier_prepare_was_given_not_a_copy(
        tmp_path, monkeypatch):
    """`prepare --tokenizer D/tokenizer.json --out D` (the user's tokenizer, data prepared
    beside it): its meta.json names that file as its tokenizer, with its SHA-256, and a byte
    prepare into D then deleted it as the earlier prepare's, the user's only copy. It was
    the earlier prepare's source, not its output: it stays."""
    pytest.importorskip("tokenizers")
    src, d = tmp_path / "t.txt", tmp_path / "d"
    src.write_text("a stitch in time saves nine. " * 200)
    prepare(src, tmp_path / "bpe", tokenizer="bpe", bpe_vocab_size=300)
    d.mkdir()
    users = (tmp_path / "bpe" / "tokenizer.json").read_bytes()
    (d / "tokenizer.json").write_bytes(users)
    prepare(src, d, tokenizer=str(d / "tokenizer.json"))
    prepare(src, d, tokenizer="byte")
    assert (d / "tokenizer.json").read_bytes() == users
    # the same given relative to the directory that prepare ran in, the byte prepare run from
    # another: the recorded source names no file from there, and the file is kept still
    monkeypatch.chdir(tmp_path)
    prepare(src, d, tokenizer="d/tokenizer.json")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    prepare(src, d, tokenizer="byte")
    assert (d / "tokenizer.json").read_bytes() == users
    # given from another file (found from here), D's tokenizer.json is that prepare's copy:
    # the byte prepare removes it, as a BPE prepare's (mutation audit: taking only "bpe"
    # data's tokenizer.json for an earlier prepare's passed every test)
    prepare(src, d, tokenizer=str(tmp_path / "bpe" / "tokenizer.json"))
    assert (d / "tokenizer.json").read_bytes() == users
    prepare(src, d, tokenizer="byte")
    assert not (d / "tokenizer.json").exists()
    assert (tmp_path / "bpe" / "tokenizer.json").read_bytes() == users


@pytest.mark.parametrize("setting", ["truncation", "padding"])
def test_a_tokenizer_jsons_truncation_and_padding_never_reach_the_data(tmp_path, setting):
    """A tokenizer.json may carry the truncation or padding it was saved with (one saved from
    an encoder's pipeline: max_length 128, say). prepare encoded the documents with them:
    every document was cut to max_length tokens (28 -> 8 here) without a word, or padded with
    the pad id to the longest of its batch (26 pad ids inside the data), and a sample's prompt
    was cut too. Documents and prompts are encoded whole, unpadded; the
    tokenizer.json is still copied as it is."""
    from cllm_gpu.data import load_tokenizer
    user = _user_tokenizer(tmp_path / "plain.json", special=("<|endoftext|>", "<pad>"))
    if setting == "truncation":
        user.enable_truncation(max_length=8)
    else:
        user.enable_padding(pad_id=user.token_to_id("<pad>"), pad_token="<pad>")
    user.save(str(tmp_path / "user.json"))
    plain = type(user).from_file(str(tmp_path / "plain.json"))  # neither
    docs = ["words the user cares about " * 5, "a"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare(tmp_path / "c.jsonl", tmp_path / "tok", tokenizer=str(tmp_path / "user.json"))
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == \
        (tmp_path / "user.json").read_bytes()
    want = [i for d in docs for i in (*plain.encode(d).ids, meta["eot_id"])]
    assert len(want) == 30
    assert _all_ids(tmp_path / "tok").tolist() == want
    tok = load_tokenizer(tmp_path / "tok", meta)
    assert tok.encode(docs[0]).tolist() == plain.encode(docs[0]).ids


def _character_tokenizer(path, eot_token="</s>", added=True):
    """A tokenizer.json of single characters whose end-of-text token `eot_token` is an
    ordinary added token (added) or a word of its model's vocabulary: neither is special."""
    tk = pytest.importorskip("tokenizers")
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    if not added:
        vocab[eot_token] = len(vocab)
    tok = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = (tk.pre_tokenizers.Split("", "isolated") if added
                         else tk.pre_tokenizers.WhitespaceSplit())
    tok.decoder = tk.decoders.Fuse()  # the characters joined as they are
    if added:
        tok.add_tokens([tk.AddedToken(eot_token, special=False)])
    tok.save(str(path))
    return tok


def test_an_end_of_text_token_not_marked_special_still_only_ends_documents(tmp_path):
    """--eot-token naming an added token the tokenizer.json does not mark special: a
    document holding its text got the end-of-text id inside it (encode_special_tokens passes
    over ordinary added tokens), though end-of-text only ever ends a document. Documents are
    encoded with it special: its text there is text; a prompt's is still the token."""
    from cllm_gpu.data import load_tokenizer
    user = _character_tokenizer(tmp_path / "chars.json")
    (tmp_path / "t.txt").write_text("ab </s> cd")
    notes = []
    meta = prepare(tmp_path / "t.txt", tmp_path / "tok", tokenizer=str(tmp_path / "chars.json"),
                   eot_token="</s>", notes=notes)
    eot = meta["eot_id"]
    assert eot == user.token_to_id("</s>")
    ids = _all_ids(tmp_path / "tok").tolist()
    assert ids == [user.token_to_id(c) for c in "ab </s> cd"] + [eot]
    assert notes == []
    tok = load_tokenizer(tmp_path / "tok", meta)
    assert eot in tok.encode("x</s>").tolist()
    assert tok.decode(ids) == "ab </s> cd</s>"


def test_an_end_of_text_word_of_the_models_vocabulary_inside_documents_is_warned(tmp_path):
    """An end-of-text token that is a word of the tokenizer's model vocabulary is encoded as
    itself from its text whatever is marked special: prepare says how many times it stands
    inside documents, naming --eot-token."""
    _character_tokenizer(tmp_path / "words.json", added=False)
    (tmp_path / "c.jsonl").write_text('{"text": "a </s> b"}\n{"text": "c d"}\n')
    notes = []
    prepare(tmp_path / "c.jsonl", tmp_path / "tok", tokenizer=str(tmp_path / "words.json"),
            eot_token="</s>", notes=notes)
    assert len(notes) == 1 and notes[0].startswith(
        "the end-of-text token '</s>' stands 1 time inside documents: ") and \
        "--eot-token" in notes[0]


def test_user_tokenizer_errors(tmp_path):
    _user_tokenizer(tmp_path / "no-eot.json", special=("<s>",))
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(DataError, match=r"no '<\|endoftext\|>' token \(name its end-of-text "
                                        r"token with --eot-token\)"):
        prepare(tmp_path / "t.txt", tmp_path / "out", tokenizer=str(tmp_path / "no-eot.json"))
    assert not (tmp_path / "out").exists()
    meta = prepare(tmp_path / "t.txt", tmp_path / "out", tokenizer=str(tmp_path / "no-eot.json"),
                   eot_token="<s>")
    assert meta["eot_token"] == "<s>" and meta["eot_id"] == 0
    with pytest.raises(DataError, match=r"missing\.json: no such file \(give 'byte', 'bpe'"):
        prepare(tmp_path / "t.txt", tmp_path / "o2", tokenizer=str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{not a tokenizer")
    with pytest.raises(DataError, match=r"junk\.json: cannot load tokenizer"):
        prepare(tmp_path / "t.txt", tmp_path / "o3", tokenizer=str(tmp_path / "junk.json"))


_WORDS = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "<s>": 3, "</s>": 4, "<|endoftext|>": 5,
          "hello": 6, "world": 7, "foo": 8}


def _tokenizer_adding_specials(path, kind):
    """A word-level tokenizer.json whose post-processor adds special tokens to every encode
    call, as BERT's ("[CLS] $A [SEP]"), Llama's ("<s> $A") and RoBERTa's ("<s> $A </s>") do."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.WordLevel(_WORDS, unk_token="[UNK]"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "<s>", "</s>", "<|endoftext|>"])
    ids = {t: _WORDS[t] for t in ("[CLS]", "[SEP]", "<s>", "</s>")}
    tok.post_processor = {
        "bert": lambda: tk.processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])]),
        "llama": lambda: tk.processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["<s>"])]),
        "roberta": lambda: tk.processors.RobertaProcessing(("</s>", ids["</s>"]),
                                                           ("<s>", ids["<s>"])),
    }[kind]()
    tok.save(str(path))
    assert tok.encode("hello").ids != [_WORDS["hello"]]  # the post-processor adds some
    return path


@pytest.mark.parametrize("kind", ["bert", "llama", "roberta"])
def test_a_tokenizers_post_processor_specials_are_in_no_document_nor_prompt(tmp_path, kind):
    """A user's tokenizer.json whose post-processor adds tokens to each encode call (BERT's
    [CLS] ... [SEP], Llama's <s>, RoBERTa's <s> ... </s>): prepare put them around every
    document, between the end-of-text tokens, and sample around every prompt, so a prompt
    ended in [SEP] or </s>, where the data's documents end. GPT-style data is the documents'
    tokens each followed by end-of-text, and a prompt is its text's tokens: the
    post-processor's tokens are left out of both (meta.json: add_special_tokens false)."""
    from cllm_gpu.data import load_tokenizer
    path = _tokenizer_adding_specials(tmp_path / f"{kind}.json", kind)
    docs = ["hello world", "foo hello", "world foo foo"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare(tmp_path / "d.jsonl", tmp_path / "tok", tokenizer=str(path),
                   val_fraction=0.2)
    eot = _WORDS["<|endoftext|>"]
    want = [i for d in docs for i in [*(_WORDS[w] for w in d.split()), eot]]
    assert _all_ids(tmp_path / "tok").tolist() == want
    assert meta["add_special_tokens"] is False
    tok = load_tokenizer(tmp_path / "tok", meta)
    assert tok.encode("hello world").tolist() == [_WORDS["hello"], _WORDS["world"]]


def test_data_prepared_with_the_post_processors_specials_keeps_them_in_prompts(tmp_path):
    """Data prepared before add_special_tokens was recorded holds the post-processor's tokens in
    every document: its prompts are encoded as its documents were (the same tokenizer.json, the
    same SHA-256, must not take another rule for old data unsaid); prepare again for data
    without them."""
    from cllm_gpu.data import load_tokenizer, read_meta
    path = _tokenizer_adding_specials(tmp_path / "bert.json", "bert")
    (tmp_path / "t.txt").write_text("hello world")
    meta = prepare(tmp_path / "t.txt", tmp_path / "tok", tokenizer=str(path))
    del meta["add_special_tokens"]
    (tmp_path / "tok" / "meta.json").write_text(json.dumps(meta))
    tok = load_tokenizer(tmp_path / "tok", read_meta(tmp_path / "tok"))
    assert tok.encode("hello").tolist() == [_WORDS["[CLS]"], _WORDS["hello"], _WORDS["[SEP]"]]


def _prepared_before_the_rule(source, out, tokenizer, monkeypatch):
    """Token data as prepare wrote it before 2026-12-02: documents encoded with the library's
    default (the post-processor's tokens in each), no add_special_tokens in meta.json."""
    from cllm_gpu import data
    init = data.HFTokenizer.__init__

    def library_default(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_special_tokens = True
    with monkeypatch.context() as m:
        m.setattr(data.HFTokenizer, "__init__", library_default)
        meta = prepare(source, out, tokenizer=tokenizer)
    del meta["add_special_tokens"]
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize("run_data", ["before", "since"])
def test_a_run_refuses_data_framed_by_the_other_post_processor_rule(tmp_path, monkeypatch,
                                                                      run_data):
    """A run trained on data prepared before 2026-12-02 (BERT's [CLS] ... [SEP] around every
    document) was accepted with data of the same tokenizer.json prepared since (no such
    tokens), and the other way round: the tokenizer identity a checkpoint records left the
    rule out. Resume, sample, eval and export (check_run_tokenizer) now refuse it in one line
    saying what to do; data of the run's own rule passes, and a checkpoint written before the
    rule was recorded is not checked."""
    from cllm_gpu.data import check_run_tokenizer, read_meta, tokenizer_identity
    path = _tokenizer_adding_specials(tmp_path / "bert.json", "bert")
    (tmp_path / "t.txt").write_text("hello world foo " * 50)
    before = _prepared_before_the_rule(tmp_path / "t.txt", tmp_path / "before", str(path),
                                       monkeypatch)
    since = tmp_path / "since"
    prepare(tmp_path / "t.txt", since, tokenizer=str(path))
    assert _all_ids(before)[0] == _WORDS["[CLS]"] and _all_ids(since)[0] == _WORDS["hello"]
    run_dir, other = (before, since) if run_data == "before" else (since, before)
    recorded = tokenizer_identity(read_meta(run_dir))
    with pytest.raises(DataError) as e:
        check_run_tokenizer(recorded, other, read_meta(other), "RUN/ckpt-00000002")
    assert str(e.value) == {
        "before": f"{other}'s documents leave out the tokenizer post-processor's tokens ([CLS], "
                  f"[SEP]) that every document the run RUN/ckpt-00000002 was trained on carried "
                  f"(prepared before 2026-12-02): the model never saw documents or prompts "
                  f"without them; give --data the run's own token directory",
        "since": f"{other} was prepared before 2026-12-02: every document carries the tokenizer "
                 f"post-processor's tokens ([CLS], [SEP]), which the run RUN/ckpt-00000002 was "
                 f"trained without; prepare its source again (`cllm-gpu prepare`)"}[run_data]
    assert check_run_tokenizer(recorded, run_dir, read_meta(run_dir), "RUN") is None
    del recorded["add_special_tokens"]  # a checkpoint written before the rule was recorded
    assert check_run_tokenizer(recorded, other, read_meta(other), "RUN") is None


def test_a_post_processor_adding_nothing_makes_the_rule_no_difference(tmp_path, monkeypatch):
    """prepare's own BPE (as GPT-2's tokenizer.json) adds no token in its post-processor: data
    of either rule holds the same ids, and a run trained on one takes the other."""
    from cllm_gpu.data import check_run_tokenizer, read_meta, tokenizer_identity
    pytest.importorskip("tokenizers")
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    since = tmp_path / "since"
    prepare(tmp_path / "t.txt", since, tokenizer="bpe", bpe_vocab_size=300)
    before = _prepared_before_the_rule(tmp_path / "t.txt", tmp_path / "before",
                                       str(since / "tokenizer.json"), monkeypatch)
    assert _all_ids(before).tolist() == _all_ids(since).tolist()
    for run_dir, other in ((before, since), (since, before)):
        recorded = tokenizer_identity(read_meta(run_dir))
        assert check_run_tokenizer(recorded, other, read_meta(other), "RUN") is None


def _gpt2_files(d, special=("<|endoftext|>",)):
    """GPT-2's original tokenizer files (vocab.json, merges.txt) of a byte-level BPE built
    offline here; (vocab, merges.txt's lines)."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.ByteLevelBPETokenizer()
    tok.train_from_iterator(["a user's own corpus, with words the user cares about. "] * 50,
                            vocab_size=320, min_frequency=2, special_tokens=list(special),
                            show_progress=False)
    d.mkdir()
    tok.save_model(str(d))
    return (json.loads((d / "vocab.json").read_text()),
            (d / "merges.txt").read_text().split("\n"))


def _edit(path, text):
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("edit,pattern", [
    (lambda d, v, m: (d / "merges.txt").unlink(),
     r"gpt2/merges\.txt: missing \(GPT-2's vocab file needs its merges file beside it: "
     r"vocab\.json and merges\.txt, or PREFIX-vocab\.json and PREFIX-merges\.txt\)"),
    (lambda d, v, m: _edit(d / "vocab.json", '{"a": 0,'), r"gpt2/vocab\.json: not valid JSON"),
    (lambda d, v, m: _edit(d / "vocab.json", '["a", "b"]'),
     r"gpt2/vocab\.json: expected a JSON object of token -> id"),
    (lambda d, v, m: _edit(d / "vocab.json", json.dumps({**v, "a": -1})),
     r"gpt2/vocab\.json: expected a JSON object of token -> id"),
    (lambda d, v, m: _edit(d / "vocab.json", json.dumps({**v, "zz": 2**33})),
     r"gpt2/vocab\.json: cannot build GPT-2's BPE from it \("),
    (lambda d, v, m: _edit(d / "vocab.json", json.dumps({**v, "zz": v["a"]})),
     r"gpt2/vocab\.json: 'a' and 'zz' have the same id"),
    (lambda d, v, m: _edit(d / "vocab.json", json.dumps({k: i for k, i in v.items() if k != "Ġ"})),
     r"gpt2/vocab\.json: not GPT-2's byte-level vocabulary: 1 of the 256 byte symbols are "
     r"missing \(the first: 'Ġ'\)"),
    (lambda d, v, m: _edit(d / "merges.txt", "\n".join(m[:3] + ["abc"] + m[3:])),
     r"gpt2/merges\.txt:4: expected two tokens separated by a space, got 'abc'"),
    (lambda d, v, m: _edit(d / "merges.txt", "\n".join(m[:2] + [""] + m[2:])),
     r"gpt2/merges\.txt:3: expected two tokens separated by a space, got ''"),
    (lambda d, v, m: _edit(d / "merges.txt", "\n".join(m[:2] + ["a qq"] + m[2:])),
     r"gpt2/merges\.txt:3: 'qq' is not in vocab\.json"),
    # '#version' is a header on the first line only; later it is a merge like any other
    (lambda d, v, m: _edit(d / "merges.txt", "\n".join(m[:2] + ["#version: 0.2"] + m[2:])),
     r"gpt2/merges\.txt:3: '#version:' is not in vocab\.json"),
    (lambda d, v, m: (d / "merges.txt").write_bytes(b"#version: 0.2\n\xff \xfe\n"),
     r"gpt2/merges\.txt: cannot read"),
    (lambda d, v, m: _edit(d / "added_tokens.json", json.dumps({"<pad>": len(v) + 1})),
     r"gpt2/added_tokens\.json: '<pad>' has id \d+; added tokens must take the ids after "
     r"vocab\.json's, in order \(\d+ is next\)"),
    (lambda d, v, m: _edit(d / "added_tokens.json", json.dumps({"a": v["a"] + 1})),
     r"gpt2/added_tokens\.json: 'a' has id \d+ there, \d+ in vocab\.json"),
    (lambda d, v, m: _edit(d / "vocab.json", json.dumps(
        {k: i for k, i in v.items() if k != "<|endoftext|>"})),
     r"gpt2/vocab\.json: the tokenizer has no '<\|endoftext\|>' token \(name its end-of-text "
     r"token with --eot-token\)"),
])
def test_gpt2_tokenizer_files_that_cannot_be_read_are_one_line_errors(tmp_path, edit, pattern):
    """prepare --tokenizer DIR (GPT-2's vocab.json + merges.txt): a missing merges.txt, a
    malformed vocab.json, merges.txt or added_tokens.json is one line naming the file (and
    the line), and nothing is written."""
    vocab, merges = _gpt2_files(tmp_path / "gpt2")
    edit(tmp_path / "gpt2", vocab, merges)
    (tmp_path / "t.txt").write_text("some text")
    r = run_cli("prepare", tmp_path / "t.txt", "--tokenizer", tmp_path / "gpt2", "--out",
                tmp_path / "out")
    assert_one_line_error(r, pattern)
    assert not (tmp_path / "out").exists()


def test_gpt2_tokenizer_files_as_a_tokenizer_json_is_read(tmp_path):
    """The directory and its vocab.json give the same data; a directory that also holds a
    tokenizer.json gives that file, byte for byte (what transformers loads first); one with
    neither is named; --eot-token names another end-of-text token."""
    vocab, _ = _gpt2_files(tmp_path / "gpt2", special=("<|endoftext|>", "<s>"))
    (tmp_path / "t.txt").write_text("words the user cares about, ünïcode too")
    a = prepare(tmp_path / "t.txt", tmp_path / "a", tokenizer=str(tmp_path / "gpt2"))
    b = prepare(tmp_path / "t.txt", tmp_path / "b",
                tokenizer=str(tmp_path / "gpt2" / "vocab.json"))
    assert a == b and a["tokenizer_source"] == str(tmp_path / "gpt2" / "vocab.json")
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["eot_id"] == vocab["<|endoftext|>"]
    s = prepare(tmp_path / "t.txt", tmp_path / "s", tokenizer=str(tmp_path / "gpt2"),
                eot_token="<s>")
    assert (s["eot_token"], s["eot_id"]) == ("<s>", vocab["<s>"])
    _user_tokenizer(tmp_path / "gpt2" / "tokenizer.json")
    c = prepare(tmp_path / "t.txt", tmp_path / "c", tokenizer=str(tmp_path / "gpt2"))
    assert c["tokenizer_source"] == str(tmp_path / "gpt2" / "tokenizer.json")
    assert ((tmp_path / "c" / "tokenizer.json").read_bytes()
            == (tmp_path / "gpt2" / "tokenizer.json").read_bytes())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"--tokenizer .*empty: the directory holds neither a "
                                        r"tokenizer\.json nor GPT-2's vocab\.json and merges\.txt"):
        prepare(tmp_path / "t.txt", tmp_path / "d", tokenizer=str(tmp_path / "empty"))


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """JSON Lines separates records by \\n. json.dumps(ensure_ascii=False) writes U+2028,
    U+2029 and U+0085 raw inside strings (web text has them); str.splitlines() broke a record
    there ('not valid JSON'). \\r\\n line ends still work."""
    from cllm_gpu.data import read_documents
    texts = ["one\u2028line separator", "two\u2029paragraph", "three\x85next line", "four\r"]
    path = tmp_path / "c.jsonl"
    path.write_bytes("\r\n".join(json.dumps({"text": t}, ensure_ascii=False)
                                 for t in texts).encode("utf-8") + b"\n")
    assert read_documents(path) == texts
    meta = prepare(path, tmp_path / "tok")
    assert meta["documents"] == 4


def test_a_folder_skips_hidden_files_and_folders(tmp_path):
    """A folder's hidden entries (names starting with '.') are skipped, at any depth: a
    corpus kept in a git checkout must not take in .git's objects. The folder given may itself
    sit under a hidden one."""
    from cllm_gpu.data import collect_text_files
    src = tmp_path / ".corpora" / "src"
    for rel in ("a.txt", ".hidden.txt", ".git/HEAD", ".git/objects/ab/cdef", "sub/b.txt",
                "sub/.cache/c.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    assert collect_text_files(src) == [src / "a.txt", src / "sub" / "b.txt"]
    assert prepare(src, tmp_path / "tok")["documents"] == 2


def test_bpe_records_the_end_of_text_token_it_trained_with(tmp_path):
    """--eot-token names a tokenizer.json's own token; a BPE trained here always has
    <|endoftext|>. meta.json recorded the flag's value for bpe too, so `export` wrote a
    tokenizer_config.json whose bos/eos ('</s>') the tokenizer does not have."""
    pytest.importorskip("tokenizers")
    from cllm_gpu.data import load_tokenizer
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 100)
    meta = prepare(tmp_path / "t.txt", tmp_path / "tok", tokenizer="bpe", bpe_vocab_size=300,
                   eot_token="</s>")
    tok = load_tokenizer(tmp_path / "tok", meta)
    assert meta["eot_token"] == tok.decode([meta["eot_id"]]) == "<|endoftext|>"


def test_a_tokenizer_whose_ids_have_gaps_gets_a_vocabulary_past_its_highest_id(tmp_path):
    """get_vocab_size() counts tokens, not ids: a tokenizer.json whose ids have gaps (here
    'c' is 70,000 among 4 tokens) was given vocab_size 4 and uint16, so 70,000 was written
    as 4,464 (wrapped) and the data refused when opened. The vocabulary is the highest id
    + 1: uint32, and the ids come back as encoded."""
    tk = pytest.importorskip("tokenizers")
    from cllm_gpu.data import load_tokenizer
    tok = tk.Tokenizer(tk.models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2, "c": 70_000},
                                           unk_token="a"))
    tok.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "gaps.json"))
    (tmp_path / "t.txt").write_text("a c b c " * 4)
    meta = prepare(tmp_path / "t.txt", tmp_path / "tok", tokenizer=str(tmp_path / "gaps.json"))
    assert (meta["vocab_size"], meta["dtype"]) == (70_001, "uint32")
    assert _all_ids(tmp_path / "tok").tolist() == [1, 70_000, 2, 70_000] * 4 + [0]
    tok = load_tokenizer(tmp_path / "tok", meta)
    assert tok.vocab_size == 70_001 and tok.decode([1, 70_000]) == "a c"
    # an id in the gap has no token: refused, not dropped from the text as the library does
    # (mutation audit: an empty gap set passed every test)
    with pytest.raises(DataError, match=r"^token id 5 has no token in the file tokenizer"):
        tok.decode([1, 5, 2])


def test_a_bad_id_in_a_large_file_is_placed_where_it_is(good, monkeypatch):
    """Files over the scan limit are checked on 1 MiB windows; the position named was the
    bad id's offset inside its window, not in the file (500,000 for one at 3,000,000)."""
    from cllm_gpu import data
    a = np.full(4_000_000, 104, dtype="<u2")
    a[3_000_000] = 999
    a.tofile(good / "train.bin")
    meta = json.loads((good / "meta.json").read_text())
    (good / "meta.json").write_text(json.dumps(dict(meta, train_tokens=a.size)))
    monkeypatch.setattr(data, "_SCAN_LIMIT", 1 << 20)
    with pytest.raises(DataError, match=r"train\.bin: token id 999 >= vocab_size 257 \(first "
                                        r"bad id near token 3000000\)"):
        TokenDataset(good)


def test_text_a_tokenizer_cannot_encode_is_a_data_error(tmp_path):
    """A word-level tokenizer.json without an unknown token cannot encode an unknown word: the
    tokenizers library's bare Exception was a traceback from prepare and from sample's
    prompt; now a DataError (one line from the CLI) quoting the library, nothing written."""
    tk = pytest.importorskip("tokenizers")
    from cllm_gpu.data import HFTokenizer
    tok = tk.Tokenizer(tk.models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2}))
    tok.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "words.json"))
    (tmp_path / "t.txt").write_text("a b zzz a")
    with pytest.raises(DataError, match=r"cannot encode the corpus \(WordLevel error: Missing "
                                        r"\[UNK\] token from the vocabulary\)"):
        prepare(tmp_path / "t.txt", tmp_path / "out", tokenizer=str(tmp_path / "words.json"))
    assert not (tmp_path / "out").exists()
    words = HFTokenizer.load(tmp_path / "words.json")
    assert words.encode("a b").tolist() == [1, 2]
    with pytest.raises(DataError, match=r"cannot encode 'zzz' \(WordLevel error"):
        words.encode("zzz")


@pytest.mark.parametrize("kind", ["byte", "bpe", "file"])
def test_end_of_text_written_in_a_document_is_text(tmp_path, kind):
    """A document that mentions '<|endoftext|>' (text about tokenizers, web pages) holds that
    text, not the special token: the tokenizers library matched it, so prepare put an
    end-of-text inside the document (3 for 2 documents here); nanoGPT encodes documents with
    encode_ordinary for the same reason. Prompts still reach the special token, with every
    tokenizer: the byte tokenizer's prompts spelled it as 13 bytes, where the BPE ones, and
    the tokenizer.json export writes for the byte tokenizer (transformers'), give end-of-text."""
    if kind != "byte":
        pytest.importorskip("tokenizers")
    from cllm_gpu.data import load_tokenizer
    docs = ["GPT-2 ends a document with <|endoftext|> and starts again.", "second"]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    tokenizer = kind
    if kind == "file":
        _user_tokenizer(tmp_path / "user.json")
        tokenizer = str(tmp_path / "user.json")
    meta = prepare(tmp_path / "c.jsonl", tmp_path / "tok", tokenizer=tokenizer,
                   bpe_vocab_size=300, val_fraction=0.05)
    ids = _all_ids(tmp_path / "tok")
    assert (ids == meta["eot_id"]).sum() == meta["documents"] == 2
    tok = load_tokenizer(tmp_path / "tok", meta)
    assert tok.decode(ids) == "<|endoftext|>".join(docs) + "<|endoftext|>"
    assert tok.encode("a<|endoftext|>")[-1] == meta["eot_id"]
    assert tok.decode(tok.encode("a<|endoftext|>b")) == "a<|endoftext|>b"


def test_encoding_documents_leaves_prompts_reaching_the_end_of_text_token():
    """encode_documents turns the library's encode_special_tokens on for the documents only
    (so '<|endoftext|>' written in one stays text) and puts it back after: left on, a prompt
    encoded later by the same tokenizer spelled '<|endoftext|>' as text, not as the token
    (mutation audit: the finally that puts it back could go with every test passing)."""
    pytest.importorskip("tokenizers")
    from cllm_gpu.data import HFTokenizer
    tok = HFTokenizer.train(["the quick brown fox jumps over the lazy dog. "] * 20, 300)
    [doc] = tok.encode_documents(["a<|endoftext|>b"])
    assert tok.eot_id not in doc.tolist()
    assert tok.encode("a<|endoftext|>")[-1] == tok.eot_id


def test_a_data_change_note_compares_only_the_fields_both_sides_record():
    """data_change_note compares the fingerprint a checkpoint recorded with the data's
    meta.json only on the fields both hold: data written by another tool may lack the unigram
    entropy (or the counts), and a field one side lacks is no sign of other tokens; a field
    that differs while the others agree is (mutation audit: comparing every field noted a
    change here, then raised KeyError building it; any() for all() noted nothing)."""
    from cllm_gpu.data import data_change_note, data_fingerprint
    counts = {"train_tokens": 900, "val_tokens": 100}
    # what a checkpoint records of such data: the fields it has, never a None (state.json's
    # check refuses a data.prepared that is not all numbers: the run could not resume)
    assert data_fingerprint(dict(counts, tokenizer="byte")) == counts
    with_entropy = dict(counts, unigram_entropy_nats=2.5)
    assert data_change_note(counts, "tok", with_entropy, "run/ckpt-00000003") is None
    assert data_change_note(with_entropy, "tok", counts, "run/ckpt-00000003") is None
    assert data_change_note(None, "tok", with_entropy, "run/ckpt-00000003") is None
    note = data_change_note(with_entropy, "tok", dict(with_entropy, unigram_entropy_nats=2.25),
                            "run/ckpt-00000003")
    assert note.startswith("tok holds other tokens than run/ckpt-00000003 was trained on (the "
                           "same token counts, unigram entropy 2.500000 -> 2.250000 nats: ")


def test_windows_start_uniformly_anywhere_and_reach_the_last_token(tmp_path):
    """Tokens 0..39 (each id its position): windows of T + 1 start at 0..N-T-1, uniformly,
    so every token but the first is a target, the last one included; a split of exactly
    T + 1 tokens has one window, itself."""
    T, n = 5, 40
    np.arange(n, dtype="<u2").tofile(tmp_path / "train.bin")
    np.arange(T + 1, dtype="<u2").tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 64,
                                                    "dtype": "uint16"}))
    ds = TokenDataset(tmp_path)
    ds.require_block(T)
    x, y = ds.get_batch("train", 35_000, T, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(T))   # contiguous windows
    np.testing.assert_array_equal(y, x + 1)
    counts = np.bincount(x[:, 0], minlength=n)
    assert counts[:n - T].min() > 0 and not counts[n - T:].any()
    assert set(y.ravel()) == set(range(1, n))
    expected = len(x) / (n - T)                                  # 1,000 per start
    assert ((counts[:n - T] - expected) ** 2 / expected).sum() < 65   # chi-square, df 34
    x, y = ds.get_batch("val", 3, T, np.random.default_rng(0))
    assert x.tolist() == [list(range(T))] * 3 and y.tolist() == [list(range(1, T + 1))] * 3


class _SaidLines:
    """The progress lines a prepare says (from its own thread), and a wait for one."""

    def __init__(self):
        self.lines, self._said = [], threading.Condition()

    def __call__(self, line):
        with self._said:
            self.lines.append(line)
            self._said.notify_all()

    def wait_for(self, text):
        with self._said:
            assert self._said.wait_for(lambda: any(text in line for line in self.lines),
                                       timeout=30), (text, self.lines)


def test_a_prepare_says_what_it_is_doing_while_it_runs(tmp_path, monkeypatch, capsys):
    """prepare said nothing until it was done: 102 s for 100 MB of text with --tokenizer bpe
    on 2 cores (37 s of 50 MB's 50 tokenizing), so some 17 minutes a gigabyte without a word.
    Now `cllm-gpu prepare` says every PROGRESS_SECONDS (here 10 ms) what it is doing and how
    far it is: reading and tokenizing hold here until it has said the file and the
    characters they are at; no line comes after the command's own end."""
    from cllm_gpu import cli, data
    monkeypatch.setattr(data, "PROGRESS_SECONDS", 0.01)
    said = _SaidLines()
    monkeypatch.setattr(cli, "print_progress", lambda line: (print(line), said(line)))
    src = tmp_path / "src"
    src.mkdir()
    for name in "abc":
        (src / f"{name}.txt").write_text(name * 10)
    read_documents, encode_documents = data.read_documents, ByteTokenizer.encode_documents

    def read_waiting(path, notes=None):
        if path.name == "b.txt":
            said.wait_for("prepare: reading 1 of 3 files (33%), ")
        return read_documents(path, notes)

    def encode_waiting(self, docs, done, log=None):
        def done_waiting(chars):
            done(chars)
            if chars == 10:
                said.wait_for("prepare: tokenizing 10 of 30 characters (33%), ")
            if chars == 20:  # the count so far, not the last document's
                said.wait_for("prepare: tokenizing 20 of 30 characters (66%), ")
        return encode_documents(self, docs, done=done_waiting, log=log)
    monkeypatch.setattr(data, "read_documents", read_waiting)
    monkeypatch.setattr(ByteTokenizer, "encode_documents", encode_waiting)
    code, errors = main_in_process(capsys, "prepare", src, "--out", tmp_path / "tok")
    assert (code, errors) == (0, [])
    lines_at_the_end = len(said.lines)
    time.sleep(0.1)  # ten periods: the thread ended with the prepare
    assert len(said.lines) == lines_at_the_end
    assert all(re.fullmatch(r"prepare: .+, \d+ s elapsed", line) for line in said.lines)


def test_a_stdout_that_fails_ends_the_progress_lines_without_a_traceback(tmp_path):
    """stdout on a full disk (/dev/full; a terminal hung up gives EIO alike): the progress
    thread's print raised OSError and the thread died with a traceback on stderr ("Exception
    in thread prepare-progress: Traceback ..."), then the prepare went on. Now its lines end
    quietly; the command's own last line meets the error and says it in one line, as before
    progress lines (the files were written in full: they are in place)."""
    import subprocess
    import sys
    from clihelp import ROOT
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    src = tmp_path / "src"
    src.mkdir()
    for name in "abcd":
        (src / f"{name}.txt").write_text(name * 10)
    script = (  # a line every 10 ms, and reading slowed to 50 ms a file: lines while it reads
        "import sys, time\n"
        "from cllm_gpu import cli, data\n"
        "data.PROGRESS_SECONDS = 0.01\n"
        "read = data.read_documents\n"
        "data.read_documents = lambda *a: time.sleep(0.05) or read(*a)\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-c", script, "prepare", str(src), "--out",
                            str(tmp_path / "tok")], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=300, env=env)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines() == [  # stdout named: the data is there
        "error: stdout: No space left on device; the lines from then on were dropped, the "
        "command itself ran to its end"], r.stderr
    assert json.loads((tmp_path / "tok" / "meta.json").read_text())["documents"] == 4


def test_a_bpe_prepare_says_it_trains_then_how_far_it_has_tokenized(tmp_path, monkeypatch):
    """The BPE's training is one call into the tokenizers library, silent until it returns:
    prepare says that it trains, on how much; then the characters of the batches
    (ENCODE_BATCH_CHARS, 100 here) encoded."""
    pytest.importorskip("tokenizers")
    from cllm_gpu import data
    monkeypatch.setattr(data, "PROGRESS_SECONDS", 0.01)
    monkeypatch.setattr(data, "ENCODE_BATCH_CHARS", 100)
    said = _SaidLines()
    train, encode_batch = data.HFTokenizer.train, data.HFTokenizer.encode_batch

    def train_waiting(documents, vocab_size):
        said.wait_for("prepare: training the BPE tokenizer (300 tokens) on 500 characters, ")
        return train(documents, vocab_size)

    def encode_waiting(self, texts, **kw):
        if encode_waiting.batches == 1:
            said.wait_for("prepare: tokenizing 100 of 500 characters (20%), ")
        encode_waiting.batches += 1
        return encode_batch(self, texts, **kw)
    encode_waiting.batches = 0
    monkeypatch.setattr(data.HFTokenizer, "train", staticmethod(train_waiting))
    monkeypatch.setattr(data.HFTokenizer, "encode_batch", encode_waiting)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"word {i:4d}."}) + "\n" for i in range(50)))
    meta = prepare(src, tmp_path / "tok", tokenizer="bpe", bpe_vocab_size=300,
                   progress=said)
    assert meta["documents"] == 50 and encode_waiting.batches == 5


def _run_cli_without_root_reading_anything(*args):
    """run_cli in a process that cannot read what permissions forbid: as it is for a user;
    as root with its power to read anything dropped (setpriv), or None where that fails."""
    import shutil
    import subprocess
    import sys
    from clihelp import ROOT
    if os.geteuid() != 0:
        return run_cli(*args)
    if shutil.which("setpriv") is None:
        return None
    caps = "-dac_override,-dac_read_search"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    without = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", sys.executable]
    # Python and the package must still be readable so (a checkout of another user's, 0700)
    if subprocess.run([*without, "-c", "import cllm_gpu.cli"], capture_output=True,
                      env=env).returncode != 0:
        return None
    return subprocess.run([*without, "-m", "cllm_gpu", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_a_folder_in_the_corpus_that_cannot_be_read_is_refused_in_one_line(tmp_path):
    """A file that cannot be read is refused, naming it; a folder that cannot be read (mode
    000, a dataset copied from another user) was left out without a word (os.walk drops
    what it cannot list): 2 of 3 documents prepared. Now refused the same way, nothing
    written."""
    src = tmp_path / "src"
    for rel in ("a.txt", "locked/b.txt", "open/c.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    (src / "locked").chmod(0)
    try:
        r = _run_cli_without_root_reading_anything("prepare", src, "--out", tmp_path / "tok")
        if r is None:
            pytest.skip("root here reads any folder, and setpriv cannot drop that (or "
                        "Python is not readable without it)")
        assert_one_line_error(r, rf"^error: {re.escape(str(src / 'locked'))}: cannot read "
                                 rf"the folder \(Permission denied\)$")
        assert not (tmp_path / "tok").exists()
    finally:
        (src / "locked").chmod(0o755)


def test_a_file_systems_lost_and_found_folder_is_no_part_of_the_corpus(tmp_path):
    """A corpus at a mount point (a data disk's root) holds the file system's lost+found, root's
    and mode 0700: since an unreadable folder is refused, a user's prepare of it was refused
    ("lost+found: cannot read the folder (Permission denied)", where it prepared before). It
    is left out, as hidden folders are; readable (by root), fsck's fragments in it are no
    corpus either."""
    from cllm_gpu.data import collect_text_files
    src = tmp_path / "disk"
    (src / "lost+found").mkdir(parents=True)
    (src / "a.txt").write_text("the corpus")
    (src / "lost+found" / "#1234").write_text("a fragment fsck recovered")
    (src / "lost+found").chmod(0)
    try:
        r = _run_cli_without_root_reading_anything("prepare", src, "--out", tmp_path / "tok")
    finally:
        (src / "lost+found").chmod(0o755)
    assert collect_text_files(src) == [src / "a.txt"]
    if r is None:
        pytest.skip("root here reads any folder, and setpriv cannot drop that (or Python is "
                    "not readable without it)")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "tok" / "meta.json").read_text())["documents"] == 1


def test_preparing_a_folder_again_into_itself_leaves_out_the_token_files(tmp_path):
    """prepare src --out src/tok, run twice: the second run read the first one's train.bin,
    val.bin and meta.json as documents (4 documents, 331 tokens, from one of 15 bytes)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("some text here")
    first = prepare(src, src / "tok")
    again = prepare(src, src / "tok")
    assert again == first and again["documents"] == 1


def test_a_folders_files_are_not_each_resolved_to_leave_out_the_output_folder(tmp_path,
                                                                             monkeypatch):
    """Leaving out --out's files asked each file's real path (Path.resolve: an lstat of every
    component of its path): 4.1 of prepare's 9.3 s on 100,000 files of 1 to 5 KB in 1,000
    folders. A folder's real path is known from the walk: only its links are resolved, so
    the real paths asked for grow with the folders and links, not with the files."""
    from cllm_gpu.data import collect_text_files
    src = tmp_path / "src"
    for folder in ("a", "b", "b/c"):
        (src / folder).mkdir(parents=True)
        for i in range(100):
            (src / folder / f"{i:03d}.txt").write_text(f"text {i}")
    out = src / "tok"
    out.mkdir()
    (out / "stray.txt").write_text("prepare's own --out, not corpus")
    (src / "b" / "link.txt").symlink_to(out / "stray.txt")  # a file link into --out: left out
    (src / "b" / "kept.txt").symlink_to(src / "a" / "000.txt")
    asked = []
    real_realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath",
                        lambda p, **kw: asked.append(p) or real_realpath(p, **kw))
    # a folder whose name starts with --out's is no part of --out (mutation audit h43f: a
    # prefix test without the path separator passed every test)
    (src / "tok2").mkdir()
    (src / "tok2" / "corpus.txt").write_text("a corpus file beside --out")
    files = collect_text_files(src, out)
    assert len(files) == 302 and src / "b" / "kept.txt" in files
    assert src / "tok2" / "corpus.txt" in files
    assert not any(p.parent == out or p.name == "link.txt" for p in files)
    assert len(asked) <= 5 + 1 + 2 + 1  # the folders walked (--out's too), the links, --out


def test_a_link_to_the_output_folder_inside_the_corpus_leaves_out_the_token_files(tmp_path):
    """Links to folders are followed: a link in the corpus folder to prepare's own --out (read
    before it: 'a link' sorts first) must not bring train.bin, val.bin and meta.json back in
    as documents. Mutation audit (h29p): comparing the file's path, not its real path, with
    --out passed every data test."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("some text here")
    first = prepare(src, src / "tok")
    (src / "a link").symlink_to(src / "tok")
    again = prepare(src, src / "tok")
    assert again == first and again["documents"] == 1


def test_a_split_of_t_tokens_is_one_token_short_of_a_block(tmp_path):
    """A window is T + 1 tokens (T inputs, T shifted targets): a split of exactly T tokens is
    refused by require_block, as the CLI says, before get_batch could draw from no window.
    Mutation audit: requiring T tokens passed every data test (they test far shorter splits)."""
    T = 5
    np.arange(T + 1, dtype="<u2").tofile(tmp_path / "train.bin")
    np.arange(T, dtype="<u2").tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 64,
                                                    "dtype": "uint16"}))
    ds = TokenDataset(tmp_path)
    ds.require_block(T, ["train"])
    with pytest.raises(DataError, match=r"val.bin: 5 tokens is shorter than one block of 5 \+ 1"):
        ds.require_block(T)


def test_a_split_of_one_token_says_token_not_tokens(tmp_path):
    """The refusal of a split shorter than a block counted "1 tokens"."""
    np.arange(8, dtype="<u2").tofile(tmp_path / "train.bin")
    np.arange(1, dtype="<u2").tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 64,
                                                    "dtype": "uint16"}))
    with pytest.raises(DataError, match=r"val.bin: 1 token is shorter than one block of 4 \+ 1"):
        TokenDataset(tmp_path).require_block(4)


def test_a_token_file_longer_than_meta_json_says_is_refused(good):
    """meta.json's token count must be the file's, both ways: a file with more tokens than it
    says (written by another prepare) is refused. Mutation audit: refusing only files shorter
    than meta.json says passed the data tests."""
    meta = json.loads((good / "meta.json").read_text())
    (good / "meta.json").write_text(json.dumps({**meta, "val_tokens": meta["val_tokens"] - 1}))
    with pytest.raises(DataError, match=r"val.bin: holds \d+ tokens but meta.json says"):
        TokenDataset(good)


def test_megatron_named_gpt2_files_are_read_as_gpt2s(tmp_path):
    """Megatron-LM names GPT-2's files gpt2-vocab.json and gpt2-merges.txt: read as GPT-2's
    (they were read as a tokenizer.json: "cannot load tokenizer"), the same data as the
    original names give; the merges file goes with its own prefix."""
    _gpt2_files(tmp_path / "gpt2")
    mega = tmp_path / "megatron"
    mega.mkdir()
    (mega / "gpt2-vocab.json").write_bytes((tmp_path / "gpt2" / "vocab.json").read_bytes())
    (mega / "gpt2-merges.txt").write_bytes((tmp_path / "gpt2" / "merges.txt").read_bytes())
    (tmp_path / "t.txt").write_text("words the user cares about, ünïcode too")
    a = prepare(tmp_path / "t.txt", tmp_path / "a", tokenizer=str(tmp_path / "gpt2"))
    b = prepare(tmp_path / "t.txt", tmp_path / "b", tokenizer=str(mega / "gpt2-vocab.json"))
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    (mega / "gpt2-merges.txt").rename(mega / "merges.txt")   # not its merges file
    with pytest.raises(DataError, match=r"gpt2-merges\.txt: missing"):
        prepare(tmp_path / "t.txt", tmp_path / "c", tokenizer=str(mega / "gpt2-vocab.json"))


def test_a_source_or_tokenizer_that_exists_but_is_no_file_is_not_called_missing(tmp_path):
    """prepare's source or --tokenizer naming a FIFO or a device (/dev/null) said 'no such file
    or directory' / 'no such file' of a path that exists (not reading it is right: a FIFO would
    block). Found by argv fuzzing. Now it says what the path is; a missing path as before."""
    import os
    from cllm_gpu.data import collect_text_files, user_tokenizer
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/null"):
        with pytest.raises(DataError, match=rf"^{path}: not a regular file or a directory "
                                            r"\(a FIFO, device or socket\): nothing to read$"):
            collect_text_files(path)
        with pytest.raises(DataError, match=rf"^--tokenizer {path}: not a regular file \(a FIFO, "
                                            r"device or socket\) \(give 'byte', 'bpe'"):
            user_tokenizer(str(path))
    with pytest.raises(DataError, match=r"missing: no such file or directory$"):
        collect_text_files(tmp_path / "missing")
    with pytest.raises(DataError, match=r"missing: no such file \(give 'byte'"):
        user_tokenizer(str(tmp_path / "missing"))


@pytest.mark.parametrize("eot_id,ids,bad", [(256, [104, 300], 300), (256, [257], 257),
                                            (256, [-1], -1), (None, [104, 256], 256)])
def test_byte_tokenizer_refuses_to_decode_an_id_past_its_vocabulary(eot_id, ids, bad):
    """An id the byte tokenizer has no token for is refused in one line; before, it printed
    the byte id & 0xFF (300 as ',', 257 as \\x01; without end-of-text, 256 as NUL)."""
    tok = ByteTokenizer(eot_id)
    with pytest.raises(DataError) as e:
        tok.decode(ids)
    msg = str(e.value)
    assert "\n" not in msg and f"token id {bad} is not in the byte tokenizer's vocabulary " \
        f"(ids 0..{tok.vocab_size - 1})" in msg
    assert tok.decode([104, 105] + ([256] if eot_id else [])) == "hi" + (
        "<|endoftext|>" if eot_id else "")


def test_hf_tokenizer_refuses_to_decode_an_id_past_its_vocabulary(tmp_path):
    """The `tokenizers` decoder drops an unknown id silently (text with a hole, exit 0):
    refused in one line instead."""
    pytest.importorskip("tokenizers")
    from cllm_gpu.data import HFTokenizer
    tok = HFTokenizer.train(["the quick brown fox jumps over the lazy dog. "] * 20, 300)
    ids = [int(i) for i in tok.encode("the fox")]
    assert tok.decode(ids) == "the fox"
    for bad in (tok.vocab_size, tok.vocab_size + 40, -1):
        with pytest.raises(DataError, match=f"token id {bad} is not in the bpe tokenizer's "
                                            f"vocabulary"):
            tok.decode(ids + [bad])


_BPE = {"tokenizer": "bpe", "vocab_size": 300, "eot_id": 256, "tokenizer_sha256": "a" * 64}
_BYTE = {"tokenizer": "byte", "vocab_size": 257, "eot_id": 256}


@pytest.mark.parametrize("a, b, same", [
    (_BPE, dict(_BPE), True),
    # a tokenizer.json is told by its SHA-256: another file of the same kind and sizes (two
    # BPEs trained on other corpora) is another tokenizer
    (_BPE, dict(_BPE, tokenizer_sha256="b" * 64), False),
    # the same file is the same tokenizer whether prepare trained it or was given it
    (_BPE, dict(_BPE, tokenizer="hf"), True),
    (_BPE, dict(_BPE, vocab_size=301), False),
    (_BPE, dict(_BPE, eot_id=0), False),
    # one side with a file, the other without: never the same, whatever the other fields say
    (_BPE, {k: v for k, v in _BPE.items() if k != "tokenizer_sha256"}, False),
    # no file on either side: the kind and the sizes
    (_BYTE, dict(_BYTE), True),
    (_BYTE, dict(_BYTE, tokenizer="bpe"), False),
    (_BYTE, dict(_BYTE, vocab_size=300), False),
    (_BYTE, dict(_BYTE, eot_id=None), False),
])
def test_same_tokenizer_compares_each_field_that_tells_tokenizers_apart(a, b, same):
    """The rule the checkpoint's recorded tokenizer is checked by (sample, eval, export, train
    --resume --data): each field on its own makes two tokenizers differ. The CLI tests cover
    byte against BPE only, where every field differs at once."""
    from cllm_gpu.data import same_tokenizer
    assert same_tokenizer(a, b) is same and same_tokenizer(b, a) is same


def test_a_link_to_a_directory_where_a_file_goes_is_replaced_not_refused(tmp_path, good):
    """write_files refuses a directory where a file goes (the rename onto it would fail midway),
    but a symbolic link there is renamed over like a file, the directory it names untouched."""
    import os
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep").write_text("kept")
    (good / "val.bin").unlink()
    (good / "val.bin").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "new.txt").write_text("another corpus altogether " * 50)
    prepare(tmp_path / "new.txt", good)
    assert not os.path.islink(good / "val.bin") and (good / "val.bin").is_file()
    assert (tmp_path / "elsewhere" / "keep").read_text() == "kept"
    TokenDataset(good)


def test_describe_tokenizer_is_one_line_with_the_shas_first_12_digits():
    from cllm_gpu.data import describe_tokenizer
    assert describe_tokenizer(_BPE) == "bpe, vocab 300, end-of-text 256, SHA-256 aaaaaaaaaaaa..."
    assert describe_tokenizer(dict(_BYTE, eot_id=None, vocab_size=256)) == (
        "byte, vocab 256, no end-of-text")


def test_one_byte_not_utf8_is_said_in_the_singular(tmp_path):
    from cllm_gpu.data import _read_text
    path = tmp_path / "a.txt"
    path.write_bytes(b"ab\xffcd")
    notes = []
    assert _read_text(path, notes) == "ab\ufffdcd"
    assert notes == [f"{path}: 1 byte not UTF-8 (the first at offset 2), read as U+FFFD"]


def test_the_split_holds_out_the_tail_rounded_down(tmp_path):
    """val.bin is the last int(N x val_fraction) tokens (at least one), train.bin the rest,
    in order: 99 bytes + end-of-text at 0.157 is 85 + 15 (rounded: 84 + 16). Mutation audit:
    the split point one later, or rounded, passed every data test (the round trip test
    joins the two files); only a CLI test far from prepare saw the first."""
    text = "".join(chr(ord("a") + i % 26) for i in range(99))
    (tmp_path / "t.txt").write_text(text)
    meta = prepare(tmp_path / "t.txt", tmp_path / "tok", val_fraction=0.157)
    ds = TokenDataset(tmp_path / "tok")
    assert (meta["train_tokens"], meta["val_tokens"]) == (85, 15)
    assert bytes(ds.splits["train"].tolist()) == text[:85].encode()
    assert ds.splits["val"].tolist() == list(text[85:].encode()) + [256]
    meta = prepare(tmp_path / "t.txt", tmp_path / "tiny", val_fraction=0.001)
    assert (meta["train_tokens"], meta["val_tokens"]) == (99, 1)   # never an empty val


def test_unigram_entropy_is_the_train_splits_in_nats(tmp_path):
    """meta.json's unigram_entropy_nats: the entropy of the train split's token frequencies,
    natural log (a unigram model's loss, the baseline train loss is read against). 'ab' x 50
    and end-of-text at 0.1: train is 46 a and 45 b. Mutation audit: log2 (bits), or the
    counts of both splits, passed every test (they checked a range only)."""
    (tmp_path / "t.txt").write_text("ab" * 50)
    meta = prepare(tmp_path / "t.txt", tmp_path / "tok", val_fraction=0.1)
    assert meta["train_tokens"] == 91
    p = np.array([46, 45]) / 91
    assert meta["unigram_entropy_nats"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)


def test_a_train_split_of_one_token_kind_has_entropy_plus_zero(tmp_path, capsys):
    """One kind of token in train.bin (a 1-token train split, or 'aaaa'): the entropy is 0,
    not -0.0 ('unigram entropy -0.000 nats' in prepare's line, -0.0 in meta.json), as
    -(1 x log 1) gave."""
    import math
    from cllm_gpu import cli
    for name, text in (("one.txt", "a"), ("same.txt", "aaaa")):
        (tmp_path / name).write_text(text)  # + end-of-text; the last token is val.bin's
        assert cli.main(["prepare", str(tmp_path / name), "--out", str(tmp_path / name[:-4])]) == 0
        assert "unigram entropy 0.000 nats" in capsys.readouterr().out
        meta = json.loads((tmp_path / name[:-4] / "meta.json").read_text())
        assert meta["unigram_entropy_nats"] == 0.0
        assert math.copysign(1.0, meta["unigram_entropy_nats"]) == 1.0


def test_jsonl_documents_are_the_text_field_of_each_non_blank_line(tmp_path):
    """A .jsonl document is its "text" field, whatever other string fields come first; a
    line of white space only (a CRLF file's empty line is '\r') is blank, skipped; the
    suffix is matched in any case. Mutation audit: taking the first string field, skipping
    only empty lines, or a case-sensitive suffix passed every test."""
    from cllm_gpu.data import read_documents
    path = tmp_path / "C.JSONL"
    path.write_bytes(b'{"id": "doc-1", "text": "one"}\r\n\r\n \t\n{"title": "t", "text": "two"}\n')
    assert read_documents(path) == ["one", "two"]
    meta = prepare(path, tmp_path / "tok")
    assert meta["documents"] == 2
    assert ByteTokenizer().decode(_all_ids(tmp_path / "tok")) == (
        "one<|endoftext|>two<|endoftext|>")


def test_a_folders_files_are_read_in_path_order(tmp_path):
    """'In sorted order' is the order of the paths (a folder's files together), not of the
    file names: b/a.txt comes after a/z.txt. Mutation audit: sorting by name passed."""
    from cllm_gpu.data import collect_text_files
    src = tmp_path / "src"
    for rel, text in (("b/a.txt", "second"), ("a/z.txt", "first")):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    assert collect_text_files(src) == [src / "a" / "z.txt", src / "b" / "a.txt"]
    prepare(src, tmp_path / "tok")
    assert ByteTokenizer().decode(_all_ids(tmp_path / "tok")) == (
        "first<|endoftext|>second<|endoftext|>")


def test_the_note_counts_bytes_not_utf8_not_replacement_characters(tmp_path):
    """A cut-off UTF-8 sequence (2 bytes) reads as one U+FFFD, and a U+FFFD written in the
    file is text: the note counts the bytes that are not UTF-8. Mutation audit: counting
    U+FFFD in the text read passed every test (their bad bytes each made one)."""
    from cllm_gpu.data import _read_text
    cut, kept = tmp_path / "cut.txt", tmp_path / "kept.txt"
    cut.write_bytes(b"ab\xe2\x82cd")              # the first 2 bytes of the euro sign
    kept.write_bytes("\ufffd".encode() + b"\xff")  # one real U+FFFD, one bad byte
    notes = []
    assert _read_text(cut, notes) == "ab\ufffdcd"
    assert _read_text(kept, notes) == "\ufffd\ufffd"
    assert notes == [f"{cut}: 2 bytes not UTF-8 (the first at offset 2), read as U+FFFD",
                     f"{kept}: 1 byte not UTF-8 (the first at offset 3), read as U+FFFD"]


def test_the_note_on_a_jsonl_file_gives_the_first_bad_bytes_offset_in_the_file(tmp_path):
    """A .jsonl file is read a line at a time: the note counts the bad bytes of every line
    and gives the first one's offset in the file, as for any other file (mutation audit: the
    offset of the end of its line passed every test)."""
    from cllm_gpu.data import read_documents
    path = tmp_path / "c.jsonl"
    lines = [b'{"text": "ok"}\n', b'{"text": "a\xffb"}\n', b'{"text": "\xfe"}\n']
    path.write_bytes(b"".join(lines))
    notes = []
    assert read_documents(path, notes) == ["ok", "a\ufffdb", "\ufffd"]
    first = len(lines[0]) + lines[1].index(b"\xff")
    assert notes == [f"{path}: 2 bytes not UTF-8 (the first at offset {first}), read as U+FFFD"]


def test_counting_the_bytes_not_utf8_of_a_binary_file_holds_a_few_bytes_a_byte(tmp_path):
    """A binary file in a corpus folder (an image, an archive) is read as text with a note
    counting its bytes that are not UTF-8: they were counted as the surrogates of the file
    decoded again with surrogateescape, found by re.findall, a list of one string a byte: 42
    bytes of memory a byte of a 2 MB random file (tracemalloc; 895 MB resident for 20 MB),
    tens of GB for a large archive. The count is the same (checked against that way on
    random bytes weighted to the tricky ones: real U+FFFD, cut-off sequences); the peak is
    the bytes, the text read and its UTF-8 length (9.6 measured)."""
    import random
    import tracemalloc
    from cllm_gpu.data import _read_text
    rng = random.Random(0)
    for n in range(300):
        raw = bytes(rng.choice([rng.randrange(256), 0xef, 0xbf, 0xbd, 0xe2, 0x82, 0xf0, 0x9f,
                                0x41]) for _ in range(rng.randrange(40)))
        (tmp_path / "f.txt").write_bytes(raw)
        notes = []
        text = _read_text(tmp_path / "f.txt", notes)
        bad = sum("\udc80" <= c <= "\udcff"  # one surrogate a byte not UTF-8
                  for c in raw.decode("utf-8", "surrogateescape"))
        assert text == raw.decode("utf-8", "replace").removeprefix("\ufeff")
        try:
            raw.decode("utf-8")
            assert notes == [], raw
        except UnicodeDecodeError as e:
            assert notes == [f"{tmp_path / 'f.txt'}: {bad} byte{'' if bad == 1 else 's'} not "
                             f"UTF-8 (the first at offset {e.start}), read as U+FFFD"], raw
    binary = tmp_path / "archive.bin"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 2_000_000, np.uint8).tobytes())
    notes = []
    tracemalloc.start()
    try:
        _read_text(binary, notes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(notes) == 1 and " bytes not UTF-8 " in notes[0]
    assert peak < 16 * binary.stat().st_size, peak / binary.stat().st_size


def test_bpe_vocabulary_bounds_and_merges_of_pairs_seen_twice(tmp_path):
    """--bpe-vocab-size: 257 to 2**24, both ends included. The trainer merges only pairs
    seen at least twice (what prepare's note says when the size is not reached): in
    'ab ab cd' that is 'ab' alone. Mutation audit: either bound one off, or merging pairs
    seen once, passed every test."""
    pytest.importorskip("tokenizers")
    from cllm_gpu.data import MAX_BPE_VOCAB, HFTokenizer
    docs = ["ab ab cd"]
    for bad in (256, MAX_BPE_VOCAB + 1):
        with pytest.raises(DataError, match=rf"^bpe_vocab_size must be .* got {bad}$"):
            HFTokenizer.train(docs, bad)
    assert HFTokenizer.train(docs, 257).vocab_size == 257
    tok = HFTokenizer.train(docs, MAX_BPE_VOCAB)
    assert tok.vocab_size == 258 and tok.encode("ab").tolist() == [tok._tok.token_to_id("ab")]


def test_a_user_tokenizer_json_is_kept_byte_for_byte_and_hashed_as_given(tmp_path):
    """A tokenizer.json written another way than `tokenizers` saves it (here compact, as
    hand-edited or minified files are) is copied as it is, and meta.json's SHA-256 is that of
    its bytes, so that loading the data checks out. Mutation audit: hashing the tokenizer as
    re-serialized passed, since the test's file was the library's own pretty output."""
    import hashlib
    from cllm_gpu.data import load_tokenizer
    _user_tokenizer(tmp_path / "pretty.json")
    compact = json.dumps(json.loads((tmp_path / "pretty.json").read_text()),
                         separators=(",", ":")).encode()
    (tmp_path / "compact.json").write_bytes(compact)
    (tmp_path / "t.txt").write_text("words the user cares about")
    meta = prepare(tmp_path / "t.txt", tmp_path / "tok", tokenizer=str(tmp_path / "compact.json"))
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == compact
    assert meta["tokenizer_sha256"] == hashlib.sha256(compact).hexdigest()
    tok = load_tokenizer(tmp_path / "tok", meta)
    assert tok.decode(_all_ids(tmp_path / "tok")) == "words the user cares about<|endoftext|>"


def test_gpt2_files_with_crlf_merges_and_added_tokens_in_any_order(tmp_path):
    """GPT-2's files as other tools write them: merges.txt with CRLF line ends reads as with
    LF; added_tokens.json lists its tokens in any order (each keeps its id); an end-of-text
    found there is special, so its text inside a document stays text (one end-of-text per
    document). Mutation audit: not stripping '\\r', adding in file order, or adding that
    end-of-text as an ordinary token passed every test."""
    vocab, merges = _gpt2_files(tmp_path / "gpt2", special=("<s>",))
    n = len(vocab)
    (tmp_path / "gpt2" / "added_tokens.json").write_text(
        json.dumps({"<sep>": n + 1, "<|endoftext|>": n}))
    docs = ["text that mentions <|endoftext|> and <sep>", "words the user cares about"]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    lf = prepare(tmp_path / "c.jsonl", tmp_path / "lf", tokenizer=str(tmp_path / "gpt2"))
    assert (lf["eot_id"], lf["vocab_size"]) == (n, n + 2)
    ids = _all_ids(tmp_path / "lf")
    assert (ids == n).sum() == 2 and n + 1 in ids.tolist()
    from cllm_gpu.data import load_tokenizer
    assert load_tokenizer(tmp_path / "lf", lf).decode(ids) == (
        "<|endoftext|>".join(docs) + "<|endoftext|>")
    (tmp_path / "gpt2" / "merges.txt").write_bytes("\r\n".join(merges).encode("utf-8"))
    crlf = prepare(tmp_path / "c.jsonl", tmp_path / "crlf", tokenizer=str(tmp_path / "gpt2"))
    assert crlf == lf
    assert _all_ids(tmp_path / "crlf").tolist() == ids.tolist()


def test_byte_tokenizer_end_of_text_is_256_or_none():
    """meta.json's eot_id for the byte tokenizer is 256 (or absent, for older data): another
    id would show a byte (0 is NUL) as end-of-text. Mutation audit: accepting 0 passed."""
    assert ByteTokenizer(None).vocab_size == 256 and ByteTokenizer(256).vocab_size == 257
    for bad in (0, 255, 257):
        with pytest.raises(DataError, match=rf"^meta\.json: the byte tokenizer's eot_id is "
                                            rf"256, got {bad}$"):
            ByteTokenizer(bad)


def test_a_tokenizer_json_of_another_vocabulary_than_meta_json_says_is_refused(tmp_path):
    """load_tokenizer checks the tokenizer's vocabulary against meta.json's vocab_size (data
    whose meta.json records no SHA-256, or whose vocab_size was edited). Mutation audit:
    dropping the check passed every test (the SHA-256 check ran first in them)."""
    pytest.importorskip("tokenizers")
    from cllm_gpu.data import load_tokenizer
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 100)
    meta = prepare(tmp_path / "t.txt", tmp_path / "tok", tokenizer="bpe", bpe_vocab_size=270)
    vocab = meta["vocab_size"]
    assert load_tokenizer(tmp_path / "tok", meta).vocab_size == vocab
    for edited in (dict(meta, vocab_size=vocab + 1),
                   {k: (vocab + 1 if k == "vocab_size" else v) for k, v in meta.items()
                    if k != "tokenizer_sha256"}):
        with pytest.raises(DataError, match=rf"tokenizer\.json: tokenizer vocab {vocab} does "
                                            rf"not match meta\.json vocab_size {vocab + 1}$"):
            load_tokenizer(tmp_path / "tok", edited)


def test_the_default_corpus_stops_when_its_size_reaches_max_bytes():
    """Whole modules until their size reaches max_bytes: exactly the first module's size
    takes that module alone, one byte more takes the next too. Mutation audit: stopping
    only past max_bytes passed."""
    files = default_corpus_files(200_000)
    first = files[0].stat().st_size
    assert default_corpus_files(first) == files[:1]
    assert default_corpus_files(first + 1) == files[:2]


def test_a_utf8_byte_order_mark_starting_a_file_is_not_text(tmp_path):
    """Files saved with a UTF-8 byte-order mark (Windows editors, Excel's CSV-to-text): a
    .jsonl file's first line was refused as not JSON, and a text file's document began with
    U+FEFF, 3 bytes the model learnt to write after every end-of-text. The mark is dropped
    (JSON allows a parser to ignore it, RFC 8259 section 8.1); a U+FEFF inside the text, and
    CRLF line ends, are the text's own and kept. A non-UTF-8 byte's offset is still the file's."""
    from cllm_gpu.data import _read_text
    bom = "\ufeff".encode("utf-8")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(bom + b'{"text": "one"}\r\n{"text": "two"}\r\n')
    (src / "b.txt").write_bytes(bom + "three\r\nfour \ufeff five\r\n".encode("utf-8"))
    meta = prepare(src, tmp_path / "tok")
    assert meta["documents"] == 3
    assert ByteTokenizer().decode(_all_ids(tmp_path / "tok")) == (
        "one<|endoftext|>two<|endoftext|>three\r\nfour \ufeff five\r\n<|endoftext|>")
    notes = []
    (src / "c.txt").write_bytes(bom + b"ab\xffcd")
    assert _read_text(src / "c.txt", notes) == "ab\ufffdcd"
    assert notes == [f"{src / 'c.txt'}: 1 byte not UTF-8 (the first at offset 5), read as "
                     f"U+FFFD"]
    # only the one mark that starts the file: a second U+FEFF after it, or one at the end,
    # is text (mutation audit: lstrip/strip of U+FEFF passed every data test)
    (src / "d.txt").write_bytes(bom + "\ufeffx\ufeff".encode("utf-8"))
    assert _read_text(src / "d.txt") == "\ufeffx\ufeff"


def test_a_link_to_a_folder_in_a_corpus_folder_is_followed_once(tmp_path):
    """A corpus folder that links in other folders (a dataset kept elsewhere, `cp -rs`): their
    files were left out without a word (pathlib's rglob does not follow links to folders),
    while links to files were read. Each folder is read once: a link back up the tree, or a
    second link to a folder read already, adds nothing and never loops."""
    from cllm_gpu.data import collect_text_files
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    (src / "sub").mkdir(parents=True)
    (elsewhere / "deep").mkdir(parents=True)
    (src / "a.txt").write_text("own")
    (elsewhere / "deep" / "b.txt").write_text("linked in")
    (src / "sub" / "kept").symlink_to(elsewhere)
    (src / "sub" / "kept again").symlink_to(elsewhere)   # read once already
    (src / "sub" / "loop").symlink_to(src)               # a link back up the tree
    (src / ".hidden").symlink_to(elsewhere)              # hidden: skipped, as before
    assert collect_text_files(src) == [src / "a.txt", src / "sub" / "kept" / "deep" / "b.txt"]
    meta = prepare(src, tmp_path / "tok")
    assert (meta["files"], meta["documents"]) == (2, 2)
    assert ByteTokenizer().decode(_all_ids(tmp_path / "tok")) == (
        "own<|endoftext|>linked in<|endoftext|>")


def test_byte_prompts_end_of_text_at_the_start_at_the_end_and_twice_in_a_row():
    """Every <|endoftext|> in a prompt is one end-of-text id, wherever it stands: the parts
    between them may be empty (a prompt starting or ending with one, two in a row). Mutation
    audit (h29p): splitting at the first one only, dropping a leading one, or merging two in
    a row passed every data test (they spell it once, after text). Documents, and data
    without end-of-text, keep the 13 bytes."""
    eot = ByteTokenizer.EOT_ID
    tok = ByteTokenizer()
    text = "<|endoftext|>x<|endoftext|><|endoftext|>y<|endoftext|>"
    assert tok.encode(text).tolist() == [eot, ord("x"), eot, eot, ord("y"), eot]
    assert tok.encode("<|endoftext|>").tolist() == [eot]
    assert tok.encode("").tolist() == []
    assert tok.decode(tok.encode(text)) == text
    spelled = list(b"<|endoftext|>")
    assert tok.encode_documents(["<|endoftext|>"])[0].tolist() == spelled
    assert ByteTokenizer(None).encode("<|endoftext|>").tolist() == spelled


def test_a_link_back_up_a_corpus_folder_is_not_walked_into(tmp_path, monkeypatch):
    """A link back up the tree is listed once and not walked into: walking on below a folder
    read already went down the loop until the system's limit on links in a path (40), and a
    corpus with two such links took 2^40 folder listings. Mutation audit (h29p): skipping a
    seen folder's files but walking its subfolders passed every data test (same files)."""
    import os
    from cllm_gpu.data import collect_text_files
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("a")
    (src / "sub" / "loop").symlink_to(src)
    listed = []
    scandir = os.scandir

    def listing(path="."):
        listed.append(os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", listing)  # os.walk lists each folder with it
    assert collect_text_files(src) == [src / "sub" / "a.txt"]
    assert str(src / "sub" / "loop") in listed
    assert max(p.count("loop") for p in listed) == 1, listed


def test_a_tokenizer_json_renamed_over_after_its_check_is_not_used(tmp_path, monkeypatch,
                                                                   word_data):
    """load_tokenizer checked tokenizer.json's SHA-256 against meta.json by name (one read),
    then parsed the file by name again (a second read): a tokenizer.json renamed over in
    between (a prepare of another tokenizer into the directory) was used unchecked, its ids
    other tokens (here 'a' and 'b' swapped, the vocabulary the same size). Now the bytes
    checked are the bytes parsed."""
    from lockrace import rename_over_once_opened
    import cllm_gpu.data as data
    out, meta = word_data(["<|endoftext|>", "a", "b"], "first")
    _, other = word_data(["<|endoftext|>", "b", "a"], "other")
    assert other["vocab_size"] == meta["vocab_size"]
    assert other["tokenizer_sha256"] != meta["tokenizer_sha256"]
    rename_over_once_opened(monkeypatch, data, out / "tokenizer.json", tmp_path / "other.json")
    tok = data.load_tokenizer(out, meta)
    monkeypatch.undo()
    assert not (tmp_path / "other.json").exists()  # renamed over while the reader read
    assert tok.encode("a b").tolist() == [1, 2]


def _killed_after_renames(out, renames: int, hard_links: bool = True, interrupted_at=None):
    """write_files(out, _token_files("new", 2)) in a child process whose os.replace calls
    os._exit (as a kill -9 stops it) once `renames` renames are done; where not hard_links,
    its os.link fails (a filesystem without them: replaced files are renamed aside); where
    interrupted_at, that rename raises KeyboardInterrupt (a Ctrl-C) instead, once."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; from pathlib import Path; from cllm_gpu.data import write_files\n"
        "sys.path.insert(0, 'tests'); from test_data import _token_files\n"
        "replace, renames = os.replace, []\n"
        "def killed_after(src, dst):\n"
        f"    if len(renames) == {renames}:\n"
        "        os._exit(9)\n"
        f"    if len(renames) == {interrupted_at}:\n"
        "        renames.append('interrupted')\n"
        "        raise KeyboardInterrupt\n"
        "    replace(src, dst)\n"
        "    renames.append(dst)\n"
        "def no_hard_links(*args, **kwargs):\n"
        "    raise PermissionError(1, 'Operation not permitted')\n"
        "os.replace = killed_after\n"
        f"if not {hard_links}:\n"
        "    os.link = no_hard_links\n"
        "write_files(Path(sys.argv[1]), _token_files('new', 2))"), str(out)],
        cwd=root, timeout=60)
    assert killed.returncode == 9


@pytest.mark.parametrize("links", ["hard links", "no hard links"])
def test_a_writer_killed_between_its_renames_leaves_the_old_files_to_readers(tmp_path,
                                                                            links):
    """A writer killed (kill -9; here os._exit) after renaming the new train.bin in left it
    beside the old val.bin and meta.json, the replaced train.bin only under a hidden name:
    a reader opened the mix (the token counts equal, nothing said so), and the next writer
    removed the hidden copy as a dead writer's temporary, so nothing could put it back
    (h29af; seen failing: the reader read the new train.bin's tokens). Now the first to
    take the directory's lock (a reader here) finds the dead writer's kept copies beside its
    temporaries not yet renamed in and puts the old files back before reading; so too where
    the filesystem has no hard links (the replaced file renamed aside)."""
    from cllm_gpu.data import TokenDataset, write_files
    out = tmp_path / "d"
    out.mkdir()
    write_files(out, _token_files("old", 1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # without hard links the replaced train.bin is renamed aside first: a rename of its own
    _killed_after_renames(out, 1 if links == "hard links" else 2, links == "hard links")
    assert out.joinpath("train.bin").read_bytes() == _token_files("new", 2)["train.bin"]
    ds = TokenDataset(out)
    assert ds.meta["source"] == "old"
    assert set(np.asarray(ds.splits["train"]).tolist()) == {1}, "the new train.bin was read"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_writer_killed_while_putting_back_its_files_has_the_rest_put_back(tmp_path):
    """A Ctrl-C between two renames, then a kill -9 while the files were being put back: the
    files not yet put back are put back by the next to take the lock (its temporaries are
    removed only after every file is put back, so what is left reads as renames to undo)."""
    from cllm_gpu.data import TokenDataset, write_files
    out = tmp_path / "d"
    out.mkdir()
    write_files(out, _token_files("old", 1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # renames: train.bin in, val.bin's interrupted, then val.bin's kept copy put back (a
    # rename that does nothing: two links to one file), killed before train.bin's
    _killed_after_renames(out, 3, interrupted_at=1)
    assert out.joinpath("train.bin").read_bytes() == _token_files("new", 2)["train.bin"]
    assert TokenDataset(out).meta["source"] == "old"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _left_between_renames(out, pid):
    """The leftovers of a writer named `pid` killed after renaming the new train.bin in over
    the old one: the old kept, val.bin's and meta.json's temporaries not yet renamed in."""
    import os
    from cllm_gpu.data import _pid_namespace
    new = _token_files("new", 2)
    stem = f"{pid}.{_pid_namespace()}"
    os.link(out / "train.bin", out / f".train.bin.{stem}.0000000a.kept")
    (out / f".train.bin.{stem}.0000000a.tmp").write_bytes(new["train.bin"])
    os.replace(out / f".train.bin.{stem}.0000000a.tmp", out / "train.bin")
    for i, name in enumerate(("val.bin", "meta.json")):
        (out / f".{name}.{stem}.0000000{i}.tmp").write_bytes(new[name])


@pytest.mark.parametrize("whose", ["own pid, locked", "own pid, unlocked", "read-only"])
def test_who_puts_back_a_dead_writers_files(tmp_path, monkeypatch, whose):
    """Leftovers named by this process's own pid are an earlier process's where the directory
    is locked (pid 1 in a restarted container: none of this process's threads can be between
    renames, each renames under the lock, exclusive), and put back; unlocked they may be
    another thread's, and are left. A reader that cannot put the files back (a read-only
    mount) refuses the directory in one line rather than open the mix."""
    import errno
    import os
    import re
    import cllm_gpu.data as data
    from test_checkpoint import _finished_pid
    out = tmp_path / "d"
    out.mkdir()
    data.write_files(out, _token_files("old", 1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    pid = _finished_pid() if whose == "read-only" else os.getpid()
    _left_between_renames(out, pid)
    mixed = {p.name: p.read_bytes() for p in out.iterdir()}
    if whose == "own pid, locked":
        assert TokenDataset(out).meta["source"] == "old"
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    elif whose == "own pid, unlocked":
        monkeypatch.setattr(data, "fcntl", None)
        ds = TokenDataset(out)
        assert set(np.asarray(ds.splits["train"]).tolist()) == {2}  # left as it is
        assert {p.name: p.read_bytes() for p in out.iterdir()} == mixed
    else:
        def read_only(src, dst):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(os, "replace", read_only)
        with pytest.raises(DataError, match=rf"^{re.escape(str(out))}: a writer \(pid {pid}\) "
                                            rf"was killed between renaming its files in, and "
                                            rf"the files it replaced cannot be put back "
                                            rf"\(Read-only file system\); write it again "
                                            rf"\(prepare, or export\)$"):
            TokenDataset(out)
        monkeypatch.undo()
        assert {p.name: p.read_bytes() for p in out.iterdir()} == mixed


def test_marks_of_a_writer_killed_after_its_last_rename_are_removed(tmp_path):
    """A writer killed after its last rename, while removing its kept copies: every new file
    is in place, no temporary is left; its kept copies are removed, nothing put back."""
    import os
    from cllm_gpu.data import _pid_namespace, write_files
    from test_checkpoint import _finished_pid
    out = tmp_path / "d"
    out.mkdir()
    write_files(out, _token_files("old", 1))
    kept = out / f".train.bin.{_finished_pid()}.{_pid_namespace()}.0000000a.kept"
    os.replace(out / "train.bin", kept)
    for name, content in _token_files("new", 2).items():
        (out / name).write_bytes(content)
    assert TokenDataset(out).meta["source"] == "new"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == _token_files("new", 2)


def test_a_folder_skips_what_cllm_gpu_wrote_inside_it(tmp_path, capsys):
    """A corpus folder holding an earlier prepare's output (meta.json beside train.bin) or a
    training run (its metrics.jsonl, its checkpoints) read those as documents: the token
    files' bytes became training text (a warning about bytes not UTF-8 at best), a run's
    metrics.jsonl stopped prepare ('expected a JSON object with a "text" field'). Each such
    folder is skipped, at any depth, and named once in a warning; a user's own metrics.jsonl
    of other lines is still a document file."""
    from cllm_gpu import cli
    from cllm_gpu.data import collect_text_files
    src = tmp_path / "src"
    (src / "notes").mkdir(parents=True)
    (src / "a.txt").write_text("some text to learn from. " * 40)
    (src / "notes" / "metrics.jsonl").write_text('{"text": "a user\'s own file"}\n')
    assert cli.main(["prepare", str(src), "--out", str(src / "data" / "old")]) == 0
    assert cli.main(["train", "--data", str(src / "data" / "old"), "--out", str(src / "runs" / "r"),
                     "--max-steps", "2", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                     "--block-size", "16", "--sample-tokens", "0", "--backend", "numpy"]) == 0
    (src / "ckpt-copy").mkdir()  # a checkpoint copied out of its run
    for f in (src / "runs" / "r").glob("ckpt-*/*"):
        (src / "ckpt-copy" / f.name).write_bytes(f.read_bytes())
    assert collect_text_files(src) == [src / "a.txt", src / "notes" / "metrics.jsonl"]
    capsys.readouterr()
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "new")]) == 0
    out, err = capsys.readouterr()
    assert "2 documents" in out and "not UTF-8" not in err, (out, err)
    warning = [l for l in err.splitlines() if l.startswith("warning: ")]
    assert len(warning) == 1 and all(str(src / d) in warning[0]
                                     for d in ("ckpt-copy", "data/old", "runs/r")), warning
    # prepare's own --out inside the folder, prepared before, is left out without a word
    assert cli.main(["prepare", str(src), "--out", str(src / "data" / "old")]) == 0
    out, err = capsys.readouterr()
    assert "data/old" not in err and "2 documents" in out, (out, err)


@pytest.mark.parametrize("failure", ["disk full", "ctrl-c"])
def test_a_failed_prepare_into_a_new_directory_leaves_none(tmp_path, monkeypatch, failure):
    """prepare --out new/data failing while it writes (a full disk; a Ctrl-C, whose line says
    `nothing written to new/data`) left the directories it had made, empty, where there were
    none ("is as it was" said the error), as export no longer does: seen with a Ctrl-C 1.5 s
    into a 100 MB prepare --out hd/sub/deeper. Now the directories it made are removed."""
    import errno
    from pathlib import Path
    import cllm_gpu.data as data
    (tmp_path / "t.txt").write_text("hello world " * 100)
    write_chunks = data._write_chunks

    def fail_at_val(chunks, path):
        if ".val.bin." in Path(path).name:  # its temporary (data._temporary_path)
            if failure == "ctrl-c":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_chunks(chunks, path)
    monkeypatch.setattr(data, "_write_chunks", fail_at_val)
    with pytest.raises(KeyboardInterrupt if failure == "ctrl-c" else DataError):
        prepare(tmp_path / "t.txt", tmp_path / "new" / "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]
