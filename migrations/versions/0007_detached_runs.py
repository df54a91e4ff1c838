"""detached runs: when their driver loop was last sent to the control queue, and how often

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

`runs.drive_sent_at` is set when a run is handed to control workers
(`nos enqueue --detach`, `nos resume --detach`) and each time a control
worker sends its driver loop again because the run was left without a
driver; NULL for a run driven in the foreground. `runs.drive_sends` counts
the sends again since the user's last: each doubles the wait before the
next. Existing runs start in the foreground: a detached one is handed back
to control workers by `nos resume RUN_ID --detach`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN on both databases: SQLite needs no table rebuild for it.
    op.add_column('runs', sa.Column('drive_sent_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('runs', sa.Column('drive_sends', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    op.drop_column('runs', 'drive_sends')
    op.drop_column('runs', 'drive_sent_at')
