"""from_tensors and from_dataset: a Task from your own data and network, split by a seeded shuffle."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from nos.tasks import evaluate_rule, from_dataset, from_tensors
from nos.tasks.objectives import Accuracy, MeanSquaredError


def child() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def data(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    return x, x.sum(1, keepdim=True)


def test_the_splits_are_sized_by_counts_or_fractions_and_cover_every_example_once():
    x, y = data()
    task = from_tensors(x, y, child, objective="mse", val_size=0.25, test_size=10, batch_size=8)
    assert task.splits.sizes == {"train": 65, "val": 25, "test": 10}
    together = torch.cat([task.splits.train_x, task.splits.val_x, task.splits.test_x])
    assert sorted(together[:, 0].tolist()) == sorted(x[:, 0].tolist())
    assert isinstance(task.objective, MeanSquaredError)


def test_the_split_follows_the_seed():
    x, y = data()
    first, again, other = (from_tensors(x, y, child, objective="mse", split_seed=s).splits.val_x for s in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_a_held_out_test_set_and_a_smaller_training_set():
    x, y = data()
    task = from_tensors(x[:80], y[:80], child, objective="mse", val_size=20, test=(x[80:], y[80:]), train_size=30,
                        batch_size=10)
    assert task.splits.sizes == {"train": 30, "val": 20, "test": 20}
    assert torch.equal(task.splits.test_x, x[80:])


def test_the_protocol_knobs_reach_the_task():
    x, y = data()
    task = from_tensors(x, y, child, objective="mse", lrs=[0.1], epochs=2, sweep="halving", batch_size=4)
    assert (task.lrs, task.epochs, task.sweep, task.batch_size) == ((0.1,), 2, "halving", 4)


def test_regression_rewards_one_over_one_plus_the_validation_error():
    x, y = data()
    task = from_tensors(x, y.long(), child, objective="mse", lrs=[0.1], epochs=2)
    assert task.splits.train_y.dtype == torch.float32   # whole-number targets regress as floats
    result = evaluate_rule("adam", task, seed=0)
    model = child()
    assert 0 < result.reward <= 1
    assert task.objective.score(model, task.splits.val_x, task.splits.val_y) == pytest.approx(
        1 / (1 + nn.functional.mse_loss(model(task.splits.val_x), task.splits.val_y).item()), rel=1e-5)


class Pairs(Dataset):
    """A map-style Dataset of (features, class) pairs, not a TensorDataset."""

    def __init__(self, n: int):
        self.x = torch.randn(n, 3, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.x[i, 0] > 0)


def test_from_dataset_reads_a_dataset_whole_and_classifies():
    task = from_dataset(Pairs(60), lambda: nn.Linear(3, 2), val_size=20, test=Pairs(10), lrs=[0.1], epochs=1)
    assert task.splits.sizes == {"train": 40, "val": 20, "test": 10}
    assert isinstance(task.objective, Accuracy)
    assert task.splits.train_y.dtype == torch.int64
    assert 0 <= evaluate_rule("sgd", task, seed=0).reward <= 1


@pytest.mark.parametrize("change, message", [
    ({"y": torch.zeros(99, 1)}, "x has 100 examples but y has 99"),
    ({"objective": "accuracy"}, "classification targets must be class indices"),
    ({"objective": "hinge"}, "objective must be one of accuracy, mse"),
    ({"val_size": 100}, "val_size must be a whole number from 1 to 99"),
    ({"val_size": 0.6, "test_size": 0.4}, "leave none to train on"),
    ({"test": data(5), "test_size": 5}, "give test_size or test, not both"),
    ({"train_size": 500}, "train_size must be between 1 and 60"),
    ({"momentum": 0.9}, "unknown task setting momentum"),
    # An internal field of Task (a cache) was listed among the settings, and passing it raised a TypeError.
    ({"_frozen": 1}, "unknown task setting _frozen; it takes: lrs, sweep_epochs, epochs, channels_last, explode, "
                     "sweep, stacked$"),
])
def test_bad_settings_say_which_and_why(change, message):
    x, y = data()
    settings = {"objective": "mse", **change}
    y = settings.pop("y", y)
    with pytest.raises(ValueError, match=message):
        from_tensors(x, y, child, **settings)
