"""Every JSON file cllm-gpu reads goes through json_text.parse_json: for each way json.loads
refuses a text, every reader says the same words after the file's name, in the error class
that reader raises. Before 2026-12-02 (h27n) the same cause read five ways: a .jsonl line
"JSON nested too deep to read", meta.json and config.json "not valid JSON (maximum recursion
depth exceeded ...)", state.json "not valid JSON (RecursionError)", the safetensors header
"header is not valid JSON (RecursionError)", tokenizer.json "not a Hugging Face tokenizer.json
(RecursionError: ...)"."""
import re
import struct

import pytest

from cllm_gpu import checkpoint, cli, data, hf, plot, safetensors_io
from cllm_gpu.errors import CheckpointError, ConfigError, DataError
from cllm_gpu.json_text import parse_json
from clihelp import strict_json_loads

# (bad JSON file content, the words every reader puts after the file's name)
CAUSES = {
    "syntax": (b'{"a": 1,}', "not valid JSON (Expecting property name enclosed in double quotes "
                             "at column 9)"),
    "syntax-line-2": (b'{"a": 1,\n}', "not valid JSON (Expecting property name enclosed in "
                                      "double quotes at line 2 column 1)"),
    "not-utf8": (b'{"a": "\xff"}', "not valid JSON (not UTF-8: byte 0xff at offset 7)"),
    "deep": (b"[" * 100_000, "JSON nested too deep to read"),
    "huge-int": (b'{"n": ' + b"9" * 5000 + b"}", "JSON integer too long to read "
                                                 "(more than 4300 digits)"),
}


def _safetensors_header(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(content)) + content)
    return (lambda: safetensors_io.read_header(path)), f"{path}: header"


def _in_file(name, read, pass_dir=True):
    def setup(tmp_path, content):
        path = tmp_path / name
        path.write_bytes(content)
        return (lambda: read(tmp_path if pass_dir else path)), str(path)
    return setup


def _jsonl_line(tmp_path, content):
    path = tmp_path / "c.jsonl"
    lines = ['{"text": "ok"}', content.decode("utf-8")]
    return (lambda: list(data.iter_jsonl(path, lines))), f"{path}:2"


def _metrics_line(tmp_path, content):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"type": "start", "step": 0}\n' + content + b"\n")
    return (lambda: plot.read_metrics(tmp_path)), f"{tmp_path / 'metrics.jsonl'}:2"


READERS = {  # reader: (set-up returning (call, where), error class, reads bytes)
    "meta.json": (_in_file("meta.json", data.read_meta), DataError, True),
    "jsonl": (_jsonl_line, DataError, False),
    "metrics.jsonl": (_metrics_line, DataError, False),
    "vocab.json": (_in_file("vocab.json", data.read_token_ids, pass_dir=False), DataError, True),
    "config.json": (_in_file("config.json", hf.gpt2_model_config), ConfigError, True),
    "tokenizer.json": (_in_file("tokenizer.json", hf._directory_token_ids), ConfigError, True),
    "state.json": (_in_file("state.json", checkpoint.read_manifest), CheckpointError, True),
    "shard index": (_in_file("model.safetensors.index.json", hf._shard_names, pass_dir=False),
                    CheckpointError, True),
    "safetensors header": (_safetensors_header, CheckpointError, True),
}


@pytest.mark.parametrize("cause", CAUSES)
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_says_one_wording_per_cause(tmp_path, reader, cause):
    setup, error, reads_bytes = READERS[reader]
    content, words = CAUSES[cause]
    if cause == "not-utf8" and not reads_bytes:
        pytest.skip("its lines reach the reader decoded (read_documents replaces bytes that "
                    "are not UTF-8; plot refuses the whole file)")
    if cause == "syntax-line-2" and not reads_bytes:
        pytest.skip("a line of a .jsonl file holds no line end")
    call, where = setup(tmp_path, content)
    with pytest.raises(error) as e:
        call()
    assert str(e.value) == f"{where}: {words}"


def test_a_key_given_twice_is_refused_where_asked():
    with pytest.raises(CheckpointError, match=r"^x\.json: duplicate key 'a'$"):
        parse_json('{"a": 1, "b": {"a": 2}, "a": 3}', "x.json", CheckpointError,
                   no_duplicate_keys=True)
    assert parse_json('{"a": 1, "a": 3}', "x.json", CheckpointError) == {"a": 3}
    assert parse_json('{"a": 1, "b": {"a": 2}}', "x.json", CheckpointError,
                      no_duplicate_keys=True) == {"a": 1, "b": {"a": 2}}
    # given twice with the same value is still given twice (a hand edit's paste, or a writer
    # that is not json.dumps): refused, not read as once
    with pytest.raises(CheckpointError, match=r"^x\.json: duplicate key 'a'$"):
        parse_json('{"a": 1, "a": 1}', "x.json", CheckpointError, no_duplicate_keys=True)


def test_bytes_are_read_as_utf8_only():
    """json.loads itself would read UTF-16 and UTF-32 bytes: the readers took UTF-8 only
    (read_text, or bytes decoded as UTF-8) and still do."""
    assert parse_json('{"é": 1}'.encode("utf-8"), "x.json", DataError) == {"é": 1}
    with pytest.raises(DataError, match=re.escape("x.json: not valid JSON (not UTF-8: byte 0xff "
                                                  "at offset 0)")):
        parse_json('{"a": 1}'.encode("utf-16"), "x.json", DataError)


@pytest.mark.parametrize("cause", CAUSES)
def test_a_notes_run_line_that_is_not_json_names_no_run(tmp_path, cause):
    content = CAUSES[cause][0]
    if b"\n" in content:
        pytest.skip("the note is read line by line")
    note = tmp_path / "default.prepare-error"
    note.write_bytes(b"the error\nrun: " + content + b"\n")
    assert cli._note_run(note) is None


def test_to_json_writes_strict_json_with_non_finite_numbers_as_null():
    """Every JSON cllm-gpu writes goes through to_json: NaN and +-inf anywhere in the value
    (dicts, lists, tuples; NumPy's float64 is a float) become null, which strict parsers read
    (json.dumps wrote NaN, Infinity); finite numbers and the rest are json.dumps' own. What
    older files hold (NaN) still reads."""
    import json
    import math
    import numpy as np
    from cllm_gpu.json_text import to_json
    value = {"loss": float("nan"), "ppl": float("inf"), "deep": [1.5, (-math.inf, np.float64("nan"))],
             "n": 3, "s": "NaN", "ok": True, "none": None}
    text = to_json(value, sort_keys=True)
    assert strict_json_loads(text) == {
        "loss": None, "ppl": None, "deep": [1.5, [None, None]], "n": 3, "s": "NaN", "ok": True,
        "none": None}
    assert to_json({"a": 0.1}, indent=2) == json.dumps({"a": 0.1}, indent=2)
    assert math.isnan(parse_json('{"loss": NaN}', "old.json", ValueError)["loss"])


def test_to_json_refuses_a_non_finite_float_that_finite_or_null_never_saw():
    """allow_nan=False is to_json's second guard: a float that reaches json.dumps past
    finite_or_null (what a `default` hook returns for an object JSON has no form for; a NaN
    dict key) is refused, not written as NaN. A mutation audit left allow_nan=True unseen."""
    from cllm_gpu.json_text import to_json

    class Reading:
        pass
    with pytest.raises(ValueError, match="JSON compliant"):
        to_json({"r": Reading()}, default=lambda o: float("nan"))
    with pytest.raises(ValueError, match="JSON compliant"):
        to_json({float("inf"): 1})
    assert to_json({"r": Reading()}, default=lambda o: 2.5) == '{"r": 2.5}'
