"""`python -m cllm_gpu` and the `cllm-gpu` console script (pyproject.toml names `run`).

The CLI's imports (NumPy, CuPy, the package) take a few tenths of a second: a Ctrl-C in them
is answered like a Ctrl-C anywhere else in the CLI (cli.main), one line and exit status 130,
not a KeyboardInterrupt traceback. This module and the package's __init__ import nothing
heavy, so the imports all happen inside `run`."""
import sys


def run(argv=None) -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:
        from .errors import INTERRUPTED, print_line
        print_line(f"error: {INTERRUPTED[0]}")
        return INTERRUPTED[1]
    return main(argv)


if __name__ == "__main__":
    sys.exit(run())
