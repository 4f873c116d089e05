"""pyproject promises Python 3.10 and later (requires-python >= 3.10) and CI's suite runs on
3.11: this installs the package with its runtime dependencies only (numpy, threadpoolctl) into a
fresh venv of Python 3.10 (the oldest accepted), with each dependency at its lowest allowed
release series (numpy 1.24, threadpoolctl 3.1), and of 3.13 (the newest the machine kind
carries) with the newest, and runs a short real workload there: every cllm_gpu module imported, then `prepare`
(bytes), `train` a few steps of a tiny model on the NumPy backend, `sample` and `eval`. A use of
3.11 (`import tomllib`, `except*`, ...) fails on 3.10; a stdlib module or behaviour removed
later (3.12: distutils, 3.13: the dead batteries) fails on 3.13. CI requires each where the
machine kind carries it (`py310`, `py313` in CLLM_CI_REQUIRE, set by .ci/run when pyenv has the
version); elsewhere a missing interpreter is a skip with its reason."""
import json
import os
import re
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
# pip's words for an index it cannot reach ("No matching distribution found" alone is also
# what a bound no release meets says: that must fail, not skip as offline)
NO_INDEX = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution")


def _is_python(exe, version: str) -> bool:
    """A pyenv shim on the PATH exists but fails ('command not found') unless pyenv selects
    that version: only an interpreter that runs and says `version` ("3.10") counts."""
    try:
        r = subprocess.run([str(exe), "-c", "import sys; print(sys.version_info[:2])"],
                           capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return r.returncode == 0 and r.stdout.strip() == str(tuple(map(int, version.split("."))))


def find_python(version: str):
    """A CPython `version` ("3.10"): pyenv's versions (PYENV_ROOT, else ~/.pyenv), then
    python3.10 on the PATH; None when there is none."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    candidates = sorted(pyenv.glob(f"{version}.*/bin/python{version}"), reverse=True)
    on_path = shutil.which(f"python{version}")
    candidates += [Path(on_path)] if on_path else []
    return next((exe for exe in candidates if _is_python(exe, version)), None)


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


def lowest_runtime_pins() -> dict:
    """pyproject's runtime dependencies at their lower bounds: {"numpy": "1.24", ...}."""
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', deps))
    assert pins and len(pins) == deps.count('"') // 2, f"a dependency without a >= bound: {deps}"
    return pins


def _install(interpreter, tmp_path, pins=None) -> Path:
    """A fresh venv of `interpreter` with the package (a copy of the checkout's sources, so the
    build writes nothing into the checkout) and its runtime dependencies (the newest, or each
    in the release series of `pins`, {"numpy": "1.24"}): its python."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([str(interpreter), "-m", "venv", str(tmp_path / "venv")], check=True,
                   timeout=120)
    python = tmp_path / "venv" / "bin" / "python"
    # as a user installs it: pip builds the wheel in its own environment (setuptools>=61)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}.*\n" for n, v in (pins or {}).items()))
    r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints),
                        str(src)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and any(s in r.stderr for s in NO_INDEX):
        pytest.skip(f"no package index reachable for numpy/threadpoolctl: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-4000:]
    return python


@pytest.mark.slow
@pytest.mark.parametrize("version", [
    pytest.param("3.10", marks=pytest.mark.ci_required("py310")),
    pytest.param("3.13", marks=pytest.mark.ci_required("py313"))])
def test_the_package_installs_and_trains_on_the_oldest_and_newest_python(version, tmp_path):
    """The oldest Python with the oldest runtime dependencies pyproject allows (numpy 1.24:
    NumPy 1's promotion rules, reprs and deprecations), the newest with the newest."""
    interpreter = find_python(version)
    if interpreter is None:
        pytest.skip(f"no Python {version} found (pyenv's versions/{version}.*, "
                    f"python{version} on the PATH)")
    pins = lowest_runtime_pins() if version == "3.10" else {}
    python = _install(interpreter, tmp_path, pins)
    work = tmp_path / "work"
    work.mkdir()
    modules = _package_modules()
    imported = _run([python, "-c", "import importlib, json, sys\n"
                     f"mods = [importlib.import_module(m) for m in {modules!r}]\n"
                     "from importlib.metadata import version\n"
                     f"deps = {{n: version(n) for n in {sorted(pins)!r}}}\n"
                     "print(json.dumps([sys.version_info[:2], mods[0].__file__, deps]))"], work)
    imported_version, init_file, deps = json.loads(imported)
    assert imported_version == [int(v) for v in version.split(".")]
    for name, lowest in pins.items():  # the pins took: each in its lowest release series
        assert (deps[name] + ".").startswith(lowest + "."), (name, deps[name])
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
