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
__global__ void __launch_bounds__(256)
gelu_backward_kernel(const T* dout, const T* x, T* dx, long long n) {
    const T s = T(0.7978845608028654);
    const T c = T(0.044715);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T xi = x[i];
        const T x2 = xi * xi;
        const T t = cllm_tanh(s * (xi + c * x2 * xi));
        const T d = T(0.5) * (T(1) + t) +
                    T(0.5) * xi * (T(1) - t * t) * s * (T(1) + T(3) * c * x2);
        dx[i] = dout[i] * d;
    }
}
