"""`cllm-gpu plot`: the curves of one or more runs (RUN/metrics.jsonl) in one PNG: train and
validation loss against steps and against tokens, the learning rate, tokens/s. Several runs
are overlaid, one colour each. Needs matplotlib (the `plot` extra)."""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .data import iter_jsonl
from .errors import CLLMError, DataError

PANELS = ("loss vs step", "loss vs tokens", "learning rate", "tokens/s")


def read_metrics(run) -> dict:
    """{"train": [records], "eval": [records]} of RUN/metrics.jsonl, sorted by step. A "start"
    record (each training call writes one first) drops the earlier records past its step: a
    resumed run re-runs them (a kill may have logged steps past the checkpoint resumed), a
    run begun over in the directory replaces them all. Where a step is logged twice the later
    record wins."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not found (is {run} a run directory?)")
    by_type = {"train": {}, "eval": {}}
    try:
        with open(path, encoding="utf-8") as f:
            for n, rec in iter_jsonl(path, f):
                if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                    continue
                if rec.get("type") == "start":
                    for kept in by_type.values():
                        for step in [s for s in kept if s > rec["step"]]:
                            del kept[step]
                elif rec.get("type") in by_type:
                    _check_numbers(rec, f"{path}:{n}")
                    by_type[rec["type"]][rec["step"]] = rec
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (the trainer writes JSON lines)") from None
    if not by_type["train"]:
        raise DataError(f"{path}: no training records to plot")
    return {k: [v[s] for s in sorted(v)] for k, v in by_type.items()}


# the numbers each record type's curves are drawn from ("tokens" is optional: older runs')
PLOTTED = {"train": ("loss", "lr", "tokens_per_s"), "eval": ("val_loss",)}


def _check_numbers(rec: dict, where: str):
    """A train or eval record has the numbers its curves plot (a damaged or hand-edited line
    was a KeyError from the drawing, or a string drawn as a category). null is a number that
    was not finite (the trainer writes strict JSON: a diverged val loss is null, where older
    files hold NaN): drawn as NaN, a gap in the curve, as those were."""
    for field in PLOTTED[rec["type"]]:
        v = rec.get(field)
        if field in rec and v is None:
            rec[field] = v = float("nan")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(f"{where}: {rec['type']} record without a number for {field}")


def _label(runs, run) -> str:
    names = [Path(r).name for r in runs]
    return Path(run).name if names.count(Path(run).name) == 1 else str(run)


def plot_runs(runs, out, width_in: float = 12.0, height_in: float = 8.0, dpi: int = 100):
    """Draw the runs' curves (PANELS, 2 x 2) into the PNG `out`; returns the Figure."""
    if Path(out).suffix.lower() != ".png":  # the file is PNG whatever its name says
        raise CLLMError(f"{out}: plot writes a PNG; name the file *.png")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CLLMError("plot needs matplotlib (pip install 'cllm-gpu[plot]')") from None
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = dict(zip(PANELS, fig.subplots(2, 2).ravel()))
    for i, run in enumerate(runs):
        m, color, label = read_metrics(run), f"C{i % 10}", _label(runs, run)
        train, evals = m["train"], m["eval"]
        steps = [r["step"] for r in train]
        axes["loss vs step"].plot(steps, [r["loss"] for r in train], color=color,
                                  label=f"{label} train")
        if evals:
            axes["loss vs step"].plot([r["step"] for r in evals], [r["val_loss"] for r in evals],
                                      color=color, linestyle="--", marker="o", markersize=3,
                                      label=f"{label} val")
        # "tokens" is logged since tokens were counted; older records are left out
        tr = [r for r in train if "tokens" in r]
        ev = [r for r in evals if "tokens" in r]
        if tr:
            axes["loss vs tokens"].plot([r["tokens"] for r in tr], [r["loss"] for r in tr],
                                        color=color, label=f"{label} train")
        if ev:
            axes["loss vs tokens"].plot([r["tokens"] for r in ev], [r["val_loss"] for r in ev],
                                        color=color, linestyle="--", marker="o", markersize=3,
                                        label=f"{label} val")
        axes["learning rate"].plot(steps, [r["lr"] for r in train], color=color, label=label)
        axes["tokens/s"].plot(steps, [r["tokens_per_s"] for r in train], color=color,
                              label=label)
    for title, ax in axes.items():
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("tokens" if title == "loss vs tokens" else "step")
        if ax.lines:
            ax.legend(fontsize="small")
    axes["loss vs step"].set_ylabel("loss")
    axes["loss vs tokens"].set_ylabel("loss")
    fig.tight_layout()
    # written beside the file `out` names (through a link, as savefig wrote) and renamed over
    # it when whole: a write that fails (a full disk) left the plot already there replaced by
    # the new one's first bytes. What is no file (a FIFO, a terminal) is given to savefig as
    # it is (a FIFO is refused: not seekable): the rename replaced it with a file, said
    # 'wrote', and its reader got nothing
    out = Path(out)
    target = Path(os.path.realpath(out))
    in_place = target.exists() and not target.is_file()
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        if in_place:
            fig.savefig(out, format="png")
        else:
            fig.savefig(part, format="png")
            with contextlib.suppress(FileNotFoundError):  # the plot replaced keeps its mode
                os.chmod(part, stat.S_IMODE(os.stat(target).st_mode))
            os.replace(part, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            part.unlink()
        if not isinstance(e, OSError):
            raise
        raise CLLMError(f"{out}: cannot write ({e.strerror or e})") from None
    return fig
