"""What the emulator's fake CuPy assumes of CuPy 14.2 (tests/test_fake_cupy_strictness.py,
docs/emulator.md), checked on the real one: how a launch converts its scalar arguments and
takes its grid, block and keywords, what a stream capture refuses, and the default dtype. A
difference here means the emulated tests check something the GPU does not do."""
import numpy as np
import pytest

cp = pytest.importorskip("cupy")

_PROBE = r"""
extern "C" __global__ void probe(int i, long long l, float f, double d, double* out,
                                 unsigned int* blocks) {
    if (threadIdx.x == 0) atomicAdd(blocks, 1u);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        out[0] = i; out[1] = (double)l; out[2] = f; out[3] = d;
    }
}
"""


@pytest.fixture(scope="module")
def probe():
    return cp.RawKernel(_PROBE, "probe")


def test_scalar_arguments_by_type(probe):
    # the fake demands the C parameter's exact NumPy type: a Python int is a long long here
    # and a Python float a double (cupy/_core/_scalar.pyx), so those two may be passed as is
    out, blocks = cp.zeros(4, np.float64), cp.zeros(1, np.uint32)
    probe((1,), (32,), (np.int32(-7), 2**40 + 3, np.float32(0.1), 0.1, out, blocks))
    assert cp.asnumpy(out).tolist() == [-7.0, float(2**40 + 3), float(np.float32(0.1)), 0.1]


def test_grid_and_block_are_tuples_of_integers(probe):
    out, blocks = cp.zeros(4, np.float64), cp.zeros(1, np.uint32)
    args = (np.int32(0), 0, np.float32(0), 0.0, out, blocks)
    with pytest.raises(TypeError):
        probe([1], (32,), args)
    with pytest.raises(TypeError):
        probe((1,), (32.0,), args)
    with pytest.raises(TypeError):
        probe((1,), (32,), args, shared_memory=0)     # no such keyword
    probe((3,), (32,), args, shared_mem=0, stream=cp.cuda.get_current_stream())
    # a grid dimension of 0 is one block (function.pyx: max(1, grid[0])); the fake refuses it
    probe((0,), (32,), args)
    assert int(blocks[0]) == 4


def test_capture_refuses_host_transfers():
    a = cp.zeros(3, np.float32)
    # the zero fill ran on the legacy default stream, which the non-blocking stream below does
    # not wait for: finished before `a[...] = 5` there, or it could land after it
    cp.cuda.get_current_stream().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    pool = cp.cuda.MemoryPool()
    with s, cp.cuda.using_allocator(pool.malloc):
        s.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="H2D transfers are disallowed"):
                a.set(np.ones(3, np.float32))
            with pytest.raises(RuntimeError, match="H2D transfers are disallowed"):
                cp.asarray(np.arange(3.0))
            with pytest.raises(RuntimeError, match="capturing"):
                cp.asnumpy(a)   # refused before any CUDA call: the capture goes on
            b = cp.asarray(a, dtype=np.float64)   # a device cast: captured
            c = cp.asarray(np.float64(2.5))       # 0-d: filled by a kernel, captured
        finally:
            graph = s.end_capture()
    with s:   # on the graph's stream: a non-blocking stream does not wait for the legacy one
        a[...] = 5
    graph.launch(s)
    s.synchronize()
    assert cp.asnumpy(b).tolist() == [5.0, 5.0, 5.0] and float(c) == 2.5


def test_default_dtype_is_float64():
    import cupyx
    assert cp.empty(2).dtype == cp.zeros(2).dtype == cp.ones(2).dtype == np.float64
    assert cupyx.empty_pinned(2).dtype == np.float64
