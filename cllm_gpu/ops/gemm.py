"""General matrix product out (M, N) = op(a) @ op(b), or out += op(a) @ op(b), where op(x) is x
or x.T; row-major (C-contiguous) arrays throughout.

Operands: float32 or float64 (out of the same dtype), or bf16 storage (see ops/cast.py: float32
bf16 values on NumPy, uint16 bits on CUDA) with a float32 or a bf16 out: bf16 products, fp32
accumulation (what the tensor cores do), and a bf16 out gets the fp32 result rounded once
(the classifier's bf16 logits: half the bytes, and no cast pass before their bf16 readers).

NumPy: BLAS through np.matmul. CUDA: cublasGemmEx on the raw device pointers, called through
ctypes (CuPy's matmul has no bf16 dtype and no beta, and its gemmEx wrapper refuses stream
capture); accumulate=True is beta = 1, so a weight gradient is summed into the gradient arena
with no temporary. There is no hand-written kernel for this op.
"""
import ctypes
import os

import numpy as np

from . import _cuda as _cu
from ._common import check_array, is_device_array, overlaps
from .cast import BF16_DEVICE_DTYPE, is_bf16, round_bf16
from .host_threads import run_parts, split

# The NumPy path cuts out's rows into pieces, in multiples of GEMM_ROWS (BLAS's kernels work
# on blocks of 16-32 rows), of at least GEMM_PIECE_MACS multiply-adds (~0.15 ms on one core:
# a parallel region costs ~0.1 ms, two thread wake-ups on the 2-vCPU machine; 2^22 cost up to
# 12 % on one thread), one BLAS call each, and spreads the pieces over its threads. The pieces
# follow from the shape alone, never from the thread count: BLAS rounds a row by where it
# falls in the call (OpenBLAS's Haswell/Zen sgemm takes rows 12 at a time and the last 4 or 8
# of a call with another kernel; on Skylake-X, pieces under ~1 M went to other kernels), so
# only the same calls give the same bits at every thread count. Every product of the default
# run's step is cut in two at least (one in one piece leaves a core idle: tests/test_gemm.py).
GEMM_ROWS = 64
GEMM_PIECE_MACS = 1 << 24


def _shapes(a, b, trans_a, trans_b):
    check_array("a", a, ndim=2)
    check_array("b", b, ndim=2)
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    Kb, N = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if K != Kb:
        raise ValueError(f"gemm: inner dimensions differ: op(a) is {(M, K)}, op(b) is {(Kb, N)}")
    return M, N, K


def row_pieces(M: int, macs: int) -> list[tuple[int, int]]:
    """The NumPy path's BLAS calls for a product with M output rows and `macs` multiply-adds:
    [(u0, u1)] in units of GEMM_ROWS rows, by the shape alone (see GEMM_ROWS)."""
    units = -(-M // GEMM_ROWS)
    return split(units, max(1, min(units, macs // GEMM_PIECE_MACS)))


def gemm_ref(a, b, out=None, trans_a=False, trans_b=False, accumulate=False):
    M, N, K = _shapes(a, b, trans_a, trans_b)
    if a.dtype != b.dtype:
        raise ValueError(f"gemm: a and b differ in dtype ({a.dtype}, {b.dtype})")
    opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
    if out is None:
        if accumulate:
            raise ValueError("gemm: accumulate=True needs an out array")
        out = np.empty((M, N), dtype=a.dtype.type)  # float32, not bf16-tagged (ops/cast.py)
    check_array("out", out, shape=(M, N), dtype=a.dtype)
    if overlaps(out, a) or overlaps(out, b):
        raise ValueError("gemm: out overlaps an operand")
    if is_bf16(out) and not is_bf16(a):
        raise ValueError("gemm: a bf16 out needs bf16 operands")

    def rows(u0, u1):   # out's rows [u0, u1) * GEMM_ROWS: one BLAS call
        r = slice(u0 * GEMM_ROWS, u1 * GEMM_ROWS)
        if is_bf16(out):  # the fp32 result rounded once, as cuBLAS writes a bf16 C
            res = np.matmul(opa[r], opb) + (out[r] if accumulate else 0)
            out[r] = round_bf16(res.view(np.float32))
        elif accumulate:
            out[r] += np.matmul(opa[r], opb)
        else:
            np.matmul(opa[r], opb, out=out[r])

    pieces = row_pieces(M, M * N * K)

    def some(p0, p1):   # pieces [p0, p1): one thread's share
        for u0, u1 in pieces[p0:p1]:
            rows(u0, u1)

    run_parts(len(pieces), some)
    return out


def gemm(a, b, out=None, trans_a=False, trans_b=False, accumulate=False):
    """out (M, N) = op(a) @ op(b) (+ out when accumulate); returns out, which must not overlap
    a or b (cuBLAS, and the NumPy path's row pieces, write it while they are read)."""
    if is_device_array(a):
        return gemm_cuda(a, b, out, trans_a, trans_b, accumulate)
    return gemm_ref(a, b, out, trans_a, trans_b, accumulate)


# ---- CUDA: cublasGemmEx. cuBLAS is column-major and a row-major (R, C) array read as
# column-major is its (C, R) transpose, so out = op(a) @ op(b) is computed as
# out^T = op(b)^T @ op(a)^T: cuBLAS's first operand is b, its second a, with m = N, n = M.
# Enum values from cublas_api.h / library_types.h (stable across CUDA 11-13).
CUDA_R_32F, CUDA_R_64F, CUDA_R_16BF = 0, 1, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_COMPUTE_64F = 68, 77, 70
CUBLAS_GEMM_DEFAULT = -1
# cuBLAS reads alpha and beta through host pointers: one constant array per value and type
# (no host allocation per GEMM)
_HOST_SCALARS = {t: {v: np.full(1, v, dtype=t) for v in (0.0, 1.0)}
                 for t in (np.float32, np.float64)}


def gemm_cublas_args(a, b, out, trans_a, trans_b):
    """The cublasGemmEx arguments (besides handle, scalars and pointers) for row-major
    out (M, N) = op(a) @ op(b): (transa, transb, m, n, k, first, first_type, lda, second,
    second_type, ldb, out_type, ldc, compute_type). Separate so a CPU test can check them."""
    M, N, K = _shapes(a, b, trans_a, trans_b)
    if a.dtype == BF16_DEVICE_DTYPE and b.dtype == BF16_DEVICE_DTYPE:
        in_type, want_out = CUDA_R_16BF, np.dtype(np.float32)
        compute = CUBLAS_COMPUTE_32F
    elif a.dtype == b.dtype and a.dtype in (np.float32, np.float64):
        want_out = a.dtype
        if a.dtype == np.float64:
            in_type, compute = CUDA_R_64F, CUBLAS_COMPUTE_64F
        else:
            # follow CuPy's own matmul: TF32 tensor cores only when CUPY_TF32=1 (--tf32)
            tf32 = os.environ.get("CUPY_TF32") == "1"
            in_type, compute = CUDA_R_32F, (CUBLAS_COMPUTE_32F_FAST_TF32 if tf32
                                            else CUBLAS_COMPUTE_32F)
    else:
        raise ValueError(f"gemm: unsupported operand dtypes ({a.dtype}, {b.dtype}); expected "
                         f"both float32, both float64 or both bf16 ({BF16_DEVICE_DTYPE})")
    if in_type == CUDA_R_16BF and out is not None and out.dtype == BF16_DEVICE_DTYPE:
        want_out = BF16_DEVICE_DTYPE  # bf16 C: the fp32 accumulation rounded once
    check_array("out", out, shape=(M, N), dtype=want_out)
    out_type = {np.dtype(np.float32): CUDA_R_32F, np.dtype(np.float64): CUDA_R_64F,
                BF16_DEVICE_DTYPE: CUDA_R_16BF}[out.dtype]
    return (CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
            N, M, K, b, in_type, b.shape[1], a, in_type, a.shape[1], out_type, N, compute)


# cuBLAS through ctypes on the libcublas CuPy has loaded, not CuPy's wrapper: CuPy's gemmEx
# first calls its setStream, which refuses while the stream is capturing
# (cupy_backends/cuda/libs/cublas.pyx, CuPy 14: NotImplementedError), so no training step could
# be captured in a CUDA graph, although cuBLAS itself supports capture.
_CUBLAS_FUNCTIONS = {   # name: argtypes (every one returns a cublasStatus_t)
    "cublasSetStream_v2": (ctypes.c_void_p, ctypes.c_void_p),
    "cublasSetWorkspace_v2": (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t),
    "cublasGemmEx": (ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                     ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                     ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                     ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int),
}
libcublas = None   # the loaded library (the CUDA emulator puts its stand-in here)


def _libcublas():
    global libcublas
    if libcublas is None:
        for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
            try:   # only the copy CuPy loaded (get_cublas_handle), never a second one
                lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
                break
            except OSError:
                continue
        else:
            raise RuntimeError("cuBLAS: libcublas is not loaded in this process")
        for fn, argtypes in _CUBLAS_FUNCTIONS.items():
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = ctypes.c_int
        libcublas = lib
    return libcublas


def _cublas_call(fn: str, *args):
    status = getattr(_libcublas(), fn)(*args)
    if status != 0:
        raise RuntimeError(f"{fn} failed with cuBLAS status {status}")


# One fixed cuBLAS workspace per device, set on the handle before every GEMM, after the
# stream (cublasSetStream resets the handle to cuBLAS's own pool): plain and CUDA-graph-captured
# steps then see the same workspace, so cuBLAS picks the same algorithms (the bitwise
# graph-vs-plain check relies on it) and a re-capture allocates nothing new.
# 32 MiB: cuBLAS's recommendation for Hopper (4 MiB suffices before it).
CUBLAS_WORKSPACE_BYTES = 32 << 20
_workspaces: dict = {}


def _bind_handle(handle):
    """The handle (CuPy's, shared with its own cuBLAS calls) set to the current stream and the
    fixed workspace, as every GEMM needs it."""
    import cupy
    dev = cupy.cuda.Device().id
    ws = _workspaces.get(dev)
    if ws is None:
        ws = _workspaces[dev] = cupy.empty(CUBLAS_WORKSPACE_BYTES, dtype=np.uint8)
    _cublas_call("cublasSetStream_v2", handle, cupy.cuda.get_current_stream().ptr)
    _cublas_call("cublasSetWorkspace_v2", handle, ws.data.ptr, CUBLAS_WORKSPACE_BYTES)


def gemm_cuda(a, b, out=None, trans_a=False, trans_b=False, accumulate=False):
    import cupy
    _cu.require_device(a=a, b=b)
    M, N, _ = _shapes(a, b, trans_a, trans_b)
    if out is None:
        if accumulate:
            raise ValueError("gemm: accumulate=True needs an out array")
        out = cupy.empty((M, N), dtype=np.float32 if a.dtype == BF16_DEVICE_DTYPE else a.dtype)
    _cu.require_device(out=out)
    (ta, tb, m, n, k, first, ftype, lda, second, stype, ldb, otype, ldc,
     compute) = gemm_cublas_args(a, b, out, trans_a, trans_b)
    if overlaps(out, a) or overlaps(out, b):
        raise ValueError("gemm: out overlaps an operand")
    if m == 0 or n == 0:
        return out
    if k == 0:
        if not accumulate:
            out.fill(0)
        return out
    # alpha and beta are read from host memory (CuPy's handles use the host pointer mode)
    # when the call is made, in the compute type's precision.
    sdt = np.float64 if compute == CUBLAS_COMPUTE_64F else np.float32
    alpha, beta = _HOST_SCALARS[sdt][1.0], _HOST_SCALARS[sdt][1.0 if accumulate else 0.0]
    handle = cupy.cuda.device.get_cublas_handle()   # CuPy's (it loads libcublas)
    _bind_handle(handle)
    # lda/ldb: the row length of each row-major operand as stored (its column-major leading
    # dimension); cuBLAS requires lda >= rows of its op, which the shapes guarantee.
    dims = [int(_cu.i32(v)) for v in (m, n, k, lda, ldb, ldc)]   # ctypes takes Python ints
    _cublas_call("cublasGemmEx", handle, ta, tb, *dims[:3], alpha.ctypes.data, first.data.ptr,
                 ftype, dims[3], second.data.ptr, stype, dims[4], beta.ctypes.data,
                 out.data.ptr, otype, dims[5], compute, CUBLAS_GEMM_DEFAULT)
    return out
