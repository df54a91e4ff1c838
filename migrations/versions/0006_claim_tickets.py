"""a claim's own ticket: evaluations.claims, which only grows

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

`evaluations.attempts` counts the claims held against `max_attempts`; a
claim lost to its driver's death is given back uncounted, so `attempts`
can go down. `evaluations.claims` counts every claim and never goes down:
it is the ticket a worker heartbeats and commits with, so a worker whose
claim was given back can never write over the next holder's, even where it
was wrongly thought gone. Existing rows start from their attempts.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('evaluations', sa.Column('claims', sa.Integer(), nullable=False, server_default='0'))
    op.execute("UPDATE evaluations SET claims = attempts")


def downgrade() -> None:
    op.drop_column('evaluations', 'claims')
