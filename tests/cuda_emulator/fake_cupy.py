"""A NumPy-backed stand-in for `cupy` whose kernels are the emulated ones (build.py +
emu_runtime.h), so the real launchers in cllm_gpu/ops run unchanged on the CPU.

`install()` puts the fake into sys.modules["cupy"] and routes `cllm_gpu.ops._cuda.kernel` to
the emulator: call it in a process of its own, before anything imports cupy.

Arrays are np.ndarray subclasses whose `.data.ptr` is the host address the emulated kernel
reads and writes. Every array the fake allocates sits between two 256-byte guard bands of 0xFF
bytes (NaN for float types), checked after every launch and library call. Inside a kernel
every access is checked exactly (emu_runtime.h): it must fall inside the bytes of an argument
array as passed, and each allocation gets a shadow (16 bytes per byte, allocated lazily and
zero-filled by the OS) for the race checks.

A launch is checked as the GPU checks it (sm_90 limits): grid and block dimensions,
`__launch_bounds__`, registers x threads within the register file (counts from NVRTC's sm_90
ptxas, when NVRTC is available: build.resources()), shared memory (static <= 48 KB, dynamic
within `max_dynamic_shared_size_bytes`); any failure raises with the reason.

Knobs for the tests: ORDER["reverse"] (thread order within a block), ORDER["blocks"] (block
order), ONLY_BLOCKS (a function (kernel name, grid) -> block indices to run, or None: run a
subset of a huge grid), OVERRIDE (build a variant of a kernel file), sparse_zeros() (an array
whose untouched pages cost no memory).

Beyond the kernels, the fake carries what CLLMModel and trainer.training_step use on the device
path: elementwise ufuncs and reductions give device results (0-d arrays, never host scalars),
host numpy operands are refused as CuPy refuses them, `.get()/.set()`, the `cupy.cuda` bits
(Device, Event, streams, set_allocator), `cupyx.empty_pinned`, `cupy.cuda.nccl` for a world of
one rank (CuPy 14's unique-id rules; each collective a range-checked copy), and
cuBLAS (fake_cublas.py: the library ops/gemm.py calls through ctypes, and CuPy's wrapper module
as CuPy 14 has it) with every operand range checked to lie inside one live allocation. Streams, events and CUDA-graph capture/replay come from
fake_graph.py, which also provides the "reference launchers" mode (`install(launchers=
"reference")`: every launcher its NumPy reference), used to check the trainer's CUDA code path
and the graph step bit for bit against the NumPy path.
"""
from __future__ import annotations

import ctypes
import importlib
import mmap
import operator
import re
import sys
import types
import weakref

import numpy as np

from . import build, fake_cublas, fake_graph
from .fake_graph import record

GUARD = 256
# thread order within a block and block order within the grid (0 ascending, 1 descending)
ORDER = {"reverse": 0, "blocks": 0}
ONLY_BLOCKS = None  # None, or fn(kernel name, grid (x, y, z)) -> linear block indices to run
SHADOW_PER_BYTE = 16  # emu_runtime.h: one 32-byte cell per 2-byte granule


def _is_host_array(x):
    return isinstance(x, np.ndarray) and not isinstance(x, FakeArr)


def _plain(x):
    return x.view(np.ndarray) if isinstance(x, FakeArr) else x


def _device_result(res):
    """A NumPy result as device memory of its own (guarded), 0-d arrays for scalars: CuPy
    returns 0-d device arrays where NumPy returns host scalars."""
    if res is None:
        return None
    if isinstance(res, tuple):
        return tuple(_device_result(r) for r in res)
    res = np.asarray(res)
    out = _alloc(res.shape, res.dtype)
    out.view(np.ndarray)[...] = res
    return out


def _refuse_host(what, args):
    if fake_graph.CAPTURE.depth:  # inside a reference launcher: NumPy code by design
        return
    for x in args:
        if _is_host_array(x):  # CuPy refuses implicit host <-> device transfers
            raise TypeError(f"{what}: a host numpy.ndarray operand among device arrays")


class FakeArr(np.ndarray):
    """A device array: NumPy memory at a real address. Elementwise ufuncs, reductions and
    indexing behave as CuPy's (device results, 0-d arrays instead of host scalars, host
    operands refused); NumPy computes them in the dtypes NumPy promotes to, as CuPy does.
    Every view carries the record of the allocation it lies in (`_alloc`)."""

    def __array_finalize__(self, obj):
        self._alloc = getattr(obj, "_alloc", None)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kw):
        _refuse_host(f"{ufunc.__name__}.{method}", inputs + (out or ()))
        args = tuple(_plain(x) for x in inputs)
        fn = getattr(ufunc, method)
        if out is not None:
            outs = tuple(_plain(o) for o in out)
            fn(*args, out=outs, **kw)
            record(lambda: fn(*args, out=outs, **kw))
            return out[0] if len(out) == 1 else out
        res = _device_result(fn(*args, **kw))
        if isinstance(res, FakeArr):  # a capture recomputes the result into the same buffer
            dst = res.view(np.ndarray)
            record(lambda: np.copyto(dst, fn(*args, **kw)))
        return res

    def __getitem__(self, key):
        res = super().__getitem__(key)
        if not isinstance(res, np.ndarray):  # an element: a 0-d device view, as in CuPy
            res = super().__getitem__((key if isinstance(key, tuple) else (key,)) + (Ellipsis,))
        elif res.size and not np.may_share_memory(res, self):  # (an empty slice shares none)
            # advanced indexing copies: NumPy's copy inherited the source's allocation record
            # (a kernel given it was checked against the wrong bounds: the emulator crashed);
            # in CuPy it is a fresh allocation, so here too (a capture recomputes it)
            src, out = self.view(np.ndarray), _device_result(res.view(np.ndarray))
            dst = out.view(np.ndarray)
            record(lambda: np.copyto(dst, src[key]))
            return out
        return res

    def __setitem__(self, key, value):
        # CuPy refuses a host array value (its message: it goes through fill); a reference
        # launcher inside a recorded unit is NumPy code by design (as in _refuse_host)
        if _is_host_array(value) and value.ndim > 0 and not fake_graph.CAPTURE.depth:
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        value = _plain(value)
        super().__setitem__(key, value)
        me = self.view(np.ndarray)
        record(lambda: me.__setitem__(key, value))

    def fill(self, value):
        super().fill(value)
        me = self.view(np.ndarray)
        record(lambda: me.fill(value))

    # device -> host reads (illegal inside a capture)
    def __float__(self):
        fake_graph.host_read("float()")
        return float(self.view(np.ndarray))

    def __int__(self):
        fake_graph.host_read("int()")
        return int(self.view(np.ndarray))

    def __bool__(self):
        fake_graph.host_read("bool()")
        return bool(self.view(np.ndarray))

    def get(self, stream=None):
        fake_graph.host_read("get()")
        return np.array(self.view(np.ndarray), copy=True)

    def set(self, arr, stream=None):
        # the checks cupy.ndarray.set makes: a host array of the same shape and dtype
        if not _is_host_array(arr):
            raise TypeError(f"set: expected a numpy.ndarray, got {type(arr).__name__}")
        if arr.shape != self.shape:
            raise ValueError(f"set: shape mismatch {arr.shape} vs {self.shape}")
        if arr.dtype != self.dtype:
            raise TypeError(f"set: {arr.dtype} array cannot be set to {self.dtype} array")
        if not self.flags.c_contiguous:
            raise RuntimeError("set: cannot set to a non-contiguous array")
        fake_graph.host_write("set()")
        self.view(np.ndarray)[...] = arr

    def copy(self, order="C"):
        out = _alloc(self.shape, self.dtype)
        src, dst = self.view(np.ndarray), out.view(np.ndarray)
        dst[...] = src
        record(lambda: np.copyto(dst, src))
        return out

    def astype(self, dtype, copy=True, **kw):
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        out = _alloc(self.shape, dtype)
        src, dst = self.view(np.ndarray), out.view(np.ndarray)
        dst[...] = src.astype(dtype, **kw)
        record(lambda: np.copyto(dst, src.astype(dtype, **kw)))
        return out


class _Allocation:
    """One device allocation: where its data starts, and the race-check shadow (lazy)."""
    __slots__ = ("base", "nbytes", "sparse", "shadow")

    def __init__(self, base, nbytes, sparse=False):
        self.base, self.nbytes, self.sparse, self.shadow = base, nbytes, sparse, None


class _Raw(np.ndarray):
    """The bytes of one device allocation (guards included), and every view of them: each
    carries the allocation's record (propagated to views and slices)."""

    def __array_finalize__(self, obj):
        self._alloc = getattr(obj, "_alloc", None)


_guarded: list = []  # (weakref to the backing buffer, start of the guard before, end after)


def _alloc(shape, dtype):
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.full(nbytes + 3 * GUARD, 0xFF, dtype=np.uint8).view(_Raw)
    raw._alloc = _Allocation(raw.__array_interface__["data"][0], raw.nbytes)
    off = GUARD + (-raw.__array_interface__["data"][0]) % GUARD  # 256-byte aligned data start
    _guarded.append((weakref.ref(raw), off - GUARD, off + nbytes + GUARD))
    a = raw[off: off + nbytes].view(dtype).reshape(shape).view(FakeArr)
    fake_graph.allocated(a, nbytes)
    return a


def live_arrays():
    """Every live allocation as a flat uint8 device array (a capture snapshots them)."""
    out = []
    for ref, lo, hi in _guarded:
        raw = ref()
        if raw is not None:
            out.append(raw[lo + GUARD:hi - GUARD].view(FakeArr))
    return out


def sparse_zeros(shape, dtype=np.float32):
    """A zero-filled device array whose memory is committed only where it is touched (an
    anonymous MAP_NORESERVE mapping): a logits buffer of more than 2**31 elements for a run of
    a few of its rows. Bounds are checked; races are not tracked on it (no shadow)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    m = mmap.mmap(-1, max(nbytes, 1), flags=flags)
    raw = np.frombuffer(m, dtype=np.uint8).view(_Raw)
    raw._alloc = _Allocation(raw.__array_interface__["data"][0], raw.nbytes, sparse=True)
    return raw[:nbytes].view(dtype).reshape(shape).view(FakeArr)


def _shadow(rec):
    """The allocation's shadow cells (np.zeros: the OS's zero pages until a cell is
    written), None for a sparse array."""
    if rec.sparse:
        return None
    if rec.shadow is None:
        rec.shadow = np.zeros((rec.nbytes + 1) // 2 * 2 * SHADOW_PER_BYTE, dtype=np.uint8)
    return rec.shadow


def check_guards():
    alive = []
    for ref, lo, hi in _guarded:
        raw = ref()
        if raw is None:
            continue
        alive.append((ref, lo, hi))
        if not ((raw[lo:lo + GUARD] == 0xFF).all() and (raw[hi - GUARD:hi] == 0xFF).all()):
            raise AssertionError("a kernel wrote past the end of an array (guard band changed)")
    _guarded[:] = alive


# dtype=float: CuPy's default, as NumPy's (float64), for empty / zeros / ones / empty_pinned
def empty(shape, dtype=float):
    return _alloc(shape, dtype)  # 0xFF garbage: NaN for floats, as a fresh device buffer may hold


def full(shape, fill_value, dtype=None):
    dtype = np.dtype(dtype) if dtype is not None else np.asarray(fill_value).dtype
    a = _alloc(shape, dtype)
    a[...] = fill_value
    return a


def zeros(shape, dtype=float):
    return full(shape, 0, dtype)


def ones(shape, dtype=float):
    return full(shape, 1, dtype)


def asarray(a, dtype=None):
    if isinstance(a, FakeArr):
        if dtype is None or np.dtype(dtype) == a.dtype:
            return a  # cupy.asarray of a device array of that dtype: the array itself
        return a.astype(dtype)  # a device cast (recorded by a capture)
    src = np.asarray(a, dtype=dtype)
    if src.ndim == 0:   # CuPy fills a 0-d array with the value (a kernel), no copy
        out = _alloc((), src.dtype)
        out.fill(src[()])
        return out
    fake_graph.host_write("cupy.asarray of host data")
    out = _alloc(src.shape, src.dtype)
    out.view(np.ndarray)[...] = src
    return out


def ascontiguousarray(a, dtype=None):
    if isinstance(a, FakeArr):
        if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        return a.astype(a.dtype if dtype is None else dtype)  # a contiguous device copy
    return asarray(np.ascontiguousarray(a, dtype=dtype))


def asnumpy(a):
    if isinstance(a, FakeArr):
        fake_graph.host_read("cupy.asnumpy")
    return np.array(np.asarray(a).view(np.ndarray), copy=True)


# ---------------------------------------------------------------- emulated kernels
_SCALAR = {"int": np.int32, "unsigned": np.uint32, "long long": np.int64, "float": np.float32,
           "double": np.float64}
_CTYPE = {np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32, np.int64: ctypes.c_int64,
          np.float32: ctypes.c_float,
          np.float64: ctypes.c_double}
_PTR_DTYPE = {"int": np.int32, "long long": np.int64, "double": np.float64, "float": np.float32,
              "cllm_bf16": np.uint16, "unsigned short": np.uint16, "unsigned": np.uint32,
              "CllmNoOutput": None}   # (dropout.cu: a pointer never dereferenced, any array)
_libs: dict = {}  # {stem: {defines: (lib, symbols, signatures, source)}}
launches: list = []
# mutation tests: {stem: dict(src=..., header=..., only=..., names=...)} builds a variant
OVERRIDE: dict = {}

# sm_90 (H100 / H200) limits a launch is checked against
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
REGISTERS_PER_BLOCK = 65536
REGISTER_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SHARED_OPTIN = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin


class _ArgDesc(ctypes.Structure):
    _fields_ = [("lo", ctypes.c_uint64), ("hi", ctypes.c_uint64), ("base", ctypes.c_uint64),
                ("shadow", ctypes.c_void_p), ("name", ctypes.c_char_p),
                ("itemsize", ctypes.c_uint64)]


class _LaunchOptions(ctypes.Structure):
    _fields_ = [("thread_reverse", ctypes.c_int), ("block_reverse", ctypes.c_int),
                ("dyn_smem", ctypes.c_uint64), ("max_dyn_smem", ctypes.c_uint64),
                ("nargs", ctypes.c_int), ("args", ctypes.POINTER(_ArgDesc)),
                ("nblocks", ctypes.c_int64), ("blocks", ctypes.POINTER(ctypes.c_uint64)),
                ("first_serial", ctypes.c_uint32)]


_serial = [1]  # the next block serial (shadow cells name blocks by it; 0 = never accessed)


def _take_serials(n):
    """`n` consecutive block serials; when the 32-bit space runs out, every shadow is cleared
    (launches before that point are over: nothing in them can race with later ones)."""
    if _serial[0] + n >= 2**32 - 1:
        for ref, _, _ in _guarded:
            raw = ref()
            if raw is not None and raw._alloc.shadow is not None:
                raw._alloc.shadow[...] = 0
        _serial[0] = 1
    first = _serial[0]
    _serial[0] += n
    return first


class LaunchError(RuntimeError):
    """A launch the GPU would refuse (limits) or a kernel the emulator caught misbehaving."""


def _lib(stem, defines=(), names=None):
    """The emulator build of `stem` (OVERRIDE's variant, if any): the default one, or with
    compile-time settings `defines` the instantiations `names` (kernels.kernel_build), as
    kernels.get_module compiles them on a GPU."""
    builds = _libs.setdefault(stem, {})
    if defines not in builds:
        over = dict(OVERRIDE.get(stem, {}))
        if defines:
            over.update(defines=defines, only=names)
        so, symbols = build.build(stem, **over)
        lib = ctypes.CDLL(str(so))
        lib.cllm_emu_error.restype = ctypes.c_char_p
        src = over.get("src") or build.kernels.kernel_source(stem)
        builds[defines] = (lib, symbols, build.signatures(src), src)
    return builds[defines]


def registers_per_block(registers: int, threads: int) -> int:
    """Registers a block of `threads` threads occupies (per-warp allocation granularity)."""
    per_warp = -(-registers * 32 // REGISTER_ALLOC_UNIT) * REGISTER_ALLOC_UNIT
    return per_warp * -(-threads // 32)


def _launch_dims(what, dims):
    """A launch's grid or block as CuPy takes it: a tuple (a list raises TypeError there) of
    integers, padded to three with 1s. Stricter than CuPy on floats: its Cython conversion
    refuses one as the first dimension (a Py_ssize_t; unless max(1, x) keeps the int 1) but
    truncates one in the other two (C ints); the fake refuses a float anywhere."""
    if not isinstance(dims, tuple):
        raise TypeError(f"Argument '{what}' has incorrect type (expected tuple, got "
                        f"{type(dims).__name__})")
    try:
        dims = tuple(operator.index(x) for x in dims)
    except TypeError:
        raise TypeError(f"{what} {dims!r}: every dimension must be an integer") from None
    return dims + (1,) * (3 - len(dims))


class EmuKernel:
    def __init__(self, stem, name):
        over = OVERRIDE.get(stem, {})
        names = over.get("names") or build.kernels.NAME_EXPRESSIONS.get(stem, ())
        if name not in names:
            raise KeyError(f"{name!r} is not an instantiation listed for kernels_cu/{stem}.cu")
        self.stem, self.name = stem, name
        defines, build_names = build.kernels.kernel_build(stem, name)
        self.lib, symbols, sigs, src = _lib(stem, defines, build_names)
        if name not in symbols:
            raise KeyError(f"{name} is not in this (partial) emulator build")
        i = symbols[name]
        self.fn = getattr(self.lib, f"cllm_emu_kernel_{i}")
        self.fn.restype = ctypes.c_int
        bounds = (ctypes.c_int * 2)()
        getattr(self.lib, f"cllm_emu_bounds_{i}")(bounds)
        self.max_threads, self.min_blocks = bounds[0], bounds[1]
        base, targs = build.split_name(name)
        tparams, params = sigs[base]
        # a name may omit defaulted arguments (e.g. a pointer's type: `typename GradT = float`)
        self.tmap = {**build.kernels.kernel_template_defaults(src).get(base, {}),
                     **dict(zip(tparams, targs))}
        self.params = [build.param_type(p, self.tmap) for p in params]
        self._names = [ctypes.c_char_p(pn.encode()) for _, pn in self.params]
        # NVRTC sm_90 registers (None: no NVRTC), of the module a GPU would build the kernel in
        res = build.resources(stem, src, build_names or names, defines)
        self.registers = res[name]["registers"] if res else None
        if res and "src" not in over and res[name]["max_threads"] != (self.max_threads or None):
            raise AssertionError(f"{name}: the emulator reads __launch_bounds__({self.max_threads})"
                                 f", NVRTC compiled {res[name]['max_threads']}")
        self.max_dynamic_shared_size_bytes = 0  # cudaFuncAttributeMaxDynamicSharedMemorySize

    @property
    def max_threads_per_block(self):
        """CuPy's RawKernel attribute: the largest block a launch may have (__launch_bounds__)."""
        return self.max_threads or MAX_THREADS_PER_BLOCK

    def _check_config(self, g, b, shared_mem):
        where = f"{self.name}: grid {g} block {b}"
        if min(g) < 1 or min(b) < 1:
            raise LaunchError(f"{where}: every dimension must be at least 1")
        for k, axis in enumerate("xyz"):
            if g[k] > MAX_GRID[k]:
                raise LaunchError(f"{where}: grid {axis} = {g[k]} exceeds the limit {MAX_GRID[k]}")
            if b[k] > MAX_BLOCK[k]:
                raise LaunchError(f"{where}: block {axis} = {b[k]} exceeds the limit "
                                  f"{MAX_BLOCK[k]}")
        threads = b[0] * b[1] * b[2]
        if threads > MAX_THREADS_PER_BLOCK:
            raise LaunchError(f"{where}: {threads} threads per block (at most 1024)")
        if self.registers is not None:
            need = registers_per_block(self.registers, threads)
            if need > REGISTERS_PER_BLOCK:
                raise LaunchError(
                    f"{where}: {self.registers} registers per thread (sm_90 ptxas) x {threads} "
                    f"threads need {need} registers, more than the {REGISTERS_PER_BLOCK} of an "
                    f"SM (too many resources requested for launch; give the kernel "
                    f"__launch_bounds__)")
        if shared_mem < 0:
            raise LaunchError(f"{where}: negative dynamic shared memory")

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        # CuPy 14: RawKernel.__call__ hands these to Function.__call__(tuple grid, tuple
        # block, args, size_t shared_mem=0, stream=None): no other keyword, grid and block
        # tuples of integers, shared_mem a non-negative integer (CuPy truncates a float
        # shared_mem, as the later grid and block dimensions; the fake refuses them)
        g, b = _launch_dims("grid", grid), _launch_dims("block", block)
        if stream is not None and not hasattr(stream, "ptr"):
            raise TypeError(f"{self.name}: stream must be a cupy.cuda.Stream or None, got "
                            f"{type(stream).__name__}")
        shared_mem = operator.index(shared_mem)
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.params)} parameters")
        self._check_config(g, b, int(shared_mem))
        keep, ptrs, descs = [], [], []
        for a, (ty, pname), cname in zip(args, self.params, self._names):
            if ty.endswith("*"):
                base = re.sub(r"\bconst\b", "", ty[:-1]).strip()
                want = _PTR_DTYPE[base]
                if not isinstance(a, FakeArr) or (want is not None and a.dtype != want):
                    raise TypeError(f"{self.name}: {pname} wants a {np.dtype(want)} device array, "
                                    f"got {type(a).__name__} {getattr(a, 'dtype', '')}")
                if not a.flags.c_contiguous:
                    raise ValueError(f"{self.name}: {pname} is not C-contiguous")
                rec = getattr(a, "_alloc", None)
                if rec is None:
                    raise TypeError(f"{self.name}: {pname} is not device memory")
                ptr = a.__array_interface__["data"][0]
                shadow = _shadow(rec)
                descs.append(_ArgDesc(ptr, ptr + a.nbytes, rec.base,
                                      None if shadow is None
                                      else shadow.__array_interface__["data"][0],
                                      cname, a.dtype.itemsize))
                v = ctypes.c_void_p(ptr)
            else:
                want = _SCALAR[ty]
                if type(a) is not want:  # CuPy would pass garbage for a mismatched scalar
                    raise TypeError(f"{self.name}: {pname} wants {want.__name__}, got "
                                    f"{type(a).__name__}")
                v = _CTYPE[want](a)
            keep.append(v)
            ptrs.append(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p))
        argv = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        desc_arr = (_ArgDesc * max(1, len(descs)))(*descs)
        only = ONLY_BLOCKS(self.name, g) if ONLY_BLOCKS is not None else None
        blocks = (ctypes.c_uint64 * max(1, len(only or ())))(*(only or ()))
        n_run = g[0] * g[1] * g[2] if only is None else len(only)

        def launch():
            opt = _LaunchOptions(ORDER["reverse"], ORDER["blocks"], int(shared_mem),
                                 int(self.max_dynamic_shared_size_bytes), len(descs), desc_arr,
                                 -1 if only is None else len(only), blocks, _take_serials(n_run))
            rc = self.fn((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), argv,
                         ctypes.byref(opt))
            if rc != 0:
                raise LaunchError(self.lib.cllm_emu_error().decode())
            check_guards()
            launches.append((self.name, g, b))
        launch()  # a recorded launch keeps argv and its values alive, as a graph node does
        record(launch)


# ---------------------------------------------------------------- the rest of the cupy surface
def _ufunc(uf):
    """cupy.<ufunc>: device operands only (Python/NumPy scalars allowed), device results."""
    def call(*args, **kw):
        out = kw.get("out")
        outs = out if isinstance(out, tuple) else ((out,) if out is not None else ())
        _refuse_host(uf.__name__, args + outs)
        res = uf(*args, **kw)
        if out is not None:
            return out
        return res if isinstance(res, FakeArr) else _device_result(res)
    call.__name__ = uf.__name__
    return call


def _function(fn):
    """cupy.<function> (not a ufunc): computed by NumPy on the device buffers, device result."""
    def call(*args, **kw):
        _refuse_host(fn.__name__, args + tuple(kw.values()))
        pa, pk = tuple(_plain(a) for a in args), {k: _plain(v) for k, v in kw.items()}
        res = _device_result(fn(*pa, **pk))
        if isinstance(res, FakeArr):
            dst = res.view(np.ndarray)
            record(lambda: np.copyto(dst, fn(*pa, **pk)))
        return res
    call.__name__ = fn.__name__
    return call


def _check_range(ptr, nbytes, what, call="cublasGemmEx"):
    """compute-sanitizer's question for a library call: is [ptr, ptr + nbytes) inside one live
    device allocation (not in its guard bands, not in freed memory)?"""
    for ref, lo, hi in _guarded:
        raw = ref()
        if raw is None:
            continue
        base = raw.__array_interface__["data"][0]
        if base + lo + GUARD <= ptr and ptr + nbytes <= base + hi - GUARD:
            return
    raise AssertionError(f"{call}: {what} = [{ptr:#x}, +{nbytes} bytes) is not inside "
                         f"one live device allocation")


CUBLAS_HANDLE = 0xC0B1A5   # cupy.cuda.device.get_cublas_handle(): an opaque non-NULL pointer


def _gemmEx(*args):
    fake_cublas.gemmEx(*args)
    check_guards()
    record(lambda: fake_cublas.gemmEx(*args))


class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def synchronize(self):
        fake_graph.host_read("Device.synchronize")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


current_allocator = {"current": "default pool"}  # cupy.cuda.set_allocator records here


def _set_allocator(allocator=None):
    current_allocator["current"] = allocator


class _FakeNcclCommunicator:
    """cupy.cuda.nccl.NcclCommunicator (CuPy 14.2, cupy_backends/cuda/libs/nccl.pyx) for one
    rank: its checks on the unique id, and every collective a copy from send to receive (what a
    world of one computes)."""

    def __init__(self, ndev, commId, rank, config=None):
        if not isinstance(commId, bytes):   # CuPy 14: `bytes commId` (a tuple before 14.0)
            raise TypeError(f"Argument 'commId' has incorrect type (expected bytes, got "
                            f"{type(commId).__name__})")
        if len(commId) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"commId length {len(commId)} != {NCCL_UNIQUE_ID_BYTES}.")
        if (ndev, rank) != (1, 0):
            raise RuntimeError("the fake NCCL has one rank (ndev 1, rank 0)")

    @staticmethod
    def _copy(src, dst, count, datatype):
        nbytes = count * _NCCL_BYTES[datatype]
        _check_range(src, nbytes, "send buffer", "NCCL")
        _check_range(dst, nbytes, "receive buffer", "NCCL")
        if src != dst:
            ctypes.memmove(dst, src, nbytes)
        check_guards()

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        self._copy(sendbuf, recvbuf, count, datatype)

    def reduce(self, sendbuf, recvbuf, count, datatype, op, root, stream):
        self._copy(sendbuf, recvbuf, count, datatype)

    def broadcast(self, sendbuff, recvbuff, count, datatype, root, stream):
        self._copy(sendbuff, recvbuff, count, datatype)

    def reduceScatter(self, sendbuf, recvbuf, recvcount, datatype, op, stream):
        self._copy(sendbuf, recvbuf, recvcount, datatype)

    def allGather(self, sendbuf, recvbuf, count, datatype, stream):
        self._copy(sendbuf, recvbuf, count, datatype)

    def abort(self):
        pass


NCCL_UNIQUE_ID_BYTES = 128
# ncclDataType_t / ncclRedOp_t values (nccl.h)
_NCCL_CONSTANTS = {"NCCL_UINT8": 1, "NCCL_FLOAT32": 7, "NCCL_FLOAT64": 8, "NCCL_SUM": 0}
_NCCL_BYTES = {1: 1, 7: 4, 8: 8}


def _fake_nccl():
    """cupy.cuda.nccl as CuPy 14.2 has it, for a world of one rank: get_unique_id() returns
    the id as bytes (a tuple of ints before CuPy 14.0), which NcclCommunicator requires."""
    import os
    return types.SimpleNamespace(
        available=True, get_unique_id=lambda: os.urandom(NCCL_UNIQUE_ID_BYTES),
        get_version=lambda: 22703, groupStart=lambda: None, groupEnd=lambda: None,
        NcclCommunicator=_FakeNcclCommunicator, **_NCCL_CONSTANTS)


UFUNCS = ("add", "subtract", "multiply", "divide", "true_divide", "negative", "isfinite", "isnan",
          "minimum", "maximum", "exp", "log", "sqrt", "abs", "matmul", "logical_not", "invert",
          "reciprocal")
FUNCTIONS = ("where", "argmax", "triu", "sum", "searchsorted", "clip")


def install(launchers: str = "emulated"):
    """Install the fake as `cupy` (and `cupyx`, `cupy_backends...cublas`). launchers:
    "emulated" runs the real kernels_cu sources (g++ build) under the real launchers;
    "reference" swaps every launcher for its NumPy reference (fake_graph.py)."""
    fake = types.ModuleType("cupy")
    fake.__version__ = "emulated"
    for name in ("empty", "full", "zeros", "ones", "asarray", "ascontiguousarray", "asnumpy"):
        setattr(fake, name, globals()[name])
    for name in UFUNCS:
        setattr(fake, name, _ufunc(getattr(np, name)))
    for name in FUNCTIONS:
        setattr(fake, name, _function(getattr(np, name)))
    fake.ndarray = FakeArr
    for name in ("float32", "float64", "int32", "int64", "uint16", "bool_", "inf", "nan"):
        setattr(fake, name, getattr(np, name))
    fake.cuda = types.SimpleNamespace(
        is_available=lambda: True, Device=Device, Event=fake_graph.Event,
        Stream=fake_graph.Stream, get_current_stream=fake_graph.current_stream,
        set_allocator=_set_allocator, MemoryPool=fake_graph.MemoryPool,
        using_allocator=fake_graph.using_allocator,
        runtime=types.SimpleNamespace(getDeviceProperties=lambda device: {
            "name": b"CPU emulator (kernels_cu compiled with g++)", "major": 8, "minor": 0}),
        device=types.SimpleNamespace(get_cublas_handle=lambda: CUBLAS_HANDLE),
        nccl=_fake_nccl())
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = lambda shape, dtype=float: np.empty(shape, dtype)  # host memory
    sys.modules["cupy"], sys.modules["cupyx"] = fake, cupyx
    # `from cupy.cuda import nccl` (distributed.NCCLComm) resolves through these
    sys.modules["cupy.cuda"], sys.modules["cupy.cuda.nccl"] = fake.cuda, fake.cuda.nccl
    fake_cublas.CHECK_RANGE = _check_range
    lib = fake_cublas.LibCublas(_gemmEx, current_stream=lambda: fake_graph.current_stream().ptr)
    fake_cublas.install_modules(lib, capturing=lambda: fake_graph.CAPTURE.active)
    importlib.import_module("cllm_gpu.ops.gemm").libcublas = lib   # what ctypes would load
    from cllm_gpu.ops import _common, _cuda
    _common._cupy = fake
    _cuda.kernel = lambda stem, name: EmuKernel(stem, name)
    if launchers == "reference":
        fake_graph.use_reference_launchers()
    elif launchers != "emulated":
        raise ValueError(f"launchers: 'emulated' or 'reference', got {launchers!r}")
    return fake
