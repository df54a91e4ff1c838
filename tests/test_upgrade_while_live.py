"""`nos db upgrade` waits for live workers and drivers: each reads the schema only when it starts."""

from __future__ import annotations

from datetime import timedelta

from alembic import command
from click.testing import CliRunner
from sqlalchemy import update

from nos.cli.main import cli
from nos.store import Store, claim, create_engine, database_now, open_store, resolve_url, schema_state
from nos.store.models import Evaluation, Run
from nos.store.schema import alembic_config

from helpers.store import new_run_with_batch


def nos(*args: str):
    return CliRunner().invoke(cli, list(args))


def _one_revision_behind(url: str) -> tuple[int, int, str]:
    """A run with one evaluation claimed just now (its heartbeat fresh), in a database one revision behind."""
    store = open_store(url)
    try:
        run_id, ids = new_run_with_batch(store, ["g", "adam"])
        with store.transaction() as session:
            assert claim(session, ids[0], "host:1", timedelta(seconds=25)) is not None
    finally:
        store.dispose()
    command.downgrade(alembic_config(resolve_url(url)), "-1")
    behind = schema_state(resolve_url(url)).current
    assert behind != schema_state(resolve_url(url)).head
    return run_id, ids[0], behind


def test_an_upgrade_waits_for_live_workers_and_drivers(migrated_url):
    url = migrated_url
    run_id, evaluation_id, behind = _one_revision_behind(url)

    refused = nos("db", "upgrade", "--db", url)
    assert refused.exit_code == 2
    assert "1 evaluation is being trained" in refused.output
    assert "--force" in refused.output
    assert schema_state(resolve_url(url)).current == behind   # nothing changed

    # Its worker died: the heartbeat went stale. A driver's lease renewed just now is live work too.
    store = _raw_store(url)
    try:
        with store.transaction() as session:
            now = database_now(session)
            session.execute(update(Evaluation).where(Evaluation.id == evaluation_id)
                            .values(heartbeat_at=now - timedelta(minutes=5)))
            session.execute(update(Run).where(Run.id == run_id).values(driver="host:2", driver_heartbeat_at=now))
    finally:
        store.dispose()
    refused = nos("db", "upgrade", "--db", url)
    assert refused.exit_code == 2
    assert f"run {run_id} is being driven" in refused.output
    assert "evaluation" not in refused.output.split("against")[0]
    assert schema_state(resolve_url(url)).current == behind

    forced = nos("db", "upgrade", "--force", "--db", url)
    assert forced.exit_code == 0, forced.output
    assert schema_state(resolve_url(url)).up_to_date


def test_an_upgrade_goes_ahead_once_the_work_is_stale(migrated_url):
    url = migrated_url
    _, evaluation_id, behind = _one_revision_behind(url)
    store = _raw_store(url)
    try:
        with store.transaction() as session:
            session.execute(update(Evaluation).where(Evaluation.id == evaluation_id)
                            .values(heartbeat_at=database_now(session) - timedelta(minutes=5)))
    finally:
        store.dispose()
    done = nos("db", "upgrade", "--db", url)
    assert done.exit_code == 0, done.output
    assert f"upgraded from revision {behind}" in done.output
    assert schema_state(resolve_url(url)).up_to_date


def _raw_store(url: str):
    """A store on the database whatever its revision (open_store refuses one behind)."""
    return Store(create_engine(resolve_url(url)))
