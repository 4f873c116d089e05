// Global L2 norm of a flat gradient arena, deterministic, without a host round trip.
//
// sumsq_partial_kernel:  G blocks (G depends only on n), grid-stride sum of squares in double,
//                        fixed-order block reduction -> partials[G].
// sumsq_finalize_kernel: one block sums the G partials in a fixed order -> out[0] = sqrt(sum)
//                        (in the arena's dtype, a 0-d device array on the Python side).
// clip_factor_kernel:    out[0] = min(1, max_norm / (norm + eps)) (the trainer's clip rule), NaN
//                        if the norm is not finite (AdamW then skips the step).
#include "common.cuh"

template <typename T>
__global__ void __launch_bounds__(256) sumsq_partial_kernel(const T* x, long long n,
                                                            double* partials) {
    __shared__ double scratch[32];
    double acc = 0.0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double xi = (double)x[i];
        acc += xi * xi;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <typename T>
__global__ void __launch_bounds__(1024) sumsq_finalize_kernel(const double* partials, int G,
                                                              T* out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < G; i += blockDim.x) acc += partials[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = (T)sqrt(acc);
}

template <typename T>
__global__ void __launch_bounds__(32) clip_factor_kernel(const T* norm, T max_norm, T eps, T* out) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const T nrm = norm[0];
    T f = cllm_nan<T>();
    if (cllm_isfinite(nrm)) {
        f = max_norm / (nrm + eps);
        if (!(f < T(1))) f = T(1);
    }
    out[0] = f;
}
