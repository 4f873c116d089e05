// Causal multi-head attention, FlashAttention-2 style, fp32, CUDA cores.
//
// Layout: qkv (B, T, 3C) with q | k | v each C = H * D wide, read in place; out (B, T, C);
// lse (B, H, T) = log sum_j exp(q_i . k_j * scale). Nothing T x T ever touches device memory.
//
// Thread mapping (all three kernels): 128 threads = 32 rows x 4 threads per row. The 4 threads
// of a row are consecutive lanes; thread `tr` of a row owns the D/4 feature columns
// d = tr + 4 * k (k < D/4) of that row in registers, so a dot product over D is a D/4-long
// partial in each of the 4 lanes plus two xor shuffles (every lane of the quad gets the same
// bits). The other operand streams through shared memory in tiles of BC rows (BC * D = 4096
// floats per tile, 16 KiB; two tiles per kernel = 32 KiB static shared memory).
//
// forward (grid: query tiles of 32 rows, B * H): per key tile, per sub-chunk of 16 keys:
//   scores, running max m, rescale of the running sum l and the output accumulator, P V.
//   Key tiles above the diagonal are never loaded; masked scores are -inf.
// backward, two kernels, no float atomics (deterministic):
//   dq kernel (grid: query tiles, B * H): Delta_i = dO_i . O_i (stored for the dkv kernel),
//     then over key tiles up to the diagonal: P_ij = exp(s_ij - lse_i),
//     dS_ij = P_ij (dO_i . v_j - Delta_i), dq_i += dS_ij k_j; dq_i *= scale.
//   dkv kernel (grid: key tiles of 32 rows, B * H), after the dq kernel: over query tiles
//     from the key tile's first row to T: dv_j += P_ij dO_i, dk_j += dS_ij q_i scale.
// The scores are recomputed with the same operation order as the forward (q pre-scaled,
// same partial-sum order), so P <= 1 up to rounding.
#include "common.cuh"

#define ATT_THREADS 128
#define ATT_TPR 4
#define ATT_ROWS (ATT_THREADS / ATT_TPR)  // 32 rows (queries or keys) per block
#define ATT_SUB 16                        // keys per online-softmax step in the forward

template <int D>
struct AttnCfg {
    static_assert(D % ATT_TPR == 0, "head dim must be a multiple of 4");
    static constexpr int DK = D / ATT_TPR;  // registers per operand row per thread
    static constexpr int BC_RAW = 4096 / D;
    // rows per shared tile: a multiple of ATT_SUB in [16, 128]
    static constexpr int BC = BC_RAW >= 128 ? 128 : (BC_RAW < 16 ? 16 : (BC_RAW / 16) * 16);
};

// Load rows [r0, r0 + BC) x D of a (.., row_stride) matrix into smem (zeros past T),
// multiplied by `mul`.
template <int D, int BC>
__device__ __forceinline__ void att_load_tile(float (*dst)[D], const float* src,
                                              long long row_stride, int r0, int T,
                                              float mul) {
    for (int e = threadIdx.x; e < BC * D; e += ATT_THREADS) {
        const int rr = e / D;
        const int d = e - rr * D;
        const int r = r0 + rr;
        dst[rr][d] = (r < T) ? src[(long long)r * row_stride + d] * mul : 0.0f;
    }
}

template <int D>
__global__ void __launch_bounds__(ATT_THREADS) attention_forward_kernel(
        const float* qkv, float* out, float* lse, int T, int H, float scale) {
    using Cfg = AttnCfg<D>;
    constexpr int DK = Cfg::DK;
    constexpr int BC = Cfg::BC;
    __shared__ float Ks[BC][D];
    __shared__ float Vs[BC][D];

    const int tr = threadIdx.x & (ATT_TPR - 1);
    const int bh = blockIdx.y;
    const int b = bh / H;
    const int h = bh - b * H;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * ATT_ROWS;  // longest (last) tiles first
    const int i = q0 + (threadIdx.x >> 2);
    const bool row_ok = i < T;
    const int C = H * D;
    const long long C3 = 3LL * C;
    const float* base = qkv + (long long)b * T * C3 + (long long)h * D;

    float q[DK], o[DK];
#pragma unroll
    for (int k = 0; k < DK; ++k) {
        q[k] = row_ok ? base[(long long)i * C3 + tr + 4 * k] * scale : 0.0f;
        o[k] = 0.0f;
    }
    const float NEG_INF = -cllm_inf<float>();
    float m = NEG_INF, l = 0.0f;
    const int kv_end = min(T, q0 + ATT_ROWS);  // keys any row of this tile can see

    for (int j0 = 0; j0 < kv_end; j0 += BC) {
        __syncthreads();  // the previous tile is no longer read
        att_load_tile<D, BC>(Ks, base + C, C3, j0, T, 1.0f);
        att_load_tile<D, BC>(Vs, base + 2 * C, C3, j0, T, 1.0f);
        __syncthreads();
        const int jn = min(BC, kv_end - j0);
        for (int s0 = 0; s0 < jn; s0 += ATT_SUB) {  // block-uniform
            float sc[ATT_SUB];
            float mt = NEG_INF;
#pragma unroll
            for (int jj = 0; jj < ATT_SUB; ++jj) {
                const int jl = s0 + jj;  // < BC since BC % ATT_SUB == 0
                float part = 0.0f;
#pragma unroll
                for (int k = 0; k < DK; ++k) part += q[k] * Ks[jl][tr + 4 * k];
                part = quad_sum(part);
                const int j = j0 + jl;
                sc[jj] = (j <= i && j < T) ? part : NEG_INF;
                mt = fmaxf(mt, sc[jj]);
            }
            const float m_new = fmaxf(m, mt);
            if (m_new != NEG_INF) {  // per-row; no shuffles or syncs inside
                const float alpha = expf(m - m_new);  // 0 while m is -inf
                l *= alpha;
#pragma unroll
                for (int k = 0; k < DK; ++k) o[k] *= alpha;
#pragma unroll
                for (int jj = 0; jj < ATT_SUB; ++jj) {
                    const float p = expf(sc[jj] - m_new);
                    l += p;
#pragma unroll
                    for (int k = 0; k < DK; ++k) o[k] += p * Vs[s0 + jj][tr + 4 * k];
                }
                m = m_new;
            }
        }
    }
    if (row_ok) {
        const float inv = 1.0f / l;
        float* orow = out + ((long long)b * T + i) * C + (long long)h * D;
#pragma unroll
        for (int k = 0; k < DK; ++k) orow[tr + 4 * k] = o[k] * inv;
        if (tr == 0) lse[(long long)bh * T + i] = m + logf(l);
    }
}

template <int D>
__global__ void __launch_bounds__(ATT_THREADS) attention_backward_dq_kernel(
        const float* qkv, const float* out, const float* dout, const float* lse,
        float* delta, float* dqkv, int T, int H, float scale) {
    using Cfg = AttnCfg<D>;
    constexpr int DK = Cfg::DK;
    constexpr int BC = Cfg::BC;
    __shared__ float Ks[BC][D];
    __shared__ float Vs[BC][D];

    const int tr = threadIdx.x & (ATT_TPR - 1);
    const int bh = blockIdx.y;
    const int b = bh / H;
    const int h = bh - b * H;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * ATT_ROWS;
    const int i = q0 + (threadIdx.x >> 2);
    const bool row_ok = i < T;
    const int C = H * D;
    const long long C3 = 3LL * C;
    const float* base = qkv + (long long)b * T * C3 + (long long)h * D;
    const long long orow = ((long long)b * T + i) * C + (long long)h * D;  // (B, T, C) row

    float q[DK], g[DK], dq[DK];
    float dd = 0.0f;
#pragma unroll
    for (int k = 0; k < DK; ++k) {
        q[k] = row_ok ? base[(long long)i * C3 + tr + 4 * k] * scale : 0.0f;
        g[k] = row_ok ? dout[orow + tr + 4 * k] : 0.0f;
        const float ov = row_ok ? out[orow + tr + 4 * k] : 0.0f;
        dd += g[k] * ov;
        dq[k] = 0.0f;
    }
    const float Di = quad_sum(dd);
    if (row_ok && tr == 0) delta[(long long)bh * T + i] = Di;
    const float L = row_ok ? lse[(long long)bh * T + i] : 0.0f;
    const int kv_end = min(T, q0 + ATT_ROWS);

    for (int j0 = 0; j0 < kv_end; j0 += BC) {
        __syncthreads();
        att_load_tile<D, BC>(Ks, base + C, C3, j0, T, 1.0f);
        att_load_tile<D, BC>(Vs, base + 2 * C, C3, j0, T, 1.0f);
        __syncthreads();
        const int jn = min(BC, kv_end - j0);
#pragma unroll 2
        for (int jl = 0; jl < jn; ++jl) {  // block-uniform trip count
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int k = 0; k < DK; ++k) {
                s += q[k] * Ks[jl][tr + 4 * k];
                dp += g[k] * Vs[jl][tr + 4 * k];
            }
            s = quad_sum(s);
            dp = quad_sum(dp);
            const int j = j0 + jl;
            const float p = (row_ok && j <= i) ? expf(s - L) : 0.0f;
            const float ds = p * (dp - Di);
#pragma unroll
            for (int k = 0; k < DK; ++k) dq[k] += ds * Ks[jl][tr + 4 * k];
        }
    }
    if (row_ok) {
        float* dst = dqkv + ((long long)b * T + i) * C3 + (long long)h * D;
#pragma unroll
        for (int k = 0; k < DK; ++k) dst[tr + 4 * k] = dq[k] * scale;
    }
}

template <int D>
__global__ void __launch_bounds__(ATT_THREADS) attention_backward_dkv_kernel(
        const float* qkv, const float* dout, const float* lse, const float* delta,
        float* dqkv, int T, int H, float scale) {
    using Cfg = AttnCfg<D>;
    constexpr int DK = Cfg::DK;
    constexpr int BC = Cfg::BC;
    __shared__ float Qs[BC][D];   // q * scale
    __shared__ float Gs[BC][D];   // dO
    __shared__ float Ls[BC];      // lse
    __shared__ float Ds[BC];      // Delta

    const int tr = threadIdx.x & (ATT_TPR - 1);
    const int bh = blockIdx.y;
    const int b = bh / H;
    const int h = bh - b * H;
    const int k0 = blockIdx.x * ATT_ROWS;  // first key tiles have the most work: launch first
    const int j = k0 + (threadIdx.x >> 2);
    const bool col_ok = j < T;
    const int C = H * D;
    const long long C3 = 3LL * C;
    const float* base = qkv + (long long)b * T * C3 + (long long)h * D;
    const float* gbase = dout + (long long)b * T * C + (long long)h * D;

    float kr[DK], vr[DK], dk[DK], dv[DK];
#pragma unroll
    for (int k = 0; k < DK; ++k) {
        kr[k] = col_ok ? base[(long long)j * C3 + C + tr + 4 * k] : 0.0f;
        vr[k] = col_ok ? base[(long long)j * C3 + 2 * C + tr + 4 * k] : 0.0f;
        dk[k] = 0.0f;
        dv[k] = 0.0f;
    }

    for (int i0 = k0; i0 < T; i0 += BC) {
        __syncthreads();
        att_load_tile<D, BC>(Qs, base, C3, i0, T, scale);
        att_load_tile<D, BC>(Gs, gbase, C, i0, T, 1.0f);
        for (int r = threadIdx.x; r < BC; r += ATT_THREADS) {
            const int i = i0 + r;
            Ls[r] = (i < T) ? lse[(long long)bh * T + i] : 0.0f;
            Ds[r] = (i < T) ? delta[(long long)bh * T + i] : 0.0f;
        }
        __syncthreads();
        const int in = min(BC, T - i0);
#pragma unroll 2
        for (int ii = 0; ii < in; ++ii) {  // block-uniform trip count
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int k = 0; k < DK; ++k) {
                s += Qs[ii][tr + 4 * k] * kr[k];
                dp += Gs[ii][tr + 4 * k] * vr[k];
            }
            s = quad_sum(s);
            dp = quad_sum(dp);
            const int i = i0 + ii;  // < T
            const float p = (col_ok && j <= i) ? expf(s - Ls[ii]) : 0.0f;
            const float ds = p * (dp - Ds[ii]);
#pragma unroll
            for (int k = 0; k < DK; ++k) {
                dv[k] += p * Gs[ii][tr + 4 * k];
                dk[k] += ds * Qs[ii][tr + 4 * k];
            }
        }
    }
    if (col_ok) {
        float* dst = dqkv + ((long long)b * T + j) * C3 + (long long)h * D;
#pragma unroll
        for (int k = 0; k < DK; ++k) {
            dst[C + tr + 4 * k] = dk[k];
            dst[2 * C + tr + 4 * k] = dv[k];
        }
    }
}
