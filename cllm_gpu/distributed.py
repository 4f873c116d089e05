"""Communication for data parallelism: who this process is (the launcher's variables), the
communicators (MPI on the host for the NumPy path, NCCL on the GPU, a world-size-1 one) and the
watchdog that ends a job which stops making progress.

Launchers (docs/distributed.md has the recipes): `mpirun` / `mpiexec` (Open MPI's OMPI_COMM_WORLD_*,
MPICH / Intel MPI's PMI_* and MPI_LOCAL*), `srun` (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
SLURM_LOCALID) and torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). None of them: one process.

A communicator moves flat, contiguous arrays of the model's backend:
    reduce_scatter(send, recv, counts)   sum over ranks of `send`; this rank receives its piece
                                         (counts[r] elements for rank r, in rank order) in recv
    all_gather(recv, counts, send=None)  every rank's piece into recv (send None: in place,
                                         this rank's piece already sits in recv)
Both return a handle and may still be running (MPI: non-blocking requests, driven by `progress`;
NCCL: queued on the communicator's own stream, ordered after the compute stream's work by an
event). `wait(handles)` makes the results visible to what comes next (MPI: the host; NCCL: the
compute stream, without the host waiting). An `after` handle delays an all-gather until that
reduce-scatter is done. Small values (the per-step partial sums, a config digest) go through
`allgather_rows`, `sum_in_place` and `allgather_host`, which keep rank order, so every rank
combines them in the same order and gets the same bits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from .errors import CLLMError, CollectiveError, ConfigError, print_line

DEFAULT_MASTER_PORT = 29500
DEFAULT_TIMEOUT_S = 300.0
_BYTES_SLOT = 256  # allgather_bytes: the longest message a rank can send (digests)
AGREE_MAX_BYTES = 1 << 16  # agree: the longest error a rank sends (a one-line error is far less)


# ------------------------------------------------------------------ launchers
@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    launcher: str              # "torchrun-style", "Open MPI", "MPICH / Intel MPI", "Slurm", "none"
    master_addr: str | None = None
    master_port: int | None = None
    run_id: str | None = None  # the launcher's id of this run (launch_run_id), or None
    restart: int = 0           # torchrun's restart of the worker group (0: the first start)
    agent_store: bool = False  # torchrun's own store serves MASTER_ADDR:MASTER_PORT

    @property
    def mpi_launched(self) -> bool:
        """Started by an MPI launcher: MPI_Init finds the other ranks."""
        return self.launcher in ("Open MPI", "MPICH / Intel MPI")


def _int_var(env, name, default=None):
    v = env.get(name)
    if v is None or v == "":
        if default is None:
            raise ConfigError(f"environment variable {name} is not set")
        return default
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {v!r}") from None


def detect_launch(env=None) -> Launch:
    """Rank, world size and local rank from the launcher's variables (first match wins:
    torchrun-style RANK/WORLD_SIZE, which are per worker even when torchrun itself runs under
    srun or mpiexec; then Open MPI, MPICH/Intel MPI, Slurm's srun; else one process).

    Under an MPI launcher or srun, RANK/WORLD_SIZE are torchrun's (its workers, started under
    that launcher) only when TORCHELASTIC_RUN_ID is set too, which torchrun sets in every worker;
    without it they are ignored, as left over in the environment (every process would read the
    same rank) or copied from the launcher's own by a wrapper script: the launcher's rank wins,
    the same decision on every process.

    Variables that cannot describe this process are refused (ConfigError) rather than read as
    some other rank: RANK without WORLD_SIZE (or the reverse) with no other launcher, and
    torchrun's naming fewer processes than the MPI / srun launch that started it."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR") or None, None
    if env.get("MASTER_PORT"):
        port = _int_var(env, "MASTER_PORT")
    outer = _launcher_launch(env, addr, port)
    torch_vars = [k for k in ("RANK", "WORLD_SIZE") if k in env]
    if outer is not None and "TORCHELASTIC_RUN_ID" not in env:
        torch_vars = []  # not torchrun's workers: the launcher's variables describe this process
    if len(torch_vars) == 2:
        rank, size = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        launch = Launch(rank, size, _int_var(env, "LOCAL_RANK", rank),
                        _int_var(env, "LOCAL_WORLD_SIZE", size), "torchrun-style",
                        addr or "127.0.0.1", port or DEFAULT_MASTER_PORT,
                        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
        if outer is not None and outer.world_size > size:
            # torchrun under srun / mpiexec starts at least one worker per launched process
            raise ConfigError(f"RANK={env['RANK']} WORLD_SIZE={env['WORLD_SIZE']} contradict the "
                              f"{outer.launcher} launch of {outer.world_size} processes (this "
                              f"one rank {outer.rank}): unset RANK and WORLD_SIZE (left over in "
                              f"the environment?), or start the ranks with torchrun alone")
    elif outer is not None:
        launch = outer
    elif torch_vars:
        have, missing = (("RANK", "WORLD_SIZE") if torch_vars == ["RANK"]
                         else ("WORLD_SIZE", "RANK"))
        raise ConfigError(f"{have} is set but {missing} is not: a torchrun-style launch sets "
                          f"both (and LOCAL_RANK, MASTER_ADDR, MASTER_PORT); unset {have} to "
                          f"train in one process")
    else:
        return Launch(0, 1, 0, 1, "none")
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise ConfigError(f"{launch.launcher} launch: rank {launch.rank} is not in "
                          f"[0, world size {launch.world_size})")
    if not 0 <= launch.local_rank < max(launch.local_size, 1):
        raise ConfigError(f"{launch.launcher} launch: local rank {launch.local_rank} is not in "
                          f"[0, local size {launch.local_size})")
    restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dataclasses.replace(launch, run_id=launch_run_id(env),
                               restart=int(restart) if restart.isdigit() else 0)


def launch_run_id(env) -> str | None:
    """An id the launcher gives this run, the same on every rank and another for the next run,
    or None: torchrun's TORCHELASTIC_RUN_ID (its rendezvous id: a new UUID with --standalone or
    on one node without --master-port, else --rdzv-id; "none", the default of --rdzv-id, is no
    id), else Slurm's SLURM_JOB_ID with SLURM_STEP_ID (each srun a new step; a batch script's
    own processes have no step id, and a job may start several runs). Rank 0's note of a failed
    default-corpus preparation carries it (cli._ensure_default_data)."""
    torchrun = env.get("TORCHELASTIC_RUN_ID", "")
    if torchrun not in ("", "none"):
        return f"torchrun {torchrun}"
    job, step = env.get("SLURM_JOB_ID", ""), env.get("SLURM_STEP_ID", "")
    if job and step:
        return f"slurm {job}.{step}"
    return None


def _launcher_launch(env, addr, port) -> Launch | None:
    """The launch an MPI launcher or srun describes (unchecked), or None."""
    if "OMPI_COMM_WORLD_RANK" in env:
        return Launch(_int_var(env, "OMPI_COMM_WORLD_RANK"), _int_var(env, "OMPI_COMM_WORLD_SIZE"),
                      _int_var(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                      _int_var(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1), "Open MPI", addr, port)
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return Launch(_int_var(env, "PMI_RANK"), _int_var(env, "PMI_SIZE"),
                      _int_var(env, "MPI_LOCALRANKID", 0), _int_var(env, "MPI_LOCALNRANKS", 1),
                      "MPICH / Intel MPI", addr, port)
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        # SLURM_STEP_NUM_TASKS is set by srun for the step; a batch script itself (no srun)
        # has SLURM_NTASKS but is one process.
        return Launch(_int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_STEP_NUM_TASKS"),
                      _int_var(env, "SLURM_LOCALID", 0),
                      _slurm_local_size(env), "Slurm", addr, port or DEFAULT_MASTER_PORT)
    return None


def _slurm_local_size(env) -> int:
    """Tasks on this node from SLURM_STEP_TASKS_PER_NODE ("4(x2),3") and SLURM_NODEID."""
    spec, node = env.get("SLURM_STEP_TASKS_PER_NODE", ""), _int_var(env, "SLURM_NODEID", 0)
    counts = []
    for part in filter(None, spec.split(",")):
        n, _, rep = part.partition("(x")
        try:
            counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
        except ValueError:
            return 1
    return counts[node] if node < len(counts) else 1


# ------------------------------------------------------------------ waiting, bounded
def _poll(done, what: str, timeout: float):
    """Wait until done() is true, sleeping between checks (ranks may share cores), or raise
    after `timeout` seconds. The watchdog is the backstop for waits that cannot poll."""
    start = time.monotonic()
    pause = 0.0
    while not done():
        if time.monotonic() - start > timeout:
            raise CommTimeout(f"no progress in {what} for {timeout:.0f} s: another rank died, "
                              f"hung or was stopped")
        if pause:
            time.sleep(pause)
        pause = min(1e-3, pause * 2 if pause else 2e-5)


class CommTimeout(CLLMError):
    pass


class Watchdog:
    """A thread that ends this process (after `on_timeout`, e.g. MPI_Abort, which takes the
    whole job down) when the trainer has not called `beat()` for `timeout` seconds: a rank
    that waits forever in a collective or on a stuck GPU still exits non-zero in bounded time,
    whatever the launcher."""

    EXIT_CODE = 124

    def __init__(self, timeout: float, rank: int, on_timeout=None):
        self.timeout, self.rank, self.on_timeout = timeout, rank, on_timeout
        self._last = time.monotonic()
        self._what = "start-up"
        self._held = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cllm-watchdog", daemon=True)
        self._thread.start()

    def beat(self, what: str = "training"):
        self._last, self._what = time.monotonic(), what

    @contextlib.contextmanager
    def hold(self, what: str):
        """No timeout inside: for a wait whose length is no sign of a hang (rank 0 writing a
        checkpoint, the other ranks waiting for it, which may take longer than --dist-timeout
        on a slow disk). The clock restarts on leaving."""
        self._held, self._what = True, what
        try:
            yield
        finally:  # the beat first: a check that finds the hold over then finds it too
            self.beat(what)
            self._held = False

    def stop(self):
        self._stop.set()

    def _run(self):
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            if self._held:  # read before the clock: a hold ends with a beat
                continue
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                print_line(f"error: rank {self.rank}: no progress for {idle:.0f} s (in "
                           f"{self._what}; --dist-timeout {self.timeout:g}): another rank died "
                           f"or hung; ending the job")
                try:
                    if self.on_timeout is not None:
                        self.on_timeout(self.EXIT_CODE)
                finally:
                    os._exit(self.EXIT_CODE)


# ------------------------------------------------------------------ communicators
class Communicator:
    """What every communicator offers (see the module docstring). rank, size; `name` for logs."""
    name = "?"
    rank = 0
    size = 1
    timeout = DEFAULT_TIMEOUT_S

    def progress(self):
        """Drive outstanding non-blocking work (MPI); NCCL and world size 1: nothing to do."""

    def allgather_bytes(self, data: bytes, timeout: float | None = None) -> list[bytes]:
        """Every rank's `data` (at most 254 bytes), in rank order, on every rank. timeout: how
        long to wait for the other ranks (default the communicator's; math.inf: no limit)."""
        if len(data) > _BYTES_SLOT - 2:
            raise ValueError(f"allgather_bytes: at most {_BYTES_SLOT - 2} bytes, got {len(data)}")
        slot = np.zeros(_BYTES_SLOT, dtype=np.uint8)
        slot[:2] = (len(data) >> 8, len(data) & 0xFF)
        slot[2:2 + len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = self.allgather_host(slot, timeout)
        return [bytes(r[2:2 + (int(r[0]) << 8 | int(r[1]))]) for r in rows]

    def start_allgather_host(self, x):
        """allgather_host in two halves: start it now, get its rows from the function returned
        (every rank must call both, in the same order as its other collectives). Where the
        other ranks started theirs long before, the second half does not wait. Default: the
        whole gather now (world size 1; NCCL, whose allgather_host syncs the device anyway)."""
        rows = self.allgather_host(x)
        return lambda: rows

    def agree(self, error: str | None, timeout: float | None = None):
        """Collective: every rank passes its own error message (or None). If any rank had one,
        every rank raises the same CollectiveError (naming the ranks, unless all agree).
        timeout: as allgather_bytes'."""
        # two gathers: the lengths, then (only where some rank has an error) the messages in
        # rows of the longest one's length. One slot of allgather_bytes cut a set-up refusal
        # to 254 bytes: a long path took its advice ("use --overwrite ...") away
        data = (error or "").encode()[:AGREE_MAX_BYTES]
        lengths = self.allgather_host(np.frombuffer(len(data).to_bytes(4, "big"), np.uint8),
                                      timeout)
        lengths = [int.from_bytes(bytes(row), "big") for row in lengths]
        if not any(lengths):
            return
        slot = np.zeros(max(lengths), dtype=np.uint8)
        slot[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = self.allgather_host(slot, timeout)
        msgs = [bytes(row[:n]).decode(errors="replace") for row, n in zip(rows, lengths)]
        bad = [(r, m) for r, m in enumerate(msgs) if m]
        if len(bad) == self.size and len({m for _, m in bad}) == 1:
            raise CollectiveError(bad[0][1])
        raise CollectiveError("; ".join(f"rank {r}: {m}" for r, m in bad[:4])
                              + (f" (and {len(bad) - 4} more ranks)" if len(bad) > 4 else "")
                              )

    def check_same(self, label: str, value: bytes | str | dict):
        """Collective: refuse (CollectiveError on every rank) when `value` differs between
        ranks. A dict of str values (the same keys on every rank) is compared as a whole, and
        on a difference key by key, so that the error names the keys that differ."""
        parts = value if isinstance(value, dict) else None
        if parts is not None:
            value = json.dumps(parts, sort_keys=True)
        digests = self.allgather_bytes(_digest(value))
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if not odd:
            return
        which = ""
        if parts is not None:  # rare: one more gather, of one digest per key
            keys = sorted(parts)
            rows = self.allgather_host(np.frombuffer(b"".join(_digest(parts[k]) for k in keys),
                                                     dtype=np.uint8).reshape(len(keys), -1))
            names = [k for i, k in enumerate(keys) if (rows[:, i] != rows[0, i]).any()]
            which = (f": {', '.join(names[:4])}" + (f" (and {len(names) - 4} more)"
                                                    if len(names) > 4 else "")) if names else ""
        raise CollectiveError(f"{label} differ between ranks "
                              f"(rank{'s' if len(odd) > 1 else ''} {', '.join(map(str, odd))} vs "
                              f"rank 0){which}; every rank must be started with the same "
                              f"settings, data and checkpoint")

    def abort(self, code: int = 1):
        os._exit(code)


class SelfComm(Communicator):
    """World size 1: every collective is a copy (or nothing). The data-parallel step runs
    through it unchanged, which is how the CPU tests check that step in one process."""
    name = "none (one process)"

    def reduce_scatter(self, send, recv, counts):
        recv[...] = send
        return None

    def all_gather(self, recv, counts, send=None, after=None):
        if send is not None:
            recv[...] = send
        return None

    def wait(self, handles):
        pass

    def sum_in_place(self, x):
        pass

    def allgather_rows(self, x, out):
        out[0] = x

    def allgather_host(self, x, timeout=None):
        return np.asarray(x)[None].copy()


def _digest(value: bytes | str) -> bytes:
    return hashlib.blake2b(value.encode() if isinstance(value, str) else value,
                           digest_size=16).digest()


def _pieces(counts):
    """(offsets, counts) of the rank pieces laid end to end."""
    counts = [int(c) for c in counts]
    return np.cumsum([0] + counts[:-1]).tolist(), counts


class MPIComm(Communicator):
    """MPI through mpi4py on host (NumPy) arrays. Two duplicates of COMM_WORLD: reduce-scatters
    on one, all-gathers on the other, each issued in the same order on every rank (MPI matches
    collectives by order), so an all-gather can wait for its reduce-scatter without blocking
    the reduce-scatters queued behind it."""

    def __init__(self, launch: Launch, timeout: float = DEFAULT_TIMEOUT_S):
        MPI = _import_mpi()
        world = MPI.COMM_WORLD
        if world.Get_size() != launch.world_size:
            raise ConfigError(f"MPI sees {world.Get_size()} process(es) but the {launch.launcher} "
                              f"launch says {launch.world_size}: the MPI library (mpi4py: "
                              f"{MPI.Get_library_version().splitlines()[0].strip()}) does not "
                              f"belong to this launcher; launch with the matching mpiexec")
        self.MPI, self.world = MPI, world
        self.rank, self.size = world.Get_rank(), world.Get_size()
        self.timeout = timeout
        self.name = f"MPI ({' '.join(MPI.Get_library_version().split()[:3])})"
        self._rs_comm, self._ag_comm = world.Dup(), world.Dup()
        self._active = []      # started requests not yet known complete
        self._deferred = []    # all-gathers waiting for their reduce-scatter (FIFO)

    # the requests: [MPI.Request | None, done flag]
    def reduce_scatter(self, send, recv, counts):
        req = self._rs_comm.Ireduce_scatter(send, recv, [int(c) for c in counts], op=self.MPI.SUM)
        h = [req, False]
        self._active.append(h)
        return h

    def all_gather(self, recv, counts, send=None, after=None):
        offsets, counts = _pieces(counts)
        h = [None, False]
        start = (lambda: self._ag_comm.Iallgatherv(
            self.MPI.IN_PLACE if send is None else send, [recv, (counts, offsets)]))
        self._deferred.append((h, start, after))
        self.progress()
        return h

    def progress(self):
        for h in self._active:
            if not h[1] and h[0].Test():
                h[1] = True
        self._active = [h for h in self._active if not h[1]]
        while self._deferred and (self._deferred[0][2] is None or self._deferred[0][2][1]):
            h, start, _ = self._deferred.pop(0)
            h[0] = start()
            self._active.append(h)

    def wait(self, handles):
        handles = [h for h in handles if h is not None]
        _poll(lambda: (self.progress(), all(h[1] for h in handles))[1],
              "a gradient reduction", self.timeout)

    def sum_in_place(self, x):
        tmp = np.empty_like(x)
        req = self.world.Iallreduce(x, tmp, op=self.MPI.SUM)
        _poll(req.Test, "an all-reduce", self.timeout)
        x[...] = tmp

    def allgather_rows(self, x, out, timeout=None):
        req = self.world.Iallgather(np.ascontiguousarray(x), out)
        _poll(req.Test, "an all-gather", self.timeout if timeout is None else timeout)

    def allgather_host(self, x, timeout=None):
        x = np.ascontiguousarray(x)
        out = np.empty((self.size,) + x.shape, dtype=x.dtype)
        self.allgather_rows(x, out, timeout)
        return out

    def start_allgather_host(self, x):
        # the blocking gather's polling sleeps cost about 1.5 ms a call on 2 shared cores
        # even when both ranks arrive together; a request the others posted a batch ago
        # completes at its first Test
        x = np.ascontiguousarray(x)
        bufs = (x, np.empty((self.size,) + x.shape, dtype=x.dtype))  # alive until completion
        req = self.world.Iallgather(*bufs)

        def rows():
            _poll(req.Test, "an all-gather", self.timeout)
            return bufs[1]
        return rows

    def abort(self, code: int = 1):
        self.world.Abort(code)


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ConfigError(f"data parallelism over MPI needs mpi4py and an MPI library "
                          f"(pip install 'cllm-gpu[dist]'): {e}") from None
    return MPI


_NCCL_DTYPES = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "uint8": "NCCL_UINT8"}


class NCCLComm(Communicator):
    """NCCL through CuPy (`cupy.cuda.nccl`, libnccl from the nvidia-nccl-cu12/-cu13 wheel) on
    device arrays. Every call is queued on the communicator's own stream after an event
    recorded on the compute stream, so reductions overlap the backward still being queued;
    `wait` makes the compute stream wait for the communicator's stream (no host sync). Pieces
    of equal size use ncclReduceScatter / ncclAllGather; uneven ones a group of ncclReduce /
    ncclBroadcast calls, one per rank (NCCL has no "v" collectives).

    The unique id goes from rank 0 to the others over MPI when the job was started by an MPI
    launcher, else over CuPy's TCP store (cupyx.distributed) at MASTER_ADDR:MASTER_PORT."""

    def __init__(self, launch: Launch, timeout: float = DEFAULT_TIMEOUT_S):
        import cupy
        from cupy.cuda import nccl
        if not nccl.available:
            raise ConfigError("NCCL is not available to CuPy: install the NCCL wheel "
                              "(the cuda12 / cuda13 extra brings nvidia-nccl-cu12 / -cu13)")
        self.cp, self.nccl = cupy, nccl
        self.rank, self.size, self.timeout = launch.rank, launch.world_size, timeout
        uid = exchange_unique_id(launch, nccl.get_unique_id if launch.rank == 0 else None,
                                 timeout)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.name = f"NCCL {nccl.get_version()} (unique id over {uid_channel(launch)})"
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def _dtype(self, a):
        return getattr(self.nccl, _NCCL_DTYPES[a.dtype.name])

    def _after_compute(self):
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(self.cp.cuda.get_current_stream())
        self.stream.wait_event(ev)

    def reduce_scatter(self, send, recv, counts):
        self._after_compute()
        offsets, counts = _pieces(counts)
        S, dt = self.stream.ptr, self._dtype(send)
        if len(set(counts)) == 1:
            self.comm.reduceScatter(send.data.ptr, recv.data.ptr, counts[0], dt,
                                    self.nccl.NCCL_SUM, S)
            return self.stream
        self.nccl.groupStart()
        for r, (o, c) in enumerate(zip(offsets, counts)):
            if c:
                src = send.data.ptr + o * send.itemsize
                self.comm.reduce(src, recv.data.ptr if r == self.rank else src, c, dt,
                                 self.nccl.NCCL_SUM, r, S)
        self.nccl.groupEnd()
        return self.stream

    def all_gather(self, recv, counts, send=None, after=None):
        self._after_compute()
        offsets, counts = _pieces(counts)
        S, dt = self.stream.ptr, self._dtype(recv)
        own = recv.data.ptr + offsets[self.rank] * recv.itemsize
        src = own if send is None else send.data.ptr
        if len(set(counts)) == 1:
            self.comm.allGather(src, recv.data.ptr, counts[0], dt, S)
            return self.stream
        self.nccl.groupStart()
        for r, (o, c) in enumerate(zip(offsets, counts)):
            if c:
                dst = recv.data.ptr + o * recv.itemsize
                self.comm.broadcast(src if r == self.rank else dst, dst, c, dt, r, S)
        self.nccl.groupEnd()
        return self.stream

    def wait(self, handles):
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(self.stream)
        self.cp.cuda.get_current_stream().wait_event(ev)

    def sum_in_place(self, x):
        self._after_compute()
        self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._dtype(x), self.nccl.NCCL_SUM,
                            self.stream.ptr)
        self.wait(None)

    def allgather_rows(self, x, out):
        self._after_compute()
        self.comm.allGather(x.data.ptr, out.data.ptr, x.size, self._dtype(x), self.stream.ptr)
        self.wait(None)

    def allgather_host(self, x, timeout=None):
        x = np.ascontiguousarray(x)
        dx = self.cp.asarray(x)
        out = self.cp.empty((self.size,) + x.shape, dtype=x.dtype)
        self.allgather_rows(dx, out)
        done = self.cp.cuda.Event(disable_timing=True)
        done.record(self.cp.cuda.get_current_stream())
        _poll(lambda: done.done, "an all-gather", self.timeout if timeout is None else timeout)
        return out.get()

    def abort(self, code: int = 1):
        try:
            self.comm.abort()
        finally:
            os._exit(code)


def uid_channel(launch: Launch) -> str:
    if launch.mpi_launched:
        return "MPI"
    whose = "torchrun's store" if launch.agent_store else "TCP store"
    return f"{whose} {launch.master_addr}:{launch.master_port}"


def exchange_unique_id(launch: Launch, make_id, timeout: float) -> bytes:
    """Rank 0's NCCL unique id (make_id() there: CuPy 14's `nccl.get_unique_id`, 128 bytes) on
    every rank, as the bytes `NcclCommunicator` takes (CuPy 14 refuses anything else): over MPI
    when an MPI launcher started the job, else over cupyx.distributed's TCP store run by rank 0
    at MASTER_ADDR:MASTER_PORT."""
    if launch.mpi_launched:
        MPI = _import_mpi()
        buf = np.zeros(NCCL_UNIQUE_ID_BYTES, dtype=np.uint8)
        if launch.rank == 0:
            buf[:] = np.frombuffer(_unique_id_bytes(make_id()), dtype=np.uint8)
        MPI.COMM_WORLD.Bcast(buf, root=0)
        return buf.tobytes()
    if launch.master_addr is None:
        raise ConfigError(f"{launch.launcher} launch without MPI: set MASTER_ADDR (and "
                          f"MASTER_PORT) to rank 0's host so the ranks can meet")
    exchange = agent_store_exchange if launch.agent_store else tcp_store_exchange
    return _unique_id_bytes(exchange(
        launch, "nccl-unique-id", _unique_id_bytes(make_id()) if make_id else None, timeout))


NCCL_UNIQUE_ID_BYTES = 128   # sizeof(ncclUniqueId)


def _unique_id_bytes(uid) -> bytes:
    if not isinstance(uid, bytes) or len(uid) != NCCL_UNIQUE_ID_BYTES:
        raise RuntimeError(f"NCCL unique id: expected {NCCL_UNIQUE_ID_BYTES} bytes, got "
                           f"{type(uid).__name__} of length {len(uid)}")
    return uid


def tcp_store_exchange(launch: Launch, key: str, value: bytes | None, timeout: float) -> bytes:
    """Rank 0 publishes `value` under `key` in a TCP store it serves at MASTER_ADDR:MASTER_PORT
    (cupyx.distributed's); every rank reads it back (polling until it is there, at most
    `timeout` s) and acknowledges; rank 0 stops the store once every rank has it. Values up to
    ~240 bytes."""
    from cupyx.distributed import _store
    server = None
    if launch.rank == 0:
        _check_port_free(launch)
        server = _store.TCPStore(launch.world_size)
        server.run(launch.master_addr, launch.master_port)
    proxy = _store.TCPStoreProxy(launch.master_addr, launch.master_port)
    where = f"the TCP store at {launch.master_addr}:{launch.master_port}"

    def has(k, into=None):
        try:
            v = proxy[k]
        except (RuntimeError, OSError, KeyError):  # not there yet, or the store not up yet
            return False
        if into is not None:
            into.append(v)
        return True
    try:
        if server is not None:
            proxy[key] = value
        got = []
        _poll(lambda: has(key, got), where, timeout)
        if server is None:
            proxy[f"{key}/ack/{launch.rank}"] = 1
        else:
            for r in range(1, launch.world_size):
                _poll(lambda: has(f"{key}/ack/{r}"), where, timeout)
    finally:
        if server is not None:
            server.stop()
    return got[0]


def _check_port_free(launch: Launch):
    """Refuse (ConfigError) when rank 0 cannot serve the TCP store at MASTER_ADDR:MASTER_PORT.
    cupyx's store binds in a child process and keeps a failure to itself: the ranks then talked
    to whatever held the port (another run's store: its NCCL id, a rank joining that run; a
    server of another protocol: a read that never returns)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as cupyx's store binds
        try:
            s.bind((launch.master_addr, launch.master_port))
        except OSError as e:
            # the advice fits the cause: a port in use, or an address not rank 0's own
            advice = ("another run, or another program, holds the port: give each run its own "
                      "MASTER_PORT" if e.errno == errno.EADDRINUSE else
                      "set MASTER_ADDR to an address of rank 0's host and MASTER_PORT to a "
                      "port it may bind")
            raise ConfigError(f"rank 0 cannot serve the TCP store at {launch.master_addr}:"
                              f"{launch.master_port}: {e.strerror or e}; {advice}") from None


def agent_store_exchange(launch: Launch, key: str, value: bytes | None, timeout: float) -> bytes:
    """tcp_store_exchange through torchrun's own store (TORCHELASTIC_USE_AGENT_STORE=True:
    its agent serves a c10d TCPStore at MASTER_ADDR:MASTER_PORT, so that port is never free
    for rank 0's): rank 0 sets `key`, every rank reads it, each waiting at most `timeout` s in
    all (rank 0 until every rank has it). Needs torch in this Python (torchrun's).
    The store outlives a restart of the worker group (--max-restarts) with what earlier starts
    set in it, and nothing torchrun gives a worker names the start on every node
    (TORCHELASTIC_RESTART_COUNT is per node: a node restarted only because another failed
    keeps its count). So a rank takes a value only once the rank 0 that set it has echoed the
    rank's own nonce: an earlier start's rank 0 is dead and echoes nothing (the keys: the
    comment after this function)."""
    try:
        from datetime import timedelta

        from torch.distributed import TCPStore
    except ImportError as e:
        raise ConfigError(f"torchrun serves its own store at {launch.master_addr}:"
                          f"{launch.master_port} (TORCHELASTIC_USE_AGENT_STORE=True), which "
                          f"only torch can read ({e}): run cllm-gpu in the Python torchrun runs "
                          f"in, or start the ranks with mpiexec / srun") from None
    where = f"torchrun's store at {launch.master_addr}:{launch.master_port}"
    base = f"cllm-gpu/{key}"
    deadline = time.monotonic() + timeout

    def left():  # what is left of `timeout`, for the store's blocking reads
        return timedelta(seconds=max(deadline - time.monotonic(), 0.001))
    try:
        store = TCPStore(launch.master_addr, launch.master_port, is_master=False, timeout=left())
        if value is None:
            return _take_this_start_s(store, base, launch.rank, left)
        nonce = _publish_for_this_start(store, base, value, launch.world_size)
    except RuntimeError as e:  # torch's DistStoreError / DistNetworkError: a timeout, no store
        raise CommTimeout(f"no {key} from rank 0 in {where} within {timeout:.0f} s "
                          f"({_first_line(e)}): rank 0 died, hung or was stopped") from None
    for rank in range(1, launch.world_size):
        try:
            store.set_timeout(left())
            store.set(f"{base}/{nonce}/reply/{rank}", store.get(f"{base}/{nonce}/ack/{rank}"))
        except RuntimeError as e:
            raise CommTimeout(f"rank {rank} did not take {key} from {where} within "
                              f"{timeout:.0f} s ({_first_line(e)}): rank {rank} died, hung or "
                              f"was stopped") from None
    return value


# agent_store_exchange's keys in torchrun's store, under cllm-gpu/<key>:
#   (itself)          N + the value: N the nonce of the rank 0 that set it (each start's
#                     rank 0 overwrites it)
#   /<N>/ack/<r>      M: rank r's own nonce, set once it has read N's value
#   /<N>/reply/<r>    M again, echoed by rank 0 N: rank r takes the value. Or _SUPERSEDED,
#                     set by the next start's rank 0 to wake a rank r waiting there
#   /<N>/next         the next start's N + value, set by its rank 0
# Two starts' workers never run at once (torchrun stops every worker before the next
# rendezvous), so a reply equal to M comes from the rank 0 of this start.
_NONCE_CHARS = 32
_SUPERSEDED = b"superseded"


def _nonce() -> bytes:
    return os.urandom(_NONCE_CHARS // 2).hex().encode()


def _first_line(e) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _publish_for_this_start(store, base, value, world_size) -> str:
    """Rank 0: set `value` under a nonce of its own, and point the ranks that read the
    previous start's value to it. Returns the nonce."""
    nonce = _nonce()
    previous = store.get(base)[:_NONCE_CHARS].decode() if store.check([base]) else None
    store.set(base, nonce + value)
    if previous is not None:
        store.set(f"{base}/{previous}/next", nonce + value)
        for rank in range(1, world_size):
            store.set(f"{base}/{previous}/reply/{rank}", _SUPERSEDED)
    return nonce.decode()


def _take_this_start_s(store, base, rank, left) -> bytes:
    """Rank `rank` (not 0): the value of the rank 0 alive now, following an earlier start's
    value to the next one's."""
    mine = _nonce()
    store.set_timeout(left())
    stamped = store.get(base)  # blocks until some start's rank 0 has set one
    while True:
        nonce = stamped[:_NONCE_CHARS].decode()
        store.set(f"{base}/{nonce}/ack/{rank}", mine)
        store.set_timeout(left())
        if store.get(f"{base}/{nonce}/reply/{rank}") == mine:
            return stamped[_NONCE_CHARS:]
        store.set_timeout(left())  # an earlier start's value: wait for the next start's
        stamped = store.get(f"{base}/{nonce}/next")


# ------------------------------------------------------------------ set-up and ending
_ACTIVE: list = []  # this process's communicator, for abort_job
ABORT_OUTPUT_GRACE_S = 1.0


def abort_job(code: int = 1):
    """End this process and, through MPI_Abort (the launcher then kills every rank) or
    ncclCommAbort, the job: for an error raised on one rank only. Never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    # The launcher forwards a rank's output from a pipe on its own time, and MPI_Abort tears
    # the job down at once: without a pause the error message this rank just wrote can be lost
    # (seen with MPICH's Hydra about one run in four).
    time.sleep(ABORT_OUTPUT_GRACE_S)
    try:
        for comm in _ACTIVE:
            comm.abort(code)
        if detect_launch().mpi_launched:  # MPI up, or brought up now, just to abort
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


def connect(launch: Launch, backend: str, timeout: float = DEFAULT_TIMEOUT_S) -> Communicator:
    """The communicator for this launch and model backend ("numpy" or "cuda"): world size 1 ->
    SelfComm; NumPy -> MPI; CUDA -> NCCL. On CUDA call `select_device` first."""
    if launch.world_size == 1:
        return SelfComm()
    if backend == "cuda":
        comm = NCCLComm(launch, timeout)
    elif _without_mpi(launch):
        raise ConfigError(f"{launch.launcher} launch on the NumPy backend: data parallelism on "
                          f"the CPU runs over MPI; start the ranks with mpiexec / mpirun (or "
                          f"srun with MPI), or use the CUDA backend (NCCL)")
    else:
        comm = MPIComm(launch, timeout)
    _ACTIVE.append(comm)
    return comm


def _without_mpi(launch: Launch) -> bool:
    """No MPI between the ranks (the NumPy backend's only transport): neither an MPI launcher
    nor Slurm (whose srun may bring MPI up)."""
    return not launch.mpi_launched and launch.launcher != "Slurm"


def open_communicator(launch: Launch, backend: str, timeout: float = DEFAULT_TIMEOUT_S):
    """(backend name, communicator) for a backend request ("auto", "numpy", "cuda"): the
    backend resolved, this rank's GPU chosen (CUDA, several ranks), then `connect`."""
    from .backend import resolve_backend
    requested = backend
    backend, _ = resolve_backend(backend)
    if backend == "cuda" and launch.world_size > 1:
        select_device(launch)
    try:
        return backend, connect(launch, backend, timeout)
    except ConfigError as e:
        if requested == "numpy" and _without_mpi(launch):
            # the NumPy backend named on every rank's command line, refused for the launcher's
            # variables, which every rank reads alike: said once, by rank 0. ("auto" is decided
            # on each rank by its own GPU check: a rank alone on NumPy says why itself and ends
            # the job, rank 0 may be waiting in NCCL.)
            e.collective = True
        raise


def select_device(launch: Launch):
    """One GPU per rank, chosen by local rank (CUDA_VISIBLE_DEVICES narrows the choice)."""
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    if launch.local_size > n and launch.world_size > 1:
        raise ConfigError(f"{launch.local_size} ranks on this node but {n} visible GPU(s): one "
                          f"GPU per rank (check -n / --ntasks-per-node and CUDA_VISIBLE_DEVICES)")
    cupy.cuda.Device(launch.local_rank % n).use()
