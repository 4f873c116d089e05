import contextlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clihelp import assert_one_line_error, main_in_process, run_cli, strict_json_loads
from lockrace import RacingThread

# a skip for want of a package the dev extra installs (tokenizers) fails CI: tests/conftest.py
pytestmark = pytest.mark.ci_required("dev")

SMALL = ["--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--block-size", 16, "--batch-size", 2,
         "--eval-interval", 0, "--sample-tokens", 0, "--backend", "numpy"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    r = run_cli("prepare", d / "t.txt", "--out", d / "tok")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "unigram entropy" in r.stdout
    return d / "tok"


COMMANDS = ("prepare", "train", "sample", "gradcheck", "eval", "export", "plot")


def test_help_for_every_command():
    for cmd in COMMANDS:
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "usage: cllm-gpu " + cmd in r.stdout
    r = run_cli("--help")
    assert all(c in r.stdout for c in COMMANDS)


def test_every_flag_has_help_with_its_default():
    """--help explains every flag with its default (sample/eval --backend and --seed and the
    gradcheck sizes had no help at all; --max-new-tokens, --top-k, --num-samples, --split,
    --batches and eval's --batch-size said only their default, --tf32, --overwrite and the
    top-level --debug not even that)."""
    import argparse
    import re
    from cllm_gpu.cli import build_parser
    top = build_parser()
    commands = next(a for a in top._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    parsers = [("cllm-gpu", top), *commands.items()]
    missing = [(cmd, a.option_strings or a.dest) for cmd, parser in parsers
               for a in parser._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and ("default" not in (a.help or "") and not a.required or not a.help)]
    assert not missing
    # the help as --help prints it (%(default)s filled in): "default 300" says nothing else
    bare = [(cmd, a.option_strings) for cmd, parser in parsers for a in parser._actions
            if a.help and re.match(r"\(?default\b", parser._get_formatter()._expand_help(a))]
    assert not bare, f"help that gives the default but not what the flag does: {bare}"


@pytest.mark.parametrize("argv", [
    ["train", "--lr", "100"],              # nanoGPT-style --lr: was --lr-decay-steps 100
    ["train", "--learning", "0.1"],        # a prefix of --learning-rate
    ["prepare", "x.txt", "--max", "10"],   # of --max-bytes
    ["sample", "run", "--max-new", "5"],   # of --max-new-tokens
    ["--deb", "train"],                    # of the top-level --debug
])
def test_a_prefix_of_a_flag_is_refused_not_taken_for_it(argv, capsys):
    """A flag is given whole: argparse's default took any unique prefix as the flag it starts,
    so `train --lr 100` silently set --lr-decay-steps to 100 (and `--lr 3e-4` failed naming
    --lr-decay-steps). Now an unknown flag is refused by name, exit 2, before anything runs."""
    from cllm_gpu.cli import build_parser
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unrecognized arguments" in err and argv[-2] in err, err


def test_train_sample_eval_resume(data, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--data", data, "--out", out, "--max-steps", 4, "--log-interval", 2,
                *SMALL)
    assert r.returncode == 0, r.stderr
    assert "using NumPy backend" in r.stdout and "tok/s" in r.stdout
    r = run_cli("train", "--data", data, "--out", out, "--resume", "--max-steps", 6, *SMALL)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "step      6/6" in r.stdout
    r = run_cli("sample", out, "--max-new-tokens", 20, "--prompt", "the", "--backend", "numpy")
    assert r.returncode == 0 and r.stdout.startswith("the"), r.stderr
    r = run_cli("eval", out, "--batches", 2, "--batch-size", 2, "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["step"] == 6 and np.isfinite(rec["loss"])


def test_gradcheck_command():
    r = run_cli("gradcheck", "--samples", 2)
    assert r.returncode == 0, r.stderr
    assert "28 parameter tensors, 56 elements" in r.stdout and "PASS" in r.stdout


def test_gradcheck_command_fails_on_a_wrong_gradient(monkeypatch, capsys):
    """Only passing runs were tested: `cllm-gpu gradcheck` that always said PASS and exited 0
    passed every test. With every GELU backward's dx off by 1e-3 (planted here), it prints
    FAIL, names the mlp.c_fc weights' errors (1e-3 / (2 + 1e-3) in the last block) and exits 1."""
    from cllm_gpu import cli, ops
    from cllm_gpu.model import ops as model_ops
    right = ops.gelu_backward

    def wrong(*a, dx, **kw):
        out = right(*a, dx=dx, **kw)
        dx *= 1.001
        return out
    monkeypatch.setattr(model_ops, "gelu_backward", wrong)
    capsys.readouterr()
    assert cli.main(["gradcheck", "--samples", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("28 parameter tensors, 56 elements: worst relative error")
    assert out[-1].endswith("(FAIL at 1e-06)"), out[-1]
    errors = {line.split()[0]: float(line.split()[-1]) for line in out[:-1]}
    # printed to 3 digits
    assert abs(errors["transformer.h.1.mlp.c_fc.weight"] / (1e-3 / 2.001) - 1) < 2e-3, errors
    assert errors["transformer.ln_f.weight"] < 1e-6
    monkeypatch.setattr(model_ops, "gelu_backward", right)
    assert cli.main(["gradcheck", "--samples", "2"]) == 0  # the same check, the true gradient


def test_gradcheck_holds_no_adam_moments(capsys, monkeypatch):
    """gradcheck built its model with the two Adam moment arenas, which it never reads: a model
    whose weights and gradients fit was refused 'the model does not fit: ... for weights,
    gradients and Adam moments'. The memory is set here between what the default model needs
    without moments and with them: the check runs."""
    import numpy as np

    from cllm_gpu import model
    cfg = model.ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    f64 = np.dtype("float64")
    without = model.parameter_state_bytes(cfg, f64, "fp32", False, adam_moments=False)
    with_moments = model.parameter_state_bytes(cfg, f64, "fp32", False)
    monkeypatch.setattr(model, "available_memory", lambda xp: (without + with_moments) // 2)
    code, err = main_in_process(capsys, "gradcheck", "--samples", 1)
    assert code == 0 and not err, err


def test_gradcheck_fails_on_a_gradient_that_is_not_finite(monkeypatch, capsys):
    """A NaN relative error compared below every tolerance and max() dropped it: with every
    GELU backward's dx NaN (planted here) gradcheck printed 'max rel err 0.00e+00' for the
    mlp.c_fc weights, PASS, exit 0. Now such an element's error is inf: FAIL, exit 1."""
    import numpy as np

    from cllm_gpu import cli, ops
    from cllm_gpu.model import ops as model_ops
    right = ops.gelu_backward

    def nan(*a, dx, **kw):
        out = right(*a, dx=dx, **kw)
        dx *= np.nan
        return out
    monkeypatch.setattr(model_ops, "gelu_backward", nan)
    capsys.readouterr()
    assert cli.main(["gradcheck", "--samples", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("worst relative error inf (FAIL at 1e-06)"), out[-1]
    errors = {line.split()[0]: float(line.split()[-1]) for line in out[:-1]}
    assert errors["transformer.h.1.mlp.c_fc.weight"] == np.inf, errors
    assert errors["transformer.ln_f.weight"] < 1e-6


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", 0], "--batch-size must be >= 1, got 0"),    # was an IndexError traceback
    (["--samples", -2], "--samples must be >= 1, got -2"),        # was a NumPy traceback
    (["--samples", 0], "--samples must be >= 1, got 0"),          # checked nothing: PASS, exit 0
    (["--seed", -1], "--seed must be >= 0, got -1"),              # was a NumPy traceback
    (["--tolerance", "nan"], "--tolerance must be > 0, got nan"),  # nothing could pass it
    (["--tolerance", 0], "--tolerance must be > 0, got 0.0"),
    (["--n-embd", 9], "--n-embd (9) must be divisible by --n-head (2)"),  # said n_embd, n_head
    (["--block-size", 0], "--block-size must be >= 1, got 0"),
])
def test_gradcheck_refuses_bad_values_in_one_line(capsys, flags, message):
    assert _main_one_line_error(capsys, "gradcheck", *flags) == "error: " + message

def _memory_for_activations_of(monkeypatch, cfg, batch: int, T: int, dtype) -> int:
    """Set the memory available to what the activation cache of `batch` sequences of T tokens
    needs (one more sequence does not fit; the model's own check passes); returns it."""
    from cllm_gpu import model
    fits = model.activation_cache_bytes(cfg, batch, T, dtype, dtype, False)
    assert model.activation_cache_bytes(cfg, batch + 1, T, dtype, dtype, False) > fits
    monkeypatch.setattr(model, "available_memory", lambda xp: fits)
    monkeypatch.setattr(model, "check_model_fits", lambda *a, **k: None)  # the model's own
    return fits



def test_gradcheck_refuses_a_batch_whose_activations_pass_the_memory_in_one_line(capsys,
                                                                               monkeypatch):
    """gradcheck checked the token ids of its batch, not the activation cache every loss of
    the check runs in: `gradcheck --batch-size 1000000` (25 GB of float64 activations at the
    default 8 tokens; the ids 0.2 GB) was allocated lazily on a 23 GB machine and filled in the
    forward. The memory is set here to what a batch of 2 needs beside the model: 64 is refused
    naming the batch that fits, a --block-size for which no batch fits names it; 2 runs."""
    import numpy as np

    from cllm_gpu import model
    cfg = model.ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    f64 = np.dtype("float64")
    fits = _memory_for_activations_of(monkeypatch, cfg, 2, 8, f64)
    need = model.activation_cache_bytes(cfg, 64, 8, f64, f64, False)
    assert _main_one_line_error(capsys, "gradcheck", "--batch-size", 64) == (
        f"error: --batch-size 64 at 8 tokens per sequence does not fit: its activation cache "
        f"needs {model.format_bytes(need)}, but {model.format_bytes(fits)} of host memory is "
        f"available (NumPy backend) beside the model; use --batch-size 2 or less")
    assert _main_one_line_error(capsys, "gradcheck", "--batch-size", 1, "--block-size", 64) \
        .endswith("even --batch-size 1 does not fit: use a shorter --block-size")
    code, err = main_in_process(capsys, "gradcheck", "--batch-size", 2, "--samples", 1)
    assert code == 0 and not err, err


@pytest.mark.parametrize("args,pattern", [
    (["--n-embd", 10, "--n-head", 3], r"--n-embd \(10\) must be divisible by --n-head \(3\)$"),
    (["--block-size", 0], r"--block-size must be >= 1"),
    (["--learning-rate", -1], r"--learning-rate must be > 0"),
    (["--seq-len", 64], r"--seq-len \(64\) must be <= --block-size \(16\)$"),
    # without position embeddings too: block_size is the training length (eval may go past it)
    (["--seq-len", 64, "--pos-emb", "none"], r"--seq-len \(64\) must be <= --block-size"),
])
def test_bad_config_one_line_error(data, tmp_path, args, pattern):
    base = ["--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--block-size", 16, "--backend", "numpy"]
    r = run_cli("train", "--data", data, "--out", tmp_path, "--max-steps", 1, *base, *args)
    assert_one_line_error(r, pattern)


@pytest.mark.parametrize("flags,message", [
    # the default run's min_lr (2e-4) was refused as "min_lr (0.0002) must be <= learning_rate
    # (0.0001)": a field the user never typed, no flag named
    (["--learning-rate", "1e-4"], "--min-lr (0.0002) must be <= --learning-rate (0.0001) "
                                  "(--min-lr not given: the default 0.0002)"),
    (["--min-lr", "0.01"], "--min-lr (0.01) must be <= --learning-rate (0.002) "
                           "(--learning-rate not given: the default 0.002)"),
    (["--preset", "shakespeare-char", "--learning-rate", "5e-5"],
     "--min-lr (0.0001) must be <= --learning-rate (5e-05) "
     "(--min-lr not given: the preset shakespeare-char's 0.0001)"),
    (["--preset", "shakespeare-char", "--n-head", "5"],
     "--n-embd (384) must be divisible by --n-head (5) "
     "(--n-embd not given: the preset shakespeare-char's 384)"),
    (["--n-embd", "130"], "--n-embd (130) must be divisible by --n-head (4) "
                          "(--n-head not given: the default 4)"),
    (["--seq-len", "129"], "--seq-len (129) must be <= --block-size (128) "
                           "(--block-size not given: the default 128)"),
    (["--dtype", "float64", "--precision", "bf16"],
     "--precision 'bf16' needs --dtype 'float32' (fp32 master weights)"),
    (["--beta2", "1"], "--beta2 must be < 1.0, got 1.0"),
    (["--dropout", "1"], "--dropout must be < 1.0, got 1.0"),
    (["--vocab-size", str(2**32)], f"--vocab-size must be < 2**32, got {2**32}"),
    (["--on-nonfinite", "never"], "--on-nonfinite must be 'stop' or 'skip', got 'never'"),
    # the flag in place of the first bare word only, not of a value spelled like the field
    # (mutation audit: replacing every one passed every test)
    (["--on-nonfinite", "on_nonfinite"],
     "--on-nonfinite must be 'stop' or 'skip', got 'on_nonfinite'"),
    (["--zero", "2"], "--zero must be 0 or 1, got 2"),
    # was "data vocab_size 257 exceeds the model's vocab_size 100"
    (["--vocab-size", "100"], "{data}/meta.json: the data's vocabulary is 257, more than "
                              "--vocab-size 100: give --vocab-size 257 or more, or leave it out "
                              "(the data's)"),
    # the data's own vocabulary is enough: refused later, for the length (mutation audit:
    # refusing a --vocab-size equal to the data's passed every test)
    (["--vocab-size", "257", "--block-size", "8", "--seq-len", "9"],
     "--seq-len (9) must be <= --block-size (8)"),
])
def test_train_refusals_name_the_flag_and_where_a_value_not_given_came_from(
        data, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    err = _main_one_line_error(capsys, "train", "--data", data, "--out", out, "--backend",
                               "numpy", *flags)
    assert err == "error: " + message.format(data=data) and not out.exists()


def test_a_preset_on_resume_is_noted_as_ignored(tiny_run, tmp_path, capsys):
    """`train --resume RUN --preset shakespeare-char` kept the run's model and settings without
    a word (a model flag given there gets a note): one note now names each preset value not
    used, with the run's; a flag given with it wins and is not named."""
    from cllm_gpu import cli
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tiny_run), "--out", str(tmp_path / "branch"),
                     "--preset", "shakespeare-char", "--max-steps", "1",
                     "--beta2", "0.99"]) == 0
    notes = [l for l in capsys.readouterr().out.splitlines() if "--preset" in l]
    assert notes == [
        "note: --preset shakespeare-char ignored on --resume: the checkpoint's model and "
        "settings are kept, not the preset's --n-layer 6 (1), --n-head 6 (2), --n-embd 384 "
        "(16), --block-size 256 (16), --dropout 0.2 (0.0), --batch-size 64 (2), "
        "--learning-rate 0.001 (0.002), --min-lr 0.0001 (0.0002), --warmup-steps 100 (50), "
        "--lr-decay-steps 5000 (0), --eval-interval 250 (0), --eval-batches 200 (10), "
        "--log-interval 10 (20), --checkpoint-interval 1000 (200); a training flag given again "
        "wins"], notes


def test_resume_refusals_name_the_checkpoints_values(tiny_run, capsys):
    """A flag given on --resume against the checkpoint's other values: the line says which
    value is the checkpoint's (the model's block size is not a flag there)."""
    for flags, message in (
            (["--learning-rate", "1e-4"], "--min-lr (0.0002) must be <= --learning-rate "
                                          "(0.0001) (--min-lr not given: the checkpoint's 0.0002)"),
            (["--seq-len", "32"], "--seq-len (32) must be <= block_size (16) "
                                  "(block_size 16 is the checkpoint's)"),
            (["--seq-len", "32", "--block-size", "64"],
             "--seq-len (32) must be <= block_size (16) (block_size 16 is the checkpoint's; "
             "--block-size 64 is ignored on --resume)")):
        err = _main_one_line_error(capsys, "train", "--resume", tiny_run, "--max-steps", 2,
                                   *flags)
        assert err == "error: " + message
    assert not (tiny_run / "ckpt-00000002").exists()


def test_missing_and_short_data(tmp_path, data):
    assert_one_line_error(run_cli("train", "--data", tmp_path / "none", "--out", tmp_path / "o",
                                  *SMALL), "data directory not found")
    (tmp_path / "s.txt").write_text("tiny")
    run_cli("prepare", tmp_path / "s.txt", "--out", tmp_path / "short")
    assert_one_line_error(run_cli("train", "--data", tmp_path / "short", "--out", tmp_path / "o",
                                  *SMALL), "shorter than one block")
    assert_one_line_error(run_cli("prepare", tmp_path / "nothing.txt", "--out", tmp_path / "x"),
                          "no such file")
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(run_cli("prepare", tmp_path / "empty.txt", "--out", tmp_path / "x"),
                          "empty")


def test_token_ids_out_of_range_in_data(tmp_path, data):
    import shutil
    d = tmp_path / "bad"
    shutil.copytree(data, d)
    meta = json.loads((d / "meta.json").read_text())
    meta["vocab_size"] = 1000  # ids up to 999 allowed by the data...
    (d / "meta.json").write_text(json.dumps(meta))
    a = np.fromfile(d / "val.bin", dtype=np.uint16)
    a[3] = 700
    a.tofile(d / "val.bin")
    # ...but the model's vocab is smaller than the data's
    assert_one_line_error(run_cli("train", "--data", d, "--out", tmp_path / "o", "--vocab-size",
                                  256, *SMALL),
                          "the data's vocabulary is 1000, more than --vocab-size 256")


def test_missing_checkpoint_files(tmp_path, data):
    out = tmp_path / "run"
    assert run_cli("train", "--data", data, "--out", out, "--max-steps", 1, *SMALL).returncode == 0
    (out / "ckpt-00000001" / "model.safetensors").unlink()
    r = run_cli("train", "--data", data, "--out", out, "--resume", "--max-steps", 2, *SMALL)
    assert_one_line_error(r, "no complete, verified checkpoint.*model.safetensors: missing")
    assert_one_line_error(run_cli("sample", tmp_path / "nope", "--backend", "numpy"),
                          "no such checkpoint")


def test_unwritable_output(tmp_path, data):
    import os
    if os.geteuid() == 0:  # root ignores permission bits: use a path under a regular file
        target = tmp_path / "file"
        target.write_text("x")
        out = target / "run"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = ro / "run"
    assert_one_line_error(run_cli("train", "--data", data, "--out", out, *SMALL),
                          "not writable")


def test_a_full_disk_under_metrics_jsonl_is_one_line_naming_it(tmp_path, data, capsys):
    """A write to metrics.jsonl failing (here /dev/full: every write is ENOSPC) said
    'error: : No space left on device': an OSError from a write has no file name."""
    import os
    out = tmp_path / "run"
    out.mkdir()
    os.symlink("/dev/full", out / "metrics.jsonl")
    err = _main_one_line_error(capsys, "train", "--data", data, "--out", out, "--max-steps", 2,
                               *SMALL)
    assert err == (f"error: {out / 'metrics.jsonl'}: cannot write (No space left on device); "
                   f"checkpoints on disk are intact")


def test_output_that_is_a_file(tmp_path, data, capsys):
    """--out naming a file said "output directory is not writable (File exists)"."""
    (tmp_path / "f").write_text("keep me")
    err = _main_one_line_error(capsys, "train", "--data", data, "--out", tmp_path / "f", *SMALL)
    assert err == f"error: {tmp_path / 'f'}: is a file, not a run directory (give --out a directory)"
    assert (tmp_path / "f").read_text() == "keep me"


def test_a_nonfinite_stop_is_one_line_without_numpy_warnings(data, tmp_path):
    """A learning rate that overflows the update stops the run by --on-nonfinite stop; its one
    error line came after seven NumPy RuntimeWarnings (overflow, invalid value), two lines
    each, from the ops that met the non-finite values. --debug still shows them. The line says
    what to do (it named only the checkpoint before 2026-12-02), with the flags' own names."""
    args = ["train", "--data", data, "--out", tmp_path / "run", "--max-steps", 3, *SMALL,
            "--learning-rate", "1e300", "--min-lr", 0, "--warmup-steps", 0]
    assert_one_line_error(run_cli(*args), (
        r"non-finite loss/grad norm at step 2 .*; step not applied, last good state saved to "
        r".*ckpt-0000000\d; to go on, --resume with a lower --learning-rate \(it was 7\.5e\+299 "
        r"at this step\) or a lower --grad-clip \(now 1\); if that stops again at once, the "
        r"weights have "
        r"diverged: resume an earlier checkpoint into another --out; --on-nonfinite skip "
        r"steps over a rare bad batch$"))
    r = run_cli("--debug", *args, "--overwrite")
    assert r.returncode == 1 and "RuntimeWarning: overflow encountered" in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "train", "--data", tmp_path / "none", "--out", tmp_path / "o")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_debug_is_taken_after_the_command_too():
    """`cllm-gpu gradcheck ... --debug` (where a user appends it) was refused by argparse."""
    from cllm_gpu import cli
    from cllm_gpu.errors import ConfigError
    for argv in (["gradcheck", "--n-embd", "7", "--debug"],
                 ["--debug", "gradcheck", "--n-embd", "7"]):
        with pytest.raises(ConfigError, match=r"--n-embd \(7\) must be divisible by --n-head"):
            cli.main(argv)
    assert cli.build_parser().parse_args(["gradcheck"]).debug is False


def test_no_arguments_prints_help():
    r = run_cli()
    assert r.returncode == 2 and "usage" in r.stdout


def test_resume_takes_settings_and_run_dir_from_the_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--data", data, "--out", out, "--max-steps", 2, "--log-interval", 1,
                *SMALL)
    assert r.returncode == 0, r.stderr
    # only the run directory and a new step count: data, batch size, model come from it
    # (run elsewhere: a resume that fell back to the default data would prepare it in cwd)
    r = run_cli("train", "--resume", out, "--max-steps", 3, "--backend", "numpy",
                "--sample-tokens", 0, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2x16 tokens" in r.stdout and f"saved {out / 'ckpt-00000003'}" in r.stdout
    state = json.loads((out / "ckpt-00000003" / "state.json").read_text())
    assert state["train_config"]["batch_size"] == 2 and state["train_config"]["max_steps"] == 3
    # the checkpoint's data, not the default corpus (a byte corpus too: vocab 257 fitted)
    assert Path(state["data"]["dir"]).resolve() == Path(data).resolve()
    assert not (tmp_path / "data").exists()


def test_cuda_errors_become_one_line(monkeypatch, capsys):
    """A CuPy out-of-memory error (raised here by a stand-in class from a `cupy` module) prints
    one line naming the fix; --debug re-raises it."""
    from cllm_gpu import cli

    OutOfMemoryError = type("OutOfMemoryError", (Exception,), {"__module__": "cupy.cuda.memory"})

    def boom(args):
        raise OutOfMemoryError("out of memory to allocate 8589934592 bytes")
    monkeypatch.setattr(cli, "cmd_gradcheck", boom)
    assert cli.main(["gradcheck"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of GPU memory") and "--batch-size" in err[0]
    with pytest.raises(OutOfMemoryError):
        cli.main(["--debug", "gradcheck"])


class _WriteRecorder:
    """A stderr that keeps each write() call apart."""
    def __init__(self):
        self.writes = []
        self.unflushed = False

    def write(self, text):
        self.writes.append(text)
        self.unflushed = True
        return len(text)

    def flush(self):
        self.unflushed = False


@pytest.mark.parametrize("world_size", [1, 2])
def test_error_lines_go_out_in_one_write_each(monkeypatch, world_size):
    """A rank's error line and its newline are one write: print() wrote them apart, and under
    mpiexec, where the ranks' stderr meet in one stream, rank 1's line landed between rank 0's
    text and its newline (the default-corpus MPI test failed 1 run in 6 that way)."""
    from cllm_gpu import cli, distributed
    from cllm_gpu.errors import DataError

    def fail(args):
        raise DataError("no such corpus")
    monkeypatch.setattr(cli, "cmd_gradcheck", fail)
    rank = world_size - 1
    monkeypatch.setattr(cli, "_launch", lambda: distributed.Launch(rank, world_size, rank,
                                                                   world_size, "none"))
    aborted = []
    monkeypatch.setattr(distributed, "abort_job", aborted.append)
    stderr = _WriteRecorder()
    monkeypatch.setattr(sys, "stderr", stderr)
    cli.main(["gradcheck"])
    line = "error: rank 1: no such corpus" if world_size > 1 else "error: no such corpus"
    assert stderr.writes == [line + "\n"]
    # flushed at once: a buffered stderr (a pipe under mpiexec) would hold the line until exit,
    # and abort_job ends the job without flushing it
    assert not stderr.unflushed
    assert aborted == ([1] if world_size > 1 else [])


def test_the_watchdogs_line_goes_out_in_one_write(monkeypatch):
    """Every rank's watchdog may fire at once: its line is one write like the CLI's."""
    from cllm_gpu import distributed
    stderr = _WriteRecorder()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(distributed.os, "_exit", lambda code: (_ for _ in ()).throw(
        SystemExit(code)))
    dog = distributed.Watchdog(3600, rank=3)
    dog.stop()  # its own thread ends; its loop runs here instead, already past the timeout
    dog._thread.join()
    dog.timeout, dog._stop, dog._last = 0.05, threading.Event(), time.monotonic() - 1
    with pytest.raises(SystemExit):
        dog._run()
    assert len(stderr.writes) == 1 and stderr.writes[0].startswith("error: rank 3: no progress")
    assert stderr.writes[0].endswith("ending the job\n")


def test_progress_lines_go_out_in_one_write_each(monkeypatch):
    """A progress line (stdout: "saved ...", the step lines) and its newline are one write,
    flushed: print() wrote them apart under PYTHONUNBUFFERED, and under mpiexec another
    process's line landed between them (the one-rank SIGTERM MPI test failed in CI on
    "saved .../ckpt-00000015rank 1 exits 143")."""
    from cllm_gpu.errors import print_progress
    stdout = _WriteRecorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    print_progress("saved run/ckpt-00000015")
    assert stdout.writes == ["saved run/ckpt-00000015\n"] and not stdout.unflushed


def test_new_run_refuses_a_directory_with_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--data", data, "--out", out, "--max-steps", 2, *SMALL).returncode == 0
    assert_one_line_error(run_cli("train", "--data", data, "--out", out, "--max-steps", 1, *SMALL),
                          "already holds checkpoints.*--resume.*--overwrite")
    r = run_cli("train", "--data", data, "--out", out, "--max-steps", 1, "--overwrite", *SMALL)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000001"]
    assert_one_line_error(run_cli("train", "--data", data, "--out", out, "--resume", "--overwrite",
                                  *SMALL), "exclude each other")


def test_tf32_flag_sets_cupy_tf32_before_training(data, tmp_path):
    import os
    from cllm_gpu import cli
    saved = os.environ.pop("CUPY_TF32", None)
    try:
        rc = cli.main(["train", "--data", str(data), "--out", str(tmp_path / "r"),
                       "--max-steps", "1", "--tf32", *map(str, SMALL)])
        assert rc == 0 and os.environ.get("CUPY_TF32") == "1"
    finally:  # (monkeypatch.delenv of a variable the test itself set would restore it)
        os.environ.pop("CUPY_TF32", None)
        if saved is not None:
            os.environ["CUPY_TF32"] = saved


def test_cuda_graph_flag(data, tmp_path):
    from cllm_gpu import TrainConfig
    from cllm_gpu.cli import _train_config, build_parser
    from cllm_gpu.errors import ConfigError
    parse = lambda *a: build_parser().parse_args(["train", *a])  # noqa: E731
    assert _train_config(parse("--cuda-graph"), None).cuda_graph is True
    assert _train_config(parse(), None).cuda_graph is False
    # on --resume the checkpoint's value holds unless the flag is given either way
    assert _train_config(parse(), {"cuda_graph": True}).cuda_graph is True
    assert _train_config(parse("--no-cuda-graph"), {"cuda_graph": True}).cuda_graph is False
    with pytest.raises(ConfigError, match="cuda_graph must be true or false"):
        TrainConfig(cuda_graph="yes")
    with pytest.raises(ConfigError, match="cuda_graph"):
        TrainConfig.from_dict({"cuda_graph": 1})
    assert "--cuda-graph" in run_cli("train", "--help").stdout
    r = run_cli("train", "--data", data, "--out", tmp_path, "--max-steps", 2, "--cuda-graph",
                *SMALL)
    assert r.returncode == 0, r.stderr
    assert sum("cuda_graph: ignored on the NumPy backend" in l
               for l in r.stdout.splitlines()) == 1


def test_attention_bias_without_positions_trains_and_evaluates_past_block_size(data, tmp_path):
    """--attn-bias / --pos-emb reach the model and state.json; eval --seq-len may exceed the
    block size without learned positions and is refused, in one line, with them."""
    out = tmp_path / "bias"
    r = run_cli("train", "--data", data, "--out", out, "--max-steps", 2, *SMALL,
                "--attn-bias", "lattice", "--pos-emb", "none")
    assert r.returncode == 0, r.stderr
    assert "attn_bias lattice, pos_emb none" in r.stdout
    state = json.loads((out / "ckpt-00000002" / "state.json").read_text())
    assert state["model_config"]["attn_bias"] == "lattice"
    assert state["model_config"]["pos_emb"] == "none"
    r = run_cli("eval", out, "--seq-len", 48, "--batches", 1, "--batch-size", 2,
                "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == 2 * 48
    r = run_cli("sample", out, "--max-new-tokens", 5, "--prompt", "the", "--backend", "numpy")
    assert r.returncode == 0 and r.stdout.startswith("the"), r.stderr

    learned = tmp_path / "learned"
    r = run_cli("train", "--data", data, "--out", learned, "--max-steps", 1, *SMALL,
                "--attn-bias", "alibi")
    assert r.returncode == 0, r.stderr
    assert_one_line_error(run_cli("eval", learned, "--seq-len", 48, "--backend", "numpy"),
                          r"--seq-len 48 exceeds the model's block_size 16.*--pos-emb none")
    assert_one_line_error(run_cli("eval", learned, "--seq-len", -1, "--backend", "numpy"),
                          r"--seq-len must be >= 0")


def test_gradcheck_command_with_attention_bias():
    r = run_cli("gradcheck", "--samples", 2, "--attn-bias", "alibi", "--pos-emb", "none")
    assert r.returncode == 0, r.stderr
    assert "27 parameter tensors" in r.stdout and "PASS" in r.stdout


def test_gradcheck_command_checks_the_model_with_the_bias_asked_for(monkeypatch, capsys):
    """--attn-bias reaches the model gradcheck checks. Mutation audit: gradcheck building its
    model without --attn-bias (the unbiased model, every gradient still right) printed PASS
    and passed the test above, which can only see --pos-emb (27 tensors: no wpe)."""
    from cllm_gpu import cli
    from cllm_gpu import gradcheck as gc
    checked, real = [], gc.gradcheck_model

    def recording(cfg, **kw):
        checked.append(cfg)
        return real(cfg, **kw)
    monkeypatch.setattr(gc, "gradcheck_model", recording)
    assert cli.main(["gradcheck", "--samples", "2", "--attn-bias", "lattice"]) == 0
    assert [(c.attn_bias, c.pos_emb) for c in checked] == [("lattice", "learned")]
    assert capsys.readouterr().out.splitlines()[-1].startswith("28 parameter tensors")


def test_gradcheck_command_checks_the_model_with_the_dropout_asked_for(monkeypatch, capsys):
    """--dropout reaches the model gradcheck checks (its differences then go through one
    fixed set of masks: gradcheck_model), as --attn-bias and --pos-emb do: the command had no
    --dropout, so of the three model options only dropout's gradient could not be checked from
    the command line. A value out of [0, 1) is refused in one line naming the flag."""
    from cllm_gpu import cli
    from cllm_gpu import gradcheck as gc
    checked, real = [], gc.gradcheck_model

    def recording(cfg, **kw):
        checked.append(cfg)
        return real(cfg, **kw)
    monkeypatch.setattr(gc, "gradcheck_model", recording)
    assert cli.main(["gradcheck", "--samples", "2", "--dropout", "0.3", "--attn-bias",
                     "alibi"]) == 0
    assert [(c.dropout, c.attn_bias) for c in checked] == [(0.3, "alibi")]
    assert "(PASS at 1e-06)" in capsys.readouterr().out.splitlines()[-1]
    assert cli.main(["gradcheck", "--dropout", "1"]) == 1
    assert capsys.readouterr().err.strip() == "error: --dropout must be < 1.0, got 1.0"


def test_sample_stops_at_end_of_text_unless_asked_not_to(data, tmp_path):
    """A checkpoint of a model that always predicts end-of-text: `sample` prints the prompt
    alone; with --no-stop-at-eot the end-of-text tokens come out as <|endoftext|>."""
    from cllm_gpu import CLLMModel, ModelConfig
    from cllm_gpu.checkpoint import save_checkpoint
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    sd = CLLMModel(cfg, backend="numpy").state_dict()
    sd["transformer.ln_f.bias"][:] = 1.0
    sd["transformer.wte.weight"][256] = 5.0
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    save_checkpoint(tmp_path / "run", 0, sd, zeros, zeros,
                    {"model_config": cfg.to_dict(), "dtype": "float32",
                     "data": {"dir": str(data)}})
    args = ("sample", tmp_path / "run", "--prompt", "the", "--max-new-tokens", 3,
            "--backend", "numpy")
    r = run_cli(*args)
    assert r.returncode == 0 and r.stdout == "the\n", r.stderr
    r = run_cli(*args, "--no-stop-at-eot")
    assert r.returncode == 0 and r.stdout == "the" + "<|endoftext|>" * 3 + "\n", r.stderr


def test_prepare_with_a_tokenizer_file_then_sample_decodes_with_it(tmp_path):
    """prepare --tokenizer PATH (a tokenizer.json built here, offline); a model trained on the
    data samples text decoded by that tokenizer."""
    tk = pytest.importorskip("tokenizers")
    words = "tokenizers from users carry their own words and merges. "
    tok = tk.ByteLevelBPETokenizer()
    tok.train_from_iterator([words] * 40, vocab_size=300, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save(str(tmp_path / "user.json"))
    (tmp_path / "corpus.txt").write_text(words * 60)
    r = run_cli("prepare", tmp_path / "corpus.txt", "--tokenizer", tmp_path / "user.json",
                "--out", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    eot = tok.token_to_id("<|endoftext|>")
    assert f"(file; end-of-text id {eot})" in r.stdout
    r = run_cli("train", "--data", tmp_path / "tok", "--out", tmp_path / "run", "--max-steps", 3,
                "--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--block-size", 16,
                "--batch-size", 2, "--eval-interval", 0, "--sample-tokens", 0,
                "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    r = run_cli("sample", tmp_path / "run", "--prompt", "users carry", "--temperature", 0,
                "--max-new-tokens", 8, "--backend", "numpy", "--no-stop-at-eot")
    assert r.returncode == 0, r.stderr
    # the same greedy continuation, decoded here with the user's file
    from cllm_gpu import CLLMModel, ModelConfig
    from cllm_gpu import checkpoint as ckpt
    from cllm_gpu.sampling import sample_tokens
    ck, state, _ = ckpt.find_resumable(tmp_path / "run")
    model = CLLMModel(ModelConfig.from_dict(state["model_config"]), backend="numpy")
    model.load_state_dict(ckpt.load_model_params(ck, model.specs, state))
    user = tk.Tokenizer.from_file(str(tmp_path / "user.json"))
    prompt = user.encode("users carry").ids
    new = sample_tokens(model, prompt, 8, 0.0)[len(prompt):]
    assert r.stdout == "users carry" + user.decode(new, skip_special_tokens=False) + "\n"


def test_padded_vocab_size_flag(data, tmp_path):
    """--padded-vocab-size: recorded in state.json, kept on --resume; below the vocabulary it
    is a one-line error."""
    out = tmp_path / "run"
    r = run_cli("train", "--data", data, "--out", out, "--max-steps", 2, "--padded-vocab-size",
                320, *SMALL)
    assert r.returncode == 0, r.stderr
    assert "vocab 257 (padded to 320)" in r.stdout
    r = run_cli("train", "--resume", out, "--max-steps", 3, *SMALL)
    assert r.returncode == 0 and "vocab 257 (padded to 320)" in r.stdout, r.stderr
    state = json.loads((out / "ckpt-00000003" / "state.json").read_text())
    assert state["model_config"]["padded_vocab_size"] == 320
    assert_one_line_error(run_cli("train", "--data", data, "--out", tmp_path / "x",
                                  "--padded-vocab-size", 100, *SMALL),
                          r"--padded-vocab-size \(100\) must be >= --vocab-size \(257\) "
                          r"\(--vocab-size not given: .*meta\.json's 257\)")


def test_shakespeare_char_preset_sets_nanogpts_config_and_flags_win(data, tmp_path):
    """--preset shakespeare-char: nanoGPT's values reach ModelConfig and TrainConfig (read back
    from state.json); flags given with it win; a run without it keeps the defaults."""
    out = tmp_path / "preset"
    r = run_cli("train", "--preset", "shakespeare-char", "--data", data, "--out", out,
                "--max-steps", 2, *SMALL, "--eval-batches", 1)
    assert r.returncode == 0, r.stderr
    state = json.loads((out / "ckpt-00000002" / "state.json").read_text())
    mc, tc = state["model_config"], state["train_config"]
    assert (mc["n_layer"], mc["n_head"], mc["n_embd"], mc["block_size"]) == (1, 2, 16, 16)
    assert mc["dropout"] == 0.2
    assert (tc["batch_size"], tc["max_steps"], tc["eval_interval"]) == (2, 2, 0)  # given
    assert (tc["learning_rate"], tc["min_lr"], tc["warmup_steps"], tc["lr_decay_steps"],
            tc["beta2"], tc["weight_decay"], tc["grad_clip"], tc["eval_batches"]) == \
        (1e-3, 1e-4, 100, 5000, 0.99, 0.1, 1.0, 1)
    from cllm_gpu.cli import PRESETS, build_parser, _model_args
    args = build_parser().parse_args(["train", "--preset", "shakespeare-char"])
    assert _model_args(args) == dict(n_layer=6, n_head=6, n_embd=384, block_size=256,
                                     dropout=0.2) == PRESETS["shakespeare-char"][0]
    plain = _model_args(build_parser().parse_args(["train"]))
    assert plain["dropout"] == 0.0 and plain["n_layer"] == 4
    r = run_cli("train", "--preset", "nope", "--data", data)
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr


@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory):
    """A one-step run, trained in this process (no interpreter start-up)."""
    from cllm_gpu import cli
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert cli.main(["train", "--data", str(data), "--out", str(out), "--max-steps", "1",
                     *map(str, SMALL)]) == 0
    return out


def _main_one_line_error(capsys, *argv):
    """cli.main in this process: exit status 1 and one `error: ...` line on stderr."""
    code, err = main_in_process(capsys, *argv)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


@pytest.mark.parametrize("args,message", [
    (["eval", "--batches", 0], "--batches must be >= 1, got 0"),         # was ZeroDivisionError
    (["eval", "--batches", -1], "--batches must be >= 1, got -1"),
    (["eval", "--batch-size", 0], "--batch-size must be >= 1, got 0"),   # was a NumPy traceback
    (["eval", "--seed", -1], "--seed must be >= 0, got -1"),             # was a NumPy traceback
    (["sample", "--seed", -1], "--seed must be >= 0, got -1"),
    (["sample", "--temperature", "nan"], "--temperature must be >= 0, got nan"),  # a traceback
    # was accepted (train refuses it): top-k ignored, a tokenizer's gaps a NaN traceback
    (["sample", "--temperature", "inf"], "--temperature must be finite, got inf"),
    (["sample", "--top-k", 0], "--top-k must be >= 1, got 0"),
    (["sample", "--num-samples", 0], "--num-samples must be >= 1, got 0"),  # printed nothing, 0
    (["sample", "--max-new-tokens", -1], "--max-new-tokens must be >= 0, got -1"),
    # argv bytes that are not UTF-8 come as surrogates (was a UnicodeEncodeError traceback)
    (["sample", "--prompt", "ab\udcff"], "the prompt is not UTF-8 text: byte 0xff at character 2"),
])
def test_sample_and_eval_refuse_bad_values_in_one_line(tiny_run, capsys, args, message):
    cmd, *flags = args
    err = _main_one_line_error(capsys, cmd, tiny_run, "--backend", "numpy", *flags)
    assert err == "error: " + message


# Batches past any array (2**63 bytes): NumPy's ValueError ("Maximum allowed dimension
# exceeded" at B >= 2**63, "array is too big" below it) was a traceback; found by argv fuzzing.
# eval's activation check (below) refuses them first now, before any array is made.
@pytest.mark.parametrize("flags", [["--batch-size", 2**63], ["--batch-size", 2**60]])
def test_eval_refuses_a_batch_larger_than_any_array_in_one_line(tiny_run, capsys, flags):
    err = _main_one_line_error(capsys, "eval", tiny_run, "--backend", "numpy", *flags)
    assert err.startswith(f"error: --batch-size {flags[1]:,} at 16 tokens per sequence does "
                          f"not fit") and re.search(r"; use --batch-size \d+ or less and "
                                                    r"--batches \d+ for", err), err


def test_eval_refuses_a_batch_past_the_host_memory_in_one_line(tiny_run, capsys, monkeypatch):
    """A batch whose token ids alone exceed the host memory available (--batch-size 2**31 on a
    24 GB machine) was built one window at a time for minutes, then killed by the kernel's
    OOM killer: no line at all. Found by argv fuzzing. The memory available is set here: 100 kB,
    and 10,000 windows of 2 tokens need 240 kB (with the model's int32 copies)."""
    from cllm_gpu import data
    monkeypatch.setattr(data, "available_memory", lambda xp: 100_000)
    err = _main_one_line_error(capsys, "eval", tiny_run, "--backend", "numpy", "--batches", 1,
                               "--seq-len", 1, "--batch-size", 10_000)
    assert err == ("error: a batch of 10,000 sequences of 2 tokens needs 240.0 kB for its "
                   "token ids alone, more than the host memory available (100.0 kB); use a smaller "
                   "--batch-size (in training: --batch-size x --grad-accum-steps x the ranks on one "
                   "host)")
    monkeypatch.setattr(data, "available_memory", lambda xp: 240_000)  # just enough:
    # 10,000 int64 windows of 2 ids and the model's int32 idx and targets of 1
    code, err = main_in_process(capsys, "eval", tiny_run, "--backend", "numpy", "--batches", 1,
                                "--seq-len", 1, "--batch-size", 10_000)
    assert code == 0 and not err


def test_eval_refuses_a_batch_whose_activations_pass_the_memory_in_one_line(tiny_run, capsys,
                                                                          monkeypatch):
    """The activation cache of an eval batch is checked against the memory available before it
    is allocated: `eval RUN --batch-size 100000` (26 GB of activations at 128 tokens on a 24 GB
    machine, its token ids only 0.1 GB) allocated NumPy's arrays lazily and swapped or met the
    out-of-memory killer in the forward. The memory is set here to what a batch of 8 sequences
    of 4 tokens needs: 64 are refused with the batch that fits and --batches for the same
    tokens; 8 run."""
    import numpy as np

    from cllm_gpu import model
    cfg = model.ModelConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=16, block_size=16)
    f32 = np.dtype("float32")
    fits = _memory_for_activations_of(monkeypatch, cfg, 8, 4, f32)
    err = _main_one_line_error(capsys, "eval", tiny_run, "--backend", "numpy", "--seq-len", 4,
                               "--batch-size", 64, "--batches", 2)
    need = model.activation_cache_bytes(cfg, 64, 4, f32, f32, False)
    assert err == (f"error: --batch-size 64 at 4 tokens per sequence does not fit: its "
                   f"activation cache needs {model.format_bytes(need)}, but {model.format_bytes(fits)} of host memory is available (NumPy backend) "
                   f"beside the model; use --batch-size 8 or less and --batches 16 for about "
                   f"the same tokens")
    code, err = main_in_process(capsys, "eval", tiny_run, "--backend", "numpy", "--seq-len", 4,
                                "--batch-size", 8, "--batches", 2)
    assert code == 0 and not err, err


def test_sample_prints_on_a_stdout_that_cannot_encode_its_text(tiny_run):
    """stdout in an encoding other than UTF-8 (a Latin-1 locale; a file on Windows, cp1252;
    here PYTHONIOENCODING=latin-1): a sample of a byte model holds U+FFFD for the bytes that are
    no UTF-8, and print() was a UnicodeEncodeError traceback, exit 1. Now what the encoding
    cannot hold prints as '?'."""
    r = run_cli("sample", tiny_run, "--backend", "numpy", "--max-new-tokens", 60,
                env={"PYTHONIOENCODING": "latin-1"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "?" in r.stdout
    # train's final sample too (the run, already saved, exited 1 at its last line)
    r = run_cli("train", "--resume", tiny_run, "--out", tiny_run.parent / "latin1",
                "--max-steps", 1, "--sample-tokens", 60, env={"PYTHONIOENCODING": "latin-1"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "?" in r.stdout.split("--- sample ---")[1]


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_paths_that_are_not_utf8_print_on_any_stdout(tmp_path, encoding):
    """A directory named with a byte that is not UTF-8 (b'\\xff', the str '\\udcff' in Python)
    on a stdout whose errors are 'strict' (PYTHONIOENCODING, a Latin-1 or ASCII locale, and
    UTF-8 in any locale but C.UTF-8): prepare's, export's and plot's lines naming it, and
    train's "saved" line, were UnicodeEncodeError tracebacks, exit 1 (train's ended the run at
    its first checkpoint). Now the byte prints as stderr prints it, \\udcff."""
    base = Path(os.fsdecode(bytes(tmp_path) + b"/nu\xff"))
    base.mkdir()
    (base / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    env = {"PYTHONIOENCODING": encoding}
    escaped = str(base).encode("ascii", "backslashreplace").decode()
    for args, said in (
            (["prepare", base / "t.txt", "--out", base / "tok"], f"wrote {escaped}/tok"),
            (["train", "--data", base / "tok", "--out", base / "run", "--max-steps", 2,
              "--checkpoint-interval", 1, *SMALL], f"saved {escaped}/run/ckpt-00000002"),
            (["export", base / "run", "--hf", base / "hf"], f"{escaped}/hf"),
            (["plot", base / "run", "--out", base / "c.png"], f"wrote {escaped}/c.png")):
        r = run_cli(*args, env=env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args[0], r.stderr)
        assert said in r.stdout, (args[0], r.stdout)
    assert (base / "run" / "ckpt-00000002").is_dir() and (base / "c.png").is_file()


def test_sample_and_eval_hold_no_adam_moments(tiny_run, capsys, monkeypatch):
    """sample and eval built the model with the two Adam moment arenas, which they never read:
    on a GPU 2/5 of the parameter state's memory taken for nothing, and a model whose weights
    fit was refused "the model does not fit: ... for weights, gradients and Adam moments ...;
    use a smaller model (--n-layer, --n-embd)", flags neither command has. The memory is set
    here between what the model needs without moments and with them: both commands run. Below
    that, the refusal names the checkpoint rather than train's flags."""
    import numpy as np

    from cllm_gpu import model
    cfg = model.ModelConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=16, block_size=16)
    f32 = np.dtype("float32")
    without = model.parameter_state_bytes(cfg, f32, "fp32", False, adam_moments=False)
    with_moments = model.parameter_state_bytes(cfg, f32, "fp32", False)
    memory = (without + with_moments) // 2
    monkeypatch.setattr(model, "available_memory", lambda xp: memory)
    sample = ["sample", tiny_run, "--backend", "numpy", "--max-new-tokens", 1]
    evaluate = ["eval", tiny_run, "--backend", "numpy", "--batches", 1, "--batch-size", 1,
                "--seq-len", 1]
    for argv in (sample, evaluate):
        code, err = main_in_process(capsys, *argv)
        assert code == 0 and not err, err
    memory = without - 1
    for argv in (sample, evaluate):
        err = _main_one_line_error(capsys, *argv)
        assert err == (f"error: the model does not fit: {cfg.num_params():,} parameters need "
                       f"{model.format_bytes(without)} for weights, gradients (float32), but "
                       f"{model.format_bytes(memory)} of host memory is available (NumPy "
                       f"backend); it is the model of {tiny_run / 'ckpt-00000001'}: sample "
                       f"or evaluate it where more memory is free"), err


@pytest.mark.parametrize("flags", [["--batch-size", 2**63], ["--grad-accum-steps", 2**63]])
def test_train_refuses_a_batch_larger_than_any_array_in_one_line(data, tmp_path, capsys, flags):
    err = _main_one_line_error(capsys, "train", "--data", data, "--out", tmp_path / "run",
                               "--max-steps", 1, *SMALL, *flags)
    assert err.startswith("error: a batch of ") and "use a smaller --batch-size" in err


@pytest.mark.parametrize("size", [2**63, 2**62])
def test_gradcheck_refuses_a_batch_larger_than_any_array_in_one_line(capsys, size):
    err = _main_one_line_error(capsys, "gradcheck", "--batch-size", size)
    assert err.startswith("error: a batch of ") and "use a smaller --batch-size" in err


@pytest.mark.parametrize("flags", [["--batch-size", 2**60], ["--grad-accum-steps", 2**60]])
def test_train_refuses_a_batch_too_large_before_overwrite_discards_the_old_run(
        data, tmp_path, capsys, flags):
    """The batch-size refusal came at the first step, after --overwrite had already deleted
    the checkpoints and metrics of the run in --out: a typo in --batch-size cost the old run.
    Now it comes before the run directory is touched, as a model too large for the memory."""
    from cllm_gpu import cli
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--out", str(out), "--max-steps", "1",
                     *map(str, SMALL)]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert any(n.startswith("ckpt-") for n in before) and "metrics.jsonl" in before
    capsys.readouterr()
    err = _main_one_line_error(capsys, "train", "--data", data, "--out", out, "--overwrite",
                               "--max-steps", 1, *SMALL, *flags)
    assert err.startswith("error: a batch of ") and "use a smaller --batch-size" in err
    assert sorted(p.name for p in out.iterdir()) == before
    # a fresh --out: nothing created either
    _main_one_line_error(capsys, "train", "--data", data, "--out", tmp_path / "new",
                         "--max-steps", 1, *SMALL, *flags)
    assert not (tmp_path / "new").exists()


def test_train_refuses_bad_sampling_flags_before_training(data, tmp_path, capsys):
    """--temperature / --top-k of the final sample were checked only after the whole run (which
    then exited 1); now before the first step, with nothing written."""
    out = tmp_path / "run"
    for flags, message in ((["--top-k", 0], "--top-k must be >= 1, got 0"),
                           (["--temperature", -1], "--temperature must be >= 0, got -1.0")):
        err = _main_one_line_error(capsys, "train", "--data", data, "--out", out,
                                   "--max-steps", 1, *SMALL, "--sample-tokens", 5, *flags)
        assert err == "error: " + message and not out.exists()
    # the prompt too (here: argv bytes that are not UTF-8; it failed after the run)
    err = _main_one_line_error(capsys, "train", "--data", data, "--out", out, "--max-steps", 1,
                               *SMALL, "--sample-tokens", 5, "--prompt", "\udcc3(")
    assert err == "error: the prompt is not UTF-8 text: byte 0xc3 at character 0"
    assert not out.exists()
    # these failed only after the whole run too: a data directory whose tokenizer cannot be
    # loaded; a negative --sample-tokens was taken as none
    import shutil
    no_tokenizer = tmp_path / "bpe-data"
    shutil.copytree(data, no_tokenizer)
    meta = json.loads((no_tokenizer / "meta.json").read_text())
    (no_tokenizer / "meta.json").write_text(json.dumps({**meta, "tokenizer": "bpe"}))
    for flags, message in (
            (["--data", no_tokenizer], f"{no_tokenizer / 'tokenizer.json'}: tokenizer file missing"),
            (["--sample-tokens", -1], "--sample-tokens must be >= 0, got -1")):
        err = _main_one_line_error(capsys, "train", "--data", data, "--out", out,
                                   "--max-steps", 1, *SMALL, "--sample-tokens", 5, *flags)
        assert err == "error: " + message and not out.exists()
    # with no final sample the prompt is not checked (--temperature and --top-k are: state.json
    # records them, test_train_refuses_sampling_flags_its_checkpoints_could_not_hold)
    from cllm_gpu import cli
    assert cli.main(["train", "--data", str(data), "--out", str(out), "--max-steps", "1",
                     *map(str, SMALL), "--prompt", "\udcc3("]) == 0


def test_train_refuses_sampling_flags_its_checkpoints_could_not_hold(data, tmp_path, capsys):
    """With --sample-tokens 0, --temperature and --top-k went unchecked (no sample to draw)
    but were recorded in state.json's final_sample, which a --resume checks: a top_k of 0 or a
    negative temperature there, or an infinite one (JSON null; accepted even with a sample),
    and every checkpoint of the run was refused ('no complete, verified checkpoint'). Now
    refused before the first step, with nothing written, whatever --sample-tokens."""
    from cllm_gpu import cli
    out = tmp_path / "run"
    for flags, message in ((["--top-k", 0], "--top-k must be >= 1, got 0"),
                           (["--temperature", -1], "--temperature must be >= 0, got -1.0"),
                           (["--temperature", "nan"], "--temperature must be >= 0, got nan"),
                           (["--temperature", "inf"], "--temperature must be finite, got inf")):
        for tokens in (0, 5):
            err = _main_one_line_error(capsys, "train", "--data", data, "--out", out,
                                       "--max-steps", 1, *SMALL, "--sample-tokens", tokens,
                                       *flags)
            assert err == "error: " + message and not out.exists()
    # what is recorded resumes; a bad value given on the resume is refused as well
    assert cli.main(["train", "--data", str(data), "--out", str(out), "--max-steps", "1",
                     *map(str, SMALL), "--top-k", "3", "--temperature", "0"]) == 0
    assert cli.main(["train", "--resume", str(out), "--max-steps", "2"]) == 0
    err = _main_one_line_error(capsys, "train", "--resume", out, "--max-steps", 3,
                               "--top-k", 0)
    assert err == "error: --top-k must be >= 1, got 0"
    assert cli.main(["train", "--resume", str(out), "--max-steps", "3"]) == 0


def test_train_refuses_a_prompt_its_tokenizer_cannot_encode_before_training(tmp_path, capsys):
    """A final-sample --prompt the data's tokenizer cannot encode (a word-level tokenizer.json
    without an unknown token, a word it lacks) failed only after the whole run: the trainer
    saved its checkpoint, printed '--- sample ---', then the error and exit 1. Found by argv
    fuzzing. Now refused before the first step, with nothing written."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2}))
    tok.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "words.json"))
    (tmp_path / "t.txt").write_text("a b a a b " * 200)
    data, out = tmp_path / "tok", tmp_path / "run"
    assert run_cli("prepare", tmp_path / "t.txt", "--out", data,
                   "--tokenizer", tmp_path / "words.json").returncode == 0
    err = _main_one_line_error(capsys, "train", "--data", data, "--out", out, "--max-steps", 1,
                               *SMALL, "--sample-tokens", 5, "--prompt", "a zzz")
    assert err == ("error: the file tokenizer cannot encode 'a zzz' (WordLevel error: Missing "
                   "[UNK] token from the vocabulary); give the final sample another --prompt, "
                   "or --sample-tokens 0")
    assert not out.exists()
    from cllm_gpu import cli
    assert cli.main(["train", "--data", str(data), "--out", str(out), "--max-steps", "1",
                     *map(str, SMALL), "--sample-tokens", "3", "--prompt", "a b"]) == 0
    # the default prompt starts a new document, which any tokenizer can: it was 'def ', which
    # this one cannot encode, so such data could not be trained at the defaults
    capsys.readouterr()
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "run2"),
                     "--max-steps", "1", *map(str, SMALL), "--sample-tokens", "5"]) == 0
    words = " ".join(_final_sample_lines(capsys.readouterr().out)).split()
    assert words and set(words) <= {"a", "b", "<|endoftext|>"}, words
    assert json.loads((tmp_path / "run2" / "ckpt-00000001" / "state.json").read_text())[
        "final_sample"]["prompt"] == ""


def test_outputs_that_are_files_or_not_png_are_refused(tiny_run, tmp_path, capsys):
    """prepare and export said "(File exists)" for an --out naming a file; plot wrote PNG bytes
    under any name (x.jpg). Each is one line now, and the file is untouched."""
    src, f = tmp_path / "one.txt", tmp_path / "f"
    src.write_text("one document")
    f.write_text("keep me")
    for argv, message in (
            (["prepare", src, "--out", f], f"{f}: is a file, not a directory (give --out a "
                                           f"directory)"),
            (["export", tiny_run, "--hf", f], f"{f}: is a file, not a directory (give --hf a "
                                              f"directory)"),
            (["plot", tiny_run, "--out", tmp_path / "c.jpg"],
             f"{tmp_path / 'c.jpg'}: plot writes a PNG; name the file *.png")):
        assert _main_one_line_error(capsys, *argv) == "error: " + message
    assert f.read_text() == "keep me" and not (tmp_path / "c.jpg").exists()


def test_an_output_directory_that_is_a_dangling_link_is_named_as_one(data, tiny_run, tmp_path,
                                                                      capsys):
    """--out (train, prepare) or --hf (export) a link to a directory that does not exist (a
    scratch mount not there, a link made before its target): "output directory is not writable
    (File exists)", "cannot create the export directory (File exists)", though nothing there
    exists and the directory was writable. One line saying it is a link to nothing, the link
    untouched and nothing made at its target."""
    src, link, target = tmp_path / "one.txt", tmp_path / "link", tmp_path / "gone" / "run"
    src.write_text("one document")
    link.symlink_to(target)
    refusal = (f"error: {link}: is a link to {target}, which does not exist (create it, or "
               f"give {{}} another directory)")
    for argv, flag in ((["train", "--data", data, "--out", link, "--max-steps", 1, *SMALL],
                        "--out"),
                       (["prepare", src, "--out", link], "--out"),
                       (["export", tiny_run, "--hf", link], "--hf")):
        assert _main_one_line_error(capsys, *argv) == refusal.format(flag)
    assert link.is_symlink() and not (tmp_path / "gone").exists()
    # a link to a directory that exists is that directory (mutation audit: refusing every
    # link passed every test)
    target.mkdir(parents=True)
    code, err = main_in_process(capsys, "prepare", src, "--out", link)
    assert code == 0 and err == [], err
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "train.bin", "val.bin"]

def test_prepare_counts_one_document_in_the_singular(tmp_path, capsys):
    from cllm_gpu import cli
    src = tmp_path / "one.txt"
    src.write_text("one document")
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "d")]) == 0
    assert ": 1 document, " in capsys.readouterr().out


def test_prepare_passes_eot_token_and_counts_documents_not_files(tmp_path, capsys):
    """--eot-token reaches prepare: a tokenizer.json whose end-of-text is '</s>' prepares
    with it; the line counts documents (a .jsonl file of 2 is 2, not 1 file). Mutation
    audit: dropping the flag, or printing the file count, passed every CLI test."""
    tk = pytest.importorskip("tokenizers")
    from cllm_gpu import cli
    tok = tk.ByteLevelBPETokenizer()
    tok.train_from_iterator(["one and two documents "] * 20, vocab_size=280, min_frequency=2,
                            special_tokens=["</s>"], show_progress=False)
    tok.save(str(tmp_path / "user.json"))
    (tmp_path / "c.jsonl").write_text('{"text": "one document"}\n{"text": "two documents"}\n')
    assert cli.main(["prepare", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "d"),
                     "--tokenizer", str(tmp_path / "user.json"), "--eot-token", "</s>"]) == 0
    out = capsys.readouterr().out
    assert ": 2 documents, " in out and "(file; end-of-text id 0)" in out
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert (meta["eot_token"], meta["eot_id"], meta["files"]) == ("</s>", 0, 1)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_prepare_notes_an_eot_token_its_tokenizer_does_not_take(tmp_path, capsys, tokenizer):
    """--eot-token names a tokenizer PATH's end-of-text token; byte and bpe have GPT-2's
    <|endoftext|>. `--tokenizer bpe --eot-token '</s>'` wrote data whose end-of-text is
    <|endoftext|> without a word (a prompt's '</s>' then stays text); now a note says so.
    The default's value, given, says nothing."""
    if tokenizer == "bpe":
        pytest.importorskip("tokenizers")
    from cllm_gpu import cli
    src = tmp_path / "t.txt"
    src.write_text("the cat sat on the mat. " * 50)
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "a"), "--tokenizer", tokenizer,
                     "--eot-token", "</s>"]) == 0
    assert (f"note: --eot-token '</s>' ignored with --tokenizer {tokenizer}: its end-of-text "
            f"token is '<|endoftext|>'") in capsys.readouterr().out.splitlines()
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["eot_token"] == "<|endoftext|>"
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "b"), "--tokenizer", tokenizer,
                     "--eot-token", "<|endoftext|>"]) == 0
    assert "note: --eot-token" not in capsys.readouterr().out


def test_prepare_notes_a_long_document_encoded_whole_before_encoding_it(tmp_path, capsys,
                                                                        monkeypatch):
    """A tokenizer.json with no exact cut inside a document (Metaspace without its split,
    as Llama 2's and Mistral's) encodes a long one whole, in a lot of memory: it said
    nothing until the end. Now one note on stderr, before the library is given it; none
    for a short document."""
    tk = pytest.importorskip("tokenizers")
    from cllm_gpu import cli, data
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.train_from_iterator(["the cat sat on the mat. "] * 20, tk.trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<|endoftext|>"], show_progress=False))
    tok.save(str(tmp_path / "user.json"))
    src = tmp_path / "t.txt"
    src.write_text("the cat sat on the mat. " * 50)
    monkeypatch.setattr(data, "ENCODE_PIECE_CHARS", 1000)
    encoded_after = []
    real = data.HFTokenizer.encode_batch
    monkeypatch.setattr(data.HFTokenizer, "encode_batch", lambda self, texts, **kw: (
        encoded_after.append(capsys.readouterr().err) or real(self, texts, **kw)))
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "a"),
                     "--tokenizer", str(tmp_path / "user.json")]) == 0
    # 500 bytes a token, counted on the first 1,000 characters
    tokens = round(len(tok.encode(src.read_text()[:1000]).ids) * 1200 / 1000)
    assert encoded_after[0] == (
        f"note: 1 document longer than 1,000 characters encoded whole, with no cut that keeps "
        f"this tokenizer's ids (its Metaspace pre-tokenizer does not split: the text is one "
        f"word): the tokenizers library holds some 500 bytes a token, about "
        f"{500 * tokens / 1e3:.1f} kB for the longest (1,200 characters); to need less, split "
        f"the text into several files or lines of a .jsonl\n")
    monkeypatch.setattr(data, "ENCODE_PIECE_CHARS", 1200)
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "b"),
                     "--tokenizer", str(tmp_path / "user.json")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_prepare_warns_of_bytes_that_are_not_utf8(tmp_path, capsys):
    """Text that is not UTF-8 (Latin-1 here) or a binary file in a corpus folder is read with
    U+FFFD for each bad byte, as before, but no longer silently: one warning per file naming
    the count and the first offset, the first five files then a count; UTF-8 text, none."""
    from cllm_gpu import cli
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes("café crème\n".encode("latin-1"))  # 2 bad bytes
    (corpus / "b.txt").write_text("déjà vu\n", encoding="utf-8")
    for k in range(6):
        (corpus / f"bin{k}.dat").write_bytes(bytes([0xff, 0x41, 0xfe]))
    assert cli.main(["prepare", str(corpus), "--out", str(tmp_path / "d")]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert err == [f"warning: {corpus / 'a.txt'}: 2 bytes not UTF-8 (the first at offset 3), "
                   f"read as U+FFFD",
                   *[f"warning: {corpus / f'bin{k}.dat'}: 2 bytes not UTF-8 (the first at "
                     f"offset 0), read as U+FFFD" for k in range(4)],
                   "warning: and 2 more files with bytes that are not UTF-8"]
    # the tokens are those of the U+FFFD text (3 bytes each), as before
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    assert bytes(train[:14].tolist()) == "caf\ufffd cr\ufffdme".encode("utf-8")
    src = tmp_path / "good.txt"
    src.write_text("déjà vu", encoding="utf-8")
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "g")]) == 0
    assert capsys.readouterr().err == ""


def test_prepare_notes_a_bpe_vocabulary_smaller_than_asked(tmp_path, capsys):
    """A tiny corpus runs out of pairs to merge before --bpe-vocab-size: the line says so
    instead of leaving the smaller vocab unexplained; none when the size is reached."""
    pytest.importorskip("tokenizers")
    from cllm_gpu import cli
    src = tmp_path / "t.txt"
    src.write_text("the cat sat on the mat. " * 300)
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "a"), "--tokenizer", "bpe",
                     "--bpe-vocab-size", "4096"]) == 0
    vocab = json.loads((tmp_path / "a" / "meta.json").read_text())["vocab_size"]
    assert vocab < 4096
    assert (f"note: the BPE vocabulary is {vocab}, not --bpe-vocab-size 4096: the corpus has "
            f"no more pairs seen at least twice to merge") in capsys.readouterr().out
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "b"), "--tokenizer", "bpe",
                     "--bpe-vocab-size", str(vocab)]) == 0
    assert "note:" not in capsys.readouterr().out


def test_model_flags_that_differ_on_resume_are_noted(data, tmp_path, capsys):
    """A resumed run keeps the checkpoint's model; a model flag asking for another value was
    dropped without a word. Flags equal to the checkpoint's values say nothing."""
    from cllm_gpu import cli
    out = str(tmp_path / "run")
    assert cli.main(["train", "--data", str(data), "--out", out, "--max-steps", "1",
                     *map(str, SMALL)]) == 0
    assert "model: 1 layer, 2 heads, 16 embd," in capsys.readouterr().out  # counts agree
    assert cli.main(["train", "--resume", out, "--max-steps", "2", *map(str, SMALL),
                     "--n-layer", "3", "--attn-bias", "alibi", "--dropout", "0"]) == 0
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: --")]
    assert notes == ["note: --n-layer 3 ignored on --resume: the checkpoint's model has n_layer 1",
                     "note: --attn-bias alibi ignored on --resume: the checkpoint's model has "
                     "attn_bias none"]


def test_position_flags_given_as_their_defaults_on_resume_are_noted(data, tmp_path, capsys):
    """--attn-bias none / --pos-emb learned typed on the resume of an alibi, pos_emb none run
    are model flags given with another value than the checkpoint's, as any other: they were
    dropped without a word, the parser's default standing for 'not given'."""
    from cllm_gpu import cli
    out = str(tmp_path / "run")
    assert cli.main(["train", "--data", str(data), "--out", out, "--max-steps", "1",
                     *map(str, SMALL), "--attn-bias", "alibi", "--pos-emb", "none"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", out, "--max-steps", "2", "--attn-bias", "none",
                     "--pos-emb", "learned"]) == 0
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: --")]
    assert notes == ["note: --attn-bias none ignored on --resume: the checkpoint's model has "
                     "attn_bias alibi",
                     "note: --pos-emb learned ignored on --resume: the checkpoint's model has "
                     "pos_emb none"]


def test_resume_notes_what_max_steps_does_to_the_run(data, tmp_path, capsys):
    """--resume with --max-steps at or below the checkpoint's step trained nothing and said
    nothing; with --lr-decay-steps 0 a new --max-steps stretched the cosine decay, so the
    learning rate jumped at the resumed step without a word (1.3e-3 -> 6.3e-3 in a probe)."""
    from cllm_gpu import cli
    out = str(tmp_path / "run")
    flags = [*map(str, SMALL), "--warmup-steps", "0"]
    assert cli.main(["train", "--data", str(data), "--out", out, "--max-steps", "4", *flags]) == 0
    capsys.readouterr()

    def notes(*argv):
        assert cli.main(["train", "--resume", out, *flags, *argv]) == 0
        return [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: ")]
    assert notes("--max-steps", "3") == [
        "note: the checkpoint is at step 4 and --max-steps is 3: nothing to train (give a "
        "larger --max-steps to continue)"]
    # lr_at(4): 2e-4 (min_lr, the decay over) in the checkpoint's schedule, 1.1e-3 over 8
    assert notes("--max-steps", "8", "--sample-tokens", "0") == [
        "note: the learning-rate decay follows --max-steps (--lr-decay-steps 0): it ended at "
        "step 4 in the checkpoint's run and ends at step 8 now (the rate at step 5: 0.0011, "
        "not 0.0002); give --lr-decay-steps 4 to keep the checkpoint's schedule"]
    # the schedule kept: no note
    assert notes("--max-steps", "10", "--lr-decay-steps", "4") == []


def test_resume_schedule_note_prints_two_rates_that_differ():
    """A run of 300 steps resumed with --max-steps 302 noted "(the rate at step 301: 0.0002,
    not 0.0002)": at 3 significant digits the two rates read alike. They are printed with as
    many digits as it takes to tell them apart."""
    from cllm_gpu import cli
    from cllm_gpu.config import TrainConfig
    before = TrainConfig(max_steps=300, learning_rate=2e-3, min_lr=2e-4, warmup_steps=50)
    saved = {"step": 300, "train_config": before.to_dict()}
    [note] = cli._resume_schedule_notes(saved, TrainConfig(
        max_steps=302, learning_rate=2e-3, min_lr=2e-4, warmup_steps=50))
    now, then = re.search(r"the rate at step 301: (\S+), not (\S+)\)", note).groups()
    assert now != then
    assert float(now) > float(then) == 2e-4


def test_resume_takes_a_checkpoint_whose_train_config_has_a_field_this_version_lacks(
        data, tmp_path, capsys):
    """A train_config field this version does not know (one a later version dropped, or
    added) is ignored on resume, as the checkpoint check and the settings ignore it; the note
    on --max-steps parsed the whole train_config and refused the resume ("TrainConfig:
    unknown field(s) ...", naming no file) whenever --max-steps was given again."""
    from cllm_gpu import cli
    out = tmp_path / "run"
    flags = [*map(str, SMALL), "--warmup-steps", "0"]
    assert cli.main(["train", "--data", str(data), "--out", str(out), "--max-steps", "2",
                     *flags]) == 0
    state_json = out / "ckpt-00000002" / "state.json"
    state = json.loads(state_json.read_text())
    state["train_config"]["fused_adam"] = True
    state_json.write_text(json.dumps(state))
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--max-steps", "4", *flags]) == 0
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: ")]
    assert len(notes) == 1 and "ended at step 2 in the checkpoint's run" in notes[0], notes
    assert (out / "ckpt-00000004").is_dir()


def test_a_resume_keeps_the_runs_seed(data, tmp_path, capsys):
    """The data stream of a resumed run goes on from the checkpoint's RNG state, so --seed
    given again with another value never changed the data; it did change the validation
    batches (drawn from seed + 1) and the dropout masks, so the val loss after the resume was
    measured on other windows than before it (5.1366 vs 5.2517 at the same weights in a probe)
    and "best val loss" compared the two, without a word. The run keeps its checkpoint's
    seed, with a note."""
    import shutil
    from cllm_gpu import cli
    flags = [*map(str, SMALL), "--eval-interval", "2", "--dropout", "0.1",
             "--lr-decay-steps", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["train", "--data", str(data), "--out", str(a), "--max-steps", "2",
                     *flags]) == 0
    shutil.copytree(a, b)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(a), "--max-steps", "4", *flags]) == 0
    assert not [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: ")]
    assert cli.main(["train", "--resume", str(b), "--max-steps", "4", *flags,
                     "--seed", "99"]) == 0
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: ")]
    assert notes == ["note: --seed 99 ignored on resume: a resumed run keeps its checkpoint's "
                     "seed 1337 (its data goes on from the checkpoint's position, its "
                     "validation batches and dropout masks are that seed's)"]

    def curve(run):
        return [(r["type"], r["step"], r.get("loss"), r.get("val_loss"))
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["type"] in ("train", "eval")]
    assert curve(b) == curve(a)
    state = json.loads((b / "ckpt-00000004" / "state.json").read_text())
    assert state["train_config"]["seed"] == 1337


def test_resume_notes_data_that_holds_other_tokens_than_the_checkpoints(tmp_path, capsys):
    """A checkpoint's data position is an RNG state: the same windows only over the same
    train.bin. Prepared again from another corpus (the same tokenizer) between a run and its
    --resume, the run went on over other tokens without a word (losses 5.5831 vs 5.5258 at
    step 3 in a probe), though a resumed run is said to continue exactly. The checkpoint
    records the data's token counts and unigram entropy (meta.json's): a resume on data whose
    differ says so in a note; on the same text prepared again, nothing."""
    from cllm_gpu import cli
    src, tok, out = tmp_path / "t.txt", tmp_path / "tok", tmp_path / "run"
    flags = [*map(str, SMALL), "--lr-decay-steps", "8"]  # no note on the schedule
    src.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    assert cli.main(["prepare", str(src), "--out", str(tok)]) == 0
    assert cli.main(["train", "--data", str(tok), "--out", str(out), "--max-steps", "2",
                     *flags]) == 0
    before = json.loads((tok / "meta.json").read_text())
    assert cli.main(["prepare", str(src), "--out", str(tok)]) == 0  # the same tokens again
    capsys.readouterr()

    def notes(max_steps):
        assert cli.main(["train", "--resume", str(out), "--max-steps", str(max_steps),
                         *flags]) == 0
        return [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: ")]
    assert notes(3) == []
    src.write_text("pack my box with five dozen liquor jugs. " * 300)
    assert cli.main(["prepare", str(src), "--out", str(tok)]) == 0
    after = json.loads((tok / "meta.json").read_text())
    capsys.readouterr()
    assert notes(4) == [
        f"note: {tok} holds other tokens than {out / 'ckpt-00000003'} was trained on "
        f"(train.bin {before['train_tokens']:,} -> {after['train_tokens']:,} tokens, val.bin "
        f"{before['val_tokens']:,} -> {after['val_tokens']:,} tokens: prepared again, or other "
        f"data): the run goes on from the checkpoint's data position, an RNG state, over them, "
        f"not with the batches it would have drawn"]
    # the checkpoint written since records the data it was trained on: the next resume is quiet
    assert notes(5) == []


def _final_sample_lines(out: str) -> list[str]:
    """The lines between train's '--- sample ---' and '--------------' ([] if none)."""
    lines = out.splitlines()
    if "--- sample ---" not in lines:
        return []
    start = lines.index("--- sample ---") + 1
    return lines[start:lines.index("--------------", start)]


def test_a_resumed_run_keeps_its_final_sample_settings(data, tmp_path, capsys):
    """train --prompt, --sample-tokens, --temperature and --top-k were not recorded: a
    resumed run's final sample took the defaults (then 'def ', for the Python-source default
    corpus; 300 tokens at 0.8), not the run's. state.json now records them (final_sample) and
    a resume takes them unless given again; a checkpoint written before keeps the defaults."""
    import shutil
    from cllm_gpu import cli
    out = tmp_path / "run"
    i = SMALL.index("--sample-tokens")
    flags = [*map(str, SMALL[:i] + SMALL[i + 2:])]
    settings = {"prompt": "the q", "tokens": 7, "temperature": 0.0, "top_k": 5}

    def train(*argv):
        capsys.readouterr()
        assert cli.main(["train", *flags, *map(str, argv)]) == 0
        return _final_sample_lines(capsys.readouterr().out)

    def recorded(step):
        return json.loads((out / f"ckpt-{step:08d}" / "state.json").read_text())["final_sample"]
    assert train("--data", data, "--out", out, "--max-steps", 1, "--prompt", "the q",
                 "--sample-tokens", 7, "--temperature", 0, "--top-k", 5)[0].startswith("the q")
    shutil.copytree(out, tmp_path / "copy")
    resumed = train("--resume", out, "--max-steps", 2)
    # greedy (temperature 0): the sample command's with the same settings, 7 tokens
    capsys.readouterr()
    assert cli.main(["sample", str(out), "--prompt", "the q", "--max-new-tokens", "7",
                     "--temperature", "0", "--top-k", "5", "--backend", "numpy"]) == 0
    assert resumed == capsys.readouterr().out.splitlines()
    assert recorded(1) == recorded(2) == settings
    # a flag given again wins, and is what the new checkpoint records
    assert train("--resume", out, "--max-steps", 3, "--sample-tokens", 0) == []
    assert recorded(3) == dict(settings, tokens=0)
    assert train("--resume", out, "--max-steps", 4) == []
    # a checkpoint written before final_sample was recorded: today's defaults
    out = tmp_path / "copy"
    state_json = out / "ckpt-00000001" / "state.json"
    state = json.loads(state_json.read_text())
    del state["final_sample"]
    state_json.write_text(json.dumps(state))
    assert train("--resume", out, "--max-steps", 2, "--temperature", 0)
    assert recorded(2) == dict(prompt="", tokens=300, temperature=0.0, top_k=40)


def test_a_refused_resume_prints_its_error_and_no_notes(data, tmp_path, capsys):
    """A resume refused after the command line was read (here: --out holds another run's
    checkpoints) printed the notes on the settings first (the learning-rate decay moved, a
    model flag ignored), then the error: notes of a run that never starts. Now the notes come
    once the run is set up, and a refusal is its one line alone."""
    from cllm_gpu import cli
    run, other = str(tmp_path / "run"), str(tmp_path / "other")
    for out in (run, other):
        assert cli.main(["train", "--data", str(data), "--out", out, "--max-steps", "1",
                         *map(str, SMALL)]) == 0
    resume = ["train", "--resume", run, "--max-steps", "3", *map(str, SMALL), "--n-layer", "3"]
    capsys.readouterr()
    assert cli.main(resume + ["--out", other]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, (out, err)
    assert err.startswith("error: ") and "already holds checkpoints of another run" in err
    # the same resume where it may go: both notes, after the set-up's lines
    assert cli.main(resume) == 0
    lines = capsys.readouterr().out.splitlines()
    notes = [i for i, l in enumerate(lines) if l.startswith("note: ")]
    assert len(notes) == 2 and "--n-layer 3 ignored" in lines[notes[0]]
    assert "learning-rate decay follows --max-steps" in lines[notes[1]]
    assert lines[notes[0] - 1].startswith("resumed from ")


def test_a_refused_resume_on_other_ranks_prints_no_batch_line(tiny_run, tmp_path, capsys):
    """The trainer's own line on a resume on another number of ranks ('world size 2 -> 1:
    grad_accum_steps 1 -> 2 keeps the global batch of 4 sequences') came before its checks,
    and a refused resume printed it before its error. (A 2-rank checkpoint: tiny_run's
    manifest saying so.)"""
    import shutil
    from cllm_gpu import cli
    two = _run_with_manifest(tiny_run, tmp_path / "two",
                             lambda s: {**s, "world_size": 2, "global_batch": 4})
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(two), "--max-steps", "2", "--out", str(other),
                     *map(str, SMALL)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "already holds checkpoints of another run" in err, (out, err)
    assert cli.main(["train", "--resume", str(two), "--max-steps", "2", *map(str, SMALL)]) == 0
    out = capsys.readouterr().out
    assert "world size 2 -> 1: grad_accum_steps 1 -> 2 keeps the global batch of 4" in out


def test_rank_0_failing_to_prepare_the_default_corpus_ends_the_job_at_once(tmp_path, monkeypatch,
                                                                          capsys):
    """Under mpiexec the other ranks wait for rank 0's meta.json, not at the agreement on the
    command line: rank 0's prepare error must reach main (which aborts the job with it), not go
    to that agreement, where rank 0 waited out --dist-timeout and the error was never shown."""
    from cllm_gpu import cli, data, distributed
    from cllm_gpu.errors import DataError
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(distributed, "detect_launch",
                        lambda: distributed.Launch(0, 2, 0, 2, "MPICH / Intel MPI"))

    def no_communicator(*a, **k):
        raise AssertionError("opened a communicator after rank 0's own error")

    order = []

    def failing_prepare(*a, **k):
        order.append("prepare")
        raise DataError("disk says no")

    aborted = []
    monkeypatch.setattr(distributed, "open_communicator", no_communicator)
    monkeypatch.setattr(distributed, "abort_job", aborted.append)
    monkeypatch.setattr(data, "prepare", failing_prepare)
    # MPI up before the prepare (its MPI_Init waits for every rank), not in this process
    monkeypatch.setattr(cli, "_start_mpi", lambda: order.append("MPI_Init"))
    cli.main(["train", "--backend", "numpy", "--max-steps", "1"])
    assert aborted == [1] and order == ["MPI_Init", "prepare"]
    assert "error: rank 0: disk says no" in capsys.readouterr().err


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_style_ranks(argv, cwd, order=(0, 1), env_extra=None):
    """`cllm_gpu argv` as ranks 0 and 1 of a torchrun-style launch (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT; no MPI variables, no launcher's run id unless env_extra sets one),
    started in `order` (one rank alone: order=(r,)): {rank: Popen}."""
    import os
    import subprocess
    import sys
    from clihelp import ROOT
    port = _free_port()
    procs = {}
    for rank in order:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PMI_", "OMPI_", "SLURM_", "MPI_", "TORCHELASTIC_"))}
        env.update(PYTHONPATH=str(ROOT), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env_extra or {}))
        procs[rank] = subprocess.Popen([sys.executable, "-m", "cllm_gpu", *argv], cwd=cwd,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    return procs


def test_ranks_waiting_for_the_default_corpus_end_at_once_when_rank_0_fails(tmp_path):
    """Two real ranks, torchrun-style (no MPI): rank 0's prepare error left rank 1 waiting 600 s
    for meta.json, then failing without saying why. Rank 0's note beside the directory ends
    rank 1 at once with one line; rank 0 says its error. A note from an earlier failed run is
    there: rank 0 replaces it, and it does not hide this run's."""
    import os
    import time
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "default").write_text("a file where the corpus directory goes")
    old_note = tmp_path / "data" / "default.prepare-error"
    old_note.write_text("an earlier run's error\n")
    an_hour_ago = time.time() - 3600
    os.utime(old_note, (an_hour_ago, an_hour_ago))
    procs = _torchrun_style_ranks(["train", "--backend", "numpy", "--max-steps", "1"], tmp_path,
                                  order=(1, 0))
    ended, deadline = {}, time.monotonic() + 30
    while len(ended) < 2 and time.monotonic() < deadline:
        for rank, p in procs.items():
            if rank not in ended and p.poll() is not None:
                ended[rank] = time.monotonic()
        time.sleep(0.05)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    outs = {rank: p.communicate() for rank, p in procs.items()}
    assert set(ended) == {0, 1}, outs
    # at once: a rank that missed the note waits DEFAULT_DATA_WAIT_S (600 s; killed at 30 s
    # above); rank 1 polls every 0.2 s. The bound was 3 s, which a loaded CI runner's two
    # interpreter exits can approach.
    assert ended[1] - ended[0] < 15, ended
    assert procs[0].returncode == procs[1].returncode == 1, outs
    assert outs[0][1].splitlines() == [
        "error: rank 0: data/default: is a file, not a data directory (give --data a directory)"]
    assert outs[1][1].splitlines() == [
        "error: rank 1: rank 0 failed to prepare the default corpus in data/default; see rank "
        "0's error"]
    assert old_note.read_text().strip() == outs[0][1].split("error: rank 0: ")[1].strip()


def test_a_torchrun_style_launch_on_the_numpy_backend_is_refused_once(tmp_path, data):
    """Two real ranks, torchrun-style, NumPy backend (which needs MPI): the error is the same on
    every rank, so rank 0 says it once and both exit 1 (each rank printed it before)."""
    procs = _torchrun_style_ranks(["train", "--backend", "numpy", "--data", str(data), "--out",
                                   str(tmp_path / "run"), "--max-steps", "1"], tmp_path)
    procs = [procs[0], procs[1]]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs
    assert outs[0][1].splitlines() == [
        "error: torchrun-style launch on the NumPy backend: data parallelism on the CPU runs over "
        "MPI; start the ranks with mpiexec / mpirun (or srun with MPI), or use the CUDA backend "
        "(NCCL)"], outs
    assert outs[1][1] == "", outs


def test_a_rank_whose_backend_auto_chose_numpy_under_torchrun_says_so_and_ends_the_job(
        tmp_path, data, monkeypatch, capsys):
    """--backend auto is decided on each rank (its own GPU check): a rank that found no GPU may
    be the only one on NumPy while rank 0 waits in NCCL, so it prints the refusal itself and
    ends the job, not leave it to rank 0 (which would say nothing here)."""
    from cllm_gpu import backend
    _, aborted = _as_waiting_rank_1(monkeypatch, tmp_path)
    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    code, lines = main_in_process(capsys, "train", "--backend", "auto", "--data", data,
                                  "--max-steps", 1)
    assert (code, aborted) == (1, [1])
    assert lines == ["error: rank 1: torchrun-style launch on the NumPy backend: data "
                     "parallelism on the CPU runs over MPI; start the ranks with mpiexec / "
                     "mpirun (or srun with MPI), or use the CUDA backend (NCCL)"], lines


def _as_waiting_rank_1(monkeypatch, tmp_path):
    """This process as rank 1 of 2 (torchrun-style) in tmp_path: (Launch, the exit statuses
    abort_job was asked to end the job with)."""
    from cllm_gpu import distributed
    monkeypatch.chdir(tmp_path)
    launch = distributed.Launch(1, 2, 1, 2, "torchrun-style", "127.0.0.1", 29500)
    monkeypatch.setattr(distributed, "detect_launch", lambda: launch)
    aborted = []
    monkeypatch.setattr(distributed, "abort_job", aborted.append)
    return launch, aborted


def test_a_rank_waiting_for_the_default_corpus_in_vain_says_why_and_what_to_do(
        tmp_path, monkeypatch, capsys):
    """No meta.json and no note from rank 0 (rank 0 on another machine without a shared file
    system, or unable to write even its note): after the wait, one line naming the directory,
    the likely causes and the fix."""
    from cllm_gpu import cli
    _, aborted = _as_waiting_rank_1(monkeypatch, tmp_path)
    monkeypatch.setattr(cli, "DEFAULT_DATA_WAIT_S", 0.5)
    started, sleep = time.monotonic(), time.sleep

    def sleep_unless_waiting_on(seconds):  # a wait that never ends fails here, not hangs
        if time.monotonic() - started > 30:
            raise RuntimeError("still waiting 30 s after a 0.5 s DEFAULT_DATA_WAIT_S")
        sleep(seconds)
    monkeypatch.setattr(time, "sleep", sleep_unless_waiting_on)
    code, lines = main_in_process(capsys, "train", "--backend", "numpy", "--max-steps", 1)
    monkeypatch.setattr(time, "sleep", sleep)
    assert (code, aborted) == (1, [1])
    assert len(lines) == 1 and lines[0].startswith(
        f"error: rank 1: no meta.json in {(tmp_path / 'data' / 'default').resolve()} after 0 s "
        f"of waiting for rank 0 to prepare the default corpus there: rank 0 failed"), lines
    assert "shared file system" in lines[0]
    assert lines[0].endswith("run 'cllm-gpu prepare default --out DIR' where every rank sees "
                             "DIR (or on every machine), then train with --data DIR")


@contextlib.contextmanager
def _ends_without_a_poll(monkeypatch):
    """Inside, _wait_for_default_data's poll (time.sleep) fails the test at once: a wait that
    ends 'at once' ends on its first look, whatever the machine's load (a 0.1 s wall-clock
    bound stood for this, against a 0.2 s poll)."""
    def polled(seconds):
        raise AssertionError(f"the wait polled (time.sleep({seconds})) instead of ending at once")
    with monkeypatch.context() as patched:
        patched.setattr(time, "sleep", polled)
        yield


def _at_the_first_poll(monkeypatch, event):
    """Inside, _wait_for_default_data's first poll (time.sleep) does `event` first: the rank
    has looked once (meta.json missing, the note as it was) and waits on. A timer of 0.3 s
    stood for this: a rank whose first look came later (a loaded machine) found meta.json
    already there and never judged the note, or a replaced note already in place."""
    polls, sleep = [], time.sleep

    def polled(seconds):
        polls.append(seconds)
        if len(polls) == 1:
            event()
        sleep(seconds)
    monkeypatch.setattr(time, "sleep", polled)
    return polls


def _waits_for_meta_json(data_dir, launch):
    """Rank 0's meta.json appears at the wait's first poll: _ensure_default_data returns once
    it is there (the next look), not before (then it is removed for the next case)."""
    from cllm_gpu import cli
    with pytest.MonkeyPatch.context() as patched:
        polls = _at_the_first_poll(patched, lambda: (data_dir / "meta.json").write_text("{}"))
        cli._ensure_default_data(cli.DEFAULT_DATA, launch)
    assert len(polls) == 1
    (data_dir / "meta.json").unlink()


def test_a_resume_whose_default_corpus_is_gone_prepares_it_again(tmp_path, monkeypatch,
                                                                 capsys):
    """A run on the default corpus records data/default; resumed where it is missing (another
    working directory's run, a cleaned checkout), train prepares it again, as a new run does,
    rather than refuse it as a moved token directory (mutation audit: refusing it passed every
    test)."""
    import shutil
    from cllm_gpu import data
    monkeypatch.chdir(tmp_path)
    prepare = data.prepare
    monkeypatch.setattr(data, "prepare", lambda source, out: prepare(source, out,
                                                                     max_bytes=20_000))
    code, err = main_in_process(capsys, "train", "--out", "run", "--max-steps", 1, *SMALL)
    assert code == 0, err
    shutil.rmtree(tmp_path / "data" / "default")
    code, err = main_in_process(capsys, "train", "--resume", "run", "--max-steps", 2)
    assert code == 0, err
    assert (tmp_path / "run" / "ckpt-00000002").is_dir()
    assert (tmp_path / "data" / "default" / "meta.json").is_file()


def test_a_seq_len_equal_to_the_block_size_trains(data, tmp_path, capsys):
    """--seq-len may be the block size itself (mutation audit: refusing it passed every
    test)."""
    code, err = main_in_process(capsys, "train", "--data", data, "--out", tmp_path / "run",
                                "--max-steps", 1, *SMALL, "--seq-len", 16)
    assert code == 0, err


def test_rank_0_removes_an_earlier_runs_note_before_preparing(tmp_path, monkeypatch):
    """docs/distributed.md: a note left by an earlier failed run is removed by rank 0 before it
    prepares. It stays out of a waiting rank's way (one whose clock is behind the note's
    writer's would take it for this run's) and does not sit beside a good corpus saying it
    failed. Mutation audit: rank 0 leaving it there passed every default-corpus test."""
    from cllm_gpu import cli, data, distributed
    monkeypatch.chdir(tmp_path)
    prepare = data.prepare
    monkeypatch.setattr(data, "prepare", lambda source, out: prepare(source, out,
                                                                     max_bytes=20_000))
    note = tmp_path / "data" / "default.prepare-error"
    note.parent.mkdir()
    note.write_text("an earlier run's error\n")
    rank_0 = distributed.Launch(0, 2, 0, 2, "torchrun-style", "127.0.0.1", 29500)
    cli._ensure_default_data(cli.DEFAULT_DATA, rank_0)
    assert (tmp_path / cli.DEFAULT_DATA / "meta.json").is_file()
    assert not note.exists()


def test_a_waiting_rank_tells_this_runs_note_from_an_earlier_runs(tmp_path, monkeypatch):
    """A note from an earlier failed run (older than this process, unchanged) is not this run's
    failure: the rank keeps waiting and takes rank 0's meta.json. A note newer than this process
    (rank 0 failed before this rank first looked), or one that replaces the old note while the
    rank waits (written on a machine whose clock is behind), ends the wait at once."""
    import os
    from cllm_gpu import cli
    from cllm_gpu.errors import DataError
    launch, _ = _as_waiting_rank_1(monkeypatch, tmp_path)
    monkeypatch.setattr(cli, "DEFAULT_DATA_WAIT_S", 5.0)  # a wait in vain fails, not hangs
    data_dir = tmp_path / cli.DEFAULT_DATA
    data_dir.mkdir(parents=True)
    note = tmp_path / "data" / "default.prepare-error"
    an_hour_before_us = cli._process_started_at() - 3600

    def write_note(path):
        path.write_text("rank 0's error\n")
        os.utime(path, (an_hour_before_us, an_hour_before_us))

    write_note(note)
    _waits_for_meta_json(data_dir, launch)

    note.write_text("rank 0's error\n")  # now: newer than this process
    with _ends_without_a_poll(monkeypatch), pytest.raises(
            DataError, match="^rank 0 failed to prepare the default corpus in data/default; "
                             "see rank 0's error$"):
        cli._ensure_default_data(cli.DEFAULT_DATA, launch)

    write_note(note)
    replaced = tmp_path / "data" / "replacement"
    with monkeypatch.context() as patched, pytest.raises(DataError,
                                                         match="^rank 0 failed to prepare"):
        polls = _at_the_first_poll(patched, lambda: (write_note(replaced),
                                                     os.replace(replaced, note)))
        cli._ensure_default_data(cli.DEFAULT_DATA, launch)
    assert len(polls) == 1  # ended on its first look at the replaced note


def test_a_rank_started_after_rank_0_failed_ends_at_once_on_its_runs_note(tmp_path):
    """torchrun-style (no MPI) with torchrun's TORCHELASTIC_RUN_ID: rank 1 starts only after
    rank 0 failed to prepare the default corpus and wrote its note, so the note is older than
    rank 1's process and was taken for an earlier run's (a 600 s wait). Rank 0 writes its run
    id into the note; rank 1, of the same run, ends at once with its one line."""
    import time
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "default").write_text("a file where the corpus directory goes")
    argv = ["train", "--backend", "numpy", "--max-steps", "1"]
    run = {"TORCHELASTIC_RUN_ID": "3f2c9a1e-run", "TORCHELASTIC_RESTART_COUNT": "0"}
    rank0 = _torchrun_style_ranks(argv, tmp_path, order=(0,), env_extra=run)[0]
    out0 = rank0.communicate(timeout=60)
    assert rank0.returncode == 1, out0
    note = tmp_path / "data" / "default.prepare-error"
    assert note.read_text().splitlines() == [
        "data/default: is a file, not a data directory (give --data a directory)",
        'run: {"id": "torchrun 3f2c9a1e-run", "restart": 0}']
    time.sleep(0.05)  # the note is older than rank 1's process (clock ticks of /proc/stat)
    t0 = time.monotonic()
    rank1 = _torchrun_style_ranks(argv, tmp_path, order=(1,), env_extra=run)[1]
    try:
        out1 = rank1.communicate(timeout=30)
    finally:
        if rank1.poll() is None:
            rank1.kill()
            rank1.communicate()
    assert time.monotonic() - t0 < 30
    assert rank1.returncode == 1, out1
    assert out1[1].splitlines() == [
        "error: rank 1: rank 0 failed to prepare the default corpus in data/default; see rank "
        "0's error"], out1


def test_a_waiting_rank_with_a_run_id_takes_only_its_runs_note(tmp_path, monkeypatch):
    """With the launcher's run id (torchrun, srun), the note's run decides: this run's note
    and restart end the wait whatever its age; another run's note is ignored even if newer
    than this process; one of this run's other restarts (torchrun restarts the worker group;
    the counts differ between nodes) is judged by its time, as a note without a run id."""
    import dataclasses
    import json
    import os
    import time
    from cllm_gpu import cli
    from cllm_gpu.errors import DataError
    launch, _ = _as_waiting_rank_1(monkeypatch, tmp_path)
    launch = dataclasses.replace(launch, run_id="torchrun abc", restart=1)
    monkeypatch.setattr(cli, "DEFAULT_DATA_WAIT_S", 5.0)  # a wait in vain fails, not hangs
    data_dir = tmp_path / cli.DEFAULT_DATA
    data_dir.mkdir(parents=True)
    note = tmp_path / "data" / "default.prepare-error"
    an_hour_before_us = cli._process_started_at() - 3600

    def write_note(run_id, restart, old):
        note.write_text("rank 0's error\n"
                        + cli._NOTE_RUN + json.dumps({"id": run_id, "restart": restart}) + "\n")
        if old:
            os.utime(note, (an_hour_before_us, an_hour_before_us))

    def ends_at_once():
        with _ends_without_a_poll(monkeypatch), pytest.raises(
                DataError, match="^rank 0 failed to prepare the default corpus"):
            cli._ensure_default_data(cli.DEFAULT_DATA, launch)

    write_note("torchrun abc", 1, old=True)
    ends_at_once()
    write_note("torchrun other", 1, old=False)  # newer than this process, another run's
    _waits_for_meta_json(data_dir, launch)
    write_note("torchrun abc", 0, old=True)     # an earlier restart's
    _waits_for_meta_json(data_dir, launch)
    write_note("torchrun abc", 0, old=False)    # another node's count, written now
    ends_at_once()
    note.write_text("rank 0's error\n")        # no run id in the note: by its time
    ends_at_once()
    write_note("torchrun other", 1, old=False)  # no run id here: by its time, as before
    launch = dataclasses.replace(launch, run_id=None)
    ends_at_once()


def test_on_several_nodes_a_note_of_the_same_restart_count_is_judged_by_its_time(tmp_path,
                                                                               monkeypatch):
    """torchrun counts restarts per node: a node restarted only because another node failed
    keeps its count. Rank 0's first start on node A (count 0) failed and left its note; in the
    second start node A counts 1, node B still 0. A rank 1 on node B that looked before the
    new rank 0 removed the note took it, by its count 0, for its own start's rank 0's and
    ended the start (seen: DataError at once on a note an hour old). With the ranks on several
    nodes the count names no start: the note is judged by its time, as one of another restart.
    On one node (one agent counts every worker's restarts) the count still decides."""
    import dataclasses
    import json
    import os
    from cllm_gpu import cli
    from cllm_gpu.errors import DataError
    launch, _ = _as_waiting_rank_1(monkeypatch, tmp_path)
    monkeypatch.setattr(cli, "DEFAULT_DATA_WAIT_S", 5.0)  # a wait in vain fails, not hangs
    data_dir = tmp_path / cli.DEFAULT_DATA
    data_dir.mkdir(parents=True)
    note = tmp_path / "data" / "default.prepare-error"
    note.write_text("rank 0's error\n"
                    + cli._NOTE_RUN + json.dumps({"id": "torchrun abc", "restart": 0}) + "\n")
    an_hour_before_us = cli._process_started_at() - 3600
    os.utime(note, (an_hour_before_us, an_hour_before_us))
    on_node_b = dataclasses.replace(launch, local_rank=0, local_size=1, run_id="torchrun abc",
                                    restart=0)
    _waits_for_meta_json(data_dir, on_node_b)
    on_one_node = dataclasses.replace(on_node_b, local_rank=1, local_size=2)
    with pytest.raises(DataError, match="^rank 0 failed to prepare the default corpus"):
        cli._ensure_default_data(cli.DEFAULT_DATA, on_one_node)


def test_eval_needs_a_block_of_the_split_it_evaluates_only(tiny_run, tmp_path, capsys):
    """eval --split train on data whose val.bin is shorter than a block: refused before
    ('val.bin: 10 tokens is shorter than one block'), though val.bin is not read."""
    from cllm_gpu import cli
    from cllm_gpu.data import prepare
    (tmp_path / "t.txt").write_text("a few sentences of training text, and few of val. " * 40)
    meta = prepare(tmp_path / "t.txt", tmp_path / "short", val_fraction=0.005)
    assert meta["val_tokens"] == 10
    args = ["eval", str(tiny_run), "--data", str(tmp_path / "short"), "--batches", "1",
            "--backend", "numpy"]
    capsys.readouterr()
    assert cli.main(args + ["--split", "train"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "train"
    err = _main_one_line_error(capsys, *args, "--split", "val")
    assert "val.bin: 10 tokens is shorter than one block of 16 + 1 tokens" in err


def test_train_without_validation_needs_a_block_of_train_bin_only(tmp_path, capsys):
    """--eval-interval 0 never reads val.bin: a split too short for a block (a tiny corpus, a
    small --val-fraction) was refused all the same ('val.bin: 10 tokens is shorter than one
    block'), as eval --split train was; with validation passes it is refused, naming
    --val-fraction. The public evaluate() checks the split it reads."""
    from cllm_gpu import cli
    from cllm_gpu.data import prepare
    (tmp_path / "t.txt").write_text("a few sentences of training text, and few of val. " * 40)
    meta = prepare(tmp_path / "t.txt", tmp_path / "short", val_fraction=0.005)
    assert meta["val_tokens"] == 10
    args = ["train", "--data", str(tmp_path / "short"), "--max-steps", "2",
            *map(str, SMALL)]  # --eval-interval 0
    capsys.readouterr()
    assert cli.main(args + ["--out", str(tmp_path / "run")]) == 0
    assert "summary: 2 steps" in capsys.readouterr().out
    err = _main_one_line_error(capsys, *args, "--out", str(tmp_path / "r2"),
                               "--eval-interval", "1")
    assert "val.bin: 10 tokens is shorter than one block of 16 + 1 tokens" in err
    assert "--val-fraction" in err and not (tmp_path / "r2").exists()
    from cllm_gpu import GpuTrainer, ModelConfig, TrainConfig
    from cllm_gpu.errors import DataError
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    trainer = GpuTrainer(cfg, TrainConfig(eval_interval=0), tmp_path / "short",
                         tmp_path / "r3", backend="numpy", log=lambda *a: None)
    with pytest.raises(DataError, match="val.bin: 10 tokens is shorter than one block"):
        trainer.evaluate("val")
    # it checks the split it reads, not val.bin (mutation audit h29p: checking val.bin
    # whatever the split passed every test)
    assert np.isfinite(trainer.evaluate("train"))


def _run_with_manifest(tiny_run, tmp_path, edit):
    """A copy of tiny_run whose checkpoint's state.json went through `edit` (state -> state)."""
    import shutil
    run = tmp_path / "edited"
    shutil.copytree(tiny_run, run)
    path = run / "ckpt-00000001" / "state.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return run


@pytest.mark.parametrize("key,value,message", [
    ("model_config", "x", "model_config: ModelConfig: expected a JSON object, got str"),
    ("model_config", {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_embd": 16,
                      "n_head": 3},
     r"model_config: n_embd \(16\) must be divisible by n_head \(3\)"),
    ("train_config", [], "train_config: TrainConfig: expected a JSON object, got list"),
    ("train_config", {"batch_size": -1}, "train_config: batch_size must be >= 1, got -1"),
    ("dtype", "float16", "dtype must be 'float32' or 'float64', got 'float16'"),
    ("data", "x", "data must be a JSON object whose dir is a string, got 'x'"),
    ("data", {"dir": 5}, "data must be a JSON object whose dir is a string"),
    # the data a run was trained on, read by a resume's note on other data
    ("data", {"dir": "d", "prepared": "x"}, r"data\.prepared must be a JSON object of numbers, "
                                            r"got 'x'"),
    ("data", {"dir": "d", "prepared": {"train_tokens": "9"}}, r"data\.prepared must be a JSON "
                                                              r"object of numbers"),
    # JSON's true is no count (mutation audit: a bool passed as a number)
    ("data", {"dir": "d", "prepared": {"train_tokens": True}}, r"data\.prepared must be a JSON "
                                                               r"object of numbers"),
    ("rng", 5, "rng must be a JSON object, got 5"),
    ("tokens_seen", "x", "tokens_seen must be an integer >= 0, got 'x'"),
    ("world_size", 0, "world_size must be an integer >= 1, got 0"),
    ("global_batch", None, "global_batch must be an integer >= 1, got None"),
    # the validation set's batch size (mutation audit h42i: its check dropped passed every test)
    ("val_batch_size", 0, "val_batch_size must be an integer >= 1, got 0"),
    ("val_batch_size", "4", "val_batch_size must be an integer >= 1, got '4'"),
    ("init_from", 5, "init_from must be a string or null, got 5"),
    ("final_sample", "x", r"final_sample must be a JSON object with prompt \(a string\), "
                          r"tokens \(an integer >= 0\), temperature \(a finite number >= 0\) "
                          r"and top_k \(an integer >= 1 or null\), got 'x'"),
    *(("final_sample", dict({"prompt": "a", "tokens": 1, "temperature": 1, "top_k": 1}, **bad),
       "final_sample must be a JSON object") for bad in (
        {"prompt": None}, {"tokens": -1}, {"tokens": True}, {"temperature": -0.5},
        {"temperature": float("nan")}, {"temperature": "1"}, {"top_k": 0}, {"top_k": 1.5},
        # mutation audit (h29ab): a JSON true for temperature passed every test
        {"temperature": True})),
])
def test_a_manifest_with_a_wrong_run_field_is_refused_naming_it(tiny_run, tmp_path, key, value,
                                                                message):
    """state.json's run fields were read unchecked wherever a command needed them: a wrong
    type was an AttributeError / KeyError / TypeError traceback (resume, sample, eval, export)
    or a config error that did not name the checkpoint. Now the manifest check refuses them."""
    from cllm_gpu import checkpoint as ckpt
    from cllm_gpu.errors import CheckpointError
    run = _run_with_manifest(tiny_run, tmp_path, lambda s: {**s, key: value})
    with pytest.raises(CheckpointError, match=r"ckpt-00000001/state\.json: " + message):
        ckpt.verify_checkpoint(run / "ckpt-00000001")


def test_a_manifest_may_record_no_final_sample_or_one_without_top_k(tiny_run, tmp_path):
    """final_sample: absent (written before it was recorded), null (a run whose caller gave
    none: the Python API) or top_k null (sampling among all tokens) all load."""
    from cllm_gpu import checkpoint as ckpt
    for name, edit in (
            ("absent", lambda s: {k: v for k, v in s.items() if k != "final_sample"}),
            ("null", lambda s: {**s, "final_sample": None}),
            ("all", lambda s: {**s, "final_sample": {**s["final_sample"], "top_k": None}})):
        run = _run_with_manifest(tiny_run, tmp_path / name, edit)
        ckpt.verify_checkpoint(run / "ckpt-00000001")


@pytest.mark.parametrize("best,message", [
    (("x", 1), "best_val_loss must be a finite number or null, got 'x'"),
    ((None, 1), "best_val_loss must be a finite number or null, got None"),
    ((2.5, None), r"best_val_step must be an integer in 1\.\.1 \(the checkpoint's step\) with "
                  r"best_val_loss, got None"),
    ((2.5, 2), r"best_val_step must be an integer in 1\.\.1 .* got 2"),
    ((2.5, True), r"best_val_step must be an integer in 1\.\.1 .* got True"),
])
def test_a_manifest_with_a_wrong_best_val_is_refused_naming_it(tiny_run, tmp_path, best,
                                                              message):
    """The run's best evaluation (the end-of-run summary's, carried across a resume) is both
    fields or neither; an older manifest has neither and loads."""
    from cllm_gpu import checkpoint as ckpt
    from cllm_gpu.errors import CheckpointError
    edit = lambda s: {**s, "best_val_loss": best[0], "best_val_step": best[1]}  # noqa: E731
    run = _run_with_manifest(tiny_run, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"ckpt-00000001/state\.json: " + message):
        ckpt.verify_checkpoint(run / "ckpt-00000001")
    older = _run_with_manifest(tiny_run, tmp_path / "older", lambda s: {
        k: v for k, v in s.items() if k not in ("best_val_loss", "best_val_step")})
    assert "best_val_loss" not in ckpt.verify_checkpoint(older / "ckpt-00000001")


def test_every_command_refuses_a_bad_manifest_in_one_line(tiny_run, tmp_path, capsys):
    run = _run_with_manifest(tiny_run, tmp_path, lambda s: {**s, "data": "x"})
    no_model = _run_with_manifest(tiny_run, tmp_path / "b", lambda s: {
        k: v for k, v in s.items() if k != "model_config"})  # was KeyError 'model_config'
    # a GPT-2 field missing took ModelConfig's default: n_head 4 instead of the run's 2, no
    # shape changed, and every command ran another model with exit 0
    no_heads = _run_with_manifest(tiny_run, tmp_path / "c", lambda s: {
        **s, "model_config": {k: v for k, v in s["model_config"].items() if k != "n_head"}})
    for r, message in ((run, "data must be a JSON object"), (no_model, "no model_config"),
                       (no_heads, "model_config lacks n_head")):
        for argv in (["train", "--resume", r, "--max-steps", 2, "--sample-tokens", 0],
                     ["sample", r, "--backend", "numpy", "--max-new-tokens", 2],
                     ["eval", r, "--backend", "numpy", "--batches", 1],
                     ["export", r, "--hf", tmp_path / "hf"]):
            assert message in _main_one_line_error(capsys, *argv)
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_recording_no_data_directory_needs_data(tiny_run, data, tmp_path, capsys,
                                                             monkeypatch):
    """--resume of a checkpoint whose state.json records no data directory trained on
    the embedded default corpus (prepared in the working directory) and exited 0; sample and
    eval said 'meta.json: missing'. Now each asks for --data, and --data makes it work."""
    from cllm_gpu import cli
    monkeypatch.chdir(tmp_path)
    run = _run_with_manifest(tiny_run, tmp_path, lambda s: {
        k: v for k, v in s.items() if k != "data"})
    ck = run / "ckpt-00000001"
    for argv in (["train", "--resume", run, "--max-steps", 2, "--sample-tokens", 0],
                 ["sample", run, "--backend", "numpy", "--max-new-tokens", 2],
                 ["eval", run, "--backend", "numpy", "--batches", 1]):
        err = _main_one_line_error(capsys, *argv)
        assert err == f"error: {ck}: the checkpoint records no data directory; give --data"
    assert not (tmp_path / "data").exists()
    assert cli.main(["train", "--resume", str(run), "--data", str(data), "--max-steps", "2",
                     "--sample-tokens", "0"]) == 0


@pytest.mark.parametrize("moved", ["another working directory", "data moved"])
def test_a_recorded_data_directory_not_found_names_the_checkpoint_and_asks_for_data(
        data, tmp_path, capsys, monkeypatch, moved):
    """state.json records --data as train was given it, relative to train's working
    directory. Run from another directory, or with the data moved, resume, sample and eval said
    'data: data directory not found (run `cllm-gpu prepare`)': the data is there, and nothing
    said the path was the checkpoint's or how to give another. Now one line names the
    checkpoint, the recorded path and --data; --data then works."""
    import shutil
    from cllm_gpu import cli
    project = tmp_path / "project"
    shutil.copytree(data, project / "tok")
    monkeypatch.chdir(project)
    # as given: relative where the working directory changes, absolute where the data moves
    given = "tok" if moved == "another working directory" else str(project / "tok")
    assert cli.main(["train", "--data", given, "--out", "run", "--max-steps", "1",
                     *map(str, SMALL)]) == 0
    run, ck = project / "run", project / "run" / "ckpt-00000001"
    if moved == "data moved":
        (project / "tok").rename(project / "tok2")
        data_now, lost = project / "tok2", "not found"
    else:
        monkeypatch.chdir(tmp_path)
        data_now = project / "tok"
        lost = f"not found from {tmp_path} (relative to the directory train ran in)"
    # train last: its new checkpoint records the --data given
    for argv in (["sample", run, "--backend", "numpy", "--max-new-tokens", 2],
                 ["eval", run, "--backend", "numpy", "--batches", 1],
                 ["train", "--resume", run, "--max-steps", 2]):
        err = _main_one_line_error(capsys, *argv)
        assert err == (f"error: {ck}: its data directory, {given}, is {lost}; give --data (the "
                       f"run's token directory)"), err
        assert cli.main([str(a) for a in argv] + ["--data", str(data_now)]) == 0
    assert (run / "ckpt-00000002").is_dir()


def test_a_second_train_into_a_run_directory_in_use_is_refused(data, tmp_path, capsys):
    """Two `train`s writing one run directory at once (a job requeued while the old one still
    runs, a second run started there by mistake before the first's first checkpoint) both ran
    to the end and exited 0: their metrics interleaved in one metrics.jsonl, their checkpoints
    of a step replaced each other's, and the one that said "saved RUN/ckpt-N" first lost its
    run to the other's. The run directory is now its writer's alone: a --resume, a new run and
    an --overwrite there are refused in one line naming the writer, touching nothing; once it
    is gone, the run resumes from its checkpoint."""
    import os
    import signal
    import subprocess
    from clihelp import ROOT
    from cllm_gpu import cli
    run = tmp_path / "run"
    flags = [*map(str, SMALL), "--log-interval", "1", "--checkpoint-interval", "0"]
    assert cli.main(["train", "--data", str(data), "--out", str(run), "--max-steps", "1",
                     *flags]) == 0
    log = tmp_path / "writer.log"  # a file, not a pipe: a full pipe would stall the writer
    with open(log, "w") as out:
        writer = subprocess.Popen(
            [sys.executable, "-m", "cllm_gpu", "train", "--resume", str(run), "--max-steps",
             "100000000", *flags],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while "\nstep " not in log.read_text():  # training on, before its next checkpoint
            assert writer.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        checkpoint = {p.name: p.read_bytes() for p in (run / "ckpt-00000001").iterdir()}
        refusal = (f"error: {run}: another train (pid {writer.pid}) is writing to this run "
                   f"directory; wait for it to end, or give another --out")
        for argv in (["train", "--resume", run, "--max-steps", 3, *flags],
                     ["train", "--data", data, "--out", run, "--max-steps", 3, *flags],
                     ["train", "--data", data, "--out", run, "--max-steps", 3, "--overwrite",
                      *flags]):
            assert _main_one_line_error(capsys, *argv) == refusal
        # the writer's checkpoint as it was, and nothing else written (metrics.jsonl is the
        # writer's, growing)
        assert {p.name: p.read_bytes() for p in (run / "ckpt-00000001").iterdir()} == checkpoint
        assert sorted(p.name for p in run.iterdir()) == [".train-lock", "ckpt-00000001",
                                                         "metrics.jsonl"]  # the writer's lock
        writer.send_signal(signal.SIGTERM)  # saves its checkpoint, then exits 143
        assert writer.wait(timeout=60) == 143, log.read_text()
    finally:
        writer.kill()
        writer.wait()
    stopped_at = max(int(p.name[len("ckpt-"):]) for p in run.glob("ckpt-*"))
    assert stopped_at > 1
    assert cli.main(["train", "--resume", str(run), "--max-steps", str(stopped_at + 1),
                     *flags]) == 0
    assert not (run / ".train-lock").exists()  # removed by the train that held it last


def test_a_run_directory_lock_that_is_a_link_is_refused_not_followed(data, tmp_path, capsys):
    """RUN/.train-lock a link (a run directory synced or tracked by a tool that turns files
    into links, or planted in a shared directory): the lock was opened through it, its
    target truncated and overwritten with the trainer's pid (seen: a file's 'precious data'
    became '1974'). Refused in one line now, the target as it was."""
    import os
    run, target = tmp_path / "run", tmp_path / "precious.txt"
    target.write_text("precious data\n")
    run.mkdir()
    (run / ".train-lock").symlink_to(target)
    assert _main_one_line_error(
        capsys, "train", "--data", data, "--out", run, "--max-steps", 1, *SMALL) == (
        f"error: {run / '.train-lock'}: cannot open the run directory's lock (it is a link: "
        f"remove it)")
    assert target.read_text() == "precious data\n" and os.listdir(run) == [".train-lock"]

def test_resume_of_a_checkpoint_recording_no_train_config(tiny_run, tmp_path, capsys):
    """A state.json without train_config (a checkpoint written by another tool: the check
    takes it, sample and eval read it, the trainer resumes it with the default settings) made
    `train --resume` a KeyError traceback in the note on --max-steps, which read the
    checkpoint's schedule unconditionally. Its schedule unknown, no note compares with it."""
    from cllm_gpu import cli
    run = _run_with_manifest(tiny_run, tmp_path, lambda s: {
        k: v for k, v in s.items() if k != "train_config"})
    assert cli.main(["train", "--resume", str(run), "--max-steps", "2",
                     *map(str, SMALL)]) == 0
    assert (run / "ckpt-00000002").is_dir()
    assert not [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: ")]
    # the other note needs no schedule: still given
    assert cli.main(["train", "--resume", str(run / "ckpt-00000001"), "--out",
                     str(tmp_path / "branch"), "--max-steps", "1", *map(str, SMALL)]) == 0
    assert ("note: the checkpoint is at step 1 and --max-steps is 1: nothing to train (give a "
            "larger --max-steps to continue)") in capsys.readouterr().out.splitlines()


def test_resume_of_a_float64_checkpoint_recording_no_train_config_keeps_its_dtype(
        data, tmp_path, capsys):
    """Without train_config (another tool's checkpoint) the dtype is still recorded, as
    state.json's dtype; --dtype not given took the default float32 and the resume was refused
    'checkpoint dtype float64 differs from --dtype float32', a flag the user never typed. Now
    the checkpoint's dtype is the default; --dtype given with another value is still
    refused."""
    from cllm_gpu import cli
    f64 = tmp_path / "f64"
    assert cli.main(["train", "--data", str(data), "--out", str(f64), "--max-steps", "1",
                     "--dtype", "float64", *map(str, SMALL)]) == 0
    run = _run_with_manifest(f64, tmp_path, lambda s: {
        k: v for k, v in s.items() if k != "train_config"})
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--max-steps", "2", "--sample-tokens",
                     "0"]) == 0, capsys.readouterr().err
    state = json.loads((run / "ckpt-00000002" / "state.json").read_text())
    assert state["dtype"] == state["train_config"]["dtype"] == "float64"
    err = _main_one_line_error(capsys, "train", "--resume", run, "--max-steps", 3, "--dtype",
                               "float32")
    assert err.endswith("checkpoint dtype float64 differs from --dtype float32"), err


def test_model_flags_on_resume_of_a_checkpoint_older_than_the_position_options(tiny_run, tmp_path,
                                                                              capsys):
    """A checkpoint written before attn_bias / pos_emb existed (none in its model_config; it
    resumes as their defaults) made the note on a differing --attn-bias a KeyError traceback."""
    from cllm_gpu import cli
    run = _run_with_manifest(tiny_run, tmp_path, lambda s: {**s, "model_config": {
        k: v for k, v in s["model_config"].items() if k not in ("attn_bias", "pos_emb")}})
    assert cli.main(["train", "--resume", str(run), "--max-steps", "2", "--sample-tokens", "0",
                     "--attn-bias", "alibi"]) == 0
    assert ("note: --attn-bias alibi ignored on --resume: the checkpoint's model has attn_bias "
            "none") in capsys.readouterr().out.splitlines()


# Starts the CLI the way its two entry points do, with a Ctrl-C arriving while `module` is
# first imported (where a real one lands in the first ~0.25 s: NumPy and the package load).
_INTERRUPTED_IMPORT = """
import sys
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
sys.argv = ["cllm-gpu", "train", "--max-steps", "1"]
{start}
"""


def _console_script_start() -> str:
    """What pip's console-script wrapper runs, from pyproject.toml's [project.scripts]."""
    import re
    from clihelp import ROOT
    # (tomllib is Python 3.11+; the package supports 3.10)
    module, func = re.search(r'^cllm-gpu\s*=\s*"([\w.]+):(\w+)"',
                             (ROOT / "pyproject.toml").read_text(), re.M).groups()
    return f"from {module} import {func}\nsys.exit({func}())"


@pytest.mark.parametrize("entry", ["console script", "python -m"])
@pytest.mark.parametrize("module", ["numpy", "cllm_gpu.config", "argparse"])
def test_ctrl_c_while_starting_up_is_one_line_and_exit_130(tmp_path, entry, module):
    """A Ctrl-C during the imports (before main's own handling) printed a KeyboardInterrupt
    traceback and the process died of SIGINT: now one line and exit status 130, as a Ctrl-C
    anywhere else in the CLI."""
    import subprocess
    import sys
    from clihelp import ROOT
    start = (_console_script_start() if entry == "console script" else
             "import runpy\nrunpy.run_module('cllm_gpu', run_name='__main__', alter_sys=True)")
    code = _INTERRUPTED_IMPORT.format(module=module, start=start)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**__import__("os").environ,
                                                    "PYTHONPATH": str(ROOT)})
    assert r.returncode == 130, (r.returncode, r.stderr)
    # no command ran yet: nothing to say of its output (train's line named checkpoints)
    assert r.stderr.splitlines() == ["error: interrupted"], r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_package_names_are_designs_and_import_lazily_once_each():
    """DESIGN.md's Python API (`from cllm_gpu import ModelConfig, CLLMModel, TrainConfig,
    GpuTrainer`) from the lazy package (PEP 562): `import cllm_gpu` loads no NumPy, every name
    of __all__ resolves, and dir() lists each name once. dir() listed each export twice once
    it had been used (in globals() and in the export table both)."""
    import subprocess
    import sys
    from clihelp import ROOT
    code = ("import sys, cllm_gpu\n"
            "assert 'numpy' not in sys.modules, 'import cllm_gpu loaded NumPy'\n"
            "from cllm_gpu import ModelConfig, CLLMModel, TrainConfig, GpuTrainer, CLLMError\n"
            "from cllm_gpu.trainer import GpuTrainer as T\n"
            "assert GpuTrainer is T and CLLMModel.__name__ == 'CLLMModel'\n"
            "ns = {}\n"
            "exec('from cllm_gpu import *', ns)\n"
            "assert set(cllm_gpu.__all__) <= set(ns), set(cllm_gpu.__all__) - set(ns)\n"
            "names = dir(cllm_gpu)\n"
            "assert set(cllm_gpu.__all__) <= set(names)\n"
            "assert len(names) == len(set(names)) and names == sorted(names), names\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr


def test_a_huge_n_layer_is_refused_in_one_line_before_anything_is_built(data, tmp_path,
                                                                        capsys, monkeypatch):
    """--n-layer 100000 spent seconds (CPU) to minutes (GPU) laying out 1.2 million tensors
    before the out-of-memory line, which then said only 'out of memory'. The parameter
    state's size is checked first, by arithmetic, and the line says what it needs."""
    from cllm_gpu import model as model_mod

    def no_layout(cfg):
        raise AssertionError("the layout was built before the size check")
    monkeypatch.setattr(model_mod, "param_layout", no_layout)
    code, err = main_in_process(capsys, "train", "--data", data, "--out", tmp_path / "run",
                                "--n-layer", 100_000, "--max-steps", 1, "--sample-tokens", 0,
                                "--backend", "numpy")
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: the model does not fit: 19,827,") and \
        "of host memory is available (NumPy backend); use a smaller model" in err[0], err
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_eval_is_the_mean_token_loss_over_its_batches(tiny_run, capsys):
    """eval --batches 3 --batch-size 2: the mean next-token loss over 3 batches of 2 windows
    of val.bin drawn with --seed, 3 x 2 x 16 tokens; the model's logits and a log-sum-exp here
    give the same number. Mutation audit: evaluating one batch fewer passed the CLI tests
    (they checked that the loss is finite)."""
    from cllm_gpu import CLLMModel, ModelConfig, cli
    from cllm_gpu import checkpoint as ckpt
    from cllm_gpu.data import TokenDataset
    capsys.readouterr()
    assert cli.main(["eval", str(tiny_run), "--batches", "3", "--batch-size", "2", "--seed",
                     "5", "--backend", "numpy"]) == 0
    rec = json.loads(capsys.readouterr().out)
    ck_dir, state, _ = ckpt.find_resumable(tiny_run)
    model = CLLMModel(ModelConfig.from_dict(state["model_config"]), backend="numpy")
    model.load_state_dict(ckpt.load_model_params(ck_dir, model.specs, state))
    ds, rng, losses = TokenDataset(state["data"]["dir"]), np.random.default_rng(5), []
    for _ in range(3):
        idx, tgt = ds.get_batch("val", 2, model.cfg.block_size, rng)
        z = model.logits(idx).astype(np.float64)
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        losses.append(lse - np.take_along_axis(z, tgt[..., None], -1)[..., 0])
    assert rec["tokens"] == 3 * 2 * model.cfg.block_size == np.size(losses)
    assert rec["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)


def test_eval_rebuilds_the_checkpoints_attention_bias(data, tmp_path, capsys):
    """eval of a lattice / pos_emb none run past its block size is the loss of the model the
    checkpoint describes, bias included, on the same batches. Mutation audit: eval and sample
    rebuilding the model without attn_bias (same parameters, another function) passed the CLI
    tests, which checked only the token count."""
    from cllm_gpu import CLLMModel, ModelConfig, cli
    from cllm_gpu import checkpoint as ckpt
    from cllm_gpu.data import TokenDataset
    out = tmp_path / "lattice"
    assert cli.main(["train", "--data", str(data), "--out", str(out), "--max-steps", "1",
                     *map(str, SMALL), "--attn-bias", "lattice", "--pos-emb", "none"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--seq-len", "32", "--batches", "2", "--batch-size", "2",
                     "--seed", "3", "--backend", "numpy"]) == 0
    rec = json.loads(capsys.readouterr().out)
    ck_dir, state, _ = ckpt.find_resumable(out)

    def eval_loss(model_config):
        model = CLLMModel(ModelConfig.from_dict(model_config), backend="numpy")
        model.load_state_dict(ckpt.load_model_params(ck_dir, model.specs, state))
        ds, rng, total, count = TokenDataset(state["data"]["dir"]), np.random.default_rng(3), 0, 0
        for _ in range(2):
            s, n = model.eval_loss_sum(*ds.get_batch("val", 2, 32, rng))
            total, count = total + float(s), count + n
        return total / count
    assert state["model_config"]["attn_bias"] == "lattice" and rec["tokens"] == 2 * 2 * 32
    assert rec["loss"] == pytest.approx(eval_loss(state["model_config"]), rel=1e-6)
    unbiased = eval_loss({**state["model_config"], "attn_bias": "none"})
    assert rec["loss"] != pytest.approx(unbiased, rel=1e-5)  # the bias moves it (by ~6e-5)


DEEP_JSON = "[" * 100000 + "]" * 100000  # past Python's recursion limit in json.loads
# valid JSON that json.loads refuses with a plain ValueError (Python's int-string limit)
HUGE_INT_JSON = '{"n": ' + "9" * 5000 + "}"


@pytest.mark.parametrize("bad", [DEEP_JSON, HUGE_INT_JSON], ids=["deep", "huge-int"])
@pytest.mark.parametrize("where", ["meta.json", "jsonl", "vocab.json", "config.json",
                                   "tokenizer.json"])
def test_json_nested_too_deep_is_one_line_naming_the_file(tiny_run, data, tmp_path, capsys,
                                                          where, bad):
    """Every JSON file the CLI reads: nesting past the recursion limit is one line naming the
    file (before 2026-12-02 a RecursionError traceback for each of these five), and so is an
    integer of more than 4300 digits (a ValueError traceback from meta.json, a .jsonl line
    and --init-from's config.json before 2026-12-02, the h27j fuzz)."""
    import shutil
    tok = shutil.copytree(data, tmp_path / "tok")
    if where == "meta.json":
        (tok / "meta.json").write_text(bad)
        argv, named = ["train", "--data", tok, "--out", tmp_path / "r"], "meta.json"
    elif where == "jsonl":
        (tmp_path / "deep.jsonl").write_text('{"text": "a"}\n' + bad + "\n")
        argv, named = ["prepare", tmp_path / "deep.jsonl", "--out", tmp_path / "d"], "deep.jsonl:2"
    elif where == "vocab.json":
        pytest.importorskip("tokenizers")  # without it, prepare stops first at "need tokenizers"
        (tmp_path / "vocab.json").write_text(bad)
        (tmp_path / "merges.txt").write_text("#version: 0.2\n")
        argv = ["prepare", data.parent / "t.txt", "--out", tmp_path / "d",
                "--tokenizer", tmp_path / "vocab.json"]
        named = "vocab.json"
    else:
        hf = tmp_path / "hf"
        assert main_in_process(capsys, "export", tiny_run, "--hf", hf)[0] == 0
        (hf / where).write_text(bad)
        argv = ["train", "--init-from", hf, "--data", tok, "--out", tmp_path / "r",
                "--max-steps", "1"]
        named = where
    line = _main_one_line_error(capsys, *argv)
    # one wording per cause, whichever file (h27n: five wordings of the deep case before)
    words = ("JSON nested too deep to read" if bad is DEEP_JSON
             else "JSON integer too long to read (more than 4300 digits)")
    assert f"{named}: {words}" in line, line


@pytest.mark.parametrize("field,value,message", [
    # laid out tensors for 10^12 layers without end (the fuzz's 60 s timeout) before 2026-12-02
    ("n_layer", 10**12, r"model\.safetensors: holds [\d,]+ parameters; the model_config in "
                        r"state\.json implies"),
    # exported 100 wte rows beside the data's 257-token tokenizer, exit 0, before 2026-12-02
    ("vocab_size", 100, r"meta\.json: data vocab_size 257 exceeds the model's 100"),
    # more parameters than the file holds, refused by the count, not later by a missing tensor
    ("n_layer", 2, r"model\.safetensors: holds [\d,]+ parameters; the model_config in "
                   r"state\.json implies"),
])
def test_export_refuses_a_model_config_that_does_not_fit_its_files(tiny_run, tmp_path, capsys,
                                                                   field, value, message):
    """state.json is the manifest, not hashed: an edited model_config is checked against the
    weights it describes and the data it names, and nothing is written."""
    import re
    import shutil
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (ck,) = run.glob("ckpt-*")
    state = json.loads((ck / "state.json").read_text())
    state["model_config"][field] = value
    (ck / "state.json").write_text(json.dumps(state))
    line = _main_one_line_error(capsys, "export", run, "--hf", tmp_path / "hf")
    assert re.search(message, line), line
    assert not (tmp_path / "hf").exists()


def test_init_from_a_config_too_large_for_memory_is_refused_before_the_layout(tiny_run, data,
                                                                              tmp_path, capsys):
    """--init-from with config.json's n_layer 1e300 (an integer-valued float): the memory check
    comes before the tensors are laid out for that config (before 2026-12-02 the layout ran
    for ever: killed at 60 s by the fuzz)."""
    hf = tmp_path / "hf"
    assert main_in_process(capsys, "export", tiny_run, "--hf", hf)[0] == 0
    conf = json.loads((hf / "config.json").read_text())
    conf["n_layer"] = 1e300
    (hf / "config.json").write_text(json.dumps(conf))
    line = _main_one_line_error(capsys, "train", "--init-from", hf, "--data", data,
                                "--out", tmp_path / "r", "--backend", "numpy")
    assert "the model does not fit" in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("key", ["state", "inc"])
@pytest.mark.parametrize("value", [-1, 2**128])
def test_resume_refuses_an_rng_state_out_of_range_in_one_line(tiny_run, tmp_path, capsys, value,
                                                              key):
    """A PCG64 word that is no unsigned 128-bit integer: NumPy raises OverflowError, which
    the restore did not catch (a traceback before 2026-12-02); NumPy 1.x wraps a negative one
    with a DeprecationWarning only, and the resume went on with another stream (exit 0) before
    2026-12-02's fix (fails on numpy 1.24 without trainer._check_pcg64_words)."""
    def edit(s):
        s["rng"]["state"][key] = value
        return s
    run = _run_with_manifest(tiny_run, tmp_path, edit)
    line = _main_one_line_error(capsys, "train", "--resume", run, "--max-steps", "2")
    assert "state.json: bad RNG state" in line, line


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_init_from_weights_holding_nan_or_inf_are_refused_naming_the_tensor(tiny_run, data,
                                                                            tmp_path, capsys,
                                                                            bad):
    """Checkpoints with non-finite numbers are refused on loading; --init-from's weights were
    not: the first step was NaN and the non-finite stop saved the NaN weights as the run's
    'last good state' (ckpt-00000001) before 2026-12-02."""
    from cllm_gpu import safetensors_io
    hf = tmp_path / "hf"
    assert main_in_process(capsys, "export", tiny_run, "--hf", hf)[0] == 0
    tensors, meta = safetensors_io.load_file(hf / "model.safetensors")
    tensors["transformer.h.0.attn.c_attn.weight"][0, 0] = bad
    safetensors_io.save_file(tensors, hf / "model.safetensors", metadata=meta)
    line = _main_one_line_error(capsys, "train", "--init-from", hf, "--data", data,
                                "--out", tmp_path / "r", "--backend", "numpy",
                                "--max-steps", "1")
    assert "model.safetensors: transformer.h.0.attn.c_attn.weight holds NaN or Inf" in line, line
    assert not (tmp_path / "r").exists()


def test_shakespeare_char_preset_is_nanogpts_config_and_its_help_says_so():
    """The preset against nanoGPT's config/train_shakespeare_char.py (weight decay and clip
    from its train.py), every value, and --help's summary of it against the preset. The test
    above reads back only what a 2-step run keeps: the preset's batch size, step count, eval
    and log intervals and prompt could change unnoticed, and --help then described another
    run."""
    import argparse
    from cllm_gpu.cli import PRESETS, build_parser
    nanogpt = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
                   batch_size=64, max_iters=5000, lr_decay_iters=5000, learning_rate=1e-3,
                   min_lr=1e-4, warmup_iters=100, beta2=0.99, weight_decay=1e-1, grad_clip=1.0,
                   eval_interval=250, eval_iters=200, log_interval=10)
    ours_name = dict(max_iters="max_steps", lr_decay_iters="lr_decay_steps",
                     warmup_iters="warmup_steps", eval_iters="eval_batches")
    model, train, prompt = PRESETS["shakespeare-char"]
    ours = {**model, **train}
    assert {k: ours[ours_name.get(k, k)] for k in nanogpt} == nanogpt
    assert prompt == "\n"  # a play's next line, not the default corpus's 'def '
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(next(a.help for a in sub.choices["train"]._actions
                         if a.dest == "preset").split())
    g = lambda k: f"{ours[k]:g}"  # noqa: E731
    summary = (f"{model['n_layer']} layers, {model['n_head']} heads, {model['n_embd']} embd, "
               f"block {model['block_size']}, batch {train['batch_size']}, dropout "
               f"{model['dropout']:g}, lr {g('learning_rate')} -> {g('min_lr')} cosine over "
               f"{train['lr_decay_steps']} steps, warm-up {train['warmup_steps']}, beta2 "
               f"{g('beta2')}, weight decay {g('weight_decay')}, clip {train['grad_clip']:.1f}; "
               f"eval every {train['eval_interval']} steps on {train['eval_batches']} batches")
    assert summary.replace("0.001", "1e-3").replace("0.0001", "1e-4") in text, text
    assert train["max_steps"] == train["lr_decay_steps"]  # "over 5000 steps": the whole run


def test_train_help_states_the_defaults_a_run_gets():
    """Each train flag's "(default X" in --help against the value a run without the flag
    gets (cli._train_config / _model_args, the code path `train` takes). Several defaults are
    written into the help by hand (--dtype float32, --precision fp32, --cuda-graph off,
    --final-checkpoint and --overlap-comm on, --dropout 0): changing the default left the help
    saying the old one, and no test noticed."""
    import argparse
    import re
    from cllm_gpu.cli import _model_args, _train_config, build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    args = parser.parse_args(["train"])
    tc, model = _train_config(args, None).to_dict(), _model_args(args)
    checked = []
    for action in sub.choices["train"]._actions:
        said = re.search(r"\(default ([^;)]+)", action.help or "")
        if said is None or action.dest not in {**tc, **model}:
            continue
        got, said = {**tc, **model}[action.dest], said.group(1)
        if isinstance(got, bool):
            assert said == ("on" if got else "off"), (action.dest, said, got)
        elif isinstance(got, (int, float)):
            assert float(said) == got, (action.dest, said, got)
        else:
            assert said == got, (action.dest, said, got)
        checked.append(action.dest)
    assert {"dtype", "precision", "cuda_graph", "final_checkpoint", "overlap_comm", "dropout",
            "n_layer", "batch_size", "learning_rate", "zero"} <= set(checked)


def test_eval_seq_len_reaches_exactly_the_block_size_with_learned_positions(tiny_run, capsys):
    """block_size + 1 is the first length refused (learned positions exist for block_size
    only); the test above tried 48 against 16, so a bound off by one passed it."""
    assert _main_one_line_error(capsys, "eval", tiny_run, "--seq-len", 17, "--backend",
                                "numpy").startswith(
        "error: --seq-len 17 exceeds the model's block_size 16")
    code, err = main_in_process(capsys, "eval", tiny_run, "--seq-len", 16, "--batches", 1,
                                "--batch-size", 1, "--backend", "numpy")
    assert code == 0 and not err, err


class _CupyError(Exception):
    """Stands in for a CuPy/CUDA exception: main tells those by their module."""


_CupyError.__module__ = "cupy.cuda.runtime"
_CupyOOM = type("OutOfMemoryError", (_CupyError,), {"__module__": "cupy.cuda.memory"})


@pytest.mark.parametrize("error,message", [
    (MemoryError(), "error: out of memory; try a smaller --batch-size or model"),
    (PermissionError(13, "Permission denied", "/x/ckpt"), "error: /x/ckpt: Permission denied"),
    (OSError(28, "No space left on device"), "error: No space left on device"),
    (_CupyError("cudaErrorLaunchFailure"), "error: CUDA: _CupyError: cudaErrorLaunchFailure"),
    (_CupyOOM("2.0 GiB requested"), "error: out of GPU memory (2.0 GiB requested); try a "
                                    "smaller --batch-size or --seq-len, or --grad-accum-steps "
                                    "to keep the batch"),
])
def test_environment_errors_are_one_line(capsys, monkeypatch, error, message):
    """Out of memory, a failed write (with and without a file name) and a CUDA error end any
    command with one line and exit 1, not a traceback (cli._one_line's branches, which the
    coverage audit found run by no test)."""
    import cllm_gpu.cli as cli

    def fail(args):
        raise error
    monkeypatch.setattr(cli, "cmd_gradcheck", fail)
    assert _main_one_line_error(capsys, "gradcheck") == message


def _launch_of_2(run_id=None, restart=0):
    from cllm_gpu import distributed
    return distributed.Launch(0, 2, 0, 2, "torchrun-style", "127.0.0.1", 29500, run_id, restart)


@pytest.mark.parametrize("run_id", [None, "srun 4711.0"])
def test_rank_0s_failure_note_is_its_error_and_its_run(tmp_path, run_id):
    """The note rank 0 leaves for the waiting ranks: its error line, then (with a launcher's
    run id) the run and restart as JSON; written whole (no .part file left), in a directory it
    creates, and read back by _note_run."""
    from cllm_gpu import cli
    note = tmp_path / "data" / "default.prepare-error"
    cli._write_failure_note(note, "data/default: disk full", _launch_of_2(run_id, 3))
    want = ["data/default: disk full"]
    if run_id is not None:
        want.append(cli._NOTE_RUN + json.dumps({"id": run_id, "restart": 3}))
    assert note.read_text().splitlines() == want
    assert [p.name for p in note.parent.iterdir()] == [note.name]
    assert cli._note_run(note) == ({"id": run_id, "restart": 3} if run_id else None)


@pytest.mark.parametrize("in_the_way", ["a file where its directory goes",
                                        "a directory where it goes", "a full disk"])
def test_a_failure_note_that_cannot_be_written_is_left_out_quietly(tmp_path, monkeypatch,
                                                                   in_the_way):
    """Rank 0 is already failing with its own error: a note it cannot write (its directory
    cannot be made, the write or the rename into place fails) raises nothing that would
    replace that error, and leaves no file: no .part, and no half note for a waiting rank to
    read; the waiting ranks' timeout message covers that case."""
    import errno
    from pathlib import Path
    from cllm_gpu import cli
    note = tmp_path / "default.prepare-error"
    if in_the_way.startswith("a file"):
        (tmp_path / "data").write_text("not a directory")
        note = tmp_path / "data" / "default.prepare-error"
    elif in_the_way.startswith("a directory"):
        (note / "inside").mkdir(parents=True)  # os.replace onto a non-empty directory fails
    else:
        write_text = Path.write_text

        def half_then_full(path, text):
            write_text(path, text[:3])
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(Path, "write_text", half_then_full)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cli._write_failure_note(note, "the error", _launch_of_2("torchrun x"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("content", [
    b"\xff\xfe not UTF-8\n",
    b"the error\nrun: {not json\n",
    b"the error\nrun: [\"a list\"]\n",
    b"the error\n",
    # json's decoder: RecursionError (before 2026-12-02 a traceback from a waiting rank)
    b"the error\nrun: " + b"[" * 100_000 + b"\n",
    None,                                           # a directory: IsADirectoryError
])
def test_a_note_that_names_no_readable_run_is_judged_by_its_time(tmp_path, content):
    """_note_run: an unreadable note, one without a run line, or whose run line is not a JSON
    object, names no run (None): the waiting rank falls back on the note's time rather than
    failing with a traceback of its own."""
    from cllm_gpu import cli
    note = tmp_path / "default.prepare-error"
    if content is None:
        note.mkdir()
    else:
        note.write_bytes(content)
    assert cli._note_run(note) is None


def test_ctrl_c_while_the_arguments_are_parsed_is_one_line_and_exit_130(monkeypatch, capsys):
    """main catches a Ctrl-C during build_parser/parse_args (before the command's own
    handling): the same line and exit status as a Ctrl-C in a command, no traceback."""
    import argparse
    from cllm_gpu import cli

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    def main(*argv):
        try:
            return main_in_process(capsys, *argv)
        except KeyboardInterrupt:  # not pytest's own: it would end the session
            pytest.fail("the Ctrl-C escaped main")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", ctrl_c)
    assert main("train", "--max-steps", "1") == (130, ["error: interrupted"])
    monkeypatch.undo()
    monkeypatch.setattr(cli, "build_parser", ctrl_c)
    assert main("train") == (130, ["error: interrupted"])


def test_a_ctrl_c_says_what_the_command_interrupted_left(tiny_run, tmp_path, monkeypatch,
                                                         capsys):
    """A Ctrl-C in prepare or export said 'checkpoints on disk are intact', train's words:
    they write no checkpoints. Now each command's line says what is true of its own output:
    prepare and export write their files under temporary names and put them in place at the
    end, so nothing was written to the directory; sample and eval write nothing."""
    from pathlib import Path
    from cllm_gpu import cli
    (tmp_path / "t.txt").write_text("some text to tokenize " * 20)
    cli.main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "tok")])
    cli.main(["export", str(tiny_run), "--hf", str(tmp_path / "hf")])
    before = {d: {p.name: p.read_bytes() for p in (tmp_path / d).iterdir()}
              for d in ("tok", "hf")}
    write_bytes = Path.write_bytes

    def ctrl_c_at_the_last_file(path, data):
        if ".meta.json." in path.name or ".special_tokens_map.json." in path.name:
            raise KeyboardInterrupt
        return write_bytes(path, data)
    monkeypatch.setattr(Path, "write_bytes", ctrl_c_at_the_last_file)
    (tmp_path / "t.txt").write_text("other text altogether " * 30)
    for argv, line, d in (
            (["prepare", tmp_path / "t.txt", "--out", tmp_path / "tok"],
             f"error: interrupted; nothing written to {tmp_path / 'tok'}", "tok"),
            (["export", tiny_run, "--hf", tmp_path / "hf"],
             f"error: interrupted; nothing written to {tmp_path / 'hf'}", "hf")):
        assert main_in_process(capsys, *argv) == (130, [line])
        assert {p.name: p.read_bytes() for p in (tmp_path / d).iterdir()} == before[d]
    # a new directory: made before the files are written, removed again (until h41f left
    # empty), as export removes the directories it made
    assert main_in_process(capsys, "prepare", tmp_path / "t.txt", "--out", tmp_path / "new") == (
        130, [f"error: interrupted; nothing written to {tmp_path / 'new'}"])
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_load_for_inference", ctrl_c)
    for command in ("sample", "eval"):
        assert main_in_process(capsys, command, tiny_run) == (130, ["error: interrupted"])


def test_a_ctrl_c_between_the_renames_of_prepare_or_export_leaves_nothing_written(
        tiny_run, tmp_path, monkeypatch, capsys):
    """A Ctrl-C landing after prepare's (export's) first rename into place: the line said
    "nothing written to DIR" while DIR held the new first file beside the old others, and the
    temporaries of the rest (h29s). Now the renames done are undone: the line is true."""
    import os
    from cllm_gpu import cli
    (tmp_path / "t.txt").write_text("some text to tokenize " * 20)
    cli.main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "tok")])
    cli.main(["export", str(tiny_run), "--hf", str(tmp_path / "hf")])
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"an older export's weights")
    before = {d: {p.name: p.read_bytes() for p in (tmp_path / d).iterdir()}
              for d in ("tok", "hf")}
    replace, renamed = os.replace, []

    def ctrl_c_after_the_first_rename(src, dst):  # once: the renames back go through
        if len(renamed) == 1:
            renamed.append("interrupted")
            raise KeyboardInterrupt
        replace(src, dst)
        renamed.append(dst)
    (tmp_path / "t.txt").write_text("other text altogether " * 30)
    for argv, d in ((["prepare", tmp_path / "t.txt", "--out", tmp_path / "tok"], "tok"),
                    (["export", tiny_run, "--hf", tmp_path / "hf"], "hf")):
        renamed.clear()
        monkeypatch.setattr(os, "replace", ctrl_c_after_the_first_rename)
        assert main_in_process(capsys, *argv) == (
            130, [f"error: interrupted; nothing written to {tmp_path / d}"])
        monkeypatch.undo()
        assert renamed[1] == "interrupted"
        assert {p.name: p.read_bytes() for p in (tmp_path / d).iterdir()} == before[d]
    # a Ctrl-C once the files are in place (printing the summary) said "nothing written"
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("builtins.print", ctrl_c)
    for argv, d in ((["prepare", tmp_path / "t.txt", "--out", tmp_path / "tok"], "tok"),
                    (["export", tiny_run, "--hf", tmp_path / "hf"], "hf")):
        assert main_in_process(capsys, *argv) == (
            130, [f"error: interrupted; {tmp_path / d} was written in full"])
        assert {p.name: p.read_bytes() for p in (tmp_path / d).iterdir()} != before[d]
        assert not [p for p in (tmp_path / d).iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()


def test_options_without_a_command_print_the_help_and_exit_2(capsys):
    """`cllm-gpu --debug`: arguments, but no subcommand: the help (every command listed) and
    exit 2, as with no arguments at all; not an AttributeError on args.func."""
    from cllm_gpu import cli
    capsys.readouterr()
    assert cli.main(["--debug"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and all(c in out for c in ("train", "export", "prepare"))


def test_sample_from_a_model_larger_than_its_tokenizer_prints_only_its_tokens(data, tmp_path,
                                                                              capsys):
    """A model of 300 ids on byte data (257: train --vocab-size 300 allows it; the extra rows
    are never a target) whose largest logit is id 290: `sample` printed it as '"' (290 & 0xFF),
    exit 0. Found by argv fuzzing. Now only the tokenizer's ids are drawn: 'A', the best of
    them."""
    from cllm_gpu import CLLMModel, ModelConfig, cli
    from cllm_gpu.checkpoint import save_checkpoint
    cfg = ModelConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16)
    sd = CLLMModel(cfg, backend="numpy").state_dict()
    sd["transformer.ln_f.bias"][:] = 1.0
    sd["transformer.wte.weight"][290] = 5.0
    sd["transformer.wte.weight"][ord("A")] = 4.0
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    save_checkpoint(tmp_path / "run", 0, sd, zeros, zeros,
                    {"model_config": cfg.to_dict(), "dtype": "float32",
                     "data": {"dir": str(data)}})
    for temperature in ("0", "0.01"):
        capsys.readouterr()
        assert cli.main(["sample", str(tmp_path / "run"), "--prompt", "the", "--max-new-tokens",
                         "3", "--backend", "numpy", "--temperature", temperature]) == 0
        assert capsys.readouterr().out == "theAAA\n"


@pytest.fixture(scope="module")
def bpe_data(data, tmp_path_factory):
    """The `data` corpus prepared with a BPE of 257 tokens (no merges): as many ids as the
    byte tokenizer's, which mean other tokens (its end-of-text is id 0)."""
    pytest.importorskip("tokenizers")
    from cllm_gpu.data import prepare
    out = tmp_path_factory.mktemp("bpe") / "tok"
    prepare(data.parent / "t.txt", out, tokenizer="bpe", bpe_vocab_size=257)
    return out


def _older_checkpoint(run, tmp_path) -> Path:
    """A copy of `run` whose state.json records no tokenizer (as written before 2026-12-02)."""
    import shutil
    copy = tmp_path / "old"
    shutil.copytree(run, copy)
    for state_json in copy.glob("ckpt-*/state.json"):
        state = json.loads(state_json.read_text())
        del state["data"]["tokenizer"]
        state_json.write_text(json.dumps(state))
    return copy


@pytest.mark.parametrize("cmd", ["sample", "eval"])
def test_sample_and_eval_refuse_data_prepared_with_another_tokenizer(tiny_run, bpe_data, data,
                                                                     tmp_path, capsys, cmd):
    """`sample RUN --data OTHER` (and eval) where OTHER's tokenizer is not the run's (here a BPE
    as large as the byte tokenizer) decoded the byte model's ids with the BPE, exit 0. Found by
    argv fuzzing. The checkpoint records its tokenizer (state.json data.tokenizer): refused
    in one line naming both. Other data with the run's tokenizer still evaluates; a checkpoint
    written before tokenizers were recorded works as before, with a note."""
    err = _main_one_line_error(capsys, cmd, tiny_run, "--backend", "numpy", "--data", bpe_data)
    assert err.startswith(f"error: {bpe_data} was prepared with another tokenizer (bpe, vocab "
                          f"257, end-of-text 0, SHA-256 ") and err.endswith(
        f"than the run {sorted(tiny_run.glob('ckpt-*'))[-1]} was trained with (byte, vocab 257, "
        f"end-of-text 256): its ids mean other tokens; give --data a token directory prepared "
        f"with the run's tokenizer"), err
    other = tmp_path / "other"
    other.mkdir()
    (other / "o.txt").write_text("an other corpus, the same byte tokenizer. " * 100)
    assert main_in_process(capsys, "prepare", other / "o.txt", "--out", other / "tok")[0] == 0
    code, err = main_in_process(capsys, cmd, tiny_run, "--backend", "numpy", "--data",
                                other / "tok")
    assert code == 0 and not err
    old = _older_checkpoint(tiny_run, tmp_path)
    code, err = main_in_process(capsys, cmd, old, "--backend", "numpy", "--data", bpe_data)
    assert code == 0 and len(err) == 1 and err[0].startswith("note: ") and err[0].endswith(
        f"the checkpoint records no tokenizer (written before they were recorded): {bpe_data}'s "
        f"tokenizer is taken as the run's unchecked"), err
    code, err = main_in_process(capsys, cmd, old, "--backend", "numpy")  # its own: no note
    assert code == 0 and not err


def test_resume_refuses_data_prepared_with_another_tokenizer(tiny_run, bpe_data, tmp_path,
                                                             capsys):
    """train --resume --data OTHER with another tokenizer trained the byte model on the BPE's
    ids; refused now, before anything is written (an older checkpoint: as before)."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    err = _main_one_line_error(capsys, "train", "--resume", run, "--data", bpe_data,
                               "--max-steps", 2, "--backend", "numpy")
    assert f"error: {bpe_data} was prepared with another tokenizer (bpe" in err
    assert len(list(run.glob("ckpt-*"))) == 1


def _write_other_data(data_dir, other):
    """A `prepare` of another tokenizer landing in `data_dir`: `other`'s files renamed in, its
    meta.json last."""
    from cllm_gpu import data as data_module
    files = {p.name: p.read_bytes() for p in sorted(Path(other).iterdir())
             if p.name != "meta.json"}
    data_module.write_files(Path(data_dir), {**files,
                                             "meta.json": (other / "meta.json").read_bytes()})


def _re_prepared_after_the_check(monkeypatch, module, data_dir, other):
    """`module`'s check_run_tokenizer, then a re-prepare of `data_dir` with `other`'s files the
    moment the check has passed: landing between the check and the opening of the data."""
    check = module.check_run_tokenizer

    def check_then_re_prepare(*args):
        note = check(*args)
        _write_other_data(data_dir, other)
        return note
    monkeypatch.setattr(module, "check_run_tokenizer", check_then_re_prepare)


def _re_prepared_after_the_opening(monkeypatch, module, data_dir, other):
    """`module`'s TokenDataset, then a re-prepare of `data_dir` with `other`'s files the moment
    the first one has opened it: landing between the opening of the data and the check."""
    opened = []

    class OpenedThenRePrepared(module.TokenDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not opened:
                opened.append(self)
                _write_other_data(data_dir, other)
    monkeypatch.setattr(module, "TokenDataset", OpenedThenRePrepared)


# where a re-prepare with another tokenizer lands: each side of the one read of meta.json
RE_PREPARED = {"after the check": _re_prepared_after_the_check,
               "after the opening": _re_prepared_after_the_opening}


@pytest.mark.parametrize("when", RE_PREPARED)
def test_resume_trains_on_the_data_whose_tokenizer_it_checked(tiny_run, data, bpe_data,
                                                               tmp_path, capsys, monkeypatch,
                                                               when):
    """train --resume checked the run's tokenizer against one read of meta.json, then opened
    the token directory, which read meta.json again: a re-prepare with another tokenizer
    landing between the two passed the check, and the run trained the byte model on the
    BPE's ids (its next checkpoint recorded the BPE). Now the check is of the meta.json the
    opened token files came with: the run trains on the data it checked, wherever the
    re-prepare lands (mutation audit: a second read of meta.json for the check, refusing the
    data it trains on or passing other data, passed every test of the first side)."""
    import shutil
    from cllm_gpu import checkpoint as ckpt
    from cllm_gpu import trainer
    run, data_dir = tmp_path / "run", tmp_path / "tok"
    shutil.copytree(tiny_run, run)
    shutil.copytree(data, data_dir)
    (state_json,) = run.glob("ckpt-*/state.json")
    trained_with = json.loads(state_json.read_text())["data"]["tokenizer"]
    RE_PREPARED[when](monkeypatch, trainer, data_dir, bpe_data)
    code, err = main_in_process(capsys, "train", "--resume", run, "--data", data_dir,
                                "--max-steps", 2, "--backend", "numpy")
    assert code == 0, err
    assert json.loads((data_dir / "meta.json").read_text())["tokenizer"] == "bpe"  # it landed
    newest = ckpt.list_checkpoints(run)[0]
    assert newest.name == "ckpt-00000002"
    assert json.loads((newest / "state.json").read_text())["data"]["tokenizer"] == trained_with


@pytest.mark.parametrize("when", RE_PREPARED)
@pytest.mark.parametrize("cmd", ["sample", "eval"])
def test_sample_and_eval_read_the_data_whose_tokenizer_they_checked(tiny_run, data, bpe_data,
                                                                    tmp_path, capsys,
                                                                    monkeypatch, cmd, when):
    """sample and eval (cli._load_for_inference) had the same two reads of meta.json: a
    re-prepare between them passed the tokenizer check and the byte model's ids were decoded
    with, or scored against, the BPE's. Now they read the data they checked, wherever the
    re-prepare lands: the output is the output on the run's own data."""
    import shutil
    from cllm_gpu import cli
    from cllm_gpu import data as data_module
    argv = [str(a) for a in (cmd, tiny_run, "--backend", "numpy")]
    if cmd == "sample":
        argv += ["--max-new-tokens", "8"]
    capsys.readouterr()
    assert cli.main(argv + ["--data", str(data)]) == 0
    want = capsys.readouterr().out
    data_dir = tmp_path / "tok"
    shutil.copytree(data, data_dir)
    RE_PREPARED[when](monkeypatch, data_module, data_dir, bpe_data)
    assert cli.main(argv + ["--data", str(data_dir)]) == 0
    got = capsys.readouterr().out
    assert json.loads((data_dir / "meta.json").read_text())["tokenizer"] == "bpe"  # it landed
    if cmd == "eval":  # the data directory is named in the report
        got = got.replace(str(data_dir), str(data))
    assert got == want


@pytest.mark.parametrize("cmd", ["train", "sample", "eval"])
def test_data_of_a_larger_vocabulary_is_refused_naming_its_tokenizer_first(tiny_run, data,
                                                                           tmp_path, capsys,
                                                                           cmd):
    """Data whose vocabulary exceeds the model's (ids 700 of 1,000 in it): of another
    tokenizer than the run's, the error names the tokenizer (the reason the sizes differ),
    not the sizes; with a checkpoint that records no tokenizer, the sizes (resume, sample and
    eval alike: the model has no row for such an id). Mutation audit: the sizes checked
    before the tokenizer, and sample/eval not checking them at all, passed every test."""
    import shutil
    wide = tmp_path / "wide"
    shutil.copytree(data, wide)
    meta = json.loads((wide / "meta.json").read_text())
    meta["vocab_size"] = 1000
    (wide / "meta.json").write_text(json.dumps(meta))
    ids = np.fromfile(wide / "val.bin", dtype=np.uint16)
    ids[3] = 700
    ids.tofile(wide / "val.bin")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    argv = {"train": ["--max-steps", 2], "sample": ["--max-new-tokens", 4], "eval": []}[cmd]
    first = ["train", "--resume"] if cmd == "train" else [cmd]
    err = _main_one_line_error(capsys, *first, run, "--backend", "numpy", "--data", wide, *argv)
    assert err.startswith(f"error: {wide} was prepared with another tokenizer (byte, vocab "
                          f"1,000, end-of-text 256) than the run "), err
    old = _older_checkpoint(tiny_run, tmp_path)
    code, err = main_in_process(capsys, *first, old, "--backend", "numpy", "--data", wide,
                                *argv)
    assert code == 1 and err[-1] == (f"error: {wide / 'meta.json'}: data vocab_size 1000 "
                                     f"exceeds the model's vocab_size 257"), err
    assert len(list(run.glob("ckpt-*"))) == 1 and len(list(old.glob("ckpt-*"))) == 1


def test_a_recorded_tokenizer_of_the_wrong_shape_is_refused(tiny_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (state_json,) = run.glob("ckpt-*/state.json")
    state = json.loads(state_json.read_text())
    state["data"]["tokenizer"] = {"tokenizer": "byte", "vocab_size": "257", "eot_id": 256}
    state_json.write_text(json.dumps(state))
    err = _main_one_line_error(capsys, "sample", run, "--backend", "numpy")
    assert err.startswith(f"error: {run}: no complete, verified checkpoint in it (skipped ") \
        and "data.tokenizer must be a JSON object with tokenizer (a string), vocab_size (an " \
        "integer >= 1)" in err, err


# the final LayerNorm's weight and bias, finite in the checkpoint: logits of ~1e5 (a loss
# whose exp overflows), or of ~1e39 (past float32: the loss is not finite)
@pytest.mark.parametrize("ln_f,want_loss_finite", [((1e6, 0.0), True), ((0.0, 3e38), False)])
def test_eval_of_a_diverged_model_prints_strict_json(tiny_run, tmp_path, capsys, ln_f,
                                                     want_loss_finite):
    """eval printed json.dumps' NaN for a diverged model (finite weights so large that the
    logits overflow: loss NaN) and Infinity for the perplexity of a loss past ~709; neither
    is JSON (jq refuses the line). Now a number that is not finite is null, and a loss that
    is not finite gets one note on stderr saying why (before 2026-12-02 a bare null)."""
    from cllm_gpu import CLLMModel, ModelConfig, cli
    from cllm_gpu import checkpoint as ckpt
    ck_dir, state, _ = ckpt.find_resumable(tiny_run)
    specs = CLLMModel(ModelConfig.from_dict(state["model_config"]), backend="numpy").specs
    _, params, m, v = ckpt.load_checkpoint(ck_dir, specs, state)
    params["transformer.ln_f.weight"] = params["transformer.ln_f.weight"] * np.float32(ln_f[0])
    params["transformer.ln_f.bias"] = np.full_like(params["transformer.ln_f.bias"], ln_f[1])
    params["transformer.wte.weight"] = params["transformer.wte.weight"] * np.float32(100)
    run = tmp_path / "diverged"
    keep = {k: w for k, w in state.items() if k not in ("format", "version", "step", "files")}
    ckpt.save_checkpoint(run, state["step"], params, m, v, keep)
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--batches", "1", "--batch-size", "1",
                     "--backend", "numpy"]) == 0
    out, err = capsys.readouterr()
    rec = strict_json_loads(out)
    assert rec["perplexity"] is None                       # exp(loss) overflows either way
    assert (rec["loss"] is not None) == want_loss_finite
    assert err == ("" if want_loss_finite else
                   "note: the loss is not finite (null above): the checkpoint's weights have "
                   "diverged; evaluate an earlier checkpoint\n")
    if want_loss_finite:
        assert rec["loss"] > 709.8


def test_train_checks_the_final_samples_prompt_with_the_tokenizer_it_trains_with(
        data, tmp_path, capsys, monkeypatch):
    """train's pre-flight loaded the final sample's tokenizer from a read of meta.json of its
    own, the trainer opened the data with another: a prepare of another tokenizer landing
    between the two (here a word-level tokenizer without 'zzz' or an unknown token, replacing
    the byte data) passed the prompt on the byte tokenizer, the run trained on the word-level
    data and the final sample failed after the whole run (a checkpoint written, exit 1). Now
    the prompt is checked with the tokenizer of the data the run opened, before step 1, and
    that tokenizer is the one the final sample uses."""
    import shutil
    tk = pytest.importorskip("tokenizers")
    from cllm_gpu import data as data_module
    tok = tk.Tokenizer(tk.models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2}))
    tok.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "words.json"))
    (tmp_path / "w.txt").write_text("a b a a b " * 200)
    data_module.prepare(tmp_path / "w.txt", tmp_path / "words",
                        tokenizer=str(tmp_path / "words.json"))
    words = {p.name: p.read_bytes() for p in (tmp_path / "words").iterdir()}
    data_dir, out = tmp_path / "tok", tmp_path / "run"
    shutil.copytree(data, data_dir)
    read_meta, second = data_module.read_meta, []

    def re_prepared_after_the_first_read(where):
        meta = read_meta(where)
        if not second:  # a thread: a reader holding the directory's lock keeps it waiting
            second.append(RacingThread(data_module.write_files, data_dir, words))
            second[0].start(monkeypatch)
        return meta
    lock = data_module.directory_lock

    def the_prepare_landed_before_the_next_reader(where, shared, **kwargs):
        if shared and second:  # the next reader comes after it, not before (flock's choice)
            second[0].finish()
        return lock(where, shared, **kwargs)
    monkeypatch.setattr(data_module, "read_meta", re_prepared_after_the_first_read)
    monkeypatch.setattr(data_module, "directory_lock",
                        the_prepare_landed_before_the_next_reader)
    code, err = main_in_process(capsys, "train", "--data", data_dir, "--out", out,
                                "--max-steps", 1, *SMALL, "--sample-tokens", 5,
                                "--prompt", "zzz")
    second[0].finish()
    assert json.loads((data_dir / "meta.json").read_text())["tokenizer"] == "file"  # it landed
    assert (code, err, out.exists()) == (
        1, ["error: the file tokenizer cannot encode 'zzz' (WordLevel error: Missing [UNK] "
            "token from the vocabulary); give the final sample another --prompt, or "
            "--sample-tokens 0"], False)


def test_a_resume_of_a_run_whose_writer_has_not_checkpointed_yet_names_the_writer(
        data, tmp_path, capsys):
    """`train --resume RUN` while another train writes RUN and has saved no checkpoint yet
    said "RUN: no complete, verified checkpoint in it", as of a broken run, where the same
    resume a moment after the writer's first checkpoint names it (docs/usage.md: a --resume
    there is refused in one line naming that pid). Seen with a writer started 2 s before.
    Now it names the writer; with no writer the error stays, and the probe leaves no lock
    file."""
    import os
    from cllm_gpu.trainer import lock_run_dir, unlock_run_dir
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"type": "start", "step": 0, "tokens": 0}\n')
    held = lock_run_dir(run)  # a writer in its first steps (flock: another open file conflicts)
    try:
        refusal = (f"error: {run}: another train (pid {os.getpid()}) is writing to this run "
                   f"directory; wait for it to end, or give another --out")
        for argv in (["train", "--resume", run, "--max-steps", 3, *SMALL],
                     ["train", "--resume", "--out", run, "--max-steps", 3, *SMALL]):
            assert _main_one_line_error(capsys, *argv) == refusal
    finally:
        unlock_run_dir(held, run)
    assert _main_one_line_error(capsys, "train", "--resume", run, "--max-steps", 3, *SMALL) == (
        f"error: {run}: no complete, verified checkpoint in it")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("argv", [
    ["sample", "{run}", "--backend", "numpy", "--num-samples", 3, "--max-new-tokens", 20],
    ["eval", "{run}", "--backend", "numpy", "--batches", 1],
    ["prepare", "{data}/../t.txt", "--out", "{tmp}/tok"],
    ["export", "{run}", "--hf", "{tmp}/hf"],
    ["gradcheck", "--n-layer", 1],
])
def test_a_stdout_reader_that_has_gone_ends_a_command_quietly(tiny_run, data, tmp_path, argv):
    """`cllm-gpu sample RUN | head -1`: head exits after its line and the next write to stdout
    gets EPIPE. That was "error: Broken pipe", exit 1, as if the command had failed. Now no
    line, and exit 141 (128 + SIGPIPE): what a shell reports for `git log | head -1`, `seq
    100000 | head -1` and any producer the closed pipe ended, so `set -o pipefail` sees the
    same. The reader here is gone before the command writes its first line."""
    import os
    import subprocess
    argv = [str(a).format(run=tiny_run, data=data, tmp=tmp_path) for a in argv]
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    # stdout block-buffered, as a shell's pipe has it: under PYTHONUNBUFFERED (set here and in
    # many CI images) every print met the closed pipe itself, and a command whose lines were
    # still buffered at its end (exit 120, "Exception ignored ... BrokenPipeError") passed
    # (mutation audit: main's flush removed)
    env.pop("PYTHONUNBUFFERED", None)
    try:
        r = subprocess.run([sys.executable, "-m", "cllm_gpu", *argv], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == "", (r.returncode, r.stderr)


STDOUT_FAILED_LINE = ("error: stdout: {}; the lines from then on were dropped, the command "
                      "itself ran to its end")


@pytest.mark.parametrize("stdout", ["/dev/full", "closed"])
@pytest.mark.parametrize("argv", [
    ["train", "--data", "{data}", "--out", "{tmp}/run", "--backend", "numpy", "--max-steps", 3,
     "--n-layer", 1, "--n-embd", 32, "--n-head", 2, "--block-size", 16, "--batch-size", 2,
     "--sample-tokens", 4],
    ["prepare", "{data}/../t.txt", "--out", "{tmp}/tok"],
    ["sample", "{run}", "--backend", "numpy", "--max-new-tokens", 5],
    ["export", "{run}", "--hf", "{tmp}/hf"],
])
def test_a_stdout_that_fails_drops_its_lines_and_the_work_goes_on(tiny_run, data, tmp_path,
                                                                   argv, stdout):
    """`cllm-gpu train ... > log` on a full disk (/dev/full here; EIO alike), or started with
    stdout closed (`>&-`): train's first progress line raised, "error: No space left on
    device" (or an AttributeError traceback with stdout closed), exit 1, and the run ended
    without its checkpoint; prepare's last line said the same error about data it had written
    in full. Now stdout's lines are dropped, the work ends as it would, and one line on stderr
    names stdout, exit 1."""
    import os
    import subprocess
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    argv = [str(a).format(run=tiny_run, data=data, tmp=tmp_path) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("PYTHONUNBUFFERED", None)
    command = [sys.executable, "-m", "cllm_gpu", *argv]
    if stdout == "closed":
        r = subprocess.run(["sh", "-c", '"$@" >&-', "sh", *command], stderr=subprocess.PIPE,
                           text=True, env=env, timeout=300)
        reason = "closed (no file descriptor 1)"
    else:
        with open("/dev/full", "w") as full:
            r = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=env,
                               timeout=300)
        reason = "No space left on device"
    assert (r.returncode, r.stderr.splitlines()) == (1, [STDOUT_FAILED_LINE.format(reason)])
    if argv[0] == "train":
        assert (tmp_path / "run" / "ckpt-00000003").is_dir()
    if argv[0] == "prepare":
        assert json.loads((tmp_path / "tok" / "meta.json").read_text())["documents"] >= 1
    if argv[0] == "export":
        assert (tmp_path / "hf" / "config.json").is_file()


def test_a_broken_pipe_is_taken_for_stdouts_reader_gone_only_where_it_is():
    """A command ends quietly (141) on a BrokenPipeError only where stdout's reader has gone:
    one of another pipe or a socket, stdout still read, stays an error (mutation audit:
    taking every BrokenPipeError for stdout's passed every test)."""
    import os
    import subprocess
    code = ("import sys; from cllm_gpu.errors import stdout_reader_gone; "
            "sys.stderr.write(str(stdout_reader_gone()))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    read = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=60)
    assert read.stderr == "False"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        gone = subprocess.run([sys.executable, "-c", code], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=60)
    finally:
        os.close(write_end)
    assert gone.stderr == "True"


def test_init_from_a_config_json_the_model_refuses_is_one_line_naming_it(data, tmp_path,
                                                                        capsys):
    """An --init-from config.json whose values the model refuses (n_embd not divisible by
    n_head) names the file and its fields: no flag sets them there (mutation audit: flag
    naming looking up every field the error names was a KeyError traceback here, with every
    test passing)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 300, "n_positions": 16, "n_embd": 10,
         "n_layer": 1, "n_head": 3}))
    err = _main_one_line_error(capsys, "train", "--init-from", hf, "--data", data, "--out",
                               tmp_path / "r", "--backend", "numpy")
    assert err == f"error: {hf / 'config.json'}: n_embd (10) must be divisible by n_head (3)"


def test_flag_naming_leaves_a_path_holding_a_field_name_alone(data, tmp_path, capsys):
    """_naming_flags put the flag in place of the first bare word spelled like the field: an
    --init-from directory named padded_vocab_size became `--padded-vocab-size/config.json` in
    the line (a path the user never had), the field itself left unnamed."""
    hf = tmp_path / "models" / "padded_vocab_size"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 300, "n_positions": 16, "n_embd": 16,
         "n_layer": 1, "n_head": 2}))
    err = _main_one_line_error(capsys, "train", "--init-from", hf, "--data", data, "--out",
                               tmp_path / "r", "--backend", "numpy", "--padded-vocab-size", 100)
    assert err == (f"error: {hf / 'config.json'}: --padded-vocab-size (100) must be >= "
                   f"vocab_size (300)")


def test_usage_md_says_which_train_defaults_the_python_api_and_the_cli_differ_in():
    """TrainConfig's defaults (batch 8, lr 1e-3, ...) are not `cllm-gpu train`'s (batch 16,
    lr 2e-3, ...): usage.md's Python API section names both sets; its numbers must be the
    code's, and every field that differs must be named."""
    from cllm_gpu.cli import DEFAULT_TRAIN
    from cllm_gpu.config import TrainConfig
    from clihelp import ROOT
    text = " ".join((ROOT / "docs" / "usage.md").read_text().split())
    para = re.search(r"`TrainConfig\(\)`'s defaults are its own.*?are the same in both\.",
                     text).group(0)
    api = dict(re.findall(r"`(\w+)` (\d[\d.e-]*)", para.split("where")[0]))
    tc = TrainConfig()
    differ = {k for k, v in DEFAULT_TRAIN.items() if getattr(tc, k) != v}
    assert set(api) == differ
    assert all(float(v) == getattr(tc, k) for k, v in api.items()), api
    said = re.search(r"batch (\S+), lr (\S+) -> (\S+), warm-up (\S+), (\S+) steps, eval every "
                     r"(\S+) steps on (\S+) batches, a line every (\S+), a checkpoint every "
                     r"(\d+)", para.split("where")[1]).groups()
    fields = ("batch_size", "learning_rate", "min_lr", "warmup_steps", "max_steps",
              "eval_interval", "eval_batches", "log_interval", "checkpoint_interval")
    assert [float(v) for v in said] == [DEFAULT_TRAIN[k] for k in fields]
