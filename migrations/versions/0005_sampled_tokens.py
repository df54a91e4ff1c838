"""what the searcher sampled: each evaluation's token sequence and its log-probability

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

`evaluations.tokens` is the token sequence the searcher sampled (several
sequences decode to one rule, so the rule's own tokens are not it) and
`evaluations.log_prob` the log-probability the policy sampled it with (None
for searchers without one). The asynchronous driver learns from results
sampled by an older policy: PPO's ratio needs that policy's probability,
and a resumed driver reads it back from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('evaluations', sa.Column('tokens', sa.JSON(), nullable=True))
    op.add_column('evaluations', sa.Column('log_prob', sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column('evaluations', 'log_prob')
    op.drop_column('evaluations', 'tokens')
