"""Data-parallel training over MPI on the NumPy path (`mpiexec -n 2` and `-n 3`), the way CI runs
it: against one process with the same global batch, ZeRO-1 against no ZeRO, resume across world
sizes, and failures (a setting that differs between ranks, a rank that raises, is killed or
hangs). Tiny model, 20 steps: the whole file takes about a minute on 2 cores.

What is bitwise and why (docs/distributed.md): ZeRO-1 and plain data parallelism at the same
world size and bucket size share the reduce-scatter (MPI may group a sum differently for
other piece sizes), the rank-ordered partial sums and AdamW's per-element
arithmetic, so their losses, weights and moments are bitwise equal; so are overlap on and off
(the same reductions in the same order), a run resumed on the same number of ranks and an
uninterrupted one, and the weights on every rank (each element is reduced once, on one rank,
then copied). Against one process the gradient sums are added in another order, so the
results agree to rounding: 1e-6 relative, with one exception. GPT-2's key biases
(c_attn.bias[C:2C]) have an exactly zero gradient (softmax ignores a constant added to every
score of a row), so what they receive is rounding noise, which Adam scales to steps of about lr:
they differ between any two summation orders, one process or many, by up to lr per step.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cllm_gpu.cli import main as cli_main
from cllm_gpu.safetensors_io import load_file

ROOT = Path(__file__).resolve().parent.parent
N_EMBD = 16
LR = 2e-3
STEPS = 20
COMMON = ["--n-layer", "2", "--n-head", "2", "--n-embd", str(N_EMBD), "--block-size", "16",
          "--batch-size", "2", "--max-steps", str(STEPS), "--lr-decay-steps", str(STEPS),
          "--learning-rate", str(LR), "--min-lr", "2e-4", "--warmup-steps", "0",
          "--eval-interval", "10", "--eval-batches", "3", "--log-interval", "5",
          "--checkpoint-interval", "10", "--keep-checkpoints", "5", "--sample-tokens", "0",
          "--backend", "numpy", "--bucket-mb", "0.01"]


def _mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def _mpi_missing():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (the dist extra)"
    return None if _mpiexec() else "no mpiexec (the dist extra brings MPICH's)"


pytestmark = [pytest.mark.ci_required("mpi"),
              pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))]


@pytest.fixture(scope="module")
def data(token_dir):
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    return token_dir(" ".join(np.random.default_rng(0).choice(words, size=4000)), "dist")


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        env.pop(k, None)
    return env


def mpirun(n, *args, timeout=120, check=True, ranks=None, env=None):
    """`mpiexec -n n cllm-gpu train ...`; ranks: per-rank extra argument lists (MPMD); env:
    variables added to the launcher's environment."""
    cmd = [_mpiexec()]
    for r in range(n) if ranks else [None]:
        cmd += (["-n", "1"] if ranks else ["-n", str(n)]) + [sys.executable, "-m", "cllm_gpu",
                                                             "train", *args, *(ranks[r] if ranks else [])]
        if ranks and r < n - 1:
            cmd.append(":")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**_env(), **(env or {})})
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def single(*args):
    assert cli_main(["train", *args]) == 0


def run_of(out, step=STEPS):
    """(params, moments, {step: loss}) at `step`; the losses also hold each logged step's
    gradient norm (key (step, "grad_norm")) and each evaluation's (key (step, "val_loss"))."""
    params = load_file(out / f"ckpt-{step:08d}" / "model.safetensors")[0]
    moments = load_file(out / f"ckpt-{step:08d}" / "optimizer.safetensors")[0]
    losses = {}
    for r in map(json.loads, open(out / "metrics.jsonl")):
        if r["type"] == "train":
            losses[r["step"]] = r["loss"]
            losses[r["step"], "grad_norm"] = r["grad_norm"]
        elif r["type"] == "eval":
            losses[r["step"], "val_loss"] = r["val_loss"]
    return params, moments, losses


def assert_bitwise(a, b):
    pa, ma, la = run_of(a)
    pb, mb, lb = run_of(b)
    assert la == lb
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k
    for k in ma:
        assert np.array_equal(ma[k], mb[k]), k


def assert_same_run(a, b, rtol=1e-6):
    """Losses, gradient norms, validation losses and weights equal to rtol (weights: per
    tensor, ||a - b|| / ||b||), except the key biases, which only stay within the Adam step
    bound (module docstring). The norms and validation losses are compared too: a norm of one
    rank's shard, or a validation loss of one rank's batches, could still give close weights."""
    pa, _, la = run_of(a)
    pb, _, lb = run_of(b)
    assert la.keys() == lb.keys()
    for s in la:
        assert abs(la[s] - lb[s]) <= rtol * abs(lb[s]), (s, la[s], lb[s])
    for k in pa:
        x, y = pa[k].astype(np.float64), pb[k].astype(np.float64)
        if k.endswith("attn.c_attn.bias"):
            key = slice(N_EMBD, 2 * N_EMBD)
            assert np.abs(x[key] - y[key]).max() <= 2 * LR * STEPS, k
            x[key] = y[key] = 0
        assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), (k, np.linalg.norm(x - y))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The runs the comparisons share: one process with global batches of 4 and 6 sequences,
    and the same on 2 and 3 ranks, with and without ZeRO-1 and overlap."""
    d = tmp_path_factory.mktemp("runs")
    args = COMMON + ["--data", str(data)]
    single(*args, "--out", str(d / "one_k2"), "--grad-accum-steps", "2")
    single(*args, "--out", str(d / "one_k3"), "--grad-accum-steps", "3")
    mpirun(2, *args, "--out", str(d / "two"))
    mpirun(2, *args, "--out", str(d / "two_zero"), "--zero", "1")
    mpirun(3, *args, "--out", str(d / "three_zero"), "--zero", "1")
    mpirun(3, *args, "--out", str(d / "three_zero_sequential"), "--zero", "1",
           "--no-overlap-comm")
    mpirun(3, *args, "--out", str(d / "three"))
    return d, args


def test_two_and_three_ranks_match_one_process_with_the_same_global_batch(runs):
    d, _ = runs
    assert_same_run(d / "two", d / "one_k2")
    assert_same_run(d / "three_zero", d / "one_k3")
    assert_same_run(d / "three", d / "one_k3")


def test_dropout_masks_follow_the_micro_batch_not_the_rank(runs, tmp_path):
    """Dropout on: masks are keyed by the micro-batch's place in the global batch (k * W +
    rank), so 2 ranks draw what one process with 2 accumulation steps draws, and the runs agree
    to rounding as without dropout (and differ from the dropout-free run)."""
    _, args = runs
    drop = [*args, "--dropout", "0.3"]
    single(*drop, "--out", str(tmp_path / "one"), "--grad-accum-steps", "2")
    mpirun(2, *drop, "--out", str(tmp_path / "two"))
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert run_of(tmp_path / "one")[2] != run_of(runs[0] / "one_k2")[2]
    # with accumulation on the ranks too: rank r's micro-batch k is global micro-batch
    # k * 2 + r, its rows and its masks (mutation audit: rank-major rows, r * K + k, passed
    # every test, the ones above accumulate on one rank or on none)
    single(*drop, "--out", str(tmp_path / "one_k4"), "--grad-accum-steps", "4")
    mpirun(2, *drop, "--out", str(tmp_path / "two_k2"), "--grad-accum-steps", "2")
    assert_same_run(tmp_path / "two_k2", tmp_path / "one_k4")


def test_zero_and_overlap_are_bitwise_the_unsharded_run(runs):
    d, _ = runs
    assert_bitwise(d / "two_zero", d / "two")
    assert_bitwise(d / "three_zero", d / "three")           # uneven shards: 3 ranks
    assert_bitwise(d / "three_zero_sequential", d / "three_zero")


def test_only_rank_0_writes_and_logs_and_the_checkpoint_is_world_size_independent(runs):
    d, _ = runs
    two, one = d / "two", d / "one_k2"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    state2 = json.loads((two / "ckpt-00000020" / "state.json").read_text())
    state1 = json.loads((one / "ckpt-00000020" / "state.json").read_text())
    assert state2["global_batch"] == state1["global_batch"] == 4
    assert (state2["world_size"], state1["world_size"]) == (2, 1)
    assert state2["rng"] == state1["rng"]  # the data position: one shared stream
    assert state2["tokens_seen"] == state1["tokens_seen"]
    assert set(state2["files"]) == set(state1["files"])


_RECORD_SAVES = """
import os, sys
from cllm_gpu import checkpoint, cli, distributed
save = checkpoint.save_checkpoint
def recording(run_dir, step, *args, **kwargs):
    with open(os.environ["CLLM_TEST_SAVES"], "a") as f:
        f.write(f"rank {distributed.detect_launch().rank} step {step}\\n")
    return save(run_dir, step, *args, **kwargs)
checkpoint.save_checkpoint = recording
sys.exit(cli.main(sys.argv[1:]))
"""


def test_no_rank_but_0_writes_a_checkpoint_a_log_line_or_a_metric(runs, tmp_path):
    """The listing above cannot show who wrote: another rank writing the same checkpoint
    leaves the same files (with every rank saving, only a rename race, now and then, failed
    a run). Each save_checkpoint call is recorded with its rank here; the progress lines and
    metrics.jsonl are one process's."""
    d, args = runs
    out = tmp_path / "r"
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", _RECORD_SAVES, "train",
                        *args, "--out", str(out)], capture_output=True, text=True, timeout=120,
                       env=dict(_env(), CLLM_TEST_SAVES=str(tmp_path / "saves")))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "saves").read_text().splitlines() == ["rank 0 step 10", "rank 0 step 20"]
    assert [ln for ln in p.stdout.splitlines() if ln.startswith("saved ")] == [
        f"saved {out / 'ckpt-00000010'}", f"saved {out / 'ckpt-00000020'}"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == \
        len((d / "one_k2" / "metrics.jsonl").read_text().splitlines())


_POISON_ONE_GRADIENT = """
import sys
import numpy as np
from cllm_gpu import cli, data_parallel
reduce = data_parallel.DataParallel.reduce_gradients
calls = [0]
def poisoned(self, sv):
    # rank 1's gradient of ln_f.bias[-1] made inf at step 3, before the reduction (run with
    # --no-overlap-comm, so no bucket has started yet): the reduced inf lies in rank 1's
    # piece of its bucket, at a shard index unlike its arena index
    calls[0] += 1
    if calls[0] == 3 and self.comm.rank == 1:
        self.model.grads["transformer.ln_f.bias"][-1] = np.inf
    return reduce(self, sv)
data_parallel.DataParallel.reduce_gradients = poisoned
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_nonfinite_gradient_in_one_ranks_shard_is_skipped_and_named_by_every_rank(runs,
                                                                                   tmp_path):
    """One inf gradient element, reduced into one rank's shard: every rank skips the step
    (the parameters still agree at the checkpoints, which compare them), and rank 0, which
    holds none of it, names the parameter (its arena index, not the shard index, gathered
    from the rank that found it). Mutation audit: the first non-finite index taken from this
    rank's shard only, or left a shard index, passed every test."""
    _, args = runs
    out = tmp_path / "r"
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", _POISON_ONE_GRADIENT,
                        "train", *args, "--out", str(out), "--no-overlap-comm",
                        "--on-nonfinite", "skip"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    warnings = [ln for ln in p.stdout.splitlines() if ln.startswith("warning: non-finite")]
    assert len(warnings) == 1 and "at step 3 " in warnings[0], p.stdout
    assert "first non-finite gradient: transformer.ln_f.bias; batch skipped (1/" in warnings[0]
    records = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["type"] == "nonfinite"]
    assert [(r["step"], r["param"]) for r in records] == [(3, "transformer.ln_f.bias")]
    state = json.loads((out / "ckpt-00000020" / "state.json").read_text())
    assert state["nonfinite_skips"] == 1


def test_only_rank_0_prints_the_final_sample(runs, tmp_path):
    """Every rank holds the trained weights, one prints the sample (mutation audit: a sample
    from every rank passed every test, which train with --sample-tokens 0)."""
    _, args = runs
    p = mpirun(2, *args, "--out", str(tmp_path / "r"), "--max-steps", "2",
               "--sample-tokens", "8")
    assert p.stdout.count("--- sample ---") == 1, p.stdout[-3000:]


def test_resume_across_world_sizes_continues_the_same_run(runs):
    d, args = runs
    # 2 -> 1: the 2-rank run's step-10 checkpoint, finished in one process (K 1 -> 2)
    two_then_one = d / "two_then_one"
    shutil.copytree(d / "two", two_then_one)
    shutil.rmtree(two_then_one / "ckpt-00000020")
    single("--resume", str(two_then_one / "ckpt-00000010"))
    assert_same_run(two_then_one, d / "two")
    # ... unless --grad-accum-steps is given again, even with the checkpoint's own value (1):
    # it was taken as not given and changed to 2 all the same
    half = d / "two_then_one_k1"
    shutil.copytree(d / "two", half)
    shutil.rmtree(half / "ckpt-00000020")
    single("--resume", str(half / "ckpt-00000010"), "--grad-accum-steps", "1")
    state = json.loads((half / "ckpt-00000020" / "state.json").read_text())
    assert state["train_config"]["grad_accum_steps"] == 1
    assert state["global_batch"] * 2 == json.loads(
        (d / "two" / "ckpt-00000020" / "state.json").read_text())["global_batch"]
    # 1 -> 3: the one-process run's step-10 checkpoint, finished on 3 ranks (K 3 -> 1)
    one_then_three = d / "one_then_three"
    shutil.copytree(d / "one_k3", one_then_three)
    shutil.rmtree(one_then_three / "ckpt-00000020")
    p = mpirun(3, "--resume", str(one_then_three / "ckpt-00000010"))
    assert "world size 1 -> 3: grad_accum_steps 3 -> 1 keeps the global batch of 6" in p.stdout
    assert_same_run(one_then_three, d / "one_k3")
    assert_same_run(one_then_three, d / "three")


def test_a_zero_run_resumed_on_as_many_ranks_is_bitwise_the_uninterrupted_one(runs):
    """ZeRO-1 resume: each rank takes its own pieces of the checkpoint's full moments
    (mutation audit: every rank loading rank 0's pieces passed every test; the ZeRO load test
    runs at world size 1, where rank 0's pieces are the only ones)."""
    d, _ = runs
    out = d / "two_zero_resumed"
    shutil.copytree(d / "two_zero", out)
    shutil.rmtree(out / "ckpt-00000020")
    metrics = [ln for ln in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(ln)["step"] <= 10]
    (out / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    mpirun(2, "--resume", str(out / "ckpt-00000010"))
    assert_bitwise(out, d / "two_zero")


def test_settings_that_differ_between_ranks_are_refused_with_one_error(runs, tmp_path):
    """...and leave nothing behind, as a refusal in one process does: rank 0 made the new run
    directory (and its parent) before the ranks compared their settings, and left it empty."""
    _, args = runs
    t0 = time.monotonic()
    p = mpirun(2, *args, "--out", str(tmp_path / "new" / "r"), check=False, timeout=60,
               ranks=[[], ["--seed", "7", "--learning-rate", "1e-3"]])
    assert p.returncode == 1 and time.monotonic() - t0 < 30
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    # the error names the settings (it said only "the run's settings differ")
    assert errors == ["error: the run's settings differ between ranks (rank 1 vs rank 0): "
                      "train.learning_rate, train.seed; every rank must be started with the "
                      "same settings, data and checkpoint"], p.stderr
    assert not (tmp_path / "new").exists()


def test_overwrite_refused_for_settings_that_differ_keeps_the_old_run(data, tmp_path):
    """--overwrite discards the run in --out only once every rank's settings agree: rank 0
    discarded it before the ranks compared them, so a job refused for a setting that differs
    (another seed on rank 1) had deleted ckpt-00000002 and metrics.jsonl already."""
    args = COMMON + ["--data", str(data), "--out", str(tmp_path / "r"), "--max-steps", "2"]
    single(*args)
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert "ckpt-00000002" in before and "metrics.jsonl" in before, before
    p = mpirun(2, *args, "--overwrite", check=False, timeout=60, ranks=[[], ["--seed", "7"]])
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: the run's settings differ between ranks (rank 1 vs rank 0): "
                      "train.seed; every rank must be started with the same settings, data and "
                      "checkpoint"], p.stderr
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before


def test_a_setting_that_differs_on_the_last_of_3_ranks_is_refused(runs, tmp_path):
    """Every rank is compared with rank 0, not only rank 1 (mutation audit: comparing the
    first two ranks' digests passed every test, which differ on rank 1 of 2)."""
    _, args = runs
    p = mpirun(3, *args, "--out", str(tmp_path / "r"), check=False, timeout=60,
               ranks=[[], [], ["--seed", "7"]])
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: the run's settings differ between ranks (rank 2 vs rank 0): "
                      "train.seed; every rank must be started with the same settings, data and "
                      "checkpoint"], p.stderr
    assert not list((tmp_path / "r").glob("ckpt-*"))


_NUDGE_RANK_1 = """
import sys
from cllm_gpu import cli, trainer
step = trainer.GpuTrainer.train_step
def nudged(self):
    step(self)
    if self.rank == 1 and self.step == 5:  # weights that no longer agree with rank 0's
        self.model.params["transformer.ln_f.bias"][0] += 1e-3
trainer.GpuTrainer.train_step = nudged
sys.exit(cli.main(sys.argv[1:]))
"""


def test_parameters_that_drift_apart_between_ranks_are_refused_at_the_checkpoint(runs,
                                                                                  tmp_path):
    """The checkpoint compares every rank's parameters before rank 0 writes its own: a rank
    whose weights drifted (a bug, a bad GPU) ends the run with one error and no checkpoint,
    rather than rank 0's weights saved as the run's (mutation audit: without the comparison
    every test passed)."""
    _, args = runs
    out = tmp_path / "r"
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", _NUDGE_RANK_1, "train",
                        *args, "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: the parameters at step 10 differ between ranks (rank 1 vs rank "
                      "0); every rank must be started with the same settings, data and "
                      "checkpoint"], p.stderr
    assert not list(out.glob("ckpt-*"))


_TORN_ON_RANK_0 = """
import sys, time
from pathlib import Path
from cllm_gpu import GpuTrainer, ModelConfig, TrainConfig
from cllm_gpu.errors import CLLMError
cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)
tc = TrainConfig(batch_size=2, max_steps=8, eval_interval=0, log_interval=100,
                 checkpoint_interval=0, final_checkpoint=False, dtype="float64",
                 dist_timeout=20)
t = GpuTrainer(cfg, tc, Path(sys.argv[1]), Path(sys.argv[2]), backend="numpy",
               log=lambda *a: None)
t.train(max_steps=2)
# a second Ctrl-C reaches the ranks at different points, where none waits on another: rank 0
# in step 4's update (torn), rank 1 in step 5's data draw (step 4 done, nothing of 5 begun;
# past the meeting of step 3, the next one far off)
owner, name, at = (t.dp, "adamw_update", 3) if t.rank == 0 else (t.data, "get_batch", 4)
real = getattr(owner, name)
def interrupted(*a, **k):
    if t.step == at:
        if name == "adamw_update":
            real(*a, **k)
        raise KeyboardInterrupt
    return real(*a, **k)
setattr(owner, name, interrupted)
try:
    t.train()
except KeyboardInterrupt:
    pass
setattr(owner, name, real)
for again in (t.train, t.save_checkpoint):
    start = time.monotonic()
    try:
        again()
        print(f"rank {t.rank} {again.__name__}: went on", flush=True)
    except CLLMError as e:
        print(f"rank {t.rank} {again.__name__} {time.monotonic() - start:.0f}s: {e}", flush=True)
"""


def test_a_step_torn_on_one_rank_is_refused_by_every_rank_at_once(data, tmp_path):
    """Python API: a second Ctrl-C left rank 0 in step 4's update (its state not a whole
    step's) and rank 1 after step 4. train() and save_checkpoint() again: rank 0 refused at
    once, rank 1 waited for it in a collective until --dist-timeout and ended 'no progress in
    an all-gather ...: another rank died, hung or was stopped' (default 300 s). Now every rank
    refuses at once, naming rank 0's torn step."""
    out = tmp_path / "r"
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", _TORN_ON_RANK_0,
                        str(data), str(out)], capture_output=True, text=True, timeout=120,
                       env=_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = sorted(p.stdout.splitlines())
    refusal = ("0s: rank 0: step 4 was interrupted during its parameter update: this "
               "trainer's state is not a whole step's; resume from its last checkpoint")
    assert [ln.split(" ", 2)[:2] for ln in lines] == [
        ["rank", "0"], ["rank", "0"], ["rank", "1"], ["rank", "1"]], p.stdout
    for ln, what in zip(lines, ["save_checkpoint", "train"] * 2):
        assert ln.split(" ", 3)[2] == what and refusal in ln, p.stdout
    assert not list(out.glob("ckpt-*"))

def test_an_error_on_one_rank_ends_every_rank(runs, tmp_path):
    _, args = runs
    p = mpirun(2, *args, "--out", str(tmp_path / "r"), check=False, timeout=60,
               ranks=[[], ["--data", str(tmp_path / "missing")]])
    assert p.returncode != 0
    assert "error: rank 1: " in p.stderr and "data directory not found" in p.stderr


def test_a_refusal_on_one_rank_keeps_the_run_overwrite_would_have_replaced(data, token_dir,
                                                                          tmp_path):
    """--overwrite discards the run in --out only once every rank's set-up checks passed, as
    in one process: rank 0 discarded it before the ranks agreed, so rank 1's refusal of its
    data (too short for one block) ended the job with the earlier run already deleted."""
    short = token_dir("alpha beta", "short")
    out = tmp_path / "r"
    args = [*COMMON, "--n-layer", "1", "--max-steps", "2", "--eval-interval", "0",
            "--out", str(out)]
    single(*args, "--data", str(data))
    kept = sorted(p.name for p in out.iterdir())
    assert "ckpt-00000002" in kept and "metrics.jsonl" in kept
    p = mpirun(2, *args, "--overwrite", check=False, timeout=60,
               ranks=[["--data", str(data)], ["--data", str(short)]])
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1: ") \
        and "shorter than one block" in errors[0], p.stderr
    assert sorted(p.name for p in out.iterdir()) == kept


@pytest.mark.parametrize("n", [2, 1])
def test_rank_and_world_size_left_exported_do_not_override_mpiexec(data, tmp_path, n):
    """RANK=0 WORLD_SIZE=2 left exported (from a torchrun-style test) under mpiexec were read as
    a torchrun-style launch: -n 2 was refused on the NumPy path with "start the ranks with
    mpiexec" (on CUDA two rank 0s), -n 1 likewise (on CUDA rank 0 waited for a rank 1 that
    never starts). Not torchrun's (no TORCHELASTIC_RUN_ID): mpiexec's ranks train."""
    out = tmp_path / "r"
    p = mpirun(n, *COMMON, "--data", str(data), "--out", str(out), "--max-steps", "2",
               "--eval-interval", "0", "--checkpoint-interval", "2", timeout=60,
               env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert not [ln for ln in p.stderr.splitlines() if ln.startswith("error")], p.stderr
    state = json.loads((out / "ckpt-00000002" / "state.json").read_text())
    assert state["world_size"] == n


def test_a_bad_command_line_is_one_error_line_and_every_rank_exits_1(runs, tmp_path):
    """Errors of what every rank reads before the trainer (flags, the data directory, the run
    to resume) go through the same agreement as the trainer's set-up: said once, by rank 0,
    and no MPI_Abort (each rank printed its own 'error: rank N: ...' and aborted the job)."""
    _, args = runs
    far = tmp_path / ("d" * 200) / ("e" * 200) / "none"  # the line over 254 bytes: sent whole
    for extra, want in ((["--bucket-mb", "0"], "error: --bucket-mb must be > 0.0, got 0.0"),
                        (["--resume", str(tmp_path / "none")],
                         f"error: {tmp_path / 'none'}: no such checkpoint or run directory"),
                        (["--resume", str(far)],
                         f"error: {far}: no such checkpoint or run directory")):
        p = mpirun(2, *args, "--out", str(tmp_path / "r"), *extra, check=False, timeout=60)
        assert p.returncode == 1, p.stderr
        assert [ln for ln in p.stderr.splitlines() if ln.strip()] == [want], p.stderr
    assert not list((tmp_path / "r").glob("ckpt-*"))


_FAKE_HOST_MEMORY = """
import os, sys
from cllm_gpu import backend, cli
backend.MEMINFO = os.environ["FAKE_MEMINFO"]  # the host's available memory, as the test says
backend.CGROUP_ROOT = backend.SELF_CGROUP = os.environ["FAKE_MEMINFO"] + ".no-cgroup"
sys.exit(cli.main(sys.argv[1:]))
"""


def test_two_ranks_on_one_host_that_together_do_not_fit_both_refuse_in_one_line(data,
                                                                                 tmp_path):
    """mpiexec -n 2 on one host (the NumPy backend), the host's memory 1.5 x what one rank's
    model and step need: every rank passed its own check against it (each counted only its
    own need), then both built their models in the same memory. Now every rank checks its
    share of what the host had before any rank allocated: one line (rank 0's, the same on
    every rank), exit 1, no checkpoint, no rank left waiting. With 2.5 x both ranks train."""
    from cllm_gpu import model as model_mod
    from cllm_gpu.config import ModelConfig
    from cllm_gpu.data import read_meta
    from cllm_gpu.errors import ModelTooLargeError
    cfg = ModelConfig(vocab_size=read_meta(data)["vocab_size"], block_size=16, n_layer=2,
                      n_head=2, n_embd=16)

    def fits(free):
        model_mod.available_memory = lambda xp: free
        try:
            model_mod.check_training_fits(cfg, "float32", "fp32", np, 2, 16, 1, 2, 0)
            return True
        except ModelTooLargeError:
            return False
    real = model_mod.available_memory
    try:
        lo, hi = 0, 1 << 40  # one rank's need: the least memory its check passes
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    finally:
        model_mod.available_memory = real
    meminfo = tmp_path / "meminfo"
    args = [*COMMON, "--data", str(data), "--max-steps", "2", "--eval-interval", "0",
            "--checkpoint-interval", "2"]
    for times, trains in ((1.5, False), (2.5, True)):
        kib = int(hi * times) // 1024
        meminfo.write_text(f"MemTotal: {4 * kib} kB\nMemAvailable: {kib} kB\nSwapFree: 0 kB\n")
        out = tmp_path / f"r{times}"
        p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", _FAKE_HOST_MEMORY,
                            "train", *args, "--out", str(out)], capture_output=True,
                           text=True, timeout=90, env={**_env(), "FAKE_MEMINFO": str(meminfo)})
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        if trains:
            assert p.returncode == 0 and lines == [], p.stderr
            assert (out / "ckpt-00000002").is_dir()
            continue
        assert p.returncode == 1, p.stdout + p.stderr
        assert len(lines) == 1 and lines[0].startswith("error: the model does not fit"), lines
        assert "available to each of the 2 ranks on one host" in lines[0], lines
        assert not list(out.glob("ckpt-*"))


_RAISE_AT_STEP_5 = """
import sys
from cllm_gpu import cli, trainer
step = trainer.GpuTrainer.train_step
def failing(self):
    if self.rank == 1 and self.step == 5:
        raise RuntimeError("simulated fault on rank 1")
    step(self)
trainer.GpuTrainer.train_step = failing
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_rank_that_raises_mid_training_ends_the_job(runs, tmp_path):
    _, args = runs
    t0 = time.monotonic()
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", _RAISE_AT_STEP_5, "train",
                        *args, "--out", str(tmp_path / "r"), "--max-steps", "100000"],
                       capture_output=True, text=True, timeout=90, env=_env())
    assert p.returncode != 0 and time.monotonic() - t0 < 60
    assert "RuntimeError: simulated fault on rank 1" in p.stderr


_SLOW_CHECKPOINT_WRITE = """
import sys, time
from cllm_gpu import checkpoint, cli
save = checkpoint.save_checkpoint
def slow(*args, **kwargs):
    time.sleep(SLOW_S)  # a slow disk (only rank 0 writes)
    return save(*args, **kwargs)
checkpoint.save_checkpoint = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_checkpoint_write_longer_than_the_dist_timeout_does_not_end_the_job(data, tmp_path):
    """Rank 0 writes the checkpoint alone; the other ranks went on to the next step's first
    collective and gave up there after --dist-timeout (and rank 0's own watchdog ended it in
    the write), so a slow disk ended the job. The write is not a hang: the run finishes."""
    args = COMMON + ["--data", str(data)]
    out = tmp_path / "slow"
    script = _SLOW_CHECKPOINT_WRITE.replace("SLOW_S", "6.0")
    t0 = time.monotonic()
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", script, "train", *args,
                        "--out", str(out), "--dist-timeout", "2"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert time.monotonic() - t0 >= 12  # both writes (steps 10 and 20) were slow
    assert sorted(c.name for c in out.glob("ckpt-*")) == ["ckpt-00000010", "ckpt-00000020"]


_FAILING_CHECKPOINT_WRITE = """
import errno, sys
from cllm_gpu import checkpoint, cli
def full(run_dir, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
checkpoint.save_checkpoint = full
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_failed_checkpoint_write_ends_the_ranks_waiting_for_it(data, tmp_path):
    """The other ranks wait for rank 0's write without a time limit: its failure must reach
    them (rank 0 says it in one line; they exit quietly), or a launcher that does not end
    every rank when one fails would leave them waiting for ever."""
    args = COMMON + ["--data", str(data)]
    t0 = time.monotonic()
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", _FAILING_CHECKPOINT_WRITE,
                        "train", *args, "--out", str(tmp_path / "r"), "--dist-timeout", "300"],
                       capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode != 0 and time.monotonic() - t0 < 30
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("error")] == [
        "error: rank 0: No space left on device"], p.stderr

def test_rank_0_failing_to_prepare_the_default_corpus_ends_the_job_at_once(tmp_path):
    """The other ranks wait for the default corpus's meta.json. Rank 0's abort (MPI_Init, then
    MPI_Abort) waited in MPI_Init for them, so the job hung for their 600 s. Rank 0's note
    beside the directory sends them to the same abort: each says one line, the job ends."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "default").write_text("a file where the corpus directory goes")
    t0 = time.monotonic()
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-m", "cllm_gpu", "train",
                        "--backend", "numpy", "--max-steps", "1"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode != 0 and time.monotonic() - t0 < 20
    assert sorted(l for l in p.stderr.splitlines() if l.startswith("error: ")) == [
        "error: rank 0: data/default: is a file, not a data directory (give --data a directory)",
        "error: rank 1: rank 0 failed to prepare the default corpus in data/default; see rank "
        "0's error"]

def test_a_rank_started_after_rank_0_failed_to_prepare_the_default_corpus_ends_too(tmp_path):
    """A rank started late (another node's proxy, a slow start) found rank 0's note older
    than itself, took it for an earlier run's and waited its 600 s, and under mpiexec the job
    with it (rank 0's abort waited in MPI_Init). MPI comes up on every rank before rank 0
    prepares, so its note is always newer than every rank: each says its line, the job ends."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "default").write_text("a file where the corpus directory goes")
    train = [sys.executable, "-m", "cllm_gpu", "train", "--backend", "numpy", "--max-steps", "1"]
    late = ["sh", "-c", "sleep 4; " + " ".join(train)]  # a new process 4 s after rank 0's
    t0 = time.monotonic()
    p = subprocess.run([_mpiexec(), "-n", "1", *train, ":", "-n", "1", *late], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode != 0 and time.monotonic() - t0 < 30
    assert sorted(l for l in p.stderr.splitlines() if l.startswith("error: ")) == [
        "error: rank 0: data/default: is a file, not a data directory (give --data a directory)",
        "error: rank 1: rank 0 failed to prepare the default corpus in data/default; see rank "
        "0's error"]


def _rank_pids(tag, rank):
    """The pids of rank `rank`'s Python processes of the job tagged `tag` (from /proc)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env and b"cllm_gpu" in cmd \
                and f"CLLM_TEST_JOB={tag}".encode() in env:
            found.append(int(p.name))
    return found


# train, then each rank's own exit status on stdout (mpiexec reports one for the job)
_SAYING_ITS_EXIT = """
import os, sys
from cllm_gpu import cli
code = cli.main(sys.argv[1:])
sys.stdout.write(f"rank {os.environ['PMI_RANK']} exits {code}\\n")  # one write: see print_progress
sys.stdout.flush()
sys.exit(code)
"""


def _start_long_run(args, out, extra=(), program=("-m", "cllm_gpu"), ready="ckpt-00000010"):
    """mpiexec -n 2 of a long run, once `ready` (a path in `out`) exists: (the job, rank 1's
    pids)."""
    env = _env()
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    env["CLLM_TEST_JOB"] = tag
    p = subprocess.Popen([_mpiexec(), "-n", "2", sys.executable, *program, "train",
                          *args, "--out", str(out), "--max-steps", "100000", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (out / ready).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / ready).exists(), f"the run did not write {ready}"
    pids = _rank_pids(tag, 1)
    assert pids, "rank 1's process not found"
    p.job_tag = tag  # for _rank_pids of the other ranks
    return p, pids

def _stopped_with_sigterm(p) -> tuple[str, str]:
    """The job's stdout and stderr once it has exited 143 (SIGTERM's status), within 60 s."""
    try:
        stdout, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 143, err[-3000:]
    return stdout, err


def _stopped_at(stdout: str) -> int:
    """The step of the one "stopped at step N; resume with ..." line."""
    stopped = [ln for ln in stdout.splitlines() if ln.startswith("stopped at step ")]
    assert len(stopped) == 1, stdout[-3000:]
    return int(stopped[0].split()[3].rstrip(";"))



def test_kill_9_of_one_rank_ends_the_job_and_resume_loses_only_work_since_the_checkpoint(
        runs, tmp_path):
    d, args = runs
    out = tmp_path / "killed"
    p, pids = _start_long_run(args, out)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    p.communicate(timeout=60)
    assert p.returncode != 0 and time.monotonic() - t0 < 30
    # keep the step-10 checkpoint only (the run may have written more before the kill), then
    # finish on 2 ranks: bitwise the uninterrupted 2-rank run (the lr schedule is fixed by
    # --lr-decay-steps, so the longer --max-steps of the killed run does not change it)
    for c in out.glob("ckpt-*"):
        if c.name != "ckpt-00000010":
            shutil.rmtree(c)
    metrics = [ln for ln in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(ln)["step"] <= 10]
    (out / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    mpirun(2, "--resume", str(out / "ckpt-00000010"), "--max-steps", str(STEPS))
    assert_bitwise(out, d / "two")


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(
        runs, tmp_path):
    """A signal that reaches one rank only (a scheduler's, a user's kill) stops the run where
    the ranks next meet: both leave the loop at the same step and save one checkpoint there
    (mutation audit: the stop decided per rank, or only when every rank had the signal, passed
    every test; the signal tests run one process)."""
    _, args = runs
    out = tmp_path / "sig"
    # no validation pass: a signal in one stops the ranks through the pass's own line
    p, pids = _start_long_run(args, out, ["--dist-timeout", "20", "--eval-interval", "0"],
                              program=("-c", _SAYING_ITS_EXIT))
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    stdout, err = _stopped_with_sigterm(p)
    # every rank exits as the signal says, and rank 0 says why it stops (it said nothing and
    # exited 130, a Ctrl-C's status, as though it had been interrupted)
    assert sorted(ln for ln in stdout.splitlines() if " exits " in ln) == [
        "rank 0 exits 143", "rank 1 exits 143"], stdout[-3000:]
    step = _stopped_at(stdout)
    assert re.search(rf"^step +{step} \| stopping on a signal \(SIGTERM on rank 1\)$", stdout,
                     re.M), stdout[-3000:]
    newest = sorted(c.name for c in out.glob("ckpt-*"))[-1]
    assert newest == f"ckpt-{step:08d}"
    assert json.loads((out / newest / "state.json").read_text())["step"] == step


def test_sigterm_to_one_rank_stops_within_seconds_with_no_progress_line_or_checkpoint_due(
        data, tmp_path):
    """The ranks agreed on a stop only at a progress line, evaluation or checkpoint: with
    --log-interval 100000 and no checkpoint or evaluation due, a SIGTERM to one rank was acted
    on at step 100000, 20 minutes later on this tiny model (a scheduler's SIGKILL follows its
    SIGTERM after 30 s). They now also meet about once a second of training to agree on it."""
    out = tmp_path / "sig"
    args = COMMON + ["--data", str(data), "--log-interval", "100000", "--eval-interval", "0",
                     "--checkpoint-interval", "100000", "--dist-timeout", "20"]
    # metrics.jsonl: step 1's progress line, written once training has begun
    p, pids = _start_long_run(args, out, ready="metrics.jsonl")
    time.sleep(1.5)  # past the first meetings: the steps between them measured
    signalled = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    try:
        stdout, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 143, err[-3000:]
    assert time.monotonic() - signalled < 10
    step = _stopped_at(stdout)
    assert re.search(rf"^step +{step} \| stopping on a signal \(SIGTERM on rank 1\)$", stdout,
                     re.M), stdout[-3000:]
    assert sorted(c.name for c in out.glob("ckpt-*")) == [f"ckpt-{step:08d}"]


def test_sigterm_to_rank_0_alone_is_said_once_by_rank_0_and_saved(data, tmp_path):
    """Rank 0 signalled itself says so when it comes ("received SIGTERM"), and the ranks stop
    at their next meeting with a checkpoint: no "stopping on a signal" line, which names
    another rank's signal (mutation audit: rank 0 saying its own signal again there passed
    every test, which signal rank 1 or every rank)."""
    out = tmp_path / "sig"
    p, _ = _start_long_run(COMMON + ["--data", str(data)], out, ["--dist-timeout", "20"])
    for pid in _rank_pids(p.job_tag, 0):
        os.kill(pid, signal.SIGTERM)
    stdout, err = _stopped_with_sigterm(p)
    assert [ln for ln in stdout.splitlines() if ln.startswith("received SIGTERM")], stdout[-3000:]
    assert "stopping on a signal" not in stdout, stdout[-3000:]
    step = _stopped_at(stdout)
    assert sorted(c.name for c in out.glob("ckpt-*"))[-1] == f"ckpt-{step:08d}"


def test_sigterm_to_the_job_and_its_ranks_at_once_is_one_stop_with_a_checkpoint(data,
                                                                                tmp_path):
    """systemd stopping a unit (every process of its cgroup) or Slurm's scancel signals
    mpiexec and the ranks together, and mpiexec forwards its SIGTERM: each rank got it twice
    within milliseconds, took the second for 'send it again to exit at once', and every rank
    left without a checkpoint (exit 130, the steps since the last one lost)."""
    out = tmp_path / "sig"
    p, rank_1 = _start_long_run(COMMON + ["--data", str(data)], out, ["--dist-timeout", "20"])
    for pid in [p.pid, *_rank_pids(p.job_tag, 0), *rank_1]:
        os.kill(pid, signal.SIGTERM)
    stdout, err = _stopped_with_sigterm(p)
    assert not [ln for ln in err.splitlines() if ln.startswith("error")], err[-3000:]
    step = _stopped_at(stdout)
    newest = sorted(c.name for c in out.glob("ckpt-*"))[-1]
    assert newest == f"ckpt-{step:08d}"


# trains 2 steps, then (rank 0 holding the run directory's lock as another train would)
# trains again with the same trainer: each rank prints what the second train() raised
_TRAINS_AGAIN_WHILE_LOCKED = """
import sys, time
from cllm_gpu import GpuTrainer, ModelConfig, TrainConfig
from cllm_gpu.trainer import lock_run_dir
tr = GpuTrainer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=257),
                TrainConfig(batch_size=2, max_steps=2, eval_interval=0, checkpoint_interval=0,
                            dist_timeout=20), sys.argv[1], sys.argv[2], backend="numpy",
                log=lambda msg: None)
tr.train()
held = lock_run_dir(tr.out_dir) if tr.rank == 0 else None
t0 = time.monotonic()
try:
    tr.train(4)
except Exception as e:
    print(f"rank {tr.rank} in {time.monotonic() - t0:.0f} s: {e}", flush=True)
"""


def test_a_second_train_refused_its_run_directory_ends_every_rank_at_once(data, tmp_path):
    """train() called again re-took the run directory's lock on rank 0 only: refused (another
    train writing there), rank 0 raised and the others waited in the first step's reduction
    until the data-parallel timeout (20 s of a 20 s timeout, 300 s by default)."""
    out = tmp_path / "r"
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", _TRAINS_AGAIN_WHILE_LOCKED,
                        str(data), str(out)], capture_output=True, text=True, timeout=50,
                       env=_env())
    said = sorted(ln for ln in p.stdout.splitlines() if ln.startswith("rank "))
    refusal = f"rank 0: {out}: another train (pid "
    assert [ln[:15] for ln in said] == ["rank 0 in 0 s: ", "rank 1 in 0 s: "], \
        p.stdout + p.stderr[-3000:]
    assert all(ln[15:].startswith(refusal) for ln in said), said


def test_a_hung_rank_ends_the_job_within_the_timeout(runs, tmp_path):
    _, args = runs
    p, pids = _start_long_run(args, tmp_path / "hung", ["--dist-timeout", "3"])
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # alive but silent: no launcher notices
    t0 = time.monotonic()
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and time.monotonic() - t0 < 20
    # rank 0 ends by whichever notices first, its wait or its watchdog, both armed with
    # --dist-timeout: the watchdog counts from the step's last beat, the wait from its own
    # start later in the step, so under load the watchdog can come first (h27e saw it once)
    assert re.search(r"error: rank 0: no progress (in .* for 3 s: another rank died, hung or "
                     r"was stopped|for \d+ s \(in .*; --dist-timeout 3\): another rank died or "
                     r"hung; ending the job)", err), err


# Every eval batch takes 50 ms (a pass of 2,000 batches: 50 s on 2 ranks); rank 1 sends itself
# SIGTERM while it computes its AT_BATCH-th batch of the first pass (3: global batch 5), or at
# the end of training step AT_STEP (0: neither); each rank writes at exit, to COUNTS_DIR/rank-N,
# how many eval batches it computed and how many of the stop-flag gathers it started it read
# (every one must be). A file, not stdout: rank 0's print() writes a line and its newline apart
# (under PYTHONUNBUFFERED), so under load rank 1's line landed between them ("saved
# .../ckpt-00000003rank 1: 4 eval batches, ...") and the test failed on a healthy run (h30q)
_RANK_1_SIGNALLED_IN_A_SLOW_EVALUATION = """
import atexit, os, signal, sys, time
from cllm_gpu import cli, distributed, model, trainer
rank, done, gathers, code = os.environ["PMI_RANK"], [], [0, 0], []
loss_sum = model.CLLMModel.eval_loss_sum
def slow(self, *args, **kwargs):
    done.append(1)
    if rank == "1" and len(done) == AT_BATCH:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    return loss_sum(self, *args, **kwargs)
model.CLLMModel.eval_loss_sum = slow
train_step = trainer.GpuTrainer.train_step
def signalling_step(self):
    train_step(self)
    if rank == "1" and self.step == AT_STEP:
        os.kill(os.getpid(), signal.SIGTERM)
trainer.GpuTrainer.train_step = signalling_step
start_gather = distributed.MPIComm.start_allgather_host
def counted_gather(self, x):
    rows = start_gather(self, x)
    gathers[0] += 1
    def read():
        gathers[1] += 1
        return rows()
    return read
distributed.MPIComm.start_allgather_host = counted_gather
def write_counts():
    with open(os.path.join("COUNTS_DIR", f"rank-{rank}"), "w") as f:
        f.write(f"rank {rank}: {len(done)} eval batches, {gathers[1]} of {gathers[0]} gathers read"
                f", exit {code[0]}")
atexit.register(write_counts)
code.append(cli.main(sys.argv[1:]))
sys.exit(code[0])
"""


def _rank_1_signalled(data, out, eval_batches, at_batch=0, at_step=0, batches_each=4):
    """Train on 2 ranks, rank 1 signalling itself in its `at_batch`-th eval batch of the pass at
    step 3, or at the end of step `at_step` (checkpoints only when stopping). Checks what every
    such run must show (exit on a signal, both ranks `batches_each` eval batches and every
    stop-flag gather read, the one checkpoint of step 3); returns (stdout, the steps of the eval
    records)."""
    counts_dir = out.parent / "counts"
    counts_dir.mkdir()
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-c",
           _RANK_1_SIGNALLED_IN_A_SLOW_EVALUATION.replace("AT_BATCH", str(at_batch))
           .replace("AT_STEP", str(at_step)).replace("COUNTS_DIR", str(counts_dir)),
           "train", *COMMON, "--data", str(data), "--out", str(out), "--max-steps", "100000",
           "--eval-interval", "3", "--eval-batches", str(eval_batches),
           "--checkpoint-interval", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode in (130, 143), p.stdout[-3000:] + p.stderr[-3000:]
    counts = sorted(c.read_text() for c in counts_dir.iterdir())
    # rank 0 too exits as rank 1's SIGTERM says (it exited 130, a Ctrl-C's status)
    assert [ln.split(", ")[-1] for ln in counts] == ["exit 143", "exit 143"], counts
    assert [ln.split(",")[0] for ln in counts] == [
        f"rank 0: {batches_each} eval batches", f"rank 1: {batches_each} eval batches"], counts
    for ln in counts:  # a gather started and never read: an MPI request never completed
        read, _, started = ln.split(", ")[1].split()[:3]
        assert read == started, counts
    assert sorted(c.name for c in out.glob("ckpt-*")) == ["ckpt-00000003"], p.stdout[-3000:]
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return p.stdout, [r["step"] for r in records if r["type"] == "eval"]


def test_a_signal_to_one_rank_during_a_validation_pass_stops_every_rank_at_the_same_batch(
        data, tmp_path):
    """The ranks exchange their stop flags before each round of batches (one each) and read
    them a round later: rank 1's signal in round 2 (global batches 4, 5) is sent at round 3
    and read at round 4, so both leave the pass after 8 batches, 4 each; no val record, one
    checkpoint of that step, within seconds of a pass of 50 s."""
    t0 = time.monotonic()
    out, evals = _rank_1_signalled(data, tmp_path / "run", 2000, at_batch=3)
    assert time.monotonic() - t0 < 30
    assert re.search(r"step\s+3 \| validation abandoned after 8 of 2000 batches \(SIGTERM on "
                     r"rank 1\)", out), out[-3000:]
    assert evals == []
    print(f"{time.monotonic() - t0:.1f} s")


def test_a_signal_to_one_rank_in_the_last_round_of_a_pass_stops_every_rank_after_it(
        data, tmp_path):
    """Rank 1's signal during its last batch of an 8-batch pass (global batch 7): no round is
    left to abandon, so the pass is whole and recorded; the ranks read the flag with the pass's
    sums and stop at that step (before, they trained on to the next progress line, step 5)."""
    out, evals = _rank_1_signalled(data, tmp_path / "run", 8, at_batch=4)
    assert re.search(r"step\s+3 \| stopping on a signal \(SIGTERM on rank 1\) that came too "
                     r"late to abandon the pass", out), out[-3000:]
    assert evals == [3]


def test_a_signal_to_one_rank_in_the_step_before_a_validation_skips_it_on_every_rank(
        data, tmp_path):
    """Rank 1's signal at the end of step 2: at step 3 the ranks agree to stop, and both skip
    that step's pass (by the agreed flag, not each its own: rank 0, whose own flag is unset,
    evaluating while rank 1 saves would pair its stop-flag gather with rank 1's checkpoint
    collectives); no eval batch, no eval record, the checkpoint of step 3 (mutation audit h28ac:
    the skip decided by the rank's own flag passed every test)."""
    out, evals = _rank_1_signalled(data, tmp_path / "run", 2000, at_step=2, batches_each=0)
    assert re.search(r"step\s+3 \| validation skipped: stopping on a signal", out), out[-3000:]
    assert evals == []
