"""A NumPy-backed stand-in for `cupy` whose kernels are the emulated ones (build.py +
emu_runtime.h), so the real launchers in cllm_gpu/ops run unchanged on the CPU.

`install()` puts the fake into sys.modules["cupy"] and routes `cllm_gpu.ops._cuda.kernel` to
the emulator: call it in a process of its own, before anything imports cupy.

Arrays are np.ndarray subclasses whose `.data.ptr` is the host address the emulated kernel
reads and writes. Every array the fake allocates sits between two 256-byte guard bands of 0xFF
bytes (NaN for float types): a kernel reading past an end picks up NaN, and after every launch
the guards of all live arrays are checked, so a write past an end raises at that launch.
"""
from __future__ import annotations

import ctypes
import re
import sys
import types
import weakref

import numpy as np

from . import build

GUARD = 256
ORDER = {"reverse": 0}  # thread scheduling order of the emulator (0 ascending, 1 descending)


class FakeArr(np.ndarray):
    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


_guarded: list = []  # (weakref to the backing buffer, end of the data in it)


def _alloc(shape, dtype):
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.full(nbytes + 3 * GUARD, 0xFF, dtype=np.uint8)
    off = GUARD + (-raw.__array_interface__["data"][0]) % GUARD  # 256-byte aligned data start
    _guarded.append((weakref.ref(raw), off - GUARD, off + nbytes + GUARD))
    return raw[off: off + nbytes].view(dtype).reshape(shape).view(FakeArr)


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


def empty(shape, dtype=np.float32):
    return _alloc(shape, dtype)  # 0xFF garbage: NaN for floats, as a fresh device buffer may hold


def full(shape, fill_value, dtype=None):
    dtype = np.dtype(dtype) if dtype is not None else np.asarray(fill_value).dtype
    a = _alloc(shape, dtype)
    a[...] = fill_value
    return a


def zeros(shape, dtype=np.float32):
    return full(shape, 0, dtype)


def ones(shape, dtype=np.float32):
    return full(shape, 1, dtype)


def asarray(a, dtype=None):
    src = np.asarray(a, dtype=dtype)
    out = _alloc(src.shape, src.dtype)
    out[...] = src
    return out


def ascontiguousarray(a, dtype=None):
    return asarray(np.ascontiguousarray(a, dtype=dtype))


def asnumpy(a):
    return np.array(np.asarray(a).view(np.ndarray), copy=True)


# ---------------------------------------------------------------- emulated kernels
_SCALAR = {"int": np.int32, "long long": np.int64, "float": np.float32, "double": np.float64}
_CTYPE = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.float32: ctypes.c_float,
          np.float64: ctypes.c_double}
_PTR_DTYPE = {"int": np.int32, "double": np.float64, "float": np.float32,
              "cllm_bf16": np.uint16, "unsigned short": np.uint16}
_libs: dict = {}
launches: list = []
# mutation tests: {stem: dict(src=..., header=..., only=...)} builds a variant instead
OVERRIDE: dict = {}


def _lib(stem):
    if stem not in _libs:
        so, symbols = build.build(stem, **OVERRIDE.get(stem, {}))
        lib = ctypes.CDLL(str(so))
        lib.cllm_emu_error.restype = ctypes.c_char_p
        sigs = build.signatures(OVERRIDE.get(stem, {}).get("src")
                                or build.kernels.kernel_source(stem))
        _libs[stem] = (lib, symbols, sigs)
    return _libs[stem]


class EmuKernel:
    def __init__(self, stem, name):
        if name not in build.kernels.NAME_EXPRESSIONS[stem]:
            raise KeyError(f"{name!r} is not an instantiation listed for kernels_cu/{stem}.cu")
        self.stem, self.name = stem, name
        self.lib, symbols, sigs = _lib(stem)
        if name not in symbols:
            raise KeyError(f"{name} is not in this (partial) emulator build")
        self.fn = getattr(self.lib, symbols[name])
        self.fn.restype = ctypes.c_int
        base, targs = build.split_name(name)
        tparams, params = sigs[base]
        self.tmap = dict(zip(tparams, targs))
        self.params = [build.param_type(p, self.tmap) for p in params]

    def __call__(self, grid, block, args):
        g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        b = tuple(int(x) for x in block) + (1,) * (3 - len(block))
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.params)} parameters")
        if min(g) < 1 or g[1] > 65535 or g[2] > 65535 or b[0] * b[1] * b[2] > 1024:
            raise ValueError(f"{self.name}: bad launch shape grid {grid} block {block}")
        keep, ptrs = [], []
        for a, (ty, pname) in zip(args, self.params):
            if ty.endswith("*"):
                base = re.sub(r"\bconst\b", "", ty[:-1]).strip()
                want = _PTR_DTYPE[base]
                if not isinstance(a, np.ndarray) or a.dtype != want:
                    raise TypeError(f"{self.name}: {pname} wants a {want} device array, got "
                                    f"{type(a).__name__} {getattr(a, 'dtype', '')}")
                if not a.flags.c_contiguous:
                    raise ValueError(f"{self.name}: {pname} is not C-contiguous")
                v = ctypes.c_void_p(a.__array_interface__["data"][0])
            else:
                want = _SCALAR[ty]
                if type(a) is not want:  # CuPy would pass garbage for a mismatched scalar
                    raise TypeError(f"{self.name}: {pname} wants {want.__name__}, got "
                                    f"{type(a).__name__}")
                v = _CTYPE[want](a)
            keep.append(v)
            ptrs.append(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p))
        argv = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        rc = self.fn((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), argv,
                     ctypes.c_int(ORDER["reverse"]))
        if rc != 0:
            raise RuntimeError(f"{self.name}: {self.lib.cllm_emu_error().decode()}")
        check_guards()
        launches.append((self.name, g, b))


def install():
    """Install the fake as `cupy` and the emulated kernels into the CUDA launchers."""
    fake = types.ModuleType("cupy")
    for name in ("empty", "full", "zeros", "ones", "asarray", "ascontiguousarray", "asnumpy"):
        setattr(fake, name, globals()[name])
    fake.ndarray = FakeArr
    fake.float32, fake.float64, fake.int32 = np.float32, np.float64, np.int32
    fake.inf, fake.nan = np.inf, np.nan
    fake.cuda = types.SimpleNamespace(is_available=lambda: True)
    sys.modules["cupy"] = fake
    from cllm_gpu.ops import _common, _cuda
    _common._cupy = fake
    _cuda.kernel = lambda stem, name: EmuKernel(stem, name)
    return fake
