// float32 <-> bfloat16 over a flat array (grid-stride). The bf16 path keeps fp32 master values
// and hands bf16 copies to the tensor-core GEMMs: weights after each optimizer step,
// gradients flowing into a linear layer's backward; and a GEMM's fp32 result plus its bias,
// rounded once, to a bf16 reader (qkv). Round to nearest even, as cuBLAS and
// PyTorch do; NaN stays NaN and overflow goes to inf.
#include "common.cuh"

// out = bf16(x + bias[column]) with bias (n_bias,) broadcast over the rows of x (n_bias: x's
// row length), or bf16(x) with n_bias == 0 (bias unread: x + 0 would turn -0 into +0). The
// bias variant is a GEMM's epilogue for a bf16 reader (the c_attn output qkv: the fp32 product
// plus bias rounded once, as the attention kernels would round it). The column advances with
// the grid stride (a 64-bit modulo per element would cost more than the memory access).
__global__ void __launch_bounds__(256)
float_to_bf16_kernel(const float* x, cllm_bf16* out, long long n, const float* bias,
                     long long n_bias) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (n_bias == 0) {
        for (long long i = i0; i < n; i += stride) cllm_store(out + i, x[i]);
        return;
    }
    const long long step = stride % n_bias;
    long long col = i0 % n_bias;
    for (long long i = i0; i < n; i += stride) {
        cllm_store(out + i, x[i] + bias[col]);
        col += step;
        if (col >= n_bias) col -= n_bias;
    }
}

__global__ void __launch_bounds__(256)
bf16_to_float_kernel(const cllm_bf16* x, float* out, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = cllm_load(x + i);
}
