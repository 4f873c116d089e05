// GELU, tanh approximation (GPT-2), elementwise over a flat array.
//   y  = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// out may alias x and dx may alias dout (each element is read, then written, by one thread).
#include "common.cuh"

template <typename T>
__global__ void gelu_forward_kernel(const T* x, T* out, long long n) {
    const T s = T(0.7978845608028654);  // sqrt(2 / pi)
    const T c = T(0.044715);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T xi = x[i];
        const T u = s * (xi + c * xi * xi * xi);
        out[i] = T(0.5) * xi * (T(1) + cllm_tanh(u));
    }
}

template <typename T>
__global__ void gelu_backward_kernel(const T* dout, const T* x, T* dx, long long n) {
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
