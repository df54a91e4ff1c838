"""Evaluate one evaluation id: the one function every worker runs, local process or Celery.

1. claim it (one conditional UPDATE); if the claim fails, someone else has it;
   a worker that cannot use the run's device, or build its task, refuses it first, leaving it queued;
   a worker with a pack of K also claims, in the same transaction, up to K - 1
   more queued evaluations of the same run and task key (its pack);
2. train them together (nos.tasks.packed), heartbeating every claim from one side
   thread; an evaluation whose claim is lost leaves the pack, the others train on;
3. commit each result only if its own attempt still holds its claim.

A worker killed mid-pack leaves K claims whose heartbeats stop: each is retaken
like any stale claim.

Tasks (their data) are built once per process and reused across evaluations.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import String, case, cast, func, literal, or_, select
from sqlalchemy.orm import Session

from .beat import Beat
from .config import SearchConfig
from .devices import device_problem
from .records import EvaluationResult
from .store import Store, claim, commit_result, database_now, fail, find_cached, get_evaluation, get_run, heartbeat
from .store.engine import first_line, shown
from .store.evaluations import commit_cached, equivalence_reason, find_equivalent, note_refusal
from .store.models import Evaluation, Rule
from .store.outages import retrying
from .tasks import Task, get_task
from .tasks.packed import evaluate_rules

_TASKS: dict[str, Task] = {}
_LOG = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def task_for(config: SearchConfig, device: str | None = None) -> Task:
    """The run's task on `device` (default: the run's), built once per process."""
    device = device or config.device
    key = repr((config.task, sorted(config.task_options.items()), device))
    if key not in _TASKS:
        _TASKS[key] = get_task(config.task, device=device, **config.task_options)
    return _TASKS[key]


def task_key(task: Task, seed: int) -> str:
    """What makes two evaluations of one rule interchangeable: the task's configuration and the seed."""
    return f"{task.config_key()}-s{seed}"


def unfingerprinted_key(task: Task, seed: int) -> str:
    """The key a nos before the fingerprint of data read from files (option `data`) gave `task`."""
    from .tasks.registry import FILE_TASKS

    if task.name not in FILE_TASKS or "data" not in task.options:   # a task of your own may take a `data` option
        return task_key(task, seed)
    bare = dataclasses.replace(task, options={k: v for k, v in task.options.items() if k != "data"})
    return task_key(bare, seed)


class ClaimLost(Exception):
    """Another attempt took the evaluation (this worker's heartbeat was too late)."""


class Outcome(StrEnum):
    """What `run_evaluation` did; the values are what workers log and Celery's task returns."""

    DONE = "done"           # trained; the result is committed
    DIVERGED = "diverged"   # trained to divergence; the result is committed
    CACHED = "cached"       # already scored under the same task key: its result is copied, nothing trained
    FAILED = "failed"       # the evaluation raised; the error is stored
    SKIPPED = "skipped"     # not ours to take (gone, finished, claimed by another worker, or its run not running)
    REFUSED = "refused"     # this machine lacks the run's device or its task (data): left queued for one that has it
    LOST = "lost"           # our claim was taken over while training; nothing written


@dataclass(frozen=True)
class Claim:
    """An evaluation this worker holds: what it needs to train it, and the attempt that commits."""

    evaluation_id: int
    attempt: int
    config: SearchConfig
    rule_text: str
    task_key: str
    run_id: int


def run_evaluation(store: Store, evaluation_id: int, *, worker: str | None = None,
                   device: str | None = None, pack: int | None = 1) -> Outcome:
    """Claim, train and commit one evaluation (and up to `pack - 1` companions); what happened to it.

    `pack` None: the run's (its config's `pack_size`, or the default for `device` where one is given).
    """
    return run_pack(store, evaluation_id, worker=worker, device=device, pack=pack)[evaluation_id]


def run_pack(store: Store, evaluation_id: int, *, worker: str | None = None, device: str | None = None,
             pack: int | None = 1) -> dict[int, Outcome]:
    """Claim `evaluation_id` and up to `pack - 1` queued companions, train them together, commit each.

    Returns each evaluation's outcome, by id; `evaluation_id` is always among them.
    """
    worker = worker or worker_name()
    problem = _task_problem_of(store, evaluation_id, device)
    if problem:   # this worker's, not the rule's: another worker may have the data
        _LOG.warning("evaluation %s refused, left queued: %s", evaluation_id, problem)
        _note_refusal(store, evaluation_id, worker, problem)
        return {evaluation_id: Outcome.REFUSED}
    with store.transaction() as session:
        now = database_now(session)   # one claim time marks a pack (`nos status`); after the slow task build
        first = _claim_or_answer(session, evaluation_id, worker, device, now)
        if isinstance(first, Outcome):
            return {evaluation_id: first}
        outcomes: dict[int, Outcome] = {}
        claims = [first]
        if pack is None:   # the run's pack, else the default for the device this worker trains on
            pack = first.config.pack_on(device or first.config.device)
        for companion in _companions(session, first, pack - 1):
            taken = _claim_or_answer(session, companion, worker, device, now)
            if isinstance(taken, Claim):
                claims.append(taken)
            elif taken is Outcome.CACHED:
                outcomes[companion] = taken
    return outcomes | _settle(store, claims, device)


def _settle(store: Store, claims: list[Claim], device: str | None) -> dict[int, Outcome]:
    """Train the claimed evaluations together and commit each; what happened to each."""
    try:
        results = _train(store, claims, device)
    except ClaimLost:
        return {c.evaluation_id: Outcome.LOST for c in claims}
    except Exception as exc:  # the evaluation's error is stored; the worker lives on
        failure = _short_traceback(exc)
    else:
        return {c.evaluation_id: _commit(store, c, result) for c, result in zip(claims, results)}
    # Out of the except clause: the traceback, and with it the pack's tensors (GPU memory), is gone.
    if len(claims) > 1:   # one rule's error (or a pack too big for the GPU) must not fail the others
        return _settle_each(store, claims, device)
    with store.transaction() as session:
        fail(session, claims[0].evaluation_id, claims[0].attempt, failure)
    return {claims[0].evaluation_id: Outcome.FAILED}


def _settle_each(store: Store, claims: list[Claim], device: str | None) -> dict[int, Outcome]:
    """Each claim trained and committed alone, in turn; the claims waiting their turn are heartbeated meanwhile."""
    waiting = list(claims)

    def renew(session: Session) -> bool:
        for c in list(waiting):
            heartbeat(session, c.evaluation_id, c.attempt)   # a lost one finds out when its turn comes
        return True

    beat = Beat(store, renew, claims[0].config.heartbeat_every, f"heartbeat-waiting-{claims[0].evaluation_id}")
    beat.start()
    outcomes: dict[int, Outcome] = {}
    try:
        for c in claims:
            waiting.remove(c)   # its own training heartbeats it now
            outcomes |= _settle(store, [c], device)
    finally:
        beat.stopped.set()
        beat.join()
    return outcomes


def _companions(session: Session, first: Claim, n: int) -> list[int]:
    """Up to `n` queued evaluations to pack with `first`, free to take now, none of them on its last attempt.

    Where the database locks rows (PostgreSQL), rows another worker is claiming are skipped, not
    waited for: two workers packing at once would otherwise each wait for a row the other holds.
    An evaluation's last attempt trains alone: a worker that dies charges every rule of its pack,
    and a rule that kills its worker must not use up its companions' attempts as well as its own.
    """
    last = first.config.max_attempts
    if n <= 0:
        return []
    alike = [Evaluation.run_id == first.run_id, Evaluation.task_key == first.task_key,
             Evaluation.status == "queued", Evaluation.id != first.evaluation_id]
    if last > 1:   # with one attempt in all, every attempt is the last: packing goes on
        if session.execute(select(Evaluation.attempts).where(Evaluation.id == first.evaluation_id)).scalar() >= last:
            return []
        alike.append(Evaluation.attempts < last - 1)   # its next claim would not be its last
    # One of each rule (or behaviour), none that one training now repeats: the driver holds a repeat back
    # until its first is scored, and then it is answered from the cache, not trained again.
    key = _repeat_key(first.config.probe)
    training = (select(key).select_from(Evaluation).join(Rule, Rule.id == Evaluation.rule_id)
                .where(Evaluation.run_id == first.run_id,
                       or_(Evaluation.status == "running", Evaluation.id == first.evaluation_id)))
    picks = list(session.execute(
        select(func.min(Evaluation.id)).join(Rule, Rule.id == Evaluation.rule_id)
        .where(*alike, key.not_in(training)).group_by(key).order_by(func.min(Evaluation.id)).limit(n)).scalars())
    if not picks:
        return []
    return list(session.execute(select(Evaluation.id).where(Evaluation.id.in_(picks), Evaluation.status == "queued")
                                .order_by(Evaluation.id).with_for_update(skip_locked=True)).scalars())


def _repeat_key(probe: bool):
    """What makes two evaluations of a run repeats, as the driver tells them: the rule's fingerprint where the
    probe took one, else the rule itself."""
    rule = literal("rule ") + cast(Evaluation.rule_id, String)
    return case((Rule.fingerprint.is_not(None), Rule.fingerprint), else_=rule) if probe else rule


def _commit(store: Store, claimed: Claim, result: EvaluationResult | None) -> Outcome:
    """Store the result, waiting for a database that is briefly away: the training cost minutes. Safe
    to repeat: a commit whose answer was lost finds the claim settled and stores nothing twice."""
    if result is None:   # left the pack when its claim was lost
        return Outcome.LOST

    def write() -> bool:
        with store.transaction() as session:
            return commit_result(session, claimed.evaluation_id, claimed.attempt, result)

    committed = retrying(store, write, what=f"the result of evaluation {claimed.evaluation_id}")
    if not committed and not _stored_by(store, claimed):
        return Outcome.LOST
    return Outcome.DIVERGED if result.diverged else Outcome.DONE


def _stored_by(store: Store, claimed: Claim) -> bool:
    """Whether this claim's own result is the one stored: a commit repeated because its answer was lost
    finds the row settled, by itself, not by another worker."""
    def read() -> bool:
        with store.reading() as session:
            row = session.execute(select(Evaluation.status, Evaluation.claims)
                                  .where(Evaluation.id == claimed.evaluation_id)).one_or_none()
            return row is not None and row.status in ("done", "diverged") and row.claims == claimed.attempt

    return retrying(store, read, what=f"evaluation {claimed.evaluation_id}")


def _claim_or_answer(session: Session, evaluation_id: int, worker: str, device: str | None,
                     now: datetime) -> Claim | Outcome:
    """Claim the evaluation, or say why not; one already answered by a stored result is committed as cached."""
    evaluation = get_evaluation(session, evaluation_id)
    if evaluation is None:
        # Sent by a driver on another database (or its run deleted): said, or the worker skips all it is sent.
        _LOG.warning("evaluation %s is not in this worker's database %s: skipped (a worker must use the database "
                     "of the run's driver)", evaluation_id, shown(session.get_bind().url))
        return Outcome.SKIPPED
    config = SearchConfig.from_dict(get_run(session, evaluation.run_id).config)
    problem = device_problem(device or config.device)
    if problem:
        note_refusal(session, evaluation_id, f"refused by {worker}: {problem}")
        return Outcome.REFUSED
    rule = session.get(Rule, evaluation.rule_id)
    attempt = claim(session, evaluation_id, worker, timedelta(seconds=config.stale_after),
                    max_attempts=config.max_attempts, now=now)
    if attempt is None:
        return Outcome.SKIPPED
    # The rule, or one that behaves the same, may have been scored since this was queued.
    source, reason = find_cached(session, evaluation.rule_id, evaluation.task_key), None
    if source is None and config.probe:
        source = find_equivalent(session, rule.fingerprint, evaluation.task_key)
        reason = equivalence_reason(session, source) if source is not None else None
    if source is not None and commit_cached(session, evaluation_id, attempt, source, reason=reason):
        return Outcome.CACHED
    return Claim(evaluation_id, attempt, config, rule.text, evaluation.task_key, evaluation.run_id)


def _note_refusal(store: Store, evaluation_id: int, worker: str, problem: str) -> None:
    """Leave the refusal's reason on the queued evaluation, where `nos status` shows it; a database that
    does not answer just now loses the note, not the evaluation."""
    try:
        with store.transaction() as session:
            note_refusal(session, evaluation_id, f"refused by {worker}: {problem}")
    except Exception:
        _LOG.warning("could not note the refusal of evaluation %s", evaluation_id)


def refusal_reason(store: Store, evaluation_id: int, device: str | None) -> str:
    """Why this worker refused the evaluation, in one line: the run's device or its task is not here."""
    with store.reading() as session:
        evaluation = get_evaluation(session, evaluation_id)
        config = None if evaluation is None else SearchConfig.from_dict(get_run(session, evaluation.run_id).config)
    if config is None:
        return "its evaluation is gone"
    return (device_problem(device or config.device) or _task_problem_of(store, evaluation_id, device)
            or "it could not take the evaluation")


def _task_problem_of(store: Store, evaluation_id: int, device: str | None) -> str | None:
    """Why this worker cannot build the task of the evaluation's run (its data missing here, say), or None.

    Before any claim, outside any transaction: the first build of a run's task (its data loaded) takes
    seconds. Built once per process (`task_for`); the pack's companions share it. A task that builds
    but differs from the driver's (another nos, other data) fails the evaluation in `_train` instead:
    no worker of that version would ever train it.
    """
    with store.reading() as session:
        evaluation = get_evaluation(session, evaluation_id)
        if evaluation is None:
            return None   # the claim answers it
        config = SearchConfig.from_dict(get_run(session, evaluation.run_id).config)
    if device_problem(device or config.device):
        return None   # refused for its device, as the claim says
    try:
        task_for(config, device)
    except Exception as exc:
        return f"its {config.task} task cannot be built here: {first_line(exc)}"
    return None


def _train(store: Store, claims: list[Claim], device: str | None) -> list[EvaluationResult | None]:
    """Train the claimed evaluations together, heartbeating all their claims from one side thread.

    An evaluation whose claim is taken over leaves the pack (its result is None);
    ClaimLost once every claim is.
    """
    config = claims[0].config
    lost: set[int] = set()

    def renew(session: Session) -> bool:
        for c in claims:
            if c.evaluation_id not in lost and not heartbeat(session, c.evaluation_id, c.attempt):
                lost.add(c.evaluation_id)
        return len(lost) < len(claims)

    beat = Beat(store, renew, config.heartbeat_every, f"heartbeat-{claims[0].evaluation_id}")
    beat.start()
    try:
        task = task_for(config, device)
        if task_key(task, config.children_seed) != claims[0].task_key:
            raise RuntimeError(f"this worker's {config.task} task differs from the driver's "
                               f"(key {task_key(task, config.children_seed)} != {claims[0].task_key}): "
                               "check its data and options")

        def check_claims(*_: Any) -> None:
            if beat.lost:
                raise ClaimLost()

        def wanted(i: int) -> bool:
            return claims[i].evaluation_id not in lost

        results = evaluate_rules([c.rule_text for c in claims], task, seed=config.children_seed,
                                 on_trial=check_claims, wanted=wanted)
        if beat.lost:
            raise ClaimLost()
        return results
    finally:
        beat.stopped.set()
        beat.join()


def _short_traceback(exc: BaseException, limit: int = 2000) -> str:
    text = "".join(traceback.format_exception(exc, limit=-4))
    return text if len(text) <= limit else "..." + text[-limit:]
