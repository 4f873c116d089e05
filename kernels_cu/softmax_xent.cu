// Fused softmax + cross-entropy, one block per row of logits (N, V), in float, double or bf16
// storage (bf16: one pass reads the GEMM's bf16 logits and writes bf16 dlogits in place, no
// float copy and no cast pass).
//
// pass 1: each thread keeps an online (max, sum of exp) over its strided elements, loading
//         VEC elements at a time when the launcher found rows aligned; the per-thread pairs
//         are merged by a fixed butterfly, then across warps in warp order (every thread ends
//         with the same bitwise max and sum).
// loss:   log(sum) + (max - logits[target]); 0 for target == -1 (ignored), NaN for a target
//         outside [0, n_vocab) so that bad data shows up instead of reading out of bounds.
// padding: columns [n_vocab, V) of a vocabulary padded for the kernels are not read in pass 1
//         and get dlogits = 0 in pass 2 (never scored, no gradient).
// pass 2: dlogits = (exp(x - max) / sum - onehot(target)) * dloss, written over the same
//         indices the thread read (dlogits may be the logits buffer: in place). Ignored rows
//         get exact zeros and are not read at all. dloss is read through a pointer (a double
//         in the trainer's per-step buffer), so a CUDA graph replays with each step's value.
#include "common.cuh"

#define XENT_THREADS 512

template <typename T>
__device__ __forceinline__ void online_add(T& m, T& s, T x) {
    if (x > m) {
        s = s * cllm_exp(m - x) + T(1);  // m == -inf: exp(-inf) = 0
        m = x;
    } else if (x == x && x != -cllm_inf<T>()) {  // NaN goes to the branch below
        s += cllm_exp(x - m);
    } else if (x != x) {
        s = x;  // propagate NaN
    }
}

template <typename T>
__device__ __forceinline__ void online_merge(T& m, T& s, T m2, T s2) {
    const T mx = cllm_max(m, m2);
    if (mx == -cllm_inf<T>()) {  // both empty
        s = s + s2;              // 0, or NaN if either is NaN
        return;
    }
    // A side that saw no finite element has m == -inf and s == 0 or NaN (a NaN logit):
    // exp(-inf - mx) = 0 and 0 * NaN = NaN, so a NaN is kept (forcing that side to 0 would
    // drop it and give a finite loss for a row with a NaN logit; the reference gives NaN).
    // a + b == b + a bitwise, so both lanes of a butterfly pair still agree.
    const T a = s * cllm_exp(m - mx);
    const T b = s2 * cllm_exp(m2 - mx);
    m = mx;
    s = a + b;
}

// T: the compute type (float, double); S: the logits' storage (T, or cllm_bf16 with T = float:
// bf16 logits from a bf16-output GEMM, dlogits written back in bf16 for the bf16 GEMMs that
// read them; losses, max and sum stay T).
template <typename T, typename S, int VEC>
__global__ void __launch_bounds__(XENT_THREADS) softmax_xent_kernel(
        const S* logits, const int* targets, T* losses, S* dlogits,
        int V, int n_vocab, const double* dloss_ptr, int need_grad) {
    __shared__ T sm[32];
    __shared__ T ss[32];
    const long long row = blockIdx.x;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int nwarps = blockDim.x >> 5;
    const int tgt = targets[row];
    const S* x = logits + row * (long long)V;
    S* g = dlogits + row * (long long)V;  // only dereferenced when need_grad

    if (tgt < 0) {  // ignored row: zero loss, zero gradient (block-uniform branch)
        if (tid == 0) losses[row] = T(0);
        if (need_grad) {
            for (int i = tid; i < V; i += blockDim.x) g[i] = cllm_stored<S, T>(T(0));
        }
        return;
    }
    const bool tgt_ok = tgt < n_vocab;
    const T x_t = tgt_ok ? cllm_value(x[tgt]) : cllm_nan<T>();  // read before anything is written

    T m = -cllm_inf<T>(), s = T(0);
    const int nvec = V / VEC;  // VEC > 1 only when V % VEC == 0 and rows are aligned
    const int nvec_vocab = (n_vocab + VEC - 1) / VEC;  // packs holding a vocabulary column
    for (int k = tid; k < nvec_vocab; k += blockDim.x) {
        const CllmPack<S, VEC> p = load_pack<S, VEC>(x + (long long)k * VEC);
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
            if (k * VEC + u < n_vocab) online_add(m, s, (T)cllm_value(p.v[u]));
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const T m2 = __shfl_xor_sync(CLLM_FULL_MASK, m, o);
        const T s2 = __shfl_xor_sync(CLLM_FULL_MASK, s, o);
        online_merge(m, s, m2, s2);
    }
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = (lane < nwarps) ? sm[lane] : -cllm_inf<T>();
    s = (lane < nwarps) ? ss[lane] : T(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const T m2 = __shfl_xor_sync(CLLM_FULL_MASK, m, o);
        const T s2 = __shfl_xor_sync(CLLM_FULL_MASK, s, o);
        online_merge(m, s, m2, s2);
    }
    // every thread now holds the row's max m and sum s (identical bits in every warp)
    // max - x_target first: exact where the two are close, while log(s) + max would drop
    // log(s) into the rounding of a large max (logits of 1e6: 2e-2 off; all equal at 1e30: 0)
    if (tid == 0) losses[row] = cllm_log(s) + (m - x_t);
    if (!need_grad) return;
    __syncthreads();  // all reads of x (incl. x_t) are done before the first write to g
    const T inv_s = T(1) / s;
    const T dloss = (T)dloss_ptr[0];
    const T nan = cllm_nan<T>();
    for (int k = tid; k < nvec; k += blockDim.x) {
        CllmPack<S, VEC> p = load_pack<S, VEC>(x + (long long)k * VEC);
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
            const int i = k * VEC + u;
            const T pr = cllm_exp((T)cllm_value(p.v[u]) - m) * inv_s;
            const T d = i >= n_vocab ? T(0) : tgt_ok ? (pr - (i == tgt ? T(1) : T(0))) * dloss : nan;
            p.v[u] = cllm_stored<S, T>(d);
        }
        store_pack<S, VEC>(g + (long long)k * VEC, p);
    }
}
