"""Which kernels_cu lines the emulator's checks ran: the gcov counts of a CLLM_EMU_COVERAGE run.

    CLLM_EMU_COVERAGE=/tmp/emu-cov python tests/cuda_emulator/run_emulated.py other ...
    python tests/cuda_emulator/kernel_coverage.py /tmp/emu-cov [--json out.json]

build.py compiles the real kernel files (not the mutants) with --coverage under
CLLM_EMU_COVERAGE=DIR and keeps each object's .gcno in DIR; the runs add their counts to the
.gcda files there at exit. This reads every build's notes with `gcov --json-format --stdout`,
adds the counts of one kernels_cu line over all builds (instantiations, compile-time settings,
subsets), and prints per kernel file the lines executed / executable, each never-executed run
of lines with the functions it lies in, and every compiled function instantiation that never
ran. A line that no build compiled (a template no NAME_EXPRESSIONS instantiation uses) is not
executable here, as for gcov.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
KERNEL_FILES = sorted([p.name for p in (REPO / "kernels_cu").glob("*.cu")] + ["common.cuh"])


def gcov_records(directory: Path) -> list:
    """gcov's JSON for every build's notes in `directory` (a build never run: all zero)."""
    records = []
    for gcno in sorted(directory.glob("*.gcno")):
        r = subprocess.run(["gcov", "--json-format", "--stdout", gcno.name], cwd=directory,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"gcov failed on {gcno}:\n{r.stderr[-2000:]}")
        records += [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    return records


COUNT_RE = re.compile(r"^\s*([0-9]+\*?|#####|=====|-):\s*(\d+):")


def instantiation_counts(directory: Path) -> dict:
    """{(file, instantiation): {line: count}} over every build: gcov's text output, which
    lists each template instantiation's lines apart (the JSON adds them up)."""
    out = defaultdict(lambda: defaultdict(int))
    # gcov prints a file's counts only where it can read the file ('#line 1 "attention.cu"':
    # relative to its working directory)
    sources = Path(tempfile.mkdtemp(prefix="cllm-emu-gcov-"))
    for name in KERNEL_FILES:
        (sources / name).symlink_to(REPO / "kernels_cu" / name)
    for gcno in sorted(directory.glob("*.gcno")):
        r = subprocess.run(["gcov", "--stdout", "--demangled-names", "--object-directory",
                            str(directory), str(gcno)], cwd=sources, capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"gcov failed on {gcno}:\n{r.stderr[-2000:]}")
        source, inst, lines = None, None, r.stdout.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("------------------"):
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                inst = nxt[:-1] if nxt.endswith(":") and not nxt[:1].isspace() else None
                continue
            m = COUNT_RE.match(line)
            if not m:
                continue
            if m.group(2) == "0":
                if ":Source:" in line:
                    source, inst = Path(line.split(":Source:", 1)[1]).name, None
                continue
            if inst is None or source not in KERNEL_FILES or m.group(1) == "-":
                continue
            k = m.group(1).rstrip("*")
            out[(source, inst)][int(m.group(2))] += 0 if k in ("#####", "=====") else int(k)
    shutil.rmtree(sources)
    return out


def instantiation_gaps(directory: Path) -> dict:
    """{file: [(first, last, {line}, [instantiations])]}: lines that some instantiation
    which ran never executed, though the line is its own (another instantiation may run it)."""
    per_line = defaultdict(lambda: defaultdict(list))
    for (source, inst), counts in instantiation_counts(directory).items():
        if not any(counts.values()):
            continue  # never launched at all: functions_never_run says so
        for n, k in counts.items():
            if k == 0:
                per_line[source][n].append(inst)
    out = {}
    for source, lines in per_line.items():
        out[source] = [(a, b, ls, sorted(set().union(*(lines[n] for n in ls))))
                       for a, b, ls in regions(sorted(lines))]
    return out


def merge(records: list) -> tuple[dict, dict, dict]:
    """({file: {line: count}}, {file: {line: {function}}}, {file: {function: count}}) over
    every build, kernel files only (the runtime header and the launch wrappers left out)."""
    counts = defaultdict(lambda: defaultdict(int))
    owners = defaultdict(lambda: defaultdict(set))
    functions = defaultdict(lambda: defaultdict(int))
    for rec in records:
        for f in rec["files"]:
            name = Path(f["file"]).name
            if name not in KERNEL_FILES:
                continue
            demangled = {fn["name"]: fn["demangled_name"] for fn in f["functions"]}
            for fn in f["functions"]:
                functions[name][fn["demangled_name"]] += fn["execution_count"]
            for ln in f["lines"]:
                counts[name][ln["line_number"]] += ln["count"]
                fname = ln.get("function_name")
                if fname:
                    owners[name][ln["line_number"]].add(demangled.get(fname, fname))
    return counts, owners, functions


def regions(lines: list) -> list:
    """Consecutive runs of never-executed line numbers, allowing gaps of non-executable
    lines: [(first, last, [line numbers])]."""
    out = []
    for n in lines:
        if out and n - out[-1][1] <= 3:
            out[-1] = (out[-1][0], n, out[-1][2] + [n])
        else:
            out.append((n, n, [n]))
    return out


def _by_template(functions: list) -> dict:
    """{function name: [template arguments of each instantiation]} ('' for a non-template)."""
    out = defaultdict(list)
    for f in functions:
        m = re.search(r"(\w+)(?:<(.*)>)?$", f.split("(", 1)[0])
        out[m.group(1)].append(m.group(2) or "")
    return out


def _short(functions: list) -> str:
    return "; ".join(f"{b}<{'>, <'.join(t)}>" if t[0] else b
                     for b, t in _by_template(functions).items())


def report(directory: Path) -> dict:
    counts, owners, functions = merge(gcov_records(directory))
    gaps = instantiation_gaps(directory)
    result = {}
    for name in KERNEL_FILES:
        c = counts.get(name, {})
        never = sorted(n for n, k in c.items() if k == 0)
        result[name] = {
            "executable": len(c), "executed": sum(1 for k in c.values() if k > 0),
            "never": [{"first": a, "last": b, "lines": ls,
                       "functions": sorted(set().union(*(owners[name][n] for n in ls)))}
                      for a, b, ls in regions(never)],
            "functions_never_run": sorted(f for f, k in functions.get(name, {}).items()
                                          if k == 0),
            "instantiation_gaps": [{"first": a, "last": b, "lines": ls, "functions": fs}
                                   for a, b, ls, fs in gaps.get(name, [])],
        }
    return result


def print_report(result: dict) -> None:
    total_x = sum(r["executable"] for r in result.values())
    total_e = sum(r["executed"] for r in result.values())
    for name, r in result.items():
        src = (REPO / "kernels_cu" / name).read_text().splitlines()
        pct = 100.0 * r["executed"] / r["executable"] if r["executable"] else 100.0
        print(f"{name}: {r['executed']}/{r['executable']} lines executed ({pct:.1f}%)")
        for reg in r["never"]:
            print(f"  never {name}:{reg['first']}-{reg['last']}"
                  f"  in {_short(reg['functions'])}")
            for n in reg["lines"]:
                print(f"    {n:5d}: {src[n - 1].strip()[:110]}")
        for reg in r["instantiation_gaps"]:
            print(f"  not in every instantiation {name}:{reg['first']}-{reg['last']}: never in "
                  f"{_short(reg['functions'])}")
            for n in reg["lines"]:
                print(f"    {n:5d}: {src[n - 1].strip()[:110]}")
        for base, targs in _by_template(r["functions_never_run"]).items():
            print(f"  never run: {base}<{'>, <'.join(targs)}>" if targs[0] else
                  f"  never run: {base}")
    print(f"TOTAL {total_e}/{total_x} kernel lines executed "
          f"({100.0 * total_e / max(total_x, 1):.1f}%)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("directory", type=Path, help="the CLLM_EMU_COVERAGE directory of the runs")
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    result = report(args.directory.resolve())
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
