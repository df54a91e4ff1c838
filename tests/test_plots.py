"""`nos plot` and nos.plots: reward curves and learning-rate sweeps, drawn from runs in real SQLite."""

from __future__ import annotations

import io
import math
import os
import stat
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

import pytest

from helpers.reports import build_run, invoke, pixels

ROOT = Path(__file__).resolve().parents[1]


def test_curve_data():
    from nos.plots import curve_data
    from nos.store.history import EvaluationRow

    def row(seq, status, reward):
        return EvaluationRow(
            id=seq, run_id=1, seq=seq, batch=0, rule_id=1, rule="g", depth=1, task="t", status=status, attempts=1,
            worker=None, reward=reward, test_acc=None, best_lr=None, wall_seconds=None, cached_from=None, error=None,
            reason=None, created_at=None, claimed_at=None, finished_at=None)

    rows = [row(3, "done", 0.5), row(0, "done", 0.2), row(1, "failed", None), row(2, "queued", None),
            row(4, "cached", 0.9), row(5, "diverged", 0.0), row(6, "rejected", 0.0)]
    data = curve_data(rows, window=2)
    assert data.seq == [0, 1, 3, 4, 5]   # rejected proposals are free: not on the curve
    assert data.counted == [1, 2, 3, 4, 5]
    assert data.reward == [0.2, 0.0, 0.5, 0.9, 0.0]
    assert data.failed == [False, True, False, False, False]
    assert data.mean == pytest.approx([0.2, 0.1, 0.25, 0.7, 0.45])
    assert data.best == [0.2, 0.2, 0.5, 0.9, 0.9]


def test_plot_curves_of_several_runs(two_runs, tmp_path):
    _, url, first, second = two_runs
    out = tmp_path / "curve.png"
    result = invoke("plot", str(first["run_id"]), str(second["run_id"]), "-o", str(out), "--window", "3", "--db", url)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 2 runs, 12 finished evaluations" in result.output
    image = pixels(out)
    assert image[..., :3].std() > 0.05   # not blank
    assert invoke("plot", str(first["run_id"]), "-o", str(tmp_path / "c.svg"), "--db", url).exit_code == 0
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")


def test_the_suffix_picks_the_format_and_an_unknown_one_is_refused(two_runs, tmp_path):
    _, url, first, _ = two_runs
    run = str(first["run_id"])
    assert invoke("plot", run, "-o", str(tmp_path / "c.jpg"), "--db", url).exit_code == 0
    assert (tmp_path / "c.jpg").read_bytes()[:3] == b"\xff\xd8\xff"   # JPEG, not a PNG under a .jpg name
    assert invoke("plot", run, "-o", str(tmp_path / "c"), "--db", url).exit_code == 0
    assert (tmp_path / "c").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused = invoke("plot", run, "-o", str(tmp_path / "c.v2"), "--db", url)
    assert refused.exit_code == 2
    assert "cannot write c.v2: .v2 is no image format matplotlib writes; use one of " in refused.output
    assert not (tmp_path / "c.v2").exists()


def test_plot_sweeps_of_a_rule(two_runs, tmp_path):
    _, url, first, second = two_runs
    out = tmp_path / "sweep.png"
    result = invoke("plot", "--sweep", "adam", "-o", str(out), "--db", url)   # a built-in name
    assert result.exit_code == 0, result.output
    assert "2 sweeps of rule" in result.output   # one per run that trained it
    assert pixels(out)[..., :3].std() > 0.05
    by_text = invoke("plot", "--sweep", "g*exp(sign(g)*sign(m))", "--task", "digits", "-o", str(out), "--db", url)
    assert by_text.exit_code == 0
    assert "2 sweeps" in by_text.output
    by_id = invoke("plot", "--sweep", str(first["rule_ids"][0]), "-o", str(out), "--db", url)
    assert by_id.exit_code == 0
    assert "2 sweeps" in by_id.output   # the cache hit adds no sweep of its own


@pytest.mark.parametrize(("args", "message"), [
    (("--sweep", "clip(m, 1e-3) + v"), "has not been evaluated in this database"),
    (("--sweep", "g * exp("), "bad rule"),
    (("--sweep", "adam", "--task", "cifar10"), "no stored learning-rate sweep on task 'cifar10'"),
    (("--sweep", "sqrt(exp(v) ^ (-2))"), "no stored learning-rate sweep"),   # its only evaluation failed
    (("99",), "no run 99"),
    ((), "give RUN_IDs"),
    (("1", "--sweep", "adam"), "not both"),
    (("1", "--task", "digits"), "--task goes with --sweep"),
])
def test_plot_bad_input_exits_2(two_runs, tmp_path, args, message):
    _, url, _, _ = two_runs
    out = tmp_path / "x.png"
    result = invoke("plot", *args, "-o", str(out), "--db", url)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_unwritable_output_exits_2(two_runs):
    _, url, _, _ = two_runs
    for command, name in (("plot", "c.png"), ("report", "r.html")):
        result = invoke(command, "1", "-o", f"/nonexistent/folder/{name}", "--db", url)
        assert result.exit_code == 2, result.output
        assert f"cannot write /nonexistent/folder/{name}: No such file or directory" in result.output


def test_plot_and_report_without_matplotlib(two_runs, tmp_path, monkeypatch):
    _, url, first, _ = two_runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    for args in (("plot", "1", "-o", str(tmp_path / "c.png")), ("report", "1", "-o", str(tmp_path / "r.html"))):
        result = invoke(*args, "--db", url)
        assert result.exit_code == 2, result.output
        assert "matplotlib" in result.output
        assert "pip install matplotlib" in result.output
    assert not (tmp_path / "c.png").exists()
    assert not (tmp_path / "r.html").exists()
    # The library still writes the page, with its tables and a note where the pictures would be.
    from nos.report import write_report

    page = write_report(two_runs[0], first["run_id"], tmp_path / "plain.html").read_text()
    assert "data:image/png" not in page
    assert "pip install matplotlib" in page
    assert '<code class="rule">adam</code>' in page



def _svg_text(fig) -> str:
    """The figure as SVG with its text kept as text, not glyph outlines: what a reader sees, searchable."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg")
    return buffer.getvalue()


def _sweep(seq: int, points: list[tuple[float, float | None, bool]], best_lr=None, reward=None, task="digits"):
    from nos.store.history import Sweep, SweepPoint

    return Sweep(seq, 1, seq, task, "done", reward, best_lr, [SweepPoint(*p) for p in points])


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


@pytest.mark.parametrize("name", ["lr sweep $10^$", r"lr $\foo$ test", "lr $x^2$ & co", r"a\$b$c"])
def test_names_with_dollar_signs_are_drawn_as_written(sqlite_store, sqlite_url, tmp_path, name):
    """matplotlib reads text between two `$` as a formula: a bad one crashed `nos plot`, a good one was typeset."""
    from nos.plots import Curve, curve_figure, sweep_figure

    ids = build_run(sqlite_store, name, "random", [0.2, 0.4, 0.6, 0.1, 0.3], extra=False)
    out = tmp_path / "curve.png"
    result = invoke("plot", str(ids["run_id"]), "-o", str(out), "--db", sqlite_url)
    assert result.exit_code == 0, result.output
    assert pixels(out)[..., :3].std() > 0.05
    curve = _svg_text(curve_figure([Curve(name, [])], title=f"title {name}"))
    sweep = _svg_text(sweep_figure([_sweep(0, [(0.01, 0.3, False)], task=f"task {name}")], title=f"sweeps of {name}"))
    for svg, texts in ((curve, [f"{name}, nothing finished", f"title {name}"]),
                       (sweep, [f"run 1, seq 0 (task {name})", f"sweeps of {name}"])):
        for text in texts:
            assert f">{xml_escape(text)}<" in svg, text   # one text element, character for character


def test_rates_halving_stopped_are_drawn_as_not_scored():
    """A rate successive halving stopped early has no score: a gap in the line and a mark of its own, not 0."""
    from nos.plots import sweep_figure

    halved = _sweep(0, [(1e-3, 0.6, False), (1e-2, None, False), (1e-1, 0.8, False), (1.0, 0.0, True)], 1e-1, 0.9)
    fig = sweep_figure([halved])
    accs = list(fig.axes[0].get_lines()[0].get_ydata())
    assert accs[0] == 0.6 and accs[2] == 0.8
    assert math.isnan(accs[1])   # a gap: no accuracy to draw, not an accuracy of 0
    assert accs[3] == 0.0        # a diverged rate scores 0, as the protocol says
    assert "stopped early by halving (not scored)" in _legend(fig)
    full = sweep_figure([_sweep(1, [(1e-3, 0.6, False), (1e-2, 0.7, False)])])
    assert "stopped early by halving (not scored)" not in _legend(full)


def test_the_sweep_legend_explains_every_mark_whichever_sweep_has_it():
    from nos.plots import sweep_figure

    plain = _sweep(0, [(1e-2, 0.3, False), (1e-1, 0.5, False)])   # no cross, no star, no gap
    marked = _sweep(1, [(1e-2, 0.6, False), (1e-1, 0.0, True), (1.0, None, False)], 1e-2, 0.65)
    for sweeps in ([plain, marked], [marked, plain]):
        labels = _legend(sweep_figure(sweeps))
        for kind in ("diverged", "reward (final run at the best rate)", "stopped early by halving (not scored)"):
            assert labels.count(kind) == 1, (kind, labels)


# --- where `-o` writes: shared by `nos plot`, `nos report` and `nos export` (nos.plots.write_atomically) ---

def _db_file(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def _output_args(command: str, output: str) -> list[str]:
    return {"plot": ["plot", "1", "-o", output], "report": ["report", "1", "-o", output],
            "export": ["export", "powersign", "--no-demo", "-o", output]}[command]


@pytest.mark.parametrize(("command", "name"), [
    ("report", "nos.db"), ("report", "nos.db-wal"), ("report", "nos.db-journal"), ("export", "nos.db"),
    ("export", "sub/../nos.db-shm"), ("plot", "db.png"),   # db.png: a link to the database
])
def test_the_database_is_never_an_output(two_runs, tmp_path, command, name):
    """`nos report 1 -o nos.db` wrote the page over the database and exited 0: every run gone."""
    _, url, _, _ = two_runs
    db = _db_file(url)
    (tmp_path / "db.png").symlink_to(db)
    (tmp_path / "sub").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke(*_output_args(command, str(tmp_path / name)), "--db", url)
    assert result.exit_code == 2, result.output
    assert f"cannot write {tmp_path / name}: it is the database's own file" in result.output
    assert len(result.output.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # no companion file made either
    assert invoke("runs", "--db", url).exit_code == 0


@pytest.mark.parametrize("command", ["plot", "report", "export"])
def test_an_output_ending_in_a_slash_is_refused(two_runs, tmp_path, command):
    """Path() drops a trailing slash: `-o newdir/` wrote a file named newdir."""
    _, url, _, _ = two_runs
    result = invoke(*_output_args(command, f"{tmp_path / 'newdir'}/"), "--db", url)
    assert result.exit_code == 2, result.output
    assert f"cannot write {tmp_path / 'newdir'}/: it names a folder" in result.output
    assert not (tmp_path / "newdir").exists()


def _nos_writing_at_most(limit: int, *args: str) -> subprocess.CompletedProcess:
    """`nos ARGS` in a child process whose files may grow to `limit` bytes (RLIMIT_FSIZE): a write past it fails
    as one on a full disk does, at the same place, every time."""
    import resource

    def limit_files():
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", "from nos.cli.main import cli; cli()", *args], env=env,
                          preexec_fn=limit_files, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("command", "name", "limit"), [
    ("plot", "keep.svg", 40_000), ("report", "keep.html", 40_000), ("export", "keep.py", 200)])
def test_a_failed_write_leaves_the_earlier_file_whole(two_runs, tmp_path, command, name, limit):
    """Written in place, a write that failed half way (a full disk, a quota) left a cut-off file instead of the
    earlier good one. (A command that reads the database needs a limit over its -shm file's 32 KiB.)"""
    _, url, _, _ = two_runs
    out = tmp_path / "out"
    out.mkdir()
    args = [*_output_args(command, str(out / name)), "--db", url]
    assert invoke(*args).exit_code == 0
    earlier = (out / name).read_bytes()
    assert len(earlier) > limit
    failed = _nos_writing_at_most(limit, *args)
    assert failed.returncode == 2, failed.stderr
    assert f"Error: cannot write {out / name}: File too large" in failed.stderr
    assert (out / name).read_bytes() == earlier
    assert [p.name for p in out.iterdir()] == [name]   # the half-written temporary file removed


@pytest.mark.parametrize("command", ["plot", "report", "export"])
def test_outputs_get_the_mode_open_would_give(two_runs, tmp_path, command):
    """The file is written to a temporary file (mode 0600) and renamed: it still gets the umask's mode, and a
    replaced file keeps its own."""
    _, url, _, _ = two_runs
    out = tmp_path / ("out.png" if command == "plot" else "out.file")
    args = [*_output_args(command, str(out)), "--db", url]
    umask = os.umask(0o027)
    try:
        assert invoke(*args).exit_code == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
        out.chmod(0o604)
        assert invoke(*args).exit_code == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o604
    finally:
        os.umask(umask)


# --- image formats and warnings ---

def test_pgf_which_needs_tex_is_refused(two_runs, tmp_path):
    """matplotlib's pgf backend measures text with TeX: without it, `-o c.pgf` ended in a traceback (exit 1)."""
    _, url, _, _ = two_runs
    result = invoke("plot", "1", "-o", str(tmp_path / "c.pgf"), "--db", url)
    assert result.exit_code == 2, result.output
    assert "cannot write c.pgf: .pgf needs TeX, which nos does not use; use one of .avif, .eps" in result.output
    assert ".pgf" not in result.output.split("use one of")[1]
    assert not (tmp_path / "c.pgf").exists()


def test_missing_glyphs_are_not_warned_about(sqlite_store, sqlite_url, tmp_path):
    """A name in a script the font lacks printed a UserWarning, with a source line, for each character."""
    import warnings

    import matplotlib

    ids = build_run(sqlite_store, "训练 run", "random", [0.2, 0.4, 0.6, 0.1, 0.3], extra=False)
    with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")   # which font lacks 训: DejaVu Sans, matplotlib's own, has no CJK
        for args in (("plot", str(ids["run_id"]), "-o", str(tmp_path / "c.png")),
                     ("report", str(ids["run_id"]), "-o", str(tmp_path / "r.html"))):
            result = invoke(*args, "--db", sqlite_url)
            assert result.exit_code == 0, result.output
    assert [str(w.message) for w in caught if "missing from" in str(w.message)] == []


# --- `nos plot --sweep`: damaged and missing sweeps ---

def test_plot_names_a_damaged_sweep_value(two_runs, tmp_path):
    """Text in lr_trials.val_acc made the y axis categories of raw numbers, and exit 0."""
    import sqlalchemy as sa

    store, url, first, _ = two_runs
    best = first["trained"][1]   # adam's
    with store.transaction() as session:
        session.execute(sa.text("UPDATE lr_trials SET val_acc = 'abc' WHERE evaluation_id = :e AND lr = 0.001"),
                        {"e": best})
    out = tmp_path / "s.png"
    result = invoke("plot", "--sweep", "adam", "-o", str(out), "--db", url)
    assert result.exit_code == 2, result.output
    assert result.output == (f"Error: run {first['run_id']} is damaged in the database: lr_trials.val_acc of "
                             f"evaluation {best} holds 'abc', not a number\n")
    assert not out.exists()


def test_plot_sweep_of_a_rule_only_rejected_says_so(sqlite_store, sqlite_url, tmp_path):
    """The reason named every other way to have no sweep (cached, failed, not finished), not the rule's own."""
    from nos.rules import parse
    from nos.store import NewEvaluation, RuleRecord, create_run, enqueue_batch, get_or_create_rules

    with sqlite_store.transaction() as session:
        run_id = create_run(session, "r", "digits", {"searcher": "evolution"})
        rule = get_or_create_rules(session, [RuleRecord.from_tree(parse("g * 0"))])[0]
        enqueue_batch(session, run_id, 0, [NewEvaluation(rule, "digits", "k1", rejected=True, reason="zero")])
    result = invoke("plot", "--sweep", str(rule), "-o", str(tmp_path / "s.png"), "--db", sqlite_url)
    assert result.exit_code == 2, result.output
    assert result.output == (f"Error: rule {rule} (g * 0) has no stored learning-rate sweep: its only evaluation "
                             "was rejected before training\n")


# --- layout ---

def _drawn(fig):
    """The figure drawn (Agg, no pyplot), and the renderer to measure its parts with."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _inside(box, fig) -> bool:
    return box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


@pytest.mark.parametrize("letter", ["W", "i"])
def test_a_long_run_name_keeps_its_best_reward_in_the_figure(sqlite_store, letter):
    """A 200-character run name (the longest allowed) ran under the legend of marks and off the figure's edge,
    taking ", best 0.9000" with it."""
    from nos.plots import Curve, curve_figure
    from nos.store import run_evaluations

    ids = build_run(sqlite_store, letter * 200, "random", [0.2, 0.9, 0.6, 0.1, 0.3], extra=False)
    with sqlite_store.reading() as session:
        rows = run_evaluations(session, ids["run_id"])
    fig = curve_figure([Curve(f"run 1 {letter * 200} (random)", rows)], title="reward by evaluation of run 1")
    renderer = _drawn(fig)
    runs, kinds = (legend.get_window_extent(renderer) for legend in fig.legends)
    assert _inside(runs, fig) and _inside(kinds, fig)
    assert not runs.overlaps(kinds)
    label = fig.legends[0].get_texts()[0].get_text()
    assert label.startswith(f"run 1 {letter * 10}") and label.endswith(f"{letter} (random), best 0.9000")
    assert "…" in label


def test_a_long_rule_in_a_sweep_title_is_wrapped_inside_the_figure():
    """`nos plot --sweep` titles the figure with the rule's text, which ran off both sides."""
    from nos.plots import sweep_figure

    rule = " + ".join(["sign(g) * exp(m)"] * 30)
    fig = sweep_figure([_sweep(0, [(0.01, 0.3, False)])], title=f"learning-rate sweeps of {rule}")
    renderer = _drawn(fig)
    assert _inside(fig.axes[0].title.get_window_extent(renderer), fig)
    title = fig.axes[0].get_title()
    assert title.startswith("learning-rate sweeps of sign(g) * exp(m) +")
    assert 2 <= len(title.splitlines()) <= 3 and title.endswith("…")


@pytest.mark.parametrize("rewards", [[0.5], [0.5, 0.7, 0.2]])
def test_curve_ticks_are_whole_evaluations_and_the_label_names_failures(rewards):
    """With 1 to 3 evaluations the x axis read 0.96, 0.98, 1.00 ...; and failed evaluations are on it, as crosses."""
    from nos.plots import Curve, curve_figure
    from nos.store.history import EvaluationRow

    rows = [EvaluationRow(id=i, run_id=1, seq=i, batch=0, rule_id=1, rule="g", depth=1, task="t", status="done",
                          attempts=1, worker=None, reward=r, test_acc=None, best_lr=None, wall_seconds=None,
                          cached_from=None, error=None, reason=None, created_at=None, claimed_at=None,
                          finished_at=None) for i, r in enumerate(rewards)]
    fig = curve_figure([Curve("run 1", rows)])
    _drawn(fig)
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    shown = [t for t in ax.get_xticks() if low <= t <= high]
    assert shown and all(float(t).is_integer() for t in shown), shown
    assert "failed" in ax.get_xlabel()
