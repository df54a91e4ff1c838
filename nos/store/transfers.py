"""Transfer runs (`nos transfer`): a rule on a larger network, stored as it trains.

A transfer run is keyed by (rule, task_key, seed). The process that trains it
takes it with `open_transfer`, which bumps `attempts`; the new number is its
ticket, and every later write (`record_trial`, `record_epoch`,
`finish_transfer`, `fail_transfer`) happens only while the row is unfinished
under that ticket, so if a second process took the run over, the first one's
late writes are refused. Each write is one short transaction: a crash loses
only the trial or epoch in progress.

    with store.transaction() as session:
        opened = open_transfer(session, rule_id, task="fashion-mnist", model="wrn-16-4", task_key=key,
                               config=config, seed=0, device="cpu")
    if opened.done: ...                   # stored result: read it with load_transfer
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ..finite import is_finite_number
from ..records import EpochRecord, TransferResult, TrialRecord
from ..redact import mask_credentials
from .clock import database_now
from .models import TransferCheckpoint, TransferEpoch, TransferRun, TransferTrial
from .queries import DamagedRow, read_naming_damage

transfer_runs = TransferRun.__table__
transfer_trials = TransferTrial.__table__
transfer_epochs = TransferEpoch.__table__
transfer_checkpoints = TransferCheckpoint.__table__
# The columns of a finished run that hold its TransferResult's figures.
_FIGURES = ("best_lr", "final_val", "final_test", "best_val", "best_test", "diverged", "wall_seconds")
# The numbers a result is built from when read back; each is a finite number wherever nos wrote it.
_TRIAL_NUMBERS = ("lr", "val_acc", "train_loss", "wall_seconds", "epochs", "steps")
_EPOCH_NUMBERS = ("epoch", "train_loss", "val_acc", "test_acc", "wall_seconds")
# The column `device` is; a run continued on ever more devices keeps the ones it named first.
_DEVICE_CHARS = 100


class DamagedTransfer(DamagedRow):
    """A transfer run's stored value has a shape nos never writes (edited by hand or by another tool, or a damaged
    file): named, rather than shown as a figure or failing the summary with a traceback."""

    def __init__(self, transfer_id: int, column: str, problem: str):
        super().__init__(transfer_id, column, problem)
        # Not `run N`: that names a search run, whose ids are another table's.
        self.args = (f"transfer run {transfer_id} is damaged in the database: {column} {problem}",)


@dataclass(frozen=True)
class OpenedTransfer:
    """What `open_transfer` found: the run's id, the ticket to train it (None: it is done), and the device(s) its
    stored numbers come from once this process trains it (`a+b`: continued on b after work stored on a)."""

    id: int
    attempt: int | None
    device: str | None = None

    @property
    def done(self) -> bool:
        return self.attempt is None


@dataclass
class StoredTransfer:
    """A transfer run as stored: the row, its sweep and epochs in order, and its snapshot if unfinished."""

    run: TransferRun
    trials: list[TrialRecord] = field(default_factory=list)
    epochs: list[EpochRecord] = field(default_factory=list)
    # nos.tasks.transfer.snapshot's bytes (nos.tensor_state: no pickle), read by read_snapshot
    checkpoint: bytes | None = None
    checkpoint_epoch: int | None = None


def open_transfer(session: Session, rule_id: int, *, task: str, model: str, task_key: str, config: dict[str, Any],
                  seed: int, device: str, now: datetime | None = None) -> OpenedTransfer:
    """Find or create the run of (rule, task_key, seed); take it unless it is done.

    Safe when several processes open the same run at once (INSERT ... ON
    CONFLICT DO NOTHING, then one conditional UPDATE): the last to open holds it.
    """
    now = now or database_now(session)
    dialect = session.get_bind().dialect.name
    insert_ = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(TransferRun)
    session.execute(insert_.on_conflict_do_nothing(index_elements=["rule_id", "task_key", "seed"]), [dict(
        rule_id=rule_id, task=task, model=model, task_key=task_key, config=config, seed=seed, status="running",
        attempts=0, device=device, created_at=now, updated_at=now)])
    key = and_(transfer_runs.c.rule_id == rule_id, transfer_runs.c.task_key == task_key,
               transfer_runs.c.seed == seed)
    taken = session.execute(
        update(transfer_runs).where(key, transfer_runs.c.status != "done")
        .values(status="running", attempts=transfer_runs.c.attempts + 1, updated_at=now, error=None)
        .returning(transfer_runs.c.id, transfer_runs.c.attempts, transfer_runs.c.device)
    ).one_or_none()
    if taken is None:
        return OpenedTransfer(session.execute(select(transfer_runs.c.id).where(key)).scalar_one(), None)
    trained_on = _trained_on(session, taken.id, taken.device, device)
    session.execute(update(transfer_runs).where(transfer_runs.c.id == taken.id).values(device=trained_on))
    return OpenedTransfer(taken.id, taken.attempts, trained_on)


def _trained_on(session: Session, transfer_id: int, stored: str | None, device: str) -> str:
    """The devices the run's numbers will come from: `device`, after those its stored trials and epochs came from.

    A run swept on one device and continued on another is neither's alone: its row says both, in order.
    """
    work = session.execute(select(
        select(transfer_trials.c.id).where(transfer_trials.c.transfer_id == transfer_id).exists()
        | select(transfer_epochs.c.id).where(transfer_epochs.c.transfer_id == transfer_id).exists())).scalar_one()
    devices = stored.split("+") if stored and work else []
    if device not in devices:
        devices.append(device)
    joined = "+".join(devices)
    return joined if len(joined) <= _DEVICE_CHARS else str(stored)


def load_transfer(session: Session, transfer_id: int, *, with_checkpoint: bool = True) -> StoredTransfer:
    """The run, its trials (by lr), its epochs (in order) and, unless asked not to, its snapshot.

    DamagedTransfer (a DamagedRow) if a stored value is one nos never writes: one its column's type cannot
    convert, or a figure that is not a finite number.
    """
    runs = _read(session, transfer_id, TransferRun, TransferRun.id == transfer_id, TransferRun.id)
    if not runs:
        raise LookupError(f"no transfer run {transfer_id}")
    run = runs[0]
    _check_numbers(transfer_id, "transfer_runs.best_lr", best_lr=run.best_lr)
    trials, epochs = [], []
    for t in _read(session, transfer_id, TransferTrial, TransferTrial.transfer_id == transfer_id, TransferTrial.lr):
        _check_numbers(transfer_id, f"transfer_trials.{{}} of lr {t.lr!r:.30}", **_values(t, _TRIAL_NUMBERS))
        trials.append(TrialRecord(t.lr, t.val_acc, t.train_loss, t.diverged, t.wall_seconds, t.epochs, t.steps))
    for e in _read(session, transfer_id, TransferEpoch, TransferEpoch.transfer_id == transfer_id,
                   TransferEpoch.epoch):
        _check_numbers(transfer_id, f"transfer_epochs.{{}} of epoch {e.epoch!r:.30}", **_values(e, _EPOCH_NUMBERS))
        epochs.append(EpochRecord(e.epoch, e.train_loss, e.val_acc, e.test_acc, e.diverged, e.wall_seconds))
    stored = StoredTransfer(run, trials, epochs)
    if with_checkpoint:
        row = session.execute(select(transfer_checkpoints.c.epoch, transfer_checkpoints.c.blob)
                              .where(transfer_checkpoints.c.transfer_id == transfer_id)).one_or_none()
        if row is not None:
            stored.checkpoint_epoch, stored.checkpoint = row.epoch, bytes(row.blob)
    return stored


def _read(session: Session, transfer_id: int, model: type, where: Any, order: Any) -> list:
    """The rows of `model` that `where` selects; DamagedTransfer names a value its column's type cannot convert."""
    return read_naming_damage(
        session, lambda: list(session.execute(select(model).where(where).order_by(order)).scalars()),
        list(model.__table__.columns), [where],
        lambda column, _, problem: DamagedTransfer(transfer_id, f"{model.__tablename__}.{column.name}", problem))


def _values(row: Any, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(row, name) for name in names}


def _check_numbers(transfer_id: int, column: str, **numbers: Any) -> None:
    """DamagedTransfer naming the first of `numbers` that is neither None nor a finite number: an infinity
    would print as a figure, break the JSON and the spread over seeds, and text would fail the arithmetic.

    `column` names where they are stored, with {} for the number's name if it holds one."""
    for name, value in numbers.items():
        if value is not None and not is_finite_number(value):
            raise DamagedTransfer(transfer_id, column.format(name), f"holds {value!r:.60}, not a finite number")


def _hold(session: Session, transfer_id: int, attempt: int, now: datetime, **values: Any) -> bool:
    """Touch the row if `attempt` still holds it (unfinished, latest ticket); False means: stop writing."""
    result = session.execute(
        update(transfer_runs)
        .where(transfer_runs.c.id == transfer_id, transfer_runs.c.attempts == attempt,
               transfer_runs.c.status == "running")
        .values(updated_at=now, **values))
    return result.rowcount == 1


def record_trial(session: Session, transfer_id: int, attempt: int, trial: TrialRecord, *,
                 now: datetime | None = None) -> bool:
    """Store a sweep trial, if `attempt` holds the run; False (nothing written) if it does not."""
    if not _hold(session, transfer_id, attempt, now or database_now(session)):
        return False
    session.execute(insert(transfer_trials), [dict(transfer_id=transfer_id, **asdict(trial))])
    return True


def record_epoch(session: Session, transfer_id: int, attempt: int, epoch: EpochRecord, checkpoint: bytes, *,
                 now: datetime | None = None) -> bool:
    """Store an epoch of the final run with the snapshot after it (replacing the previous snapshot).

    Epochs after this one left by an earlier attempt (which could only have
    come from a different run of the same numbers) are removed first.
    """
    now = now or database_now(session)
    if not _hold(session, transfer_id, attempt, now):
        return False
    session.execute(delete(transfer_epochs).where(transfer_epochs.c.transfer_id == transfer_id,
                                                  transfer_epochs.c.epoch >= epoch.epoch))
    session.execute(insert(transfer_epochs), [dict(transfer_id=transfer_id, **asdict(epoch))])
    session.execute(delete(transfer_checkpoints).where(transfer_checkpoints.c.transfer_id == transfer_id))
    session.execute(insert(transfer_checkpoints), [dict(transfer_id=transfer_id, epoch=epoch.epoch, blob=checkpoint,
                                                        created_at=now)])
    return True


def restart_final(session: Session, transfer_id: int, attempt: int, *, now: datetime | None = None) -> bool:
    """Forget the final run's epochs and snapshot (it will be trained again from its start)."""
    if not _hold(session, transfer_id, attempt, now or database_now(session)):
        return False
    session.execute(delete(transfer_epochs).where(transfer_epochs.c.transfer_id == transfer_id))
    session.execute(delete(transfer_checkpoints).where(transfer_checkpoints.c.transfer_id == transfer_id))
    return True


def finish_transfer(session: Session, transfer_id: int, attempt: int, result: TransferResult, *,
                    now: datetime | None = None) -> bool:
    """Store the result: the run's figures, the epochs not stored yet; the snapshot is dropped."""
    now = now or database_now(session)
    figures = {name: getattr(result, name) for name in _FIGURES}
    if not _hold(session, transfer_id, attempt, now, status="done", finished_at=now, error=None, **figures):
        return False
    stored = session.execute(select(func.max(transfer_epochs.c.epoch))
                             .where(transfer_epochs.c.transfer_id == transfer_id)).scalar_one() or 0
    rows = [dict(transfer_id=transfer_id, **asdict(e)) for e in result.epochs if e.epoch > stored]
    if rows:
        session.execute(insert(transfer_epochs), rows)
    session.execute(delete(transfer_checkpoints).where(transfer_checkpoints.c.transfer_id == transfer_id))
    return True


def fail_transfer(session: Session, transfer_id: int, attempt: int, error: str, *,
                  now: datetime | None = None) -> bool:
    """Mark the run failed with `error` (its trials, epochs and snapshot stay: a re-run continues it)."""
    now = now or database_now(session)
    return _hold(session, transfer_id, attempt, now, status="failed", error=mask_credentials(error), finished_at=now)


def transfer_runs_of(session: Session, task_key: str, rule_ids: Sequence[int] | None = None,
                     seeds: Sequence[int] | None = None) -> list[TransferRun]:
    """The runs under one configuration, optionally only these rules and seeds, by rule then seed."""
    query = select(TransferRun).where(TransferRun.task_key == task_key)
    if rule_ids is not None:
        query = query.where(TransferRun.rule_id.in_(list(rule_ids)))
    if seeds is not None:
        query = query.where(TransferRun.seed.in_(list(seeds)))
    return list(session.execute(query.order_by(TransferRun.rule_id, TransferRun.seed)).scalars())


__all__ = [
    "DamagedTransfer", "OpenedTransfer", "StoredTransfer",
    "fail_transfer", "finish_transfer", "load_transfer", "open_transfer", "record_epoch", "record_trial",
    "restart_final", "transfer_runs_of",
]
