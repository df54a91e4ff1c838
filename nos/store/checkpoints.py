"""Checkpoints: the searcher's state after each step, JSON and raw bytes only."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .clock import database_now
from .models import Checkpoint


def save_checkpoint(session: Session, run_id: int, step: int, state: dict[str, Any], rng_state: dict[str, Any],
                    blob: bytes | None = None, *, now: datetime | None = None) -> int:
    """Store the state after `step`; a second save of the same step fails (IntegrityError).

    `blob` is the searcher's state as `nos.search.state_to_bytes` writes it (nos.tensor_state: JSON and
    raw tensor bytes, never a pickle); this module stores and returns it as bytes without reading it.

    With a blob, the run's earlier checkpoints lose theirs, in the same transaction: a resume reads
    the latest blob only (and every checkpoint's JSON), and a PPO searcher's state is some 370 kB a
    step, which grew a 10,000-evaluation run's database by most of a gigabyte.
    """
    checkpoint = Checkpoint(run_id=run_id, step=step, state=state, rng_state=rng_state, blob=blob,
                            created_at=now or database_now(session))
    session.add(checkpoint)
    session.flush()
    if blob is not None:
        session.execute(update(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.step < step,
                                                 Checkpoint.blob.is_not(None)).values(blob=None))
    return checkpoint.id


def latest_checkpoint(session: Session, run_id: int) -> Checkpoint | None:
    """The checkpoint with the highest step of a run, or None before the first."""
    return session.execute(
        select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.step.desc()).limit(1)
    ).scalar_one_or_none()


def checkpoint_states(session: Session, run_id: int) -> list[dict[str, Any]]:
    """Every checkpoint's JSON state of a run, by step (the blobs are not read)."""
    return list(session.execute(
        select(Checkpoint.state).where(Checkpoint.run_id == run_id).order_by(Checkpoint.step)
    ).scalars())
