"""Every launcher on inputs with no elements (no rows, no columns, a GEMM with k = 0, no
parameters): the NumPy path's result, with no launch (CuPy would launch one block for a grid
dimension of 0; the emulator refuses it), the accumulators left as they were, and one
ValueError from the public function, before dispatch, on both backends where the op has no
meaning (a softmax or an embedding over no vocabulary, a LayerNorm over no channels, attention
with no heads or a head dim of 0, a linear layer without features, a GEMM accumulating into no
out), whatever the number of rows. The training step never meets these shapes: each check runs
the launchers' early returns, which no other check reaches (h27k's coverage of the emulator
runs)."""
import numpy as np
import pytest

from cllm_gpu.ops import (DropoutKey, adamw_update, attention_backward, attention_forward,
                          dropout, dropout_bias_backward, embedding_backward, embedding_forward,
                          from_bf16, gelu_backward, gelu_forward, gemm, layernorm_backward,
                          layernorm_forward, linear_backward, linear_forward,
                          residual_layernorm_forward, site_id, softmax_xent, to_bf16)
from cllm_gpu.ops.adamw import adamw_hyperparams
from gpu_util import host

cp = pytest.importorskip("cupy")

F32 = np.float32
KEY = DropoutKey(seed=3, step=1, site=site_id(0, 1))


def same_on_both(run):
    """run(xp) -> a tuple of arrays (None allowed), on NumPy and on the device: the same
    shapes, dtypes and values (accumulators given in filled, so a write to one shows)."""
    want, got = run(np), run(cp)
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        if w is None:
            assert g is None, f"output {i}: None on NumPy, {type(g)} on the device"
            continue
        g = host(g)
        assert (g.shape, g.dtype) == (w.shape, w.dtype), (i, g.shape, g.dtype, w.shape, w.dtype)
        assert g.tobytes() == w.tobytes(), f"output {i} differs"


def both_refuse(run, match):
    for xp in (np, cp):
        with pytest.raises(ValueError, match=match):
            run(xp)


def filled(xp, shape, value=2.5, dtype=F32):
    return xp.full(shape, value, dtype=dtype)


def test_layernorm_forward_and_backward_without_rows():
    def forward(xp):
        return layernorm_forward(filled(xp, (0, 8)), filled(xp, 8, 1.0), filled(xp, 8, 0.0))
    same_on_both(forward)

    def backward(xp):
        _, mean, rstd = forward(xp)
        dw, db = filled(xp, 8), filled(xp, 8)
        dx = layernorm_backward(filled(xp, (0, 8)), filled(xp, (0, 8)), filled(xp, 8, 1.0),
                                mean, rstd, dw, db)
        return dx, dw, db
    same_on_both(backward)


@pytest.mark.parametrize("N", [3, 0])
def test_layernorm_over_no_channels_is_refused(N):
    """The public functions' one check, before dispatch, whatever N."""
    both_refuse(lambda xp: layernorm_forward(filled(xp, (N, 0)), filled(xp, 0), filled(xp, 0)),
                "LayerNorm over 0 channels")
    both_refuse(lambda xp: layernorm_backward(filled(xp, (N, 0)), filled(xp, (N, 0)),
                                              filled(xp, 0), filled(xp, N), filled(xp, N),
                                              filled(xp, 0), filled(xp, 0)),
                "LayerNorm over 0 channels")


def test_layernorm_launcher_over_no_channels_is_refused():
    """The launcher's own check, for a caller that skips the public function."""
    from cllm_gpu.ops.layernorm import layernorm_forward_cuda
    with pytest.raises(ValueError, match="0 channels"):
        layernorm_forward_cuda(filled(cp, (3, 0)), filled(cp, 0), filled(cp, 0))


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_residual_layernorm_without_rows(p):
    def run(xp):
        x, y = filled(xp, (0, 8)), filled(xp, (0, 8), 1.0)
        s, out, mean, rstd = (xp.empty((0, 8), F32), xp.empty((0, 8), F32), xp.empty(0, F32),
                              xp.empty(0, F32))
        r = residual_layernorm_forward(x, y, filled(xp, 8, 1.0), filled(xp, 8, 0.0), 1e-5, s,
                                       out, mean, rstd, y_bias=filled(xp, 8, 0.5), p=p, key=KEY)
        return (s, *r)
    same_on_both(run)


@pytest.mark.parametrize("need_grad", [True, False])
def test_softmax_xent_without_rows(need_grad):
    def run(xp):
        losses, dlogits = softmax_xent(filled(xp, (0, 7)), xp.zeros(0, np.int32), 1.0,
                                       need_grad=need_grad)
        return losses, dlogits
    same_on_both(run)


@pytest.mark.parametrize("N", [2, 0])
def test_softmax_xent_over_no_columns_is_refused(N):
    both_refuse(lambda xp: softmax_xent(filled(xp, (N, 0)), xp.zeros(N, np.int32), 1.0),
                "logits: empty vocabulary")


@pytest.mark.parametrize("B,T,C", [(0, 4, 8), (2, 0, 8), (2, 4, 0)])
def test_embedding_without_elements(B, T, C):
    def run(xp):
        return (embedding_forward(xp.zeros((B, T), np.int32), filled(xp, (5, C)),
                                  filled(xp, (4, C), 1.0)),)
    same_on_both(run)

    def backward(xp):
        dwte, dwpe = filled(xp, (5, C)), filled(xp, (4, C))
        embedding_backward(filled(xp, (B, T, C)), xp.zeros((B, T), np.int32), dwte, dwpe)
        return dwte, dwpe
    same_on_both(backward)


@pytest.mark.parametrize("B", [0, 2])
def test_embedding_over_no_vocabulary_is_refused(B):
    both_refuse(lambda xp: embedding_forward(xp.zeros((B, 3), np.int32), filled(xp, (0, 8)),
                                             filled(xp, (4, 8))), "wte: empty vocabulary")
    both_refuse(lambda xp: embedding_backward(filled(xp, (B, 3, 8)), xp.zeros((B, 3), np.int32),
                                              filled(xp, (0, 8)), filled(xp, (4, 8))),
                "dwte: empty vocabulary")


@pytest.mark.parametrize("with_bias", [False, True])
def test_gelu_without_elements(with_bias):
    def run(xp):
        x = filled(xp, (0, 6))
        bias = filled(xp, 6, 0.5) if with_bias else None
        out = gelu_forward(x, bias=bias)
        dbias = filled(xp, 6) if with_bias else None
        dx = gelu_backward(filled(xp, (0, 6)), x, dbias=dbias, bias=bias)
        return out, dx, dbias
    same_on_both(run)


@pytest.mark.parametrize("with_out", [False, True])
def test_dropout_without_elements(with_out):
    def run(xp):
        out = dropout(filled(xp, (0, 6)), 0.5, KEY)
        o = xp.empty((0, 6), F32) if with_out else None
        dbias = filled(xp, 6)
        r = dropout_bias_backward(filled(xp, (0, 6)), 0.5, KEY, o, dbias)
        return out, r, dbias
    same_on_both(run)


def test_casts_without_elements():
    same_on_both(lambda xp: (from_bf16(to_bf16(filled(xp, (0, 3)))),))


@pytest.mark.parametrize("M,N,K", [(0, 3, 4), (3, 0, 4), (3, 4, 0)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_without_elements(M, N, K, accumulate):
    """k = 0: op(a) @ op(b) is all zeros, so out becomes zeros, or stays as it was when
    accumulating."""
    def run(xp):
        out = filled(xp, (M, N))
        return (gemm(filled(xp, (M, K)), filled(xp, (K, N), 1.0), out, accumulate=accumulate),)
    same_on_both(run)


def test_gemm_accumulate_without_out_is_refused():
    both_refuse(lambda xp: gemm(filled(xp, (2, 3)), filled(xp, (3, 2)), accumulate=True),
                "accumulate=True needs an out")


def test_adamw_without_parameters():
    def run(xp):
        hyper = xp.asarray(adamw_hyperparams(1e-3, 0.9, 0.95, 0.1, 1))
        p, g, m, v = (xp.zeros(0, F32) for _ in range(4))
        adamw_update(p, g, m, v, xp.zeros(0, F32), hyper, 0.9, 0.95, 1e-8)
        return p, m, v
    same_on_both(run)


@pytest.mark.parametrize("precision,D", [("fp32", 8), ("bf16", 16)])
def test_attention_without_rows(precision, D):
    H = 2

    def run(xp):
        qkv = filled(xp, (0, 4, 3 * H * D), 0.25)
        out, lse = attention_forward(qkv, H, precision=precision)
        dqkv = attention_backward(filled(xp, (0, 4, H * D)), qkv, out, lse, H,
                                  precision=precision)
        return out, lse, dqkv
    same_on_both(run)


@pytest.mark.parametrize("B", [2, 0])
@pytest.mark.parametrize("n_head,C3,match", [(2, 0, "head dim 0"), (0, 48, "at least 1 head")])
def test_attention_without_heads_or_head_dim_is_refused(B, n_head, C3, match):
    both_refuse(lambda xp: attention_forward(filled(xp, (B, 4, C3)), n_head), match)
    C = C3 // 3
    both_refuse(lambda xp: attention_backward(filled(xp, (B, 4, C)), filled(xp, (B, 4, C3)),
                                              filled(xp, (B, 4, C)),
                                              filled(xp, (B, max(n_head, 1), 4)), n_head),
                match)


@pytest.mark.parametrize("lead", [(0,), (0, 3), (2, 0)])
def test_linear_without_rows(lead):
    """(No launcher of its own: its GEMMs and bias sum on no rows.)"""
    def run(xp):
        x, weight = filled(xp, lead + (4,)), filled(xp, (4, 3), 0.5)
        out = linear_forward(x, weight, filled(xp, 3, 1.5))
        dweight, dbias = filled(xp, (4, 3)), filled(xp, 3)
        dx = linear_backward(filled(xp, lead + (3,)), x, weight, dweight, dbias)
        return out, dx, dweight, dbias
    same_on_both(run)


@pytest.mark.parametrize("Cin,Cout", [(0, 3), (4, 0)])
def test_linear_without_features_is_refused(Cin, Cout):
    match = "a linear layer needs input and output features"
    both_refuse(lambda xp: linear_forward(filled(xp, (2, Cin)), filled(xp, (Cin, Cout))), match)
    both_refuse(lambda xp: linear_backward(filled(xp, (2, Cout)), filled(xp, (2, Cin)),
                                           filled(xp, (Cin, Cout)), filled(xp, (Cin, Cout))),
                match)
