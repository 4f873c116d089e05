#!/usr/bin/env python3
"""Turn scripts/profile.sh's per-range ncu CSVs into a Markdown table: for each NVTX range,
each kernel's launches and GPU milliseconds per training step, largest first.

    python scripts/profile_table.py PROFILE_DIR [--steps N] [--ranges forward classifier ...]

ncu's `--csv --page raw` output (in ncu_RANGE.csv, else in ncu_RANGE.log): a header row, a units
row, then one row per profiled kernel; the `gpu__time_duration.sum` column is converted to
milliseconds from the unit in the units row (profile.sh asks for base units, nanoseconds).
Exits 1 when no range has a kernel.
"""
import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

METRIC = "gpu__time_duration.sum"
TO_MS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0,
         "second": 1e3, "s": 1e3}


def kernel_label(name: str) -> str:
    """A demangled kernel name without its return type and parameter list, template arguments
    kept: the list starts at the first "(" outside the template's <...>, since ncu writes a
    template's value arguments with a cast ("attention_forward_mma_kernel<(int)64, (bool)1>")."""
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(depth - 1, 0)
        elif ch == "(" and depth == 0:
            name = name[:i]
            break
    return name.removeprefix("void ")[:70]


def kernel_times(path: Path):
    """[(kernel name, milliseconds)] from one ncu raw CSV (ncu's own messages skipped)."""
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.startswith('"')]
    except FileNotFoundError:
        return []
    rows = list(csv.reader(lines))
    if not rows or "Kernel Name" not in rows[0] or METRIC not in rows[0]:
        return []
    header = rows[0]
    name_i, time_i = header.index("Kernel Name"), header.index(METRIC)
    scale = 1e-6  # nanoseconds unless the units row says otherwise
    out = []
    for row in rows[1:]:
        if len(row) <= max(name_i, time_i):
            continue
        value = row[time_i].replace(",", "")
        try:
            t = float(value)
        except ValueError:
            scale = TO_MS.get(value.strip(), scale)  # the units row
            continue
        out.append((row[name_i], t * scale))
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line main() parses (the docs' command lines are checked against it:
    tests/test_docs_cite_real_flags.py)."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile_dir", nargs="?", default="profile_out")
    ap.add_argument("--steps", type=int, default=1, help="training steps profiled per range "
                    "(the table shows per-step figures) (default %(default)s)")
    ap.add_argument("--ranges", nargs="+",
                    default=["forward", "classifier", "backward", "optimizer"],
                    help="NVTX ranges (domain cllm), in table order (default %(default)s)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    print(f"GPU time per training step ({args.steps} profiled steps per range, "
          "ncu gpu__time_duration)\n")
    print("| range | kernel | launches per step | ms per step | share of range |")
    print("| --- | --- | ---: | ---: | ---: |")
    found = False
    for rng in args.ranges:
        per = defaultdict(lambda: [0, 0.0])
        # the report is on ncu's stdout (.csv), or, should ncu send it with its own messages to
        # --log-file, in the .log (the program's output stays on stdout)
        csv_path, log_path = (Path(args.profile_dir) / f"ncu_{rng}.{ext}" for ext in ("csv", "log"))
        for name, ms in kernel_times(csv_path) or kernel_times(log_path):
            short = kernel_label(name)
            per[short][0] += 1
            per[short][1] += ms
        total = sum(v[1] for v in per.values()) or 1.0
        for name, (n, ms) in sorted(per.items(), key=lambda kv: -kv[1][1]):
            found = True
            print(f"| {rng} | `{name}` | {n / args.steps:g} | {ms / args.steps:.3f} | "
                  f"{100 * ms / total:.1f}% |")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
