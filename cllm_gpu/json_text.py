"""One parser for every JSON file cllm-gpu reads (meta.json, .jsonl lines, state.json,
config.json, tokenizer.json, vocab.json, a safetensors header, a shard index, a failure
note's run line): whatever json.loads refuses is one line naming the file, one wording per
cause, in the error class the reader raises."""
import json
import sys


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
