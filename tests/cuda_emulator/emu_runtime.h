// CPU emulation of the CUDA features the cllm-gpu kernels use, pasted before a kernel source
// (tests/cuda_emulator/build.py) so that g++ compiles the real kernel text.
//
// Execution model: the blocks of a launch run one after another; the threads of a block run as
// user-space fibers (ucontext) on ONE OS thread, switching only at __syncthreads, warp shuffles,
// ballots and mma. Why fibers, not std::thread: on a 2-core machine a barrier over 128-512 OS
// threads costs a context switch per thread, and fibers make every run reproducible. Because
// blocks run one at a time and every thread of a block runs the same function, `__shared__`
// becomes a function-local `static` (one copy shared by the block's threads); build.py adds a
// registration call after each one so the runtime fills it with 0xFF bytes (NaN for
// float/double/bf16) before each block: a read of shared memory nobody wrote shows up as NaN.
// The scheduling order (ascending or descending thread index) is selectable: a missing barrier
// between a write and a read of another thread gives a different result in one of the two
// orders, which the tests compare bitwise.
#pragma once
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include <functional>
#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

namespace cllm_emu {

struct dim3 { unsigned x = 1, y = 1, z = 1; };

enum FiberState { READY, WAITING, DONE };

struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    int linear = 0, warp = 0, lane = 0;
    FiberState state = READY;
    unsigned xcount = 0;  // warp-collective calls made (selects the double buffer)
};

struct Barrier {
    int expected = 0;
    int arrived = 0;
    std::vector<int> waiters;
    int site = 0;  // source line of the first arrival (block barrier)
};

// Per-warp exchange buffers, double-buffered by call parity: a lane can only start call k + 2
// after every lane arrived at call k + 1, i.e. after every lane finished reading call k.
struct WarpBuf {
    uint64_t x[2][32];
    bool valid[2][32];
    uint32_t a[2][32][4], b[2][32][2];
    float c[2][32][4];
};

struct Runtime {
    dim3 grid, block, bidx;
    int nthreads = 0;
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;
    size_t stack_size = 0;
    Barrier block_bar;
    std::vector<Barrier> warp_bars;
    std::vector<WarpBuf> wbuf;
    ucontext_t sched;
    Fiber* cur = nullptr;
    const std::function<void()>* body = nullptr;
    std::string error;
    int reverse = 0;
    unsigned long long block_serial = 0;
    std::vector<std::pair<void*, unsigned long long>> shared_seen;
};

inline Runtime R;

inline void fail(const std::string& msg) {
    if (R.error.empty()) R.error = msg;
}

inline std::string where() {
    char b[160];
    if (!R.cur) return "";
    snprintf(b, sizeof b, " (block %u,%u,%u thread %u,%u,%u)", R.bidx.x, R.bidx.y, R.bidx.z,
             R.cur->tid.x, R.cur->tid.y, R.cur->tid.z);
    return b;
}

inline void switch_to_scheduler() { swapcontext(&R.cur->ctx, &R.sched); }

inline void release(Barrier& bar) {
    for (int i : bar.waiters) R.fibers[i].state = READY;
    bar.waiters.clear();
    bar.arrived = 0;
}

// Wait until `expected` live threads arrived; the last one to arrive continues at once.
inline void barrier_wait(Barrier& bar) {
    if (++bar.arrived >= bar.expected) {
        release(bar);
        return;
    }
    R.cur->state = WAITING;
    bar.waiters.push_back(R.cur->linear);
    switch_to_scheduler();
}

// A thread that returned no longer counts (std::barrier::arrive_and_drop).
inline void drop(Barrier& bar) {
    --bar.expected;
    if (bar.arrived > 0 && bar.arrived >= bar.expected) release(bar);
}

inline void fiber_main() {
    Fiber* f = R.cur;
    (*R.body)();
    f->state = DONE;
    drop(R.block_bar);
    drop(R.warp_bars[f->warp]);
    swapcontext(&f->ctx, &R.sched);
}

inline void register_shared(void* p, size_t n) {
    for (auto& e : R.shared_seen) {
        if (e.first == p) {
            if (e.second != R.block_serial) {
                memset(p, 0xFF, n);
                e.second = R.block_serial;
            }
            return;
        }
    }
    memset(p, 0xFF, n);
    R.shared_seen.push_back({p, R.block_serial});
}

// Runs `body` as the kernel over the whole grid. Returns 0, or 1 with R.error set.
inline int launch(const unsigned* grid, const unsigned* block, int reverse,
                  const std::function<void()>& body) {
    R.error.clear();
    R.grid = {grid[0], grid[1], grid[2]};
    R.block = {block[0], block[1], block[2]};
    R.reverse = reverse;
    R.body = &body;
    const int n = (int)(block[0] * block[1] * block[2]);
    if (n <= 0 || n > 1024 || n % 32) {
        fail("block size must be a positive multiple of 32 up to 1024");
        return 1;
    }
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t ss = 128 * 1024;
    if ((int)R.stacks.size() < n || R.stack_size != ss) {
        for (char* s : R.stacks) munmap(s - page, R.stack_size + page);
        R.stacks.clear();
        for (int i = 0; i < n; ++i) {
            // a PROT_NONE page below each stack: an overflow faults instead of corrupting
            char* m = (char*)mmap(nullptr, ss + page, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED) { fail("mmap failed"); return 1; }
            mprotect(m, page, PROT_NONE);
            R.stacks.push_back(m + page);
        }
        R.stack_size = ss;
    }
    R.nthreads = n;
    R.fibers.assign(n, Fiber());
    const int nwarps = n / 32;
    R.warp_bars.assign(nwarps, Barrier());
    R.wbuf.assign(nwarps, WarpBuf());
    for (unsigned bz = 0; bz < grid[2]; ++bz)
    for (unsigned by = 0; by < grid[1]; ++by)
    for (unsigned bx = 0; bx < grid[0]; ++bx) {
        R.bidx = {bx, by, bz};
        ++R.block_serial;
        R.block_bar = Barrier();
        R.block_bar.expected = n;
        for (int w = 0; w < nwarps; ++w) {
            R.warp_bars[w] = Barrier();
            R.warp_bars[w].expected = 32;
            memset(R.wbuf[w].valid, 0, sizeof R.wbuf[w].valid);
        }
        for (int i = 0; i < n; ++i) {
            Fiber& f = R.fibers[i];
            f = Fiber();
            f.linear = i;
            f.tid = {(unsigned)i % block[0], ((unsigned)i / block[0]) % block[1],
                     (unsigned)i / (block[0] * block[1])};
            f.warp = i / 32;
            f.lane = i % 32;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = R.stacks[i];
            f.ctx.uc_stack.ss_size = ss;
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_main, 0);
        }
        int pos = 0, done = 0;
        while (done < n) {
            int pick = -1;
            for (int k = 0; k < n; ++k) {
                int i = (pos + k) % n;
                int idx = reverse ? n - 1 - i : i;
                if (R.fibers[idx].state == READY) { pick = idx; pos = (i + 1) % n; break; }
            }
            if (pick < 0) {
                int wb = 0, ww = 0;
                for (auto& f : R.fibers) if (f.state == WAITING) ++wb;
                for (auto& b : R.warp_bars) ww += (int)b.waiters.size();
                char m[200];
                snprintf(m, sizeof m, "deadlock in block (%u,%u,%u): %d threads waiting "
                         "(%d at warp collectives, %d at __syncthreads), %d returned",
                         bx, by, bz, wb, ww, wb - ww, done);
                fail(m);
                R.cur = nullptr;
                return 1;
            }
            R.cur = &R.fibers[pick];
            swapcontext(&R.sched, &R.cur->ctx);
            if (R.cur->state == DONE) ++done;
            if (!R.error.empty()) { R.cur = nullptr; return 1; }
        }
        R.cur = nullptr;
    }
    return 0;
}

// ---- warp collectives
inline void check_mask(unsigned mask, const char* what) {
    if (mask != 0xffffffffu) fail(std::string(what) + ": only the full mask is emulated" + where());
}

template <typename T> inline T exchange(T v, int src) {
    static_assert(sizeof(T) <= 8, "warp exchange of a value wider than 8 bytes");
    Fiber* f = R.cur;
    WarpBuf& W = R.wbuf[f->warp];
    const int p = f->xcount++ & 1;
    uint64_t raw = 0;
    memcpy(&raw, &v, sizeof(T));
    W.x[p][f->lane] = raw;
    W.valid[p][f->lane] = true;
    barrier_wait(R.warp_bars[f->warp]);
    f = R.cur;
    if (!W.valid[p][src]) fail("warp shuffle reads a lane that has returned" + where());
    T r;
    memcpy(&r, &W.x[p][src], sizeof(T));
    return r;
}

// ---- PTX: cvt.rn.bf16.f32 and cvt.rn.bf16x2.f32 (PTX ISA, "cvt"): round to nearest even;
// a NaN converts to a NaN (canonical 0x7FFF here; only NaN-ness is checked).
inline uint16_t ptx_cvt_rn_bf16_f32(float a) {
    uint32_t u;
    memcpy(&u, &a, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
// "the value converted from input a is stored in the upper half of d and the value converted
// from input b is stored in the lower half of d" (PTX ISA, cvt, .bf16x2)
inline uint32_t ptx_cvt_rn_bf16x2_f32(float a, float b) {
    return ((uint32_t)ptx_cvt_rn_bf16_f32(a) << 16) | (uint32_t)ptx_cvt_rn_bf16_f32(b);
}

inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// ---- PTX: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, c (D = A * B + C).
// Fragment layouts, the ONE place they are written down. PTX ISA 9.7.14.5.8 "Matrix Fragments
// for mma.m16n8k16 with floating point type"; groupID = laneid >> 2, tig = laneid % 4.
// Elements are numbered low to high across the registers, two bf16 per .b32 register, the
// lower-numbered element in the low 16 bits.
//   A a0..a7 (4 regs): row = groupID for a0, a1, a4, a5, else groupID + 8;
//                      col = tig * 2 + (i & 1) for i < 4, tig * 2 + (i & 1) + 8 for i >= 4
//   B b0..b3 (2 regs): row (k) = tig * 2 + (i & 1) for i < 2, + 8 for i >= 2; col (n) = groupID
//   C/D c0..c3 (f32):  row = groupID for i < 2, groupID + 8 for i >= 2; col = tig * 2 + (i & 1)
inline void frag_a_rc(int lane, int i, int& row, int& col) {
    const int g = lane >> 2, t = lane & 3;
    row = (i == 0 || i == 1 || i == 4 || i == 5) ? g : g + 8;
    col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
inline void frag_b_rc(int lane, int i, int& row, int& col) {
    const int g = lane >> 2, t = lane & 3;
    row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
    col = g;
}
inline void frag_c_rc(int lane, int i, int& row, int& col) {
    const int g = lane >> 2, t = lane & 3;
    row = i < 2 ? g : g + 8;
    col = t * 2 + (i & 1);
}

// Warp-collective: every lane deposits its registers, then computes its own 4 outputs from the
// whole 16x8x16 product. Products of bf16 values are exact in double and the 16-term sum plus
// c is rounded once to fp32 (the hardware's fp32 accumulation order is unspecified; the tests'
// tolerances allow for it).
inline void ptx_mma_m16n8k16_row_col_f32_bf16_bf16_f32(float d[4], const uint32_t a[4],
                                                      const uint32_t b[2], const float c[4]) {
    Fiber* f = R.cur;
    WarpBuf& W = R.wbuf[f->warp];
    const int p = f->xcount++ & 1;
    const int lane = f->lane;
    for (int r = 0; r < 4; ++r) W.a[p][lane][r] = a[r];
    for (int r = 0; r < 2; ++r) W.b[p][lane][r] = b[r];
    for (int r = 0; r < 4; ++r) W.c[p][lane][r] = c[r];
    W.valid[p][lane] = true;
    barrier_wait(R.warp_bars[f->warp]);
    f = R.cur;
    double A[16][16], B[16][8];
    int hits_a[16][16] = {}, hits_b[16][8] = {};  // the layout must place each element once
    for (int l = 0; l < 32; ++l) {
        if (!W.valid[p][l]) { fail("mma with a lane that has returned" + where()); return; }
        for (int i = 0; i < 8; ++i) {
            int row, col;
            frag_a_rc(l, i, row, col);
            const uint32_t reg = W.a[p][l][i >> 1];
            ++hits_a[row][col];
            A[row][col] = bf16_to_float((uint16_t)(i & 1 ? reg >> 16 : reg & 0xffffu));
        }
        for (int i = 0; i < 4; ++i) {
            int row, col;
            frag_b_rc(l, i, row, col);
            const uint32_t reg = W.b[p][l][i >> 1];
            ++hits_b[row][col];
            B[row][col] = bf16_to_float((uint16_t)(i & 1 ? reg >> 16 : reg & 0xffffu));
        }
    }
    for (int r = 0; r < 16; ++r) {
        for (int k = 0; k < 16; ++k) if (hits_a[r][k] != 1) fail("mma A layout is not a bijection");
        for (int n = 0; n < 8; ++n) if (hits_b[r][n] != 1) fail("mma B layout is not a bijection");
    }
    for (int i = 0; i < 4; ++i) {
        int row, col;
        frag_c_rc(lane, i, row, col);
        double acc = W.c[p][lane][i];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        d[i] = (float)acc;
    }
}

}  // namespace cllm_emu

// ---- CUDA C++ -> C++
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx (::cllm_emu::R.cur->tid)
#define blockIdx (::cllm_emu::R.bidx)
#define blockDim (::cllm_emu::R.block)
#define gridDim (::cllm_emu::R.grid)

// Threads meeting in one barrier must have called it from the same source line: the hardware
// would pair differing __syncthreads calls silently (undefined behaviour in CUDA).
inline void __syncthreads(int line = __builtin_LINE()) {
    using namespace ::cllm_emu;
    if (R.block_bar.arrived == 0) R.block_bar.site = line;
    else if (R.block_bar.site != line)
        fail("__syncthreads reached from different lines (" + std::to_string(R.block_bar.site)
             + " and " + std::to_string(line) + ") in one barrier" + where());
    barrier_wait(R.block_bar);
}

template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    ::cllm_emu::check_mask(mask, "__shfl_xor_sync");
    if (width != 32) ::cllm_emu::fail("__shfl_xor_sync: width != 32 not emulated");
    return ::cllm_emu::exchange(v, (::cllm_emu::R.cur->lane ^ lane_mask) & 31);
}
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    ::cllm_emu::check_mask(mask, "__shfl_sync");
    if (width != 32) ::cllm_emu::fail("__shfl_sync: width != 32 not emulated");
    return ::cllm_emu::exchange(v, src & 31);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    ::cllm_emu::check_mask(mask, "__shfl_down_sync");
    const int lane = ::cllm_emu::R.cur->lane;
    const int src = lane + (int)delta < 32 ? lane + (int)delta : lane;
    return ::cllm_emu::exchange(v, src);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    ::cllm_emu::check_mask(mask, "__ballot_sync");
    using namespace ::cllm_emu;
    Fiber* f = R.cur;
    WarpBuf& W = R.wbuf[f->warp];
    const int p = f->xcount++ & 1;
    W.x[p][f->lane] = pred ? 1 : 0;
    W.valid[p][f->lane] = true;
    barrier_wait(R.warp_bars[f->warp]);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l) {
        if (!W.valid[p][l]) fail("__ballot_sync with a lane that has returned" + where());
        if (W.x[p][l]) r |= 1u << l;
    }
    return r;
}
inline int __ffs(int x) { return __builtin_ffs(x); }

inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned u; memcpy(&u, &x, 4); return u; }
inline int __float_as_int(float x) { int u; memcpy(&u, &x, 4); return u; }
inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double x) { long long u; memcpy(&u, &x, 8); return u; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
using std::isfinite;
using std::isnan;

#define CLLM_EMU_SHARED(name) ::cllm_emu::register_shared((void*)&(name), sizeof(name))
