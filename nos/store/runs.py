"""Runs: create one, move it through its statuses, read it back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from ..redact import mask_credentials
from .clock import database_now
from .models import RUN_STATUSES, Run

# A run in one of these is over: it gets a finished_at time.
FINISHED_RUN_STATUSES = ("stopped", "completed", "failed")


def create_run(session: Session, name: str, task: str, config: dict[str, Any], *,
               now: datetime | None = None) -> int:
    """Insert a run in status 'running'; returns its id."""
    now = now or database_now(session)
    run = Run(name=name, status="running", task=task, config=config, created_at=now, updated_at=now)
    session.add(run)
    session.flush()
    return run.id


def set_run_status(session: Session, run_id: int, status: str, *, error: str | None = None,
                   now: datetime | None = None) -> None:
    """Move a run to `status`; finishing statuses stamp finished_at, 'running' clears it (resume)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"unknown run status {status!r}; expected one of {', '.join(RUN_STATUSES)}")
    now = now or database_now(session)
    finished_at = now if status in FINISHED_RUN_STATUSES else None
    result = session.execute(
        update(Run).where(Run.id == run_id)
        .values(status=status, error=None if error is None else mask_credentials(error), updated_at=now,
                finished_at=finished_at)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        raise LookupError(f"no run {run_id}")


def get_run(session: Session, run_id: int) -> Run | None:
    return session.get(Run, run_id)
