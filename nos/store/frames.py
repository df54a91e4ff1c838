"""A run's evaluations and learning-rate trials as pandas DataFrames, for notebooks.

    import nos.store
    df = nos.store.evaluations_frame("sqlite:///nos.db", run_id=1)
    df.groupby("batch").reward.mean()
    trials = nos.store.trials_frame("sqlite:///nos.db", run_id=1)

pandas is an optional extra (`pip install pandas`), imported only when
one of these functions is called.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL

from .engine import Store
from .history import EvaluationRow, TrialRow, run_evaluations, run_trials
from .models import Run

if TYPE_CHECKING:
    import pandas

PANDAS_MISSING = "nos's data frames need pandas, which is not installed: pip install pandas"

EVALUATION_COLUMNS = [f.name for f in fields(EvaluationRow)]
TRIAL_COLUMNS = [f.name for f in fields(TrialRow)]
_TIMES = ("created_at", "claimed_at", "finished_at")
_NULLABLE_INTS = ("depth", "cached_from")


def _pandas():
    try:
        import pandas
    except ImportError as exc:
        raise ImportError(PANDAS_MISSING) from exc
    return pandas


@contextmanager
def _session(store_or_url: Store | str | URL | None):
    if isinstance(store_or_url, Store):
        with store_or_url.reading() as session:
            yield session
        return
    from .schema import open_store

    store = open_store(store_or_url)
    try:
        with store.reading() as session:
            yield session
    finally:
        store.dispose()


def _check_run(session, run_id: int | None) -> None:
    if run_id is not None and session.get(Run, run_id) is None:
        raise LookupError(f"no run {run_id} in this database")


def evaluations_frame(store_or_url: Store | str | URL | None = None, run_id: int | None = None) -> pandas.DataFrame:
    """One row per evaluation of run `run_id` (of every run if None), in seq order.

    `store_or_url`: an open `Store`, a database URL, or None for $NOS_DB_URL /
    sqlite:///nos.db. Columns: id, run_id, seq, batch, rule_id, rule, depth,
    task, status, attempts, worker, reward, test_acc, best_lr, wall_seconds,
    cached_from, error, reason, created_at, claimed_at, finished_at. Missing numbers
    are NaN (depth and cached_from are nullable integers), times are UTC
    datetimes. Raises ImportError without pandas, LookupError for an unknown run.
    """
    pd = _pandas()
    with _session(store_or_url) as session:
        _check_run(session, run_id)
        rows = run_evaluations(session, run_id)
    frame = _frame(pd, rows, EVALUATION_COLUMNS)
    for column in _TIMES:
        frame[column] = pd.to_datetime(frame[column], utc=True)
    for column in _NULLABLE_INTS:
        frame[column] = frame[column].astype("Int64")
    for column in ("reward", "test_acc", "best_lr", "wall_seconds"):
        frame[column] = frame[column].astype("float64")
    return frame


def trials_frame(store_or_url: Store | str | URL | None = None, run_id: int | None = None) -> pandas.DataFrame:
    """One row per learning rate tried by run `run_id`'s evaluations (every run's if None).

    Columns: evaluation_id, run_id, seq, rule_id, rule, task, lr, val_acc,
    train_loss, diverged, wall_seconds. Cached evaluations trained nothing,
    so they have no rows (their `cached_from` evaluation has them).
    """
    pd = _pandas()
    with _session(store_or_url) as session:
        _check_run(session, run_id)
        rows = run_trials(session, run_id)
    frame = _frame(pd, rows, TRIAL_COLUMNS)
    for column in ("lr", "val_acc", "train_loss", "wall_seconds"):
        frame[column] = frame[column].astype("float64")
    frame["diverged"] = frame["diverged"].astype(bool)
    return frame


def _frame(pd: Any, rows: list, columns: list[str]) -> pandas.DataFrame:
    return pd.DataFrame.from_records([tuple(getattr(r, c) for c in columns) for r in rows], columns=columns)


__all__ = ["PANDAS_MISSING", "evaluations_frame", "trials_frame"]
