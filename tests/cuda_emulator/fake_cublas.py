"""A stand-in for cuBLAS: `gemmEx` does what cublasGemmEx does on the raw pointers
(column-major operands with leading dimensions, op(A) / op(B) transposes, alpha and beta read
from host memory in the compute type's precision, beta = 0 never reading C); `LibCublas` is the
library as ops/gemm.py calls it through ctypes (cublasSetStream_v2, cublasSetWorkspace_v2,
cublasGemmEx, with each handle's stream and workspace), and `install_modules` puts CuPy's own
wrapper module in place as CuPy 14 behaves (refusing stream capture).

It knows the cuBLAS enum values itself (cublas_api.h, library_types.h) instead of importing
them from cllm_gpu.ops.gemm, so a wrong constant there is a wrong call here, and it refuses the
type combinations cuBLAS refuses (CUBLAS_STATUS_NOT_SUPPORTED). Products are summed in float64
and rounded once to C's type: more accurate than cuBLAS, never less.

Used by the emulator's fake cupy (fake_cupy.py), which puts a LibCublas into
cllm_gpu.ops.gemm.libcublas and sets CHECK_RANGE to verify every byte range read or written lies inside a live device
allocation (a stand-in for compute-sanitizer on the GEMM).
"""
from __future__ import annotations

import ctypes
import sys
import types

import numpy as np

CUDA_R_32F, CUDA_R_64F, CUDA_R_16BF = 0, 1, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_COMPUTE_64F = 68, 77, 70
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_STATUS_SUCCESS, CUBLAS_STATUS_INVALID_VALUE, CUBLAS_STATUS_NOT_SUPPORTED = 0, 7, 15

_ITEM = {CUDA_R_32F: np.float32, CUDA_R_64F: np.float64, CUDA_R_16BF: np.uint16}
# (compute type) -> allowed (Atype == Btype, Ctype) pairs, from the cublasGemmEx table
_SUPPORTED = {
    CUBLAS_COMPUTE_32F: {(CUDA_R_32F, CUDA_R_32F), (CUDA_R_16BF, CUDA_R_16BF),
                         (CUDA_R_16BF, CUDA_R_32F)},
    CUBLAS_COMPUTE_32F_FAST_TF32: {(CUDA_R_32F, CUDA_R_32F)},
    CUBLAS_COMPUTE_64F: {(CUDA_R_64F, CUDA_R_64F)},
}

calls: list = []        # (transa, transb, m, n, k, Atype, Ctype, compute) per call
CHECK_RANGE = None      # optional fn(ptr, nbytes, what): raise if not inside an allocation


class CUBLASError(RuntimeError):
    def __init__(self, message, status=CUBLAS_STATUS_INVALID_VALUE):
        super().__init__(message)
        self.status = status


def _host_scalar(ptr, dtype):
    return np.ctypeslib.as_array((ctypes.c_byte * 8).from_address(ptr)).view(dtype)[0]


def _colmajor(ptr, typ, rows, cols, ld, what):
    """(flat buffer view, index array) of a rows x cols column-major matrix at ptr."""
    dt = np.dtype(_ITEM[typ])
    n = ld * (cols - 1) + rows
    if CHECK_RANGE is not None:
        CHECK_RANGE(ptr, n * dt.itemsize, what)
    buf = np.ctypeslib.as_array((ctypes.c_byte * (n * dt.itemsize)).from_address(ptr)).view(dt)
    idx = np.add.outer(np.arange(rows), np.arange(cols) * ld)
    return buf, idx


def _values(buf, typ, compute):
    if typ == CUDA_R_16BF:
        return (buf.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if compute == CUBLAS_COMPUTE_32F_FAST_TF32:  # inputs rounded to TF32 (10 mantissa bits)
        u = np.ascontiguousarray(buf, dtype=np.float32).view(np.uint32).astype(np.uint64)
        u = ((u + 0xFFF + ((u >> 13) & 1)) & 0xFFFFE000).astype(np.uint32)
        return u.view(np.float32).astype(np.float64)
    return buf.astype(np.float64)


def _store(vals, typ):
    if typ == CUDA_R_16BF:
        u = vals.astype(np.float32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return vals.astype(_ITEM[typ])


def gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype,
           ldc, computeType, algo):
    """C (m x n) = alpha op(A) op(B) + beta C, all column-major, as cublasGemmEx."""
    for v, name in ((m, "m"), (n, "n"), (k, "k"), (lda, "lda"), (ldb, "ldb"), (ldc, "ldc")):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise CUBLASError(f"gemmEx: {name} = {v!r} (CUBLAS_STATUS_INVALID_VALUE)")
    m, n, k, lda, ldb, ldc = (int(v) for v in (m, n, k, lda, ldb, ldc))
    if transa not in (CUBLAS_OP_N, CUBLAS_OP_T) or transb not in (CUBLAS_OP_N, CUBLAS_OP_T):
        raise CUBLASError(f"gemmEx: transa/transb {transa}/{transb} (CUBLAS_STATUS_INVALID_VALUE)")
    if Atype != Btype or (Atype, Ctype) not in _SUPPORTED.get(computeType, ()):
        raise CUBLASError(f"gemmEx: types A {Atype} B {Btype} C {Ctype} with compute "
                          f"{computeType} (CUBLAS_STATUS_NOT_SUPPORTED)",
                          CUBLAS_STATUS_NOT_SUPPORTED)
    if algo != CUBLAS_GEMM_DEFAULT:
        raise CUBLASError(f"gemmEx: algo {algo} is not CUBLAS_GEMM_DEFAULT")
    ra, ca = (k, m) if transa else (m, k)   # A as stored
    rb, cb = (n, k) if transb else (k, n)
    for ld, rows, name in ((lda, ra, "lda"), (ldb, rb, "ldb"), (ldc, m, "ldc")):
        if ld < max(1, rows):
            raise CUBLASError(f"gemmEx: {name} = {ld} < {max(1, rows)} "
                              f"(CUBLAS_STATUS_INVALID_VALUE)")
    calls.append((transa, transb, m, n, k, Atype, Ctype, computeType))
    if m == 0 or n == 0:
        return
    sdt = np.float64 if computeType == CUBLAS_COMPUTE_64F else np.float32
    al, be = float(_host_scalar(alpha, sdt)), float(_host_scalar(beta, sdt))
    c, ci = _colmajor(C, Ctype, m, n, ldc, "C")
    if k == 0 or al == 0:
        prod = np.zeros((m, n))
    else:
        a, ai = _colmajor(A, Atype, ra, ca, lda, "A")
        b, bi = _colmajor(B, Btype, rb, cb, ldb, "B")
        opa = _values(a, Atype, computeType)[ai]
        opb = _values(b, Btype, computeType)[bi]
        prod = al * ((opa.T if transa else opa) @ (opb.T if transb else opb))
    if be != 0:  # beta == 0: C is not read (NaN or garbage there does not propagate)
        prod = prod + be * _values(c, Ctype, None)[ci]
    c[ci] = _store(prod, Ctype)


# ---- the library as cllm_gpu calls it: ctypes on libcublas (ops/gemm.py), with the state
# of each handle as cuBLAS keeps it.
class LibCublas:
    """Stand-in for ctypes.CDLL("libcublas.so.13") with the three functions the GEMM op calls.
    Arguments as ctypes takes them with the op's argtypes: Python ints (a NumPy integer would
    be a ctypes TypeError). Errors come back as status codes, as from the C library.

    Per handle: its stream and workspace. cublasSetStream_v2 resets the workspace to cuBLAS's
    own pool (the cuBLAS docs: "unconditionally"). Two checks of our own contract, as a
    sanitizer would make them: a GEMM must run on the current stream (else a captured step
    would miss it) and with the fixed workspace set after the stream (the plain and captured
    steps pick their algorithms with the same workspace)."""

    def __init__(self, gemm=None, current_stream=lambda: 0):
        self.gemm = gemm or gemmEx
        self.current_stream = current_stream
        self.handles = {}   # handle -> {"stream": ptr, "workspace": (ptr, nbytes) or None}

    @staticmethod
    def _ints(fn, args):
        for i, v in enumerate(args):
            if type(v) is not int:
                raise TypeError(f"{fn}: argument {i + 1} is {type(v).__name__} {v!r}; ctypes "
                                f"takes a Python int for c_int / c_void_p / c_size_t")

    def _state(self, handle):
        return self.handles.setdefault(handle, {"stream": 0, "workspace": None})

    def cublasSetStream_v2(self, handle, stream):
        self._ints("cublasSetStream_v2", (handle, stream))
        self._state(handle).update(stream=stream, workspace=None)
        return CUBLAS_STATUS_SUCCESS

    def cublasSetWorkspace_v2(self, handle, ptr, nbytes):
        self._ints("cublasSetWorkspace_v2", (handle, ptr, nbytes))
        if ptr % 256:   # cuBLAS: the workspace must be 256-byte aligned
            return CUBLAS_STATUS_INVALID_VALUE
        if CHECK_RANGE is not None:
            CHECK_RANGE(ptr, nbytes, "workspace")
        self._state(handle)["workspace"] = (ptr, nbytes)
        return CUBLAS_STATUS_SUCCESS

    def cublasGemmEx(self, *args):
        if len(args) != 19:
            raise TypeError(f"cublasGemmEx: 19 arguments expected, got {len(args)}")
        self._ints("cublasGemmEx", args)
        st = self._state(args[0])
        if st["stream"] != self.current_stream():
            raise AssertionError(f"cublasGemmEx on stream {st['stream']:#x}, the current one is "
                                 f"{self.current_stream():#x}: call cublasSetStream_v2 first")
        if st["workspace"] is None:
            raise AssertionError("cublasGemmEx with cuBLAS's own workspace: set the fixed one "
                                 "(cublasSetWorkspace_v2) after cublasSetStream_v2, which resets it")
        try:
            self.gemm(*args)
        except CUBLASError as e:
            return e.status
        return CUBLAS_STATUS_SUCCESS


def install_modules(lib, capturing=lambda: False):
    """Register `cupy_backends.cuda.libs.cublas` in sys.modules as CuPy 14 has it, over the
    library stand-in `lib`: its gemmEx sets the handle's stream first (cublas.pyx), and its
    setStream refuses while the stream is capturing (NotImplementedError), so a step whose
    GEMMs went through CuPy's wrapper could not be captured, here as on the GPU."""
    mod = types.ModuleType("cupy_backends.cuda.libs.cublas")

    def setStream(handle, stream):
        if capturing():
            raise NotImplementedError("calling cuBLAS API during stream capture is currently "
                                      "unsupported")
        lib.cublasSetStream_v2(handle, stream)

    def gemmEx_wrapper(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
                       beta, C, Ctype, ldc, computeType, algo):
        setStream(handle, lib.current_stream())
        args = [int(v) for v in (handle, transa, transb, m, n, k, alpha, A, Atype, lda, B,
                                 Btype, ldb, beta, C, Ctype, ldc, computeType, algo)]
        status = lib.cublasGemmEx(*args)
        if status:
            raise CUBLASError(f"cublasGemmEx: status {status}", status)

    mod.gemmEx = gemmEx_wrapper
    mod.setStream = setStream
    mod.CUBLASError = CUBLASError
    names = ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs")
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["cupy_backends"].cuda = sys.modules["cupy_backends.cuda"]
    sys.modules["cupy_backends.cuda"].libs = sys.modules["cupy_backends.cuda.libs"]
    sys.modules["cupy_backends.cuda.libs"].cublas = mod
    sys.modules["cupy_backends.cuda.libs.cublas"] = mod
    return mod
