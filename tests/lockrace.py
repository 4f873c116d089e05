"""A thread racing a data directory's lock (cllm_gpu.data.directory_lock), ordered by what it
does, not by a timer. A test used to start a second writer and give it join(timeout=1): "it
renames here, or waits for the lock". That told the two apart by time only: a writer the lock
failed to keep out but that took over 1 s (a loaded machine) was read as waiting, its renames
landed after the scenario the test meant to build, and the missing lock went unseen."""
import threading
import types


class RacingThread:
    """target(*args) in a thread of its own. start(monkeypatch) returns once it has ended or
    has found a directory lock held by another and waits on it; `waited` then lists the locks
    it found held ("shared" or "exclusive"), in order; `ended` says whether it has ended.
    finish() waits for it to end and raises what it raised."""

    def __init__(self, target, *args):
        self.waited = []
        self._target, self._args = target, args
        self._error = None
        self._ended = threading.Event()
        self._settled = threading.Event()  # ended, or waiting on a lock
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self._target(*self._args)
        except BaseException as e:  # re-raised by finish(), in the test's thread
            self._error = e
        finally:
            self._ended.set()
            self._settled.set()

    def start(self, monkeypatch, timeout: float = 60.0) -> "RacingThread":
        """Start it, and return once it has ended or waits on a directory lock. Every lock
        goes through cllm_gpu.data's fcntl.flock: this thread's is tried first without
        waiting, and one refused so is a lock another holds."""
        import cllm_gpu.data as data
        real = data.fcntl

        def flock(fd, op):
            if threading.current_thread() is self._thread and not op & real.LOCK_NB:
                try:
                    return real.flock(fd, op | real.LOCK_NB)
                except BlockingIOError:
                    self.waited.append("shared" if op & real.LOCK_SH else "exclusive")
                    self._settled.set()
            return real.flock(fd, op)
        monkeypatch.setattr(data, "fcntl", types.SimpleNamespace(
            LOCK_SH=real.LOCK_SH, LOCK_EX=real.LOCK_EX, LOCK_NB=real.LOCK_NB,
            LOCK_UN=real.LOCK_UN, flock=flock))
        self._thread.start()
        assert self._settled.wait(timeout), \
            f"{self._target.__name__} neither ended nor waited on a directory lock in {timeout} s"
        return self

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def finish(self, timeout: float = 60.0):
        assert self._ended.wait(timeout), f"{self._target.__name__} still running after " \
                                          f"{timeout} s"
        if self._error is not None:
            raise self._error


def rename_over_once_opened(monkeypatch, module, path, replacement):
    """A writer without the lock: once `module` (cllm_gpu.data) opens `path`, `replacement` is
    renamed over it (once: the replacement is gone after), so the reader holds the old file
    while the directory holds another. Undone by monkeypatch.undo()."""
    import builtins
    import os
    from pathlib import Path

    def renamed_over_once_opened(file, *args, **kwargs):
        f = builtins.open(file, *args, **kwargs)
        if Path(file) == Path(path) and Path(replacement).exists():
            os.replace(replacement, path)
        return f
    monkeypatch.setattr(module, "open", renamed_over_once_opened, raising=False)
