"""What the tests of hostile input check of every refusal, and of what it left as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import sqlalchemy as sa

from nos.store import create_engine, resolve_url


def one_line_error(result, message: str) -> None:
    """Exit 2 with one error line saying `message` (click's usage lines above it aside), no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert message in errors[0], result.output


def written(url) -> object:
    """Everything a write could change: the SQLite folder's bytes, or every PostgreSQL table's rows."""
    parsed = resolve_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() == "sqlite":
        folder = Path(parsed.database).parent
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    engine = create_engine(parsed)
    try:
        with engine.connect() as connection:
            names = sorted(sa.inspect(connection).get_table_names())
            return {name: connection.exec_driver_sql(f'SELECT * FROM "{name}" ORDER BY 1').all() for name in names}
    finally:
        engine.dispose()
