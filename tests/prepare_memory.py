"""prepare's peak memory, measured in a Python of its own (its peak is then its own)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# the peak (VmHWM, kB) over the memory resident when prepare starts (VmRSS, kB). Not
# ru_maxrss: Linux carries the parent's peak into it across fork and exec (under xdist a
# worker's, some 70 MB: 84 "bytes a token" of a true 14)
_SCRIPT = """\
import json, re, sys
import tokenizers
from cllm_gpu.data import prepare
def kb(field):
    status = open('/proc/self/status').read()
    return int(re.search(field + r':\\s*(\\d+) kB', status)[1])
before = kb('VmRSS')
meta = prepare(sys.argv[1], sys.argv[2], tokenizer=sys.argv[3])
print(json.dumps({'grown': (kb('VmHWM') - before) * 1024,
                  'tokens': meta['train_tokens'] + meta['val_tokens']}))
"""


def prepare_peak_growth(src, out, tokenizer) -> tuple[int, int]:
    """(bytes the peak grew by while `prepare(src, out, tokenizer=...)` ran, tokens written);
    skips where Linux's /proc/self/status is missing."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc/self/status (the memory resident now)")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(src), str(out), str(tokenizer)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    return result["grown"], result["tokens"]
