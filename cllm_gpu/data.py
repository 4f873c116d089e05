"""Token data on disk (DESIGN.md): a directory with train.bin, val.bin (flat little-endian uint16
or uint32 token ids) and meta.json. Memory-mapped, never loaded whole."""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

import numpy as np

from .errors import DataError

META_VERSION = 1
DEFAULT_CORPUS_BYTES = 2_000_000


# ------------------------------------------------------------------ tokenizers
class ByteTokenizer:
    """Bytes are tokens: vocab 256, no dependency, lossless for any text."""
    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE trained on the corpus with Hugging Face `tokenizers` (the `bpe` extra)."""
    name = "bpe"

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    @staticmethod
    def _lib():
        try:
            import tokenizers
        except ImportError:
            raise DataError("the BPE tokenizer needs the `tokenizers` package "
                            "(pip install 'cllm-gpu[bpe]')") from None
        return tokenizers

    @classmethod
    def train(cls, files, vocab_size: int):
        tk = cls._lib()
        tok = tk.ByteLevelBPETokenizer()
        tok.train(files=[str(f) for f in files], vocab_size=vocab_size, min_frequency=2,
                  show_progress=False)
        return cls(tok)

    @classmethod
    def load(cls, path: Path):
        tk = cls._lib()
        try:
            return cls(tk.Tokenizer.from_file(str(path)))
        except Exception as e:
            raise DataError(f"{path}: cannot load tokenizer ({e})") from None

    def save(self, path: Path):
        self._tok.save(str(path))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.uint32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tokenizer(data_dir: Path, meta: dict):
    if meta["tokenizer"] == "byte":
        return ByteTokenizer()
    if meta["tokenizer"] == "bpe":
        path = Path(data_dir) / meta.get("tokenizer_file", "tokenizer.json")
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file missing")
        if meta.get("tokenizer_sha256") and _sha256_file(path) != meta["tokenizer_sha256"]:
            raise DataError(f"{path}: tokenizer does not match meta.json (SHA-256 differs)")
        tok = BPETokenizer.load(path)
        if tok.vocab_size != meta["vocab_size"]:
            raise DataError(f"{path}: tokenizer vocab {tok.vocab_size} does not match "
                            f"meta.json vocab_size {meta['vocab_size']}")
        return tok
    raise DataError(f"meta.json: unknown tokenizer {meta['tokenizer']!r}")


# ------------------------------------------------------------------ corpora
def default_corpus_files(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Path]:
    """The embedded default corpus: the Python standard library's own top-level .py modules in
    sorted order, up to `max_bytes`. Present on every machine with Python; no download."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(stdlib.glob("*.py")):
        if total >= max_bytes:
            break
        try:
            size = p.stat().st_size
        except OSError:
            continue
        files.append(p)
        total += size
    if not files:
        raise DataError(f"no Python sources found under {stdlib} for the default corpus")
    return files


def collect_text_files(source: Path) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{source}: no files to read")
        return files
    raise DataError(f"{source}: no such file or directory")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def prepare(source, out_dir, tokenizer: str = "byte", val_fraction: float = 0.1,
            bpe_vocab_size: int = 4096, max_bytes: int = DEFAULT_CORPUS_BYTES) -> dict:
    """Tokenize `source` ("default", a text file, or a folder of text files) into out_dir."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if source in (None, "default"):
        files, source_desc = default_corpus_files(max_bytes), "python-stdlib"
    else:
        files, source_desc = collect_text_files(Path(source)), str(source)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create output directory ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise DataError(f"{out}: output directory is not writable")
    # Files are joined with a blank line in between, in the order given (sorted).
    text = "\n\n".join(_read_text(f) for f in files)
    if not text:
        raise DataError(f"{source_desc}: the corpus is empty")
    meta = {"version": META_VERSION, "tokenizer": tokenizer, "source": source_desc,
            "files": len(files)}
    if tokenizer == "byte":
        tok = ByteTokenizer()
    elif tokenizer == "bpe":
        tok = BPETokenizer.train(files, bpe_vocab_size)
        tok_path = out / "tokenizer.json"
        tok.save(tok_path)
        meta["tokenizer_file"] = "tokenizer.json"
        meta["tokenizer_sha256"] = _sha256_file(tok_path)
    else:
        raise DataError(f"unknown tokenizer {tokenizer!r} (choose 'byte' or 'bpe')")
    ids = tok.encode(text)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    ids = ids.astype(dtype)
    n_val = max(1, int(len(ids) * val_fraction))
    train, val = ids[:-n_val], ids[-n_val:]
    for name, arr in (("train.bin", train), ("val.bin", val)):
        tmp = out / (name + ".tmp")
        arr.astype(np.dtype(dtype).newbyteorder("<")).tofile(tmp)
        os.replace(tmp, out / name)
    counts = np.bincount(train.astype(np.int64), minlength=tok.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    meta.update({"vocab_size": int(tok.vocab_size), "dtype": np.dtype(dtype).name,
                 "train_tokens": int(len(train)), "val_tokens": int(len(val)),
                 "unigram_entropy_nats": float(-(p * np.log(p)).sum())})
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


# ------------------------------------------------------------------ reading
_SCAN_LIMIT = 1 << 28  # bytes; larger files are range-checked on sampled chunks and per batch


class TokenDataset:
    """Memory-mapped train/val token streams with validated metadata."""

    def __init__(self, data_dir, vocab_size: int | None = None):
        self.dir = Path(data_dir)
        if not self.dir.is_dir():
            raise DataError(f"{self.dir}: data directory not found (run `cllm-gpu prepare`)")
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{meta_path}: missing (run `cllm-gpu prepare`)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{meta_path}: not valid JSON ({e})") from None
        self.meta = validate_meta(meta, meta_path)
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.vocab_size = self.meta["vocab_size"]
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise DataError(f"{meta_path}: data vocab_size {self.vocab_size} exceeds the model's "
                            f"vocab_size {vocab_size}")
        self.check_vocab = vocab_size or self.vocab_size
        self.splits = {}
        for split in ("train", "val"):
            self.splits[split] = self._open(split)

    def _open(self, split):
        path = self.dir / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path}: missing")
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{path}: empty")
        if size % self.dtype.itemsize:
            raise DataError(f"{path}: size {size} is not a multiple of {self.dtype.itemsize} "
                            f"bytes ({self.dtype.name}); truncated or wrong dtype")
        n = size // self.dtype.itemsize
        want = self.meta.get(f"{split}_tokens")
        if want is not None and want != n:
            raise DataError(f"{path}: holds {n} tokens but meta.json says {want} "
                            f"(truncated, or written with another dtype)")
        arr = np.memmap(path, dtype=self.dtype, mode="r")
        self._range_check(path, arr)
        return arr

    def _range_check(self, path, arr):
        if arr.nbytes <= _SCAN_LIMIT:
            chunks = [arr]
        else:  # sample 64 evenly spaced 1 MiB windows: cheap on any size
            step = max(1, arr.size // 64)
            w = (1 << 20) // arr.itemsize
            chunks = [arr[i:i + w] for i in range(0, arr.size, step)]
        for ch in chunks:
            hi = int(ch.max())
            if hi >= self.check_vocab:
                pos = int(np.argmax(np.asarray(ch) >= self.check_vocab))
                raise DataError(f"{path}: token id {hi} >= vocab_size {self.check_vocab} "
                                f"(first bad id near token {pos})")

    def num_tokens(self, split):
        return int(self.splits[split].size)

    def require_block(self, T: int):
        for split, arr in self.splits.items():
            if arr.size < T + 1:
                raise DataError(f"{self.dir / (split + '.bin')}: {arr.size} tokens is shorter than "
                                f"one block of {T} + 1 tokens; use a smaller --seq-len or more data")

    def get_batch(self, split: str, B: int, T: int, rng: np.random.Generator, rows=None):
        """Random windows: idx (B, T) int64 and targets = idx shifted by one. rows (indices
        into the B windows): read only those (data parallelism: every rank draws the whole
        global batch from the shared stream and reads its own part)."""
        arr = self.splits[split]
        starts = rng.integers(0, arr.size - T, size=B)
        if rows is not None:
            starts = starts[rows]
        buf = np.stack([np.asarray(arr[s:s + T + 1]) for s in starts]).astype(np.int64)
        return buf[:, :-1], buf[:, 1:]


def validate_meta(meta, where="meta.json") -> dict:
    """Check the fields of a data meta.json; return it (with defaults) or raise DataError."""
    if not isinstance(meta, dict):
        raise DataError(f"{where}: expected a JSON object")
    for key in ("tokenizer", "vocab_size", "dtype"):
        if key not in meta:
            raise DataError(f"{where}: missing field {key!r}")
    vs = meta["vocab_size"]
    if isinstance(vs, bool) or not isinstance(vs, int) or vs < 1 or vs > 2**32 - 1:
        raise DataError(f"{where}: vocab_size must be a positive integer < 2**32, got {vs!r}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{where}: dtype must be 'uint16' or 'uint32', got {meta['dtype']!r}")
    if meta["dtype"] == "uint16" and vs > 65536:
        raise DataError(f"{where}: vocab_size {vs} does not fit dtype uint16")
    for key in ("train_tokens", "val_tokens"):
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise DataError(f"{where}: {key} must be a non-negative integer, got {v!r}")
    if not isinstance(meta["tokenizer"], str):
        raise DataError(f"{where}: tokenizer must be a string")
    return meta
