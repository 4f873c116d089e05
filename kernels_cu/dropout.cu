// Inverted dropout with masks from a counter-based generator (Philox4x32-10, common.cuh).
//
// dropout_kernel:     out[i] = x[i] * keep(i) * scale  (the embedding dropout and its backward;
//                     the residual branches' dropout is fused into layernorm.cu's
//                     residual_layernorm_forward_kernel and dropout_bias_backward_kernel below)
// keep(i): word i % 4 of philox(counter = (i / 4, site, micro), key = (seed, step)) >=
// threshold, so the mask is a pure function of (seed, step, site, micro-batch, element): the
// backward regenerates it (the same kernel on the gradient) instead of storing it, and the
// NumPy reference (ops/dropout.py) draws the same bits. The step comes through a pointer (the
// trainer's per-step buffer) so a step captured in a CUDA graph replays with each step's masks.
// Each thread takes groups of 4 consecutive elements: one Philox call per group.
//
// Napkin math: 10 rounds x 2 mul.wide per group of 4 elements, ~8 integer ops per element;
// memory: one read and one write per element -- memory-bound on a
// GPU (Hopper: ~30 integer ops per byte moved are free at 3 TB/s).
#include "common.cuh"

template <typename T>
__global__ void __launch_bounds__(256) dropout_kernel(
        const T* x, T* out, long long n, unsigned seed, const double* step, unsigned site,
        unsigned micro, unsigned threshold, T scale) {
    const CllmDropout d = cllm_dropout_stream(seed, step, site, micro, threshold);
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

// The output type of a column-sums-only launch: nothing is stored.
struct CllmNoOutput {};
template <typename V> __device__ __forceinline__ void cllm_store(CllmNoOutput*, V) {}

// A residual branch's gradient, in one pass: g = dropout(dsum) (the forward's mask, when
// use_dropout) stored in OutT (the bf16 copy the branch's linear layer multiplies by, or float;
// CllmNoOutput: not stored), and the column sums of g (the gradient of that layer's bias) as
// per-row-chunk partials, added up by cllm_colsum_finalize_kernel (common.cuh) in a fixed
// order: deterministic, no atomics. Replaces a dropout pass, a cast pass and the bias-gradient
// reduction's read. dsum in InT storage: T, or cllm_bf16 (a gradient its GEMMs already read in
// bf16, the attention's dqkv: the sums of the rounded values, in fp32; no output).
// grid (ceil(C / 32), chunks), block 256 = 32 columns x 8 row-lanes: a warp reads 32
// consecutive columns of one row (coalesced). partial: [chunks][C].
template <typename T, typename OutT, typename InT>
__global__ void __launch_bounds__(256) dropout_bias_backward_kernel(
        const InT* dsum, OutT* out, T* partial, int N, int C, int rows_per_chunk,
        int use_dropout, unsigned seed, const double* step, unsigned site, unsigned micro,
        unsigned threshold, T scale) {
    __shared__ T acc_s[CLLM_COLSUM_ROWLANES][33];
    const CllmColTile t(N, rows_per_chunk);
    const CllmDropout d = use_dropout
                              ? cllm_dropout_stream(seed, step, site, micro, threshold)
                              : CllmDropout{};
    T acc = T(0);
    if (t.c < C) {
        for (long long r = t.r0 + t.ty; r < t.r1; r += CLLM_COLSUM_ROWLANES) {
            const long long e = r * C + t.c;
            T v = cllm_load(dsum + e);
            if (use_dropout)
                v = d.draw4((unsigned long long)e >> 2).v[e & 3] >= d.threshold ? v * scale : T(0);
            cllm_store(out + e, v);
            acc += v;
        }
    }
    cllm_colsum_partial(acc_s, acc, t, C, partial);
}
