"""rejections: a rule refused before training, and why

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

A rule whose update on the probe problem is all zero, non-finite or blind to
the gradient is not trained: its evaluation ends `rejected` with reward 0 and
the reason in `evaluations.reason`. A fingerprint hit reuses an equivalent
rule's evaluation and says so in `reason` too. `run_progress` gains a
`rejected` column.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from alembic.util import CommandError

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "status IN ('queued', 'running', 'done', 'diverged', 'failed', 'cached')"
NEW_STATUSES = "status IN ('queued', 'running', 'done', 'diverged', 'failed', 'cached', 'rejected')"


def _run_progress_view(statuses: Sequence[str]) -> str:
    counts = ",\n       ".join(
        f"COALESCE(SUM(CASE WHEN c.status = '{s}' THEN c.n END), 0) AS {s}" for s in statuses)
    return f"""
CREATE VIEW run_progress AS
SELECT runs.id AS run_id, runs.name, runs.status, runs.task,
       COALESCE(SUM(c.n), 0) AS total,
       {counts},
       (SELECT MAX(e.reward) FROM evaluations AS e WHERE e.run_id = runs.id) AS best_reward
FROM runs
LEFT JOIN (SELECT run_id, status, COUNT(*) AS n FROM evaluations GROUP BY run_id, status) AS c
       ON c.run_id = runs.id
GROUP BY runs.id, runs.name, runs.status, runs.task
"""


def _leaderboard_view() -> str:
    # Unchanged, but SQLite's table rebuild needs views on the table dropped first.
    from importlib import import_module
    return import_module("nos.migrations.versions.0001_initial_schema").LEADERBOARD_VIEW


def _rebuild(check: str, add_reason: bool) -> None:
    op.execute("DROP VIEW run_progress")
    op.execute("DROP VIEW leaderboard")
    with op.batch_alter_table('evaluations') as batch:
        batch.drop_constraint(op.f('ck_evaluations_status'), type_='check')
        batch.create_check_constraint('status', check)
        if add_reason:
            batch.add_column(sa.Column('reason', sa.Text(), nullable=True))
        else:
            batch.drop_column('reason')
    op.execute(_leaderboard_view())


def upgrade() -> None:
    _rebuild(NEW_STATUSES, add_reason=True)
    op.execute(_run_progress_view(('queued', 'running', 'done', 'diverged', 'failed', 'cached', 'rejected')))


def downgrade() -> None:
    _refuse_to_lose_rejections()
    op.execute("DELETE FROM evaluations WHERE status = 'rejected'")
    _rebuild(OLD_STATUSES, add_reason=False)
    op.execute(_run_progress_view(('queued', 'running', 'done', 'diverged', 'failed', 'cached')))


def _refuse_to_lose_rejections() -> None:
    # 0001 has no `rejected` status: a downgrade deletes those evaluations, and only on purpose.
    if context.get_x_argument(as_dictionary=True).get("force") == "1":
        return
    n = op.get_bind().exec_driver_sql("SELECT COUNT(*) FROM evaluations WHERE status = 'rejected'").scalar_one()
    if n:
        raise CommandError(f"a downgrade below revision 0002 would delete {n} rejected evaluation(s), which "
                           "revision 0001 cannot hold; nothing was changed; give `-x force=1` to delete them")
