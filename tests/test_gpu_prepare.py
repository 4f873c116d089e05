"""scripts/gpu_prepare.sh in a scratch checkout (the script writes .whl/ at its repository's
root, so it is copied there rather than run on this one's): the commit stamp, and the refusal
of a call whose travelling tree (tracked and untracked-not-ignored files, shared/, the carried
paths) is over the device tool's 64 MiB, which would otherwise cost a machine start."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


@pytest.fixture
def checkout(tmp_path):
    """A git checkout with the Dockerfile's NVTX pin and the script, and a wheel of that
    version already in .whl (so nothing is downloaded)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_prepare.sh", repo / "scripts")
    (repo / "Dockerfile").write_text("ARG NVTX_VERSION=0.2.17\n")
    (repo / ".gitignore").write_text("/.whl/\n/data/\n/runs/\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "x"], cwd=repo, check=True)
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


def sparse(path, mib):
    """A file of `mib` MiB apparent size (sparse: no disk used)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(mib * 1024 * 1024)


def test_prepare_refuses_a_whl_over_the_carry_limit(checkout):
    """Half a MiB over the device tool's 64 MiB is refused, which the device tool would refuse
    at the cost of a machine start (mutation audit: a check with a MiB of slack, the limit
    taken as 65 MiB, passed the old 65 MiB case here)."""
    with open(checkout / ".whl" / "big.whl", "wb") as f:
        f.truncate(64 * 1024 * 1024 + 512 * 1024)
    r = prepare(checkout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "over the device tool's limit of 64 MiB" in r.stderr, r.stderr
    assert "carried 64.5 MiB" in r.stderr, r.stderr
    assert "ready:" not in r.stdout
    # the limit is the bytes that travel, however small the file: a 2 KiB .whl (and the
    # tiny tree) passes a 1 MiB limit
    (checkout / ".whl" / "big.whl").unlink()
    assert prepare(checkout, TREE_LIMIT_MIB="1").returncode == 0


def test_prepare_counts_the_whole_tree_that_travels_not_the_carry_alone(checkout):
    """The device tool's 64 MiB is for tracked and untracked-not-ignored files, shared/ and
    the carried paths together (/work/.library/device/README.md, Limits): 40 MiB untracked
    beside a 30 MiB wheel is refused, though each is under 64 MiB. Seen passing (exit 0) with
    the old check, which measured .whl alone."""
    sparse(checkout / ".whl" / "big.whl", 30)
    sparse(checkout / "notes" / "trace.bin", 40)          # untracked, not ignored: travels
    r = prepare(checkout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "70.0 MiB would travel (tree 40.0 MiB, carried 30.0 MiB)" in r.stderr, r.stderr
    (checkout / "notes" / "trace.bin").unlink()
    sparse(checkout / "runs" / "ckpt.bin", 40)            # ignored and not carried: stays
    r = prepare(checkout)
    assert r.returncode == 0, r.stdout + r.stderr
    # shared/ travels, ignored or not (ignored here: counted as shared/, not as untracked)
    with open(checkout / ".gitignore", "a") as f:
        f.write("/shared/\n")
    sparse(checkout / "shared" / "big.bin", 40)
    r = prepare(checkout)
    assert r.returncode == 1 and "tree 40.0 MiB" in r.stderr, r.stdout + r.stderr


def test_prepare_counts_a_tree_with_a_tracked_file_deleted(checkout):
    """A tracked file deleted in the tree (a change not yet committed) does not travel and
    counts nothing; du's complaint about it must not stop the script (set -e, pipefail)."""
    (checkout / "old.txt").write_text("x" * 5000)
    subprocess.run(["git", "add", "old.txt"], cwd=checkout, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "old"], cwd=checkout, check=True)
    (checkout / "old.txt").unlink()
    r = prepare(checkout)
    assert r.returncode == 0 and "ready: pass carry" in r.stdout, r.stdout + r.stderr


def test_prepare_takes_the_limit_in_mib(checkout):
    """64 MiB is 67,108,864 bytes: a 63.5 MiB carry with the tiny tree fits (a limit read
    as 64 MB, 61.0 MiB, refused it)."""
    with open(checkout / ".whl" / "big.whl", "wb") as f:
        f.truncate(63 * 1024 * 1024 + 512 * 1024)
    r = prepare(checkout)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prepare_carries_and_counts_the_shakespeare_text_when_it_is_there(checkout):
    r = prepare(checkout)
    assert 'pass carry [".whl"]' in r.stdout, r.stdout
    sparse(checkout / "data" / "tinyshakespeare" / "input.txt", 40)
    r = prepare(checkout)
    assert r.returncode == 0 and 'pass carry [".whl", "data/tinyshakespeare"]' in r.stdout, \
        r.stdout + r.stderr
    sparse(checkout / ".whl" / "big.whl", 30)
    r = prepare(checkout)
    assert r.returncode == 1 and "carried 70.0 MiB" in r.stderr, r.stdout + r.stderr
    # CARRY names the list instead: without the text it fits; a path not there is refused
    assert prepare(checkout, CARRY=".whl").returncode == 0
    r = prepare(checkout, CARRY=".whl data/nothing")
    assert r.returncode == 1 and "carried path 'data/nothing' is not there" in r.stderr, r.stderr


def test_records_name_the_stamped_commit_where_the_copy_holds_an_older_git(checkout,
                                                                           monkeypatch):
    """On the H200 (2026-12-04) the device's copy held the .git of the session's first commit
    while its files were one commit later; the records named that tree "<first>+dirty" since
    gpu_env asked git first. The stamp gpu_prepare.sh writes is the tree's commit: it comes
    first, and git's other view is given beside it."""
    import importlib
    import sys
    sys.path.insert(0, str(ROOT / "scripts"))
    gpu_env = importlib.import_module("gpu_env")
    monkeypatch.delenv("CLLM_COMMIT", raising=False)
    monkeypatch.setattr(gpu_env, "ROOT", checkout)

    def rev(ref="HEAD"):
        return subprocess.run(["git", "rev-parse", "--short=12", ref], cwd=checkout,
                              capture_output=True, text=True, check=True).stdout.strip()
    first = rev()
    assert gpu_env.source_commit() == first  # no stamp: git's view
    (checkout / "Dockerfile").write_text("ARG NVTX_VERSION=0.2.17\n# changed\n")
    subprocess.run([*GIT, "commit", "-q", "-am", "second"], cwd=checkout, check=True)
    second = rev()
    assert prepare(checkout).returncode == 0
    assert gpu_env.source_commit() == second  # stamp and git agree
    # the device's copy: the second commit's files under the first commit's .git
    subprocess.run(["git", "reset", "-q", "--soft", first], cwd=checkout, check=True)
    assert gpu_env.source_commit() == f"{second} (git here: {first}+dirty)"
