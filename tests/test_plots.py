"""`nos plot` and nos.plots: reward curves and learning-rate sweeps, drawn from runs in real SQLite."""

from __future__ import annotations

import sys

import pytest

from helpers.reports import invoke, pixels


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
