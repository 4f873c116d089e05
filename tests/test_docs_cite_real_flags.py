"""The command lines the documents (README.md and every docs/*.md) show take the flags they
give them, long (`--flag`) and short (`-n`): `cllm-gpu COMMAND --flag` (or `python -m cllm_gpu
COMMAND`) a flag of that command's parser; `scripts/X.py --flag` (with or without a python
before it) a flag of that script's own parser (its build_parser()); `scripts/X.sh --flag` a flag
its usage names, or of the command it hands its arguments to; another program's flag (docker,
srun, torchrun, nsys, pytest ...) one of the few the documents use, listed below with where.
Prose that gives flags to a program by name ("train's `--resume`", "`--pos-emb`, also on
`gradcheck`") gives it flags it has; any other --flag in a document must be a flag of one of
these. A flag renamed or removed leaves the documents teaching a command line that exits 2. A
finding names its document and line. And README keeps its two set-up commands, exactly."""
import argparse
import bisect
import functools
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cllm_gpu.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
FLAG = r"(?<![\w-])--[a-z][a-z0-9-]*"
# a short option on a command line (`-n 8`, `-rfEs`, `-n2`, nvcc's `-ptx`); not a path's or a
# word's dash (`a-b`, `/x-y`, `host:-1`)
SHORT = r"(?<![\w./=:-])-[A-Za-z]\w*"

# The flags of the programs that are not this repository's that the documents use, each as
# "the documents that use it: what for"; a flag not here is not taken on trust, and one that
# its documents no longer use leaves the list (test_every_other_programs_flag_is_used).
OTHER_PROGRAMS = {
    "docker": {
        "--gpus": "usage.md, docker.md, distributed.md: docker run --gpus all",
        "--ipc": "usage.md, distributed.md: --ipc=host, NCCL's shared memory",
        "--shm-size": "distributed.md: the other way to give NCCL shared memory",
        "--entrypoint": "usage.md, distributed.md: mpiexec in the image; docker.md: nsys",
        "--rm": "docker.md: docker run --rm",
        "--user": "docker.md: docker run --user \"$(id -u):$(id -g)\"",
        "--build-arg": "docker.md: docker build --build-arg BASE_IMAGE=...",
        "--cap-add": "docker.md: --cap-add=SYS_ADMIN for the GPU's performance counters",
        "-t": "usage.md, docker.md: docker build -t cllm-gpu (docker.md also docker stop -t)",
        "-v": "usage.md, docker.md, distributed.md: docker run -v HOST:CONTAINER, the mounts",
    },
    "srun": {
        "--nodes": "distributed.md: srun --nodes 2",
        "--ntasks-per-node": "usage.md, distributed.md: a rank per GPU",
        "--gpus-per-node": "usage.md, distributed.md: srun --gpus-per-node 8",
        "--export": "distributed.md: --export ALL,MASTER_ADDR=...",
        "--kill-on-bad-exit": "distributed.md: one rank's failure ends the job",
    },
    "torchrun": {
        "--standalone": "distributed.md: the run id torchrun makes with it",
        "--master-port": "distributed.md: likewise",
        "--rdzv-id": "distributed.md: a job's rendezvous id, the run id",
        "--max-restarts": "distributed.md: the restarts torchrun's store outlives",
    },
    "nsys": {
        "--trace": "docker.md: nsys profile --trace=cuda,nvtx,cublas",
        "--sample": "docker.md: nsys profile --sample=none",
        "--report": "docker.md: nsys stats --report nvtx_sum",
        "-o": "docker.md: nsys profile -o /checkpoints/cllm-prof",
    },
    "ncu": {
        "--cache-control": "benchmarks.md, gpu.md: profile.sh's ncu --cache-control none",
        "--log-file": "benchmarks.md: profile.sh's ncu --log-file",
    },
    "compute-sanitizer": {
        "--print-limit": "benchmarks.md, gpu.md: gpu_session.sh's --print-limit 1000",
    },
    "mpiexec": {"-n": "usage.md, distributed.md, reliability.md: mpiexec -n 8, a rank each"},
    "mpirun": {"-n": "distributed.md: mpirun -n 8, Open MPI's name for mpiexec"},
    "hf": {"--local-dir": "finetune.md: hf download ... --local-dir gpt2"},
    "nvcc": {"--fmad": "emulator.md: nvcc's --fmad=true, the FMAs the emulator follows",
             "-ptx": "performance.md: nvcc -ptx, the PTX of a kernel"},
    "gcc": {"--coverage": "emulator.md: the emulated kernels built with --coverage -O0"},
    "pytest": {"-q": "gpu.md: python -m pytest -q tests/test_gpu_session.py"},
    # and pytest's options the repository's plugins add (plugin_options), -h and --help
}
OTHER_COMMANDS = "|".join(p for p in OTHER_PROGRAMS if p != "pytest")
# scripts/X.sh that hand the arguments their usage does not name to a command (their header
# says so): the other flags they take are that command's
SCRIPT_PASSES_ON = {
    "train.sh": "cllm-gpu train",   # "Extra arguments go to `cllm-gpu train`"
    "profile.sh": "cllm-gpu train",  # "[PROFILE_DIR] [extra `cllm-gpu train` flags]"
    "test.sh": "pytest",            # "Extra arguments go to pytest."
}
# gpu_session.sh's environment knobs that hold another command's flags (its header's list)
ENV_ARGS = {"BENCH_ARGS": "bench.py", "KERNELS_ARGS": "bench_kernels.py",
            "SMOKE_ARGS": "gpu_kernel_smoke.py", "PROFILE_ARGS": "cllm-gpu train",
            "SHAKESPEARE_ARGS": "cllm-gpu train", "SHAKESPEARE_PREPARE_ARGS": "cllm-gpu prepare"}


@dataclass
class Program:
    """What a command line can give a program: its options, and its commands' options where it
    has commands (cllm-gpu train, gpu_session_report.py stage); a command's flags are its own
    and the program's."""
    options: set
    commands: dict = field(default_factory=dict)


def from_parser(parser: argparse.ArgumentParser) -> Program:
    def options(p):
        return {o for a in p._actions for o in a.option_strings}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = {name: options(p) for s in subs for name, p in s.choices.items()}
    return Program(options(parser), commands)


def load_build_parser(path: Path) -> Program:
    """The script's or module's parser, from its build_parser(), without running its main."""
    source = path.read_text()
    if "argparse" not in source:
        return Program(set())   # takes no flags
    assert "def build_parser(" in source, (
        f"{path.relative_to(REPO)} parses its arguments but has no build_parser() to read "
        "its flags from")
    if str(SCRIPTS) not in sys.path:   # the scripts import their neighbours (gpu_env)
        sys.path.insert(0, str(SCRIPTS))
    if path.parent.name == "cllm_gpu":
        module = importlib.import_module(f"cllm_gpu.{path.stem}")
    else:
        spec = importlib.util.spec_from_file_location(f"_flags_of_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return from_parser(module.build_parser())


def usage_flags(script: Path) -> set:
    """The flags a shell script's header comment names in its usage (`#   usage: ...` and the
    comment lines that continue it, indented further)."""
    flags, in_usage = set(), False
    for line in script.read_text().splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if "usage:" in body:
            in_usage, indent = True, len(body) - len(body.lstrip())
        elif in_usage and len(body) - len(body.lstrip()) <= indent:
            in_usage = False
        if in_usage:
            flags |= set(re.findall(FLAG, body))
    return flags


def plugin_options() -> set:
    """pytest's options the repository's plugins add (scripts/pytest_time_limit.py,
    tests/conftest.py)."""
    text = "".join(p.read_text() for p in (SCRIPTS / "pytest_time_limit.py",
                                           REPO / "tests" / "conftest.py"))
    return set(re.findall(r"addoption\(\s*\"(--[a-z][a-z0-9-]*)\"", text))


@functools.lru_cache(maxsize=None)
def real_programs() -> dict:
    """{name a command line calls it by: Program}: cllm-gpu, python -m cllm_gpu.MODULE, every
    scripts/*.py and scripts/*.sh, and the other programs."""
    programs = {"cllm-gpu": from_parser(build_parser())}
    for module in sorted((REPO / "cllm_gpu").glob("*.py")):
        if "def build_parser(" in module.read_text() and module.stem != "cli":
            programs[f"cllm_gpu.{module.stem}"] = load_build_parser(module)
    for script in sorted(SCRIPTS.glob("*.py")):
        programs[script.name] = load_build_parser(script)
    programs |= {name: Program(set(flags)) for name, flags in OTHER_PROGRAMS.items()}
    programs["pytest"].options |= plugin_options() | {"-h", "--help"}

    def command_flags(name):
        program, _, command = name.partition(" ")
        return programs[program].commands[command] if command else programs[program].options
    for script in sorted(SCRIPTS.glob("*.sh")):
        passed = SCRIPT_PASSES_ON.get(script.name)
        programs[script.name] = Program(
            usage_flags(script) | (command_flags(passed) if passed else set()))
    for env, name in ENV_ARGS.items():
        programs[env] = Program(command_flags(name))
    return programs


def line_numbers(text: str):
    """A function from an offset in `text` to the number of its line (from 1)."""
    ends = [m.start() for m in re.finditer("\n", text)]
    return lambda offset: bisect.bisect_left(ends, offset) + 1


def without_code_blocks(text: str) -> str:
    """`text` with its fenced code blocks blanked: the prose, at the same offsets."""
    return re.sub(r"^```[^\n]*\n.*?^```", lambda m: re.sub(r"[^\n]", " ", m.group()), text,
                  flags=re.M | re.S)


def command_lines(text: str) -> list:
    """What the text shows as command lines, each with the number of the line it starts on:
    each line of a fenced code block (its `# ...` comment cut; a line ending in a backslash
    joined to the next), and each code span, a span broken over lines joined with spaces."""
    line_of, lines = line_numbers(text), []
    for block in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S):
        joined, first = "", line_of(block.start(1))
        for number, line in enumerate(block.group(1).splitlines(), first):
            line = re.sub(r"(?:^|\s)#.*", "", line).rstrip()
            start = start if joined else number
            if line.endswith("\\"):
                joined += line[:-1]
                continue
            lines.append((start, joined + line))
            joined = ""
        if joined:
            lines.append((start, joined))
    return [(n, line) for n, line in lines if line.strip()] + [
        (line_of(span.start(1)), " ".join(span.group(1).split()))
        for span in re.finditer(r"`([^`]+)`", without_code_blocks(text))]


def command_starts(programs: dict, cli_commands: set) -> re.Pattern:
    """Where a command begins on a line, and which program it is."""
    scripts = "|".join(re.escape(n) for n in programs if n.endswith((".py", ".sh"))) or "(?!)"
    return re.compile(
        r"(?P<cli>(?<![\w./-])(?:\S*/)?cllm-gpu(?=\s|$)|\bpython3? -m cllm_gpu(?=\s|$))"
        r"|\bpython3? -m (?P<module>cllm_gpu\.\w+)"
        r"|(?P<pytest>\bpython3? -m pytest\b|(?<![\w./-])pytest(?=\s|$))"
        rf"|(?<![\w.-])(?:\S*/)?(?P<script>{scripts})(?=[\s)`,]|$)"
        rf"|(?<![\w./-])(?:\S*/)?(?P<other>{OTHER_COMMANDS})(?=\s|$)"
        rf"|(?P<env>\b(?:{'|'.join(ENV_ARGS)})=)"
        # a span or line that starts with a command's name: `train --max-steps 60`
        rf"|^(?=(?P<short>{'|'.join(sorted(cli_commands))})\s)")


SEPARATOR = re.compile(r"&&|\|\||(?<=\s)\|(?=\s)|;")


def program_at(start: re.Match, rest: str, programs: dict, any_command=False):
    """The program (and command) a command start names, as findings show it, and the flags it
    takes there; None for flags where the program or its command does not exist. A program of
    commands named without one (prose's "cllm-gpu's") takes its commands' flags if
    `any_command`."""
    kind = start.lastgroup   # a `short` start is empty: its rest begins with the command
    name = ("cllm-gpu" if kind in ("cli", "short") else "pytest" if kind == "pytest"
            else start.group(kind).rstrip("="))
    shown = f"python -m {name}" if kind == "module" else name
    if name not in programs:   # python -m cllm_gpu.MODULE that has no parser
        return shown, None
    program = programs[name]
    if program.commands and (word := re.match(r"\s*([a-z][a-z0-9-]*)", rest)):
        if word.group(1) not in program.commands:
            return f"{name} {word.group(1)}", None
        return f"{shown} {word.group(1)}", program.options | program.commands[word.group(1)]
    return shown, program.options.union(*program.commands.values()) if any_command else \
        program.options


def not_taken(shown: str, flags: set, args: str) -> list:
    """The flags in `args`, long and short, that the program shown as `shown` does not take:
    a short option alone (`-n`) or with its value or others run on (`-n2`, `-rfEs`)."""
    return ([f"{shown} {f}" for f in re.findall(FLAG, args) if f not in flags]
            + [f"{shown} {f}" for f in re.findall(SHORT, args)
               if f not in flags and f[:2] not in flags])


# Prose that gives flags to a program by name, each flag span or a list of them (`--a`, `--b`
# and `--c`): after a possessive ("train's `--resume`", "`bench.py`'s `--tf32`") or before
# "on", "of", "for", "to", "in" and the name in a code span or a name that is no English word
# ("`--pos-emb`, also on `gradcheck`", "`--cap-add` on `docker run`"). A sentence that only
# mentions a program is not enough: "`sample`, `eval` and `--resume` use the checkpoint's
# settings", "a model trained with `--pos-emb none`" are true of train's flags.
FLAG_SPANS = r"`-[^`]+`(?:(?:,|,? and|,? or| /)\s+`-[^`]+`)*"
# "the final sample's `--prompt`" is train's final sample's, not `sample`'s
NOT_A_COMMAND = re.compile(r"\b(?:the|a|an|each|every|its|this|that|final|first|last|one)\s+$")


def owned_flags(prose: str, programs: dict) -> list:
    """[(offset of a flag span, its text, the name of the program prose gives it to)]."""
    cli_commands = "|".join(programs["cllm-gpu"].commands)
    unmistakable = "|".join([rf"cllm-gpu(?: (?:{cli_commands}))?", OTHER_COMMANDS, *(
        re.escape(n) for n in programs if n.endswith((".py", ".sh")))])

    def bare(names):   # a name outside a code span, perhaps after a path
        return rf"(?<![\w./-])(?:\S*/)?(?:{names})(?![\w.-])"
    owner_or_command = f"{unmistakable}|(?P<command>{cli_commands})"   # "train's", not "to train"
    owned = []
    for pattern in (
            rf"(?:`(?P<span>[^`]+)`|(?P<bare>{bare(owner_or_command)}))'s"
            rf"\s+(?P<flags>{FLAG_SPANS})",
            rf"(?P<flags>{FLAG_SPANS}),?(?: also)?\s+(?:on|of|for|to|in)\s+"
            rf"(?:`(?P<span>[^`]+)`|(?P<bare>{bare(unmistakable)}))"):
        for m in re.finditer(pattern, prose):
            if (m.groupdict().get("command")
                    and NOT_A_COMMAND.search(prose[max(0, m.start() - 20):m.start()])):
                continue
            owned += [(m.start("flags") + span.start(), span.group(),
                       " ".join((m["span"] or m["bare"]).split()))
                      for span in re.finditer(r"`[^`]+`", m["flags"])]
    return owned


def misnamed(text: str, programs: dict) -> list:
    """[(line, what)]: the commands and flags `text` names that its programs do not have."""
    cli = programs["cllm-gpu"]
    starts = command_starts(programs, set(cli.commands))
    wrong = []
    for number, line in command_lines(text):
        # `docker run --entrypoint PROG ... cllm-gpu ARGS`: the ARGS after the image are PROG's
        line = re.sub(r"--entrypoint[= ](\S+)(.*?)\scllm-gpu(?=\s)", r"--entrypoint PROG\2 ; \1",
                      line)
        # `BENCH_ARGS="--no-torch --steps 3"`: its value is one command line of bench.py
        line = re.sub(r"\b([A-Z_]+_ARGS)=\"([^\"]*)\"", r"; \1= \2 ;", line)
        line = re.sub(r"\b([A-Z_]+_ARGS)=(\S+)", r"; \1= \2 ;", line)
        found = list(starts.finditer(line))
        for i, start in enumerate(found):
            # each command's flags run to the end of its command: the next command on the line
            # or a shell separator (`... && docker run --gpus all ...`), whose flags are another
            # program's (`cllm-gpu train --gpus 2` exits 2)
            end = found[i + 1].start() if i + 1 < len(found) else len(line)
            rest = line[start.end():end]
            rest = rest[:m.start()] if (m := SEPARATOR.search(rest)) else rest
            shown, flags = program_at(start, rest, programs)
            wrong += [(number, w) for w in ([shown] if flags is None
                                            else not_taken(shown, flags, rest))]
    line_of = line_numbers(text)
    for offset, span, owner in owned_flags(without_code_blocks(text), programs):
        if start := starts.search(owner + " "):
            shown, flags = program_at(start, owner[start.end():], programs, any_command=True)
            if flags is not None:
                wrong += [(line_of(offset), w) for w in not_taken(shown, flags, span)]
    # any other flag is some program's
    known = set().union(*(p.options.union(*p.commands.values()) for p in programs.values()))
    wrong += [(line_of(m.start()), m.group()) for m in re.finditer(FLAG, text)
              if m.group() not in known]
    return sorted(wrong, key=lambda w: w[0])


def test_misnamed_finds_a_wrong_command_and_flags():
    programs = {"cllm-gpu": Program({"-h", "--help"}, {
                    "train": {"--data", "--out", "--no-cuda-graph"}, "eval": {"--split"},
                    "sample": {"--seed"}}),
                "docker": Program({"--gpus", "--entrypoint"}), "srun": Program(
                    {"--ntasks-per-node", "--gpus-per-node"})}
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
    assert misnamed(text, programs) == [
        (1, "cllm-gpu train --split"), (1, "cllm-gpu evaluate"), (4, "cllm-gpu sample --out"),
        (6, "--bogus"), (7, "cllm-gpu eval --data"), (9, "cllm-gpu sample --split"),
        (11, "cllm-gpu train --gpus")]


def test_misnamed_reads_scripts_and_other_programs_lines():
    """A script's flags are its own parser's, wherever the line calls it from; a line broken
    with backslashes is one command; docker's --entrypoint hands the image's arguments to that
    program; a script that passes its arguments on takes that command's flags."""
    programs = {"cllm-gpu": Program({"--help"}, {"train": {"--data", "--max-steps"},
                                                 "eval": {"--split"}}),
                "bench.py": Program({"--steps", "--out"}),
                "report.py": Program(set(), {"stage": {"--name"}}),
                "train.sh": Program({"--data", "--max-steps"}),
                "docker": Program({"--gpus", "--entrypoint"}), "nsys": Program({"--trace"}),
                "BENCH_ARGS": Program({"--steps", "--out"}),
                "cllm_gpu.kernels": Program({"--precompile"})}
    text = ("```bash\npython scripts/bench.py --steps 3 \\\n    --max-steps 2   # train's\n"
            ".venv/bin/python ./scripts/bench.py --out x && scripts/train.sh --steps 1\n"
            "docker run --gpus all --entrypoint nsys cllm-gpu profile --trace=cuda \\\n"
            "    cllm-gpu train --data d --gpus 1\n```\n"
            "`bench.py --rounds 2`, `train --max-steps 2 --split val`, `eval --split val`,\n"
            "`report.py stage --name x --out y`, `report.py hung`,\n"
            "`BENCH_ARGS=\"--steps 2 --data d\" scripts/train.sh --max-steps 2`,\n"
            "`python -m cllm_gpu.nothing --x`, `python -m cllm_gpu.kernels --out x`")
    assert misnamed(text, programs) == [   # a joined line is the line it starts on
        (2, "bench.py --max-steps"), (4, "train.sh --steps"), (5, "cllm-gpu train --gpus"),
        (8, "bench.py --rounds"), (8, "cllm-gpu train --split"), (8, "--rounds"),
        (9, "report.py stage --out"), (9, "report.py hung"), (10, "BENCH_ARGS --data"),
        (11, "python -m cllm_gpu.nothing"), (11, "python -m cllm_gpu.kernels --out"),
        (11, "--x")]


def test_misnamed_checks_short_flags_per_program():
    """A short option is its program's like a long one: alone, with its value run on (`-k2`)
    or with others (`-rfEs`, its first letter known); a dash inside a word, a path, a shell
    default or a value after `=` is no flag."""
    programs = {"cllm-gpu": Program({"-h", "--help"}, {"train": {"--data"}}),
                "mpiexec": Program({"-n"}), "pytest": Program({"-q", "-k"}),
                "nvcc": Program({"-ptx"})}
    text = ("```bash\nmpiexec -n 2 cllm-gpu train -n 2 --data d\n"
            "python -m pytest -q -k2 -rfEs tests/x.py\nnvcc -ptx -o x.ptx a.cu\n```\n"
            "`cllm-gpu train -h`, `cllm-gpu train --data=-v a-b /tmp/x-y ${X:-z}`")
    assert misnamed(text, programs) == [(2, "cllm-gpu train -n"), (3, "pytest -rfEs"),
                                        (4, "nvcc -o")]


def test_misnamed_checks_prose_flags_against_the_program_it_names():
    """Prose that gives flags to a program by name (a possessive before them, "on", "of",
    "for", "to" or "in" and a name after them) is checked against that program; a flag that
    prose only mentions near a name, or gives to a name that is also an English word, is
    checked against every program's."""
    programs = {"cllm-gpu": Program({"-h", "--debug"}, {
                    "train": {"--seed", "--resume", "--sample-tokens", "--dropout"},
                    "sample": {"--seed", "--top-k"}, "gradcheck": {"--seed"}}),
                "bench.py": Program({"--tf32"}), "docker": Program({"--gpus", "-v"}),
                "nsys": Program({"--trace"})}
    text = ("train's `--resume`, `sample`'s `--resume` and `--seed`; `bench.py`'s\n"
            "`--tf32` or `--dropout`; the final sample's `--sample-tokens`;\n"
            "a sample's `--dropout`; `--seed`, `--dropout`, also on `gradcheck`;\n"
            "`--trace` on `docker run`, `-v` on\n"
            "`docker run`, `-x` for nsys; `--top-k` of `cllm-gpu train`;\n"
            "cllm-gpu's `--top-k` and `--gpus`; `sample` and `gradcheck` use `--dropout`;\n"
            "`--top-k` to train; `--dropout` for `state.json`; `state.json`'s `--seed`;\n"
            "`--bogus` of `cllm-gpu sample`\n")
    assert misnamed(text, programs) == [
        (1, "cllm-gpu sample --resume"), (2, "bench.py --dropout"),
        (3, "cllm-gpu gradcheck --dropout"), (4, "docker --trace"), (5, "nsys -x"),
        (5, "cllm-gpu train --top-k"), (6, "cllm-gpu --gpus"), (8, "cllm-gpu sample --bogus"),
        (8, "--bogus")]


def test_the_checker_reads_every_script_and_module_parser():
    """Every scripts/*.py and every module that has a command line gives its flags."""
    programs = real_programs()
    assert {"--attn-fwd-variants", "--reps"} <= programs["bench_kernels.py"].options
    assert "--n-layer" in programs["compare_torch.py"].options   # made in a loop
    assert "--into" in programs["gpu_session_report.py"].commands["after-call1"]
    assert "--precompile" in programs["cllm_gpu.kernels"].options
    assert programs["gpu_prepare.sh"].options == {"--after-call1"}
    assert "--max-steps" in programs["profile.sh"].options   # cllm-gpu train's
    assert {"--skip-done", "--time-limit"} <= programs["test.sh"].options   # the plugin's
    assert programs["pytest_time_limit.py"].options == set()


# a flag that is a real flag of another command put into a docs/*.md command line: only the
# line's own program refuses it (the old check read README.md and docs/usage.md only, and took
# any flag of any command anywhere else)
PLANTED = [
    ("docs/shakespeare.md", "scripts/compare_torch.py --data",
                            "scripts/compare_torch.py --max-steps 2 --data",
                            "compare_torch.py --max-steps"),
    ("docs/gpu.md", "scripts/gpu_prepare.sh --after-call1 /tmp/dry",
                    "scripts/gpu_prepare.sh --after-call1 /tmp/dry --out x",
                    "gpu_prepare.sh --out"),
    ("docs/finetune.md", "cllm-gpu plot runs/mine --out",
                         "cllm-gpu plot runs/mine --seed 1 --out", "cllm-gpu plot --seed"),
    ("docs/attention_bias.md", "python scripts/extrapolation.py --n-embd 64",
                               "python scripts/extrapolation.py --n-embd 64 --max-steps 800",
                               "extrapolation.py --max-steps"),
    # short flags: mpiexec's -n given to train; pytest's real -x, which no document uses
    ("docs/distributed.md", "mpiexec -n 8 cllm-gpu train --data data/owt",
                            "mpiexec -n 8 cllm-gpu train -n 8 --data data/owt",
                            "cllm-gpu train -n"),
    ("docs/gpu.md", "-m pytest -q tests/test_gpu_session.py",
                    "-m pytest -q -x tests/test_gpu_session.py", "pytest -x"),
    # prose that gives a flag to a command that does not take it (train's, all three): after a
    # code span's possessive, in a list before "also on", after a bare command's possessive
    ("docs/usage.md", "`--max-new-tokens` (300) at most",
                      "`sample`'s `--sample-tokens` (300) at most",
                      "cllm-gpu sample --sample-tokens"),
    ("docs/attention_bias.md", "`--pos-emb`, also on `gradcheck`",
                               "`--pos-emb`, `--seq-len`, also on `gradcheck`",
                               "cllm-gpu gradcheck --seq-len"),
    ("docs/distributed.md", "Flags: `--zero 1`", "Flags: eval's `--zero 1`",
                            "cllm-gpu eval --zero"),
]


def test_a_wrong_flag_planted_in_a_document_is_found_on_its_line():
    programs = real_programs()
    for doc, line, planted_line, finding in PLANTED:
        text = (REPO / doc).read_text()
        assert line in text, f"{doc} no longer shows {line!r}: plant the flag in another line"
        before = misnamed(text, programs)
        after = misnamed(text.replace(line, planted_line, 1), programs)
        number = text.count("\n", 0, text.index(line)) + 1
        assert [w for w in after if w not in before] == [(number, finding)], doc


def test_every_other_programs_flag_is_used():
    """Each flag taken on trust is in every document its entry names."""
    unused = [f"{program} {flag} ({why})" for program, flags in OTHER_PROGRAMS.items()
              for flag, why in flags.items() for doc in why.split(":")[0].split(", ")
              if not re.search(rf"(?<![\w-]){flag}(?![\w-])", (REPO / "docs" / doc).read_text())]
    assert not unused, f"other programs' flags no document names: {unused}"


def test_documents_name_real_commands_and_flags():
    programs = real_programs()
    wrong = [f"{doc}:{number}: {what}" for doc in DOCS
             for number, what in misnamed((REPO / doc).read_text(), programs)]
    assert not wrong, "documents name commands or flags their programs do not have:\n" + (
        "\n".join(wrong))


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
