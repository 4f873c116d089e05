// LayerNorm over the last dimension of x (N, C).
//
// forward: one warp per row, two passes over the row (mean, then centred variance), then the
//   normalised output, stored as OutT (T, or cllm_bf16 when the output only feeds a bf16
//   matrix product: no float copy and no separate cast); writes mean and rstd =
//   1 / sqrt(var + eps) in T for the backward. A row whose sum or sum of squares overflows
//   (finite values, a mean past ~FLT_MAX / C or a spread past ~sqrt(FLT_MAX / C)) is done
//   again scaled by a power of two (layernorm_row_scaled); other rows never take that branch.
//   Its rstd is stored rounded, also where it is a denormal (ln_times_scale: -ftz=true would
//   flush it to 0); the backward reads a row of rstd below that power of two scaled too.
// backward, two launches: dout and x are read once.
//   1. layernorm_backward_kernel: a team of warps per row holds its dout and x in registers,
//      pools the two row sums (one __syncthreads), writes
//      dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) * rstd,  dxhat = dout * weight,
//      plus dresidual when given (the residual stream's gradient added in the same pass), and
//      keeps per-column running sums of dout and dout * xhat over the block's rows; the block's
//      teams add theirs in a fixed order -> partial[block][c] for dbias and dweight.
//   2. cllm_colsum_finalize_kernel (common.cuh), both sums in one launch: the blocks' partials
//      summed in a fixed order and added into dbias / dweight (deterministic, no atomics).
//   Napkin math (N = 16384, C = 768, float32, with dresidual): 256 blocks of 64 rows, each 5
//   teams of 3 warps (480 threads, 64 registers: 2 blocks per SM, 10 rows in flight); reads
//   dout, x, dresidual (151 MB), writes dx (50 MB), 1.6 MB of partials written and read:
//   ~205 MB, ~51 us at 4 TB/s. The three-launch design it replaced (a partials kernel, then a
//   dx kernel, each reading dout and x) moved ~305 MB.
#include "common.cuh"

#define LN_WARPS 8            // rows per block in the forward kernels (256 threads)

// Rows whose sums overflow (float32: a mean past ~FLT_MAX / C, a spread past ~sqrt(FLT_MAX / C),
// 6.7e17 at C = 768) are done again scaled by the power of two k (exact): |x k - mean k| <=
// 2^(maxexp + 1) k, so fewer than 2^31 of their squares sum to a finite value (2^-81 in float32,
// 2^-529 in double; ops/layernorm.py's _overflow_scale). Only rows that overflowed take it.
template <typename T> __device__ __forceinline__ T ln_overflow_scale();
template <> __device__ __forceinline__ float ln_overflow_scale<float>() {
    return __int_as_float((127 - 81) << 23);
}
template <> __device__ __forceinline__ double ln_overflow_scale<double>() {
    return __longlong_as_double((long long)(1023 - 529) << 52);
}

// rk k exactly, rounded to nearest even also where it is a denormal (rk > 0 finite: the rstd
// of a scaled row, k / std(x k)): -ftz=true would flush that product to 0, and rstd is below
// FLT_MIN for a float32 std past 8.5e37. The bits are built from rk's with integer operations
// (q: the denormal's significand; the GPU keeps double denormals, the emulator flushes them).
template <typename T> struct LnBits;
template <> struct LnBits<float> {
    typedef unsigned U;
    static constexpr int mant = 23, scale_exp = 81;
    static __device__ __forceinline__ U bits(float x) { return __float_as_uint(x); }
    static __device__ __forceinline__ float value(U u) { return __uint_as_float(u); }
};
template <> struct LnBits<double> {
    typedef unsigned long long U;
    static constexpr int mant = 52, scale_exp = 529;
    static __device__ __forceinline__ U bits(double x) {
        return (unsigned long long)__double_as_longlong(x);
    }
    static __device__ __forceinline__ double value(U u) {
        return __longlong_as_double((long long)u);
    }
};

template <typename T>
__device__ __forceinline__ T ln_times_scale(T rk) {
    typedef LnBits<T> B;
    typedef typename B::U U;
    const U u = B::bits(rk);
    const int e = (int)(u >> B::mant);                // (rk > 0: no sign bit)
    if (e > B::scale_exp) return rk * ln_overflow_scale<T>();   // a normal product: exact
    const U m = (u & ((U(1) << B::mant) - 1)) | (U(1) << B::mant);
    const int shift = min(B::scale_exp + 1 - e, B::mant + 2);   // >= 1
    U q = m >> shift;
    const U rem = m & ((U(1) << shift) - 1), half = U(1) << (shift - 1);
    q += (rem > half || (rem == half && (q & 1))) ? 1 : 0;      // (q 2^mant: the least normal)
    return B::value(q);
}

// r / k exactly for |r| < k (a stored rstd of a row done scaled, maybe a denormal, which
// -ftz=true reads as 0): a normal r times 1 / k, a denormal's significand q as q 2^-(minexp
// + mant - scale_exp), both normal floats.
template <typename T> __device__ __forceinline__ T ln_unscale(T r);
template <> __device__ __forceinline__ float ln_unscale<float>(float r) {
    const unsigned u = __float_as_uint(r);
    if (u & 0x7f800000u) return r * __int_as_float((127 + 81) << 23);
    const float q = (float)(int)(u & 0x007fffffu) * __int_as_float((127 + 81 - 149) << 23);
    return (u >> 31) ? -q : q;
}
template <> __device__ __forceinline__ double ln_unscale<double>(double r) {
    const long long u = __double_as_longlong(r);
    if (u & 0x7ff0000000000000LL) return r * __longlong_as_double((long long)(1023 + 529) << 52);
    const double q = (double)(u & 0x000fffffffffffffLL) *
                     __longlong_as_double((long long)(1023 + 529 - 1074) << 52);
    return u < 0 ? -q : q;
}

// The mean of a row whose plain sum overflowed, from the row scaled by k, plus the mean of the
// scaled row centred on it (a constant row's mean is then its value: its output the bias). A
// row with a NaN or inf keeps the non-finite mean mu, as without this path.
template <typename T>
__device__ __forceinline__ T ln_scaled_mean(const T* xr, int C, int lane, T mu) {
    const T k = ln_overflow_scale<T>();
    T s = T(0);
    for (int c = lane; c < C; c += 32) s += xr[c] * k;
    T mk = warp_sum(s) / T(C);
    s = T(0);
    for (int c = lane; c < C; c += 32) s += xr[c] * k - mk;
    mk += warp_sum(s) / T(C);
    return cllm_isfinite(mk) ? mk / k : mu;
}

// The variance and output of a row of finite values (mu finite) whose sum of squares
// overflowed, on the row scaled by k: rstd = k / std(x k). eps (k^2 eps: 0 in float32) is below
// the rounding of any variance that overflows (> FLT_MAX / C).
template <typename T, typename OutT>
__device__ __forceinline__ void layernorm_row_scaled(const T* xr, const T* weight,
                                                     const T* bias, OutT* orow, T* mean,
                                                     T* rstd, long long row, int C, T mu,
                                                     int lane) {
    const T k = ln_overflow_scale<T>();
    const T mk = mu * k;
    T v = T(0);
    for (int c = lane; c < C; c += 32) {
        const T d = xr[c] * k - mk;
        v += d * d;
    }
    const T rk = T(1) / cllm_sqrt(warp_sum(v) / T(C));
    for (int c = lane; c < C; c += 32)
        cllm_store(orow + c, (xr[c] * k - mk) * rk * weight[c] + bias[c]);
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = ln_times_scale(rk);  // (below FLT_MIN for a std past 8.5e37: kept)
    }
}

// One row of LayerNorm by one warp: xr -> orow (lane l owns columns l, l + 32, ...).
template <typename T, typename OutT>
__device__ __forceinline__ void layernorm_row(const T* xr, const T* weight, const T* bias,
                                              OutT* orow, T* mean, T* rstd, long long row,
                                              int C, T eps, int lane) {
    T s = T(0);
    for (int c = lane; c < C; c += 32) s += xr[c];
    T mu = warp_sum(s) / T(C);
    if (!cllm_isfinite(mu)) mu = ln_scaled_mean(xr, C, lane, mu);  // (the same in every lane)
    T v = T(0);
    for (int c = lane; c < C; c += 32) {
        const T d = xr[c] - mu;
        v += d * d;
    }
    const T vs = warp_sum(v);
    if (!cllm_isfinite(vs) && cllm_isfinite(mu)) {  // overflowed, every value finite
        layernorm_row_scaled(xr, weight, bias, orow, mean, rstd, row, C, mu, lane);
        return;
    }
    const T r = T(1) / cllm_sqrt(vs / T(C) + eps);
    for (int c = lane; c < C; c += 32) cllm_store(orow + c, (xr[c] - mu) * r * weight[c] + bias[c]);
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
}

template <typename T, typename OutT>
__global__ void __launch_bounds__(256) layernorm_forward_kernel(
        const T* x, const T* weight, const T* bias, OutT* out, T* mean, T* rstd,
        int N, int C, T eps) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * LN_WARPS + (threadIdx.x >> 5);
    if (row >= N) return;  // whole warp leaves together; no block-wide sync below
    layernorm_row(x + row * C, weight, bias, out + row * C, mean, rstd, row, C, eps, lane);
}

// The residual add of a block's branch fused with the LayerNorm that reads its result:
//   sum = x + dropout(y + y_bias)   (the residual stream, written: the backward reads it)
//   out = LayerNorm(sum)            (the next matrix product's input, in OutT)
// One warp per row; each lane reads back only the sums it wrote (no sync). With use_dropout,
// element row * C + c keeps when word (e % 4) of the site's Philox draw for e / 4 is >=
// threshold (common.cuh, ops/dropout.py): the mask dropout_kernel would draw.
// Replaces a bias pass, an add pass and the LayerNorm's re-read of the sum: ~3 (N, C) passes.
// YT: y's storage, T or cllm_bf16 (the bf16 model's projection GEMMs write the branch in bf16).
template <typename T, typename YT, typename OutT>
__global__ void __launch_bounds__(256) residual_layernorm_forward_kernel(
        const T* x, const YT* y, const T* y_bias, int use_bias, T* sum, const T* weight,
        const T* bias, OutT* out, T* mean, T* rstd, int N, int C, T eps, int use_dropout,
        unsigned seed, const double* step, unsigned site, unsigned micro, unsigned threshold,
        T scale) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * LN_WARPS + (threadIdx.x >> 5);
    if (row >= N) return;
    CllmDropout d;
    if (use_dropout) {
        d.seed = seed;
        d.step = (unsigned)step[0];
        d.site = site;
        d.micro = micro;
        d.threshold = threshold;
    }
    const T* xr = x + row * C;
    const YT* yr = y + row * C;
    T* sr = sum + row * C;
    for (int c = lane; c < C; c += 32) {
        T b = cllm_load(yr + c);
        if (use_bias) b += y_bias[c];
        if (use_dropout) {
            const unsigned long long e = (unsigned long long)row * C + c;
            b = d.draw4(e >> 2).v[e & 3] >= d.threshold ? b * scale : T(0);
        }
        sr[c] = xr[c] + b;
    }
    layernorm_row(sr, weight, bias, out + row * C, mean, rstd, row, C, eps, lane);
}

// Columns of a row each backward thread holds in registers: 32 bytes of dout and of x (8
// floats, 4 doubles; 64 bytes took 127 registers in float32, sm_90 ptxas: too few blocks per
// SM). A row of C columns takes a team of ceil(C / (32 * V)) warps, at most LN_BWD_MAX_WARPS
// (C <= 4096 in float32, 2048 in float64; ops/layernorm.py checks).
template <typename T> __device__ constexpr int ln_bwd_cols() { return 32 / (int)sizeof(T); }
#define LN_BWD_MAX_WARPS 16   // warps per block (512 threads): one team, or several smaller ones

// grid (blocks), block (teams * team_warps * 32); block b owns rows [b * rows_per_block, ...).
// Its teams take the block's rows in turn (team t: rows r0 + t, r0 + t + teams, ...), all in
// step (one __syncthreads per row, where the team's warps pool their two row sums). Thread tt
// of a team owns columns tt + 32 * team_warps * j, j < V: it reads their dout and x once,
// keeps them in registers for dx, and adds dout and dout * xhat into its running column sums
// (rows in order). At the end the teams' sums are added in team order:
// partial[0][block][c] (dbias), partial[1][block][c] (dweight).
// Every element of dout, x and dresidual is read by the thread that writes that element of dx,
// before it writes it: dx may alias any of them, in place with the same storage (the launcher
// refuses any other overlap). DoutT: T, or cllm_bf16 when dout comes from a bf16-output GEMM
// (the bf16 model's c_fc, c_attn and classifier backward: half the bytes).
template <typename T, typename DoutT>
__global__ void __launch_bounds__(512) layernorm_backward_kernel(
        const DoutT* dout, const T* x, const T* weight, const T* mean, const T* rstd, T* dx,
        const T* dresidual, int use_residual, T* partial, int N, int C, int team_warps,
        int rows_per_block) {
    constexpr int V = ln_bwd_cols<T>();
    __shared__ T row_sums[2][LN_BWD_MAX_WARPS][2];   // [row parity][warp][sum of dxhat, * xhat]
    __shared__ T col_sums[2][32 * LN_BWD_MAX_WARPS]; // [dbias, dweight][thread], one j at a time
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int team_threads = 32 * team_warps;
    const int teams = blockDim.x / team_threads;
    const int team = threadIdx.x / team_threads, tt = threadIdx.x % team_threads;
    const long long r0 = (long long)blockIdx.x * rows_per_block;
    const long long r1 = r0 + rows_per_block < N ? r0 + rows_per_block : N;
    T db[V], dw[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        db[j] = T(0);
        dw[j] = T(0);
    }
    const T inv_c = T(1) / T(C);  // (one division: a double or IEEE division is a call)
    const int iters = (rows_per_block + teams - 1) / teams;
    for (int it = 0; it < iters; ++it) {
        const long long row = r0 + (long long)it * teams + team;
        const bool live = row < r1;  // the same for the whole team: whole warps
        T dxhat[V], xhat[V];  // dxhat: first dout, then dout * weight
        T a = T(0), b = T(0), r = T(0);
        // A row of rstd below k (a std past 2^81 in float32, 2^529 in double) is read scaled
        // by k: its x - mean may pass the largest float, and an rstd below FLT_MIN reads as 0
        // under -ftz=true. xhat = (x xs - xm) r and dx = t post r (t = dxhat - a - xhat b),
        // with xs = post = k, xm = mean k and r = rstd / k there; other rows take xs = post =
        // 1, xm = mean (x 1 - mean and t 1 are exact: the same bits as x - mean and t).
        if (live) {
            T xs = T(1), xm = mean[row];
            r = rstd[row];
            if (r < ln_overflow_scale<T>()) {  // (false for a NaN: such rows stay NaN)
                xs = ln_overflow_scale<T>();
                xm *= xs;
                r = ln_unscale(r);
            }
            const DoutT* dr = dout + row * C;
            const T* xr = x + row * C;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const int c = tt + team_threads * j;
                dxhat[j] = c < C ? T(cllm_load(dr + c)) : T(0);
                xhat[j] = c < C ? (xr[c] * xs - xm) * r : T(0);
            }
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const int c = tt + team_threads * j;
                db[j] += dxhat[j];
                dw[j] += dxhat[j] * xhat[j];
                dxhat[j] *= c < C ? weight[c] : T(0);  // (weight: an L1 hit after the first row)
                a += dxhat[j];
                b += dxhat[j] * xhat[j];
            }
        }
        a = warp_sum(a);
        b = warp_sum(b);
        if (lane == 0) {
            row_sums[it & 1][warp][0] = a;
            row_sums[it & 1][warp][1] = b;
        }
        __syncthreads();  // (the other parity's slots, read last row, are written next row)
        if (live) {
            a = T(0);
            b = T(0);
            for (int k = 0; k < team_warps; ++k) {  // the team's warps in order
                a += row_sums[it & 1][team * team_warps + k][0];
                b += row_sums[it & 1][team * team_warps + k][1];
            }
            a *= inv_c;
            b *= inv_c;
            // (rstd read again, not kept over the loops: one more live register, and ptxas
            // spilled 8 bytes in float32 at its 64)
            const T post = rstd[row] < ln_overflow_scale<T>() ? ln_overflow_scale<T>() : T(1);
            T* o = dx + row * C;
            const T* rr = dresidual + row * C;  // only read with use_residual
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const int c = tt + team_threads * j;
                if (c < C) {
                    // (post before r: with a residual NVVM fuses the last product into the
                    // add, and an ordinary row's dx + dresidual stays fma(t, r, rr), one
                    // rounding; t r post fused post and rounded t r apart)
                    const T g = (dxhat[j] - a - xhat[j] * b) * post * r;
                    o[c] = use_residual ? g + rr[c] : g;
                }
            }
        }
    }
    // the teams' column sums, added in team order, one column slot j at a time
    T* pb = partial + (long long)blockIdx.x * C;
    T* pw = partial + ((long long)gridDim.x + blockIdx.x) * C;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        const int c = tt + team_threads * j;
        __syncthreads();  // the previous slot's sums are read
        col_sums[0][threadIdx.x] = db[j];
        col_sums[1][threadIdx.x] = dw[j];
        __syncthreads();
        if (team == 0 && c < C) {
            T sb = T(0), sw = T(0);
            for (int t = 0; t < teams; ++t) {
                sb += col_sums[0][t * team_threads + tt];
                sw += col_sums[1][t * team_threads + tt];
            }
            pb[c] = sb;
            pw[c] = sw;
        }
    }
}

