"""driver lease: one driver per run

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

`runs.driver` names the process driving the run ("host:pid") and
`runs.driver_heartbeat_at` when it last said it is alive. A second driver
of the same run is refused while the lease is live; a driver that died
leaves a lease that goes stale, and `nos resume` takes it over.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN on both databases: SQLite needs no table rebuild for it.
    op.add_column('runs', sa.Column('driver', sa.String(length=200), nullable=True))
    op.add_column('runs', sa.Column('driver_heartbeat_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # SQLite 3.35+ drops a column in place; no view reads these two.
    op.drop_column('runs', 'driver_heartbeat_at')
    op.drop_column('runs', 'driver')
