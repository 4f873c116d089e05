"""One parser for every JSON file cllm-gpu reads (meta.json, .jsonl lines, state.json,
config.json, tokenizer.json, vocab.json, a safetensors header, a shard index, a failure
note's run line): whatever json.loads refuses is one line naming the file, one wording per
cause, in the error class the reader raises. It still takes the NaN and Infinity that files
written before writes went through to_json (2026-12-02) may hold.

One writer, to_json, for every JSON text cllm-gpu writes (metrics.jsonl, state.json, meta.json,
eval's line, the kernels summary, safetensors headers, the scripts' records): strict JSON,
which jq and other strict parsers read; a NaN or infinite float (a diverged loss, a
perplexity past float range) is written as null. Standard library only (the GPU session's
report script imports it)."""
import json
import math
import sys


def finite_or_null(value):
    """value with every NaN or infinite float in it (through dicts, lists and tuples) made
    None, JSON's null: JSON has no number for them (json.dumps writes NaN, Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def to_json(value, **dumps_args) -> str:
    """json.dumps(value, **dumps_args) as strict JSON: non-finite floats as null
    (finite_or_null), and allow_nan=False so that none can slip through another way."""
    return json.dumps(finite_or_null(value), allow_nan=False, **dumps_args)


class DuplicateKeyError(ValueError):
    """unique_keys' error: a ValueError, as json's own errors are, and told apart from the
    other ValueErrors of json.loads (an integer of more than 4300 digits)."""


def unique_keys(pairs):
    """json.loads' object_pairs_hook: a key given twice is refused (json keeps the last one
    silently)."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise DuplicateKeyError(k)
        d[k] = v
    return d


def parse_json(text, where, error, *, no_duplicate_keys: bool = False):
    """The value of JSON `text` (str, or bytes read as UTF-8 only: json.loads would also take
    UTF-16 and UTF-32 bytes); anything json.loads refuses raises `error(f"{where}: ...")`:
    not UTF-8, not valid JSON (where), nested too deep, an integer too long for Python, and
    with `no_duplicate_keys` a key given twice in one object."""
    try:
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=unique_keys if no_duplicate_keys else None)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not valid JSON (not UTF-8: byte 0x{e.object[e.start]:02x} at "
                    f"offset {e.start})") from None
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if "\n" in text.rstrip("\r\n") \
            else f"column {e.colno}"
        raise error(f"{where}: not valid JSON ({e.msg} at {at})") from None
    except DuplicateKeyError as e:
        raise error(f"{where}: duplicate key {e.args[0]!r}") from None
    except ValueError:  # json's only other ValueError: Python's int-string limit
        raise error(f"{where}: JSON integer too long to read (more than "
                    f"{sys.get_int_max_str_digits()} digits)") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deep to read") from None
