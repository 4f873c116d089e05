"""Streams, CUDA-graph capture and replay for the fake CuPy (fake_cupy.py), and its
"reference launchers" mode.

Capture: between `Stream.begin_capture()` and `end_capture()` every piece of device work is
recorded as a thunk that `Graph.launch()` replays, as a real capture records kernels: emulated
kernel launches, GemmEx calls, every ufunc / reduction / copy / fill / setitem on device arrays
and, in reference mode, each op launcher as one unit. The work also runs once, eagerly, to give
results their shapes; `end_capture()` then restores every device array that existed before the
capture and poisons the ones created during it, because a real capture runs nothing. A replay
therefore sees what its recorded arguments point to at replay time: a value frozen into Python
at capture time (a by-value kernel argument, a float read on the host) shows up as a stale
number. A device -> host read during a capture raises and invalidates the capture (stricter
than CuPy, which refuses a get / asnumpy before any CUDA call and lets the capture go on), a
host -> device copy raises (as CuPy refuses one), and device allocations during a capture
must come from the allocator given to `cupy.cuda.using_allocator` (the private pool), as
CuPy requires.

Reference launchers (`fake_cupy.install(launchers="reference")`): every `*_cuda` launcher of
cllm_gpu.ops is replaced by its NumPy reference (same signature), bf16 is stored as the host
path stores it (tagged float32), and GEMMs run through NumPy: the CUDA code path of the model,
trainer and CUDA-graph step then computes exactly what the NumPy path computes, so its results
can be compared bit for bit with a NumPy run. The kernels themselves are checked by the
emulated mode.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import weakref
from pathlib import Path

import numpy as np


class _Capture:
    active = False
    invalidated = False
    depth = 0            # > 0 inside a recorded unit: its inner work belongs to its thunk
    thunks: list = []
    created: list = []   # device arrays allocated during the capture
    snapshot: list = []
    allocator = None     # set by using_allocator
    captures = 0
    launches = 0         # graph launches


CAPTURE = _Capture()


def recording() -> bool:
    return CAPTURE.active and CAPTURE.depth == 0


def record(thunk):
    """Record device work (called by the fake after running it eagerly)."""
    if recording():
        CAPTURE.thunks.append(thunk)


class AllocationTrace:
    """Every device allocation made while it is active (`with fake_graph.AllocationTrace() as
    t:`): its bytes, the cllm_gpu lines that made it (innermost last) and when its memory was
    released (the number of allocations made before that; None: still held at the end).
    Inside a capture nothing is released (the recorded work and the graph hold every array it
    created, as the graph holds raw pointers), so a capture gives sizes and sites; a plain run
    of the same code gives the release times too."""
    active = None
    PACKAGE = Path(__file__).resolve().parents[2] / "cllm_gpu"

    def __init__(self):
        self.blocks = []   # dicts: bytes, site (tuple of "path:line function"), freed

    def __enter__(self):
        if AllocationTrace.active is not None:
            raise RuntimeError("nested AllocationTrace")
        AllocationTrace.active = self
        return self

    def __exit__(self, *exc):
        AllocationTrace.active = None

    def add(self, a, nbytes):
        site, f = [], sys._getframe(1)
        while f is not None:
            path = Path(f.f_code.co_filename).resolve()
            if path.is_relative_to(self.PACKAGE):
                site.append(f"{path.relative_to(self.PACKAGE.parent)}:{f.f_lineno} "
                            f"{f.f_code.co_name}")
            f = f.f_back
        site = tuple(reversed(site))
        block = {"bytes": int(nbytes), "site": site, "freed": None}
        self.blocks.append(block)
        owner = a   # the buffer that owns the memory: every view of the array holds it
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        weakref.finalize(owner, self._release, block)

    def _release(self, block):
        if block["freed"] is None and AllocationTrace.active is self:
            block["freed"] = len(self.blocks)


class LivePool:
    """CuPy's default pool as far as tests/gpu/test_memory_cuda.py reads it: used_bytes, the
    live device allocations each rounded up to 512 bytes; total_bytes, the most they reached
    since the last free_all_blocks (a pool that keeps every freed block cached and reuses it
    perfectly: CuPy's own total is at least that). run_cuda_path.py's memory scenarios count
    into one of their own; the stand-in GPU machine (tests/gpu_standin) makes one its default."""

    def __init__(self):
        self.used = self.total = 0

    def add(self, a, nbytes):
        from cllm_gpu.model import POOL_ROUND
        n = -(-int(nbytes) // POOL_ROUND) * POOL_ROUND
        self.used += n
        self.total = max(self.total, self.used)
        owner = a
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        weakref.finalize(owner, self._release, n)

    def _release(self, n):
        self.used -= n

    def used_bytes(self):
        return self.used

    def total_bytes(self):
        return self.total

    def free_bytes(self):  # the freed blocks it keeps cached
        return self.total - self.used

    def free_all_blocks(self):
        self.total = self.used


def allocated(a, nbytes):
    """Register a device allocation; during a capture it must use the private pool."""
    if AllocationTrace.active is not None:
        AllocationTrace.active.add(a, nbytes)
    if CAPTURE.active:
        if CAPTURE.allocator is None:
            CAPTURE.invalidated = True
            raise RuntimeError("device allocation during stream capture outside a private "
                               "memory pool (cupy.cuda.using_allocator)")
        CAPTURE.allocator(max(nbytes, 1))
        CAPTURE.created.append(a)


def host_read(what):
    """A device -> host read: illegal inside a capture (it would synchronize)."""
    if recording():
        CAPTURE.invalidated = True
        raise RuntimeError(f"{what}: a device->host read during stream capture "
                           f"(cudaErrorStreamCaptureUnsupported)")


def host_write(what):
    """A host -> device copy (ndarray.set, cupy.asarray of host data): CuPy 14 refuses it
    while the current stream is capturing (cupy/cuda/memory.pyx, copy_from_host_async raises
    RuntimeError before any CUDA call, so the capture itself goes on)."""
    if recording():
        raise RuntimeError(f"{what}: the current stream is capturing, so H2D transfers are "
                           f"disallowed")


def unit(fn):
    """Record `fn` (a launcher) as one unit: its inner device work is not recorded separately;
    a replay runs it again and copies what it returned into the arrays it returned first."""
    def run(*a, **k):
        CAPTURE.depth += 1
        try:
            res = fn(*a, **k)
        finally:
            CAPTURE.depth -= 1
        if recording():
            def thunk():
                CAPTURE.depth += 1
                try:
                    new = fn(*a, **k)
                finally:
                    CAPTURE.depth -= 1
                for old, now in zip(_flat(res), _flat(new)):
                    if isinstance(old, np.ndarray) and old is not now:
                        np.copyto(old.view(np.ndarray), np.asarray(now).view(np.ndarray))
            CAPTURE.thunks.append(thunk)
        return res
    run.__wrapped__ = fn
    return run


def _flat(res):
    return list(res) if isinstance(res, (tuple, list)) else [res]


class Graph:
    def __init__(self, thunks, memory=()):
        self.thunks = thunks
        # what the capture allocated stays allocated with the graph, as the private pool's
        # blocks do on a GPU: replays write into it (through raw pointers, for kernels)
        self.memory = list(memory)

    def launch(self, stream=None):
        if CAPTURE.active:
            raise RuntimeError("graph launch inside a capture")
        CAPTURE.launches += 1
        for t in self.thunks:
            t()

    def upload(self, stream=None):
        pass


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True  # the fake runs everything at once: done when recorded

    def synchronize(self):
        if not self.recorded:
            raise RuntimeError("Event.synchronize before record")
        host_read("Event.synchronize")

    @property
    def done(self):
        return self.recorded


class Stream:
    """cupy.cuda.Stream: current inside `with`, events, and capture."""
    stack: list = []
    fail_begin = None    # a message: begin_capture raises it (capture unsupported)

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.null = null
        self.ptr = 0 if null else id(self)   # the cudaStream_t: NULL is the legacy stream

    def __enter__(self):
        Stream.stack.append(self)
        return self

    def __exit__(self, *exc):
        Stream.stack.pop()

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        if not event.done:
            raise RuntimeError("wait_event on an event never recorded")

    def synchronize(self):
        host_read("Stream.synchronize")

    def is_capturing(self):
        return CAPTURE.active

    def begin_capture(self, mode=None):
        from . import fake_cupy
        if Stream.fail_begin:
            raise RuntimeError(Stream.fail_begin)
        if self.null:
            raise RuntimeError("capture on the legacy default stream is not allowed")
        if current_stream() is not self:
            raise RuntimeError("capturing a stream that is not the current one")
        if CAPTURE.active:
            raise RuntimeError("nested capture")
        CAPTURE.snapshot = [(a, a.view(np.ndarray).copy()) for a in fake_cupy.live_arrays()]
        CAPTURE.thunks, CAPTURE.created, CAPTURE.invalidated = [], [], False
        CAPTURE.active = True

    def end_capture(self):
        if not CAPTURE.active:
            raise RuntimeError("end_capture without begin_capture")
        CAPTURE.active = False
        for a, saved in CAPTURE.snapshot:   # a real capture ran nothing
            np.copyto(a.view(np.ndarray), saved)
        for a in CAPTURE.created:
            p = a.view(np.ndarray)
            p[...] = np.nan if p.dtype.kind == "f" else -12345
        # the graph takes the recorded work (and, through it, the arrays it reads): nothing
        # here keeps them once the graph is dropped
        created, CAPTURE.snapshot, CAPTURE.created = CAPTURE.created, [], []
        thunks, CAPTURE.thunks = CAPTURE.thunks, []
        if CAPTURE.invalidated:
            raise RuntimeError("stream capture invalidated (cudaErrorStreamCaptureInvalidated)")
        CAPTURE.captures += 1
        return Graph(thunks, memory=created)


NULL_STREAM = Stream(null=True)


def current_stream():
    return Stream.stack[-1] if Stream.stack else NULL_STREAM


class MemoryPool:
    def __init__(self):
        self.allocated = 0
        self.sizes = []   # every malloc's size, in order

    def malloc(self, size):
        self.allocated += size
        self.sizes.append(size)

    def free_all_blocks(self):
        pass

    def total_bytes(self):
        return self.allocated


@contextlib.contextmanager
def using_allocator(allocator=None):
    prev, CAPTURE.allocator = CAPTURE.allocator, allocator
    try:
        yield
    finally:
        CAPTURE.allocator = prev


def use_reference_launchers():
    """Swap every CUDA launcher of cllm_gpu.ops (`X_cuda` with a reference `X_ref` beside it)
    for that reference (see the module docstring); each one is a recorded unit of a capture."""
    import pkgutil

    from cllm_gpu import ops as ops_pkg
    swapped = []
    for info in pkgutil.iter_modules(ops_pkg.__path__):
        m = importlib.import_module(f"cllm_gpu.ops.{info.name}")
        for name in [n for n in vars(m) if n.endswith("_cuda") and callable(getattr(m, n))]:
            ref = getattr(m, name[:-len("_cuda")] + "_ref", None)
            if ref is not None:
                setattr(m, name, unit(ref))
                swapped.append(name)
    # bf16 lives as the host path keeps it (tagged float32), which the references compute on
    cast = importlib.import_module("cllm_gpu.ops.cast")
    cast.bf16_storage_dtype = ops_pkg.bf16_storage_dtype = lambda on_device: cast.BF16_HOST_DTYPE
    return swapped
