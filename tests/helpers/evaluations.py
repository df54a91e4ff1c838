"""Comparing evaluation results that two ways of training should agree on, and small synthetic tasks."""

from __future__ import annotations

import pytest
import torch

from nos.records import EvaluationResult
from nos.tasks.base import Splits, Task
from nos.tasks.networks import digits_mlp, paper_convnet
from nos.tasks.objectives import Accuracy


def without_times(result: EvaluationResult) -> dict:
    """The result as plain data less its wall-clock seconds: what the same training reproduces."""
    data = result.to_dict()
    for trial in [data] + data["trials"] + [data["final"]]:
        if trial:
            trial.pop("wall_seconds")
    return data


def assert_same(one: EvaluationResult, other: EvaluationResult, acc: float, loss: float) -> None:
    """Equal up to rounding: the same trials, rates and divergences; scores within `acc`, losses within `loss`."""
    assert (one.rule, one.best_lr, one.diverged) == (other.rule, other.best_lr, other.diverged)
    assert (one.final is None) == (other.final is None)
    assert len(one.trials) == len(other.trials)
    for x, y in zip(one.trials + [one.final], other.trials + [other.final]):
        if x is None:
            continue
        where = f"{one.rule} at lr {x.lr}: {x} against {y}"
        assert (x.lr, x.diverged, x.steps, x.epochs) == (y.lr, y.diverged, y.steps, y.epochs), where
        assert (x.val_acc is None) == (y.val_acc is None), where
        if x.val_acc is not None:
            assert x.val_acc == pytest.approx(y.val_acc, abs=acc), where
        assert (x.train_loss is None) == (y.train_loss is None), where
        if x.train_loss is not None:
            assert x.train_loss == pytest.approx(y.train_loss, rel=loss, abs=loss), where
    assert one.reward == pytest.approx(other.reward, abs=acc)
    assert one.test_acc == pytest.approx(other.test_acc, abs=acc)


def synthetic_task(child: str, device: str, stacked: bool | None = None, train: int = 512, **protocol) -> Task:
    """A task on random inputs labelled by a fixed random linear teacher: no files, any device.

    child "mlp": the digits MLP on 64 inputs; "convnet": the paper's child (batch norm) on 1x16x16 images.
    """
    shape = (64,) if child == "mlp" else (1, 16, 16)
    teacher = torch.randn(torch.Size(shape).numel(), 10, generator=torch.Generator().manual_seed(99))

    def draw(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
        return x.to(device), (x.flatten(1) @ teacher).argmax(1).to(device)

    make = digits_mlp if child == "mlp" else (lambda: paper_convnet(1, 16))
    protocol = dict(dict(batch_size=32, lrs=(1e-3, 1e-2, 1e-1, 1.0, 10.0), epochs=2), **protocol)
    return Task(f"synthetic-{child}", Splits(*draw(train, 0), *draw(256, 1), *draw(256, 2)), make, Accuracy(),
                device=torch.device(device), stacked=stacked, **protocol)
