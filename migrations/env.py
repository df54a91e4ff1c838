"""Alembic environment for nos.

`nos db upgrade` (nos.store.schema.upgrade) hands over an open connection in
`config.attributes["connection"]`. Run by hand (`alembic upgrade head` at the
repository root), the URL comes from NOS_DB_URL, else alembic.ini.
"""

from __future__ import annotations

import os

from alembic import context

from nos.store.engine import create_engine, resolve_url
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


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
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
