"""Read-only queries: the leaderboard and a run's progress.

The SQL views `leaderboard` and `run_progress` (created by the migration) give
the same answers for ad-hoc SQL; these functions add filters and stay fast on
large databases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

from sqlalchemy import JSON, Column, func, select
from sqlalchemy.orm import Session, aliased

from ..finite import is_finite_number
from .engine import StoreError, first_line
from .models import EVALUATION_STATUSES, PENDING_STATUSES, TRAINED_STATUSES, Evaluation, Rule, Run

T = TypeVar("T")

_SQL_INT_MAX = 2**63 - 1


@dataclass(frozen=True)
class LeaderboardRow:
    """A rule's best scored evaluation within the filter."""

    place: int
    rule_id: int
    rule: str
    depth: int | None
    reward: float
    test_acc: float | None
    best_lr: float | None
    evaluation_id: int
    run_id: int
    task: str
    status: str   # that evaluation's: "rejected" (never trained) and "diverged" (at every rate) score 0
    evaluations: int  # scored evaluations of this rule within the filter
    # With group_equivalent: how many rules, this one included, share its fingerprint within the filter.
    equivalent_rules: int = 1


def leaderboard(session: Session, top: int = 20, *, run_id: int | None = None, task: str | None = None,
                group_equivalent: bool = False) -> list[LeaderboardRow]:
    """The `top` rules by best reward, over all runs, or one run, or one task.

    group_equivalent: one row per behaviour: rules with the same fingerprint
    (nos.rules.fingerprint) count as one, shown by the best of them.

    Order: reward descending, then the earliest evaluation that reached it,
    so ties always come out the same way.

    How: walk scored evaluations down the reward index, keeping each one that
    is its rule's best (a correlated lookup on the (rule_id, reward) index),
    and stop after `top`. It reads a few rows per place instead of grouping
    every evaluation; the `leaderboard` view is the same query without filters.
    """
    if top < 1:
        return []
    top = min(top, _SQL_INT_MAX)   # a LIMIT beyond a signed 64-bit integer overflows the driver, not the board
    if group_equivalent:
        return _grouped_leaderboard(session, top, run_id, task)
    best_of_rule = aliased(Evaluation)
    filters = _scored_within(Evaluation, run_id, task)
    best_id = (select(best_of_rule.id)
               .where(best_of_rule.rule_id == Evaluation.rule_id, *_scored_within(best_of_rule, run_id, task))
               .order_by(best_of_rule.reward.desc(), best_of_rule.id).limit(1).scalar_subquery())
    # The rule's columns come from scalar subqueries, not a join, so the
    # planner keeps walking the reward index (the same shape as the view).
    rows = session.execute(
        select(Evaluation.rule_id, _rule_column(Rule.text), _rule_column(Rule.depth), Evaluation.reward,
               Evaluation.test_acc, Evaluation.best_lr, Evaluation.id, Evaluation.run_id, Evaluation.task,
               Evaluation.status)
        .where(*filters, Evaluation.id == best_id)
        .order_by(Evaluation.reward.desc(), Evaluation.id).limit(top)).all()
    counts = dict(session.execute(
        select(Evaluation.rule_id, func.count()).where(Evaluation.rule_id.in_([r[0] for r in rows]), *filters)
        .group_by(Evaluation.rule_id)).all()) if rows else {}
    board = [LeaderboardRow(place, *row, evaluations=counts[row[0]]) for place, row in enumerate(rows, start=1)]
    for row in board:
        check_numbers(row.run_id, "evaluations", row.evaluation_id, reward=row.reward, test_acc=row.test_acc,
                      best_lr=row.best_lr)
    return board


def _grouped_leaderboard(session: Session, top: int, run_id: int | None, task: str | None) -> list[LeaderboardRow]:
    # Read the per-rule board deeper until `top` behaviours show up (or it runs out).
    depth = top
    while True:
        rows = leaderboard(session, depth, run_id=run_id, task=task)
        fingerprints = dict(session.execute(
            select(Rule.id, Rule.fingerprint).where(Rule.id.in_([r.rule_id for r in rows]))).all()) if rows else {}
        firsts: dict[object, LeaderboardRow] = {}
        for row in rows:
            firsts.setdefault(fingerprints.get(row.rule_id) or ("rule", row.rule_id), row)
        if len(firsts) >= top or len(rows) < depth:
            break
        depth *= 4
    chosen = list(firsts.items())[:top]
    printed = [key for key, _ in chosen if isinstance(key, str)]
    sizes = dict(session.execute(
        select(Rule.fingerprint, func.count(func.distinct(Rule.id))).join(Evaluation, Evaluation.rule_id == Rule.id)
        .where(Rule.fingerprint.in_(printed), *_scored_within(Evaluation, run_id, task))
        .group_by(Rule.fingerprint)).all()) if printed else {}
    return [replace(row, place=place, equivalent_rules=sizes.get(key, 1))
            for place, (key, row) in enumerate(chosen, start=1)]


def _rule_column(column):
    return select(column).where(Rule.id == Evaluation.rule_id).scalar_subquery()


def _scored_within(table, run_id: int | None, task: str | None) -> list:
    filters = [table.reward.is_not(None)]
    if run_id is not None:
        filters.append(table.run_id == run_id)
    if task is not None:
        filters.append(table.task == task)
    return filters


@dataclass(frozen=True)
class RunProgress:
    """How many of a run's evaluations stand in each status."""

    run_id: int
    name: str
    status: str
    task: str
    counts: dict[str, int]  # every evaluation status, zeros included
    best_reward: float | None
    equivalent: int = 0     # cached evaluations that reused another rule's result (same fingerprint)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return self.total - sum(self.counts[s] for s in PENDING_STATUSES)

    @property
    def counted(self) -> int:
        """Finished evaluations that count toward the budget: all but the rejected ones."""
        return self.finished - self.counts["rejected"]

    @property
    def trained(self) -> int:
        """Finished evaluations a worker trained (done or diverged)."""
        return sum(self.counts[s] for s in TRAINED_STATUSES)

    @property
    def cache_hit_rate(self) -> float | None:
        """Finished evaluations answered from earlier results, same rule or same behaviour."""
        return self.counts["cached"] / self.finished if self.finished else None

    @property
    def rejection_rate(self) -> float | None:
        return self.counts["rejected"] / self.finished if self.finished else None


def run_progress(session: Session, run_id: int) -> RunProgress | None:
    """Counts by status of one run (None if there is no such run), from the (run_id, status) index;
    DamagedRow if its best reward is not a finite number."""
    run = session.get(Run, run_id)
    if run is None:
        return None
    counts = dict.fromkeys(EVALUATION_STATUSES, 0)
    counts.update(session.execute(
        select(Evaluation.status, func.count()).where(Evaluation.run_id == run_id).group_by(Evaluation.status)
    ).all())
    best_reward = session.execute(
        select(func.max(Evaluation.reward)).where(Evaluation.run_id == run_id)).scalar_one()
    if best_reward is not None and not is_finite_number(best_reward):
        # SQL's max takes an infinity, PostgreSQL's NaN or SQLite's text over every figure: name its row.
        holder = session.execute(select(func.min(Evaluation.id)).where(
            Evaluation.run_id == run_id, Evaluation.reward == best_reward)).scalar_one()
        check_numbers(run_id, "evaluations", holder, reward=best_reward)
    equivalent = session.execute(
        select(func.count()).where(Evaluation.run_id == run_id, Evaluation.status == "cached",
                                   Evaluation.reason.is_not(None))).scalar_one() if counts["cached"] else 0
    return RunProgress(run_id=run.id, name=run.name, status=run.status, task=run.task, counts=counts,
                       best_reward=best_reward, equivalent=equivalent)


def list_runs(session: Session) -> list[Run]:
    return list(session.execute(select(Run).order_by(Run.id)).scalars())


def run_ids(session: Session) -> list[int]:
    """Every run's id, in order; no other column is read, so a damaged row (see read_run) cannot fail it."""
    return list(session.execute(select(Run.id).order_by(Run.id)).scalars())


# --- rows nos never wrote ------------------------------------------------------------------------------------

class DamagedRow(StoreError):
    """A run's stored value has a shape nos never writes: edited by hand or by another tool, or a damaged file.

    SQLite keeps any value in any column, and PostgreSQL's JSON takes any JSON; readers name the run and the
    column instead of failing with a traceback or guessing a value.
    """

    def __init__(self, run_id: int, column: str, problem: str):
        super().__init__(f"run {run_id} is damaged in the database: {column} {problem}")
        self.run_id = run_id


def check_numbers(run_id: int, table: str, evaluation_id: int, **numbers: object) -> None:
    """DamagedRow naming the first of `numbers` (a column's name and value, of `table`'s row of evaluation
    `evaluation_id`) that is not a finite number: SQLite hands back text stored in a REAL column as text, and
    an infinity (nos never stores one) would be shown as a figure and written as JSON no parser reads."""
    for name, value in numbers.items():
        if value is None or is_finite_number(value):
            continue
        kind = "a finite number" if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
        raise DamagedRow(run_id, f"{table}.{name} of evaluation {evaluation_id}", f"holds {value!r:.60}, not {kind}")


def read_run(session: Session, run_id: int) -> Run | None:
    """Run `run_id`, None if there is none; DamagedRow if a column of its row cannot be read, or its config
    is not a JSON object (what every reader of `run.config` takes it to be)."""
    run = read_naming_damage(session, lambda: session.get(Run, run_id), list(Run.__table__.columns),
                             [Run.id == run_id],
                             lambda column, _, problem: DamagedRow(run_id, f"runs.{column.name}", problem))
    if run is not None and not isinstance(run.config, dict):
        raise DamagedRow(run_id, "runs.config", f"holds {json.dumps(run.config)[:60]}, not a JSON object")
    return run


def read_naming_damage(session: Session, read: Callable[[], T], columns: list[Column], where: list,
                       damaged: Callable[[Column, int, str], StoreError]) -> T:
    """`read()`; where it meets a value its column's type cannot convert, the error `damaged` makes of the
    cell `unreadable_cell` finds among `columns` in the rows `where` selects (the column, the row's id, what
    is wrong), raised in its place. A conversion error no stored value explains is raised as it was."""
    try:
        return read()
    except (TypeError, ValueError):
        found = unreadable_cell(session, columns, *where)
        if found is None:
            raise
        raise damaged(*found) from None


def unreadable_cell(session: Session, columns: list[Column], *where) -> tuple[Column, int, str] | None:
    """The first of `columns` (of one table) that holds, in a row `where` selects, a value its type cannot
    convert; the lowest such row's id; and what is wrong with its value. None if every value converts.

    A query that meets such a value fails as a whole (a JSONDecodeError, "Invalid isoformat string") without
    saying where, so each column is read alone, then its rows by halves of their id range.
    """
    for column in columns:
        if _conversion_error(session, column, *where) is None:
            continue
        key = column.table.c.id
        ids = session.execute(select(key).where(*where).order_by(key)).scalars().all()
        while len(ids) > 1:
            low = ids[:len(ids) // 2]
            ids = low if _conversion_error(session, column, *where, key.between(low[0], low[-1])) else ids[len(low):]
        if isinstance(column.type, JSON):
            return column, ids[0], "is not valid JSON"
        error = _conversion_error(session, column, key == ids[0])
        return column, ids[0], f"cannot be read ({first_line(error)[:200]})"
    return None


def _conversion_error(session: Session, column: Column, *where) -> Exception | None:
    try:
        session.execute(select(column).where(*where)).all()
    except (TypeError, ValueError) as exc:
        return exc
    return None
