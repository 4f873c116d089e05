"""An independent PyTorch GPT-2 with the same parameter names and layout, for cross-checking
gradients (tests) and for side-by-side throughput (scripts/bench.py). Needs `torch`."""
from __future__ import annotations

import numpy as np

from .model import param_layout


def build_torch_gpt(cfg, state_dict: dict | None = None, device="cpu", dtype="float32",
                    attn_mask=None, precision="fp32", bf16_attention="sdpa"):
    """attn_mask: None (causal attention) or a function T -> float tensor (H, T, T) added to
    the scores, the causal -inf included: the caller states the distance bias of a model with
    attn_bias (this module does not derive it from cfg, so it stays an independent check).
    A model with pos_emb "none" has no wpe here either (param_layout). In training mode
    (`.train()`) with cfg.dropout > 0 and no explicit masks, dropout is PyTorch's own, in
    nanoGPT's places: the embedding sum, the attention probabilities (SDPA's dropout_p) and
    each residual branch.

    precision "bf16" (dtype float32, no explicit masks, no attn_mask): the mixed-precision rule of
    CLLMModel(precision="bf16") as stated in its docs, written with PyTorch's own casts and
    its bf16 attention (scaled_dot_product_attention on bf16 q, k, v): every matrix product
    reads bf16 copies of its operands and accumulates in fp32 (the products of bf16 values
    are exact in fp32); a product whose only reader is another product (the qkv, the
    attention output, c_fc's product, the GELU's output, a branch's projection, the logits)
    is stored in bf16, and so is the gradient flowing back into each of those and into each
    activation operand (the LayerNorm outputs); the weights' gradients reach the fp32
    masters unrounded. LayerNorm, the GELU, the biases, softmax-cross-entropy and the
    residual stream stay fp32. (torch.autocast rounds in other places: scripts/bench.py
    uses it for speed, tests/test_torch_bf16.py measures both.) bf16_attention: "sdpa",
    PyTorch's own bf16 attention kernel, or "rule", the roundings the docs state for ours
    (docs/performance.md, "Reference"), written here in PyTorch (flash_attention_bf16_rule)."""
    import torch
    import torch.nn.functional as F

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    bf16 = precision == "bf16"
    if bf16_attention not in ("sdpa", "rule"):
        raise ValueError(f"bf16_attention must be 'sdpa' or 'rule', got {bf16_attention!r}")
    if bf16 and dtype != "float32":
        raise ValueError("precision 'bf16' needs dtype 'float32' (fp32 master weights)")

    def stored_bf16(t):
        """t held in bf16: its value, and the gradient flowing back through it, rounded."""
        return t.to(torch.bfloat16).float() if bf16 else t

    def weight_copy(t):
        """A weight's bf16 copy as a product reads it; its gradient goes to the fp32 master
        unrounded (t + (bf16(t) - t) is bf16(t) exactly: the difference is exact)."""
        return t + (t.to(torch.bfloat16).float() - t).detach() if bf16 else t

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
            if bf16 and (masks is not None or attn_mask is not None):
                raise ValueError("precision 'bf16' takes no explicit masks and no attn_mask")
            C, H = cfg.n_embd, cfg.n_head
            p_own = cfg.dropout if self.training and masks is None else 0.0  # torch's RNG

            def drop(t, layer, site):
                if p_own > 0:
                    return F.dropout(t, p_own)
                return t if masks is None or (layer, site) not in masks else t * masks[(layer, site)]

            def linear(t, name):
                """t @ W + b of layer `name`. fp32: F.linear, one addmm with the bias, as
                nn.Linear (nanoGPT's layers) runs it, and under autocast a bf16 output, as
                autocast makes nn.Linear's (a product and a separate fp32 bias add would be
                an extra pass, and an fp32 output every later op reads at twice the bytes:
                scripts/bench.py's PyTorch side must not pay that). bf16: the product's bf16
                rounding, then the fp32 bias (the rule above)."""
                w, b = self.w(name + ".weight"), self.w(name + ".bias")
                if not bf16:
                    return F.linear(t, w.t(), b)
                return stored_bf16(t @ weight_copy(w)) + b

            x = self.w("transformer.wte.weight")[idx]
            if "transformer.wpe.weight" in self.names:
                x = x + self.w("transformer.wpe.weight")[:T]
            x = drop(x, 0, 0)
            mask = None if attn_mask is None else attn_mask(T).to(device=device, dtype=x.dtype)
            for i in range(cfg.n_layer):
                h = f"transformer.h.{i}."
                a = stored_bf16(F.layer_norm(x, (C,), self.w(h + "ln_1.weight"),
                                             self.w(h + "ln_1.bias"), cfg.ln_eps))
                qkv = (linear(a, h + "attn.c_attn") if not bf16 else
                       a @ weight_copy(self.w(h + "attn.c_attn.weight"))
                       + weight_copy(self.w(h + "attn.c_attn.bias")))
                if bf16:  # PyTorch's bf16 attention reads (and its backward writes) bf16 qkv
                    qkv = qkv.to(torch.bfloat16)
                q, k, v = qkv.split(C, dim=2)
                q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
                if masks is not None and (i, 1) in masks:  # site 1: ATTN_PROBS
                    s = q @ k.transpose(-1, -2) / (C // H) ** 0.5
                    s = s + (mask if mask is not None else torch.full(
                        (T, T), float("-inf"), dtype=s.dtype, device=device).triu(1))
                    y = (torch.softmax(s, dim=-1) * masks[(i, 1)]) @ v
                elif bf16 and bf16_attention == "rule":
                    y = flash_attention_bf16_rule(q, k, v)
                else:
                    y = (F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p_own)
                         if mask is None else
                         F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_own))
                y = y.transpose(1, 2).reshape(B, T, C)
                if bf16:
                    y = y.float()    # the attention's bf16 output; its gradient rounded to bf16
                x = x + drop(linear(y, h + "attn.c_proj"), i, 2)
                a = stored_bf16(F.layer_norm(x, (C,), self.w(h + "ln_2.weight"),
                                             self.w(h + "ln_2.bias"), cfg.ln_eps))
                a = stored_bf16(F.gelu(linear(a, h + "mlp.c_fc"), approximate="tanh"))
                x = x + drop(linear(a, h + "mlp.c_proj"), i, 3)
            x = stored_bf16(F.layer_norm(x, (C,), self.w("transformer.ln_f.weight"),
                                         self.w("transformer.ln_f.bias"), cfg.ln_eps))
            wte = weight_copy(self.w("transformer.wte.weight"))
            logits = stored_bf16(x @ wte[:cfg.vocab_size].T)  # padding rows: no logits
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




def flash_attention_bf16_rule(q, k, v):
    """Causal attention of bf16 q, k, v (B, H, T, D) with the roundings docs/performance.md
    states for the bf16 attention (FlashAttention-2's, one key tile: T <= 64): fp32 scores
    Q K^T scaled after the product; P = exp(S - rowmax) rounded to bf16 for P V, the row sum
    of the unrounded P; output bf16. Backward: P recomputed from the log-sum-exp, dV =
    bf16(P)^T dO, Delta = rowsum(dO * bf16(O)), dS = bf16(P * (dO V^T - Delta)), dQ = dS K
    and dK = dS^T Q scaled; the gradients bf16."""
    import torch

    class FlashRule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):       # float32 tensors holding bf16 values
            s = _causal_scores(torch, q, k)
            m = s.amax(-1, keepdim=True)
            p = torch.exp(s - m)
            row_sum = p.sum(-1, keepdim=True)
            out = (_bf16(p) @ v) / row_sum
            ctx.save_for_backward(q, k, v, out, m + torch.log(row_sum))
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            p = torch.exp(_causal_scores(torch, q, k) - lse)
            delta = (dout * _bf16(out)).sum(-1, keepdim=True)
            ds = _bf16(p * (dout @ v.transpose(-1, -2) - delta))
            scale = q.shape[-1] ** -0.5
            dv = _bf16(p).transpose(-1, -2) @ dout
            return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, dv

    if q.shape[-2] > 64:
        raise ValueError("flash_attention_bf16_rule: one 64-key tile, T <= 64")
    return FlashRule.apply(q.float(), k.float(), v.float()).to(torch.bfloat16)


def _bf16(t):
    """t's values rounded to bf16 (round to nearest even), as float32."""
    import torch
    return t.to(torch.bfloat16).float()


def _causal_scores(torch, q, k):
    """Q K^T / sqrt(D) (the scale after the product) with -inf above the diagonal."""
    T = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return s + torch.full((T, T), float("-inf"), device=q.device).triu(1)


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
