"""The migrations' own view of the schema."""

from __future__ import annotations

from nos.store.schema import migrations_dir


def schema_state_head() -> str:
    """The head revision of nos's migrations."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(migrations_dir())).get_current_head()
