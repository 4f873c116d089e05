// Small kernels with one planted bug each, switched on by `planted != 0` (planted == 0 runs the
// correct twin), for the emulator's sanitizer checks (run_emulated.py, group "sanitizer"), and
// the mma probe the PTX ISA check drives (ptx_isa.py). Real CUDA: tests/test_kernels_compile.py
// compiles this file with NVRTC for sm_80 and sm_90, so nothing here is an emulator-only idiom.
// Every launch uses whole warps; n is a multiple of the block size unless said otherwise.
#define PL_FULL 0xffffffffu

__device__ __forceinline__ float pl_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(PL_FULL, v, o);
    return v;
}

// c (16 x 8 fp32) += a (16 x 16 bf16) * b (16 x 8 bf16), one warp
__device__ __forceinline__ void pl_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                       unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- 1. divergent warp collectives
// Odd lanes reduce through one call of the warp sum, even lanes through another: on sm_70+
// the two shuffle sequences meet by arrival, and any difference between the branches (other
// offsets, another operand, a different count) exchanges the wrong values. Undefined in CUDA.
__global__ void __launch_bounds__(64) divergent_shfl_kernel(const float* x, float* out,
                                                            int planted) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = x[i];
    if (planted && (threadIdx.x & 1)) v = pl_warp_sum(v);
    else v = pl_warp_sum(v);
    out[i] = v;
}

// The same with a ballot: lanes vote from two call sites.
__global__ void __launch_bounds__(64) divergent_ballot_kernel(const float* x, unsigned* out,
                                                              int planted) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned b;
    if (planted && x[i] < 0.0f) b = __ballot_sync(PL_FULL, x[i] > 0.5f);
    else b = __ballot_sync(PL_FULL, x[i] > 0.5f);
    out[i] = b;
}

// mma.sync.aligned in code whose condition differs across the warp (.aligned: undefined):
// lanes of the upper half issue the product from another call site.
__global__ void __launch_bounds__(32) divergent_mma_kernel(const unsigned* a, const unsigned* b,
                                                           float* d, int planted) {
    const int lane = threadIdx.x;
    const unsigned ra[4] = {a[lane * 4], a[lane * 4 + 1], a[lane * 4 + 2], a[lane * 4 + 3]};
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (planted && lane >= 16) pl_mma(c, ra, b[lane * 2], b[lane * 2 + 1]);
    else pl_mma(c, ra, b[lane * 2], b[lane * 2 + 1]);
    for (int k = 0; k < 4; ++k) d[lane * 4 + k] = c[k];
}

// ---- 2. shared memory written by one lane, read by another, with only shuffles between
// Each lane publishes its value and reads its neighbour's after a warp sum: the sum's shuffles
// order no memory, __syncwarp() does.
__global__ void __launch_bounds__(64) warp_shared_exchange_kernel(const float* x, float* out,
                                                                  int planted) {
    __shared__ float buf[64];
    const int t = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + t;
    buf[t] = x[i];
    const float s = pl_warp_sum(x[i]);
    if (!planted) __syncwarp();
    out[i] = buf[t ^ 1] + s;
}

// ---- 3. blocks sharing output
// A histogram: every block adds into the same counters; without atomicAdd, updates are lost.
__global__ void __launch_bounds__(64) histogram_kernel(const int* bins, int* counts, int n,
                                                       int planted) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (planted) counts[bins[i]] += 1;
    else atomicAdd(&counts[bins[i]], 1);
}

// A float sum by atomicAdd from every block: no race, but the order of the additions (and so
// the bits of the total) follows the order in which blocks run.
__global__ void __launch_bounds__(64) atomic_float_sum_kernel(const float* x, float* total,
                                                              int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float s = pl_warp_sum(i < n ? x[i] : 0.0f);
    if ((threadIdx.x & 31) == 0) atomicAdd(total, s);
}

// A count the block's threads add to with atomicAdd, read by the last thread with no barrier
// between its read and the other warps' adds: the read may see some of them (two atomics never
// race; a plain read and an atomic do). The twin reads it before a __syncthreads. (The last
// thread to reach a barrier is the emulator's first after it: the read comes before the adds.)
__global__ void __launch_bounds__(64) read_then_atomic_kernel(const int* x, int* out,
                                                              int planted) {
    __shared__ int count[1];
    if (threadIdx.x == 0) count[0] = 0;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) out[2 * blockIdx.x] = count[0];  // before any add: 0
    if (!planted) __syncthreads();
    atomicAdd(&count[0], x[blockIdx.x * blockDim.x + threadIdx.x]);
    __syncthreads();
    if (threadIdx.x == 0) out[2 * blockIdx.x + 1] = count[0];
}

// Every block adds its sum to total with atomicAdd; block 0 also reads total first (planted):
// the other blocks' adds may land before that read or after it.
__global__ void __launch_bounds__(64) total_read_while_added_kernel(const int* x, int* total,
                                                                   int* seen, int planted) {
    if (planted && blockIdx.x == 0 && threadIdx.x == 0) seen[0] = total[0];
    atomicAdd(total, x[blockIdx.x * blockDim.x + threadIdx.x]);
}

// ---- 4. launch limits
// Declares at most 64 threads per block (the launcher in the check asks for more).
__global__ void __launch_bounds__(64) bounded_kernel(const float* x, float* out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = 2.0f * x[i];
}

// No __launch_bounds__ and 96 values live at once: ptxas is free to use more than the 64
// registers per thread a 1024-thread block can have.
__global__ void register_hungry_kernel(const float* x, float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float r[96];
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < 96; ++k) {
        r[k] = x[k * n + i];
        s += r[k] * r[k];
    }
#pragma unroll
    for (int k = 0; k < 96; ++k) out[k * n + i] = r[k] * s + r[95 - k];
}

// Dynamic shared memory: `n` floats staged and read back reversed (n <= blockDim.x * 64).
__global__ void __launch_bounds__(128) dynamic_shared_kernel(const float* x, float* out, int n) {
    extern __shared__ float stage[];
    for (int k = threadIdx.x; k < n; k += blockDim.x) stage[k] = x[k];
    __syncthreads();
    for (int k = threadIdx.x; k < n; k += blockDim.x) out[k] = stage[n - 1 - k];
}

// ---- 5. out of bounds
// A gather whose id check compares with the wrong bound (the table's element count instead of
// its row count): an id below rows * cols reads far past the table.
__global__ void __launch_bounds__(64) gather_rows_kernel(const int* ids, const float* table,
                                                         float* out, int rows, int cols,
                                                         int planted) {
    const int i = blockIdx.x;  // one block per id, one thread per column
    const int c = threadIdx.x;
    if (c >= cols) return;
    const int id = ids[i];
    const bool ok = id >= 0 && id < (planted ? rows * cols : rows);
    out[(long long)i * cols + c] = ok ? table[(long long)id * cols + c]
                                      : __int_as_float(0x7fc00000);
}

// A scatter that trusts its ids: an id out of range writes outside the output.
__global__ void __launch_bounds__(64) scatter_rows_kernel(const int* ids, const float* src,
                                                          float* out, int rows, int cols,
                                                          int planted) {
    const int i = blockIdx.x;
    const int c = threadIdx.x;
    if (c >= cols) return;
    const int id = ids[i];
    if (planted || (id >= 0 && id < rows))
        out[(long long)id * cols + c] = src[(long long)i * cols + c];
}

// ---- 7. one m16n8k16 bf16 mma on fragments given lane by lane (registers a[lane][0..3],
// b[lane][0..1], c[lane][0..3]) -> d[lane][0..3]: ptx_isa.py builds them from the PTX ISA's
// fragment formulas and checks d = A B + C.
__global__ void __launch_bounds__(32) mma_probe_kernel(const unsigned* a, const unsigned* b,
                                                       const float* c, float* d) {
    const int lane = threadIdx.x;
    const unsigned ra[4] = {a[lane * 4], a[lane * 4 + 1], a[lane * 4 + 2], a[lane * 4 + 3]};
    float acc[4] = {c[lane * 4], c[lane * 4 + 1], c[lane * 4 + 2], c[lane * 4 + 3]};
    pl_mma(acc, ra, b[lane * 2], b[lane * 2 + 1]);
    for (int k = 0; k < 4; ++k) d[lane * 4 + k] = acc[k];
}

// ---- 8. ldmatrix: the mma operand fragments loaded from shared memory (PTX ISA "ldmatrix")
__device__ __forceinline__ unsigned pl_smem(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void pl_ldmatrix_x1(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(pl_smem(row)));
}
__device__ __forceinline__ void pl_ldmatrix_x2(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(pl_smem(row)));
}
__device__ __forceinline__ void pl_ldmatrix_x4(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(pl_smem(row)));
}
__device__ __forceinline__ void pl_ldmatrix_x1_trans(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(pl_smem(row)));
}
__device__ __forceinline__ void pl_ldmatrix_x2_trans(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(pl_smem(row)));
}
__device__ __forceinline__ void pl_ldmatrix_x4_trans(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(pl_smem(row)));
}

// The probe for ptx_isa.py: 64 rows of 8 b16 (`m`) staged in shared memory; lane l gives the
// row address of row offs[l]; mode = 3 * trans + (0: x1, 1: x2, 2: x4); out[lane][0..3].
// Planted (.x4.trans): mode 6, row addresses 8 bytes past the rows (ldmatrix needs 16-byte
// alignment); mode 7, the global array's address given to __cvta_generic_to_shared.
__global__ void __launch_bounds__(32) ldmatrix_probe_kernel(const unsigned short* m,
                                                            const int* offs, unsigned* out,
                                                            int mode) {
    __shared__ __align__(16) unsigned short rows[64 * 8];
    const int lane = threadIdx.x;
    for (int k = lane; k < 64 * 8; k += 32) rows[k] = m[k];
    __syncthreads();
    const unsigned short* row = mode == 7 ? m : rows + 8 * offs[lane] + (mode == 6 ? 4 : 0);
    unsigned r[4] = {0u, 0u, 0u, 0u};
    switch (mode) {
        case 0: pl_ldmatrix_x1(r, row); break;
        case 1: pl_ldmatrix_x2(r, row); break;
        case 2: pl_ldmatrix_x4(r, row); break;
        case 3: pl_ldmatrix_x1_trans(r, row); break;
        case 4: pl_ldmatrix_x2_trans(r, row); break;
        default: pl_ldmatrix_x4_trans(r, row); break;
    }
    for (int k = 0; k < 4; ++k) out[lane * 4 + k] = r[k];
}

// An mma's operands loaded with ldmatrix, as a FlashAttention-2 kernel does: A (16 x 16,
// row-major) with .x4 (matrices a0a1, a2a3, a4a5, a6a7 = rows 0-7 / 8-15 of columns 0-7, then
// of columns 8-15), B (16 x 8, stored k-major: row k, column n) with .x2.trans. frag[lane][0..5]
// = the A and B registers, d[lane][0..3] = A B. planted: lane -> row address with the matrix
// order of A's columns and rows exchanged.
__global__ void __launch_bounds__(32) ldmatrix_mma_kernel(const unsigned short* a,
                                                          const unsigned short* b,
                                                          unsigned* frag, float* d, int planted) {
    __shared__ __align__(16) unsigned short As[16 * 24];  // padded rows (48 bytes)
    __shared__ __align__(16) unsigned short Bs[16 * 16];
    const int lane = threadIdx.x;
    for (int k = lane; k < 16 * 16; k += 32) As[(k / 16) * 24 + k % 16] = a[k];
    for (int k = lane; k < 16 * 8; k += 32) Bs[(k / 8) * 16 + k % 8] = b[k];
    __syncthreads();
    const int mat = lane >> 3, r = lane & 7;
    const int row = planted ? r + 8 * (mat >> 1) : r + 8 * (mat & 1);
    const int col = planted ? 8 * (mat & 1) : 8 * (mat >> 1);
    unsigned ra[4], rb[4];
    pl_ldmatrix_x4(ra, As + row * 24 + col);
    pl_ldmatrix_x2_trans(rb, Bs + (lane & 15) * 16);
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    pl_mma(c, ra, rb[0], rb[1]);
    for (int k = 0; k < 4; ++k) frag[lane * 6 + k] = ra[k];
    for (int k = 0; k < 2; ++k) frag[lane * 6 + 4 + k] = rb[k];
    for (int k = 0; k < 4; ++k) d[lane * 4 + k] = c[k];
}

// ldmatrix in code only half the warp reaches (.aligned: every lane must execute it).
__global__ void __launch_bounds__(32) divergent_ldmatrix_kernel(const unsigned short* m,
                                                                unsigned* out, int planted) {
    __shared__ __align__(16) unsigned short rows[32 * 8];
    const int lane = threadIdx.x;
    for (int k = lane; k < 32 * 8; k += 32) rows[k] = m[k];
    __syncthreads();
    unsigned r[4] = {0u, 0u, 0u, 0u};
    if (!planted || lane < 16) pl_ldmatrix_x4(r, rows + 8 * lane);
    for (int k = 0; k < 4; ++k) out[lane * 4 + k] = r[k];
}

// ---- 9. cp.async: tiles of x staged in shared memory, double-buffered as in a
// FlashAttention-2 kernel: tile k + 1 is copied while tile k is read. Each of the 64 threads
// copies 16 bytes (4 floats) per tile and reads the 4 floats thread t - 1 copied (threads 0 and
// 63 their own: the emulator runs the thread completing a barrier on first, then the others in
// ascending order, so with planted == 3 the first read of another thread's copy is of one
// already waited for, which is the race check's case rather than the pending check's):
// out[4 t + j] = sum over tiles of tile[4 src(t) + j].
// planted 1: no cp.async.wait_group; 2: wait_group 2 in the loop, where only tile k + 1's group
// may stay pending (tile k is read before it arrived); 3: the __syncthreads before the wait
// instead of after it (each thread waits for its own copies only: another thread's may not be
// there yet, or not visible to the reader).
__device__ __forceinline__ void pl_cp_async16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :: "r"(pl_smem(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void pl_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void pl_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

__global__ void __launch_bounds__(64) cp_async_tiles_kernel(const float* x, float* out,
                                                            int tiles, int planted) {
    __shared__ __align__(16) float tile[2][256];
    const int t = threadIdx.x;
    const int src = t > 0 && t < 63 ? t - 1 : t;
    pl_cp_async16(&tile[0][4 * t], x + 4 * t);
    pl_cp_async_commit();
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k = 0; k < tiles; ++k) {
        if (k + 1 < tiles) pl_cp_async16(&tile[(k + 1) & 1][4 * t], x + 256 * (k + 1) + 4 * t);
        pl_cp_async_commit();  // (an empty group on the last tile keeps the count uniform)
        if (planted == 3) __syncthreads();
        if (planted == 2) pl_cp_async_wait<2>();
        else if (planted != 1) pl_cp_async_wait<1>();
        if (planted != 3) __syncthreads();
        for (int j = 0; j < 4; ++j) acc[j] += tile[k & 1][4 * src + j];
        __syncthreads();  // tile k is no longer read: its buffer takes tile k + 2
    }
    for (int j = 0; j < 4; ++j) out[4 * t + j] = acc[j];
}

// The other cp.async forms, one warp: .ca with 4 and 8 bytes (the 8-byte copy with src-size 4:
// its upper 4 bytes are zero-filled), .cg with 16, completed by wait_all; each thread then
// reads its neighbour's copies: out[8 n + 0..7] = x[n], x[2 n], 0, x[4 n .. 4 n + 3], x[n] for
// n = (t + 1) % 32. planted 1: the thread rewrites its source before the wait (the copy may
// read either); 2: a second cp.async into a destination whose first copy is still pending.
__device__ __forceinline__ void pl_cp_async_ca4(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
                 :: "r"(pl_smem(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void pl_cp_async_ca8_src4(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n"
                 :: "r"(pl_smem(smem)), "l"(gmem), "r"(4) : "memory");
}
__global__ void __launch_bounds__(32) cp_async_forms_kernel(float* x, float* out, int planted) {
    __shared__ __align__(16) float s4[32];
    __shared__ __align__(16) float s8[64];
    __shared__ __align__(16) float s16[128];
    const int t = threadIdx.x;
    pl_cp_async_ca4(&s4[t], x + t);
    pl_cp_async_ca8_src4(&s8[2 * t], x + 2 * t);
    pl_cp_async16(&s16[4 * t], x + 4 * t);
    if (planted == 1) x[t] = -1.0f;
    if (planted == 2) pl_cp_async_ca4(&s16[4 * t], x + t);
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncthreads();
    const int n = (t + 1) & 31;
    out[8 * n] = s4[n];
    out[8 * n + 1] = s8[2 * n];
    out[8 * n + 2] = s8[2 * n + 1];
    for (int j = 0; j < 4; ++j) out[8 * n + 3 + j] = s16[4 * n + j];
    out[8 * n + 7] = s4[n];
}

// ---- 10. denormals: products in float and in double. CuPy compiles with -ftz=true, so on the
// GPU a float denormal operand reads as zero and a float denormal result is stored as a
// signed zero; doubles keep theirs. No planted bug: the emulator must run it as the GPU does.
__global__ void __launch_bounds__(32) denormal_probe_kernel(const float* a, const float* b,
                                                            float* p, const double* ad,
                                                            const double* bd, double* pd) {
    const int i = threadIdx.x;
    p[i] = a[i] * b[i];
    pd[i] = ad[i] * bd[i];
}
