"""transfer: rules trained on a larger network (`nos transfer`)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

`transfer_runs` holds one row per (rule, configuration, seed) trained on a
Wide ResNet, with the final and best validation and test accuracies;
`transfer_trials` its learning-rate sweep, `transfer_epochs` the final run
epoch by epoch, and `transfer_checkpoints` the latest snapshot of an
unfinished run, so that a crash loses no finished trial or epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from alembic.util import CommandError

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('transfer_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('rule_id', sa.Integer(), nullable=False),
    sa.Column('task', sa.String(length=100), nullable=False),
    sa.Column('model', sa.String(length=100), nullable=False),
    sa.Column('task_key', sa.String(length=64), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('device', sa.String(length=100), nullable=True),
    sa.Column('best_lr', sa.Float(), nullable=True),
    sa.Column('final_val', sa.Float(), nullable=True),
    sa.Column('final_test', sa.Float(), nullable=True),
    sa.Column('best_val', sa.Float(), nullable=True),
    sa.Column('best_test', sa.Float(), nullable=True),
    sa.Column('diverged', sa.Boolean(), nullable=True),
    sa.Column('wall_seconds', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('running', 'done', 'failed')", name=op.f('ck_transfer_runs_status')),
    sa.CheckConstraint('attempts >= 0', name=op.f('ck_transfer_runs_attempts')),
    sa.ForeignKeyConstraint(['rule_id'], ['rules.id'], name=op.f('fk_transfer_runs_rule_id_rules'),
                            ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_transfer_runs')),
    sa.UniqueConstraint('rule_id', 'task_key', 'seed', name=op.f('uq_transfer_runs_rule_id_task_key_seed'))
    )
    op.create_index('ix_transfer_runs_task_key_rule_id', 'transfer_runs', ['task_key', 'rule_id'], unique=False)

    op.create_table('transfer_trials',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('transfer_id', sa.Integer(), nullable=False),
    sa.Column('lr', sa.Float(), nullable=False),
    sa.Column('val_acc', sa.Float(), nullable=False),
    sa.Column('train_loss', sa.Float(), nullable=True),
    sa.Column('diverged', sa.Boolean(), nullable=False),
    sa.Column('epochs', sa.Integer(), nullable=False),
    sa.Column('steps', sa.Integer(), nullable=False),
    sa.Column('wall_seconds', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['transfer_id'], ['transfer_runs.id'],
                            name=op.f('fk_transfer_trials_transfer_id_transfer_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_transfer_trials')),
    sa.UniqueConstraint('transfer_id', 'lr', name=op.f('uq_transfer_trials_transfer_id_lr'))
    )

    op.create_table('transfer_epochs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('transfer_id', sa.Integer(), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('train_loss', sa.Float(), nullable=True),
    sa.Column('val_acc', sa.Float(), nullable=False),
    sa.Column('test_acc', sa.Float(), nullable=False),
    sa.Column('diverged', sa.Boolean(), nullable=False),
    sa.Column('wall_seconds', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['transfer_id'], ['transfer_runs.id'],
                            name=op.f('fk_transfer_epochs_transfer_id_transfer_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_transfer_epochs')),
    sa.UniqueConstraint('transfer_id', 'epoch', name=op.f('uq_transfer_epochs_transfer_id_epoch'))
    )

    op.create_table('transfer_checkpoints',
    sa.Column('transfer_id', sa.Integer(), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('blob', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['transfer_id'], ['transfer_runs.id'],
                            name=op.f('fk_transfer_checkpoints_transfer_id_transfer_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('transfer_id', name=op.f('pk_transfer_checkpoints'))
    )


TRANSFER_TABLES = ('transfer_runs', 'transfer_trials', 'transfer_epochs', 'transfer_checkpoints')


def downgrade() -> None:
    _refuse_to_lose_transfers()
    op.drop_table('transfer_checkpoints')
    op.drop_table('transfer_epochs')
    op.drop_table('transfer_trials')
    op.drop_index('ix_transfer_runs_task_key_rule_id', table_name='transfer_runs')
    op.drop_table('transfer_runs')


def _refuse_to_lose_transfers() -> None:
    # Every `nos transfer` result lives in these tables: a downgrade deletes them, and only on purpose.
    if context.get_x_argument(as_dictionary=True).get("force") == "1":
        return
    bind = op.get_bind()
    n = sum(bind.exec_driver_sql(f"SELECT COUNT(*) FROM {table}").scalar_one() for table in TRANSFER_TABLES)
    if n:
        raise CommandError(f"a downgrade below revision 0003 would delete {n} row(s) of `nos transfer` results "
                           f"({', '.join(TRANSFER_TABLES)}); nothing was changed; give `-x force=1` to delete them")
