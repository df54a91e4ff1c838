"""Evaluate one evaluation id: the one function every worker runs, local process or Celery.

1. claim it (one conditional UPDATE); if the claim fails, someone else has it;
   a worker that cannot use the run's device refuses it first, leaving it queued;
2. train, heartbeating from a side thread; a lost claim stops the training;
3. commit the result only if this attempt still holds the claim.

Tasks (their data) are built once per process and reused across evaluations.
"""

from __future__ import annotations

import os
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from .beat import Beat
from .config import SearchConfig
from .devices import device_problem
from .records import EvaluationResult
from .store import Store, claim, commit_result, fail, find_cached, get_evaluation, get_run, heartbeat
from .store.evaluations import commit_cached, equivalence_reason, find_equivalent
from .store.models import Rule
from .tasks import Task, evaluate_rule, get_task

_TASKS: dict[str, Task] = {}


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


class ClaimLost(Exception):
    """Another attempt took the evaluation (this worker's heartbeat was too late)."""


class Outcome(StrEnum):
    """What `run_evaluation` did; the values are what workers log and Celery's task returns."""

    DONE = "done"           # trained; the result is committed
    DIVERGED = "diverged"   # trained to divergence; the result is committed
    CACHED = "cached"       # already scored under the same task key: its result is copied, nothing trained
    FAILED = "failed"       # the evaluation raised; the error is stored
    SKIPPED = "skipped"     # not ours to take (gone, finished, or claimed by another worker)
    REFUSED = "refused"     # this machine lacks the run's device (`device_problem`): left queued for one that has it
    LOST = "lost"           # our claim was taken over while training; nothing written


@dataclass(frozen=True)
class Claim:
    """An evaluation this worker holds: what it needs to train it, and the attempt that commits."""

    evaluation_id: int
    attempt: int
    config: SearchConfig
    rule_text: str
    task_key: str


def run_evaluation(store: Store, evaluation_id: int, *, worker: str | None = None,
                   device: str | None = None) -> Outcome:
    """Claim, train and commit one evaluation; returns what happened (see `Outcome`)."""
    with store.transaction() as session:
        claimed = _claim_or_answer(session, evaluation_id, worker or worker_name(), device)
    if isinstance(claimed, Outcome):
        return claimed
    try:
        result = _train(store, claimed, device)
    except ClaimLost:
        return Outcome.LOST
    except Exception as exc:  # the evaluation's error is stored; the worker lives on
        with store.transaction() as session:
            fail(session, evaluation_id, claimed.attempt, _short_traceback(exc))
        return Outcome.FAILED
    with store.transaction() as session:
        committed = commit_result(session, evaluation_id, claimed.attempt, result)
    if not committed:
        return Outcome.LOST
    return Outcome.DIVERGED if result.diverged else Outcome.DONE


def _claim_or_answer(session: Session, evaluation_id: int, worker: str, device: str | None) -> Claim | Outcome:
    """Claim the evaluation, or say why not; one already answered by a stored result is committed as cached."""
    evaluation = get_evaluation(session, evaluation_id)
    if evaluation is None:
        return Outcome.SKIPPED
    config = SearchConfig.from_dict(get_run(session, evaluation.run_id).config)
    if device_problem(device or config.device):
        return Outcome.REFUSED
    rule = session.get(Rule, evaluation.rule_id)
    attempt = claim(session, evaluation_id, worker, timedelta(seconds=config.stale_after),
                    max_attempts=config.max_attempts)
    if attempt is None:
        return Outcome.SKIPPED
    # The rule, or one that behaves the same, may have been scored since this was queued.
    source, reason = find_cached(session, evaluation.rule_id, evaluation.task_key), None
    if source is None and config.probe:
        source = find_equivalent(session, rule.fingerprint, evaluation.task_key)
        reason = equivalence_reason(session, source) if source is not None else None
    if source is not None and commit_cached(session, evaluation_id, attempt, source, reason=reason):
        return Outcome.CACHED
    return Claim(evaluation_id, attempt, config, rule.text, evaluation.task_key)


def _train(store: Store, claimed: Claim, device: str | None) -> EvaluationResult:
    """Train the claimed evaluation, heartbeating from a side thread; ClaimLost once the claim is taken over."""
    evaluation_id, attempt, config = claimed.evaluation_id, claimed.attempt, claimed.config
    beat = Beat(store, lambda session: heartbeat(session, evaluation_id, attempt), config.heartbeat_every,
                f"heartbeat-{evaluation_id}")
    beat.start()
    try:
        task = task_for(config, device)
        if task_key(task, config.children_seed) != claimed.task_key:
            raise RuntimeError(f"this worker's {config.task} task differs from the driver's "
                               f"(key {task_key(task, config.children_seed)} != {claimed.task_key}): "
                               "check its data and options")

        def check_claim(*_: Any) -> None:
            if beat.lost:
                raise ClaimLost()

        return evaluate_rule(claimed.rule_text, task, seed=config.children_seed, on_trial=check_claim)
    finally:
        beat.stopped.set()
        beat.join()


def _short_traceback(exc: BaseException, limit: int = 2000) -> str:
    text = "".join(traceback.format_exception(exc, limit=-4))
    return text if len(text) <= limit else "..." + text[-limit:]
