"""What happened in a run, evaluation by evaluation: for plots, reports and data frames.

Plain rows (dataclasses) read in one query each; `nos.store.frames` turns
them into pandas DataFrames, `nos.plots` and `nos.report` draw them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import FINISHED_STATUSES, TRAINED_STATUSES, Evaluation, LrTrial, Rule, Run
from .queries import DamagedRow, check_numbers, read_naming_damage

# Statuses with no final run, so no test score: never trained, or diverged at every rate. The store holds a
# test_acc of 0.0 for them; readers show "-" rather than a measured-looking 0.0000.
UNMEASURED = ("rejected", "diverged")


def scored_as(status: str, best_lr: float | None) -> str:
    """How an evaluation got its figures: its status, or "diverged" for a cached copy of a rule that diverged at
    every rate (a copy carries its source's figures, and of the trained statuses only diverged has no best rate)."""
    return "diverged" if status == "cached" and best_lr is None else status


@dataclass(frozen=True)
class EvaluationRow:
    """One evaluation with its rule's text: a row of `nos.store.evaluations_frame`."""

    id: int
    run_id: int
    seq: int
    batch: int
    rule_id: int
    rule: str
    depth: int | None
    task: str
    status: str
    attempts: int
    worker: str | None
    reward: float | None
    test_acc: float | None
    best_lr: float | None
    wall_seconds: float | None
    cached_from: int | None
    error: str | None
    reason: str | None    # why it was rejected untrained, or which equivalent rule's evaluation it reused
    created_at: datetime
    claimed_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def counted(self) -> bool:
        """Finished and counted toward the budget: a rejected proposal cost no training and is free."""
        return self.finished and self.status != "rejected"


@dataclass(frozen=True)
class TrialRow:
    """One learning rate of an evaluation's sweep: a row of `nos.store.trials_frame`."""

    evaluation_id: int
    run_id: int
    seq: int
    rule_id: int
    rule: str
    task: str
    lr: float
    val_acc: float | None
    train_loss: float | None
    diverged: bool
    wall_seconds: float | None


@dataclass(frozen=True)
class SweepPoint:
    lr: float
    val_acc: float | None
    diverged: bool


@dataclass(frozen=True)
class Sweep:
    """An evaluation's learning-rate sweep (for a cached evaluation: its source's sweep)."""

    evaluation_id: int   # the evaluation that trained the sweep
    run_id: int
    seq: int
    task: str
    status: str
    reward: float | None
    best_lr: float | None
    points: list[SweepPoint] = field(default_factory=list)


_EVALUATION_COLUMNS = (
    Evaluation.id, Evaluation.run_id, Evaluation.seq, Evaluation.batch, Evaluation.rule_id, Rule.text, Rule.depth,
    Evaluation.task, Evaluation.status, Evaluation.attempts, Evaluation.worker, Evaluation.reward,
    Evaluation.test_acc, Evaluation.best_lr, Evaluation.wall_seconds, Evaluation.cached_from, Evaluation.error,
    Evaluation.reason, Evaluation.created_at, Evaluation.claimed_at, Evaluation.finished_at,
)


# The REAL columns of an evaluation row: plots and reports do arithmetic on them.
_NUMBERS = ("reward", "test_acc", "best_lr", "wall_seconds")


def run_evaluations(session: Session, run_id: int | None = None) -> list[EvaluationRow]:
    """A run's evaluations in seq order (every run's, by run then seq, when `run_id` is None).

    DamagedRow if one holds a value nos never writes: one its column's type cannot convert (SQLite keeps any
    text in any column), or text where a number belongs.
    """
    where = [] if run_id is None else [Evaluation.run_id == run_id]
    query = select(*_EVALUATION_COLUMNS).join(Rule, Rule.id == Evaluation.rule_id).where(*where)
    columns = [Evaluation.__table__.c[column.key] for column in _EVALUATION_COLUMNS if column.class_ is Evaluation]

    def read() -> list[EvaluationRow]:
        return [EvaluationRow(*row) for row in session.execute(query.order_by(Evaluation.run_id, Evaluation.seq))]

    rows = read_naming_damage(session, read, columns, where, functools.partial(_damaged_evaluation, session))
    for row in rows:
        _check_numbers(row)
    return rows


def _damaged_evaluation(session: Session, column, evaluation_id: int, problem: str) -> DamagedRow:
    """The DamagedRow naming a stored value of evaluation `evaluation_id` that its column cannot convert."""
    run_id = session.execute(select(Evaluation.run_id).where(Evaluation.id == evaluation_id)).scalar_one()
    return DamagedRow(run_id, f"evaluations.{column.name} of evaluation {evaluation_id}", problem)


def _check_numbers(row: EvaluationRow) -> None:
    # Refused here, not as a TypeError in a plot.
    check_numbers(row.run_id, "evaluations", row.id, **{name: getattr(row, name) for name in _NUMBERS})


def run_trials(session: Session, run_id: int | None = None) -> list[TrialRow]:
    """The learning-rate trials of a run's evaluations, by seq then lr (cached evaluations have none)."""
    query = (select(LrTrial.evaluation_id, Evaluation.run_id, Evaluation.seq, Evaluation.rule_id, Rule.text,
                    Evaluation.task, LrTrial.lr, LrTrial.val_acc, LrTrial.train_loss, LrTrial.diverged,
                    LrTrial.wall_seconds)
             .join(Evaluation, Evaluation.id == LrTrial.evaluation_id).join(Rule, Rule.id == Evaluation.rule_id))
    if run_id is not None:
        query = query.where(Evaluation.run_id == run_id)
    rows = session.execute(query.order_by(Evaluation.run_id, Evaluation.seq, LrTrial.lr))
    return [TrialRow(*row) for row in rows]


def rule_sweeps(session: Session, rule_id: int, task: str | None = None) -> list[Sweep]:
    """Every stored sweep of a rule (evaluations that trained it), optionally on one task, in evaluation order."""
    query = select(Evaluation).where(Evaluation.rule_id == rule_id)
    if task is not None:
        query = query.where(Evaluation.task == task)
    evaluations = session.execute(query.order_by(Evaluation.id)).scalars().all()
    points = _points_of(session, [e.id for e in evaluations])
    return [_sweep(e, points[e.id]) for e in evaluations if points.get(e.id)]


def sweep_of(session: Session, evaluation_id: int) -> Sweep | None:
    """The sweep behind an evaluation: its own, or for a cached one its source's; None if there is none."""
    seen = set()
    evaluation = session.get(Evaluation, evaluation_id)
    while evaluation is not None and evaluation.id not in seen:
        seen.add(evaluation.id)
        points = _points_of(session, [evaluation.id]).get(evaluation.id)
        if points:
            return _sweep(evaluation, points)
        if evaluation.cached_from is None:
            return None
        evaluation = session.get(Evaluation, evaluation.cached_from)
    return None


def _points_of(session: Session, evaluation_ids: list[int]) -> dict[int, list[SweepPoint]]:
    """The sweeps of `evaluation_ids`, by evaluation; DamagedRow if a stored rate or score is not a number."""
    points: dict[int, list[SweepPoint]] = {}
    for start in range(0, len(evaluation_ids), 500):
        chunk = evaluation_ids[start:start + 500]
        rows = session.execute(
            select(LrTrial.evaluation_id, Evaluation.run_id, LrTrial.lr, LrTrial.val_acc, LrTrial.diverged)
            .join(Evaluation, Evaluation.id == LrTrial.evaluation_id)
            .where(LrTrial.evaluation_id.in_(chunk)).order_by(LrTrial.evaluation_id, LrTrial.lr))
        for evaluation_id, run_id, lr, val_acc, diverged in rows:
            check_numbers(run_id, "lr_trials", evaluation_id, lr=lr, val_acc=val_acc)
            points.setdefault(evaluation_id, []).append(SweepPoint(lr, val_acc, bool(diverged)))
    return points


def _sweep(evaluation: Evaluation, points: list[SweepPoint]) -> Sweep:
    return Sweep(evaluation_id=evaluation.id, run_id=evaluation.run_id, seq=evaluation.seq, task=evaluation.task,
                 status=evaluation.status, reward=evaluation.reward, best_lr=evaluation.best_lr, points=points)


@dataclass(frozen=True)
class Timings:
    """How long a run's evaluations took."""

    finished: int                 # evaluations done, diverged, cached, rejected or failed (`counted`: not rejected)
    trained: int                  # done or diverged: the ones a worker trained
    train_seconds: float          # their wall seconds, summed (worker time)
    mean_seconds: float | None    # per trained evaluation
    median_seconds: float | None
    max_seconds: float | None
    elapsed_seconds: float | None  # from the run's creation to its last finished evaluation
    per_hour: float | None        # counted evaluations per hour of elapsed time, as the budget counts them
    cached: int
    failed: int
    rejected: int                 # refused before training (reward 0)

    @property
    def counted(self) -> int:
        """Finished evaluations that count toward the budget: all but the rejected ones."""
        return self.finished - self.rejected

    @property
    def cache_rate(self) -> float | None:
        """Share of finished evaluations answered from the cache."""
        return self.cached / self.finished if self.finished else None


def run_timings(run: Run, rows: list[EvaluationRow]) -> Timings:
    """Timings of `rows` (a run's evaluations, from `run_evaluations`)."""
    finished = [r for r in rows if r.finished]
    seconds = sorted(r.wall_seconds for r in finished
                     if r.status in TRAINED_STATUSES and r.wall_seconds is not None)
    trained = sum(r.status in TRAINED_STATUSES for r in finished)
    ends = [r.finished_at for r in finished if r.finished_at is not None]
    elapsed = (max(ends) - run.created_at).total_seconds() if ends else None
    median = None
    if seconds:
        middle = len(seconds) // 2
        median = seconds[middle] if len(seconds) % 2 else (seconds[middle - 1] + seconds[middle]) / 2
    return Timings(
        finished=len(finished), trained=trained, train_seconds=sum(seconds),
        mean_seconds=sum(seconds) / len(seconds) if seconds else None, median_seconds=median,
        max_seconds=seconds[-1] if seconds else None, elapsed_seconds=elapsed,
        # Rejections are free and near instant: counting them would inflate the rate, as `nos status` does not.
        per_hour=sum(r.counted for r in finished) / elapsed * 3600 if elapsed and elapsed > 0 else None,
        cached=sum(r.status == "cached" for r in finished), failed=sum(r.status == "failed" for r in finished),
        rejected=sum(r.status == "rejected" for r in finished))


__all__ = [
    "UNMEASURED", "EvaluationRow", "Sweep", "SweepPoint", "Timings", "TrialRow", "rule_sweeps",
    "run_evaluations", "run_timings", "run_trials", "scored_as", "sweep_of",
]
