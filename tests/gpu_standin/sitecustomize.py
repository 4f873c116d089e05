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
RandomState, Event timing, arange/copyto/empty_like/zeros_like, show_config, and (for an
emulator without stream capture) streams that refuse a capture.
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
    """Add to the emulator's fake what the session scripts use and it lacks (only what is
    missing: the emulator keeps growing, and its own pieces win)."""
    import numpy as np
    from cuda_emulator import build, fake_cupy

    def add(obj, name, value):
        if not hasattr(obj, name):
            setattr(obj, name, value)

    rt = fake.cuda.runtime
    props = rt.getDeviceProperties(0)
    rt.getDeviceProperties = lambda i: {"multiProcessorCount": 1, "totalGlobalMem": 1 << 30,
                                        **props}
    add(rt, "getDeviceCount", lambda: 1)
    add(rt, "runtimeGetVersion", lambda: 0)  # 0: not a CUDA runtime
    add(rt, "driverGetVersion", lambda: 0)
    add(fake, "show_config",
        lambda: print("CuPy: the CUDA emulator's stand-in (tests/gpu_standin)"))

    # CuPy's default pool: one for the process, counting the live device allocations as the
    # real one does (tests/gpu/test_memory_cuda.py reads its used and total bytes; a pool
    # that answered 0 failed that file on the stand-in)
    from cuda_emulator import fake_graph
    if not hasattr(fake, "get_default_memory_pool"):
        pool, allocated = fake_graph.LivePool(), fake_graph.allocated

        def counted(a, nbytes):
            pool.add(a, nbytes)
            allocated(a, nbytes)
        fake_graph.allocated = counted
        fake.get_default_memory_pool = lambda: pool
    add(fake.cuda, "using_allocator", lambda alloc=None: contextlib.nullcontext())

    # event timing (the emulator runs everything at once: host time between the records)
    E = fake.cuda.Event
    if not hasattr(fake.cuda, "get_elapsed_time"):
        record = E.record

        def timed_record(self, stream=None):
            record(self, stream)
            self.t = time.perf_counter()
        E.record = timed_record
        fake.cuda.get_elapsed_time = lambda a, b: 1000 * (b.t - a.t)

    # an emulator without stream capture: streams that refuse it, so --cuda-graph takes the
    # fallback it takes on a GPU whose capture fails
    S = fake.cuda.Stream
    if not hasattr(S, "begin_capture"):
        def no_capture(self):
            raise RuntimeError("stream capture is not emulated (tests/gpu_standin)")
        S.begin_capture = S.end_capture = no_capture
        add(S, "wait_event", lambda self, event: None)
        add(S, "__enter__", lambda self: self)
        add(S, "__exit__", lambda self, *exc: False)

    add(fake, "arange", lambda *args, dtype=None: fake.asarray(np.arange(*args, dtype=dtype)))

    def copyto(dst, src):
        np.copyto(dst.view(np.ndarray), src.view(np.ndarray))
    add(fake, "copyto", copyto)
    add(fake, "empty_like", lambda a, dtype=None: fake.empty(a.shape, dtype or a.dtype))
    add(fake, "zeros_like", lambda a, dtype=None: fake.zeros(a.shape, dtype or a.dtype))

    class RandomState:
        def __init__(self, seed=None):
            self.rng = np.random.default_rng(seed)

        def standard_normal(self, size=None, dtype=float):
            return fake.asarray(self.rng.standard_normal(size).astype(dtype))

        def randint(self, low, high=None, size=None, dtype=int):
            return fake.asarray(self.rng.integers(low, high, size).astype(dtype))
    add(fake, "random", types.SimpleNamespace(RandomState=RandomState))

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
    add(fake, "RawModule", RawModule)
    add(fake.cuda, "compiler", types.SimpleNamespace(CompileException=CompileException))
    add(fake.cuda, "nvrtc", types.SimpleNamespace(getVersion=lambda: (0, 0)))
    for name in ("cuda", "cuda.compiler", "cuda.nvrtc"):
        obj = fake
        for part in name.split("."):
            obj = getattr(obj, part)
        sys.modules[f"cupy.{name}"] = obj


class _LoadedModule(importlib.abc.Loader):
    def create_module(self, spec):
        return sys.modules[spec.name]

    def exec_module(self, module):
        pass


class _FakeCupyFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if top not in _NAMES:
            return None
        if _state["installing"]:  # cllm_gpu loads the normal way; the real CuPy stays out
            if top == "cllm_gpu":  # (cllm_gpu.ops._common's guarded `import cupy` finds
                return None        # nothing, and install() hands it the fake)
            raise ModuleNotFoundError(f"no {fullname} while the stand-in installs", name=fullname)
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
