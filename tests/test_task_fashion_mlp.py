"""The fashion-mlp task: 14x14 Fashion-MNIST, a sigmoid MLP, its documented splits, and an honest error without data."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torch import nn

from nos.tasks import TASKS, DataUnavailable, evaluate_rule, get_task
from nos.tasks.data import DEBIAN_FASHION_MNIST

from helpers.fake_fashion import write_fashion
from helpers.services import unavailable


@pytest.fixture
def tiny_fashion(tmp_path):
    """A plain folder of the four gzipped idx files: 60 train and 20 test images, random pixels and labels."""
    return write_fashion(tmp_path, train=60, test=20)


def _debian_fashion() -> None:
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        unavailable("Fashion-MNIST (Debian package dataset-fashion-mnist)", f"{DEBIAN_FASHION_MNIST} is empty")


def test_it_is_a_built_in_task():
    assert "fashion-mlp" in TASKS


def test_images_are_2x2_averages_and_the_child_is_a_sigmoid_mlp(tiny_fashion):
    task = get_task("fashion-mlp", data_dir=tiny_fashion, val_size=10, batch_size=8)
    assert task.splits.sizes == {"train": 50, "val": 10, "test": 20}
    assert task.splits.train_x.shape == (50, 196)
    assert task.splits.test_x.shape == (20, 196)
    # The test split is the file's test images in order: check one against its pixels by hand.
    raw = np.frombuffer(gzip.decompress((tiny_fashion / "t10k-images-idx3-ubyte.gz").read_bytes())[16:],
                        dtype=np.uint8).reshape(20, 28, 28) / 255.0
    expected = raw[3].reshape(14, 2, 14, 2).mean(axis=(1, 3)).reshape(196)
    assert torch.allclose(task.splits.test_x[3], torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    child = task.new_child()
    assert [type(m) for m in child] == [nn.Linear, nn.Sigmoid, nn.Linear]
    assert child[0].in_features == 196
    assert child[0].out_features == 64
    assert child[2].out_features == 10
    assert child(task.splits.train_x[:8]).shape == (8, 10)


def test_defaults_are_part_of_the_task_key(tiny_fashion):
    task = get_task("fashion-mlp", data_dir=tiny_fashion, val_size=10, batch_size=8)
    assert (task.sweep_epochs, task.epochs, task.sweep) == (3, 3, "halving")
    assert task.to_dict()["options"]["hidden"] == 64
    wider = get_task("fashion-mlp", data_dir=tiny_fashion, val_size=10, batch_size=8, hidden=128)
    assert wider.config_key() != task.config_key()


def test_missing_files_are_data_unavailable_saying_where_they_go(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(DataUnavailable) as info:
        get_task("fashion-mlp", data_dir=empty, download=False)
    message = str(info.value)
    assert "Fashion-MNIST" in message
    assert str(empty) in message
    assert "--data-dir" in message


def test_a_rule_trains_on_the_tiny_folder(tiny_fashion):
    task = get_task("fashion-mlp", data_dir=tiny_fashion, val_size=10, batch_size=8, lrs=[0.1, 1.0], epochs=2)
    result = evaluate_rule("powersign", task, seed=0)
    assert 0.0 <= result.reward <= 1.0
    assert 0.0 <= result.test_acc <= 1.0
    assert [t.lr for t in result.trials] == [0.1, 1.0]
    assert result.final.epochs == 2


def test_documented_splits_from_the_debian_package():
    _debian_fashion()
    task = get_task("fashion-mlp")
    assert task.splits.sizes == {"train": 40000, "val": 20000, "test": 10000}
    assert (task.batch_size, task.epochs, task.sweep_epochs, task.sweep) == (512, 3, 3, "halving")
    s = task.splits
    assert s.train_x.dtype == torch.float32
    assert 0 <= s.train_x.min()
    assert s.train_x.max() <= 1
    # Train and validation partition the 60,000 training images: every image once.
    from nos.tasks.registry import _fashion_mnist_14

    everything, _, _, _ = _fashion_mnist_14(None, True)
    assert len(s.train_x) + len(s.val_x) == len(everything)
    assert torch.allclose(torch.cat([s.train_x, s.val_x]).sum(0), everything.sum(0), rtol=1e-4)
    assert set(s.val_y.tolist()) == set(range(10))
    assert set(s.test_y.tolist()) == set(range(10))


def test_a_rule_evaluates_end_to_end_on_the_real_data():
    _debian_fashion()
    task = get_task("fashion-mlp", train_size=4096)   # the default protocol on a tenth of the training split
    result = evaluate_rule("adam", task, seed=0)
    assert not result.diverged
    assert result.best_lr in task.lrs
    assert len(result.trials) == 7
    assert 0.0 <= result.reward <= 1.0
    assert 0.0 <= result.test_acc <= 1.0
    # Ten classes: chance is 0.1; a working pipeline learns far more than that in 3 epochs.
    assert result.reward > 0.5
    assert result.test_acc > 0.5
