"""The CI guard of tests/conftest.py: a test marked ci_required(x) that skips fails when x is
in CLLM_CI_REQUIRE, and skips (with its reason printed) otherwise."""
import ast
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).parent / "conftest.py"
INNER = '''
import pytest

@pytest.mark.ci_required("torch")
def test_needs_a_missing_module():
    pytest.importorskip("a_module_that_is_not_installed")

def test_plain():
    pass
'''


def _run(tmp_path, env_value):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {"PATH": "/usr/bin:/bin", "CLLM_CI_REQUIRE": env_value}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p",
                           "no:cacheprovider", str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)


def test_a_required_skip_fails_and_an_optional_one_skips_with_its_reason(tmp_path):
    r = _run(tmp_path, "nvrtc,torch")
    assert r.returncode == 1, r.stdout
    assert "1 failed, 1 passed" in r.stdout
    assert "required in CI ('torch' is in CLLM_CI_REQUIRE) but skipped" in r.stdout
    assert "a_module_that_is_not_installed" in r.stdout
    r = _run(tmp_path, "nvrtc")
    assert r.returncode == 0, r.stdout
    assert "1 passed, 1 skipped" in r.stdout and "SKIPPED" in r.stdout


def _module_level_skips(path: Path) -> list:
    """Lines of `path` that skip the whole module while it is imported (pytest.importorskip or
    pytest.skip as a top-level statement)."""
    lines = []
    for node in ast.parse(path.read_text()).body:
        call = getattr(node, "value", None)
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr in ("importorskip", "skip")
                and isinstance(call.func.value, ast.Name) and call.func.value.id == "pytest"):
            lines.append(node.lineno)
    return lines


def test_no_test_module_outside_tests_gpu_skips_itself_at_import():
    """A module skipped while it is collected has no test report, so the guard above never sees
    it: tests/test_bench_scripts.py's `torch = pytest.importorskip("torch")` skipped the whole
    file in a CI that required torch, and CI passed. (tests/gpu skips everywhere without a GPU.)"""
    found = {p.name: n for p in sorted(Path(__file__).parent.glob("test_*.py"))
             if (n := _module_level_skips(p))}
    assert found == {}, f"module-level skips (skip inside the tests, with ci_required): {found}"
