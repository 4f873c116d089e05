// LayerNorm over the last dimension of x (N, C).
//
// forward: one warp per row, two passes over the row (mean, then centred variance), then the
//   normalised output, stored as OutT (T, or cllm_bf16 when the output only feeds a bf16
//   matrix product: no float copy and no separate cast); writes mean and rstd =
//   1 / sqrt(var + eps) in T for the backward.
// backward, three launches in this order (so dx may alias dout or x):
//   1. layernorm_param_partials_kernel: block (channel chunk of 32, row chunk); each thread
//      walks its rows in order, then the 8 row-lanes are summed in a fixed order ->
//      partial[row_chunk][c] for dbias and dweight.
//   2. layernorm_param_finalize_kernel: thread per channel sums the row-chunk partials in
//      order and adds them into dweight / dbias (deterministic, no atomics).
//   3. layernorm_dx_kernel: one warp per row,
//      dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) * rstd,  dxhat = dout * weight,
//      plus dresidual when given (the residual stream's gradient added in the same pass).
#include "common.cuh"

#define LN_WARPS 8            // rows per block in the per-row kernels (256 threads)

// One row of LayerNorm by one warp: xr -> orow (lane l owns columns l, l + 32, ...).
template <typename T, typename OutT>
__device__ __forceinline__ void layernorm_row(const T* xr, const T* weight, const T* bias,
                                              OutT* orow, T* mean, T* rstd, long long row,
                                              int C, T eps, int lane) {
    T s = T(0);
    for (int c = lane; c < C; c += 32) s += xr[c];
    const T mu = warp_sum(s) / T(C);
    T v = T(0);
    for (int c = lane; c < C; c += 32) {
        const T d = xr[c] - mu;
        v += d * d;
    }
    const T r = T(1) / cllm_sqrt(warp_sum(v) / T(C) + eps);
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
template <typename T, typename OutT>
__global__ void __launch_bounds__(256) residual_layernorm_forward_kernel(
        const T* x, const T* y, const T* y_bias, int use_bias, T* sum, const T* weight,
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
    const T* yr = y + row * C;
    T* sr = sum + row * C;
    for (int c = lane; c < C; c += 32) {
        T b = yr[c];
        if (use_bias) b += y_bias[c];
        if (use_dropout) {
            const unsigned long long e = (unsigned long long)row * C + c;
            b = d.draw4(e >> 2).v[e & 3] >= d.threshold ? b * scale : T(0);
        }
        sr[c] = xr[c] + b;
    }
    layernorm_row(sr, weight, bias, out + row * C, mean, rstd, row, C, eps, lane);
}

// grid (ceil(C / 32), n_chunks), block 256 = 32 channels x 8 row-lanes.
// partial layout: [2][n_chunks][C]: first dbias partials, then dweight partials.
template <typename T>
__global__ void __launch_bounds__(256) layernorm_param_partials_kernel(
        const T* dout, const T* x, const T* mean, const T* rstd, T* partial,
        int N, int C, int rows_per_chunk) {
    __shared__ T sb[CLLM_COLSUM_ROWLANES][33];
    __shared__ T sw[CLLM_COLSUM_ROWLANES][33];
    const CllmColTile t(N, rows_per_chunk);
    T db = T(0), dw = T(0);
    if (t.c < C) {
        for (long long r = t.r0 + t.ty; r < t.r1; r += CLLM_COLSUM_ROWLANES) {
            const T dy = dout[r * C + t.c];
            const T xhat = (x[r * C + t.c] - mean[r]) * rstd[r];
            db += dy;
            dw += dy * xhat;
        }
    }
    cllm_colsum_partial(sb, db, t, C, partial);
    cllm_colsum_partial(sw, dw, t, C, partial + (long long)gridDim.y * C);
}

template <typename T>
__global__ void __launch_bounds__(256)
layernorm_param_finalize_kernel(const T* partial, T* dweight, T* dbias, int C, int n_chunks) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    T b = T(0), w = T(0);
    for (int k = 0; k < n_chunks; ++k) {
        b += partial[(long long)k * C + c];
        w += partial[((long long)n_chunks + k) * C + c];
    }
    dbias[c] += b;
    dweight[c] += w;
}

template <typename T>
__global__ void __launch_bounds__(256) layernorm_dx_kernel(
        const T* dout, const T* x, const T* weight, const T* mean, const T* rstd, T* dx,
        const T* dresidual, int use_residual, int N, int C) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * LN_WARPS + (threadIdx.x >> 5);
    if (row >= N) return;
    const T* dr = dout + row * C;
    const T* xr = x + row * C;
    const T mu = mean[row];
    const T r = rstd[row];
    T a = T(0), b = T(0);
    for (int c = lane; c < C; c += 32) {
        const T dxhat = dr[c] * weight[c];
        a += dxhat;
        b += dxhat * ((xr[c] - mu) * r);
    }
    a = warp_sum(a) / T(C);
    b = warp_sum(b) / T(C);
    T* o = dx + row * C;
    const T* rr = dresidual + row * C;  // only read with use_residual
    for (int c = lane; c < C; c += 32) {  // read dout[c], x[c] then write dx[c]: alias-safe
        const T dxhat = dr[c] * weight[c];
        const T xhat = (xr[c] - mu) * r;
        const T g = (dxhat - a - xhat * b) * r;
        o[c] = use_residual ? g + rr[c] : g;
    }
}
