"""`nos plot`, `nos report`, `nos export` and nos.store's data frames, on runs built directly in real SQLite."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nos.cli.main import cli
from nos.rules import parse
from nos.store import (
    NewEvaluation,
    RuleRecord,
    claim,
    commit_result,
    create_run,
    enqueue_batch,
    fail,
    get_or_create_rules,
    open_store,
    resolve_url,
    upgrade,
    utcnow,
)

from helpers.services import unavailable
from helpers.store import LRS, RULES, result

ROOT = Path(__file__).resolve().parents[1]
# Strings a careless page would let run as markup.
NASTY_NAME = "<script>alert('name')</script> & co"
NASTY_ERROR = "Traceback (most recent call last):\n  File \"x.py\"\nValueError: <b>boom</b> & \"more\""
CLAIM_FOR = __import__("datetime").timedelta(minutes=5)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def build_run(store, name: str, searcher: str, rewards: list[float], *, extra: bool = True) -> dict:
    """A finished-looking run: batch 0 trains RULES with `rewards`; with `extra`, batch 1 holds a cache hit
    of RULES[0], a failure, and an evaluation still queued. Returns the ids by role."""
    with store.transaction() as session:
        run_id = create_run(session, name, "digits", {"searcher": searcher, "budget": 8, "batch_size": 5, "seed": 0})
        rule_ids = get_or_create_rules(session, [RuleRecord.from_tree(parse(t)) for t in RULES])
        trained = enqueue_batch(session, run_id, 0, [NewEvaluation(r, "digits", "k1") for r in rule_ids])
    for evaluation_id, reward in zip(trained, rewards):
        with store.transaction() as session:
            attempt = claim(session, evaluation_id, f"w{evaluation_id % 2}", CLAIM_FOR)
            assert commit_result(session, evaluation_id, attempt, result(reward, diverged=reward == 0.0))
    ids = dict(run_id=run_id, trained=trained, rule_ids=rule_ids)
    if extra:
        with store.transaction() as session:
            fails = get_or_create_rules(session, [RuleRecord.from_tree(parse("sqrt(exp(v) ^ (-2))"))])[0]
            batch = enqueue_batch(session, run_id, 1, [
                NewEvaluation(rule_ids[0], "digits", "k1", cached_from=trained[0]),
                NewEvaluation(fails, "digits", "k1"),
                NewEvaluation(rule_ids[1], "digits", "k1")])
        with store.transaction() as session:
            attempt = claim(session, batch[1], "w9", CLAIM_FOR)
            assert fail(session, batch[1], attempt, NASTY_ERROR)
        ids.update(cached=batch[0], failed=batch[1], queued=batch[2], failing_rule=fails)
    return ids


@pytest.fixture
def sqlite_store(sqlite_url):
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    yield store
    store.dispose()


def _two_runs(store, url):
    first = build_run(store, NASTY_NAME, "ppo", [0.9, 0.95, 0.5, 0.0, 0.7])
    second = build_run(store, "random run", "random", [0.2, 0.4, 0.6, 0.1, 0.3], extra=False)
    return store, url, first, second


@pytest.fixture
def two_runs(sqlite_store, sqlite_url):
    """Run 1 (ppo, nasty name) with a cache hit, a failure and a queued evaluation; run 2 (random) plain."""
    return _two_runs(sqlite_store, sqlite_url)


@pytest.fixture
def two_runs_anywhere(store, migrated_url):
    """`two_runs` on SQLite and on PostgreSQL."""
    return _two_runs(store, migrated_url)


# --- data frames ----------------------------------------------------------------------------------------

def test_evaluations_frame(two_runs_anywhere):
    import pandas as pd

    from nos.store import evaluations_frame

    store, url, first, second = two_runs_anywhere
    frame = evaluations_frame(store, first["run_id"])
    assert list(frame.seq) == list(range(8))
    for column in ("seq", "batch", "rule", "status", "reward", "test_acc", "best_lr", "wall_seconds", "cached_from",
                   "worker", "created_at", "finished_at", "error", "attempts", "task"):
        assert column in frame.columns
    assert list(frame.status) == ["done", "done", "done", "diverged", "done", "cached", "failed", "queued"]
    assert list(frame.rule[:5]) == RULES
    assert frame.reward[:6].tolist() == [0.9, 0.95, 0.5, 0.0, 0.7, 0.9]
    assert math.isnan(frame.reward[6]) and math.isnan(frame.reward[7])
    assert frame.cached_from[5] == first["trained"][0] and frame.cached_from.isna().sum() == 7
    assert frame.error[6] == NASTY_ERROR and frame.worker[6] == "w9"
    assert str(frame.created_at.dtype).startswith("datetime64") and str(frame.created_at.dt.tz) == "UTC"
    assert frame.finished_at.isna().tolist() == [False] * 7 + [True]
    assert frame.reward.dtype == "float64" and frame.depth.dtype == "Int64"
    assert frame.groupby("batch").reward.mean().round(6).tolist() == [0.61, 0.9]

    everything = evaluations_frame(url)   # a URL works too, and None means every run
    assert len(everything) == 13 and set(everything.run_id) == {first["run_id"], second["run_id"]}
    assert isinstance(everything, pd.DataFrame)
    with pytest.raises(LookupError, match="no run 99"):
        evaluations_frame(store, 99)


def test_trials_frame(two_runs_anywhere):
    from nos.store import trials_frame

    store, _, first, _ = two_runs_anywhere
    frame = trials_frame(store, first["run_id"])
    assert len(frame) == 5 * len(LRS)   # the five trained evaluations; cached, failed and queued trained nothing
    assert frame.groupby("seq").lr.apply(list).tolist() == [LRS] * 5
    assert frame.diverged.dtype == bool and frame.val_acc.dtype == "float64"
    assert set(frame.rule) == set(RULES)
    best = frame.loc[frame.groupby("seq").val_acc.idxmax()]
    assert best.lr.tolist() == [1e-5] * 5   # result() makes the smallest rate the best


def test_frames_say_how_to_get_pandas(two_runs, monkeypatch):
    from nos.store import evaluations_frame, trials_frame

    store, _, first, _ = two_runs
    monkeypatch.setitem(sys.modules, "pandas", None)
    for function in (evaluations_frame, trials_frame):
        with pytest.raises(ImportError, match=re.escape("pip install 'nos[pandas]'")):
            function(store, first["run_id"])


def test_cli_and_store_stay_lazy():
    """nos.store and `nos plot|report|export` load neither torch nor matplotlib nor pandas until they draw;
    `nos --help` loads neither matplotlib nor pandas."""
    code = """
import sys
from click.testing import CliRunner
from nos.cli.main import cli

def loaded():
    return sorted(m for m in ("torch", "matplotlib", "pandas") if m in sys.modules)

import nos.store, nos.store.frames, nos.plots, nos.report, nos.export
for args in (["plot", "--help"], ["report", "--help"], ["export", "--help"], ["export", "powersign"]):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (args, result.output)
print(loaded())
assert CliRunner().invoke(cli, ["--help"]).exit_code == 0
print(loaded())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    ours, help_too = out.stdout.splitlines()
    assert ours == "[]"
    assert "matplotlib" not in help_too and "pandas" not in help_too


# --- plot --------------------------------------------------------------------------------------------------

def _pixels(path: Path):
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image


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
    image = _pixels(out)
    assert image[..., :3].std() > 0.05   # not blank
    assert invoke("plot", str(first["run_id"]), "-o", str(tmp_path / "c.svg"), "--db", url).exit_code == 0
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")


def test_plot_sweeps_of_a_rule(two_runs, tmp_path):
    _, url, first, second = two_runs
    out = tmp_path / "sweep.png"
    result = invoke("plot", "--sweep", "adam", "-o", str(out), "--db", url)   # a built-in name
    assert result.exit_code == 0, result.output
    assert "2 sweeps of rule" in result.output   # one per run that trained it
    assert _pixels(out)[..., :3].std() > 0.05
    by_text = invoke("plot", "--sweep", "g*exp(sign(g)*sign(m))", "--task", "digits", "-o", str(out), "--db", url)
    assert by_text.exit_code == 0 and "2 sweeps" in by_text.output
    by_id = invoke("plot", "--sweep", str(first["rule_ids"][0]), "-o", str(out), "--db", url)
    assert by_id.exit_code == 0 and "2 sweeps" in by_id.output   # the cache hit adds no sweep of its own


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
        assert "matplotlib" in result.output and "pip install 'nos[plot]'" in result.output
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "r.html").exists()
    # The library still writes the page, with its tables and a note where the pictures would be.
    from nos.report import write_report

    page = write_report(two_runs[0], first["run_id"], tmp_path / "plain.html").read_text()
    assert "data:image/png" not in page and "pip install &#x27;nos[plot]&#x27;" in page
    assert '<code class="rule">adam</code>' in page


# --- report ------------------------------------------------------------------------------------------------

def _report(two_runs, tmp_path, *extra: str) -> str:
    _, url, first, _ = two_runs
    out = tmp_path / "report.html"
    result = invoke("report", str(first["run_id"]), "-o", str(out), *extra, "--db", url)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    return out.read_text()


def test_report_is_self_contained_and_escaped(two_runs, tmp_path):
    page = _report(two_runs, tmp_path, "--top", "3")
    # Self-contained: no scripts, no external stylesheets, images only as data URIs.
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r"(src|href)\s*=\s*\"(?!data:image/png;base64,)", page)
    assert "http://" not in page and "https://" not in page
    assert page.count('src="data:image/png;base64,') == 1 + 3   # the curve and three sweeps
    # Every user string escaped.
    assert "&lt;script&gt;alert(&#x27;name&#x27;)&lt;/script&gt; &amp; co" in page
    assert "ValueError: &lt;b&gt;boom&lt;/b&gt; &amp; &quot;more&quot;" in page and "<b>boom</b>" not in page
    # The content: top rules with their sweeps, timings, cache rate, failures, configuration.
    top = page.split('id="top"')[1].split('id="timings"')[0]
    for text in ("adam", "g", "clip(m, 1e-4) * exp(v)"):   # the best three of run 1, with their sweeps
        assert f'<code class="rule">{text}</code>' in top
    assert "g * exp(sign(g) * sign(m))" not in top and "(1 + sign(g) * sign(m)) * g" not in top
    assert "0.9500" in page and "cache hit rate" in page and "14.3%" in page   # 1 cached of 7 finished
    assert "Failures (1)" in page and "sqrt(exp(v) ^ (-2))" in page
    assert "wall seconds per trained evaluation" in page and "3.50 s" in page   # result() takes 3.5 s
    assert "&quot;searcher&quot;: &quot;ppo&quot;" in page


def test_report_of_a_cached_best_shows_the_source_sweep(sqlite_store, sqlite_url, tmp_path):
    first = build_run(sqlite_store, "first", "ppo", [0.9, 0.1, 0.1, 0.1, 0.1], extra=False)
    with sqlite_store.transaction() as session:   # a second run that only reuses run 1's best result
        run_id = create_run(session, "second", "digits", {"searcher": "random"})
        enqueue_batch(session, run_id, 0, [NewEvaluation(first["rule_ids"][0], "digits", "k1",
                                                         cached_from=first["trained"][0])])
    out = tmp_path / "r.html"
    assert invoke("report", str(run_id), "-o", str(out), "--db", sqlite_url).exit_code == 0
    page = out.read_text()
    assert f"Sweep of evaluation {first['trained'][0]} (run {first['run_id']}), which this one reused" in page
    assert "100.0%" in page   # every evaluation a cache hit


def test_report_lists_rejections_by_reason(sqlite_store, sqlite_url, tmp_path):
    import sqlalchemy as sa

    from nos.store import Evaluation, evaluations_frame

    first = build_run(sqlite_store, "r", "ppo", [0.9, 0.8, 0.7, 0.6, 0.5], extra=False)
    with sqlite_store.transaction() as session:
        batch = enqueue_batch(session, first["run_id"], 1,
                              [NewEvaluation(r, "digits", "k1") for r in first["rule_ids"][:3]])
        session.execute(sa.update(Evaluation).where(Evaluation.id.in_(batch))
                        .values(status="rejected", reward=0.0, reason="update <all zero>", finished_at=utcnow()))
    out = tmp_path / "r.html"
    assert invoke("report", str(first["run_id"]), "-o", str(out), "--db", sqlite_url).exit_code == 0
    page = out.read_text()
    assert "Rejected before training (3)" in page and "<td>update &lt;all zero&gt;</td><td class=\"num\">3</td>" in page
    frame = evaluations_frame(sqlite_store, first["run_id"])
    assert frame.reason.isna().tolist() == [True] * 5 + [False] * 3
    assert frame.reason[5:].tolist() == ["update <all zero>"] * 3


def test_report_of_an_empty_run_and_unknown_run(sqlite_store, sqlite_url, tmp_path):
    with sqlite_store.transaction() as session:
        run_id = create_run(session, "empty", "digits", {})
    out = tmp_path / "r.html"
    assert invoke("report", str(run_id), "-o", str(out), "--db", sqlite_url).exit_code == 0
    assert "No finished evaluations yet" in out.read_text()
    result = invoke("report", "42", "-o", str(tmp_path / "n.html"), "--db", sqlite_url)
    assert result.exit_code == 2 and "no run 42" in result.output


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    unavailable("chromium", "no chromium on PATH (Debian: apt-get install chromium)")


# After the page loads, write each image's decoded width into the DOM, so --dump-dom shows it.
PROBE = """<script>window.addEventListener("load", () => {
  const out = document.createElement("pre"); out.id = "probe";
  out.textContent = "images:" + [...document.images].map(i => i.complete ? i.naturalWidth : -1).join(",");
  document.body.appendChild(out);
});</script>"""


@pytest.mark.slow
def test_report_renders_in_headless_chromium(two_runs, tmp_path):
    browser = _chromium()
    page = _report(two_runs, tmp_path)
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    common = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    widths = re.search(r'<pre id="probe">images:([-\d,]*)</pre>', dom.stdout)
    assert widths, dom.stdout[-2000:]
    widths = [int(w) for w in widths.group(1).split(",")]
    assert len(widths) == 1 + 5 and all(w > 100 for w in widths), widths   # every picture decoded
    for text in ("g * exp(sign(g) * sign(m))", "clip(m, 1e-4) * exp(v)", "Failures (1)", "Timings"):
        assert text in dom.stdout
    assert "&lt;script&gt;alert" in dom.stdout   # the run's name stayed text

    shot = tmp_path / "shot.png"
    done = subprocess.run([*common, "--window-size=1100,1400", f"--screenshot={shot}", (tmp_path / "report.html")
                           .as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = _pixels(shot)[..., :3]
    assert image.shape[:2] == (1400, 1100)
    assert image.std() > 0.05 and (image < 0.5).mean() > 0.005   # not blank: there is dark text and plots


# --- export ------------------------------------------------------------------------------------------------

def _run_main(source: str) -> str:
    """Run a snippet as __main__ in this process (torch is already imported); returns what it printed."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "<snippet>", "exec"), {"__name__": "__main__"})
    return printed.getvalue()


def _losses(printed: str) -> tuple[float, float]:
    found = re.search(r"loss ([\d.]+) -> ([\d.]+) after 200 steps", printed)
    assert found, printed
    return float(found.group(1)), float(found.group(2))


def test_export_snippet_trains_in_a_fresh_python():
    result = invoke("export", "g*exp(sign(g)*sign(m))", "--lr", "0.1")
    assert result.exit_code == 0, result.output
    assert 'RULE = "g * exp(sign(g) * sign(m))"' in result.output and "LR = 0.1" in result.output
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", result.output], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    first, last = _losses(out.stdout)
    assert last < first / 10


@pytest.mark.parametrize(("rule", "flags", "expect"), [
    ("adam", ["--lr", "0.01"], "built-in rule adam"),
    ("addsign-ld", ["--lr", "0.01"], "pass total_steps"),              # reads ld: the demo passes its length
    ("addsign-ld", ["--lr", "0.01", "--total-steps", "150"], "TOTAL_STEPS = 150"),
    ("drop(m, 0.3) * exp(1e-3*w)", ["--lr", "0.05", "--seed", "7"], "SEED = 7"),
    ("drop(m, 0.3) * exp(1e-3*w)", ["--lr", "0.05"], "pass seed=N"),
])
def test_export_variants_train(rule, flags, expect):
    result = invoke("export", rule, *flags)
    assert result.exit_code == 0, result.output
    assert expect in result.output
    first, last = _losses(_run_main(result.output))
    assert last < first / 2


def test_export_without_demo_and_to_a_file(tmp_path):
    import torch

    out = tmp_path / "opt.py"
    result = CliRunner().invoke(cli, ["export", "powersign", "--no-demo", "-o", str(out)])
    assert result.exit_code == 0
    source = out.read_text()
    assert "__main__" not in source and len(source.splitlines()) < 20
    namespace: dict = {}
    exec(compile(source, str(out), "exec"), namespace)
    optimizer = namespace["make_optimizer"](torch.nn.Linear(2, 1).parameters(), lr=0.5)
    assert optimizer.rule_text == "g * exp(sign(g) * sign(m))" and optimizer.defaults["lr"] == 0.5


@pytest.mark.parametrize(("args", "message"), [
    (("g * exp(sgn(m))",), "unknown name 'sgn'"),
    (("g +",), "bad rule"),
    (("g", "--lr", "0"), "learning rate must be positive"),
    (("g", "--lr", "-1"), "learning rate must be positive"),
])
def test_export_bad_input_exits_2(args, message):
    result = invoke("export", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
