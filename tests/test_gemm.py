import numpy as np
import pytest

from cllm_gpu.ops.cast import BF16_DEVICE_DTYPE
from cllm_gpu.ops.gemm import (CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_OP_N,
                               CUDA_R_16BF, CUDA_R_32F, gemm, gemm_cublas_args)


def _operands(rng, M, N, K, ta, tb, dtype=np.float32):
    a = rng.normal(size=(K, M) if ta else (M, K)).astype(dtype)
    b = rng.normal(size=(N, K) if tb else (K, N)).astype(dtype)
    return a, b, (a.T if ta else a) @ (b.T if tb else b)


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_host_gemm_and_accumulate(ta, tb):
    rng = np.random.default_rng(0)
    a, b, want = _operands(rng, 5, 7, 3, ta, tb, np.float64)
    out = np.full((5, 7), np.nan)
    assert gemm(a, b, out, trans_a=ta, trans_b=tb) is out
    np.testing.assert_allclose(out, want, rtol=1e-13)
    gemm(a, b, out, trans_a=ta, trans_b=tb, accumulate=True)
    np.testing.assert_allclose(out, 2 * want, rtol=1e-13)


def test_gemm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="inner dimensions"):
        gemm(np.zeros((2, 3)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="out"):
        gemm(np.zeros((2, 3)), np.zeros((3, 5)), np.zeros((5, 2)))


def _cublas_colmajor_gemm(ta, tb, m, n, k, A, lda, B, ldb, C, ldc, beta):
    """What cublasGemmEx does, on flat buffers read column-major (element (i, j) of an
    ld-strided matrix is buf[i + j * ld])."""
    def view(buf, rows, cols, ld):
        return buf.reshape(-1)[: ld * (cols - 1) + rows][
            np.add.outer(np.arange(rows), np.arange(cols) * ld)]
    opA = view(A, k, m, lda).T if ta else view(A, m, k, lda)
    opB = view(B, n, k, ldb).T if tb else view(B, k, n, ldb)
    res = opA @ opB + (beta * view(C, m, n, ldc) if beta else 0)
    flat = C.reshape(-1)
    flat[np.add.outer(np.arange(m), np.arange(n) * ldc)] = res


@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 9, 4), (6, 1, 2), (4, 4, 1)])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_cublas_arguments_compute_the_row_major_product(shape, ta, tb, monkeypatch):
    """The row-major -> column-major mapping handed to cuBLAS, checked by running a
    column-major GEMM on the raw buffers exactly as cuBLAS would read them."""
    monkeypatch.delenv("CUPY_TF32", raising=False)
    rng = np.random.default_rng(1)
    M, N, K = shape
    a, b, want = _operands(rng, M, N, K, ta, tb)
    out = np.full((M, N), 0.5, np.float32)
    (opa, opb, m, n, k, first, ftype, lda, second, stype, ldb, otype, ldc,
     compute) = gemm_cublas_args(a, b, out, ta, tb)
    assert (ftype, stype, otype, compute) == (CUDA_R_32F, CUDA_R_32F, CUDA_R_32F,
                                              CUBLAS_COMPUTE_32F)
    for beta in (0.0, 1.0):
        got = out.copy()
        _cublas_colmajor_gemm(opa != CUBLAS_OP_N, opb != CUBLAS_OP_N, m, n, k, first, lda,
                              second, ldb, got, ldc, beta)
        np.testing.assert_allclose(got, want + beta * 0.5, rtol=1e-5, atol=1e-5)


def test_float32_follows_cupy_tf32(monkeypatch):
    a, b = np.zeros((4, 3), np.float32), np.zeros((3, 2), np.float32)
    out = np.zeros((4, 2), np.float32)
    monkeypatch.setenv("CUPY_TF32", "1")
    assert gemm_cublas_args(a, b, out, False, False)[13] == CUBLAS_COMPUTE_32F_FAST_TF32
    monkeypatch.setenv("CUPY_TF32", "0")
    assert gemm_cublas_args(a, b, out, False, False)[13] == CUBLAS_COMPUTE_32F


def test_cublas_arguments_for_bf16_need_float32_out():
    a = np.zeros((4, 3), BF16_DEVICE_DTYPE)
    b = np.zeros((3, 2), BF16_DEVICE_DTYPE)
    args = gemm_cublas_args(a, b, np.zeros((4, 2), np.float32), False, False)
    assert args[6] == args[9] == CUDA_R_16BF and args[13] == CUBLAS_COMPUTE_32F
    with pytest.raises(ValueError, match="out"):
        gemm_cublas_args(a, b, np.zeros((4, 2), np.float64), False, False)
    with pytest.raises(ValueError, match="unsupported"):
        gemm_cublas_args(a, b.astype(np.float32), np.zeros((4, 2), np.float32), False, False)


def test_bf16_out_is_the_float32_product_rounded_once():
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, is_bf16, round_bf16
    from cllm_gpu.ops.gemm import gemm
    rng = np.random.default_rng(3)
    a = round_bf16(rng.normal(size=(7, 33)).astype(np.float32)).view(BF16_HOST_DTYPE)
    b = round_bf16(rng.normal(size=(19, 33)).astype(np.float32)).view(BF16_HOST_DTYPE)
    out = np.empty((7, 19), BF16_HOST_DTYPE)
    assert gemm(a, b, out, trans_b=True) is out and is_bf16(out)
    want = round_bf16(np.matmul(a.view(np.float32), b.view(np.float32).T))
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="bf16 operands"):
        gemm(a.view(np.float32), b.view(np.float32), out, trans_b=True)


def test_bf16_out_accumulates_then_rounds_once():
    """accumulate=True into a bf16 out: bf16(out + a @ b), the fp32 sum rounded once (cuBLAS
    with beta = 1 and a bf16 C; the bf16 linear layer's bias epilogue relies on it)."""
    from cllm_gpu.ops.cast import BF16_HOST_DTYPE, round_bf16
    rng = np.random.default_rng(5)
    a = round_bf16(rng.normal(size=(6, 20)).astype(np.float32)).view(BF16_HOST_DTYPE)
    b = round_bf16(rng.normal(size=(20, 9)).astype(np.float32)).view(BF16_HOST_DTYPE)
    c = round_bf16(rng.normal(size=(6, 9)).astype(np.float32))
    out = c.copy().view(BF16_HOST_DTYPE)
    gemm(a, b, out, accumulate=True)
    want = round_bf16(c + np.matmul(a.view(np.float32), b.view(np.float32)))
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("M", [64, 128, 130, 200])
@pytest.mark.parametrize("accumulate", [False, True])
def test_host_gemm_split_into_row_pieces_writes_every_row(M, accumulate, monkeypatch):
    """The NumPy path cuts out's rows into pieces of GEMM_ROWS multiples, spread over the host
    threads (here forced for small products): every row of every piece is written, also with
    M a multiple of GEMM_ROWS and a short last piece (the other tests' M are below GEMM_ROWS,
    one piece)."""
    import importlib
    from cllm_gpu.ops.host_threads import set_host_threads
    gemm_mod = importlib.import_module("cllm_gpu.ops.gemm")   # ops.gemm is the function
    monkeypatch.setattr(gemm_mod, "GEMM_PIECE_MACS", 1)
    rng = np.random.default_rng(M)
    a, b, want = _operands(rng, M, 5, 3, False, False, np.float64)
    start = rng.normal(size=(M, 5))
    out = start.copy()
    old = set_host_threads(3)
    try:
        gemm(a, b, out, accumulate=accumulate)
    finally:
        set_host_threads(old)
    np.testing.assert_allclose(out, want + (start if accumulate else 0), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("M", [1, 64, 130, 200, 2048])
def test_host_gemm_makes_one_blas_call_per_row_piece_and_none_empty(M, monkeypatch):
    """Each row piece is one np.matmul call with at least one row, and there are never more
    pieces than GEMM_ROWS units, however many multiply-adds the product has (here all are
    over GEMM_PIECE_MACS): a product with few rows and a long K and N, one row of logits over a
    50k vocabulary say, would otherwise make a zero-row call per spare piece and hand some
    threads only empty ones."""
    import importlib
    gemm_mod = importlib.import_module("cllm_gpu.ops.gemm")   # ops.gemm is the function
    monkeypatch.setattr(gemm_mod, "GEMM_PIECE_MACS", 1)
    real_matmul, calls = np.matmul, []

    def recording_matmul(a, b, *args, **kwargs):
        calls.append(a.shape[0])
        return real_matmul(a, b, *args, **kwargs)

    rng = np.random.default_rng(M)
    a, b, want = _operands(rng, M, 5, 3, False, False, np.float64)
    monkeypatch.setattr(np, "matmul", recording_matmul)
    out = gemm(a, b)
    monkeypatch.setattr(np, "matmul", real_matmul)
    units = -(-M // gemm_mod.GEMM_ROWS)
    assert len(calls) == units and min(calls) >= 1 and sum(calls) == M, calls[:8]
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-13)
    # the same from the shapes alone, for far more multiply-adds: one piece per unit
    assert gemm_mod.row_pieces(M, M << 40) == [(u, u + 1) for u in range(units)]


def test_every_product_of_a_default_training_step_is_shared_by_two_threads(monkeypatch):
    """Each GEMM of a step of the default run (`cllm-gpu train`'s model and batch) is cut into
    at least two row pieces: on two cores, no product runs on one while the other idles. The
    pieces' least size (GEMM_PIECE_MACS, 2^24 multiply-adds) trades a parallel region's cost
    against that: at 2^27, 2 of the step's 7 product shapes ran as one call, at 2^28 4, at
    2^40 all; a step on 2 threads took 445 ms at 2^28 and 473 ms at 2^40 against 425 ms at
    2^24, while 2^22..2^26 were within the noise (~4 %) of 2^24 (2026-12-03, load ~1.3)."""
    import importlib
    from cllm_gpu import CLLMModel, ModelConfig, TrainConfig
    gemm_mod = importlib.import_module("cllm_gpu.ops.gemm")   # ops.gemm is the function
    cfg, tc = ModelConfig(), TrainConfig()
    seen, real_row_pieces = [], gemm_mod.row_pieces

    def recording_row_pieces(M, macs):
        pieces = real_row_pieces(M, macs)
        seen.append((M, macs, len(pieces)))
        return pieces

    monkeypatch.setattr(gemm_mod, "row_pieces", recording_row_pieces)
    m = CLLMModel(cfg, backend="numpy")
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(tc.batch_size,
                                                                      cfg.block_size))
    m.loss_and_grads(idx, idx[:, ::-1])
    assert len(seen) > 6 * cfg.n_layer, seen   # the blocks' forward and backward products
    assert [s for s in seen if s[2] < 2] == []
