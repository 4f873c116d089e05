"""Helpers shared by the CUDA launchers in the op modules (imported only on the CUDA path).

Kernel arguments: CuPy passes a Python int as `long long` and a float as `double`, so every
scalar goes through `i32`, `i64` or `scalar(dtype, x)` to match the kernel's C signature."""
import math

import numpy as np

# overlaps: the launchers call it as _cu.overlaps
from ._common import check_array, is_device_array, overlaps  # noqa: F401

THREADS = 256
MAX_GRID_STRIDE_BLOCKS = 65536  # grid-stride kernels: enough blocks to fill any current GPU

_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def ctype(dtype) -> str:
    """C type name of a float dtype, for template name expressions."""
    try:
        return _CTYPE[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"CUDA kernels support float32 and float64, got {np.dtype(dtype)}") from None


def out_ctype(out, dtype) -> str:
    """The kernel's output type for `out`: cllm_bf16 for bf16 storage, else ctype(dtype)."""
    from .cast import BF16_DEVICE_DTYPE
    return "cllm_bf16" if out.dtype == BF16_DEVICE_DTYPE else ctype(dtype)


def kernel(stem: str, name: str):
    from ..kernels import get_kernel
    return get_kernel(stem, name)


def require_device(**arrays):
    """Raise ValueError unless every given array is a CuPy array (mixing host/device)."""
    for name, a in arrays.items():
        if not is_device_array(a):
            raise ValueError(f"{name}: expected a CuPy (device) array on the CUDA path, "
                             f"got {type(a).__module__}.{type(a).__name__}")


INT32_MAX = 2**31 - 1


def check_int32_loop(name, n, step, what):
    """Raise ValueError unless a kernel loop `for (int i = start; i < n; i += step)` (start <
    step) stays in int32: its last i (up to n - 1) plus step must not pass 2**31 - 1 (a
    signed overflow: a negative index on the GPU), so n <= 2**31 - step."""
    limit = INT32_MAX + 1 - step
    if n > limit:
        raise ValueError(f"{name}: {n} {what}, more than the {limit} (2**31 - {step}) the "
                         f"kernel's int32 indices can walk")


def device_int32(name, a):
    """`a` as a C-contiguous int32 device array (no copy when it already is one). Ids of a
    wider type are clamped to [-1, INT32_MAX] first, on the device: a plain cast would wrap
    2^32 + 5 to 5 (a valid id read in place of an out-of-range one) and 2^31 to a negative
    one (an ignored target); clamped, a negative id stays negative and an id past int32 stays
    out of range, so the kernels see it as they see any other."""
    import cupy
    require_device(**{name: a})
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected an integer array, got {a.dtype}")
    if a.dtype == np.int32 and a.flags.c_contiguous:
        return a
    if a.dtype.kind == "u" and a.dtype.itemsize >= 4:
        a = cupy.minimum(a, a.dtype.type(INT32_MAX))
    elif a.dtype.itemsize > 4:
        a = cupy.clip(a, -1, INT32_MAX)
    return cupy.ascontiguousarray(a, dtype=np.int32)


def out_array(name, a, shape, dtype):
    """Allocate an output when `a` is None, else check it (device, shape, dtype, contiguous)."""
    import cupy
    if a is None:
        return cupy.empty(shape, dtype=dtype)
    require_device(**{name: a})
    check_array(name, a, shape=shape, dtype=dtype)
    return a


def check_in_place(name, out, **inputs):
    """Raise ValueError when `out` overlaps an input other than as that input itself in the
    same storage (same start, same dtype): an elementwise kernel reads each element before the
    same thread writes it, which holds for nothing else (a float32 out over bf16 storage)."""
    for n, a in inputs.items():
        if a is not None and overlaps(out, a) and not (out.data.ptr == a.data.ptr
                                                       and out.dtype == a.dtype):
            raise ValueError(f"{name}: must be {n} itself (same storage) or not overlap it")


def check_disjoint(name, out, /, **inputs):
    """Raise ValueError when `out` shares any byte with one of `inputs` (None: absent): a
    kernel whose threads or blocks read an input while others write `out` races on them."""
    for n, a in inputs.items():
        if a is not None and overlaps(out, a):
            raise ValueError(f"{name}: must not overlap {n}")


def grid_stride_blocks(n: int, threads: int = THREADS) -> int:
    return max(1, min(MAX_GRID_STRIDE_BLOCKS, math.ceil(n / threads)))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def colsum_chunks(N: int) -> tuple[int, int]:
    """(rows per chunk, chunks) of the fixed-order column sums over N rows (bias and LayerNorm
    parameter gradients): a function of N only, so the result is bitwise reproducible."""
    rows = max(64, ceil_div(N, 512))
    return rows, ceil_div(N, rows)


def colsum_scratch_size(N: int, C: int, outputs: int = 1) -> int:
    """Elements of a column-sum launch's `scratch` (its per-chunk partials, in the launch's
    float dtype) over N rows of C columns for `outputs` summed outputs."""
    return outputs * colsum_chunks(N)[1] * C


def colsum_partials(scratch, N: int, C: int, outputs: int, dtype, /, **others):
    """The (outputs, chunks, C) partials of a column-sum launch, or (chunks, C) for one output:
    a view of the caller's `scratch` (a 1-d C-contiguous 256-byte aligned device array of the
    launch's float dtype and at least `colsum_scratch_size` elements, sharing no byte with any
    of `others`, the launch's arrays), or allocated when it is None. A given scratch lets a
    CUDA-graph capture allocate nothing (it holds every block it allocates until it ends)."""
    import cupy
    chunks = colsum_chunks(N)[1]
    shape = (chunks, C) if outputs == 1 else (outputs, chunks, C)
    if scratch is None:
        return cupy.empty(shape, dtype=dtype)
    n = colsum_scratch_size(N, C, outputs)
    check_scratch(scratch, n, dtype)
    check_disjoint("scratch", scratch, **others)
    return scratch[:n].reshape(shape)


def check_scratch(scratch, n: int, dtype):
    """A caller's workspace for a launch: a 1-d C-contiguous 256-byte aligned device array of
    `dtype` with at least n elements, else a ValueError before any launch."""
    require_device(scratch=scratch)
    if scratch.dtype != np.dtype(dtype) or scratch.ndim != 1 \
            or not scratch.flags.c_contiguous or scratch.size < n or scratch.data.ptr % 256:
        raise ValueError(f"scratch: expected a contiguous 256-byte aligned 1-d {np.dtype(dtype)} "
                         f"array of at least {n} elements, got {scratch.dtype} {scratch.shape}")


FINALIZE_LANES = 32  # CLLM_FINALIZE_LANES in kernels_cu/common.cuh


def colsum_finalize(stem: str, partial, C: int, chunks: int, *dsts) -> None:
    """dsts[y][c] += the sum over chunks of partial[y][chunk][c], in a fixed order, for one or
    two outputs (cllm_colsum_finalize_kernel of kernels_cu/common.cuh, as instantiated in the
    kernel file `stem`)."""
    if len(dsts) not in (1, 2):
        raise ValueError(f"colsum_finalize: one or two outputs, got {len(dsts)}")
    k = kernel(stem, f"cllm_colsum_finalize_kernel<{ctype(partial.dtype)}>")
    k((ceil_div(C, 32), len(dsts)), (32 * FINALIZE_LANES,),
      (partial, dsts[0], dsts[-1], i32(C), i32(chunks)))


def i32(x) -> np.int32:
    x = int(x)
    if not -2**31 <= x < 2**31:
        raise ValueError(f"value {x} does not fit in a 32-bit kernel argument")
    return np.int32(x)


def i64(x) -> np.int64:
    return np.int64(int(x))


def scalar(dtype, x):
    """A float kernel argument of the kernel's element type."""
    return np.dtype(dtype).type(float(x))
