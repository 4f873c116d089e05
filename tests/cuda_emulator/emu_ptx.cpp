// The emulated PTX tensor-core instruction mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
// (D = A * B + C) and the fragments of ldmatrix.sync.aligned.m8n8.b16, for a whole warp: a file
// of its own, so that the tests which break the
// fragment layout on purpose recompile this alone (build.py compiles it after emu_runtime.h).
namespace cllm_emu {

// Fragment layouts, the ONE place the emulator writes them down. PTX ISA "Matrix Fragments for
// mma.m16n8k16 with floating point type"; groupID = laneid >> 2, tig = laneid % 4. Elements
// are numbered low to high across the registers, two bf16 per .b32 register, the
// lower-numbered element in the low 16 bits. (tests/cuda_emulator/ptx_isa.py checks these,
// and the emulated instruction, against the ISA's formulas, written there independently.)
//   A a0..a7 (4 regs): row = groupID for a0, a1, a4, a5, else groupID + 8;
//                      col = tig * 2 + (i & 1) for i < 4, tig * 2 + (i & 1) + 8 for i >= 4
//   B b0..b3 (2 regs): row (k) = tig * 2 + (i & 1) for i < 2, + 8 for i >= 2; col (n) = groupID
//   C/D c0..c3 (f32):  row = groupID for i < 2, groupID + 8 for i >= 2; col = tig * 2 + (i & 1)
static void frag_a_rc(int lane, int i, int& row, int& col) {
    const int g = lane >> 2, t = lane & 3;
    row = (i == 0 || i == 1 || i == 4 || i == 5) ? g : g + 8;
    col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
static void frag_b_rc(int lane, int i, int& row, int& col) {
    const int g = lane >> 2, t = lane & 3;
    row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
    col = g;
}
static void frag_c_rc(int lane, int i, int& row, int& col) {
    const int g = lane >> 2, t = lane & 3;
    row = i < 2 ? g : g + 8;
    col = t * 2 + (i & 1);
}

// The whole warp's product, computed once by the last lane to arrive. Products of bf16 values
// are exact in double and the 16-term sum plus c is rounded once to fp32 (the hardware's fp32
// accumulation order is unspecified; the tests' tolerances allow for it).
void mma_m16n8k16_bf16(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2],
                       const float (&c)[32][4], float (&d)[32][4]) {
    double A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        int row, col;
        for (int i = 0; i < 8; ++i) {
            frag_a_rc(l, i, row, col);
            const uint32_t reg = a[l][i >> 1];
            A[row][col] = bf16_to_float((uint16_t)(i & 1 ? reg >> 16 : reg & 0xffffu));
        }
        for (int i = 0; i < 4; ++i) {
            frag_b_rc(l, i, row, col);
            const uint32_t reg = b[l][i >> 1];
            B[row][col] = bf16_to_float((uint16_t)(i & 1 ? reg >> 16 : reg & 0xffffu));
        }
        for (int i = 0; i < 4; ++i) {
            frag_c_rc(l, i, row, col);
            C[row][col] = c[l][i];
        }
    }
    for (int l = 0; l < 32; ++l) {
        for (int i = 0; i < 4; ++i) {
            int row, col;
            frag_c_rc(l, i, row, col);
            double acc = C[row][col];
            for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
            d[l][i] = (float)acc;
        }
    }
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 (PTX ISA "ldmatrix"): matrix m
// (8 x 8 b16) has its row r at rows[8 * m + r] (16 bytes). Lane l receives in register m the
// two elements of row l / 4 at columns 2 * (l % 4) and 2 * (l % 4) + 1, the lower column in
// the low 16 bits; with .trans the same of the transposed matrix: rows 2 * (l % 4) and
// 2 * (l % 4) + 1 at column l / 4. (ptx_isa.py checks this against its own formulas.)
void ldmatrix_m8n8_b16(const unsigned char* const (&rows)[32], int num, bool trans,
                       uint32_t (&d)[32][4]) {
    for (int m = 0; m < num; ++m) {
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            uint16_t e0, e1;
            if (!trans) {
                memcpy(&e0, rows[8 * m + g] + 2 * (2 * t), 2);
                memcpy(&e1, rows[8 * m + g] + 2 * (2 * t + 1), 2);
            } else {
                memcpy(&e0, rows[8 * m + 2 * t] + 2 * g, 2);
                memcpy(&e1, rows[8 * m + 2 * t + 1] + 2 * g, 2);
            }
            d[l][m] = (uint32_t)e0 | ((uint32_t)e1 << 16);
        }
    }
}

}  // namespace cllm_emu
