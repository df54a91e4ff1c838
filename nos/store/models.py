"""The tables, as SQLAlchemy 2.x typed models.

The schema itself is created and changed only by Alembic (migrations/); these
models must match the latest revision exactly, which a test checks with
autogenerate. Constraints carry the "nothing counted twice" guarantees:
rule text is unique, an evaluation's seq is unique within its run, a learning
rate is tried at most once per evaluation, a checkpoint step once per run.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

RUN_STATUSES = ("running", "stopping", "stopped", "completed", "failed")
EVALUATION_STATUSES = ("queued", "running", "done", "diverged", "failed", "cached", "rejected")
# Waiting for a worker, or held by one.
PENDING_STATUSES = ("queued", "running")
# Trained by a worker, to the end or to divergence.
TRAINED_STATUSES = ("done", "diverged")
# Statuses whose reward is final: these count on the leaderboard.
SCORED_STATUSES = (*TRAINED_STATUSES, "cached", "rejected")
# Evaluations that will not change any more.
FINISHED_STATUSES = (*SCORED_STATUSES, "failed")
# What a run's budget counts: every evaluation but the rejected ones.
COUNTED_STATUSES = tuple(s for s in EVALUATION_STATUSES if s != "rejected")

# Deterministic constraint names on both databases, so migrations can name them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both databases.

    PostgreSQL stores `timestamptz`. SQLite has no time zones: values are stored
    as naive UTC text, which sorts and compares correctly as text, and come back
    tagged UTC. Naive datetimes are refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: nos stores timezone-aware UTC times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    """One search: its task, its configuration, where it stands."""

    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(_one_of("status", RUN_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    task: Mapped[str] = mapped_column(String(100))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The driver lease (store/leases.py): who drives the run, and when it last renewed the lease.
    driver: Mapped[str | None] = mapped_column(String(200))
    driver_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A detached run (store/detached.py): when its driver loop was last sent to the control queue (NULL: driven
    # in the foreground), and how many times control workers sent it again since the user last did.
    drive_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    drive_sends: Mapped[int] = mapped_column(Integer, server_default="0")


class Rule(Base):
    """An update rule, once, by its canonical text; shared by all runs."""

    __tablename__ = "rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text, unique=True)
    hash: Mapped[str] = mapped_column(String(64), index=True)
    # None when the rule is outside the controller's vocabulary (hand-written).
    depth: Mapped[int | None] = mapped_column(Integer)
    tokens: Mapped[list[int] | None] = mapped_column(JSON)
    # Hash of the rule's outputs on a fixed probe: functionally equal rules share it.
    fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Evaluation(Base):
    """One rule evaluated once on one task within a run: the unit a worker claims."""

    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint("run_id", "seq"),
        CheckConstraint(_one_of("status", EVALUATION_STATUSES), name="status"),
        CheckConstraint("attempts >= 0", name="attempts"),
        # Run progress: counts by status within a run, read from the index alone.
        Index("ix_evaluations_run_id_status", "run_id", "status"),
        Index("ix_evaluations_run_id_batch", "run_id", "batch"),
        # Leaderboard: scored evaluations in reward order, overall, per run, per task ...
        Index("ix_evaluations_reward", "reward"),
        Index("ix_evaluations_run_id_reward", "run_id", "reward"),
        Index("ix_evaluations_task_reward", "task", "reward"),
        # ... and each rule's best evaluation; also the cache lookup by rule.
        Index("ix_evaluations_rule_id_reward", "rule_id", "reward"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    rule_id: Mapped[int] = mapped_column(ForeignKey("rules.id", ondelete="RESTRICT"))
    batch: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(100))
    # Hash of the task's full configuration: a cached result is reused only under the same key.
    task_key: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)   # claims counted against max_attempts
    # Every claim, counted or given back: the ticket its holder heartbeats and commits with (never reused).
    claims: Mapped[int] = mapped_column(Integer, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    best_lr: Mapped[float | None] = mapped_column(Float)
    reward: Mapped[float | None] = mapped_column(Float)
    test_acc: Mapped[float | None] = mapped_column(Float)
    wall_seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    cached_from: Mapped[int | None] = mapped_column(ForeignKey("evaluations.id", ondelete="SET NULL"))
    # Why a rule was rejected without training, or which equivalent rule a fingerprint hit reused.
    reason: Mapped[str | None] = mapped_column(Text)
    # The token sequence the searcher sampled, and its log-probability under the policy that sampled it
    # (None for searchers without one): what an update learns from after the policy has moved on.
    tokens: Mapped[list[int] | None] = mapped_column(JSON)
    log_prob: Mapped[float | None] = mapped_column(Float)


class LrTrial(Base):
    """One learning rate of an evaluation's sweep."""

    __tablename__ = "lr_trials"
    __table_args__ = (UniqueConstraint("evaluation_id", "lr"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"))
    lr: Mapped[float] = mapped_column(Float)
    val_acc: Mapped[float | None] = mapped_column(Float)
    train_loss: Mapped[float | None] = mapped_column(Float)
    diverged: Mapped[bool] = mapped_column(Boolean)
    wall_seconds: Mapped[float | None] = mapped_column(Float)


class Checkpoint(Base):
    """The searcher's state after a step, so a run resumes where it stopped.

    `state` and `rng_state` are JSON; `blob` is the searcher's state in nos.tensor_state's format (a JSON
    header, then raw tensor bytes), never unpickled (docs/security.md).
    """

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    rng_state: Mapped[dict[str, Any]] = mapped_column(JSON)
    blob: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


# --- Transfer: rules trained on a larger network (`nos transfer`), revision 0003 ---

TRANSFER_STATUSES = ("running", "done", "failed")


class TransferRun(Base):
    """One rule trained on a larger network under one configuration and seed: `nos transfer`'s unit.

    (rule_id, task_key, seed) is unique: a second `nos transfer` of the same
    rule, configuration and seed reads this row instead of training again, and
    one that finds it unfinished continues it. `attempts` is the ticket of the
    process training it: writes are accepted only from the latest attempt.
    """

    __tablename__ = "transfer_runs"
    __table_args__ = (
        UniqueConstraint("rule_id", "task_key", "seed"),
        CheckConstraint(_one_of("status", TRANSFER_STATUSES), name="status"),
        CheckConstraint("attempts >= 0", name="attempts"),
        # A Table 1 reads every rule's runs under one configuration.
        Index("ix_transfer_runs_task_key_rule_id", "task_key", "rule_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule_id: Mapped[int] = mapped_column(ForeignKey("rules.id", ondelete="RESTRICT"))
    task: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(100))
    # Hash of `config` (task, model, grid, epochs, batch size, data sizes): results are reused only under it.
    task_key: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(100))
    best_lr: Mapped[float | None] = mapped_column(Float)
    final_val: Mapped[float | None] = mapped_column(Float)
    final_test: Mapped[float | None] = mapped_column(Float)
    best_val: Mapped[float | None] = mapped_column(Float)
    best_test: Mapped[float | None] = mapped_column(Float)
    diverged: Mapped[bool | None] = mapped_column(Boolean)
    wall_seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class TransferTrial(Base):
    """One learning rate of a transfer run's sweep, stored as soon as it is trained."""

    __tablename__ = "transfer_trials"
    __table_args__ = (UniqueConstraint("transfer_id", "lr"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transfer_id: Mapped[int] = mapped_column(ForeignKey("transfer_runs.id", ondelete="CASCADE"))
    lr: Mapped[float] = mapped_column(Float)
    val_acc: Mapped[float] = mapped_column(Float)
    train_loss: Mapped[float | None] = mapped_column(Float)
    diverged: Mapped[bool] = mapped_column(Boolean)
    epochs: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    wall_seconds: Mapped[float] = mapped_column(Float)


class TransferEpoch(Base):
    """One epoch of a transfer run's final training: validation and test accuracy after it."""

    __tablename__ = "transfer_epochs"
    __table_args__ = (UniqueConstraint("transfer_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transfer_id: Mapped[int] = mapped_column(ForeignKey("transfer_runs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_acc: Mapped[float] = mapped_column(Float)
    test_acc: Mapped[float] = mapped_column(Float)
    diverged: Mapped[bool] = mapped_column(Boolean)
    wall_seconds: Mapped[float] = mapped_column(Float)


class TransferCheckpoint(Base):
    """The latest snapshot of an unfinished transfer run's final training (weights, optimizer, data order).

    Written with each epoch's row, in the same transaction; deleted when the
    run finishes. Read back by nos.tasks.transfer.read_snapshot (nos.tensor_state), never unpickled.
    """

    __tablename__ = "transfer_checkpoints"

    transfer_id: Mapped[int] = mapped_column(ForeignKey("transfer_runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer)
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
