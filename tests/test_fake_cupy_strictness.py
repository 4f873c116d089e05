"""The emulator's fake CuPy refuses what CuPy 14.2 refuses where the emulated tests could
otherwise pass a call the GPU would reject (cupy/cuda/function.pyx, cupy/cuda/memory.pyx,
cupy/_core/core.pyx at v14.2.0): a launch's grid and block are tuples of integers and the
launch takes no keyword but shared_mem and stream; a host -> device copy (ndarray.set,
cupy.asarray of host data, but for a 0-d value, which CuPy fills in) or a device -> host
read (cupy.asnumpy) inside a stream capture raises. Runs in this process without installing
the fake as `cupy`; the real CuPy's launch is called where its refusals need no GPU."""
import inspect
import types

import numpy as np
import pytest

from cuda_emulator import fake_cupy, fake_graph


def test_launch_dims_are_tuples_of_integers():
    assert fake_cupy._launch_dims("grid", (4, 2)) == (4, 2, 1)
    assert fake_cupy._launch_dims("block", (np.int64(256),)) == (256, 1, 1)
    with pytest.raises(TypeError, match="expected tuple, got list"):
        fake_cupy._launch_dims("grid", [4, 2])
    with pytest.raises(TypeError, match="must be an integer"):
        fake_cupy._launch_dims("block", (128.0,))


@pytest.mark.ci_required("dev")
def test_real_cupy_launch_refuses_the_same():
    # CuPy 14.2's compiled Function.__call__ itself, without a GPU: each refusal below comes
    # from its argument conversion, before any CUDA call (a Function with no module: ptr 0)
    cupy = pytest.importorskip("cupy")
    from cupy.cuda.function import Function
    f, stream = Function.__new__(Function), types.SimpleNamespace(ptr=0)
    with pytest.raises(TypeError, match="expected tuple, got list"):
        f([1], (32,), (), stream=stream)
    with pytest.raises(TypeError, match="cannot be interpreted as an integer"):
        f((1,), (32.0,), (), stream=stream)
    with pytest.raises(TypeError, match="unexpected keyword argument 'shared_memory'"):
        f((1,), (32,), (), shared_memory=0, stream=stream)
    if not cupy.cuda.is_available():
        # a float as a later dimension converts (truncated, a C int) and the call goes on to
        # CUDA, which is missing here: CuPy is more lenient than the fake there
        with pytest.raises(Exception) as e:
            f((1, 2.7), (32,), (), stream=stream)
        assert not isinstance(e.value, TypeError), e.value
    with pytest.raises(TypeError, match="must be an integer"):
        fake_cupy._launch_dims("grid", (1, 2.7))


def test_launch_takes_no_other_keyword():
    # RawKernel.__call__(grid, block, args, **kwargs) passes them to Function.__call__, whose
    # only keywords are shared_mem and stream (and enable_cooperative_groups, which RawKernel
    # sets itself): a misspelt keyword is a TypeError on the GPU, so it must be one here
    params = list(inspect.signature(fake_cupy.EmuKernel.__call__).parameters.values())
    assert [p.name for p in params] == ["self", "grid", "block", "args", "shared_mem", "stream"]
    assert not any(p.kind == p.VAR_KEYWORD for p in params)


def test_host_transfers_refused_during_capture():
    a = fake_cupy.zeros(3, np.float32)
    a.set(np.ones(3, np.float32))              # outside a capture: fine
    s = fake_graph.Stream(non_blocking=True)
    with s, fake_graph.using_allocator(fake_graph.MemoryPool().malloc):
        s.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="H2D transfers are disallowed"):
                a.set(np.full(3, 2, np.float32))
            with pytest.raises(RuntimeError, match="H2D transfers are disallowed"):
                fake_cupy.asarray(np.arange(3.0))
            c = fake_cupy.asarray(2.5)   # 0-d: CuPy fills it (a kernel), no copy
            with pytest.raises(RuntimeError, match="during stream capture"):
                fake_cupy.asnumpy(a)
        finally:
            # the fake invalidates the capture on any refused read; CuPy refuses asnumpy before
            # any CUDA call and its capture goes on (tests/gpu/test_cupy_semantics_cuda.py),
            # only a read that reaches CUDA (Stream.synchronize) invalidates it: stricter here
            with pytest.raises(RuntimeError, match="invalidated"):
                s.end_capture()
    assert fake_cupy.asnumpy(a).tolist() == [1.0, 1.0, 1.0]
    assert c.shape == () and c.dtype == np.float64


def test_a_device_cast_in_a_capture_is_replayed():
    a = fake_cupy.zeros(3, np.float32)
    s = fake_graph.Stream(non_blocking=True)
    with s, fake_graph.using_allocator(fake_graph.MemoryPool().malloc):
        s.begin_capture()
        b = fake_cupy.asarray(a, dtype=np.float64)
        graph = s.end_capture()
    a[...] = 5
    graph.launch(s)
    assert fake_cupy.asnumpy(b).tolist() == [5.0, 5.0, 5.0]


def test_advanced_indexing_returns_a_fresh_allocation_as_cupy():
    # a copy made by indexing with an array kept the source's allocation record, so a kernel
    # launched on it was bounds-checked against the source and the emulator crashed (h28i)
    a = fake_cupy._alloc((8, 4), np.float32)
    a.view(np.ndarray)[...] = np.arange(32, dtype=np.float32).reshape(8, 4)
    rows = a[np.array([1, 2, 5])]
    assert rows._alloc is not a._alloc and rows._alloc is not None
    start = rows.__array_interface__["data"][0]
    assert rows._alloc.base <= start
    assert start + rows.nbytes <= rows._alloc.base + rows._alloc.nbytes
    assert np.array_equal(rows.view(np.ndarray), np.arange(32).reshape(8, 4)[[1, 2, 5]])
    view, empty = a[2:4], a[3:3]  # basic slices stay views of the same allocation
    assert view._alloc is a._alloc and empty._alloc is a._alloc
