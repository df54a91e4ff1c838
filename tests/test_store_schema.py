"""Schema, migrations and engine setup, on real SQLite files and a real PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from nos.store import (
    Base,
    StoreError,
    check_schema,
    create_engine,
    create_run,
    get_run,
    open_store,
    resolve_url,
    schema_state,
    upgrade,
)
from nos.store.schema import alembic_config, migrations_dir

from helpers.schema import schema_state_head

TABLES = {"runs", "rules", "evaluations", "lr_trials", "checkpoints", "alembic_version",
          "transfer_runs", "transfer_trials", "transfer_epochs", "transfer_checkpoints"}
VIEWS = {"leaderboard", "run_progress"}


def test_upgrade_creates_tables_and_views(migrated_url):
    engine = create_engine(resolve_url(migrated_url))
    inspector = sa.inspect(engine)
    assert set(inspector.get_table_names()) == TABLES
    assert set(inspector.get_view_names()) == VIEWS
    with engine.connect() as connection:
        for view in VIEWS:
            assert connection.exec_driver_sql(f"SELECT * FROM {view}").all() == []
    engine.dispose()


def test_models_match_the_migrated_schema(migrated_url):
    """Autogenerate finds nothing to do: the migration creates exactly what the models describe."""
    engine = create_engine(resolve_url(migrated_url))
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_upgrade_twice_is_a_no_op_and_downgrade_undoes_it(migrated_url):
    from alembic import command

    url = resolve_url(migrated_url)
    assert upgrade(url).up_to_date
    engine = create_engine(url)
    with engine.begin() as connection:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    assert sa.inspect(engine).get_view_names() == []
    engine.dispose()
    assert schema_state(url).current is None
    assert upgrade(url).up_to_date


def test_open_store_refuses_a_database_without_schema(db_url):
    url = resolve_url(db_url)
    if url.get_backend_name() == "sqlite":
        sqlite3.connect(url.database).close()  # an empty file
    with pytest.raises(StoreError, match=r"has no nos schema; run `nos db upgrade`"):
        open_store(db_url)


def test_open_store_refuses_a_missing_sqlite_file_without_creating_it(tmp_path):
    path = tmp_path / "missing.db"
    with pytest.raises(StoreError, match=r"no database at .*missing.db: run this where the database is .*"
                                         r"creates an empty one"):
        open_store(f"sqlite:///{path}")
    assert not path.exists()


def _snapshot(folder):
    """Every file in the folder with a hash of its bytes: proves nothing was written."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _script_with_a_newer_revision(tmp_path):
    """A copy of nos's migrations plus one more revision: makes today's databases 'behind'."""
    script = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), script, ignore=shutil.ignore_patterns("__pycache__"))
    head = schema_state_head()
    (script / "versions" / "9999_later.py").write_text(
        f'revision = "9999"\ndown_revision = "{head}"\nbranch_labels = None\ndepends_on = None\n\n'
        "def upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n")
    return script


def test_a_database_behind_says_so_names_the_command_and_is_untouched(sqlite_url, tmp_path):
    url = resolve_url(sqlite_url)
    upgrade(url)
    folder = tmp_path
    script = _script_with_a_newer_revision(tmp_path / "later")
    before = _snapshot(folder)
    behind = rf"is at revision {schema_state_head()}, behind this nos \(head 9999\); run `nos db upgrade`"
    with pytest.raises(StoreError, match=behind):
        check_schema(url, script)
    assert _snapshot(folder) == before


def test_a_database_behind_on_postgresql(pg_url, tmp_path):
    url = resolve_url(pg_url)
    upgrade(url)
    script = _script_with_a_newer_revision(tmp_path)
    with pytest.raises(StoreError, match=r"behind this nos \(head 9999\); run `nos db upgrade`"):
        check_schema(url, script)


def _stamp_unknown_revision(url):
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dface'")
    engine.dispose()


def test_a_database_ahead_says_so_and_is_untouched(db_url, tmp_path):
    url = resolve_url(db_url)
    upgrade(url)
    _stamp_unknown_revision(url)
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError, match=r"at revision f00dface, which this nos does not know .* newer nos"):
        open_store(db_url)
    with pytest.raises(StoreError, match=r"newer nos"):
        upgrade(url)
    assert _snapshot(tmp_path) == before
    assert schema_state(url).current == "f00dface"


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(sqlite_url):
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    with store.reading() as session:
        assert session.execute(sa.text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert session.execute(sa.text("PRAGMA foreign_keys")).scalar_one() == 1
        assert session.execute(sa.text("PRAGMA busy_timeout")).scalar_one() >= 1000
    store.dispose()


def test_foreign_keys_are_enforced(store):
    from nos.store import NewEvaluation, enqueue_batch

    with pytest.raises(sa.exc.IntegrityError):
        with store.transaction() as session:
            enqueue_batch(session, 12345, 0, [NewEvaluation(rule_id=678, task="digits", task_key="k")])


def test_times_are_timezone_aware_utc_on_both_databases(store):
    t = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5)))
    with store.transaction() as session:
        run_id = create_run(session, "r", "digits", {"lr": [1e-3]}, now=t)
    with store.reading() as session:
        run = get_run(session, run_id)
    assert run.created_at == t
    assert run.created_at.tzinfo == timezone.utc
    assert run.config == {"lr": [1e-3]}


def test_naive_times_are_refused(store):
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        with store.transaction() as session:
            create_run(session, "r", "digits", {}, now=datetime(2026, 1, 1))


@pytest.mark.parametrize("given, expected", [
    ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
    ("postgres://u@h:5433/db", "postgresql+psycopg://u@h:5433/db"),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ("sqlite:///runs/a.db", "sqlite:///runs/a.db"),
])
def test_urls_are_normalised(given, expected):
    assert resolve_url(given).render_as_string() == expected


def test_url_comes_from_the_environment_else_the_default(monkeypatch):
    monkeypatch.delenv("NOS_DB_URL", raising=False)
    assert resolve_url(None).render_as_string() == "sqlite:///nos.db"
    monkeypatch.setenv("NOS_DB_URL", "postgresql://x@y/z")
    assert resolve_url(None).render_as_string() == "postgresql+psycopg://x@y/z"
    assert resolve_url("sqlite:///given.db").render_as_string() == "sqlite:///given.db"


@pytest.mark.parametrize("bad, message", [
    ("not a url", "bad database URL"),
    ("mysql://u@h/db", "unsupported database 'mysql'"),
])
def test_bad_urls_are_one_line_errors(bad, message):
    with pytest.raises(StoreError, match=message) as info:
        resolve_url(bad)
    assert "\n" not in str(info.value)


def test_a_server_that_is_down_is_a_one_line_error():
    # Port 1 on localhost: nothing listens there, the connection is refused at once.
    with pytest.raises(StoreError, match=r"cannot open database postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/db") as info:
        open_store("postgresql://u:secret@127.0.0.1:1/db")
    assert "\n" not in str(info.value)
    assert "secret" not in str(info.value)


def test_a_sqlite_file_in_a_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(StoreError, match="folder .* does not exist"):
        upgrade(resolve_url(f"sqlite:///{tmp_path}/no/such/dir/nos.db"))


def _old_database_with_rows(path: Path, revision: str):
    """A SQLite file at `revision` holding a run, a rule, an evaluation, its three trials and a cached copy."""
    url = resolve_url(f"sqlite:///{path}")
    upgrade(url, revision)
    db = sqlite3.connect(path)
    stamp = "2024-01-01 00:00:00"
    db.execute("INSERT INTO runs (id, name, status, task, config, created_at, updated_at) "
               f"VALUES (1, 'r', 'completed', 'digits', '{{}}', '{stamp}', '{stamp}')")
    columns = [row[1] for row in db.execute("PRAGMA table_info(rules)")]
    rule = {"id": 1, "text": "g", "hash": "h", "depth": 1, "tokens": "[0]", "created_at": stamp}
    db.execute(f"INSERT INTO rules ({', '.join(c for c in columns if c in rule)}) "
               f"VALUES ({', '.join('?' for c in columns if c in rule)})", [rule[c] for c in columns if c in rule])
    db.execute("INSERT INTO evaluations (id, run_id, rule_id, batch, seq, task, task_key, status, attempts, "
               f"created_at, reward) VALUES (1, 1, 1, 0, 0, 'digits', 'k', 'done', 1, '{stamp}', 0.9)")
    db.execute("INSERT INTO evaluations (id, run_id, rule_id, batch, seq, task, task_key, status, attempts, "
               "created_at, reward, cached_from) "
               f"VALUES (2, 1, 1, 0, 1, 'digits', 'k', 'cached', 0, '{stamp}', 0.9, 1)")
    db.executemany("INSERT INTO lr_trials (evaluation_id, lr, val_acc, diverged) VALUES (1, ?, 0.5, 0)",
                   [(1e-3,), (1e-2,), (1e-1,)])
    db.commit()
    db.close()
    return url


def _stored_rows(path: Path) -> list:
    db = sqlite3.connect(path)
    try:
        return [db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("runs", "rules", "evaluations", "lr_trials")] + [
                db.execute("SELECT cached_from FROM evaluations WHERE id = 2").fetchone()[0]]
    finally:
        db.close()


@pytest.mark.parametrize("revision", ["0001", "0002", "0003", "0004", "0005", "0006"])
def test_an_upgrade_keeps_every_stored_row(tmp_path, revision):
    """A batch migration on SQLite copies a table and drops the old one: with foreign keys on, the drop
    cascaded and deleted every learning-rate trial (schema 0001 -> 0002 rebuilds `evaluations`)."""
    path = tmp_path / "old.db"
    url = _old_database_with_rows(path, revision)
    upgrade(url)
    assert _stored_rows(path) == [1, 1, 2, 3, 1]


def test_alembic_run_by_hand_keeps_every_stored_row_both_ways(tmp_path):
    """`alembic upgrade`/`downgrade` at the repository root (alembic.ini), as a developer runs them: their
    engine has foreign keys on, and 0002's batch copy of `evaluations` deleted every trial and cleared
    every cached_from, up and down."""
    path = tmp_path / "old.db"
    _old_database_with_rows(path, "0001")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NOS_DB_URL": f"sqlite:///{path}"}
    for step in (["upgrade", "head"], ["downgrade", "0001"]):
        done = subprocess.run([sys.executable, "-m", "alembic", *step], cwd=root, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert _stored_rows(path) == [1, 1, 2, 3, 1], step
