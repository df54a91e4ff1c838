"""Where the database is and how to talk to it: URLs, engines, transactions.

SQLite (the default, `sqlite:///nos.db`) runs in WAL mode with a busy timeout
and foreign keys on. PostgreSQL goes through psycopg 3. Every problem a user
can cause (a bad URL, a server that is down, a missing file) becomes a
`StoreError` with a one-line message.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from ..redact import mask_credentials, mask_url

DEFAULT_URL = "sqlite:///nos.db"
URL_ENV_VAR = "NOS_DB_URL"
# Milliseconds a SQLite writer waits for the lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Seconds to wait for a PostgreSQL server before calling it down.
PG_CONNECT_TIMEOUT_S = 10
# user:password@ at the start of what a URL gives as the database name (a slash too many before it)
_CREDENTIALS_IN_PATH = re.compile(r"[^/@]*:[^@]*@")


class StoreError(Exception):
    """A problem with the database the user can fix; the message is one line."""


class DatabaseMissing(StoreError):
    """The SQLite file is not there (yet): `nos db upgrade` or a first write creates it."""


def resolve_url(url: str | None = None) -> URL:
    """The database URL: `url`, else $NOS_DB_URL, else sqlite:///nos.db.

    `postgresql://` and `postgres://` mean psycopg 3 (`postgresql+psycopg://`).
    """
    text = url or os.environ.get(URL_ENV_VAR) or DEFAULT_URL
    try:
        parsed = sa.make_url(text)
    except (ArgumentError, ValueError) as exc:   # ValueError: a port that is not a number
        why = "its port is not a number" if isinstance(exc, ValueError) else "it is not a URL"
        raise StoreError(f"bad database URL {mask_url(text)!r} ({why}): "
                         "expected sqlite:///PATH or postgresql://HOST/DB") from None
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        if _CREDENTIALS_IN_PATH.match(parsed.database or ""):
            # postgresql:///u:pw@h/db reads "u:pw@h/db" as the database's name, and PostgreSQL's
            # "database ... does not exist" would quote it, password and all.
            raise StoreError(f"bad PostgreSQL URL {mask_url(text)!r}: its database name holds a user and "
                             "password; write postgresql://USER:PASSWORD@HOST/DB (two slashes before the user)")
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        if parsed.host or parsed.port or parsed.username or parsed.password:
            # sqlite://nos.db reads "nos.db" as a host name: the path needs the third slash.
            raise StoreError(f"bad SQLite URL {mask_url(text)!r}: write sqlite:///nos.db (a relative path) "
                             "or sqlite:////abs/path/nos.db (three slashes, then the path)")
        return parsed
    raise StoreError(f"unsupported database {parsed.drivername!r} in {shown(parsed)}: "
                     "use sqlite:///PATH or postgresql://HOST/DB")


def shown(url: URL) -> str:
    """The URL as safe to print or store: no password (see nos.redact)."""
    return mask_url(url)


def sqlite_path(url: URL) -> Path | None:
    """The file of a SQLite URL; None for PostgreSQL or an in-memory database."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def check_writable(url: URL) -> None:
    """A StoreError when an existing SQLite file cannot be written (read-only file or folder)."""
    path = sqlite_path(url)
    if path is None or not path.exists():
        return
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as exc:
        raise StoreError(f"cannot write to database {path}: {exc.strerror}") from None
    wal = path.with_name(path.name + "-wal")
    if not wal.exists() and not os.access(path.parent, os.W_OK):
        raise StoreError(f"cannot write to database {path}: its folder is read-only "
                         "(SQLite keeps a -wal file beside the database)")


def create_engine(url: URL) -> Engine:
    """An engine for `url` (see `resolve_url`); connects lazily."""
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    try:
        return sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    except NoSuchModuleError:
        raise StoreError(f"no driver for {shown(url)}") from None


def _set_wal(cursor) -> None:
    # Switching a new file to WAL needs a moment alone with it and, unlike other
    # statements, does not wait out the busy timeout: retry it while others do the same.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_engine(url: URL) -> Engine:
    engine = sa.create_engine(url)

    @event.listens_for(engine, "connect")
    def configure(dbapi_connection, _record) -> None:
        # Take transaction control away from the sqlite3 module (it would
        # BEGIN at odd moments); the "begin" hook below issues BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if sqlite_path(url) is not None:
            _set_wal(cursor)
            # WAL with synchronous=NORMAL is durable across process crashes.
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(connection) -> None:
        # IMMEDIATE takes the write lock up front. A deferred transaction that
        # reads and then writes can fail with SQLITE_BUSY_SNAPSHOT in WAL mode,
        # which no busy timeout retries; read-only work asks for DEFERRED.
        mode = connection.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def first_line(exc: BaseException | None) -> str:
    """The exception's first line, any credential in it masked: what a StoreError quotes."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return mask_credentials(lines[0]) if lines else type(exc).__name__


class Store:
    """An engine plus the two kinds of transaction nos uses.

    `transaction()` is for anything that writes: on SQLite it holds the write
    lock from its first statement. `reading()` is for queries.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._writer = sessionmaker(engine, expire_on_commit=False)
        self._reader = sessionmaker(engine.execution_options(sqlite_begin="DEFERRED"), expire_on_commit=False)

    @property
    def url(self) -> URL:
        return self.engine.url

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one write transaction: committed on success, rolled back on error."""
        with self._writer() as session, session.begin():
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for queries; its transaction is rolled back at the end."""
        with self._reader() as session:  # closing rolls back
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
