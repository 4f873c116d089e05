// Causal multi-head attention, FlashAttention-2 style, fp32, CUDA cores (a bf16 tensor-core
// variant of the same three passes follows the fp32 kernels, below).
//
// Layout: qkv (B, T, 3C) with q | k | v each C = H * D wide, read in place; out (B, T, C);
// lse (B, H, T) = log sum_j exp(s_ij). Nothing T x T ever touches device memory.
// Scores: s_ij = q_i . k_j * scale (+ m_h * (j - i) with a distance bias), keys j <= i only.
// Every kernel is instantiated twice: <D> (BIAS = false, no bias: not one instruction more) and
// <D, true> (ALiBi / lattice: per-head slopes m_h, H floats in `slopes`; the bias is computed
// per score from the slope and the distance, never stored). See AttnBias below.
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
//
// Dropout on the probabilities (run-time arguments of every kernel, see AttnDropout): the
// forward accumulates keep_ij P_ij v_j (l sums the undropped P) and scales the output row by
// 1 / (1 - p); the backward redraws the same bits: dV_j = sum_i keep_ij P_ij dO_i / (1 - p),
// dS_ij = P_ij (keep_ij dP_ij / (1 - p) - Delta_i). The keep bits of up to 32 scores are
// drawn into one register word ahead of the products that use them (attn_keep_bits); in the
// fp32 kernels the 4 lanes of a row (or key) share its scores, so each lane draws every
// fourth one and the quad exchanges the bits (attn_quad_keep_bits): one Philox call per score
// per pass.
#include "common.cuh"

#define ATT_THREADS 128
#define ATT_TPR 4
#define ATT_ROWS (ATT_THREADS / ATT_TPR)  // 32 rows (queries or keys) per block
#define ATT_SUB 16                        // keys per online-softmax step in the forward

// The (batch, head) pair a block works on: grid y = b * H + h.
struct AttnHead { int bh, b, h; };
__device__ __forceinline__ AttnHead attn_head(int H) {
    const int bh = blockIdx.y;
    return {bh, bh / H, bh - (bh / H) * H};
}

// The per-score epilogue shared by every kernel: mask, then score = scaled product + bias.
// The bias m_h * (j - i) is one FMA on the exact float distance (|j - i| < 2^24), the same
// expression in the forward and both backward kernels, so they compute bitwise the same
// scores; each kernel derives the distance from a per-tile integer base by exact float adds
// (no int-to-float conversion per score). Without BIAS the slope is never loaded and the
// distance is dead code: the compiler emits the plain kernel. The dropout's keep bit
// (AttnDropout) is applied beside it, where each kernel has P.
template <bool BIAS>
struct AttnBias {
    float slope;
    __device__ __forceinline__ AttnBias(const float* slopes, int h)
        : slope(BIAS ? slopes[h] : 0.0f) {}
    // s: the scaled product q_i . k_j * scale; dist: (float)(j - i), <= 0 where unmasked
    __device__ __forceinline__ float score(float s, float dist) const {
        if constexpr (BIAS) return fmaf(slope, dist, s);
        return s;
    }
};

// The dropout of the attention probabilities (ops/attention.py): score (i, j) of head bh is
// element (bh T + i) T + j of the stream CllmDropout (common.cuh) describes; threshold 0: off
// (every kernel tests `on()`, block-uniform, before drawing, so a launch without dropout draws
// nothing and its results are those of the kernel before dropout: scale is then 1). scale =
// 1 / (1 - p) multiplies fp32 values only (the output rows, dP, dV); P is masked before any
// bf16 rounding, so masking commutes with it. Fields: the kernel's arguments as they are
// (the step is read where the bits are drawn, so nothing extra stays live through a kernel).
struct AttnDropout {
    unsigned seed, site, micro, threshold;
    const double* step;
    float scale;
    int bh, T;
    __device__ __forceinline__ bool on() const { return threshold != 0u; }
};

#define ATTN_MMA_LAYOUT 1  // attn_keep_bits: scores in a thread's mma accumulator fragments
#define ATTN_KEY_FIXED 2   // attn_keep_bits: the fixed index is the key (dkv), else the query

// Bit w (w = first, first + stride, ... < n <= 32) = the keep bit of this thread's score w;
// scores above the diagonal or past T draw nothing (bit 0); without dropout, all bits are 1.
// Score w has a fixed index (the query, or the key with ATTN_KEY_FIXED) and a moving one:
// fixed0 and moving0 + w, or in the mma fragment layout (4 scores per 8-column tile, rows g
// and g + 8) fixed0 / fixed1 for w & 2 == 0 / 2 and moving0 + (w >> 2) * 8 + (w & 1)
// (moving0 including the lane's 2 t).
// One Philox4x32-10 call per score; a GPU measurement is still owed of whether sharing a
// call's 4 words among 4 consecutive keys pays (docs/performance.md). Not inlined and called
// ahead of a tile's products: the kernels' register allocation (their accumulators at its
// peak) does not grow by Philox's working set (inlined into the per-score loops, 7
// instantiations spilled registers in sm_90 ptxas), and the 90 instantiations share its code.
// The fp32 kernels call it whether or not the dropout is on and use the bits unconditionally
// (a shift and a select per score): a branch on `on()` there let NVVM clone their loops for
// each case, which grew their PTX by 40-70 %. The mma kernels branch (their register
// allocation with dropout off then stays as before: D = 64 forward and dq unchanged).
__device__ __noinline__ unsigned attn_keep_bits(AttnDropout d, int first, int stride, int n,
                                                int layout, int fixed0, int fixed1,
                                                int moving0) {
    if (!d.on()) return ~0u;  // block-uniform: every score kept, nothing drawn
    const CllmDropout stream = cllm_dropout_stream(d.seed, d.step, d.site, d.micro, d.threshold);
    const unsigned long long row0 = (unsigned long long)d.bh * (unsigned)d.T;
    const bool mma = layout & ATTN_MMA_LAYOUT;
    unsigned b = 0u;
    for (int w = first; w < n; w += stride) {
        const int fixed = mma && (w & 2) ? fixed1 : fixed0;
        const int moving = moving0 + (mma ? (w >> 2) * 8 + (w & 1) : w);
        const int i = layout & ATTN_KEY_FIXED ? moving : fixed;
        const int j = layout & ATTN_KEY_FIXED ? fixed : moving;
        if (i >= d.T || j > i) continue;
        const unsigned long long e = (row0 + (unsigned)i) * (unsigned)d.T + (unsigned)j;
        if (stream.draw4(e >> 2).v[e & 3] >= d.threshold) b |= 1u << w;
    }
    return b;
}

// The fp32 kernels: the 4 lanes tr of a quad share a row (or key) and its scores, so lane tr
// draws scores tr, tr + 4, ... of the n <= 32 at moving0, moving0 + 1, ... and the quad ORs the
// words. Call from every lane (block-uniform).
__device__ __forceinline__ unsigned attn_quad_keep_bits(const AttnDropout& d, int tr, int n,
                                                        int layout, int fixed, int moving0) {
    const unsigned b = attn_keep_bits(d, tr, ATT_TPR, n, layout, fixed, fixed, moving0);
    const unsigned b2 = b | __shfl_xor_sync(CLLM_FULL_MASK, b, 1);
    return b2 | __shfl_xor_sync(CLLM_FULL_MASK, b2, 2);
}

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

template <int D, bool BIAS = false>
__global__ void __launch_bounds__(ATT_THREADS) attention_forward_kernel(
        const float* qkv, float* out, float* lse, int T, int H, float scale,
        const float* slopes, unsigned drop_seed, const double* drop_step, unsigned drop_site,
        unsigned drop_micro, unsigned drop_threshold, float drop_scale) {
    using Cfg = AttnCfg<D>;
    constexpr int DK = Cfg::DK;
    constexpr int BC = Cfg::BC;
    __shared__ float Ks[BC][D];
    __shared__ float Vs[BC][D];

    const int tr = threadIdx.x & (ATT_TPR - 1);
    const auto [bh, b, h] = attn_head(H);
    const int q0 = (gridDim.x - 1 - blockIdx.x) * ATT_ROWS;  // longest (last) tiles first
    const int i = q0 + (threadIdx.x >> 2);
    const bool row_ok = i < T;
    const int C = H * D;
    const long long C3 = 3LL * C;
    const float* base = qkv + (long long)b * T * C3 + (long long)h * D;
    const AttnBias<BIAS> bias(slopes, h);
    const AttnDropout drop{drop_seed, drop_site, drop_micro, drop_threshold, drop_step,
                           drop_scale, bh, T};

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
            // bit jj: key j0 + s0 + jj's P is kept (drawn before the scores are live)
            const unsigned kept = attn_quad_keep_bits(drop, tr, ATT_SUB, 0, i, j0 + s0);
            float sc[ATT_SUB];
            float mt = NEG_INF;
            const float dist0 = (float)(j0 + s0 - i);  // j - i of the sub-chunk's first key
#pragma unroll
            for (int jj = 0; jj < ATT_SUB; ++jj) {
                const int jl = s0 + jj;  // < BC since BC % ATT_SUB == 0
                float part = 0.0f;
#pragma unroll
                for (int k = 0; k < DK; ++k) part += q[k] * Ks[jl][tr + 4 * k];
                part = quad_sum(part);
                const int j = j0 + jl;
                sc[jj] = (j <= i && j < T) ? bias.score(part, dist0 + (float)jj) : NEG_INF;
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
                    const float pk = (kept >> jj) & 1u ? p : 0.0f;
#pragma unroll
                    for (int k = 0; k < DK; ++k) o[k] += pk * Vs[s0 + jj][tr + 4 * k];
                }
                m = m_new;
            }
        }
    }
    if (row_ok) {
        const float inv = drop.scale / l;  // drop.scale: 1 without dropout
        float* orow = out + ((long long)b * T + i) * C + (long long)h * D;
#pragma unroll
        for (int k = 0; k < DK; ++k) orow[tr + 4 * k] = o[k] * inv;
        if (tr == 0) lse[(long long)bh * T + i] = m + logf(l);
    }
}

template <int D, bool BIAS = false>
__global__ void __launch_bounds__(ATT_THREADS) attention_backward_dq_kernel(
        const float* qkv, const float* out, const float* dout, const float* lse,
        float* delta, float* dqkv, int T, int H, float scale,
        const float* slopes, unsigned drop_seed, const double* drop_step, unsigned drop_site,
        unsigned drop_micro, unsigned drop_threshold, float drop_scale) {
    using Cfg = AttnCfg<D>;
    constexpr int DK = Cfg::DK;
    constexpr int BC = Cfg::BC;
    __shared__ float Ks[BC][D];
    __shared__ float Vs[BC][D];

    const int tr = threadIdx.x & (ATT_TPR - 1);
    const auto [bh, b, h] = attn_head(H);
    const int q0 = (gridDim.x - 1 - blockIdx.x) * ATT_ROWS;
    const int i = q0 + (threadIdx.x >> 2);
    const bool row_ok = i < T;
    const int C = H * D;
    const long long C3 = 3LL * C;
    const float* base = qkv + (long long)b * T * C3 + (long long)h * D;
    const long long orow = ((long long)b * T + i) * C + (long long)h * D;  // (B, T, C) row
    const AttnBias<BIAS> bias(slopes, h);
    const AttnDropout drop{drop_seed, drop_site, drop_micro, drop_threshold, drop_step,
                           drop_scale, bh, T};

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
        float dist = (float)(j0 - i);  // j - i, stepped by exact float adds
        unsigned kept = 0u;            // bit jl % 32: key j0 + jl's P is kept
#pragma unroll 2
        for (int jl = 0; jl < jn; ++jl) {  // block-uniform trip count
            if ((jl & 31) == 0)  // block-uniform: the next 32 keys' bits
                kept = attn_quad_keep_bits(drop, tr, 32, 0, i, j0 + jl);
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int k = 0; k < DK; ++k) {
                s += q[k] * Ks[jl][tr + 4 * k];
                dp += g[k] * Vs[jl][tr + 4 * k];
            }
            s = quad_sum(s);
            dp = quad_sum(dp);
            const int j = j0 + jl;
            const float p = (row_ok && j <= i) ? expf(bias.score(s, dist) - L) : 0.0f;
            const float ds = p * (((kept >> (jl & 31)) & 1u ? dp * drop.scale : 0.0f) - Di);
#pragma unroll
            for (int k = 0; k < DK; ++k) dq[k] += ds * Ks[jl][tr + 4 * k];
            dist += 1.0f;
        }
    }
    if (row_ok) {
        float* dst = dqkv + ((long long)b * T + i) * C3 + (long long)h * D;
#pragma unroll
        for (int k = 0; k < DK; ++k) dst[tr + 4 * k] = dq[k] * scale;
    }
}

template <int D, bool BIAS = false>
__global__ void __launch_bounds__(ATT_THREADS) attention_backward_dkv_kernel(
        const float* qkv, const float* dout, const float* lse, const float* delta,
        float* dqkv, int T, int H, float scale,
        const float* slopes, unsigned drop_seed, const double* drop_step, unsigned drop_site,
        unsigned drop_micro, unsigned drop_threshold, float drop_scale) {
    using Cfg = AttnCfg<D>;
    constexpr int DK = Cfg::DK;
    constexpr int BC = Cfg::BC;
    __shared__ float Qs[BC][D];   // q * scale
    __shared__ float Gs[BC][D];   // dO
    __shared__ float Ls[BC];      // lse
    __shared__ float Ds[BC];      // Delta

    const int tr = threadIdx.x & (ATT_TPR - 1);
    const auto [bh, b, h] = attn_head(H);
    const int k0 = blockIdx.x * ATT_ROWS;  // first key tiles have the most work: launch first
    const int j = k0 + (threadIdx.x >> 2);
    const bool col_ok = j < T;
    const int C = H * D;
    const long long C3 = 3LL * C;
    const float* base = qkv + (long long)b * T * C3 + (long long)h * D;
    const float* gbase = dout + (long long)b * T * C + (long long)h * D;
    const AttnBias<BIAS> bias(slopes, h);
    const AttnDropout drop{drop_seed, drop_site, drop_micro, drop_threshold, drop_step,
                           drop_scale, bh, T};

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
        float dist = (float)(j - i0);  // j - i, stepped by exact float adds
        unsigned kept = 0u;            // bit ii % 32: query i0 + ii's P is kept
#pragma unroll 2
        for (int ii = 0; ii < in; ++ii) {  // block-uniform trip count
            if ((ii & 31) == 0)  // block-uniform: the next 32 queries' bits
                kept = attn_quad_keep_bits(drop, tr, 32, ATTN_KEY_FIXED, j, i0 + ii);
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int k = 0; k < DK; ++k) {
                s += Qs[ii][tr + 4 * k] * kr[k];
                dp += Gs[ii][tr + 4 * k] * vr[k];
            }
            s = quad_sum(s);
            dp = quad_sum(dp);
            const int i = i0 + ii;  // < T
            const float p = (col_ok && j <= i) ? expf(bias.score(s, dist) - Ls[ii]) : 0.0f;
            const bool kp = (kept >> (ii & 31)) & 1u;
            const float ds = p * ((kp ? dp * drop.scale : 0.0f) - Ds[ii]);
            const float pk = kp ? p : 0.0f;
#pragma unroll
            for (int k = 0; k < DK; ++k) {
                dv[k] += pk * Gs[ii][tr + 4 * k];
                dk[k] += ds * Qs[ii][tr + 4 * k];
            }
            dist -= 1.0f;
        }
    }
    if (col_ok) {
        float* dst = dqkv + ((long long)b * T + j) * C3 + (long long)h * D;
#pragma unroll
        for (int k = 0; k < DK; ++k) {
            dst[C + tr + 4 * k] = dk[k];
            dst[2 * C + tr + 4 * k] = dv[k] * drop.scale;
        }
    }
}

// ============================================================================================
// bf16 tensor-core variant (precision="bf16"): the same three passes, with every matrix product
// on `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` (bf16 operands, fp32 accumulators).
// qkv and dO are bf16 in global memory (qkv: the c_attn GEMM's fp32 result plus bias, rounded
// once by the bias+cast pass; dO: the c_proj backward GEMM's fp32 result, rounded once by
// cuBLAS: the operands a kernel rounding fp32 inputs while staging would get, at half the
// bytes), copied into shared memory and fragments as they are; so is O in the backward (the
// forward's bf16 output: the model keeps no fp32 copy). Other operands are
// rounded to bf16 (cvt.rn, nearest even) in registers. Softmax, lse, Delta and every
// accumulator are fp32; the softmax is taken in base 2 (AttnScore2: P = 2^(s log2 e - m log2 e),
// lse natural-log at the interface). Rounded operands: Q, K, V, dO and O (Delta =
// rowsum(dO * O), an fp32 sum); P before P V and P^T dO; dS (unscaled, dS = P (dP - Delta)) before
// dS K and dS^T Q; the scale is applied to the fp32 products.
// ops/attention.py's bf16 reference mirrors this (including the forward's P rounded against the
// running max of each 64-key tile), with e^x where the kernels take 2^(x log2 e): fp32 rounding
// apart, the same numbers.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"),
// lane = 4 g + t (g = groupID 0..7, t = threadID_in_group 0..3); a bf16x2 register holds the
// lower column (or k) in its low half:
//   A (16 x 16, row-major): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..],
//                           reg3 = A[g+8][2t+8..]
//   B (16 x 8, k x n):      reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C/D (16 x 8, fp32):     c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]
// so the C fragments of two adjacent 8-column tiles are, packed pairwise, the A fragment of the
// 16-column k-step they cover (P and dS go from accumulators to operands in registers).
//
// Blocks: each warp owns 16 rows (queries in forward/dq, keys in dkv); 4 warps (64 rows) per
// block, 8 (128 queries) in the forward for D <= 64 (AttnMmaCfg::FWD_WARPS). A compile-time
// setting gives the D = 64 forward's warps two 16-row m-tiles instead (4 warps x 32 rows = 128
// queries, as FlashAttention-2 splits them): every K, V fragment loaded then feeds two mma, for
// twice the accumulators per thread (AttnMmaCfg::FWD_MTILES says what that trades).
// Shared tiles are bf16 with rows padded to D + 8 elements; fragments come from them with
// ldmatrix (.x4: an A fragment, or the B fragments of two 8-column tiles; .trans where B's
// k runs down the tile's rows). A row is (D + 8) * 2 = 16 (D / 8 + 1) bytes: 16-byte aligned
// and an odd number of 16-byte units apart, so the 8 row addresses of one 8 x 8 matrix fall
// on 8 distinct 16-byte bank groups (no conflicts) for every D.
//   forward (grid: query tiles, B * H): K, V tiles of 64 keys; per tile S = Q K^T, online
//     softmax (running max per row, P rounded after 2^(s2 - m2_running)), O += P V; a warp
//     skips the tiles wholly above its rows. smem 2 x 2 * 64 * (D + 8) * 2 B (68 KiB at
//     D = 128), + 128 (D + 8) * 2 B for the block's Q rows with two m-tiles per warp (Q's
//     fragments then come from shared memory per tile, not from registers). write_mm 1: it
//     also stores O rounded to bf16 into out_mm, from the registers that hold O (the output
//     projection's operand: no cast pass over O); 2: only that (the bf16 model, whose
//     backward reads the bf16 O too: no fp32 O written or kept); 0: fp32 O only.
//   dq (grid: query tiles, B * H): Delta_i = dO_i . O_i (fp32 sum of the bf16 dO and O, stored
//     for dkv; O is the forward's bf16 output, so no fp32 copy of O is kept), then per key
//     tile (64 keys, 32 for D > 64: register budget) S, dP = dO V^T, P = 2^(s2 - lse log2 e),
//     dS = P (dP - Delta), dQ += dS K; dQ *= scale.
//   dkv (grid: key tiles, B * H), after dq: K, V of the block's 64 keys staged once; per query
//     tile (64 queries; 32 for D <= 96, 16 above: the register budget of the NQ-wide S^T and
//     dP^T accumulators) S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q; dK *= scale.
// The backward above ("two-pass", the default) computes S and dP twice: seven products. The
// "atomic-dq" backward (CLLM_ATTN_BACKWARD=atomic-dq, ops/attention.py; FlashAttention-2's)
// does five: a delta kernel (Delta as dq computes it; each row's dQ slot of dqkv zeroed), then
// attention_backward_mma_kernel (grid: key tiles, B * H): dkv's loop, the same code, and per
// query tile the bf16 dS^T (the values dK's product rounds) stored to a shared tile, a barrier,
// dQ_tile += dS K (K already staged) added to dqkv with fp32 atomicAdd. dK and dV are dkv's,
// bit for bit; dQ is summed in the order the key blocks' atomics land, so it is not bitwise
// reproducible between runs. It saves dq's S = Q K^T and dP = dO V^T (2 of 7 products, and
// the dq kernel's K, V tile traffic), and costs about (T/64)^2 / 2 tile pairs x 64 x D fp32
// atomic adds per head (GPT-2, T = 1024, D = 64: 136 pairs with the diagonal, 0.56 M adds per
// head, 107 M per B 16 x 12-head layer) and the dS tile's stores, barrier and loads. Which is
// faster is a GPU measurement (scripts/bench_kernels.py --attn-bwd-variants;
// docs/benchmarks.md).
// Tiles go from global to shared memory with cp.async (16-byte copies, no registers, rows
// >= T zero-filled), double-buffered: the copy of the next K, V tile (forward, dq) or Q, dO
// tile (dkv) is issued before the current one is used, one commit group per tile, waited for
// with wait_group 1 (the newest group, the next tile, stays in flight) and made visible to the
// block by the barrier after it; the barrier at the top of each iteration keeps a buffer from
// being refilled while the previous tile in it is still read. Two barriers per tile, as with
// synchronous staging; the shared memory doubles (dynamic: AttnMmaCfg's *_SMEM bytes).
// dqkv in bf16 (the bf16 model: c_attn's backward GEMMs read it): the <D, BIAS, cllm_bf16>
// instantiations (GradT, dqkv's storage) of the dq and dkv kernels store dQ, dK, dV so,
// each value rounded once from the fp32 value the kernel holds (cllm_pack_bf16x2: bitwise
// to_bf16 of what the float instantiation stores). The atomic-dq kernel stores dK, dV so too;
// its dQ stays an fp32 sum of atomics, in dq_acc: dqkv's Q slot (row pitch 3C) for a float
// dqkv, else a (B, T, C) scratch (pitch C) that attention_dq_to_bf16_kernel rounds into dqkv's
// Q columns after it. A template parameter, not a run-time flag: a flag's stores changed the
// float kernels' register allocation (CUDA 13: +4 to +20 registers, a new 4-byte spill at
// D = 80), the instantiations without it are the kernels as they were.
// Every output element is written by one thread after a fixed-order loop: no atomics, the same
// inputs give bitwise the same outputs (atomic-dq's dQ apart). The launcher checks qkv and dout
// are 16-byte aligned
// (tiles are copied 16 bytes at a time; C = H * D is a multiple of 16).

#define MMA_THREADS 128
#define MMA_ROWS 64     // query rows (dq) or key rows (dkv) per block: 16 per warp
#define MMA_FWD_BC 64   // keys per tile in the forward

// The D = 64 forward's block shape, a compile-time setting (cllm_gpu/kernels.py SETTINGS passes
// other values as -D options to a module of their own; the launcher takes the warps and m-tiles
// from the same setting): warps per block, the blocks per SM its registers are budgeted for,
// and 16-row m-tiles per warp. AttnMmaCfg below says why 8 x 2 x 1 and what 4 x 3 and two
// m-tiles would trade.
#ifndef CLLM_ATTN_FWD_WARPS_D64
#define CLLM_ATTN_FWD_WARPS_D64 8
#endif
#ifndef CLLM_ATTN_FWD_MIN_BLOCKS_D64
#define CLLM_ATTN_FWD_MIN_BLOCKS_D64 2
#endif
#ifndef CLLM_ATTN_FWD_MTILES_D64
#define CLLM_ATTN_FWD_MTILES_D64 1
#endif

template <int D>
struct AttnMmaCfg {
    static_assert(D % 16 == 0 && D >= 16 && D <= 128,
                  "mma attention: head dim must be a multiple of 16 in [16, 128]");
    static constexpr int LD = D + 8;   // shared row pitch in bf16 elements
    static_assert((LD * 2) % 16 == 0 && (LD * 2 / 16) % 2 == 1,
                  "ldmatrix rows: 16-byte aligned, an odd number of 16-byte units apart");
    static constexpr int KD = D / 16;  // k-steps over the head dim
    static constexpr int ND = D / 8;   // 8-column tiles over the head dim
    static constexpr int DQ_BC = D <= 64 ? 64 : 32;
    // Forward warps per block (16 query rows each): 8 where the registers let at least 2 such
    // blocks share an SM (<= 128 per thread), so each staged K, V tile serves 128 queries
    // instead of 64 (half the tile loads and barriers per query). Above D = 64 (ptxas: 146-190
    // registers) a 256-thread block would run alone on its SM (D = 128: no second block to
    // overlap a block's tile loads; D = 80, 96: 8 resident warps instead of 12).
    static constexpr int FWD_WARPS = D == 64 ? CLLM_ATTN_FWD_WARPS_D64 : (D < 64 ? 8 : 4);
    static_assert(FWD_WARPS == 4 || FWD_WARPS == 8, "mma attention forward: 4 or 8 warps");
    // Forward m-tiles (16 rows each) per warp: 1, or at D = 64 a setting, 2 (4 warps x 2 = 128
    // queries per block; CLLM_ATTN_FWD_WARPS_D64 stays the warps, so 16 x warps x m-tiles
    // queries). With 2 a warp loads each K, V B fragment once for both m-tiles: per warp and
    // 64-key tile 32 ldmatrix.x4 for 64 mma (0.5 per mma) become 40 for 128 (0.31; the 8 more
    // are Q's A fragments, re-read from a Q tile staged in shared memory, FWD_Q_SHARED: kept
    // in registers as with 1 m-tile, CUDA 13 spilled 32 bytes with the bias). The price: the
    // S, O and P registers double: 255 per thread (CUDA 13 and NVRTC 12.9, no spill) at 2
    // blocks of 4 warps, 8 warps per SM against 8 x 2's 16; a 3-block target (168 registers)
    // spills 116 bytes (368 with the bias) in CUDA 13. Each m-tile's rows see the same
    // operations in the same order as with 1, so the outputs are bitwise the default's. Which
    // wins (fewer shared loads, or twice the warps to hide latencies) is a GPU measurement,
    // owed: scripts/bench_kernels.py --attn-fwd-variants times it as 4x2-m2.
    static constexpr int FWD_MTILES = D == 64 ? CLLM_ATTN_FWD_MTILES_D64 : 1;
    static_assert(FWD_MTILES == 1 || FWD_MTILES == 2, "mma attention forward: 1 or 2 m-tiles");
    static constexpr bool FWD_Q_SHARED = FWD_MTILES > 1;
    static constexpr int DKV_BQ = D <= 64 ? 64 : (D <= 96 ? 32 : 16);
    // Blocks per SM the register file must hold (__launch_bounds__'s second argument; 0: no
    // target, ptxas's own choice, as without the argument): 4 blocks of 128 threads leave 128
    // registers per thread, 3 leave 168; 2 blocks of 256 leave 128, 3 leave 80. Set only where
    // it raises occupancy without a spill in both NVRTC 12.9 (CI) and CUDA 13 (the GPU) ptxas:
    // dkv D = 16 used 134 (3 blocks), D = 96 172 (2). With the ldmatrix loads (four fragment
    // registers per load) ptxas's own choice grew past a boundary in: dq D = 32 133 (NVRTC),
    // D = 64 182 (CUDA 13), dkv D = 48 170 (NVRTC); dkv D = 96 with the bias, 213 before, now
    // fits 168 unspilled; with the base-2 softmax dq D = 80 169, D = 96 174 (CUDA 13; D = 96
    // 198 with NVRTC before); forward D = 96 170 (NVRTC); with the cp.async double buffering
    // forward D = 80 with the bias 179 (NVRTC; 168 unspilled with the target, CUDA 13 too).
    // The 256-thread forward: 80 registers at D = 16, 32 (3 blocks, 24 warps; ptxas's own
    // choice 109-128), 128 at D = 48, 64 (2).
    // Elsewhere a target either spills in one of the two or lowers occupancy (ptxas spends
    // registers up to the target's limit).
    // CUDA 13's ptxas (nvcc 13 -cubin of the whole module, tests/test_kernels_compile.py)
    // spilled under targets NVRTC 12.9 met: forward D = 16, 32 at 3 blocks (80 registers: 4-144
    // bytes), dq D = 80 and dkv D = 96 at 3 (168: 4-28 bytes); those now have 2, 0, 0. The
    // D = 64 forward keeps 2 blocks of 8 warps at 128 registers with 32 bytes spilled (72 with
    // the bias) in CUDA 13, none in NVRTC 12.9: without the target it takes 130 registers and
    // 1 block (8 warps per SM); 4 warps at 3 blocks (167, no spill) halve the queries each K, V
    // tile serves. Which is fastest is a GPU measurement, owed; the spill is counted in
    // the test's list of known ones; scripts/bench_kernels.py --attn-fwd-variants times both
    // (CLLM_ATTN_FWD_WARPS_D64, CLLM_ATTN_FWD_MIN_BLOCKS_D64 = 4, 3: the same outputs, bit for
    // bit; no spill in NVRTC 12.9 or CUDA 13).
    static constexpr int FWD_MIN_BLOCKS =
        D == 64 ? CLLM_ATTN_FWD_MIN_BLOCKS_D64 : (D < 64 ? 2 : (D == 80 || D == 96 ? 3 : 0));
    static constexpr int DQ_MIN_BLOCKS = D == 32 ? 4 : (D == 64 || D == 96 ? 3 : 0);
    static constexpr int DKV_MIN_BLOCKS = D == 16 ? 4 : (D == 48 ? 3 : 0);
    // The atomic-dq backward (attention_backward_mma_kernel: dkv's loop plus dQ = dS K per
    // query tile): the register target, as for DKV_MIN_BLOCKS.
    static constexpr int ATOMIC_MIN_BLOCKS = 0;
    // Dynamic shared memory in bytes (ops/attention.py's _mma_smem_bytes computes the same):
    // two buffers of the K and V tiles (forward, dq); K, V once plus two buffers of the Q, dO
    // tiles and of their lse and Delta (dkv); the atomic-dq kernel: dkv's plus the bf16 dS^T
    // tile of the block's keys x a query tile (pitch DS_LD). At most 227 KiB per block on
    // sm_90; the launcher raises the 48 KiB default where a kernel needs more.
    static constexpr int FWD_SMEM =
        (2 * 2 * MMA_FWD_BC + (FWD_Q_SHARED ? 16 * FWD_MTILES * FWD_WARPS : 0)) * LD * 2;
    static constexpr int DQ_SMEM = 2 * 2 * DQ_BC * LD * 2;
    static constexpr int DKV_SMEM = (2 * MMA_ROWS + 2 * 2 * DKV_BQ) * LD * 2 + 2 * 2 * DKV_BQ * 4;
    static constexpr int DS_LD = DKV_BQ + 8;
    static_assert((DS_LD * 2) % 16 == 0 && (DS_LD * 2 / 16) % 2 == 1,
                  "ldmatrix rows of the dS tile: as LD");
    static constexpr int ATOMIC_SMEM = DKV_SMEM + MMA_ROWS * DS_LD * 2;
    static_assert(FWD_SMEM <= 227 * 1024 && DQ_SMEM <= 227 * 1024 && ATOMIC_SMEM <= 227 * 1024,
                  "mma attention shared memory");
};

// c (16 x 8 fp32) += a (16 x 16 bf16) * b (16 x 8 bf16)
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const unsigned (&a)[4],
                                               unsigned b0, unsigned b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float mma_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(CLLM_FULL_MASK, v, 1));
    return fmaxf(v, __shfl_xor_sync(CLLM_FULL_MASK, v, 2));
}

#define ATTN_LOG2E 1.44269504088896341f  // log2(e)
#define ATTN_LN2 0.693147180559945309f   // ln(2) = 1 / log2(e)

// The mma kernels' softmax in base 2: with s2 = s log2(e) (the score scale and the bias slope
// pre-multiplied by log2 e: scale2, slope2) and a max or lse m2 in the same units,
// P = 2^(s2 - m2) = e^(s - m) is one FMA (two with the bias) and one ex2 (exp2f), where expf
// costs a multiply and a range reduction more. The forward and both backward kernels call the
// same prob(), so for the same m2 they compute bitwise the same P. lse stays natural-log at the
// interface: the forward converts each row's once when it writes it, the backward back when
// it reads it.
template <bool BIAS>
struct AttnScore2 {
    float scale2, slope2;
    __device__ __forceinline__ AttnScore2(float scale, const float* slopes, int h)
        : scale2(scale * ATTN_LOG2E), slope2(BIAS ? slopes[h] * ATTN_LOG2E : 0.0f) {}
    // s: the unscaled product q_i . k_j (-inf where masked); dist: (float)(j - i)
    // An order key of s2 within a row: s itself without the bias (max_key_to_s2 then scales
    // the row max: exact, rounding is monotone), s2 with it.
    __device__ __forceinline__ float max_key(float s, float dist) const {
        if constexpr (BIAS) return fmaf(slope2, dist, s * scale2);
        return s;
    }
    __device__ __forceinline__ float max_key_to_s2(float key) const {
        if constexpr (BIAS) return key;
        return key * scale2;
    }
    __device__ __forceinline__ float prob(float s, float dist, float m2) const {
        if constexpr (BIAS) return exp2f(fmaf(s, scale2, fmaf(slope2, dist, -m2)));
        return exp2f(fmaf(s, scale2, -m2));
    }
};

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: four 8 x 8 bf16 matrices of a shared tile
// in one instruction. Lane l gives the address of row l % 8 of matrix l / 8 (16-byte aligned:
// LD * 2 bytes per row, columns multiples of 8); register m of every lane receives matrix m's
// row l / 4, columns 2 (l % 4) and + 1 (with .trans, of the transposed matrix) -- the mma
// fragment layout. One shared load per 4 fragment registers, where 32-bit loads took one per
// register and the transposed operand two 16-bit loads per register.
__device__ __forceinline__ void mma_ldmatrix_x4(unsigned (&r)[4], const unsigned short* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(row)));
}
__device__ __forceinline__ void mma_ldmatrix_x4_trans(unsigned (&r)[4],
                                                      const unsigned short* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(row)));
}

// A fragment: rows [row0, row0 + 16) x columns [col0, col0 + 16) of a shared tile; matrices
// (registers) 0..3 = rows 0-7 | 8-15 of columns 0-7, then of columns 8-15.
template <int LD>
__device__ __forceinline__ void mma_ldmatrix_a(unsigned (&a)[4], const unsigned short* tile,
                                               int row0, int col0, int lane) {
    mma_ldmatrix_x4(a, tile + (row0 + (lane & 15)) * LD + col0 + (lane >> 4) * 8);
}

// B fragments of two adjacent 8-column tiles with B[k][n] = X[n0 + n][k0 + k]: the rows of the
// shared tile X are B's columns (K in Q K^T, Q in K Q^T). b[0], b[1]: columns n0..n0+7;
// b[2], b[3]: n0+8..n0+15 (matrices: X rows 0-7 at k 0-7 | k 8-15, then rows 8-15).
template <int LD>
__device__ __forceinline__ void mma_ldmatrix_b_rows(unsigned (&b)[4], const unsigned short* X,
                                                    int n0, int k0, int lane) {
    mma_ldmatrix_x4(b, X + (n0 + (lane & 7) + (lane >> 4) * 8) * LD + k0 + (lane & 8));
}

// The same with B[k][n] = X[k0 + k][n0 + n] (V in P V, K in dS K, dO in P^T dO, Q in dS^T Q):
// .trans of the matrices X rows k 0-7 | k 8-15 of columns n0..n0+7, then of n0+8..n0+15.
template <int LD>
__device__ __forceinline__ void mma_ldmatrix_b_cols(unsigned (&b)[4], const unsigned short* X,
                                                    int k0, int n0, int lane) {
    mma_ldmatrix_x4_trans(b, X + (k0 + (lane & 15)) * LD + n0 + (lane >> 4) * 8);
}

// A fragment with A[m][k] = X[k0 + k][m0 + m] (dS in dQ = dS K, from the atomic-dq kernel's
// [key][query] dS^T tile): .trans of the matrices X rows k 0-7 at columns m 0-7 | m 8-15, then
// of rows k 8-15 (registers 0..3: A rows 0-7 | 8-15 of k 0-7, then of k 8-15).
template <int LD>
__device__ __forceinline__ void mma_ldmatrix_a_trans(unsigned (&a)[4], const unsigned short* X,
                                                     int k0, int m0, int lane) {
    mma_ldmatrix_x4_trans(a, X + (k0 + (lane & 7) + (lane >> 4) * 8) * LD + m0 + (lane & 8));
}

// The accumulators of two adjacent 8-column tiles (rows g, g + 8) as the A fragment of the
// 16-wide k-step they cover, rounded to bf16.
__device__ __forceinline__ void mma_acc_to_a(unsigned (&a)[4], const float (&c0)[4],
                                             const float (&c1)[4]) {
    a[0] = cllm_pack_bf16x2(c0[0], c0[1]);
    a[1] = cllm_pack_bf16x2(c0[2], c0[3]);
    a[2] = cllm_pack_bf16x2(c1[0], c1[1]);
    a[3] = cllm_pack_bf16x2(c1[2], c1[3]);
}

// A fragments over the whole head dim for rows r and r + 8 of a bf16 row-major matrix (row
// pitch ld; Q or dO), read from global memory; rows >= T are zeros. Each register is one
// aligned 4-byte load of a bf16 pair, the lower column in its low half (little-endian).
template <int KD>
__device__ __forceinline__ void mma_load_a_global(unsigned (&a)[KD][4], const cllm_bf16* src,
                                                  long long ld, int r, int T, int t) {
#pragma unroll
    for (int ks = 0; ks < KD; ++ks) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = r + 8 * half;
            unsigned lo = 0u, hi = 0u;
            if (row < T) {
                const unsigned* p = reinterpret_cast<const unsigned*>(
                    src + (long long)row * ld + ks * 16 + 2 * t);
                lo = p[0];
                hi = p[4];  // columns + 8
            }
            a[ks][half] = lo;
            a[ks][2 + half] = hi;
        }
    }
}

// cp.async.cg.shared.global (sm_80+): 16 bytes from global to shared memory without passing
// through registers, completing asynchronously: a thread's copies join a group at
// cp.async.commit_group, and cp.async.wait_group N returns once all but its N most recent
// groups have landed (in its own view: other threads see them after a __syncthreads that
// follows their issuers' waits). src-size 0 reads nothing and zero-fills the 16 bytes.
__device__ __forceinline__ void mma_cp_async16(unsigned short* dst, const void* src, int src_size) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src), "r"(src_size)
                 : "memory");
}
__device__ __forceinline__ void mma_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void mma_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

// Issue the copies of rows [r0, r0 + R) x D of a bf16 matrix (row pitch ld, 16-byte aligned
// rows) into a bf16 shared tile of pitch D + 8, by a block of THREADS threads, 16 bytes (8
// elements) each; rows >= T are zero-filled (src-size 0, the address kept on row 0, in
// bounds). The caller commits, waits and synchronizes before reading the tile.
template <int D, int R, int THREADS = MMA_THREADS>
__device__ __forceinline__ void mma_stage_tile_async(unsigned short* dst, const cllm_bf16* src,
                                                     long long ld, int r0, int T) {
    constexpr int LD = D + 8;
    constexpr int V = D / 8;  // 16-byte vectors per row
    for (int e = threadIdx.x; e < R * V; e += THREADS) {
        const int rr = e / V;
        const int c = (e - rr * V) * 8;
        const int r = r0 + rr;
        mma_cp_async16(dst + rr * LD + c, src + (long long)(r < T ? r : 0) * ld + c,
                       r < T ? 16 : 0);
    }
}

// This thread's warp, lane, and its place in the mma fragments: lane = 4 g + t.
struct MmaLane { int warp, lane, g, t; };
__device__ __forceinline__ MmaLane mma_lane() {
    const int lane = threadIdx.x & 31;
    return {(int)(threadIdx.x >> 5), lane, lane >> 2, lane & 3};
}

// ---- warp-level products (16 rows per warp; accumulators are N tiles of 16 x 8 fp32)
template <int N>
__device__ __forceinline__ void mma_zero(float (&acc)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}

// acc (16 x 8N) += A X^T: A = 16 x 16KD given as fragments (rows of Q or dO), X = shared tile
// rows [0, 8N) x columns [0, 16KD) (keys of K or V): the scores S = Q K^T and dP = dO V^T.
// Each acc[n] sums its k-steps in order: the same bits however the loads are grouped.
template <int LD, int KD, int N>
__device__ __forceinline__ void mma_frags_times_rows_t(float (&acc)[N][4],
                                                       const unsigned (&a)[KD][4],
                                                       const unsigned short* X, int lane) {
    static_assert(N % 2 == 0, "B fragments are loaded for two 8-column tiles at once");
#pragma unroll
    for (int ks = 0; ks < KD; ++ks) {
#pragma unroll
        for (int n = 0; n < N; n += 2) {
            unsigned bb[4];
            mma_ldmatrix_b_rows<LD>(bb, X, n * 8, ks * 16, lane);
            mma_bf16_16816(acc[n], a[ks], bb[0], bb[1]);
            mma_bf16_16816(acc[n + 1], a[ks], bb[2], bb[3]);
        }
    }
}

// The same with A = rows [row0, row0 + 16) of a shared tile (S^T = K Q^T, dP^T = V dO^T),
// loaded one k-step at a time (fewer live registers than all KD fragments at once).
template <int LD, int KD, int N>
__device__ __forceinline__ void mma_tile_times_rows_t(float (&acc)[N][4], const unsigned short* A,
                                                      int row0, const unsigned short* X,
                                                      int lane) {
    static_assert(N % 2 == 0, "B fragments are loaded for two 8-column tiles at once");
#pragma unroll
    for (int ks = 0; ks < KD; ++ks) {
        unsigned a[4];
        mma_ldmatrix_a<LD>(a, A, row0, ks * 16, lane);
#pragma unroll
        for (int n = 0; n < N; n += 2) {
            unsigned bb[4];
            mma_ldmatrix_b_rows<LD>(bb, X, n * 8, ks * 16, lane);
            mma_bf16_16816(acc[n], a, bb[0], bb[1]);
            mma_bf16_16816(acc[n + 1], a, bb[2], bb[3]);
        }
    }
}

// acc (16 x 8ND) += bf16(P) X: P = 16 x 8NK accumulator tiles (probabilities or dS), rounded
// to bf16 as the A operand; X = shared tile rows [0, 8NK) x columns [0, 8ND): P V, dS K,
// P^T dO, dS^T Q.
template <int LD, int NK, int ND>
__device__ __forceinline__ void mma_acc_times_cols(float (&acc)[ND][4], const float (&p)[NK][4],
                                                   const unsigned short* X, int lane) {
    static_assert(ND % 2 == 0, "B fragments are loaded for two 8-column tiles at once");
#pragma unroll
    for (int kk = 0; kk < NK / 2; ++kk) {
        unsigned pa[4];
        mma_acc_to_a(pa, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int nd = 0; nd < ND; nd += 2) {
            unsigned bb[4];
            mma_ldmatrix_b_cols<LD>(bb, X, kk * 16, nd * 8, lane);
            mma_bf16_16816(acc[nd], pa, bb[0], bb[1]);
            mma_bf16_16816(acc[nd + 1], pa, bb[2], bb[3]);
        }
    }
}

// The products above for M m-tiles of a warp at once (acc[m], a[m]: its rows row0 + 16 m ..
// + 15): each B fragment loaded serves M pairs of mma instead of one (the forward with several
// m-tiles per warp). Every acc[m][n] sums its k-steps in the same order as the one-tile
// product, so each m-tile gets the bits of the one-tile product on its rows.
template <int LD, int KD, int N, int M>
__device__ __forceinline__ void mma_tile_times_rows_t(float (&acc)[M][N][4],
                                                      const unsigned short* A, int row0,
                                                      const unsigned short* X, int lane) {
    static_assert(N % 2 == 0, "B fragments are loaded for two 8-column tiles at once");
#pragma unroll
    for (int ks = 0; ks < KD; ++ks) {
        unsigned a[M][4];
#pragma unroll
        for (int m = 0; m < M; ++m) mma_ldmatrix_a<LD>(a[m], A, row0 + 16 * m, ks * 16, lane);
#pragma unroll
        for (int n = 0; n < N; n += 2) {
            unsigned bb[4];
            mma_ldmatrix_b_rows<LD>(bb, X, n * 8, ks * 16, lane);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                mma_bf16_16816(acc[m][n], a[m], bb[0], bb[1]);
                mma_bf16_16816(acc[m][n + 1], a[m], bb[2], bb[3]);
            }
        }
    }
}

// acc[m] (16 x 8ND) += A[m] X: A[m] = 16 x 16KS bf16 A fragments (bf16(P) of m-tile m, packed
// by mma_acc_to_a), X = shared tile rows [0, 16KS) x columns [0, 8ND) (P V).
template <int LD, int KS, int ND, int M>
__device__ __forceinline__ void mma_frags_times_cols(float (&acc)[M][ND][4],
                                                     const unsigned (&a)[M][KS][4],
                                                     const unsigned short* X, int lane) {
    static_assert(ND % 2 == 0, "B fragments are loaded for two 8-column tiles at once");
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
        for (int nd = 0; nd < ND; nd += 2) {
            unsigned bb[4];
            mma_ldmatrix_b_cols<LD>(bb, X, ks * 16, nd * 8, lane);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                mma_bf16_16816(acc[m][nd], a[m][ks], bb[0], bb[1]);
                mma_bf16_16816(acc[m][nd + 1], a[m][ks], bb[2], bb[3]);
            }
        }
    }
}

template <int D, bool BIAS = false>
__global__ void __launch_bounds__(32 * AttnMmaCfg<D>::FWD_WARPS, AttnMmaCfg<D>::FWD_MIN_BLOCKS)
attention_forward_mma_kernel(
        const cllm_bf16* qkv, float* out, float* lse, cllm_bf16* out_mm, int write_mm, int T,
        int H, float scale, const float* slopes, unsigned drop_seed, const double* drop_step,
        unsigned drop_site, unsigned drop_micro, unsigned drop_threshold, float drop_scale) {
    using Cfg = AttnMmaCfg<D>;
    constexpr int LD = Cfg::LD;
    constexpr int KD = Cfg::KD;
    constexpr int ND = Cfg::ND;
    constexpr int M = Cfg::FWD_MTILES;  // 16-row m-tiles per warp
    constexpr int BC = MMA_FWD_BC;
    constexpr int NC = BC / 8;
    constexpr int THREADS = 32 * Cfg::FWD_WARPS;
    constexpr int ROWS = 16 * M * Cfg::FWD_WARPS;  // queries per block
    // a warp's rows start at a multiple of 16 M, tiles at multiples of BC: a tile the warp does
    // not skip starts at or before its first row, so no m-tile meets one wholly above its rows
    static_assert(BC % (16 * M) == 0, "mma attention forward: m-tiles per warp divide the tile");
    // dynamic shared memory (Cfg's FWD_SMEM, DQ_SMEM, DKV_SMEM bytes, from the launcher: above
    // 48 KiB for some head dims with the double buffers)
    extern __shared__ __align__(16) unsigned short mma_smem[];
    unsigned short* const Kbuf = mma_smem;                 // [2][BC * LD]: tiles j even, odd
    unsigned short* const Vbuf = mma_smem + 2 * BC * LD;   // [2][BC * LD]
    [[maybe_unused]] unsigned short* const Qs = mma_smem + 4 * BC * LD;  // [ROWS * LD]

    const auto [warp, lane, g, t] = mma_lane();
    const auto [bh, b, h] = attn_head(H);
    const int q0 = (gridDim.x - 1 - blockIdx.x) * ROWS;  // longest (last) tiles first
    const int r0 = q0 + warp * 16 * M + g;  // this thread's rows in its first m-tile: r0 (c0,
    const int r1 = r0 + 8;                  // c1) and r1 (c2, c3); in m-tile mt, 16 mt below
    const auto row = [r0, r1](int mt, int half) { return (half ? r1 : r0) + 16 * mt; };
    const int C = H * D;
    const long long C3 = 3LL * C;
    const cllm_bf16* base = qkv + (long long)b * T * C3 + (long long)h * D;
    const AttnScore2<BIAS> score(scale, slopes, h);
    const AttnDropout drop{drop_seed, drop_site, drop_micro, drop_threshold, drop_step,
                           drop_scale, bh, T};

    // Q's A fragments: in registers through the loop with one m-tile; with several, read per
    // k-step from the Q tile staged in shared memory (Cfg::FWD_Q_SHARED)
    constexpr bool Q_SHARED = Cfg::FWD_Q_SHARED;
    [[maybe_unused]] unsigned qa[KD][4];
    float o[M][ND][4];
    const float NEG_INF = -cllm_inf<float>();
    // per m-tile and half: running row maxima of s2 = s log2 e (the same in all 4 lanes of a
    // row), and this lane's partial row sums, reduced at the end
    float m[M][2], l[M][2];
#pragma unroll
    for (int mt = 0; mt < M; ++mt) {
        if constexpr (!Q_SHARED) mma_load_a_global<KD>(qa, base, C3, r0, T, t);
        mma_zero(o[mt]);
        m[mt][0] = NEG_INF;
        m[mt][1] = NEG_INF;
        l[mt][0] = 0.0f;
        l[mt][1] = 0.0f;
    }
    const int kv_end = min(T, q0 + ROWS);
    const int warp_last_row = q0 + warp * 16 * M + 16 * M - 1;

    // K, V tiles double-buffered with cp.async: tile n + 1 is copied while tile n is used
    mma_stage_tile_async<D, BC, THREADS>(Kbuf, base + C, C3, 0, T);
    mma_stage_tile_async<D, BC, THREADS>(Vbuf, base + 2 * C, C3, 0, T);
    if constexpr (Q_SHARED) mma_stage_tile_async<D, ROWS, THREADS>(Qs, base, C3, q0, T);
    mma_cp_async_commit();
    for (int j0 = 0, n = 0; j0 < kv_end; j0 += BC, ++n) {
        const unsigned short* const Ks = Kbuf + (n & 1) * BC * LD;
        const unsigned short* const Vs = Vbuf + (n & 1) * BC * LD;
        __syncthreads();  // K, V tile n - 1 is no longer read: its buffers take tile n + 1
        if (j0 + BC < kv_end) {
            mma_stage_tile_async<D, BC, THREADS>(Kbuf + ((n + 1) & 1) * BC * LD, base + C, C3,
                                                 j0 + BC, T);
            mma_stage_tile_async<D, BC, THREADS>(Vbuf + ((n + 1) & 1) * BC * LD, base + 2 * C,
                                                 C3, j0 + BC, T);
        }
        mma_cp_async_commit();    // (empty on the last tile: one group per tile throughout)
        mma_cp_async_wait<1>();   // this thread's copies of tile n have landed
        __syncthreads();          // and every thread's
        // every key of the tile above this warp's rows (warp-uniform): the tile would give
        // P = 0, the running max and sums unchanged, o + 0 (skipping it changes no bit)
        if (j0 > warp_last_row) continue;
        // bit 4 nc + e of kept[mt]: score s[mt][nc][e]'s P is kept. One call site in a loop
        // for all m-tiles (M <= 2 words in kept_all, the last m-tile's drawn first): a call per
        // m-tile made CUDA 13's ptxas spill in the 2-m-tile build.
        unsigned long long kept_all = ~0ull;
        if (drop.on()) {
#pragma unroll 1
            for (int k = M - 1; k >= 0; --k)
                kept_all = (kept_all << 32) | attn_keep_bits(drop, 0, 1, 4 * NC, ATTN_MMA_LAYOUT,
                                                            row(k, 0), row(k, 1), j0 + 2 * t);
        }
        unsigned kept[M];
#pragma unroll
        for (int mt = 0; mt < M; ++mt) kept[mt] = (unsigned)(kept_all >> (32 * mt));

        float s[M][NC][4];
        unsigned pa[M][NC / 2][4];  // bf16(P): the A fragments of P V
#pragma unroll
        for (int mt = 0; mt < M; ++mt) mma_zero(s[mt]);
        if constexpr (Q_SHARED)  // every K fragment serves the M m-tiles
            mma_tile_times_rows_t<LD, KD>(s, Qs, warp * 16 * M, Ks, lane);
        else
            mma_frags_times_rows_t<LD>(s[0], qa, Ks, lane);
#pragma unroll
        for (int mt = 0; mt < M; ++mt) {
            float mx[2] = {NEG_INF, NEG_INF};  // row maxima of score.max_key
            const float dist0 = (float)(j0 + 2 * t - row(mt, 0));  // j - i of the first score
#pragma unroll
            for (int nc = 0; nc < NC; ++nc) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = j0 + nc * 8 + 2 * t + (e & 1);
                    const int i = row(mt, e < 2 ? 0 : 1);
                    const float dist = dist0 + (float)(nc * 8 + (e & 1) - (e < 2 ? 0 : 8));
                    if (!(j <= i && j < T)) s[mt][nc][e] = NEG_INF;  // P = 2^-inf = 0
                    const float k = score.max_key(s[mt][nc][e], dist);
                    if (e < 2) mx[0] = fmaxf(mx[0], k); else mx[1] = fmaxf(mx[1], k);
                }
            }
            const float mn[2] = {fmaxf(m[mt][0], score.max_key_to_s2(mma_quad_max(mx[0]))),
                                 fmaxf(m[mt][1], score.max_key_to_s2(mma_quad_max(mx[1])))};
            // a row with every key so far masked keeps m = -inf: subtract 0 so exp gives 0,
            // not NaN
            const float ms[2] = {mn[0] == NEG_INF ? 0.0f : mn[0], mn[1] == NEG_INF ? 0.0f : mn[1]};
            const float al[2] = {exp2f(m[mt][0] - ms[0]), exp2f(m[mt][1] - ms[1])};  // 0 while
            m[mt][0] = mn[0];                                                         // m = -inf
            m[mt][1] = mn[1];
            float ps[2] = {0.0f, 0.0f};
#pragma unroll
            for (int nc = 0; nc < NC; ++nc) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float dist = dist0 + (float)(nc * 8 + (e & 1) - (e < 2 ? 0 : 8));
                    s[mt][nc][e] = score.prob(s[mt][nc][e], dist, ms[e >> 1]);
                }
                ps[0] += s[mt][nc][0] + s[mt][nc][1];
                ps[1] += s[mt][nc][2] + s[mt][nc][3];
                // after the row sums (of the undropped P), before P V rounds P
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (!((kept[mt] >> (4 * nc + e)) & 1u)) s[mt][nc][e] = 0.0f;
            }
            l[mt][0] = l[mt][0] * al[0] + ps[0];
            l[mt][1] = l[mt][1] * al[1] + ps[1];
#pragma unroll
            for (int nd = 0; nd < ND; ++nd) {
                o[mt][nd][0] *= al[0];
                o[mt][nd][1] *= al[0];
                o[mt][nd][2] *= al[1];
                o[mt][nd][3] *= al[1];
            }
#pragma unroll
            for (int kk = 0; kk < NC / 2; ++kk)
                mma_acc_to_a(pa[mt][kk], s[mt][2 * kk], s[mt][2 * kk + 1]);
        }
        mma_frags_times_cols<LD>(o, pa, Vs, lane);  // every V fragment serves the M m-tiles
    }
    // out_mm, the flag: through an empty asm (no instruction) after the loop, so that nothing
    // derived from them (out_mm's global address, the flag's predicate) is computed at the
    // entry and held in registers through the loop. Without it CUDA 13's ptxas spilled 28 and
    // 32 bytes in the D = 80, 96 forward with the bias, 4 more at D = 64 with the bias and 12
    // in the 4-warp, 3-block D = 64 build; with it every instantiation's registers and spills
    // are those of the kernel without out_mm.
    cllm_bf16* mm = out_mm;
    int mm_on = write_mm;
    asm volatile("" : "+l"(mm), "+r"(mm_on));
#pragma unroll
    for (int mt = 0; mt < M; ++mt) {
        l[mt][0] = quad_sum(l[mt][0]);
        l[mt][1] = quad_sum(l[mt][1]);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = row(mt, half);
            if (r < T) {
                const float inv = drop.scale / l[mt][half];  // drop.scale: 1 without dropout
                const long long at = ((long long)b * T + r) * C + (long long)h * D + 2 * t;
                if (mm_on != 2) {  // write_mm 2: the bf16 output only (out unwritten)
                    float* orow = out + at;
#pragma unroll
                    for (int nd = 0; nd < ND; ++nd) {
                        orow[nd * 8] = o[mt][nd][2 * half] * inv;
                        orow[nd * 8 + 1] = o[mt][nd][2 * half + 1] * inv;
                    }
                }
                // the projection's bf16 operand: the same products, rounded as the cast kernel
                // rounds out (cllm_float_to_bf16_bits: bitwise to_bf16(out)); the pair at an
                // even index, one 4-byte store (the launcher checks out_mm's alignment)
                if (mm_on) {
                    unsigned* mrow = reinterpret_cast<unsigned*>(mm + at);
#pragma unroll
                    for (int nd = 0; nd < ND; ++nd)
                        mrow[nd * 4] = cllm_float_to_bf16_bits(o[mt][nd][2 * half] * inv) |
                                       ((unsigned)cllm_float_to_bf16_bits(
                                            o[mt][nd][2 * half + 1] * inv) << 16);
                }
                // natural log at the interface: (m2 + log2 l) ln 2
                if (t == 0)
                    lse[(long long)bh * T + r] = (m[mt][half] + log2f(l[mt][half])) * ATTN_LN2;
            }
        }
    }
}

// Delta_r = dO_r . O_r of row r (0 for r >= T) in fp32 with the bf16 dO of dP = dO V^T, so
// that Delta_i = sum_j P_ij dP_ij holds for the dP actually used (dS rows sum to ~0): lane t of
// the row's quad sums its columns 16 ks + 2 t + {0, 1, 8, 9} in order, the quad adds the
// partials (every lane gets the row's value). The dq kernel and the delta kernel of the
// atomic-dq backward both compute Delta so: the same bits.
template <int KD>
__device__ __forceinline__ float attn_mma_delta(const cllm_bf16* gbase, const cllm_bf16* obase,
                                                int C, int r, int T, int t) {
    float acc = 0.0f;
    if (r < T) {
#pragma unroll
        for (int ks = 0; ks < KD; ++ks) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const long long k = (long long)r * C + ks * 16 + 2 * t + (c & 1) + 8 * (c >> 1);
                acc += cllm_load(gbase + k) * cllm_load(obase + k);
            }
        }
    }
    return quad_sum(acc);
}

// A pair of a backward output row (at an even element) into dqkv: two floats, or a bf16 pair
// in one 4-byte store (the launcher checks a bf16 dqkv's 4-byte alignment), each value rounded
// to nearest even as the cast kernel rounds: bitwise to_bf16 of the float pair.
__device__ __forceinline__ void attn_store_grad_pair(float* p, float lo, float hi) {
    p[0] = lo;
    p[1] = hi;
}
__device__ __forceinline__ void attn_store_grad_pair(cllm_bf16* p, float lo, float hi) {
    *reinterpret_cast<unsigned*>(p) = cllm_pack_bf16x2(lo, hi);
}

// GradT: dqkv's storage, float or cllm_bf16 (the bf16 model's)
template <int D, bool BIAS = false, typename GradT = float>
__global__ void __launch_bounds__(MMA_THREADS, AttnMmaCfg<D>::DQ_MIN_BLOCKS)
attention_backward_dq_mma_kernel(
        const cllm_bf16* qkv, const cllm_bf16* out, const cllm_bf16* dout, const float* lse,
        float* delta, GradT* dqkv, int T, int H, float scale,
        const float* slopes, unsigned drop_seed, const double* drop_step, unsigned drop_site,
        unsigned drop_micro, unsigned drop_threshold, float drop_scale) {
    using Cfg = AttnMmaCfg<D>;
    constexpr int LD = Cfg::LD;
    constexpr int KD = Cfg::KD;
    constexpr int ND = Cfg::ND;
    constexpr int BC = Cfg::DQ_BC;
    constexpr int NC = BC / 8;
    // dynamic shared memory (Cfg's FWD_SMEM, DQ_SMEM, DKV_SMEM bytes, from the launcher: above
    // 48 KiB for some head dims with the double buffers)
    extern __shared__ __align__(16) unsigned short mma_smem[];
    unsigned short* const Kbuf = mma_smem;                 // [2][BC * LD]: tiles j even, odd
    unsigned short* const Vbuf = mma_smem + 2 * BC * LD;   // [2][BC * LD]
    [[maybe_unused]] unsigned short* const Qs = mma_smem + 4 * BC * LD;  // [ROWS * LD]

    const auto [warp, lane, g, t] = mma_lane();
    const auto [bh, b, h] = attn_head(H);
    const int q0 = (gridDim.x - 1 - blockIdx.x) * MMA_ROWS;
    const int r0 = q0 + warp * 16 + g;
    const int r1 = r0 + 8;
    const int C = H * D;
    const long long C3 = 3LL * C;
    const cllm_bf16* base = qkv + (long long)b * T * C3 + (long long)h * D;
    const cllm_bf16* gbase = dout + (long long)b * T * C + (long long)h * D;
    const cllm_bf16* obase = out + (long long)b * T * C + (long long)h * D;
    const AttnScore2<BIAS> score(scale, slopes, h);
    const AttnDropout drop{drop_seed, drop_site, drop_micro, drop_threshold, drop_step,
                           drop_scale, bh, T};

    // the first K, V tile's copies go out before the Q, dO fragment loads and Delta
    mma_stage_tile_async<D, BC>(Kbuf, base + C, C3, 0, T);
    mma_stage_tile_async<D, BC>(Vbuf, base + 2 * C, C3, 0, T);
    mma_cp_async_commit();
    unsigned qa[KD][4], ga[KD][4];
    mma_load_a_global<KD>(qa, base, C3, r0, T, t);
    mma_load_a_global<KD>(ga, gbase, C, r0, T, t);

    float dl[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = half ? r1 : r0;
        dl[half] = attn_mma_delta<KD>(gbase, obase, C, r, T, t);
        if (r < T && t == 0) delta[(long long)bh * T + r] = dl[half];
    }
    // the rows' lse in log2 units (the forward's m2 + log2 l, up to rounding)
    const float L0 = r0 < T ? lse[(long long)bh * T + r0] * ATTN_LOG2E : 0.0f;
    const float L1 = r1 < T ? lse[(long long)bh * T + r1] * ATTN_LOG2E : 0.0f;

    float dq[ND][4];
    mma_zero(dq);
    const int kv_end = min(T, q0 + MMA_ROWS);
    const int warp_last_row = q0 + warp * 16 + 15;

    for (int j0 = 0, n = 0; j0 < kv_end; j0 += BC, ++n) {
        const unsigned short* const Ks = Kbuf + (n & 1) * BC * LD;
        const unsigned short* const Vs = Vbuf + (n & 1) * BC * LD;
        __syncthreads();  // tile n - 1 is no longer read: its buffer takes tile n + 1
        if (j0 + BC < kv_end) {
            mma_stage_tile_async<D, BC>(Kbuf + ((n + 1) & 1) * BC * LD, base + C, C3, j0 + BC, T);
            mma_stage_tile_async<D, BC>(Vbuf + ((n + 1) & 1) * BC * LD, base + 2 * C, C3,
                                        j0 + BC, T);
        }
        mma_cp_async_commit();
        mma_cp_async_wait<1>();   // tile n has landed (this thread's copies)
        __syncthreads();          // (every thread's)
        if (j0 > warp_last_row) continue;  // the whole tile is above this warp's rows (warp-uniform)
        // bit 4 nc + e: score s[nc][e]'s P is kept
        const unsigned kept =
            drop.on() ? attn_keep_bits(drop, 0, 1, 4 * NC, ATTN_MMA_LAYOUT, r0, r1, j0 + 2 * t)
                      : ~0u;

        float s[NC][4], dp[NC][4];
        mma_zero(s);
        mma_zero(dp);
        mma_frags_times_rows_t<LD>(s, qa, Ks, lane);   // S = Q K^T
        mma_frags_times_rows_t<LD>(dp, ga, Vs, lane);  // dP = dO V^T
        const float dist0 = (float)(j0 + 2 * t - r0);  // j - i of this lane's first score
#pragma unroll
        for (int nc = 0; nc < NC; ++nc) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + nc * 8 + 2 * t + (e & 1);
                const int i = e < 2 ? r0 : r1;
                const bool ok = j <= i && i < T;
                const float dist = dist0 + (float)(nc * 8 + (e & 1) - (e < 2 ? 0 : 8));
                const float p = ok ? score.prob(s[nc][e], dist, e < 2 ? L0 : L1) : 0.0f;
                const float dpk = (kept >> (4 * nc + e)) & 1u ? dp[nc][e] * drop.scale : 0.0f;
                s[nc][e] = p * (dpk - dl[e >> 1]);  // dS / scale
            }
        }
        mma_acc_times_cols<LD>(dq, s, Ks, lane);       // dQ += dS K
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = half ? r1 : r0;
        if (r < T) {
            GradT* dst = dqkv + ((long long)b * T + r) * C3 + (long long)h * D + 2 * t;
#pragma unroll
            for (int nd = 0; nd < ND; ++nd)
                attn_store_grad_pair(dst + nd * 8, dq[nd][2 * half] * scale,
                                     dq[nd][2 * half + 1] * scale);
        }
    }
}

// lse (in log2 units, as dq's L) and Delta of query rows [i0, i0 + R) into shared rows (plain
// loads and stores: 4-byte values of rows that need not be 16-byte aligned); 0 past T.
template <int R>
__device__ __forceinline__ void attn_mma_stage_rows(float* Ls, float* Ds, const float* lse,
                                                    const float* delta, int bh, int i0, int T) {
    for (int r = threadIdx.x; r < R; r += MMA_THREADS) {
        const int i = i0 + r;
        Ls[r] = (i < T) ? lse[(long long)bh * T + i] * ATTN_LOG2E : 0.0f;
        Ds[r] = (i < T) ? delta[(long long)bh * T + i] : 0.0f;
    }
}

// The bf16 dS^T of this warp's 16 keys x a query tile (accumulator tiles, rows = keys) into the
// [key][query] shared tile of pitch LDS, rounded as mma_acc_to_a rounds it for dS^T Q: one
// bf16 pair per 32-bit store.
template <int LDS, int NQ>
__device__ __forceinline__ void mma_store_acc_bf16(unsigned short* tile, const float (&acc)[NQ][4],
                                                   int row0, int g, int t) {
#pragma unroll
    for (int nq = 0; nq < NQ; ++nq) {
        unsigned short* p = tile + (row0 + g) * LDS + nq * 8 + 2 * t;
        *reinterpret_cast<unsigned*>(p) = cllm_pack_bf16x2(acc[nq][0], acc[nq][1]);
        *reinterpret_cast<unsigned*>(p + 8 * LDS) = cllm_pack_bf16x2(acc[nq][2], acc[nq][3]);
    }
}

// The atomic-dq backward's dQ of one query tile: dQ[i0 + i] += scale * sum_j dS_ij K_j over the
// block's keys, added to dqkv's dQ slot (dq_rows: row 0 of this head's slot, row pitch C3) with
// fp32 atomicAdd (the other key blocks add to the same rows, in no fixed order). dS: the bf16
// [key][query] tile of pitch LDS, rows [0, 16 nks) (the warps whose keys meet the tile; the
// keys above are all after the tile's queries, dS = 0 there). Warp w takes query rows
// 16 (w % RT) .. + 15 of the tile (RT = BQ / 16 row blocks) and every (4 / RT)-th pair of
// 8-column tiles of D from pair w / RT: each dQ element of the tile is added by one thread.
template <int D, int BQ, int LDS>
__device__ __forceinline__ void attn_mma_atomic_dq(float* dq_rows, long long C3,
                                                   const unsigned short* dSs,
                                                   const unsigned short* Ks, int i0, int nks,
                                                   int T, float scale, int warp, int lane, int g,
                                                   int t) {
    constexpr int LD = D + 8;
    constexpr int NK = MMA_ROWS / 16;   // k-steps over the block's keys
    constexpr int RT = BQ / 16;         // 16-query row blocks of the tile
    constexpr int WPR = 4 / RT;         // warps per row block
    static_assert(MMA_THREADS == 128 && RT * WPR == 4, "4 warps over the tile's row blocks");
    const int m0 = (warp % RT) * 16;
    unsigned a[NK][4];                  // dS (16 queries x 16 keys) per k-step
#pragma unroll
    for (int ks = 0; ks < NK; ++ks)
        if (ks < nks) mma_ldmatrix_a_trans<LDS>(a[ks], dSs, ks * 16, m0, lane);
    const int r0 = i0 + m0 + g;
#pragma unroll
    for (int pr = warp / RT; pr < D / 16; pr += WPR) {
        float acc[2][4];
        mma_zero(acc);
#pragma unroll
        for (int ks = 0; ks < NK; ++ks) {
            if (ks < nks) {
                unsigned bb[4];
                mma_ldmatrix_b_cols<LD>(bb, Ks, ks * 16, pr * 16, lane);
                mma_bf16_16816(acc[0], a[ks], bb[0], bb[1]);
                mma_bf16_16816(acc[1], a[ks], bb[2], bb[3]);
            }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = r0 + 8 * half;
            if (r < T) {
                float* dst = dq_rows + (long long)r * C3 + pr * 16 + 2 * t;
#pragma unroll
                for (int n = 0; n < 2; ++n) {
                    atomicAdd(dst + n * 8, acc[n][2 * half] * scale);
                    atomicAdd(dst + n * 8 + 1, acc[n][2 * half + 1] * scale);
                }
            }
        }
    }
}

// The key-block backward: dkv's loop, and with ATOMIC_DQ also dQ (attn_mma_atomic_dq) from the
// same dS. The two kernels below instantiate it.
template <int D, bool BIAS, bool ATOMIC_DQ, typename GradT>
__device__ __forceinline__ void attn_mma_backward_keys(
        const cllm_bf16* qkv, const cllm_bf16* dout, const float* lse, const float* delta,
        GradT* dqkv, float* dq_acc, int T, int H, float scale,
        const float* slopes, unsigned drop_seed, const double* drop_step, unsigned drop_site,
        unsigned drop_micro, unsigned drop_threshold, float drop_scale) {
    using Cfg = AttnMmaCfg<D>;
    constexpr int LD = Cfg::LD;
    constexpr int KD = Cfg::KD;
    constexpr int ND = Cfg::ND;
    constexpr int BQ = Cfg::DKV_BQ;
    constexpr int NQ = BQ / 8;
    constexpr int LDS = Cfg::DS_LD;
    extern __shared__ __align__(16) unsigned short mma_smem[];  // DKV_SMEM (ATOMIC_SMEM) bytes
    unsigned short* const Ks = mma_smem;                    // [MMA_ROWS * LD]
    unsigned short* const Vs = Ks + MMA_ROWS * LD;          // [MMA_ROWS * LD]
    unsigned short* const Qbuf = Vs + MMA_ROWS * LD;        // [2][BQ * LD]: tiles i even, odd
    unsigned short* const Gbuf = Qbuf + 2 * BQ * LD;        // [2][BQ * LD]: dO
    float* const Lbuf = reinterpret_cast<float*>(Gbuf + 2 * BQ * LD);  // [2][BQ]: lse log2 e
    float* const Dbuf = Lbuf + 2 * BQ;                                 // [2][BQ]: Delta
    unsigned short* const dSs = reinterpret_cast<unsigned short*>(Dbuf + 2 * BQ);  // [64 * LDS]

    const auto [warp, lane, g, t] = mma_lane();
    const auto [bh, b, h] = attn_head(H);
    const int k0 = blockIdx.x * MMA_ROWS;  // first key tiles have the most work: launch first
    const int c0 = k0 + warp * 16 + g;     // this thread's keys: c0 (c0, c1 regs), c1 (c2, c3)
    const int c1 = c0 + 8;
    const int C = H * D;
    const long long C3 = 3LL * C;
    const cllm_bf16* base = qkv + (long long)b * T * C3 + (long long)h * D;
    const cllm_bf16* gbase = dout + (long long)b * T * C + (long long)h * D;

    // K, V of the block's keys and the first Q, dO tile in one group; then Q, dO, lse and
    // Delta double-buffered: tile n + 1 is loaded while tile n is used
    mma_stage_tile_async<D, MMA_ROWS>(Ks, base + C, C3, k0, T);
    mma_stage_tile_async<D, MMA_ROWS>(Vs, base + 2 * C, C3, k0, T);
    mma_stage_tile_async<D, BQ>(Qbuf, base, C3, k0, T);
    mma_stage_tile_async<D, BQ>(Gbuf, gbase, C, k0, T);
    mma_cp_async_commit();
    attn_mma_stage_rows<BQ>(Lbuf, Dbuf, lse, delta, bh, k0, T);
    float dk[ND][4], dv[ND][4];
    mma_zero(dk);
    mma_zero(dv);
    const int warp_first_key = k0 + warp * 16;
    const AttnScore2<BIAS> score(scale, slopes, h);
    const AttnDropout drop{drop_seed, drop_site, drop_micro, drop_threshold, drop_step,
                           drop_scale, bh, T};

    for (int i0 = k0, n = 0; i0 < T; i0 += BQ, ++n) {
        const unsigned short* const Qs = Qbuf + (n & 1) * BQ * LD;
        const unsigned short* const Gs = Gbuf + (n & 1) * BQ * LD;
        const float* const Ls = Lbuf + (n & 1) * BQ;
        const float* const Ds = Dbuf + (n & 1) * BQ;
        __syncthreads();  // Q, dO tile n - 1 is no longer read: its buffers take tile n + 1
        if (i0 + BQ < T) {
            const int o = (n + 1) & 1;
            mma_stage_tile_async<D, BQ>(Qbuf + o * BQ * LD, base, C3, i0 + BQ, T);
            mma_stage_tile_async<D, BQ>(Gbuf + o * BQ * LD, gbase, C, i0 + BQ, T);
            attn_mma_stage_rows<BQ>(Lbuf + o * BQ, Dbuf + o * BQ, lse, delta, bh, i0 + BQ, T);
        }
        mma_cp_async_commit();
        mma_cp_async_wait<1>();   // Q, dO tile n has landed (this thread's copies)
        __syncthreads();          // (every thread's; and the lse, Delta stores)
        // some query of the tile sees this warp's keys (warp-uniform)
        const bool meets = i0 + BQ > warp_first_key;
        if constexpr (!ATOMIC_DQ) {
            if (!meets) continue;
        }
        if (meets) {
            // bit 4 nq + e: score st[nq][e]'s P is kept
            const unsigned kept =
                drop.on() ? attn_keep_bits(drop, 0, 1, 4 * NQ, ATTN_MMA_LAYOUT | ATTN_KEY_FIXED,
                                           c0, c1, i0 + 2 * t)
                          : ~0u;

            float st[NQ][4], dpt[NQ][4];  // S^T and dP^T: rows = this warp's 16 keys
            mma_zero(st);
            mma_zero(dpt);
            mma_tile_times_rows_t<LD, KD>(st, Ks, warp * 16, Qs, lane);   // S^T = K Q^T
            mma_tile_times_rows_t<LD, KD>(dpt, Vs, warp * 16, Gs, lane);  // dP^T = V dO^T
            const float dist0 = (float)(c0 - i0 - 2 * t);  // j - i of this lane's first score
#pragma unroll
            for (int nq = 0; nq < NQ; ++nq) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int il = nq * 8 + 2 * t + (e & 1);
                    const int i = i0 + il;
                    const int j = e < 2 ? c0 : c1;
                    const bool ok = j <= i && i < T && j < T;
                    const float dist = dist0 + (float)((e < 2 ? 0 : 8) - nq * 8 - (e & 1));
                    const float p = ok ? score.prob(st[nq][e], dist, Ls[il]) : 0.0f;
                    const bool kp = (kept >> (4 * nq + e)) & 1u;
                    // dS^T / scale
                    dpt[nq][e] = p * ((kp ? dpt[nq][e] * drop.scale : 0.0f) - Ds[il]);
                    st[nq][e] = kp ? p : 0.0f;  // dropped P, unscaled (dV is scaled at the end)
                }
            }
            if constexpr (ATOMIC_DQ) mma_store_acc_bf16<LDS>(dSs, dpt, warp * 16, g, t);
            mma_acc_times_cols<LD>(dv, st, Gs, lane);   // dV += P^T dO
            mma_acc_times_cols<LD>(dk, dpt, Qs, lane);  // dK += dS^T Q
        }
        if constexpr (ATOMIC_DQ) {
            __syncthreads();  // every meeting warp's dS rows are in dSs
            // the warps meeting the tile: 0 .. nks - 1 (i0 - k0 and BQ are multiples of 16)
            const int nks = min(MMA_ROWS / 16, (i0 + BQ - k0) / 16);
            // dQ's fp32 rows: dqkv's Q slot (pitch 3C), or a bf16 dqkv's dQ scratch (pitch C)
            if constexpr (sizeof(GradT) == sizeof(float))
                attn_mma_atomic_dq<D, BQ, LDS>(dqkv + (long long)b * T * C3 + (long long)h * D,
                                               C3, dSs, Ks, i0, nks, T, scale, warp, lane, g, t);
            else
                attn_mma_atomic_dq<D, BQ, LDS>(dq_acc + (long long)b * T * C + (long long)h * D,
                                               C, dSs, Ks, i0, nks, T, scale, warp, lane, g, t);
        }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int j = half ? c1 : c0;
        if (j < T) {
            GradT* dst = dqkv + ((long long)b * T + j) * C3 + (long long)h * D + 2 * t;
#pragma unroll
            for (int nd = 0; nd < ND; ++nd) {
                if constexpr (sizeof(GradT) == sizeof(float)) {
                    // (element stores, not attn_store_grad_pair: the same values, but the
                    // atomic-dq kernel's registers moved by up to 3 with the call, NVRTC 12.9)
                    dst[C + nd * 8] = dk[nd][2 * half] * scale;
                    dst[C + nd * 8 + 1] = dk[nd][2 * half + 1] * scale;
                    dst[2 * C + nd * 8] = dv[nd][2 * half] * drop.scale;
                    dst[2 * C + nd * 8 + 1] = dv[nd][2 * half + 1] * drop.scale;
                } else {
                    attn_store_grad_pair(dst + C + nd * 8, dk[nd][2 * half] * scale,
                                         dk[nd][2 * half + 1] * scale);
                    attn_store_grad_pair(dst + 2 * C + nd * 8, dv[nd][2 * half] * drop.scale,
                                         dv[nd][2 * half + 1] * drop.scale);
                }
            }
        }
    }
}

template <int D, bool BIAS = false, typename GradT = float>
__global__ void __launch_bounds__(MMA_THREADS, AttnMmaCfg<D>::DKV_MIN_BLOCKS)
attention_backward_dkv_mma_kernel(
        const cllm_bf16* qkv, const cllm_bf16* dout, const float* lse, const float* delta,
        GradT* dqkv, int T, int H, float scale,
        const float* slopes, unsigned drop_seed, const double* drop_step, unsigned drop_site,
        unsigned drop_micro, unsigned drop_threshold, float drop_scale) {
    attn_mma_backward_keys<D, BIAS, false, GradT>(qkv, dout, lse, delta, dqkv, nullptr, T, H,
                                                  scale, slopes, drop_seed, drop_step, drop_site,
                                                  drop_micro, drop_threshold, drop_scale);
}

// ---- the atomic-dq backward (CLLM_ATTN_BACKWARD=atomic-dq): delta kernel, then this one.
// dQ's fp32 sums go to a float dqkv's Q slot, or for a cllm_bf16 dqkv to dq_acc, a (B, T, C)
// scratch (unread otherwise: the launcher passes dqkv). dq_acc comes last: the parameters
// before it keep the offsets they had without it (the float kernel's code stays the same).
template <int D, bool BIAS = false, typename GradT = float>
__global__ void __launch_bounds__(MMA_THREADS, AttnMmaCfg<D>::ATOMIC_MIN_BLOCKS)
attention_backward_mma_kernel(
        const cllm_bf16* qkv, const cllm_bf16* dout, const float* lse, const float* delta,
        GradT* dqkv, int T, int H, float scale,
        const float* slopes, unsigned drop_seed, const double* drop_step, unsigned drop_site,
        unsigned drop_micro, unsigned drop_threshold, float drop_scale, float* dq_acc) {
    attn_mma_backward_keys<D, BIAS, true, GradT>(qkv, dout, lse, delta, dqkv, dq_acc, T, H,
                                                 scale, slopes, drop_seed, drop_step, drop_site,
                                                 drop_micro, drop_threshold, drop_scale);
}

// Delta (B, H, T) for attention_backward_mma_kernel, as the dq kernel computes it
// (attn_mma_delta: the same bits), and each row's dQ zeroed for its atomicAdds: dq is dqkv's Q
// slot (dq_pitch 3C) or the (B, T, C) fp32 scratch of a bf16 dqkv (dq_pitch C).
// grid: query rows in blocks of 32 (8 per warp, 4 lanes per row), B * H; memory-bound.
template <int D>
__global__ void __launch_bounds__(MMA_THREADS)
attention_backward_delta_kernel(const cllm_bf16* out, const cllm_bf16* dout, float* delta,
                                float* dq_rows, int dq_pitch, int T, int H) {
    constexpr int KD = AttnMmaCfg<D>::KD;
    const auto [warp, lane, g, t] = mma_lane();
    const auto [bh, b, h] = attn_head(H);
    const int r = blockIdx.x * 32 + warp * 8 + g;
    const int C = H * D;
    const cllm_bf16* obase = out + (long long)b * T * C + (long long)h * D;
    const cllm_bf16* gbase = dout + (long long)b * T * C + (long long)h * D;
    const float dl = attn_mma_delta<KD>(gbase, obase, C, r, T, t);
    if (r >= T) return;  // (after the quad's shuffles)
    if (t == 0) delta[(long long)bh * T + r] = dl;
    float* dq = dq_rows + ((long long)b * T + r) * dq_pitch + (long long)h * D;
#pragma unroll
    for (int k = 2 * t; k < D; k += 8) {  // this lane's pairs, as in attn_mma_delta
        dq[k] = 0.0f;
        dq[k + 1] = 0.0f;
    }
}

// atomic-dq with a bf16 dqkv: the fp32 dQ sums (dq, (N, C)) rounded into dqkv's Q columns (row
// pitch 3C), a bf16 pair per 4-byte store, rounded as the cast kernel rounds. Grid-stride over
// the N C / 2 pairs; memory-bound (reads 4 B, writes 2 B per element). A template (<float>) only
// so that a module holds it where a launcher names it (partial and settings builds).
template <typename T>
__global__ void __launch_bounds__(256) attention_dq_to_bf16_kernel(const T* dq, cllm_bf16* dqkv,
                                                                   long long pairs, int C) {
    const int row_pairs = C / 2;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += stride) {
        const long long row = i / row_pairs;
        const int c = 2 * (int)(i - row * row_pairs);
        *reinterpret_cast<unsigned*>(dqkv + row * 3LL * C + c) =
            cllm_pack_bf16x2(dq[2 * i], dq[2 * i + 1]);
    }
}
