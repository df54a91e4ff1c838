"""`nos db upgrade` and `nos db current`, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from nos.cli.main import cli
from nos.store import Base, StoreError, create_engine, resolve_url, upgrade
from nos.store.schema import migrations_dir

from helpers.cli import written

NOS = str(Path(sys.executable).with_name("nos"))


def _head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(migrations_dir())).get_current_head()


HEAD = _head()   # the latest migration: a new one does not break these tests


def nos(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env)


def test_upgrade_from_any_directory_creates_the_default_database(tmp_path, monkeypatch):
    """A real `nos` process, in a folder with no alembic.ini: sqlite:///nos.db lands there."""
    env = {k: v for k, v in os.environ.items() if k != "NOS_DB_URL"}
    done = subprocess.run([NOS, "db", "upgrade"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sqlite:///nos.db: created, at revision {HEAD} (up to date)\n"
    assert (tmp_path / "nos.db").is_file()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NOS_DB_URL", raising=False)
    current = nos("db", "current")
    assert (current.exit_code, current.output) == (0, f"sqlite:///nos.db: at revision {HEAD} (up to date)\n")


def test_upgrade_then_current_via_the_environment(db_url):
    result = nos("db", "upgrade", env={"NOS_DB_URL": db_url})
    assert result.exit_code == 0, result.output
    assert f"created, at revision {HEAD} (up to date)" in result.output
    again = nos("db", "upgrade", "--db", db_url)
    assert again.exit_code == 0
    assert again.output.endswith(f": at revision {HEAD} (up to date)\n")   # nothing to do, and it says so
    current = nos("db", "current", "--db", db_url)
    assert current.exit_code == 0
    assert f"at revision {HEAD} (up to date)" in current.output


def test_current_on_a_database_without_schema_names_the_upgrade_command(db_url):
    url = resolve_url(db_url)
    if url.get_backend_name() == "sqlite":
        Path(url.database).touch()
    result = nos("db", "current", "--db", db_url)
    assert result.exit_code == 1
    assert "has no nos schema; run `nos db upgrade`" in result.output


def test_a_database_from_a_newer_nos_is_refused(migrated_url):
    engine = create_engine(resolve_url(migrated_url))
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = 'beef0002'"))
    engine.dispose()
    current = nos("db", "current", "--db", migrated_url)
    assert current.exit_code == 1
    assert "written by a newer nos" in current.output
    upgrade = nos("db", "upgrade", "--db", migrated_url)
    assert upgrade.exit_code == 2
    assert upgrade.output.startswith("Error: database ")
    assert "newer nos" in upgrade.output


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_missing_sqlite_file_is_a_one_line_error(tmp_path):
    line = one_line_error(nos("db", "current", "--db", f"sqlite:///{tmp_path}/none.db"))
    assert "no database at" in line
    assert "nos db upgrade" in line
    assert not (tmp_path / "none.db").exists()


def test_bad_urls_and_dead_servers_are_one_line_errors():
    assert "bad database URL" in one_line_error(nos("db", "upgrade", "--db", "nonsense"))
    assert "unsupported database 'mysql'" in one_line_error(nos("db", "current", "--db", "mysql://u@h/db"))
    line = one_line_error(nos("db", "upgrade", "--db", "postgresql://u@127.0.0.1:1/db"))
    assert "cannot open database postgresql+psycopg://u@127.0.0.1:1/db" in line


UNVERSIONED = ("holds nos's tables but no schema revision: it was made without `nos db upgrade`, or its "
               "alembic_version was dropped")


def test_nos_tables_without_a_revision_are_described_and_refused_unchanged(db_url):
    """Tables made by Base.metadata.create_all: nos said there was no schema and to run `nos db upgrade`,
    which then failed on the first table it found already there."""
    url = resolve_url(db_url)
    # On SQLite, as a script of the user's leaves it: in its default journal mode, not nos's WAL.
    engine = sa.create_engine(url) if url.get_backend_name() == "sqlite" else create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    before = written(url)

    current = nos("db", "current", "--db", db_url)
    assert current.exit_code == 1
    assert current.output.strip().endswith(UNVERSIONED)
    assert UNVERSIONED in one_line_error(nos("db", "upgrade", "--db", db_url))
    assert UNVERSIONED in one_line_error(nos("status", "--db", db_url))
    with pytest.raises(StoreError, match="no schema revision"):
        upgrade(url)
    assert written(url) == before
