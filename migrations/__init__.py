"""Alembic migrations (installed as nos.migrations)."""
