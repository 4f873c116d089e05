"""The one-line JSON result of an emulator script run in a process of its own (the fake CuPy
replaces `cupy` there): {name: outcome} for each of its checks or scenarios."""
import json
import subprocess
import sys

import pytest


def script_results(script, names, what="check"):
    """Run `script`; its last stdout line as a dict, whose keys must be `names` (the test's
    parametrization and the script's list must not drift apart)."""
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=900)
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"no result line (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    assert sorted(out) == sorted(names), f"the {what} list and the script differ"
    return out
