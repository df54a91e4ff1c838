"""One run as a single static HTML page: curves, top rules and their sweeps, timings, failures, configuration.

    from nos.report import write_report
    write_report(store, run_id=1, path="report.html")

The page is self-contained: inline CSS, images embedded as base64 PNG data
URIs, no scripts and no external resources, so it can be mailed or archived
as one file. Every string from the database (rule texts, run names, errors,
configuration) is HTML-escaped. Without matplotlib the page has its tables
and a note in place of the pictures.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from html import escape
from pathlib import Path

from sqlalchemy.orm import Session

from nos.store import Store
from nos.store.history import (
    UNMEASURED,
    EvaluationRow,
    Sweep,
    Timings,
    run_evaluations,
    run_timings,
    scored_as,
    sweep_of,
)
from nos.store.models import Run, utcnow
from nos.store.queries import LeaderboardRow, RunProgress, leaderboard, read_run, run_progress


@dataclass(frozen=True)
class TopRule:
    row: LeaderboardRow
    sweep: Sweep | None


@dataclass(frozen=True)
class RunReport:
    """Everything the page shows, read in one transaction."""

    run: Run
    progress: RunProgress
    rows: list[EvaluationRow]
    timings: Timings
    top: list[TopRule]
    generated_at: datetime
    best: LeaderboardRow | None = None   # the run's best rule, whether or not `top` shows any

    @property
    def failures(self) -> list[EvaluationRow]:
        return [r for r in self.rows if r.status == "failed"]


def gather(session: Session, run_id: int, top: int = 5) -> RunReport | None:
    """The report's data for run `run_id`, or None if there is no such run; DamagedRow if a value the page
    shows is of a shape nos never writes."""
    run = read_run(session, run_id)
    if run is None:
        return None
    rows = run_evaluations(session, run_id)
    best = leaderboard(session, max(top, 1), run_id=run_id)   # the best rule's line is there even at top 0
    return RunReport(run=run, progress=run_progress(session, run_id), rows=rows, timings=run_timings(run, rows),
                     top=[TopRule(r, sweep_of(session, r.evaluation_id)) for r in best[:top]], generated_at=utcnow(),
                     best=best[0] if best else None)


def write_report(store: Store, run_id: int, path: str | Path, *, top: int = 5, window: int = 20,
                 images: bool = True) -> Path:
    """Write run `run_id`'s report to `path`; LookupError if there is no such run, DamagedRow (nothing
    written) if its stored values cannot be shown. The page is written whole or not at all: a failed
    write leaves an earlier file at `path` as it was."""
    from nos.files import write_atomically

    with store.reading() as session:
        report = gather(session, run_id, top)
    if report is None:
        raise LookupError(f"no run {run_id}")
    return write_atomically(path, render_html(report, window=window, images=images).encode("utf-8"))


# --- rendering -------------------------------------------------------------------------------------------

CSS = """
:root { --fg: #1d2430; --muted: #5c6878; --line: #d9dee6; --bg: #ffffff; --soft: #f4f6f9; --accent: #1f6feb;
        --bad: #b42318; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 1100px; padding: 24px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 0 0 6px; }
.sub { color: var(--muted); margin: 0 0 18px; }
code, pre, .rule { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
.rule { overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 10px; }
.card { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 14px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { font-weight: 600; }
.top { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; margin: 14px 0 22px;
       padding: 12px; border: 1px solid var(--line); border-radius: 8px; }
.top > div { flex: 1 1 300px; min-width: 0; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
      overflow-x: auto; white-space: pre-wrap; overflow-wrap: anywhere; }
.note { color: var(--muted); font-style: italic; }
.bad { color: var(--bad); }
details summary { cursor: pointer; color: var(--muted); }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _lr(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _unmeasured(row: LeaderboardRow) -> str | None:
    """Why a rule has no final run ("rejected", "diverged"; a cached copy's as its source's), or None."""
    status = scored_as(row.status, row.best_lr)
    return status if status in UNMEASURED else None


def _test(row: LeaderboardRow) -> str:
    # Rejected and diverged rules had no final run: the stored 0.0 is no measured test score (as `nos leaderboard`).
    return "-" if _unmeasured(row) else _num(row.test_acc)


def _best_lr(row: LeaderboardRow) -> str:
    """The best rate, or for a rule that has none the reason, where the rate would be (as `nos leaderboard`)."""
    return _unmeasured(row) or _lr(row.best_lr)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 3600:
        return f"{value / 3600:.2f} h"
    if value >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.2f} s"


def _time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _img(png: bytes, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(png).decode("ascii")
    size = f' width="{width}"' if width else ""
    return f'<img class="plot" alt="{escape(alt)}"{size} src="data:image/png;base64,{data}">'


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset(),
           classes: list[str] | None = None) -> str:
    """An HTML table; cells are already escaped HTML."""
    head = "".join(f'<th class="num">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for n, row in enumerate(rows):
        cls = f' class="{classes[n]}"' if classes and classes[n] else ""
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _run_label(run: Run) -> str:
    return f"run {run.id} {run.name} ({run.config.get('searcher', '?')})"


def render_html(report: RunReport, *, window: int = 20, images: bool = True) -> str:
    """The report page as one HTML string."""
    from nos import plots

    why = "pictures left out on request"
    if images and not plots.available():
        images, why = False, escape(plots.MATPLOTLIB_MISSING)
    run = report.run
    config = run.config or {}
    parts = [
        *_page_head(run, config), _cards(report, config.get("budget")), *_best_rule(report),
        *_curve(report, window, images, why), *_top_rules(report, images),
        '<h2 id="timings">Timings</h2>', _timings_table(report.timings),
        '<h2 id="status">Evaluations by status</h2>',
        _table(list(report.progress.counts), [[str(n) for n in report.progress.counts.values()]],
               numeric=set(range(len(report.progress.counts)))),
        f'<h2 id="failures">Failures ({len(report.failures)})</h2>', _failures(report.failures),
        *_rejected(report.rows),
        '<h2 id="config">Configuration</h2>',
        # As written: a name or path in another script, not \u escapes, like the page's title.
        f"<pre>{escape(json.dumps(config, indent=2, sort_keys=True, default=str, ensure_ascii=False))}</pre>",
    ]
    if run.error:
        parts.append(f'<p class="bad">Run error:</p><pre>{escape(run.error)}</pre>')
    parts.append(f"<footer>nos report of run {run.id}, generated {_time(report.generated_at)}.</footer>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _page_head(run: Run, config: dict) -> list[str]:
    """The document's head and the page's title lines."""
    return [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>nos report: run {run.id} {escape(run.name)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<h1>Run {run.id}: {escape(run.name)}</h1>",
        f'<p class="sub">{escape(str(config.get("searcher", "?")))} search on <b>{escape(run.task)}</b>, '
        f"status <b>{escape(run.status)}</b>; created {_time(run.created_at)}"
        + (f", finished {_time(run.finished_at)}" if run.finished_at else "") + "</p>",
    ]


def _cards(report: RunReport, budget: int | None) -> str:
    """The run's figures at a glance."""
    timings = report.timings
    cards = [
        ("evaluations (trained, cached or failed)", f"{timings.counted}" + (f" / {budget}" if budget else "")),
        ("trained / rejected before training", f"{timings.trained} / {timings.rejected}"),
        ("best reward", _num(report.progress.best_reward)),
        ("cache hit rate", "-" if timings.cache_rate is None else f"{timings.cache_rate:.1%}"),
        ("failed", str(timings.failed)),
        ("evaluations / hour", "-" if timings.per_hour is None else f"{timings.per_hour:,.0f}"),   # of the count above
        ("elapsed", _seconds(timings.elapsed_seconds)),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div></div>'
        for k, v in cards) + "</div>"


def _best_rule(report: RunReport) -> list[str]:
    best = report.best or (report.top[0].row if report.top else None)
    if best is None:
        return []
    return [f'<p>Best rule: <code class="rule">{escape(best.rule)}</code> '
            f"(reward {_num(best.reward)}, test accuracy {_test(best)}, "
            f"best learning rate {_best_lr(best)})</p>"]


def _curve(report: RunReport, window: int, images: bool, why: str) -> list[str]:
    """The reward-by-evaluation section: the picture, or a note saying why there is none."""
    from nos import plots

    parts = ['<h2 id="curve">Reward by evaluation</h2>']
    if not any(r.counted for r in report.rows):   # what the curve draws: rejections are not on it
        parts.append('<p class="note">No finished evaluations yet.</p>')
    elif images:
        fig = plots.curve_figure([plots.Curve(_run_label(report.run), report.rows)], window=window)
        parts.append(_img(plots.png_bytes(fig), f"reward by evaluation of run {report.run.id}"))
        parts.append(f'<p class="note">Each dot is an evaluation\'s reward (failed ones: crosses at 0), the solid '
                     f"line the mean of the last {window}, the dashed line the best so far.</p>")
    else:
        parts.append(f'<p class="note">{why}</p>')
    return parts


def _top_rules(report: RunReport, images: bool) -> list[str]:
    """The top rules' table, then each one with its sweep."""
    if not report.top:
        # Nothing to show: either nothing is scored, or the caller asked for no rules (--top 0).
        why = "Left out on request (--top 0)." if report.best else "No scored evaluations yet."
        return ['<h2 id="top">Top rules</h2>', f'<p class="note">{why}</p>']
    parts = [f'<h2 id="top">Top {len(report.top)} rules</h2>']
    parts.append(_table(
        ["#", "rule", "reward", "test", "best lr", "evaluations"],
        [[str(t.row.place), f'<code class="rule">{escape(t.row.rule)}</code>', _num(t.row.reward),
          _test(t.row), _best_lr(t.row), str(t.row.evaluations)] for t in report.top],
        numeric={0, 2, 3, 4, 5}))
    return parts + [_top_rule(t, images) for t in report.top]


def _timings_table(timings: Timings) -> str:
    return _table(["", ""], [
        # The budget's count, as the cards and `nos status` give it: rejections have a line of their own.
        ["evaluations finished (trained, cached or failed)", str(timings.counted)],
        ["trained by a worker (done or diverged)", str(timings.trained)],
        ["rejected before training", str(timings.rejected)],
        ["answered from the cache", f"{timings.cached}"
         + ("" if timings.cache_rate is None else f" ({timings.cache_rate:.1%})")],
        ["wall seconds per trained evaluation: mean / median / max",
         f"{_seconds(timings.mean_seconds)} / {_seconds(timings.median_seconds)} / {_seconds(timings.max_seconds)}"],
        ["training time, summed over workers", _seconds(timings.train_seconds)],
        ["elapsed, run created to last evaluation finished", _seconds(timings.elapsed_seconds)],
        ["evaluations per hour (finished / elapsed)", "-" if timings.per_hour is None else f"{timings.per_hour:,.1f}"],
    ]).replace("<thead><tr><th></th><th></th></tr></thead>", "")


def _rejected(rows: list[EvaluationRow]) -> list[str]:
    """The rejected evaluations counted by reason, most common first; nothing when none was rejected."""
    rejected = [r for r in rows if r.status == "rejected"]
    if not rejected:
        return []
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r.reason or "-"] = reasons.get(r.reason or "-", 0) + 1
    return [f'<h2 id="rejected">Rejected before training ({len(rejected)})</h2>',
            _table(["reason", "evaluations"], [[escape(reason), str(n)] for reason, n in
                                               sorted(reasons.items(), key=lambda item: -item[1])],
                   numeric={1})]


def _top_rule(top: TopRule, images: bool) -> str:
    from nos import plots

    row, sweep = top.row, top.sweep
    unmeasured = _unmeasured(row)
    head = (f'<h3>#{row.place} <code class="rule">{escape(row.rule)}</code></h3>'
            f'<p class="sub">reward {_num(row.reward)} '
            + (f"({unmeasured})" if unmeasured else f"at lr {_lr(row.best_lr)}")
            + f", test accuracy {_test(row)}, evaluation {row.evaluation_id}</p>")
    if sweep is None:
        return f'<div class="top"><div>{head}<p class="note">No learning-rate sweep stored.</p></div></div>'
    note = "" if sweep.evaluation_id == row.evaluation_id else \
        f'<p class="note">Sweep of evaluation {sweep.evaluation_id} (run {sweep.run_id}), which this one reused.</p>'
    table = _table(["lr", "val score (sweep)", ""], [
        [_lr(p.lr), "-" if p.val_acc is None else _num(p.val_acc),
         '<span class="bad">diverged</span>' if p.diverged else ("best" if p.lr == sweep.best_lr else "")]
        for p in sweep.points], numeric={0, 1},
        classes=["best" if p.lr == sweep.best_lr else "" for p in sweep.points])
    picture = ""
    if images:
        fig = plots.sweep_figure([sweep], labels=["sweep"], size=(4.6, 3.0), legend=False)
        picture = f"<div>{_img(plots.png_bytes(fig), f'learning-rate sweep of {row.rule}', width=460)}</div>"
    return f'<div class="top"><div>{head}{note}{table}</div>{picture}</div>'


def _failures(rows: list[EvaluationRow]) -> str:
    if not rows:
        return '<p class="note">None.</p>'
    cells = []
    for r in rows:
        error = (r.error or "").strip()
        last = error.splitlines()[-1] if error else "-"
        detail = f"<details><summary>{escape(last)}</summary><pre>{escape(error)}</pre></details>" \
            if error and "\n" in error else escape(last)
        cells.append([str(r.seq), f'<code class="rule">{escape(r.rule)}</code>', str(r.attempts),
                      escape(r.worker or "-"), detail])
    return _table(["seq", "rule", "attempts", "worker", "error"], cells, numeric={0, 2})


__all__ = ["RunReport", "TopRule", "gather", "render_html", "write_report"]
