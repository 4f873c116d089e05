"""Worker threads for the NumPy path: independent parts of an op on several cores.

NumPy releases the GIL inside its ufunc and matmul loops, so the parts of an op that touch
disjoint rows, element ranges or batch groups run in parallel from plain Python threads. BLAS
is held at one thread meanwhile (threadpoolctl), for the whole training step (train_step.py)
and inside every op: its own threads would compete with ours for the cores, and after each
call OpenBLAS's idle threads spin for a while on the cores ours need (measured on 2 cores,
cpu-small: 466 ms per step with our 2 threads and BLAS's spinning, 374 with
OPENBLAS_THREAD_TIMEOUT=4; 425 with one thread of ours and BLAS's 2). Large GEMMs are split
over our threads instead (ops/gemm.py).

Results do not depend on the thread count: each part computes exactly what the sequential
loop computes for it, the callers add per-part sums in part order, and no BLAS call runs on
more than one thread (a dot over BLAS's threads sums in an order that depends on their number).
tests/test_host_threads.py checks 1, 2 and 3 threads bit for bit.

The count: CLLM_CPU_THREADS, else the cores this process may run on divided among the MPI
ranks started on this host; set_host_threads(n) changes it in-process. 1: everything in the
calling thread, BLAS on one thread too.
"""
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from ..errors import ConfigError

ENV_VAR = "CLLM_CPU_THREADS"

_lock = threading.Lock()
_local = threading.local()     # .inside: this thread is running a part (nested calls run inline)
_count = None                  # the thread count; None: not read from the environment yet
_pool = None                   # ThreadPoolExecutor of _count - 1 workers (the caller is one)
_blas = None                   # threadpoolctl.ThreadpoolController, or False without one
_held = False                  # BLAS is held at one thread (an outer single_threaded_blas)


# the number of ranks an MPI launcher started on this host (MPICH's Hydra, Open MPI)
LOCAL_RANKS_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def _cores() -> int:
    """The cores this process may run on, shared with the other ranks of this host."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    for var in LOCAL_RANKS_VARS:
        try:
            local = int(os.environ.get(var, ""))
        except ValueError:
            continue
        if local > 1:
            return max(1, cores // local)
    return cores


def _parse(value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ConfigError(f"{ENV_VAR}: expected a positive integer, got {value!r}")
    return n


def host_threads() -> int:
    """The number of threads the NumPy ops split their work over."""
    global _count
    if _count is None:
        env = os.environ.get(ENV_VAR)
        _count = _parse(env) if env not in (None, "") else _cores()
    return _count


def set_host_threads(n: int) -> int:
    """Use n threads from now on (n >= 1); returns the previous count."""
    global _count, _pool
    n = _parse(n)
    with _lock:
        old = host_threads()
        if n != old and _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _count = n
    return old


def _forget_pool_in_child():
    # a forked child has none of the parent's worker threads: start a new pool when needed
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool_in_child)


def single_threaded_blas():
    """A context holding BLAS at one thread (a no-op inside one already, or inside a piece)."""
    global _blas
    if getattr(_local, "inside", False) or _held:
        return contextlib.nullcontext()
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
            _blas = ThreadpoolController()
        except Exception:  # pragma: no cover - threadpoolctl is a dependency
            _blas = False
    if not _blas:
        return contextlib.nullcontext()  # pragma: no cover
    return _held_blas(_blas)


@contextlib.contextmanager
def _held_blas(controller):
    global _held
    with controller.limit(limits=1, user_api="blas"):
        _held = True
        try:
            yield
        finally:
            _held = False


def split(n: int, parts: int):
    """range(n) as `parts` contiguous (lo, hi) pieces, sizes differing by at most one."""
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def run_parts(n: int, fn, threads=None) -> int:
    """fn(lo, hi) over contiguous pieces of range(n) (units the caller chooses: chunks, groups),
    one piece per thread, the first in the calling thread; returns when all are done and
    raises the first piece's exception, if any. Returns the number of pieces.

    fn must write only what its own [lo, hi) owns. threads: an upper bound (None: host_threads());
    a call from inside a piece runs inline."""
    global _pool
    k = min(n, host_threads() if threads is None else threads)
    if k <= 1 or getattr(_local, "inside", False):
        if n:
            with single_threaded_blas():
                fn(0, n)
        return 1 if n else 0
    pieces = split(n, k)

    def piece(lo_hi):
        _local.inside = True
        try:
            fn(*lo_hi)
        finally:
            _local.inside = False

    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, host_threads() - 1),
                                       thread_name_prefix="cllm-cpu")
        pool = _pool
    with single_threaded_blas():
        futures = [pool.submit(piece, p) for p in pieces[1:]]
        first_error = None
        try:
            piece(pieces[0])
        except BaseException as e:   # the others still finish before we return
            first_error = e
        for f in futures:
            e = f.exception()
            if first_error is None and e is not None:
                first_error = e
    if first_error is not None:
        raise first_error
    return k
