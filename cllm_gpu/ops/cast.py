"""float32 <-> bfloat16.

bf16 is the top half of a float32 (8 exponent bits, 7 mantissa bits). NumPy has no bf16 dtype,
so the two backends store it differently, with the same values:
- NumPy: float32 arrays whose values are all bf16-representable (`round_bf16`), so the
  reference computes exactly what a bf16-input, fp32-accumulate GEMM computes. Their dtype is
  float32 tagged with metadata (`BF16_HOST_DTYPE`): it compares equal to float32 and BLAS takes
  it as float32, but `is_bf16` tells it apart, so an op can read from the array it is handed
  whether to round its output (the storage dtype is decided once, by whoever allocates).
- CUDA: uint16 arrays holding the raw bf16 bits (`BF16_DEVICE_DTYPE`), read by cuBLAS as
  CUDA_R_16BF and by the kernels as `cllm_bf16`.

to_bf16:   x float32 -> out = bf16(x) (same shape; float32 on NumPy, uint16 bits on CUDA)
from_bf16: x (a to_bf16 result) -> float32
Rounding is to nearest, ties to even (cuBLAS, PyTorch and the PTX cvt.rn all do this): the
same bits as PyTorch's `.to(torch.bfloat16)`, NaN aside (tests/test_cast.py: every bf16
value's rounding boundaries, and random bit patterns).
Denormals are rounded like any value, not flushed, on both backends: CuPy's -ftz=true does not
reach the kernel's inline `cvt.rn.bf16.f32` (no .FTZ in its SASS: tests/test_kernels_sass.py;
on the hardware: tests/gpu/test_cast_cuda.py), though a kernel that later reads a denormal bf16
as a float operand sees zero (docs/emulator.md). A NaN stays a NaN; its bits are not portable:
the host keeps sign and top payload bits and sets the quiet bit, the GPU writes the hardware's
NaN, PyTorch 0xFFFF or 0x7FC0 by code path.
"""
import numpy as np

from . import _cuda as _cu
from ._common import check_array, is_device_array

BF16_DEVICE_DTYPE = np.dtype(np.uint16)
BF16_HOST_DTYPE = np.dtype(np.float32, metadata={"bf16": True})


def bf16_storage_dtype(on_device: bool):
    """The dtype that holds bf16 values on a backend (see the module docstring)."""
    return BF16_DEVICE_DTYPE if on_device else BF16_HOST_DTYPE


def is_bf16(a) -> bool:
    """True for an array in bf16 storage (uint16 bits on the device, tagged float32 on the host)."""
    return a.dtype == BF16_DEVICE_DTYPE or bool((a.dtype.metadata or {}).get("bf16"))


def float_dtype(a):
    """The float dtype an op computes in from array `a`: float32 for bf16 storage, else a's."""
    return np.dtype(np.float32) if is_bf16(a) else np.dtype(a.dtype)


def check_storage(name, out, x):
    """An op's output `out`: the float dtype x computes in (`float_dtype`), or bf16 storage
    when that is float32 (an output whose reader is a bf16 matrix product). Raises ValueError
    naming `name`."""
    fdt = float_dtype(x)
    if is_bf16(out):
        if fdt != np.float32:
            raise ValueError(f"{name}: a bf16 {name} needs float32 input, got {x.dtype}")
    elif out.dtype != fdt:
        raise ValueError(f"{name}: expected dtype {fdt} or bf16 storage, got {out.dtype}")


def cast_like(x, like, scratch):
    """x as a matrix-product operand of the same storage as `like`: x itself, or (x float32,
    `like` bf16) its bf16 copy written into the first x.size elements of the flat bf16 buffer
    `scratch` (reused: valid until the next cast into it)."""
    if is_bf16(like) == is_bf16(x):
        return x
    if scratch is None or scratch.size < x.size or not is_bf16(scratch):
        raise ValueError(f"cast_like: a bf16 copy of a {tuple(x.shape)} array needs a bf16 "
                         f"scratch buffer of at least {x.size} elements")
    return to_bf16(x, out=scratch[:x.size].reshape(x.shape))


def bf16_bits(x):
    """float host array -> uint16 bf16 bits (via float32, rounded as `round_bf16`)."""
    r = round_bf16(np.asarray(x, dtype=np.float32))
    return (np.ascontiguousarray(r).view(np.uint32) >> 16).astype(np.uint16)


def bits_to_float(b):
    """uint16 bf16 bits -> float32 (exact)."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_bf16(x, out=None):
    """float32 values rounded to the nearest bf16 value, as float32 (host arrays; out may be x).

    Works on the bit patterns in uint32: adding 0x7FFF plus the lowest kept bit rounds to
    nearest even at bit 16; only NaN patterns can wrap around, and they are redone after.
    (The mixed-precision NumPy path calls this on every matmul operand: kept to one temporary.)"""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise ValueError(f"round_bf16: expected float32, got {x.dtype}")
    u = np.ascontiguousarray(x).view(np.uint32)
    t = np.right_shift(u, 16)
    t &= 1
    t += 0x7FFF
    t += u
    t &= 0xFFFF0000
    nan = np.isnan(x)
    if nan.any():  # a NaN stays a NaN: keep sign and top bits, force the quiet bit
        t[nan] = (u[nan] & 0xFFFF0000) | 0x00400000
    r = t.view(np.float32)
    if out is None:
        return r
    out[...] = r
    return out


def to_bf16_ref(x, out=None):
    check_array("x", x, dtype=np.float32)
    if out is None:
        return round_bf16(x).view(BF16_HOST_DTYPE)
    check_array("out", out, shape=x.shape, dtype=np.float32)
    return round_bf16(x, out)


def to_bf16(x, out=None):
    """bf16(x) of float32 `x` in the backend's bf16 storage (see the module docstring)."""
    if is_device_array(x):
        return to_bf16_cuda(x, out)
    return to_bf16_ref(x, out)


def from_bf16(x, out=None):
    """float32 values of a bf16 array in the backend's bf16 storage."""
    if is_device_array(x):
        return from_bf16_cuda(x, out)
    check_array("x", x, dtype=np.float32)
    if out is None:
        return x.view(np.float32).copy()
    out[...] = x
    return out


# ---- CUDA launcher (kernels_cu/cast.cu): elementwise grid-stride kernels. out must not overlap
# x: its elements are half or twice as wide, so a thread writing out[i] overwrites elements of
# x that other threads read (not even out at x's own address is in place).


def to_bf16_cuda(x, out=None):
    _cu.require_device(x=x)
    check_array("x", x, dtype=np.float32)
    out = _cu.out_array("out", out, x.shape, BF16_DEVICE_DTYPE)
    _cu.check_disjoint("out", out, x=x)
    n = x.size
    if n:
        k = _cu.kernel("cast", "float_to_bf16_kernel")
        k((_cu.grid_stride_blocks(n),), (_cu.THREADS,), (x, out, _cu.i64(n)))
    return out


def from_bf16_cuda(x, out=None):
    _cu.require_device(x=x)
    check_array("x", x, dtype=BF16_DEVICE_DTYPE)
    out = _cu.out_array("out", out, x.shape, np.float32)
    _cu.check_disjoint("out", out, x=x)
    n = x.size
    if n:
        k = _cu.kernel("cast", "bf16_to_float_kernel")
        k((_cu.grid_stride_blocks(n),), (_cu.THREADS,), (x, out, _cu.i64(n)))
    return out
