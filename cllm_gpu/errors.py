"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""
import os
import sys


# A Ctrl-C (KeyboardInterrupt) in the CLI: its one line and exit status; before a command
# runs, or in one that writes nothing. cli._interrupted_line: what each command leaves.
INTERRUPTED = ("interrupted", 130)


def print_line(line: str, stream=None):
    """Writes `line` and its newline to stderr (or `stream`) in one write. print() writes the
    two apart, and under mpiexec the ranks' stderr meet in one stream: two ranks' error lines
    ran together as "error: rank 0: ...error: rank 1: ..." then a lone newline."""
    stream = sys.stderr if stream is None else stream
    stream.write(line + "\n")
    stream.flush()


def print_progress(line: str):
    """A progress line on stdout, flushed. A reader that has gone (`cllm-gpu train ... | tee
    log`, and a Ctrl-C that ended tee as well) costs the lines from then on, not the run:
    stdout is pointed at /dev/null and training goes on to the checkpoint a signal asks for.
    The BrokenPipeError of the signal handler's own line ended the run without it. The line
    and its newline go in one write, as print_line's: under PYTHONUNBUFFERED print() wrote
    them apart, and another process's line sharing the stream (mpiexec's ranks) landed
    between them ("saved .../ckpt-00000015rank 1 exits 143")."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    except OSError as e:  # a full disk, EIO, a closed descriptor: as a reader gone, but said
        stdout_failed(e)


# the error that stopped stdout's lines (ENOSPC, EIO, EBADF; not a closed pipe), else None:
# cli.main ends the command with it once the work is done
stdout_failure = None


def stdout_failed(error: OSError):
    """stdout cannot be written (`train ... > log` on a full disk): the lines from then on are
    dropped and the work goes on to its end (a run to its checkpoints, prepare to its files);
    main says so on stderr and exits 1. Raising here ended a run without its checkpoint."""
    global stdout_failure
    if stdout_failure is None:
        stdout_failure = error
    silence_stdout()


class GuardedStdout:
    """sys.stdout for a command: a write or flush that fails with anything but a closed pipe
    (that one keeps its exit 141) is stdout_failed's, not the command's error."""

    def __init__(self, stream):
        self.stream = stream

    def _guarded(self, call, *args, failed=None):
        """call(*args), or `failed` after stdout_failed where it fails (a closed pipe raises)."""
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            stdout_failed(e)
            return failed

    def write(self, text):
        return self._guarded(self.stream.write, text, failed=len(text))

    def flush(self):
        self._guarded(self.stream.flush)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def silence_stdout():
    """Points stdout at /dev/null: its reader is gone, and what is still unflushed (or the
    interpreter's flush at exit) must not raise BrokenPipeError again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())  # the unflushed lines go there too
        os.close(null)
    except (OSError, ValueError):  # a stdout without a file descriptor
        sys.stdout = open(os.devnull, "w")


def escape_unencodable_stdout():
    """stdout writes what its encoding cannot hold as backslash escapes, as Python's stderr
    does, instead of raising: a path holding bytes that are not UTF-8 (a directory named with
    b'\\xff' is the str '\\udcff' in Python) on a stdout in Latin-1, ASCII, or UTF-8 outside the
    C.UTF-8 locale (its errors are 'strict') was a UnicodeEncodeError traceback at `prepare`'s
    and `plot`'s last line, `export`'s notes, and `train`'s first "saved" line, which ended
    the run there. A stdout that already tolerates them (surrogateescape, in C.UTF-8) is left
    as it is."""
    if getattr(sys.stdout, "errors", None) == "strict":
        try:
            sys.stdout.reconfigure(errors="backslashreplace")
        except (AttributeError, OSError, ValueError):  # not a TextIOWrapper, or closed
            pass


# exit status of a command whose stdout reader went away (`cllm-gpu sample RUN | head -1`):
# 128 + SIGPIPE, what a shell reports for `git log | head -1` or any producer the closed pipe
# ended, so `set -o pipefail` sees the same
STDOUT_CLOSED_STATUS = 141


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more: the BrokenPipeError was its own, not one
    of a socket or another pipe (those stay errors). poll() reports POLLERR on a pipe's write
    end once the read end is closed; where there is no poll(), a BrokenPipeError is taken as
    stdout's."""
    try:
        import select
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


class CLLMError(Exception):
    """A problem the user can fix (bad config, bad data, bad checkpoint, ...). fields: the
    settings the message names as bare words (a config's fields, prepare's arguments): the
    CLI names its flags instead (cli._naming_flags)."""
    # True: in a data-parallel job every rank raises it at the same point with the same
    # message, so the CLI prints it once (rank 0) and every rank exits normally; otherwise the
    # rank that raised it ends the whole job (distributed.abort_job)
    collective = False

    def __init__(self, message="", fields=()):
        super().__init__(message)
        self.fields = tuple(fields)


class CollectiveError(CLLMError):
    """Raised by every rank together (distributed.Communicator.agree / check_same)."""
    collective = True


class ConfigError(CLLMError, ValueError):
    pass


class DataError(CLLMError):
    pass


class CheckpointError(CLLMError):
    pass


def refuse_a_file_for_a_directory(path, flag: str, kind: str = "directory", error=ConfigError):
    """An output directory given as `flag` that names an existing file: one line, the file
    untouched (mkdir would say only "File exists")."""
    if path.exists() and not path.is_dir():
        raise error(f"{path}: is a file, not a {kind} (give {flag} a directory)")
    if path.is_symlink() and not path.exists():  # mkdir would say "File exists" here too
        raise error(f"{path}: is a link to {os.readlink(path)}, which does not exist (create "
                    f"it, or give {flag} another directory)")


class NonFiniteError(CLLMError):
    collective = True  # the decision comes from global values: every rank stops at that step


class ModelTooLargeError(CLLMError, MemoryError):
    """The model's parameter state cannot fit in the memory there is (checked before any of it
    is built)."""
