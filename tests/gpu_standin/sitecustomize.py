"""Stand-in "GPU machine" for testing scripts/gpu_session.sh on a CPU (tests/test_gpu_session.py).

With this folder first on PYTHONPATH, every Python process that imports `cupy` (or `cllm_gpu`)
gets the CUDA emulator's fake CuPy instead (tests/cuda_emulator/fake_cupy.py: the real
kernels_cu sources compiled with g++, launched by the real launchers), installed at the first
import of either, before cllm_gpu's modules exist, as `install()` requires. Processes that
import neither (pip, the report helper) pay nothing.
tests/gpu_standin/bin holds the matching stand-ins for nvidia-smi, nvcc, compute-sanitizer and
ncu.

On top of the emulator's fake this adds the few CuPy calls the session scripts make and the
model path does not: runtime versions and device count, the memory pool, RawModule (compiles
through the emulator's g++ build, so the compile stage times a real compile), cuRAND-style
RandomState, Event timing, arange/copyto/empty_like/zeros_like, show_config, and streams that
refuse a capture (the emulator runs each launch at once), so --cuda-graph takes its fallback.
"""
import contextlib
import importlib.abc
import importlib.util
import sys
import time
import types
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent
_NAMES = ("cupy", "cupyx", "cupy_backends", "cllm_gpu")
_state = {"installed": False, "installing": False}


def _extend(fake):
    import numpy as np
    from cuda_emulator import build, fake_cupy

    rt = fake.cuda.runtime
    props = rt.getDeviceProperties(0)
    rt.getDeviceProperties = lambda i: dict(props, multiProcessorCount=1,
                                            totalGlobalMem=1 << 30)
    rt.getDeviceCount = lambda: 1
    rt.runtimeGetVersion = lambda: 0  # 0: not a CUDA runtime
    rt.driverGetVersion = lambda: 0
    fake.show_config = lambda: print("CuPy: the CUDA emulator's stand-in (tests/gpu_standin)")

    class Pool:
        def total_bytes(self):
            return 0

        used_bytes = total_bytes

        def free_all_blocks(self):
            pass
    fake.get_default_memory_pool = Pool

    class Event(fake_cupy.Event):
        def record(self, stream=None):
            super().record(stream)
            self.t = time.perf_counter()
    fake.cuda.Event = Event
    fake.cuda.get_elapsed_time = lambda a, b: 1000 * (b.t - a.t)

    # streams enough for cuda_graph.StepGraph to try a capture, fail it (the emulator runs
    # launches at once and cannot record them) and fall back to un-captured steps, as it does
    # on a GPU whose capture fails
    def no_capture(self):
        raise RuntimeError("stream capture is not emulated (tests/gpu_standin)")
    S = fake_cupy.Stream
    S.wait_event = lambda self, event: None
    S.__enter__ = lambda self: self
    S.__exit__ = lambda self, *exc: False
    S.begin_capture = S.end_capture = no_capture
    fake.cuda.MemoryPool = Pool
    Pool.malloc = lambda self, n: None
    fake.cuda.using_allocator = lambda alloc=None: contextlib.nullcontext()

    def arange(*args, dtype=None):
        return fake.asarray(np.arange(*args, dtype=dtype))

    def copyto(dst, src):
        np.copyto(dst.view(np.ndarray), src.view(np.ndarray))
    fake.arange, fake.copyto = arange, copyto
    fake.empty_like = lambda a, dtype=None: fake.empty(a.shape, dtype or a.dtype)
    fake.zeros_like = lambda a, dtype=None: fake.zeros(a.shape, dtype or a.dtype)

    class RandomState:
        def __init__(self, seed=None):
            self.rng = np.random.default_rng(seed)

        def standard_normal(self, size=None, dtype=float):
            return fake.asarray(self.rng.standard_normal(size).astype(dtype))

        def randint(self, low, high=None, size=None, dtype=int):
            return fake.asarray(self.rng.integers(low, high, size).astype(dtype))
    fake.random = types.SimpleNamespace(RandomState=RandomState)

    class CompileException(Exception):
        def get_message(self):
            return str(self)

    class RawModule:
        """cupy.RawModule over the emulator's build: the stem comes from kernel_source's first
        line (`#line 1 "<stem>.cu"`)."""

        def __init__(self, code, options=(), name_expressions=()):
            self.stem = code.split("\n", 1)[0].split('"')[1].rsplit(".", 1)[0]

        def compile(self):
            try:
                build.build(self.stem)
            except RuntimeError as e:
                raise CompileException(str(e)) from None

        def get_function(self, name):
            return fake_cupy.EmuKernel(self.stem, name)
    fake.RawModule = RawModule
    fake.cuda.compiler = types.SimpleNamespace(CompileException=CompileException)
    fake.cuda.nvrtc = types.SimpleNamespace(getVersion=lambda: (0, 0))
    sys.modules["cupy.cuda"] = fake.cuda
    sys.modules["cupy.cuda.compiler"] = fake.cuda.compiler
    sys.modules["cupy.cuda.nvrtc"] = fake.cuda.nvrtc


class _LoadedModule(importlib.abc.Loader):
    def create_module(self, spec):
        return sys.modules[spec.name]

    def exec_module(self, module):
        pass


class _FakeCupyFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in _NAMES or _state["installing"]:
            return None  # (while installing, cllm_gpu and its imports load the normal way)
        if not _state["installed"]:
            _state["installing"] = True
            try:
                sys.path.insert(0, str(_TESTS))
                sys.path.insert(0, str(_TESTS.parent))
                from cuda_emulator import fake_cupy
                _extend(fake_cupy.install())
            finally:
                _state["installing"] = False
            _state["installed"] = True
        mod = sys.modules.get(fullname)
        if mod is None:
            return None
        # the module the install already loaded, handed over as it is (not loaded twice)
        spec = importlib.util.spec_from_loader(fullname, _LoadedModule(),
                                               is_package=hasattr(mod, "__path__"))
        if hasattr(mod, "__path__"):
            spec.submodule_search_locations = list(mod.__path__)
        return spec


sys.meta_path.insert(0, _FakeCupyFinder())
