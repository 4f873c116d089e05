"""Worker threads for the NumPy path: independent parts of an op on several cores.

NumPy releases the GIL inside its ufunc and matmul loops, so the parts of an op that touch
disjoint rows, element ranges or batch groups run in parallel from plain Python threads. BLAS
is held at one thread meanwhile (threadpoolctl), for the whole training step (train_step.py),
the model's forward, classifier and backward (model.py) and inside every op: its own threads
would compete with ours for the cores, and after each call OpenBLAS's idle threads spin for a
while on the cores ours need (measured on 2 cores, cpu-small: 466 ms per step with our 2
threads and BLAS's spinning, 374 with OPENBLAS_THREAD_TIMEOUT=4; 425 with one thread of ours
and BLAS's 2). Large GEMMs are split over our threads instead (ops/gemm.py).

Results do not depend on the thread count: each part computes exactly what the sequential
loop computes for it, the callers add per-part sums in part order, and no BLAS call runs on
more than one thread (a dot over BLAS's threads sums in an order that depends on their number).
GEMMs are cut into row pieces by their shape alone (ops/gemm.py), so the same BLAS calls are
made at every count. tests/test_host_threads.py checks 1, 2 and 3 threads bit for bit, and
that a training step makes the same BLAS calls at each (which holds on every CPU, whatever
its BLAS kernels do with a row's place in a call).

The count: CLLM_CPU_THREADS, else the cores this process may run on (divided among the MPI
ranks started on this host when each may run on all of them); set_host_threads(n) changes it
in-process. 1: everything in the calling thread, BLAS on one thread too.
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
_hold_lock = threading.Lock()
_holds = 0                     # single_threaded_blas contexts open now, in any thread
_limiter = None                # the first one's threadpoolctl limiter, restored by the last


# the number of ranks an MPI launcher started on this host (MPICH's Hydra, Open MPI)
LOCAL_RANKS_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def _cores() -> int:
    """The cores this process may run on; when that is the whole machine, shared with the
    other MPI ranks started on this host."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    if cores < (os.cpu_count() or cores):
        return cores   # a launcher (or the user) bound this process to its own cores
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
    """The number of threads the NumPy ops split their work over. By default 1 where
    threadpoolctl is missing (it holds BLAS at one thread; without it our threads and BLAS's
    would fight for the cores, e.g. on a GPU image with no registry to install it from)."""
    global _count
    if _count is None:
        env = os.environ.get(ENV_VAR)
        _count = _parse(env) if env not in (None, "") else (_cores() if _controller() else 1)
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


def _reset_in_child():
    # a forked child has none of the parent's threads: a new pool when needed, fresh locks
    # (another thread may have held one at the fork); BLAS stays as the fork left it
    global _pool, _lock, _hold_lock, _holds, _limiter
    _pool, _holds, _limiter = None, 0, None
    _lock, _hold_lock = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_reset_in_child)


def _controller():
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
            _blas = ThreadpoolController()
        except Exception:  # pragma: no cover - threadpoolctl is a dependency
            _blas = False
    return _blas


@contextlib.contextmanager
def single_threaded_blas():
    """Hold BLAS at one thread while the context is open. Holds are counted across threads:
    the first one in sets the limit, the last one out restores what BLAS had (two Python
    threads running the NumPy path at once both run held). A no-op inside a piece."""
    global _holds, _limiter
    if getattr(_local, "inside", False):
        yield
        return
    controller = _controller()
    with _hold_lock:
        if _holds == 0 and controller:
            _take_blas_control()
            _limiter = controller.limit(limits=1, user_api="blas")
        _holds += 1
    try:
        yield
    finally:
        with _hold_lock:
            _holds -= 1
            if _holds == 0 and _limiter is not None:
                _take_blas_control()  # the first one in may have been another thread
                _limiter.restore_original_limits()
                _limiter = None


def _take_blas_control():
    """Let this thread set OpenBLAS's thread count. threadpoolctl >= 3.8 lets only the thread
    that first set it (OpenBLAS without OpenMP: one process-wide pool) set it again until a
    `with threadpool_limits` of its own ends, and ignores the others silently; the holds set
    and restore it outside such a block, so after the main thread's first hold a hold in any
    other thread did nothing (BLAS on all its threads there: other bits than in the main
    thread). The holds are serialized by _hold_lock: whichever thread sets or restores the
    limit may take control."""
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:  # threadpoolctl before 3.0, or none: no controlling thread
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:  # before 3.8 any thread could set it
        clear(force=True)


def split(n: int, parts: int):
    """range(n) as `parts` contiguous (lo, hi) pieces, sizes differing by at most one."""
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def run_chunks(size: int, chunk: int, fn, scratch=None, threads=None) -> int:
    """fn(c, s, tmp) for every chunk c of range(size) (s: its slice, `chunk` long, the last one
    ragged), the chunks split over the threads by run_parts; tmp: what scratch() returns, made
    once per piece (None without scratch). Returns the number of pieces."""
    def piece(c0, c1):
        tmp = None if scratch is None else scratch()
        for c in range(c0, c1):
            fn(c, slice(c * chunk, min(size, (c + 1) * chunk)), tmp)
    return run_parts(-(-size // chunk), piece, threads)


def run_parts(n: int, fn, threads=None) -> int:
    """fn(lo, hi) over contiguous pieces of range(n) (units the caller chooses: chunks, groups),
    one piece per thread, the first in the calling thread; returns when all are done and
    raises the first piece's exception, if any. Returns the number of pieces.

    fn must write only what its own [lo, hi) owns. threads: a further bound on the pieces
    (besides n and host_threads()); a call from inside a piece runs inline."""
    global _pool
    k = min(n, host_threads(), n if threads is None else max(1, threads))
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
