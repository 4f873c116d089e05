"""The whole training step as one CUDA graph (TrainConfig.cuda_graph, `train --cuda-graph`).

A step launches hundreds of kernels; from Python each launch costs microseconds of host time,
which for small models is most of the step. Captured once and replayed, the step is one
`cudaGraphLaunch`. A graph replays its kernels with the arguments and pointers they had at
capture, so everything a step reads or writes must be in memory that outlives the capture and
that nobody else reuses:

- parameters, gradients, Adam moments: the model's arenas; activations: its activation cache;
  token ids: the cache's batch buffers (`CLLMModel.batch_buffers`, checked first with
  `CLLMModel.check_batch`), filled before each replay by an asynchronous copy from pinned host
  memory (for K > 1 micro-batches, a (K, B, T) device staging buffer, copied into the batch
  buffers inside the graph before each micro-batch);
- what changes per step (lr, lr * weight decay, Adam's bias corrections, the loss weight
  1 / valid targets) and the step's figures (loss, grad norm, first non-finite gradient index):
  the trainer's `train_step.StepValues` buffer, written before each replay and read by the
  kernels through pointers;
- temporaries the step allocates (loss sums, grad-norm partials): a private
  `cupy.cuda.MemoryPool` used only during the capture and kept with the graph, so no block the
  graph writes is ever handed to other code. Every temporary stays allocated until the capture
  has ended (no reuse inside it): CuPy's pool, out of device memory, frees its free blocks and
  retries, and mid-capture those are blocks the graph uses. A capture that runs out of memory
  is abandoned with one warning saying so.

The graph is keyed by (B, T, grad_accum) and by the identity of the batch buffers (the model may
drop a cache for another shape): a new key runs one un-captured step (warm-up: kernels
compiled, pools grown, cuBLAS set up on this stream), then captures the next one. Warm-up
steps are real steps, through the same code and buffers as the captured ones. The trainer's
sample drops the graph with the activation caches its kernels point into (`release`): if
training goes on, the next step sets it up again.

Work runs on a private stream (capture is impossible on the legacy default stream), ordered
with the caller's stream by events on both sides, so evaluation, sampling and checkpoints on
the default stream between replays see finished steps and do not race the next one.
"""
from __future__ import annotations

import numpy as np

from .errors import DataError
from .model import HostStaging
from .nvtx_ranges import nvtx_range
from .train_step import training_step


class StepGraph:
    """Runs training steps on a private stream, captured and replayed where possible.

    `step()` returns the step's outputs (train_step.StepValues.outputs: a device array read
    later), or None when capture has failed and the caller should run the un-captured step
    itself (from then on `active` is False)."""

    def __init__(self, model, tc, step_values, log):
        import cupy
        self.cp, self.model, self.tc, self.sv, self.log = cupy, model, tc, step_values, log
        # non_blocking=False: also ordered with the legacy default stream, on top of the events
        self.stream = cupy.cuda.Stream(non_blocking=False)
        self.staging = HostStaging(cupy)
        self._ev_in = cupy.cuda.Event(disable_timing=True)
        self._ev_out = cupy.cuda.Event(disable_timing=True)
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
    def step(self, batches, lr, step, n_valid):
        """batches: checked model.Batch micro-batches of one shape, with targets."""
        B, T = batches[0].shape
        for b in batches:
            if b.shape != (B, T) or b.targets is None:
                raise DataError(f"CUDA graph step: every micro-batch needs targets and shape "
                                f"{(B, T)}, got {b.shape}")
        K = len(batches)
        bufs = self.model.batch_buffers(B, T)
        key = (B, T, K)
        if key != self.key or self._bufs is None or bufs[0] is not self._bufs[0]:
            self._rekey(key, bufs)
        S, cur = self.stream, self.cp.cuda.get_current_stream()
        self._ev_in.record(cur)
        S.wait_event(self._ev_in)  # the default stream's work (eval, checkpoint) comes first
        with S:
            if K == 1:
                self.staging.upload(self._bufs[0], batches[0].idx)
                self.staging.upload(self._bufs[1], batches[0].targets)
            else:
                self.staging.upload(self._stage[0], np.stack([b.idx for b in batches]))
                self.staging.upload(self._stage[1], np.stack([b.targets for b in batches]))
            self.sv.set_inputs(self.tc, lr, step, n_valid)
            if self.graph is not None:
                with nvtx_range("step.graph"):
                    self.sv.update_begun = True  # the launch updates the parameters
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
            figures = self.sv.outputs()  # a fresh copy: the trainer reads it steps later
        self._ev_out.record(S)
        cur.wait_event(self._ev_out)  # the caller's later work sees this step done
        return figures

    def release(self):
        """Drop the graph, its private pool and the buffers it was set up for (the batch
        buffers, K > 1's staging): for the trainer's sample, which drops the activation caches
        the graph's kernels point into and needs the memory. The next step sets the graph up
        again (a warm-up step, then a capture), so a graph never replays into released memory."""
        self._drop_graph()
        self.key, self._bufs, self._stage = None, None, None
        self.staging = HostStaging(self.cp)
        self._warmed_up = False

    # ------------------------------------------------------------------ internals
    def _rekey(self, key, bufs):
        self._drop_graph()
        self.key, self._bufs = key, bufs
        # the old key's pinned staging goes with its buffers (its pending copies are kept
        # until they ran: HostStaging._IN_FLIGHT); kept, it would grow with every rekey
        self.staging = HostStaging(self.cp)
        self._warmed_up = False
        B, T, K = key
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
        B, T, K = self.key
        for k in range(K):
            if self._stage is not None:
                idx[...] = self._stage[0][k]
                tgt[...] = self._stage[1][k]
            yield B, T

    def _body(self):
        """One step from the persistent buffers: run un-captured for the warm-up, and recorded
        by the capture; the same code either way."""
        training_step(self.model, self._micro_batches(), self.tc, self.sv)

    def _capture_and_launch(self) -> bool:
        """Capture `_body` into a graph and launch it for this step. On any failure: one
        warning, the graph path is abandoned, and nothing of this step has run (a capture
        records work without running it), so the caller runs the step un-captured."""
        cp, S = self.cp, self.stream
        pool = cp.cuda.MemoryPool()
        held = []   # every block the capture allocates, until the capture has ended

        def malloc(size):
            # A temporary dropped during the capture goes back to the pool as a free block
            # that the graph's kernels still use; when an allocation finds the device full,
            # CuPy's pool cudaFrees its free blocks and retries (memory.pyx, _try_malloc), in a
            # relaxed-mode capture too, and the graph would keep writing that memory after
            # others own it. Held, no block is free during the capture: the retry has nothing
            # to free, and the allocation fails as out of memory.
            mem = pool.malloc(size)
            held.append(mem)
            return mem
        try:
            with cp.cuda.using_allocator(malloc):
                S.begin_capture()
                try:
                    self._body()
                except BaseException:
                    try:  # leave the stream usable; an invalidated capture raises here too
                        S.end_capture()
                    except Exception:
                        pass
                    raise
                finally:
                    self.sv.update_begun = False  # the body's update was recorded, not run
                graph = S.end_capture()
            held.clear()   # back to the private pool, which the graph keeps
            with nvtx_range("step.graph"):
                self.sv.update_begun = True
                graph.launch(S)
        except Exception as e:
            self.active = False
            self._drop_graph()
            held.clear()
            pool.free_all_blocks()
            why = " ".join(str(e).split())  # one log line, whatever the message
            if isinstance(e, MemoryError):  # CuPy's OutOfMemoryError is one
                why = (f"out of GPU memory: the graph keeps every temporary of the step "
                       f"allocated; {type(e).__name__}: {why}")
            else:
                why = f"{type(e).__name__}: {why}"
            self.log(f"warning: CUDA graph capture of the training step failed ({why}); "
                     f"continuing without a CUDA graph")
            return False
        self.graph, self.pool = graph, pool
        self.captures += 1
        self.replays += 1
        B, T, K = self.key
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
