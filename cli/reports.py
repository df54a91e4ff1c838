"""`nos plot`, `nos report`, `nos export`: pictures, a run's HTML page, a rule as Python code.

matplotlib is imported only by `nos plot` and `nos report`, torch by none of them.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import click
from sqlalchemy import select

from nos.rules import RuleSyntaxError
from nos.store import StoreError, resolve_url
from nos.store.engine import sqlite_path
from nos.store.history import rule_sweeps, run_evaluations
from nos.store.models import Evaluation
from nos.store.queries import DamagedRow, check_numbers, read_run

from .console import console
from .db import db_option, find_rule_or_exit, open_store_or_exit, store_errors_to_usage
from .errors import UsageProblem
from .options import MAX_TOP, task_filter_option, window_option
from .params import ID, SEED


def _plots():
    """nos.plots with matplotlib importable, or exit 2 saying how to install it."""
    from nos import plots

    if not plots.available():
        raise UsageProblem(plots.MATPLOTLIB_MISSING)
    return plots


# Files SQLite keeps beside the database: writing over one loses or corrupts the runs as surely as the file itself.
SQLITE_COMPANIONS = ("", "-wal", "-journal", "-shm")


def _check_output(output: str, db_url: str | None) -> None:
    """Exit 2, before anything is written, if `-o output` names a folder or the database's own files."""
    if output.endswith(os.sep) or (os.altsep and output.endswith(os.altsep)):
        # Path() drops the trailing slash: `-o newdir/` wrote a file named newdir.
        raise UsageProblem(f"cannot write {output}: it names a folder (ends in {output[-1]}); give a file name")
    try:
        database = sqlite_path(resolve_url(db_url))
    except StoreError:   # a bad URL: the command that reads the database says so
        return
    if database is None:
        return
    for suffix in SQLITE_COMPANIONS:
        if _same_file(output, f"{database}{suffix}"):
            raise UsageProblem(f"cannot write {output}: it is the database's own file ({database}{suffix}); "
                               "writing it would destroy every run in it")


def _same_file(a: str, b: str) -> bool:
    """Whether two names are one file: by the file itself where both exist (links, hard links), else by name."""
    try:
        return os.path.samefile(a, b)
    except OSError:   # one is not there (yet)
        return Path(a).resolve() == Path(b).resolve()


def _save(plots, fig, output: str) -> None:
    try:
        plots.save(fig, output)
    except OSError as exc:
        raise UsageProblem(f"cannot write {output}: {exc.strerror or exc}") from None
    except ValueError as exc:   # a suffix that names no image format
        raise UsageProblem(str(exc)) from None


@click.command("plot")
@click.argument("run_ids", metavar="[RUN_ID]...", nargs=-1, type=ID)
@click.option("--sweep", "sweep_rule", metavar="RULE",
              help="Plot RULE's learning-rate sweeps (rule id, text or built-in name) instead of run curves.")
@task_filter_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), required=True,
              help="Image file to write (the suffix picks the format: .png, .svg, .pdf, .jpg, ...).")
@window_option
@db_option
@store_errors_to_usage
def plot_command(run_ids, sweep_rule, task, output, window, db_url) -> None:
    """Draw reward against evaluation for runs, or a rule's learning-rate sweeps.

    \b
    nos plot 1 -o curve.png             one run: each evaluation's reward, a moving mean, the best so far
    nos plot 1 2 -o compare.png         several runs overlaid (PPO against random search, say)
    nos plot --sweep powersign -o sweep.png [--task digits]
                                        validation accuracy against learning rate, one line per evaluation
    """
    if bool(run_ids) == bool(sweep_rule):
        raise UsageProblem("give RUN_IDs to plot reward curves, or --sweep RULE to plot a rule's sweeps (not both)")
    if task and not sweep_rule:
        raise UsageProblem("--task goes with --sweep")
    _check_output(output, db_url)
    plots = _plots()
    store = open_store_or_exit(db_url)
    if sweep_rule:
        with store.reading() as session:
            rule = find_rule_or_exit(session, sweep_rule)
            sweeps = rule_sweeps(session, rule.id, task)
            if not sweeps:
                on = f" on task {task!r}" if task else ""
                raise UsageProblem(f"rule {rule.id} ({rule.text}) has no stored learning-rate sweep{on}: "
                                   + _why_no_sweep(session, rule.id, task))
        _save(plots, plots.sweep_figure(sweeps, title=f"learning-rate sweeps of {rule.text}"), output)
        console.print(f"wrote {output}: {len(sweeps)} sweep{'s' if len(sweeps) != 1 else ''} of rule {rule.id}",
                      markup=False, highlight=False)
        return
    curves, count = [], 0
    with store.reading() as session:
        for run_id in dict.fromkeys(run_ids):
            run = read_run(session, run_id)
            if run is None:
                raise UsageProblem(f"no run {run_id}; `nos runs` lists them")
            rows = run_evaluations(session, run_id)
            count += sum(r.counted for r in rows)
            curves.append(plots.Curve(f"run {run.id} {run.name} ({run.config.get('searcher', '?')})", rows))
    title = "reward by evaluation" + (f" of run {run_ids[0]}" if len(curves) == 1 else "")
    _save(plots, plots.curve_figure(curves, window=window, title=title), output)
    console.print(f"wrote {output}: {len(curves)} run{'s' if len(curves) != 1 else ''}, {count} finished evaluations",
                  markup=False, highlight=False)


# Why an evaluation left no sweep, by its status (a trained one without trials: its status says all we know).
NO_SWEEP = {"cached": "answered from the cache", "failed": "failed", "rejected": "rejected before training",
            "queued": "not finished", "running": "not finished"}


def _why_no_sweep(session, rule_id: int, task: str | None) -> str:
    """What became of a rule's evaluations (on `task`), none of which trained a sweep."""
    query = select(Evaluation.status).where(Evaluation.rule_id == rule_id)
    if task is not None:
        query = query.where(Evaluation.task == task)
    statuses = session.execute(query).scalars().all()
    if not statuses:
        return "it has no evaluation" + (" there" if task else "")
    reasons = Counter(NO_SWEEP.get(status, status) for status in statuses)
    if len(statuses) == 1:
        return f"its only evaluation was {next(iter(reasons))}"
    return "its evaluations were " + ", ".join(f"{reason} ({n})" for reason, n in reasons.most_common())


@click.command("report")
@click.argument("run_id", type=ID)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="HTML file to write [nos-run-RUN_ID.html].")
@click.option("--top", type=click.IntRange(0, MAX_TOP), default=5, show_default=True,
              help="Rules shown with their sweeps (0: none; the best rule's line stays).")
@window_option
@db_option
@store_errors_to_usage
def report_command(run_id, output, top, window, db_url) -> None:
    """Write one self-contained HTML page about a run.

    The reward curve, the top rules with their learning-rate sweeps, timings,
    the cache hit rate, failed evaluations with their errors and the run's
    configuration; pictures are embedded, nothing is loaded from elsewhere.
    """
    from nos.report import write_report

    output = output or f"nos-run-{run_id}.html"
    _check_output(output, db_url)
    _plots()
    store = open_store_or_exit(db_url)
    try:
        path = write_report(store, run_id, output, top=top, window=window)
    except LookupError:
        raise UsageProblem(f"no run {run_id}; `nos runs` lists them") from None
    except OSError as exc:
        raise UsageProblem(f"cannot write {output}: {exc.strerror or exc}") from None
    console.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)", markup=False, highlight=False)


DEFAULT_EXPORT_LR = 1e-3


def _stored_rule(rule_id: str, db_url: str | None) -> tuple[str, float | None, str | None]:
    """The text of stored rule `rule_id`, the best rate of its best-scoring evaluation (None: none scored), and
    where that rate comes from, for the snippet: a rate is the best on one task, not on any model."""
    from sqlalchemy import select

    from nos.store.models import SCORED_STATUSES, Evaluation

    store = open_store_or_exit(db_url)
    try:
        with store.reading() as session:
            found = find_rule_or_exit(session, rule_id)
            best = session.execute(
                select(Evaluation.best_lr, Evaluation.id, Evaluation.run_id, Evaluation.task, Evaluation.reward)
                .where(Evaluation.rule_id == found.id, Evaluation.reward.is_not(None),
                       Evaluation.best_lr.is_not(None), Evaluation.status.in_(SCORED_STATUSES))
                .order_by(Evaluation.reward.desc(), Evaluation.id).limit(1)).one_or_none()
            if best is None:
                return found.text, None, None
            try:
                check_numbers(best.run_id, "evaluations", best.id, reward=best.reward)
            except DamagedRow as exc:
                raise UsageProblem(str(exc)) from None
            if not (_is_number(best.best_lr) and 0 < best.best_lr < math.inf):
                raise UsageProblem(str(DamagedRow(best.run_id, f"evaluations.best_lr of evaluation {best.id}",
                                                  f"holds {best.best_lr!r:.60}, not a positive finite number")))
            return (found.text, best.best_lr,
                    f"the best rate of evaluation {best.id} (task {best.task}, reward {best.reward:.4f})")
    finally:
        store.dispose()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@click.command("export")
@click.argument("rule")
@click.option("--lr", type=float,
              help="Learning rate written into the snippet [a stored rule's best rate, else 0.001] "
                   "(`nos show RULE` lists the rule's sweep).")
@click.option("--total-steps", type=click.IntRange(min=1),
              help="The run's length in steps, for rules that read the schedules ld, cd or rd.")
@click.option("--seed", type=SEED, help="Seed of the optimizer's own noise, for rules that read eps, eps_t or drop.")
@click.option("--demo/--no-demo", default=True, show_default=True,
              help="End the snippet with a quick check that trains a tiny model when run as a script.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write the snippet to this file instead of printing it.")
@db_option
def export_command(rule, lr, total_steps, seed, demo, output, db_url) -> None:
    """Print a short Python snippet that trains with RULE in any PyTorch loop.

    RULE is rule text, a built-in name (`nos rule builtins`), or the id of a
    rule stored in the database (a number, as `nos show` and the
    leaderboard's rule_id take it). The snippet needs torch and nos:
    `make_optimizer(model.parameters())` returns a nos.optim.SymbolicOptimizer
    for the rule.
    """
    from nos.export import export_snippet
    from nos.files import write_atomically

    if output:
        _check_output(output, db_url)
    lr_note = None
    if rule.strip().isascii() and rule.strip().isdigit():
        rule, best_lr, origin = _stored_rule(rule, db_url)
        if lr is None:
            lr, lr_note = best_lr, origin
    lr = DEFAULT_EXPORT_LR if lr is None else lr
    try:
        source = export_snippet(rule, lr=lr, total_steps=total_steps, seed=seed, demo=demo, lr_note=lr_note)
    except RuleSyntaxError as exc:
        raise UsageProblem(f"bad rule\n{exc}") from None
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    if output:
        try:
            write_atomically(output, source.encode("utf-8"))
        except OSError as exc:
            raise UsageProblem(f"cannot write {output}: {exc.strerror or exc}") from None
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(source, nl=False)
