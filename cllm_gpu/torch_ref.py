"""An independent PyTorch GPT-2 with the same parameter names and layout, for cross-checking
gradients (tests) and for side-by-side throughput (scripts/bench.py). Needs `torch`."""
from __future__ import annotations

import numpy as np

from .model import param_layout


def build_torch_gpt(cfg, state_dict: dict | None = None, device="cpu", dtype="float32",
                    attn_mask=None):
    """attn_mask: None (causal attention) or a function T -> float tensor (H, T, T) added to
    the scores, the causal -inf included: the caller states the distance bias of a model with
    attn_bias (this module does not derive it from cfg, so it stays an independent check).
    A model with pos_emb "none" has no wpe here either (param_layout). In training mode
    (`.train()`) with cfg.dropout > 0 and no explicit masks, dropout is PyTorch's own, in
    nanoGPT's places: the embedding sum, the attention probabilities (SDPA's dropout_p) and
    each residual branch."""
    import torch
    import torch.nn.functional as F

    class TorchGPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = cfg
            specs, _ = param_layout(cfg)
            self.names = [s.name for s in specs]
            tdtype = getattr(torch, dtype)
            self.p = torch.nn.ParameterDict({
                s.name.replace(".", "__"): torch.nn.Parameter(
                    torch.zeros(s.shape, device=device, dtype=tdtype)) for s in specs})
            if state_dict is not None:
                self.load(state_dict)

        def load(self, sd):
            with torch.no_grad():
                for n in self.names:
                    self.p[n.replace(".", "__")].copy_(torch.as_tensor(np.asarray(sd[n])))

        def w(self, name):
            return self.p[name.replace(".", "__")]

        def forward(self, idx, targets=None, masks=None):
            """masks: {(layer, site): tensor} dropout multipliers (0 or 1 / (1 - p)) passed in
            explicitly, site as in cllm_gpu.ops.dropout: EMBED (layer 0) on the embedding sum,
            ATTN_RESID and MLP_RESID on each residual branch, ATTN_PROBS (B, H, T, T) on a
            block's attention probabilities (that block's attention is then computed
            explicitly: P = softmax(S + mask), y = (P * keep) V)."""
            B, T = idx.shape
            C, H = cfg.n_embd, cfg.n_head
            p_own = cfg.dropout if self.training and masks is None else 0.0  # torch's RNG

            def drop(t, layer, site):
                if p_own > 0:
                    return F.dropout(t, p_own)
                return t if masks is None or (layer, site) not in masks else t * masks[(layer, site)]
            x = self.w("transformer.wte.weight")[idx]
            if "transformer.wpe.weight" in self.names:
                x = x + self.w("transformer.wpe.weight")[:T]
            x = drop(x, 0, 0)
            mask = None if attn_mask is None else attn_mask(T).to(device=device, dtype=x.dtype)
            for i in range(cfg.n_layer):
                h = f"transformer.h.{i}."
                a = F.layer_norm(x, (C,), self.w(h + "ln_1.weight"), self.w(h + "ln_1.bias"), cfg.ln_eps)
                qkv = a @ self.w(h + "attn.c_attn.weight") + self.w(h + "attn.c_attn.bias")
                q, k, v = qkv.split(C, dim=2)
                q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
                if masks is not None and (i, 1) in masks:  # site 1: ATTN_PROBS
                    s = q @ k.transpose(-1, -2) / (C // H) ** 0.5
                    s = s + (mask if mask is not None else torch.full(
                        (T, T), float("-inf"), dtype=s.dtype, device=device).triu(1))
                    y = (torch.softmax(s, dim=-1) * masks[(i, 1)]) @ v
                else:
                    y = (F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p_own)
                         if mask is None else
                         F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_own))
                y = y.transpose(1, 2).reshape(B, T, C)
                x = x + drop(y @ self.w(h + "attn.c_proj.weight") + self.w(h + "attn.c_proj.bias"),
                             i, 2)
                a = F.layer_norm(x, (C,), self.w(h + "ln_2.weight"), self.w(h + "ln_2.bias"), cfg.ln_eps)
                a = F.gelu(a @ self.w(h + "mlp.c_fc.weight") + self.w(h + "mlp.c_fc.bias"),
                           approximate="tanh")
                x = x + drop(a @ self.w(h + "mlp.c_proj.weight") + self.w(h + "mlp.c_proj.bias"),
                             i, 3)
            x = F.layer_norm(x, (C,), self.w("transformer.ln_f.weight"),
                             self.w("transformer.ln_f.bias"), cfg.ln_eps)
            logits = x @ self.w("transformer.wte.weight")[:cfg.vocab_size].T  # padding: no logits
            if targets is None:
                return logits
            logits = logits.view(-1, cfg.vocab_size)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-1)

        def grads(self) -> dict:
            return {n: self.w(n).grad.detach().cpu().numpy() for n in self.names}

        def optimizer(self, lr, weight_decay, betas, eps, fused=None):
            decay = [self.w(n) for n in self.names if self.w(n).dim() == 2]
            other = [self.w(n) for n in self.names if self.w(n).dim() != 2]
            kw = {}
            if fused is not None:
                kw["fused"] = fused
            return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": other, "weight_decay": 0.0}], lr=lr,
                                     betas=betas, eps=eps, **kw)

    return TorchGPT()




def train_torch(cfg, tc, data_dir, log=None) -> dict:
    """Train the PyTorch model as GpuTrainer trains ours, for a side-by-side comparison
    (scripts/compare_torch.py): the same initial weights (init_params(cfg, tc.seed)), the same
    batches (TokenDataset.get_batch from np.random.default_rng(tc.seed)), the same learning-rate
    schedule (tc.lr_at), global-norm clipping, AdamW with decay on 2-D weights only, and the
    same validation batches (rng tc.seed + 1). What differs: PyTorch's kernels, summation
    orders and its own dropout masks. One process, float32, CPU. Returns {"train": [(step,
    loss)], "val": [(step, val_loss)], "seconds": ...}."""
    import time

    import torch

    from .data import TokenDataset
    from .model import init_params
    ds = TokenDataset(data_dir, cfg.vocab_size)
    T, B = tc.seq_len or cfg.block_size, tc.batch_size
    model = build_torch_gpt(cfg, init_params(cfg, tc.seed), dtype=tc.dtype)
    opt = model.optimizer(tc.learning_rate, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps)
    rng = np.random.default_rng(tc.seed)
    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731

    def evaluate():
        model.train(False)  # evaluation mode: no dropout
        erng, total, count = np.random.default_rng(tc.seed + 1), 0.0, 0
        with torch.no_grad():
            for _ in range(tc.eval_batches):
                idx, tgt = ds.get_batch("val", B, T, erng)
                n = int((np.asarray(tgt) >= 0).sum())
                total += float(model(as_t(idx), as_t(tgt))) * n
                count += n
        model.train()
        return total / max(count, 1)

    out = {"train": [], "val": []}
    t0 = time.perf_counter()
    model.train()
    for step in range(1, tc.max_steps + 1):
        idx, tgt = ds.get_batch("train", B * tc.grad_accum_steps, T, rng)
        for g in opt.param_groups:
            g["lr"] = tc.lr_at(step - 1)
        loss = model(as_t(idx), as_t(tgt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        out["train"].append((step, loss.item()))
        if tc.eval_interval and (step % tc.eval_interval == 0 or step == tc.max_steps):
            out["val"].append((step, evaluate()))
            if log:
                log(f"[torch] step {step} | val loss {out['val'][-1][1]:.4f}")
    out["seconds"] = time.perf_counter() - t0
    return out
