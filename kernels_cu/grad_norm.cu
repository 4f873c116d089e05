// Global L2 norm of a flat gradient arena, deterministic, without a host round trip, and the
// first non-finite element found in the same pass.
//
// sumsq_partial_kernel:  G blocks (G depends only on n), grid-stride sum of squares in double
//                        and the smallest index of a non-finite element (or CLLM_NO_INDEX);
//                        fixed-order block reductions -> partials[G], bad[G].
// sumsq_finalize_kernel: one block combines the G partials in a fixed order ->
//                        out[0] = sqrt(sum) (the sum itself when `squared`), out[1] = first non-finite index or -1 (as doubles:
//                        slots of the trainer's per-step buffer).
// clip_factor_kernel:    out[0] = min(1, max_norm / (norm + eps)) (1 when max_norm <= 0), NaN
//                        if the norm or the loss is not finite (AdamW then skips the step).
//
// Napkin math: one read of the arena (GPT-2 124M fp32: 0.5 GB, ~0.2 ms at 3 TB/s).
#include "common.cuh"

#define CLLM_NO_INDEX 0x7fffffffffffffffLL

template <typename T>
__global__ void __launch_bounds__(256) sumsq_partial_kernel(const T* x, long long n,
                                                            double* partials, long long* bad) {
    __shared__ double scratch[32];
    __shared__ long long scratch_bad[32];
    double acc = 0.0;
    long long first_bad = CLLM_NO_INDEX;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double xi = (double)x[i];
        acc += xi * xi;
        if (!isfinite(xi) && i < first_bad) first_bad = i;
    }
    acc = block_sum(acc, scratch);
    first_bad = block_min(first_bad, scratch_bad, CLLM_NO_INDEX);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = acc;
        bad[blockIdx.x] = first_bad;
    }
}

__global__ void __launch_bounds__(1024) sumsq_finalize_kernel(const double* partials,
                                                              const long long* bad, int G,
                                                              int squared, double* out) {
    __shared__ double scratch[32];
    __shared__ long long scratch_bad[32];
    double acc = 0.0;
    long long first_bad = CLLM_NO_INDEX;
    for (int i = threadIdx.x; i < G; i += blockDim.x) {
        acc += partials[i];
        first_bad = min(first_bad, bad[i]);
    }
    acc = block_sum(acc, scratch);
    first_bad = block_min(first_bad, scratch_bad, CLLM_NO_INDEX);
    if (threadIdx.x == 0) {
        out[0] = squared ? acc : sqrt(acc);
        out[1] = first_bad == CLLM_NO_INDEX ? -1.0 : (double)first_bad;
    }
}

__global__ void __launch_bounds__(32)
clip_factor_kernel(const double* norm, const double* loss, double max_norm, double eps,
                   double* out) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const double nrm = norm[0];
    double f = cllm_nan<double>();
    if (isfinite(nrm) && isfinite(loss[0])) {
        f = 1.0;
        if (max_norm > 0.0) {
            f = max_norm / (nrm + eps);
            if (!(f < 1.0)) f = 1.0;
        }
    }
    out[0] = f;
}
