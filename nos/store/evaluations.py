"""An evaluation's life: queued -> claimed (running) -> done / diverged / failed.

(Or none of it: an evaluation can be born `cached`, a copy of an equal or
equivalent rule's result, or `rejected`, refused before training.)

Workers coordinate only through these functions. Each change of hands is one
conditional UPDATE whose WHERE clause states who may make it, and whose row
count says whether it happened:

- `claim` takes a queued row, or a running row whose heartbeat went stale,
  of a run that is `running`, and bumps `attempts`; the new attempt number
  is the worker's ticket.
- `heartbeat`, `commit_result` and `fail` act only while the row is still
  running under that ticket. A superseded worker is refused and writes nothing.

Each function works inside the caller's transaction (`Store.transaction()`),
so a worker's call is one short transaction and the driver can insert a batch
of rules and evaluations atomically. `now` defaults to the database's clock
(`clock.database_now`), which every host agrees on; it is a parameter so
that callers (and tests) can decide time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from ..records import EvaluationResult
from ..redact import mask_credentials
from .clock import database_now
from .leases import gone_from_this_host
from .models import PENDING_STATUSES, TRAINED_STATUSES, Evaluation, LrTrial, Rule, Run

evaluations = Evaluation.__table__
lr_trials = LrTrial.__table__
runs = Run.__table__


@dataclass(frozen=True)
class NewEvaluation:
    """An evaluation to enqueue.

    With `cached_from`, a copy of that scored evaluation's result; with
    `rejected`, finished at once with reward 0. `reason` says why, for both.
    """

    rule_id: int
    task: str
    task_key: str
    cached_from: int | None = None
    rejected: bool = False
    reason: str | None = None
    tokens: list[int] | None = None       # the sequence the searcher sampled
    log_prob: float | None = None         # and the log-probability it was sampled with


@dataclass(frozen=True)
class StaleSweep:
    """What `requeue_stale` did: rows put back in the queue, rows given up on."""

    requeued: list[int]
    abandoned: list[int]


def enqueue_batch(session: Session, run_id: int, batch: int, entries: Sequence[NewEvaluation], *,
                  now: datetime | None = None) -> list[int]:
    """Insert a batch of evaluations (queued, or cached copies); returns their ids in order.

    They take the run's next seq numbers. Call it inside the transaction that
    also stores the batch's rules, so a crash leaves all of it or none.
    """
    if not entries:
        return []
    now = now or database_now(session)
    next_seq = session.execute(
        select(func.coalesce(func.max(evaluations.c.seq), -1) + 1).where(evaluations.c.run_id == run_id)
    ).scalar_one()
    sources = _cached_sources(session, [e.cached_from for e in entries if e.cached_from is not None])
    rows = []
    for offset, entry in enumerate(entries):
        row = dict(run_id=run_id, rule_id=entry.rule_id, batch=batch, seq=next_seq + offset, task=entry.task,
                   task_key=entry.task_key, status="queued", attempts=0, created_at=now, cached_from=None,
                   best_lr=None, reward=None, test_acc=None, wall_seconds=None, finished_at=None,
                   reason=entry.reason, tokens=entry.tokens, log_prob=entry.log_prob)
        if entry.cached_from is not None:
            source = sources[entry.cached_from]
            row.update(status="cached", cached_from=source.id, best_lr=source.best_lr, reward=source.reward,
                       test_acc=source.test_acc, finished_at=now)
        elif entry.rejected:
            row.update(status="rejected", reward=0.0, test_acc=0.0, wall_seconds=0.0, finished_at=now)
        rows.append(row)
    session.execute(insert(evaluations), rows)
    seqs = [row["seq"] for row in rows]
    ids = dict(session.execute(
        select(evaluations.c.seq, evaluations.c.id)
        .where(evaluations.c.run_id == run_id, evaluations.c.seq >= seqs[0], evaluations.c.seq <= seqs[-1])
    ).all())
    return [ids[seq] for seq in seqs]


def _cached_sources(session: Session, ids: list[int]) -> dict[int, Evaluation]:
    if not ids:
        return {}
    found = {e.id: e for e in session.execute(select(Evaluation).where(Evaluation.id.in_(set(ids)))).scalars()}
    for source_id in ids:
        source = found.get(source_id)
        if source is None or source.reward is None:
            raise ValueError(f"evaluation {source_id} has no result to reuse")
    return found


def claim(session: Session, evaluation_id: int, worker: str, stale_after: timedelta, *,
          max_attempts: int | None = None, now: datetime | None = None) -> int | None:
    """Take an evaluation to run; returns the claim's ticket (`claims`, which only grows), or None if not ours.

    Takes it when queued, or when running but its heartbeat is older than
    `stale_after` (its worker is presumed dead). With `max_attempts`, a row
    that has used them all is left alone.

    Only while its run is `running`: once `nos stop` is asked (`stopping`) or
    the run has ended, the messages still in the broker are dropped untrained
    and their evaluations stay queued, for `nos resume` to send again. The
    run's status is read inside the same UPDATE: no window between reading it
    and taking the row.
    """
    now = now or database_now(session)
    takeable = or_(
        evaluations.c.status == "queued",
        and_(evaluations.c.status == "running", evaluations.c.heartbeat_at < now - stale_after),
    )
    condition = and_(evaluations.c.id == evaluation_id, takeable, _run_is_running())
    if max_attempts is not None:
        condition = and_(condition, evaluations.c.attempts < max_attempts)
    attempt = session.execute(
        update(evaluations).where(condition)
        .values(status="running", attempts=evaluations.c.attempts + 1, claims=evaluations.c.claims + 1,
                worker=worker, claimed_at=now, heartbeat_at=now, error=None)
        .returning(evaluations.c.claims)
    ).scalar_one_or_none()
    return attempt


def _run_is_running():
    """EXISTS: the evaluation's run is `running` (correlated with the row being updated)."""
    return select(runs.c.id).where(runs.c.id == evaluations.c.run_id, runs.c.status == "running") \
        .correlate(evaluations).exists()


def _held(evaluation_id: int, attempt: int):
    """The WHERE clause that says: this claim (`attempt`: its ticket, from `claim`) still holds the row.

    The ticket is `claims`, not `attempts`: a claim given back uncounted takes one off `attempts`,
    and the next claim must not get the same number as one whose holder may still be alive.
    """
    return and_(evaluations.c.id == evaluation_id, evaluations.c.status == "running",
                evaluations.c.claims == attempt)


def heartbeat(session: Session, evaluation_id: int, attempt: int, *, now: datetime | None = None) -> bool:
    """Say the worker holding `attempt` is alive; False means the claim is lost: stop working."""
    result = session.execute(update(evaluations).where(_held(evaluation_id, attempt))
                             .values(heartbeat_at=now or database_now(session)))
    return result.rowcount == 1


def commit_result(session: Session, evaluation_id: int, attempt: int, result: EvaluationResult, *,
                  now: datetime | None = None) -> bool:
    """Store the result and its learning-rate trials, if `attempt` still holds the claim.

    Returns False, having written nothing, when it does not (the row was
    retaken, finished, or requeued): a late or duplicate result never counts.
    """
    updated = session.execute(
        update(evaluations).where(_held(evaluation_id, attempt))
        .values(status="diverged" if result.diverged else "done", reward=result.reward,
                test_acc=result.test_acc, best_lr=result.best_lr, wall_seconds=result.wall_seconds,
                finished_at=now or database_now(session), error=None)
    )
    if updated.rowcount != 1:
        return False
    if result.trials:
        session.execute(insert(lr_trials), [
            dict(evaluation_id=evaluation_id, lr=t.lr, val_acc=t.val_acc, train_loss=t.train_loss,
                 diverged=t.diverged, wall_seconds=t.wall_seconds) for t in result.trials])
    return True


def commit_cached(session: Session, evaluation_id: int, attempt: int, source: Evaluation, *,
                  reason: str | None = None, now: datetime | None = None) -> bool:
    """Finish the evaluation with a copy of `source`'s result (status 'cached'), if `attempt` holds it.

    For a rule already scored under the same task key, or one that behaves
    the same (`reason` says so): its reward is reused, not trained for
    again, and the copy links to the original.
    """
    updated = session.execute(
        update(evaluations).where(_held(evaluation_id, attempt))
        .values(status="cached", cached_from=source.id, reward=source.reward, test_acc=source.test_acc,
                best_lr=source.best_lr, wall_seconds=0.0, finished_at=now or database_now(session), error=None,
                reason=reason)
    )
    return updated.rowcount == 1


def note_refusal(session: Session, evaluation_id: int, note: str) -> bool:
    """Say on a still-queued evaluation why a worker refused it (`nos status` shows it; its claim clears it)."""
    noted = session.execute(update(evaluations).where(evaluations.c.id == evaluation_id,
                                                      evaluations.c.status == "queued")
                            .values(error=mask_credentials(note)[:2000]))
    return noted.rowcount == 1


def fail(session: Session, evaluation_id: int, attempt: int, error: str, *, now: datetime | None = None) -> bool:
    """Mark the evaluation failed with `error`, if `attempt` still holds the claim."""
    finished_at = now or database_now(session)
    result = session.execute(update(evaluations).where(_held(evaluation_id, attempt))
                             .values(status="failed", error=mask_credentials(error), finished_at=finished_at))
    return result.rowcount == 1


def requeue_stale(session: Session, run_id: int, stale_after: timedelta, max_attempts: int, *,
                  now: datetime | None = None) -> StaleSweep:
    """Put a run's stale running evaluations back in the queue, or fail those out of attempts.

    For the driver after a worker died or the broker lost messages: it
    re-dispatches the requeued ids. The dead worker's attempt can no longer
    heartbeat or commit.
    """
    now = now or database_now(session)
    stale = and_(evaluations.c.run_id == run_id, evaluations.c.status == "running",
                 evaluations.c.heartbeat_at < now - stale_after)
    abandoned = session.execute(
        update(evaluations).where(stale, evaluations.c.attempts >= max_attempts)
        .values(status="failed", finished_at=now,
                error=f"gave up after {max_attempts} attempts: the worker's heartbeat went stale")
        .returning(evaluations.c.id)
    ).scalars().all()
    requeued = session.execute(
        update(evaluations).where(stale).values(status="queued", worker=None).returning(evaluations.c.id)
    ).scalars().all()
    return StaleSweep(requeued=sorted(requeued), abandoned=sorted(abandoned))


def release_claims(session: Session, run_id: int, workers: Sequence[str], *, refund: bool = False,
                   max_attempts: int | None = None, now: datetime | None = None) -> list[int]:
    """Put back in the queue the run's evaluations that these workers hold; returns their ids.

    For workers known to be gone: a local worker process that died, or all of
    them when the driver stops cleanly. With `refund` the attempt is not
    counted against max_attempts (a clean stop is no failure of the rule's);
    without, one that has used `max_attempts` is failed, not queued (no worker
    would take it again).
    """
    if not workers:
        return []
    held = and_(evaluations.c.run_id == run_id, evaluations.c.status == "running",
                evaluations.c.worker.in_(list(workers)))
    values = dict(status="queued", worker=None)
    if refund:
        values["attempts"] = evaluations.c.attempts - 1
    elif max_attempts is not None:
        session.execute(
            update(evaluations).where(held, evaluations.c.attempts >= max_attempts)
            .values(status="failed", finished_at=now or database_now(session),
                    error=f"gave up after {max_attempts} attempts: its worker died each time")
        )
    return sorted(session.execute(update(evaluations).where(held).values(**values)
                                  .returning(evaluations.c.id)).scalars().all())


def rekey_queued(session: Session, run_id: int, task_key: str) -> int:
    """Give the run's still-queued evaluations `task_key`, the key its driver's task has now; how many changed.

    A run resumed after its task changed (its code, data or nos's protocol) proposes new evaluations under
    the new key; ones queued under the old key were failed by every worker ("this worker's task differs
    from the driver's") and used up the budget. None of them was trained: they are trained as the new task.
    """
    changed = session.execute(update(evaluations).where(
        evaluations.c.run_id == run_id, evaluations.c.status == "queued", evaluations.c.task_key != task_key)
        .values(task_key=task_key))
    return changed.rowcount


def release_the_departed(session: Session, run_id: int) -> list[int]:
    """Put back in the queue, uncounted, the run's claims held by processes of this host that have exited.

    For a driver taking a run over: its local workers died with the driver
    before it (they do not outlive the process that started them), so their
    claims were lost to that driver, not to the rules they were training,
    which is what `max_attempts` counts. (A worker that dies on its own
    while its driver lives is released by that driver, counted.) They are
    queued at once, not after the stale-claim sweep. Returns their ids.
    """
    holders = session.execute(
        select(evaluations.c.worker).distinct()
        .where(evaluations.c.run_id == run_id, evaluations.c.status == "running", evaluations.c.worker.isnot(None))
    ).scalars().all()
    return release_claims(session, run_id, [w for w in holders if gone_from_this_host(w)], refund=True)


def get_evaluation(session: Session, evaluation_id: int) -> Evaluation | None:
    return session.get(Evaluation, evaluation_id)


def batch_evaluations(session: Session, run_id: int, batch: int) -> list[Evaluation]:
    """A batch's evaluations in seq order: the driver reads rewards from here."""
    return list(session.execute(
        select(Evaluation).where(Evaluation.run_id == run_id, Evaluation.batch == batch).order_by(Evaluation.seq)
    ).scalars())


def refusals(session: Session, run_id: int) -> tuple[int, str | None]:
    """How many of the run's queued evaluations a worker refused (`note_refusal`), and the last note's last line."""
    count, last = session.execute(
        select(func.count(), func.max(Evaluation.id)).where(
            Evaluation.run_id == run_id, Evaluation.status == "queued", Evaluation.error.is_not(None))).one()
    if not count:
        return 0, None
    return count, session.get(Evaluation, last).error.strip().splitlines()[-1][:300]


def unfinished_ids(session: Session, run_id: int) -> list[int]:
    """Ids of a run's evaluations still queued or running: what a resume re-dispatches."""
    return list(session.execute(
        select(Evaluation.id).where(Evaluation.run_id == run_id, Evaluation.status.in_(PENDING_STATUSES))
        .order_by(Evaluation.id)
    ).scalars())


def find_cached(session: Session, rule_id: int, task_key: str) -> Evaluation | None:
    """An earlier scored evaluation of this rule under the same task configuration (the first one)."""
    return session.execute(
        select(Evaluation).where(Evaluation.rule_id == rule_id, Evaluation.task_key == task_key,
                                 Evaluation.status.in_(TRAINED_STATUSES))
        .order_by(Evaluation.id).limit(1)
    ).scalar_one_or_none()


def find_equivalent(session: Session, fingerprint: str | None, task_key: str) -> Evaluation | None:
    """An earlier trained evaluation, under the same task configuration, of any rule with this fingerprint."""
    if fingerprint is None:
        return None
    return session.execute(
        select(Evaluation).join(Rule, Rule.id == Evaluation.rule_id)
        .where(Rule.fingerprint == fingerprint, Evaluation.task_key == task_key,
               Evaluation.status.in_(TRAINED_STATUSES))
        .order_by(Evaluation.id).limit(1)
    ).scalar_one_or_none()


def equivalence_reason(session: Session, source: Evaluation) -> str:
    """The `reason` stored on a copy of an equivalent rule's result."""
    text = session.get(Rule, source.rule_id).text
    return f"behaves as {text} (evaluation {source.id}): same fingerprint"


def trials_of(session: Session, evaluation_id: int) -> list[LrTrial]:
    """An evaluation's learning-rate trials, by learning rate."""
    return list(session.execute(
        select(LrTrial).where(LrTrial.evaluation_id == evaluation_id).order_by(LrTrial.lr)
    ).scalars())


__all__ = [
    "NewEvaluation", "StaleSweep", "batch_evaluations", "claim",
    "commit_cached", "commit_result", "enqueue_batch", "equivalence_reason", "fail", "find_cached", "find_equivalent",
    "get_evaluation", "heartbeat",
    "note_refusal", "refusals", "rekey_queued", "release_claims", "requeue_stale", "trials_of", "unfinished_ids",
]
