"""scripts/train.sh starts its demo run over in runs/default (--overwrite) each time, but never
discards a run the user names with --out: that one is trained as `cllm-gpu train --out` trains,
refused where it already holds checkpoints.

The script runs in a copy of the repository's scripts whose .venv is already "installed" (its
stamp in place, its python and cllm-gpu this interpreter and this checkout), so nothing is
installed and no GPU is looked for."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "2", "--eval-interval", "0", "--sample-tokens", "0"]


@pytest.fixture
def script_root(tmp_path):
    (tmp_path / "scripts").mkdir()
    for name in ("train.sh", "_setup_venv.sh"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, tail in (("python", '"$@"'), ("cllm-gpu", '-m cllm_gpu "$@"')):
        (bin_dir / name).write_text(f'#!/bin/bash\nPYTHONPATH="{ROOT}" exec "{sys.executable}" '
                                    f'{tail}\n')
        (bin_dir / name).chmod(0o755)
    cksum = subprocess.run(["cksum", str(tmp_path / "pyproject.toml")], capture_output=True,
                           text=True, check=True).stdout.split()[0]
    (tmp_path / ".venv" / f".cllm-installed-{cksum}-").touch()  # _setup_venv.sh: installed
    return tmp_path


def _train_sh(root, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EXTRAS")}
    env["PATH"] = "/usr/bin:/bin"  # no nvidia-smi: no cuda12 extra to install
    return subprocess.run(["bash", str(root / "scripts" / "train.sh"), *TINY, *args], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def _checkpoints(run: Path):
    return sorted(p.name for p in run.glob("ckpt-*"))


@pytest.mark.parametrize("out_flag", [["--out", "runs/mine"], ["--out=runs/mine"]])
def test_a_run_named_with_out_is_not_discarded(script_root, out_flag):
    first = _train_sh(script_root, "--max-steps", "2", *out_flag)
    assert first.returncode == 0, first.stdout + first.stderr
    run = script_root / "runs" / "mine"
    assert _checkpoints(run) == ["ckpt-00000002"]
    again = _train_sh(script_root, "--max-steps", "1", *out_flag)
    # refused as cllm-gpu train refuses it, not started over (which deleted ckpt-00000002)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "already holds checkpoints" in again.stderr
    assert _checkpoints(run) == ["ckpt-00000002"]


def test_the_demo_run_starts_over_each_time(script_root):
    for steps in ("2", "1"):
        proc = _train_sh(script_root, "--max-steps", steps)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _checkpoints(script_root / "runs" / "default") == ["ckpt-00000001"]


@pytest.mark.parametrize("resume_flag", [["--resume"], ["--resume=runs/default"]])
def test_resume_continues_the_demo_run(script_root, resume_flag):
    proc = _train_sh(script_root, "--max-steps", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # --resume=DIR too (it was given --overwrite beside it: "exclude each other")
    proc = _train_sh(script_root, "--max-steps", "2", *resume_flag)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from runs/default/ckpt-00000001 at step 1" in proc.stdout
    assert _checkpoints(script_root / "runs" / "default") == ["ckpt-00000001", "ckpt-00000002"]


def test_a_venv_left_without_pip_is_made_again(tmp_path):
    """On Debian/Ubuntu without python3-venv, `python3 -m venv .venv` makes .venv/bin/python,
    then fails at ensurepip ("install python3-venv ... recreate your virtual environment").
    After the user installs python3-venv, the next ./scripts/train.sh must make the venv again:
    it only looked for .venv/bin/python, so it ran that pip-less python's `-m pip` and failed
    with "No module named pip" on every run after."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "_setup_venv.sh", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    pipless = bin_dir / "python"  # what the failed `python3 -m venv` left behind
    pipless.write_text('#!/bin/bash\n[ "$1" = -m ] && [ "$2" = pip ] && '
                       '{ echo "$0: No module named pip" >&2; exit 1; }\nexit 0\n')
    pipless.chmod(0o755)
    # the interpreter the script is given, now able to make a venv: its `-m venv .venv` puts
    # a python with pip there, which records the pip commands it is given
    fake_python3 = tmp_path / "python3"
    fake_python3.write_text(
        f'#!/bin/bash\nif [ "$1" = -m ] && [ "$2" = venv ]; then\n'
        f'  echo "venv $*" >> "{log}"\n'
        f"  printf '#!/bin/bash\\necho \"$*\" >> \"{log}\"\\n' > .venv/bin/python\n"
        f'  exit 0\nfi\nexec "{sys.executable}" "$@"\n')
    fake_python3.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EXTRAS")}
    env.update(PATH="/usr/bin:/bin", PYTHON=str(fake_python3))  # no nvidia-smi: no cuda12
    proc = subprocess.run(["bash", "-c", "source scripts/_setup_venv.sh; echo set-up"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "set-up" in proc.stdout, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("venv -m venv"), calls
    assert "-m pip install --quiet -e ." in calls, calls
    assert list((tmp_path / ".venv").glob(".cllm-installed-*")), "no install stamp"


@pytest.mark.parametrize("python3, found", [
    ('#!/bin/bash\n[ "$1" = --version ] && { echo "Python 3.8.18"; exit 0; }\nexit 1\n',
     "python3 is Python 3.8.18"),
    (None, "python3 is not found")])
def test_an_old_or_missing_python3_is_named_with_the_way_to_give_another(tmp_path, python3,
                                                                          found):
    """Where python3 is older than 3.10 (Ubuntu 20.04's 3.8 beside a python3.11), the script said
    only "cllm-gpu needs Python 3.10+", not which interpreter it had tried nor that PYTHON names
    another; where there is no python3 at all, bash's "command not found"."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "_setup_venv.sh", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "cat", "cksum", "cut", "head"):  # what the script runs first
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if python3 is not None:
        (bin_dir / "python3").write_text(python3)
        (bin_dir / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EXTRAS", "PYTHON")}
    env["PATH"] = str(bin_dir)
    proc = subprocess.run([shutil.which("bash"), "-c", "source scripts/_setup_venv.sh; echo set-up"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "set-up" not in proc.stdout, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cllm-gpu needs Python 3.10+"), lines
    assert found in lines[0] and "PYTHON=python3.12" in lines[0], lines
    assert not (tmp_path / ".venv").exists()
