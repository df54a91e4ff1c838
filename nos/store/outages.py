"""Riding out a database that is briefly away: a restarted or failed-over PostgreSQL, a dropped
connection, a SQLite file whose write lock another process held past the busy timeout.

    retrying(store, lambda: write(...), patience=300.0)   # tried again once the database answers

Only errors of the database's operation count (SQLAlchemy's OperationalError, or any error that
invalidated its connection); a wrong query or a broken constraint fails at once, as before.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TypeVar

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from .engine import Store, first_line

T = TypeVar("T")

# How long a driver, or a worker with a result to commit, waits for its database to come back
# before it gives up as it would have at once before: a restart or failover takes seconds to minutes.
PATIENCE_SECONDS = 300.0
_FIRST_PAUSE, _LONGEST_PAUSE = 0.5, 10.0


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says the database was unreachable or busy, not that the statement was wrong."""
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def answers(store: Store) -> bool:
    """Whether the database answers a query now."""
    try:
        with store.reading() as session:
            session.execute(text("SELECT 1"))
    except DBAPIError:
        return False
    return True


def wait_for(store: Store, deadline: float, stop: Callable[[], bool] = lambda: False) -> bool:
    """Poll until the database answers (True), the monotonic `deadline` passes or `stop()` (False)."""
    pause, waited = _FIRST_PAUSE, False
    while not answers(store):
        if stop() or time.monotonic() + pause > deadline:
            return False
        time.sleep(pause)
        pause, waited = min(2 * pause, _LONGEST_PAUSE), True
    if waited:
        print("nos: the database answers again", file=sys.stderr, flush=True)
    return True


def say_away(exc: BaseException, what: str, patience: float) -> None:
    """One line on stderr: the database is away, and how long `what` will wait for it."""
    print(f"nos: the database is unreachable or busy ({first_line(exc)}); {what} waits up to {patience:.0f} s "
          "for it", file=sys.stderr, flush=True)


def retrying(store: Store, work: Callable[[], T], *, patience: float = PATIENCE_SECONDS, what: str = "nos",
             stop: Callable[[], bool] = lambda: False) -> T:
    """`work()`, done again each time it fails for a transient reason and the database comes back within
    `patience` seconds of the first failure; the last error once it does not. `work` must be safe to
    repeat: its transaction was rolled back, or committed with no answer, when the connection went."""
    deadline, pause = None, _FIRST_PAUSE
    while True:
        started = time.monotonic()
        try:
            return work()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if deadline is None or time.monotonic() - started > patience:   # a new outage, long after the last
                deadline, pause = time.monotonic() + patience, _FIRST_PAUSE
                say_away(exc, what, patience)
            # Paused even when the database answers: what failed may fail again at once.
            if stop() or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(2 * pause, _LONGEST_PAUSE)
            if not wait_for(store, deadline, stop):
                raise
