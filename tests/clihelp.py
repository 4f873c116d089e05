"""Run the CLI in a subprocess, as a user would, or in this process (no interpreter start-up)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None, timeout=300, env=None):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "cllm_gpu", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=e)


def assert_one_line_error(r, pattern):
    import re
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr
    assert re.search(pattern, lines[0]), lines[0]


def main_in_process(capsys, *argv):
    """cli.main in this process: (exit status, the non-empty stderr lines)."""
    from cllm_gpu import cli
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    return code, [l for l in capsys.readouterr().err.splitlines() if l]


def strict_json_loads(text):
    """json.loads as jq and other strict parsers read: NaN, Infinity and -Infinity refused
    (what json.dumps writes for non-finite floats; cllm-gpu's writers write null)."""
    import json

    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)
