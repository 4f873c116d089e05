// AdamW over whole flat arenas in one launch (grid-stride loop).
//
//   g = grad * scale;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr * wd * mask * p;  p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)
//
// The values that change every step come from device memory, hyper[0..4] = lr, lr * wd,
// bc1 = 1 - b1^step, bc2 = 1 - b2^step and the gradient scale (the grad-norm clip factor,
// computed on the device): a launch captured in a CUDA graph replays with its by-value
// arguments frozen, so the trainer writes these before each step instead. hyper holds doubles
// whatever T is, rounded to T here. If the scale is not finite (inf/NaN loss or gradients
// upstream), every thread returns before touching memory: the step is skipped and params, m,
// v (and params_bf16) stay bit-for-bit unchanged.
//
// BF16_COPY (float only): also write the bf16 rounding of each updated parameter into
// params_bf16 (the weights the bf16 GEMMs read; bitwise what cast.cu's float_to_bf16_kernel
// writes, through the same cllm_store), from the register that holds it: no separate cast pass
// re-reading the fp32 arena after the step. Without it params_bf16 is not read or written.
//
// Napkin math: 4 arrays read (p, g, m, v) + mask, 3 written: 32 bytes per fp32 parameter
// (34 with the bf16 copy); GPT-2 124M: ~4 GB per step, ~1.3 ms at 3 TB/s. Memory-bound.
#include "common.cuh"

template <typename T, bool BF16_COPY = false>
__global__ void __launch_bounds__(256) adamw_kernel(
        T* params, const T* grads, T* m, T* v, const T* mask, long long n,
        T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T eps, const double* hyper,
        cllm_bf16* params_bf16) {
    static_assert(!BF16_COPY || sizeof(T) == 4, "the bf16 copy rounds float32 parameters");
    const T scale = (T)hyper[4];
    if (!cllm_isfinite(scale)) return;
    const T lr = (T)hyper[0];
    const T lr_wd = (T)hyper[1];
    const T bc1 = (T)hyper[2];
    const T bc2 = (T)hyper[3];
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T g = grads[i] * scale;
        const T mi = beta1 * m[i] + one_minus_beta1 * g;
        const T vi = beta2 * v[i] + one_minus_beta2 * (g * g);
        T p = params[i];
        p -= lr_wd * mask[i] * p;
        p -= lr * (mi / bc1) / (cllm_sqrt(vi / bc2) + eps);
        m[i] = mi;
        v[i] = vi;
        params[i] = p;
        if constexpr (BF16_COPY) cllm_store(params_bf16 + i, p);
    }
}
