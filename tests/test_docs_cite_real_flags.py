"""The commands and flags the front page (README.md) and the command reference (docs/usage.md)
name exist: `cllm-gpu COMMAND --flag` shown in a code span or a code block must be a flag of
that command's parser, and any other --flag in them a flag of some command (or of the other
programs they show: docker, srun). A flag renamed or removed leaves the documents teaching a
command line that exits 2. And README keeps its two set-up commands, exactly."""
import argparse
import os
import re
from pathlib import Path

from cllm_gpu.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/usage.md")
# flags of the other programs the documents' command lines show (docker run, srun)
OTHER_PROGRAMS = {"--gpus", "--ipc", "--entrypoint", "--ntasks-per-node", "--gpus-per-node"}
FLAG = r"(?<![\w-])--[a-z][a-z0-9-]*"


def command_options() -> dict:
    """{command: its option strings} from the CLI's own parser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for a in p._actions for o in a.option_strings}
            for name, p in sub.choices.items()}


def command_lines(text: str) -> list:
    """What the text shows as command lines: each line of a fenced code block (its `# ...`
    comment cut), and each code span, a span broken over lines joined with spaces."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    lines = [line.split(" #")[0] for b in blocks for line in b.splitlines()]
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return lines + [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def misnamed(text: str, options: dict) -> list:
    """The commands and flags `text` names that the CLI does not have."""
    wrong = []
    for line in command_lines(text):
        # each command's flags run to the end of its command: the next cllm-gpu command on the
        # line, or a shell separator (`... && docker run --gpus all ...`), whose flags are
        # another program's; the command's own must all be its parser's, docker's or srun's
        # names included (`cllm-gpu train --gpus 2` exits 2)
        for command, rest in re.findall(
                r"\bcllm-gpu ([a-z]+)((?:(?!\bcllm-gpu |&&|[|;])[^\n])*)", line):
            if command not in options:
                wrong.append(f"cllm-gpu {command}")
                continue
            wrong += [f"cllm-gpu {command} {f}" for f in re.findall(FLAG, rest)
                      if f not in options[command]]
    known = set().union(*options.values()) | OTHER_PROGRAMS
    wrong += sorted(set(re.findall(FLAG, text)) - known)
    return wrong


def test_misnamed_finds_a_wrong_command_and_flags():
    options = {"train": {"--data", "--out", "--no-cuda-graph"}, "eval": {"--split"},
               "sample": {"--seed"}}
    text = ("`cllm-gpu train --data D --split val` and `cllm-gpu evaluate RUN`; then\n"
            "```bash\ncllm-gpu train --no-cuda-graph --out R   # --split is eval's\n"
            "cllm-gpu sample RUN --out X\n```\n"
            "and `--bogus`, `docker run --gpus all cllm-gpu train --data D`; a span broken\n"
            "over lines: `cllm-gpu eval RUN\n--data D`; two commands on a line:\n"
            "`cllm-gpu train --out R && cllm-gpu sample R --split val --seed 1`; not flags:\n"
            "a--b, ---; another program's flag given to a command, and after one:\n"
            "`cllm-gpu train --gpus 2`, `cllm-gpu train --out R && docker run --gpus all x`,\n"
            "`cllm-gpu sample R | srun --ntasks-per-node 2 y`,\n"
            "`cllm-gpu eval R; srun --gpus-per-node 1 z`")
    assert misnamed(text, options) == ["cllm-gpu sample --out",   # the code block's lines
                                       "cllm-gpu train --split", "cllm-gpu evaluate",
                                       "cllm-gpu eval --data", "cllm-gpu sample --split",
                                       "cllm-gpu train --gpus", "--bogus"]


def test_front_page_and_usage_name_real_commands_and_flags():
    options = command_options()
    wrong = {doc: w for doc in DOCS if (w := misnamed((REPO / doc).read_text(), options))}
    assert not wrong, f"documents name commands or flags the CLI does not have: {wrong}"


def set_up_commands(readme: str) -> list:
    """The commands of the first bash block under README's "## Two commands", comments and
    comment-only lines left out."""
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```bash\n(.*?)^```", section, re.M | re.S).group(1)
    return [c for line in block.splitlines() if (c := line.split("#")[0].strip())]


def test_set_up_commands_sees_every_command_of_the_block():
    """A third command added to README's set-up block is seen (then refused below)."""
    readme = ("# x\n## Two commands\n\n```bash\n./a.sh   # one\n         # more about it\n"
              "./b.sh\n./c.sh   # a third\n```\n\n```bash\n./d.sh\n```\n## Next\n"
              "```bash\n./e.sh\n```\n")
    assert set_up_commands(readme) == ["./a.sh", "./b.sh", "./c.sh"]


def test_readme_keeps_exactly_the_two_set_up_commands():
    """The project's rule: README's set-up is these two commands, which work on a fresh
    machine with only Python 3.10+."""
    commands = set_up_commands((REPO / "README.md").read_text())
    assert commands == ["./scripts/train.sh", "./scripts/test.sh"]
    for script in commands:
        assert os.access(REPO / script, os.X_OK), f"{script} is not executable"
