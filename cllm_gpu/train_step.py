"""One optimizer step, the same on both backends and inside a CUDA-graph capture.

The step's scalars live in one small float64 buffer on the model's backend (`StepValues`): the
host writes the inputs before the step (learning rate, weight decay, Adam's bias corrections,
the loss weight), the step writes its outputs there (loss, gradient norm, first non-finite
gradient index) and the host reads them whenever it likes. The ops read their inputs through
pointers on the GPU, so nothing in the step waits for the host or reads back from the device,
and a captured step replays with each step's values.

What a step means, on both backends: gradients over the micro-batches, the global-norm clip,
AdamW. A step whose loss or gradient norm is not finite applies no update (parameters and
Adam moments stay bitwise unchanged) and still counts as a step: the step counter, the
learning-rate schedule, Adam's step count and the data position all move on. The trainer
learns about it when it reads the outputs and applies its policy (skip or stop).
"""
from __future__ import annotations

import math

import numpy as np

from . import ops
from .model import DropoutContext, HostStaging
from .nvtx_ranges import nvtx_range
from .ops.adamw import HYPER_SIZE, adamw_hyperparams


class StepValues:
    """The per-step scalars in one float64 buffer (host array on NumPy, device array on CUDA).

    [0:5]  AdamW's hyper: lr, lr * weight_decay, 1 - beta1^t, 1 - beta2^t, grad scale (the clip
           factor, written by the step; NaN skips the update)
    [5]    DLOSS: the weight of each position's loss, 1 / (valid targets in all micro-batches)
    [6]    STEP: the optimizer step (1-based), which keys the step's dropout masks
    [7]    VALID: this process's count of valid targets (data parallelism sums it over the
           ranks and sets DLOSS from the sum before the forward)
    [8:11] outputs: LOSS (mean over the valid targets), NORM (global gradient norm), BAD (arena
           index of the first non-finite gradient, or -1)
    The inputs [0:8] are written by the host in one copy before the step."""
    SCALE, DLOSS, STEP, VALID, LOSS, NORM, BAD = 4, 5, 6, 7, 8, 9, 10
    SIZE = 11

    def __init__(self, xp):
        self.buf = xp.zeros(self.SIZE, dtype=np.float64)
        self._inputs = self.buf[:self.VALID + 1]   # one persistent view: the staging slot's key
        self._host = np.zeros(self.VALID + 1, dtype=np.float64)
        self._stage = HostStaging(xp)
        slot = lambda i: self.buf[i:i + 1]  # noqa: E731
        self.hyper = self.buf[:HYPER_SIZE]
        self.scale, self.dloss, self.step, self.valid = (slot(i) for i in (
            self.SCALE, self.DLOSS, self.STEP, self.VALID))
        self.loss, self.norm, self.bad = slot(self.LOSS), slot(self.NORM), slot(self.BAD)
        self.norm_and_bad = self.buf[self.NORM:self.BAD + 1]
        self.update_begun = False  # set by training_step before it changes any parameter

    def set_inputs(self, tc, lr: float, step: int, n_valid: int):
        """Write step `step`'s inputs (1-based Adam step) for n_valid counted targets; on CUDA
        an asynchronous copy from pinned memory (no wait for the GPU)."""
        adamw_hyperparams(lr, tc.beta1, tc.beta2, tc.weight_decay, step, out=self._host)
        self._host[self.DLOSS] = 1.0 / max(n_valid, 1)
        self._host[self.STEP] = step
        self._host[self.VALID] = n_valid
        self._stage.upload(self._inputs, self._host)

    def outputs(self):
        """A copy of (loss, grad norm, bad index), still on the device on CUDA: read it later
        with `read_outputs`, so the host does not wait for the GPU every step."""
        return self.buf[self.LOSS:self.BAD + 1].copy()

    @staticmethod
    def read_outputs(out) -> dict:
        loss, norm, bad = (float(x) for x in (out.get() if hasattr(out, "get") else out))
        nonfinite = bad >= 0 or not (math.isfinite(loss) and math.isfinite(norm))
        return {"loss": loss, "grad_norm": norm, "bad": int(bad), "nonfinite": nonfinite}


def training_step(model, micro_batches, tc, sv: StepValues, dp=None):
    """Gradients over the micro-batches, global-norm clip, AdamW (see the module docstring).

    micro_batches: an iterable that puts micro-batch k into the model's batch buffers (e.g.
    `model.set_batch(batch)`) and yields its (B, T); there are tc.grad_accum_steps of them.
    sv: the step's values, inputs set. Every micro-batch's loss is weighted by sv's DLOSS =
    1 / (valid targets in all of them), so K micro-batches give exactly the gradient of one
    K-times larger batch. The results are in sv's outputs; nothing here reads a device value
    on the host.

    dp: a data_parallel.DataParallel for more than one rank. Then the micro-batches are this
    rank's part of the global batch, DLOSS counts the valid targets of all ranks, the last
    micro-batch's backward starts the gradient reduction layer by layer, and loss, norm and
    clip factor are global, the same on every rank, so the step means what it means above
    for the whole global batch."""
    # the NumPy path: BLAS held at one thread for the whole step, our ops' threads split the
    # work (ops/host_threads.py); nothing on the GPU path
    with model.host_blas_held():
        _training_step(model, micro_batches, tc, sv, dp)


def _training_step(model, micro_batches, tc, sv, dp):
    m = model
    m.zero_grad()
    sv.loss.fill(0)
    if dp is not None:
        dp.set_loss_weight(sv)
    last = tc.grad_accum_steps - 1
    W, rank = (dp.comm.size, dp.comm.rank) if dp is not None else (1, 0)
    for k, (B, T) in enumerate(micro_batches):
        # dropout masks keyed by the step (read from the buffer) and the micro-batch's place in
        # the global batch (rows [(k W + rank) B, ...)): the same masks whatever the world size
        m.forward(B, T, dropout=DropoutContext(tc.seed, sv.step, k * W + rank))
        sv.loss += m.classifier(B, T, dloss=sv.dloss)
        if dp is not None and k == last:
            m.backward(B, T, on_grads_ready=dp.grads_ready)
        else:
            m.backward(B, T)
    with nvtx_range("optimizer"):
        sv.loss *= sv.dloss
        if dp is None:
            ops.grad_norm(m.grads.data, out=sv.norm_and_bad)
        else:
            dp.reduce_gradients(sv)
        ops.clip_factor(sv.norm, sv.loss, tc.grad_clip, out=sv.scale)
        sv.update_begun = True  # from here on the parameters may change (the trainer asks)
        # either refreshes a bf16 model's weight copy: the whole-arena AdamW launch writes it
        # (model.adamw_update), ZeRO casts after its parameter all-gather
        if dp is None:
            m.adamw_update(sv.hyper, tc.beta1, tc.beta2, tc.eps)
        else:
            dp.adamw_update(sv, tc)
