"""Shared fixtures. Tests use real services; see `helpers.services.unavailable`."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

from helpers import reports
from helpers.driver import TINY_TOML
from helpers.services import unavailable
from helpers.workers import Workers

# The test models are tiny: one thread is faster than two fighting over two cores.
torch.set_num_threads(1)

# The property tests draw the same rules on every run, so a run is reproducible and a red CI is a
# change's fault. NOS_HYPOTHESIS=explore draws new ones (docs/development.md).
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("NOS_HYPOTHESIS", "fixed"))


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """`nos enqueue` run in this process (click's CliRunner) sets the process's signal handlers: its stop
    handlers, then SIG_IGN once the run has ended. An ignored signal is inherited by every process a later
    test starts, so each test gets this process's handlers back as they were."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        if handler is not None:
            signal.signal(signum, handler)


# --- Storage (nos.store): one fresh database per test, on SQLite and on PostgreSQL ---

# An existing PostgreSQL database the tests may create and drop schemas in.
PG_ADMIN_URL = os.environ.get("NOS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_admin():
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        unavailable("PostgreSQL", f"{PG_ADMIN_URL} does not answer: {str(exc).strip().splitlines()[0]}")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of an empty PostgreSQL schema of its own (via search_path), dropped afterwards."""
    admin = _pg_admin()
    schema = f"nos_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        admin.execute("SET lock_timeout = '20s'")
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """URL of a SQLite file that does not exist yet."""
    return f"sqlite:///{tmp_path / 'nos.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    """An empty database (no schema), once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "pg_url"}[request.param])


@pytest.fixture
def migrated_url(db_url) -> str:
    """`db_url` after `nos db upgrade`."""
    from nos.store import resolve_url, upgrade

    upgrade(resolve_url(db_url))
    return db_url


@pytest.fixture
def store(migrated_url):
    """An open Store on a freshly migrated database."""
    from nos.store import open_store

    opened = open_store(migrated_url)
    yield opened
    opened.dispose()


@pytest.fixture
def tiny_toml(tmp_path) -> str:
    """A search config file for a run of a few seconds (`helpers.driver.TINY_TOML`)."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return str(path)


# --- Celery: a Redis database of the test's own, and `nos worker` processes ---

REDIS = "redis://127.0.0.1:6379"


@pytest.fixture
def broker():
    """A Redis database of the test's own, empty, flushed again afterwards."""
    import redis

    client = redis.Redis.from_url(f"{REDIS}/0", socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable("Redis", f"{REDIS} does not answer: {exc}")
    index = 1 + uuid.uuid4().int % 15
    db = redis.Redis.from_url(f"{REDIS}/{index}")
    db.flushdb()
    yield f"{REDIS}/{index}"
    db.flushdb()


@pytest.fixture
def workers(db_url, broker):
    """A pool of `nos worker` processes on `db_url` (migrated) and `broker`; all killed afterwards."""
    from nos.store import resolve_url, upgrade

    upgrade(resolve_url(db_url))
    pool = Workers(db_url, broker)
    yield pool
    pool.stop_all()


# --- Reporting (nos plot, nos report, frames): runs built directly in a store ---


@pytest.fixture
def sqlite_store(sqlite_url):
    """An open Store on a freshly migrated SQLite file."""
    from nos.store import open_store, resolve_url, upgrade

    upgrade(resolve_url(sqlite_url))
    opened = open_store(sqlite_url)
    yield opened
    opened.dispose()


@pytest.fixture
def two_runs(sqlite_store, sqlite_url):
    """`helpers.reports.two_runs` on SQLite: run 1 (ppo) with a cache hit, a failure and a queued evaluation."""
    return reports.two_runs(sqlite_store, sqlite_url)


@pytest.fixture
def two_runs_anywhere(store, migrated_url):
    """`two_runs` on SQLite and on PostgreSQL."""
    return reports.two_runs(store, migrated_url)
