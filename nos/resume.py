"""Reading a run's latest checkpoint back into its searcher, or saying clearly why it cannot be.

A checkpoint's blob is read by nos.tensor_state (JSON and raw tensor bytes;
nothing is unpickled, see docs/security.md). A damaged blob, a state of
another searcher, a `state` without its tokens (synchronous driver) or without
its batch and updates (asynchronous driver), or an earlier checkpoint whose
recorded updates the asynchronous driver cannot read back, is a
CheckpointUnreadable with one line, raised before anything about the run is
changed. So is a blob written by an earlier nos with torch.save: reading it
would mean unpickling it, so such a run cannot be resumed by this version (its
stored results stay).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session

from .config import SearchConfig
from .search import Searcher, make_searcher, state_from_bytes
from .store import Store, latest_checkpoint
from .store.models import Checkpoint
from .tensor_state import PickledState


class CheckpointUnreadable(Exception):
    """The run's latest checkpoint cannot be loaded: the run cannot resume from it."""


def _rows_of_ints(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(row, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in row) for row in value)


def checked_state(state: Any, synchronous: bool) -> dict[str, Any]:
    """A checkpoint's JSON state, once it holds what the driver of that mode reads back."""
    if not isinstance(state, dict):
        raise ValueError("its state is not a table")
    if synchronous:
        if not _rows_of_ints(state.get("tokens")):
            raise ValueError("its state has no list of token rows (was the run asynchronous?)")
        return state
    batch = state.get("batch")
    if state.get("mode") != "asynchronous" or not isinstance(batch, int) or isinstance(batch, bool) \
            or not _rows_of_ints(state.get("updates")):
        raise ValueError("its state has no batch and updates of the asynchronous driver (was the run synchronous?)")
    return state


def restore_searcher(searcher: Searcher, checkpoint: Checkpoint, synchronous: bool) -> dict[str, Any]:
    """Load `checkpoint` into `searcher`; returns the checkpoint's (checked) JSON state."""
    try:
        state = checked_state(checkpoint.state, synchronous)
        if not isinstance(checkpoint.blob, bytes) or not checkpoint.blob:
            raise ValueError("its blob is empty")
        searcher.load_state_dict(state_from_bytes(checkpoint.blob))
    except PickledState:
        raise CheckpointUnreadable(
            f"run {checkpoint.run_id}: its checkpoint of step {checkpoint.step} cannot be read: it was written by "
            f"an earlier nos with torch.save, and this nos unpickles nothing it reads from the database, so the "
            f"run cannot resume from it in this version (its stored results stay; start a new run)") from None
    # A readable blob can still be another searcher's, or lack what load_state_dict looks up
    # (ValueError, KeyError, RuntimeError, TypeError, ...); each means the same thing here.
    except Exception as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointUnreadable(
            f"run {checkpoint.run_id}: its checkpoint of step {checkpoint.step} cannot be read "
            f"({type(exc).__name__}{': ' + why[:200] if why else ''}); the run cannot resume from it") from None
    return state


def check_resumable(store: Store, run_id: int, config: SearchConfig) -> None:
    """CheckpointUnreadable unless the run's checkpoints hold what its driver reads back: the latest (if any)
    loads into a fresh searcher, and for the asynchronous driver every earlier one has its list of updates."""
    with store.reading() as session:
        try:
            checkpoint = latest_checkpoint(session, run_id)
        except (TypeError, ValueError):   # its state or rng_state is not JSON (SQLite keeps any text)
            raise CheckpointUnreadable(f"run {run_id}: its latest checkpoint cannot be read (its JSON is damaged); "
                                       "the run cannot resume from it") from None
        if checkpoint is None:
            return
        restore_searcher(make_searcher(config.searcher, config.depth, config.seed, **config.hyperparameters),
                         checkpoint, config.synchronous)
        if not config.synchronous:
            _check_recorded_updates(session, run_id)


def _check_recorded_updates(session: Session, run_id: int) -> None:
    """CheckpointUnreadable unless every checkpoint's state is a table whose updates (if any) are rows of ids.

    AsynchronousLoop._restore counts the updates recorded in every checkpoint, not only the latest: a damaged
    earlier one would pass the latest's check and fail the run once resumed. The states are decoded here, from
    their text, so that one that is not JSON is named by its step.
    """
    rows = session.execute(select(Checkpoint.step, cast(Checkpoint.state, Text))
                           .where(Checkpoint.run_id == run_id).order_by(Checkpoint.step))
    for step, text in rows:
        why = _updates_problem(text)
        if why:
            raise CheckpointUnreadable(f"run {run_id}: its checkpoint of step {step} cannot be read ({why}); "
                                       "the run cannot resume from it")


def _updates_problem(text: str | None) -> str | None:
    """What keeps a checkpoint's stored state (JSON text) from giving AsynchronousLoop._restore its updates."""
    try:
        state = json.loads(text)
    except (TypeError, ValueError):
        return "its state is not JSON"
    if not isinstance(state, dict):
        return "its state is not a table"
    if not _rows_of_ints(state.get("updates", [])):   # none at all reads as none recorded, as _restore takes it
        return "its updates are not rows of evaluation ids"
    return None


__all__ = ["CheckpointUnreadable", "check_resumable", "restore_searcher"]
