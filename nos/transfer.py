"""`nos transfer`'s work: train rules on a larger network, store every step, summarize as the paper's Table 1.

    store = open_store(url)
    task = transfer_task("fashion-mnist", "wrn-16-4", epochs=10)
    outcome = run_transfer(store, "powersign", task, seed=0)     # trains, or reads the stored result
    rows = summarize([outcome.result, ...])                     # mean and spread over seeds per rule

A (rule, configuration, seed) is trained once: a second call reads the
stored result back. A call that finds the run unfinished (a crash, Ctrl-C, a
failure) keeps its stored sweep trials and continues the final run from the
snapshot after its last stored epoch, which gives the numbers an
uninterrupted run gives. A snapshot it cannot continue from (damaged, or
written by an earlier nos with torch.save, which is never unpickled) is
dropped, and the final run is trained again from its start: the same numbers,
later.
"""

from __future__ import annotations

import dataclasses
import statistics
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .optim import resolve_rule
from .records import EpochRecord, TransferResult, TrialRecord
from .rules import Node, to_text
from .store import (
    Store,
    StoredTransfer,
    fail_transfer,
    finish_transfer,
    get_or_create_rule,
    load_transfer,
    open_transfer,
    record_epoch,
    record_trial,
    restart_final,
)
from .tasks.base import Task
from .tasks.transfer import SnapshotUnreadable, read_snapshot, train_transfer


class TransferSuperseded(RuntimeError):
    """Another process took this transfer run over; this one stopped without writing more."""


@dataclass
class TransferRunOutcome:
    """A rule's result on one seed, and whether it was read from the database rather than trained."""

    transfer_id: int
    result: TransferResult
    reused: bool
    resumed: bool = False   # continued an unfinished run (stored trials or epochs)


def run_transfer(store: Store, rule: str | Node, task: Task, seed: int = 0, *,
                 on_trial: Callable[[TrialRecord], None] | None = None,
                 on_epoch: Callable[[EpochRecord], None] | None = None) -> TransferRunOutcome:
    """Train `rule` on `task`'s network with `seed`, storing as it goes; or read the stored result.

    on_trial / on_epoch see each newly trained sweep trial and epoch (after it is stored).
    Raises TransferSuperseded when another process took the run over meanwhile.
    """
    tree = resolve_rule(rule)
    text = to_text(tree)
    key, device = task.config_key(), str(task.device)
    with store.transaction() as session:
        rule_id = get_or_create_rule(session, tree)
        opened = open_transfer(session, rule_id, task=task.name, model=task.options.get("model", ""), task_key=key,
                               config=task.to_dict(), seed=seed, device=device)
        stored = load_transfer(session, opened.id, with_checkpoint=not opened.done)
    trials, epochs = stored.trials, stored.epochs
    if opened.done:
        return TransferRunOutcome(opened.id, TransferResult.build(text, task, seed, trials, stored.run.best_lr,
                                                                  epochs, stored.run.device or device), True)

    transfer_id, attempt = opened.id, opened.attempt
    resume = _continuable(stored, task)
    if resume is None and (epochs or stored.checkpoint is not None):
        epochs = []
        _write(store, lambda s: restart_final(s, transfer_id, attempt))

    def trial_done(record: TrialRecord) -> None:
        _write(store, lambda s: record_trial(s, transfer_id, attempt, record))
        if on_trial:
            on_trial(record)

    def epoch_done(record: EpochRecord, make_snapshot: Callable[[], bytes]) -> None:
        # The last epoch (or a diverged one) is stored with the result; the others with a snapshot.
        if record.epoch < task.epochs and not record.diverged:
            blob = make_snapshot()
            _write(store, lambda s: record_epoch(s, transfer_id, attempt, record, blob))
        if on_epoch:
            on_epoch(record)

    try:
        result = train_transfer(tree, task, seed, trials_done=trials, epochs_done=epochs, resume=resume,
                                on_trial=trial_done, on_epoch=epoch_done)
    except TransferSuperseded:
        raise
    except Exception as exc:
        error = "".join(traceback.format_exception(exc, limit=-3))[-4000:]
        with store.transaction() as session:
            fail_transfer(session, transfer_id, attempt, error)
        raise
    # Where the stored numbers come from: `cpu+cuda` for a run swept on one and finished on the other.
    result = dataclasses.replace(result, device=opened.device or device)
    _write(store, lambda s: finish_transfer(s, transfer_id, attempt, result))
    return TransferRunOutcome(transfer_id, result, False, resumed=bool(stored.trials))


def _continuable(stored: StoredTransfer, task: Task) -> dict[str, Any] | None:
    """The stored snapshot, read, if the final run can continue from it; None: train the final run again.

    It cannot continue from a snapshot without the whole sweep stored or of another epoch than the
    last one stored, nor from one that cannot be read (damaged, or torch.save's zip of an earlier nos,
    which is never unpickled). A snapshot saves time only: the run trained again gives the same numbers.
    """
    if stored.checkpoint is None or len(stored.trials) < len(task.lrs) or stored.checkpoint_epoch != len(stored.epochs):
        return None
    try:
        return read_snapshot(stored.checkpoint)
    except SnapshotUnreadable:
        return None


def _write(store: Store, write: Callable) -> None:
    with store.transaction() as session:
        if not write(session):
            raise TransferSuperseded("another process took this transfer run over; stopped without writing")


@dataclass
class Stat:
    """Mean and sample standard deviation over seeds (std None with one seed)."""

    mean: float
    std: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        values = list(values)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)

    def format(self, digits: int = 4) -> str:
        return f"{self.mean:.{digits}f}" + ("" if self.std is None else f" ± {self.std:.{digits}f}")


@dataclass
class SummaryRow:
    """One rule of the Table: its results over seeds."""

    rule: str
    seeds: list[int]
    best_lrs: list[float | None]
    final_val: Stat
    final_test: Stat
    best_val: Stat
    best_test: Stat
    test_at_best_val: Stat
    diverged: int
    wall_seconds: float


def at_best_val(epochs: Sequence[EpochRecord]) -> float:
    """Test accuracy after the epoch of best validation accuracy, the earliest of equals (0.0 without epochs).

    Early stopping's figure: validation picks the epoch, unlike best test, which test picks.
    """
    best = max(epochs, key=lambda e: e.val_acc, default=None)   # max keeps the first of equals
    return best.test_acc if best is not None else 0.0


def summarize(results: Sequence[TransferResult]) -> list[SummaryRow]:
    """Group by rule (in first-seen order): mean ± std over seeds of the Table 1 columns and test at best val."""
    by_rule: dict[str, list[TransferResult]] = {}
    for r in results:
        by_rule.setdefault(r.rule, []).append(r)
    rows = []
    for rule, group in by_rule.items():
        group = sorted(group, key=lambda r: r.seed)
        rows.append(SummaryRow(
            rule=rule, seeds=[r.seed for r in group], best_lrs=[r.best_lr for r in group],
            final_val=Stat.of(r.final_val for r in group), final_test=Stat.of(r.final_test for r in group),
            best_val=Stat.of(r.best_val for r in group), best_test=Stat.of(r.best_test for r in group),
            test_at_best_val=Stat.of(at_best_val(r.epochs) for r in group),
            diverged=sum(r.diverged for r in group), wall_seconds=sum(r.wall_seconds for r in group)))
    return rows


__all__ = ["Stat", "SummaryRow", "TransferRunOutcome", "TransferSuperseded", "at_best_val", "run_transfer",
           "summarize"]
