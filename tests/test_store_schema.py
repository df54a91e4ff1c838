"""Schema, migrations and engine setup, on real SQLite files and a real PostgreSQL."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError

from nos.store import (
    Base,
    StoreError,
    check_schema,
    create_engine,
    create_run,
    get_run,
    open_store,
    resolve_url,
    schema,
    schema_state,
    upgrade,
)
from nos.store.schema import alembic_config, migrating, migrations_dir

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
    url = resolve_url(migrated_url)
    assert upgrade(url).up_to_date
    engine = create_engine(url)
    with engine.connect() as connection, migrating(connection):
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


def _every_row(sqlite: bool) -> dict[str, list[dict]]:
    """A row of every kind for each table of every revision, with awkward values (unicode, newlines, NULLs, inf,
    0.1 + 0.2, microseconds, nested JSON, a blob, a cached_from); a revision keeps the columns it has."""
    def at(seconds):
        t = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc) + timedelta(seconds=seconds)
        return t.replace(tzinfo=None) if sqlite else t   # SQLite's reflected DATETIME takes naive UTC
    blob = bytes(range(256)) * 8 + b"\x00"
    statuses = ["queued", "running", "done", "diverged", "failed", "cached", "rejected"]
    return {
        "runs": [dict(id=i, name=f"run é {i}", status=status, task="digits", config={"lr": [1e-3], "n": {"ü": None}},
                      error=None if i == 1 else "boom\nline 2", created_at=at(i), updated_at=at(i + 1),
                      finished_at=None if i == 1 else at(i + 2), driver="host:1", driver_heartbeat_at=at(9),
                      drive_sent_at=None, drive_sends=i)
                 for i, status in ((1, "running"), (2, "completed"))],
        "rules": [dict(id=i, text=f"sign(g) * m{i} ☃", hash="h" * 64, depth=None if i == 2 else i, tokens=[0, i],
                       fingerprint=f"fp{i}", created_at=at(i)) for i in (1, 2)],
        "evaluations": [dict(id=i, run_id=1 + i % 2, rule_id=1 + i % 2, batch=0, seq=i, task="digits", task_key="k",
                             status=status, attempts=i % 3, claims=i % 3 + 2, worker=f"host:{i}", created_at=at(i),
                             claimed_at=at(i + 1), heartbeat_at=None, finished_at=at(i + 3), best_lr=0.1 + 0.2,
                             reward=None if status in ("queued", "failed") else 0.9123456789012345, test_acc=1 / 3,
                             wall_seconds=12.5, error="Traceback\n x" if status == "failed" else None,
                             cached_from=3 if status == "cached" else None, reason=f"why {i}", tokens=[3, 1, 4],
                             log_prob=-1.2345678901234567)
                        for i, status in enumerate(statuses, 1)],
        "lr_trials": [dict(id=k, evaluation_id=3, lr=lr, val_acc=None if lr == 1.0 else 0.5, diverged=lr == 1.0,
                           train_loss=float("inf") if lr == 1.0 else 0.25, wall_seconds=1.5)
                      for k, lr in enumerate((1e-3, 1e-2, 1.0), 1)],
        "checkpoints": [dict(id=i, run_id=1, step=i, state={"step": i, "x": [1.5, None]}, rng_state={"s": "abc"},
                             blob=blob if i == 2 else None, created_at=at(i)) for i in (1, 2)],
        "transfer_runs": [dict(id=1, rule_id=1, task="cifar10", model="wrn-16-2", task_key="t", config={"epochs": 3},
                               seed=0, status="running", attempts=1, device="cuda:0", best_lr=0.1, final_val=None,
                               final_test=None, best_val=0.81, best_test=0.8, diverged=False, wall_seconds=99.0,
                               error=None, created_at=at(1), updated_at=at(2), finished_at=None)],
        "transfer_trials": [dict(id=1, transfer_id=1, lr=0.1, val_acc=0.5, train_loss=None, diverged=False, epochs=2,
                                 steps=100, wall_seconds=3.0)],
        "transfer_epochs": [dict(id=1, transfer_id=1, epoch=1, train_loss=0.3, val_acc=0.6, test_acc=0.61,
                                 diverged=False, wall_seconds=4.0)],
        "transfer_checkpoints": [dict(transfer_id=1, epoch=1, blob=blob, created_at=at(1))],
    }


def _fill(url) -> None:
    """Every table the database has, with the rows of `_every_row` its revision can hold."""
    engine = create_engine(url)
    tables = sa.MetaData()
    tables.reflect(engine)
    with engine.begin() as connection:
        for name, rows in _every_row(url.get_backend_name() == "sqlite").items():
            table = tables.tables.get(name)
            if table is None:
                continue
            if name == "evaluations" and "reason" not in table.c:   # no `rejected` status before 0002
                rows = [row for row in rows if row["status"] != "rejected"]
            connection.execute(table.insert(), [{k: v for k, v in row.items() if k in table.c} for row in rows])
    engine.dispose()


def _every_value(url) -> dict[str, list[dict]]:
    """Every table's rows in key order, each value as the database stores it (SQLite: its storage class and
    literal; PostgreSQL: its text), and the leaderboard view's rows."""
    sqlite = url.get_backend_name() == "sqlite"
    engine = create_engine(url)
    with engine.connect() as connection:
        inspector = sa.inspect(connection)
        values = {}
        for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}) + ["leaderboard"]:
            columns = [column["name"] for column in inspector.get_columns(table)]
            key = inspector.get_pk_constraint(table)["constrained_columns"] or columns[:1]
            shown = [f'typeof("{c}") || \' \' || quote("{c}")' if sqlite else f'CAST("{c}" AS TEXT)' for c in columns]
            rows = connection.exec_driver_sql(f'SELECT {", ".join(shown)} FROM "{table}" '
                                              f'ORDER BY {", ".join(key)}').all()
            values[table] = [dict(zip(columns, row)) for row in rows]
    engine.dispose()
    return values


@pytest.mark.parametrize("revision", ["0001", "0002", "0003", "0004", "0005", "0006"])
def test_an_upgrade_keeps_every_stored_value(db_url, revision):
    """A batch migration on SQLite copies a table and drops the old one: with foreign keys on, the drop
    cascaded and deleted every learning-rate trial (schema 0001 -> 0002 rebuilds `evaluations`). Every value
    of every table (and of the leaderboard) is compared, as stored, on both databases."""
    url = resolve_url(db_url)
    upgrade(url, revision)
    _fill(url)
    before = _every_value(url)
    assert all(before[table] for table in before), "a table left empty proves nothing"
    assert upgrade(url).up_to_date
    after = _every_value(url)
    for table, rows in before.items():
        assert [{c: row[c] for c in rows[0]} for row in after[table]] == rows, table
    if revision < "0006":   # a claim's ticket starts from the claims counted so far
        assert all(row["claims"] == row["attempts"] for row in after["evaluations"])


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


def _on_given_connection(url, connection, step: str, revision: str, x: tuple[str, ...] = ()) -> None:
    """`alembic <step> <revision>` on a connection the caller hands over, as a user's script may."""
    config = alembic_config(url)
    config.attributes["connection"] = connection
    config.cmd_opts = argparse.Namespace(x=list(x))
    getattr(command, step)(config, revision)


def test_migrations_on_a_callers_sqlite_connection_keep_every_row(tmp_path):
    """A connection of nos's engine has SQLite's foreign keys on: 0002's batch copy of `evaluations`, up or
    down, deleted every learning-rate trial and cleared every cached_from."""
    path = tmp_path / "head.db"
    url = _old_database_with_rows(path, "head")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            _on_given_connection(url, connection, "downgrade", "0001")
            assert _stored_rows(path) == [1, 1, 2, 3, 1]
            _on_given_connection(url, connection, "upgrade", "head")
    finally:
        engine.dispose()
    assert _stored_rows(path) == [1, 1, 2, 3, 1]
    assert schema_state(url).up_to_date


def test_migrations_on_a_callers_sqlite_transaction_with_foreign_keys_on_are_refused(tmp_path):
    """Inside a transaction the foreign keys cannot be turned off, so nothing may run there."""
    path = tmp_path / "head.db"
    url = _old_database_with_rows(path, "head")
    engine = create_engine(url)
    try:
        with pytest.raises(StoreError, match=r"run migrations through nos\.store\.upgrade or inside "
                                             r"nos\.store\.schema\.migrating\(connection\)$"):
            with engine.begin() as connection:
                _on_given_connection(url, connection, "downgrade", "0001")
    finally:
        engine.dispose()
    assert _stored_rows(path) == [1, 1, 2, 3, 1]
    assert schema_state(url).up_to_date


USER_VIEWS = ["CREATE VIEW my_done AS SELECT * FROM evaluations WHERE status = 'done'",
              "CREATE VIEW my_top AS SELECT rule, reward FROM leaderboard"]


def test_an_upgrade_blocked_by_the_users_own_views_says_what_to_do_and_changes_nothing(db_url):
    """SQLite's rebuild of `evaluations` (0002) fails on a view that reads it, and PostgreSQL's drop of
    `leaderboard` on a view that reads that: the user must take their views out of the way."""
    url = resolve_url(db_url)
    upgrade(url, "0001")
    engine = create_engine(url)
    with engine.begin() as connection:
        for view in USER_VIEWS:
            connection.exec_driver_sql(view)
    with pytest.raises(StoreError, match=r"^cannot upgrade .*: .*; drop your own views \(my_done, my_top\) before "
                                         r"`nos db upgrade` and create them again after$") as info:
        upgrade(url)
    assert "\n" not in str(info.value)
    assert schema_state(url).current == "0001"
    assert set(sa.inspect(engine).get_view_names()) == {"leaderboard", "run_progress", "my_done", "my_top"}
    engine.dispose()


def test_a_downgrade_that_would_delete_rejected_evaluations_is_refused_unless_forced(tmp_path):
    path = tmp_path / "head.db"
    url = _old_database_with_rows(path, "head")
    db = sqlite3.connect(path)
    db.execute("INSERT INTO evaluations (id, run_id, rule_id, batch, seq, task, task_key, status, attempts, "
               "created_at, reward, reason) VALUES (3, 1, 1, 0, 2, 'digits', 'k', 'rejected', 0, "
               "'2024-01-01 00:00:00', 0, 'all zero')")
    db.commit()
    db.close()
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            with pytest.raises(CommandError, match=r"below revision 0002 would delete 1 rejected evaluation\(s\), "
                                                   r".*nothing was changed; give `-x force=1` to delete them$"):
                _on_given_connection(url, connection, "downgrade", "0001")
            assert schema_state(url).up_to_date
            assert _stored_rows(path)[2] == 3
            _on_given_connection(url, connection, "downgrade", "0001", x=("force=1",))
    finally:
        engine.dispose()
    assert schema_state(url).current == "0001"
    assert _stored_rows(path) == [1, 1, 2, 3, 1]


def test_a_claim_ticket_never_goes_back_across_a_downgrade_and_upgrade(db_url):
    """`claims` can be ahead of `attempts` (a claim given back uncounted): starting it again from attempts
    after a round trip would hand out a ticket a worker from before still holds."""
    url = resolve_url(db_url)
    upgrade(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO runs (id, name, status, task, config, created_at, updated_at, drive_sends) "
            "VALUES (1, 'r', 'running', 'digits', '{}', '2024-01-01', '2024-01-01', 0)")
        connection.exec_driver_sql("INSERT INTO rules (id, text, hash, created_at) VALUES (1, 'g', 'h', '2024-01-01')")
        connection.exec_driver_sql(
            "INSERT INTO evaluations (id, run_id, rule_id, batch, seq, task, task_key, status, attempts, claims, "
            "created_at) VALUES (1, 1, 1, 0, 0, 'digits', 'k', 'queued', 1, 5, '2024-01-01')")
    try:
        with engine.connect() as connection, migrating(connection):
            _on_given_connection(url, connection, "downgrade", "0005")
        assert schema_state(url).current == "0005"
        assert upgrade(url).up_to_date
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT attempts, claims FROM evaluations").one() == (1, 5)
    finally:
        engine.dispose()


def _hold_runs(pg_url: str, idle_s: int):
    """Another session in a transaction that holds `runs` (as a worker's open read does) until the server
    ends it after `idle_s` seconds idle: an upgrade that never gives up waits that long, then goes through."""
    import psycopg

    holder = psycopg.connect(pg_url, autocommit=True)
    holder.execute(f"SET idle_in_transaction_session_timeout = '{idle_s}s'")
    holder.execute("BEGIN")
    holder.execute("LOCK TABLE runs IN ACCESS SHARE MODE")
    return holder


def test_an_upgrade_behind_another_sessions_lock_gives_up_with_one_line_and_changes_nothing(pg_url, monkeypatch):
    """Waiting for its ACCESS EXCLUSIVE lock, an upgrade stalled every query of the table behind it, for as
    long as the other session held it."""
    url = resolve_url(pg_url)
    upgrade(url, "0006")   # 0007 alters `runs`
    monkeypatch.setattr(schema, "UPGRADE_LOCK_TIMEOUT_MS", 100)
    monkeypatch.setattr(schema, "UPGRADE_TRIES", 2)
    holder = _hold_runs(pg_url, idle_s=30)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"^cannot upgrade .*: another session holds nos's tables \(a worker "
                                             r"or a driver mid-transaction\?\): stop the workers and drivers and "
                                             r"run `nos db upgrade` again$"):
            upgrade(url)
        assert time.monotonic() - started < 25   # it gave up rather than wait for the holder
        assert schema_state(url).current == "0006"
        holder.execute("ROLLBACK")
        assert upgrade(url).up_to_date
    finally:
        holder.close()


def test_an_upgrade_tries_again_while_another_session_holds_a_table(pg_url, monkeypatch):
    url = resolve_url(pg_url)
    upgrade(url, "0006")
    monkeypatch.setattr(schema, "UPGRADE_LOCK_TIMEOUT_MS", 200)
    monkeypatch.setattr(schema, "UPGRADE_TRIES", 50)   # ten seconds of tries: the holder goes after one
    holder = _hold_runs(pg_url, idle_s=1)
    try:
        assert upgrade(url).up_to_date
    finally:
        holder.close()


def test_opening_a_store_says_nothing_of_migrations(sqlite_url, caplog):
    """Reading the revision made Alembic log "Context impl SQLiteImpl." at INFO: a control worker's watch, which
    opens a store every 10 s, filled its log with it."""
    import logging

    from nos.store import open_store, resolve_url, upgrade

    upgrade(resolve_url(sqlite_url))
    level = logging.getLogger("alembic.runtime.migration").level
    with caplog.at_level(logging.INFO):
        open_store(sqlite_url).dispose()
    assert not [r for r in caplog.records if r.name == "alembic.runtime.migration"], caplog.text
    assert logging.getLogger("alembic.runtime.migration").level == level   # left as it was
