"""pyproject promises Python 3.10 (requires-python >= 3.10) and CI's suite runs on 3.11: this
installs the package with its runtime dependencies only (numpy, threadpoolctl) into a fresh
3.10 venv and runs a short real workload there: every cllm_gpu module imported, then `prepare`
(bytes), `train` a few steps of a tiny model on the NumPy backend, `sample` and `eval`. A use of
3.11 (`import tomllib`, `except*`, ...) anywhere in the package fails it. CI requires it
(`py310` in CLLM_CI_REQUIRE); elsewhere it skips when no Python 3.10 is found."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what `pip install .` reads (pyproject's packages, package-dir and readme)
SOURCES = ("pyproject.toml", "README.md", "cllm_gpu", "kernels_cu")
SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
         "--batch-size", "2", "--eval-interval", "0", "--sample-tokens", "0",
         "--backend", "numpy"]
NO_INDEX = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
            "No matching distribution found")


def _is_python310(exe) -> bool:
    """A pyenv shim on the PATH exists but fails ('command not found') unless pyenv selects
    that version: only an interpreter that runs and says 3.10 counts."""
    try:
        r = subprocess.run([str(exe), "-c", "import sys; print(sys.version_info[:2])"],
                           capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return r.returncode == 0 and r.stdout.strip() == "(3, 10)"


def find_python310():
    """A CPython 3.10: pyenv's versions (PYENV_ROOT, else ~/.pyenv), then python3.10 on the
    PATH; None when there is none."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    candidates = sorted(pyenv.glob("3.10.*/bin/python3.10"), reverse=True)
    on_path = shutil.which("python3.10")
    candidates += [Path(on_path)] if on_path else []
    return next((exe for exe in candidates if _is_python310(exe)), None)


def _run(cmd, cwd, timeout=120):
    # no PYTHONPATH: the installed copy is the one imported, not the checkout's
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["CLLM_CPU_THREADS"] = "1"
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"{cmd[1:4]} exited {r.returncode}:\n{r.stdout}\n{r.stderr[-4000:]}"
    return r.stdout


def _package_modules() -> list:
    """Every module of the checkout's cllm_gpu, as dotted names."""
    names = []
    for path in sorted((ROOT / "cllm_gpu").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _install(python310, tmp_path) -> Path:
    """A fresh venv of `python310` with the package (a copy of the checkout's sources, so the
    build writes nothing into the checkout) and its runtime dependencies: its python."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([str(python310), "-m", "venv", str(tmp_path / "venv")], check=True,
                   timeout=120)
    python = tmp_path / "venv" / "bin" / "python"
    # as a user installs it: pip builds the wheel in its own environment (setuptools>=61)
    r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(src)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and any(s in r.stderr for s in NO_INDEX):
        pytest.skip(f"no package index reachable for numpy/threadpoolctl: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-4000:]
    return python


@pytest.mark.slow
@pytest.mark.ci_required("py310")
def test_the_package_installs_and_trains_on_python_310(tmp_path):
    python310 = find_python310()
    if python310 is None:
        pytest.skip("no Python 3.10 found (pyenv's versions/3.10.*, python3.10 on the PATH)")
    python = _install(python310, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    modules = _package_modules()
    imported = _run([python, "-c", "import importlib, json, sys\n"
                     f"mods = [importlib.import_module(m) for m in {modules!r}]\n"
                     "print(json.dumps([sys.version_info[:2], mods[0].__file__]))"], work)
    version, init_file = json.loads(imported)
    assert version == [3, 10]
    assert Path(init_file).is_relative_to(tmp_path / "venv"), init_file  # not the checkout's

    (work / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    cli = [python, "-m", "cllm_gpu"]
    assert "unigram entropy" in _run([*cli, "prepare", "corpus.txt", "--out", "tok"], work)
    out = _run([*cli, "train", "--data", "tok", "--out", "run", "--max-steps", "3",
                "--log-interval", "1", *SMALL], work)
    assert "using NumPy backend" in out and "step      3/3" in out, out
    assert _run([*cli, "sample", "run", "--max-new-tokens", "8", "--prompt", "the",
                 "--backend", "numpy"], work).startswith("the")
    record = json.loads(_run([*cli, "eval", "run", "--batches", "1", "--batch-size", "2",
                              "--backend", "numpy"], work))
    assert record["step"] == 3 and 0 < record["loss"] < 10, record
