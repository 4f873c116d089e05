"""pytest plugin for GPU sessions: a per-test time limit that names the test that hangs, and a
progress file that keeps each test's outcome even when the process is killed.

    python3 -m pytest -p pytest_time_limit --time-limit 60 --progress-file p.jsonl \
        --hang-file hang.txt [--skip-done] tests/gpu           # (scripts/ on PYTHONPATH)

pytest-timeout is not installed everywhere, so this does the two things a lent GPU slot needs:
- Soft limit: SIGALRM after --time-limit seconds raises in the test (a failure naming the limit,
  with the traceback of where it was); the run goes on with the next test.
- Hard limit: a test stuck where a signal cannot reach it (a CUDA synchronize waiting on a hung
  kernel, a C loop holding the GIL) is caught --hard-grace seconds later by faulthandler, which
  writes every thread's traceback under a first line "HUNG <nodeid> ..." into --hang-file and
  exits the process. The file is empty whenever no test is running past its limit.
- --progress-file: one JSON line per test phase outcome ({"nodeid", "when", "outcome",
  "seconds", and "message" for a failure}), appended and flushed as each one is known.
- --skip-done: deselect the tests already in the progress file (and those recorded as hung), so
  a rerun after a hard hang continues where the killed run stopped.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("time-limit", "per-test time limit and progress file (GPU sessions)")
    g.addoption("--time-limit", type=float, default=0.0,
                help="seconds per test (setup + call + teardown) before it fails; 0 = none")
    g.addoption("--hard-grace", type=float, default=15.0,
                help="seconds after --time-limit before a test that ignores the soft limit "
                     "ends the process (tracebacks into --hang-file) (default %(default)s)")
    g.addoption("--hang-file", default=None,
                help="where a hard hang is written: 'HUNG <nodeid> ...' then every thread's "
                     "traceback")
    g.addoption("--progress-file", default=None,
                help="append one JSON line per test outcome here, flushed at once")
    g.addoption("--skip-done", action="store_true",
                help="deselect the tests already recorded in --progress-file")


class TimeLimitExceeded(Exception):
    """Raised in a test that ran past --time-limit."""


class TimeLimitPlugin:
    """Registered by pytest_configure; holds the open hang and progress files."""

    def __init__(self, config):
        self.limit = config.getoption("time_limit")
        self.grace = config.getoption("hard_grace")
        hang = config.getoption("hang_file")
        self.hang = open(hang, "w") if hang else None  # noqa: SIM115 (open for the session)
        self.progress_path = config.getoption("progress_file")
        self.progress = open(self.progress_path, "a") if self.progress_path else None  # noqa: SIM115
        self.skip_done = config.getoption("skip_done")
        self.nodeid = None

    def _alarm(self, signum, frame):
        raise TimeLimitExceeded(f"{self.nodeid} ran past its time limit of {self.limit:g} s")

    def _arm(self, nodeid):
        self.nodeid = nodeid
        if self.limit <= 0:
            return
        signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, self.limit)
        if self.hang is not None:
            hard = self.limit + self.grace
            self.hang.seek(0)
            self.hang.truncate()
            self.hang.write(f"HUNG {nodeid}: no result {hard:g} s after it started "
                            f"(limit {self.limit:g} s); tracebacks of every thread follow\n")
            self.hang.flush()
            faulthandler.dump_traceback_later(hard, exit=True, file=self.hang)

    def _disarm(self):
        if self.limit <= 0:
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        if self.hang is not None:
            faulthandler.cancel_dump_traceback_later()
            self.hang.seek(0)
            self.hang.truncate()
            self.hang.flush()

    def pytest_collection_modifyitems(self, config, items):
        if not (self.skip_done and self.progress_path):
            return
        done = done_nodeids(self.progress_path)
        gone = [it for it in items if it.nodeid in done]
        if gone:
            config.hook.pytest_deselected(items=gone)
            items[:] = [it for it in items if it.nodeid not in done]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self._arm(item.nodeid)
        try:
            yield
        finally:
            self._disarm()

    def pytest_runtest_logreport(self, report):
        if self.progress is None or (report.when != "call" and report.passed):
            return  # a setup/teardown that passed: the call's line says it all
        rec = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
               "seconds": round(report.duration, 3)}
        if report.failed:  # the message survives even if the process dies before its summary
            crash = getattr(report.longrepr, "reprcrash", None)
            text = getattr(crash, "message", None) or str(report.longrepr).strip()
            rec["message"] = (text.splitlines() or [""])[0][:300]
        self.progress.write(json.dumps(rec) + "\n")
        self.progress.flush()
        os.fsync(self.progress.fileno())

    def pytest_unconfigure(self, config):
        self._disarm()
        for fh in (self.hang, self.progress):
            if fh is not None:
                fh.close()


def done_nodeids(path) -> set:
    """Node ids already recorded in a progress file (a line cut short by a kill is skipped)."""
    done = set()
    try:
        with open(path) as f:
            for line in f:
                try:
                    done.add(json.loads(line)["nodeid"])
                except (ValueError, KeyError):
                    continue
    except FileNotFoundError:
        pass
    return done


def pytest_configure(config):
    config.pluginmanager.register(TimeLimitPlugin(config), "time_limit_plugin")
