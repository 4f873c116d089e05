import json

import numpy as np
import pytest

from cllm_gpu.data import ByteTokenizer, TokenDataset, default_corpus_files, prepare
from cllm_gpu.errors import DataError


def test_default_corpus_is_deterministic_and_offline(tmp_path):
    files = default_corpus_files(200_000)
    assert files == sorted(files) and files == default_corpus_files(200_000)
    meta = prepare("default", tmp_path, max_bytes=200_000)
    assert meta["source"] == "python-stdlib" and meta["vocab_size"] == 256
    assert meta["dtype"] == "uint16"
    assert 2.5 < meta["unigram_entropy_nats"] < 5.55
    ds = TokenDataset(tmp_path)
    assert ds.num_tokens("train") == meta["train_tokens"] > ds.num_tokens("val") > 0
    assert isinstance(ds.splits["train"], np.memmap)  # memory-mapped, not loaded


def test_prepare_folder_and_roundtrip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "b.txt").write_text("second file ünïcode")
    (src / "a.txt").write_text("first file")
    prepare(src, tmp_path / "tok", val_fraction=0.2)
    ds = TokenDataset(tmp_path / "tok")
    ids = np.concatenate([ds.splits["train"], ds.splits["val"]])
    assert ByteTokenizer().decode(ids) == "first file\n\nsecond file ünïcode"


def test_batches_are_shifted_windows(tmp_path):
    (tmp_path / "t.txt").write_text("".join(chr(65 + i % 26) for i in range(500)))
    prepare(tmp_path / "t.txt", tmp_path / "tok")
    ds = TokenDataset(tmp_path / "tok")
    x, y = ds.get_batch("train", 4, 10, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 10)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_bpe_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 300)
    meta = prepare(tmp_path / "t.txt", tmp_path / "tok", tokenizer="bpe", bpe_vocab_size=300)
    assert meta["tokenizer"] == "bpe" and (tmp_path / "tok" / "tokenizer.json").exists()
    ds = TokenDataset(tmp_path / "tok")
    assert ds.vocab_size == meta["vocab_size"] <= 300
    # a tokenizer file that does not match the data's meta is refused
    from cllm_gpu.data import load_tokenizer
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match="does not match"):
        load_tokenizer(ds.dir, ds.meta)


@pytest.fixture
def good(tmp_path):
    (tmp_path / "t.txt").write_text("hello world " * 100)
    prepare(tmp_path / "t.txt", tmp_path / "tok")
    return tmp_path / "tok"


def test_missing_dir_and_files(tmp_path, good):
    with pytest.raises(DataError, match="not found"):
        TokenDataset(tmp_path / "nope")
    (good / "val.bin").unlink()
    with pytest.raises(DataError, match="val.bin: missing"):
        TokenDataset(good)


def test_empty_truncated_wrong_dtype(good):
    (good / "train.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
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
    with pytest.raises(DataError, match="token id 300 >= vocab_size 256"):
        TokenDataset(good)
    assert meta["vocab_size"] == 256


def test_bad_meta(good):
    (good / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        TokenDataset(good)
    (good / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 256,
                                                "dtype": "float32"}))
    with pytest.raises(DataError, match="dtype"):
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
