"""Tasks load their data into tensors, split it honestly, and say clearly when files are missing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from nos.tasks import TASKS, DataUnavailable, UnknownTask, get_task
from nos.tasks.data import DEBIAN_FASHION_MNIST

from helpers.fake_fashion import write_fashion
from helpers.services import unavailable


@pytest.fixture
def tiny_fashion(tmp_path):
    """A Fashion-MNIST folder in torchvision's FashionMNIST/raw layout: 60 train and 20 test images."""
    write_fashion(tmp_path / "FashionMNIST" / "raw", train=60, test=20)
    return tmp_path


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTask) as info:
        get_task("mnist")
    for name in TASKS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["digits", "quadratic", "rosenbrock"])
def test_bundled_and_synthetic_tasks_load(name):
    task = get_task(name)
    s = task.splits
    assert len(s.train_x) == len(s.train_y)
    assert len(s.val_x) == len(s.val_y)
    assert len(s.test_x) == len(s.test_y)
    assert task.steps_per_epoch >= 1
    assert task.lrs == tuple(10.0 ** k for k in range(-5, 2))
    assert (task.sweep_epochs, task.epochs) == (1, 5)
    child = task.new_child()
    out = child(s.train_x[: task.batch_size])
    assert torch.isfinite(task.objective.loss(out, s.train_y[: task.batch_size]))


def test_digits_splits_partition_the_data_and_subsample():
    from sklearn.datasets import load_digits

    task = get_task("digits")
    assert task.splits.sizes == {"train": 1200, "val": 300, "test": 297}
    everything = torch.cat([task.splits.train_x, task.splits.val_x, task.splits.test_x])
    full = torch.tensor(load_digits().data, dtype=torch.float32) / 16
    assert len(everything) == len(full)
    assert torch.allclose(everything.sum(0), full.sum(0))   # each image once
    small = get_task("digits", train_size=100)
    assert small.splits.sizes["train"] == 100
    assert torch.equal(small.splits.val_x, task.splits.val_x)


def test_digits_are_read_as_scikit_learn_reads_them_without_importing_its_datasets():
    """The bundled file, read directly: the same arrays as load_digits, bit for bit, in a process that
    never imports sklearn.datasets (over a second of every worker's start-up)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from nos.tasks.data import load_digits_arrays

    x, y = load_digits_arrays()
    bunch = load_digits()
    assert torch.equal(x, torch.from_numpy(bunch.data.astype("float32")) / 16.0)
    assert torch.equal(y, torch.from_numpy(bunch.target.astype("int64")))
    probe = ("import sys; from nos.tasks.data import load_digits_arrays; x, _ = load_digits_arrays(); "
             "print(len(x), 'sklearn.datasets' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1797", "False"]


def test_ill_conditioned_features_span_three_decades_and_splits_stay_put():
    task = get_task("ill-conditioned")
    s = task.splits
    assert s.sizes == {"train": 16384, "val": 8192, "test": 4096}
    spread = s.train_x.std(0)
    assert 0.008 < spread[0] < 0.012 and 8 < spread[-1] < 12   # scales 10^-2 ... 10^1
    assert set(s.train_y.unique().tolist()) == set(range(10))
    assert task.batch_size == 2048 and (task.sweep_epochs, task.epochs, task.sweep) == (10, 10, "halving")
    small = get_task("ill-conditioned", train_size=4096)
    assert small.splits.sizes["train"] == 4096
    assert torch.equal(small.splits.val_x, s.val_x) and torch.equal(small.splits.test_y, s.test_y)
    assert torch.equal(get_task("ill-conditioned").splits.train_x, s.train_x)   # the same data every build
    assert not torch.equal(get_task("ill-conditioned", split_seed=1).splits.val_x, s.val_x)


@pytest.mark.parametrize("options", [{"temperature": 0}, {"low": 2.0, "high": 1.0}, {"classes": 1},
                                     {"high": 1e9}, {"train_size": 1000}])
def test_ill_conditioned_refuses_bad_options(options):
    with pytest.raises(ValueError):
        get_task("ill-conditioned", **options)


def test_ill_conditioned_orders_plain_momentum_and_adaptive_rules():
    """What the task is for: on one seed, SGD < momentum < Adam by margins several times the seed noise."""
    from nos.tasks import evaluate_rule

    task = get_task("ill-conditioned")
    sgd, momentum, adam = (evaluate_rule(rule, task, seed=0).reward for rule in ("sgd", "momentum", "adam"))
    assert sgd + 0.02 < momentum and momentum + 0.05 < adam, (sgd, momentum, adam)


def test_config_key_is_stable_and_tracks_options():
    assert get_task("digits").config_key() == get_task("digits").config_key()
    assert get_task("digits").config_key() != get_task("digits", lrs=[0.1]).config_key()
    assert get_task("digits").config_key() != get_task("digits", train_size=600).config_key()
    assert get_task("digits").to_dict()["options"]["hidden"] == 64   # defaults are part of the identity


def test_a_task_read_from_files_is_keyed_by_what_it_read(tiny_fashion, tmp_path):
    """The folder is not in the key: other files of the same sizes (a corrected label, one worker's damaged copy)
    were answered with results trained on the first, and a worker reading them trained as the driver's task."""
    import gzip
    import shutil

    def key(folder):
        return get_task("fashion-mnist", data_dir=folder, val_size=10, batch_size=8, download=False).config_key()

    raw = tiny_fashion / "FashionMNIST" / "raw"
    unzipped = tmp_path / "unzipped"
    unzipped.mkdir()
    for path in raw.iterdir():   # the same images and labels, stored without gzip
        (unzipped / path.name.removesuffix(".gz")).write_bytes(gzip.decompress(path.read_bytes()))
    relabelled = tmp_path / "relabelled"
    shutil.copytree(unzipped, relabelled)
    labels = relabelled / "t10k-labels-idx1-ubyte"
    content = bytearray(labels.read_bytes())
    content[-1] = (content[-1] + 1) % 10   # one test label of twenty
    labels.write_bytes(bytes(content))

    assert key(unzipped) == key(tiny_fashion)
    assert key(relabelled) != key(tiny_fashion)
    mlp = {folder: get_task("fashion-mlp", data_dir=folder, val_size=10, batch_size=8, download=False).config_key()
           for folder in (tiny_fashion, unzipped, relabelled)}
    assert mlp[unzipped] == mlp[tiny_fashion] != mlp[relabelled]
    assert "data" not in get_task("digits").options   # bundled with scikit-learn: its key is unchanged


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError):
        get_task("digits", train_size=5000)
    with pytest.raises(ValueError):
        get_task("digits", lrs=[0.1, -1])


def test_a_learning_rate_given_twice_is_refused():
    """Trials are stored by rate: a grid with a rate twice would fail when its second trial is stored."""
    import dataclasses

    with pytest.raises(ValueError, match="each given once"):
        get_task("digits", lrs=[0.1, 0.01, 0.1])
    with pytest.raises(ValueError, match="each given once"):
        get_task("digits", lrs=[1e-1, 0.1])   # equal as numbers
    with pytest.raises(ValueError, match="learning rates must differ"):
        dataclasses.replace(get_task("digits", train_size=100), lrs=(0.1, 0.01, 0.1))   # a Task made in Python


def test_fashion_mnist_from_a_torchvision_style_folder(tiny_fashion):
    task = get_task("fashion-mnist", data_dir=tiny_fashion, val_size=10, batch_size=8)
    assert task.splits.sizes == {"train": 50, "val": 10, "test": 20}
    x = task.splits.train_x
    assert x.shape[1:] == (1, 28, 28)
    assert x.dtype == torch.float32
    assert 0 <= x.min()
    assert x.max() <= 1
    assert task.new_child()(x[:8]).shape == (8, 10)


def test_fashion_mnist_from_the_debian_package():
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        unavailable("Fashion-MNIST (Debian package dataset-fashion-mnist)", f"{DEBIAN_FASHION_MNIST} is empty")
    task = get_task("fashion-mnist", train_size=1000)
    assert task.splits.sizes == {"train": 1000, "val": 5000, "test": 10000}
    assert task.splits.test_x.shape == (10000, 1, 28, 28)
    assert set(task.splits.test_y.tolist()) == set(range(10))
    assert task.splits.train_x.is_contiguous(memory_format=torch.channels_last)


def test_cifar10_from_a_folder_of_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": list(range(4))}
        (folder / name).write_bytes(pickle.dumps(batch))
    task = get_task("cifar10", data_dir=tmp_path, val_size=4, batch_size=4, download=False)
    assert task.splits.sizes == {"train": 16, "val": 4, "test": 4}
    assert task.new_child()(task.splits.train_x[:4]).shape == (4, 10)
    # One pixel of one image changed elsewhere: another task key (the folder itself is not in the key).
    other = tmp_path / "other" / "cifar-10-batches-py"
    other.parent.mkdir()
    folder.rename(other)
    batch = pickle.loads((other / "test_batch").read_bytes())
    batch["data"][0, 0] ^= 1
    (other / "test_batch").write_bytes(pickle.dumps(batch))
    changed = get_task("cifar10", data_dir=other.parent, val_size=4, batch_size=4, download=False)
    assert changed.config_key() != task.config_key()


def test_cifar10_missing_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataUnavailable) as info:
        get_task("cifar10", data_dir=tmp_path / "empty", download=False)
    message = str(info.value)
    assert "cifar-10-batches-py" in message
    assert "--data-dir" in message
    assert str(tmp_path / "empty") in message


def test_a_failed_download_is_the_same_clear_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataUnavailable, match="could not be downloaded.*network unreachable"):
        get_task("cifar10", data_dir=tmp_path)
