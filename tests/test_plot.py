"""`cllm-gpu plot`: two real (tiny) runs overlaid in one PNG; the PNG is opened and checked to be
a plot of their data (size, not blank, each run's colour drawn; the drawn lines hold the
metrics). Required in CI (matplotlib comes with the dev extra)."""
import os
import stat

import numpy as np
import pytest

from cllm_gpu import GpuTrainer, ModelConfig, TrainConfig
from cllm_gpu.plot import PANELS, plot_runs, read_metrics
from clihelp import assert_one_line_error, run_cli

pytestmark = pytest.mark.ci_required("plot")


@pytest.fixture(scope="module")
def runs(token_dir, tmp_path_factory):
    data = token_dir("plots need data to plot. " * 200, "plotdata")
    out = tmp_path_factory.mktemp("runs")
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    for name, lr in (("fast", 1e-2), ("slow", 1e-3)):
        tc = TrainConfig(batch_size=2, max_steps=12, eval_interval=4, eval_batches=1,
                         log_interval=2, learning_rate=lr, min_lr=lr / 10, warmup_steps=2)
        GpuTrainer(cfg, tc, data, out / name, backend="numpy", log=lambda *a: None).train()
    return [out / "fast", out / "slow"]


def _pixels_near(img, rgb, tol=0.02):
    return int((np.abs(img[..., :3] - np.asarray(rgb)).max(axis=-1) < tol).sum())


def test_plot_is_a_real_plot_of_the_runs(runs, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import colors, image
    out = tmp_path / "curves.png"
    fig = plot_runs(runs, out)
    img = image.imread(out)
    assert img.shape[:2] == (800, 1200)
    not_white = (img[..., :3] < 0.95).any(axis=-1).mean()
    assert 0.02 < not_white < 0.6, not_white
    assert len(np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50
    for c in ("C0", "C1"):  # each run's colour is drawn, in more than a few pixels
        assert _pixels_near(img, colors.to_rgb(c)) > 300, c
    # the drawn lines are the runs' metrics
    axes = dict(zip(PANELS, fig.axes))
    assert [ax.get_title() for ax in fig.axes] == list(PANELS)
    for i, run in enumerate(runs):
        m = read_metrics(run)
        mine = [ln for ax in fig.axes for ln in ax.lines
                if colors.to_hex(ln.get_color()) == colors.to_hex(f"C{i}")]
        train = axes["loss vs step"].lines[2 * i]
        np.testing.assert_array_equal(train.get_xdata(), [r["step"] for r in m["train"]])
        np.testing.assert_array_equal(train.get_ydata(), [r["loss"] for r in m["train"]])
        val = axes["loss vs tokens"].lines[2 * i + 1]
        np.testing.assert_array_equal(val.get_xdata(), [r["tokens"] for r in m["eval"]])
        np.testing.assert_array_equal(val.get_ydata(), [r["val_loss"] for r in m["eval"]])
        np.testing.assert_array_equal(axes["learning rate"].lines[i].get_ydata(),
                                      [r["lr"] for r in m["train"]])
        # train and val in both loss panels, learning rate, tokens/s
        assert len(mine) == 6 and f"{run.name} val" in [ln.get_label() for ln in mine]
    assert [r["step"] for r in read_metrics(runs[0])["eval"]] == [4, 8, 12]


def test_plot_command(runs, tmp_path):
    pytest.importorskip("matplotlib")
    r = run_cli("plot", *runs, "--out", tmp_path / "c.png")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (tmp_path / "c.png").stat().st_size > 20_000
    assert_one_line_error(run_cli("plot", tmp_path, "--out", tmp_path / "d.png"),
                          r"metrics\.jsonl: not found")


def test_a_resumed_or_restarted_run_plots_only_the_steps_it_kept(token_dir, tmp_path):
    """metrics.jsonl is appended to: a run resumed from an older checkpoint than the last step
    logged (killed between checkpoints), or a new run in a directory without checkpoints,
    left the earlier records past its own steps in the plot ("the later record wins" only
    replaces the steps logged again)."""
    data = token_dir("plots need data to plot. " * 200, "plotdata2")
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    kw = dict(batch_size=2, eval_interval=4, eval_batches=1, log_interval=2,
              checkpoint_interval=4, final_checkpoint=False)
    quiet = lambda *a: None  # noqa: E731
    run = tmp_path / "run"
    # 7 steps logged, the last checkpoint at step 4 (as if killed after step 7)
    GpuTrainer(cfg, TrainConfig(max_steps=7, **kw), data, run, backend="numpy", log=quiet).train()
    GpuTrainer(None, TrainConfig(max_steps=6, **kw), data, run, backend="numpy", log=quiet,
               resume=run).train()
    m = read_metrics(run)
    assert [r["step"] for r in m["train"]] == [1, 2, 4, 6]
    assert [r["step"] for r in m["eval"]] == [4, 6]
    # a new run where an earlier one saved no checkpoint
    again = tmp_path / "again"
    GpuTrainer(cfg, TrainConfig(max_steps=8, **dict(kw, checkpoint_interval=0)), data, again,
               backend="numpy", log=quiet).train()
    GpuTrainer(cfg, TrainConfig(max_steps=3, **kw), data, again, backend="numpy",
               log=quiet).train()
    m = read_metrics(again)
    assert [r["step"] for r in m["train"]] == [1, 2, 3]
    assert [r["step"] for r in m["eval"]] == [3]


def _metrics(tmp_path, lines, name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(lines if isinstance(lines, bytes) else
                                        "".join(line + "\n" for line in lines).encode())
    return run


_TRAIN = '{{"type": "train", "step": {}, "loss": 2.5, "lr": 0.001, "tokens_per_s": 10.0}}'


def test_records_that_are_not_a_steps_record_are_skipped(tmp_path):
    """metrics.jsonl lines that are JSON but not an object with an integer step (a list, a
    string step, no step) are not steps to plot: skipped, not a traceback."""
    run = _metrics(tmp_path, ['["train", 1]', '{"type": "train", "step": "2", "loss": 1}',
                              '{"type": "eval", "val_loss": 3.0}', _TRAIN.format(3),
                              '"a string"'])
    m = read_metrics(run)
    assert [r["step"] for r in m["train"]] == [3] and m["eval"] == []


@pytest.mark.parametrize("lines", [[], ['{"type": "start", "step": 0}'],
                                   ['{"type": "eval", "step": 4, "val_loss": 3.0}']])
def test_a_run_without_training_records_is_one_line(tmp_path, lines):
    """A run that logged no training step yet (killed before its first log interval): nothing
    to plot, said in one line, not an empty PNG."""
    from cllm_gpu.errors import DataError
    run = _metrics(tmp_path, lines)
    with pytest.raises(DataError, match=r"metrics.jsonl: no training records to plot$"):
        read_metrics(run)
    assert_one_line_error(run_cli("plot", run, "--out", tmp_path / "p.png"),
                          r"metrics\.jsonl: no training records to plot$")
    assert not (tmp_path / "p.png").exists()


def test_plot_without_matplotlib_says_which_extra_to_install(tmp_path, monkeypatch):
    """matplotlib is the `plot` extra: without it, one line naming it (an import made to fail
    as if it were not installed)."""
    import sys
    from cllm_gpu.errors import CLLMError
    run = _metrics(tmp_path, [_TRAIN.format(1)])
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(CLLMError, match=r"^plot needs matplotlib \(pip install "
                                        r"'cllm-gpu\[plot\]'\)$"):
        plot_runs([run], tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_a_png_that_cannot_be_written_is_one_line(tmp_path):
    """--out in a directory that is not there: one line naming the file and why."""
    pytest.importorskip("matplotlib")
    run = _metrics(tmp_path, [_TRAIN.format(1)])
    out = tmp_path / "nowhere" / "p.png"
    assert_one_line_error(run_cli("plot", run, "--out", out),
                          rf"{out}: cannot write \(No such file or directory\)$")


def test_a_metrics_file_that_is_not_utf8_is_one_line(tmp_path):
    """metrics.jsonl holding bytes that are not UTF-8 (a damaged file): the text read raised
    UnicodeDecodeError, a traceback. Now one line naming the file."""
    run = _metrics(tmp_path, b"\xff\xfe" + _TRAIN.format(1).encode() + b"\n")
    assert_one_line_error(run_cli("plot", run, "--out", tmp_path / "p.png"),
                          r"metrics\.jsonl: not UTF-8 text")


@pytest.mark.parametrize("record,field", [
    ('{"type": "train", "step": 1, "lr": 0.001, "tokens_per_s": 10.0}', "loss"),
    ('{"type": "train", "step": 1, "loss": 2.5, "tokens_per_s": 10.0}', "lr"),
    ('{"type": "train", "step": 1, "loss": 2.5, "lr": 0.001, "tokens_per_s": "fast"}',
     "tokens_per_s"),
    ('{"type": "eval", "step": 1}', "val_loss"),
    # true is an int to Python (a bool subclass) but no number a curve means
    ('{"type": "eval", "step": 1, "val_loss": true}', "val_loss"),
])
def test_a_record_without_a_number_the_plot_needs_is_one_line(tmp_path, record, field):
    """A train record lacking its loss, lr or tokens/s, or an eval record its val_loss (a
    damaged or hand-edited file): a KeyError traceback from the drawing code. Now one line
    naming the file, the line and the field."""
    pytest.importorskip("matplotlib")
    run = _metrics(tmp_path, [_TRAIN.format(0), record])
    assert_one_line_error(run_cli("plot", run, "--out", tmp_path / "p.png"),
                          rf"metrics\.jsonl:2: {record.split(chr(34))[3]} record without a "
                          rf"number for {field}$")


@pytest.mark.parametrize("val_loss", ["null", "NaN"])
def test_a_val_loss_that_was_not_finite_is_a_gap_in_the_curve(tmp_path, val_loss):
    """The trainer writes a non-finite val loss as null (strict JSON); files written before
    hold NaN. Both read as NaN (matplotlib leaves a gap); null was refused as 'no number'."""
    run = _metrics(tmp_path, [_TRAIN.format(1), f'{{"type": "eval", "step": 1, '
                                                f'"val_loss": {val_loss}}}',
                              '{"type": "eval", "step": 2, "val_loss": 2.0}'])
    vals = [r["val_loss"] for r in read_metrics(run)["eval"]]
    assert np.isnan(vals[0]) and vals[1] == 2.0


def test_a_png_that_cannot_be_written_in_full_leaves_the_old_one(tmp_path):
    """A full disk while the PNG is written (a file size limit here, RLIMIT_FSIZE: a short
    write, then EFBIG): savefig wrote over --out in place, so the plot already there was
    replaced by its first bytes (seen on a full 600 KB tmpfs: 88,566 bytes of a good PNG
    became 90,112 of a broken one). Now the PNG is written beside it and renamed over it
    when whole: the old one stays as it was, and nothing else is left."""
    pytest.importorskip("matplotlib")
    import resource
    from cllm_gpu.errors import CLLMError
    run = _metrics(tmp_path, [_TRAIN.format(1), _TRAIN.format(2)])
    out = tmp_path / "p.png"
    plot_runs([run], out)
    old = out.read_bytes()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(old) // 2, limit[1]))
    try:
        with pytest.raises(CLLMError, match=rf"^{out}: cannot write \(File too large\)$"):
            plot_runs([run], out, width_in=16)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    assert out.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "run"]


def test_a_png_out_that_is_a_link_writes_its_target_and_keeps_the_link(tmp_path):
    """--out a symbolic link (a served latest.png pointing at the run's plot): savefig wrote
    through it before the PNG was written beside --out and renamed over it (2970d5c); since
    then the rename replaced the link by a file of its own and left the target as it was.
    Now the PNG is written beside the target and renamed over that: the link stays."""
    pytest.importorskip("matplotlib")
    run = _metrics(tmp_path, [_TRAIN.format(1), _TRAIN.format(2)])
    (tmp_path / "www").mkdir()
    link = tmp_path / "latest.png"
    link.symlink_to("www/plot.png")            # dangling: the first plot makes the target
    for width in (12, 16):
        plot_runs([run], link, width_in=width)
        assert link.is_symlink() and link.readlink().as_posix() == "www/plot.png"
        assert (tmp_path / "www" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "www").iterdir()) == ["plot.png"]


def test_a_png_plotted_again_keeps_its_mode(tmp_path):
    """The PNG written beside --out and renamed over it (2970d5c) took the umask's mode: a plot
    kept private (0600) became readable by all (0644) when plotted again. It keeps the mode of
    the plot it replaces; a new one gets the umask's."""
    pytest.importorskip("matplotlib")
    run = _metrics(tmp_path, [_TRAIN.format(1), _TRAIN.format(2)])
    out = tmp_path / "p.png"
    old_umask = os.umask(0o022)
    try:
        plot_runs([run], out)
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        out.chmod(0o600)
        plot_runs([run], out, width_in=16)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_a_png_written_through_a_link_goes_where_it_did_and_a_fifo_stays(tmp_path):
    """--out a link (a site's latest.png pointing at the newest plot): savefig wrote through
    it, to the file it names; the write beside --out and rename (for a full disk) replaced
    the link with a file and left the file it named as it was. --out a FIFO (a viewer's
    pipe): savefig refused it (a PNG is written with seeks) in one line; the rename replaced
    it with a file and said 'wrote', its reader never got a byte. Now a link's target is
    written beside it and renamed over it (the link stays), and a FIFO is refused as before,
    left a FIFO."""
    pytest.importorskip("matplotlib")
    from cllm_gpu.errors import CLLMError
    run = _metrics(tmp_path, [_TRAIN.format(1), _TRAIN.format(2)])
    (tmp_path / "site").mkdir()
    target = tmp_path / "site" / "latest.png"
    target.write_bytes(b"old")
    link = tmp_path / "latest.png"
    link.symlink_to(target)
    plot_runs([run], link)
    assert link.is_symlink() and target.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["latest.png"]

    fifo = tmp_path / "view.png"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that its open for writing returns
    try:
        with pytest.raises(CLLMError, match=rf"^{fifo}: cannot write \(.*not seekable"):
            plot_runs([run], fifo)
    finally:
        os.close(reader)
    assert fifo.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.png", "run", "site",
                                                           "view.png"]


def test_a_png_that_cannot_be_renamed_into_place_leaves_no_part_file(tmp_path, monkeypatch):
    """The PNG written whole beside --out, then its rename refused (an OSError; savefig's own
    failures remove what it wrote): one error naming --out, the old PNG as it was, and the
    part file removed (mutation audit h42i: the removal dropped passed every test)."""
    pytest.importorskip("matplotlib")
    from cllm_gpu.errors import CLLMError
    run = _metrics(tmp_path, [_TRAIN.format(1), _TRAIN.format(2)])
    out = tmp_path / "p.png"
    out.write_bytes(b"old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(CLLMError, match=rf"^{out}: cannot write \(No space left on device\)$"):
        plot_runs([run], out)
    monkeypatch.undo()
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "run"]


def test_runs_of_the_same_name_are_labelled_by_their_paths(tmp_path):
    """Two runs named alike (a/run, b/run) are told apart in the legend by their paths, a run
    whose name is its own by its name (mutation audit: labelling every run by its name, two
    curves called 'run', passed every test)."""
    pytest.importorskip("matplotlib")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    runs = [_metrics(tmp_path / d, [_TRAIN.format(1), _TRAIN.format(2)]) for d in ("a", "b")]
    runs.append(_metrics(tmp_path, [_TRAIN.format(1)], name="other"))
    fig = plot_runs(runs, tmp_path / "curves.png")
    labels = [ln.get_label() for ln in fig.axes[PANELS.index("learning rate")].lines]
    assert labels == [str(runs[0]), str(runs[1]), "other"]
