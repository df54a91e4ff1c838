"""What training a rule produces, as plain data: one set of records for the tasks, the store and the CLI.

    TrialRecord     one learning rate: a sweep trial, or the final run at the best rate
    EvaluationResult a rule's evaluation by the protocol (`nos.tasks.evaluate_rule`)
    EpochRecord     one epoch of a transfer run's final run
    TransferResult  a rule trained on a larger network (`nos.tasks.transfer.train_transfer`)

No torch here: the store writes these and reads them back, and the CLI and
reports print them, without importing a network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tasks.base import Task


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrialRecord(_Record):
    """One training run at one learning rate.

    val_acc is 0 when diverged, None when successive halving stopped the
    trial before it was scored; train_loss is the mean loss of the last epoch
    trained (None when diverged); steps counts optimizer steps taken. The
    store keeps epochs and steps for transfer runs only (0 when read back
    from an evaluation's sweep).
    """

    lr: float
    val_acc: float | None
    train_loss: float | None
    diverged: bool
    wall_seconds: float | None
    epochs: int = 0
    steps: int = 0


@dataclass(kw_only=True)
class EvaluationResult(_Record):
    """A rule's evaluation: the sweep, the best rate, the reward and the held-out test accuracy.

    `diverged`: every rate diverged (reward 0; stored as status 'diverged').
    `final` is the long run at best_lr (None when every rate diverged); when
    it continued a sweep trial its wall_seconds covers only the extra epochs.
    Which rule, task and seed it was may be left out where the reader knows
    them (the store files a result under the evaluation it answers).
    """

    rule: str = ""
    task: str = ""
    task_key: str = ""
    seed: int = 0
    trials: list[TrialRecord] = field(default_factory=list)
    best_lr: float | None
    reward: float
    test_acc: float | None
    diverged: bool = False
    wall_seconds: float
    final: TrialRecord | None = None
    device: str = "cpu"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        data = dict(data)
        data["trials"] = [TrialRecord(**t) for t in data["trials"]]
        data["final"] = TrialRecord(**data["final"]) if data.get("final") else None
        return cls(**data)


@dataclass
class EpochRecord(_Record):
    """One epoch of a transfer run's final run: validation and test accuracy after it (0 when diverged).

    wall_seconds covers the epoch's training and both scorings; for an epoch
    that continued a sweep trial (epoch 1, usually) the training seconds are
    the trial's, and only the test scoring is counted here.
    """

    epoch: int
    train_loss: float | None
    val_acc: float
    test_acc: float
    diverged: bool
    wall_seconds: float


@dataclass
class TransferResult(_Record):
    """A rule trained on a larger network: the sweep, the best rate and the final run epoch by epoch."""

    rule: str
    task: str
    model: str
    task_key: str
    seed: int
    trials: list[TrialRecord]
    best_lr: float | None
    epochs: list[EpochRecord]
    final_val: float
    final_test: float
    best_val: float
    best_test: float
    diverged: bool
    wall_seconds: float
    device: str = "cpu"
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransferResult:
        data = dict(data)
        data["trials"] = [TrialRecord(**t) for t in data["trials"]]
        data["epochs"] = [EpochRecord(**e) for e in data["epochs"]]
        return cls(**data)

    @classmethod
    def build(cls, rule: str, task: Task, seed: int, trials: list[TrialRecord], best_lr: float | None,
              epochs: list[EpochRecord], device: str) -> TransferResult:
        """The result's figures from its sweep and epochs (also how a stored result is read back)."""
        last = epochs[-1] if epochs else None
        return cls(
            rule=rule, task=task.name, model=task.options.get("model", ""), task_key=task.config_key(), seed=seed,
            trials=trials, best_lr=best_lr, epochs=epochs,
            final_val=last.val_acc if last else 0.0,
            final_test=last.test_acc if last else 0.0,
            best_val=max((e.val_acc for e in epochs), default=0.0),
            best_test=max((e.test_acc for e in epochs), default=0.0),
            diverged=last is None or last.diverged,
            wall_seconds=sum(t.wall_seconds for t in trials) + sum(e.wall_seconds for e in epochs),
            device=device, config=task.to_dict(),
        )


__all__ = ["EpochRecord", "EvaluationResult", "TransferResult", "TrialRecord"]
