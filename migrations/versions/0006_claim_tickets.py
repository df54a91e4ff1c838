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

A downgrade keeps the column (an older nos never reads it and its inserts
take the default), so that upgrading again never hands out a ticket twice:
each row goes on from the larger of its kept claims and its attempts.
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
    columns = {c['name'] for c in sa.inspect(op.get_bind()).get_columns('evaluations')}
    if 'claims' not in columns:
        op.add_column('evaluations', sa.Column('claims', sa.Integer(), nullable=False, server_default='0'))
    # A new column is all 0 and attempts >= 0: every row starts from its attempts, as it always has. A kept
    # column only goes up: its tickets were handed out before the downgrade.
    op.execute("UPDATE evaluations SET claims = attempts WHERE claims < attempts")


def downgrade() -> None:
    # Dropped, the tickets would start again from attempts, which can be lower, after the next upgrade:
    # a worker from before could then write under another's ticket.
    pass
