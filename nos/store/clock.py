"""The database's clock: the one clock that every host sharing a database agrees on.

Claims, heartbeats and leases are written by one host and judged stale by
another. Each host's own clock can be seconds off (minutes, on a machine
without NTP), and a skew near `stale_after` makes a healthy worker's claim
look stale to every other host: it is taken over and trained twice, and
after `max_attempts` such takeovers a healthy rule fails. So the store
stamps and compares times by the database server's clock, as Optuna's
RDBStorage does for its trials' heartbeats.

SQLite has no server: the database is a file, and the clock of the host
that opens it is the clock every user of the file shares (a file shared
over a network filesystem is not a safe SQLite database in the first place).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import utcnow


def database_now(session: Session) -> datetime:
    """The current UTC time by the database's clock (this host's for SQLite).

    PostgreSQL's `clock_timestamp()`, not `now()`: `now()` is the time the
    transaction began, and a transaction may have begun with a slow read.
    On SQLite the session's transaction begins first: a writer's BEGIN
    IMMEDIATE may wait up to the busy timeout for another's lock, and a
    time read before that wait would stamp a claim or heartbeat that old,
    born stale when the wait exceeds `stale_after`.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        return session.execute(select(func.clock_timestamp())).scalar_one().astimezone(timezone.utc)
    return utcnow()


__all__ = ["database_now"]
