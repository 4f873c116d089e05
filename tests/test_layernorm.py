import numpy as np
import pytest

from cllm_gpu.ops.layernorm import (layernorm_backward, layernorm_forward,
                                  residual_layernorm_forward)
from fd import assert_grad_close


def plain_layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_forward_matches_formula(dtype, tol):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 13)).astype(dtype)
    w, b = rng.normal(size=13).astype(dtype), rng.normal(size=13).astype(dtype)
    out, mean, rstd = layernorm_forward(x, w, b)
    assert out.dtype == dtype and mean.dtype == dtype and rstd.dtype == dtype
    np.testing.assert_allclose(out, plain_layernorm(x, w, b), rtol=tol, atol=tol)
    np.testing.assert_allclose(mean, x.mean(-1), rtol=tol, atol=tol)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x.var(-1) + 1e-5), rtol=tol)


def test_float32_rows_with_a_large_common_offset():
    """A diverging run's residual stream: rows at 1e4 with a spread of 1e-2 (~10 float32 ulps)
    and constant rows. The mean's float32 sum is off by a fraction of the spread; the mean of
    the centred row corrects it (the kernel's mean was already within an ulp). The best a
    float32 mean can do is its own rounding, half an ulp of 1e4 (5e-4, 0.05 of the spread):
    the output within 0.06 w of the float64 result on the same float32 values; the plain
    float32 mean was 0.5 off. A constant row gives exactly the bias (was bias + 0.3 w)."""
    rng = np.random.default_rng(5)
    C = 768
    x = np.concatenate([1e4 + 1e-2 * rng.normal(size=(8, C)), np.full((2, C), 1e4),
                        np.full((1, C), -3.3e3)]).astype(np.float32)
    w, b = np.ones(C, np.float32), rng.normal(size=C).astype(np.float32)
    out, mean, rstd = layernorm_forward(x, w, b)
    want = plain_layernorm(x.astype(np.float64), w, b)
    np.testing.assert_allclose(out, want, atol=0.06)
    np.testing.assert_array_equal(out[8:], np.broadcast_to(b, (3, C)))
    np.testing.assert_array_equal(mean[8:], x[8:, 0])
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(-1), rtol=0, atol=5e-4)



def test_float32_rows_at_a_large_offset_whose_spread_times_64_overflows():
    """The offset test's rows times 1e19 (1e23 with a spread of 1e17, ~12 ulps, as 1e4 and
    1e-2): their C var (7.7e36 at C = 768) is finite but 64 times it is not, so the gate for
    the corrected mean (mean^2 C > 64 C var) read inf > inf and skipped them: the output 1.0
    off (2.3 on other such rows). Such rows (a spread from ~8.3e16 up to the overflow path's ~6.7e17) now take the
    corrected mean as the smaller offset's do: within 0.06 w of the float64 result."""
    rng = np.random.default_rng(5)
    C = 768
    x = np.concatenate([1e23 + 1e17 * rng.normal(size=(8, C)),
                        np.full((2, C), 1e23)]).astype(np.float32)
    w, b = np.ones(C, np.float32), rng.normal(size=C).astype(np.float32)
    with np.errstate(over="ignore"):
        out, mean, rstd = layernorm_forward(x, w, b)
    want = plain_layernorm(x.astype(np.float64), w, b)
    np.testing.assert_allclose(out, want, atol=0.06)
    np.testing.assert_array_equal(out[8:], np.broadcast_to(b, (2, C)))


def overflowing_rows(C, rng):
    """float32 rows whose sum of squares overflows (float32 past ~3.4e38: a spread past ~6.7e17
    at C = 768) or whose plain sum does (a mean past ~4.4e35), with finite LayerNorms: spreads
    1e18 and 1e30, values up to 3e38, a mean of 1e36 with a spread of 1e33 (both sums
    overflow) and a constant 1e36 (only the plain sum), and an ordinary row."""
    return np.concatenate([
        1e18 * rng.normal(size=(2, C)), 1e30 * rng.normal(size=(2, C)) + 1e29,
        rng.uniform(-3e38, 3e38, size=(2, C)), 1e36 + 1e33 * rng.normal(size=(2, C)),
        np.full((1, C), 1e36), rng.normal(size=(1, C))]).astype(np.float32)


def test_float32_rows_whose_sum_of_squares_overflows():
    """Such a row's sum of squares was inf, rstd 0 and the output exactly the bias (a finite
    wrong answer), the backward's dx 0 and its dweight without the row. Now the row is done
    again scaled by a power of two: the output within float32 rounding of the float64
    LayerNorm on the same float32 values (the 1e36 rows within the mean's own rounding, half
    an ulp of 1e36 = 4e28, 4e-5 of the spread), mean and rstd the float64 ones (rstd of the
    3e38 rows a float32 denormal, 5.8e-39), and the backward from them the float64 one, also
    on a row whose x - mean passes the largest float (3/4 of it 3e38, the rest -3e38: its
    xhat was inf, dx NaN and dweight inf; rows of rstd below 2^-81 now take xhat scaled)."""
    rng = np.random.default_rng(11)
    C = 768
    wide = np.where(np.arange(C) % 4 == 0, -3e38, 3e38).astype(np.float32)[None]
    x = np.concatenate([overflowing_rows(C, rng), wide])
    w, b = rng.normal(size=C).astype(np.float32), rng.normal(size=C).astype(np.float32)
    out, mean, rstd = layernorm_forward(x, w, b)
    x64 = x.astype(np.float64)
    want = plain_layernorm(x64, w.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-3)
    # (the mean of a centred row cancels: within 1e-6 of the row's largest value)
    assert (np.abs(mean - x64.mean(-1)) <= 1e-6 * np.abs(x64).max(-1)).all()
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x64.var(-1) + 1e-5), rtol=1e-5)
    np.testing.assert_array_equal(out[8], b)

    n = len(x)
    dout = rng.normal(size=(n, C)).astype(np.float32)
    dw, db = np.zeros(C, np.float32), np.zeros(C, np.float32)
    dx = layernorm_backward(dout, x, w, mean, rstd, dw, db)
    dw64, db64 = np.zeros(C), np.zeros(C)
    r64 = 1 / np.sqrt(x64.var(-1) + 1e-5)
    dx64 = layernorm_backward(dout.astype(np.float64), x64, w.astype(np.float64),
                              x64.mean(-1), r64, dw64, db64)
    # dx is rstd-sized (5.8e-39 on the 3e38 rows): compared in units of each row's rstd
    np.testing.assert_allclose(dx / r64[:, None], dx64 / r64[:, None], rtol=0, atol=1e-3)
    np.testing.assert_allclose(dw, dw64, rtol=0, atol=2e-3)
    np.testing.assert_allclose(db, db64, rtol=1e-5, atol=1e-5)



def test_float64_rows_whose_sums_overflow_use_the_double_scale():
    """The NumPy path's scale comes from the dtype (2^-529 for float64): float64 rows whose
    sums overflow (spreads 1e160, 1e300, values to 1e307, a mean of 1e306 with a spread of
    1e303, a constant 1e306) against the LayerNorm in long double, where no sum overflows. A
    mutation audit found float32's scale (2^-81) passing for every dtype: only float32 rows
    were checked (float64 rows of spread 1e160 still overflowed, their output the bias)."""
    if np.finfo(np.longdouble).maxexp <= np.finfo(np.float64).maxexp:
        pytest.skip("no long double wider than double here")
    rng = np.random.default_rng(13)
    C = 768
    x = np.concatenate([
        1e160 * rng.normal(size=(2, C)), 1e300 * rng.normal(size=(2, C)) + 1e299,
        rng.uniform(-1e307, 1e307, size=(2, C)), 1e306 + 1e303 * rng.normal(size=(2, C)),
        np.full((1, C), 1e306), rng.normal(size=(1, C))])
    w, b = rng.normal(size=C), rng.normal(size=C)
    out, mean, rstd = layernorm_forward(x, w, b)
    xl = x.astype(np.longdouble)
    ml = xl.mean(-1)
    rl = 1 / np.sqrt(((xl - ml[:, None]) ** 2).mean(-1) + 1e-5)
    np.testing.assert_allclose(out, ((xl - ml[:, None]) * rl[:, None] * w + b).astype(np.float64),
                               rtol=0, atol=1e-9)
    assert (np.abs(mean - ml.astype(np.float64)) <= 1e-14 * np.abs(x).max(-1)).all()
    np.testing.assert_allclose(rstd, rl.astype(np.float64), rtol=1e-12)
    np.testing.assert_array_equal(out[8], b)

def test_nonfinite_inputs_still_give_nan_rows():
    """A NaN or inf in a row (the overflow recovery's check) leaves that row NaN, the
    others their own LayerNorm; in the backward its dx NaN and dweight NaN (it sums every
    row's dout * xhat), the other rows' dx finite, among them a row of rstd below 2^-81
    (the backward's scaled xhat takes only rows of a finite rstd)."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(5, 16)).astype(np.float32)
    x[1, 3], x[2, 0], x[3, 5] = np.nan, np.inf, -np.inf
    x[4] = rng.uniform(-3e38, 3e38, size=16)
    w, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    with np.errstate(invalid="ignore"):
        out, mean, rstd = layernorm_forward(x, w, b)
    assert np.isnan(out[1:4]).all() and np.isnan(rstd[1:4]).all()
    np.testing.assert_allclose(out[0], plain_layernorm(x[:1], w, b)[0], rtol=0, atol=1e-5)
    assert np.isfinite(out[4]).all() and 0 < rstd[4] < 2.0**-81
    dout = rng.normal(size=x.shape).astype(np.float32)
    dw, db = np.zeros(16, np.float32), np.zeros(16, np.float32)
    with np.errstate(invalid="ignore"):
        dx = layernorm_backward(dout, x, w, mean, rstd, dw, db)
    assert np.isnan(dx[1:4]).all() and np.isfinite(dx[[0, 4]]).all()
    assert np.isnan(dw).all() and np.isfinite(db).all()


def test_backward_finite_differences():
    rng = np.random.default_rng(2)
    x, w, b = rng.normal(size=(5, 9)), rng.normal(size=9), rng.normal(size=9)
    R = rng.normal(size=(5, 9))
    loss = lambda: float((plain_layernorm(x, w, b) * R).sum())  # noqa: E731
    out, mean, rstd = layernorm_forward(x, w, b)
    dw, db = np.zeros(9), np.ones(9)  # db starts at 1: the op must accumulate, not overwrite
    dx = layernorm_backward(R, x, w, mean, rstd, dw, db)
    assert_grad_close(loss, x, dx, n=45)
    assert_grad_close(loss, w, dw, n=9)
    assert_grad_close(loss, b, db - 1, n=9)


def test_bad_shapes_raise():
    x = np.zeros((4, 8))
    with pytest.raises(ValueError, match="weight"):
        layernorm_forward(x, np.zeros(7), np.zeros(8))
    with pytest.raises(ValueError, match="float32 or float64"):
        layernorm_forward(np.zeros((4, 8), dtype=np.int32), np.zeros(8), np.zeros(8))


def test_forward_into_bf16_out_rounds_only_the_output():
    """A bf16 `out` (bf16 storage) decides the output's rounding; mean and rstd stay fp32."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, round_bf16
    rng = np.random.default_rng(8)
    x = rng.normal(size=(5, 24)).astype(np.float32)
    w, b = rng.normal(size=24).astype(np.float32), rng.normal(size=24).astype(np.float32)
    out32, mean32, rstd32 = layernorm_forward(x, w, b)
    out16, mean16, rstd16 = layernorm_forward(x, w, b, out=np.empty(x.shape, BF16_HOST_DTYPE))
    np.testing.assert_array_equal(out16, round_bf16(out32))
    np.testing.assert_array_equal(mean16, mean32)
    np.testing.assert_array_equal(rstd16, rstd32)
    with pytest.raises(ValueError, match="float32"):
        layernorm_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                          out=np.empty(x.shape, BF16_HOST_DTYPE))


def test_backward_reads_a_bf16_dout_as_its_float32_values():
    """A dout in bf16 storage (what a bf16-output GEMM writes: the bf16 model's dln, dlnf)
    gives what a float32 dout of the same values gives; dx and the sums stay float32."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, is_bf16, round_bf16
    rng = np.random.default_rng(12)
    x = rng.normal(size=(9, 40)).astype(np.float32)
    w = rng.normal(size=40).astype(np.float32)
    d = round_bf16(rng.normal(size=(9, 40)).astype(np.float32))
    _, mean, rstd = layernorm_forward(x, w, w)
    outs = []
    for dout in (d, d.astype(BF16_HOST_DTYPE)):
        dw, db = np.zeros(40, np.float32), np.zeros(40, np.float32)
        dx = layernorm_backward(dout, x, w, mean, rstd, dw, db)
        assert not is_bf16(dx) and not is_bf16(dw)
        outs.append((dx, dw, db))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="dout"):
        layernorm_backward(d.astype(BF16_HOST_DTYPE), x.astype(np.float64), w.astype(np.float64),
                           mean.astype(np.float64), rstd.astype(np.float64),
                           np.zeros(40), np.zeros(40))


def test_leading_dimensions_are_rows():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 3, 7))
    w, b = rng.normal(size=7), rng.normal(size=7)
    out, mean, rstd = layernorm_forward(x, w, b)
    assert out.shape == x.shape and mean.shape == (6,)
    np.testing.assert_allclose(out, plain_layernorm(x, w, b), rtol=1e-12, atol=1e-12)
    dx = layernorm_backward(out, x, w, mean, rstd, np.zeros(7), np.zeros(7))
    assert dx.shape == x.shape


def test_residual_layernorm_is_the_add_then_the_layernorm():
    """sum = x + dropout(y + y_bias), out = LayerNorm(sum): bitwise the unfused composition,
    with and without the bias and the dropout; the backward's dresidual is added to dx."""
    from cllm_gpu.ops.dropout import DropoutKey, dropout
    from cllm_gpu.ops.layernorm import residual_layernorm_forward
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(2, 5, 16)), rng.normal(size=(2, 5, 16))
    w, b, yb = rng.normal(size=16), rng.normal(size=16), rng.normal(size=16)
    key = DropoutKey(3, 2, 7, 1)
    for bias, p in ((None, 0.0), (yb, 0.0), (yb, 0.3)):
        s, out = np.empty_like(x), np.empty_like(x)
        mean, rstd = np.empty(10), np.empty(10)
        residual_layernorm_forward(x, y, w, b, 1e-5, s, out, mean, rstd, bias, p, key)
        branch = y if bias is None else y + bias
        want_s = x + dropout(branch, p, key)
        np.testing.assert_array_equal(s, want_s)
        want_out, want_m, want_r = layernorm_forward(want_s, w, b)
        np.testing.assert_array_equal(out, want_out)
        np.testing.assert_array_equal(mean, want_m)
        np.testing.assert_array_equal(rstd, want_r)
    R = rng.normal(size=x.shape)
    plain = layernorm_backward(R, x, w, *layernorm_forward(x, w, b)[1:], np.zeros(16), np.zeros(16))
    with_res = layernorm_backward(R, x, w, *layernorm_forward(x, w, b)[1:], np.zeros(16),
                                  np.zeros(16), dresidual=y)
    np.testing.assert_allclose(with_res, plain + y, rtol=1e-14, atol=1e-14)


def test_residual_layernorm_reads_a_bf16_branch_as_its_values():
    """y in bf16 storage (the bf16 model's projection GEMM output): the sum, the output and the
    statistics are bitwise those of a float32 y holding the same values (nothing rounded but
    a bf16 out), with and without the dropout."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, is_bf16, round_bf16
    from cllm_gpu.ops.dropout import DropoutKey
    from cllm_gpu.ops.layernorm import residual_layernorm_forward
    rng = np.random.default_rng(13)
    x = rng.normal(size=(6, 24)).astype(np.float32)
    y = round_bf16(rng.normal(size=(6, 24)).astype(np.float32))
    w, b, yb = (rng.normal(size=24).astype(np.float32) for _ in range(3))
    for p in (0.0, 0.25):
        got = []
        for yy in (y, y.astype(BF16_HOST_DTYPE)):
            s, out = np.empty_like(x), np.empty(x.shape, BF16_HOST_DTYPE)
            mean, rstd = np.empty(6, np.float32), np.empty(6, np.float32)
            residual_layernorm_forward(x, yy, w, b, 1e-5, s, out, mean, rstd, yb, p,
                                       DropoutKey(1, 2, 3, 0))
            assert not is_bf16(s)
            got.append((s, out, mean, rstd))
        for a, c in zip(*got):
            np.testing.assert_array_equal(a, c)
        assert not np.array_equal(got[0][0], round_bf16(got[0][0]))  # the sum is not rounded


def test_chunks_of_rows_compute_what_one_chunk_does(monkeypatch):
    """The NumPy references go in chunks of LN_CHUNK // C rows (the residual add built per
    chunk too, the parameter gradients summed over chunks): 3 rows per chunk over 10 rows
    (the last chunk short) against one chunk."""
    from cllm_gpu.ops import layernorm as ln
    rng = np.random.default_rng(13)
    C = 16
    x, y, R, dres = (rng.normal(size=(2, 5, C)) for _ in range(4))
    w, b, yb = rng.normal(size=C), rng.normal(size=C), rng.normal(size=C)

    def run():
        s, out = np.empty_like(x), np.empty_like(x)
        mean, rstd = np.empty(10), np.empty(10)
        ln.residual_layernorm_forward(x, y, w, b, 1e-5, s, out, mean, rstd, yb)
        dw, db = np.zeros(C), np.zeros(C)
        dx = ln.layernorm_backward(R, s, w, mean, rstd, dw, db, dresidual=dres)
        return (s, out, mean, rstd, dx, dw, db) + ln.layernorm_forward(x, w, b)

    monkeypatch.setattr(ln, "LN_CHUNK", 10 * C)
    whole = run()
    monkeypatch.setattr(ln, "LN_CHUNK", 3 * C)
    for got, want in zip(run(), whole):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_residual_layernorm_sum_in_place_of_an_input():
    """sum_out may be x or y (the residual stream updated in place): the same sum, output and
    statistics as into a separate buffer, with and without the bias and the dropout (the model
    always passes a separate buffer, so only this test reaches the aliased paths)."""
    from cllm_gpu.ops.dropout import DropoutKey
    from cllm_gpu.ops.layernorm import residual_layernorm_forward
    rng = np.random.default_rng(14)
    x0, y0 = rng.normal(size=(3, 4, 16)), rng.normal(size=(3, 4, 16))
    w, b, yb = rng.normal(size=16), rng.normal(size=16), rng.normal(size=16)
    key = DropoutKey(5, 1, 2, 0)

    def run(x, y, sum_out, bias, p):
        out, mean, rstd = np.empty_like(x), np.empty(12), np.empty(12)
        residual_layernorm_forward(x, y, w, b, 1e-5, sum_out, out, mean, rstd, bias, p, key)
        return sum_out.copy(), out, mean, rstd

    for bias, p in ((None, 0.0), (yb, 0.0), (None, 0.3), (yb, 0.3)):
        want = run(x0.copy(), y0.copy(), np.empty_like(x0), bias, p)
        x = x0.copy()
        for got_a, want_a in zip(run(x, y0.copy(), x, bias, p), want):
            np.testing.assert_array_equal(got_a, want_a)
        y = y0.copy()
        for got_a, want_a in zip(run(x0.copy(), y, y, bias, p), want):
            np.testing.assert_array_equal(got_a, want_a)


def test_backward_numpy_path_ignores_scratch():
    """scratch is the CUDA launcher's workspace: on NumPy arrays any value is ignored (the
    same bits, the array untouched)."""
    rng = np.random.default_rng(4)
    x, d = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
    w, b = rng.normal(size=5), rng.normal(size=5)
    _, mean, rstd = layernorm_forward(x, w, b)
    runs = []
    for scratch in (None, np.full(3, np.nan, np.float32)):
        dw, db = np.ones(5), np.ones(5)
        runs.append((layernorm_backward(d, x, w, mean, rstd, dw, db, scratch=scratch), dw, db))
        if scratch is not None:
            assert np.isnan(scratch).all()
    for a, b_ in zip(*runs):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("with_dx,with_residual", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_no_rows_empty_results_and_sums_unchanged(shape, with_dx, with_residual):
    """N = 0 rows: what the CUDA launcher does (tests/gpu/test_empty_inputs_cuda.py): empty
    results, dweight and dbias left as they were (the NumPy backward divided by N = 0 for its
    chunk count: ZeroDivisionError)."""
    C = shape[-1]
    x, w, b = np.full(shape, 2.5), np.full(C, 1.5), np.full(C, 0.5)
    out, mean, rstd = layernorm_forward(x, w, b)
    assert (out.shape, mean.shape, rstd.shape) == (shape, (0,), (0,))
    dw, db = np.full(C, 2.5), np.full(C, 3.5)
    dx = np.empty(shape) if with_dx else None
    dresidual = np.ones(shape) if with_residual else None
    r = layernorm_backward(np.ones(shape), x, w, mean, rstd, dw, db, dx=dx, dresidual=dresidual)
    assert (r.shape, r.dtype) == (shape, x.dtype)
    assert r is dx or dx is None
    assert (dw == 2.5).all() and (db == 3.5).all()


@pytest.mark.parametrize("N", [3, 0])
def test_no_channels_is_refused_before_dispatch(N):
    """C = 0: one ValueError from every public LayerNorm function, whatever N (before: NumPy's
    'cannot reshape' from the (-1, C) view, on both backends; the launcher's own check was
    unreachable)."""
    x, w = np.zeros((N, 0)), np.zeros(0)
    stats = np.zeros(N)
    with pytest.raises(ValueError, match="LayerNorm over 0 channels"):
        layernorm_forward(x, w, w)
    with pytest.raises(ValueError, match="LayerNorm over 0 channels"):
        residual_layernorm_forward(x, x.copy(), w, w, 1e-5, np.empty_like(x), np.empty_like(x),
                                   stats.copy(), stats.copy())
    with pytest.raises(ValueError, match="LayerNorm over 0 channels"):
        layernorm_backward(x.copy(), x, w, stats, stats.copy(), np.zeros(0), np.zeros(0))


def ln_times_scale_bits(u, mant, scale_exp):
    """A NumPy mirror of kernels_cu/layernorm.cu's ln_times_scale on the bits u (unsigned) of
    positive rk whose product with k (2^-81: mant 23, scale_exp 81; 2^-529: 52, 529) is below
    the least normal (biased exponent <= scale_exp): the denormal's significand q, built with
    integer operations as the kernel builds it (the same shift, remainder and tie to even)."""
    U = u.dtype.type
    e = u >> U(mant)
    assert (e <= scale_exp).all()
    m = (u & U((1 << mant) - 1)) | U(1 << mant)
    shift = np.minimum(U(scale_exp + 1) - e, U(mant + 2))
    q = m >> shift
    rem, half = m & ((U(1) << shift) - U(1)), U(1) << (shift - U(1))
    return q + ((rem > half) | ((rem == half) & (q & U(1) == U(1)))).astype(u.dtype)


@pytest.mark.slow
def test_ln_times_scale_rounds_every_float32_as_ieee():
    """The kernel's integer rounding of rk 2^-81 (the stored rstd of a row done scaled, where
    it is a float32 denormal; -ftz=true would flush the product) against IEEE: rk widened to
    float64 (the product exact there) and rounded to float32 by NumPy. Every float32 rk of
    biased exponent 57..81 (shifts 1..25: each rounding down, up, exact, ties to even and
    the carry into the least normal), 210 million values; below 57 the kernel's shift stops
    at 25 and the product is below half the least denormal: 0, checked at the largest such
    rk (both sides are monotonic in rk). Exponent 82 up: a normal product, rk * k exact."""
    mant = np.arange(1 << 23, dtype=np.uint32)
    for e in range(57, 82):
        u = mant | np.uint32(e << 23)
        want = (u.view(np.float32).astype(np.float64) * 2.0**-81).astype(np.float32)
        got = ln_times_scale_bits(u, 23, 81)
        bad = np.flatnonzero(got != want.view(np.uint32))
        assert not len(bad), (e, u[bad[:5]], got[bad[:5]], want.view(np.uint32)[bad[:5]])
    top = np.array([(56 << 23) | ((1 << 23) - 1), 1 << 23, (1 << 23) - 1], np.uint32)
    assert (ln_times_scale_bits(top, 23, 81) == 0).all()
    assert ((top.view(np.float32).astype(np.float64) * 2.0**-81).astype(np.float32) == 0).all()
    # the least normal: from the carry (e = 81, every significand bit set) and from e = 82
    assert ln_times_scale_bits(np.array([(82 << 23) - 1], np.uint32), 23, 81)[0] == 1 << 23
    assert np.float32(2.0**-45) * np.float32(2.0**-81) == np.finfo(np.float32).tiny


def test_ln_times_scale_rounds_float64_as_ieee():
    """The same mirror at the float64 scale 2^-529 (the GPU keeps double denormals, x86
    NumPy too: the product is IEEE's), for every shift 1..54 and each way of rounding: the
    dropped bits 0, just below, at and just above half with q even and odd, all ones, plus
    random significands."""
    rng = np.random.default_rng(3)
    rows = []
    for e in range(529 - 53, 530):
        shift = 530 - e
        half = 1 << (shift - 1)
        low = [0, 1, half - 1, half, half + 1, (1 << shift) - 1] if shift > 1 else [0, 1]
        for lo in low:
            for odd in (0, 1):
                m = ((odd << shift) | (lo & ((1 << shift) - 1))) & ((1 << 52) - 1)
                rows.append((e << 52) | m)
        rows.extend((e << 52) | int(r) for r in rng.integers(0, 1 << 52, 64, np.uint64))
    u = np.array(rows, np.uint64)
    want = (u.view(np.float64) * 2.0**-529).view(np.uint64)
    assert (want < (1 << 52)).all() and (want > 0).any()
    np.testing.assert_array_equal(ln_times_scale_bits(u, 52, 529), want)


def test_residual_layernorm_dropout_needs_a_dropout_key():
    """p > 0 checks the key as dropout() does, on both backends (the NumPy path failed with an
    AttributeError on key=None; the device path passed a device step of another dtype to the
    kernel's double pointer: tests/cuda_emulator/run_launcher_checks.py)."""
    from cllm_gpu.ops.layernorm import residual_layernorm_forward
    x = np.ones((2, 8))
    args = (x, x, np.ones(8), np.zeros(8), 1e-5, np.empty_like(x), np.empty_like(x), None, None)
    with pytest.raises(TypeError, match="key: expected a DropoutKey, got NoneType"):
        residual_layernorm_forward(*args, p=0.1, key=None)
    residual_layernorm_forward(*args, p=0.0, key=None)   # no dropout: no key needed
