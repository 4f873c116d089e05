"""Hugging Face GPT-2 directories: export a run for `transformers.GPT2LMHeadModel`, and read
one (config.json + model.safetensors or its shards, e.g. the GPT-2 weights a user has on disk)
to start training from.

Parameter names and layouts are GPT-2's already (docs/design.md), so both directions only
check, unpad or pad the vocabulary, and translate the configuration. Nothing is fetched: a
directory is read from disk or refused with one line saying what does not fit. Weights are
read from safetensors only (a pickle file can execute code when loaded).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import safetensors_io
from .config import ModelConfig
from .data import (EOT_TEXT, ByteTokenizer, check_run_tokenizer, directory_lock,
                   directory_made_for, json_bytes, load_tokenizer, read_meta, read_token_ids,
                   read_tokenizer_file, write_files)
from .errors import CheckpointError, ConfigError, DataError, refuse_a_file_for_a_directory
from .json_text import parse_json
from .model import param_layout

VOCAB_PAD_MULTIPLE = 64   # GPT-2's 50,257 -> 50,304 (llm.c): whole tiles for the classifier
# transformers' names for the tanh-approximated GELU (one formula, rounding apart)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast", "gelu_accurate")
# GPT-2 files carry each block's causal mask as a buffer (h.{i}.attn.bias, .masked_bias)
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def pad_vocab(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return -(-vocab_size // multiple) * multiple


# ------------------------------------------------------------------ export
def hf_incompatibility(cfg) -> str | None:
    """Why a model (a ModelConfig, or its dict as in state.json) has no GPT-2 equivalent, or
    None. Keys off the model options GPT-2 lacks (docs/design.md), by name: an attention
    bias, no learned position embeddings."""
    option = cfg.get if isinstance(cfg, dict) else (lambda name, d: getattr(cfg, name, d))
    attn_bias = option("attn_bias", "none")
    if attn_bias != "none":
        return f"attn_bias={attn_bias!r} (GPT-2's attention has no bias)"
    pos_emb = option("pos_emb", "learned")
    if pos_emb != "learned":
        return f"pos_emb={pos_emb!r} (GPT-2 learns position embeddings)"
    return None


def gpt2_config(cfg: ModelConfig, eot_id: int | None = None) -> dict:
    """config.json for transformers' GPT2LMHeadModel computing what `cfg` computes."""
    p = float(getattr(cfg, "dropout", 0.0))
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": ModelConfig.ln_eps,
        "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
        "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
        "bos_token_id": eot_id, "eos_token_id": eot_id,
    }


def generation_config(eot_id: int | None) -> dict:
    """generation_config.json: generate() stops at end-of-text. Written rather than left to
    transformers to derive from config.json, so that an older one in the directory (a GPT-2's:
    eos 50256) cannot outlive the export."""
    return {"bos_token_id": eot_id, "eos_token_id": eot_id}


# every file an export may write (the tokenizer's: only with a data directory): whichever it
# writes, a killed export's temporaries of any of them are removed
EXPORT_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "model.safetensors")


def export_hf(run, out_dir, data_dir=None) -> list[str]:
    """Write out_dir/config.json, generation_config.json and model.safetensors (float32, the
    vocabulary unpadded) for the newest verified checkpoint of `run` (a run or checkpoint
    directory), and the run's tokenizer when its data has one. Everything is read and checked
    before anything is written, and every file goes to a temporary name first: an export that
    fails leaves the directory as it was. Returns notes for the user (what was written or
    left)."""
    ck_dir, state, skipped = ckpt.find_resumable(Path(run))
    # find_resumable's notes are warnings (a newer checkpoint skipped, one read in place), as
    # sample and train print them; the rest of the notes say what was written
    notes = [f"warning: {n}" for n in skipped]
    why = hf_incompatibility(state["model_config"])
    if why:
        raise ConfigError(f"{ck_dir}: no Hugging Face GPT-2 equivalent: the model has {why}")
    cfg = ModelConfig.from_dict(state["model_config"])
    out = Path(out_dir)
    refuse_a_file_for_a_directory(out, "--hf")
    if (out / "state.json").exists():
        raise ConfigError(f"{out}: holds a checkpoint (state.json): the export would replace its "
                          f"model.safetensors; give --hf a directory of its own")
    _check_stored_size(ck_dir, cfg)
    specs, _ = param_layout(cfg)
    params = ckpt.load_model_params(ck_dir, specs, state)
    tensors = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in params.items()}
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:cfg.vocab_size]
    data = data_dir or ckpt.recorded_data_dir(state)
    if data is None:
        notes.append("no tokenizer exported: the checkpoint records no data directory "
                     "(give --data)")
        meta, tokenizer = None, {}
    else:
        meta, tokenizer = _data_tokenizer(Path(data), data_dir is not None, state, ck_dir, cfg,
                                          notes)
    eot_id = meta.get("eot_id") if meta else None
    files = {"config.json": json_bytes(gpt2_config(cfg, eot_id)),
             "generation_config.json": json_bytes(generation_config(eot_id)), **tokenizer}
    if "tokenizer.json" not in files and (out / "tokenizer.json").exists():
        notes.append(f"{out / 'tokenizer.json'} left as it was: it is not from this run's data "
                     f"(check that it is the same tokenizer)")
    files["model.safetensors"] = lambda p: safetensors_io.save_file(
        tensors, p, metadata={"format": "pt", "producer": "cllm-gpu", "step": str(state["step"])})
    # an export that failed leaves no empty directory behind
    with directory_made_for(out, "the export directory", ConfigError):
        write_files(out, files, error=ConfigError, may_write=EXPORT_FILES)
    notes.insert(0, f"exported {ck_dir} (step {state['step']}) to {out}")
    return notes


def _check_stored_size(ck_dir: Path, cfg: ModelConfig):
    """The parameter count model_config implies is the one model.safetensors holds (its header
    only is read): an edited config is refused here, before a layout is built for it (a
    model_config with 10^12 layers made export lay out tensors for ever)."""
    path = ck_dir / "model.safetensors"
    header, _, _ = safetensors_io.read_header(path)
    held = sum(math.prod(e["shape"]) for e in header.values())
    if held != cfg.num_params():
        raise CheckpointError(f"{path}: holds {held:,} parameters; the model_config in "
                              f"state.json implies {cfg.num_params():,}")


def _data_tokenizer(data: Path, given: bool, state: dict, ck_dir: Path, cfg,
                    notes: list) -> tuple[dict | None, dict]:
    """(the data's meta.json, {file name: bytes} of its tokenizer for transformers), both
    checked against the run; (None, {}) with a note where the run's recorded data is gone.
    Read under the data directory's lock, shared, as train reads the token files: meta.json
    and tokenizer.json of one writer (a prepare renaming its files in meanwhile waits; before,
    one landing between the two reads had the export refused)."""
    with directory_lock(data, shared=True):
        meta = _data_meta(data, notes, given)
        if meta is None:
            return None, {}
        # the weights' tokenizer, not another one
        note = check_run_tokenizer(ckpt.recorded_tokenizer(state), data, meta, ck_dir)
        if note and given:
            notes.append(f"note: {note}")
        if meta["vocab_size"] > cfg.vocab_size:
            # training refuses such data (data.py); an export would pair the weights with a
            # tokenizer whose ids they have no rows for
            raise DataError(f"{data / 'meta.json'}: data vocab_size {meta['vocab_size']} "
                            f"exceeds the model's {cfg.vocab_size}: not the tokenizer this "
                            f"model was trained with (give --data the run's token directory)")
        return meta, _tokenizer_files(data, meta, cfg, notes)


def _data_meta(data: Path, notes: list, given: bool) -> dict | None:
    """The data's meta.json; None (and a note) when the run's recorded data is gone. A --data
    given on the command line must hold one: the user asked for its tokenizer. A meta.json
    there that is no file (a directory, FIFO, broken link) is damaged data: refused, as train
    and sample refuse it."""
    meta_path = data / "meta.json"
    if not meta_path.is_file() and not os.path.lexists(meta_path):
        if given:
            raise DataError(f"--data {data}: no meta.json there (a token directory from "
                            f"`cllm-gpu prepare`)")
        notes.append(f"no tokenizer exported: {meta_path} not found (give --data)")
        return None
    return read_meta(data)


def _tokenizer_files(data: Path, meta: dict, cfg, notes: list) -> dict:
    """{file name: bytes} of the data's tokenizer for transformers (none, with a note, when the
    byte tokenizer's cannot be built)."""
    eot = meta.get("eot_token", EOT_TEXT) if meta.get("eot_id") is not None else None
    if meta["tokenizer"] == "byte":
        tok_json = ByteTokenizer(meta.get("eot_id")).to_hf_json()
        if tok_json is None:
            notes.append("no tokenizer exported: the byte tokenizer's tokenizer.json needs the "
                         "`tokenizers` package")
            return {}
        tok_bytes = tok_json.encode("utf-8")
    else:
        # read once, and loaded as train and sample load it (checked against meta.json,
        # parsed, its vocabulary the data's): a tokenizer.json they refuse is not exported, and
        # the bytes exported are the bytes checked
        _, tok_bytes = read_tokenizer_file(data, meta)
        notes.extend(_post_processor_note(load_tokenizer(data, meta, tok_bytes)))
    special = {"bos_token": eot, "eos_token": eot} if eot is not None else {}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
               **special}
    notes.append(f"tokenizer: {meta['tokenizer']} (tokenizer.json, tokenizer_config.json, "
                 f"special_tokens_map.json, added_tokens.json)")
    # written, not left out, so that an older tokenizer's (a GPT-2 saved by transformers 4)
    # cannot outlive the export: transformers reads them over tokenizer_config.json and
    # tokenizer.json (their <|endoftext|> became eos, and pad, at an id past the model's rows)
    return {"tokenizer.json": tok_bytes, "tokenizer_config.json": json_bytes(tok_cfg),
            "special_tokens_map.json": json_bytes(special), "added_tokens.json": json_bytes({})}


def _post_processor_note(tok) -> list[str]:
    """A note when transformers, calling the exported tokenizer.json as it is, adds tokens the
    model was not trained with: its post-processor's (BERT's [CLS] ... [SEP]), which prepare
    left out of the documents."""
    added = tok.post_processor_tokens()
    if not added or tok.add_special_tokens:
        return []
    return [f"tokenizer: its post-processor adds {', '.join(added)} to each text in transformers "
            f"(tokenizer(text)); the model was trained without them: call it with "
            f"add_special_tokens=False"]


# ------------------------------------------------------------------ import
def gpt2_model_config(hf_dir, padded_vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face GPT-2 directory's config.json; refuses (ConfigError,
    one line) what cllm-gpu does not compute. The vocabulary is padded to a multiple of 64
    unless padded_vocab_size says otherwise."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (--init-from needs a Hugging Face GPT-2 directory: "
                          f"config.json + model.safetensors or its shards)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    c = parse_json(raw, path, ConfigError)
    if not isinstance(c, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if c.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"{path}: model_type {c['model_type']!r} is not GPT-2")
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
               if k not in c]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}")
    # JSON types first: a string or a list where a number belongs would otherwise fail deep
    # inside the checks below with a Python error instead of a line naming the key
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        v = c[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v != int(v):
            raise ConfigError(f"{path}: {key} must be an integer, got {v!r}")
        c[key] = int(v)
    eps = c.get("layer_norm_epsilon", ModelConfig.ln_eps)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ConfigError(f"{path}: layer_norm_epsilon must be a number, got {eps!r}")
    unsupported = [
        ("activation_function", c.get("activation_function", "gelu_new") in TANH_GELU,
         "cllm-gpu's GELU is the tanh approximation (gelu_new)"),
        ("layer_norm_epsilon", math.isclose(eps, ModelConfig.ln_eps, rel_tol=1e-9),
         f"cllm-gpu's LayerNorm epsilon is {ModelConfig.ln_eps}"),
        ("n_inner", c.get("n_inner") in (None, 4 * c["n_embd"]),
         "cllm-gpu's MLP is 4 * n_embd wide"),
        ("scale_attn_weights", c.get("scale_attn_weights", True) is True,
         "cllm-gpu scales attention scores by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", not c.get("scale_attn_by_inverse_layer_idx", False),
         "cllm-gpu does not scale attention by layer"),
        ("tie_word_embeddings", c.get("tie_word_embeddings", True) is True,
         "cllm-gpu ties the output projection to wte"),
        ("add_cross_attention", not c.get("add_cross_attention", False),
         "cllm-gpu has no cross-attention"),
    ]
    for key, ok, why in unsupported:
        if not ok:
            raise ConfigError(f"{path}: {key} = {c.get(key)!r} is not supported ({why})")
    V = c["vocab_size"]
    try:
        return ModelConfig(vocab_size=V, block_size=c["n_positions"], n_layer=c["n_layer"],
                           n_head=c["n_head"], n_embd=c["n_embd"],
                           padded_vocab_size=padded_vocab_size or pad_vocab(V))
    except ConfigError as e:  # its fields: --padded-vocab-size's refusal names the flag (cli)
        raise ConfigError(f"{path}: {e}", e.fields) from None


def _shard_names(index: Path) -> dict:
    """{tensor name: shard file name} of a model.safetensors.index.json (transformers'
    save_pretrained(max_shard_size=...)): every shard a plain file name in the index's
    directory (the index cannot send the reader elsewhere), every tensor listed once."""
    try:
        raw = index.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror or e})") from None
    doc = parse_json(raw, index, CheckpointError, no_duplicate_keys=True)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: expected an object with a \"weight_map\" of tensor "
                              f"name -> shard file")
    for name, shard in weight_map.items():
        if shard in ("", ".", "..") or Path(shard).name != shard:
            raise CheckpointError(f"{index}: {name} is in {shard!r}, not a file name in "
                                  f"{index.parent} (shards lie beside the index)")
    return weight_map


def read_gpt2_weights(hf_dir) -> tuple[dict, dict, Path]:
    """The tensors of a GPT-2 directory: ({name: array}, {name: the file holding it}, the
    file that names the set). model.safetensors, else the shards model.safetensors.index.json
    lists (model.safetensors first, as transformers reads them). The index and its shards must
    agree: each listed shard exists, each tensor is in the shard the index names and in no
    other; a disagreement (shards of two saves, one shard missing) is one line naming it."""
    d = Path(hf_dir)
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        tensors, _ = safetensors_io.load_file(single)
        return tensors, dict.fromkeys(tensors, single), single
    if not index.is_file():
        pickled = [p.name for p in (d / "pytorch_model.bin", d / "pytorch_model.bin.index.json")
                   if p.exists()]
        hint = (f"; found {pickled[0]}: pickle (.bin) files are not read (they can run code "
                f"when loaded), save the model as safetensors" if pickled else "")
        raise CheckpointError(f"{single}: not found, nor {index.name}{hint}")
    weight_map = _shard_names(index)
    listed: dict = {}
    for name, shard in weight_map.items():
        listed.setdefault(shard, []).append(name)
    holder = {}  # headers first: the whole set is checked before any tensor is read
    for shard in sorted(listed):
        path = d / shard
        if not path.is_file():
            raise CheckpointError(f"{path}: not found ({index.name} lists it for "
                                  f"{len(listed[shard])} tensor(s), e.g. {listed[shard][0]})")
        for name in safetensors_io.read_header(path)[0]:
            if name in holder:
                raise CheckpointError(f"{index}: {name} is in both {holder[name].name} and "
                                      f"{shard}")
            holder[name] = path
    for name, path in holder.items():
        if weight_map.get(name) != path.name:
            where = (f"the index lists it in {weight_map[name]}" if name in weight_map
                     else "the index does not list it")
            raise CheckpointError(f"{path}: holds {name}, but {where} (shards of another "
                                  f"save?)")
    for name, shard in weight_map.items():
        if name not in holder:
            raise CheckpointError(f"{index}: lists {name} in {shard}, which does not hold it")
    tensors = {}
    for shard in sorted(listed):
        tensors.update(safetensors_io.load_file(d / shard)[0])
    return tensors, holder, index


def load_gpt2_state_dict(hf_dir, cfg: ModelConfig) -> dict:
    """The parameters of a Hugging Face GPT-2 directory's weights (model.safetensors or its
    shards, see read_gpt2_weights) for a model of `cfg` (see gpt2_model_config; its wte padded
    with zero rows to cfg.padded_vocab_size). Accepts GPT2LMHeadModel names (transformer.*, a
    tied lm_head.weight) and GPT2Model names (no prefix, as in the original GPT-2 files);
    ignores the causal-mask buffers. Every missing, unexpected, mis-shaped or doubled (both
    names) tensor is refused in one line naming it as, and the file where, it is stored."""
    tensors, holder, path = read_gpt2_weights(hf_dir)
    sd, in_file, lm_head = {}, {}, None  # in_file: the name each parameter has in the file
    for name, a in tensors.items():
        short = name[len("transformer."):] if name.startswith("transformer.") else name
        if _MASK_BUFFER.match(short):
            continue
        if name == "lm_head.weight":
            lm_head = a
            continue
        full = "transformer." + short
        if full in sd:  # with and without the prefix: which one is the weight is unknowable
            raise CheckpointError(f"{path}: {in_file[full]} and {name} are both {full}")
        sd[full], in_file[full] = a, name
    hf_cfg = ModelConfig(**{k: v for k, v in cfg.to_dict().items()
                            if k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")})
    want = {s.name: s.shape for s in param_layout(hf_cfg)[0]}
    missing = [n for n in want if n not in sd]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]}"
                              + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
                              + f" for {cfg.n_layer} layers")
    unknown = sorted(set(sd) - set(want))
    if unknown:
        raise CheckpointError(f"{holder[in_file[unknown[0]]]}: unexpected tensor "
                              f"{in_file[unknown[0]]} (not a GPT-2 "
                              f"parameter of {cfg.n_layer} layers)")
    for n, shape in want.items():
        if tuple(sd[n].shape) != shape:
            raise CheckpointError(f"{holder[in_file[n]]}: {in_file[n]} has shape "
                                  f"{tuple(sd[n].shape)}, "
                                  f"config.json implies {shape}")
    for n in want:
        # integers of the right shape would load as their values, silently (as a checkpoint's
        # are refused: checkpoint._match); BF16 is read as float32
        if not np.issubdtype(sd[n].dtype, np.floating):
            raise CheckpointError(f"{holder[in_file[n]]}: {in_file[n]} is {sd[n].dtype}, not a "
                                  f"float type: not a weight (GPT-2's are float32, float16 or "
                                  f"bfloat16)")
        # as a checkpoint's (checkpoint._check_finite): NaN weights train nothing
        if not np.isfinite(sd[n]).all():
            raise CheckpointError(f"{holder[in_file[n]]}: {in_file[n]} holds NaN or Inf values")
    wte = sd["transformer.wte.weight"]
    if lm_head is not None and (lm_head.shape != wte.shape or not np.array_equal(lm_head, wte)):
        raise CheckpointError(f"{holder['lm_head.weight']}: lm_head.weight differs from "
                              f"transformer.wte.weight "
                              f"(cllm-gpu ties them)")
    padded = np.zeros((cfg.padded_vocab_size, cfg.n_embd), dtype=np.float64)
    padded[:cfg.vocab_size] = wte
    sd["transformer.wte.weight"] = padded
    return sd


def _token_ids(text: str | bytes, where) -> dict:
    """{token: id} of a Hugging Face tokenizer.json: its model's vocabulary (BPE / WordPiece:
    a map; Unigram: a list of [piece, score]) and its added tokens."""
    tj = parse_json(text, where, ConfigError)
    try:
        vocab = tj["model"]["vocab"]
        ids = (dict(vocab) if isinstance(vocab, dict)
               else {entry[0]: i for i, entry in enumerate(vocab)})
        ids.update({t["content"]: t["id"] for t in tj.get("added_tokens") or []})
    except (KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"{where}: not a Hugging Face tokenizer.json "
                          f"({type(e).__name__}: {e})") from None
    return ids


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None


def _slow_token_ids(vocab_json: Path) -> dict:
    """{token: id} of GPT-2's own tokenizer files: vocab.json (the BPE vocabulary, end-of-text
    included) and, when present beside it, added_tokens.json (tokens added after training,
    {token: id}, as transformers' slow tokenizers save them). merges.txt says how text splits
    into these tokens, not what an id stands for: it is not part of the comparison."""
    ids = read_token_ids(vocab_json, error=ConfigError)
    added_json = vocab_json.with_name("added_tokens.json")
    if added_json.is_file():
        ids.update(read_token_ids(added_json, error=ConfigError))
    return ids


def _directory_token_ids(hf_dir: Path):
    """(the {token: id} the directory's weights were trained with, the file it came from), or
    None: its tokenizer.json (what transformers loads first), else GPT-2's original
    vocab.json (+ added_tokens.json)."""
    tok_json, vocab_json = hf_dir / "tokenizer.json", hf_dir / "vocab.json"
    if tok_json.is_file():
        return _token_ids(_read_bytes(tok_json), tok_json), tok_json
    if vocab_json.is_file():
        return _slow_token_ids(vocab_json), vocab_json
    return None


def check_tokenizer_matches(hf_dir, data_dir, meta: dict):
    """The token ids of a GPT-2 directory's weights and of the data must mean the same tokens:
    when the directory has a tokenizer (tokenizer.json, or GPT-2's original vocab.json and
    merges.txt), the data must have been prepared with the same vocabulary (compared token by
    token, so a re-saved copy of the same tokenizer passes). A directory with neither (weights
    only) is not checked."""
    hf_dir = Path(hf_dir)
    found = _directory_token_ids(hf_dir)
    if found is None:
        return
    hf_ids, hf_tok = found
    if meta["tokenizer"] == "byte":
        data_text, data_tok = ByteTokenizer(meta.get("eot_id")).to_hf_json(), "byte"
        if data_text is None:  # no `tokenizers` package: nothing to compare with
            return
    else:
        path, data_text = read_tokenizer_file(data_dir, meta)  # the bytes checked, compared
        data_tok = str(path)
    if hf_ids == _token_ids(data_text, data_tok):
        return
    # prepare reads either: a tokenizer.json, or GPT-2's vocab.json and merges.txt
    raise ConfigError(f"{data_dir} was prepared with another tokenizer ({data_tok}, vocab "
                      f"{meta['vocab_size']:,}) than {hf_tok}: the weights' token ids would "
                      f"stand for other tokens; prepare the data with `cllm-gpu prepare ... "
                      f"--tokenizer {hf_tok}`")


def check_matches_gpt2(cfg: ModelConfig, hf_cfg: ModelConfig, where):
    """A model config given beside --init-from must describe the same GPT-2 (its other
    options, e.g. the padding, are its own) and have GPT-2's parameters and attention."""
    why = hf_incompatibility(cfg)
    if why:
        raise ConfigError(f"{where}: GPT-2 weights cannot start a model with {why}")
    for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        if getattr(cfg, k) != getattr(hf_cfg, k):
            raise ConfigError(f"{where}: {k} is {getattr(hf_cfg, k)} there, the model config "
                              f"says {getattr(cfg, k)}")
