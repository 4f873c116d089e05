// GELU, tanh approximation (GPT-2), elementwise over a flat array.
//   y  = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// out may alias x and dx may alias dout, in place with the same storage (each element is read,
// then written, by one thread; the launchers refuse any other overlap).
//
// Storage: T is the compute type (float, double); InT the input's (x, dout: T, or cllm_bf16
// from a bf16-output GEMM); OutT the output's (T, or cllm_bf16 when it only feeds a bf16 matrix
// product). Both passes take the linear layer's bias (has_bias != 0: x is (n / cols, cols), bias
// (cols,)) and add it in T themselves: the GEMM before them writes the bare product, nothing
// is written back, and the backward recomputes the forward's pre-activation bit for bit.
#include "common.cuh"

template <typename T, typename InT, typename OutT>
__global__ void __launch_bounds__(256)
gelu_forward_kernel(const InT* x, const T* bias, OutT* out, long long n, int cols, int has_bias) {
    const T s = T(0.7978845608028654);  // sqrt(2 / pi)
    const T c = T(0.044715);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        T xi = cllm_load(x + i);
        if (has_bias)
            xi += bias[i % cols];
        const T u = s * (xi + c * xi * xi * xi);
        cllm_store(out + i, T(0.5) * xi * (T(1) + cllm_tanh(u)));
    }
}

template <typename T>
__device__ __forceinline__ T gelu_grad(T xi) {
    const T s = T(0.7978845608028654);  // sqrt(2 / pi)
    const T c = T(0.044715);
    const T x2 = xi * xi;
    const T t = cllm_tanh(s * (xi + c * x2 * xi));
    const T sech2 = T(1) - t * t;
    // sech2 is exactly 0 where tanh saturates, and so is the second term: x2 overflows from
    // |x| ~ 1.9e19 in float (0 * inf was NaN where the derivative is 1 or 0)
    return T(0.5) * (T(1) + t) +
           (sech2 == T(0) ? T(0) : T(0.5) * xi * sech2 * s * (T(1) + T(3) * c * x2));
}

template <typename T>
__global__ void __launch_bounds__(256)
gelu_backward_kernel(const T* dout, const T* x, T* dx, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dx[i] = dout[i] * gelu_grad(x[i]);
}

// The backward with the bias, bf16 storage and the bias gradient of the linear layer before the
// GELU (c_fc): dx = dout * gelu'(x [+ bias]) stored as OutT, and the column sums of dx (in T,
// before any rounding) as per-row-chunk partials for cllm_colsum_finalize_kernel.
// grid (ceil(C / 32), chunks), block 256 = 32 columns x 8 row-lanes; partial [chunks][C].
// Replaces the separate cast (read 4C fp32, write bf16) and bias-sum (read 4C fp32) passes.
template <typename T, typename InT, typename OutT>
__global__ void __launch_bounds__(256) gelu_bias_backward_kernel(
        const InT* dout, const InT* x, const T* bias, OutT* dx, T* partial, int N, int C,
        int rows_per_chunk, int has_bias) {
    __shared__ T acc_s[CLLM_COLSUM_ROWLANES][33];
    const CllmColTile t(N, rows_per_chunk);
    T acc = T(0);
    if (t.c < C) {
        const T b = has_bias ? bias[t.c] : T(0);
        for (long long r = t.r0 + t.ty; r < t.r1; r += CLLM_COLSUM_ROWLANES) {
            const long long e = r * C + t.c;
            const T g = T(cllm_load(dout + e)) * gelu_grad(T(cllm_load(x + e)) + b);
            cllm_store(dx + e, g);
            acc += g;
        }
    }
    cllm_colsum_partial(acc_s, acc, t, C, partial);
}
