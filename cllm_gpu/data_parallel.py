"""Data parallelism over a communicator (distributed.py): gradient buckets reduced while the
backward runs, the global loss and gradient norm, and ZeRO-1 (AdamW moments sharded).

Buckets. The gradient arena is cut into buckets: contiguous ranges in reverse layer order
(the final LayerNorm and the last blocks first, the embeddings last), each one or more whole
"readiness units" (ln_f, one block, the embeddings): a bucket closes at the first unit that
brings it to `bucket_mb` MiB or more (the last holds what remains). The model's backward
reports when gradients from an arena offset on are final (`CLLMModel.backward(...,
on_grads_ready)`), and every bucket that lies wholly past it starts at once, so its
reduction overlaps the backward of the layers before it (`overlap=False`: all buckets start
after the backward, in the same order, with the same results).

One reduction, two ways to finish. Every bucket is split into one piece per rank (rank r:
[b0 + L*r // W, b0 + L*(r+1) // W), so the pieces tile the bucket) and reduce-scattered: rank r
receives the sum over ranks of its piece of every bucket, laid end to end in arena order in
its gradient shard. Each element is summed once, on one rank, in one order, so every rank that
later holds it holds the same bits.
- Without ZeRO: each bucket's reduced pieces are all-gathered back into the gradient arena
  (queued right behind its reduce-scatter) and every rank runs AdamW over the whole arena.
- ZeRO-1 (`zero=1`): the Adam moments exist only for the rank's shard (the trainer builds the
  model without its full moments: CLLMModel(..., adam_moments=False)); AdamW runs on the
  rank's pieces (params, shard gradients, shard moments), then the updated parameter pieces
  are all-gathered. Same per-element arithmetic on the same reduced gradients: the weights
  are bitwise those of the unsharded run at the same world size.

The global loss, gradient norm and first non-finite index come from per-rank partials (the
rank's loss sum times the global loss weight; the sum of squares and first non-finite index
of its shard) gathered in rank order and combined in that order on every rank: every rank
computes the same clip factor and so takes the same decision (a non-finite step is skipped
everywhere). The loss weight is 1 / (valid targets over all ranks), summed before the forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .errors import ConfigError

DEFAULT_BUCKET_MB = 25.0
PARTIALS = 3  # loss, sum of squares, first non-finite arena index (or -1)


@dataclass(frozen=True)
class Bucket:
    start: int       # arena offsets [start, end)
    end: int
    counts: tuple    # elements of each rank's piece
    offsets: tuple   # arena offset of each rank's piece
    shard_at: int    # where this rank's piece sits in its gradient shard

    def piece(self, rank):
        return slice(self.offsets[rank], self.offsets[rank] + self.counts[rank])


def readiness_units(model) -> list[tuple[int, int]]:
    """[start, end) arena ranges in the order the backward finishes them: ln_f, the blocks
    from the last, the embeddings (wte's gradient is final only after the embedding backward)."""
    bounds = [0] + list(model.block_offsets) + [model.lnf_offset, model.arena_size]
    return [(bounds[i], bounds[i + 1]) for i in reversed(range(len(bounds) - 1))]


def make_buckets(model, world: int, rank: int, bucket_elems: int) -> list[Bucket]:
    """Readiness units grouped in backward order into buckets of about bucket_elems."""
    groups, cur = [], []
    for unit in readiness_units(model):
        cur.append(unit)
        if sum(e - s for s, e in cur) >= bucket_elems:
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    spans = [(g[-1][0], g[0][1]) for g in groups]  # units are in descending order
    pieces = []
    for s, e in spans:
        L = e - s
        offs = tuple(s + L * r // world for r in range(world))
        counts = tuple((s + L * (r + 1) // world) - offs[r] for r in range(world))
        pieces.append((s, e, counts, offs))
    # the rank's pieces lie in its shard in arena order (bucket order is the reverse)
    shard_at, at = {}, 0
    for s, e, counts, offs in sorted(pieces, key=lambda p: p[0]):
        shard_at[s] = at
        at += counts[rank]
    return [Bucket(s, e, counts, offs, shard_at[s]) for s, e, counts, offs in pieces]


class DataParallel:
    """The data-parallel half of a training step for one model (see the module docstring).
    train_step.training_step calls, in order: set_loss_weight, (the model's backward calls
    grads_ready), reduce_gradients, then adamw_update."""

    def __init__(self, model, comm, zero: int = 0, overlap: bool = True,
                 bucket_mb: float = DEFAULT_BUCKET_MB):
        if zero not in (0, 1):
            raise ConfigError(f"zero must be 0 or 1, got {zero!r}")
        if not zero and model.adam_m is None:
            raise ConfigError("data parallelism without ZeRO updates the model's own Adam "
                              "moments: build the model with adam_moments=True")
        if zero:
            # this rank's moment shards are the only moments: a model built with them (the
            # trainer builds it without) lets them go before the shards are made, so the two
            # are never held at once
            model.adam_m = model.adam_v = None
        self.model, self.comm, self.zero, self.overlap = model, comm, zero, overlap
        xp, W, r = model.xp, comm.size, comm.rank
        elems = max(1, int(bucket_mb * (1 << 20)) // model.dtype.itemsize)
        self.buckets = make_buckets(model, W, r, elems)
        self.shard_size = sum(b.counts[r] for b in self.buckets)
        self.grad_shard = xp.zeros(self.shard_size, dtype=model.dtype)
        # arena offset of shard element i: shard index + delta of the piece it falls in
        own = sorted((b.shard_at, b.offsets[r]) for b in self.buckets if b.counts[r])
        self._piece_starts = xp.asarray(np.array([s for s, _ in own] or [0], dtype=np.float64))
        self._piece_delta = xp.asarray(np.array([o - s for s, o in own] or [0], dtype=np.float64))
        self.partials = xp.zeros(PARTIALS, dtype=np.float64)
        self.gathered = xp.zeros((W, PARTIALS), dtype=np.float64)
        if zero:  # the moments of this rank's shard only
            self.m_shard = xp.zeros(self.shard_size, dtype=model.dtype)
            self.v_shard = xp.zeros(self.shard_size, dtype=model.dtype)
        self._handles = {}

    # ---------------------------------------------------------------- the step
    def set_loss_weight(self, sv):
        """sv holds this rank's valid-target count; make DLOSS 1 / (the count over all ranks)."""
        self.comm.sum_in_place(sv.valid)
        xp = self.model.xp
        xp.reciprocal(xp.maximum(sv.valid, 1.0), out=sv.dloss)

    def grads_ready(self, offset: int):
        """The model's backward hook: gradients at arena offsets >= offset are final."""
        if not self.overlap:
            return
        for i, b in enumerate(self.buckets):
            if i not in self._handles and b.start >= offset:
                self._start(i)
        self.comm.progress()

    def _start(self, i):
        b, r, G = self.buckets[i], self.comm.rank, self.model.grads.data
        recv = self.grad_shard[b.shard_at:b.shard_at + b.counts[r]]
        rs = self.comm.reduce_scatter(G[b.start:b.end], recv, b.counts)
        ag = None
        if not self.zero:  # the reduced pieces back into the arena, right behind
            ag = self.comm.all_gather(G[b.start:b.end], b.counts, send=recv, after=rs)
        self._handles[i] = (rs, ag)

    def reduce_gradients(self, sv):
        """Finish every bucket; write the global loss, gradient norm and first non-finite
        index into sv (the same bits on every rank)."""
        for i in range(len(self.buckets)):
            if i not in self._handles:
                self._start(i)
        self.comm.wait([rs for rs, _ in self._handles.values()])
        xp, p = self.model.xp, self.partials
        p[0:1] = sv.loss
        if self.shard_size:
            ops.grad_norm(self.grad_shard, out=p[1:3], squared=True)
        else:  # more ranks than elements in some bucket: nothing of this rank's to sum
            p[1], p[2] = 0.0, -1.0
        bad = p[2:3]
        # shard index -> arena index (-1 stays -1)
        k = xp.clip(xp.searchsorted(self._piece_starts, bad, side="right") - 1, 0, None)
        xp.add(bad, xp.where(bad >= 0, self._piece_delta[k], 0.0), out=bad)
        self.comm.allgather_rows(p, self.gathered)
        g = self.gathered
        sv.loss[...] = g[:, 0].sum()
        sv.norm[...] = xp.sqrt(g[:, 1].sum())
        bad_all = g[:, 2]
        first = xp.where(bad_all >= 0, bad_all, np.inf).min()
        sv.bad[...] = xp.where(xp.isfinite(first), first, -1.0)
        if not self.zero:
            self.comm.wait([ag for _, ag in self._handles.values()])
        self._handles = {}

    def adamw_update(self, sv, tc):
        """AdamW with the step's values in sv: on the whole arena (the launch also writes a bf16
        model's weight copy), or (ZeRO) on this rank's pieces followed by the parameter
        all-gather and a cast pass refreshing the bf16 copy of the whole arena."""
        m = self.model
        if not self.zero:
            m.adamw_update(sv.hyper, tc.beta1, tc.beta2, tc.eps)
            return
        r, P = self.comm.rank, m.params.data
        for b in self.buckets:
            if not b.counts[r]:
                continue
            sh = slice(b.shard_at, b.shard_at + b.counts[r])
            ops.adamw_update(P[b.piece(r)], self.grad_shard[sh], self.m_shard[sh],
                             self.v_shard[sh], m.decay_mask[b.piece(r)], sv.hyper,
                             tc.beta1, tc.beta2, tc.eps)
        self.comm.wait([self.comm.all_gather(P[b.start:b.end], b.counts)
                        for b in self.buckets])
        m.params_updated()

    # ---------------------------------------------------------------- checkpoints
    def moments_host(self) -> tuple[dict, dict]:
        """Full Adam moments {name: host array} on every rank (collective). ZeRO: each shard
        all-gathered through the gradient arena, which is free between steps."""
        m = self.model
        if not self.zero:
            return ({s.name: m._to_host(m.adam_m[s.name]).copy() for s in m.specs},
                    {s.name: m._to_host(m.adam_v[s.name]).copy() for s in m.specs})
        out = []
        for shard in (self.m_shard, self.v_shard):
            G = m.grads.data
            self.comm.wait([self.comm.all_gather(G[b.start:b.end], b.counts,
                                                 send=shard[b.shard_at:b.shard_at + b.counts[self.comm.rank]])
                            for b in self.buckets])
            out.append({s.name: m._to_host(m.grads[s.name]).copy() for s in m.specs})
        m.zero_grad()
        return out[0], out[1]

    def load_moments(self, adam_m: dict, adam_v: dict):
        """Take full moments {name: host array} (every rank reads the same checkpoint); ZeRO:
        keep this rank's pieces."""
        m, xp = self.model, self.model.xp
        if not self.zero:
            for s in m.specs:
                m.adam_m[s.name][...] = xp.asarray(adam_m[s.name], dtype=m.dtype)
                m.adam_v[s.name][...] = xp.asarray(adam_v[s.name], dtype=m.dtype)
            return
        r = self.comm.rank
        for full, shard in ((adam_m, self.m_shard), (adam_v, self.v_shard)):
            flat = np.zeros(m.arena_size, dtype=m.dtype)
            for s in m.specs:
                flat[s.offset:s.offset + s.size] = np.asarray(full[s.name]).reshape(-1)
            for b in self.buckets:
                shard[b.shard_at:b.shard_at + b.counts[r]] = xp.asarray(flat[b.piece(r)])

    def describe(self) -> str:
        mb = sum(b.end - b.start for b in self.buckets) * self.model.dtype.itemsize / 2**20
        return (f"{len(self.buckets)} gradient bucket(s) over {mb:.3g} MB, reduction "
                f"{'overlapped with the backward' if self.overlap else 'after the backward'}"
                + (f"; ZeRO-1: this rank holds the Adam moments of {self.shard_size:,} of "
                   f"{self.model.arena_size:,} elements" if self.zero else ""))
