"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-27

The five tables, their indexes, and the views `leaderboard` and `run_progress`
for ad-hoc SQL. Written with dialect-neutral SQL: it runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One row per rule: its best scored evaluation over all runs, ties to the
# earliest. Written so that "ORDER BY reward DESC, evaluation_id LIMIT n" walks
# the reward index from the top and stops after n rules (milliseconds on
# 100,000 evaluations); reading the whole view checks every evaluation.
LEADERBOARD_VIEW = """
CREATE VIEW leaderboard AS
SELECT e.rule_id,
       (SELECT r.text FROM rules AS r WHERE r.id = e.rule_id) AS rule,
       (SELECT r.depth FROM rules AS r WHERE r.id = e.rule_id) AS depth,
       e.reward, e.test_acc, e.best_lr, e.id AS evaluation_id, e.run_id, e.task,
       (SELECT COUNT(*) FROM evaluations AS c
        WHERE c.rule_id = e.rule_id AND c.reward IS NOT NULL) AS evaluations
FROM evaluations AS e
WHERE e.reward IS NOT NULL
  AND e.id = (SELECT b.id FROM evaluations AS b
              WHERE b.rule_id = e.rule_id AND b.reward IS NOT NULL
              ORDER BY b.reward DESC, b.id LIMIT 1)
"""

# One row per run: how many of its evaluations stand in each status. Counts
# come from the (run_id, status) index, the best reward from (run_id, reward).
RUN_PROGRESS_VIEW = """
CREATE VIEW run_progress AS
SELECT runs.id AS run_id, runs.name, runs.status, runs.task,
       COALESCE(SUM(c.n), 0) AS total,
       COALESCE(SUM(CASE WHEN c.status = 'queued' THEN c.n END), 0) AS queued,
       COALESCE(SUM(CASE WHEN c.status = 'running' THEN c.n END), 0) AS running,
       COALESCE(SUM(CASE WHEN c.status = 'done' THEN c.n END), 0) AS done,
       COALESCE(SUM(CASE WHEN c.status = 'diverged' THEN c.n END), 0) AS diverged,
       COALESCE(SUM(CASE WHEN c.status = 'failed' THEN c.n END), 0) AS failed,
       COALESCE(SUM(CASE WHEN c.status = 'cached' THEN c.n END), 0) AS cached,
       (SELECT MAX(e.reward) FROM evaluations AS e WHERE e.run_id = runs.id) AS best_reward
FROM runs
LEFT JOIN (SELECT run_id, status, COUNT(*) AS n FROM evaluations GROUP BY run_id, status) AS c
       ON c.run_id = runs.id
GROUP BY runs.id, runs.name, runs.status, runs.task
"""


def upgrade() -> None:
    op.create_table('rules',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('depth', sa.Integer(), nullable=True),
    sa.Column('tokens', sa.JSON(), nullable=True),
    sa.Column('fingerprint', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rules')),
    sa.UniqueConstraint('text', name=op.f('uq_rules_text'))
    )
    op.create_index(op.f('ix_rules_fingerprint'), 'rules', ['fingerprint'], unique=False)
    op.create_index(op.f('ix_rules_hash'), 'rules', ['hash'], unique=False)

    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('task', sa.String(length=100), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('running', 'stopping', 'stopped', 'completed', 'failed')", name=op.f('ck_runs_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs'))
    )
    op.create_table('checkpoints',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('state', sa.JSON(), nullable=False),
    sa.Column('rng_state', sa.JSON(), nullable=False),
    sa.Column('blob', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_checkpoints_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_checkpoints')),
    sa.UniqueConstraint('run_id', 'step', name=op.f('uq_checkpoints_run_id_step'))
    )
    op.create_table('evaluations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('rule_id', sa.Integer(), nullable=False),
    sa.Column('batch', sa.Integer(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('task', sa.String(length=100), nullable=False),
    sa.Column('task_key', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('best_lr', sa.Float(), nullable=True),
    sa.Column('reward', sa.Float(), nullable=True),
    sa.Column('test_acc', sa.Float(), nullable=True),
    sa.Column('wall_seconds', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('cached_from', sa.Integer(), nullable=True),
    sa.CheckConstraint("status IN ('queued', 'running', 'done', 'diverged', 'failed', 'cached')", name=op.f('ck_evaluations_status')),
    sa.CheckConstraint('attempts >= 0', name=op.f('ck_evaluations_attempts')),
    sa.ForeignKeyConstraint(['cached_from'], ['evaluations.id'], name=op.f('fk_evaluations_cached_from_evaluations'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['rule_id'], ['rules.id'], name=op.f('fk_evaluations_rule_id_rules'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_evaluations_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations')),
    sa.UniqueConstraint('run_id', 'seq', name=op.f('uq_evaluations_run_id_seq'))
    )
    op.create_index('ix_evaluations_rule_id_reward', 'evaluations', ['rule_id', 'reward'], unique=False)
    op.create_index('ix_evaluations_run_id_batch', 'evaluations', ['run_id', 'batch'], unique=False)
    op.create_index('ix_evaluations_run_id_status', 'evaluations', ['run_id', 'status'], unique=False)
    op.create_index('ix_evaluations_reward', 'evaluations', ['reward'], unique=False)
    op.create_index('ix_evaluations_run_id_reward', 'evaluations', ['run_id', 'reward'], unique=False)
    op.create_index('ix_evaluations_task_reward', 'evaluations', ['task', 'reward'], unique=False)

    op.create_table('lr_trials',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('evaluation_id', sa.Integer(), nullable=False),
    sa.Column('lr', sa.Float(), nullable=False),
    sa.Column('val_acc', sa.Float(), nullable=True),
    sa.Column('train_loss', sa.Float(), nullable=True),
    sa.Column('diverged', sa.Boolean(), nullable=False),
    sa.Column('wall_seconds', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['evaluation_id'], ['evaluations.id'], name=op.f('fk_lr_trials_evaluation_id_evaluations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lr_trials')),
    sa.UniqueConstraint('evaluation_id', 'lr', name=op.f('uq_lr_trials_evaluation_id_lr'))
    )
    op.execute(LEADERBOARD_VIEW)
    op.execute(RUN_PROGRESS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW run_progress")
    op.execute("DROP VIEW leaderboard")
    op.drop_table('lr_trials')
    op.drop_index('ix_evaluations_task_reward', table_name='evaluations')
    op.drop_index('ix_evaluations_run_id_reward', table_name='evaluations')
    op.drop_index('ix_evaluations_reward', table_name='evaluations')
    op.drop_index('ix_evaluations_run_id_status', table_name='evaluations')
    op.drop_index('ix_evaluations_run_id_batch', table_name='evaluations')
    op.drop_index('ix_evaluations_rule_id_reward', table_name='evaluations')
    op.drop_table('evaluations')
    op.drop_table('checkpoints')
    op.drop_table('runs')
    op.drop_index(op.f('ix_rules_hash'), table_name='rules')
    op.drop_index(op.f('ix_rules_fingerprint'), table_name='rules')
    op.drop_table('rules')
