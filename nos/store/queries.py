"""Read-only queries: the leaderboard and a run's progress.

The SQL views `leaderboard` and `run_progress` (created by the migration) give
the same answers for ad-hoc SQL; these functions add filters and stay fast on
large databases.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import EVALUATION_STATUSES, Evaluation, Rule, Run


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
    evaluations: int  # scored evaluations of this rule within the filter


def leaderboard(session: Session, top: int = 20, *, run_id: int | None = None,
                task: str | None = None) -> list[LeaderboardRow]:
    """The `top` rules by best reward, over all runs, or one run, or one task.

    Order: reward descending, then the earliest evaluation that reached it,
    so ties always come out the same way.

    How: scored evaluations are read in that order, and the first one seen of
    each rule is its best. Reading stops once `top` rules are found; the slice
    read doubles until then, so the usual query touches a few hundred index
    entries instead of grouping every evaluation.
    """
    if top < 1:
        return []
    filters = [Evaluation.reward.is_not(None)]
    if run_id is not None:
        filters.append(Evaluation.run_id == run_id)
    if task is not None:
        filters.append(Evaluation.task == task)
    ordered = (select(Evaluation.id, Evaluation.rule_id).where(*filters)
               .order_by(Evaluation.reward.desc(), Evaluation.id))
    limit = top * 8
    while True:
        rows = session.execute(ordered.limit(limit)).all()
        best: dict[int, int] = {}  # rule id -> evaluation id, in leaderboard order
        for evaluation_id, rule_id in rows:
            best.setdefault(rule_id, evaluation_id)
            if len(best) == top:
                break
        if len(best) == top or len(rows) < limit:
            break
        limit *= 4
    return _leaderboard_rows(session, best, filters)


def _leaderboard_rows(session: Session, best: dict[int, int], filters: list) -> list[LeaderboardRow]:
    if not best:
        return []
    counts = dict(session.execute(
        select(Evaluation.rule_id, func.count()).where(Evaluation.rule_id.in_(best), *filters)
        .group_by(Evaluation.rule_id)).all())
    details = {e.id: (e, rule) for e, rule in session.execute(
        select(Evaluation, Rule).join(Rule, Rule.id == Evaluation.rule_id)
        .where(Evaluation.id.in_(best.values())))}
    rows = []
    for place, (rule_id, evaluation_id) in enumerate(best.items(), start=1):
        e, rule = details[evaluation_id]
        rows.append(LeaderboardRow(
            place=place, rule_id=rule_id, rule=rule.text, depth=rule.depth, reward=e.reward, test_acc=e.test_acc,
            best_lr=e.best_lr, evaluation_id=e.id, run_id=e.run_id, task=e.task, evaluations=counts[rule_id]))
    return rows


@dataclass(frozen=True)
class RunProgress:
    """How many of a run's evaluations stand in each status."""

    run_id: int
    name: str
    status: str
    task: str
    counts: dict[str, int]  # every evaluation status, zeros included
    best_reward: float | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return self.total - self.counts["queued"] - self.counts["running"]


def run_progress(session: Session, run_id: int) -> RunProgress | None:
    """Counts by status of one run (None if there is no such run), from the (run_id, status) index."""
    run = session.get(Run, run_id)
    if run is None:
        return None
    counts = dict.fromkeys(EVALUATION_STATUSES, 0)
    counts.update(session.execute(
        select(Evaluation.status, func.count()).where(Evaluation.run_id == run_id).group_by(Evaluation.status)
    ).all())
    best_reward = session.execute(
        select(func.max(Evaluation.reward)).where(Evaluation.run_id == run_id)).scalar_one()
    return RunProgress(run_id=run.id, name=run.name, status=run.status, task=run.task, counts=counts,
                       best_reward=best_reward)


def list_runs(session: Session) -> list[Run]:
    return list(session.execute(select(Run).order_by(Run.id)).scalars())
