import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory):
    """Factory: token_dir(text) -> a prepared (byte-tokenized) data directory of that text."""
    from cllm_gpu.data import prepare

    def make(text: str, name: str = "data") -> Path:
        d = tmp_path_factory.mktemp(name)
        (d / "corpus.txt").write_text(text)
        prepare(d / "corpus.txt", d / "tok")
        return d / "tok"
    return make
