"""Checkpoints (docs/design.md): a directory with model.safetensors (HF GPT-2 names),
optimizer.safetensors (Adam moments: `<name>.exp_avg`, `<name>.exp_avg_sq`) and state.json
(configs, step, RNG state, data position, size and SHA-256 of each file).

Writing: every file goes to a temporary directory beside the final one, each file is fsync'ed,
state.json (the manifest) is written last, the directory is fsync'ed and renamed into place, and
the parent directory fsync'ed. A checkpoint directory therefore exists under its final name only
when complete. Older checkpoints are removed only after a newer one is in place. A re-save of a
step sets its checkpoint aside first (.old-ckpt-*): an error or Ctrl-C puts it back, and one
left set aside by a killed writer is renamed back by the next list_checkpoints, or
find_resumable of its ckpt-N; where that rename fails (a read-only run directory),
find_resumable reads it in place.

Reading: sizes and hashes are verified before any tensor is parsed; a mismatch is refused with a
one-line error naming the file.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import safetensors_io
from .config import ModelConfig, TrainConfig
from .errors import CheckpointError, ConfigError
from .json_text import parse_json, to_json

FORMAT = "cllm-gpu-checkpoint"
VERSION = 1
FILES = ("model.safetensors", "optimizer.safetensors")
CKPT_RE = re.compile(r"^ckpt-(\d{8,})$")
MAX_STATE_BYTES = 1 << 20


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def save_checkpoint(run_dir, step: int, params: dict, adam_m: dict, adam_v: dict, state: dict,
                    keep: int | None = 3, notes: list | None = None) -> Path:
    """Write run_dir/ckpt-<step> atomically; prune to the `keep` newest (None: prune none).
    Returns its path. An entry of that name that is no directory (a file, FIFO or link to
    nothing made there during the run) is renamed to ckpt-<step>.moved-aside, a line saying
    so appended to `notes`.

    On any error (disk full, permissions) or KeyboardInterrupt the partial temporary directory
    is removed and the previous checkpoints are as they were: a re-save's checkpoint of its
    step, set aside, is put back (a process killed between the two renames cannot, nor can
    a put-back whose rename fails: that checkpoint is restored by the next list_checkpoints,
    _restore_interrupted_re_saves, its new copy .tmp-ckpt-* kept as the mark of it)."""
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    old = run_dir / f".old-{checkpoint_name(step)}-{os.getpid()}"
    # before the try: a leftover of another process is none of this save's to put back
    old_to_put_back = _remove_superseded_set_aside(old)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        meta = {"format": "pt", "producer": "cllm-gpu", "step": str(step)}
        safetensors_io.save_file(params, tmp / "model.safetensors", metadata=meta)
        opt = {}
        for name in params:
            opt[f"{name}.exp_avg"] = adam_m[name]
            opt[f"{name}.exp_avg_sq"] = adam_v[name]
        safetensors_io.save_file(opt, tmp / "optimizer.safetensors", metadata=meta)
        files = {}
        for fn in FILES:
            p = tmp / fn
            files[fn] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = dict(state)
        manifest.update({"format": FORMAT, "version": VERSION, "step": step, "files": files})
        with open(tmp / "state.json", "w") as f:
            f.write(to_json(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.lexists(final) and not final.is_dir():
            kind, moved = _entry_kind(final), _move_aside(final)
            if notes is not None:
                notes.append(f"{final} is a {kind}, not a checkpoint: moved to {moved} to save "
                             f"step {step} there")
        if final.exists():  # a checkpoint of this step exists (e.g. re-save after resume)
            old_to_put_back = True  # before the rename: a Ctrl-C may land right after it
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException as e:  # a Ctrl-C too: the trainer's second SIGINT lands anywhere
        if old_to_put_back:  # first: the temporary is only the new copy
            _put_back(old, final)
        stuck = old_to_put_back and old.exists() and not final.exists()  # put-back failed
        if not stuck:  # else the new copy stays: it marks `old` as one to restore, not prune
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        where = (f"the checkpoint of step {step} is set aside as {old.name}, which the next "
                 f"resume, save, sample or eval of {run_dir} puts back" if stuck
                 else "previous checkpoints are intact")
        raise CheckpointError(f"{final}: could not write checkpoint ({e.strerror or e}); "
                              f"{where}") from None
    _settle_in_place(old, run_dir)
    if keep is not None:
        prune_checkpoints(run_dir, keep, also_keep=final)
    return final


def _move_aside(entry: Path) -> Path:
    """Rename `entry`, named like a checkpoint and none, to <name>.moved-aside (-2, -3, ...
    where taken): a name no listing, prune or clean-up takes for a checkpoint or a leftover.
    Set aside as a re-save's .old-ckpt-* instead, a file stayed hidden for good (no clean-up
    removes what is no directory), and a FIFO was opened to be deleted: training hung there."""
    moved, n = entry.with_name(f"{entry.name}.moved-aside"), 1
    while os.path.lexists(moved):
        n += 1
        moved = entry.with_name(f"{entry.name}.moved-aside-{n}")
    os.replace(entry, moved)
    return moved


def _remove_superseded_set_aside(old: Path) -> bool:
    """This save's set-aside name (.old-ckpt-N-<pid>) holding an earlier process's copy, of the
    same pid (pid 1 in every container): killed after its re-save's new ckpt-N was renamed in,
    before deleting it. Left there, a re-save's rename of ckpt-N onto it failed ("Directory not
    empty"), and a failed save of step N put it back as ckpt-N (_put_back: what that save had
    set aside, it took it for), superseded as it is. Removed first, unless it is a checkpoint
    to restore (_interrupted_re_save: then a failed save rightly puts it back). Best effort:
    one that cannot be removed stays, and is no checkpoint a failed save puts back.
    Returns whether `old` is a checkpoint to restore."""
    if not old.is_dir():
        return False
    if _interrupted_re_save(old) is not None:
        return True
    _remove_tree(old)
    return False


def _settle_in_place(old: Path, run_dir: Path):
    """After the new checkpoint is renamed into place: it is complete (its files and its
    directory fsynced before the rename), so nothing here may report the save as failed or put
    the set-aside `old` back over it (a failing directory fsync did both: the error said the
    write failed while the new checkpoint was in place, and the old one stayed as .old-ckpt-*).
    The rename's durability is best effort, as _fsync_dir's is everywhere; the old checkpoint
    of the step is replaced, as a re-save means."""
    try:
        _fsync_dir(run_dir)
    except OSError:  # its close can still fail (EIO): the rename stands
        pass
    _remove_tree(old)


def _put_back(old: Path, final: Path):
    """A re-save that failed or was interrupted (Ctrl-C) after setting the checkpoint of its
    step aside (as `old`): that checkpoint goes back under its name, as the error and the
    CLI's "checkpoints on disk are intact" promise (before 2026-12-02 a Ctrl-C between the
    renames left it as .old-ckpt-*, which no resume found and the next prune deleted)."""
    if old.exists() and not final.exists():
        try:
            os.replace(old, final)
            _fsync_dir(final.parent)
        except OSError:
            pass


def list_checkpoints(run_dir) -> list[Path]:
    """ckpt-* directories in run_dir, newest (highest step) first. A checkpoint that a killed
    re-save left set aside is first renamed back under its name (_restore_interrupted_re_saves):
    resume, the trainer's check of --out and prune all list checkpoints here."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    _restore_interrupted_re_saves(run_dir)
    return _checkpoint_dirs(run_dir)


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    """ckpt-* directories in run_dir, newest first, as they are."""
    found = [(checkpoint_step(p), p) for p in run_dir.iterdir()
             if CKPT_RE.match(p.name) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def non_checkpoints_named_like_one(run_dir) -> list[tuple[Path, str]]:
    """Entries of run_dir named ckpt-N that are no directory, each with what it is ("file",
    "dangling link", ...): listings pass over them, but a save of step N would meet one (a
    file it renamed aside to .old-ckpt-N-<pid>, hidden for good; a dangling link failed it)."""
    return [(p, _entry_kind(p)) for p in sorted(Path(run_dir).iterdir())
            if CKPT_RE.match(p.name) and not p.is_dir()]


def _entry_kind(p: Path) -> str:
    """What an entry that is no directory is, in words: file, dangling link, link, fifo,
    special file."""
    if p.is_symlink():
        return "link" if p.exists() else "dangling link"
    if p.is_file():
        return "file"
    return "fifo" if p.is_fifo() else "special file"


SET_ASIDE_RE = re.compile(r"^\.old-(ckpt-\d{8,})-([^-]+)$")


def _interrupted_re_save(old: Path) -> Path | None:
    """The checkpoint directory an .old-ckpt-N-<pid> belongs back in, when it is the
    checkpoint of step N that a re-save set aside and never replaced: ckpt-N is missing and
    the new copy, .tmp-ckpt-N-<pid>, was never renamed in (that writer was killed, or
    interrupted again while putting it back). An .old-ckpt-* without its .tmp- is one whose
    replacement was renamed into place: superseded, whatever became of ckpt-N since."""
    m = SET_ASIDE_RE.match(old.name)
    if m is None:
        return None
    name, pid = m.groups()
    final = old.parent / name
    if os.path.lexists(final) or not (old.parent / f".tmp-{name}-{pid}").is_dir():
        return None
    return final


class _SetAside(NamedTuple):
    """An interrupted re-save's checkpoint that could not be renamed back to `final`."""
    copy: Path
    final: Path
    error: OSError


def _restore_interrupted_re_saves(run_dir: Path) -> list[_SetAside]:
    """A writer killed (kill -9, a container stopped) between a re-save's two renames left
    its step's checkpoint only as .old-ckpt-N-<pid>: no resume found it and the next prune
    deleted it as a leftover (before 2026-12-02). It is renamed back to ckpt-N (it was
    ckpt-N, complete, when set aside); the new copy is left to prune. A writer still running
    is between its renames now: left alone. Returns those whose rename failed (a read-only
    run directory): they stay set aside, kept, and find_resumable reads them in place."""
    stuck = []
    for old in sorted(run_dir.glob(".old-ckpt-*")):
        final = _interrupted_re_save(old)  # again for each: one of its step may be back now
        if final is None or not left_by_a_finished_writer(old.name.rsplit("-", 1)[-1]):
            continue
        try:
            os.replace(old, final)
        except OSError as e:
            if not os.path.lexists(final):  # else another process renamed it back first
                stuck.append(_SetAside(old, final, e))
            continue
        _fsync_dir(run_dir)
    return stuck


def _read_in_place_note(set_aside: _SetAside) -> str:
    return (f"reading {set_aside.copy.name} in place: the checkpoint of step "
            f"{checkpoint_step(set_aside.final)}, set aside by a re-save killed between its "
            f"renames, could not be renamed back to {set_aside.final.name} "
            f"({set_aside.error.strerror or set_aside.error}); renaming it to "
            f"{set_aside.final.name} there restores it")


def _restore_the_named_step(path: Path) -> _SetAside | None:
    """`path`, missing, names RUN/ckpt-N (or is a link to it: latest -> RUN/ckpt-N): a re-save
    of step N killed between its renames left that checkpoint set aside, which a listing of RUN
    renames back; a resume, sample, eval or export naming the step does it too (before, it was
    "no such checkpoint" until something listed RUN). Returns the set-aside checkpoint of
    step N where it could not be renamed back."""
    # a link's target, where the checkpoint goes back (realpath: a link loop raises nothing)
    target = Path(os.path.realpath(path))
    if not (CKPT_RE.match(target.name) and target.parent.is_dir()):
        return None
    return next((s for s in _restore_interrupted_re_saves(target.parent)
                 if s.final == target), None)


def _resume_candidates(run_dir: Path) -> list[tuple[Path, list[str]]]:
    """The checkpoints of run_dir a resume tries, newest first, each with the notes it brings:
    its ckpt-* directories and, where a killed re-save's set-aside checkpoint could not be
    renamed back (a read-only mount), that copy in its step's place, read there (before, a
    resume of the run took the older checkpoint, or found none, without a word)."""
    stuck = _restore_interrupted_re_saves(run_dir)
    # a step's ckpt-N first, should one be there after all: the sort keeps this order
    found = [(checkpoint_step(p), p, []) for p in _checkpoint_dirs(run_dir)]
    found += [(checkpoint_step(s.final), s.copy, [_read_in_place_note(s)]) for s in stuck]
    found.sort(key=lambda c: c[0], reverse=True)
    one_per_step = {}
    for step, ck, notes in found:
        one_per_step.setdefault(step, (ck, notes))
    return list(one_per_step.values())


def checkpoint_step(path: Path) -> int:
    """The step in a ckpt-<step> directory's name."""
    return int(CKPT_RE.match(Path(path).name).group(1))


def discard_checkpoint(path: Path):
    """Remove a checkpoint directory without ever exposing a half-deleted one under its name:
    rename it out of the way (atomic), then delete."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    try:
        os.replace(path, trash)
    except OSError:
        return
    _remove_tree(trash)


def _remove_tree(path: Path):
    """Remove a checkpoint directory, or the link it is (a checkpoint linked into the run from
    elsewhere: its target, outside the run, stays); best effort. rmtree refuses a link, and
    its error ignored left the renamed link (.trash-ckpt-*, .old-ckpt-*) for good."""
    if path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass
    elif path.is_dir():  # rmtree opens what it removes: a FIFO there blocked for good
        shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(run_dir, keep: int, also_keep: Path | None = None):
    """Keep the `keep` newest checkpoints, and `also_keep` (the one just written: a newer
    checkpoint that does not verify, left by an earlier run, must not push it out)."""
    for p in list_checkpoints(run_dir)[keep:]:
        if p != also_keep:
            discard_checkpoint(p)
    remove_leftovers(run_dir)


def remove_leftovers(run_dir):
    """The .tmp-, .trash- and .old-ckpt-* directories that killed writers left in run_dir
    (a checkpoint half written, half deleted, or superseded), as checkpoint-sized as the
    checkpoints; not a running writer's, nor an interrupted re-save's checkpoint still to be
    put back. Each save's prune calls it, and the trainer at its start: a resume with nothing
    left to train saves nothing (before 2026-12-02 what a kill in the last save's prune left
    stayed for good)."""
    for pattern in (".tmp-ckpt-*", ".trash-ckpt-*", ".old-ckpt-*"):
        for p in Path(run_dir).glob(pattern):
            if (left_by_a_finished_writer(p.name.rsplit("-", 1)[-1])
                    and not _kept_to_restore(p)):
                _remove_tree(p)


def _kept_to_restore(leftover: Path) -> bool:
    """An interrupted re-save's set-aside checkpoint that could not be renamed back (see
    list_checkpoints), or the new copy that marks it as one: never deleted."""
    old = leftover
    if leftover.name.startswith(".tmp-"):
        old = leftover.with_name(".old-" + leftover.name[len(".tmp-"):])
    return old.is_dir() and _interrupted_re_save(old) is not None


def left_by_a_finished_writer(pid_str) -> bool:
    """Whether the writer a .tmp-/.trash-/.old-ckpt-<pid> leftover (or the trainer's
    .write-test-<pid>-* probe) names has no save in progress: a process that is gone, or this
    one. A process saves one checkpoint after
    another (the trainer calls save_checkpoint from its one training thread, and prunes only
    at the end of a save), so a leftover named by this process's pid is an earlier
    process's with the same pid: the Dockerfile's ENTRYPOINT makes the trainer pid 1 in every
    container, and a container killed mid-save left its temporaries to the next."""
    try:
        if int(pid_str) == os.getpid():
            return True
    except ValueError:
        return True
    return not _pid_alive(pid_str)


def _pid_alive(pid_str) -> bool:
    try:
        pid = int(pid_str)
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:  # EPERM: it runs, as a user we may not signal
        return True
    except (OSError, OverflowError):  # ESRCH: no such process; Overflow: past any pid
        return False
    return True


def read_manifest(ckpt_dir) -> dict:
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "state.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)")
    if path.stat().st_size > MAX_STATE_BYTES:
        raise CheckpointError(f"{path}: implausibly large ({path.stat().st_size} bytes)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    state = parse_json(raw, path, CheckpointError)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cllm-gpu checkpoint manifest")
    # true == 1 in Python: a JSON true is no version (the step's check refuses it too)
    if isinstance(state.get("version"), bool) or state.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported version {state.get('version')!r}")
    step = state.get("step")
    if not _is_count(step, 0):
        raise CheckpointError(f"{path}: bad step {step!r}")
    # the name is what a listing sorts, prunes and resumes by: a copy or rename by hand made
    # an old checkpoint the run's "newest" (resumed, then refused as newer than itself;
    # sampled and exported in the newest one's place)
    if CKPT_RE.match(ckpt_dir.name) and checkpoint_step(ckpt_dir) != step:
        raise CheckpointError(f"{ckpt_dir}: its state.json records step {step}, not the step "
                              f"its name says ({checkpoint_step(ckpt_dir)}); name it "
                              f"{checkpoint_name(step)}, or move it out of the run directory")
    files = state.get("files")
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise CheckpointError(f"{path}: manifest must list exactly {', '.join(FILES)}")
    for fn, info in files.items():
        if (not isinstance(info, dict) or not isinstance(info.get("bytes"), int)
                or not isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"{path}: bad entry for {fn}")
    _check_run_state(state, path)
    return state


GPT2_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


def _is_count(v, lowest: int) -> bool:
    """v is a JSON integer (not true / false, which Python counts as ints) of at least lowest."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= lowest


def _check_run_state(state: dict, path: Path):
    """The run's fields of a manifest, checked as the trainer, sample, eval and export read
    them: a wrong value there is refused here, naming the file and the field, rather than
    failing later in whichever command reads it. model_config is required; the others may be
    absent (older checkpoints, checkpoints written by other tools): their readers have
    defaults."""
    if "model_config" not in state:
        raise CheckpointError(f"{path}: no model_config")
    # GPT-2's own fields, written by every version: one missing would take the Python API's
    # default silently (n_head changes no shape, so the weights would load and compute another
    # model); the options added later (dropout, attn_bias, ...) may be absent
    missing = [k for k in GPT2_FIELDS if isinstance(state["model_config"], dict)
               and k not in state["model_config"]]
    if missing:
        raise CheckpointError(f"{path}: model_config lacks {', '.join(missing)}")
    for key, cls in (("model_config", ModelConfig), ("train_config", TrainConfig)):
        fields = state.get(key, {})
        if isinstance(fields, dict) and cls is TrainConfig:
            # fields a later version dropped are ignored on resume (cli._train_config): here too
            fields = {k: v for k, v in fields.items() if k in cls.__dataclass_fields__}
        try:
            cls.from_dict(fields)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {key}: {e}") from None
    if state.get("dtype", "float32") not in ("float32", "float64"):
        raise CheckpointError(f"{path}: dtype must be 'float32' or 'float64', got "
                              f"{state['dtype']!r}")
    data = state.get("data", {})
    if not isinstance(data, dict) or not isinstance(data.get("dir", ""), str):
        raise CheckpointError(f"{path}: data must be a JSON object whose dir is a string, "
                              f"got {data!r}")
    _check_recorded_tokenizer(data.get("tokenizer"), path)
    prepared = data.get("prepared")
    if prepared is not None and not (isinstance(prepared, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in prepared.values())):
        raise CheckpointError(f"{path}: data.prepared must be a JSON object of numbers, got "
                              f"{prepared!r}")
    if not isinstance(state.get("rng", {}), dict):
        raise CheckpointError(f"{path}: rng must be a JSON object, got {state['rng']!r}")
    for key, lowest in (("tokens_seen", 0), ("nonfinite_skips", 0), ("global_batch", 1),
                        ("world_size", 1), ("val_batch_size", 1)):
        v = state.get(key, lowest)
        if not _is_count(v, lowest):
            raise CheckpointError(f"{path}: {key} must be an integer >= {lowest}, got {v!r}")
    _check_best_val(state, path)
    _check_final_sample(state.get("final_sample"), path)
    if not isinstance(state.get("init_from"), (str, type(None))):
        raise CheckpointError(f"{path}: init_from must be a string or null, got "
                              f"{state['init_from']!r}")


def _check_best_val(state: dict, path: Path):
    """best_val_loss / best_val_step: the run's best evaluation up to the checkpoint, both or
    neither (null: no evaluation yet; absent: written before they were recorded)."""
    loss, step = state.get("best_val_loss"), state.get("best_val_step")
    if loss is None and step is None:
        return
    if (isinstance(loss, bool) or not isinstance(loss, (int, float))
            or not math.isfinite(loss)):
        raise CheckpointError(f"{path}: best_val_loss must be a finite number or null, got "
                              f"{loss!r}")
    if not _is_count(step, 1) or step > state["step"]:
        raise CheckpointError(f"{path}: best_val_step must be an integer in 1..{state['step']} "
                              f"(the checkpoint's step) with best_val_loss, got {step!r}")


def _check_final_sample(fs, path, error=CheckpointError):
    """final_sample: the settings of train's sample at the end (cli), which a resumed run
    keeps; absent (written before they were recorded) or null (a run that recorded none).
    error, path: the exception and where (GpuTrainer checks its argument with ConfigError, so
    that no run records what its own checkpoints would be refused for)."""
    if fs is None:
        return
    temperature = fs.get("temperature") if isinstance(fs, dict) else None
    if (not isinstance(fs, dict) or not isinstance(fs.get("prompt"), str)
            or not _is_count(fs.get("tokens"), 0)
            or isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0 <= temperature < math.inf
            or not (fs.get("top_k") is None or _is_count(fs["top_k"], 1))):
        raise error(f"{path}: final_sample must be a JSON object with prompt (a string), "
                    f"tokens (an integer >= 0), temperature (a finite number >= 0) and top_k "
                    f"(an integer >= 1 or null), got {fs!r}")


def _check_recorded_tokenizer(tok, path: Path):
    """data.tokenizer: the identity of the run's tokenizer (data.tokenizer_identity), absent
    in checkpoints written before it was recorded."""
    if tok is None:
        return
    if (not isinstance(tok, dict) or not isinstance(tok.get("tokenizer"), str)
            or not _is_count(tok.get("vocab_size"), 1)
            or not (tok.get("eot_id") is None or _is_count(tok["eot_id"], 0))
            or not isinstance(tok.get("tokenizer_sha256", ""), str)
            or not isinstance(tok.get("add_special_tokens", False), bool)):
        raise CheckpointError(f"{path}: data.tokenizer must be a JSON object with tokenizer "
                              f"(a string), vocab_size (an integer >= 1), eot_id (an integer "
                              f">= 0 or null) and optionally tokenizer_sha256 (a string) and "
                              f"add_special_tokens (true or false), got {tok!r}")


def recorded_tokenizer(state: dict) -> dict | None:
    """The identity of the tokenizer a verified manifest's run was trained with (None: it
    records none)."""
    return state.get("data", {}).get("tokenizer")


def recorded_data_fingerprint(state: dict) -> dict | None:
    """The data_fingerprint of the data a verified manifest's run was trained on (None: it
    records none: written before 2026-12-04)."""
    return state.get("data", {}).get("prepared")


def recorded_data_dir(state: dict) -> str | None:
    """The token directory a verified manifest records (None: it records none)."""
    return state.get("data", {}).get("dir") or None


def verify_checkpoint(ckpt_dir) -> dict:
    """Check every file's presence, size and SHA-256 against the manifest; return the manifest."""
    ckpt_dir = Path(ckpt_dir)
    state = read_manifest(ckpt_dir)
    for fn, info in state["files"].items():
        p = ckpt_dir / fn
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{p}: size {size} differs from the manifest's {info['bytes']}")
        if sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{p}: SHA-256 differs from the manifest (corrupt file)")
    return state


def load_checkpoint(ckpt_dir, specs, state: dict | None = None) -> tuple[dict, dict, dict, dict]:
    """Verify and read a checkpoint. `specs`: the model's ParamSpecs (names and shapes).
    `state`: its manifest as returned by verify_checkpoint / find_resumable, to skip hashing
    the files a second time. Returns (state, params, adam_m, adam_v) as host arrays."""
    ckpt_dir = Path(ckpt_dir)
    state = verify_checkpoint(ckpt_dir) if state is None else state
    want = {s.name: s.shape for s in specs}
    params = load_model_params(ckpt_dir, specs, state)
    opt, _ = safetensors_io.load_file(ckpt_dir / "optimizer.safetensors")
    opt_want = {}
    for n, shp in want.items():
        opt_want[f"{n}.exp_avg"] = shp
        opt_want[f"{n}.exp_avg_sq"] = shp
    _match(ckpt_dir / "optimizer.safetensors", opt, opt_want, state.get("dtype"))
    _check_finite(ckpt_dir / "optimizer.safetensors", opt)
    for n in want:  # a negative second moment makes AdamW's square root NaN
        if (opt[f"{n}.exp_avg_sq"] < 0).any():
            raise CheckpointError(f"{ckpt_dir / 'optimizer.safetensors'}: {n}.exp_avg_sq holds "
                                  f"negative values")
    m = {n: opt[f"{n}.exp_avg"] for n in want}
    v = {n: opt[f"{n}.exp_avg_sq"] for n in want}
    return state, params, m, v


def load_model_params(ckpt_dir, specs, state: dict | None = None) -> dict:
    """Verify a checkpoint (unless `state`, its verified manifest, is given) and read only its
    parameters (for inference and export), checked against `specs`."""
    ckpt_dir = Path(ckpt_dir)
    if state is None:
        state = verify_checkpoint(ckpt_dir)
    params, _ = safetensors_io.load_file(ckpt_dir / "model.safetensors")
    _match(ckpt_dir / "model.safetensors", params, {s.name: s.shape for s in specs},
           state.get("dtype"))
    _check_finite(ckpt_dir / "model.safetensors", params)
    return params


def _check_finite(path, tensors):
    """A training run's numbers are finite (a non-finite gradient is never applied): a NaN or
    Inf is damage, or an update that overflowed; refused, rather than resumed into a run whose
    every step is NaN (its stop would save that state again as the last good one)."""
    for n, a in tensors.items():
        if not np.isfinite(a).all():
            raise CheckpointError(f"{path}: {n} holds NaN or Inf values")


def _match(path, tensors, want, dtype=None):
    """The tensors are `want`'s names and shapes, in the float type the run computes in
    (`dtype`, the manifest's; float32 or float64 when it records none): an integer tensor of
    the same byte size would otherwise load as its integers, silently."""
    dtypes = (np.dtype(dtype),) if dtype else (np.dtype(np.float32), np.dtype(np.float64))
    missing = sorted(set(want) - set(tensors))
    unknown = sorted(set(tensors) - set(want))
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]}"
                              + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensor {unknown[0]}")
    for n, shp in want.items():
        if tuple(tensors[n].shape) != tuple(shp):
            raise CheckpointError(f"{path}: {n} has shape {tuple(tensors[n].shape)}, "
                                  f"the model expects {tuple(shp)}")
        if tensors[n].dtype not in dtypes:
            raise CheckpointError(f"{path}: {n} is {tensors[n].dtype}, the checkpoint's dtype "
                                  f"is {' or '.join(d.name for d in dtypes)}")


class Resumable(NamedTuple):
    """A checkpoint that find_resumable verified: pass it on instead of its path so that
    nothing hashes its files again."""
    dir: Path
    state: dict
    notes: list


def find_resumable(path) -> Resumable:
    """`path` is a checkpoint directory or a run directory holding ckpt-* directories (or a
    Resumable, returned as is). Returns (checkpoint dir, verified manifest, notes about
    skipped newer checkpoints and a killed re-save's checkpoint read in place, where it could
    not be renamed back: _resume_candidates)."""
    if isinstance(path, Resumable):
        return path
    path = Path(path)
    if not path.exists():
        set_aside = _restore_the_named_step(path)
        if set_aside is not None:
            return Resumable(set_aside.copy, verify_checkpoint(set_aside.copy),
                             [_read_in_place_note(set_aside)])
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file, not a checkpoint or run directory")
    # named like a checkpoint and holding none: one missing its manifest, refused as such; a
    # run directory so named (ckpt-20261204, a date) holds checkpoints
    if (path / "state.json").exists() or (CKPT_RE.match(path.name)
                                          and not _checkpoint_dirs(path)):
        return Resumable(path, verify_checkpoint(path), [])
    notes = []
    for ck, in_place in _resume_candidates(path):
        try:
            return Resumable(ck, verify_checkpoint(ck), notes + in_place)
        except CheckpointError as e:
            notes.append(f"skipped {ck.name}: {e}")
    extra = f" ({'; '.join(notes)})" if notes else ""
    raise CheckpointError(f"{path}: no complete, verified checkpoint in it{extra}")
