"""model.HostStaging's pinned buffers against CuPy 14.2's semantics, on a small stand-in for the
parts of CuPy it uses (the emulator's fake CuPy runs every copy at once, so it cannot show an
ordering hazard):

- `ndarray.set(pinned, stream)` is `copy_from_host_async` (cupy/_core/core.pyx): the copy reads
  the pinned bytes when the stream reaches it, not when `set` returns;
- `cupyx.empty_pinned` allocates from CuPy's default pinned pool (cupy/__init__.py), which hands
  a block freed by Python straight to the next allocation of its size class (512-byte units
  rounded up to a power of two, cupy/cuda/pinned_memory.pyx), with no regard to copies still
  reading it (CuPy's own asynchronous copies keep their buffers in `_add_to_watch_list` until
  their event fires).
"""
import collections
import ctypes
import sys
import types
import weakref

import numpy as np
import pytest

from cllm_gpu.model import HostStaging


class Stream:
    """A stream whose work runs only when `run()` is called (the GPU busy with earlier work)."""
    def __init__(self):
        self.queue, self.done_upto = [], 0

    def run(self, upto=None):
        upto = len(self.queue) if upto is None else upto
        while self.done_upto < upto:
            self.queue[self.done_upto]()
            self.queue[self.done_upto] = None   # a copy that ran holds nothing any more
            self.done_upto += 1


class Event:
    def __init__(self, disable_timing=False):
        self.stream, self.at = None, None

    def record(self, stream):
        self.stream, self.at = stream, len(stream.queue)

    @property
    def done(self):
        return self.stream.done_upto >= self.at

    def synchronize(self):
        self.stream.run(self.at)


class PinnedPool:
    """CuPy's pinned pool: blocks are never given back to the system; a block whose array is
    freed goes on its size class's free list and is the next allocation of that class."""
    def __init__(self):
        self.free, self.blocks = {}, []

    def empty_pinned(self, shape, dtype=float):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        size = 1 << max(0, (-(-n // 512) * 512 - 1).bit_length())
        free = self.free.setdefault(size, [])
        block = free.pop() if free else bytearray(size)
        self.blocks.append(block)
        a = np.frombuffer(block, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
        weakref.finalize(a, free.append, block)
        return a


class DeviceArray:
    """Device memory: `set` queues a copy that reads the source's bytes when it runs."""
    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.data = np.zeros(shape, self.dtype)

    def set(self, arr, stream=None):
        assert arr.shape == self.shape and arr.dtype == self.dtype
        addr, nbytes = arr.ctypes.data, arr.nbytes   # the bytes, not the Python object
        stream.queue.append(lambda: self.data.__setitem__(..., np.frombuffer(
            ctypes.string_at(addr, nbytes), self.dtype).reshape(self.shape)))


@pytest.fixture
def cuda(monkeypatch):
    stream, pool = Stream(), PinnedPool()
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(get_current_stream=lambda: stream, Event=Event)
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = pool.empty_pinned
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setattr(HostStaging, "_IN_FLIGHT", collections.deque(), raising=False)
    return types.SimpleNamespace(cupy=cupy, stream=stream, pool=pool)


def test_a_pending_copy_reads_what_was_uploaded(cuda):
    dst = DeviceArray((2, 4), np.int32)
    staging = HostStaging(cuda.cupy)
    for ids in (np.arange(8), np.arange(8) + 100, np.arange(8) + 200):
        staging.upload(dst, ids.reshape(2, 4))   # the third waits for the first copy
    cuda.stream.run()
    np.testing.assert_array_equal(dst.data, (np.arange(8) + 200).reshape(2, 4))


def test_every_pending_copy_reads_its_own_upload(cuda):
    """Three uploads behind a busy stream: the third reuses the first one's pinned buffer,
    so it must wait for the first copy to have run; each copy, when it runs, delivers the
    ids uploaded for it (not only the last one)."""
    seen = []

    class Recording(DeviceArray):
        def set(self, arr, stream=None):
            super().set(arr, stream)
            stream.queue.append(lambda: seen.append(self.data.copy()))

    dst = Recording((2, 4), np.int32)
    staging = HostStaging(cuda.cupy)
    uploads = [np.arange(8) + k for k in (0, 100, 200)]
    for ids in uploads:
        staging.upload(dst, ids.reshape(2, 4))
    cuda.stream.run()
    assert [s.ravel().tolist() for s in seen] == [u.tolist() for u in uploads]


def test_dropped_staging_keeps_its_buffers_until_their_copies_ran(cuda):
    """An activation cache evicted (model._cache_for) drops its HostStaging while its last
    upload may still wait behind earlier GPU work; the next cache's staging, allocating the
    same size class, must not be handed that pinned block and overwrite the ids before the
    pending copy has read them."""
    old_dst = DeviceArray((2, 4), np.int32)
    old = HostStaging(cuda.cupy)
    old.upload(old_dst, np.arange(8).reshape(2, 4))
    del old                                  # the cache holding it is evicted
    new_dst = DeviceArray((4, 2), np.int32)  # another shape, the same pinned size class
    HostStaging(cuda.cupy).upload(new_dst, np.full((4, 2), -7))
    cuda.stream.run()
    np.testing.assert_array_equal(old_dst.data, np.arange(8).reshape(2, 4))
    np.testing.assert_array_equal(new_dst.data, np.full((4, 2), -7))


def test_buffers_of_a_dropped_staging_are_released_after_their_copies(cuda):
    """What is kept for pending copies does not grow: once a copy has run, its buffer goes
    back to the pool at the next upload."""
    dst = DeviceArray((2, 4), np.int32)
    old = HostStaging(cuda.cupy)
    old.upload(dst, np.arange(8).reshape(2, 4))
    del old
    cuda.stream.run()
    HostStaging(cuda.cupy).upload(DeviceArray((1, 8), np.int32), np.arange(8)[None])
    # the new staging's two buffers: one of them is the dropped staging's block, released
    assert len({id(b) for b in cuda.pool.blocks}) == 2


def test_a_new_destination_never_takes_a_dropped_ones_slot(cuda):
    """Slots are found by id(destination): a destination dropped while its slot lives on
    must not hand its id, and so its pinned buffers (of its dtype), to the next array."""
    staging = HostStaging(cuda.cupy)
    old = DeviceArray((2, 4), np.int32)
    staging.upload(old, np.arange(8).reshape(2, 4))
    cuda.stream.run()
    del old
    for _ in range(8):   # CPython hands a freed object's address to the next of its size
        new = DeviceArray((2, 4), np.float64)
        staging.upload(new, np.full((2, 4), 0.5))
        cuda.stream.run()
        np.testing.assert_array_equal(new.data, np.full((2, 4), 0.5))
