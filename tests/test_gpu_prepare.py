"""scripts/gpu_prepare.sh in a scratch checkout (the script writes .whl/ at its repository's
root, so it is copied there rather than run on this one's): the commit stamp, and the refusal
of a .whl over the device tool's carry limit, which would otherwise cost a machine start."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@pytest.fixture
def checkout(tmp_path):
    """A git checkout with the Dockerfile's NVTX pin and the script, and a wheel of that
    version already in .whl (so nothing is downloaded)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_prepare.sh", repo / "scripts")
    (repo / "Dockerfile").write_text("ARG NVTX_VERSION=0.2.17\n")
    (repo / ".gitignore").write_text("/.whl/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], cwd=repo, check=True)
    (repo / ".whl").mkdir()
    (repo / ".whl" / "nvtx-0.2.17-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"w" * 1000)
    return repo


def prepare(repo, **env):
    return subprocess.run(["bash", str(repo / "scripts" / "gpu_prepare.sh")], cwd=repo,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "python3", **env})


def test_prepare_stamps_the_commit_and_fits_the_carry_limit(checkout):
    r = prepare(checkout)
    assert r.returncode == 0, r.stdout + r.stderr
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=checkout,
                          capture_output=True, text=True).stdout.strip()
    assert (checkout / ".whl" / "COMMIT").read_text().strip() == head
    assert "ready: pass carry" in r.stdout


def test_prepare_refuses_a_whl_over_the_carry_limit(checkout):
    with open(checkout / ".whl" / "big.whl", "wb") as f:   # sparse: 65 MiB apparent size
        f.truncate(65 * 1024 * 1024)
    r = prepare(checkout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "over the device tool's carry limit of 64 MiB" in r.stderr, r.stderr
    assert "ready:" not in r.stdout
    # the limit is the bytes carried, however small the file: a 1 MiB limit refuses 65 MiB,
    # and a 2 KiB .whl passes a 1 MiB one
    (checkout / ".whl" / "big.whl").unlink()
    assert prepare(checkout, CARRY_LIMIT_MIB="1").returncode == 0
