"""model.HostStaging on the GPU: an upload still waiting behind earlier work keeps its pinned
buffer after its HostStaging is dropped (an evicted activation cache), and CuPy 14.2 behaves as
tests/test_host_staging.py's stand-in assumes (its pinned pool hands a freed block straight to
the next allocation of its size class; `ndarray.set` from pinned memory returns before the copy
has read it)."""
import gc

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
cupyx = pytest.importorskip("cupyx")

from cllm_gpu.model import HostStaging  # noqa: E402

_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""
SPIN_CYCLES = 400_000_000   # about 0.2 s at 2 GHz: the host's work below takes microseconds


@pytest.fixture(scope="module")
def spin():
    return cp.RawKernel(_SPIN, "spin")


def _busy(spin):
    """Queue a kernel that keeps the current stream busy for a while."""
    spin((1,), (1,), (np.int64(SPIN_CYCLES),))


def _settle():
    """Free first what earlier tests left to be freed: their cyclic garbage (a GpuTrainer's
    staging buffers, 512-byte class) and the blocks CuPy holds behind its own copies
    (`cp.asarray`'s, released by the next empty_pinned once the device is idle). Freed later,
    between a test's own free and allocation, they would sit on top of the pool's free list."""
    gc.collect()
    cp.cuda.Device().synchronize()
    cupyx.empty_pinned(1)


def test_pinned_pool_reuses_a_freed_block_at_once():
    _settle()
    a = cupyx.empty_pinned((2, 4), dtype=np.int32)
    ptr = a.ctypes.data
    del a
    gc.collect()
    assert cupyx.empty_pinned((4, 2), dtype=np.int32).ctypes.data == ptr


def test_set_from_pinned_memory_reads_it_when_the_stream_gets_there(spin):
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        dst = cp.zeros((2, 4), dtype=np.int32)
        src = cupyx.empty_pinned((2, 4), dtype=np.int32)
        src[...] = 1
        stream.synchronize()
        _busy(spin)
        dst.set(src, stream=stream)
        src[...] = 2          # before the copy has run: the copy reads this
        stream.synchronize()
    assert (dst.get() == 2).all()


def test_dropped_staging_pending_upload_keeps_its_ids(spin):
    stream = cp.cuda.Stream(non_blocking=True)
    ids = np.arange(8, dtype=np.int32).reshape(2, 4)
    _settle()   # else the grabs below may take other freed blocks, not the old buffers
    with stream:
        dst = cp.zeros((2, 4), dtype=np.int32)
        stream.synchronize()
        _busy(spin)
        old = HostStaging(cp)
        old.upload(dst, ids)   # queued behind the spin
        del old                # its cache evicted
        gc.collect()
        # every block of that size class the pool could hand out, overwritten at once
        grabbed = [cupyx.empty_pinned((4, 2), dtype=np.int32) for _ in range(8)]
        for g in grabbed:
            g[...] = -7
        stream.synchronize()
    np.testing.assert_array_equal(dst.get(), ids)
