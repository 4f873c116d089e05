"""Cross-check against an independent implementation: PyTorch autograd (skipped without torch;
required in CI, where .ci/run installs the local CPU wheel)."""
from pathlib import Path

import numpy as np
import pytest

from cllm_gpu import CLLMModel, ModelConfig
from cllm_gpu.torch_ref import build_torch_gpt

pytestmark = pytest.mark.ci_required("torch")


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


# padded 64: wte has 14 padding rows, moved off zero below: still never scored, zero gradient
@pytest.mark.parametrize("padded", [50, 64])
def test_loss_and_every_gradient_match_pytorch_autograd(torch, padded):
    cfg = ModelConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_embd=16,
                      padded_vocab_size=padded)
    ours = CLLMModel(cfg, backend="numpy", dtype="float64", seed=3)
    sd = ours.state_dict()
    rng = np.random.default_rng(0)
    for k in sd:  # move off the init so every gradient is generic
        sd[k] = sd[k] + rng.normal(0, 0.05, sd[k].shape)
    ours.load_state_dict(sd)
    idx = rng.integers(0, 50, size=(3, 12))
    tgt = rng.integers(0, 50, size=(3, 12))
    tgt[0, :5] = -1
    loss, grads = ours.loss_and_grads(idx, tgt)
    tm = build_torch_gpt(cfg, sd, dtype="float64")
    tl = tm(torch.as_tensor(idx), torch.as_tensor(tgt))
    tl.backward()
    assert abs(loss - tl.item()) < 1e-12
    for name, g in tm.grads().items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-9, atol=1e-12, err_msg=name)
    assert not grads["transformer.wte.weight"][50:].any()


def test_dropout_masks_passed_to_pytorch_give_the_same_loss_and_gradients(torch):
    """A training forward with dropout (p = 0.3, a fixed key): PyTorch autograd on the same
    masks, passed in explicitly, gives the same loss and every gradient (float64, 1e-9)."""
    from cllm_gpu.model import DropoutContext
    from cllm_gpu.ops.dropout import (ATTN_PROBS, ATTN_RESID, EMBED, MLP_RESID, DropoutKey,
                                      keep_mask, site_id)
    p = 0.3
    cfg = ModelConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_embd=16, dropout=p)
    ours = CLLMModel(cfg, backend="numpy", dtype="float64", seed=3)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 50, size=(3, 12))
    tgt = rng.integers(0, 50, size=(3, 12))
    ctx = DropoutContext(seed=9, step=4, micro=2)
    loss, grads = ours.loss_and_grads(idx, tgt, dropout=ctx)
    assert abs(loss - ours.loss_and_grads(idx, tgt)[0]) > 1e-3  # dropout did something
    shape = (3, 12, 16)
    masks = {}
    probs = (3, 4, 12, 12)                  # (B, H, T, T): the attention probabilities' mask
    for layer, site in [(0, EMBED)] + [(l, s) for l in range(2)
                                       for s in (ATTN_PROBS, ATTN_RESID, MLP_RESID)]:
        sh = probs if site == ATTN_PROBS else shape
        keep = keep_mask(0, int(np.prod(sh)), p, DropoutKey(9, 4, site_id(layer, site), 2))
        masks[(layer, site)] = torch.as_tensor(keep.reshape(sh) / (1 - p))
    tm = build_torch_gpt(cfg, ours.state_dict(), dtype="float64")
    tl = tm(torch.as_tensor(idx), torch.as_tensor(tgt), masks=masks)
    tl.backward()
    assert abs(loss - tl.item()) < 1e-12
    for name, g in tm.grads().items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-9, atol=1e-12, err_msg=name)


# ---- the distance bias: PyTorch SDPA with an explicit float mask, built here from the formulas
PRIMES = [2, 3, 5, 7, 11, 13, 17, 19]


def _bias_mask(torch, kind, H, T):
    """(H, T, T) float64: -m_h (i - j) for j <= i, -inf above the diagonal."""
    h = torch.arange(1, H + 1, dtype=torch.float64)
    if kind == "alibi":
        m = 2.0 ** (-8.0 * h / H)
    else:
        m = 1.0 / torch.tensor(PRIMES[:H], dtype=torch.float64)
    i = torch.arange(T, dtype=torch.float64)
    dist = i[:, None] - i[None, :]                                   # i - j
    bias = -m[:, None, None] * dist
    return bias.masked_fill(dist < 0, float("-inf"))


@pytest.mark.parametrize("kind", ["alibi", "lattice"])
def test_biased_attention_matches_pytorch_sdpa_float64(torch, kind):
    from cllm_gpu.ops.attention import attention_backward, attention_forward, attention_slopes
    F = torch.nn.functional
    B, T, H, D = 2, 70, 4, 8  # T > 64: the reference's query blocks off the diagonal too
    rng = np.random.default_rng(21)
    qkv = rng.normal(size=(B, T, 3 * H * D))
    dout = rng.normal(size=(B, T, H * D))
    m = attention_slopes(kind, H)
    out, lse = attention_forward(qkv, H, slopes=m)
    dqkv = attention_backward(dout, qkv, out, lse, H, slopes=m)

    t = torch.tensor(qkv, requires_grad=True)
    q, k, v = (a.view(B, T, H, D).transpose(1, 2) for a in t.split(H * D, dim=2))
    mask = _bias_mask(torch, kind, H, T)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, -1)
    y.backward(torch.tensor(dout))
    t_lse = torch.logsumexp(q @ k.transpose(-1, -2) / D ** 0.5 + mask, dim=-1)
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lse, t_lse.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dqkv, t.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind,pos_emb", [("alibi", "none"), ("lattice", "none"),
                                          ("lattice", "learned")])
def test_biased_model_loss_and_every_gradient_match_pytorch(torch, kind, pos_emb):
    cfg = ModelConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_embd=16,
                      attn_bias=kind, pos_emb=pos_emb)
    ours = CLLMModel(cfg, backend="numpy", dtype="float64", seed=3)
    sd = ours.state_dict()
    assert ("transformer.wpe.weight" in sd) == (pos_emb == "learned")
    rng = np.random.default_rng(1)
    for k in sd:
        sd[k] = sd[k] + rng.normal(0, 0.05, sd[k].shape)
    ours.load_state_dict(sd)
    T = 12 if pos_emb == "learned" else 20  # without positions: longer than block_size
    idx = rng.integers(0, 50, size=(3, T))
    tgt = rng.integers(0, 50, size=(3, T))
    tgt[1, :4] = -1
    loss, grads = ours.loss_and_grads(idx, tgt)
    tm = build_torch_gpt(cfg, sd, dtype="float64",
                         attn_mask=lambda n: _bias_mask(torch, kind, cfg.n_head, n))
    tl = tm(torch.as_tensor(idx), torch.as_tensor(tgt))
    tl.backward()
    assert abs(loss - tl.item()) < 1e-12
    for name, g in tm.grads().items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.fixture(scope="module")
def many_documents(tmp_path_factory):
    """Byte data of 60 short documents: an end-of-text token in most training windows."""
    from cllm_gpu.data import prepare
    d = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "\n"]
    for i in range(60):
        (d / f"d{i:03d}.txt").write_text(" ".join(rng.choice(words, size=rng.integers(2, 8))))
    prepare(d, d / "tok")
    return d / "tok"


@pytest.mark.parametrize("clip,B,K,model_kw", [
    (0.0, 3, 1, {}),
    (0.05, 2, 3, {}),                        # clipping on every step, 3 micro-batches
    (0.05, 3, 1, dict(attn_bias="alibi", pos_emb="none", padded_vocab_size=320))])
def test_trainer_steps_equal_pytorch_adamw_training_float64(torch, many_documents, tmp_path,
                                                            clip, B, K, model_kw):
    """Five GpuTrainer steps (warm-up, cosine decay to min_lr, decay on 2-D weights only,
    global-norm clip, end-of-text an ordinary target across documents) equal torch.optim.AdamW
    with clip_grad_norm_ on one batch of K x B sequences: losses, parameters, both moments."""
    from cllm_gpu import GpuTrainer, TrainConfig
    from cllm_gpu.data import TokenDataset
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=2, n_head=4, n_embd=16, **model_kw)
    tc = TrainConfig(batch_size=B, grad_accum_steps=K, max_steps=5, warmup_steps=2,
                     lr_decay_steps=4, learning_rate=3e-2, min_lr=1e-3, weight_decay=0.1,
                     grad_clip=clip, eval_interval=0, final_checkpoint=False, dtype="float64")
    tr = GpuTrainer(cfg, tc, many_documents, tmp_path, backend="numpy", log=lambda m: None)
    mask = (None if cfg.attn_bias == "none" else
            lambda n: _bias_mask(torch, cfg.attn_bias, cfg.n_head, n))
    tm = build_torch_gpt(cfg, tr.model.state_dict(), dtype="float64", attn_mask=mask)
    losses = tr.train()["losses"]
    opt = tm.optimizer(tc.learning_rate, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps)
    ds, rng, eot_targets = TokenDataset(many_documents), np.random.default_rng(tc.seed), 0
    # warm-up over 2 steps, then cosine from 3e-2 (step 2) to min_lr 1e-3 at step 4
    lrs = [1.5e-2, 3e-2, 3e-2, (3e-2 + 1e-3) / 2, 1e-3]
    for step in range(5):
        idx, tgt = (torch.as_tensor(a) for a in ds.get_batch("train", B * K, 16, rng))
        eot_targets += int((tgt == ds.meta["eot_id"]).sum())
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        opt.zero_grad()
        loss = tm(idx, tgt)
        loss.backward()
        if clip:
            assert torch.nn.utils.clip_grad_norm_(tm.parameters(), clip) > clip  # it clips
        opt.step()
        assert abs(losses[step] - loss.item()) < 1e-12, step
    assert eot_targets > 0
    ours = {"param": tr.model.params, "exp_avg": tr.model.adam_m, "exp_avg_sq": tr.model.adam_v}
    for name in tm.names:
        p = tm.w(name)
        for what, theirs, atol in (("param", p, 1e-11), ("exp_avg", opt.state[p]["exp_avg"],
                                   1e-14), ("exp_avg_sq", opt.state[p]["exp_avg_sq"], 1e-16)):
            np.testing.assert_allclose(ours[what][name], theirs.detach().numpy(), rtol=1e-9,
                                       atol=atol, err_msg=f"{what} {name}")


def test_training_matches_an_equivalent_pytorch_run_with_dropout(torch, token_dir):
    """The shakespeare-char preset scaled down to CI size (2 layers, 32 embd, block 32, 150
    steps, dropout 0.2) on ~200 KB of the embedded corpus: cllm-gpu and the PyTorch model
    (same initial weights, batches and schedule; PyTorch's own dropout masks) end within 0.02
    in validation loss, and both learned (docs/shakespeare.md has the longer runs)."""
    import argparse
    import importlib.util

    from cllm_gpu.data import default_corpus_files
    pytest.importorskip("matplotlib")  # compare_torch.plot at the end
    spec = importlib.util.spec_from_file_location(
        "compare_torch", Path(__file__).resolve().parent.parent / "scripts" / "compare_torch.py")
    compare_torch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_torch)
    text = "".join(p.read_text(errors="replace") for p in default_corpus_files(200_000))
    data = token_dir(text, "compare")
    args = argparse.Namespace(data=data, out=data.parent / "cmp", n_layer=2, n_head=2, n_embd=32,
                              block_size=32, batch_size=8, steps=150, eval_interval=50,
                              eval_batches=10, warmup_steps=10, dropout=0.2, seed=1337)
    ours, theirs = compare_torch.compare(args, log=lambda m: None)
    assert (ours["impl"], theirs["impl"]) == ("cllm-gpu", "torch")
    assert [s for s, _ in ours["val"]] == [s for s, _ in theirs["val"]] == [50, 100, 150]
    assert ours["model_config"]["dropout"] == 0.2
    assert ours["final_val_loss"] < ours["val"][0][1] - 0.1  # it learned
    assert ours["final_val_loss"] - theirs["final_val_loss"] <= 0.02, (ours["val"], theirs["val"])
    png = data.parent / "curves.png"
    compare_torch.plot([ours, theirs], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_train_torch_without_dropout_is_our_trainer_step_for_step(torch, many_documents,
                                                                   tmp_path):
    """train_torch (scripts/compare_torch.py's PyTorch half) was only compared with us within
    0.02 of a final validation loss: without its gradient clipping, or with its learning-rate
    schedule one step ahead, it passed. Without dropout (float64) nothing differs but the
    kernels: every training loss and both validation losses equal GpuTrainer's, with clipping
    on every step and a warm-up and a decay in the 6 steps."""
    import json

    from cllm_gpu import GpuTrainer, TrainConfig
    from cllm_gpu.torch_ref import train_torch
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=2, n_head=4, n_embd=16)
    tc = TrainConfig(batch_size=3, max_steps=6, warmup_steps=2, lr_decay_steps=5,
                     learning_rate=3e-2, min_lr=1e-3, weight_decay=0.1, grad_clip=0.05,
                     eval_interval=3, eval_batches=2, final_checkpoint=False, dtype="float64")
    ours = GpuTrainer(cfg, tc, many_documents, tmp_path, backend="numpy", log=lambda m: None)
    losses = ours.train()["losses"]
    val = [(r["step"], r["val_loss"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").open())
           if r.get("type") == "eval"]
    theirs = train_torch(cfg, tc, many_documents)
    assert [s for s, _ in theirs["train"]] == list(range(1, 7))
    np.testing.assert_allclose([l for _, l in theirs["train"]], losses, rtol=1e-10, atol=0)
    assert [s for s, _ in theirs["val"]] == [s for s, _ in val] == [3, 6]
    np.testing.assert_allclose([l for _, l in theirs["val"]], [l for _, l in val], rtol=1e-10,
                               atol=0)


@pytest.mark.parametrize("attn_bias", ["none", "alibi"])
def test_pytorchs_own_dropout_is_in_nanogpts_places(torch, monkeypatch, attn_bias):
    """The PyTorch model's own dropout (training mode, no masks passed: compare_torch's runs)
    is p at nanoGPT's places: F.dropout on the embedding sum and on each block's two residual
    branches, SDPA's dropout_p on each block's attention probabilities; none in evaluation.
    Without the attention's dropout_p (either SDPA call) the 0.02 comparison still passed."""
    F = torch.nn.functional
    calls = []

    def spy(name, fn, p_of):
        def call(*a, **kw):
            calls.append((name, p_of(a, kw)))
            return fn(*a, **kw)
        monkeypatch.setattr(F, name, call)
    spy("dropout", F.dropout, lambda a, kw: a[1] if len(a) > 1 else kw.get("p"))
    spy("scaled_dot_product_attention", F.scaled_dot_product_attention,
        lambda a, kw: kw.get("dropout_p", 0.0))
    cfg = ModelConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_embd=16, dropout=0.3,
                      attn_bias=attn_bias, pos_emb="learned")
    mask = None if attn_bias == "none" else lambda n: _bias_mask(torch, attn_bias, 4, n)
    tm = build_torch_gpt(cfg, CLLMModel(cfg, backend="numpy", dtype="float64").state_dict(),
                         dtype="float64", attn_mask=mask)
    idx = torch.as_tensor(np.random.default_rng(0).integers(0, 50, size=(2, 12)))
    tm.train()
    tm(idx, idx)
    assert sorted(calls) == sorted([("dropout", 0.3)] * (1 + 2 * cfg.n_layer)
                                   + [("scaled_dot_product_attention", 0.3)] * cfg.n_layer)
    calls.clear()
    tm.train(False)
    tm(idx, idx)
    assert calls == [("scaled_dot_product_attention", 0.0)] * cfg.n_layer


def test_alibi_slopes_are_blooms_when_the_head_count_is_a_power_of_two(torch):
    """The ALiBi slopes against an outside source, transformers' BLOOM (build_alibi_tensor,
    the ALiBi authors' get_slopes): equal for H = 1, 2, 4, 8, 16, 32. For other H, BLOOM takes
    the power of two below H and interleaves the odd powers of the next one's; cllm-gpu keeps
    the one geometric sequence 2^(-8h/H) (docs/attention_bias.md), so H = 3, 6, 12 differ."""
    from cllm_gpu.ops.attention import attention_slopes
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")

    def blooms(H):  # the bias at distance 1 of a 2-token sequence: the slopes (float32 inside)
        return bloom.build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), H,
                                        torch.float64)[:, 0, 1].numpy()
    for H in (1, 2, 4, 8, 16, 32):
        np.testing.assert_allclose(attention_slopes("alibi", H), blooms(H), rtol=1e-6, err_msg=H)
    for H in (3, 6, 12):
        assert not np.allclose(attention_slopes("alibi", H), blooms(H)), H
        np.testing.assert_allclose(attention_slopes("alibi", H),
                                   2.0 ** (-8.0 * np.arange(1, H + 1) / H), rtol=1e-15)
    np.testing.assert_allclose(blooms(12), 2.0 ** -np.r_[1:9, 0.5:4:1], rtol=1e-6)


@pytest.mark.parametrize("padded", [50, 64])
def test_the_pytorch_model_is_transformers_gpt2(torch, padded):
    """build_torch_gpt against transformers' GPT2LMHeadModel on the same weights (float64, off
    the init): logits, the loss and every gradient (the tied wte's too) equal. torch_ref takes
    the LayerNorm epsilon, the parameter names and shapes from cllm_gpu (cfg.ln_eps,
    param_layout), so a wrong value there was ours and the reference's alike and invisible to
    the comparisons above (ln_eps 1e-6 passed this file); here it meets GPT-2 itself. Padding
    rows of wte (zero here) get no logits and no gradient."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    V, C = 50, 16
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=12, n_embd=C, n_layer=2, n_head=4)).double().eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = {n: t.numpy() for n, t in hf_model.state_dict().items()
          if n != "lm_head.weight" and not n.endswith((".attn.bias", ".attn.masked_bias"))}
    cfg = ModelConfig(vocab_size=V, block_size=12, n_layer=2, n_head=4, n_embd=C,
                      padded_vocab_size=padded)
    if padded > V:
        sd["transformer.wte.weight"] = np.concatenate(
            [sd["transformer.wte.weight"], np.zeros((padded - V, C))])
    tm = build_torch_gpt(cfg, sd, dtype="float64").eval()
    idx = torch.as_tensor(np.random.default_rng(0).integers(0, V, size=(3, 12)))
    theirs = hf_model(idx, labels=idx)
    theirs.loss.backward()
    with torch.no_grad():
        logits = tm(idx)
    tgt = torch.cat([idx[:, 1:], torch.full((3, 1), -1)], dim=1)  # GPT-2 shifts labels
    loss = tm(idx, tgt)
    loss.backward()
    np.testing.assert_allclose(logits.numpy(), theirs.logits.detach().numpy(), rtol=1e-12,
                               atol=1e-12)
    # transformers' loss is float32 (it upcasts the logits): its loss and gradients to ~1e-7
    assert abs(loss.item() - theirs.loss.item()) < 1e-6
    hf_grads = {n: p.grad.numpy() for n, p in hf_model.named_parameters()}  # wte: tied, once
    ours = tm.grads()
    assert not ours["transformer.wte.weight"][V:].any()
    for name in sd:
        np.testing.assert_allclose(ours[name][:V] if name == "transformer.wte.weight" else
                                   ours[name], hf_grads[name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)
