#!/usr/bin/env python3
"""Turn scripts/profile.sh's per-range ncu CSVs into a Markdown table: for each NVTX range,
each kernel's launches and total GPU time, largest first."""
import csv
import sys
from collections import defaultdict
from pathlib import Path


def rows(path):
    lines = [l for l in Path(path).read_text().splitlines() if l.startswith('"')]
    if not lines:
        return []
    out = list(csv.DictReader(lines))
    return [r for r in out if r.get("Kernel Name") and r.get("gpu__time_duration.sum", "").replace(".", "", 1).replace(",", "").isdigit()]


def main(out_dir):
    print("| range | kernel | launches | total ms | share of range |")
    print("| --- | --- | ---: | ---: | ---: |")
    for rng in ("forward", "backward", "optimizer"):
        per = defaultdict(lambda: [0, 0.0])
        for r in rows(Path(out_dir) / f"ncu_{rng}.csv"):
            ns = float(r["gpu__time_duration.sum"].replace(",", ""))
            name = r["Kernel Name"].split("(")[0][:60]
            per[name][0] += 1
            per[name][1] += ns / 1e6
        total = sum(v[1] for v in per.values()) or 1.0
        for name, (n, ms) in sorted(per.items(), key=lambda kv: -kv[1][1]):
            print(f"| {rng} | `{name}` | {n} | {ms:.3f} | {100 * ms / total:.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "profile_out")
