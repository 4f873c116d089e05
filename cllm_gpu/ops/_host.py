"""Host (NumPy) execution of ops made of many small matrix products, such as the attention
reference: one product per (batch, head) and query block, 64 x D by D x T. OpenBLAS runs
products that small faster on one thread than on several (measured on 2 cores: the cpu-small
attention forward + backward took 119 ms with OpenBLAS's 2 threads, 65 ms with 1), so such an
op runs with BLAS limited to one thread and its batch split across a pool of Python threads
instead (NumPy releases the GIL in matmul and the ufuncs). Each thread computes whole batch
rows, with the same products as one thread would: the result does not depend on the split.
Elementwise ops (NumPy's ufuncs run on one core) split their flat range the same way."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

_pool = None
_controller = None


def _forget_pool():  # a forked child has none of the parent's threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def host_threads() -> int:
    """Threads for the batch split: CLLM_HOST_THREADS, else the CPUs this process may use."""
    env = os.environ.get("CLLM_HOST_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _single_blas_thread():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController
        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def split_batch(B: int, run, min_per_thread: int = 1) -> None:
    """run(b0, b1) on slices [b0, b1) that tile [0, B), in parallel threads (at most one per
    min_per_thread items), each with BLAS on one thread; exceptions propagate."""
    global _pool
    n = min(B // max(min_per_thread, 1), host_threads())
    with _single_blas_thread():
        if n <= 1:
            run(0, B)
            return
        if _pool is None or _pool._max_workers < n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="cllm-host")
        bounds = [(B * i // n, B * (i + 1) // n) for i in range(n)]
        for f in [_pool.submit(run, b0, b1) for b0, b1 in bounds]:
            f.result()
