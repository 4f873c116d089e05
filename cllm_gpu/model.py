"""The CLLM model: GPT-2 architecture over arenas, with an activation cache and a full backward.

Parameters, gradients and the two Adam moments each live in one flat buffer ("arena") with the
same layout; every named parameter is a view into it. The forward pass fills an activation cache
allocated once per (batch, seq_len); the backward pass reads it and accumulates into the
gradient arena.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import ops
from .backend import resolve_backend
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, DataError
from .nvtx_ranges import nvtx_range
from .ops._common import is_device_array

PRECISIONS = ("fp32", "bf16")
ARENA_ALIGN = 64  # elements: every parameter starts on a 256-byte boundary (fp32) for vector loads
# Logits elements alive at once in the classifier: cache-sized on the CPU; on the GPU large
# enough that the chunked GEMMs stay efficient.
CLASSIFIER_CHUNK_ELEMS = {"numpy": 1 << 20, "cuda": 1 << 26}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple
    offset: int
    decay: bool  # AdamW weight decay applies (2-D weights only)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def param_layout(cfg: ModelConfig) -> tuple[list[ParamSpec], int]:
    """HF GPT-2 names and shapes in a fixed order; returns (specs, arena length)."""
    C, V = cfg.n_embd, cfg.vocab_size
    shapes = [("transformer.wte.weight", (V, C)), ("transformer.wpe.weight", (cfg.block_size, C))]
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        shapes += [
            (h + "ln_1.weight", (C,)), (h + "ln_1.bias", (C,)),
            (h + "attn.c_attn.weight", (C, 3 * C)), (h + "attn.c_attn.bias", (3 * C,)),
            (h + "attn.c_proj.weight", (C, C)), (h + "attn.c_proj.bias", (C,)),
            (h + "ln_2.weight", (C,)), (h + "ln_2.bias", (C,)),
            (h + "mlp.c_fc.weight", (C, 4 * C)), (h + "mlp.c_fc.bias", (4 * C,)),
            (h + "mlp.c_proj.weight", (4 * C, C)), (h + "mlp.c_proj.bias", (C,)),
        ]
    shapes += [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))]
    specs, off = [], 0
    for name, shape in shapes:
        specs.append(ParamSpec(name, shape, off, len(shape) == 2))
        off += int(np.prod(shape))
        off = (off + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN
    return specs, off


class Arena:
    """One flat buffer plus named views into it, laid out by `param_layout`."""

    def __init__(self, xp, specs, length, dtype):
        self.data = xp.zeros(length, dtype=dtype)
        self.views = {s.name: self.data[s.offset:s.offset + s.size].reshape(s.shape) for s in specs}

    def __getitem__(self, name):
        return self.views[name]


class ActivationCache:
    """Every tensor the backward pass reads, plus the scratch it writes, for one (B, T).

    precision="bf16": the tensors whose only readers are matrix products (ln1, ln2, fc_gelu,
    lnf) are stored in bf16 (storage dtype `lp_dtype`), written so by the LayerNorm and GELU
    kernels; the attention output, which its backward also reads, and the gradients flowing
    into each linear layer get bf16 copies (`att_lp`, `dout_lp`, `logits_lp`). With
    precision="fp32" those names are the float arrays themselves."""

    def __init__(self, xp, cfg: ModelConfig, B: int, T: int, dtype, lp_dtype=None):
        C, L, H, V = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size
        N = B * T
        e = lambda *shape: xp.empty(shape, dtype=dtype)  # noqa: E731
        lp = lp_dtype is not None
        m = lambda *shape: xp.empty(shape, dtype=lp_dtype if lp else dtype)  # noqa: E731
        self.B, self.T = B, T
        self.idx = xp.empty((B, T), dtype=np.int32)
        self.targets_bt = xp.empty((B, T), dtype=np.int32)
        self.targets = self.targets_bt.reshape(N)   # a view: the classifier walks rows
        self.res = [e(B, T, C) for _ in range(L + 1)]     # residual stream entering block l
        self.res_mid = [e(B, T, C) for _ in range(L)]     # after attention, before the MLP
        self.ln1 = [m(N, C) for _ in range(L)]           # matmul inputs: bf16 in bf16 mode
        self.ln1_mean = [e(N) for _ in range(L)]
        self.ln1_rstd = [e(N) for _ in range(L)]
        self.qkv = [e(B, T, 3 * C) for _ in range(L)]
        self.att = [e(B, T, C) for _ in range(L)]
        self.lse = [e(B, H, T) for _ in range(L)]
        self.ln2 = [m(N, C) for _ in range(L)]
        self.ln2_mean = [e(N) for _ in range(L)]
        self.ln2_rstd = [e(N) for _ in range(L)]
        self.fc = [e(N, 4 * C) for _ in range(L)]         # c_fc output + bias, before GELU
        self.fc_gelu = [m(N, 4 * C) for _ in range(L)]
        self.lnf = m(N, C)
        self.lnf_mean = e(N)
        self.lnf_rstd = e(N)
        # The classifier runs over row chunks: only (rows, V) logits exist at a time, turned
        # into dlogits in place and consumed at once (GPT-2 124M, B*T = 16 K: 3.3 GB -> ~256 MB).
        budget = CLASSIFIER_CHUNK_ELEMS["numpy" if xp is np else "cuda"]
        self.classifier_rows = max(1, min(N, budget // max(V, 1)))
        self.logits = e(self.classifier_rows, V)
        self.dlnf = e(N, C)                               # d loss / d lnf, from the classifier
        self.losses = e(N)
        # backward scratch
        self.proj = e(N, C)
        self.dres = e(B, T, C)
        self.dres_mid = e(B, T, C)
        self.dln = e(N, C)
        self.datt = e(B, T, C)
        self.dqkv = e(B, T, 3 * C)
        self.dfc = e(N, 4 * C)
        self.stage = HostStaging(xp)
        if lp:
            self.att_lp = [m(N, C) for _ in range(L)]
            self.dout_lp = m(N * 4 * C)            # the bf16 copy of a linear layer's dout
            self.logits_lp = m(self.classifier_rows, V)
        else:
            self.att_lp = [a.reshape(N, C) for a in self.att]
            self.dout_lp, self.logits_lp = None, self.logits

    def dout_lp_for(self, dout):
        """Where the bf16 copy of dout (N, Cout) goes: a view of the shared scratch."""
        return self.dout_lp[:dout.size].reshape(dout.shape)


class HostStaging:
    """Host -> device copies of token ids that do not make the host wait for the GPU.

    A plain copy from pageable memory waits for the stream to drain (a sync every step). On the
    CUDA path the ids go through pinned host buffers with an asynchronous copy instead; two
    buffers per destination alternate, and a buffer is refilled only after the event recorded
    behind its previous copy has fired (so the host runs at most two steps ahead there)."""

    def __init__(self, xp):
        self.xp = xp
        self.slots = {}

    def upload(self, dst, host):
        if self.xp is np or hasattr(host, "__cuda_array_interface__"):
            dst[...] = host.reshape(dst.shape)  # host -> host, or already on the device
            return
        import cupy
        import cupyx
        key = (id(dst), dst.shape)
        slots = self.slots.get(key)
        if slots is None:
            slots = self.slots[key] = {
                "bufs": [cupyx.empty_pinned(dst.shape, dtype=dst.dtype) for _ in range(2)],
                "events": [None, None], "next": 0}
        i = slots["next"]
        slots["next"] = 1 - i
        if slots["events"][i] is not None:
            slots["events"][i].synchronize()
        buf = slots["bufs"][i]
        np.copyto(buf, host.reshape(dst.shape), casting="unsafe")
        stream = cupy.cuda.get_current_stream()
        dst.set(buf, stream=stream)
        ev = cupy.cuda.Event(disable_timing=True)
        ev.record(stream)
        slots["events"][i] = ev


def init_params(cfg: ModelConfig, seed: int) -> dict:
    """GPT-2 initialisation, drawn on the host in float64 so every backend and dtype starts from
    the same numbers: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 * n_layer),
    zero biases, unit LayerNorm gains."""
    rng = np.random.default_rng(seed)
    specs, _ = param_layout(cfg)
    out = {}
    for s in specs:
        if s.name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            out[s.name] = np.ones(s.shape)
        elif len(s.shape) == 1:
            out[s.name] = np.zeros(s.shape)
        else:
            std = 0.02
            if s.name.endswith("c_proj.weight"):
                std /= math.sqrt(2 * cfg.n_layer)
            out[s.name] = rng.normal(0.0, std, size=s.shape)
    return out


class CLLMModel:
    def __init__(self, cfg: ModelConfig, backend: str = "auto", dtype: str = "float32",
                 seed: int = 0, precision: str = "fp32"):
        """precision: "fp32" computes everything in `dtype`; "bf16" (dtype float32 only) is
        mixed precision: the matrix products take bf16 copies of their operands (weights
        refreshed after each optimizer step, activations and gradients cast where produced)
        and accumulate in fp32 (tensor cores on the GPU); parameters, gradients, Adam moments,
        LayerNorm, softmax and the residual stream stay float32."""
        if not isinstance(cfg, ModelConfig):
            raise ConfigError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        if dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, "
                              f"got {precision!r}")
        if precision == "bf16" and dtype != "float32":
            raise ConfigError("precision 'bf16' needs dtype 'float32' (fp32 master weights)")
        self.cfg = cfg
        self.precision = precision
        self.backend, self.xp = resolve_backend(backend)
        self.dtype = np.dtype(dtype)
        self.specs, self.arena_size = param_layout(cfg)
        xp = self.xp
        self.params = Arena(xp, self.specs, self.arena_size, self.dtype)
        # the weights the matrix products read: a bf16 copy, or the parameters themselves
        self.lp_dtype = (ops.bf16_storage_dtype(xp is not np) if precision == "bf16" else None)
        self.params_lp = (Arena(xp, self.specs, self.arena_size, self.lp_dtype)
                          if self.lp_dtype is not None else self.params)
        self.grads = Arena(xp, self.specs, self.arena_size, self.dtype)
        self.adam_m = Arena(xp, self.specs, self.arena_size, self.dtype)
        self.adam_v = Arena(xp, self.specs, self.arena_size, self.dtype)
        mask = np.zeros(self.arena_size, dtype=self.dtype)
        for s in self.specs:
            if s.decay:
                mask[s.offset:s.offset + s.size] = 1.0
        self.decay_mask = xp.asarray(mask)
        self.load_state_dict(init_params(cfg, seed))
        self._caches: dict = {}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {s.name: self._to_host(self.params[s.name]).copy() for s in self.specs}

    def load_state_dict(self, sd: dict):
        names = {s.name for s in self.specs}
        unknown = sorted(set(sd) - names)
        missing = sorted(names - set(sd))
        if unknown:
            raise CheckpointError(f"unknown parameter(s): {', '.join(unknown[:5])}")
        if missing:
            raise CheckpointError(f"missing parameter(s): {', '.join(missing[:5])}")
        for s in self.specs:
            a = sd[s.name]
            if tuple(a.shape) != s.shape:
                raise CheckpointError(f"{s.name}: expected shape {s.shape}, got {tuple(a.shape)}")
        for s in self.specs:
            self.params[s.name][...] = self.xp.asarray(np.asarray(sd[s.name]), dtype=self.dtype)
        self.params_updated()

    def params_updated(self):
        """Call after changing the parameter arena in place (the optimizer step): refreshes the
        copies derived from it (the bf16 weights of precision="bf16")."""
        if self.params_lp is not self.params:
            ops.to_bf16(self.params.data, out=self.params_lp.data)

    def _lp(self, x, dst):
        """The matrix-product operand for float array x: its bf16 copy written into dst
        (precision="bf16"), or x itself (fp32)."""
        if self.lp_dtype is None:
            return x
        return ops.to_bf16(x, out=dst)

    def named_grads(self) -> dict:
        return {s.name: self._to_host(self.grads[s.name]).copy() for s in self.specs}

    def _to_host(self, a):
        return a.get() if is_device_array(a) else a

    def zero_grad(self):
        self.grads.data.fill(0)

    # ---------------------------------------------------------------- passes
    def _cache_for(self, B, T) -> ActivationCache:
        key = (B, T)
        c = self._caches.get(key)
        if c is None:
            if len(self._caches) >= 2:  # keep the training shape and one other (eval/sampling)
                self._caches.pop(next(iter(self._caches)))
            c = ActivationCache(self.xp, self.cfg, B, T, self.dtype, self.lp_dtype)
            self._caches[key] = c
        return c

    def batch_buffers(self, B: int, T: int):
        """(idx, targets): the (B, T) int32 arrays forward() reads token ids from. Filling them
        yourself and passing these very arrays to forward() skips its upload and range check,
        so the step does no host work (CUDA-graph capture); the caller vouches for the ids."""
        c = self._cache_for(B, T)
        return c.idx, c.targets_bt

    def _check_tokens(self, name, a, allow_ignore):
        a = np.asarray(a) if not hasattr(a, "__cuda_array_interface__") else a
        if a.ndim != 2:
            raise DataError(f"{name}: expected shape (B, T), got {tuple(a.shape)}")
        if a.dtype.kind not in "iu":
            raise DataError(f"{name}: expected integer token ids, got {a.dtype}")
        B, T = a.shape
        if B < 1 or T < 1:
            raise DataError(f"{name}: empty batch {tuple(a.shape)}")
        if T > self.cfg.block_size:
            raise DataError(f"{name}: sequence length {T} exceeds block_size {self.cfg.block_size}")
        if a.size:
            lo, hi = int(a.min()), int(a.max())
            if hi >= self.cfg.vocab_size or lo < (-1 if allow_ignore else 0):
                bad = hi if hi >= self.cfg.vocab_size else lo
                raise DataError(f"{name}: token id {bad} out of range [0, {self.cfg.vocab_size})")
        return a

    def forward(self, idx, targets=None, dloss: float | None = None):
        """Run the forward pass into the activation cache.

        idx, targets: (B, T) ints (targets == -1 ignored). With targets, returns the summed loss
        over non-ignored positions (a scalar of the backend's array module), and the fused
        classifier has already done its part of the backward pass: d loss / d lnf is in the
        cache for `backward`, and the classifier's share of the wte gradient has been
        accumulated into the gradient arena (zero it first). Every position's loss gradient is
        weighted by dloss, default 1 / (non-ignored count).
        Without targets, only the final LayerNorm output is computed (see `logits`)."""
        B, T = idx.shape
        prefilled = self._caches.get((B, T)) is not None and idx is self._caches[(B, T)].idx
        if not prefilled:
            idx = self._check_tokens("idx", idx, False)
        cfg, xp = self.cfg, self.xp
        c = self._cache_for(B, T)
        C, H = cfg.n_embd, cfg.n_head
        N = B * T
        P, W = self.params, self.params_lp   # W: the weights the matrix products read
        bf16 = self.lp_dtype is not None
        if not prefilled:
            c.stage.upload(c.idx, idx)
        with nvtx_range("forward"):
            ops.embedding_forward(c.idx, P["transformer.wte.weight"], P["transformer.wpe.weight"],
                                  out=c.res[0])
            for l in range(cfg.n_layer):
                h = f"transformer.h.{l}."
                with nvtx_range(f"block.{l}.forward"):
                    ops.layernorm_forward(c.res[l].reshape(N, C), P[h + "ln_1.weight"],
                                          P[h + "ln_1.bias"], 1e-5, c.ln1[l], c.ln1_mean[l],
                                          c.ln1_rstd[l], bf16_out=bf16)
                    ops.linear_forward(c.ln1[l], W[h + "attn.c_attn.weight"],
                                       P[h + "attn.c_attn.bias"], out=c.qkv[l].reshape(N, 3 * C))
                    ops.attention_forward(c.qkv[l], H, out=c.att[l], lse=c.lse[l],
                                          precision=self.precision)
                    ops.linear_forward(self._lp(c.att[l].reshape(N, C), c.att_lp[l]),
                                       W[h + "attn.c_proj.weight"], P[h + "attn.c_proj.bias"],
                                       out=c.proj)
                    xp.add(c.res[l], c.proj.reshape(B, T, C), out=c.res_mid[l])
                    ops.layernorm_forward(c.res_mid[l].reshape(N, C), P[h + "ln_2.weight"],
                                          P[h + "ln_2.bias"], 1e-5, c.ln2[l], c.ln2_mean[l],
                                          c.ln2_rstd[l], bf16_out=bf16)
                    # c_fc's bias is added by the GELU kernel, in the pass it makes anyway
                    ops.linear_forward(c.ln2[l], W[h + "mlp.c_fc.weight"], None, out=c.fc[l])
                    ops.gelu_forward(c.fc[l], out=c.fc_gelu[l], bias=P[h + "mlp.c_fc.bias"],
                                     bf16_out=bf16)
                    ops.linear_forward(c.fc_gelu[l], W[h + "mlp.c_proj.weight"],
                                       P[h + "mlp.c_proj.bias"], out=c.proj)
                    xp.add(c.res_mid[l], c.proj.reshape(B, T, C), out=c.res[l + 1])
            ops.layernorm_forward(c.res[cfg.n_layer].reshape(N, C), P["transformer.ln_f.weight"],
                                  P["transformer.ln_f.bias"], 1e-5, c.lnf, c.lnf_mean, c.lnf_rstd,
                                  bf16_out=bf16)
            if targets is None:
                return None
            if targets is not c.targets_bt:
                targets = self._check_tokens("targets", targets, True)
                if tuple(targets.shape) != (B, T):
                    raise DataError(f"targets: expected shape {(B, T)}, "
                                    f"got {tuple(targets.shape)}")
                c.stage.upload(c.targets, targets)
            elif dloss is None:
                raise ValueError("forward(): pass dloss with prefilled batch buffers")
            if dloss is None:
                n_valid = int((targets >= 0).sum())
                dloss = 1.0 / max(n_valid, 1)
            with nvtx_range("classifier"):
                self._classifier(c, dloss, need_grad=True)
            return c.losses.sum()

    def _classifier(self, c, dloss, need_grad):
        """logits = lnf @ wte^T and the fused softmax-cross-entropy, one row chunk at a time.
        With need_grad: dlogits (in place of the chunk's logits) -> dlnf rows, and
        wte.grad += dlogits^T @ lnf rows, before the next chunk overwrites them."""
        wte = self.params_lp["transformer.wte.weight"]
        N, R = c.lnf.shape[0], c.classifier_rows
        for r0 in range(0, N, R):
            r1 = min(N, r0 + R)
            logits, lnf_rows = c.logits[:r1 - r0], c.lnf[r0:r1]
            ops.gemm(lnf_rows, wte, logits, trans_b=True)
            ops.softmax_xent(logits, c.targets[r0:r1], dloss, losses=c.losses[r0:r1],
                             dlogits=logits if need_grad else None, need_grad=need_grad)
            if need_grad:
                dlogits = self._lp(logits, c.logits_lp[:r1 - r0])
                ops.gemm(dlogits, wte, c.dlnf[r0:r1])
                ops.gemm(dlogits, lnf_rows, self.grads["transformer.wte.weight"], trans_a=True,
                         accumulate=True)

    def backward(self, B: int, T: int):
        """Accumulate the gradients of the last forward((B, T), targets) into the grad arena."""
        cfg = self.cfg
        c = self._caches[(B, T)]
        C, H = cfg.n_embd, cfg.n_head
        N = B * T
        P, G, W = self.params, self.grads, self.params_lp
        # the bf16 copy of a linear layer's dout for its GEMMs (None in fp32: dout itself)
        lp = lambda dout: (None if self.lp_dtype is None  # noqa: E731
                           else ops.to_bf16(dout, out=c.dout_lp_for(dout)))
        with nvtx_range("backward"):
            # the classifier's backward ran fused with the loss in forward(): start from dlnf
            ops.layernorm_backward(c.dlnf, c.res[cfg.n_layer].reshape(N, C),
                                   P["transformer.ln_f.weight"], c.lnf_mean, c.lnf_rstd,
                                   G["transformer.ln_f.weight"], G["transformer.ln_f.bias"],
                                   dx=c.dres.reshape(N, C))
            for l in reversed(range(cfg.n_layer)):
                h = f"transformer.h.{l}."
                with nvtx_range(f"block.{l}.backward"):
                    # MLP: res = res_mid + c_proj(gelu(c_fc(ln_2(res_mid))))
                    dres2 = c.dres.reshape(N, C)
                    ops.linear_backward(dres2, c.fc_gelu[l], W[h + "mlp.c_proj.weight"],
                                        G[h + "mlp.c_proj.weight"], G[h + "mlp.c_proj.bias"],
                                        dx=c.dfc, dout_lp=lp(dres2))
                    ops.gelu_backward(c.dfc, c.fc[l], dx=c.dfc)
                    ops.linear_backward(c.dfc, c.ln2[l], W[h + "mlp.c_fc.weight"],
                                        G[h + "mlp.c_fc.weight"], G[h + "mlp.c_fc.bias"], dx=c.dln,
                                        dout_lp=lp(c.dfc))
                    ops.layernorm_backward(c.dln, c.res_mid[l].reshape(N, C), P[h + "ln_2.weight"],
                                           c.ln2_mean[l], c.ln2_rstd[l], G[h + "ln_2.weight"],
                                           G[h + "ln_2.bias"], dx=c.dres_mid.reshape(N, C))
                    c.dres_mid += c.dres
                    # attention: res_mid = res + c_proj(attn(c_attn(ln_1(res))))
                    dres_mid2 = c.dres_mid.reshape(N, C)
                    ops.linear_backward(dres_mid2, c.att_lp[l], W[h + "attn.c_proj.weight"],
                                        G[h + "attn.c_proj.weight"], G[h + "attn.c_proj.bias"],
                                        dx=c.datt.reshape(N, C), dout_lp=lp(dres_mid2))
                    ops.attention_backward(c.datt, c.qkv[l], c.att[l], c.lse[l], H, dqkv=c.dqkv,
                                           precision=self.precision)
                    dqkv2 = c.dqkv.reshape(N, 3 * C)
                    ops.linear_backward(dqkv2, c.ln1[l], W[h + "attn.c_attn.weight"],
                                        G[h + "attn.c_attn.weight"], G[h + "attn.c_attn.bias"],
                                        dx=c.dln, dout_lp=lp(dqkv2))
                    ops.layernorm_backward(c.dln, c.res[l].reshape(N, C), P[h + "ln_1.weight"],
                                           c.ln1_mean[l], c.ln1_rstd[l], G[h + "ln_1.weight"],
                                           G[h + "ln_1.bias"], dx=c.dres.reshape(N, C))
                    c.dres += c.dres_mid
            ops.embedding_backward(c.dres, c.idx, G["transformer.wte.weight"],
                                   G["transformer.wpe.weight"])

    # ---------------------------------------------------------------- public API
    def loss_and_grads(self, idx, targets):
        """Mean loss over non-ignored targets and {name: host gradient} for one batch."""
        self.zero_grad()
        idx = np.asarray(idx) if isinstance(idx, (list, tuple)) else idx
        targets = np.asarray(targets) if isinstance(targets, (list, tuple)) else targets
        n_valid = int((targets >= 0).sum()) if hasattr(targets, "sum") else 0
        loss_sum = self.forward(idx, targets)
        B, T = idx.shape
        self.backward(B, T)
        loss = float(loss_sum) / max(n_valid, 1)
        return loss, self.named_grads()

    def logits(self, idx):
        """Logits (B, T, vocab_size) as a host array (allocated here: for inference)."""
        idx = np.asarray(idx) if isinstance(idx, (list, tuple)) else idx
        B, T = idx.shape
        self.forward(idx)
        out = self._logits_of(self._caches[(B, T)].lnf)
        return self._to_host(out).reshape(B, T, self.cfg.vocab_size)

    def last_logits(self, idx):
        """Logits of the last position only, (B, vocab_size) host array (for sampling)."""
        idx = np.asarray(idx) if isinstance(idx, (list, tuple)) else idx
        B, T = idx.shape
        self.forward(idx)
        last = self._caches[(B, T)].lnf.reshape(B, T, -1)[:, -1]
        return self._to_host(self._logits_of(self.xp.ascontiguousarray(last)))

    def _logits_of(self, lnf_rows):
        """(rows, vocab_size) float logits of final-LayerNorm rows (in matmul storage)."""
        return ops.gemm(lnf_rows, self.params_lp["transformer.wte.weight"], trans_b=True)

    def eval_loss_sum(self, idx, targets):
        """(summed loss, count) without touching gradients; for validation."""
        idx = self._check_tokens("idx", idx, False)
        self.forward(idx)
        B, T = idx.shape
        c = self._caches[(B, T)]
        targets = self._check_tokens("targets", targets, True)
        c.stage.upload(c.targets, targets)
        self._classifier(c, 1.0, need_grad=False)
        return c.losses.sum(), int((targets >= 0).sum())
