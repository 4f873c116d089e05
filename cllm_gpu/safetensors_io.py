"""A small, strict reader/writer for the safetensors format (no pickle, no code execution).

Layout: u64 little-endian header length N, N bytes of JSON
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the tensor bytes (offsets are relative to the end of the header). Files written here load
with the `safetensors` package and Hugging Face transformers (metadata format = "pt"). BF16
tensors (NumPy has no bfloat16) are read as float32, exactly, and never written.

The reader validates the whole header before it allocates anything: size limits, dtypes,
shapes against byte ranges, ranges inside the file, no overlaps or gaps, no duplicate names.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from .errors import CheckpointError
from .json_text import parse_json, to_json

MAX_HEADER_BYTES = 100 * 1024 * 1024  # what the reference implementation accepts
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16,
           "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
# Read only: NumPy has no bfloat16. A bf16 value is the upper half of a float32's bits, so it is
# read as float32 exactly (Hugging Face weights are often saved in bf16).
_READ_ONLY_ITEMSIZE = {"BF16": 2}


def _stored_itemsize(dtype_name: str) -> int:
    if dtype_name in _READ_ONLY_ITEMSIZE:
        return _READ_ONLY_ITEMSIZE[dtype_name]
    return np.dtype(_DTYPES[dtype_name]).itemsize


def _decode(buf: bytes, dtype_name: str) -> np.ndarray:
    """The little-endian bytes of one tensor as a native-endian array of its own (a copy)."""
    if dtype_name == "BF16":
        bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    dt = np.dtype(_DTYPES[dtype_name]).newbyteorder("<")
    return np.frombuffer(buf, dtype=dt).astype(dt.newbyteorder("="), copy=True)


def serialize(tensors: dict, metadata: dict | None = None) -> list:
    """Return the file's pieces (header bytes, then each tensor's bytes) in order."""
    header, chunks, off = {}, [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        native = a.dtype.newbyteorder("=")
        if native not in _NAMES:
            raise ValueError(f"{name}: dtype {a.dtype} not supported")
        # Always contiguous little-endian bytes: strided views must not be written raw.
        # (np.require, not np.ascontiguousarray: that one makes a 0-d array 1-d.)
        a = np.require(a, dtype=native.newbyteorder("<"), requirements="C")
        nbytes = a.nbytes
        header[name] = {"dtype": _NAMES[native],
                        "shape": list(a.shape), "data_offsets": [off, off + nbytes]}
        chunks.append(a.reshape(-1).view(np.uint8))
        off += nbytes
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    hb = to_json(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return [struct.pack("<Q", len(hb)) + hb] + chunks


def save_file(tensors: dict, path, metadata: dict | None = None, fsync: bool = True):
    # serialized before the file is opened: a tensor serialize refuses (a dtype safetensors
    # has no name for) leaves a file already at `path` as it was, not emptied
    pieces = serialize(tensors, metadata)
    with open(path, "wb") as f:
        for piece in pieces:
            f.write(memoryview(piece))
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def read_header(path) -> tuple[dict, dict, int]:
    """Validate the header; return (tensor entries, metadata, data start offset)."""
    where = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{where}: too short for a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{where}: header length {n} is impossible for a "
                                      f"{size}-byte file")
            hb = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({e.strerror})") from None
    header = parse_json(hb, f"{where}: header", CheckpointError, no_duplicate_keys=True)
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: malformed entry for {name!r}")
        # isinstance first: a list or object there is unhashable (`in` a dict raises TypeError)
        if not isinstance(e["dtype"], str) or (e["dtype"] not in _DTYPES
                                               and e["dtype"] not in _READ_ONLY_ITEMSIZE):
            raise CheckpointError(f"{where}: {name}: unsupported dtype {e['dtype']!r}")
        shape, offs = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or len(shape) > 8 or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape):
            raise CheckpointError(f"{where}: {name}: bad shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(
                isinstance(o, int) and not isinstance(o, bool) for o in offs):
            raise CheckpointError(f"{where}: {name}: bad data_offsets {offs!r}")
        b, end = offs
        count = 1
        for s in shape:
            count *= s
        if not 0 <= b <= end <= data_len:
            raise CheckpointError(f"{where}: {name}: data_offsets {offs} outside the "
                                  f"{data_len}-byte data section")
        if end - b != count * _stored_itemsize(e["dtype"]):
            raise CheckpointError(f"{where}: {name}: shape {shape} does not match its "
                                  f"{end - b} bytes")
        spans.append((b, end, name))
    spans.sort()
    pos = 0
    for b, end, name in spans:
        if b != pos:
            raise CheckpointError(f"{where}: {name}: tensors overlap or leave a gap at byte {pos}")
        pos = end
    if pos != data_len:
        raise CheckpointError(f"{where}: {data_len - pos} trailing bytes after the last tensor")
    return header, meta, data_start


def load_file(path) -> tuple[dict, dict]:
    """Return ({name: numpy array}, metadata) after full header validation. BF16 tensors are
    returned as float32 (exact)."""
    header, meta, start = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, e in header.items():
            b, end = e["data_offsets"]
            f.seek(start + b)
            buf = f.read(end - b)
            if len(buf) != end - b:
                raise CheckpointError(f"{path}: {name}: file ended early")
            out[name] = _decode(buf, e["dtype"]).reshape(e["shape"])
    return out, meta
