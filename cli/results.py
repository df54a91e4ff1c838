"""`nos runs`, `nos status`, `nos leaderboard`, `nos show`: read what searches found."""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from dataclasses import asdict, fields as dataclass_fields

import click
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from nos.store import LeaderboardRow, database_now, leaderboard, run_progress, trials_of
from nos.store.evaluations import refusals
from nos.store.history import UNMEASURED, scored_as
from nos.store.leases import DRIVABLE, Lease, read_lease
from nos.store.models import SCORED_STATUSES, Evaluation, Rule
from nos.store.queries import DamagedRow, read_run, run_ids

from .console import console
from .db import db_option, find_rule_or_exit, open_store_or_exit, store_errors_to_usage
from .errors import UsageProblem
from .options import MAX_TOP, broker_option, task_filter_option
from .params import ID
from .worker import check_broker_or_exit


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return str(value)


def _measured_test(e: Evaluation) -> float | None:
    return None if scored_as(e.status, e.best_lr) in UNMEASURED else e.test_acc


def _seconds(value: float | None) -> str:
    # A child that diverges on its first steps takes milliseconds: "<0.01", not a measured-looking 0.00.
    if value is None:
        return "-"
    return "<0.01" if value < 0.005 else f"{value:.2f}"


def print_leaderboard(session: Session, top: int, run_id: int | None = None, task: str | None = None,
                      fmt: str = "table", group_equivalent: bool = False) -> None:
    rows = leaderboard(session, top, run_id=run_id, task=task, group_equivalent=group_equivalent)
    if fmt == "json":
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        fields = [f.name for f in dataclass_fields(LeaderboardRow)]   # the same columns, rows or none
        writer.writerow(fields)
        for r in rows:
            writer.writerow([asdict(r)[f] for f in fields])
        return
    if not rows:
        console.print("no scored evaluations yet" + (f" in run {run_id}" if run_id else "")
                      + ("; start a search with `nos enqueue`" if run_id is None else ""))
        return
    table = Table(title="leaderboard" + (f" of run {run_id}" if run_id else "") + (f" on {task}" if task else ""))
    # "test", not "test acc": a regression task scores 1 / (1 + MSE) there, as in its reward
    columns = ["#", "rule id", "rule", "reward", "test", "best lr", "evals", "run", "task"]
    if group_equivalent:
        columns.insert(3, "same behaviour")
    for column in columns:
        table.add_column(column, overflow="fold")
    for r in rows:
        # Say why where its rate would be, rather than print a measured-looking test score of 0.0000.
        scored = scored_as(r.status, r.best_lr)   # a cached copy of a diverged rule diverged
        unmeasured = scored in UNMEASURED
        cells = [str(r.place), str(r.rule_id), r.rule, _fmt(r.reward), "-" if unmeasured else _fmt(r.test_acc),
                 scored if unmeasured else _fmt(r.best_lr),
                 str(r.evaluations), str(r.run_id), r.task]
        if group_equivalent:
            cells.insert(3, f"{r.equivalent_rules} rules" if r.equivalent_rules > 1 else "-")
        table.add_row(*cells)
    console.print(table)
    if task is None:
        _say_if_tasks_mix(session, run_id)


def _say_if_tasks_mix(session: Session, run_id: int | None) -> None:
    """A line under a leaderboard whose rewards come from several tasks: a quadratic's 0.99 above a classifier's
    0.95 says nothing about either rule, and a rule's best reward is taken over all of them."""
    query = select(Evaluation.task).distinct().where(Evaluation.status.in_(SCORED_STATUSES))
    tasks = session.execute(query if run_id is None else query.where(Evaluation.run_id == run_id)).scalars().all()
    if len(tasks) > 1:
        console.print(f"rewards of {len(tasks)} tasks ({', '.join(sorted(tasks))}) are not comparable: add --task "
                      "or --run")


@click.command("leaderboard")
@click.option("--run", "run_id", type=ID, help="Only this run.")
@task_filter_option
@click.option("--top", type=click.IntRange(1, MAX_TOP), default=20, show_default=True, help="Rows shown.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--group-equivalent", is_flag=True,
              help="One row per behaviour: rules with the same fingerprint count once.")
@db_option
@store_errors_to_usage
def leaderboard_command(run_id, task, top, fmt, group_equivalent, db_url) -> None:
    """The best rules by reward: over all runs, one run, or one task."""
    store = open_store_or_exit(db_url)
    with store.reading() as session:
        if run_id is not None and run_id not in run_ids(session):   # the board reads no column of the run
            raise UsageProblem(f"no run {run_id}; `nos runs` lists them")
        if task is not None:
            tasks = session.execute(select(Evaluation.task).distinct().order_by(Evaluation.task)).scalars().all()
            if task not in tasks:
                raise UsageProblem(f"no task {task!r} has results in this database; "
                                   f"tasks with results: {', '.join(tasks) or 'none yet'}")
        print_leaderboard(session, top, run_id, task, fmt, group_equivalent)


@click.command("runs")
@db_option
def runs_command(db_url) -> None:
    """List the runs with their progress."""
    store = open_store_or_exit(db_url)
    with store.reading() as session:
        if not run_ids(session):
            console.print("no runs yet; start one with `nos enqueue`")
            return
    table = Table(title="runs")
    for column in ("id", "name", "task", "searcher", "status", "evaluations", "trained", "rejected", "best reward",
                   "created"):
        table.add_column(column)
    damaged = []
    with store.reading() as session:
        for run_id in run_ids(session):
            try:
                table.add_row(*_run_cells(session, run_id))
            except DamagedRow as exc:
                # One damaged row leaves the other runs listed: its cells are "?", a line below says why.
                table.add_row(str(run_id), *["?"] * (len(table.columns) - 1))
                damaged.append(str(exc))
    console.print(table)
    for line in damaged:
        console.print(line)


def _run_cells(session: Session, run_id: int) -> list[str]:
    """A run's row of `nos runs`; DamagedRow if the run's row cannot be read."""
    run = read_run(session, run_id)
    progress = run_progress(session, run_id)
    return [str(run.id), run.name, run.task, str(run.config.get("searcher", "-")), run.status,
            f"{progress.counted}/{run.config.get('budget', '?')}", str(progress.trained),
            str(progress.counts["rejected"]), _fmt(progress.best_reward), run.created_at.strftime("%Y-%m-%d %H:%M")]


@click.command("status")
@click.argument("run_id", type=ID, required=False)
@db_option
@broker_option
@store_errors_to_usage
def status_command(run_id, db_url, broker_url) -> None:
    """A run's counts by status and its evaluations in flight (default: the latest run).

    With --broker, also the Celery workers that answer, and the queues they take.
    """
    store = open_store_or_exit(db_url)
    live = None
    if broker_url:
        from nos.workers.executor import live_workers

        check_broker_or_exit(broker_url)
        live = live_workers(broker_url)
        shown_workers = ", ".join(f"{name} ({', '.join(queues) or 'no queue'})" for name, queues in live.items())
        console.print(f"{len(live)} live worker{'s' if len(live) != 1 else ''}: {shown_workers or '-'}")
    with store.reading() as session:
        if run_id is None:
            runs = run_ids(session)
            if not runs:
                raise UsageProblem("no runs yet; start one with `nos enqueue`")
            run_id = runs[-1]
        run = read_run(session, run_id)   # first: a damaged row is named here, not met as a traceback below
        if run is None:
            raise UsageProblem(f"no run {run_id}; `nos runs` lists them")
        progress = run_progress(session, run_id)
        console.print(f"run {run_id} ({progress.name}, {progress.task}): {progress.status}, "
                      f"{progress.counted}/{run.config.get('budget', '?')} evaluations finished "
                      f"({progress.trained} trained, {progress.counts['cached']} from the cache; "
                      f"{progress.counts['rejected']} more rejected before training, free), "
                      f"best reward {_fmt(progress.best_reward)}")
        console.print("  " + ", ".join(f"{status} {n}" for status, n in progress.counts.items()))
        if run.status in DRIVABLE:
            console.print("  " + _driver_line(read_lease(session, run_id), run, live))
        elif run.status == "failed" and run.error:
            # A detached run (its driver loop sent to a control worker) is resumed detached too.
            console.print(f"  failed: {run.error.strip().splitlines()[-1][:500]}; fix the cause, then "
                          f"`nos resume {run_id}{' --detach' if run.drive_sent_at is not None else ''}`")
        refused, last = refusals(session, run_id)
        if refused:
            console.print(f"  {refused} queued evaluation{'s' if refused != 1 else ''} refused by a worker "
                          f"(the last: {last})")
        if progress.finished:
            console.print(f"  cache hit rate {progress.cache_hit_rate:.1%} "
                          f"({progress.counts['cached'] - progress.equivalent} same rule, "
                          f"{progress.equivalent} same behaviour), "
                          f"rejected before training {progress.rejection_rate:.1%}")
        in_flight = session.execute(
            select(Evaluation, Rule.text).join(Rule, Rule.id == Evaluation.rule_id)
            .where(Evaluation.run_id == run_id, Evaluation.status == "running").order_by(Evaluation.seq)).all()
        if in_flight:
            packs = _packs([e for e, _ in in_flight])
            table = Table(title="in flight")
            for column in ("evaluation", "seq", "rule", "worker", "pack", "attempt", "heartbeat age"):
                table.add_column(column)
            now = database_now(session)   # the clock the heartbeats were written by
            for e, text in in_flight:
                age = "-" if e.heartbeat_at is None else f"{(now - e.heartbeat_at).total_seconds():.0f} s"
                table.add_row(str(e.id), str(e.seq), text, e.worker or "-", packs[e.id], str(e.attempts), age)
            console.print(table)
            sizes = Counter((e.worker, e.claimed_at) for e, _ in in_flight)
            if max(sizes.values()) > 1:
                console.print(f"  {len(sizes)} packs in flight: " + ", ".join(
                    f"{n} of {size}" for size, n in sorted(Counter(sizes.values()).items(), reverse=True)))


def _driver_line(lease: Lease, run, live: dict[str, tuple[str, ...]] | None = None) -> str:
    """Who drives the run, or what will drive it again; `live`: the workers that answered, with their queues."""
    detached = run.drive_sent_at is not None
    if lease.live():
        age = max((lease.read_at - lease.heartbeat_at).total_seconds(), 0)
        return (f"driven by {lease.holder} (lease renewed {age:.0f} s ago)"
                f"{', a control worker of a detached run' if detached else ''}")
    last = f" (the last, {lease.holder}, is gone)" if lease.holder else ""
    if detached:
        if live is not None and not any("control" in queues for queues in live.values()):
            return (f"no live driver{last}: no live worker takes the control queue; start one with "
                    f"`nos worker --queues control` (it drives the run on from its latest checkpoint)")
        again = f"; sent again {run.drive_sends} times" if run.drive_sends else ""
        return (f"no live driver{last}: waiting for a control worker, which sends its driver loop again if it "
                f"was lost{again}")
    return f"no live driver{last}: continue it with `nos resume {run.id}`"


def _packs(running: list[Evaluation]) -> dict[int, str]:
    """Each running evaluation's pack, as "P/N" (pack P of its worker, N evaluations in it).

    A worker claims a pack in one transaction, with one claim time: so the
    evaluations of one worker and one claim time are one pack.
    """
    groups: dict[tuple, list[int]] = {}
    for e in running:
        groups.setdefault((e.worker, e.claimed_at), []).append(e.id)
    numbers: Counter = Counter()
    labels: dict[int, str] = {}
    for (worker, _), ids in sorted(groups.items(), key=lambda item: min(item[1])):
        numbers[worker] += 1
        labels.update({i: f"{numbers[worker]}/{len(ids)}" for i in ids})
    return labels


@click.command("show")
@click.argument("rule")
@db_option
def show_command(rule, db_url) -> None:
    """A rule's evaluations and learning-rate sweeps; RULE is a rule id or rule text."""
    store = open_store_or_exit(db_url)
    with store.reading() as session:
        found = find_rule_or_exit(session, rule)
        console.print(f"rule {found.id}: {found.text}   (depth {_fmt(found.depth)}, hash {found.hash})")
        evaluations = session.execute(
            select(Evaluation).where(Evaluation.rule_id == found.id).order_by(Evaluation.id)).scalars().all()
        for e in evaluations:
            console.print(f"\nevaluation {e.id}: run {e.run_id}, seq {e.seq}, {e.task}, {e.status}, "
                          f"reward {_fmt(e.reward)}, test {_fmt(_measured_test(e))}, best lr {_fmt(e.best_lr)}"
                          + (f", cached from {e.cached_from}" if e.cached_from else "")
                          + (f"\n  error: {e.error.strip().splitlines()[-1]}" if e.error else ""))
            trials = trials_of(session, e.id)
            if trials:
                # The sweep's scores are not the reward when the final run trains on for more epochs: say where
                # the reward comes from, under the sweep it was chosen by.
                table = Table()
                for column in ("lr", "val score", "train loss", "diverged", "seconds"):
                    table.add_column(column)
                for t in trials:
                    table.add_row(_fmt(t.lr), _fmt(t.val_acc), _fmt(t.train_loss), "yes" if t.diverged else "",
                                  _seconds(t.wall_seconds))
                console.print(table)
                if e.best_lr is not None:
                    console.print(f"reward: the val score of the final run at lr {_fmt(e.best_lr)}")
