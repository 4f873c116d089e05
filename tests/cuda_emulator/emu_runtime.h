// CPU emulation of the CUDA features the cllm-gpu kernels use: what kernel code sees. build.py
// pastes this header before a kernel source so that g++ compiles the real kernel text, and
// before emu_runtime.cpp (the scheduler, collectives, PTX emulation and memory checks, with
// CLLM_EMU_RUNTIME_IMPL defined), which is compiled once and linked into every kernel library.
// docs/emulator.md describes the execution model and what a launch is checked for.
//
// Kernel code is compiled with -fsanitize=thread (its loads and stores call the runtime's
// checks) and every device function is inlined, so the return address of a collective below
// (all noinline) names its call site in the kernel.
#pragma once
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>

namespace cllm_emu {

struct dim3 { unsigned x = 1, y = 1, z = 1; };

// What kernel code reads as threadIdx, blockIdx, blockDim, gridDim: one object the access
// checker knows (the scheduler copies the running thread's index in at every switch).
struct KernelView { dim3 tid, bidx, bdim, gdim; };
extern KernelView KV;

struct F4 { float v[4]; };
struct U4 { uint32_t v[4]; };
struct SharedTag { const char* name; };
struct LaunchOptions;
enum ShflKind { SHFL_XOR, SHFL_IDX, SHFL_DOWN };

// the runtime (emu_runtime.cpp)
int launch(const char* name, const unsigned* grid, const unsigned* block,
           const LaunchOptions* opt, void (*body)(void**), void** args, int max_threads);
const char* last_error();
uint64_t warp_exchange(uint64_t raw, ShflKind kind, int arg, int width, unsigned mask,
                       const void* site, int line, const char* what);
unsigned warp_ballot(int pred, unsigned mask, const void* site, int line);
void warp_sync(unsigned mask, const void* site, int line);
void block_sync(const void* site, int line);
F4 mma_bf16(const void* site, int line, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
            uint32_t b0, uint32_t b1, float c0, float c1, float c2, float c3);
U4 ldmatrix_b16(const void* site, int line, uint64_t addr, int num, int trans);
void cp_async(uint64_t dst, const void* src, int cp_size, int src_size, int cg, int line);
void cp_async_commit();
void cp_async_wait(int n, int line);
uint64_t shared_window(const void* p);
void* shared_decl(SharedTag* tag, size_t bytes, size_t align);
void* shared_dynamic(SharedTag* tag);
int atomic_add_i32(int* p, int v);
unsigned atomic_add_u32(unsigned* p, unsigned v);
float atomic_add_f32(float* p, float v);
double atomic_add_f64(double* p, double v);

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

// ---- PTX: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, c (the asm statement
// becomes this call: build.py).
[[gnu::noinline]] inline F4 ptx_mma_m16n8k16_row_col_f32_bf16_bf16_f32(
        uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1, float c0,
        float c1, float c2, float c3, int line = __builtin_LINE()) {
    return mma_bf16(__builtin_return_address(0), line, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
}

// ---- PTX: ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 d, [addr]: a warp collective
// (matched by call site like mma); `addr` is this lane's row address in the shared window
// (__cvta_generic_to_shared).
[[gnu::noinline]] inline U4 ptx_ldmatrix_m8n8_b16(uint64_t addr, int num, int trans,
                                                  int line = __builtin_LINE()) {
    return ldmatrix_b16(__builtin_return_address(0), line, addr, num, trans);
}
// ---- PTX: cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size}; commit_group;
// wait_group N; wait_all (n < 0). Per thread, not collectives.
inline void ptx_cp_async(uint64_t dst, const void* src, int cp_size, int src_size, int cg,
                         int line = __builtin_LINE()) {
    cp_async(dst, src, cp_size, src_size, cg, line);
}
inline void ptx_cp_async_commit_group() { cp_async_commit(); }
inline void ptx_cp_async_wait_group(int n, int line = __builtin_LINE()) { cp_async_wait(n, line); }

#ifdef CLLM_EMU_RUNTIME_IMPL
// emu_ptx.cpp: the product of one warp's fragments (lane, register) -> d
void mma_m16n8k16_bf16(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2],
                       const float (&c)[32][4], float (&d)[32][4]);
// emu_ptx.cpp: ldmatrix's fragments for a warp from the row addresses rows[8 * matrix + row]
// (num matrices) -> d[lane][matrix]
void ldmatrix_m8n8_b16(const unsigned char* const (&rows)[32], int num, bool trans,
                       uint32_t (&d)[32][4]);
#endif

}  // namespace cllm_emu

#ifndef CLLM_EMU_RUNTIME_IMPL
// ---------------------------------------------------------------- CUDA C++ -> C++
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx (::cllm_emu::KV.tid)
#define blockIdx (::cllm_emu::KV.bidx)
#define blockDim (::cllm_emu::KV.bdim)
#define gridDim (::cllm_emu::KV.gdim)
// not instrumented: the launch wrappers (build.py) read the argument list from host memory
#define CLLM_EMU_HOST_CODE __attribute__((no_sanitize_thread))

// The whole block meets at one call site (the hardware would pair differing __syncthreads
// calls silently: undefined behaviour in CUDA).
[[gnu::noinline]] inline void __syncthreads(int line = __builtin_LINE()) {
    ::cllm_emu::block_sync(__builtin_return_address(0), line);
}
// Orders the shared and global memory accesses of the warp's lanes (and only this warp's).
[[gnu::noinline]] inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
    ::cllm_emu::warp_sync(mask, __builtin_return_address(0), line);
}

template <typename T>
inline T cllm_emu_shfl(T v, ::cllm_emu::ShflKind kind, int arg, int width, unsigned mask,
                       const void* site, int line, const char* what) {
    static_assert(sizeof(T) <= 8, "warp exchange of a value wider than 8 bytes");
    uint64_t raw = 0;
    memcpy(&raw, &v, sizeof(T));
    raw = ::cllm_emu::warp_exchange(raw, kind, arg, width, mask, site, line, what);
    T r;
    memcpy(&r, &raw, sizeof(T));
    return r;
}
template <typename T>
[[gnu::noinline]] inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                                           int line = __builtin_LINE()) {
    return cllm_emu_shfl(v, ::cllm_emu::SHFL_XOR, lane_mask, width, mask,
                         __builtin_return_address(0), line, "__shfl_xor_sync");
}
template <typename T>
[[gnu::noinline]] inline T __shfl_sync(unsigned mask, T v, int src, int width = 32,
                                       int line = __builtin_LINE()) {
    return cllm_emu_shfl(v, ::cllm_emu::SHFL_IDX, src, width, mask, __builtin_return_address(0),
                         line, "__shfl_sync");
}
template <typename T>
[[gnu::noinline]] inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                                            int line = __builtin_LINE()) {
    return cllm_emu_shfl(v, ::cllm_emu::SHFL_DOWN, (int)delta, width, mask,
                         __builtin_return_address(0), line, "__shfl_down_sync");
}
[[gnu::noinline]] inline unsigned __ballot_sync(unsigned mask, int pred,
                                                int line = __builtin_LINE()) {
    return ::cllm_emu::warp_ballot(pred, mask, __builtin_return_address(0), line);
}
inline int atomicAdd(int* p, int v) { return ::cllm_emu::atomic_add_i32(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return ::cllm_emu::atomic_add_u32(p, v); }
inline float atomicAdd(float* p, float v) { return ::cllm_emu::atomic_add_f32(p, v); }
inline double atomicAdd(double* p, double v) { return ::cllm_emu::atomic_add_f64(p, v); }

// the shared-window address of a generic pointer into shared memory (PTX cvta.to.shared)
inline size_t __cvta_generic_to_shared(const void* p) { return ::cllm_emu::shared_window(p); }

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

// build.py turns `__shared__ T name[N]` into a reference to the block's copy, and
// `extern __shared__ T name[]` into a pointer to the launch's dynamic shared memory.
#define CLLM_EMU_SHARED(T, name, dims, align)                                                  \
    static ::cllm_emu::SharedTag name##_cllm_tag{#name};                                       \
    T(&name) dims = *reinterpret_cast<T(*) dims>(::cllm_emu::shared_decl(                    \
        &name##_cllm_tag, sizeof(T dims), alignof(T) > (align) ? alignof(T) : (align)))
#define CLLM_EMU_SHARED_DYNAMIC(T, name)                                                        \
    static ::cllm_emu::SharedTag name##_cllm_tag{#name};                                       \
    T* name = reinterpret_cast<T*>(::cllm_emu::shared_dynamic(&name##_cllm_tag))
#endif
