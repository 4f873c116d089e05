"""GpuTrainer: arenas, activation cache, AdamW, gradient accumulation, LR schedule, evaluation,
logging and checkpoints. Uses the CUDA backend when CuPy and a GPU are present, NumPy otherwise.

Started by a launcher with several ranks (distributed.detect_launch), it trains data-parallel:
each optimizer step's global batch of ranks x batch_size x grad_accum_steps sequences is drawn
from one RNG stream shared by all ranks, each rank computes its part (rank r's micro-batch k is
global micro-batch k * ranks + r), and data_parallel.DataParallel reduces the gradients. Only
rank 0 logs and writes files; a checkpoint does not depend on the number of ranks."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import numbers
import os
import signal
import stat
import time
from pathlib import Path

try:
    import fcntl  # POSIX: the run directory's lock; elsewhere runs go unlocked
except ImportError:  # pragma: no cover
    fcntl = None

import numpy as np

from . import checkpoint as ckpt
from . import distributed as dist
from . import hf
from .backend import (HostMemory, available_memory, describe_backend, device_peak_tflops,
                      resolve_backend)
from .config import ModelConfig, TrainConfig
from .data import (TokenDataset, check_run_tokenizer, data_change_note, data_fingerprint,
                   directory_lock, load_tokenizer, missing_dirs, remove_empty_dirs,
                   tokenizer_identity)
from .data_parallel import DataParallel
from .errors import (CheckpointError, CLLMError, CollectiveError, ConfigError, DataError,
                     NonFiniteError, print_progress, refuse_a_file_for_a_directory)
from .json_text import to_json
from .model import CLLMModel, check_kernels_take, check_model_fits, check_training_fits
from .nvtx_ranges import nvtx_range
from .ops.host_threads import host_threads
from .sampling import sample_text, start_ids
from .train_step import StepValues, training_step

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Under a launcher the first signal may come twice: sent to every process at once (systemd
# stopping a unit, Slurm's scancel) and forwarded by the launcher too, milliseconds apart. A
# repeat within this long is that one stop, not a second (srun's own Ctrl-C uses 1 s too).
REPEATED_SIGNAL_S = 1.0
# With several ranks, the most wall time of training between two meetings where they agree on
# a stop signal: one far apart in steps (a long --log-interval) would outlast a scheduler's
# grace before SIGKILL (Slurm's KillWait: 30 s)
STOP_CHECK_S = 1.0


def agree_host_memory(comm, local_size: int) -> HostMemory | None:
    """The host memory a data-parallel set-up's memory checks compare with, the same figures
    on every rank: each rank reads what its host has available, then a gather, which no rank
    leaves before every rank has read (none has allocated anything yet), picks the tightest
    host's (the least per rank). The ranks of one host share its memory: each checking its
    own need against what was available at its own moment passed two ranks that together did
    not fit (the host killed them in step 1), and a rank that read after another had built
    its model judged the run by other figures than that one. None where no rank can read it
    (no check then)."""
    free = available_memory(np)
    rows = comm.allgather_host(np.array([-1.0 if free is None else float(free),
                                         float(local_size)]))  # float64: NCCL has no int64
    known = [(int(f), int(n)) for f, n in rows if f >= 0]
    if not known:
        return None
    return HostMemory(*min(known, key=lambda fn: (fn[0] // fn[1], fn)))


def _same_directory(a, b) -> bool:
    """Whether paths a and b name one directory (as written, or the same file on disk): the
    run's own data given as its absolute path is not other data."""
    if b is None:
        return False
    if Path(a) == Path(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is gone
        return False


# flock'ed by the train writing the run directory (rank 0), its pid inside; removed by it when
# done (a lock left by a killed train is taken over by the next)
RUN_LOCK = ".train-lock"


def lock_run_dir(out_dir: Path):
    """The run directory's lock, held (an open file: unlock_run_dir releases it; the process's
    end, a kill -9 too, also does), or None where the file system has no such locks. Two
    trains writing one run directory interleaved their metrics and replaced each other's
    checkpoints of a step, both exiting 0: the second is refused, ConfigError naming the
    first by its pid."""
    if fcntl is None:
        return None
    path = out_dir / RUN_LOCK
    while True:
        try:  # never through a link: its target was truncated to hold our pid
            f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                                  0o666), "a+")
        except OSError as e:
            why = ("it is a link: remove it" if e.errno == errno.ELOOP
                   else e.strerror or e)
            raise ConfigError(f"{path}: cannot open the run directory's lock ({why})") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise _run_dir_in_use(out_dir, holder) from None
        except OSError:  # no locks here (some network file systems): unlocked, as before
            f.close()
            return None
        try:  # still the file named so: a holder that removed it when done left us its inode
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
    except OSError as e:  # a full disk: the train's first write (it named no file, and the
        # lock file stayed, holding the new run directory it was made in)
        with contextlib.suppress(OSError):
            path.unlink()
        with contextlib.suppress(OSError):  # its close flushes the pid again
            f.close()
        raise ConfigError(f"{path}: cannot write the run directory's lock "
                          f"({e.strerror or e})") from None
    return f


def _run_dir_in_use(out_dir: Path, holder: str) -> ConfigError:
    return ConfigError(f"{out_dir}: another train{f' (pid {holder})' if holder else ''} is "
                       f"writing to this run directory; wait for it to end, or give another "
                       f"--out")


def refuse_a_run_dir_in_use(out_dir: Path):
    """lock_run_dir's refusal where another train holds out_dir's lock; nothing where none
    does. Probed with a shared lock on the lock file if there is one, which meets a holder's
    exclusive lock, and neither taken nor any file made: for a caller that will not write
    (a resume that found no checkpoint to continue, whose writer has yet to save one)."""
    if fcntl is None:
        return
    try:
        f = os.fdopen(os.open(out_dir / RUN_LOCK, os.O_RDONLY | os.O_NOFOLLOW))
    except OSError:
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _run_dir_in_use(out_dir, f.read().strip()) from None
        except OSError:
            return


def unlock_run_dir(lock, out_dir: Path):
    """Release lock_run_dir's lock, removing its file first (while held: a train that opened
    it meanwhile finds it gone, and locks a new one)."""
    try:
        (out_dir / RUN_LOCK).unlink()
    except OSError:
        pass
    lock.close()


class GpuTrainer:
    """Train a CLLMModel on a token directory, writing metrics and checkpoints to out_dir.

    resume: a checkpoint directory or a run directory (the newest verified ckpt-* is used, or
    a killed re-save's set-aside copy of its step where it cannot be renamed back), or the
    Resumable that checkpoint.find_resumable returned for one.
    A new run (no resume) refuses an out_dir that already holds checkpoints, so that a later
    --resume cannot pick up another run's state; overwrite=True clears them first.

    launch: who this process is among the ranks (default: distributed.detect_launch() reads
    the launcher's environment). With more than one rank the set-up is collective: an error on
    any rank, or a setting that differs between ranks, raises CollectiveError on every rank.
    init_from: a Hugging Face GPT-2 directory (config.json + model.safetensors or its shards)
    whose weights start a new run; model_cfg may then be None (the directory's, vocabulary
    padded to a multiple of 64) or must describe the same GPT-2.
    comm: the communicator of `launch` when the caller opened one already
    (distributed.open_communicator, same backend); default: opened here.
    final_sample: the settings of the sample the caller draws when the run ends (the CLI's
    prompt, tokens, temperature, top_k), recorded in state.json for a later --resume; None:
    a resumed run keeps its checkpoint's, a new one records none. Given with tokens > 0, its
    prompt is checked at set-up with the data's tokenizer (DataError), which sample() uses."""

    def __init__(self, model_cfg: ModelConfig | None, train_cfg: TrainConfig, data_dir,
                 out_dir, backend: str = "auto", resume=None, log=None, overwrite: bool = False,
                 init_from=None, launch: dist.Launch | None = None,
                 comm: dist.Communicator | None = None, keep_global_batch: bool = True,
                 final_sample: dict | None = None):
        if model_cfg is not None and not isinstance(model_cfg, ModelConfig):
            raise ConfigError(f"model_cfg must be a ModelConfig (or None), got "
                              f"{type(model_cfg).__name__}")
        if not isinstance(train_cfg, TrainConfig):
            raise ConfigError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
        if log is not None and not callable(log):  # first called after --overwrite's deletion
            raise ConfigError(f"log must be callable (a function taking each line), got {log!r}")
        # before any work: a path of another type was a TypeError from pathlib, and a truthy
        # overwrite that is no bool ('no') deleted the earlier run
        for name, path, optional in (("data_dir", data_dir, False), ("out_dir", out_dir, False),
                                     ("resume", resume, True), ("init_from", init_from, True)):
            if not (isinstance(path, (str, os.PathLike)) or (optional and path is None)
                    or (name == "resume" and isinstance(path, ckpt.Resumable))):
                raise ConfigError(f"{name} must be a path (str or os.PathLike)"
                                  f"{' or None' if optional else ''}, got {path!r}")
        if not isinstance(overwrite, (bool, np.bool_)):
            raise ConfigError(f"overwrite must be True or False, got {overwrite!r}")
        launch = launch or dist.detect_launch()
        ckpt._check_final_sample(final_sample, "GpuTrainer", ConfigError)  # state.json's rule
        # a copy: the caller's dict, changed after, went into the run's checkpoints unchecked
        self.final_sample = None if final_sample is None else dict(final_sample)
        # the caller's own (a resumed run's recorded settings are not checked for it)
        self._final_prompt = (final_sample["prompt"] if final_sample
                              and final_sample.get("tokens", 0) > 0 else None)
        self._tokenizer = None  # the data's, loaded once: sample()'s
        self.rank, self.world = launch.rank, launch.world_size
        self._launched = launch.launcher != "none"  # signals may also come forwarded by it
        self._signal_at = -math.inf
        self.local_size = max(launch.local_size, 1)  # the ranks on this host (this one too)
        self.keep_global_batch = keep_global_batch
        log = log or print_progress
        self.log = log if self.rank == 0 else (lambda msg: None)
        if comm is None:
            backend, self.comm = dist.open_communicator(launch, backend, train_cfg.dist_timeout)
        else:  # opened by the caller (the CLI, to agree on its own errors first)
            backend, _ = resolve_backend(backend)
            self.comm = comm
            self.comm.timeout = train_cfg.dist_timeout
        self.watchdog = None
        self._run_lock = None  # rank 0's, from the run directory's checks to train()'s end
        # the directories the set-up made for --out (it, then its new parents), which a refusal
        # after it removes again where they are still empty
        self._made_dirs = []
        # lines on the settings the set-up changed: logged once it passed (not before an error)
        self._setup_notes = []
        self._host_memory = None  # one process: its checks read the memory available then
        if self.world > 1:
            self.watchdog = dist.Watchdog(train_cfg.dist_timeout, self.rank, self.comm.abort)
            self._host_memory = agree_host_memory(self.comm, self.local_size)
            error = None
            try:
                self._setup(model_cfg, train_cfg, data_dir, out_dir, backend, resume,
                            overwrite, init_from)
            except CollectiveError:  # the agreement before rank 0 writes: every rank has it
                raise
            except CLLMError as e:
                # refused before that agreement, this rank meets the others' there with its
                # error here; refused after it (rank 0's run directory), at the next
                error = str(e)
            try:
                self.comm.agree(error)
            except BaseException:  # another rank's refusal: the run directory goes too
                self._release_run_lock()
                self._remove_made_dirs()
                raise
            for note in self._setup_notes:
                self.log(note)
            self.log(f"data parallel: {self.world} ranks ({launch.launcher} launch, "
                     f"{self.comm.name}); global batch {self.world} x {self.train_cfg.batch_size}"
                     f" x {self.train_cfg.grad_accum_steps} sequences; {self.dp.describe()}")
        else:
            self._setup(model_cfg, train_cfg, data_dir, out_dir, backend, resume, overwrite,
                            init_from)
            for note in self._setup_notes:
                self.log(note)

    def _setup(self, *args):
        try:
            self._set_up(*args)
        except BaseException:  # refused: the run directory is not this trainer's to hold
            self._release_run_lock()
            self._remove_made_dirs()
            raise

    def _remove_made_dirs(self):
        """Remove the directories the set-up made, where still empty (a refusal after rank 0
        made a new run directory: the ranks' settings compared after it)."""
        remove_empty_dirs(self._made_dirs)
        self._made_dirs = []

    def _release_run_lock(self):
        if self._run_lock is not None:
            unlock_run_dir(self._run_lock, self.out_dir)
            self._run_lock = None

    def _set_up(self, model_cfg, tc, data_dir, out_dir, backend, resume, overwrite, init_from):
        # copies, validated again: the caller may change theirs after (the next run's), and
        # this run's checkpoints must record the settings its arenas and cache were built for
        tc = dataclasses.replace(tc)
        if model_cfg is not None:
            model_cfg = dataclasses.replace(model_cfg)
        self.train_cfg = tc
        self.out_dir = Path(out_dir)
        resume_state = None
        self._resumed_from = None
        if init_from is not None and resume is not None:
            raise ConfigError("--init-from and --resume exclude each other (a resumed run "
                              "continues from its own weights)")
        if resume is not None:
            ck_dir, resume_state, notes = ckpt.find_resumable(resume)
            self._resumed_from = ck_dir
            for n in notes:
                self.log(f"warning: {n}")
            saved_cfg = ModelConfig.from_dict(resume_state["model_config"])
            if model_cfg is not None and model_cfg != saved_cfg:
                raise CheckpointError(f"{ck_dir}: checkpoint model config {saved_cfg} does not "
                                      f"match the requested {model_cfg}")
            model_cfg = saved_cfg
            if self.final_sample is None:
                self.final_sample = resume_state.get("final_sample")
            if resume_state.get("dtype", tc.dtype) != tc.dtype:
                raise CheckpointError(f"{ck_dir}: checkpoint dtype {resume_state['dtype']} "
                                      f"differs from --dtype {tc.dtype}")
            if self.keep_global_batch:
                self.train_cfg = tc = self._keep_global_batch(tc, resume_state)
            self.train_cfg = tc = self._keep_run_seed(tc, resume_state)
        # --init-from's config.json, tokenizer.json and weights of one export: another export
        # renaming its files into the directory meanwhile (write_files) waits until the
        # weights are read (before, one landing after the tokenizer check started the run
        # from weights of another tokenizer)
        with (directory_lock(Path(init_from), shared=True) if init_from is not None
              else contextlib.nullcontext()):
            if init_from is not None:
                hf_cfg = hf.gpt2_model_config(init_from)
                if model_cfg is None:
                    model_cfg = hf_cfg
                else:  # the caller's config (its padding, its other options), the same GPT-2
                    hf.check_matches_gpt2(model_cfg, hf_cfg, Path(init_from) / "config.json")
            if model_cfg is None:
                raise ConfigError("a model config is needed when not resuming")
            self.model_cfg = model_cfg
            # the tokenizer checks are of the meta.json the token files were opened with (one
            # read: a prepare landing between a check's own read and the opening passed other
            # data)
            self.data = TokenDataset(data_dir)
            if init_from is not None:  # before the vocabulary sizes: the tokenizer says why
                hf.check_tokenizer_matches(init_from, self.data.dir, self.data.meta)
            if resume is not None:  # the run's tokenizer (an older checkpoint records none)
                note = check_run_tokenizer(ckpt.recorded_tokenizer(resume_state),
                                           self.data.dir, self.data.meta, ck_dir)
                # unchecked: said for data other than the run's own, as sample and eval say it
                # for --data (the CLI passes the recorded directory when --data is not given)
                if note and not _same_directory(data_dir, ckpt.recorded_data_dir(resume_state)):
                    self._setup_notes.append(f"note: {note}")
                note = data_change_note(ckpt.recorded_data_fingerprint(resume_state),
                                        self.data.dir, self.data.meta, ck_dir)
                if note:
                    self._setup_notes.append(f"note: {note}")
            self.data.require_vocab(model_cfg.vocab_size)
            if self._final_prompt is not None:
                self._check_final_prompt(self._final_prompt)
            self.T = tc.seq_len or model_cfg.block_size
            if self.T > model_cfg.block_size:
                raise ConfigError(f"seq_len ({self.T}) must be <= block_size "
                                  f"({model_cfg.block_size})", ["seq_len", "block_size"])
            # val.bin is read only by validation passes: --eval-interval 0 trains on a corpus too
            # small to hold one back
            self.data.require_block(self.T, ("train", "val") if tc.eval_interval else ("train",))
            # the token ids of a step's batch, refused before --overwrite discards the run in
            # --out: each rank holds its own micro-batches (get_batch's rows), and the ranks on
            # one host hold theirs in its memory at once
            host = self._host_memory
            ranks = self.local_size if host is None else host.ranks
            self.data.require_batch(ranks * tc.batch_size * tc.grad_accum_steps, self.T, host)
            # a model too large for the memory is refused before the run directory exists, and
            # before --init-from's tensors are laid out for it (config.json's n_layer 1e300 made
            # that layout run for ever)
            backend_name, xp = resolve_backend(backend)
            check_kernels_take(model_cfg, tc.dtype, xp)  # so is one the kernels cannot run
            if xp is np:  # and a bad CLLM_CPU_THREADS (read at the first op otherwise)
                host_threads()
            # ZeRO-1: the rank's moment shards (DataParallel) are the only Adam moments; the
            # model's full ones are never made, so they never count in the build's peak
            adam_moments = not (self.world > 1 and tc.zero)
            # (on the NumPy backend the ranks of one host each against their share of it)
            check_model_fits(model_cfg, tc.dtype, tc.precision, xp, adam_moments, host)
            # and with this rank's micro-batch (the activation cache's shape): a step that cannot
            # fit is refused here, in one line, not by an out-of-memory error in step 1
            # and the end-of-run sample's (1, t) cache, which replaces the training cache
            check_training_fits(model_cfg, tc.dtype, tc.precision, xp, tc.batch_size, self.T,
                                tc.grad_accum_steps, self.world, tc.zero, host,
                                *self._final_sample_size(model_cfg))
            # read before the run directory exists: a bad weights file leaves nothing behind
            hf_state = (hf.load_gpt2_state_dict(init_from, model_cfg) if init_from is not None
                        else None)
        if self.world > 1:
            # every rank's checks and settings first: --overwrite discarded the run in --out
            # before a refusal on another rank (its data, or a setting that differs) ended the
            # job
            self.comm.agree(None)
            self.comm.check_same("the run's settings", self._fingerprint(backend_name, init_from))
        if self.rank == 0:  # the only rank that writes
            self._prepare_out_dir(resume_state, overwrite)
        self.model = CLLMModel(model_cfg, backend=backend, dtype=tc.dtype, seed=tc.seed,
                               precision=tc.precision, adam_moments=adam_moments)
        self.init_from = None
        if hf_state is not None:
            self.model.load_state_dict(hf_state)
            del hf_state
            self.init_from = str(init_from)
            pad = model_cfg.padded_vocab_size - model_cfg.vocab_size
            self.log(f"initialized from {init_from} (Hugging Face GPT-2"
                     + (f"; vocabulary {model_cfg.vocab_size:,} padded to "
                        f"{model_cfg.padded_vocab_size:,} for the kernels" if pad else "") + ")")
        self.backend = self.model.backend
        self.dp = None
        if self.world > 1:
            self.dp = DataParallel(self.model, self.comm, zero=tc.zero, overlap=tc.overlap_comm,
                                   bucket_mb=tc.bucket_mb)
        elif tc.zero:
            self.log("zero: ignored in a single process (nothing to shard across)")
        tf32 = self.backend == "cuda" and os.environ.get("CUPY_TF32") == "1"
        self.log(f"using {describe_backend(self.backend)}"
                 + ("; float32 matmuls in TF32 on tensor cores" if tf32 else "")
                 + ("; bf16 mixed precision (bf16 matmul operands, fp32 accumulation and master "
                    "weights)" if tc.precision == "bf16" else ""))
        self.rng = np.random.default_rng(tc.seed)
        # the validation set's draws are of the batch size the run started with, whatever a
        # resume's --batch-size: another one measured the val loss on other windows
        self.val_batch_size = tc.batch_size
        self.step = 0
        self.nonfinite_skips = 0
        self.step_values = StepValues(self.model.xp)
        self._pending = []       # steps whose figures are not read yet (on the device on CUDA)
        self.tokens_seen = 0
        # (val loss, step) of the run's best evaluation, resumes included (state.json)
        self.best_val = None
        self._graph = None       # CUDA + cuda_graph: the captured step (cuda_graph.StepGraph)
        if tc.cuda_graph:
            if self.backend != "cuda":
                self.log("cuda_graph: ignored on the NumPy backend (a CUDA graph captures GPU "
                         "work); training un-captured")
            elif self.dp is not None:
                self.log("cuda_graph: not combined with data parallelism yet; training "
                         "un-captured")
            else:
                try:
                    from .cuda_graph import StepGraph
                    self._graph = StepGraph(self.model, tc, self.step_values, self.log)
                except Exception as e:  # never lose training to the graph
                    self.log(f"warning: CUDA graph set-up failed ({type(e).__name__}: {e}); "
                             f"continuing without a CUDA graph")
        if resume_state is not None:
            self._restore(ck_dir, resume_state)
            self.log(f"resumed from {ck_dir} at step {self.step}")
        self._stop_signal = None
        # the signal another rank got, where the ranks stopped on it together: this rank's exit
        # status (train's summary 'signal') when it got none itself
        self._others_signal = None
        self.last_val_loss = None
        self.last_checkpoint = ck_dir if resume_state is not None else None
        # whether a step was applied since last_checkpoint was saved or resumed: a non-finite
        # stop with none has nothing newer to save
        self._updated_since_checkpoint = False
        # the step a second signal (or an error) left during or after its update, before it
        # was counted: parameters and moments a step on from a count that says otherwise, so
        # this trainer neither trains on nor saves (a resume from a checkpoint is exact)
        self._torn_step = None

    # ------------------------------------------------------------------ setup helpers
    def _prepare_out_dir(self, resume_state, overwrite):
        self._check_out_dir()
        # before the directory is read: its checkpoints are no other writer's to prune or
        # delete, nor to be taken for none yet
        self._run_lock = lock_run_dir(self.out_dir)
        for stray, kind in ckpt.non_checkpoints_named_like_one(self.out_dir):
            raise ConfigError(f"{stray}: named like a checkpoint but no checkpoint directory "
                              f"(a {kind}); a save of step {ckpt.checkpoint_step(stray)} would "
                              f"move it aside: move it out of the run directory or rename it")
        existing = ckpt.list_checkpoints(self.out_dir)
        if resume_state is not None:
            self._check_resume_out_dir(existing, resume_state["step"])
        elif existing and not overwrite:
            raise ConfigError(self._holds_checkpoints(existing))
        elif overwrite:  # metrics.jsonl too, also where the earlier run saved no checkpoint
            for p in existing:
                ckpt.discard_checkpoint(p)
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        # after the list (it puts back set-aside ones) and after the refusals: a refused train
        # removes nothing, though a leftover's pid may name a live trainer of this run where
        # that pid tells nothing (pid 1 in another container on the volume)
        ckpt.remove_leftovers(self.out_dir)

    def _holds_checkpoints(self, existing) -> str:
        """A new run's refusal of an --out holding checkpoints, with the ways out that work:
        where none of them verifies, --resume is none (it was advised, and then failed: "no
        complete, verified checkpoint in it"). Hashes them only on this refusal, newest first,
        up to the first that verifies."""
        problems = []
        for p in existing:
            try:
                ckpt.verify_checkpoint(p)
            except CheckpointError as e:
                problems.append(f"{p.name}: {e}")
                continue
            return (f"{self.out_dir} already holds checkpoints (newest {existing[0].name}): "
                    f"use --resume to continue that run, --overwrite to start over there, or "
                    f"another --out")
        # the advice before the details (the problems can be long)
        return (f"{self.out_dir} already holds checkpoints, none of which verifies: --resume "
                f"has nothing to continue; use --overwrite to start over there (deleting "
                f"them), or another --out ({'; '.join(problems)})")

    def _check_resume_out_dir(self, existing, step: int):
        """A resumed run writes its checkpoints beside the ones already in --out, and pruning
        keeps the newest steps: a checkpoint of another run there, or a newer one of this run
        (resuming an older checkpoint), would make it delete the new checkpoints or be resumed
        in their place: refused. Newer checkpoints that do not verify (the resume skipped them)
        stay: a later resume skips them too, and pruning never removes the newest save."""
        ck = self._resumed_from
        if not existing:
            return
        # the run of a checkpoint reached through a symlink (latest -> run/ckpt-N) is the
        # directory the link points into
        if self.out_dir.resolve() not in (ck.parent.resolve(), ck.resolve().parent):
            raise ConfigError(f"{self.out_dir} already holds checkpoints of another run (newest "
                              f"{existing[0].name}): resuming {ck} there would mix the two "
                              f"runs and prune theirs; give an empty --out, or leave --out out "
                              f"to continue in {ck.parent}")
        for newer in (p for p in existing if ckpt.checkpoint_step(p) > step):
            try:
                ckpt.verify_checkpoint(newer)
            except CheckpointError:
                continue
            raise ConfigError(f"{self.out_dir} holds {newer.name}, newer than the checkpoint "
                              f"resumed ({ck.name}): training on from {ck.name} here would "
                              f"prune the new checkpoints first and a later --resume would take "
                              f"{newer.name}; move the newer checkpoints away, or give another "
                              f"--out")

    def _keep_global_batch(self, tc, state) -> TrainConfig:
        """Resuming on another number of ranks continues the same run: the global batch
        (ranks x batch_size x grad_accum_steps sequences) of the checkpoint is kept by changing
        grad_accum_steps, unless it was changed on purpose (then the new value stands; the
        caller says so with keep_global_batch=False when the value given equals the
        checkpoint's: the CLI, for a --grad-accum-steps given again)."""
        saved_tc, saved_world = state.get("train_config", {}), int(state.get("world_size", 1))
        saved_k = saved_tc.get("grad_accum_steps", tc.grad_accum_steps)
        glob = int(state.get("global_batch", saved_world * saved_tc.get("batch_size", 0)
                             * saved_k))
        if saved_world == self.world or tc.grad_accum_steps != saved_k or glob < 1 \
                or self.world * tc.batch_size * tc.grad_accum_steps == glob:
            return tc
        per_step = self.world * tc.batch_size
        if glob % self.world:  # no batch size helps: say what does
            raise ConfigError(f"the checkpoint's global batch of {glob} sequences ({saved_world} "
                              f"rank(s)) does not split evenly over {self.world} ranks: resume "
                              f"on a number of ranks that divides {glob}, or set "
                              f"--grad-accum-steps (and --batch-size) to choose a new global "
                              f"batch")
        if glob % per_step:
            raise ConfigError(f"the checkpoint's global batch of {glob} sequences ({saved_world} "
                              f"rank(s)) cannot be split into {self.world} ranks x batch size "
                              f"{tc.batch_size}: choose a --batch-size that makes ranks x batch "
                              f"size divide {glob}, or set --grad-accum-steps to change the "
                              f"global batch")
        self._setup_notes.append(f"world size {saved_world} -> {self.world}: grad_accum_steps "
                                 f"{saved_k} -> {glob // per_step} keeps the global batch of "
                                 f"{glob} sequences")
        return dataclasses.replace(tc, grad_accum_steps=glob // per_step)

    def _keep_run_seed(self, tc, state) -> TrainConfig:
        """A resumed run keeps its checkpoint's seed: its data stream goes on from the
        checkpoint's RNG state whatever the seed, but the validation batches (seed + 1) and the
        dropout masks follow the seed, so another one measured the val loss on other windows
        after the resume than before it, and the data did not change as asked."""
        saved = state.get("train_config", {}).get("seed", tc.seed)
        if saved == tc.seed:
            return tc
        self._setup_notes.append(f"note: --seed {tc.seed} ignored on resume: a resumed run keeps "
                                 f"its checkpoint's seed {saved} (its data goes on from the "
                                 f"checkpoint's position, its validation batches and dropout "
                                 f"masks are that seed's)")
        return dataclasses.replace(tc, seed=saved)

    def _fingerprint(self, backend: str, init_from) -> dict:
        """What must be the same on every rank (compared across ranks at start, before rank 0
        touches the run directory), by name: model.<field>, train.<field>, data (its
        meta.json), ..."""
        ck = self._resumed_from
        parts = {"backend": backend, "data": self.data.meta, "out": str(self.out_dir),
                 "resume": str(ck) if ck else None,
                 "init_from": None if init_from is None else str(init_from),
                 "resume_files": ckpt.read_manifest(ck).get("files") if ck else None}
        parts.update({f"model.{k}": v for k, v in self.model_cfg.to_dict().items()})
        parts.update({f"train.{k}": v for k, v in self.train_cfg.to_dict().items()})
        return {k: json.dumps(v, sort_keys=True) for k, v in parts.items()}

    def _check_out_dir(self):
        refuse_a_file_for_a_directory(self.out_dir, "--out", "run directory")
        # its ckpt-* and metrics.jsonl went inside the checkpoint, where no resume of the run
        # finds them and the run's pruning of that checkpoint deletes them with it
        if (self.out_dir / "state.json").exists():
            raise ConfigError(f"{self.out_dir}: holds a checkpoint (state.json), not a run "
                              f"directory: give --out another (the checkpoint's run directory "
                              f"is {self.out_dir.parent})")
        missing = missing_dirs(self.out_dir.absolute())
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._made_dirs = missing
            _remove_dead_write_probes(self.out_dir)
            probe = self.out_dir / f".write-test-{os.getpid()}-{id(self)}"
            probe.write_bytes(b"")
            probe.unlink(missing_ok=True)  # missing: another trainer's clean-up took it
        except OSError as e:
            raise ConfigError(f"{self.out_dir}: output directory is not writable "
                              f"({e.strerror})") from None

    def _restore(self, ck_dir, verified_state):
        state, params, m, v = ckpt.load_checkpoint(ck_dir, self.model.specs, verified_state)
        self.model.load_state_dict(params)
        if self.dp is not None:
            self.dp.load_moments(m, v)
        else:
            xp = self.model.xp
            for s in self.model.specs:
                self.model.adam_m[s.name][...] = xp.asarray(m[s.name], dtype=self.model.dtype)
                self.model.adam_v[s.name][...] = xp.asarray(v[s.name], dtype=self.model.dtype)
        self.step = state["step"]
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.init_from = state.get("init_from")
        # absent in checkpoints written before 2026-12-04: the batch size they evaluated with
        self.val_batch_size = int(state.get("val_batch_size", state.get(
            "train_config", {}).get("batch_size", self.val_batch_size)))
        if state.get("best_val_loss") is not None:  # absent in checkpoints written before it
            self.best_val = (float(state["best_val_loss"]), int(state["best_val_step"]))
        try:
            _check_pcg64_words(state["rng"])
            self.rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # Overflow: < 0, >= 2^128
            raise CheckpointError(f"{ck_dir / 'state.json'}: bad RNG state ({e})") from None

    def _state(self) -> dict:
        return {"model_config": self.model_cfg.to_dict(), "train_config": self.train_cfg.to_dict(),
                "dtype": self.train_cfg.dtype, "backend": self.backend,
                "rng": self.rng.bit_generator.state, "tokens_seen": self.tokens_seen,
                "nonfinite_skips": self.nonfinite_skips, "world_size": self.world,
                "global_batch": self.world * self.train_cfg.batch_size
                * self.train_cfg.grad_accum_steps,
                "data": {"dir": str(self.data.dir), "tokens_seen": self.tokens_seen,
                         "tokenizer": tokenizer_identity(self.data.meta),
                         "prepared": data_fingerprint(self.data.meta),
                         "sampling": "uniform random windows; position = rng state"},
                "init_from": self.init_from, "val_loss": self.last_val_loss,
                "best_val_loss": self.best_val and self.best_val[0],
                "best_val_step": self.best_val and self.best_val[1],
                "val_batch_size": self.val_batch_size, "final_sample": self.final_sample}

    def save_checkpoint(self, prune: bool = True) -> Path:
        """Write a checkpoint (rank 0; with several ranks every rank must call this: the
        parameters are compared across ranks first, and ZeRO gathers the moments). prune:
        then keep only the --keep-checkpoints newest."""
        self._refuse_if_torn(every_rank=True)
        m = self.model
        host = lambda arena: {s.name: m._to_host(arena[s.name]) for s in m.specs}  # noqa: E731
        self._beat("checkpoint")
        with nvtx_range("checkpoint"):
            params = host(m.params)
            if self.dp is not None:
                digest = hashlib.blake2b(digest_size=16)
                for s in m.specs:
                    digest.update(np.ascontiguousarray(params[s.name]).tobytes())
                self.comm.check_same(f"the parameters at step {self.step}", digest.digest())
                adam_m, adam_v = self.dp.moments_host()
            else:
                adam_m, adam_v = host(m.adam_m), host(m.adam_v)
            if self.rank == 0:
                path = self._write_checkpoint(params, adam_m, adam_v, prune)
            else:
                path = self.out_dir / ckpt.checkpoint_name(self.step)
                # rank 0's write may outlast --dist-timeout (a slow disk is no hang): wait for
                # it without that limit; rank 0 dying in it is the launcher's to see
                with self._hold("waiting for rank 0's checkpoint write"):
                    self.comm.agree(None, timeout=math.inf)
        self._beat("training")
        self.last_checkpoint = path
        self._updated_since_checkpoint = False
        return path

    def _write_checkpoint(self, params, adam_m, adam_v, prune: bool = True) -> Path:
        """Rank 0's write, then (several ranks) the word that ends the others' wait: done, or
        failed (they exit 1 quietly; this rank says why and ends the job)."""
        notes = []  # an entry of the checkpoint's name, made during the run, moved aside
        try:
            with self._hold("checkpoint write"), self._run_dir_held():
                path = ckpt.save_checkpoint(self.out_dir, self.step, params, adam_m, adam_v,
                                            self._state(),
                                            keep=self.train_cfg.keep_checkpoints if prune else None,
                                            notes=notes)
        except BaseException as e:
            if self.world > 1:
                with contextlib.suppress(CLLMError):
                    self.comm.agree(f"rank 0 could not write the checkpoint of step "
                                    f"{self.step} ({type(e).__name__}): see rank 0's error")
            raise
        finally:
            for note in notes:
                self.log(f"warning: {note}")
        if self.world > 1:
            self.comm.agree(None)
        return path

    @contextlib.contextmanager
    def _run_dir_held(self):
        """The run directory's lock for a checkpoint write: held already inside train(); taken
        for the write outside it (save_checkpoint between train() calls), so that it is
        refused (ConfigError naming the holder) while another trainer writes there."""
        if self._run_lock is not None:
            yield
            return
        lock = self._lock_run_dir_again()
        try:
            yield
        finally:
            if lock is not None:
                unlock_run_dir(lock, self.out_dir)

    def _lock_run_dir_again(self):
        """lock_run_dir after the set-up (a train() or save_checkpoint() again): a run
        directory removed since is made again, as the checkpoint write would make it (its lock
        file's open failed first: "No such file or directory", naming no cause)."""
        if not self.out_dir.is_dir():
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"{self.out_dir}: the run directory was removed and cannot be "
                                  f"made again ({e.strerror or e})") from None
            self.log(f"warning: the run directory {self.out_dir} was removed after this "
                     f"trainer's set-up: made again (its earlier checkpoints and metrics are "
                     f"gone)")
        return lock_run_dir(self.out_dir)

    def _beat(self, what="training"):
        if self.watchdog is not None:
            self.watchdog.beat(what)

    def _hold(self, what):
        return self.watchdog.hold(what) if self.watchdog is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ one step
    def train_step(self):
        """One optimizer step over grad_accum_steps micro-batches (train_step.py says what a
        step means). Its figures stay where they were computed (on the device on CUDA) until
        `_resolve` reads them at log, eval and checkpoint points, so the host does not wait for
        the GPU every step. A torn step (_torn_step) is refused on its own rank only: agreed
        across ranks, it would cost a collective a step; a whole rank called alone meets the
        torn one in the gradient reduction, until dist_timeout (docs/reliability.md)."""
        self._refuse_if_torn()
        # the data position before this step's draw: put back if the step ends before its
        # update began (a second Ctrl-C in the forward), so a train() again runs this step on
        # the batch it would have had, as an uninterrupted run does
        position, attempt = self.rng.bit_generator.state, self.step + 1
        sv = self.step_values
        # set just before the update: by training_step, or by the CUDA graph at its launch (a
        # second Ctrl-C in a graph step's data draw left nothing changed)
        sv.update_begun = False
        try:
            self._train_step()
        except BaseException:
            if sv.update_begun:
                self._torn_step = attempt
            else:
                self.rng.bit_generator.state = position
            raise

    def _refuse_if_torn(self, every_rank: bool = False):
        """every_rank (train(), save_checkpoint(): every rank calls them): with several ranks
        the refusal is agreed, so that a rank whose step is whole (a second Ctrl-C reached it
        before or after its update) refuses too, not waits for the torn rank in a collective
        until --dist-timeout."""
        why = None if self._torn_step is None else (
            f"step {self._torn_step} was interrupted during its parameter update: this "
            f"trainer's state is not a whole step's; resume from its last checkpoint "
            f"(GpuTrainer(..., resume=...))")
        if every_rank and self.world > 1:
            self.comm.agree(why)
        elif why is not None:
            raise CLLMError(why)

    def _train_step(self):
        tc, m = self.train_cfg, self.model
        B, T, K, W = tc.batch_size, self.T, tc.grad_accum_steps, self.world
        # Draw every micro-batch first so each one's loss is weighted by 1 / (all valid targets):
        # K micro-batches then give exactly the gradient of one K-times larger batch. One draw
        # of the global batch from the shared stream; this rank reads its micro-batches only.
        if W == 1:
            idx, tgt = self.data.get_batch("train", B * K, T, self.rng)
        else:
            rows = np.concatenate([np.arange((k * W + self.rank) * B,
                                             (k * W + self.rank + 1) * B) for k in range(K)])
            idx, tgt = self.data.get_batch("train", W * B * K, T, self.rng, rows=rows)
        batches = [m.check_batch(idx[k * B:(k + 1) * B], tgt[k * B:(k + 1) * B])
                   for k in range(K)]
        n_valid = sum(b.n_valid for b in batches)
        lr, step = tc.lr_at(self.step), self.step + 1
        out = None
        if self._graph is not None and self._graph.active:
            out = self._graph.step(batches, lr, step, n_valid)  # None: capture failed
        if out is None:
            self.step_values.set_inputs(tc, lr, step, n_valid)
            training_step(m, (m.set_batch(b) for b in batches), tc, self.step_values,
                          dp=self.dp)
            out = self.step_values.outputs()
        self.step = step
        self.tokens_seen += W * B * T * K
        self._pending.append({"step": step, "lr": lr, "tokens": W * B * T * K, "out": out})

    def _resolve(self) -> list[dict]:
        """Read the figures of the pending steps (on CUDA: one wait for the GPU)."""
        out = [dict(step=r["step"], lr=r["lr"], tokens=r["tokens"],
                    **StepValues.read_outputs(r["out"])) for r in self._pending]
        self._pending = []
        return out

    def _param_at(self, index: int):
        for s in self.model.specs:
            if s.offset <= index < s.offset + s.size:
                return s.name
        return None

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "val") -> float:
        """Mean loss over eval_batches batches (the same ones every time: comparable). A batch
        is val_batch_size windows (the run's first batch size, kept by its resumes: the same
        set at any --batch-size), computed batch_size rows at a time. With several ranks, rank
        r evaluates batches r, r + ranks, ... and the sums are combined."""
        if split not in ("train", "val"):
            raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
        self.data.require_block(self.T, [split])
        return self._evaluate(split, stoppable=False)[0]

    def _evaluate(self, split: str, stoppable: bool):
        """(mean loss, None, late signals), or with `stoppable` (None, (batches done, the
        stop's signals), '') when a stop signal came in before the pass ended: it is abandoned
        between batches, where every rank asks _PassStop, before each round of `world` batches
        (one per rank), so that all ranks leave the pass at the same batch. Late signals: ''
        or those pending on any rank at the end of a whole pass (a signal too late to abandon
        it: in its last round, or with several ranks the one before), read with its sums:
        every rank gets the same."""
        tc = self.train_cfg
        rng = np.random.default_rng(tc.seed + 1)
        total, count = 0.0, 0
        stop = _PassStop(self) if stoppable else None
        rows = _EvalRows(tc.batch_size)

        def measure(batches):
            nonlocal total, count
            for idx, tgt in batches:
                self._beat("evaluation")
                s, n = self.model.eval_loss_sum(idx, tgt)
                total += float(s)
                count += n
        with nvtx_range("evaluate"):
            for j in range(tc.eval_batches):
                if stop is not None and j % self.world == 0:
                    signals = stop.signals()
                    if signals:
                        return None, (j, signals), ""
                idx, tgt = self.data.get_batch(split, self.val_batch_size, self.T, rng)
                if j % self.world == self.rank:
                    measure(rows.add(idx, tgt))
            measure(rows.rest())
            if stop is not None:
                stop.close()  # the pass is whole: the sums below carry the newer flags
        flags = [self._stop_signal or 0]
        if self.world > 1:
            sums = self.comm.allgather_host(np.array([total, count, flags[0]], dtype=np.float64))
            total, count = float(sums[:, 0].sum()), int(sums[:, 1].sum())
            flags = sums[:, 2]
        late = _signal_names(flags, self.world) if stoppable else ""
        if late:
            self._stopping_on(flags)
        return total / max(count, 1), None, late

    # ------------------------------------------------------------------ loop
    def _on_signal(self, signum, frame):
        now = time.monotonic()
        if self._stop_signal is not None:  # second signal: leave at once (checkpoints are atomic)
            if (self._launched and signum == self._stop_signal
                    and now - self._signal_at < REPEATED_SIGNAL_S):
                return  # the first one again, sent directly and forwarded by the launcher
            raise KeyboardInterrupt
        self._stop_signal, self._signal_at = signum, now
        self.log(f"received {signal.Signals(signum).name}: finishing this step (or abandoning "
                 f"a validation pass at its next batch), then saving a checkpoint (send it again "
                 f"to exit at once)")

    def train(self, max_steps: int | None = None) -> dict:
        """Run until max_steps (default: the config's), a signal, or a non-finite stop.
        Returns a summary with 'status' in {'done', 'interrupted'}.

        With several ranks a signal may reach them at different steps: the ranks agree at the
        next point where the figures are read (a progress line, evaluation or checkpoint), or
        at a step they agreed on about STOP_CHECK_S of training after their last meeting, and
        stop there together. A stop skips that step's evaluation, and a signal during one
        abandons it between batches (_PassStop): the checkpoint comes first (a scheduler's
        SIGKILL follows its SIGTERM after a grace period)."""
        self._refuse_if_torn(every_rank=True)
        tc = self.train_cfg
        max_steps = tc.max_steps if max_steps is None else _whole_number("max_steps", max_steps)
        metrics_path = self.out_dir / "metrics.jsonl"
        refused = None
        if self.rank == 0 and self._run_lock is None:  # a second train() of this trainer
            try:
                self._run_lock = self._lock_run_dir_again()
            except ConfigError as e:
                if self.world == 1:
                    raise
                refused = str(e)
        if self.world > 1:  # every rank has rank 0's refusal, not a wait until the timeout
            self.comm.agree(refused)
        # a signal that stopped an earlier train() of this trainer is handled: this call
        # neither stops on it nor takes its next one for a second signal (exit at once)
        self._stop_signal, self._others_signal, self._signal_at = None, None, -math.inf
        old_handlers = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: no signal handling
            old_handlers = {}
        status = "done"
        losses = []
        clock = RunClock(self.step, max_steps, self.tokens_seen, best=self.best_val)
        window_start, window_tokens = clock.start, 0
        # several ranks: the step of their next meeting on a stop signal, and when and at
        # which step the last one was (the steps between meetings: STOP_CHECK_S's worth)
        stop_check_step, met_at, met_step = self.step + 1, time.perf_counter(), self.step
        try:
            with MetricsLog(metrics_path if self.rank == 0 else None) as mf:
                # where this call starts: plot drops what the file holds past it (the steps a
                # resume re-runs, the records of a run begun over in this directory)
                mf.write({"type": "start", "step": self.step, "tokens": self.tokens_seen,
                          "time": time.time()})
                while self.step < max_steps:
                    self._beat()
                    self.train_step()
                    step = self.step
                    log_now = step % tc.log_interval == 0 or step == max_steps or step == 1
                    eval_now = tc.eval_interval and (step % tc.eval_interval == 0
                                                     or step == max_steps)
                    # at max_steps the final checkpoint is this one, when there is one
                    ckpt_now = tc.checkpoint_interval and step % tc.checkpoint_interval == 0 \
                        and not (step == max_steps and tc.final_checkpoint)
                    # several ranks: a collective decision, where the ranks meet anyway or at
                    # the step they agreed on at the last meeting
                    stop_now = self.world == 1 and self._stop_signal is not None
                    others = ""  # the signals of other ranks the ranks stop on, to say so
                    if self.world > 1 and (log_now or eval_now or ckpt_now
                                           or step >= stop_check_step):
                        now = time.perf_counter()
                        flags, step_s = self._signals_of_every_rank(
                            (now - met_at) / max(step - met_step, 1))
                        met_at, met_step = now, step
                        # from the same gathered figures: the same step on every rank
                        stop_check_step = step + max(1, int(STOP_CHECK_S / max(step_s, 1e-9)))
                        stop_now = bool(flags.any())
                        if stop_now and self._stop_signal is None:
                            others = _signal_names(flags, self.world)
                            self._stopping_on(flags)
                    if not (log_now or eval_now or ckpt_now or stop_now):
                        continue  # keep the GPU queue full: read the figures later
                    resolved = self._resolve()
                    self._consume(resolved, mf, losses)
                    # a skipped step's time is in the window: so are its tokens (tokens_seen
                    # counts them too)
                    window_tokens += sum(q["tokens"] for q in resolved)
                    good = [q for q in resolved if not q["nonfinite"]]
                    if log_now and good:
                        elapsed = time.perf_counter() - window_start
                        # the figures are the last good step's, and so are the step and the
                        # tokens seen they are logged with (a skipped log step has none)
                        last = good[-1]
                        tokens = self.tokens_seen - sum(q["tokens"] for q in resolved
                                                        if q["step"] > last["step"])
                        tps = window_tokens / max(elapsed, 1e-9)
                        ms = 1000 * elapsed * last["tokens"] / max(window_tokens, 1)
                        self.log(f"step {last['step']:6d}/{max_steps} | loss {last['loss']:.4f}"
                                 f" | lr {last['lr']:.2e} | norm {last['grad_norm']:.3f} | "
                                 f"{tps:,.0f} tok/s | {ms:.1f} ms/step | "
                                 f"{clock.progress(step)}")
                        rec = {"type": "train", "step": last["step"], "loss": last["loss"],
                               "lr": last["lr"], "grad_norm": last["grad_norm"],
                               "tokens_per_s": tps, "ms_per_step": ms,
                               "tokens": tokens, "time": time.time()}
                        mf.write(rec)
                        window_start, window_tokens = time.perf_counter(), 0
                    if eval_now and stop_now:  # the checkpoint first: SIGKILL may follow
                        self.log(f"step {step:6d} | validation skipped: stopping on a signal")
                    elif eval_now:
                        with clock.aside():
                            val_loss, abandoned, late = self._evaluate("val", stoppable=True)
                        if abandoned:
                            done, signals = abandoned
                            self.log(f"step {step:6d} | validation abandoned after {done} of "
                                     f"{tc.eval_batches} batches ({signals}): no val loss "
                                     f"recorded; saving a checkpoint")
                            stop_now = True
                        else:
                            self.last_val_loss = val_loss
                            clock.val_loss(step, self.last_val_loss)
                            self.best_val = clock.best
                            self.log(f"step {step:6d} | val loss {self.last_val_loss:.4f}")
                            mf.write({"type": "eval", "step": step,
                                      "val_loss": self.last_val_loss,
                                      "tokens": self.tokens_seen, "time": time.time()})
                            if late:  # too late to abandon: the checkpoint now, not a step on
                                self.log(f"step {step:6d} | stopping on a signal ({late}) "
                                         f"that came too late to abandon the pass")
                                stop_now = True
                    if ckpt_now:
                        with clock.aside():
                            self.log(f"saved {self.save_checkpoint()}")
                    if eval_now or ckpt_now:  # keep their time out of the throughput figure
                        window_start, window_tokens = time.perf_counter(), 0
                    if stop_now:
                        if others:  # (this rank said its own when it came)
                            self.log(f"step {step:6d} | stopping on a signal ({others})")
                        status = "interrupted"
                        break
                if self._pending:
                    self._consume(self._resolve(), mf, losses)
            if (tc.final_checkpoint or status == "interrupted") and (
                    self.last_checkpoint is None
                    or self.last_checkpoint.name != ckpt.checkpoint_name(self.step)):
                with clock.aside():
                    self.log(f"saved {self.save_checkpoint()}")
        except MetricsWriteError as e:
            raise CLLMError(f"{e}; {self._save_after_a_metrics_failure()}") from None
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            if self.watchdog is not None:  # rank 0 may still sample; the others just exit
                self.watchdog.stop()
            self._release_run_lock()  # its checkpoints are written: another train may go on
        totals = clock.summary(self.step, self.tokens_seen, self._mfu_of)
        self.log(clock.summary_line(totals))
        return {"status": status, "step": self.step, "losses": losses,
                "signal": self._stop_signal or self._others_signal,
                "val_loss": self.last_val_loss,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                **totals}

    def _save_after_a_metrics_failure(self) -> str:
        """The end of the error line of a run stopped by a metrics.jsonl append that failed: a
        checkpoint of the steps since the last one, tried once (it fails at once where the
        disk is still full; it is written where metrics.jsonl is elsewhere, a link to a full
        or failing disk, or space was freed). One process only: with several ranks the others
        would wait for a save only rank 0 knows of."""
        if self.world > 1 or not self._updated_since_checkpoint:
            return "checkpoints on disk are intact"
        try:
            return f"saved {self.save_checkpoint()}: the run resumes from it"
        except CLLMError as e:
            return f"a checkpoint of step {self.step} could not be saved either ({e})"

    def _mfu_of(self, tokens_per_s: float):
        """(model FLOPs utilisation, the peak it is against) on a GPU of known peak; else
        None. FLOPs per token: ModelConfig.flops_per_token (6N + attention)."""
        if self.backend != "cuda":
            return None
        kind = ("bf16" if self.train_cfg.precision == "bf16" else
                "tf32" if os.environ.get("CUPY_TF32") == "1" else "fp32")
        peak = device_peak_tflops(kind)
        if peak is None:
            return None
        flops = self.model_cfg.flops_per_token(self.T) * tokens_per_s / self.world  # per GPU
        return flops / (peak * 1e12), f"{kind} {peak:g} TFLOP/s"

    def _signals_of_every_rank(self, step_s: float):
        """(each rank's stop signal (0: none), in rank order; the longest of the ranks'
        `step_s`, seconds a step): the same on every rank."""
        rows = self.comm.allgather_host(np.array([self._stop_signal or 0, step_s],
                                                 dtype=np.float64))
        return rows[:, 0].astype(np.uint8), float(rows[:, 1].max())

    def _stopping_on(self, flags):
        """The ranks stop on the signals in `flags` (every rank's, in rank order): one that got
        none exits as the first signalled rank does (it exited 130, a Ctrl-C's status, on
        another rank's SIGTERM)."""
        self._others_signal = int(next(g for g in flags if g))

    def _consume(self, resolved, mf, losses):
        """Record resolved steps: losses of the good ones, the non-finite policy for the bad
        ones."""
        # every resolved step is in the parameters now (good ones applied, bad ones not),
        # those after a bad one too (the figures are read after the steps ran)
        if any(not q["nonfinite"] for q in resolved):
            self._updated_since_checkpoint = True
        for q in resolved:
            if q["nonfinite"]:
                self._handle_nonfinite(q, mf)
            else:
                losses.append(q["loss"])

    def _handle_nonfinite(self, r, mf):
        """The step's update was not applied. Skip the batch (policy 'skip', up to K times) or
        save the last good state and stop."""
        tc = self.train_cfg
        param = self._param_at(r["bad"]) if r["bad"] >= 0 else "none (loss only)"
        what = (f"non-finite loss/grad norm at step {r['step']} (loss {r['loss']}, "
                f"grad norm {r['grad_norm']}); first non-finite gradient: {param}")
        mf.write({"type": "nonfinite", "step": r["step"], "param": param, "time": time.time()})
        self.nonfinite_skips += 1
        if tc.on_nonfinite == "skip" and self.nonfinite_skips <= tc.max_nonfinite_skips:
            self.log(f"warning: {what}; batch skipped "
                     f"({self.nonfinite_skips}/{tc.max_nonfinite_skips})")
            return
        raise NonFiniteError(f"{what}; step not applied, {self._save_stopped_state()}; "
                             f"{self._nonfinite_advice(r)}")

    def _save_stopped_state(self) -> str:
        """The non-finite stop's checkpoint, and the words that say where it is. It does not
        prune: its weights may have diverged already (a loss that grew before it turned NaN),
        and the checkpoints before it are the ones to resume from then. With no update since
        the checkpoint saved or resumed, that one is the state: a new one would only add a
        copy (and each failed resume of a diverged state would push out a good one)."""
        if not self._updated_since_checkpoint and self.last_checkpoint is not None:
            return f"{self.last_checkpoint} holds the last good state (nothing newer to save)"
        return f"last good state saved to {self.save_checkpoint(prune=False)}"

    def _nonfinite_advice(self, r) -> str:
        """What to do about a non-finite stop, in the flags' own names."""
        tc = self.train_cfg
        clip = (f"a lower --grad-clip (now {tc.grad_clip:g})" if tc.grad_clip > 0
                else "--grad-clip 1")
        return (f"to go on, --resume with a lower --learning-rate (it was {r['lr']:.3g} at "
                f"this step) or {clip}; if that stops again at once, the weights have diverged: "
                f"resume an earlier checkpoint into another --out; --on-nonfinite skip steps "
                f"over a rare bad batch")

    # ------------------------------------------------------------------ sampling
    def _check_final_prompt(self, prompt: str):
        """The final sample's prompt encodes with the tokenizer of the data this run opened
        (its meta.json, read once): refused before step 1, not after the whole run. Checked
        with another read of meta.json (the CLI's, before), a prepare of another tokenizer
        landing between passed a prompt the run's own tokenizer refused."""
        tok = self.tokenizer()  # its own errors are the data's, not the prompt's
        try:
            tok.encode(prompt)
        except DataError as e:
            raise DataError(f"{e}; give the final sample another --prompt, or --sample-tokens "
                            f"0") from None

    def _final_sample_size(self, model_cfg) -> tuple[int, int]:
        """(tokens, prompt tokens) of the final sample, for the memory check: rank 0 draws it
        (the others have none: (0, 1)). The prompt's tokens as the sampler encodes them; a
        prompt the data's tokenizer cannot encode (a resumed run's recorded one, not checked:
        its sample would fail) is bounded by the block size, the most a context holds."""
        fs = self.final_sample
        if self.rank != 0 or not fs or fs.get("tokens", 0) < 1:
            return 0, 1
        try:
            prompt_tokens = len(start_ids(self.tokenizer(), fs["prompt"]))
        except DataError:
            prompt_tokens = model_cfg.block_size
        return fs["tokens"], prompt_tokens

    def tokenizer(self):
        """The data's tokenizer (of the meta.json the token files were opened with), loaded
        once: the final sample uses the one its prompt was checked with, and a tokenizer.json
        renamed over during the run does not refuse it."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.data.dir, self.data.meta)
        return self._tokenizer

    def sample(self, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
               top_k: int | None = 40, seed: int = 0) -> str:
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be text (str), got {prompt!r}")
        max_new_tokens = _whole_number("max_new_tokens", max_new_tokens)
        seed = _whole_number("seed", seed)  # NumPy's own ValueError or TypeError otherwise
        tok = self.tokenizer()
        # the training cache is not held beside the sample's (1, t) one: the memory check
        # counts the larger of the two (check_training_fits); nor is the CUDA graph, whose
        # kernels point into that cache (it is set up again if training goes on)
        if self._graph is not None:
            self._graph.release()
        self.model.release_activations()
        # nor is the sample's beside the next step's, if training goes on: sample_tokens drops
        # its own when it ends
        return sample_text(self.model, tok, prompt, max_new_tokens, temperature, top_k,
                           np.random.default_rng(seed))


def _whole_number(name: str, value) -> int:
    """value as an int >= 0 (NumPy integers too), or a ConfigError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _remove_dead_write_probes(out_dir: Path):
    """The write tests (.write-test-<pid>-<id>) of trainers killed between creating and
    removing theirs (kill -9 at set-up), by the rule checkpoint leftovers are removed by (a
    pid not running, or this process's own: pid 1 in each container). Before 2026-12-02 none
    was ever removed."""
    for probe in out_dir.glob(".write-test-*"):
        pid = probe.name[len(".write-test-"):].split("-", 1)[0]
        if ckpt.left_by_a_finished_writer(pid):
            with contextlib.suppress(OSError):
                probe.unlink()


class _EvalRows:
    """A validation pass's windows regrouped into batches of the training batch size, the
    activation cache's shape (no other is allocated): add() gives the whole batches the rows
    so far fill, rest() the last rows padded to a whole batch with ignored targets (-1)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._idx, self._tgt = [], []

    def add(self, idx, tgt):
        if not self._idx and len(idx) == self.batch_size:  # the run's own batch size
            yield idx, tgt
            return
        self._idx.append(idx)
        self._tgt.append(tgt)
        idx, tgt = np.concatenate(self._idx), np.concatenate(self._tgt)
        whole = len(idx) - len(idx) % self.batch_size
        for i in range(0, whole, self.batch_size):
            yield idx[i:i + self.batch_size], tgt[i:i + self.batch_size]
        self._idx, self._tgt = ([idx[whole:]], [tgt[whole:]]) if whole < len(idx) else ([], [])

    def rest(self):
        if not self._idx:
            return
        idx, tgt = np.concatenate(self._idx), np.concatenate(self._tgt)
        pad = self.batch_size - len(idx)
        yield (np.concatenate([idx, np.repeat(idx[:1], pad, axis=0)]),
               np.concatenate([tgt, np.full((pad, tgt.shape[1]), -1, dtype=tgt.dtype)]))
        self._idx, self._tgt = [], []


class _PassStop:
    """Is a stop signal pending on any rank? Asked before each round of a validation pass.
    One process: its own flag, at once. Several ranks: each round's flags travel in an
    all-gather started then and read at the next round, by when the other ranks started
    theirs (a batch ago), so reading it does not wait; every rank reads the same flags at the
    same round, and they leave the pass together one round after the signal's."""

    def __init__(self, trainer: GpuTrainer):
        self.trainer = trainer
        self._pending = None  # the rows of the gather started at the previous round

    def signals(self) -> str:
        """'' (go on), or the pending signals for the log: 'SIGTERM' (one process),
        'SIGTERM on rank 1' (several)."""
        tr = self.trainer
        if tr.world == 1:
            return _signal_names([tr._stop_signal or 0], 1)
        rows = self.close()
        if rows is not None and rows.any():
            tr._stopping_on(rows.ravel())
            return _signal_names(rows.ravel(), tr.world)
        self._pending = tr.comm.start_allgather_host(
            np.array([tr._stop_signal or 0], dtype=np.uint8))
        return ""

    def close(self):
        """End the gather in flight (every rank must, before its next collective): its rows,
        or None."""
        pending, self._pending = self._pending, None
        return pending() if pending is not None else None


def _signal_names(flags, world: int) -> str:
    """The pending signals in a gather of every rank's stop flag (the signal number, or 0),
    for the log: '' (none), 'SIGTERM' (one process), 'SIGTERM on rank 1' (several)."""
    if world == 1:
        return signal.Signals(int(flags[0])).name if flags[0] else ""
    return ", ".join(f"{signal.Signals(int(g)).name} on rank {r}"
                     for r, g in enumerate(flags) if g)


def _check_pcg64_words(rng_state):
    """The PCG64 state's two 128-bit words must lie in 0..2^128-1. NumPy 2 refuses one that
    does not (OverflowError); NumPy 1.x (pyproject allows numpy>=1.24) wraps a negative one
    with only a DeprecationWarning, and the resumed run would draw from another stream."""
    words = rng_state.get("state") if isinstance(rng_state, dict) else None
    for key in ("state", "inc"):
        v = words.get(key) if isinstance(words, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v < 2**128:
            raise ValueError(f"{key} {v} is not in 0..2^128-1")


class MetricsWriteError(CLLMError):
    """A metrics.jsonl append failed (message: the file and why, no more): train() says what
    it saved after it."""


class MetricsLog:
    """metrics.jsonl: one JSON record a line, written as it comes (None: a rank that writes
    nothing). A write that fails (disk full) is one error naming the file (an OSError there
    has no file name of its own), and the file is cut back to its last whole record: a full
    disk takes part of a record (write() returns short) before it fails, and the half record
    left made the next record appended (a resume's) a line no reader parses; `plot` refused
    the run. A partial record found at the end when opened (left so before 2026-12-04) is cut
    the same way."""

    # a record is a few hundred bytes: a tail longer than this without a newline is no
    # partial record of ours, and is left as it is
    PARTIAL_RECORD_MAX = 1 << 16

    def __init__(self, path):
        self.path = path
        # (a FIFO, a reader's: opened for writing, it waits for that reader, as before)
        self._fd = os.open(path if path is not None else os.devnull,
                           os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)  # else nothing to cut
        if self._regular:
            self._cut_partial_record()

    def _cut_partial_record(self):
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(size - self.PARTIAL_RECORD_MAX, 0)
                f.seek(start)
                tail = f.read()
        except OSError:  # a file this process may write but not read: left as it is
            return
        if not tail or tail.endswith(b"\n"):
            return
        end = tail.rfind(b"\n")
        if end >= 0 or start == 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start + end + 1)

    def write(self, record: dict):
        line = memoryview((to_json(record) + "\n").encode("utf-8"))
        size = None
        try:
            if self._regular:
                size = os.fstat(self._fd).st_size
            while line:
                line = line[os.write(self._fd, line):]
        except OSError as e:
            if size is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
            raise MetricsWriteError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):  # what it could not write was reported by write
            os.close(self._fd)


def format_duration(seconds: float) -> str:
    """A short, fixed-style duration for progress lines: 42s, 3m07s, 2h05m, 3d04h ('?' when
    unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class RunClock:
    """Wall time of one train() call: elapsed time and ETA for the progress lines, and the
    totals of the summary line. Evaluation and checkpoint time (`aside`) counts in the
    elapsed time and the ETA (they recur) but not in the training throughput. best: the
    run's best (val loss, step) before this call (a resumed run's, from its checkpoint)."""

    def __init__(self, step: int, max_steps: int, tokens: int, now=time.perf_counter,
                 best: tuple[float, int] | None = None):
        self.now = now
        self.start = now()
        self.first_step, self.max_steps, self.first_tokens = step, max_steps, tokens
        self.aside_s = 0.0
        self.best = best  # (val loss, step)

    @contextlib.contextmanager
    def aside(self):
        """Time spent in the block is not training time (evaluation, checkpoints)."""
        t0 = self.now()
        try:
            yield
        finally:
            self.aside_s += self.now() - t0

    def val_loss(self, step: int, loss: float):
        if math.isfinite(loss) and (self.best is None or loss < self.best[0]):
            self.best = (loss, step)

    def progress(self, step: int) -> str:
        elapsed = self.now() - self.start
        done = step - self.first_step
        eta = elapsed / done * (self.max_steps - step) if done > 0 else math.nan
        return f"elapsed {format_duration(elapsed)} | eta {format_duration(eta)}"

    def summary(self, step: int, tokens: int, mfu_of) -> dict:
        wall = self.now() - self.start
        train_s = max(wall - self.aside_s, 1e-9)
        tps = (tokens - self.first_tokens) / train_s
        out = {"steps_run": step - self.first_step, "tokens_seen": tokens, "wall_s": wall,
               "tokens_per_s": tps, "best_val_loss": self.best and self.best[0],
               "best_val_step": self.best and self.best[1], "mfu": None}
        mfu = mfu_of(tps) if step > self.first_step else None
        if mfu is not None:
            out["mfu"], out["mfu_peak"] = mfu
        return out

    @staticmethod
    def summary_line(t: dict) -> str:
        best = (f"best val loss {t['best_val_loss']:.4f} (step {t['best_val_step']})"
                if t["best_val_loss"] is not None else "no validation pass")
        mfu = f" | MFU {100 * t['mfu']:.1f}% of {t['mfu_peak']}" if t["mfu"] is not None else ""
        steps = f"{t['steps_run']} step{'' if t['steps_run'] == 1 else 's'}"
        return (f"summary: {steps} in {format_duration(t['wall_s'])} | "
                f"{t['tokens_seen']:,} tokens seen | {best} | "
                f"{t['tokens_per_s']:,.0f} tok/s mean{mfu}")
