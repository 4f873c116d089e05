"""cuda_graph.StepGraph's host-side bookkeeping on a small stand-in for the parts of CuPy 14.2 it
uses (the emulator's fake CuPy keeps every pinned buffer and every capture allocation alive, so
it can show neither a leak nor a block given back during a capture):

- pinned staging buffers: the stand-in pinned pool of test_host_staging.py (CuPy's
  `cupyx.empty_pinned` pool), counting the live buffers;
- the capture's private `cupy.cuda.MemoryPool`: a block whose array is dropped goes back to the
  pool's free list, and an allocation the device cannot serve frees every free block
  (`free_all_blocks`, cudaFree) and retries, as `SingleDeviceMemoryPool._try_malloc` does in
  cupy/cuda/memory.pyx (v14.2.0), also in the middle of a relaxed-mode capture (the mode
  `Stream.begin_capture` picks so that the pool may cudaMalloc there).
"""
import sys
import types
import weakref

import numpy as np
import pytest

from test_host_staging import DeviceArray, Event, Stream, cuda  # noqa: F401  (cuda: fixture)

import cllm_gpu.cuda_graph as cuda_graph


class CaptureStream(Stream):
    """One stream: current inside `with`, capture begun and ended by the StepGraph."""
    capturing = False

    def __init__(self, non_blocking=False):
        super().__init__()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        self.run()

    def begin_capture(self, mode=None):
        self.capturing = True

    def end_capture(self):
        self.capturing = False
        return types.SimpleNamespace(launch=lambda stream=None: None)


class DevicePool:
    """CuPy's MemoryPool in the part that matters here: `malloc` reuses a free block of the
    size, else cudaMallocs; past the device's `capacity` it frees every free block and retries
    once before OutOfMemoryError. `freed` lists the addresses given back with cudaFree."""
    next_addr = 0x1000

    def __init__(self, capacity):
        self.capacity, self.in_device, self.free, self.freed = capacity, 0, {}, []

    def malloc(self, size):
        blocks = self.free.setdefault(size, [])
        if not blocks:
            if self.in_device + size > self.capacity:
                self.free_all_blocks()
            if self.in_device + size > self.capacity:
                raise MemoryError(f"out of memory allocating {size} bytes")
            self.in_device += size
            DevicePool.next_addr += size
            blocks.append(DevicePool.next_addr)
        ptr = MemoryPointer(blocks.pop(), size)
        weakref.finalize(ptr, self.free[size].append, ptr.ptr)  # dropped: back to the pool
        return ptr

    def free_all_blocks(self):
        for size, blocks in self.free.items():
            self.freed += blocks
            self.in_device -= size * len(blocks)
            blocks.clear()


class MemoryPointer:
    def __init__(self, ptr, size):
        self.ptr, self.size = ptr, size


class Allocating:
    """`cupy.cuda.using_allocator`: the allocator device arrays are allocated from."""
    current = None

    def __init__(self, allocator):
        self.allocator = allocator

    def __enter__(self):
        self.prev, Allocating.current = Allocating.current, self.allocator

    def __exit__(self, *exc):
        Allocating.current = self.prev


class Model:
    """The batch buffers of a model that keeps two caches and drops the oldest for a third
    shape (CLLMModel keeps the last backward's since 2026-12-03; its training cache still
    goes with the trainer's sample, release_activations): the step after finds new buffers."""
    def __init__(self):
        self.bufs = {}

    def batch_buffers(self, B, T):
        if (B, T) not in self.bufs:
            if len(self.bufs) >= 2:
                self.bufs.pop(next(iter(self.bufs)))
            self.bufs[(B, T)] = (DeviceArray((B, T), np.int32), DeviceArray((B, T), np.int32))
        return self.bufs[(B, T)]


class Values:
    def set_inputs(self, tc, lr, step, n_valid):
        pass

    def outputs(self):
        return np.zeros(3)


@pytest.fixture
def graph(cuda, monkeypatch):
    stream = CaptureStream()
    cuda.cupy.cuda = types.SimpleNamespace(
        get_current_stream=lambda: stream, Event=Event, Stream=lambda non_blocking: stream,
        MemoryPool=lambda: DevicePool(cuda.capacity), using_allocator=Allocating)
    cuda.capacity, cuda.stream = 1 << 20, stream
    cuda.body = lambda: None   # what a step does on the device (StepGraph._body)
    monkeypatch.setattr(cuda_graph, "training_step",
                        lambda model, micro_batches, tc, sv: (list(micro_batches), cuda.body()))
    monkeypatch.setitem(sys.modules, "cupy", cuda.cupy)
    logs = []
    g = cuda_graph.StepGraph(Model(), types.SimpleNamespace(), Values(), logs.append)
    return types.SimpleNamespace(g=g, logs=logs, cuda=cuda)


def batch(B, T):
    from cllm_gpu.model import Batch
    ids = np.arange(B * T, dtype=np.int32).reshape(B, T) % 50
    return Batch(ids, ids.copy(), B * T)


def test_rekeying_does_not_grow_pinned_staging(graph):
    """Training interleaved with whatever drops the training shape's cache (a sample through
    the trainer, which releases every cache) sets the graph up again for new batch buffers,
    again and again in a long run; the pinned buffers of the buffers it no longer uses must
    go."""
    live = []
    cupyx = sys.modules["cupyx"]
    empty_pinned = cupyx.empty_pinned

    def counted(*a, **k):
        buf = empty_pinned(*a, **k)
        live.append(weakref.ref(buf))
        return buf
    cupyx.empty_pinned = counted
    model = graph.g.model
    for i in range(30):
        graph.g.step([batch(4, 8)], lr=1e-3, step=i + 1, n_valid=32)
        graph.cuda.stream.run()
        model.batch_buffers(2, 8), model.batch_buffers(1, 8)   # eval, sampling: evicted
    assert graph.g.warmups == 30   # every step found new buffers: set up again
    alive = sum(r() is not None for r in live)
    # the current buffers' two slots of two pinned buffers (the previous key's were released
    # from HostStaging._IN_FLIGHT by the next upload: every copy had run)
    assert alive <= 4, f"{alive} pinned staging buffers alive after 30 rekeys"


@pytest.mark.parametrize("capacity", [640 << 10, 4 << 20])
def test_capture_never_gives_back_memory_the_graph_uses(graph, capacity):
    """The step frees temporaries during the capture (they go back to the private pool, and
    the graph's later kernels reuse them); when a later allocation finds the device full,
    CuPy's pool frees its free blocks and retries. A block the captured kernels use must not
    be freed: each replay would write memory that other arrays own by then."""
    used = []

    def step_body():
        if not graph.cuda.stream.capturing:
            return   # the warm-up allocates from CuPy's default pool, not modelled here
        alloc = Allocating.current
        for size in (256 << 10, 256 << 10, 512 << 10):  # each dropped before the next
            used.append(alloc(size).ptr)

    # 640 KiB: the third allocation fits only once the first two's block (free again) is
    # given back; 4 MiB: all of them fit at once
    graph.cuda.capacity = capacity
    graph.cuda.body = step_body
    g = graph.g
    g.step([batch(4, 8)], lr=1e-3, step=1, n_valid=32)  # warm-up
    g.step([batch(4, 8)], lr=1e-3, step=2, n_valid=32)  # captured
    if g.graph is not None:
        assert len(used) == 3 and not set(used) & set(g.pool.freed), "a block the graph uses was freed"
    else:  # or the capture is abandoned, saying why, and the step runs un-captured
        assert any("out of GPU memory" in line for line in graph.logs), graph.logs
    assert (g.graph is not None) == (capacity >= 1 << 20)   # it fits: captured
