"""A Task from your own data and network: what a task file calls.

    import torch
    from torch import nn
    from nos.tasks import from_tensors, task_factory

    @task_factory
    def sine(*, device="cpu", train_size=512, hidden=32, split_seed=0, **protocol):
        g = torch.Generator().manual_seed(split_seed)
        x = torch.rand(train_size + 512, 1, generator=g) * 6 - 3
        child = lambda: nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        return from_tensors(x, torch.sin(x), child, objective="mse", val_size=256, test_size=256,
                            split_seed=split_seed, device=device, **protocol)

Objectives: "accuracy" (classification: the child's outputs are class
logits, the targets class indices; cross-entropy trains, validation accuracy
is the reward) and "mse" (regression: mean squared error trains, and the
reward is 1 / (1 + validation MSE), in [0, 1] like every task's, bigger is
better), or any `nos.tasks.objectives.Objective`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from .base import Splits, Task
from .objectives import Accuracy, MeanSquaredError, Objective

OBJECTIVES: dict[str, Callable[[], Objective]] = {"accuracy": Accuracy, "mse": MeanSquaredError}
# The validation and test splits when neither size is given: a fifth of the examples each.
DEFAULT_FRACTION = 0.2
# What a task file may set beside the data: the protocol's knobs (fields of Task).
KNOBS = tuple(f.name for f in dataclasses.fields(Task) if f.init
              and f.name not in ("name", "splits", "make_child", "objective", "batch_size", "device", "options"))


def from_tensors(x: Tensor, y: Tensor, make_child: Callable[[], nn.Module], *, objective: str | Objective = "accuracy",
                 val_size: int | float = DEFAULT_FRACTION, test_size: int | float | None = None,
                 test: tuple[Tensor, Tensor] | None = None, train_size: int | None = None, split_seed: int = 0,
                 batch_size: int = 32, device: str | torch.device = "cpu", name: str = "custom",
                 **protocol: Any) -> Task:
    """A Task whose examples are `x` and targets `y`, split by a seeded shuffle, and whose child is `make_child()`.

    val_size, test_size: examples (a whole number) or a fraction of `x` (below 1) set aside for
    validation (the reward) and test (reported, never used); test_size defaults to a fifth, or to
    none when `test` is the held-out (x, y) pair. train_size: keep only this many training examples.
    protocol: the evaluation's knobs, as `get_task` takes them (lrs, epochs, sweep_epochs, sweep, explode,
    stacked). `make_child` is called for every trial; it must build a fresh network each time.
    """
    judge = _objective(objective)
    x, y = torch.as_tensor(x), _targets(torch.as_tensor(y), judge)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    if len(x) == 0:
        raise ValueError("x and y hold no examples")
    unknown = sorted(set(protocol) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown task setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"it takes: {', '.join(KNOBS)}")
    if test is not None and test_size is not None:
        raise ValueError("give test_size or test, not both")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    held_out = 0 if test is not None else _count("test_size", DEFAULT_FRACTION if test_size is None else test_size,
                                                 len(x))
    n_val = _count("val_size", val_size, len(x))
    available = len(x) - held_out - n_val
    if available < 1:
        raise ValueError(f"{len(x)} examples leave none to train on after {n_val} for validation and "
                         f"{held_out} for test")
    if train_size is not None and not 0 < train_size <= available:
        raise ValueError(f"train_size must be between 1 and {available}, got {train_size}")
    test_x, test_y = (x[order[:held_out]], y[order[:held_out]]) if test is None else \
        (torch.as_tensor(test[0]), _targets(torch.as_tensor(test[1]), judge))
    val = order[held_out:held_out + n_val]
    train = order[held_out + n_val:][:train_size or available]
    place = torch.device(device)
    splits = Splits(*(t.to(place).contiguous() for t in (x[train], y[train], x[val], y[val], test_x, test_y)))
    return Task(name, splits, make_child, judge, batch_size=batch_size, device=place, **protocol)


def from_dataset(dataset: Dataset, make_child: Callable[[], nn.Module], *, test: Dataset | None = None,
                 **settings: Any) -> Task:
    """`from_tensors` on a map-style torch Dataset of (input, target) pairs, read whole into memory once."""
    return from_tensors(*dataset_tensors(dataset), make_child,
                        test=dataset_tensors(test) if test is not None else None, **settings)


def dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """A Dataset's inputs and targets as two stacked tensors (a TensorDataset's are taken as they are)."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    try:
        pairs = [dataset[i] for i in range(len(dataset))]
    except TypeError:
        raise ValueError("from_dataset needs a map-style Dataset (with len() and indexing)") from None
    if not pairs or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise ValueError("from_dataset needs a non-empty Dataset of (input, target) pairs")
    return (torch.stack([torch.as_tensor(p[0]) for p in pairs]),
            torch.stack([torch.as_tensor(p[1]) for p in pairs]))


def _objective(objective: str | Objective) -> Objective:
    if isinstance(objective, Objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)} or an Objective, got {objective!r}")
    return OBJECTIVES[objective]()


def _targets(y: Tensor, objective: Objective) -> Tensor:
    """Targets in the type the objective's loss reads: class indices as int64, regression targets as floats."""
    if isinstance(objective, Accuracy):
        if y.is_floating_point() or y.is_complex():
            raise ValueError(f"classification targets must be class indices (whole numbers), got {y.dtype}; "
                             "for regression use objective=\"mse\"")
        return y.long()
    if isinstance(objective, MeanSquaredError) and not y.is_floating_point():
        return y.float()
    return y


def _count(key: str, size: int | float, n: int) -> int:
    """A split's size in examples, from a whole number or a fraction of `n`."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"{key} must be a number of examples or a fraction below 1, got {size!r}")
    count = size if isinstance(size, int) else round(size * n) if 0 < size < 1 else -1
    if not 0 < count < n:
        raise ValueError(f"{key} must be a whole number from 1 to {n - 1} or a fraction between 0 and 1, "
                         f"got {size!r}")
    return count


__all__ = ["OBJECTIVES", "dataset_tensors", "from_dataset", "from_tensors"]
