// AdamW over whole flat arenas in one launch (grid-stride loop).
//
//   g = grad * scale;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr * wd * mask * p;  p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)
//
// The gradient scale (the grad-norm clip factor) comes either by value or through a device
// pointer (use_ptr != 0), so a clip factor computed on the device needs no host sync. If the
// scale is not finite (inf/NaN gradients upstream), every thread returns before touching
// memory: the step is skipped and params, m and v stay bit-for-bit unchanged.
//
// The values that change every step (lr, lr * wd, bc1 = 1 - b1^step, bc2 = 1 - b2^step) also
// come either by value or, with use_hyper != 0, from hyper[0..3] in device memory: a launch
// captured in a CUDA graph replays with its by-value arguments frozen, so the trainer's graph
// writes them there before each replay. hyper holds doubles whatever T is, rounded to T here
// exactly as the host rounds the by-value arguments: the two paths agree bitwise.
#include "common.cuh"

template <typename T>
__global__ void __launch_bounds__(256) adamw_kernel(
        T* params, const T* grads, T* m, T* v, const T* mask, long long n,
        T lr, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T eps, T lr_wd,
        T bc1, T bc2, const T* scale_ptr, int use_ptr, T scale_val,
        const double* hyper, int use_hyper) {
    const T scale = use_ptr ? scale_ptr[0] : scale_val;
    if (!cllm_isfinite(scale)) return;
    if (use_hyper) {
        lr = (T)hyper[0];
        lr_wd = (T)hyper[1];
        bc1 = (T)hyper[2];
        bc2 = (T)hyper[3];
    }
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
    }
}
