"""Another application's database is never written to: `nos enqueue` and `nos db upgrade` refuse it as it is."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from nos.cli.main import cli
from nos.store import create_engine, resolve_url

from helpers.cli import written
from helpers.driver import TINY_TOML

# An application of its own, with a `runs` table of its own (a name nos uses) and alembic at a revision
# that happens to be one of nos's own numbers.
FOREIGN = [
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR(50))",
    "INSERT INTO customers VALUES (1, 'Ada')",
    "CREATE TABLE runs (id INTEGER PRIMARY KEY, distance_km FLOAT)",
    "INSERT INTO runs VALUES (1, 5.5)",
]
FOREIGN_ALEMBIC = [
    "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)",
    "INSERT INTO alembic_version VALUES ('0001')",
]


def _execute(url: str, statements: list[str]) -> None:
    parsed = resolve_url(url)
    # SQLite as the other application left it: in its default journal mode, not nos's WAL.
    engine = sa.create_engine(parsed) if parsed.get_backend_name() == "sqlite" else create_engine(parsed)
    with engine.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)
    engine.dispose()


@pytest.mark.parametrize("alembic", [False, True], ids=["plain", "own-alembic"])
@pytest.mark.parametrize("command", ["enqueue", "db upgrade"])
def test_another_applications_database_is_refused_unchanged(db_url, tmp_path, command, alembic):
    _execute(db_url, FOREIGN + (FOREIGN_ALEMBIC if alembic else []))
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    before = written(db_url)
    args = ["enqueue", "--config", str(config)] if command == "enqueue" else ["db", "upgrade"]
    result = CliRunner().invoke(cli, [*args, "--db", db_url])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "holds another application's tables" in lines[0], result.output
    assert "customers" in lines[0]
    assert "a database of its own" in lines[0]
    assert written(db_url) == before   # not a table, a row, or SQLite's journal mode changed


def test_nos_db_current_says_whose_database_it_is(db_url):
    _execute(db_url, FOREIGN)
    result = CliRunner().invoke(cli, ["db", "current", "--db", db_url])
    assert result.exit_code == 1
    assert "holds another application's tables (customers, runs)" in result.output


def test_an_empty_sqlite_file_is_initialised(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    result = CliRunner().invoke(cli, ["db", "upgrade", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output, result.output
