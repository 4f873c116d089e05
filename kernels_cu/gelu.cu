// GELU, tanh approximation (GPT-2), elementwise over a flat array.
//   y  = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// out may alias x and dx may alias dout (each element is read, then written, by one thread).
//
// The forward takes the linear layer's bias too (has_bias != 0: x is (n / cols, cols), bias
// (cols,)): x += bias is written back (the backward needs the pre-activation) in the same pass
// that computes the GELU, instead of a separate bias pass over the 4C-wide MLP activation. Its
// output is stored as OutT: T, or cllm_bf16 when it only feeds a bf16 matrix product.
#include "common.cuh"

template <typename T, typename OutT>
__global__ void __launch_bounds__(256)
gelu_forward_kernel(T* x, const T* bias, OutT* out, long long n, int cols, int has_bias) {
    const T s = T(0.7978845608028654);  // sqrt(2 / pi)
    const T c = T(0.044715);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        T xi = x[i];
        if (has_bias) {
            xi += bias[i % cols];
            x[i] = xi;
        }
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
    return T(0.5) * (T(1) + t) + T(0.5) * xi * (T(1) - t * t) * s * (T(1) + T(3) * c * x2);
}

template <typename T>
__global__ void __launch_bounds__(256)
gelu_backward_kernel(const T* dout, const T* x, T* dx, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dx[i] = dout[i] * gelu_grad(x[i]);
}

// The backward fused with the bias gradient of the linear layer before the GELU (c_fc) and
// with the bf16 copy its GEMMs read: dx = dout * gelu'(x) stored as OutT, and the column sums
// of dx (in T, before any rounding) as per-row-chunk partials for cllm_colsum_finalize_kernel.
// grid (ceil(C / 32), chunks), block 256 = 32 columns x 8 row-lanes; partial [chunks][C].
// Replaces the separate cast (read 4C fp32, write bf16) and bias-sum (read 4C fp32) passes.
template <typename T, typename OutT>
__global__ void __launch_bounds__(256) gelu_bias_backward_kernel(
        const T* dout, const T* x, OutT* dx, T* partial, int N, int C, int rows_per_chunk) {
    __shared__ T acc_s[CLLM_COLSUM_ROWLANES][33];
    const CllmColTile t(N, rows_per_chunk);
    T acc = T(0);
    if (t.c < C) {
        for (long long r = t.r0 + t.ty; r < t.r1; r += CLLM_COLSUM_ROWLANES) {
            const long long e = r * C + t.c;
            const T g = dout[e] * gelu_grad(x[e]);
            cllm_store(dx + e, g);
            acc += g;
        }
    }
    cllm_colsum_partial(acc_s, acc, t, C, partial);
}
