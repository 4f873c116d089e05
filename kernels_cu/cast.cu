// float32 <-> bfloat16 over a flat array (grid-stride): bf16 copies of float32 arrays (the
// weights after a ZeRO step's all-gather, operands handed to a bf16 GEMM) and back. Round to
// nearest even, as cuBLAS and PyTorch do; NaN stays NaN and overflow goes to inf.
#include "common.cuh"

__global__ void __launch_bounds__(256)
float_to_bf16_kernel(const float* x, cllm_bf16* out, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        cllm_store(out + i, x[i]);
}

__global__ void __launch_bounds__(256)
bf16_to_float_kernel(const cllm_bf16* x, float* out, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = cllm_load(x + i);
}
