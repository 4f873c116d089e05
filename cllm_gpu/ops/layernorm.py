"""LayerNorm over the last dimension.

forward:  x (..., C), weight (C,), bias (C,) -> out (..., C), mean (N,), rstd (N,)
          N = the product of the leading dimensions (a contiguous x is read as (N, C))
backward: dout (..., C) -> dx (..., C); dweight, dbias (C,) are accumulated (+=)

`out` decides its storage: a bf16 `out` (ops/cast.py, from a float32 x) gets the output
rounded to bf16, for a tensor whose only reader is a bf16 matrix product; mean and rstd stay
in x's dtype.

residual_layernorm_forward: a block's residual add fused with the LayerNorm that reads it:
          sum = x + dropout(y + y_bias) (written: the residual stream), out = LayerNorm(sum);
          one pass instead of a bias pass, an add pass and the LayerNorm's read (the bias of
          the branch's last linear layer is added here instead of after its GEMM). y, that
          GEMM's output, may be bf16 storage from a float32 x: read as the values it holds.
layernorm_backward(..., dresidual=r): dx = LayerNorm's dx + r, the residual stream's gradient
          added in the same pass. dout may be in bf16 storage (from a float32 x: what a
          bf16-output GEMM wrote, the bf16 model's dln and dlnf): read as the float32 values
          it holds; dx and the sums stay float.
"""
import numpy as np

from . import _cuda as _cu
from ._common import CHUNK, check_array, check_float, is_device_array
from .cast import check_storage, is_bf16, round_bf16
from .dropout import check_key, dropout_ref, kernel_args as dropout_kernel_args, threshold
from .host_threads import run_chunks

# elements per chunk of rows of the NumPy references (measured best, 2 cores, (2048, 256):
# 1 -> 2 threads, residual forward 1.0 -> 0.64 ms, backward 1.6 -> 1.1 ms)
LN_CHUNK = 2 * CHUNK


def _chunk_rows(C):
    """Rows per chunk of the references: a chunk's handful of (rows, C) arrays stay in L2 while
    its chain of ufuncs runs (the sums are matrix-vector products against ones / weight: BLAS
    gemv, ~2x `.sum` / `.mean` on 256-wide rows)."""
    return max(1, LN_CHUNK // max(C, 1))


def _layernorm_rows(x, weight, bias, eps, out, mean, rstd):
    """LayerNorm of the rows x (n, C) into out (float, apart from x), mean and rstd (n,)."""
    C = x.shape[1]
    inv_c = np.full(C, 1.0 / C, dtype=x.dtype)
    np.matmul(x, inv_c, out=mean)
    xc = np.subtract(x, mean[:, None], out=out)
    np.einsum("ij,ij->i", xc, xc, out=rstd)          # C var
    # rows far from zero against their spread (|mean| > 8 std): a float32 sum of rows at a
    # large offset (1e4, spread 1e-2) left the mean off by a fraction of the spread (LayerNorm
    # 0.5 off; a constant row gave bias + 0.3 w): plus the mean of the centred row (small, and
    # exact enough), centred again. Other rows skip those two passes: their mean's error is
    # under C eps 8 std (it cost every call ~25 % at (2048, 128)). Rows whose sum of squares
    # overflowed go through it too (a constant 1e36 row: a mean an ulp off, its square inf).
    # The 64 goes with C on the left: 64 C var overflowed from a spread of ~8.3e16 at C = 768
    # (inf > inf skipped rows at 1e23 spread 1e17); an overflowed mean^2 is rightly far
    far = np.flatnonzero((mean * mean * (C / 64) > rstd) | ~np.isfinite(rstd))
    if far.size:
        mean[far] += xc[far] @ inv_c
        xf = np.subtract(x[far], mean[far, None], dtype=xc.dtype)  # (a constant row: 0)
        xc[far] = xf
        rstd[far] = np.einsum("ij,ij->i", xf, xf)
    rstd /= C
    rstd += eps
    np.sqrt(rstd, out=rstd)
    np.reciprocal(rstd, out=rstd)
    xc *= rstd[:, None]
    xc *= weight
    xc += bias


def _overflow_scale(dtype):
    """A power of two k: |x k - mean k| <= 2^(maxexp + 1) k = 2^(maxexp / 2 - 16), so a sum of
    fewer than 2^31 squares of them stays below 2^(maxexp - 1), finite (float32: 2^-81)."""
    return np.ldexp(np.array(1.0, dtype), -(np.finfo(dtype).maxexp // 2 + 17))


def _layernorm_overflowed_rows(x, weight, bias, eps, out, mean, rstd):
    """Rows of finite values whose sum of squares overflowed (float32: a spread past ~6.7e17
    at C = 768; also x - mean past the largest float): rstd came out 0 (or NaN), the output the
    bias. Each such row again, scaled by the power of two k (exact): the output is the scaled
    row's, mean / k and rstd k its statistics (eps k^2, 0 in float32, is below any such
    variance's rounding). Rows with a NaN or inf keep their NaN, as before."""
    rows = np.flatnonzero(~(rstd > 0))
    rows = rows[np.isfinite(x[rows]).all(axis=1)]
    if rows.size == 0:
        return
    k = _overflow_scale(x.dtype)
    o, m, r = np.empty((rows.size, x.shape[1]), x.dtype), np.empty_like(mean[rows]), \
        np.empty_like(rstd[rows])
    _layernorm_rows(x[rows] * k, weight, bias, eps * k * k, o, m, r)
    out[rows], mean[rows], rstd[rows] = o, m / k, r * k


def layernorm_forward_ref(x, weight, bias, eps=1e-5, out=None, mean=None, rstd=None,
                          _branch=None):
    """_branch (y, y_bias): the residual form, x (then sum_out) = x + y + y_bias built per
    chunk just before its LayerNorm (residual_layernorm_forward_ref)."""
    N, C = x.shape
    mean = np.empty(N, dtype=x.dtype) if mean is None else mean
    rstd = np.empty(N, dtype=x.dtype) if rstd is None else rstd
    # written straight into out when that is a float array apart from x, else into a float
    # result then copied (rounded for a bf16 out)
    direct = out is not None and not is_bf16(out) and not np.may_share_memory(out, x)
    res = out if direct else np.empty(x.shape, dtype=x.dtype)
    step = _chunk_rows(C)

    def rows(c, s, _):
        if _branch is not None:
            y, y_bias, residual = _branch
            if y_bias is None:
                x[s] = y[s]
            else:
                np.add(y[s], y_bias, out=x[s])
            x[s] += residual[s]
        _layernorm_rows(x[s], weight, bias, eps, res[s], mean[s], rstd[s])

    run_chunks(N, step, rows)
    if not (rstd > 0).all():   # (a NaN fails too)
        _layernorm_overflowed_rows(x, weight, bias, eps, res, mean, rstd)
    if out is None:
        out = res
    elif not direct:
        out[...] = round_bf16(res) if is_bf16(out) else res
    return out, mean, rstd


def residual_layernorm_forward_ref(x, y, weight, bias, eps, sum_out, out, mean, rstd,
                                   y_bias=None, p=0.0, key=None):
    y = y.view(np.float32) if is_bf16(y) else y   # its values, untagged: sums are not rounded
    if p == 0.0 and not any(np.may_share_memory(sum_out, a) for a in (x, y, out)):
        # sum_out = y + y_bias + x (= x + branch, bitwise: addition commutes) built chunk by
        # chunk right before the chunk's LayerNorm reads it
        return layernorm_forward_ref(sum_out, weight, bias, eps, out, mean, rstd,
                                     _branch=(y, y_bias, x))
    if np.may_share_memory(sum_out, x):   # x is read last below: build the branch elsewhere
        branch = y if y_bias is None else y + y_bias
        np.add(x, branch if p == 0.0 else dropout_ref(branch, p, key), out=sum_out)
    else:                                  # the branch built in sum_out: no temporaries
        if y_bias is None:
            sum_out[...] = y
        else:
            np.add(y, y_bias, out=sum_out)
        if p != 0.0:
            dropout_ref(sum_out, p, key, out=sum_out)
        sum_out += x                       # = x + branch, bitwise (addition commutes)
    return layernorm_forward_ref(sum_out, weight, bias, eps, out, mean, rstd)


def _xhat_scaled(x, mean, rstd, k):
    """(x - mean) rstd of rows (n, C) of rstd below the power of two k, as (x k - mean k)
    (rstd / k): finite where x - mean passes the largest float (a row of -3e38 and 3e38), and
    the same bits as (x - mean) rstd wherever neither under- nor overflows (k is exact)."""
    return np.subtract(x * k, (mean * k)[:, None]) * (rstd / k)[:, None]


def layernorm_backward_ref(dout, x, weight, mean, rstd, dweight, dbias, dx=None,
                           dresidual=None, scratch=None):
    # scratch: the CUDA launcher's workspace, unused here (the signature is the launcher's)
    # dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dout * weight, chunk by chunk of rows:
    # the row and column sums as matrix-vector products, dx built in place (in dx itself
    # unless it aliases an input)
    N, C = x.shape
    if N == 0:   # no rows: nothing to add to dweight and dbias (as the launcher)
        return np.empty(x.shape, dtype=x.dtype) if dx is None else dx
    inputs = (dout, x) if dresidual is None else (dout, x, dresidual)
    direct = dx is not None and not any(np.may_share_memory(dx, t) for t in inputs)
    res = dx if direct else np.empty(x.shape, dtype=x.dtype)
    step = min(_chunk_rows(C), N)
    n_chunks = -(-N // step)
    ones = np.ones(step, dtype=x.dtype)
    w_c = weight / C
    # each chunk's column sums (dweight, dbias), added in chunk order below: the same sums
    # whatever the number of threads
    col_sums = np.empty((n_chunks, 2, C), dtype=x.dtype)

    # rows of rstd below the overflow scale k (a std past 2^81 in float32, 2^529 in float64):
    # x - mean may pass the largest float there (xhat inf, dx NaN; any row where it does has
    # an rstd below sqrt(C) 2^-128 in float32), so their xhat is taken scaled by k
    k = _overflow_scale(x.dtype)
    scaled = bool((rstd < k).any())   # (a NaN rstd: not such a row, it stays NaN)

    def rows(c, s, bufs):   # bufs: the piece's xhat and product buffers
        n = s.stop - s.start
        d, r = dout[s], rstd[s, None]
        tiny = np.flatnonzero(rstd[s] < k) if scaled else ()
        xhat = np.subtract(x[s], mean[s, None], out=bufs[0, :n])
        xhat *= r
        if len(tiny):
            xhat[tiny] = _xhat_scaled(x[s][tiny], mean[s][tiny], rstd[s][tiny], k)
        prod = np.multiply(d, xhat, out=bufs[1, :n])   # for dweight and mean(g xhat)
        np.matmul(ones[:n], prod, out=col_sums[c, 0])
        np.matmul(ones[:n], d, out=col_sums[c, 1])
        b = prod @ w_c                                  # mean(g xhat) per row
        xhat *= b[:, None]
        xhat += (d @ w_c)[:, None]                      # + mean(g) per row
        g = np.multiply(d, weight, out=res[s])
        g -= xhat
        g *= r
        if dresidual is not None:
            g += dresidual[s]

    run_chunks(N, step, rows, scratch=lambda: np.empty((2, step, C), dtype=x.dtype))
    for c in range(n_chunks):
        dweight += col_sums[c, 0]
        dbias += col_sums[c, 1]
    if dx is None or direct:
        return res
    dx[...] = res
    return dx


def _rows(name, a, C):
    """a (..., C) as a contiguous (N, C) view (None stays None)."""
    if a is None:
        return None
    check_array(name, a)
    if a.ndim < 1 or a.shape[-1] != C:
        raise ValueError(f"{name}: expected shape (..., {C}), got {tuple(a.shape)}")
    return a.reshape(-1, C)


def _check_params(x, weight, bias):
    check_array("x", x)
    check_float("x", x)
    if x.ndim < 1:
        raise ValueError("x: LayerNorm needs at least one dimension")
    C = x.shape[-1]
    if C == 0:   # no mean nor variance: refused here for both backends (whatever N)
        raise ValueError("x: LayerNorm over 0 channels")
    check_array("weight", weight, shape=(C,), dtype=x.dtype)
    check_array("bias", bias, shape=(C,), dtype=x.dtype)
    return C


def layernorm_forward(x, weight, bias, eps=1e-5, out=None, mean=None, rstd=None):
    """out, mean, rstd (see the module docstring); out keeps x's shape."""
    C = _check_params(x, weight, bias)
    if out is not None:
        check_array("out", out, shape=x.shape)
        check_storage("out", out, x)
    x2, out2 = _rows("x", x, C), _rows("out", out, C)
    if is_device_array(x):
        r = layernorm_forward_cuda(x2, weight, bias, eps, out2, mean, rstd)
    else:
        r = layernorm_forward_ref(x2, weight, bias, eps, out2, mean, rstd)
    return (out if out is not None else r[0].reshape(x.shape)), r[1], r[2]


def residual_layernorm_forward(x, y, weight, bias, eps, sum_out, out, mean, rstd,
                               y_bias=None, p=0.0, key=None):
    """sum_out = x + dropout(y + y_bias, p, key); out, mean, rstd = LayerNorm(sum_out).
    x, sum_out (..., C) float; y and out (..., C) x's dtype or bf16 storage; returns out, mean,
    rstd (see the module docstring)."""
    C = _check_params(x, weight, bias)
    check_array("sum_out", sum_out, shape=x.shape, dtype=x.dtype)
    check_array("y", y, shape=x.shape)
    check_storage("y", y, x)
    if y_bias is not None:
        check_array("y_bias", y_bias, shape=(C,), dtype=x.dtype)
    check_array("out", out, shape=x.shape)
    check_storage("out", out, x)
    threshold(p)
    if p > 0.0:   # as dropout() checks it: the kernel reads key.step through a double pointer
        check_key(key, x)
    rows = [_rows(n, a, C) for n, a in (("x", x), ("y", y), ("sum_out", sum_out), ("out", out))]
    if is_device_array(x):
        return residual_layernorm_forward_cuda(*rows[:2], weight, bias, eps, rows[2], rows[3],
                                               mean, rstd, y_bias, p, key)
    return residual_layernorm_forward_ref(*rows[:2], weight, bias, eps, rows[2], rows[3], mean,
                                          rstd, y_bias, p, key)


def layernorm_backward(dout, x, weight, mean, rstd, dweight, dbias, dx=None, dresidual=None,
                       scratch=None):
    """dx (x's shape) [+ dresidual]; accumulates into dweight and dbias.
    scratch: on CUDA, a 1-d device array of x's dtype and `layernorm_backward_scratch_size`
    elements for the column sums' partials, so that nothing is allocated here (a CUDA-graph
    capture holds every block it allocates); None: allocated per call. The NumPy path ignores
    it."""
    C = _check_params(x, weight, dbias)
    N = x.size // max(C, 1)
    check_array("dout", dout, shape=x.shape)
    check_storage("dout", dout, x)
    check_array("mean", mean, shape=(N,), dtype=x.dtype)
    check_array("rstd", rstd, shape=(N,), dtype=x.dtype)
    check_array("dweight", dweight, shape=(C,), dtype=x.dtype)
    if dx is not None:
        check_array("dx", dx, shape=x.shape, dtype=x.dtype)
    if dresidual is not None:
        check_array("dresidual", dresidual, shape=x.shape, dtype=x.dtype)
    args = (_rows("dout", dout, C), _rows("x", x, C), weight, mean, rstd, dweight, dbias,
            _rows("dx", dx, C), _rows("dresidual", dresidual, C))
    if is_device_array(x):
        r = layernorm_backward_cuda(*args, scratch=scratch)
    else:
        r = layernorm_backward_ref(*args)
    return dx if dx is not None else r.reshape(x.shape)


# ---- CUDA launcher (kernels_cu/layernorm.cu)
# forward: one warp per row. backward: one kernel reads dout and x once (a team of warps per
# row, the row in registers) for dx and per-block partial sums of dbias and dweight (teams
# added in a fixed order); a second kernel adds the blocks' partials up in block order
# (bitwise reproducible, no atomics). dx may be dout, x or dresidual in the same storage; the
# forwards' out may be x (the residual form's: x or sum_out) in the same storage; any other
# overlap between an output and an array the kernel reads is refused (it would race).

_LN_ROWS_PER_BLOCK = 8  # LN_WARPS in layernorm.cu


def layernorm_forward_cuda(x, weight, bias, eps=1e-5, out=None, mean=None, rstd=None):
    _cu.require_device(x=x, weight=weight, bias=bias)
    N, C = x.shape
    _cu.check_int32_loop("x", C, 32, "channels")   # a warp's row, int c = lane, lane + 32, ...
    out = _cu.out_array("out", out, (N, C), out.dtype if out is not None else x.dtype)
    mean = _cu.out_array("mean", mean, (N,), x.dtype)
    rstd = _cu.out_array("rstd", rstd, (N,), x.dtype)
    _check_forward_outputs(out, mean, rstd, x=x, weight=weight, bias=bias)
    if N == 0:
        return out, mean, rstd
    if C == 0:
        raise ValueError("x: LayerNorm over 0 channels")
    t = _cu.ctype(x.dtype)
    k = _cu.kernel("layernorm", f"layernorm_forward_kernel<{t}, {_cu.out_ctype(out, x.dtype)}>")
    k((_cu.ceil_div(N, _LN_ROWS_PER_BLOCK),), (32 * _LN_ROWS_PER_BLOCK,),
      (x, weight, bias, out, mean, rstd, _cu.i32(N), _cu.i32(C), _cu.scalar(x.dtype, eps)))
    return out, mean, rstd


def residual_layernorm_forward_cuda(x, y, weight, bias, eps, sum_out, out, mean, rstd,
                                    y_bias=None, p=0.0, key=None):
    _cu.require_device(x=x, y=y, weight=weight, bias=bias, sum_out=sum_out, out=out,
                       **({} if y_bias is None else {"y_bias": y_bias}))
    N, C = x.shape
    _cu.check_int32_loop("x", C, 32, "channels")
    mean = _cu.out_array("mean", mean, (N,), x.dtype)
    rstd = _cu.out_array("rstd", rstd, (N,), x.dtype)
    for name, a in (("sum_out", sum_out), ("out", out)):
        if _cu.overlaps(a, x) and a.data.ptr != x.data.ptr or _cu.overlaps(a, y):
            raise ValueError(f"{name}: must not overlap y (nor x, unless it is x itself)")
    _cu.check_disjoint("sum_out", sum_out, weight=weight, bias=bias, y_bias=y_bias)
    _check_forward_outputs(out, mean, rstd, sum_out=sum_out, x=x, y=y, weight=weight,
                           bias=bias, y_bias=y_bias)
    if N == 0:
        return out, mean, rstd
    t = _cu.ctype(x.dtype)
    drop = dropout_kernel_args(x, p, key)
    k = _cu.kernel("layernorm", f"residual_layernorm_forward_kernel<{t}, "
                                f"{_cu.out_ctype(y, x.dtype)}, {_cu.out_ctype(out, x.dtype)}>")
    k((_cu.ceil_div(N, _LN_ROWS_PER_BLOCK),), (32 * _LN_ROWS_PER_BLOCK,),
      (x, y, y if y_bias is None else y_bias, _cu.i32(y_bias is not None), sum_out, weight,
       bias, out, mean, rstd, _cu.i32(N), _cu.i32(C), _cu.scalar(x.dtype, eps),
       _cu.i32(p > 0), *drop))
    return out, mean, rstd


def _check_forward_outputs(out, mean, rstd, **inputs):
    """A forward kernel's warp reads its row (x; the residual kernel the sums it wrote) and
    weight and bias, then writes the row of out (after its last read of that row's inputs: out
    may be such an input in the same storage, in place) and its mean and rstd: any other
    overlap races with another warp (out in bf16 storage over x, a row apart, over weight)."""
    row_inputs = {k: inputs.get(k) for k in ("x", "sum_out")}
    _cu.check_in_place("out", out, **row_inputs)
    _cu.check_disjoint("out", out, **{k: a for k, a in inputs.items() if k not in row_inputs},
                       mean=mean, rstd=rstd)
    _cu.check_disjoint("mean", mean, rstd=rstd, **inputs)
    _cu.check_disjoint("rstd", rstd, **inputs)


_LN_BWD_ROW_BYTES = 32       # bytes of a row each backward thread holds (ln_bwd_cols in the .cu)
_LN_BWD_MAX_WARPS = 16       # LN_BWD_MAX_WARPS: warps per backward block (smaller row teams
                             # share one: 5 teams of 3 warps at C = 768 in float32)


def layernorm_backward_team(C: int, dtype) -> tuple[int, int]:
    """(warps per row team, teams per block) of layernorm_backward_kernel for C channels: a
    team holds a whole row, 32 bytes of dout and of x per thread."""
    cols = 32 * _LN_BWD_ROW_BYTES // np.dtype(dtype).itemsize
    team_warps = _cu.ceil_div(C, cols)
    if team_warps > _LN_BWD_MAX_WARPS:
        raise ValueError(f"x: the CUDA LayerNorm backward holds a row in registers, at most "
                         f"{cols * _LN_BWD_MAX_WARPS} channels in {np.dtype(dtype)}, got {C}")
    return team_warps, _LN_BWD_MAX_WARPS // team_warps


def layernorm_backward_scratch_size(N: int, C: int) -> int:
    """Elements (of x's dtype) of layernorm_backward's `scratch` for x (N, C): the partial
    column sums of dbias and dweight."""
    return _cu.colsum_scratch_size(N, C, 2)


def layernorm_backward_cuda(dout, x, weight, mean, rstd, dweight, dbias, dx=None,
                            dresidual=None, scratch=None):
    _cu.require_device(dout=dout, x=x, weight=weight, mean=mean, rstd=rstd, dweight=dweight,
                       dbias=dbias, **({} if dresidual is None else {"dresidual": dresidual}))
    N, C = x.shape
    dx = _cu.out_array("dx", dx, (N, C), x.dtype)
    _cu.check_in_place("dx", dx, dout=dout, x=x, dresidual=dresidual)
    _cu.check_disjoint("dx", dx, weight=weight, mean=mean, rstd=rstd)   # read by every block
    # one finalize launch adds into both, a block row each: the same element in both races
    _cu.check_disjoint("dbias", dbias, dweight=dweight)
    if N == 0 or C == 0:  # nothing to add; C == 0 would also launch a grid of 0 blocks
        return dx
    t = _cu.ctype(x.dtype)
    team_warps, teams = layernorm_backward_team(C, x.dtype)
    rows, blocks = _cu.colsum_chunks(N)  # a function of N: the sums' order is fixed
    partial = _cu.colsum_partials(scratch, N, C, 2, x.dtype, dout=dout, x=x, weight=weight,
                                  mean=mean, rstd=rstd, dweight=dweight, dbias=dbias, dx=dx,
                                  dresidual=dresidual)
    k = _cu.kernel("layernorm", f"layernorm_backward_kernel<{t}, {_cu.out_ctype(dout, x.dtype)}>")
    k((blocks,), (32 * team_warps * teams,),
      (dout, x, weight, mean, rstd, dx, dx if dresidual is None else dresidual,
       _cu.i32(dresidual is not None), partial, _cu.i32(N), _cu.i32(C), _cu.i32(team_warps),
       _cu.i32(rows)))
    _cu.colsum_finalize("layernorm", partial, C, blocks, dbias, dweight)
    return dx
