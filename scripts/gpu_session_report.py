#!/usr/bin/env python3
"""Verdicts and the call record for scripts/gpu_session.sh (standard library only).

    gpu_session_report.py stage --name N --rc RC --seconds S --limit L [--skip REASON]
                                [--skip-budget LEFT] [--bench-start N] [--kernels-start N]
                                [--progress-start N]
        Judge one stage from its exit status and what it left in the session's work folder,
        print its verdict lines, append it to the stage list and rewrite <OUT>/<tag>.json.
        A tests stage counts its progress file's lines from --progress-start on (those before
        are call 1's, carried into call 2).
    gpu_session_report.py hung --progress P --hang H --keep K
        A test hung hard (scripts/pytest_time_limit.py): record it in the progress file as
        "hung" (so the rerun skips it) and keep its tracebacks.
    gpu_session_report.py summary
        Print the table of every stage, mark the record complete; exit 3 unless all passed
        (1 is left to a crash of this script).
    gpu_session_report.py after-call1 --results DIR --into FOLDER
        Between the calls (scripts/gpu_prepare.sh --after-call1): for each pytest stage of call
        1 that did not finish (TIMEOUT, SKIP_BUDGET, absent from DIR/call1.json, or a FAIL whose
        last pytest run ended at a hung test it did not go on after), write its
        progress file from DIR/logs_call1.tgz (empty if it never started) into FOLDER, which
        call 2 carries; one line per stage says what call 2 will do. FOLDER is emptied first.

The session passes its folders in GPU_SESSION_WORK, GPU_SESSION_RES, GPU_SESSION_TAG and
GPU_SESSION_BUDGET_S. Verdicts: PASS, FAIL, TIMEOUT, SKIP (with the reason) and SKIP_BUDGET.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cllm_gpu.json_text import to_json  # noqa: E402  (standard library only, as this script)

WORK = Path(os.environ.get("GPU_SESSION_WORK", "."))
RES = Path(os.environ.get("GPU_SESSION_RES", "."))
TAG = os.environ.get("GPU_SESSION_TAG", "session")
LOGS = WORK / "logs"
TIMEOUT_RCS = ("124", "137")
TEST_STAGES = ("tests", "tests_slow")  # the pytest stages: call 2 runs what call 1 left of them
UNFINISHED = ("TIMEOUT", "SKIP_BUDGET")  # (or absent from the record: the call was cut first;
# or a FAIL whose last pytest run ended at a hung test: ended_at_a_hang)
RUNS_MAX = 4  # pytest runs per test stage: the first, and one after each hard hang (run_pytest)
MAX_IDS = 15  # failed / hung test ids printed per stage (all of them are in the record)


def read_jsonl(path: Path, start: int = 0, stop: int | None = None) -> list:
    """The records on lines [start, stop) of a JSON-lines file (a line cut by a kill: left out)."""
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return out
    for line in lines[start:stop]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return out


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def error_lines(text: str, n: int = 3) -> list:
    """The last few lines of a log that say what went wrong."""
    hits = [l.strip() for l in text.splitlines()
            if re.search(r"(Error|error:|ERROR:|Traceback|FAILED|not supported|No such file|"
                         r"==WARNING==|==ERROR==)", l)]  # (ERROR: pip's; not ERROR SUMMARY)
    return [h[:240] for h in hits[-n:]]


def base_verdict(rc: str) -> str:
    if rc in TIMEOUT_RCS:
        return "TIMEOUT"
    return "PASS" if rc == "0" else "FAIL"


# ---------------------------------------------------------------- per-stage judges
# Each returns (verdict, detail, extra lines to print, extra fields for the record).
def judge_env(name, rc, log):
    env = {}
    try:
        env = json.loads((WORK / "env.json").read_text())
    except (FileNotFoundError, ValueError):
        pass
    line = next((l for l in log.splitlines() if l.startswith("gpu ")), "")
    if rc == "0":
        return "PASS", line[:400], [], {}
    why = [str(env[k]) for k in ("cupy_error", "gpu_error") if env.get(k)]
    if not why and not isinstance(env.get("gpu_count"), int):
        why.append(f"GPU count: {env.get('gpu_count')}")
    return base_verdict(rc), (line[:250] + " | " + " | ".join(why or error_lines(log)))[:500], \
        [], {"cupy_error": env.get("cupy_error"), "gpu_error": env.get("gpu_error")}


def judge_compile(name, rc, log):
    recs = read_jsonl(WORK / "compile.jsonl")
    failed = [r["stem"] for r in recs if "error" in r]
    total = sum(r.get("seconds", 0) for r in recs)
    slow = max(recs, key=lambda r: r.get("seconds", 0), default=None)
    regs, spills = [], []
    for r in recs:
        for k, v in r.get("kernels", {}).items():
            if isinstance(v.get("num_regs"), int):
                regs.append((v["num_regs"], k))
            if isinstance(v.get("local_size_bytes"), int) and v["local_size_bytes"] > 0:
                spills.append(f"{k} {v['local_size_bytes']} B")
    # (seconds summed over the modules: compiled in parallel, the stage took less wall time)
    detail = f"{len(recs)} files, {total:.1f} s of compiling"
    if slow:
        detail += f" (slowest {slow['stem']} {slow.get('seconds', 0):.1f} s)"
    if regs:
        top = max(regs)
        detail += f"; max {top[0]} registers ({top[1]})"
    detail += f"; local memory: {', '.join(spills[:3]) if spills else 'none'}"
    lines = [f"  compile error {r['stem']}: {r['error'].splitlines()[0][:200]}"
             for r in recs if "error" in r]
    verdict = base_verdict(rc)
    if failed and verdict == "PASS":
        verdict = "FAIL"
    return verdict, detail, lines, {"failed_modules": failed, "seconds_total": round(total, 2)}


def test_outcomes(progress: list) -> tuple:
    """(nodeid: outcome, counts per outcome) from progress records: a nodeid's worst outcome
    across its phases wins."""
    outcome = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2, "hung": 3}
    for r in progress:
        prev = outcome.get(r["nodeid"])
        if prev is None or rank.get(r["outcome"], 2) > rank.get(prev, 2):
            outcome[r["nodeid"]] = r["outcome"]
    counts = {k: sum(1 for v in outcome.values() if v == k)
              for k in ("passed", "failed", "skipped", "hung")}
    return outcome, counts


def judge_tests(name, rc, log, start=0):
    # lines before `start` are call 1's, carried into call 2: this stage ran the rest
    path = LOGS / f"{name}_progress.jsonl"
    progress = read_jsonl(path, start)
    call1_done = len({r["nodeid"] for r in read_jsonl(path, 0, start)})
    outcome, counts = test_outcomes(progress)
    failed = sorted(k for k, v in outcome.items() if v == "failed")
    hung = sorted(k for k, v in outcome.items() if v == "hung")
    slowest = max(((r["seconds"], r["nodeid"]) for r in progress
                   if r.get("when") == "call" and isinstance(r.get("seconds"), (int, float))),
                  default=None)
    detail = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no test ran"
    if slowest:
        detail += f"; slowest {slowest[1]} {slowest[0]:.1f} s"
    # "FAILED id - message" (pytest's -rfEs form) from the progress file: a run ended by a
    # hard hang never prints its summary
    message = {r["nodeid"]: r.get("message") for r in progress if r["outcome"] == "failed"}
    lines = [f"FAILED {t}" + (f" - {message[t]}" if message.get(t) else "")
             for t in failed[:MAX_IDS]]
    if len(failed) > MAX_IDS:
        lines.append(f"  ... {len(failed)} failed in all: see {TAG}.json")
    lines = [l[:200] for l in lines] + [f"HUNG {t}" for t in hung[:MAX_IDS]]
    if rc in TIMEOUT_RCS:
        verdict = "TIMEOUT"
    elif failed or hung or (rc not in ("0", "5") and not progress):
        verdict = "FAIL"
    elif counts["passed"] == 0:
        # nothing verified: every test skipped (no GPU seen) or none matched the selection
        verdict = "SKIP" if rc == "5" or not progress else "FAIL"
        detail = ("no test matched" if rc == "5" or not progress
                  else f"ALL SKIPPED: {detail}")
        if call1_done and not progress:
            detail = "none left to run"
    else:
        verdict = "PASS" if rc in ("0", "5") else "FAIL"
    if verdict == "FAIL" and not (failed or hung):
        lines += error_lines(log)
    extra = {"counts": counts, "failed": failed, "hung": hung,
             "messages": {t: message.get(t) for t in failed}}
    if TAG == "call2":  # a stage carried from call 1: what call 1 had done (outcomes there)
        detail += f"; call 1 had done {call1_done}"
        extra["call1_done"] = call1_done
    return verdict, detail, lines, extra


def sanitizer_counts(text: str) -> dict:
    """compute-sanitizer's report: every error record counts in ERROR SUMMARY; a 'Program hit'
    record is a CUDA API call that returned an error (often one CuPy or cuBLAS handles itself,
    e.g. a probe for an optional feature), so those are counted apart from kernel errors.
    racecheck may end with "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)"
    instead: then E is its kernel error count (warnings are reported, not failed).
    Past --print-limit the total line is followed by "ERROR SUMMARY: U errors were not
    printed. ...": those U are counted as `unprinted` (API or kernel errors, unknown which),
    and kernel_errors is then the printed ones only."""
    m = re.findall(r"ERROR SUMMARY: (\d+) errors?[ \t]*$", text, re.M)
    total = int(m[-1]) if m else None
    u = re.findall(r"ERROR SUMMARY: (\d+) errors? w[a-z]+ not printed", text)
    unprinted = int(u[-1]) if u else 0
    api = len(re.findall(r"^=+ Program hit ", text, re.M))
    kernel_lines = [l for l in text.splitlines()
                    if re.match(r"^=+ (Invalid|Error|Warning|Uninitialized|Barrier|Misaligned|"
                                r"Race|Out-of-range|Malformed|Unspecified|Cuda|CUDA)", l)
                    and "Program hit" not in l]
    race = re.findall(r"RACECHECK SUMMARY: .*", text)
    race_errors = None
    if race:
        r = re.search(r"\((\d+) errors?, (\d+) warnings?\)", race[-1])
        race_errors = int(r.group(1)) if r else None
    kernel = None if total is None else max(total - unprinted - api, 0)
    if race_errors is not None:
        kernel = race_errors if kernel is None else max(kernel, race_errors)
    return {"errors": total, "api_errors": api, "kernel_errors": kernel,
            "unprinted": unprinted,
            "first_kernel_error": kernel_lines[0].strip("= ")[:200] if kernel_lines else None,
            "racecheck_summary": race[-1] if race else None}


def judge_sanitizer_probe(name, rc, log):
    c = sanitizer_counts(log)
    # CUDA API errors that CuPy handles itself may show up here too: they do not make the
    # sanitizer unusable (rc 99 is --error-exitcode)
    if rc in ("0", "99") and "probe ok" in log and c["kernel_errors"] == 0 \
            and not c["unprinted"]:
        return "PASS", ("compute-sanitizer runs here (memcheck on a CuPy probe: 0 kernel "
                        f"errors, {c['api_errors']} CUDA API errors)"), [], c
    why = error_lines(log, 2) or [log.strip().splitlines()[-1][:200] if log.strip() else "no output"]
    v = base_verdict(rc)
    return ("FAIL" if v == "PASS" else v), "sanitizer unusable here: " + " | ".join(why), [], c


def judge_sanitizer(name, rc, log):
    c = sanitizer_counts(log)
    finished = "all kernels ran" in log
    detail = (f"{c['kernel_errors']} kernel errors, {c['api_errors']} CUDA API errors "
              f"(ERROR SUMMARY {c['errors']})" if c["kernel_errors"] is not None
              else "no ERROR SUMMARY")
    if c["unprinted"]:
        detail += (f"; {c['unprinted']} error{'s' * (c['unprinted'] != 1)} past --print-limit, "
                   "not printed: API or kernel errors, unknown which")
    if c["racecheck_summary"]:
        detail += f"; {c['racecheck_summary']}"
    lines = [f"  first kernel error: {c['first_kernel_error']}"] if c["first_kernel_error"] else []
    if rc in TIMEOUT_RCS:
        return "TIMEOUT", detail + ("" if finished else "; the smoke run did not finish"), \
            lines, c
    ok = c["kernel_errors"] == 0 and not c["unprinted"] and finished and rc in ("0", "99")
    if not ok and not finished:
        lines += error_lines(log)
    return ("PASS" if ok else "FAIL"), detail, lines, c


def _fmt_rate(x):
    return f"{x:,.0f}" if isinstance(x, (int, float)) else "?"


def judge_bench(name, rc, log, start):
    recs = read_jsonl(RES / f"bench_{TAG}.jsonl", start)
    lines, errors = [], 0
    for r in recs:
        head = f"  {r.get('config')} {r.get('precision', '')}" + \
            (" tf32" if r.get("tf32") else "") + (" graph" if r.get("cuda_graph") else "") + \
            (f" [{r['variant']}" + (f" {r['torch_compile_mode']}" if r.get("torch_compile_mode")
                                      not in (None, "default") else "") + "]"
             if r.get("variant") else "")
        if "error" in r:
            errors += 1
            lines.append(f"{head}: ERROR {r['error'][:200]}")
            continue
        ours = r.get("cllm", {})
        parts = [f"cllm {_fmt_rate(ours.get('tokens_per_s'))} tok/s"]
        if isinstance(ours.get("mfu"), float):
            parts.append(f"MFU {ours['mfu']:.1%}")
        for side in ("torch_eager", "torch_compile"):
            if isinstance(r.get(side), dict) and "error" in r[side]:
                errors += 1
                parts.append(f"{side} ERROR {r[side]['error'][:120]}")
            elif f"ratio_vs_{side}" in r:
                # (its ms over ours: above 1, ours is faster) and the SDPA backend its
                # attention ran, where bench.py read it off the profiler
                backend = (r.get(side) or {}).get("sdpa_backend")
                parts.append(f"{side} ratio {r[f'ratio_vs_{side}']:.2f}"
                             + (f" [sdpa {backend}]" if backend else ""))
        if r.get("cuda_graph"):  # a graph run that fell back measured no graph
            g = ours.get("cuda_graph") or {}
            parts.append(f"graph captures {g.get('captures')} replays {g.get('replays')}")
            if not g.get("captures"):
                errors += 1
                parts.append("ERROR the step was never captured (see the stage log)")
        lines.append(f"{head}: " + ", ".join(parts))
    verdict = base_verdict(rc)
    if verdict == "PASS" and (errors or not recs):
        verdict = "FAIL"
    detail = f"{len(recs)} records" + (f", {errors} with errors" if errors else "")
    if verdict == "FAIL" and not recs:
        lines += error_lines(log)
    return verdict, detail, lines, {"records": len(recs), "errors": errors}


def judge_bench_kernels(name, rc, log, start):
    recs = read_jsonl(RES / f"kernels_{TAG}.jsonl", start)
    # (a block-shape variant of the attention forward whose outputs differ from the default's
    # is wrong, whatever its speed; so is a backward variant whose dK, dV are not two-pass's
    # bits or whose dQ is further from two-pass's than summation order explains, and a bias
    # fill whose bits are not the plain copy's)
    for r in recs:
        if "error" in r:
            continue
        if r.get("same_bits_as_8x2") is False:
            r["error"] = f"{r.get('variant')} {r.get('bias')}: out or lse differ from 8x2's bits"
        elif r.get("same_bits_as_elementwise") is False:
            r["error"] = "bias_fill: the word fill's bits differ from the plain broadcast copy's"
        elif r.get("dkv_same_bits_as_two_pass") is False:
            r["error"] = f"{r.get('variant')} {r.get('bias')}: dK, dV differ from two-pass's bits"
        elif r.get("op") == "attention_bwd_bf16_variant" and not (
                isinstance(r.get("dq_rel_diff_from_two_pass"), float)
                and r["dq_rel_diff_from_two_pass"] <= r.get("dq_rel_tol", 0.0)):
            r["error"] = (f"{r.get('variant')} {r.get('bias')}: dQ "
                          f"{r.get('dq_rel_diff_from_two_pass')} from two-pass's (tolerance "
                          f"{r.get('dq_rel_tol')})")
    errors = [r for r in recs if "error" in r]
    parts = []
    for r in recs:
        if "error" in r:
            parts.append(f"{r.get('op')} ERROR")
        elif r.get("op") == "attention_fwd_bf16_d64_variant":
            parts.append(f"attention fwd D=64 {r['variant']} {r['bias']} {r['fwd_ms']:.3f} ms "
                         f"({r['fwd_of_8x2']:.2f} of 8x2; fwd+bwd {r['fwd_bwd_of_8x2']:.2f})")
        elif r.get("op") == "attention_bwd_bf16_variant":
            parts.append(f"attention bwd D={r['shape'][3]} {r['variant']} {r['bias']} "
                         f"{r['bwd_ms']:.3f} ms ({r['bwd_of_two_pass']:.2f} of two-pass; "
                         f"fwd+bwd {r['fwd_bwd_of_two_pass']:.2f})")
        elif r.get("op") == "copy":
            parts.append(f"copy {r['bytes_per_s'] / 1e9:,.0f} GB/s")
        elif "of_copy_bw" in r:
            parts.append(f"{r['op']} {r['of_copy_bw']:.2f} of copy")  # of its bandwidth
        elif "bf16_flop_per_s" in r:
            # with torch.matmul's time over ours (bf16 C on both sides)
            rel = r.get("of_torch_bf16")
            parts.append(f"gemm{tuple(r['shape'])} bf16 {r['bf16_flop_per_s'] / 1e12:.0f} TF/s"
                         + (f" ({rel:.2f} of torch_bf16)" if isinstance(rel, (int, float))
                            else ""))
        elif "flop_per_s" in r:
            # each record carries every SDPA ratio: ours in fp32 against SDPA in fp32, ours
            # in bf16 against SDPA's bf16 flash kernels (forced) and torch's own bf16 choice;
            # each with the backend torch ran
            keys = ("sdpa_flash_bf16", "sdpa_bf16") if "bf16" in r["op"] else ("sdpa_fp32",)
            rels = [f"{r[f'of_{k}']:.2f} of {k}"
                    + (f" [{r[f'{k}_backend']}]" if r.get(f"{k}_backend") else "")
                    for k in keys if isinstance(r.get(f"of_{k}"), (int, float))]
            parts.append(f"{r['op']}{tuple(r['shape'])} {r['flop_per_s'] / 1e12:.1f} TF/s"
                         + (f" ({', '.join(rels)})" if rels else ""))
    lines = ["  " + "; ".join(parts[i:i + 4]) for i in range(0, len(parts), 4)]
    # why a record has no PyTorch ratio (ours still measured: not an error of the stage)
    lines += [f"  {k}: {m[:200]}" for k in ("sdpa_error", "torch_error")
              for m in dict.fromkeys(r[k] for r in recs if r.get(k))]
    lines += [f"  {r.get('op')} {r.get('shape', '')}: ERROR {r['error'][:200]}" for r in errors]
    verdict = base_verdict(rc)
    if verdict == "PASS" and (errors or not recs):
        verdict = "FAIL"
    if verdict == "FAIL" and not recs:
        lines += error_lines(log)
    return verdict, f"{len(recs)} records, {len(errors)} errors", lines, \
        {"records": len(recs), "errors": len(errors)}


def judge_profile(name, rc, log):
    md = read_text(RES / f"profile_{TAG}.md")
    totals = {}
    for l in md.splitlines():
        cells = [c.strip() for c in l.strip("|").split("|")]
        if len(cells) >= 4:
            try:
                totals[cells[0]] = totals.get(cells[0], 0.0) + float(cells[3])
            except ValueError:
                continue
    verdict = base_verdict(rc)
    if verdict == "PASS" and not totals:
        verdict = "FAIL"
    detail = ", ".join(f"{k} {v:.2f} ms/step" for k, v in totals.items()) or "no profile table"
    lines = []
    if not totals:  # what ncu itself said (e.g. no kernel matched a range)
        for f in sorted(LOGS.glob("ncu_*.log")):
            lines += [f"  {f.name}: {l}" for l in error_lines(read_text(f), 2)]
        lines += error_lines(log)
    return verdict, detail, lines, {"ms_per_step": totals}


def judge_shakespeare(name, rc, log):
    recs = read_jsonl(RES / f"shakespeare_{TAG}.jsonl")
    evals = [r for r in recs if r.get("type") == "eval"]
    steps = max((r.get("step", 0) for r in recs), default=0)
    detail = f"{steps} steps"
    if evals:
        val = evals[-1]["val_loss"]  # null: not finite (the trainer writes strict JSON)
        detail += f"; val loss {'not finite' if val is None else f'{val:.4f}'} at step " \
                  f"{evals[-1]['step']} (nanoGPT: 1.4697 on one A100)"
    verdict = base_verdict(rc)
    return verdict, detail, ([] if verdict == "PASS" else error_lines(log)), \
        {"steps": steps, "val_loss": evals[-1]["val_loss"] if evals else None}


def judge(name, rc, log, args):
    if name == "env":
        return judge_env(name, rc, log)
    if name == "compile":
        return judge_compile(name, rc, log)
    if name.startswith("tests"):
        return judge_tests(name, rc, log, args.progress_start)
    if name == "sanitizer_probe":
        return judge_sanitizer_probe(name, rc, log)
    if name in ("memcheck", "racecheck", "initcheck", "synccheck"):
        return judge_sanitizer(name, rc, log)
    if name == "bench_kernels":
        return judge_bench_kernels(name, rc, log, args.kernels_start)
    if name.startswith("bench"):
        return judge_bench(name, rc, log, args.bench_start)
    if name == "profile":
        return judge_profile(name, rc, log)
    if name == "shakespeare":
        return judge_shakespeare(name, rc, log)
    v = base_verdict(rc)
    return v, "", ([] if v == "PASS" else error_lines(log)), {}


# ---------------------------------------------------------------- the call record
def write_record(complete: bool) -> dict:
    stages = read_jsonl(WORK / "stages.jsonl")
    env = {}
    try:
        env = json.loads((WORK / "env.json").read_text())
    except (FileNotFoundError, ValueError):
        pass
    ran = [s for s in stages if s["verdict"] not in ("SKIP", "SKIP_BUDGET")]
    rec = {"tag": TAG, "commit": os.environ.get("CLLM_COMMIT") or env.get("commit"),
           "device": env.get("gpu"), "budget_s": int(os.environ.get("GPU_SESSION_BUDGET_S", 0)),
           "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "complete": complete, "ok": bool(ran) and all(s["verdict"] == "PASS" for s in ran),
           "stages": stages, "env": env, "compile": read_jsonl(WORK / "compile.jsonl")}
    tmp = RES / f"{TAG}.json.part"
    tmp.write_text(to_json(rec, indent=1) + "\n")
    os.replace(tmp, RES / f"{TAG}.json")
    return rec


def cmd_stage(args):
    name, rc = args.name, args.rc
    log = read_text(LOGS / f"{name}.log")
    if args.skip_budget is not None:
        verdict, detail, lines, extra = "SKIP_BUDGET", \
            f"{args.skip_budget} s of the budget left", [], {}
    elif args.skip:
        verdict, detail, lines, extra = "SKIP", args.skip, [], {}
    else:
        verdict, detail, lines, extra = judge(name, rc, log, args)
    rec = {"stage": name, "verdict": verdict, "rc": rc, "seconds": args.seconds,
           "limit": args.limit, "detail": detail, **extra}
    with open(WORK / "stages.jsonl", "a") as f:
        f.write(to_json(rec) + "\n")
    (WORK / f"verdict_{name}").write_text(verdict + "\n")
    write_record(complete=False)
    print(f"STAGE {name}: {verdict} (rc {rc}, {args.seconds} s of {args.limit} s) {detail}"
          .rstrip())
    for line in lines:
        print(line)
    sys.stdout.flush()
    return 0


def cmd_hung(args):
    text = read_text(Path(args.hang))
    m = re.match(r"HUNG (.+?): no result", text)
    nodeid = m.group(1) if m else "<unknown test>"
    with open(args.progress, "a") as f:
        f.write(to_json({"nodeid": nodeid, "when": "call", "outcome": "hung",
                         "seconds": None}) + "\n")
    shutil.move(args.hang, args.keep)
    print(f"HUNG {nodeid}: tracebacks in {Path(args.keep).name}; going on without it")
    return 0


def cmd_summary(args):
    rec = write_record(complete=True)
    print(f"== {TAG} summary: commit {rec['commit'] or 'unknown'}, device "
          f"{rec['device'] or 'unknown'}, budget {rec['budget_s']} s")
    for s in rec["stages"]:
        print(f"  {s['stage']:19s} {s['verdict']:11s} {s['seconds']:>5} s  "
              f"{s['detail'][:150]}")
    bad = [s["stage"] for s in rec["stages"] if s["verdict"] not in ("PASS", "SKIP",
                                                                     "SKIP_BUDGET")]
    skipped = [s["stage"] for s in rec["stages"] if s["verdict"] == "SKIP_BUDGET"]
    print(f"RESULT {TAG}: " + ("OK" if rec["ok"] else "NOT OK")
          + (f"; not passed: {' '.join(bad)}" if bad else "")
          + (f"; no time for: {' '.join(skipped)}" if skipped else "")
          + f"; files: {' '.join(sorted(p.name for p in RES.iterdir()))}")
    return 0 if rec["ok"] else 3


def archive_members(tgz: Path, names: list) -> dict:
    """name: text for those of `names` in the archive ({} for a missing or unreadable one)."""
    found = {}
    try:
        with tarfile.open(tgz) as t:
            for m in t.getmembers():
                if m.name in names and m.isfile():
                    found[m.name] = t.extractfile(m).read().decode(errors="replace")
    except (OSError, EOFError, tarfile.TarError):
        pass
    return found


def ended_at_a_hang(logs: dict, stage: str) -> bool:
    """Whether the stage's last pytest run ended at a hung test (hang_K.txt) that the stage did
    not run on after (no K+1'th run's JUnit XML: too little time left, or its fourth run): a
    FAIL that did not reach the tests after it. `logs`: archive_members' answer."""
    hangs = [k for k in range(1, RUNS_MAX + 1) if f"logs/{stage}_hang_{k}.txt" in logs]
    return bool(hangs) and f"logs/{stage}_{max(hangs) + 1}.xml" not in logs


def cmd_after_call1(args):
    res, into = Path(args.results), Path(args.into)
    if into.exists():  # what an earlier run carried must not outlive this one, even if it fails
        shutil.rmtree(into)
    if not res.is_dir():
        print(f"error: no folder {res} (where call 1's files came back)", file=sys.stderr)
        return 2
    try:
        record = json.loads((res / "call1.json").read_text())
    except FileNotFoundError:
        record = None
        print(f"no call1.json in {res}: call 1 recorded no stage")
    except ValueError as e:
        print(f"error: {res / 'call1.json'} is not JSON ({e})", file=sys.stderr)
        return 2
    if record is not None and record.get("tag") != "call1":
        print(f"error: {res / 'call1.json'} is the record of {record.get('tag')!r}, not call 1",
              file=sys.stderr)
        return 2
    stages = {s["stage"]: s["verdict"] for s in (record or {}).get("stages", [])}
    tgz = res / "logs_call1.tgz"
    logs = archive_members(tgz, [f"logs/{s}_{k}" for s in TEST_STAGES
                                 for k in ("progress.jsonl", "hang.txt",
                                           *(f"hang_{n}.txt" for n in range(1, RUNS_MAX + 1)),
                                           *(f"{n}.xml" for n in range(2, RUNS_MAX + 2)))])
    into.mkdir(parents=True)
    for stage in TEST_STAGES:
        verdict = stages.get(stage)
        cut_at_hang = verdict == "FAIL" and ended_at_a_hang(logs, stage)
        if verdict is not None and verdict not in UNFINISHED and not cut_at_hang:
            print(f"{stage}: {verdict} in call 1: nothing carried, call 2 skips it")
            continue
        lines, records = [], []  # whole, parsed lines only: call 2 appends to this file
        for line in logs.get(f"logs/{stage}_progress.jsonl", "").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if "nodeid" in rec:
                lines.append(line)
                records.append(rec)
        (into / f"{stage}_progress.jsonl").write_text("".join(l + "\n" for l in lines))
        _, counts = test_outcomes(records)
        done = sum(counts.values())
        how = verdict or "not recorded (the call was cut before the stage ended)"
        said = f"{stage}: {how} in call 1"
        if cut_at_hang:
            said += " (its last run ended at a hung test, not run on after it)"
        said += f", {done} test{'s' * (done != 1)} done"
        if done:
            said += " (" + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ")"
        said += "; call 2 runs the rest" if done else "; call 2 runs all of it"
        if not tgz.is_file():
            said += f" (no {tgz.name} in {res}: what call 1 did of it is unknown)"
        m = re.match(r"HUNG (.+?): no result", logs.get(f"logs/{stage}_hang.txt", ""))
        # the test the cut interrupted, unless its outcome was already written (a cut in its
        # teardown): --skip-done then leaves it out
        if m and m.group(1) not in {r["nodeid"] for r in records}:
            said += f" ({m.group(1)} was running when it was cut: call 2 runs it again)"
        print(said)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line main() parses (the docs' command lines are checked against it:
    tests/test_docs_cite_real_flags.py)."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage")
    st.add_argument("--name", required=True)
    st.add_argument("--rc", required=True)
    st.add_argument("--seconds", type=int, required=True)
    st.add_argument("--limit", type=int, required=True)
    st.add_argument("--skip", default="")
    st.add_argument("--skip-budget", type=int, default=None)
    st.add_argument("--bench-start", type=int, default=0)
    st.add_argument("--kernels-start", type=int, default=0)
    st.add_argument("--progress-start", type=int, default=0)
    hg = sub.add_parser("hung")
    hg.add_argument("--progress", required=True)
    hg.add_argument("--hang", required=True)
    hg.add_argument("--keep", required=True)
    sub.add_parser("summary")
    ac = sub.add_parser("after-call1")
    ac.add_argument("--results", required=True, help="where call 1's files came back")
    ac.add_argument("--into", required=True, help="the carried folder to (re)write")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    return {"stage": cmd_stage, "hung": cmd_hung, "summary": cmd_summary,
            "after-call1": cmd_after_call1}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
