"""Alembic environment for nos.

`nos db upgrade` (nos.store.schema.upgrade) hands over an open connection in
`config.attributes["connection"]`, inside `nos.store.schema.migrating`. A
connection handed over any other way is used as given, except a SQLite one
with foreign keys on: see `run_on_given`. Run by hand (`alembic upgrade head`
at the repository root), the URL comes from NOS_DB_URL, else alembic.ini.
"""

from __future__ import annotations

import os

from alembic import context

from nos.store.engine import StoreError, create_engine, resolve_url, shown
from nos.store.models import Base, UTCDateTime
from nos.store.schema import migrating

config = context.config
target_metadata = Base.metadata


def render_item(kind: str, obj, autogen_context):
    # New revisions spell nos's UTC type as the plain column type it stores.
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: copy-and-move batches.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_on_given(connection) -> None:
    """Run the migrations on a caller's connection, never with SQLite's foreign keys on.

    With them on, a batch migration's drop of the copied table cascades (ON DELETE CASCADE) and
    deletes every row that refers to it: every learning-rate trial of `evaluations`.
    """
    if not _sqlite_foreign_keys_on(connection):   # PostgreSQL, or inside migrating() already
        run_migrations(connection)
        return
    if connection.in_transaction():
        # The pragma is a no-op inside a transaction: only the caller could have turned it off.
        raise StoreError(f"cannot migrate {shown(connection.engine.url)}: its connection has SQLite's foreign "
                         "keys on and is already in a transaction, where they cannot be turned off, and a batch "
                         "migration would then delete rows; run migrations through nos.store.upgrade or inside "
                         "nos.store.schema.migrating(connection)")
    with migrating(connection):
        run_migrations(connection)


def _sqlite_foreign_keys_on(connection) -> bool:
    if connection.dialect.name != "sqlite":
        return False
    # On the raw connection: through SQLAlchemy the query would begin a transaction of its own.
    return bool(connection.connection.dbapi_connection.execute("PRAGMA foreign_keys").fetchone()[0])


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on_given(connection)
        return
    url = resolve_url(os.environ.get("NOS_DB_URL") or config.get_main_option("sqlalchemy.url"))
    engine = create_engine(url)
    try:
        # The same transaction `nos db upgrade` runs them in: on SQLite with foreign keys off, or a
        # table's batch copy would cascade-delete every row that refers to it.
        with engine.connect() as connection, migrating(connection):
            run_migrations(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("nos migrations run online only: give a database URL")
run_online()
