"""Transfer: a rule on a larger network (a Wide ResNet), tuned by the same learning-rate sweep.

    task = transfer_task("fashion-mnist", "wrn-16-4", epochs=10)
    result = train_transfer("powersign", task, seed=0)
    result.final_val, result.final_test, result.best_val, result.best_test

The protocol is the child's (`nos.tasks.protocol`) with the paper's Table 1
bookkeeping: each rate of the grid trains a fresh network from the same
initial weights for one epoch; the best rate (the smallest of equals) trains for
`task.epochs`, and after every epoch of that run both validation and test
accuracy are measured. Final = after the last epoch; best = the highest over
the run's epochs (validation and test each on their own).

The run can stop and go on: `trials_done` are sweep trials already trained
(not trained again), and `resume` is a snapshot written after an epoch of the
final run (`on_epoch` hands out a function that makes one), from which
training continues exactly where it stopped: the same weights, optimizer
state, data order, optimizer noise and the child's own random draws (dropout),
so the numbers are those of an uninterrupted run. A snapshot is JSON and raw
tensor bytes (nos.tensor_state), never a pickle.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import torch

from ..optim import resolve_rule
from ..records import EpochRecord, TransferResult, TrialRecord
from ..rules import Node, to_text
from ..tensor_state import TensorStateError, from_bytes, to_bytes
from .base import Splits, Task, tensors_fingerprint
from .custom import normalized
from .registry import TASKS, get_task
from .training import Child, SequentialChildren, best_index, deterministic, initial_child, reads_schedule
from .wrn import model_name, parse_model, wide_resnet

# The data sets a Wide ResNet can read (images); the synthetic and digits tasks are for the small child.
TRANSFER_TASKS = ("fashion-mnist", "cifar10")
DEFAULT_MODEL = "wrn-16-4"
# The model of a task of your own trained with the network its factory builds.
OWN_CHILD = "own child"
DEFAULT_EPOCHS = 10


def transfer_task(name: str, model: str | None = None, *, device: str | torch.device = "cpu", lrs=None,
                  **options: Any) -> Task:
    """An image task whose child is the Wide ResNet `model` (wrn-D-K), or a task of your own; options as `get_task`'s.

    A task of your own (a factory, nos.tasks.custom) trains its own child unless `model` names a Wide
    ResNet, which needs image inputs. The model's name joins the task's options, so it is part of
    `config_key()`. `epochs` defaults to DEFAULT_EPOCHS (10) rather than the child's 5.
    """
    key = normalized(name)
    own = key not in TASKS
    if not own and key not in TRANSFER_TASKS:
        raise ValueError(f"transfer needs an image task ({', '.join(TRANSFER_TASKS)}) or a task of your own, "
                         f"got {name!r}")
    # An empty name is a mistake, not a request for the default model.
    depth_width = parse_model(DEFAULT_MODEL if model is None else model) if model is not None or not own else None
    if options.get("epochs") is None:
        options["epochs"] = DEFAULT_EPOCHS
    # Each rate's trial starts from the same weights and seed, so the grid's order changes no number:
    # sorted (as given, among the options, and as trained), a reordered --lrs has the same key, and the
    # paper's grid, sorted already, keeps its key.
    task = get_task(name if own else key, device=device, lrs=None if lrs is None else sorted(lrs), **options)
    task = dataclasses.replace(task, lrs=tuple(sorted(task.lrs)))
    if depth_width is None:
        return _identified(task, OWN_CHILD)
    depth, width = depth_width
    if task.splits.train_x.dim() != 4:
        raise ValueError(f"a Wide ResNet reads images (N, C, H, W), but task {task.name}'s inputs are shaped "
                         f"{tuple(task.splits.train_x.shape)}; leave out the model to train the task's own child")
    channels = task.splits.train_x.shape[1]
    task = dataclasses.replace(task, make_child=lambda: wide_resnet(depth, width, channels))
    return _identified(task, model_name(depth, width))


def _identified(task: Task, model: str) -> Task:
    """`task` with the model and a fingerprint of its data among its options, and so in `config_key()`."""
    task.options = {**task.options, "model": model, "data": data_fingerprint(task.splits)}
    return task


def data_fingerprint(splits: Splits) -> str:
    """`tensors_fingerprint` of every split's inputs and targets: a transfer's key holds it, whatever its task."""
    return tensors_fingerprint({name: getattr(splits, name)
                                for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")})


OnTrial = Callable[[TrialRecord], None]
# Called after each epoch of the final run with its record and a function that snapshots the run.
OnEpoch = Callable[[EpochRecord, Callable[[], bytes]], None]


# What every snapshot holds; "limit" and "draws" came later, and a snapshot without them still loads.
SNAPSHOT_FIELDS = ("lr", "epochs", "steps", "val_acc", "train_loss", "model", "optimizer", "order")


class SnapshotUnreadable(ValueError):
    """A snapshot the final run cannot continue from: damaged, or written by an earlier nos with torch.save."""


def snapshot(child: Child) -> bytes:
    """The final run's whole state after an epoch, as bytes (nos.tensor_state's format: no pickle)."""
    return to_bytes({
        "lr": child.lr, "epochs": child.epochs, "steps": child.steps, "val_acc": child.val_acc,
        "train_loss": child.train_loss, "limit": child.limit, "model": child.model.state_dict(),
        "optimizer": child.optimizer.state_dict(), "order": child.order.get_state(),
        # The child's own generator states for its forward's random draws (dropout): without them a
        # resumed run would draw other masks than the uninterrupted one.
        "draws": child.draws,
    })


def read_snapshot(data: bytes) -> dict[str, Any]:
    """The state `snapshot` wrote, its tensors on the CPU; SnapshotUnreadable if `data` is not one.

    A snapshot written by an earlier nos (torch.save's zip) is refused, never unpickled.
    """
    try:
        state = from_bytes(data)
    except TensorStateError as exc:
        raise SnapshotUnreadable(f"the snapshot cannot be read: {exc}") from None
    if not isinstance(state, dict) or any(name not in state for name in SNAPSHOT_FIELDS):
        raise SnapshotUnreadable(f"the snapshot does not hold all of {', '.join(SNAPSHOT_FIELDS)}")
    draws = state.get("draws")
    if not _rng_state(state["order"]) or not (draws is None or isinstance(draws, list) and all(map(_rng_state, draws))):
        raise SnapshotUnreadable("the snapshot's generator states are not byte tensors")
    return state


def _rng_state(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def _on(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _on(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on(v, device) for v in value)
    return value


def _restore(child: Child, data: bytes | dict[str, Any]) -> None:
    state = read_snapshot(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if state["lr"] != child.lr:
        raise ValueError(f"the snapshot is of a run at lr {state['lr']}, not {child.lr}")
    device = child.task.device
    child.model.load_state_dict(_on(state["model"], device))
    # The rule's buffers go to the device; its noise generators' states stay CPU byte tensors.
    optimizer = state["optimizer"]
    child.optimizer.load_state_dict({**optimizer, "state": _on(optimizer.get("state", {}), device)})
    child.order.set_state(state["order"])
    child.epochs, child.steps = int(state["epochs"]), int(state["steps"])
    child.val_acc, child.train_loss = float(state["val_acc"]), state["train_loss"]
    if state.get("limit") is not None:   # the explosion limit, set from the run's first loss
        child.limit = state["limit"]
    draws = state.get("draws")
    # None: the child kept none (a stack's), or a snapshot written without them; the child's stay as seeded
    if draws is not None and child.draws is not None:
        # The CPU's state comes first; a snapshot from another device has more or fewer CUDA ones.
        child.draws = [*draws[:len(child.draws)], *child.draws[len(draws):]]


def train_transfer(rule: str | Node, task: Task, seed: int = 0, *, trials_done: Sequence[TrialRecord] = (),
                   epochs_done: Sequence[EpochRecord] = (), resume: bytes | dict[str, Any] | None = None,
                   on_trial: OnTrial | None = None, on_epoch: OnEpoch | None = None) -> TransferResult:
    """The sweep, then the final run at the best rate, scoring validation and test after every epoch.

    trials_done: sweep trials stored earlier (same rule, task and seed): reused, not retrained.
    epochs_done, resume: the final run's epochs so far and the snapshot after the last of them
        (the sweep must be complete then), as bytes or as `read_snapshot` read them (SnapshotUnreadable
        if the bytes are not a snapshot); training continues from there.
    on_trial / on_epoch: called after each newly trained sweep trial / epoch.
    """
    tree = resolve_rule(rule)
    sweep_steps = task.sweep_epochs * task.steps_per_epoch
    final_steps = task.epochs * task.steps_per_epoch
    # As in the protocol: the best 1-epoch trial is the final run's first epoch, unless the rule
    # reads a schedule over the run's length. With longer sweep trials the final run starts afresh,
    # so that every one of its epochs is scored.
    reuse = task.sweep_epochs == 1 and not reads_schedule(tree)
    stored = {t.lr: t for t in trials_done}
    missing = [lr for lr in task.lrs if lr not in stored]
    if resume is not None and missing:
        raise ValueError(f"a snapshot of the final run needs the whole sweep stored; lr {missing[0]:g} is missing")
    epochs = list(epochs_done)
    with deterministic(task.device):
        initial = initial_child(task, seed)
        # One child at a time, as a larger network is trained anyway; those stored are not trained again.
        sweep = SequentialChildren(task, initial, tree, missing, final_steps if reuse else sweep_steps, seed)
        trials, best, best_child = _sweep(task, sweep, stored, missing, sweep_steps, on_trial)
        if best is not None:
            def fresh() -> Child:
                return Child.fresh(task, initial, tree, best.lr, final_steps, seed)

            final, epochs = _start_final(task, fresh, resume, best_child if reuse else None, epochs, on_epoch)
            _train_epochs(task, final, epochs, on_epoch)

    return TransferResult.build(to_text(tree), task, seed, trials, best.lr if best else None, epochs,
                                str(task.device))


def _sweep(task: Task, sweep: SequentialChildren, stored: dict[float, TrialRecord], missing: list[float],
           sweep_steps: int, on_trial: OnTrial | None) -> tuple[list[TrialRecord], TrialRecord | None, Child | None]:
    """Train the `missing` rates: every rate's trial (stored ones as stored), the best, and its network if trained here.

    Only the best network trained so far is kept: the others are released as soon as they are scored.
    """
    leader: list[int] = []

    def rank(record: TrialRecord) -> tuple[float, float]:
        # best_index's order (ties to the smaller rate): the network kept is the one it picks, in any grid order.
        return record.val_acc, -record.lr

    def scored(index: int) -> None:
        record = sweep.record(index)
        if on_trial:
            on_trial(record)
        if record.diverged or (leader and rank(record) <= rank(sweep.record(leader[0]))):
            sweep.release(index)
            return
        if leader:
            sweep.release(leader.pop())
        leader.append(index)

    sweep.advance(sweep_steps, scored)
    trials = [stored[lr] if lr in stored else sweep.record(missing.index(lr)) for lr in task.lrs]
    index = best_index(trials)
    best = trials[index] if index is not None else None
    best_child = sweep.extract(missing.index(best.lr)) if best is not None and best.lr in missing else None
    return trials, best, best_child


def _start_final(task: Task, fresh: Callable[[], Child], resume: bytes | dict[str, Any] | None, reusable: Child | None,
                 epochs: list[EpochRecord], on_epoch: OnEpoch | None) -> tuple[Child, list[EpochRecord]]:
    """The final run's child and its epochs so far: restored from `resume`, the best sweep trial
    continued (`reusable`, its epoch scored now), or fresh (any recorded epochs dropped)."""
    if resume is not None:
        final = fresh()
        _restore(final, resume)
        if final.epochs != len(epochs):
            raise ValueError(f"the snapshot is after epoch {final.epochs}, but {len(epochs)} epochs are recorded")
        return final, epochs
    if reusable is not None and not epochs:
        start = time.perf_counter()
        record = EpochRecord(1, reusable.train_loss, reusable.val_acc, _test(task, reusable), False,
                             time.perf_counter() - start)
        _epoch_done(record, reusable, epochs, on_epoch)
        return reusable, epochs
    return fresh(), []


def _train_epochs(task: Task, final: Child, epochs: list[EpochRecord], on_epoch: OnEpoch | None) -> None:
    """Train the final run to `task.epochs` one epoch at a time, scoring each; a diverged epoch ends it."""
    final.disable_explosion_stop()
    while final.epochs < task.epochs and not (epochs and epochs[-1].diverged):
        start = time.perf_counter()
        final.train(1)
        if final.diverged:
            record = EpochRecord(len(epochs) + 1, None, 0.0, 0.0, True, time.perf_counter() - start)
        else:
            record = EpochRecord(final.epochs, final.train_loss, final.val_acc, _test(task, final), False,
                                 time.perf_counter() - start)
        _epoch_done(record, final, epochs, on_epoch)


def _test(task: Task, child: Child) -> float:
    acc = task.objective.score(child.model, task.splits.test_x, task.splits.test_y)
    return acc if math.isfinite(acc) else 0.0


def _epoch_done(record: EpochRecord, child: Child, epochs: list[EpochRecord], on_epoch: OnEpoch | None) -> None:
    epochs.append(record)
    if on_epoch:
        on_epoch(record, lambda: snapshot(child))


__all__ = [
    "DEFAULT_EPOCHS", "DEFAULT_MODEL", "OWN_CHILD", "SNAPSHOT_FIELDS", "TRANSFER_TASKS", "EpochRecord",
    "SnapshotUnreadable", "TransferResult", "read_snapshot", "snapshot", "train_transfer", "transfer_task",
]
