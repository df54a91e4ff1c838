"""Reading a run's latest checkpoint back into its searcher, or saying clearly why it cannot be.

A checkpoint's blob is read by nos.tensor_state (JSON and raw tensor bytes;
nothing is unpickled, see docs/security.md). A damaged blob, a state of
another searcher, a `state` without its tokens (synchronous driver) or without
its batch and updates (asynchronous driver) is a CheckpointUnreadable with one
line, raised before anything about the run is changed. So is a blob written by
an earlier nos with torch.save: reading it would mean unpickling it, so such a
run cannot be resumed by this version (its stored results stay).
"""

from __future__ import annotations

from typing import Any

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
    """CheckpointUnreadable unless the run's latest checkpoint (if any) loads into a fresh searcher."""
    with store.reading() as session:
        checkpoint = latest_checkpoint(session, run_id)
        if checkpoint is not None:
            restore_searcher(make_searcher(config.searcher, config.depth, config.seed, **config.hyperparameters),
                             checkpoint, config.synchronous)


__all__ = ["CheckpointUnreadable", "check_resumable", "restore_searcher"]
