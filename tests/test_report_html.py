"""`nos report`: a self-contained HTML page of a run, checked as text and in a headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from nos.store import NewEvaluation, create_run, enqueue_batch, utcnow

from helpers.reports import build_run, invoke, pixels
from helpers.services import unavailable


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
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert not re.search(r"(src|href)\s*=\s*\"(?!data:image/png;base64,)", page)
    assert "http://" not in page
    assert "https://" not in page
    assert page.count('src="data:image/png;base64,') == 1 + 3   # the curve and three sweeps
    # Every user string escaped.
    assert "&lt;script&gt;alert(&#x27;name&#x27;)&lt;/script&gt; &amp; co" in page
    assert "ValueError: &lt;b&gt;boom&lt;/b&gt; &amp; &quot;more&quot;" in page
    assert "<b>boom</b>" not in page
    # The content: top rules with their sweeps, timings, cache rate, failures, configuration.
    top = page.split('id="top"')[1].split('id="timings"')[0]
    for text in ("adam", "g", "clip(m, 1e-4) * exp(v)"):   # the best three of run 1, with their sweeps
        assert f'<code class="rule">{text}</code>' in top
    assert "g * exp(sign(g) * sign(m))" not in top
    assert "(1 + sign(g) * sign(m)) * g" not in top
    assert "0.9500" in page
    assert "cache hit rate" in page
    assert "14.3%" in page   # 1 cached of 7 finished
    assert "Failures (1)" in page
    assert "sqrt(exp(v) ^ (-2))" in page
    assert "wall seconds per trained evaluation" in page
    assert "3.50 s" in page   # result() takes 3.5 s
    assert "&quot;searcher&quot;: &quot;ppo&quot;" in page


def test_report_at_top_0_leaves_the_rules_out_and_keeps_the_best(two_runs, tmp_path):
    page = _report(two_runs, tmp_path, "--top", "0")
    top = page.split('id="top"')[1].split('id="timings"')[0]
    assert "Left out on request (--top 0)." in top
    assert "No scored evaluations yet" not in page   # the run has them
    assert '<p>Best rule: <code class="rule">adam</code> (reward 0.9500' in page
    assert page.count('src="data:image/png;base64,') == 1   # the curve, no sweeps


def test_report_of_a_run_named_with_dollar_signs(sqlite_store, sqlite_url, tmp_path):
    """matplotlib reads text between two `$` as a formula: the run's name in the curve's legend crashed the page."""
    ids = build_run(sqlite_store, "lr sweep $10^$", "ppo", [0.9, 0.1, 0.1, 0.1, 0.1], extra=False)
    out = tmp_path / "r.html"
    result = invoke("report", str(ids["run_id"]), "-o", str(out), "--db", sqlite_url)
    assert result.exit_code == 0, result.output
    assert "<h1>Run 1: lr sweep $10^$</h1>" in out.read_text()


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
    assert "Rejected before training (3)" in page
    assert "<td>update &lt;all zero&gt;</td><td class=\"num\">3</td>" in page
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
    assert result.exit_code == 2
    assert "no run 42" in result.output


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
    assert len(widths) == 1 + 5, widths
    assert all(w > 100 for w in widths), widths   # every picture decoded
    for text in ("g * exp(sign(g) * sign(m))", "clip(m, 1e-4) * exp(v)", "Failures (1)", "Timings"):
        assert text in dom.stdout
    assert "&lt;script&gt;alert" in dom.stdout   # the run's name stayed text

    shot = tmp_path / "shot.png"
    done = subprocess.run([*common, "--window-size=1100,1400", f"--screenshot={shot}", (tmp_path / "report.html")
                           .as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.exists(), done.stderr[-2000:]
    image = pixels(shot)[..., :3]
    assert image.shape[:2] == (1400, 1100)
    assert image.std() > 0.05
    assert (image < 0.5).mean() > 0.005   # not blank: there is dark text and plots


# --- what the page says: as `nos status`, `nos leaderboard` and `nos show` say it ---

def _rejected_only_run(store) -> int:
    """A run whose only evaluations were rejected before training (stored with reward 0 and test_acc 0)."""
    from nos.rules import parse
    from nos.store import RuleRecord, get_or_create_rules

    with store.transaction() as session:
        run_id = create_run(session, "only rejected", "digits", {"searcher": "evolution", "budget": 4})
        rules = get_or_create_rules(session, [RuleRecord.from_tree(parse(t)) for t in ("g * 0", "m * 0")])
        enqueue_batch(session, run_id, 0, [NewEvaluation(r, "digits", "k1", rejected=True, reason="update all zero")
                                           for r in rules])
    return run_id


def test_report_shows_no_test_score_for_rejected_and_diverged_rules(sqlite_store, sqlite_url, tmp_path):
    """The store holds test_acc 0.0 for them; the page printed it as a measured 0.0000, where `nos leaderboard`
    and `nos show` print "-"."""
    import sqlalchemy as sa

    from nos.store import Evaluation

    ids = build_run(sqlite_store, "r", "ppo", [0.9, 0.8, 0.0, 0.6, 0.5], extra=False)   # the third diverged
    with sqlite_store.transaction() as session:   # as a worker stores a rule diverged at every rate
        session.execute(sa.update(Evaluation).where(Evaluation.id == ids["trained"][2])
                        .values(test_acc=0.0, best_lr=None))
    out = tmp_path / "r.html"
    assert invoke("report", str(ids["run_id"]), "--top", "5", "-o", str(out), "--db", sqlite_url).exit_code == 0
    page = out.read_text()
    row = re.search(r'<tr><td class="num">5</td><td><code class="rule">g \* exp\(sign\(g\) \* sign\(m\)\)</code>'
                    r"</td>(.*?)</tr>", page)
    assert row, page
    assert row.group(1).startswith('<td class="num">0.0000</td><td class="num">-</td><td class="num">diverged</td>')
    assert "reward 0.0000 (diverged), test accuracy -, evaluation" in page

    # A cached copy of the diverged rule, in a run of its own: it carries the figures, and diverged as well.
    with sqlite_store.transaction() as session:
        again = create_run(session, "again", "digits", {"budget": 1})
        enqueue_batch(session, again, 0, [NewEvaluation(ids["rule_ids"][2], "digits", "k1",
                                                        cached_from=ids["trained"][2])])
    assert invoke("report", str(again), "-o", str(out), "--db", sqlite_url).exit_code == 0
    page = out.read_text()
    assert "reward 0.0000 (diverged), test accuracy -, evaluation" in page and "test accuracy 0.0000" not in page

    rejected = _rejected_only_run(sqlite_store)
    assert invoke("report", str(rejected), "-o", str(out), "--db", sqlite_url).exit_code == 0
    page = out.read_text()
    assert "(reward 0.0000, test accuracy -, best learning rate rejected)</p>" in page
    assert "test accuracy 0.0000" not in page


def test_report_of_a_run_of_only_rejections_draws_no_empty_curve(sqlite_store, sqlite_url, tmp_path):
    """Rejections are not on the curve: the page drew empty axes where the note belongs."""
    run_id = _rejected_only_run(sqlite_store)
    out = tmp_path / "r.html"
    assert invoke("report", str(run_id), "-o", str(out), "--db", sqlite_url).exit_code == 0
    page = out.read_text()
    curve = page.split('id="curve"')[1].split('id="top"')[0]
    assert "No finished evaluations yet." in curve
    assert "<img" not in curve


def test_report_counts_as_nos_status_does(sqlite_store, sqlite_url, tmp_path):
    """Finished evaluations and their rate per hour leave out the free rejections, as the budget and `nos status`
    do: the page said 8 finished (and 8 an hour) beside a card saying 5."""
    from datetime import timedelta

    import sqlalchemy as sa

    from nos.store import Evaluation, Run

    ids = build_run(sqlite_store, "r", "ppo", [0.9, 0.8, 0.7, 0.6, 0.5], extra=False)
    with sqlite_store.transaction() as session:
        enqueue_batch(session, ids["run_id"], 1, [NewEvaluation(r, "digits", "k1", rejected=True, reason="zero")
                                                  for r in ids["rule_ids"][:3]])
        created = session.get(Run, ids["run_id"]).created_at   # every evaluation done an hour later: 5 an hour
        session.execute(sa.update(Evaluation).where(Evaluation.run_id == ids["run_id"])
                        .values(finished_at=created + timedelta(hours=1)))
    status = invoke("status", str(ids["run_id"]), "--db", sqlite_url)
    assert "5/8 evaluations finished" in status.output
    out = tmp_path / "r.html"
    assert invoke("report", str(ids["run_id"]), "-o", str(out), "--db", sqlite_url).exit_code == 0
    page = out.read_text()
    assert "<td>evaluations finished (trained, cached or failed)</td><td>5</td>" in page
    assert "<td>rejected before training</td><td>3</td>" in page
    assert "<td>evaluations per hour (finished / elapsed)</td><td>5.0</td>" in page
    assert '<div class="k">evaluations / hour</div><div class="v">5</div>' in page


def test_report_shows_the_configuration_as_written(sqlite_store, sqlite_url, tmp_path):
    """Non-ASCII configuration values were \\u escapes in the page, though its title showed them as written."""
    with sqlite_store.transaction() as session:
        run_id = create_run(session, "ü", "digits", {"searcher": "ppo", "data_dir": "/données/训练"})
    out = tmp_path / "r.html"
    assert invoke("report", str(run_id), "-o", str(out), "--db", sqlite_url).exit_code == 0
    page = out.read_text(encoding="utf-8")
    assert "&quot;data_dir&quot;: &quot;/données/训练&quot;" in page
    assert "\\u" not in page


@pytest.mark.parametrize("column", ["val_acc", "lr"])
def test_report_names_a_damaged_sweep_value(two_runs, tmp_path, column):
    """Text in a sweep's number column was a TypeError traceback; the page's other readers name the run and column."""
    import sqlalchemy as sa

    store, url, first, _ = two_runs
    best = first["trained"][1]   # adam's: a top rule's sweep
    with store.transaction() as session:   # as sqlite3 would: SQLAlchemy's Float refuses to write text
        session.execute(sa.text(f"UPDATE lr_trials SET {column} = 'abc' WHERE evaluation_id = :e AND lr = 0.001"),
                        {"e": best})
    out = tmp_path / "r.html"
    result = invoke("report", str(first["run_id"]), "-o", str(out), "--db", url)
    assert result.exit_code == 2, result.output
    assert result.output == (f"Error: run {first['run_id']} is damaged in the database: lr_trials.{column} of "
                             f"evaluation {best} holds 'abc', not a number\n")
    assert not out.exists()
