"""Property-based tests (hypothesis): parsers either accept or raise their one clean error type,
never anything else, on arbitrary input."""
import json
import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cllm_gpu import checkpoint as ckpt
from cllm_gpu import safetensors_io
from cllm_gpu.config import ModelConfig, TrainConfig
from cllm_gpu.data import validate_meta
from cllm_gpu.errors import CheckpointError, ConfigError, DataError

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.dictionaries(st.sampled_from(["vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                                        "bogus"]), json_scalars, max_size=6))
def test_model_config_from_dict(d):
    try:
        cfg = ModelConfig.from_dict(d)
    except ConfigError:
        return
    assert cfg.n_embd % cfg.n_head == 0 and min(cfg.vocab_size, cfg.block_size, cfg.n_layer) >= 1


@FAST
@given(st.dictionaries(st.sampled_from(list(TrainConfig.__dataclass_fields__) + ["x"]),
                       json_scalars, max_size=6))
def test_train_config_from_dict(d):
    try:
        tc = TrainConfig.from_dict(d)
    except ConfigError:
        return
    assert 0 < tc.learning_rate and tc.min_lr <= tc.learning_rate and tc.batch_size >= 1


@FAST
@given(json_values)
def test_data_meta(meta):
    try:
        out = validate_meta(meta)
    except DataError:
        return
    assert out["dtype"] in ("uint16", "uint32") and out["vocab_size"] >= 1


VALID_MANIFEST = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 3,
                  "files": {f: {"bytes": 1, "sha256": "0" * 64} for f in ckpt.FILES},
                  "model_config": {"vocab_size": 10, "block_size": 8, "n_layer": 1, "n_head": 1,
                                   "n_embd": 4}}
MANIFEST_FIELDS = ["format", "version", "step", "files", "model_config", "train_config", "dtype",
                   "data", "rng", "tokens_seen", "nonfinite_skips", "global_batch", "world_size",
                   "best_val_loss", "best_val_step", "init_from", "x"]


@FAST
@given(st.dictionaries(st.sampled_from(MANIFEST_FIELDS), json_values, max_size=3),
       st.sampled_from((None,) + ckpt.FILES), json_values, st.booleans())
# a JSON bool is a Python int: a step check without its bool test accepted `true` as step 1,
# which 150 random examples did not draw
@example(fields={"step": True}, file_name=None, file_entry=None, realistic=True)
@example(fields={"step": False}, file_name=None, file_entry=None, realistic=True)
def test_checkpoint_manifest(tmp_path_factory, fields, file_name, file_entry, realistic):
    """Arbitrary JSON in a manifest's fields, over a valid manifest (realistic) or alone:
    read_manifest raises CheckpointError or returns a manifest its readers can use. Random
    dictionaries alone never got past "files" (model_config is required and never drawn), and
    nothing was asserted on what was accepted: a files entry that is not a JSON object read with
    .get() (AttributeError) passed this test."""
    d = json.loads(json.dumps(VALID_MANIFEST)) if realistic else {}
    d.update(fields)
    if realistic and file_name is not None and isinstance(d.get("files"), dict):
        d["files"][file_name] = file_entry
    p = tmp_path_factory.mktemp("m")
    (p / "state.json").write_text(json.dumps(d))
    try:
        state = ckpt.read_manifest(p)
    except CheckpointError:
        assert not (realistic and not fields and file_name is None), "a valid manifest refused"
        return
    assert state["format"] == ckpt.FORMAT and state["version"] == ckpt.VERSION
    assert type(state["step"]) is int and state["step"] >= 0
    assert set(state["files"]) == set(ckpt.FILES)
    for info in state["files"].values():
        assert type(info["bytes"]) is int and isinstance(info["sha256"], str)
    ModelConfig.from_dict(state["model_config"])
    assert state.get("dtype", "float32") in ("float32", "float64")


@FAST
@given(json_values, st.binary(max_size=64), st.integers(0, 2**64 - 1) | st.none())
def test_safetensors_header(tmp_path_factory, header, data, n):
    hb = json.dumps(header).encode()
    p = tmp_path_factory.mktemp("s") / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)
    try:
        tensors, _ = safetensors_io.load_file(p)
    except CheckpointError:
        return
    assert sum(t.nbytes for t in tensors.values()) == len(data)


@FAST
@given(st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]), json_values,
                       max_size=3), st.binary(max_size=16))
def test_safetensors_entry_fields(tmp_path_factory, fields, data):
    """One well-formed tensor entry with arbitrary JSON in its fields (random headers rarely
    reach the per-field checks: a list dtype once raised TypeError there)."""
    entry = {"dtype": "F32", "shape": [len(data) // 4], "data_offsets": [0, len(data) // 4 * 4]}
    entry.update(fields)
    hb = json.dumps({"t": entry}).encode()
    p = tmp_path_factory.mktemp("e") / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    try:
        tensors, _ = safetensors_io.load_file(p)
    except CheckpointError:
        return
    assert sum(t.nbytes for t in tensors.values()) == len(data)
