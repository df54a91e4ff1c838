"""`nos plot` and nos.plots: reward curves and learning-rate sweeps, drawn from runs in real SQLite."""

from __future__ import annotations

import io
import math
import sys
from xml.sax.saxutils import escape as xml_escape

import pytest

from helpers.reports import build_run, invoke, pixels


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
        assert "pip install 'nos[plot]'" in result.output
    assert not (tmp_path / "c.png").exists()
    assert not (tmp_path / "r.html").exists()
    # The library still writes the page, with its tables and a note where the pictures would be.
    from nos.report import write_report

    page = write_report(two_runs[0], first["run_id"], tmp_path / "plain.html").read_text()
    assert "data:image/png" not in page
    assert "pip install &#x27;nos[plot]&#x27;" in page
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
