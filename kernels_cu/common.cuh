// Shared device helpers for the cllm-gpu kernels.
//
// cllm_gpu/kernels.py pastes this file into every kernel source in place of its
// `#include "common.cuh"` line (CuPy's kernel cache key covers only the source string),
// so it must stay self-contained: NVRTC builtins only, no CUDA toolkit headers.
//
// Every reduction here has a fixed order (butterfly shuffles, then partials in warp order):
// the same inputs and launch shape give bitwise identical results on every run.
#ifndef CLLM_COMMON_CUH
#define CLLM_COMMON_CUH

#define CLLM_FULL_MASK 0xffffffffu

// ---- numeric helpers with one name for float and double
template <typename T> __device__ __forceinline__ T cllm_inf();
template <> __device__ __forceinline__ float cllm_inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double cllm_inf<double>() {
    return __longlong_as_double(0x7ff0000000000000LL);
}
template <typename T> __device__ __forceinline__ T cllm_nan();
template <> __device__ __forceinline__ float cllm_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double cllm_nan<double>() {
    return __longlong_as_double(0x7ff8000000000000LL);
}

__device__ __forceinline__ float cllm_exp(float x) { return expf(x); }
__device__ __forceinline__ double cllm_exp(double x) { return exp(x); }
__device__ __forceinline__ float cllm_log(float x) { return logf(x); }
__device__ __forceinline__ double cllm_log(double x) { return log(x); }
__device__ __forceinline__ float cllm_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double cllm_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float cllm_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double cllm_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float cllm_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double cllm_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ bool cllm_isfinite(float x) { return isfinite(x); }
__device__ __forceinline__ bool cllm_isfinite(double x) { return isfinite(x); }

// ---- warp reductions (all 32 lanes must be active; every lane gets the result)
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(CLLM_FULL_MASK, v, o);
    return v;
}

template <typename T> __device__ __forceinline__ T warp_max(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = cllm_max(v, __shfl_xor_sync(CLLM_FULL_MASK, v, o));
    return v;
}

// Sum over the 4 consecutive lanes that share one row (lanes 4r .. 4r+3).
template <typename T> __device__ __forceinline__ T quad_sum(T v) {
    v += __shfl_xor_sync(CLLM_FULL_MASK, v, 1);
    v += __shfl_xor_sync(CLLM_FULL_MASK, v, 2);
    return v;
}

// ---- block reduction: blockDim.x must be a multiple of 32 and at most 1024; every thread
// of the block must call it; `scratch` holds >= 32 elements of shared memory. Every thread
// gets the same (bitwise) total: each warp reduces the per-warp partials itself.
template <typename T> __device__ __forceinline__ T block_sum(T v, T* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T r = (lane < nwarps) ? scratch[lane] : T(0);
    return warp_sum(r);
}

// The same for the minimum; `identity` is what lanes beyond the last warp contribute.
template <typename T> __device__ __forceinline__ T warp_min(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(CLLM_FULL_MASK, v, o));
    return v;
}
template <typename T> __device__ __forceinline__ T block_min(T v, T* scratch, T identity) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_min(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T r = (lane < nwarps) ? scratch[lane] : identity;
    return warp_min(r);
}

// ---- vector loads: N consecutive elements as one aligned access (caller checks alignment)
template <typename T, int N> struct alignas(sizeof(T) * N) CllmPack { T v[N]; };

template <typename T, int N>
__device__ __forceinline__ CllmPack<T, N> load_pack(const T* p) {
    return *reinterpret_cast<const CllmPack<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const CllmPack<T, N>& x) {
    *reinterpret_cast<CllmPack<T, N>*>(p) = x;
}

// ---- bfloat16, without cuda_bf16.h (NVRTC has no include path to it): a bf16 value is the
// top 16 bits of a float. Stored as `cllm_bf16` (a distinct 2-byte type, so overloads can tell
// it from float); converted with the sm_80+ PTX cvt instructions, round to nearest even.
struct alignas(2) cllm_bf16 { unsigned short bits; };

__device__ __forceinline__ unsigned short cllm_float_to_bf16_bits(float x) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float cllm_bf16_bits_to_float(unsigned short b) {
    return __uint_as_float(((unsigned)b) << 16);
}
// Two floats as one bf16x2 register (lo in bits 0..15, hi in bits 16..31): the operand format
// of the bf16 tensor-core mma instructions.
__device__ __forceinline__ unsigned cllm_pack_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Loads and stores that convert to/from the compute type, one name for every storage type:
// templates over the output type (float, double or cllm_bf16) use these.
__device__ __forceinline__ float cllm_load(const float* p) { return *p; }
__device__ __forceinline__ double cllm_load(const double* p) { return *p; }
__device__ __forceinline__ float cllm_load(const cllm_bf16* p) { return cllm_bf16_bits_to_float(p->bits); }
__device__ __forceinline__ void cllm_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void cllm_store(double* p, double v) { *p = v; }
__device__ __forceinline__ void cllm_store(cllm_bf16* p, float v) { p->bits = cllm_float_to_bf16_bits(v); }
// The same on values (elements of a loaded CllmPack): storage type -> compute type and back.
__device__ __forceinline__ float cllm_value(float v) { return v; }
__device__ __forceinline__ double cllm_value(double v) { return v; }
__device__ __forceinline__ float cllm_value(cllm_bf16 v) { return cllm_bf16_bits_to_float(v.bits); }
template <typename S, typename T> __device__ __forceinline__ S cllm_stored(T v);
template <> __device__ __forceinline__ float cllm_stored<float, float>(float v) { return v; }
template <> __device__ __forceinline__ double cllm_stored<double, double>(double v) { return v; }
template <> __device__ __forceinline__ cllm_bf16 cllm_stored<cllm_bf16, float>(float v) {
    cllm_bf16 r;
    r.bits = cllm_float_to_bf16_bits(v);
    return r;
}

// ---- column sums in a fixed order: a kernel that walks (row chunk, 32 columns) blocks writes
// partial[chunk][c]; cllm_colsum_finalize_kernel adds the chunks up in a fixed order into
// dst[c] (+=): deterministic, no atomics (bias gradients: dropout.cu, gelu.cu; layernorm.cu
// forms its partials in the kernel that reads the rows, and finalizes two sums at once).
// Such a kernel runs grid (ceil(C / 32), chunks), block 256 = 32 columns x 8 row lanes.
#define CLLM_COLSUM_ROWLANES 8

// Where a thread of a column-partials block works: column c, rows r0 + ty, r0 + ty + 8, ... < r1.
struct CllmColTile {
    int tx, ty, c, chunk;
    long long r0, r1;
    __device__ CllmColTile(int N, int rows_per_chunk)
        : tx(threadIdx.x & 31), ty(threadIdx.x >> 5), c(blockIdx.x * 32 + (threadIdx.x & 31)),
          chunk(blockIdx.y), r0((long long)blockIdx.y * rows_per_chunk),
          r1(r0 + rows_per_chunk < N ? r0 + rows_per_chunk : N) {}
};

// The block's per-thread sums of a column, added in a fixed order into partial[chunk][c].
template <typename T>
__device__ __forceinline__ void cllm_colsum_partial(T (&acc_s)[CLLM_COLSUM_ROWLANES][33], T acc,
                                                    const CllmColTile& t, int C, T* partial) {
    acc_s[t.ty][t.tx] = acc;
    __syncthreads();
    if (t.ty == 0 && t.c < C) {
        T total = T(0);
#pragma unroll
        for (int k = 0; k < CLLM_COLSUM_ROWLANES; ++k) total += acc_s[k][t.tx];
        partial[(long long)t.chunk * C + t.c] = total;
    }
}

// grid (ceil(C / 32), outputs), block 32 columns x CLLM_FINALIZE_LANES lanes; output y sums
// partial[y][chunk][c] into dst0 (y = 0) or dst1 (y = 1). Lane k sums chunks k, k + 32, ... in
// order, then the lanes are added in order: the 32 lanes keep enough loads in flight (one
// thread walking all 256 chunks of a column left a launch latency-bound: ~3 blocks at
// C = 768).
#define CLLM_FINALIZE_LANES 32
template <typename T>
__global__ void __launch_bounds__(32 * CLLM_FINALIZE_LANES) cllm_colsum_finalize_kernel(
        const T* partial, T* dst0, T* dst1, int C, int chunks) {
    __shared__ T lane_sums[CLLM_FINALIZE_LANES][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + tx;
    const T* p = partial + (long long)blockIdx.y * chunks * C;
    T acc = T(0);
    if (c < C) {
#pragma unroll 4
        for (int k = ty; k < chunks; k += CLLM_FINALIZE_LANES) acc += p[(long long)k * C + c];
    }
    lane_sums[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && c < C) {
        T total = T(0);
#pragma unroll
        for (int k = 0; k < CLLM_FINALIZE_LANES; ++k) total += lane_sums[k][tx];
        T* dst = blockIdx.y == 0 ? dst0 : dst1;
        dst[c] += total;
    }
}

// ---- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the
// generator of cuRAND and FlashAttention): four 32-bit words of counter, two of key, ten rounds.
// Counter-based: the numbers for (key, counter) are a pure function of them, so a dropout mask
// is regenerated in the backward instead of stored, and the NumPy reference (ops/dropout.py)
// draws bit-identical masks.
struct CllmPhilox { unsigned v[4]; };

__device__ __forceinline__ CllmPhilox cllm_philox4x32_10(unsigned c0, unsigned c1, unsigned c2,
                                                         unsigned c3, unsigned k0, unsigned k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {  // key schedule: the Weyl sequence
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned long long p0 = (unsigned long long)0xD2511F53u * c0;
        const unsigned long long p1 = (unsigned long long)0xCD9E8D57u * c2;
        const unsigned hi0 = (unsigned)(p0 >> 32), lo0 = (unsigned)p0;
        const unsigned hi1 = (unsigned)(p1 >> 32), lo1 = (unsigned)p1;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    CllmPhilox out;
    out.v[0] = c0; out.v[1] = c1; out.v[2] = c2; out.v[3] = c3;
    return out;
}

// The dropout stream of one site: element e of it is kept when word e % 4 of
// philox(counter = (e / 4 low, e / 4 high, site, micro), key = (seed, step)) >= threshold
// (threshold = round(p * 2^32)). ops/dropout.py documents the key fields.
struct CllmDropout {
    unsigned seed, step, site, micro, threshold;
    __device__ __forceinline__ CllmPhilox draw4(unsigned long long group) const {
        return cllm_philox4x32_10((unsigned)group, (unsigned)(group >> 32), site, micro, seed,
                                  step);
    }
};

// A launch's stream: the step comes through a pointer (the trainer's per-step buffer slot, so
// a step captured in a CUDA graph replays with each step's masks).
__device__ __forceinline__ CllmDropout cllm_dropout_stream(unsigned seed, const double* step,
                                                           unsigned site, unsigned micro,
                                                           unsigned threshold) {
    CllmDropout d;
    d.seed = seed;
    d.step = (unsigned)step[0];
    d.site = site;
    d.micro = micro;
    d.threshold = threshold;
    return d;
}

#endif  // CLLM_COMMON_CUH
