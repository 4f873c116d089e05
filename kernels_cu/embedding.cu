// Token + position embedding.
//
// forward: grid-stride over the B*T*C outputs, out[n, c] = wte[idx[n], c] + wpe[n % T, c]
//          (without the wpe term when with_wpe is 0: a model without position embeddings);
//          an id outside [0, V) writes NaN (never reads out of bounds).
// backward, deterministic, no atomics:
//   dwpe: one thread per (t, c) sums dout[b, t, c] over b in order, adds into dwpe[t, c].
//   dwte: grid (channel chunks, P vocab partitions). Each warp scans all N positions in order,
//         32 at a time: a ballot finds the positions whose id falls in this block's partition
//         (id % P == blockIdx.y), and for each, in position order, every thread adds
//         dout[n, c] into dwte[id, c] for its own channel c. A (row, channel) element is only
//         ever touched by one thread, in increasing n: the sum order is fixed.
#include "common.cuh"

template <typename T>
__global__ void __launch_bounds__(256) embedding_forward_kernel(
        const int* idx, const T* wte, const T* wpe, T* out, long long N, int T_, int C, int V,
        int with_wpe) {
    const long long total = N * C;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const long long n = e / C;
        const int c = (int)(e - n * C);
        const int t = (int)(n % T_);
        const int id = idx[n];
        T v = cllm_nan<T>();
        if (id >= 0 && id < V) {
            v = wte[(long long)id * C + c];
            if (with_wpe) v += wpe[(long long)t * C + c];  // the same branch in every thread
        }
        out[e] = v;
    }
}

template <typename T>
__global__ void __launch_bounds__(256) embedding_backward_wpe_kernel(
        const T* dout, T* dwpe, int B, int T_, int C) {
    const long long total = (long long)T_ * C;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        T acc = T(0);
        for (int b = 0; b < B; ++b) acc += dout[(long long)b * total + e];
        dwpe[e] += acc;
    }
}

// block: EMB_WTE_THREADS channels (a multiple of 32); grid (ceil(C / EMB_WTE_THREADS), P).
template <typename T>
__global__ void __launch_bounds__(128) embedding_backward_wte_kernel(
        const T* dout, const int* idx, T* dwte, int N, int C, int V, int P) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int part = blockIdx.y;
    const int lane = threadIdx.x & 31;
    const bool c_ok = c < C;
    for (int base = 0; base < N; base += 32) {  // warp-uniform loop
        const int n = base + lane;
        const int id = (n < N) ? idx[n] : -1;
        const bool mine = id >= 0 && id < V && (id % P) == part;
        unsigned mask = __ballot_sync(CLLM_FULL_MASK, mine);
        while (mask) {  // same mask in every lane: warp-uniform
            const int j = __ffs(mask) - 1;
            mask &= mask - 1;
            const int row = __shfl_sync(CLLM_FULL_MASK, id, j);
            if (c_ok) dwte[(long long)row * C + c] += dout[(long long)(base + j) * C + c];
        }
    }
}
