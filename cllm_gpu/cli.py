"""`cllm-gpu` command line: prepare | train | sample | eval | export | plot | gradcheck.

Errors the user can fix print one line (`error: ...`) and exit 1; `--debug` shows tracebacks.
Exit status: 0 done; 1 error; 2 bad command line; 130 / 143 stopped by SIGINT / SIGTERM after
saving a checkpoint (a second SIGINT exits at once with 130, checkpoints stay intact); 130 a
Ctrl-C in any other command (its line says what it leaves: _interrupted_line).

Under a launcher with several ranks (mpiexec, srun, torchrun-style variables) `train` runs
data-parallel: rank 0 prints; an error raised by every rank alike is printed once; an error on
one rank is printed with its rank and ends the whole job (docs/distributed.md).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

from .config import ATTN_BIASES, POS_EMBS, ModelConfig, TrainConfig
from . import errors
from .errors import (INTERRUPTED, CLLMError, ConfigError, DataError, ModelTooLargeError,
                     STDOUT_CLOSED_STATUS, escape_unencodable_stdout, print_line,
                     print_progress, refuse_a_file_for_a_directory, silence_stdout,
                     stdout_reader_gone)
from .json_text import parse_json, to_json

DEFAULT_DATA = Path("data/default")
# With several ranks rank 0 prepares DEFAULT_DATA; the others wait this long for its meta.json
DEFAULT_DATA_WAIT_S = 600.0
DEFAULT_OUT = Path("runs/default")
# The README's default run: small enough to learn visibly in a few minutes on 2 CPU cores.
DEFAULT_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
DEFAULT_TRAIN = dict(batch_size=16, max_steps=600, learning_rate=2e-3, min_lr=2e-4,
                     warmup_steps=50, eval_interval=100, eval_batches=10, log_interval=20,
                     checkpoint_interval=200)
# Named configurations: (model, training, final-sample prompt). shakespeare-char is nanoGPT's
# config/train_shakespeare_char.py (validation loss 1.4697 on one A100), on byte tokens
# (tinyshakespeare is ASCII: one byte per character) with GPT-2's biases.
PRESETS = {
    "shakespeare-char": (
        dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
        dict(batch_size=64, max_steps=5000, learning_rate=1e-3, min_lr=1e-4, warmup_steps=100,
             lr_decay_steps=5000, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
             eval_interval=250, eval_batches=200, log_interval=10, checkpoint_interval=1000),
        "\n"),
}


def _add_train_args(p, defaults_model, defaults_train):
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named configuration; flags given with it win. shakespeare-char: "
                        "nanoGPT's character-level Shakespeare run (6 layers, 6 heads, 384 embd, "
                        "block 256, batch 64, dropout 0.2, lr 1e-3 -> 1e-4 cosine over 5000 "
                        "steps, warm-up 100, beta2 0.99, weight decay 0.1, clip 1.0; eval every "
                        "250 steps on 200 batches). Prepare the text first: cllm-gpu prepare "
                        "tinyshakespeare.txt --out data/shakespeare, then --data data/shakespeare "
                        "(default: none)")
    g = p.add_argument_group("model (ignored on --resume: the checkpoint's config is used, and "
                                 "a note names each flag given with another value; "
                                 "on --init-from all but --dropout and --padded-vocab-size: the "
                                 "Hugging Face directory's config is used)")
    g.add_argument("--n-layer", type=int, default=None, help=f"transformer blocks (default {defaults_model['n_layer']})")
    g.add_argument("--n-head", type=int, default=None, help=f"attention heads (default {defaults_model['n_head']})")
    g.add_argument("--n-embd", type=int, default=None, help=f"embedding width, divisible by --n-head (default {defaults_model['n_embd']})")
    g.add_argument("--block-size", type=int, default=None, help=f"context length: the training length, and with learned positions the longest sequence the model takes (default {defaults_model['block_size']})")
    g.add_argument("--vocab-size", type=int, default=0, help="vocabulary size (default: the data's meta.json)")
    _add_position_args(g)
    g.add_argument("--dropout", type=float, default=None, help="dropout probability in training, in "
                   "[0, 1): on the embedding sum, the attention probabilities and each residual "
                   "branch, as nanoGPT; off in evaluation and sampling (default 0)")
    g.add_argument("--padded-vocab-size", type=int, default=0, help="rows of the embedding "
                   "matrix, >= the vocabulary: the rows past it are padding for the kernels, "
                   "never scored or sampled (default: the vocabulary itself; with --init-from, "
                   "the vocabulary rounded up to a multiple of 64, e.g. 50257 -> 50304)")
    t = p.add_argument_group("training")
    tc = TrainConfig()
    for field, help_ in (
            ("batch_size", "sequences per micro-batch"), ("seq_len", "tokens per sequence (0 = block size)"),
            ("grad_accum_steps", "micro-batches per optimizer step"), ("max_steps", "optimizer steps in total"),
            ("learning_rate", "peak learning rate"), ("min_lr", "learning rate at the end of the cosine decay"),
            ("warmup_steps", "linear warm-up steps"), ("lr_decay_steps", "cosine decay length (0 = max steps)"),
            ("weight_decay", "AdamW decoupled weight decay on 2-D weights"), ("beta1", "Adam beta1"),
            ("beta2", "Adam beta2"), ("grad_clip", "global grad-norm clip (0 = off)"),
            ("eval_interval", "steps between validation passes (0 = off)"),
            ("eval_batches", "batches per validation pass, each of the run's first --batch-size windows (a resume at another --batch-size measures the same ones)"), ("log_interval", "steps between progress lines"),
            ("checkpoint_interval", "steps between checkpoints (0 = only at the end)"),
            ("keep_checkpoints", "newest checkpoints kept in the run directory"), ("seed", "random seed"),
            ("on_nonfinite", "NaN/Inf loss or gradient: 'stop' (checkpoint last good state) or 'skip' the batch"),
            ("max_nonfinite_skips", "with --on-nonfinite skip: stop after this many skipped batches"),
            ("zero", "data parallel: 1 = ZeRO-1, Adam moments sharded across the ranks (reduce-scatter the gradients, each rank updates its shard, all-gather the weights); 0 = every rank holds all moments"),
            ("bucket_mb", "data parallel: gradient bucket size in MB"),
            ("dist_timeout", "data parallel: seconds without progress (a dead or hung rank) before every rank exits non-zero")):
        default = defaults_train.get(field, getattr(tc, field))
        typ = type(getattr(tc, field))
        on_resume = ("the checkpoint's, or on another number of ranks the value that keeps its "
                     "global batch" if field == "grad_accum_steps" else
                     "always the checkpoint's: the data goes on from its position, and the "
                     "validation batches and dropout masks stay its seed's" if field == "seed"
                     else "the checkpoint's")
        # default None: "not given", so that --resume can fall back to the checkpoint's value
        t.add_argument("--" + field.replace("_", "-"), type=typ, default=None,
                       help=f"{help_} (default {default}; on --resume, {on_resume})")
    t.add_argument("--dtype", choices=["float32", "float64"], default=None, help="parameter and activation dtype (default float32; on --resume, the checkpoint's)")
    t.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="bf16: mixed precision, matrix products on bf16 copies of weights and activations with fp32 accumulation (tensor cores on the GPU), fp32 master weights, Adam moments, LayerNorm and softmax; needs --dtype float32 (default fp32; on --resume, the checkpoint's)")
    t.add_argument("--backend", choices=["auto", "cuda", "numpy"], default="auto", help="auto: CUDA when CuPy and a GPU are present, else NumPy; NumPy runs each op on CLLM_CPU_THREADS threads (that environment variable; unset: the cores this process may use, shared among the MPI ranks of the host) (default %(default)s)")
    t.add_argument("--final-checkpoint", action=argparse.BooleanOptionalAction, default=None, help="save a checkpoint when the run ends; --no-final-checkpoint skips it (profiling, benchmarks: a GPT-2 124M checkpoint is 1.5 GB), though an interval checkpoint that falls on the last step is still written, and SIGINT/SIGTERM still save (default on; on --resume, the checkpoint's)")
    t.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None, help="CUDA: capture the whole training step (forward, backward, clip, AdamW) in a CUDA graph after one warm-up step and replay it every step, so Python launch overhead disappears; same numbers as without it; falls back to the un-captured step, with a warning, if capture fails; ignored on the NumPy backend (default off; on --resume, the checkpoint's)")
    t.add_argument("--overlap-comm", action=argparse.BooleanOptionalAction, default=None, help="data parallel: reduce each gradient bucket as soon as its layers' backward is done, overlapped with the rest of the backward; --no-overlap-comm reduces after the backward (same results; for debugging) (default on; on --resume, the checkpoint's)")
    t.add_argument("--tf32", action="store_true", help="CUDA: float32 matrix products on tensor cores in TF32 (faster, 10-bit mantissa inputs); no effect on the NumPy backend (default off)")


def _add_position_args(g):
    # default None: "not given", so that --resume notes an --attn-bias none typed on the
    # resume of an alibi run as it notes any other model flag (_model_flags_ignored)
    g.add_argument("--attn-bias", choices=ATTN_BIASES, default=None, help="distance bias on the attention scores, -m_h * (i - j) per head: alibi (slopes 2^(-8h/H)), lattice (slopes 1/p_h: 1/2, 1/3, 1/5, 1/7, ...) or none (default none)")
    g.add_argument("--pos-emb", choices=POS_EMBS, default=None, help="position embedding: learned (transformer.wpe.weight) or none (positions only from the causal mask and --attn-bias; eval --seq-len may then exceed --block-size) (default learned)")


def _model_position_kw(args, given_only=False) -> dict:
    """--attn-bias and --pos-emb, ModelConfig's defaults for those not given (given_only: the
    ones given only)."""
    kw = {k: getattr(args, k) for k in ("attn_bias", "pos_emb")}
    if given_only:
        return {k: v for k, v in kw.items() if v is not None}
    return {k: ModelConfig.__dataclass_fields__[k].default if v is None else v
            for k, v in kw.items()}


def _model_args(args) -> dict:
    """The model flags: given on the command line, else the preset's, else the default run's."""
    return {k: value for k, (value, _) in _model_arg_origins(args).items()}


def _model_arg_origins(args) -> dict:
    """_model_args with where each value came from: {field: (value, origin)}, origin None for
    a flag given on the command line, else whose value it is (_naming_flags)."""
    values = {k: (v, "the default") for k, v in dict(DEFAULT_MODEL, dropout=0.0).items()}
    if args.preset:
        values.update({k: (v, f"the preset {args.preset}'s")
                       for k, v in PRESETS[args.preset][0].items()})
    for k in values:
        if getattr(args, k, None) is not None:
            values[k] = (getattr(args, k), None)
    return values


def _flag(args, field: str) -> str | None:
    """The command-line flag that sets a config field, None where the command has none."""
    return f"--{field.replace('_', '-')}" if hasattr(args, field) else None


@contextlib.contextmanager
def _naming_flags(sources: dict):
    """An error naming config fields (CLLMError.fields) re-raised naming the flag of each
    field (`--min-lr`, not min_lr: what the user typed) and, for each value not given on the
    command line, where it came from: `train --learning-rate 1e-4` was refused for a min_lr
    the user never typed (the default run's 2e-4). sources: {field: (value, origin, flag)},
    origin None for a flag given, else whose value it is ("the default", "the checkpoint's");
    flag None where no flag sets the field here (a resumed checkpoint's model). An error
    naming no field that a flag sets is left as it is (an --init-from config.json's own)."""
    try:
        yield
    except CLLMError as e:
        if (not e.fields or not set(e.fields) <= sources.keys()
                or not any(sources[f][2] for f in e.fields)):
            raise
        message, whence = str(e), []
        for field in e.fields:
            value, origin, flag = sources[field]
            if flag:  # the first, bare word (a quoted value may hold the same letters;
                # a path, --init-from's models/padded_vocab_size/config.json, too)
                message = re.sub(rf"(?<![\w\-/\\.]){field}(?![\w/\\])", flag, message,
                                 count=1)
            if origin is not None:
                whence.append(f"{flag} not given: {origin} {value}" if flag
                              else f"{field} {value} is {origin}")
        if whence:
            message += f" ({'; '.join(whence)})"
        raise type(e)(message, e.fields) from None


def _model_flags_ignored(args, model: dict, on="--resume", whose="the checkpoint's model",
                         honoured=()) -> list[str]:
    """One note per model flag given on the command line whose value differs from the model
    that is used instead (a resumed checkpoint's, an --init-from directory's), except the
    `honoured` ones: the run keeps that model whatever the flags say."""
    given = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")
             if getattr(args, k) is not None}
    given.update({k: getattr(args, k) for k in ("vocab_size", "padded_vocab_size")
                  if getattr(args, k)})
    given.update(_model_position_kw(args, given_only=True))
    return [f"note: --{k.replace('_', '-')} {v} ignored on {on}: {whose} has {k} {model[k]}"
            for k, v in given.items() if k not in honoured and v != model.get(k)]


def _train_config(args, saved: dict | None) -> TrainConfig:
    """Flags given on the command line win; then the checkpoint's values (on --resume); then
    the preset's; then the defaults of the default run. A value refused names its flag."""
    values = _train_arg_origins(args, saved)
    with _naming_flags({k: (v, origin, _flag(args, k)) for k, (v, origin) in values.items()}):
        return TrainConfig.from_dict({k: v for k, (v, _) in values.items()})


def _train_arg_origins(args, saved: dict | None) -> dict:
    """_train_config's values with where each came from: {field: (value, origin)}, origin
    None for a flag given on the command line."""
    values = {k: (v, "the default") for k, v in dict(TrainConfig().to_dict(),
                                                     **DEFAULT_TRAIN).items()}
    if getattr(args, "preset", None):
        values.update({k: (v, f"the preset {args.preset}'s")
                       for k, v in PRESETS[args.preset][1].items()})
    if saved:
        values.update({k: (v, "the checkpoint's") for k, v in saved.items() if k in values})
    for k in TrainConfig.__dataclass_fields__:
        if getattr(args, k, None) is not None:
            values[k] = (getattr(args, k), None)
    return values


def _count(n: int, noun: str) -> str:
    """'1 layer', '2 layers', '1,024 documents'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def cmd_prepare(args):
    from .data import prepare
    t0 = time.time()
    notes = []
    with _naming_flags({k: (getattr(args, k), None, _flag(args, k))
                        for k in ("val_fraction", "bpe_vocab_size", "max_bytes")}):
        meta = prepare(args.source, args.out, tokenizer=args.tokenizer,
                       val_fraction=args.val_fraction, bpe_vocab_size=args.bpe_vocab_size,
                       max_bytes=args.max_bytes, eot_token=args.eot_token, notes=notes,
                       log=print_line, progress=print_progress)
    args.written = True  # a Ctrl-C from here on: the new files are in place
    shown = 5  # a folder of binary files: the first few, then a count
    for n in notes[:shown]:
        print_line(f"warning: {n}")
    if len(notes) > shown:
        print_line(f"warning: and {len(notes) - shown:,} more files with bytes that are not "
                   f"UTF-8")
    print(f"wrote {args.out}: {_count(meta['documents'], 'document')}, "
          f"{meta['train_tokens']:,} train + "
          f"{meta['val_tokens']:,} val tokens, vocab {meta['vocab_size']} ({meta['tokenizer']}; "
          f"end-of-text id {meta['eot_id']}), unigram entropy "
          f"{meta['unigram_entropy_nats']:.3f} nats, {time.time() - t0:.1f}s")
    if meta["tokenizer"] in ("byte", "bpe") and args.eot_token not in (None, meta["eot_token"]):
        # their end-of-text is GPT-2's: the flag names a tokenizer PATH's own
        print(f"note: --eot-token {args.eot_token!r} ignored with --tokenizer "
              f"{meta['tokenizer']}: its end-of-text token is {meta['eot_token']!r}")
    if meta["tokenizer"] == "bpe" and meta["vocab_size"] < args.bpe_vocab_size:
        print(f"note: the BPE vocabulary is {meta['vocab_size']}, not --bpe-vocab-size "
              f"{args.bpe_vocab_size}: the corpus has no more pairs seen at least twice to merge")
    return 0


def _train_inputs(args, launch):
    """What `train` reads from its command line before the trainer exists: (resume, model
    config or None, TrainConfig, data directory, notes on the settings); CLLMError for what
    does not fit. The notes are the caller's to print once the trainer's own checks passed: a
    run refused is its error alone."""
    from .data import TokenDataset
    if args.tf32:
        from .backend import enable_tf32
        enable_tf32()  # before the first matmul: CuPy reads it once
    resume, saved = None, None
    if args.resume is not None:
        from . import checkpoint as ckpt
        named = Path(args.resume or args.out or DEFAULT_OUT)
        try:
            resume = ckpt.find_resumable(named)
        except CLLMError:
            # a run another train writes and has not checkpointed yet: that train is the
            # reason, not a broken run
            from .trainer import refuse_a_run_dir_in_use
            if named.is_dir():
                refuse_a_run_dir_in_use(named)
            raise
        saved = resume.state
        # keep writing into the run resumed: a checkpoint named through a link (latest ->
        # RUN/ckpt-N) is of the run the link points into (its own directory got the run's
        # continuation: the run split in two)
        run = resume.dir.parent
        if resume.dir == named and named.is_symlink():
            run = Path(os.path.realpath(named)).parent
        args.out = args.out or str(run)
        if args.data is None:
            args.data = _recorded_data(resume.dir, resume.state)
    _resolve_final_sample(args, saved)
    _check_at_least(args, sample_tokens=0)
    _check_recorded_sampling(args)
    if args.sample_tokens > 0:  # refused now, not after the whole run
        from .sampling import check_sampling
        with _naming_sampling_flags():
            check_sampling(args.temperature, args.top_k, args.prompt)
    args.out = args.out or str(DEFAULT_OUT)
    data_dir = Path(args.data or DEFAULT_DATA)
    try:
        _ensure_default_data(data_dir, launch)
    except CLLMError as e:
        # rank 0's alone while the others wait for its meta.json, not at the agreement below:
        # it must end the job at once (main), not wait there for them
        e.rank_alone = True
        raise
    # the final sample's tokenizer and prompt are checked by the trainer, before the run, with
    # the data it opens (a read of meta.json here could be of another prepare's)
    saved_train = _saved_train_config(saved)
    tc = _train_config(args, saved_train)
    ma = _model_arg_origins(args)
    # a refusal names each flag, and where a value not given came from (_naming_flags)
    sources = {k: (v, origin, _flag(args, k))
               for k, (v, origin) in _train_arg_origins(args, saved_train).items()}
    model_cfg, notes = None, []
    if args.init_from is not None:
        from .hf import gpt2_model_config
        given_padding = args.padded_vocab_size or None
        # (its vocab_size: the line starts with that config.json's name)
        with _naming_flags({"padded_vocab_size": (given_padding, None, "--padded-vocab-size"),
                            "vocab_size": (None, None, None),
                            "dropout": (ma["dropout"][0], ma["dropout"][1], "--dropout")}):
            model_cfg = dataclasses.replace(gpt2_model_config(args.init_from, given_padding),
                                            dropout=ma["dropout"][0])
        notes += _model_flags_ignored(args, model_cfg.to_dict(), "--init-from",
                                      f"{args.init_from}'s GPT-2",
                                      honoured=("dropout", "padded_vocab_size"))
        ignored = ("" if args.block_size is None
                   else f"; --block-size {args.block_size} is ignored on --init-from")
        sources["block_size"] = (model_cfg.block_size,
                                 f"{Path(args.init_from) / 'config.json'}'s{ignored}", None)
    elif args.resume is None:
        data_vocab = TokenDataset(data_dir).vocab_size
        if args.vocab_size and args.vocab_size < data_vocab:  # said the model's vocab_size
            raise DataError(f"{data_dir / 'meta.json'}: the data's vocabulary is {data_vocab}, "
                            f"more than --vocab-size {args.vocab_size}: give --vocab-size "
                            f"{data_vocab} or more, or leave it out (the data's)")
        vocab = args.vocab_size or data_vocab
        model_sources = {k: (v, origin, _flag(args, k)) for k, (v, origin) in ma.items()}
        model_sources.update(
            vocab_size=(vocab, None if args.vocab_size else f"{data_dir / 'meta.json'}'s",
                        "--vocab-size"),
            padded_vocab_size=(args.padded_vocab_size, None, "--padded-vocab-size"))
        with _naming_flags(model_sources):
            model_cfg = ModelConfig(vocab_size=vocab, padded_vocab_size=args.padded_vocab_size,
                                    **{k: v for k, (v, _) in ma.items()},
                                    **_model_position_kw(args))
        sources["block_size"] = model_sources["block_size"]
    if args.overwrite and resume is not None:
        raise ConfigError("--overwrite and --resume exclude each other")
    if saved is not None:
        # the config the run keeps: fields an older checkpoint lacks take their defaults
        saved_model = ModelConfig.from_dict(saved["model_config"]).to_dict()
        notes += _model_flags_ignored(args, saved_model) + _resume_schedule_notes(saved, tc)
        notes += _preset_ignored_on_resume(args, saved_model, tc)
        ignored = ("" if args.block_size is None
                   else f"; --block-size {args.block_size} is ignored on --resume")
        sources["block_size"] = (saved_model["block_size"], f"the checkpoint's{ignored}", None)
    with _naming_flags(sources):  # the trainer's own check says block_size, whoever's it is
        if tc.seq_len > sources["block_size"][0]:
            raise ConfigError(f"seq_len ({tc.seq_len}) must be <= block_size "
                              f"({sources['block_size'][0]})", ["seq_len", "block_size"])
    return resume, model_cfg, tc, data_dir, notes


def _preset_ignored_on_resume(args, model: dict, tc: TrainConfig) -> list[str]:
    """--preset on --resume: the checkpoint's model and settings are kept (a flag given again
    wins; a preset is no flag given), which was silent: `train --resume RUN --preset
    shakespeare-char` trained on with the run's beta2, batch and model. One note naming each
    preset value not used (with the run's), the flags given with it left out."""
    if not args.preset:
        return []
    model_preset, train_preset, _ = PRESETS[args.preset]
    kept = [(k, v, model.get(k)) for k, v in model_preset.items()]
    kept += [(k, v, getattr(tc, k)) for k, v in train_preset.items()]
    unused = [f"--{k.replace('_', '-')} {v} ({now})" for k, v, now in kept
              if v != now and getattr(args, k, None) is None]
    if not unused:
        return []
    return [f"note: --preset {args.preset} ignored on --resume: the checkpoint's model and "
            f"settings are kept, not the preset's {', '.join(unused)}; a training flag given "
            f"again wins"]


def _saved_train_config(saved: dict | None) -> dict | None:
    """The training settings a resumed checkpoint records: its train_config, whose dtype is
    also state.json's own `dtype`, which a checkpoint without train_config (another tool's)
    still records: --dtype not given took the default float32 for it, and the resume of a
    float64 one was refused as differing from a --dtype never typed."""
    if saved is None:
        return None
    recorded = dict(saved.get("train_config") or {})
    if "dtype" in saved:
        recorded.setdefault("dtype", saved["dtype"])
    return recorded


def _resume_schedule_notes(saved: dict, tc: TrainConfig) -> list[str]:
    """What a resumed run's --max-steps does that a user may not expect: nothing left to train,
    or a cosine schedule that follows max_steps (lr_decay_steps 0) stretched or shrunk, so the
    learning rate jumps at the step resumed."""
    step, notes = int(saved["step"]), []
    if step >= tc.max_steps:
        notes.append(f"note: the checkpoint is at step {step} and --max-steps is "
                     f"{tc.max_steps}: nothing to train (give a larger --max-steps to continue)")
    if "train_config" not in saved:  # another tool's checkpoint: no schedule to compare with
        return notes
    # fields this version does not know are ignored on resume (as _train_config and the
    # checkpoint check ignore them), not a refusal of the resume by this note
    before = TrainConfig.from_dict({k: v for k, v in saved["train_config"].items()
                                    if k in TrainConfig.__dataclass_fields__})
    if (not tc.lr_decay_steps and not before.lr_decay_steps
            and before.max_steps != tc.max_steps and step < tc.max_steps):
        now, then = tc.lr_at(step), before.lr_at(step)
        # 3 significant digits, or as many as it takes to tell the two apart (a decay
        # stretched by a few steps moves the rate in its 5th digit: "0.0002, not 0.0002")
        digits = next((d for d in range(3, 18) if f"{now:.{d}g}" != f"{then:.{d}g}"), 17)
        jump = (f" (the rate at step {step + 1}: {now:.{digits}g}, not {then:.{digits}g})"
                if not math.isclose(now, then, rel_tol=1e-9) else "")
        notes.append(f"note: the learning-rate decay follows --max-steps (--lr-decay-steps 0): "
                     f"it ended at step {before.max_steps} in the checkpoint's run and ends at "
                     f"step {tc.max_steps} now{jump}; give --lr-decay-steps {before.max_steps} "
                     f"to keep the checkpoint's schedule")
    return notes


def _ensure_default_data(data_dir: Path, launch):
    """Prepare the embedded default corpus when `train` uses it and it is not there. With
    several ranks rank 0 prepares it and the others wait for its meta.json; if rank 0 fails it
    leaves a note beside the directory (data/default.prepare-error: its error, and the
    launcher's run id when there is one), which ends their wait."""
    if data_dir != DEFAULT_DATA or (data_dir / "meta.json").exists():
        return
    note = data_dir.with_name(data_dir.name + ".prepare-error")
    if launch.world_size > 1 and launch.mpi_launched:
        _start_mpi()
    if launch.rank != 0:
        _wait_for_default_data(data_dir, note, launch)
        return
    from .data import prepare
    if launch.world_size > 1:
        try:
            note.unlink(missing_ok=True)  # an earlier run's
        except OSError:
            pass  # left there, it is older than the waiting ranks, which ignore it
    print(f"preparing the embedded default corpus (Python standard library sources) in {data_dir}")
    try:
        # prepare's own wording would name its --out, which train's user never gave
        refuse_a_file_for_a_directory(data_dir, "--data", "data directory", error=DataError)
        prepare("default", data_dir)
    except BaseException as e:
        if launch.world_size > 1:
            known = _one_line(e)
            _write_failure_note(note, known[0] if known else f"{type(e).__name__}: {e}", launch)
        raise


_NOTE_RUN = "run: "  # the failure note's line naming the run: {"id": ..., "restart": ...}


def _write_failure_note(note: Path, error: str, launch):
    """Rank 0's note: its error, and the launch's run id when it has one. Written whole under
    another name and renamed into place: the waiting ranks read it."""
    text = error + "\n"
    if launch.run_id is not None:
        text += _NOTE_RUN + to_json({"id": launch.run_id, "restart": launch.restart}) + "\n"
    part = note.with_name(f"{note.name}.{os.getpid()}.part")
    try:
        note.parent.mkdir(parents=True, exist_ok=True)
        part.write_text(text)
        os.replace(part, note)
    except OSError:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        # the waiting ranks' timeout names this case too


def _start_mpi():
    """MPI_Init now, on every rank of an MPI launch: it returns only when every rank has
    called it, so rank 0's note of a failure is newer than every waiting rank's process (a
    rank started after it took it for an earlier run's and waited 600 s; under mpiexec the
    whole job did, rank 0's MPI_Abort waiting in MPI_Init for it). No mpi4py: opening the
    communicator says so, later."""
    try:
        from mpi4py import MPI  # noqa: F401
    except ImportError:
        pass


def _wait_for_default_data(data_dir: Path, note: Path, launch):
    """A rank other than 0: wait for rank 0's meta.json in data_dir; DataError at once when
    rank 0 leaves its failure note, or after DEFAULT_DATA_WAIT_S."""
    def stamp():  # which note is there, if any
        try:
            st = note.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime
    started, before = _process_started_at(), stamp()
    deadline = time.monotonic() + DEFAULT_DATA_WAIT_S
    while not (data_dir / "meta.json").exists():
        now = stamp()
        if now is not None and _note_is_this_runs(note, launch, now, before, started):
            raise DataError(f"rank 0 failed to prepare the default corpus in {data_dir}; "
                            f"see rank 0's error")
        if time.monotonic() > deadline:
            raise DataError(
                f"no meta.json in {data_dir.resolve()} after {DEFAULT_DATA_WAIT_S:.0f} s of "
                f"waiting for rank 0 to prepare the default corpus there: rank 0 failed (its "
                f"error is in its output) or does not share this directory (machines without a "
                f"shared file system); run 'cllm-gpu prepare default --out DIR' where every "
                f"rank sees DIR (or on every machine), then train with --data DIR")
        time.sleep(0.2)


def _note_is_this_runs(note: Path, launch, now, before, started) -> bool:
    """Whether the failure note there (stamp `now`) is this run's rank 0's. With a launcher's
    run id: a note naming another run is not, one naming this run and this restart is, whatever
    its age (a rank started after rank 0 failed), where the count names the start
    (_restart_names_the_start). Otherwise (no id here or in the note, another restart of this
    run, or a count that names no start) by its time: this run's note is newer than this
    process or appeared while it waited; an earlier failed run's is neither (rank 0 removes it
    before preparing)."""
    if launch.run_id is not None:
        run = _note_run(note)
        if run is not None:
            if run.get("id") != launch.run_id:
                return False
            if run.get("restart") == launch.restart and _restart_names_the_start(launch):
                return True
    return now != before or now[1] >= started


def _restart_names_the_start(launch) -> bool:
    """Whether launch.restart is the same on every rank of a start and differs between starts.
    torchrun counts restarts per node: a node restarted only because another node failed keeps
    its count, so with ranks on several nodes one start's counts differ and two starts' may be
    equal (rank 0's failed first start, count 0, and node B's second, still 0). One node: one
    agent counts every worker's restarts. Other launchers restart nothing (count 0; srun: a
    run id per step)."""
    return launch.launcher != "torchrun-style" or launch.local_size >= launch.world_size


def _note_run(note: Path) -> dict | None:
    """The run a failure note names ({"id", "restart"}), or None (none named, or unreadable)."""
    try:
        lines = note.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        if line.startswith(_NOTE_RUN):
            try:
                run = parse_json(line[len(_NOTE_RUN):], note, ValueError)
            except ValueError:  # any line that is not JSON names no run
                return None
            return run if isinstance(run, dict) else None
    return None


_IMPORTED_AT = time.time()


def _process_started_at() -> float:
    """When this process started, in time.time() seconds (Linux: /proc/self/stat; elsewhere
    when this module was imported, a little later)."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT


def cmd_train(args):
    from .distributed import detect_launch, open_communicator
    from .trainer import GpuTrainer
    launch = detect_launch()
    say = print_progress if launch.rank == 0 else (lambda *a, **k: None)
    comm = None
    try:
        resume, model_cfg, tc, data_dir, notes = _train_inputs(args, launch)
        error = None
    except CLLMError as e:
        if launch.world_size == 1 or getattr(e, "rank_alone", False):
            raise
        error, tc = str(e), None
    if launch.world_size > 1:
        # the command line is read on every rank: its errors are said once (rank 0), every
        # rank exits 1, rather than each rank printing its own and aborting the job
        from .distributed import DEFAULT_TIMEOUT_S
        _, comm = open_communicator(launch, args.backend,
                                    tc.dist_timeout if tc else DEFAULT_TIMEOUT_S)
        comm.agree(error)
    trainer = GpuTrainer(model_cfg, tc, data_dir, args.out, backend=args.backend, resume=resume,
                         overwrite=args.overwrite, init_from=args.init_from, launch=launch,
                         comm=comm, keep_global_batch=args.grad_accum_steps is None,
                         final_sample=_final_sample(args))
    for note in notes:  # after the trainer's checks, which may refuse the run
        say(note)
    mc, tc = trainer.model_cfg, trainer.train_cfg
    vocab = (f"{mc.vocab_size} (padded to {mc.padded_vocab_size})"
             if mc.padded_vocab_size != mc.vocab_size else f"{mc.vocab_size}")
    position = ("" if (mc.attn_bias, mc.pos_emb) == ("none", "learned")
                else f", attn_bias {mc.attn_bias}, pos_emb {mc.pos_emb}")
    say(f"model: {_count(mc.n_layer, 'layer')}, {_count(mc.n_head, 'head')}, {mc.n_embd} embd, "
        f"block {mc.block_size}, vocab {vocab}{position}: {mc.num_params():,} parameters; "
        f"{tc.batch_size}x{trainer.T} tokens x {tc.grad_accum_steps} accumulation per step")
    summary = trainer.train()
    if summary["status"] == "interrupted":
        from .trainer import EXIT_INTERRUPTED
        say(f"stopped at step {summary['step']}; resume with: cllm-gpu train --resume {args.out}")
        return EXIT_INTERRUPTED.get(summary["signal"], 130)
    if args.sample_tokens > 0 and launch.rank == 0:
        print("--- sample ---")
        _print_text(trainer.sample(args.prompt, args.sample_tokens, args.temperature,
                                   args.top_k))
        print("--------------")
    return 0


# train's final-sample flags: their names in state.json's final_sample, and their defaults (the
# prompt's: the preset's, else empty: a new document, which every tokenizer can start)
FINAL_SAMPLE_FLAGS = {"prompt": "prompt", "tokens": "sample_tokens", "temperature": "temperature",
                      "top_k": "top_k"}
FINAL_SAMPLE_DEFAULTS = dict(prompt="", tokens=300, temperature=0.8, top_k=40)


def _resolve_final_sample(args, saved: dict | None):
    """train's final-sample settings into args: the flags given, else the checkpoint's (on
    --resume: the run's own prompt, not the default; a checkpoint written before they were
    recorded has none), else the preset's prompt, else the defaults."""
    values = dict(FINAL_SAMPLE_DEFAULTS)
    if args.preset:
        values["prompt"] = PRESETS[args.preset][2]
    recorded = (saved or {}).get("final_sample") or {}
    values.update({k: v for k, v in recorded.items() if k in values})
    for key, flag in FINAL_SAMPLE_FLAGS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, values[key])


def _check_recorded_sampling(args):
    """--temperature and --top-k even with --sample-tokens 0: state.json records them
    (final_sample), and a --resume refuses a checkpoint whose values no sample can take (a
    top_k of 0, a negative temperature; an infinite one, which JSON writes as null), so
    every checkpoint of the run would be refused."""
    from .sampling import check_sampling
    with _naming_sampling_flags():
        check_sampling(args.temperature, args.top_k)


def _naming_sampling_flags():
    """check_sampling's refusals naming --temperature and --top-k (the values are the flags'
    or their defaults: a checkpoint's final_sample was checked when it was read)."""
    return _naming_flags({"temperature": (None, None, "--temperature"),
                          "top_k": (None, None, "--top-k")})


def _final_sample(args) -> dict:
    """The resolved final-sample settings, as state.json records them."""
    return {key: getattr(args, flag) for key, flag in FINAL_SAMPLE_FLAGS.items()}


def _load_for_inference(args):
    from . import checkpoint as ckpt
    from .data import TokenDataset, check_run_tokenizer, load_tokenizer
    from .model import SMALLER_MODEL_ADVICE, CLLMModel
    ck_dir, state, notes = ckpt.find_resumable(args.checkpoint)
    for n in notes:
        print_line(f"warning: {n}")
    cfg = ModelConfig.from_dict(state["model_config"])
    # the precision it was trained in: sampling and eval see the numbers training saw
    precision = state.get("train_config", {}).get("precision", "fp32")
    try:
        # no Adam moments: nothing here reads them (on a GPU they took 2/5 of the memory)
        model = CLLMModel(cfg, backend=args.backend, dtype=state.get("dtype", "float32"),
                          precision=precision, adam_moments=False)
    except ModelTooLargeError as e:
        raise ModelTooLargeError(str(e).replace(
            SMALLER_MODEL_ADVICE, f"it is the model of {ck_dir}: sample or evaluate it where "
                                  f"more memory is free")) from None
    model.load_state_dict(ckpt.load_model_params(ck_dir, model.specs, state))
    data_dir = Path(args.data or _recorded_data(ck_dir, state))
    ds = TokenDataset(data_dir)  # its meta.json checked below: the one its files came with
    # before the vocabulary sizes: another tokenizer is the reason they would differ
    note = check_run_tokenizer(ckpt.recorded_tokenizer(state), ds.dir, ds.meta, ck_dir)
    if note and args.data is not None:  # the run's own data: as before, without a word
        print_line(f"note: {note}")
    ds.require_vocab(cfg.vocab_size)
    return model, ds, load_tokenizer(ds.dir, ds.meta), state


def _recorded_data(ck_dir: Path, state: dict) -> str:
    """The token directory a checkpoint records; without one (a manifest written by another
    tool), the user must name it: the default corpus would silently be another data set."""
    from . import checkpoint as ckpt
    data = ckpt.recorded_data_dir(state)
    if data is None:
        raise ConfigError(f"{ck_dir}: the checkpoint records no data directory; give --data")
    # gone (moved, or a relative path read from another working directory): the data's own
    # "not found (run `cllm-gpu prepare`)" named neither the checkpoint nor --data. The default
    # corpus is train's to prepare again where it is missing.
    if not os.path.lexists(data) and Path(data) != DEFAULT_DATA:
        where = ("" if os.path.isabs(data)
                 else f" from {Path.cwd()} (relative to the directory train ran in)")
        raise DataError(f"{ck_dir}: its data directory, {data}, is not found{where}; give "
                        f"--data (the run's token directory)")
    return data


def _check_at_least(args, **lowest):
    """Integer flags below their lowest allowed value: one line naming the flag."""
    for name, low in lowest.items():
        value = getattr(args, name)
        if value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def cmd_sample(args):
    import numpy as np
    from .sampling import check_sampling, sample_text
    _check_at_least(args, max_new_tokens=0, num_samples=1, seed=0)
    with _naming_sampling_flags():
        check_sampling(args.temperature, args.top_k, args.prompt)
    model, ds, tok, _ = _load_for_inference(args)
    rng = np.random.default_rng(args.seed)
    for i in range(args.num_samples):
        if i:
            print("---")
        _print_text(sample_text(model, tok, args.prompt, args.max_new_tokens,
                                args.temperature, args.top_k, rng, args.stop_at_eot))
    return 0


def _print_text(text: str):
    """Generated text on stdout, what its encoding cannot hold as '?': a byte model's sample
    holds U+FFFD for bytes that are no UTF-8, and on a stdout in Latin-1 (such a locale; a file
    on Windows, cp1252) print() was a UnicodeEncodeError traceback."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text = text.encode(encoding, errors="replace").decode(encoding)
    except LookupError:  # an encoding Python does not know: print() says so
        pass
    print(text)


def cmd_eval(args):
    import numpy as np

    from .model import check_eval_fits
    _check_at_least(args, batches=1, batch_size=1, seed=0)
    model, ds, _, state = _load_for_inference(args)
    T = _eval_seq_len(args.seq_len, model.cfg)
    ds.require_block(T, [args.split])
    check_eval_fits(model.cfg, model.dtype, model.precision, model.xp, args.batch_size, T,
                    args.batches)
    rng = np.random.default_rng(args.seed)
    total, count = 0.0, 0
    for _ in range(args.batches):
        idx, tgt = ds.get_batch(args.split, args.batch_size, T, rng)
        s, n = model.eval_loss_sum(idx, tgt)
        total += float(s)
        count += n
    loss = total / count
    with np.errstate(over="ignore"):  # past float range: inf, written as null
        perplexity = float(np.exp(loss))
    # strict JSON: a diverged model's NaN loss (or an infinite one) is null, not NaN
    print(to_json({"split": args.split, "step": state["step"], "loss": loss,
                   "perplexity": perplexity, "tokens": count}))
    if not math.isfinite(loss):  # a bare null says nothing of why
        print_line("note: the loss is not finite (null above): the checkpoint's weights have "
                   "diverged; evaluate an earlier checkpoint")
    return 0


def _eval_seq_len(seq_len: int, cfg: ModelConfig) -> int:
    """--seq-len: 0 is the block size (the training length, unless train's --seq-len was
    shorter); longer only without learned positions."""
    if seq_len < 0:
        raise ConfigError(f"--seq-len must be >= 0 (0 = block size), got {seq_len}")
    T = seq_len or cfg.block_size
    if cfg.max_seq_len is not None and T > cfg.max_seq_len:
        raise ConfigError(f"--seq-len {T} exceeds the model's block_size {cfg.block_size}: it "
                          f"has learned position embeddings (pos_emb 'learned') for "
                          f"{cfg.block_size} positions only; models trained with --pos-emb none "
                          f"take longer sequences")
    return T


def cmd_export(args):
    from .hf import export_hf
    notes = export_hf(args.checkpoint, args.hf, data_dir=args.data)
    args.written = True  # a Ctrl-C from here on: the new files are in place
    for note in notes:  # warnings to stderr, as sample and train print them
        print_line(note) if note.startswith("warning: ") else print(note)
    return 0


def cmd_plot(args):
    from .plot import plot_runs
    plot_runs(args.runs, args.out)
    print(f"wrote {args.out} ({len(args.runs)} run{'s' if len(args.runs) > 1 else ''})")
    return 0


def cmd_gradcheck(args):
    from .gradcheck import gradcheck_model
    # --samples 0 checked nothing and said PASS
    _check_at_least(args, batch_size=1, samples=1, seed=0)
    if not args.tolerance > 0:  # NaN too: no error passes it
        raise ConfigError(f"--tolerance must be > 0, got {args.tolerance}")
    fields = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout")
    with _naming_flags({k: (getattr(args, k), None, _flag(args, k)) for k in fields}):
        cfg = ModelConfig(**{k: getattr(args, k) for k in fields}, **_model_position_kw(args))
    rows, worst = gradcheck_model(cfg, batch=args.batch_size, samples_per_param=args.samples,
                                  seed=args.seed)
    per = {}
    for name, _, _, _, rel in rows:
        per[name] = max(per.get(name, 0.0), rel)
    for name, rel in per.items():
        print(f"{name:45s} max rel err {rel:.2e}")
    ok = worst < args.tolerance
    print(f"{len(per)} parameter tensors, {len(rows)} elements: worst relative error "
          f"{worst:.2e} ({'PASS' if ok else 'FAIL'} at {args.tolerance:g})")
    return 0 if ok else 1


def build_parser():
    # allow_abbrev=False here and in every command: a flag is given whole (argparse's default
    # took a unique prefix for its flag: `train --lr 100` set --lr-decay-steps)
    p = argparse.ArgumentParser(prog="cllm-gpu", allow_abbrev=False, description=(
        "Train GPT-style language models on an NVIDIA GPU (CuPy + CUDA kernels) or any CPU "
        "(NumPy). `cllm-gpu train` with no arguments prepares the embedded default corpus and "
        "trains a small model on it."))
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors (default off)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    pp = sub.add_parser("prepare", help="tokenize text into train.bin / val.bin / meta.json",
                        description="Tokenize documents into the token format, an end-of-text "
                                    "token after each: a text file is one document, a .jsonl "
                                    "file one per line (its \"text\" field), a folder one per "
                                    "file (.jsonl files one per line; hidden files and "
                                    "folders, lost+found, --out, and folders cllm-gpu wrote "
                                    "(prepared data, runs, checkpoints) skipped; links to folders "
                                    "followed, each folder once); 'default' is the embedded "
                                    "corpus (the Python standard library's sources, one "
                                    "document per module). A special token's text inside a "
                                    "document (<|endoftext|>) stays text.")
    pp.add_argument("source", nargs="?", default="default",
                    help="text file, .jsonl file, folder, or 'default' (default %(default)s)")
    pp.add_argument("--out", default=str(DEFAULT_DATA), help="output directory (default %(default)s)")
    pp.add_argument("--tokenizer", default="byte", metavar="byte|bpe|PATH",
                    help="byte: the 256 bytes plus end-of-text (vocab 257), no dependency; bpe: "
                         "byte-level BPE trained on the corpus; PATH: any Hugging Face "
                         "tokenizer.json (GPT-2's included), or GPT-2's original vocab.json + "
                         "merges.txt (that vocab.json, or their directory; added_tokens.json "
                         "honoured; Megatron's gpt2-vocab.json + gpt2-merges.txt too), read "
                         "offline, saved beside the data as tokenizer.json with "
                         "its SHA-256; bpe and PATH need the `tokenizers` package "
                         "(default %(default)s)")
    pp.add_argument("--eot-token",
                    help="with a tokenizer PATH: its end-of-text token, put after every document "
                         "(default <|endoftext|>; for a token directory, the one its meta.json "
                         "records)")
    pp.add_argument("--bpe-vocab-size", type=int, default=4096, help="BPE vocabulary, at least 257 (the 256 byte symbols and end-of-text), at most 2**24 (default %(default)s)")
    pp.add_argument("--val-fraction", type=float, default=0.1, help="tail fraction of the tokens held out as the validation split (val.bin), in (0, 1), at least one token; training with --eval-interval 0 never reads it (default %(default)s)")
    pp.add_argument("--max-bytes", type=int, default=2_000_000,
                    help="the default corpus: whole modules, in sorted order, until their size "
                         "reaches this many bytes (the last may pass it) (default %(default)s)")
    pp.set_defaults(func=cmd_prepare)

    pt = sub.add_parser("train", help="train a model (no arguments: the small default run)",
                        description="Train, logging progress lines and metrics.jsonl, writing "
                                    "checkpoints to --out. SIGINT/SIGTERM finish the step, save a "
                                    "checkpoint and exit 130/143.")
    pt.add_argument("--data", default=None, help=f"token directory from `prepare` (default {DEFAULT_DATA}, prepared automatically; on --resume, the checkpoint's)")
    pt.add_argument("--out", default=None, help=f"run directory: checkpoints + metrics.jsonl (default {DEFAULT_OUT}; on --resume, the run being resumed)")
    pt.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                    help="resume from a checkpoint dir or a run dir (its newest verified "
                         "checkpoint); bare --resume uses --out. Model, data and training "
                         "settings come from the checkpoint unless given again (default: a new run)")
    pt.add_argument("--overwrite", action="store_true",
                    help="start a new run in --out even if it holds checkpoints (they and "
                         "metrics.jsonl are deleted; "
                         "default off: such an --out is refused)")
    pt.add_argument("--init-from", default=None, metavar="DIR",
                    help="start from a Hugging Face GPT-2 directory (config.json + "
                         "model.safetensors or its shards, e.g. GPT-2 weights on disk): its "
                         "config and weights, names and shapes checked (default: random init)")
    _add_train_args(pt, DEFAULT_MODEL, DEFAULT_TRAIN)
    # default None: "not given", so that --resume can fall back to the checkpoint's value
    pt.add_argument("--sample-tokens", type=int, default=None, help="tokens to sample at the end (0 = no sample) (default 300; on --resume, the checkpoint's)")
    pt.add_argument("--prompt", default=None, help="prompt for the final sample (default empty: a new document, drawn from the end-of-text token; a preset's own, e.g. a newline; on --resume, the checkpoint's)")
    pt.add_argument("--temperature", type=float, default=None, help="sampling temperature of the final sample: 0 = greedy (default 0.8; on --resume, the checkpoint's)")
    pt.add_argument("--top-k", type=int, default=None, help="sampling top-k of the final sample (default 40; on --resume, the checkpoint's)")
    pt.set_defaults(func=cmd_train)

    for name, func, help_ in (("sample", cmd_sample, "generate text from a checkpoint"),
                              ("eval", cmd_eval, "loss and perplexity of a checkpoint on a split")):
        ps = sub.add_parser(name, help=help_, description=help_)
        ps.add_argument("checkpoint", nargs="?", default=str(DEFAULT_OUT), help="checkpoint or run directory (default %(default)s)")
        ps.add_argument("--data", default=None, help="token directory (default: the one recorded in the checkpoint); prepared with the run's tokenizer (another one, as the checkpoint records it, is refused)")
        ps.add_argument("--backend", choices=["auto", "cuda", "numpy"], default="auto",
                        help="auto: CUDA when CuPy and a GPU are present, else NumPy (default "
                             "%(default)s)")
        ps.add_argument("--seed", type=int, default=0,
                        help=("random seed of the sampling" if name == "sample" else
                              "random seed of the batches drawn") + " (default %(default)s)")
        ps.set_defaults(func=func)
        if name == "sample":
            ps.add_argument("--prompt", default="", help="text to continue (default empty: a new document, drawn from the end-of-text token)")
            ps.add_argument("--max-new-tokens", type=int, default=300, help="tokens generated per sample, at most (default %(default)s)")
            ps.add_argument("--temperature", type=float, default=0.8, help="sampling temperature: 0 = greedy (default %(default)s)")
            ps.add_argument("--top-k", type=int, default=40, help="sample only among the k most likely tokens (default %(default)s)")
            ps.add_argument("--num-samples", type=int, default=1, help="samples to draw, printed one after another with --- between them (default %(default)s)")
            ps.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction, default=True,
                            help="end a sample at the end-of-text token; --no-stop-at-eot "
                                 "continues past it, showing it as <|endoftext|> (default on)")
        else:
            ps.add_argument("--split", choices=["train", "val"], default="val", help="the tokens evaluated: train.bin or val.bin (default %(default)s)")
            ps.add_argument("--batches", type=int, default=20, help="batches of random windows of the split; the loss is the mean over all their tokens (default %(default)s)")
            ps.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default %(default)s)")
            ps.add_argument("--seq-len", type=int, default=0, help="tokens per sequence: 0 = the block size (the training length, unless train's --seq-len was shorter: give that length to measure what the run's validation passes did); a model with --pos-emb none may be evaluated on longer sequences (default %(default)s)")

    pe = sub.add_parser("export", help="write a run as a Hugging Face GPT-2 directory",
                        description="Write a checkpoint (of a run directory, its newest verified "
                                    "one) as a directory "
                                    "transformers' GPT2LMHeadModel.from_pretrained loads: "
                                    "config.json, generation_config.json, model.safetensors "
                                    "(float32, padded vocabulary rows dropped) and the run's "
                                    "tokenizer (tokenizer.json, tokenizer_config.json, "
                                    "special_tokens_map.json, an empty added_tokens.json), all "
                                    "checked before any is written. The tokenizer needs the "
                                    "`bpe` extra: without it a BPE or user tokenizer (loaded "
                                    "first, as sample loads it) is refused, the byte "
                                    "tokenizer's left out with a note. A model with an attention "
                                    "bias or without learned position embeddings has no GPT-2 "
                                    "equivalent and is refused.")
    pe.add_argument("checkpoint", help="run or checkpoint directory")
    pe.add_argument("--hf", required=True, metavar="DIR", help="output directory (created; "
                    "files of the same names are replaced, all or none; a checkpoint directory is "
                    "refused)")
    pe.add_argument("--data", default=None, help="token directory whose tokenizer to export "
                    "(default: the one recorded in the checkpoint); prepared with the run's "
                    "tokenizer (another one, as the checkpoint records it, is refused)")
    pe.set_defaults(func=cmd_export)

    pl = sub.add_parser("plot", help="plot the curves of one or more runs into a PNG",
                        description="Train and validation loss against steps and tokens, learning "
                                    "rate and tokens/s from RUN/metrics.jsonl, several runs "
                                    "overlaid. Needs matplotlib (the `plot` extra).")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    pl.add_argument("--out", default="curves.png", help="PNG to write (default %(default)s)")
    pl.set_defaults(func=cmd_plot)

    pg = sub.add_parser("gradcheck", help="finite-difference check of every parameter's gradient",
                        description="Compare the analytic gradient with fourth-order central "
                                    "differences (float64) on random elements of every parameter "
                                    "tensor of a small random model. Exit 1 on failure.")
    for flag, default, what in (
            ("--n-layer", 2, "transformer blocks"), ("--n-head", 2, "attention heads"),
            ("--n-embd", 8, "embedding width"), ("--block-size", 8, "context length"),
            ("--vocab-size", 11, "vocabulary size")):
        pg.add_argument(flag, type=int, default=default,
                        help=f"{what} of the random model (default %(default)s)")
    _add_position_args(pg)
    pg.add_argument("--dropout", type=float, default=0.0, help="dropout probability of the "
                    "random model, in [0, 1): the differences go through one fixed set of "
                    "training masks (default %(default)s)")
    pg.add_argument("--batch-size", type=int, default=2,
                    help="sequences in the batch (default %(default)s)")
    pg.add_argument("--samples", type=int, default=3, help="elements checked per tensor (default %(default)s)")
    pg.add_argument("--tolerance", type=float, default=1e-6,
                    help="passes when the worst relative error is below this (default %(default)s)")
    pg.add_argument("--seed", type=int, default=0,
                    help="seed of the model and the elements checked (default %(default)s)")
    pg.set_defaults(func=cmd_gradcheck)
    for command in sub.choices.values():  # `cllm-gpu train ... --debug` as well as before it
        command.allow_abbrev = False
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show full tracebacks on errors (default off)")
    return p


def main(argv=None) -> int:
    escape_unencodable_stdout()
    try:  # a Ctrl-C before the command runs: the same line as in it
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else argv
        if not argv:
            parser.print_help()
            return 2
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print_line(f"error: {INTERRUPTED[0]}")
        return INTERRUPTED[1]
    if args.cmd is None:
        parser.print_help()
        return 2
    errors.stdout_failure = None
    stdout = sys.stdout
    if stdout is None:  # started with descriptor 1 closed (`>&-`): Python sets no stdout
        errors.stdout_failure = OSError(errno.EBADF, "closed (no file descriptor 1)")
        stdout = open(os.devnull, "w")  # takes descriptor 1: no file of the run's lands there
    sys.stdout = errors.GuardedStdout(stdout)
    try:
        status = _run_command(args)
    finally:
        if isinstance(sys.stdout, errors.GuardedStdout):
            sys.stdout = stdout
    failure = errors.stdout_failure
    if failure is not None and status == 0:
        # the work is done (a run's checkpoints, prepare's files); the user learns why stdout
        # stopped, on stderr where it works
        with contextlib.suppress(OSError, ValueError):
            print_line(f"error: stdout: {failure.strerror or failure}; the lines from then on "
                       f"were dropped, the command itself ran to its end")
        return 1
    return status


def _run_command(args) -> int:
    try:
        if not args.debug:
            _quiet_float_warnings()
        status = args.func(args)
        sys.stdout.flush()  # a reader gone shows here, not as the interpreter's exit message
        return status
    except SystemExit:
        raise
    except BaseException as e:
        if isinstance(e, BrokenPipeError) and stdout_reader_gone():
            # the reader of stdout has what it wanted (`cllm-gpu sample RUN | head -1`): a
            # normal end, not an error. train never gets here: print_progress goes on.
            silence_stdout()
            return STDOUT_CLOSED_STATUS
        known = _one_line(e, args)
        launch = _launch()
        if launch.world_size > 1 and not getattr(e, "collective", False):
            # an error on this rank alone ends the whole job: the other ranks would otherwise
            # wait for this one until --dist-timeout
            from .distributed import abort_job
            if known is not None and not args.debug:
                print_line(f"error: rank {launch.rank}: {known[0]}")
            else:
                traceback.print_exc()
            abort_job(known[1] if known is not None else 1)
        if known is None or args.debug:
            raise
        if launch.rank == 0:  # a collective error: every rank has it, rank 0 says it
            print_line(f"error: {known[0]}")
        return known[1]


def _quiet_float_warnings():
    """NumPy's floating-point warnings (overflow, invalid value, ...) are not printed: a
    non-finite loss or gradient is the trainer's to report, in one line, by its --on-nonfinite
    policy, and eval prints the loss it got. The filter is process-wide, so it covers the
    NumPy path's worker threads too; --debug shows them."""
    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message=r"(overflow|invalid value|divide by zero|underflow) "
                                    r"encountered")


def _one_line(e, args=None):
    """(message, exit status) for an error the user can fix; None for anything else (a bug:
    shown with its traceback). args: the command line (a Ctrl-C's line names its output)."""
    if isinstance(e, CLLMError):
        return str(e), 1
    if isinstance(e, KeyboardInterrupt):
        return _interrupted_line(args), INTERRUPTED[1]
    if isinstance(e, MemoryError):
        return "out of memory; try a smaller --batch-size or model", 1
    if type(e).__module__.startswith(("cupy", "cupy_backends")):  # CuPy / CUDA errors
        if type(e).__name__ == "OutOfMemoryError":
            return (f"out of GPU memory ({e}); try a smaller --batch-size or --seq-len, or "
                    f"--grad-accum-steps to keep the batch", 1)
        return f"CUDA: {type(e).__name__}: {e}", 1
    if isinstance(e, OSError):  # a write's has no file name: no empty one before the colon
        return (f"{e.filename}: " if e.filename else "") + f"{e.strerror or e}", 1
    return None


def _interrupted_line(args=None) -> str:
    """A Ctrl-C's line: what the command interrupted leaves on disk."""
    command = getattr(args, "cmd", None)
    if command == "train":  # a second Ctrl-C while saving: the save is all or nothing
        return f"{INTERRUPTED[0]}; checkpoints on disk are intact"
    if command in ("prepare", "export"):  # write_files: all their files renamed in at the end
        # (a new directory may have been made, empty: not "as it was"); the renames are all
        # or none, and a Ctrl-C after them (printing the summary) left every new file there
        out = args.out if command == "prepare" else args.hf
        if getattr(args, "written", False):
            return f"{INTERRUPTED[0]}; {out} was written in full"
        return f"{INTERRUPTED[0]}; nothing written to {out}"
    return INTERRUPTED[0]  # before a command, or sample, eval, gradcheck, plot


def _launch():
    from .distributed import Launch, detect_launch
    try:
        return detect_launch()
    except CLLMError:
        return Launch(0, 1, 0, 1, "none")


if __name__ == "__main__":
    sys.exit(main())
