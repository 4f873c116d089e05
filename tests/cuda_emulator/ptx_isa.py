"""The PTX ISA's fragment layouts for `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`,
written from the ISA's text (section 9.7.14.5.8, "Matrix Fragments for mma.m16n8k16 with
floating point type") and nowhere else: not from emu_runtime.h, not from the kernels. The
emulated instruction is checked against them for every (lane, register element) pair, so a
layout that the emulator and a kernel get wrong in the same way fails here even though the
kernel's results would agree with the emulator's.

The ISA, for a warp lane: groupID = %laneid >> 2, threadID_in_group = %laneid % 4;
- A (16 x 16, four .b32 registers holding a0..a7, two .bf16 each, elements low to high):
  row = groupID for ai with 0 <= i < 2 or 4 <= i < 6, groupID + 8 otherwise;
  col = threadID_in_group * 2 + (i & 1) for i < 4, threadID_in_group * 2 + (i & 1) + 8 for i >= 4
- B (16 x 8, two .b32 registers holding b0..b3):
  row = threadID_in_group * 2 + (i & 1) for i < 2, threadID_in_group * 2 + (i & 1) + 8 for i >= 2;
  col = groupID
- C and D (16 x 8, four .f32 registers c0..c3):
  row = groupID for i < 2, groupID + 8 for i >= 2; col = threadID_in_group * 2 + (i & 1)
"Elements (low to high)": in a .b32 register of two .bf16, element 2r sits in bits 0..15 and
element 2r + 1 in bits 16..31.

And `ldmatrix.sync.aligned.m8n8.x1/.x2/.x4{.trans}.shared.b16 d, [p]` (the ISA's
"ldmatrix" section): each of the 1, 2 or 4 matrices is 8 x 8 .b16, one 16-byte row per address; the
addresses of threads 0-7 are the rows of the first matrix, 8-15 of the second, 16-23 and 24-31
of the third and fourth (threads beyond 8 * num give none). Destination register i holds a
fragment of matrix i: "each thread receives" a row fragment, thread l the elements of row
l / 4 at columns 2 (l % 4) and 2 (l % 4) + 1 (four threads per row); with .trans the matrix is
read column-major, i.e. the fragment of the transposed matrix: elements (2 (l % 4), l / 4) and
(2 (l % 4) + 1, l / 4) of the stored matrix.
"""
from __future__ import annotations

import numpy as np


def _group(lane):
    return lane >> 2, lane % 4


def a_position(lane: int, i: int) -> tuple[int, int]:
    group, tig = _group(lane)
    row = group if (0 <= i < 2 or 4 <= i < 6) else group + 8
    col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_position(lane: int, i: int) -> tuple[int, int]:
    group, tig = _group(lane)
    row = tig * 2 + (i & 1) + (8 if i >= 2 else 0)
    return row, group


def cd_position(lane: int, i: int) -> tuple[int, int]:
    group, tig = _group(lane)
    return (group if i < 2 else group + 8), tig * 2 + (i & 1)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as bits (the test values are exactly representable anyway)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32)


def fragments(A: np.ndarray, B: np.ndarray, C: np.ndarray):
    """Per-lane registers (a (32, 4) uint32, b (32, 2) uint32, c (32, 4) float32) holding
    A (16 x 16), B (16 x 8) as bf16 and C (16 x 8) as fp32, laid out as the ISA says."""
    Ab, Bb = _bf16_bits(A), _bf16_bits(B)
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        for i in range(8):
            r, k = a_position(lane, i)
            a[lane, i // 2] |= Ab[r, k] << (16 * (i % 2))
        for i in range(4):
            k, n = b_position(lane, i)
            b[lane, i // 2] |= Bb[k, n] << (16 * (i % 2))
        for i in range(4):
            r, n = cd_position(lane, i)
            c[lane, i] = C[r, n]
    return a, b, c


def check_mma(run, seed: int = 0) -> list[str]:
    """`run(a, b, c) -> d (32, 4)` executes the instruction once per lane's registers. Returns
    the mismatches (empty when the instruction matches the ISA). A, B hold distinct small
    integers times powers of two, so every product and sum is exact in fp32 and any misplaced
    element changes D."""
    rng = np.random.default_rng(seed)
    A = rng.integers(-8, 9, size=(16, 16)).astype(np.float32) * 2.0 ** rng.integers(-2, 3, (16, 16))
    B = rng.integers(-8, 9, size=(16, 8)).astype(np.float32) * 2.0 ** rng.integers(-2, 3, (16, 8))
    C = rng.integers(-64, 65, size=(16, 8)).astype(np.float32)
    A[0, :] += 17.0  # no zero rows or columns that could hide a swap
    B[:, 0] += 19.0
    a, b, c = fragments(A, B, C)
    d = np.asarray(run(a, b, c), dtype=np.float32).reshape(32, 4)
    D = A.astype(np.float64) @ B.astype(np.float64) + C
    bad = []
    for lane in range(32):
        for i in range(4):
            r, n = cd_position(lane, i)
            if d[lane, i] != D[r, n]:
                bad.append(f"lane {lane} d{i} (D[{r}][{n}]) = {d[lane, i]!r}, "
                           f"the ISA says {D[r, n]!r}")
    return bad


def ldmatrix_elements(lane: int, trans: bool) -> list[tuple[int, int]]:
    """(stored row, column) of the two .b16 elements a lane receives from one 8 x 8 matrix,
    low half first."""
    row, col = lane // 4, 2 * (lane % 4)
    if trans:
        return [(col, row), (col + 1, row)]
    return [(row, col), (row, col + 1)]


def ldmatrix_expected(rows: np.ndarray, offs, num: int, trans: bool) -> np.ndarray:
    """The (32, 4) uint32 registers `ldmatrix.x{num}{.trans}` returns when thread t's address
    points at rows[offs[t]] (rows: (R, 8) uint16); registers past `num` stay 0."""
    out = np.zeros((32, 4), np.uint32)
    for m in range(num):
        matrix = rows[[offs[8 * m + r] for r in range(8)]].astype(np.uint32)
        for lane in range(32):
            (r0, c0), (r1, c1) = ldmatrix_elements(lane, trans)
            out[lane, m] = matrix[r0, c0] | (matrix[r1, c1] << 16)
    return out


def check_ldmatrix(run, seed: int = 0) -> list[str]:
    """`run(rows (64, 8) uint16, offs (32,) int32, num, trans) -> (32, 4) uint32` executes the
    instruction with thread t's row address at rows[offs[t]]. Distinct random rows in a
    shuffled order, every shape and both layouts; returns the mismatches."""
    rng = np.random.default_rng(seed)
    rows = rng.permutation(1 << 16)[:64 * 8].astype(np.uint16).reshape(64, 8)
    offs = rng.permutation(64)[:32].astype(np.int32)
    bad = []
    for num in (1, 2, 4):
        for trans in (False, True):
            got = np.asarray(run(rows, offs, num, trans), np.uint32).reshape(32, 4)
            want = ldmatrix_expected(rows, offs, num, trans)
            for lane, reg in zip(*np.nonzero(got[:, :num] != want[:, :num])):
                bad.append(f"x{num}{'.trans' if trans else ''} lane {lane} d{reg} = "
                           f"{got[lane, reg]:#010x}, the ISA says {want[lane, reg]:#010x}")
    return bad

