"""Schema versions: Alembic, driven from code so it works from any directory.

Only `upgrade` writes. `schema_state` and `check_schema` only read, and on
SQLite they read through a read-only connection, so opening a database that is
behind or ahead leaves it byte for byte as it was.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError

from .engine import DatabaseMissing, Store, StoreError, create_engine, first_line, resolve_url, shown, sqlite_path

UPGRADE_HINT = "run `nos db upgrade`"
# Alembic's logger of what a migration context does: INFO lines meant for migrations, not for reading a revision.
MIGRATION_LOG = logging.getLogger("alembic.runtime.migration")
# Tables every revision of nos's schema has: a database holding them is one nos created.
NOS_TABLES = frozenset({"runs", "rules", "evaluations"})
# Named in a refusal: enough to recognise the database, short enough for one line.
SHOWN_FOREIGN = 5
# PostgreSQL advisory lock held while upgrading (any constant; "nos" in ASCII).
UPGRADE_LOCK_KEY = 0x6E6F73
# How long an upgrade on PostgreSQL waits for a table another session holds: while it waits for its
# ACCESS EXCLUSIVE lock, every worker's query of that table queues behind it.
UPGRADE_LOCK_TIMEOUT_MS = 5_000
# Upgrades tried, each waiting up to UPGRADE_LOCK_TIMEOUT_MS, before giving up on a held table.
UPGRADE_TRIES = 3
# PostgreSQL's SQLSTATE for a lock wait cut short by lock_timeout.
LOCK_NOT_AVAILABLE = "55P03"
# The views nos's migrations create: any other view in nos's database is the user's own.
NOS_VIEWS = frozenset({"leaderboard", "run_progress"})
HELD = ("another session holds nos's tables (a worker or a driver mid-transaction?): stop the workers and "
        "drivers and run `nos db upgrade` again")


def migrations_dir() -> Path:
    """The installed migrations package (nos.migrations), wherever nos lives."""
    import nos.migrations

    return Path(nos.migrations.__file__).resolve().parent


def alembic_config(url: URL, script_location: Path | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location or migrations_dir()))
    # ConfigParser interpolation would choke on a '%' in a password.
    config.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands against the migrations nos ships."""

    current: str | None  # None: no nos schema at all
    head: str
    known: bool  # is `current` one of our revisions (False: written by a newer nos)
    # Tables and views of another application, in a database with none of nos's: never written to.
    foreign: tuple[str, ...] = ()
    # nos's tables without a revision (Base.metadata.create_all, or alembic_version dropped): the
    # migrations would start from nothing and stop at the first table that is already there.
    unversioned: bool = False

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head and not self.foreign

    @property
    def refused(self) -> bool:
        """Whether `upgrade` leaves the database as it is rather than write to it."""
        return bool(self.foreign) or not self.known or self.unversioned

    def describe(self) -> str:
        if self.foreign:
            return (f"holds another application's tables ({_some(self.foreign)}) and none of nos's: nos creates "
                    "its schema only in an empty database or one it created; give nos a database of its own")
        if self.unversioned:
            return ("holds nos's tables but no schema revision: it was made without `nos db upgrade`, "
                    "or its alembic_version was dropped")
        if self.up_to_date:
            return f"at revision {self.current} (up to date)"
        if self.current is None:
            return f"has no nos schema; {UPGRADE_HINT}"
        if self.known:
            return f"is at revision {self.current}, behind this nos (head {self.head}); {UPGRADE_HINT}"
        return (f"is at revision {self.current}, which this nos does not know (head {self.head}): "
                "it was written by a newer nos; upgrade nos")


def schema_state(url: URL, script_location: Path | None = None) -> SchemaState:
    """Read the database's revision without writing anything."""
    script = ScriptDirectory.from_config(alembic_config(url, script_location))
    head = script.get_current_head()
    assert head is not None, "the migrations have no head revision"
    current, names = _read_revision(url)
    known = current is None or _is_known(script, current)
    return SchemaState(current=current, head=head, known=known, foreign=_foreign(names),
                       unversioned=current is None and NOS_TABLES <= names)


def _some(names: tuple[str, ...]) -> str:
    """Names for a one-line message: the first few, and how many more."""
    more = len(names) - SHOWN_FOREIGN
    return ", ".join(names[:SHOWN_FOREIGN]) + (f" and {more} more" if more > 0 else "")


def _foreign(names: set[str]) -> tuple[str, ...]:
    """Another application's tables, when nothing of nos's is beside them (an empty alembic_version is nos's own
    after a full downgrade)."""
    if NOS_TABLES <= names:
        return ()
    return tuple(sorted(names - {"alembic_version"}))


def _is_known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def _read_revision(url: URL) -> tuple[str | None, set[str]]:
    """The database's revision and the names of its tables and views (in its default schema)."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        where = "" if path.is_absolute() else f" in {Path.cwd()}"
        raise DatabaseMissing(f"no database at {path}{where}: run this where the database is (`nos enqueue` makes "
                              f"nos.db in the folder it runs in), or give --db or $NOS_DB_URL; `nos db upgrade` "
                              f"creates an empty one")
    with _reading(url, path) as connection:
        inspector = sa.inspect(connection)
        names = set(inspector.get_table_names()) | set(inspector.get_view_names())
        with _quiet(MIGRATION_LOG):   # "Context impl PostgresqlImpl.": at every store opened, every 10 s in a watch
            return MigrationContext.configure(connection).get_current_revision(), names


def _user_views(url: URL) -> tuple[str, ...]:
    """Views in nos's database that nos did not make (in its default schema)."""
    with _reading(url, sqlite_path(url)) as connection:
        return tuple(sorted(set(sa.inspect(connection).get_view_names()) - NOS_VIEWS))


@contextmanager
def _quiet(log: logging.Logger) -> Iterator[None]:
    """`log` at WARNING and above only, for the block."""
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


@contextmanager
def _reading(url: URL, path: Path | None) -> Iterator[sa.Connection]:
    engine = _read_only_engine(url, path)
    try:
        with engine.connect() as connection:
            yield connection
    except DBAPIError as exc:
        raise StoreError(f"cannot open database {shown(url)}: {first_line(exc.orig)}") from None
    finally:
        engine.dispose()


def _read_only_engine(url: URL, path: Path | None) -> Engine:
    if path is None:
        return create_engine(url)
    return sa.create_engine("sqlite://", creator=lambda: _query_only_sqlite(path))


def _query_only_sqlite(path: Path) -> sqlite3.Connection:
    # query_only: SQLite itself refuses any write on this connection. (Not
    # mode=ro: that leaves -wal and -shm files behind on a WAL database.)
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA query_only = ON")
    return connection


def check_schema(url: URL, script_location: Path | None = None) -> SchemaState:
    """The schema state, or a StoreError saying what to do when not up to date."""
    state = schema_state(url, script_location)
    if not state.up_to_date:
        raise StoreError(f"database {shown(url)} {state.describe()}")
    return state


class TablesHeld(StoreError):
    """An upgrade on PostgreSQL gave up waiting for a table another session holds; nothing was changed."""


def upgrade(url: URL, revision: str = "head") -> SchemaState:
    """Create or upgrade the schema (the only function here that writes).

    Only a new SQLite file, an empty database or one nos created is written
    to; another application's database is refused as it is. On PostgreSQL,
    an upgrade that finds nos's tables held by another session is tried
    UPGRADE_TRIES times before it gives up.
    """
    _refuse_before_writing(url)
    for _ in range(UPGRADE_TRIES - 1):
        with suppress(TablesHeld):   # held for a moment, perhaps: the whole upgrade again
            return _upgrade_once(url, revision)
    return _upgrade_once(url, revision)


def _refuse_before_writing(url: URL) -> None:
    """A StoreError for a database `upgrade` must not touch, before it writes anything: not even SQLite's
    journal mode changes."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        if not path.parent.is_dir():
            raise StoreError(f"cannot create database {path}: folder {path.parent} does not exist")
        return
    before = schema_state(url)
    if before.refused:
        raise StoreError(f"database {shown(url)} {before.describe()}")


def _upgrade_once(url: URL, revision: str) -> SchemaState:
    engine = create_engine(url)
    config = alembic_config(url)
    try:
        with engine.connect() as connection, migrating(connection):
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except DBAPIError as exc:
        if _lock_timed_out(exc):
            raise TablesHeld(f"cannot upgrade {shown(url)}: {HELD}") from None
        raise StoreError(f"cannot upgrade {shown(url)}: {_why_not(url, exc)}") from None
    except CommandError as exc:
        raise StoreError(f"cannot upgrade {shown(url)}: {first_line(exc)}") from None
    finally:
        engine.dispose()
    return schema_state(url)


def _lock_timed_out(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE


def _why_not(url: URL, exc: DBAPIError) -> str:
    """Why an upgrade failed and, where the user can help it, what to do."""
    why = first_line(exc.orig)
    try:
        views = _user_views(url)
    except StoreError:
        return why
    if views:
        # A migration that drops or rebuilds a table or view fails on any view built on it.
        why += f"; drop your own views ({_some(views)}) before `nos db upgrade` and create them again after"
    return why


@contextmanager
def migrating(connection: sa.Connection) -> Iterator[None]:
    """One transaction for migrations on `connection`, for `nos db upgrade` and for Alembic run by hand.

    On SQLite, foreign keys are off while it lasts, and it is rolled back if it would leave a broken
    reference. On PostgreSQL it holds an advisory lock: of two upgrades at once, the second waits and
    then finds nothing to do. Past the advisory lock, a wait for any other lock ends after
    UPGRADE_LOCK_TIMEOUT_MS with an error rather than stall every session queued behind it.
    """
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # A batch migration copies a table and drops the old one: with foreign keys on, the drop
        # cascades (ON DELETE CASCADE) and deletes every row that refers to the table, every
        # learning-rate trial of `evaluations`. The pragma does nothing inside a transaction:
        # it is set on the raw connection, before the migration's BEGIN.
        connection.connection.dbapi_connection.execute("PRAGMA foreign_keys = OFF")
    try:
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({UPGRADE_LOCK_KEY})")
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(UPGRADE_LOCK_TIMEOUT_MS)}ms'")
            yield
            if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                url = connection.engine.url
                raise StoreError(f"cannot migrate {shown(url)}: the migration would leave rows whose "
                                 "references are broken; nothing was changed")
    finally:
        if sqlite and not connection.invalidated:   # the pooled connection goes back as create_engine made it
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys = ON")


def open_store(url: str | URL | None = None) -> Store:
    """Open an existing, up-to-date database; see `resolve_url` for the URL.

    Refuses (StoreError) a database that is missing, unreachable, behind or
    ahead of this nos, without writing to it.
    """
    resolved = url if isinstance(url, URL) else resolve_url(url)
    check_schema(resolved)
    return Store(create_engine(resolved))
