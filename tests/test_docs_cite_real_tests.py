"""Every test a document names exists: README.md and docs/ cite tests as the evidence of a
claim (docs/reliability.md's fault table, docs/benchmarks.md's GPU checks owed), and a test
renamed or removed leaves the claim citing nothing."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# names a document uses as examples of the form, not as citations (docs/gpu.md)
ILLUSTRATIVE = {"test_fixture", "test_x_cuda", "test_y"}


def cited_test_names(text: str) -> set:
    """The test names `text` cites: a name with a parametrization ("test_x[bert]") or a file
    ("tests/test_x.py") by its stem; a pattern ("test_dropout_*") as its prefix and "*"."""
    found = re.findall(r"(?<![\w.-])(test_[A-Za-z0-9_]+\*?)", text)
    return set(found) - ILLUSTRATIVE


def exists(name: str, defined: set) -> bool:
    if name.endswith("*"):
        return any(d.startswith(name[:-1]) for d in defined)
    return name in defined


def defined_test_names() -> set:
    names = set()
    for path in (REPO / "tests").rglob("*.py"):
        names.add(path.stem)
        names.update(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", path.read_text(), re.M))
    return names


def test_cited_test_names_finds_a_citation_and_leaves_out_examples():
    text = ("shown by `test_a_thing[bert]` and tests/test_file.py::test_other and "
            "`test_dropout_*`; see test_fixture.py and my_test_thing")
    assert cited_test_names(text) == {"test_a_thing", "test_file", "test_other",
                                      "test_dropout_*"}
    assert exists("test_dropout_*", {"test_dropout_rate"})
    assert not exists("test_dropout_*", {"test_attention_dropout_rate"})
    assert not exists("test_renamed", {"test_renamed_since"})


def test_every_test_a_document_cites_exists():
    defined = defined_test_names()
    missing = {}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for name in sorted(n for n in cited_test_names(doc.read_text())
                           if not exists(n, defined)):
            missing.setdefault(str(doc.relative_to(REPO)), []).append(name)
    assert not missing, f"documents cite tests that do not exist: {missing}"
