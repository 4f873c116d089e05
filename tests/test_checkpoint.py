import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from cllm_gpu import checkpoint as ckpt
from cllm_gpu import safetensors_io
from cllm_gpu.errors import CheckpointError
from cllm_gpu.model import param_layout
from cllm_gpu.config import ModelConfig

# a skip for want of a package the dev extra installs (safetensors) fails CI: tests/conftest.py
pytestmark = pytest.mark.ci_required("dev")


def test_roundtrip_including_strided_views(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = {"t": a.T, "f": np.asfortranarray(a), "s": a[:, ::2], "d": np.arange(3.0)}
    safetensors_io.save_file(t, tmp_path / "x.safetensors", metadata={"format": "pt"})
    back, meta = safetensors_io.load_file(tmp_path / "x.safetensors")
    assert meta == {"format": "pt"}
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
        assert back[k].dtype == t[k].dtype


def test_interoperates_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    a = {"w": np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32).T}
    safetensors_io.save_file(a, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    np.testing.assert_array_equal(st.load_file(tmp_path / "ours.safetensors")["w"], a["w"])
    st.save_file({"v": np.arange(7, dtype=np.float64)}, tmp_path / "theirs.safetensors")
    back, _ = safetensors_io.load_file(tmp_path / "theirs.safetensors")
    np.testing.assert_array_equal(back["v"], np.arange(7.0))


def test_roundtrip_keeps_0d_and_empty_shapes_and_big_endian_values(tmp_path):
    """A 0-d array was written as shape [1] (np.ascontiguousarray returns ndim >= 1), and a
    big-endian array was refused although the writer converts to little-endian; the safetensors
    package reads back the same shapes and values."""
    t = {"scalar": np.array(3.5), "empty": np.zeros((0, 3), np.float32),
         "be": np.arange(5, dtype=">i4"), "be_t": np.arange(6, dtype=">f8").reshape(2, 3).T}
    safetensors_io.save_file(t, tmp_path / "x.safetensors")
    back, _ = safetensors_io.load_file(tmp_path / "x.safetensors")
    st = pytest.importorskip("safetensors.numpy")
    theirs = st.load_file(tmp_path / "x.safetensors")
    for k, a in t.items():
        for got in (back[k], theirs[k]):
            assert got.shape == a.shape and got.dtype == a.dtype.newbyteorder("="), k
            np.testing.assert_array_equal(got, a, err_msg=k)


@pytest.mark.ci_required("torch")
def test_bf16_is_read_as_float32_exactly(tmp_path):
    """Hugging Face weights are often bf16: they were refused ("unsupported dtype 'BF16'").
    NumPy has no bfloat16: read as float32, the same values torch reads."""
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    st.save_file({"w": w, "s": torch.tensor(-2.5, dtype=torch.bfloat16)}, tmp_path / "b.st")
    back, _ = safetensors_io.load_file(tmp_path / "b.st")
    assert back["w"].dtype == np.float32 and back["s"].shape == ()
    np.testing.assert_array_equal(back["w"], w.float().numpy())
    assert back["s"] == -2.5


def test_every_dtype_roundtrips_and_interoperates_with_the_safetensors_package(tmp_path):
    """Each dtype of the format, with values only that dtype holds (int16 -1, uint16 65535,
    ...), written here and read by the safetensors package and the other way round; the
    header is padded to 8 bytes as the package pads it (the tensors start aligned).
    Mutation audit: U16 read as int16, and a header one byte short of the 8-byte alignment,
    passed the checkpoint and Hugging Face tests."""
    st = pytest.importorskip("safetensors.numpy")
    ints = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
    t = {np.dtype(d).name: np.array([np.iinfo(d).min, np.iinfo(d).max, 1], dtype=d)
         for d in ints}
    t.update({np.dtype(d).name: np.array([-1.5, np.finfo(d).max, np.finfo(d).tiny], dtype=d)
              for d in (np.float16, np.float32, np.float64)})
    t["bool"] = np.array([True, False, True])
    for name in ("x", "xy", "xyz"):  # headers of three lengths
        safetensors_io.save_file({**t, name: np.zeros(1, np.float32)}, tmp_path / "ours.st")
        n = struct.unpack("<Q", (tmp_path / "ours.st").read_bytes()[:8])[0]
        assert n % 8 == 0, n
    ours = safetensors_io.load_file(tmp_path / "ours.st")[0]
    theirs = st.load_file(tmp_path / "ours.st")
    st.save_file(t, tmp_path / "theirs.st")
    back = safetensors_io.load_file(tmp_path / "theirs.st")[0]
    for k, a in t.items():
        for got in (ours[k], theirs[k], back[k]):
            assert got.dtype == a.dtype, (k, got.dtype)
            np.testing.assert_array_equal(got, a, err_msg=k)


def test_a_header_longer_than_the_reference_limit_is_refused_unread(tmp_path):
    """A header length over 100 MiB (the safetensors package's limit) is refused from the first
    8 bytes, even in a file long enough to hold it (sparse here). Mutation audit: without the
    limit it was read whole, then refused as bad JSON, and every test passed."""
    p = tmp_path / "big.safetensors"
    n = safetensors_io.MAX_HEADER_BYTES + 8
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n)
    with pytest.raises(CheckpointError, match=f"header length {n} is impossible"):
        safetensors_io.read_header(p)
    assert safetensors_io.MAX_HEADER_BYTES == 100 * 1024 * 1024


def _write_raw(path, header: dict | bytes, data: bytes = b"", n_override=None):
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if n_override is None else n_override
    path.write_bytes(struct.pack("<Q", n) + hb + data)


@pytest.mark.parametrize("header,data,n,msg", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2**62, "impossible"),
    ({"a": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "does not match"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**40]}}, b"\0" * 8, None, "outside"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "dtype"),
    # a dtype that is not a string (before 2026-12-02: TypeError "unhashable type" traceback)
    ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "dtype"),
    ({"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None,
     "dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4, None,
     "malformed"),
    ({"__metadata__": {"k": 1}}, b"", None, "strings"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, None,
     r"header: duplicate key 'a'$"),
    (b"[" * 100000, b"", None, r"header: JSON nested too deep to read$"),
    # an integer json's decoder will not convert (> 4300 digits) is no duplicate key (before
    # 2026-12-02 the error said "duplicate key in safetensors header")
    (b'{"__metadata__": {"k": ' + b"1" * 5000 + b'}}', b"", None,
     r"header: JSON integer too long to read \(more than 4300 digits\)$"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, None, "trailing"),
    # more bytes than the shape holds (mutation audit: a check for too few bytes only passed)
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "does not match"),
    # mutation audit (h30p): each row below passed every test with its check loosened
    (b"{}", b"", 3, "impossible"),   # a header one byte longer than the file
    ({"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, b"\0" * 4, None,
     "bad shape"),                    # more than 8 dimensions
    ({"a": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}}, b"\0" * 4, None,
     "bad shape"),                    # negative sizes whose product matches the bytes
    ({"a": {"dtype": "F32", "shape": [10**30, 0], "data_offsets": [0, 0]}}, b"", None,
     "bad shape"),                    # a size NumPy cannot hold, of 0 elements
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, None,
     "bad shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}}, b"\0" * 4, None,
     "bad data_offsets"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, b"\0" * 4, None,
     "bad data_offsets"),
])
def test_hostile_headers_are_refused(tmp_path, header, data, n, msg):
    p = tmp_path / "bad.safetensors"
    _write_raw(p, header, data, n)
    with pytest.raises(CheckpointError, match=msg):
        safetensors_io.load_file(p)



@pytest.mark.parametrize("content", [b"", b"\x05\0\0"])
def test_a_file_shorter_than_the_length_field_is_refused(tmp_path, content):
    """Mutation audit (h30p): with the length check loosened, struct.error escaped."""
    p = tmp_path / "short.safetensors"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="too short for a safetensors file"):
        safetensors_io.load_file(p)


def test_an_unreadable_path_is_a_checkpoint_error(tmp_path):
    """A directory (or a file without read permission) where the file should be: one
    CheckpointError, not an OSError traceback. Mutation audit (h30p): only a missing file was
    tried."""
    with pytest.raises(CheckpointError, match="cannot read"):
        safetensors_io.load_file(tmp_path)
    with pytest.raises(CheckpointError, match="cannot read"):
        safetensors_io.load_file(tmp_path / "absent.safetensors")


def test_a_header_out_of_offset_order_loads(tmp_path):
    """The format does not order the header's entries by offset (writers differ): entries
    listed out of order are sorted before the gap/overlap check. Mutation audit (h30p): without
    the sort this valid file was refused, and every test passed."""
    p = tmp_path / "x.safetensors"
    _write_raw(p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                   "b": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}},
               np.array(-3, "<i4").tobytes() + np.array(7.5, "<f4").tobytes())
    back, _ = safetensors_io.load_file(p)
    assert back["a"].tolist() == [7.5] and back["b"].tolist() == [-3]


def test_loaded_arrays_are_writable_copies(tmp_path):
    """load_file's arrays are the caller's own (a read-only view of the bytes read would refuse
    an in-place update). Mutation audit (h30p): returning np.frombuffer's view passed."""
    safetensors_io.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                              "i": np.arange(3, dtype=np.int64)}, tmp_path / "x.safetensors")
    back, _ = safetensors_io.load_file(tmp_path / "x.safetensors")
    for name, a in back.items():
        assert a.flags.writeable, name
        a += 1


def test_a_file_that_shrinks_after_its_header_was_checked_is_refused(tmp_path, monkeypatch):
    """The header is checked against the file's size, then the tensors are read: a file cut
    short in between (another process rewriting it) ends early, refused as such. Mutation
    audit (h30p): without that check a ValueError from reshape escaped."""
    p = tmp_path / "x.safetensors"
    _write_raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4)
    real = safetensors_io.os.path.getsize
    monkeypatch.setattr(safetensors_io.os.path, "getsize", lambda path: real(path) + 4)
    with pytest.raises(CheckpointError, match="a: file ended early"):
        safetensors_io.load_file(p)


def test_saving_an_unsupported_dtype_is_a_value_error_naming_the_tensor(tmp_path):
    """Mutation audit (h30p): without the check a KeyError ('complex64') escaped."""
    with pytest.raises(ValueError, match="z: dtype complex64 not supported"):
        safetensors_io.serialize({"z": np.zeros(2, np.complex64)})


def test_a_refused_save_leaves_the_file_already_there_as_it_was(tmp_path):
    """save_file opened (and emptied) its path before serialize refused a tensor: a failed
    save over an existing file left it empty (h30p's audit; the package's own callers write
    to temporary names first)."""
    path = tmp_path / "model.safetensors"
    safetensors_io.save_file({"a": np.arange(3, dtype=np.float32)}, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="not supported"):
        safetensors_io.save_file({"z": np.zeros(2, np.complex64)}, path)
    assert path.read_bytes() == before


CFG = ModelConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4)


def _arrays(seed=0):
    specs, _ = param_layout(CFG)
    rng = np.random.default_rng(seed)
    mk = lambda: {s.name: rng.normal(size=s.shape).astype(np.float32) for s in specs}  # noqa
    params, m, v = mk(), mk(), mk()
    return specs, params, m, {k: np.abs(a) for k, a in v.items()}  # second moments: >= 0


def _save(run, step, seed=0, keep=3):
    specs, p, m, v = _arrays(seed)
    return ckpt.save_checkpoint(run, step, p, m, v, {"model_config": CFG.to_dict()}, keep=keep)


def test_save_load_and_manifest(tmp_path):
    specs, p, m, v = _arrays()
    path = _save(tmp_path, 5)
    assert path.name == "ckpt-00000005"
    state, p2, m2, v2 = ckpt.load_checkpoint(path, specs)
    assert state["step"] == 5 and set(state["files"]) == {"model.safetensors",
                                                          "optimizer.safetensors"}
    for a, b in ((p, p2), (m, m2), (v, v2)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not list(tmp_path.glob(".tmp-*"))
    for fn in ckpt.FILES:  # Hugging Face refuses a safetensors file whose format is not "pt"
        assert safetensors_io.load_file(path / fn)[1]["format"] == "pt", fn


def test_keep_n_newest(tmp_path):
    for s in (1, 2, 3, 4, 5):
        _save(tmp_path, s, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000005", "ckpt-00000004"]


@pytest.mark.parametrize("damage,msg", [
    (lambda d: (d / "optimizer.safetensors").unlink(), "optimizer.safetensors: missing"),
    (lambda d: (d / "state.json").unlink(), "state.json: missing"),
    (lambda d: _flip_byte(d / "model.safetensors", 200), "model.safetensors: SHA-256"),
    (lambda d: _truncate(d / "model.safetensors"), "model.safetensors: size"),
    (lambda d: _append(d / "model.safetensors"), "model.safetensors: size"),
    (lambda d: (d / "state.json").write_text("{"), "not valid JSON"),
    # valid JSON json.loads refuses with a plain ValueError: a traceback before 2026-12-02
    (lambda d: (d / "state.json").write_text('{"step": ' + "9" * 5000 + "}"),
     r"state\.json: JSON integer too long to read \(more than 4300 digits\)$"),
])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, msg):
    specs, *_ = _arrays()
    path = _save(tmp_path, 1)
    damage(path)
    with pytest.raises(CheckpointError, match=msg):
        ckpt.load_checkpoint(path, specs)


def _flip_byte(p, at):
    b = bytearray(p.read_bytes())
    b[at] ^= 0x01
    p.write_bytes(bytes(b))


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-3])


def _append(p):
    p.write_bytes(p.read_bytes() + b"\0" * 3)


@pytest.mark.parametrize("which,value,msg", [
    ("params", np.nan, r"model.safetensors: transformer.wte.weight holds NaN or Inf"),
    ("m", np.inf, r"optimizer.safetensors: transformer.wte.weight.exp_avg holds NaN or Inf"),
    ("v", -1.0, r"optimizer.safetensors: transformer.wte.weight.exp_avg_sq holds negative"),
])
def test_non_finite_numbers_in_a_sealed_checkpoint_are_refused(tmp_path, which, value, msg):
    """A checkpoint whose manifest matches its files but whose numbers are not a training
    run's (a NaN parameter or moment, a negative second moment: a flipped sign bit) was
    resumed: the first step made every parameter NaN and the non-finite stop saved that as
    the 'last good state'; sample and eval computed with it."""
    specs, p, m, v = _arrays()
    arrays = {"params": p, "m": m, "v": v}[which]
    arrays["transformer.wte.weight"][3, 1] = value
    path = ckpt.save_checkpoint(tmp_path, 1, p, m, v, {"model_config": CFG.to_dict()})
    with pytest.raises(CheckpointError, match=msg):
        ckpt.load_checkpoint(path, specs)
    if which == "params":
        with pytest.raises(CheckpointError, match=msg):
            ckpt.load_model_params(path, specs)


@pytest.mark.parametrize("which,dtype,recorded,msg", [
    ("params", np.int32, None, r"model.safetensors: transformer.wte.weight is int32, the "
                               r"checkpoint's dtype is float32 or float64"),
    ("m", np.uint32, "float32", r"optimizer.safetensors: transformer.wte.weight.exp_avg is "
                                r"uint32, the checkpoint's dtype is float32"),
    ("params", np.float64, "float32", r"transformer.wte.weight is float64, the checkpoint's "
                                      r"dtype is float32"),
])
def test_a_tensor_of_another_dtype_in_a_sealed_checkpoint_is_refused(tmp_path, which, dtype,
                                                                    recorded, msg):
    """A sealed checkpoint (its manifest matching its files) holding a tensor of another type:
    an int32 tensor has a float32's bytes and loaded as its integers, silently (CLI fuzz,
    before 2026-12-02)."""
    specs, p, m, v = _arrays()
    arrays = {"params": p, "m": m}[which]
    arrays["transformer.wte.weight"] = arrays["transformer.wte.weight"].astype(dtype)
    state = {"model_config": CFG.to_dict(), **({"dtype": recorded} if recorded else {})}
    path = ckpt.save_checkpoint(tmp_path, 1, p, m, v, state)
    with pytest.raises(CheckpointError, match=msg):
        ckpt.load_checkpoint(path, specs)
    if which == "params":
        with pytest.raises(CheckpointError, match=msg):
            ckpt.load_model_params(path, specs)


def test_wrong_shape_is_refused(tmp_path):
    _save(tmp_path, 1)
    other = ModelConfig(vocab_size=9, block_size=4, n_layer=1, n_head=1, n_embd=4)
    specs, _ = param_layout(other)
    with pytest.raises(CheckpointError, match="wte.weight has shape"):
        ckpt.load_checkpoint(tmp_path / "ckpt-00000001", specs)


def test_a_file_given_as_the_checkpoint_is_named_as_such(tmp_path):
    """It said 'no complete, verified checkpoint in it', as of an empty run directory."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model.safetensors: is a file, not a checkpoint "
                                              r"or run directory$"):
        ckpt.find_resumable(tmp_path / "model.safetensors")


def test_a_checkpoint_directory_missing_its_manifest_is_named_as_incomplete(tmp_path):
    """A directory named like a checkpoint and holding none (a run directory so named holds
    checkpoints) is a checkpoint missing its state.json: said so, not 'no complete, verified
    checkpoint in it' as of an empty run directory (mutation audit: taking every such
    directory for a run directory passed every test)."""
    saved = _save(tmp_path, 1)
    (saved / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt-00000001/state\.json: missing \(incomplete "
                                              r"checkpoint\)$"):
        ckpt.find_resumable(saved)


def test_a_leftover_that_is_a_link_is_removed_and_its_target_kept(tmp_path):
    """A checkpoint linked into the run from elsewhere and set aside or trashed by a killed
    writer leaves a .trash-/.old-ckpt-* that is a link: remove_leftovers removes the link, not
    the checkpoint outside the run (mutation audit: rmtree, which refuses a link and whose
    error is ignored, left it for good with every test passing)."""
    run, elsewhere = tmp_path / "run", tmp_path / "kept"
    run.mkdir()
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes(b"weights")
    link = run / f".trash-ckpt-00000001-{os.getpid()}"
    link.symlink_to(elsewhere)
    ckpt.remove_leftovers(run)
    assert not link.is_symlink() and list(run.iterdir()) == []
    assert (elsewhere / "model.safetensors").read_bytes() == b"weights"


def test_resume_skips_corrupt_newer_checkpoint(tmp_path):
    _save(tmp_path, 1)
    newer = _save(tmp_path, 2)
    _flip_byte(newer / "optimizer.safetensors", 300)
    path, state, notes = ckpt.find_resumable(tmp_path)
    assert path.name == "ckpt-00000001" and state["step"] == 1
    assert len(notes) == 1 and "ckpt-00000002" in notes[0] and "SHA-256" in notes[0]


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    specs, *_ = _arrays()
    _save(tmp_path, 1)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors_io, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left.*previous checkpoints are intact"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000001"]
    assert not list(tmp_path.glob(".tmp-*"))
    ckpt.load_checkpoint(tmp_path / "ckpt-00000001", specs)


def test_a_save_over_a_checkpoint_of_the_same_step_replaces_it(tmp_path):
    """A re-save of a step that has a checkpoint (a run resumed at that step saves it again):
    the new files are in place and verify, and the set-aside old directory is gone."""
    specs, p2, _, _ = _arrays(seed=2)
    _save(tmp_path, 1, seed=1)
    path = _save(tmp_path, 1, seed=2)
    _, params, _, _ = ckpt.load_checkpoint(path, specs)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p2["transformer.wte.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001"]


def _finished_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_leftovers_of_a_dead_process_are_removed_those_of_a_live_one_kept(tmp_path):
    """prune (after every save) removes the .tmp-/.trash-/.old-ckpt-* directories a killed
    process left, named by its pid; those of another process still running (another run
    writing into the same directory) are its work in progress and are kept. Those named by
    this process's pid are no save in progress (its saves run one after another, and this one
    is done): an earlier process's with the same pid, removed. (The .tmp- ones are of another
    step than the .old- ones: beside its .tmp- twin, with no ckpt-N, an .old-ckpt-N is a
    checkpoint a killed re-save set aside, restored: the tests of re-saves below.)"""
    import os
    import subprocess
    import sys
    dead, mine = _finished_pid(), os.getpid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f"{kind}-ckpt-0000000{step}-{pid}"
                 for kind, step in ((".tmp", 8), (".trash", 7), (".old", 7))
                 for pid in (dead, live.pid, mine, "notapid")]
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"partial")
        _save(tmp_path, 1)
        kept = {p.name for p in tmp_path.iterdir()} - {"ckpt-00000001"}
        assert kept == {n for n in names if n.endswith(f"-{live.pid}")}
    finally:
        live.kill()
        live.wait()


def test_a_killed_container_s_leftovers_are_removed_by_the_next_container_s_save(tmp_path,
                                                                                  monkeypatch):
    """The Dockerfile's ENTRYPOINT makes the trainer pid 1 in every container: a container
    killed while saving step 2 (its .tmp-ckpt-00000002-1) and while re-saving step 1 (its
    .old-ckpt-00000001-1) leaves leftovers named by the pid the next container's trainer has.
    Its save of step 3 removes them (before 2026-12-02 they were taken for its own save in
    progress and kept in every later container, each as large as a checkpoint)."""
    import os
    monkeypatch.setattr(os, "getpid", lambda: 1)   # this process is the next container's pid 1
    _save(tmp_path, 1)
    for name in (".tmp-ckpt-00000002-1", ".old-ckpt-00000001-1", ".trash-ckpt-00000001-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    _save(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", "ckpt-00000003"]


@pytest.mark.parametrize("files", [["model.safetensors"],
                                   ["model.safetensors", "optimizer.safetensors", "extra.bin"]])
def test_a_manifest_must_list_exactly_the_checkpoint_files(tmp_path, files):
    """state.json's "files" lists model.safetensors and optimizer.safetensors, no fewer (an
    unlisted file is not hashed) and no more."""
    path = _save(tmp_path, 1)
    state = json.loads((path / "state.json").read_text())
    state["files"] = {fn: state["files"].get(fn, {"bytes": 0, "sha256": ""}) for fn in files}
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"state.json: manifest must list exactly "
                                              r"model.safetensors, optimizer.safetensors$"):
        ckpt.verify_checkpoint(path)


def _reseal(path, fn, tensors):
    """Write `tensors` as the checkpoint's file `fn`, and its size and hash into state.json:
    a checkpoint that verifies, but whose tensors are not the model's."""
    safetensors_io.save_file(tensors, path / fn, metadata={"format": "pt"})
    state = json.loads((path / "state.json").read_text())
    state["files"][fn] = {"bytes": (path / fn).stat().st_size,
                          "sha256": ckpt.sha256_file(path / fn)}
    (path / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("fn,edit,msg", [
    ("model.safetensors", lambda t: t.pop("transformer.wte.weight"),
     r"model.safetensors: missing tensor transformer.wte.weight$"),
    ("model.safetensors",
     lambda t: [t.pop("transformer.wte.weight"), t.pop("transformer.wpe.weight")],
     r"model.safetensors: missing tensor transformer.wpe.weight \(\+1 more\)$"),
    ("model.safetensors", lambda t: t.update(lm_head=np.zeros(3, np.float32)),
     r"model.safetensors: unexpected tensor lm_head$"),
    ("optimizer.safetensors", lambda t: t.pop("transformer.ln_f.bias.exp_avg_sq"),
     r"optimizer.safetensors: missing tensor transformer.ln_f.bias.exp_avg_sq$"),
    ("optimizer.safetensors", lambda t: t.update({"step": np.zeros(1, np.float32)}),
     r"optimizer.safetensors: unexpected tensor step$"),
])
def test_a_sealed_checkpoint_with_missing_or_unexpected_tensors_is_refused(tmp_path, fn, edit,
                                                                           msg):
    """A checkpoint whose manifest matches its files, but whose model or optimizer file lacks
    one of the model's tensors or holds one it does not have: one line naming the file and
    the first tensor (sorted), and how many more are missing."""
    specs, *_ = _arrays()
    path = _save(tmp_path, 1)
    tensors, _ = safetensors_io.load_file(path / fn)
    edit(tensors)
    _reseal(path, fn, tensors)
    ckpt.verify_checkpoint(path)  # sealed: the refusal is the tensors', not the hashes'
    with pytest.raises(CheckpointError, match=msg):
        ckpt.load_checkpoint(path, specs)
    if fn == "model.safetensors":
        with pytest.raises(CheckpointError, match=msg):
            ckpt.load_model_params(path, specs)


def test_a_process_of_another_user_counts_as_live(tmp_path, monkeypatch):
    """os.kill(pid, 0) raises PermissionError (EPERM) for a running process that this user may
    not signal (another user's run writing into a shared directory): it is alive, and its
    .tmp-ckpt-* directory is its checkpoint in progress, not a dead process's leftover. Only
    ProcessLookupError (ESRCH) says there is no such process."""
    import errno
    import os
    other, gone = 4_000_001, 4_000_002   # above any pid_max: no real process is asked

    def kill(pid, sig):
        if pid == other:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        raise ProcessLookupError(errno.ESRCH, "No such process")
    monkeypatch.setattr(os, "kill", kill)
    for pid in (other, gone):
        (tmp_path / f".tmp-ckpt-00000002-{pid}").mkdir()
    _save(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-ckpt-00000002-{other}",
                                                         "ckpt-00000001"]


def test_a_leftover_named_by_a_pid_past_any_process_is_removed(tmp_path):
    """A .tmp-ckpt-* name ending in a number too large for a pid (a hand-made or foreign
    directory) is no live process's: removed, and the save that prunes it succeeds (before
    2026-12-02 os.kill's OverflowError came out of every save, after the checkpoint was
    written)."""
    for pid in ("2147483648", "9" * 30):
        (tmp_path / f".tmp-ckpt-00000002-{pid}").mkdir()
    _save(tmp_path, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000001"]


def test_a_failed_same_step_re_save_leaves_the_checkpoint_there_was(tmp_path, monkeypatch):
    """The re-save of a step sets the existing checkpoint aside (.old-), then renames the new
    one into place: when that rename fails, the error says the previous checkpoints are
    intact, and the old one must be back under its name (it was left as .old-ckpt-*, which no
    resume finds and the next run's prune deletes)."""
    import errno
    import os
    specs, p1, _, _ = _arrays(seed=1)
    _save(tmp_path, 1, seed=1)
    replace = os.replace

    def replace_fails_into_place(src, dst):
        if str(src).rsplit("/", 1)[-1].startswith(".tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        return replace(src, dst)
    monkeypatch.setattr(os, "replace", replace_fails_into_place)
    with pytest.raises(CheckpointError, match=r"Input/output error\); previous checkpoints are "
                                              r"intact"):
        _save(tmp_path, 1, seed=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001"]
    _, params, _, _ = ckpt.load_checkpoint(ckpt.find_resumable(tmp_path).dir, specs)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p1["transformer.wte.weight"])


def test_a_re_save_whose_checkpoint_cannot_be_put_back_keeps_it_for_the_next_run(
        tmp_path, monkeypatch):
    """A re-save whose rename into place fails, and whose putting back of the set-aside
    checkpoint fails too (EIO both times): that checkpoint is left as .old-ckpt-*. Before
    2026-12-02 its new copy (.tmp-ckpt-*) was removed all the same, which made the set-aside
    one look superseded: the error said the previous checkpoints were intact, and the next
    save's prune deleted the step's only checkpoint. Now the copy is kept as the mark of an
    interrupted re-save, the error says where the checkpoint is, and it comes back."""
    import errno
    import os
    specs, p1, _, _ = _arrays(seed=1)
    _save(tmp_path, 1, seed=1)
    replace = os.replace

    def renames_into_place_fail(src, dst):
        if Path(dst).name == "ckpt-00000001":
            raise OSError(errno.EIO, "Input/output error")
        return replace(src, dst)
    monkeypatch.setattr(os, "replace", renames_into_place_fail)
    with pytest.raises(CheckpointError) as e:
        _save(tmp_path, 1, seed=2)
    monkeypatch.undo()
    assert "previous checkpoints are intact" not in str(e.value)
    assert f"set aside as .old-ckpt-00000001-{os.getpid()}" in str(e.value)
    _save(tmp_path, 2, seed=3)  # the disk is well again: this save's prune runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", "ckpt-00000002"]
    _, params, _, _ = ckpt.load_checkpoint(tmp_path / "ckpt-00000001", specs)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p1["transformer.wte.weight"])


@pytest.mark.parametrize("re_save", [False, True], ids=["new-step", "same-step"])
def test_a_directory_fsync_failing_after_the_rename_is_no_failed_save(tmp_path, monkeypatch,
                                                                       re_save):
    """Once the new checkpoint is renamed into place it is complete (its files fsynced): the
    run directory's fsync failing after that (EIO from its close) must not say the write
    failed, and a re-save's old checkpoint must not stay as .old-ckpt-* (before 2026-12-02,
    h27n: CheckpointError 'could not write checkpoint ... previous checkpoints are intact'
    with the new one in place and the old one set aside)."""
    import errno
    specs, p2, _, _ = _arrays(seed=2)
    if re_save:
        _save(tmp_path, 1, seed=1)
    fsync_dir = ckpt._fsync_dir

    def run_dir_fsync_fails(path):
        if Path(path) == tmp_path:
            raise OSError(errno.EIO, "Input/output error")
        return fsync_dir(path)
    monkeypatch.setattr(ckpt, "_fsync_dir", run_dir_fsync_fails)
    path = _save(tmp_path, 1, seed=2)
    monkeypatch.undo()
    assert path == tmp_path / "ckpt-00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001"]
    _, params, _, _ = ckpt.load_checkpoint(path, specs)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p2["transformer.wte.weight"])


@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "n_head", "n_embd"])
def test_a_model_config_lacking_a_gpt2_field_is_refused_naming_it(tmp_path, field):
    """Each of GPT-2's own fields is required in a manifest's model_config (a missing one took
    ModelConfig's default); the CLI test removes n_head only, so a field dropped from the list
    checked went unnoticed. The options added later may be absent."""
    specs, p, m, v = _arrays()
    config = {k: val for k, val in CFG.to_dict().items() if k != field}
    path = ckpt.save_checkpoint(tmp_path, 1, p, m, v, {"model_config": config})
    with pytest.raises(CheckpointError, match=rf"ckpt-00000001/state\.json: model_config lacks "
                                              rf"{field}$"):
        ckpt.verify_checkpoint(path)
    later = {k: val for k, val in CFG.to_dict().items() if k != "dropout"}
    ckpt.verify_checkpoint(ckpt.save_checkpoint(tmp_path, 2, p, m, v, {"model_config": later}))


@pytest.mark.parametrize("value,ok", [(True, True), (False, True), ("false", False), (0, False)])
def test_a_recorded_post_processor_rule_must_be_true_or_false(tmp_path, value, ok):
    """data.tokenizer.add_special_tokens (whether the run's documents carried the tokenizer
    post-processor's tokens) is compared with the data's: anything but true or false is a
    damaged state.json, refused as one."""
    _check_recorded_tokenizer(tmp_path, {"tokenizer": "file", "vocab_size": 300, "eot_id": 256,
                                         "tokenizer_sha256": "0" * 64,
                                         "add_special_tokens": value},
                              ok, "add_special_tokens \\(true or false\\)")


def _check_recorded_tokenizer(tmp_path, identity, ok, refusal):
    """A checkpoint recording the data tokenizer `identity` is read back as it (ok) or refused
    with a message matching `refusal`."""
    specs, p, m, v = _arrays()
    path = ckpt.save_checkpoint(tmp_path, 1, p, m, v, {"model_config": CFG.to_dict(),
                                                      "data": {"tokenizer": identity}})
    if ok:
        assert ckpt.recorded_tokenizer(ckpt.verify_checkpoint(path)) == identity
    else:
        with pytest.raises(CheckpointError, match=refusal):
            ckpt.verify_checkpoint(path)


def _interrupt_a_re_save(monkeypatch, when):
    """Make the next save raise KeyboardInterrupt (the trainer's second SIGINT) `when`:
    "writing" (its files, before any rename) or "between-renames" (once the checkpoint of its
    step is set aside as .old-ckpt-*, before the new one is renamed in)."""
    import os
    if when == "writing":
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(safetensors_io, "save_file", interrupted)
        return
    replace = os.replace

    def interrupted_after_setting_aside(src, dst):
        replace(src, dst)
        if Path(dst).name.startswith(".old-"):
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted_after_setting_aside)


@pytest.mark.parametrize("when", ["writing", "between-renames"])
def test_a_ctrl_c_during_a_re_save_leaves_the_checkpoint_there_was(tmp_path, monkeypatch, when):
    """A Ctrl-C (the trainer's second SIGINT: KeyboardInterrupt) during the re-save of a step
    that has a checkpoint: the CLI then says "checkpoints on disk are intact", so the
    checkpoint of that step is under its name, as it was, and no temporary is left. Before
    2026-12-02 only OSError was handled: between the renames the checkpoint stayed set aside
    as .old-ckpt-*, which no resume found and the next save's prune deleted."""
    specs, p1, _, _ = _arrays(seed=1)
    _save(tmp_path, 1, seed=1)
    _interrupt_a_re_save(monkeypatch, when)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 1, seed=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001"]
    _, params, _, _ = ckpt.load_checkpoint(ckpt.find_resumable(tmp_path).dir, specs)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p1["transformer.wte.weight"])


# A writer killed (kill -9: nothing of it runs on) once the checkpoint of the step it re-saves
# is set aside, before the new one is renamed in
_KILLED_BETWEEN_THE_RENAMES = """
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_checkpoint import _save
replace = os.replace
def killed_after_setting_aside(src, dst):
    replace(src, dst)
    if Path(dst).name.startswith(".old-"):
        os._exit(137)
os.replace = killed_after_setting_aside
_save(Path(sys.argv[2]), int(sys.argv[3]), seed=2)
"""


def _kill_a_re_save_between_its_renames(run, step):
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_THE_RENAMES,
                           str(root / "tests"), str(run), str(step)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    names = sorted(p.name for p in run.iterdir())
    assert f"ckpt-{step:08d}" not in names and any(n.startswith(".old-") for n in names), names


@pytest.mark.parametrize("older", [False, True], ids=["only-checkpoint", "with-an-older-one"])
def test_a_re_save_killed_between_its_renames_leaves_a_checkpoint_resume_finds(tmp_path, older):
    """kill -9 between a re-save's two renames (nothing can put the set-aside checkpoint back
    then): the next process's resume finds that step's checkpoint, as it was, and its saves
    keep it. Before 2026-12-02 resume fell back to an older checkpoint, or found none, and the
    next save's prune deleted the set-aside one as a dead writer's leftover."""
    specs, p1, _, _ = _arrays(seed=1)
    if older:
        _save(tmp_path, 1, seed=1)
    _save(tmp_path, 2, seed=1)
    _kill_a_re_save_between_its_renames(tmp_path, 2)
    found = ckpt.find_resumable(tmp_path)
    assert found.dir == tmp_path / "ckpt-00000002" and not found.notes
    _, params, _, _ = ckpt.load_checkpoint(found.dir, specs)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p1["transformer.wte.weight"])
    _save(tmp_path, 3, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["ckpt-00000001"] * older + ["ckpt-00000002", "ckpt-00000003"])


@pytest.mark.parametrize("named_by", ["its-path", "a-link-to-it"])
def test_a_resume_naming_the_step_of_a_re_save_killed_between_its_renames_finds_it(tmp_path,
                                                                                 named_by):
    """kill -9 between a re-save's two renames, then `--resume RUN/ckpt-N` (or `sample`,
    `eval`, `export` of it), N the step re-saved, or a link to it (latest -> RUN/ckpt-N): the
    checkpoint of step N is renamed back and resumed, as a resume of RUN does. Before, only a
    listing of RUN renamed it back: naming it said "no such checkpoint or run directory"."""
    specs, p1, _, _ = _arrays(seed=1)
    _save(tmp_path, 1, seed=0)
    _save(tmp_path, 2, seed=1)
    _kill_a_re_save_between_its_renames(tmp_path, 2)
    named = tmp_path / "ckpt-00000002"
    if named_by == "a-link-to-it":
        named = tmp_path.parent / f"{tmp_path.name}-latest"
        named.symlink_to(tmp_path / "ckpt-00000002", target_is_directory=True)
    found = ckpt.find_resumable(named)
    assert found.dir == named and not found.notes
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000002",
                                                                 "ckpt-00000001"]
    _, params, _, _ = ckpt.load_checkpoint(found.dir, specs, found.state)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p1["transformer.wte.weight"])


def _renaming_back_fails(monkeypatch, error=None):
    """A run directory whose set-aside checkpoint cannot be renamed back: by default a
    read-only mount (EROFS), which root meets too where chmod would not stop it."""
    import errno
    import os
    replace = os.replace
    error = error or OSError(errno.EROFS, "Read-only file system")

    def failing(src, dst):
        if Path(src).name.startswith(".old-"):
            raise error
        return replace(src, dst)
    monkeypatch.setattr(os, "replace", failing)


@pytest.mark.parametrize("named", ["the-run", "the-step"])
def test_a_set_aside_checkpoint_that_cannot_be_renamed_back_is_read_in_place(tmp_path,
                                                                             monkeypatch, named):
    """A killed re-save's set-aside checkpoint of step N in a run directory where it cannot be
    renamed back (a read-only mount): a resume of the run (its newest checkpoint), or of
    RUN/ckpt-N, reads it in place, with a warning naming it, and leaves the directory as it is.
    Before, `train --resume RUN`, `sample RUN`, `eval RUN` and `export RUN` took the older
    ckpt-N-1 without a word (or found no checkpoint), and RUN/ckpt-N was "no such checkpoint"."""
    specs, p1, _, _ = _arrays(seed=1)
    _save(tmp_path, 1, seed=0)
    _save(tmp_path, 2, seed=1)
    _kill_a_re_save_between_its_renames(tmp_path, 2)
    left = sorted(p.name for p in tmp_path.iterdir())
    set_aside = tmp_path / next(n for n in left if n.startswith(".old-"))
    _renaming_back_fails(monkeypatch)
    found = ckpt.find_resumable(tmp_path if named == "the-run" else tmp_path / "ckpt-00000002")
    assert found.dir == set_aside and found.state["step"] == 2
    assert len(found.notes) == 1 and set_aside.name in found.notes[0]
    assert "could not be renamed back to ckpt-00000002 (Read-only file system)" in found.notes[0]
    _, params, _, _ = ckpt.load_checkpoint(found.dir, specs, found.state)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p1["transformer.wte.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == left


def test_a_set_aside_checkpoint_read_in_place_that_does_not_verify_is_skipped(tmp_path,
                                                                              monkeypatch):
    """Read in place, a set-aside checkpoint is verified as any other: a damaged one is skipped
    with a note, for the older checkpoint."""
    _save(tmp_path, 1, seed=0)
    _save(tmp_path, 2, seed=1)
    _kill_a_re_save_between_its_renames(tmp_path, 2)
    set_aside = next(tmp_path.glob(".old-*"))
    with open(set_aside / "model.safetensors", "r+b") as f:  # one bit of its last byte
        f.seek(-1, 2)
        last = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([last ^ 1]))
    _renaming_back_fails(monkeypatch)
    found = ckpt.find_resumable(tmp_path)
    assert found.dir == tmp_path / "ckpt-00000001"
    assert any(n.startswith(f"skipped {set_aside.name}: ") and "SHA-256" in n
               for n in found.notes), found.notes


@pytest.mark.parametrize("named", ["the-run", "the-step"])
def test_a_set_aside_checkpoint_another_process_renamed_back_first_is_resumed_by_its_name(
        tmp_path, monkeypatch, named):
    """Two processes resuming one run at once (the ranks of `mpiexec -n 2`): the other renames
    the killed re-save's checkpoint back between this one's listing and its own rename, which
    fails (ENOENT). That is no checkpoint stuck set aside: ckpt-N is resumed, without a note
    (reading the vanished copy in place skipped step N for the older checkpoint, or refused
    RUN/ckpt-N as incomplete: both seen while writing the read in place)."""
    import errno
    import os
    _save(tmp_path, 1, seed=0)
    _save(tmp_path, 2, seed=1)
    _kill_a_re_save_between_its_renames(tmp_path, 2)
    replace = os.replace

    def the_other_process_was_first(src, dst):
        replace(src, dst)
        if Path(src).name.startswith(".old-"):
            raise OSError(errno.ENOENT, "No such file or directory")
    monkeypatch.setattr(os, "replace", the_other_process_was_first)
    found = ckpt.find_resumable(tmp_path if named == "the-run" else tmp_path / "ckpt-00000002")
    assert found.dir == tmp_path / "ckpt-00000002" and not found.notes


def test_a_set_aside_checkpoint_renamed_back_after_its_rename_failed_is_resumed_by_its_name(
        tmp_path, monkeypatch):
    """A resume whose rename of the killed re-save's checkpoint fails (a read-only mount, as
    it sees it), after which another process renames it back, before this one lists the run:
    the step is there twice, as ckpt-N and as the copy to read in place, now gone; ckpt-N is
    resumed, without a note. Mutation audit: the copy taken for the step instead (it fails to
    verify: the older checkpoint was resumed, with a note) passed every test."""
    _save(tmp_path, 1, seed=0)
    _save(tmp_path, 2, seed=1)
    _kill_a_re_save_between_its_renames(tmp_path, 2)
    _renaming_back_fails(monkeypatch)
    listing = ckpt._checkpoint_dirs

    def the_other_process_renames_it_back(run_dir):
        for old in run_dir.glob(".old-ckpt-*"):
            old.rename(run_dir / "ckpt-00000002")
        return listing(run_dir)
    monkeypatch.setattr(ckpt, "_checkpoint_dirs", the_other_process_renames_it_back)
    found = ckpt.find_resumable(tmp_path)
    assert found.dir == tmp_path / "ckpt-00000002" and not found.notes, found


def test_a_set_aside_checkpoint_that_cannot_be_put_back_is_never_pruned(tmp_path, monkeypatch):
    """Where the killed re-save's set-aside checkpoint cannot be renamed back (the rename
    fails), prune keeps it and the new copy that marks it as one, for a later run to restore;
    it deletes them once the checkpoint is back."""
    import errno
    _save(tmp_path, 2, seed=1)
    _kill_a_re_save_between_its_renames(tmp_path, 2)
    left = sorted(p.name for p in tmp_path.iterdir())
    _renaming_back_fails(monkeypatch, OSError(errno.EIO, "Input/output error"))
    _save(tmp_path, 3, seed=3)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == left + ["ckpt-00000003"]
    _save(tmp_path, 4, seed=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000002", "ckpt-00000003",
                                                          "ckpt-00000004"]


def test_a_superseded_set_aside_checkpoint_is_never_restored(tmp_path):
    """An .old-ckpt-N-<pid> without its .tmp-ckpt-N-<pid> is one whose replacement was renamed
    into place (the writer killed before removing it): superseded. Should ckpt-N be gone since
    (pruned, or discarded by --overwrite), it must not come back: it is deleted as a leftover."""
    import shutil
    _save(tmp_path, 1)
    step_5 = _save(tmp_path, 5)
    shutil.copytree(step_5, tmp_path / f".old-ckpt-00000005-{_finished_pid()}")
    ckpt.discard_checkpoint(step_5)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000001"]
    _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", "ckpt-00000002"]


def test_a_ctrl_c_while_a_re_save_cleans_up_still_puts_the_checkpoint_back_first(
        tmp_path, monkeypatch):
    """A Ctrl-C between a re-save's renames, and another while the new copy (as large as a
    checkpoint) is being deleted: the checkpoint of the step is back under its name when the
    Ctrl-C comes out, before any listing (`sample run/ckpt-N` opens it by its name). Mutation
    audit (h29ab): the new copy deleted before the checkpoint was put back passed every test."""
    import shutil
    specs, p1, _, _ = _arrays(seed=1)
    _save(tmp_path, 1, seed=1)
    _interrupt_a_re_save(monkeypatch, "between-renames")

    def interrupted_again(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "rmtree", interrupted_again)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 1, seed=2)
    monkeypatch.undo()
    assert (tmp_path / "ckpt-00000001").is_dir()
    _, params, _, _ = ckpt.load_checkpoint(tmp_path / "ckpt-00000001", specs)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p1["transformer.wte.weight"])


def test_a_dead_writer_s_set_aside_pair_beside_its_step_s_checkpoint_is_pruned(tmp_path):
    """A killed re-save's .old-ckpt-N-<pid> and .tmp-ckpt-N-<pid> beside a ckpt-N (saved again
    since, while the set-aside one could not be renamed back): ckpt-N is the checkpoint of the
    step, the pair is a leftover, deleted by the next prune. Mutation audit (h29ab): the pair
    taken for an interrupted re-save whatever ckpt-N (restore failing on the full directory,
    prune keeping the pair for ever) passed every test."""
    import shutil
    _save(tmp_path, 2)
    dead = _finished_pid()
    shutil.copytree(tmp_path / "ckpt-00000002", tmp_path / f".old-ckpt-00000002-{dead}")
    (tmp_path / f".tmp-ckpt-00000002-{dead}").mkdir()
    _save(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000002", "ckpt-00000003"]


def test_a_re_save_over_a_set_aside_copy_an_earlier_pid_1_left_succeeds(tmp_path, monkeypatch):
    """A container's trainer (pid 1, the Dockerfile's ENTRYPOINT) killed after its re-save of
    step N renamed the new ckpt-N in, before deleting the set-aside .old-ckpt-N-1: the next
    container's trainer, pid 1 too, re-saving step N (resumed from an earlier checkpoint, its
    first save) set ckpt-N aside onto that name: the rename onto a non-empty directory failed
    (ENOTEMPTY) and the save with it ("could not write checkpoint (Directory not empty)", the
    h29ab audit). The stale copy, superseded, is removed first: the save succeeds."""
    import os
    import shutil
    monkeypatch.setattr(os, "getpid", lambda: 1)
    specs, p2, _, _ = _arrays(seed=2)
    _save(tmp_path, 1, seed=1)
    shutil.copytree(tmp_path / "ckpt-00000001", tmp_path / ".old-ckpt-00000001-1")
    path = _save(tmp_path, 1, seed=2)
    _, params, _, _ = ckpt.load_checkpoint(path, specs)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p2["transformer.wte.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001"]


@pytest.mark.parametrize("failing", ["disk full", "ctrl-c removing it"])
def test_a_failed_save_never_puts_back_a_superseded_copy_an_earlier_pid_1_left(tmp_path,
                                                                            monkeypatch,
                                                                            failing):
    """A superseded .old-ckpt-N-1 (its replacement renamed in, then ckpt-N discarded: pruned,
    or --overwrite) named by the saving process's pid: a save of step N that fails took it for
    the checkpoint it had set aside and put it back as ckpt-N, a checkpoint of an earlier run
    (or one already replaced) where there was none (the h29ab audit). It is removed before
    the save, outside what a failure undoes: a Ctrl-C while it is deleted puts back no
    half-deleted copy either. The save leaves what it had there: nothing."""
    import errno
    import os
    import shutil
    monkeypatch.setattr(os, "getpid", lambda: 1)
    _save(tmp_path, 1)
    step_5 = _save(tmp_path, 5)
    shutil.copytree(step_5, tmp_path / ".old-ckpt-00000005-1")
    ckpt.discard_checkpoint(step_5)
    if failing == "disk full":
        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(safetensors_io, "save_file", disk_full)
        with pytest.raises(CheckpointError, match="No space left on device"):
            _save(tmp_path, 5)
    else:
        rmtree = shutil.rmtree

        def interrupted_midway(path, *args, **kwargs):
            if Path(path).name.startswith(".old-"):
                (Path(path) / "state.json").unlink()
                raise KeyboardInterrupt
            return rmtree(path, *args, **kwargs)
        monkeypatch.setattr(shutil, "rmtree", interrupted_midway)
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, 5)
    monkeypatch.undo()
    assert not (tmp_path / "ckpt-00000005").exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000001"]


def test_a_failed_save_puts_back_the_checkpoint_an_earlier_pid_1_left_to_restore(tmp_path,
                                                                                monkeypatch):
    """An earlier pid 1's re-save of step N killed between its renames (.old-ckpt-N-1 beside
    its .tmp- twin, no ckpt-N), not yet listed: a save of step N by this pid 1 that fails
    leaves that checkpoint as ckpt-N, as it was; it is no superseded copy to remove first."""
    import errno
    import os
    import shutil
    specs, p1, _, _ = _arrays(seed=1)
    monkeypatch.setattr(os, "getpid", lambda: 1)
    _save(tmp_path, 2, seed=1)
    (tmp_path / "ckpt-00000002").rename(tmp_path / ".old-ckpt-00000002-1")
    shutil.copytree(tmp_path / ".old-ckpt-00000002-1", tmp_path / ".tmp-ckpt-00000002-1")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors_io, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        _save(tmp_path, 2, seed=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000002"]
    _, params, _, _ = ckpt.load_checkpoint(tmp_path / "ckpt-00000002", specs)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p1["transformer.wte.weight"])


def _a_superseded_copy_that_cannot_be_removed(monkeypatch, run: Path, step: int):
    """As pid 1: a copy of ckpt-<step> as .old-ckpt-<step>-1, superseded (no .tmp- twin), as an
    earlier pid 1 left it, which shutil.rmtree cannot remove (files of another user, an I/O
    error): with ignore_errors it stays there, without it the error is raised."""
    import errno
    import os
    import shutil
    name = f".old-{ckpt.checkpoint_name(step)}-1"
    shutil.copytree(run / ckpt.checkpoint_name(step), run / name)
    monkeypatch.setattr(os, "getpid", lambda: 1)
    rmtree = shutil.rmtree

    def cannot_remove_it(path, ignore_errors=False, *args, **kwargs):
        if Path(path).name == name:
            if ignore_errors:
                return
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return rmtree(path, ignore_errors, *args, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", cannot_remove_it)


@pytest.mark.parametrize("save", ["succeeds", "fails"])
def test_a_superseded_copy_that_cannot_be_removed_is_never_put_back(tmp_path, monkeypatch,
                                                                     save):
    """The removal of a superseded .old-ckpt-N-<own pid> is best effort: where it fails, a save
    of step N still succeeds, and one that fails leaves no ckpt-N, as it found none: a failed
    save puts back only the checkpoint it set aside itself or one an interrupted re-save left
    to restore. Mutation audit (h29ad): the removal raising its error passed every test, and a
    failed save put that copy back as ckpt-N (a checkpoint already replaced once)."""
    import errno
    specs, p2, _, _ = _arrays(seed=2)
    _save(tmp_path, 1)
    step_5 = _save(tmp_path, 5)
    _a_superseded_copy_that_cannot_be_removed(monkeypatch, tmp_path, 5)
    ckpt.discard_checkpoint(step_5)
    if save == "succeeds":
        path = _save(tmp_path, 5, seed=2)
        monkeypatch.undo()
        _, params, _, _ = ckpt.load_checkpoint(path, specs)
        np.testing.assert_array_equal(params["transformer.wte.weight"],
                                      p2["transformer.wte.weight"])
        return

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors_io, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=r"No space left on device\); previous "
                                              r"checkpoints are intact$"):
        _save(tmp_path, 5, seed=2)
    monkeypatch.undo()
    assert not (tmp_path / "ckpt-00000005").exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000001"]


def test_a_re_save_a_copy_that_cannot_be_removed_stops_leaves_the_checkpoint_in_place(
        tmp_path, monkeypatch):
    """A re-save of step N whose set-aside name holds a superseded copy it cannot remove: the
    rename of ckpt-N onto it fails (Directory not empty), so ckpt-N never moved: the error says
    the previous checkpoints are intact and the new copy is removed, not kept as the mark of a
    set-aside checkpoint (there is none). Mutation audit (h29ad): the new copy kept whenever
    .old-ckpt-N-<pid> exists, ckpt-N there or not, passed every test."""
    specs, p1, _, _ = _arrays(seed=1)
    _save(tmp_path, 1, seed=1)
    _a_superseded_copy_that_cannot_be_removed(monkeypatch, tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"ckpt-00000001: could not write checkpoint "
                                              r"\(.*\); previous checkpoints are intact$"):
        _save(tmp_path, 1, seed=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".old-ckpt-00000001-1",
                                                          "ckpt-00000001"]
    _, params, _, _ = ckpt.load_checkpoint(tmp_path / "ckpt-00000001", specs)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p1["transformer.wte.weight"])


def test_a_running_writer_s_set_aside_checkpoint_is_left_to_it(tmp_path):
    """An .old-ckpt-N-<pid> beside its .tmp- twin, with no ckpt-N, whose writer still runs is
    a re-save between its two renames now: not renamed back under it, nor deleted."""
    import subprocess
    import sys
    _save(tmp_path, 2)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "ckpt-00000002").rename(tmp_path / f".old-ckpt-00000002-{live.pid}")
        (tmp_path / f".tmp-ckpt-00000002-{live.pid}").mkdir()
        assert ckpt.list_checkpoints(tmp_path) == []
        _save(tmp_path, 3)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            f".old-ckpt-00000002-{live.pid}", f".tmp-ckpt-00000002-{live.pid}", "ckpt-00000003"]
    finally:
        live.kill()
        live.wait()


def test_removing_a_leftover_that_is_a_fifo_returns(tmp_path):
    """_remove_tree of a FIFO (a set-aside name a FIFO once took): rmtree opens what it
    removes, and its open of a FIFO waits for a writer for good (mutation audit h42i: rmtree
    for anything not a link passed every test). It returns, the FIFO left."""
    import threading
    fifo = tmp_path / ".old-ckpt-00000002-1"
    os.mkfifo(fifo)
    remover = threading.Thread(target=ckpt._remove_tree, args=(fifo,), daemon=True)
    remover.start()
    remover.join(timeout=10)
    blocked = remover.is_alive()
    if blocked:  # let it go: a writer's open ends the reader's wait
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not blocked and fifo.is_fifo()


def test_moving_aside_takes_a_name_no_entry_has_a_dangling_link_included(tmp_path):
    """_move_aside's name is one no entry holds: a dangling link named ckpt-N.moved-aside is
    an entry (mutation audit h42i: exists(), which a dangling link fails, passed every test,
    and the rename replaced that link)."""
    stray = tmp_path / "ckpt-00000002"
    stray.write_text("x")
    taken = tmp_path / "ckpt-00000002.moved-aside"
    taken.symlink_to(tmp_path / "nowhere")
    moved = ckpt._move_aside(stray)
    assert moved == tmp_path / "ckpt-00000002.moved-aside-2" and moved.read_text() == "x"
    assert taken.is_symlink() and not stray.exists()


@pytest.mark.parametrize("keep", [3, None])
def test_a_re_save_without_pruning_leaves_no_set_aside_copy(tmp_path, keep):
    """A re-save of a step removes the checkpoint it replaced whether or not it prunes
    (keep=None: the trainer's non-finite stop saves so). Mutation audit: a save that left its
    set-aside .old-ckpt-N-<pid> passed every test, the prune after it removing the copy."""
    specs, p2, _, _ = _arrays(seed=2)
    _save(tmp_path, 1, seed=1, keep=keep)
    path = _save(tmp_path, 1, seed=2, keep=keep)
    _, params, _, _ = ckpt.load_checkpoint(path, specs)
    np.testing.assert_array_equal(params["transformer.wte.weight"], p2["transformer.wte.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001"]


def test_listings_take_only_directories_named_like_a_checkpoint(tmp_path):
    """A file or link named ckpt-N is no checkpoint: list_checkpoints and prune pass over it
    (mutation audit: listing every entry so named passed every test; prune then renamed a
    newer such file to .trash-ckpt-* and left it there)."""
    _save(tmp_path, 1)
    (tmp_path / "ckpt-00000009").write_text("not a checkpoint")
    (tmp_path / "ckpt-00000008").symlink_to(tmp_path / "nowhere")
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / "ckpt-00000001"]
    ckpt.prune_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000001", "ckpt-00000008", "ckpt-00000009"]


@pytest.mark.parametrize("version,shown", [(2, "2"), (None, "None"), ("1", "'1'"), (True, "True")])
def test_a_manifest_of_another_version_is_refused_naming_it(tmp_path, version, shown):
    """Only version 1 is read (mutation audit: accepting another, or none, passed every test):
    a later format's checkpoint would be read as this one's."""
    path = _save(tmp_path, 1)
    state = json.loads((path / "state.json").read_text())
    if version is None:
        del state["version"]
    else:
        state["version"] = version
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"state\.json: unsupported version {shown}$"):
        ckpt.verify_checkpoint(path)


@pytest.mark.parametrize("entry", [{}, {"bytes": "12"}, {"bytes": 12.0}, {"bytes": None}])
def test_a_manifest_file_entry_without_an_integer_size_is_refused_naming_it(tmp_path, entry):
    """A file's entry needs its size as an integer, whatever its hash (mutation audit: without
    the size's check every test passed, the hostile-manifest test's entry having a bad hash
    too; an entry lacking "bytes" was then a KeyError traceback from verify_checkpoint)."""
    path = _save(tmp_path, 1)
    state = json.loads((path / "state.json").read_text())
    info = state["files"]["model.safetensors"]
    state["files"]["model.safetensors"] = {"sha256": info["sha256"], **entry}
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"state\.json: bad entry for model\.safetensors$"):
        ckpt.verify_checkpoint(path)


@pytest.mark.parametrize("eot_id,ok", [(0, True), (None, True), (-1, False), (True, False)])
def test_a_recorded_end_of_text_id_may_be_0(tmp_path, eot_id, ok):
    """data.tokenizer.eot_id is a token id, 0 included (a tokenizer whose end-of-text is its
    first token), or null (none); mutation audit: refusing 0 passed every test."""
    _check_recorded_tokenizer(tmp_path, {"tokenizer": "file", "vocab_size": 300,
                                         "eot_id": eot_id},
                              ok, r"eot_id \(an integer >= 0 or null\)")


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), -float("inf")])
def test_a_best_val_loss_that_is_not_finite_is_refused(tmp_path, loss):
    """best_val_loss NaN or Infinity (JSON written before 2026-12-02 may hold them) is no best
    evaluation: refused naming the field (mutation audit: accepting them passed every test;
    a NaN best is never beaten by a later evaluation)."""
    specs, p, m, v = _arrays()
    path = ckpt.save_checkpoint(tmp_path, 3, p, m, v, {"model_config": CFG.to_dict(),
                                                      "best_val_step": 2})
    state = json.loads((path / "state.json").read_text())
    state["best_val_loss"] = loss
    (path / "state.json").write_text(json.dumps(state))  # json.dumps writes NaN, Infinity
    with pytest.raises(CheckpointError, match=r"best_val_loss must be a finite number or null"):
        ckpt.verify_checkpoint(path)


def test_a_manifest_with_an_empty_data_directory_records_none():
    """data.dir "" names no directory: recorded_data_dir is None, as when absent, so that
    sample, eval and export ask for --data (mutation audit: returning "" passed every test;
    export then read the tokenizer of the working directory, Path(""))."""
    assert ckpt.recorded_data_dir({"data": {"dir": ""}}) is None
    assert ckpt.recorded_data_dir({"data": {}}) is None
    assert ckpt.recorded_data_dir({}) is None
    assert ckpt.recorded_data_dir({"data": {"dir": "toks"}}) == "toks"


def test_a_negative_second_moment_of_any_parameter_is_refused(tmp_path):
    """Every parameter's exp_avg_sq is checked, not the first one's only (mutation audit:
    checking transformer.wte.weight alone passed every test, each damaging that tensor)."""
    specs, p, m, v = _arrays()
    last = specs[-1].name
    assert last != "transformer.wte.weight"
    v[last].flat[-1] = -1e-30
    path = ckpt.save_checkpoint(tmp_path, 1, p, m, v, {"model_config": CFG.to_dict()})
    with pytest.raises(CheckpointError, match=rf"optimizer\.safetensors: {last}\.exp_avg_sq "
                                              rf"holds negative values"):
        ckpt.load_checkpoint(path, specs)
