// Inverted dropout with masks from a counter-based generator (Philox4x32-10, common.cuh).
//
// dropout_kernel:     out[i] = x[i] * keep(i) * scale
// dropout_add_kernel: out[i] = base[i] + x[i] * keep(i) * scale   (a residual add fused with
//                     its branch's dropout: one pass instead of two)
// keep(i): word i % 4 of philox(counter = (i / 4, site, micro), key = (seed, step)) >=
// threshold, so the mask is a pure function of (seed, step, site, micro-batch, element): the
// backward regenerates it (the same kernel on the gradient) instead of storing it, and the
// NumPy reference (ops/dropout.py) draws the same bits. The step comes through a pointer (the
// trainer's per-step buffer) so a step captured in a CUDA graph replays with each step's masks.
// Each thread takes groups of 4 consecutive elements: one Philox call per group.
//
// Napkin math: 10 rounds x 2 mul.wide per group of 4 elements, ~8 integer ops per element;
// memory: one read and one write per element (two reads with the add) -- memory-bound on a
// GPU (Hopper: ~30 integer ops per byte moved are free at 3 TB/s).
#include "common.cuh"

__device__ __forceinline__ CllmDropout dropout_stream(unsigned seed, const double* step,
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

template <typename T>
__global__ void __launch_bounds__(256) dropout_kernel(
        const T* x, T* out, long long n, unsigned seed, const double* step, unsigned site,
        unsigned micro, unsigned threshold, T scale) {
    const CllmDropout d = dropout_stream(seed, step, site, micro, threshold);
    const long long groups = (n + 3) / 4;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
        const CllmPhilox r = d.draw4((unsigned long long)g);
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const long long i = 4 * g + w;
            if (i < n) out[i] = r.v[w] >= d.threshold ? x[i] * scale : T(0);
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(256) dropout_add_kernel(
        const T* base, const T* x, T* out, long long n, unsigned seed, const double* step,
        unsigned site, unsigned micro, unsigned threshold, T scale) {
    const CllmDropout d = dropout_stream(seed, step, site, micro, threshold);
    const long long groups = (n + 3) / 4;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
        const CllmPhilox r = d.draw4((unsigned long long)g);
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const long long i = 4 * g + w;
            if (i < n) out[i] = base[i] + (r.v[w] >= d.threshold ? x[i] * scale : T(0));
        }
    }
}
