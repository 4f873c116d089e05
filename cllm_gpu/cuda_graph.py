"""The whole training step as one CUDA graph (TrainConfig.cuda_graph, `train --cuda-graph`).

A step launches hundreds of kernels; from Python each launch costs microseconds of host time,
which for small models is most of the step. Captured once and replayed, the step is one
`cudaGraphLaunch`. A graph replays its kernels with the arguments and pointers they had at
capture, so everything a step reads or writes must be in memory that outlives the capture and
that nobody else reuses:

- parameters, gradients, Adam moments: the model's arenas; activations: its activation cache;
  token ids: the cache's batch buffers (`CLLMModel.batch_buffers`), filled before each replay
  by an asynchronous copy from pinned host memory (for K > 1 micro-batches, a (K, B, T) device
  staging buffer, copied into the batch buffers inside the graph before each micro-batch);
- what changes per step (lr, lr * weight decay, Adam's bias corrections): `hyper`, a (4,)
  float64 device buffer written before each replay and read by the AdamW kernel through a
  pointer;
- temporaries the step allocates (loss sums, grad-norm partials, the skip index): a private
  `cupy.cuda.MemoryPool` used only during the capture and kept with the graph, so no block the
  graph writes is ever handed to other code;
- the step's figures (loss, grad norm, first non-finite gradient index) are packed by the graph
  into one persistent float64 buffer, and copied after each replay into a fresh (3,) array that
  the trainer keeps until it reads them (it reads lazily, several steps later).

The loss weight 1 / (valid targets) is a by-value kernel argument frozen into the graph, so the
graph is keyed by (B, T, grad_accum, valid targets) and by the identity of the batch buffers
(the model may drop a cache for another shape): a new key runs one un-captured step (warm-up:
kernels compiled, pools grown, cuBLAS set up on this stream), then captures the next one.
Warm-up steps are real steps, through the same code and buffers as the captured ones.

Work runs on a private stream (capture is impossible on the legacy default stream), ordered
with the caller's stream by events on both sides, so evaluation, sampling and checkpoints on
the default stream between replays see finished steps and do not race the next one.
"""
from __future__ import annotations

import numpy as np

from .errors import DataError
from .model import HostStaging
from .nvtx_ranges import nvtx_range
from .ops.adamw import HYPER_SIZE, adamw_hyperparams


class StepGraph:
    """Runs training steps on a private stream, captured and replayed where possible.

    step_fn: `trainer.training_step`, called as step_fn(model, batches, tc, None, None,
    n_valid=..., hyper=...): it must do no host work that depends on device values.
    `step()` returns the step's (loss, grad norm, bad index) as 0-d device arrays, or None when
    capture has failed and the caller should run the un-captured step itself (from then on
    `active` is False)."""

    def __init__(self, model, tc, step_fn, log):
        import cupy
        self.cp, self.model, self.tc, self.step_fn, self.log = cupy, model, tc, step_fn, log
        # non_blocking=False: also ordered with the legacy default stream, on top of the events
        self.stream = cupy.cuda.Stream(non_blocking=False)
        self.staging = HostStaging(cupy)
        self._ev_in = cupy.cuda.Event(disable_timing=True)
        self._ev_out = cupy.cuda.Event(disable_timing=True)
        self.hyper = cupy.zeros(HYPER_SIZE, dtype=np.float64)
        self.outputs = cupy.zeros(3, dtype=np.float64)   # loss, grad norm, bad index
        self.active = True
        self.key = None          # the key the buffers below were set up for
        self._bufs = None        # (idx, targets) batch buffers of that key
        self._stage = None       # K > 1: ((K, B, T) ids, (K, B, T) targets) on the device
        self._warmed_up = False  # the un-captured step of the current key has run
        self.graph = None
        self.pool = None
        self.captures = 0        # graphs captured
        self.replays = 0         # steps run by a graph launch
        self.warmups = 0         # un-captured steps run here (one per new key)

    # ------------------------------------------------------------------ per step
    def step(self, batches, lr, adam_step):
        m = self.model
        B, T = np.shape(batches[0][0])
        for idx, tgt in batches:  # the checks forward() skips for prefilled buffers
            m._check_tokens("idx", idx, False)
            m._check_tokens("targets", tgt, True)
            for name, a in (("idx", idx), ("targets", tgt)):
                if tuple(np.shape(a)) != (B, T):
                    raise DataError(f"{name}: expected shape {(B, T)}, got {tuple(np.shape(a))}")
        K = len(batches)
        n_valid = sum(int((np.asarray(y) >= 0).sum()) for _, y in batches)
        bufs = m.batch_buffers(B, T)
        key = (B, T, K, n_valid)
        if key != self.key or self._bufs is None or bufs[0] is not self._bufs[0]:
            self._rekey(key, bufs)
        S, cur = self.stream, self.cp.cuda.get_current_stream()
        self._ev_in.record(cur)
        S.wait_event(self._ev_in)  # the default stream's work (eval, checkpoint) comes first
        with S:
            if K == 1:
                self.staging.upload(self._bufs[0], np.asarray(batches[0][0]))
                self.staging.upload(self._bufs[1], np.asarray(batches[0][1]))
            else:
                self.staging.upload(self._stage[0], np.stack([np.asarray(b[0]) for b in batches]))
                self.staging.upload(self._stage[1], np.stack([np.asarray(b[1]) for b in batches]))
            self.staging.upload(self.hyper, adamw_hyperparams(
                lr, self.tc.beta1, self.tc.beta2, self.tc.weight_decay, adam_step))
            if self.graph is not None:
                with nvtx_range("step.graph"):
                    self.graph.launch(S)
                self.replays += 1
            elif not self._warmed_up:
                self._body()
                self.warmups += 1
                self._warmed_up = True
            elif not self._capture_and_launch():
                self._ev_out.record(S)
                cur.wait_event(self._ev_out)
                return None
            # a fresh copy per step: the trainer reads figures several steps later
            figures = self.outputs.copy()
        self._ev_out.record(S)
        cur.wait_event(self._ev_out)  # the caller's later work sees this step done
        return figures[0], figures[1], figures[2]

    # ------------------------------------------------------------------ internals
    def _rekey(self, key, bufs):
        self._drop_graph()
        self.key, self._bufs = key, bufs
        self._warmed_up = False
        B, T, K, _ = key
        if K > 1:
            with self.stream:
                self._stage = (self.cp.empty((K, B, T), dtype=np.int32),
                               self.cp.empty((K, B, T), dtype=np.int32))
        else:
            self._stage = None

    def _micro_batches(self):
        """The K micro-batches, each copied into the batch buffers just before its use (device
        copies: inside a capture they become part of the graph)."""
        idx, tgt = self._bufs
        for k in range(self._stage[0].shape[0]):
            idx[...] = self._stage[0][k]
            tgt[...] = self._stage[1][k]
            yield idx, tgt

    def _body(self):
        """One step from the persistent buffers into `outputs`: run un-captured for the warm-up,
        and recorded by the capture; the same code either way."""
        batches = [self._bufs] if self._stage is None else self._micro_batches()
        loss, norm, bad = self.step_fn(self.model, batches, self.tc, None, None,
                                       n_valid=self.key[3], hyper=self.hyper)
        self.outputs[0] = loss
        self.outputs[1] = norm
        self.outputs[2] = bad

    def _capture_and_launch(self) -> bool:
        """Capture `_body` into a graph and launch it for this step. On any failure: one
        warning, the graph path is abandoned, and nothing of this step has run (a capture
        records work without running it), so the caller runs the step un-captured."""
        cp, S = self.cp, self.stream
        pool = cp.cuda.MemoryPool()
        try:
            with cp.cuda.using_allocator(pool.malloc):
                S.begin_capture()
                try:
                    self._body()
                except BaseException:
                    try:  # leave the stream usable; an invalidated capture raises here too
                        S.end_capture()
                    except Exception:
                        pass
                    raise
                graph = S.end_capture()
            with nvtx_range("step.graph"):
                graph.launch(S)
        except Exception as e:
            self.active = False
            self._drop_graph()
            pool.free_all_blocks()
            why = " ".join(str(e).split())  # one log line, whatever the message
            self.log(f"warning: CUDA graph capture of the training step failed "
                     f"({type(e).__name__}: {why}); continuing without a CUDA graph")
            return False
        self.graph, self.pool = graph, pool
        self.captures += 1
        self.replays += 1
        B, T, K, _ = self.key
        self.log(f"CUDA graph: captured the training step ({B}x{T} tokens x {K} micro-batches); "
                 f"replaying it every step")
        return True

    def _drop_graph(self):
        if self.graph is None and self.pool is None:
            return
        self.stream.synchronize()  # the graph may still be running on memory of its pool
        self.graph = None
        if self.pool is not None:
            self.pool.free_all_blocks()
            self.pool = None
