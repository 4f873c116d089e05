"""Data parallelism without MPI: launcher detection, the bucket layout, the data-parallel step
at world size 1 (SelfComm) against the plain step, ZeRO moments in and out, the TCP-store
rendezvous the NCCL path uses without MPI. The multi-rank runs are in test_distributed_mpi.py."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cllm_gpu import CLLMModel, ModelConfig, TrainConfig
from cllm_gpu.data_parallel import DataParallel, make_buckets, readiness_units
from cllm_gpu.distributed import Communicator, Launch, SelfComm, connect, detect_launch
from cllm_gpu.errors import CollectiveError, ConfigError
from cllm_gpu.ops.cast import round_bf16
from cllm_gpu.train_step import StepValues, training_step

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=50, block_size=8, n_layer=3, n_head=2, n_embd=16)


@pytest.mark.parametrize("env,want", [
    ({}, (0, 1, 0, 1, "none")),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
      "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}, (3, 8, 1, 2, "torchrun-style")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
     (2, 4, 0, 2, "Open MPI")),
    ({"PMI_RANK": "1", "PMI_SIZE": "3", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "3"},
     (1, 3, 1, 3, "MPICH / Intel MPI")),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
      "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}, (5, 8, 1, 4, "Slurm")),
    # uneven nodes: this node's count, not the first node's (mutation audit: counts[0] passed)
    ({"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "7", "SLURM_LOCALID": "2",
      "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4,3"}, (6, 7, 2, 3, "Slurm")),
    # an sbatch script itself (no srun step): one process, whatever SLURM_NTASKS says
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, (0, 1, 0, 1, "none")),
    # torchrun under srun: the per-worker variables win over Slurm's per-node ones
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "RANK": "6", "WORLD_SIZE": "16",
      "LOCAL_RANK": "6", "LOCAL_WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "none"},
     (6, 16, 6, 8, "torchrun-style")),
    # torchrun under mpiexec (one agent per MPI process): the same
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
      "TORCHELASTIC_RUN_ID": "job7"}, (5, 8, 1, 8, "torchrun-style")),
    # a RANK left in the environment of an MPI launch: MPI's rank, not the stray one
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "RANK": "0"}, (1, 2, 0, 1, "MPICH / Intel MPI")),
    # RANK and WORLD_SIZE left exported under mpiexec / srun, not torchrun's (no
    # TORCHELASTIC_RUN_ID): the launcher's rank on every process. Both processes of mpiexec -n 2
    # were read as rank 0 of 2 (torchrun-style: the NumPy path refused, "start the ranks with
    # mpiexec"; the NCCL path two rank 0s), and mpiexec -n 1 as rank 0 of 2, waiting for a
    # rank 1 that never starts
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "RANK": "0", "WORLD_SIZE": "2"},
     (1, 2, 0, 1, "MPICH / Intel MPI")),
    ({"PMI_RANK": "0", "PMI_SIZE": "1", "RANK": "0", "WORLD_SIZE": "2"},
     (0, 1, 0, 1, "MPICH / Intel MPI")),
    ({"RANK": "0", "WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
     (1, 2, 0, 1, "Open MPI")),
    ({"RANK": "0", "WORLD_SIZE": "8", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"},
     (3, 4, 0, 1, "Slurm")),
    # a wrapper script's copy of the launcher's own rank: the same process either way
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "RANK": "1", "WORLD_SIZE": "2"},
     (1, 2, 0, 1, "MPICH / Intel MPI")),
])
def test_detect_launch(env, want):
    la = detect_launch(env)
    assert (la.rank, la.world_size, la.local_rank, la.local_size, la.launcher) == want
    if la.launcher == "torchrun-style":
        assert (la.master_addr, la.master_port) == (env.get("MASTER_ADDR", "127.0.0.1"),
                                                    int(env.get("MASTER_PORT", 29500)))


TORCHRUN_2 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}


@pytest.mark.parametrize("value,want", [("True", True), ("False", False), (None, False)])
def test_detect_launch_reads_whether_torchrun_serves_its_own_store(value, want):
    """torchrun sets TORCHELASTIC_USE_AGENT_STORE to str(use_agent_store) in every worker:
    "False" (a rendezvous whose agent serves no store at MASTER_PORT) is no agent store, and
    rank 0 serves its own TCP store there. Mutation audit: the variable's presence, or any
    non-empty value, read as "True" passed every test."""
    env = {**TORCHRUN_2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    if value is not None:
        env["TORCHELASTIC_USE_AGENT_STORE"] = value
    assert detect_launch(env).agent_store is want


@pytest.mark.parametrize("env,want", [
    # torchrun: its rendezvous id and the worker group's restart
    ({**TORCHRUN_2, "TORCHELASTIC_RUN_ID": "9b1e", "TORCHELASTIC_RESTART_COUNT": "2"},
     ("torchrun 9b1e", 2)),
    # "none" is --rdzv-id's default (a static rendezvous): the same every run, so no id
    ({**TORCHRUN_2, "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0"},
     (None, 0)),
    # torchrun under srun without a rendezvous id: the srun step is the run
    ({**TORCHRUN_2, "TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "4711",
      "SLURM_STEP_ID": "3"}, ("slurm 4711.3", 0)),
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "4711",
      "SLURM_STEP_ID": "0"}, ("slurm 4711.0", 0)),
    # a job id alone (processes a batch script started itself): a job may start several runs
    ({**TORCHRUN_2, "SLURM_JOB_ID": "4711"}, (None, 0)),
    ({**TORCHRUN_2}, (None, 0)),
    # a restart count that is not one: the first start, not a refusal of the launch
    ({**TORCHRUN_2, "TORCHELASTIC_RUN_ID": "x", "TORCHELASTIC_RESTART_COUNT": "?"},
     ("torchrun x", 0)),
])
def test_detect_launch_reads_the_launchers_run_id(env, want):
    """The run id rank 0 writes into its failure note of the default corpus (cli), by which a
    rank started after that note tells this run's from an earlier run's."""
    la = detect_launch(env)
    assert (la.run_id, la.restart) == want


@pytest.mark.parametrize("env,msg", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, r"rank 4 is not in \[0, world size 4\)"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK must be an integer"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "2"},
     "local rank 2"),
    # half a torchrun-style launch read as one process: every such process was rank 0 and
    # trained alone, writing the same run directory
    ({"RANK": "1"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "4"}, "WORLD_SIZE is set but RANK is not"),
    # torchrun's variables naming fewer processes than the mpiexec / srun launch it runs under
    # (torchrun starts at least one worker per launched process)
    ({"RANK": "0", "WORLD_SIZE": "1", "PMI_RANK": "1", "PMI_SIZE": "2",
      "TORCHELASTIC_RUN_ID": "none"},
     r"RANK=0 WORLD_SIZE=1 contradict the MPICH / Intel MPI launch of 2 processes"),
    ({"RANK": "0", "WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
      "TORCHELASTIC_RUN_ID": "x"},
     r"contradict the Open MPI launch of 2 processes \(this one rank 1\): unset RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4",
      "TORCHELASTIC_RUN_ID": "x"}, r"contradict the Slurm launch of 4 processes"),
])
def test_detect_launch_refuses_inconsistent_variables(env, msg):
    with pytest.raises(ConfigError, match=msg):
        detect_launch(env)


def test_numpy_backend_without_mpi_launcher_is_refused():
    la = detect_launch({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="runs over MPI; start the ranks with mpiexec"):
        connect(la, "numpy")


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("bucket_elems", [1, 3000, 10**9])
def test_buckets_tile_the_arena_in_backward_order(world, bucket_elems):
    model = CLLMModel(CFG, backend="numpy")
    units = readiness_units(model)
    assert units[0][1] == model.arena_size and units[-1][0] == 0
    per_rank = []
    for rank in range(world):
        buckets = make_buckets(model, world, rank, bucket_elems)
        spans = [(b.start, b.end) for b in buckets]
        # contiguous, descending (the order the backward finishes them), covering the arena
        assert spans[0][1] == model.arena_size and spans[-1][0] == 0
        assert all(a[0] == b[1] for a, b in zip(spans, spans[1:]))
        for b in buckets:  # the pieces tile the bucket, rank order
            assert b.offsets[0] == b.start and sum(b.counts) == b.end - b.start
            assert all(b.offsets[r] + b.counts[r] == b.offsets[r + 1] for r in range(world - 1))
            assert max(b.counts) - min(b.counts) <= 1
        # the rank's pieces sit in its shard end to end, in arena order
        own = sorted((b.offsets[rank], b.shard_at, b.counts[rank]) for b in buckets)
        assert [s for _, s, _ in own] == list(np.cumsum([0] + [c for *_, c in own[:-1]]))
        per_rank.append(sum(c for *_, c in own))
        if bucket_elems == 1:
            assert len(buckets) == CFG.n_layer + 2  # ln_f, each block, the embeddings
        if bucket_elems == 10**9:
            assert len(buckets) == 1
    assert sum(per_rank) == model.arena_size


def _train(dp_args, steps=4, K=2, clip=0.5, dtype="float32", poison_step=None,
           precision="fp32", adam_moments=True):
    """The plain step (dp_args None) or the data-parallel one at world size 1."""
    tc = TrainConfig(grad_accum_steps=K, grad_clip=clip, warmup_steps=0, max_steps=steps,
                     dtype=dtype, precision=precision)
    model = CLLMModel(CFG, backend="numpy", dtype=dtype, seed=1, precision=precision,
                      adam_moments=adam_moments)
    dp = DataParallel(model, SelfComm(), **dp_args) if dp_args is not None else None
    sv, rng, figures = StepValues(np), np.random.default_rng(0), []
    for s in range(steps):
        tokens = rng.integers(0, CFG.vocab_size, size=(K, 2, CFG.block_size + 1))
        batches = [model.check_batch(t[:, :-1], t[:, 1:]) for t in tokens]
        sv.set_inputs(tc, tc.lr_at(s), s + 1, sum(b.n_valid for b in batches))
        if s == poison_step:
            model.params["transformer.h.1.mlp.c_fc.weight"][0, 0] = np.inf
        training_step(model, (model.set_batch(b) for b in batches), tc, sv, dp=dp)
        figures.append(StepValues.read_outputs(sv.outputs()))
    return model, dp, figures


@pytest.mark.parametrize("dp_args", [{}, {"overlap": False}, {"zero": 1},
                                     {"zero": 1, "bucket_mb": 0.002}, {"bucket_mb": 1e-5},
                                     {"zero": 1, "bucket_mb": 0.002, "adam_moments": False}])
def test_data_parallel_step_at_world_size_1_is_the_plain_step_bitwise(dp_args):
    """adam_moments=False: ZeRO-1's model as the trainer builds it, with no full moments."""
    ref, _, ref_figures = _train(None)
    dp_args = dict(dp_args)
    model, dp, figures = _train(dp_args, adam_moments=dp_args.pop("adam_moments", True))
    assert figures == ref_figures
    assert np.array_equal(model.params.data, ref.params.data)
    m, v = dp.moments_host()
    for s in model.specs:
        assert np.array_equal(m[s.name], ref.adam_m[s.name]), s.name
        assert np.array_equal(v[s.name], ref.adam_v[s.name]), s.name
    if dp_args.get("zero"):
        assert model.adam_m is None  # the full moment arenas are gone: only the shard's remain


@pytest.mark.parametrize("dp_args", [{}, {"zero": 1, "bucket_mb": 0.002}])
def test_bf16_weight_copy_after_the_data_parallel_step(dp_args):
    """precision="bf16": the whole-arena AdamW writes the bf16 copy in its launch, ZeRO casts
    after its all-gather; either way it is the rounding of the masters, as in the plain step."""
    ref, _, ref_figures = _train(None, precision="bf16")
    model, _, figures = _train(dp_args, precision="bf16")
    assert figures == ref_figures
    assert np.array_equal(model.params.data, ref.params.data)
    np.testing.assert_array_equal(model.params_mm.data, round_bf16(model.params.data))
    np.testing.assert_array_equal(model.params_mm.data, ref.params_mm.data)


def test_nonfinite_step_is_skipped_alike_by_the_data_parallel_step():
    ref, _, ref_figures = _train(None, poison_step=2, clip=0.0)
    model, _, figures = _train({"zero": 1, "bucket_mb": 0.002}, poison_step=2, clip=0.0)
    same = lambda a, b: np.array_equal(a, b, equal_nan=True)  # noqa: E731
    for got, want in zip(figures, ref_figures):
        assert got.keys() == want.keys() and all(same(got[k], want[k]) for k in got)
    assert figures[2]["nonfinite"] and figures[2]["bad"] >= 0
    assert same(model.params.data, ref.params.data)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zero_moments_load_into_the_shard_and_come_back(dtype):
    """float64: moments that float32 cannot hold come back exactly (mutation audit: the full
    arena they are laid out in before the shard takes its pieces made float32, unseen)."""
    model, dp, _ = _train({"zero": 1, "bucket_mb": 0.002}, steps=2, dtype=dtype)
    m, v = dp.moments_host()
    assert m["transformer.wte.weight"].dtype == np.dtype(dtype)
    if dtype == "float64":
        assert any(not np.array_equal(a, a.astype(np.float32)) for a in m.values())
    other = CLLMModel(CFG, backend="numpy", seed=1, dtype=dtype)
    dp2 = DataParallel(other, SelfComm(), zero=1, bucket_mb=0.002)
    dp2.load_moments(m, v)
    m2, v2 = dp2.moments_host()
    for s in model.specs:
        assert np.array_equal(m[s.name], m2[s.name]) and np.array_equal(v[s.name], v2[s.name])


def test_a_model_without_moments_is_refused_where_its_own_moments_are_updated():
    model = CLLMModel(CFG, backend="numpy", seed=1, adam_moments=False)
    assert model.adam_m is None and model.adam_v is None
    with pytest.raises(ConfigError, match="without ZeRO updates the model's own Adam moments"):
        DataParallel(model, SelfComm())
    with pytest.raises(ConfigError, match="holds no Adam moments"):
        model.adamw_update(np.zeros(5), 0.9, 0.95, 1e-8)


class MirrorComm(Communicator):
    """A stand-in for rank `rank` of `size` in one process, whose peers hold this rank's data:
    every collective moves what MPI would move for this rank (its pieces, its shard), so the
    rank allocates what it would in a real job."""
    name = "mirror (test)"

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def reduce_scatter(self, send, recv, counts):
        at = sum(counts[:self.rank])
        recv[...] = self.size * send[at:at + counts[self.rank]]

    def all_gather(self, recv, counts, send=None, after=None):
        if send is not None:
            at = sum(counts[:self.rank])
            recv[at:at + counts[self.rank]] = send

    def wait(self, handles):
        pass

    def sum_in_place(self, x):
        x *= self.size

    def allgather_rows(self, x, out):
        out[...] = x

    def allgather_host(self, x, timeout=None):
        return np.repeat(np.asarray(x)[None], self.size, axis=0)


@pytest.mark.parametrize("zero,dtype", [(0, "float32"), (1, "float32"), (1, "float64")])
def test_the_memory_check_counts_what_a_data_parallel_rank_allocates(zero, dtype, token_dir,
                                                                     tmp_path, monkeypatch):
    """check_training_fits against the real allocations (tracemalloc: NumPy traces its arrays)
    of GpuTrainer as rank 0 of 2 (MirrorComm) on the NumPy backend. Its two thresholds, found
    by bisection on the memory it is told is free: the set-up's (below it: "before any
    activation") and the whole run's. The set-up's peak is that threshold plus init_params'
    temporary (the largest tensor drawn in float64), which the NumPy check does not count;
    after the first step the memory held is the run's threshold plus Python objects (under 2 %).
    ZeRO-1 made its moment shards while the model's full moments were held, a peak of 2 arenas
    over the threshold it was checked against (shown failing on the old code). Mutants of the
    check's terms (the shards' factor 3, the moments counted with ZeRO, the float64 initial
    values counted with the shards) fail it."""
    import gc
    import tracemalloc

    from cllm_gpu import model as model_mod
    from cllm_gpu.errors import ModelTooLargeError
    from cllm_gpu.trainer import GpuTrainer
    cfg = ModelConfig(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=64)
    data = token_dir("to be or not to be, that is the question. " * 400, "mem")
    B, T = 4, 64
    tc = TrainConfig(batch_size=B, max_steps=2, zero=zero, dtype=dtype, eval_interval=0,
                     warmup_steps=0)

    def trainer(out):
        return GpuTrainer(cfg, tc, data, tmp_path / out, backend="numpy", log=lambda m: None,
                          launch=Launch(0, 2, 0, 2, "torchrun-style"), comm=MirrorComm(0, 2))
    warm = trainer("warm")  # the modules a first run imports, outside the measurement
    warm.train_step()
    warm.watchdog.stop()
    del warm
    gc.collect()
    tracemalloc.start()
    try:
        t = trainer("run")
        setup_peak = tracemalloc.get_traced_memory()[1]
        t.train_step()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    t.watchdog.stop()
    assert (t.dp.zero, t.model.adam_m is None) == (zero, bool(zero))

    def threshold(counts):
        """The least free memory that check_training_fits takes (refusals `counts` picks)."""
        lo, hi = 0, 1 << 40
        while hi - lo > 1:
            mid = (lo + hi) // 2
            monkeypatch.setattr(model_mod, "available_memory", lambda xp: mid)
            try:
                model_mod.check_training_fits(cfg, dtype, "fp32", np, B, T, 1, 2, zero)
                fits = True
            except ModelTooLargeError as e:
                fits = not counts(str(e))
            lo, hi = (lo, mid) if fits else (mid, hi)
        return hi
    setup = threshold(lambda msg: "before any activation" in msg)
    run = threshold(lambda msg: True)
    init_temporary = cfg.padded_vocab_size * cfg.n_embd * 8  # wte, drawn in float64
    assert 0 <= setup_peak - setup <= init_temporary + (64 << 10), (setup_peak, setup)
    assert 0 <= held - run <= 0.02 * run, (held, run)


class RowsComm(Communicator):
    """A communicator whose gather returns the given rows (as if every rank had sent one)."""

    def __init__(self, rows):
        self.rows, self.sent = np.asarray(rows, dtype=np.float64), []
        self.size = len(rows)

    def allgather_host(self, x, timeout=None):
        self.sent.append(np.asarray(x).copy())
        return self.rows


def test_the_ranks_check_the_tightest_hosts_memory_per_rank(monkeypatch):
    """agree_host_memory: what this rank read (its host's available memory, its local size)
    goes into the gather; every rank then takes the same host's figures, the least per rank
    (host B: 9 GB for 4 ranks beats host A's 10 GB for 2), ignoring ranks that could not read
    theirs, and None when no rank could (no check, as in one process)."""
    from cllm_gpu import trainer
    from cllm_gpu.backend import HostMemory
    monkeypatch.setattr(trainer, "available_memory", lambda xp: 10 * 10**9)
    comm = RowsComm([[10e9, 2], [10e9, 2], [9e9, 4], [9e9, 4], [9e9, 4], [9e9, 4], [-1, 1]])
    host = trainer.agree_host_memory(comm, 2)
    assert comm.sent[0].tolist() == [10e9, 2.0]
    assert host == HostMemory(9 * 10**9, 4) and host.share == 2_250_000_000
    monkeypatch.setattr(trainer, "available_memory", lambda xp: None)
    comm = RowsComm([[-1, 2], [-1, 2]])
    assert trainer.agree_host_memory(comm, 2) is None and comm.sent[0].tolist() == [-1.0, 2.0]
    # the least per rank, not the least memory: host A's 8 GB for 1 rank is more per rank
    comm = RowsComm([[8e9, 1], [9e9, 4], [9e9, 4], [9e9, 4], [9e9, 4]])
    assert trainer.agree_host_memory(comm, 1) == HostMemory(9 * 10**9, 4)


def test_zero_other_than_0_or_1_is_refused():
    """ZeRO stage 1 is the only sharding there is (mutation audit: zero=2 accepted, unseen)."""
    model = CLLMModel(CFG, backend="numpy", seed=1)
    with pytest.raises(ConfigError, match="zero must be 0 or 1, got 2"):
        DataParallel(model, SelfComm(), zero=2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bucket_bytes", [20_000, (128 + 3584) * 4, 3584 * 8])
def test_a_bucket_closes_at_the_first_unit_that_brings_it_to_bucket_mb(dtype, bucket_bytes):
    """bucket_mb counts MiB of the model's dtype: a bucket takes readiness units in backward
    order until it holds bucket_mb or more (mutation audit: elements counted at 4 bytes
    whatever the dtype, KiB for MiB, a bucket that had to pass bucket_mb rather than reach
    it, and describe()'s MB in KiB passed every other test). The sizes include a bucket of
    exactly ln_f and the last block in float32 (128 + 3,584 elements, padding included) and
    of one block in float64."""
    model = CLLMModel(CFG, backend="numpy", dtype=dtype)
    item = model.dtype.itemsize
    dp = DataParallel(model, SelfComm(), bucket_mb=bucket_bytes / 2**20)
    unit_end = dict(readiness_units(model))
    assert len(dp.buckets) > 1
    for i, b in enumerate(dp.buckets):
        size = (b.end - b.start) * item
        without_its_last_unit = size - (unit_end[b.start] - b.start) * item
        assert without_its_last_unit < bucket_bytes, i  # it had not reached bucket_mb before
        if i < len(dp.buckets) - 1:
            assert size >= bucket_bytes, i
    assert f"{model.arena_size * item / 2**20:.3g} MB" in dp.describe()


def _reduce(dp, model, nan_at=None):
    """reduce_gradients over an all-zero gradient arena, with one NaN at arena index nan_at."""
    model.grads.data[...] = 0
    if nan_at is not None:
        model.grads.data[nan_at] = np.nan
    sv = StepValues(np)
    dp.reduce_gradients(sv)
    return sv


@pytest.mark.parametrize("world,rank", [(2, 1), (3, 1), (3, 2)])
def test_a_ranks_first_nonfinite_gradient_is_named_by_its_arena_index(world, rank):
    """The shard's first non-finite index becomes an arena index through the piece it falls in:
    at the shard's first element, at a piece's first element and inside a piece (mutation
    audit: searchsorted's side and `bad > 0` for `bad >= 0` passed every other test, whose
    non-finite gradients never sat at such places of a shard)."""
    model = CLLMModel(CFG, backend="numpy", seed=1)
    dp = DataParallel(model, MirrorComm(rank, world), bucket_mb=1e-5)  # a bucket per unit
    pieces = sorted((b.offsets[rank], b.counts[rank]) for b in dp.buckets)
    assert len(pieces) == CFG.n_layer + 2 and all(c > 0 for _, c in pieces)
    (first, _), (second, _), (last, n_last) = pieces[0], pieces[1], pieces[-1]
    for at in (first, second, pieces[2][0], second + 5, last + n_last - 1):
        sv = _reduce(dp, model, nan_at=at)
        assert sv.bad[0] == at and np.isnan(sv.norm[0])
    # a NaN in another rank's piece is that rank's to name
    sv = _reduce(dp, model, nan_at=second - 1)
    assert sv.bad[0] == -1 and sv.norm[0] == 0


def test_a_rank_whose_shard_is_empty_contributes_a_zero_norm_and_no_nonfinite_index():
    """More ranks than elements in any bucket: rank 0's pieces are all empty (mutation audit:
    its partials' first non-finite index written as 0 instead of -1 passed every other test)."""
    model = CLLMModel(CFG, backend="numpy", seed=1)
    world = 4096  # past the largest unit (a block: 3,584 elements)
    dp = DataParallel(model, MirrorComm(0, world), bucket_mb=1e-5)
    assert dp.shard_size == 0
    sv = _reduce(dp, model)
    assert sv.bad[0] == -1 and sv.norm[0] == 0
    assert not StepValues.read_outputs(sv.outputs())["nonfinite"]


def _one_step(model, dp):
    """One training step of one micro-batch through dp."""
    tc = TrainConfig(grad_accum_steps=1, warmup_steps=0, max_steps=1)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, CFG.block_size + 1))
    batch = model.check_batch(tokens[:, :-1], tokens[:, 1:])
    sv = StepValues(np)
    sv.set_inputs(tc, tc.lr_at(0), 1, batch.n_valid)
    training_step(model, iter([model.set_batch(batch)]), tc, sv, dp=dp)


class _StartRecorder(SelfComm):
    """SelfComm noting, at each reduce-scatter, whether block 0's gradient exists yet."""
    def __init__(self, model):
        self.model, self.block_0_done = model, []

    def reduce_scatter(self, send, recv, counts):
        self.block_0_done.append(bool(self.model.grads["transformer.h.0.ln_1.weight"].any()))
        return super().reduce_scatter(send, recv, counts)


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_starts_each_bucket_when_the_backward_has_finished_it(overlap):
    """With overlap, the buckets of ln_f and of the blocks after block 0 start their reduction
    before block 0's backward; without, every bucket starts after the backward (mutation
    audit: the last micro-batch's hook never passed to the backward, or the overlap flag read
    backwards, gave the same results and passed every other test)."""
    model = CLLMModel(CFG, backend="numpy", seed=1)
    comm = _StartRecorder(model)
    _one_step(model, DataParallel(model, comm, overlap=overlap, bucket_mb=1e-5))
    # a bucket per unit, in backward order: ln_f, blocks 2, 1, 0, the embeddings
    want = [False] * CFG.n_layer + [True, True] if overlap else [True] * (CFG.n_layer + 2)
    assert comm.block_0_done == want


class _GatherRecorder(SelfComm):
    """SelfComm noting each all-gather: of reduced gradients (sent from the shard) or of
    parameters (in place)."""
    def __init__(self):
        self.gathers = []

    def all_gather(self, recv, counts, send=None, after=None):
        self.gathers.append("gradients" if send is not None else "parameters")
        return super().all_gather(recv, counts, send=send, after=after)


@pytest.mark.parametrize("zero", [0, 1])
def test_zero_gathers_parameters_and_no_zero_gathers_gradients(zero):
    """Without ZeRO each bucket's reduced gradient pieces are gathered back into the arena; with
    ZeRO-1 only the updated parameter pieces are, the gradients staying in the shard (mutation
    audit: ZeRO gathering the gradients too, a bucket's worth of traffic per step that nothing
    reads, gave the same results and passed every other test)."""
    model, comm = CLLMModel(CFG, backend="numpy", seed=1), _GatherRecorder()
    dp = DataParallel(model, comm, zero=zero, bucket_mb=0.002)
    _one_step(model, dp)
    want = "parameters" if zero else "gradients"
    assert comm.gathers == [want] * len(dp.buckets) and len(dp.buckets) > 1


@pytest.mark.parametrize("dp_args", [None, {}, {"zero": 1, "bucket_mb": 0.002}])
def test_a_step_whose_targets_are_all_ignored_has_loss_0_and_is_finite(dp_args):
    """No valid target in the global batch: DLOSS is 1 / max(count, 1), so the loss is 0 and
    the step finite (weight decay still moves the weights), with or without data parallelism
    (mutation audit: the data-parallel reciprocal without its max(count, 1) made DLOSS inf
    and the loss NaN, unseen)."""
    tc = TrainConfig(grad_accum_steps=2, warmup_steps=0, max_steps=1)
    model = CLLMModel(CFG, backend="numpy", seed=1)
    before = model.params.data.copy()
    dp = DataParallel(model, SelfComm(), **dp_args) if dp_args is not None else None
    idx = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, CFG.block_size))
    batches = [model.check_batch(idx, np.full_like(idx, -1)) for _ in range(2)]
    sv = StepValues(np)
    sv.set_inputs(tc, tc.lr_at(0), 1, 0)
    training_step(model, (model.set_batch(b) for b in batches), tc, sv, dp=dp)
    out = StepValues.read_outputs(sv.outputs())
    assert out == {"loss": 0.0, "grad_norm": 0.0, "bad": -1, "nonfinite": False}
    assert sv.dloss[0] == 1.0
    assert np.all(np.isfinite(model.params.data)) and not np.array_equal(model.params.data, before)


@pytest.mark.parametrize("world,batch,want", [
    (2, 4, None),                                     # 16 = 2 x 4 x 2
    (3, 4, r"does not split evenly over 3 ranks: resume on a number of ranks that divides 16"),
    (4, 3, r"cannot be split into 4 ranks x batch size 3: choose a --batch-size")])
def test_resume_on_other_ranks_keeps_the_global_batch_or_says_what_would(world, batch, want):
    """A checkpoint of 2 ranks x 4 x 2: a world size that divides no batch of 16 sequences got
    the advice to choose another --batch-size, which no batch size satisfies."""
    from types import SimpleNamespace

    from cllm_gpu.trainer import GpuTrainer
    state = {"world_size": 2, "global_batch": 16,
             "train_config": {"batch_size": 4, "grad_accum_steps": 2}}
    tc = TrainConfig(batch_size=batch, grad_accum_steps=2)
    lines = []
    fake = SimpleNamespace(world=world, log=lines.append)
    if want is None:
        assert GpuTrainer._keep_global_batch(fake, tc, state).grad_accum_steps == 2
        return
    with pytest.raises(ConfigError, match=want):
        GpuTrainer._keep_global_batch(fake, tc, state)


def test_agree_and_check_same_at_world_size_1():
    comm = SelfComm()
    comm.agree(None)
    comm.check_same("cfg", "a")
    with pytest.raises(CollectiveError, match="^broken$"):
        comm.agree("broken")
    assert comm.allgather_bytes(b"abc") == [b"abc"]
    # a refusal longer than one allgather_bytes slot (254 bytes) arrives whole: it was cut
    # there, and the advice at its end with it
    long = "a/" * 200 + "run: already holds checkpoints; use --overwrite or another --out"
    with pytest.raises(CollectiveError) as e:
        comm.agree(long)
    assert str(e.value) == long


_STORE_RANK = """
import sys
from cllm_gpu.distributed import detect_launch, tcp_store_exchange
launch = detect_launch()
value = b"id-from-rank-0" if launch.rank == 0 else None
got = tcp_store_exchange(launch, "nccl-unique-id", value, timeout=30)
print(launch.rank, got.decode())
"""


@pytest.mark.ci_required("dev")
def test_tcp_store_rendezvous_without_mpi(tmp_path):
    """The NCCL unique id's path without MPI (torchrun-style variables): rank 0 serves
    cupyx.distributed's TCP store at MASTER_ADDR:MASTER_PORT, every rank reads the id."""
    pytest.importorskip("cupyx.distributed")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (1, 0, 2):  # a rank may come up before rank 0's store: it retries
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-c", _STORE_RANK], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=90) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sorted(o[0].strip() for o in outs) == [f"{r} id-from-rank-0" for r in range(3)]


_UID_RANK = """
import hashlib
import sys
from pathlib import Path
from cllm_gpu.distributed import detect_launch, exchange_unique_id, uid_channel
launch = detect_launch()
make = (lambda: hashlib.sha512(b"rank 0's id").digest() * 2) if launch.rank == 0 else None
# a generous timeout: each rank imports torch first, slow on a loaded 2-core machine
got = exchange_unique_id(launch, make, timeout=120)
# a file per rank: torchrun interleaves the ranks' stdout within a line ("RANKRANK 1 ...")
Path(sys.argv[1], f"rank{launch.rank}").write_text(" ".join(map(str, [
    launch.rank, uid_channel(launch).split(" ")[0], hashlib.sha256(got).hexdigest()[:12]])))
"""


@pytest.mark.ci_required("torch")
def test_nccl_unique_id_travels_through_torchruns_own_store(tmp_path):
    """torchrun (torch >= 2.3: TORCHELASTIC_USE_AGENT_STORE=True) serves its own store at the
    MASTER_ADDR:MASTER_PORT it gives its workers. Rank 0's TCP store could not bind there (its
    child process kept the error) and every rank's read went to torch's store, which never
    answered it: the CUDA path hung at start-up for ever (seen: both ranks still in recv after
    60 s). Now the id goes through torchrun's store itself."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("no torchrun (torch is not installed)")
    (tmp_path / "rank.py").write_text(_UID_RANK)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--standalone",
                        str(tmp_path / "rank.py"), str(tmp_path)], capture_output=True,
                       text=True, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}").read_text().split() for r in (0, 1)]
    assert [ln[:2] for ln in lines] == [["0", "torchrun's"], ["1", "torchrun's"]], lines
    assert lines[0][2] == lines[1][2], lines


_TWO_NODE_RANK = """
import hashlib
import os
import sys
import time
from pathlib import Path
from cllm_gpu.distributed import CommTimeout, detect_launch, exchange_unique_id
out, node = Path(sys.argv[1]), os.environ["NODE"]
marker = out / "failed-once"
second_start = marker.exists()  # the worker of node 0 that failed has left it
launch = detect_launch()
made = hashlib.sha512(f"rank 0's id in process {os.getpid()}".encode()).digest() * 2
sha = lambda b: hashlib.sha256(b).hexdigest()[:12]  # noqa: E731
try:
    got = sha(exchange_unique_id(launch, (lambda: made) if launch.rank == 0 else None,
                                 timeout=40))
except CommTimeout:
    got = "timeout"
start = "second" if second_start else "first"
(out / f"{start}-{launch.rank}").write_text(" ".join([
    start, node, os.environ["TORCHELASTIC_RESTART_COUNT"], str(launch.rank),
    sha(made) if launch.rank == 0 else "-", got]))
if second_start:
    sys.exit(0)
if os.environ.get("FAIL_ONCE") == "1":
    # fail once, after the other node's worker has its id (its agent then restarts it)
    deadline = time.monotonic() + 120
    while len(list(out.glob("first-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    marker.touch()
    sys.exit(1)
time.sleep(300)  # the first start's other worker: stopped by its agent for the restart
"""


@pytest.mark.slow
@pytest.mark.ci_required("torch")
def test_a_node_restarted_for_another_node_s_failure_reads_the_new_start_s_id(tmp_path):
    """Two torchrun agents (two nodes of one job, here on localhost, c10d rendezvous), node 0's
    worker failing once. torchrun counts restarts per node: node 0 restarts its workers with
    TORCHELASTIC_RESTART_COUNT=1, node 1 (restarted only because node 0 rejoined the
    rendezvous) with 0. The id was stored under a key naming that count: in the second start
    one rank read the first start's id (the dead rank 0's: NCCL would join its bootstrap) or
    waited for a key its rank 0 never set (seen, both: rank 1 on node 1 got the first start's
    id; rank 1 on node 0 timed out). Now every rank takes the id of the rank 0 that is alive."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("no torchrun (torch is not installed)")
    import socket
    (tmp_path / "rank.py").write_text(_TWO_NODE_RANK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    agents = [subprocess.Popen(
        [str(torchrun), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", "two-nodes", "--rdzv-conf", f"is_host={int(node == 0)}",
         "--max-restarts", "1", "--monitor-interval", "0.5",
         str(tmp_path / "rank.py"), str(tmp_path)],
        env=dict(env, NODE=str(node), FAIL_ONCE=str(int(node == 0))), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    try:
        outs = [a.communicate(timeout=240)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outs)
    records = {f.name: f.read_text().split() for f in tmp_path.glob("*-[01]")}
    assert sorted(records) == ["first-0", "first-1", "second-0", "second-1"], records
    counts = {(r[1], r[2]) for name, r in records.items() if name.startswith("second")}
    assert counts == {("0", "1"), ("1", "0")}, records  # the per-node counts: the case at hand
    for start in ("first", "second"):
        rank_0_made = records[f"{start}-0"][4]
        assert [records[f"{start}-{r}"][5] for r in (0, 1)] == [rank_0_made] * 2, records
    assert records["first-0"][4] != records["second-0"][4]


_HELD_PORT_RANK_0 = """
import sys
from cllm_gpu.distributed import Launch, tcp_store_exchange
from cllm_gpu.errors import ConfigError
try:
    tcp_store_exchange(Launch(0, 2, 0, 2, "torchrun-style", "127.0.0.1", int(sys.argv[1])),
                       "nccl-unique-id", b"id", timeout=5)
except ConfigError as e:
    print(e)
"""


@pytest.mark.ci_required("dev")
def test_rank_0_refuses_a_master_port_another_program_holds():
    """Rank 0's TCP store binds in a child process that kept a failure to itself: with the port
    held (another run's store, a second run given the same MASTER_PORT) the ranks talked to
    whatever held it, a rank of the second run could read the first run's NCCL id, and against
    a server that accepts and never answers rank 0 waited for ever (seen: killed at 30 s)."""
    pytest.importorskip("cupyx.distributed")
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        p = subprocess.run([sys.executable, "-c", _HELD_PORT_RANK_0, str(port)],
                           capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.strip() == (
        f"rank 0 cannot serve the TCP store at 127.0.0.1:{port}: Address already in use; "
        f"another run, or another program, holds the port: give each run its own "
        f"MASTER_PORT"), p.stdout + p.stderr[-2000:]


def test_a_master_addr_not_rank_0s_own_is_not_called_a_port_in_use():
    """An address this host does not have fails the bind with EADDRNOTAVAIL: the refusal says
    to set MASTER_ADDR, not that another run holds the port (it said so for every bind error)."""
    from cllm_gpu.distributed import _check_port_free
    with pytest.raises(ConfigError) as e:
        _check_port_free(_port_launch("192.0.2.1", 29500))  # TEST-NET-1: no host's own
    assert "set MASTER_ADDR to an address of rank 0's host" in str(e.value), e.value
    assert "holds the port" not in str(e.value)



def _port_launch(addr, port):
    return Launch(0, 2, 0, 2, "torchrun-style", addr, port)


def test_the_master_port_check_binds_master_addr_as_the_store_does():
    """cupyx's store binds (MASTER_ADDR, MASTER_PORT) with SO_REUSEADDR, and so does the check:
    the port held on MASTER_ADDR is refused; held on another address only, it is free for the
    store and passes. Mutation audit: binding 127.0.0.1, or every address (""), instead of
    MASTER_ADDR passed every test (all on 127.0.0.1)."""
    import socket

    from cllm_gpu.distributed import _check_port_free
    with socket.socket() as held:
        held.bind(("127.0.0.2", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=f"rank 0 cannot serve the TCP store at "
                                              f"127.0.0.2:{port}: Address already in use"):
            _check_port_free(_port_launch("127.0.0.2", port))
        _check_port_free(_port_launch("127.0.0.1", port))  # free there: no refusal


def test_a_master_port_left_in_time_wait_by_an_earlier_run_is_free():
    """A run's store closed its connections first: the port stays in TIME_WAIT for a minute,
    in which the store binds it again (SO_REUSEADDR), so the next run given the same
    MASTER_PORT is not refused. Mutation audit: the check without SO_REUSEADDR passed every
    test, and refused that run."""
    import socket

    from cllm_gpu.distributed import _check_port_free
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server's side closes first: its end of the connection in TIME_WAIT
    client.close()
    server.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # the TIME_WAIT is there
    _check_port_free(_port_launch("127.0.0.1", port))


@pytest.mark.ci_required("torch")
def test_no_id_in_torchruns_store_is_a_comm_timeout_within_the_timeout():
    """A rank reading torchrun's store where rank 0 never sets the id (it died, hung, or was
    stopped) gets CommTimeout, one line, after the timeout it was given. Mutation audit: torch's
    error left uncaught, or torch's own 300 s timeout, passed every test."""
    pytest.importorskip("torch.distributed")
    from datetime import timedelta

    from torch.distributed import TCPStore

    from cllm_gpu.distributed import CommTimeout, agent_store_exchange
    agent = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=30))  # as torchrun's agent serves it
    launch = Launch(1, 2, 1, 2, "torchrun-style", "127.0.0.1", agent.port, agent_store=True)
    start = time.monotonic()
    with pytest.raises(CommTimeout) as e:
        agent_store_exchange(launch, "nccl-unique-id", None, timeout=1)
    assert time.monotonic() - start < 20
    assert str(e.value).startswith(f"no nccl-unique-id from rank 0 in torchrun's store at "
                                   f"127.0.0.1:{agent.port} within 1 s (")
    assert str(e.value).endswith("): rank 0 died, hung or was stopped")
    assert "\n" not in str(e.value)


def _torchruns_store_and_launches():
    """A store as torchrun's agent serves it, and launch(rank, restart) of 2 ranks using it:
    rank 1 on rank 0's node where its restart count is rank 0's, else on a node of its own
    (local rank 0: what a rank is known by in the store is its global rank)."""
    from datetime import timedelta

    from torch.distributed import TCPStore
    agent = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=30))

    def launch(rank, restart):
        one_node = rank == 0 or restart == 1
        return Launch(rank, 2, rank if one_node else 0, 2 if one_node else 1, "torchrun-style",
                      "127.0.0.1", agent.port, restart=restart, agent_store=True)
    return agent, launch


def _exchange_ranks_0_and_1(launch_0, value, launch_1, timeout=20, rank_1_waiting_first=False):
    """agent_store_exchange on ranks 0 and 1 at once (threads). rank_1_waiting_first: rank 0
    starts only once rank 1 has read an earlier start's value and waits on that start's rank 0
    for its reply (or has ended): the order the test is about, seen to happen. A head start by
    a sleep (0.5 s) did not make sure of it: rank 1 held off the CPU as long read rank 0's new
    value at once, and a rank 1 that takes a stale value, or is never woken from one, passed.
    Returns (rank 0's result, rank 1's), or the exception each raised."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from cllm_gpu import distributed
    waiting, take = threading.Event(), distributed._take_this_start_s

    class ReplyWatched:
        """Rank 1's store: `waiting` set as it first waits for a rank 0's reply."""
        def __init__(self, store):
            self._store = store

        def __getattr__(self, name):
            return getattr(self._store, name)

        def get(self, key):
            if "/reply/" in key:
                waiting.set()
            return self._store.get(key)

    def taking_watched(store, *args):
        return take(ReplyWatched(store), *args)
    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(2) as pool:
        mp.setattr(distributed, "_take_this_start_s", taking_watched)
        rank_1 = pool.submit(distributed.agent_store_exchange, launch_1, "nccl-unique-id", None,
                             timeout)
        rank_1.add_done_callback(lambda _: waiting.set())
        if rank_1_waiting_first:
            assert waiting.wait(timeout)
        rank_0 = pool.submit(distributed.agent_store_exchange, launch_0, "nccl-unique-id",
                             value, timeout)
        return tuple(f.exception() or f.result() for f in (rank_0, rank_1))


@pytest.mark.ci_required("torch")
def test_a_restarted_worker_group_reads_its_own_start_s_id_from_torchruns_store():
    """torchrun keeps its store across restarts of the worker group (--max-restarts: seen with
    torch 2.13, static and --standalone rendezvous: a key set in the first start is there in
    the second). The id was under one key for every start: a rank 1 of the restart read the
    first start's id at once, before its rank 0 set the new one (NCCL would join a dead
    process's bootstrap). Then the key named the start by TORCHELASTIC_RESTART_COUNT, which
    torchrun counts per node: a rank 1 on a node restarted for another's failure (count 0)
    still read the first start's id (this test with rank 1 at count 0 failed so). Now a rank
    takes an id once the rank 0 that set it has echoed the rank's own nonce."""
    pytest.importorskip("torch.distributed")
    from cllm_gpu.distributed import CommTimeout, agent_store_exchange
    agent, launch = _torchruns_store_and_launches()  # agent: held, so its server stays up
    first = _exchange_ranks_0_and_1(launch(0, 0), b"first start's id", launch(1, 0))
    assert first == (b"first start's id", b"first start's id")
    with pytest.raises(CommTimeout):  # the restart's rank 0 has set nothing yet
        agent_store_exchange(launch(1, 1), "nccl-unique-id", None, timeout=1)
    for rank_1_restart in (1, 0):  # the same node's count as rank 0's, another node's
        restart = _exchange_ranks_0_and_1(launch(0, 1), b"restart's id " + bytes([rank_1_restart]),
                                          launch(1, rank_1_restart), rank_1_waiting_first=True)
        assert restart == (b"restart's id " + bytes([rank_1_restart]),) * 2


@pytest.mark.ci_required("torch")
def test_a_rank_waiting_on_a_dead_start_s_id_is_woken_by_the_next_rank_0():
    """An earlier start whose rank 1 never took the id (it died first: rank 0 waited for it in
    vain): the next start's rank 1, come first, reads that id and waits for a reply no one
    alive would give; its rank 0 marks that id superseded, and rank 1 follows to the new id
    well within the timeout."""
    pytest.importorskip("torch.distributed")
    from cllm_gpu.distributed import CommTimeout, agent_store_exchange
    agent, launch = _torchruns_store_and_launches()  # agent: held, so its server stays up
    with pytest.raises(CommTimeout, match="^rank 1 did not take nccl-unique-id from torchrun's "
                                          "store at .* within 1 s \\(.*\\): rank 1 died, hung "
                                          "or was stopped$"):
        agent_store_exchange(launch(0, 0), "nccl-unique-id", b"dead start's id", timeout=1)
    start = time.monotonic()
    got = _exchange_ranks_0_and_1(launch(0, 1), b"new id", launch(1, 0), timeout=30,
                                  rank_1_waiting_first=True)
    assert got == (b"new id", b"new id")
    assert time.monotonic() - start < 15



class _ClockedStore:
    """torch's TCPStore as agent_store_exchange uses it, on a fake clock (`now`, seconds): a key
    is there from the time `arrivals` gives it (a function of the key: (time, value), or None:
    never set), unless this process set it; a read waits for it at most the store's timeout,
    advancing the clock, else raises a RuntimeError as torch's timeout does. A read of a key
    that is there takes no time, so `reads` bounds them: a rank polling the store fails."""

    def __init__(self, arrivals):
        self.now, self.arrivals, self.keys, self.reads = 0.0, arrivals, {}, 0

    def __call__(self, host, port, is_master, timeout):  # TCPStore(...): this store
        self.timeout = timeout.total_seconds()
        return self

    def set_timeout(self, timeout):
        self.timeout = timeout.total_seconds()

    def _there(self, key):
        if key in self.keys:
            return 0.0, self.keys[key]
        return self.arrivals(key)

    def check(self, keys):
        return all((k := self._there(key)) is not None and k[0] <= self.now for key in keys)

    def set(self, key, value):
        self.keys[key] = value.encode() if isinstance(value, str) else bytes(value)

    def get(self, key):
        self.reads += 1
        assert self.reads < 100, "the store is polled"
        there = self._there(key)
        if there is None or there[0] > self.now + self.timeout:
            self.now += self.timeout
            raise RuntimeError(f"Socket Timeout: wait for {key}")
        self.now = max(self.now, there[0])
        return there[1]


def _arriving(**at):
    """arrivals for _ClockedStore: key suffix -> (time, value)."""
    return lambda key: next((v for suffix, v in at.items() if key.endswith(suffix)), None)


@pytest.mark.ci_required("torch")
@pytest.mark.parametrize("rank,arrivals,gives_up", [
    # rank 1: rank 0's id comes at 6 s, then rank 0 hangs (no reply)
    (1, _arriving(**{"nccl-unique-id": (6.0, b"N" * 32 + b"id")}), "rank 0"),
    # rank 1: an earlier start's id, its reply an earlier rank 1's nonce (that start finished);
    # this start's rank 0 never comes
    (1, _arriving(**{"nccl-unique-id": (0.0, b"N" * 32 + b"old id"),
                     "/reply/1": (0.0, b"M" * 32)}), "rank 0"),
    # rank 1: a reply not its own coming late (at 5 s), nothing after it
    (1, _arriving(**{"nccl-unique-id": (0.0, b"N" * 32 + b"id"),
                     "/reply/1": (5.0, b"M" * 32)}), "rank 0"),
    # rank 0 of 3: rank 1 takes the id at 6 s, rank 2 never does
    (0, _arriving(**{"/ack/1": (6.0, b"M" * 32)}), "rank 2"),
], ids=["rank-0-hangs", "an-earlier-start-finished", "a-late-reply-not-its-own",
        "rank-2-never-takes-it"])
def test_torchrun_store_exchange_waits_the_timeout_in_all(monkeypatch, rank, arrivals, gives_up):
    """agent_store_exchange waits at most its timeout in all, whatever arrives when (each
    blocking read gets what is left of it), and reads the store only as it changes. Mutation
    audit: a deadline of 3 x the timeout, the whole timeout for each read (rank 1 waiting 16 s
    of 10 for a rank 0 that came at 6 s and hung; rank 0 waiting 16 s for rank 2), and a
    rank re-reading the id key instead of waiting for the next start's (a loop on the store
    until the timeout), and no fresh timeout after a late reply not its own (15 s of 10) all
    passed every test."""
    import types
    torch_distributed = pytest.importorskip("torch.distributed")
    from cllm_gpu import distributed
    from cllm_gpu.distributed import CommTimeout, agent_store_exchange
    store = _ClockedStore(arrivals)
    monkeypatch.setattr(torch_distributed, "TCPStore", store)
    monkeypatch.setattr(distributed, "time", types.SimpleNamespace(monotonic=lambda: store.now))
    launch = Launch(rank, 3, rank, 3, "torchrun-style", "127.0.0.1", 1, agent_store=True)
    with pytest.raises(CommTimeout, match=f"within 10 s .*: {gives_up} died, hung or was "
                                          f"stopped$"):
        agent_store_exchange(launch, "nccl-unique-id", b"id" if rank == 0 else None, 10.0)
    assert 10.0 <= store.now <= 10.01, store.now


def test_tcp_store_without_master_addr_is_refused():
    from cllm_gpu.distributed import exchange_unique_id
    la = Launch(1, 2, 1, 2, "Slurm")
    with pytest.raises(ConfigError, match="set MASTER_ADDR"):
        exchange_unique_id(la, None, 1.0)


class _Recorder:
    """Stands in for cupy.cuda.nccl, an NcclCommunicator and CuPy's events and streams: records
    the calls NCCLComm makes (no GPU here; tests/gpu runs the real ones)."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_UINT8, NCCL_SUM = "f32", "f64", "u8", "sum"

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


class _DevArray:
    def __init__(self, ptr, n):
        self.data = type("Mem", (), {"ptr": ptr})()
        self.size, self.itemsize, self.dtype = n, 4, np.dtype(np.float32)


def _nccl_comm(rank, size):
    from cllm_gpu.distributed import NCCLComm
    rec = _Recorder()
    comm = object.__new__(NCCLComm)
    stream = type("S", (), {"ptr": 7, "wait_event": lambda self, ev: None})()
    event = type("E", (), {"record": lambda self, s: None})
    cuda = type("cuda", (), {"Event": lambda **k: event(), "get_current_stream": lambda: stream})
    comm.cp = type("cp", (), {"cuda": cuda})
    comm.nccl = comm.comm = rec
    comm.rank, comm.size, comm.stream = rank, size, stream
    return comm, rec


def test_nccl_calls_for_equal_and_uneven_pieces():
    comm, rec = _nccl_comm(1, 2)
    send, recv = _DevArray(1000, 8), _DevArray(5000, 4)
    comm.reduce_scatter(send, recv, (4, 4))
    comm.all_gather(send, (4, 4))                    # in place: this rank's piece is the source
    assert rec.calls == [("reduceScatter", 1000, 5000, 4, "f32", "sum", 7),
                         ("allGather", 1000 + 4 * 4, 1000, 4, "f32", 7)]
    comm, rec = _nccl_comm(1, 3)                     # 7 elements over 3 ranks: 2, 2, 3
    send, recv = _DevArray(1000, 7), _DevArray(5000, 2)
    comm.reduce_scatter(send, recv, (2, 2, 3))
    assert rec.calls == [("groupStart",),
                         ("reduce", 1000, 1000, 2, "f32", "sum", 0, 7),
                         ("reduce", 1000 + 2 * 4, 5000, 2, "f32", "sum", 1, 7),
                         ("reduce", 1000 + 4 * 4, 1000 + 4 * 4, 3, "f32", "sum", 2, 7),
                         ("groupEnd",)]
    rec.calls.clear()
    comm.all_gather(send, (2, 2, 3), send=recv)      # from a separate buffer on this rank
    assert rec.calls == [("groupStart",),
                         ("broadcast", 1000, 1000, 2, "f32", 0, 7),
                         ("broadcast", 5000, 1000 + 2 * 4, 2, "f32", 1, 7),
                         ("broadcast", 1000 + 4 * 4, 1000 + 4 * 4, 3, "f32", 2, 7),
                         ("groupEnd",)]


def test_watchdog_ends_a_process_that_stops_making_progress():
    """The backstop for waits that cannot poll (a host blocked in CUDA behind a dead NCCL
    peer): no beat for `timeout` seconds -> one error line, on_timeout, exit 124. The beats
    come every 0.01 s through three timeouts (they came every 0.2 s against the 0.5 s timeout:
    a process held off the CPU 0.3 s, as on a loaded 2-core CI runner, was ended while
    beating); the time to the end is taken from the last beat, not the interpreter's start."""
    code = ("import time\n"
            "from cllm_gpu.distributed import Watchdog\n"
            "def abort(c):\n"
            "    print('abort', c, 'after %.2f' % (time.monotonic() - stuck_at), flush=True)\n"
            "w = Watchdog(0.5, rank=3, on_timeout=abort)\n"
            "alive_until = time.monotonic() + 1.5\n"
            "while time.monotonic() < alive_until:\n"
            "    time.sleep(0.01); w.beat('step')\n"  # beating: alive
            "stuck_at = time.monotonic()\n"
            "print('stuck', flush=True)\n"
            "time.sleep(30)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 124, (p.returncode, p.stdout, p.stderr)
    assert p.stdout.split()[:3] == ["stuck", "abort", "124"], p.stdout
    assert _seconds_after(p.stdout) < 5  # 0.5 s and a check (1/4 timeout) in theory
    assert "error: rank 3: no progress for" in p.stderr and "(in step;" in p.stderr


def _seconds_after(stdout):
    """The seconds in the child's 'abort 124 after S' line."""
    words = stdout.split()
    return float(words[words.index("after") + 1])


def test_watchdog_holds_off_while_held_and_restarts_its_clock_after():
    """A checkpoint write (rank 0) and the wait for it (the others) may outlast the timeout on
    a slow disk: inside hold() the watchdog does not fire; after it, it fires as before."""
    code = ("import time\n"
            "from cllm_gpu.distributed import Watchdog\n"
            "def abort(c):\n"
            "    print('abort', c, 'after %.2f' % (time.monotonic() - written_at), flush=True)\n"
            "w = Watchdog(0.5, rank=1, on_timeout=abort)\n"
            "with w.hold('checkpoint write'):\n"
            "    time.sleep(2.0)\n"  # four timeouts long
            "written_at = time.monotonic()\n"
            "print('written', flush=True)\n"
            "time.sleep(30)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 124, (p.returncode, p.stdout, p.stderr)
    assert p.stdout.split()[:3] == ["written", "abort", "124"], p.stdout
    assert _seconds_after(p.stdout) < 5
    assert "(in checkpoint write;" in p.stderr

# The watchdog thread paused (by an opcode tracer) just before it reads `_held`, inside a hold
# whose last beat is 100 s old (30 s timeout); the main thread leaves the hold there, and the
# tracer lets the main thread go on once the watchdog reaches its next check: the paused check
# has then ended, without firing. (It was a 0.5 s timeout, a real 1 s hold, then 1.5 s of beats
# every 0.05 s: a process held off the CPU for 0.45 s, as on a loaded CI runner, was ended.)
_HOLD_ENDS_MID_CHECK = """
import dis, sys, threading, time
from cllm_gpu.distributed import Watchdog
paused, left, next_check = threading.Event(), threading.Event(), threading.Event()
backdated = threading.Event()
loads = {i.offset for i in dis.get_instructions(Watchdog._run)
         if i.opname.startswith("LOAD_ATTR") and i.argval == "_held"}
assert loads, "Watchdog._run reads no _held"
def opcodes(frame, event, arg):
    if event == "opcode" and frame.f_lasti in loads and backdated.is_set():
        if not paused.is_set():
            paused.set()
            left.wait(10)
        elif left.is_set():
            next_check.set()
    return opcodes
def calls(frame, event, arg):
    if event == "call" and frame.f_code is Watchdog._run.__code__:
        frame.f_trace_opcodes = True
        return opcodes
threading.settrace(calls)
w = Watchdog(30, rank=1, on_timeout=lambda c: print('abort', c, flush=True))
with w.hold('checkpoint write'):
    w._last = time.monotonic() - 100  # a hold that has lasted 100 s
    backdated.set()
    assert paused.wait(10), "the watchdog never reached its _held check"
left.set()
assert next_check.wait(10), "the watchdog never reached its next check"
print('survived', flush=True)
"""


def test_watchdog_does_not_fire_when_a_hold_ends_during_its_check():
    """_run computed `idle` from the last beat, then read `_held`: a hold that ended between
    the two (a long checkpoint write finishing, on Python 3.10 or a free-threaded build, where
    the thread can be switched there) made it end a healthy job with exit 124 on an `idle`
    taken before the hold's closing beat. The interleaving is forced here with a tracer."""
    p = subprocess.run([sys.executable, "-c", _HOLD_ENDS_MID_CHECK], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (p.returncode, p.stdout.split()) == (0, ["survived"]), (p.returncode, p.stdout,
                                                                    p.stderr)


def test_nccl_unique_id_travels_as_the_bytes_cupy_14_takes(monkeypatch):
    """CuPy 14's nccl.get_unique_id returns 128 bytes and NcclCommunicator takes only bytes
    (cupy_backends/cuda/libs/nccl.pyx); over MPI the id goes through an 8-bit buffer and must
    come back as the same bytes on every rank."""
    from cllm_gpu import distributed
    uid = bytes(range(128))
    sent = []

    class World:
        @staticmethod
        def Bcast(buf, root):
            sent.append(buf.copy())
            if not buf.any():             # a receiving rank: the root's bytes arrive
                buf[:] = np.frombuffer(uid, dtype=np.uint8)

    monkeypatch.setattr(distributed, "_import_mpi",
                        lambda: type("MPI", (), {"COMM_WORLD": World}))
    for rank in (0, 1):
        la = Launch(rank, 2, rank, 2, "Open MPI")
        got = distributed.exchange_unique_id(la, (lambda: uid) if rank == 0 else None, 1.0)
        assert type(got) is bytes and got == uid
    with pytest.raises(RuntimeError, match="expected 128 bytes"):
        distributed.exchange_unique_id(Launch(0, 2, 0, 2, "Open MPI"), lambda: tuple(uid), 1.0)


class ThreadRankComm(Communicator):
    """Rank `rank` of `size` ranks run as threads of one process: allgather_host stacks every
    rank's array in rank order, as MPI's Allgather does, so that agree and check_same take
    their many-rank paths here (the MPI tests start 2 or 3 ranks, each case a job)."""
    name = "threads (test)"

    def __init__(self, rank, size, shared):
        self.rank, self.size, (self.slots, self.barrier) = rank, size, shared

    def allgather_host(self, x, timeout=None):
        self.slots[self.rank] = np.asarray(x).copy()
        self.barrier.wait(timeout=30)
        rows = np.stack(self.slots)  # a rank sending another shape than the others fails here
        self.barrier.wait(timeout=30)
        return rows


def _collective_on_thread_ranks(size, collective):
    """collective(comm, rank) run by `size` thread ranks; each rank's CollectiveError message,
    None where it returned, or the other exception it raised."""
    import threading
    shared = ([None] * size, threading.Barrier(size))
    got = ["no answer"] * size

    def run(rank):
        try:
            collective(ThreadRankComm(rank, size, shared), rank)
            got[rank] = None
        except CollectiveError as e:
            got[rank] = str(e)
        except Exception as e:  # noqa: BLE001 (reported, not raised, from the thread)
            got[rank] = e
    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return got


def test_agree_names_at_most_4_failing_ranks_and_counts_the_rest():
    """Every rank raises the one message: bare where every rank had the same error, else each
    failing rank's own, the first 4 named and the others counted; messages of different
    lengths arrive whole; no error, no raise (mutation audit: agree's limits of 4 and the
    all-ranks test were pinned by no test, the MPI tests having 2 or 3 ranks)."""
    errors = [None, "short", "a longer error than rank 1's", "e3", "e4", "e5", "e6"]
    got = _collective_on_thread_ranks(7, lambda comm, r: comm.agree(errors[r]))
    assert got == ["rank 1: short; rank 2: a longer error than rank 1's; rank 3: e3; rank 4: e4 "
                   "(and 2 more ranks)"] * 7
    got = _collective_on_thread_ranks(6, lambda comm, r: comm.agree(errors[r]))
    assert got == ["rank 1: short; rank 2: a longer error than rank 1's; rank 3: e3; rank 4: e4 "
                   "(and 1 more ranks)"] * 6
    got = _collective_on_thread_ranks(5, lambda comm, r: comm.agree(errors[r]))
    assert got == ["rank 1: short; rank 2: a longer error than rank 1's; rank 3: e3; "
                   "rank 4: e4"] * 5
    got = _collective_on_thread_ranks(3, lambda comm, r: comm.agree("the same"))
    assert got == ["the same"] * 3
    got = _collective_on_thread_ranks(3, lambda comm, r: comm.agree(None if r == 2 else "x"))
    assert got == ["rank 0: x; rank 1: x"] * 3
    assert _collective_on_thread_ranks(4, lambda comm, r: comm.agree(None)) == [None] * 4


def test_check_same_names_the_ranks_and_the_keys_that_differ():
    """check_same refuses on every rank naming the ranks unlike rank 0 and, for a dict, the
    keys that differ, the first 4 named and the others counted (mutation audit: the keys'
    test, its limit and the plural were pinned by no test)."""
    def settings(rank):
        values = {k: "0" for k in "abcdefgh"}
        if rank == 1:
            values.update(b="1")
        if rank == 3:
            values.update(c="1", d="1", e="1", f="1", g="1", h="1")
        return values
    got = _collective_on_thread_ranks(4, lambda comm, r: comm.check_same("S", settings(r)))
    assert got == ["S differ between ranks (ranks 1, 3 vs rank 0): b, c, d, e (and 3 more); "
                   "every rank must be started with the same settings, data and checkpoint"] * 4
    got = _collective_on_thread_ranks(3, lambda comm, r: comm.check_same("S", settings(r)))
    assert got == ["S differ between ranks (rank 1 vs rank 0): b; every rank must be started "
                   "with the same settings, data and checkpoint"] * 3
    got = _collective_on_thread_ranks(3, lambda comm, r: comm.check_same("S", "x" * (r == 2)))
    assert got == ["S differ between ranks (rank 2 vs rank 0); every rank must be started with "
                   "the same settings, data and checkpoint"] * 3
    assert _collective_on_thread_ranks(
        3, lambda comm, r: comm.check_same("S", settings(0))) == [None] * 3
