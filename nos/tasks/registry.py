"""The built-in tasks by name: `get_task("digits")`, `get_task("fashion-mnist", train_size=10000)`.

docs/tasks.md lists them, with their sizes and typical seconds per evaluation.

Options every task takes: device, train_size (subsample the training split),
batch_size, lrs, sweep_epochs, epochs, explode, sweep ("full" or "halving"), stacked
(True/False: train the sweep stacked; default where it pays), split_seed. Image tasks also take
data_dir, download (False: fail at once when the files are missing) and
val_size; the bundled and synthetic tasks accept data_dir and ignore it, so
one command line serves every task. Data is read from disk once per process.

The key of a task read from files (fashion-mnist, fashion-mlp, cifar10) holds a
fingerprint of what was read (option `data`): the folder is not part of the key,
so this is what keeps results on other files of the same sizes apart, and what
makes a worker whose copy differs from the driver's refuse to train.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import data, networks
from .base import PAPER_LRS, Splits, Task, tensors_fingerprint
from .custom import UnknownTask, custom_task, normalized, recorded_options, registered_tasks
from .objectives import Accuracy, MeanSquaredError, ModelValue
from .options import check_options

# The quadratic's examples are generated in memory: at most this many float32 numbers (400 MB).
MAX_SYNTHETIC_NUMBERS = 100_000_000


def _split(x: Tensor, y: Tensor, val_size: int, train_size: int | None, split_seed: int) -> tuple[Tensor, ...]:
    """Validation from the end of a seeded shuffle, training from the start (subsampled to train_size)."""
    if not 0 < val_size < len(x):
        raise ValueError(f"val_size must be between 1 and {len(x) - 1}, got {val_size}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    available = len(x) - val_size
    if train_size is not None and not 0 < train_size <= available:
        raise ValueError(f"train_size must be between 1 and {available}, got {train_size}")
    train = order[:train_size or available]
    val = order[available:]
    return x[train], y[train], x[val], y[val]


def _splits(arrays: tuple[Tensor, ...], device: torch.device, channels_last: bool = False) -> Splits:
    def place(t: Tensor) -> Tensor:
        t = t.to(device)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t.contiguous()
    return Splits(*(place(t) for t in arrays))


def _device(device: str | torch.device) -> torch.device:
    from ..devices import usable_device  # DeviceError is a ValueError

    return usable_device(str(device))


# Reading and decompressing files is the slow part of building a task: once per process.
_fashion_mnist = functools.lru_cache(maxsize=2)(data.load_fashion_mnist)
_cifar10 = functools.lru_cache(maxsize=2)(data.load_cifar10)
_digits = functools.lru_cache(maxsize=1)(data.load_digits_arrays)


@functools.lru_cache(maxsize=4)
def _read_fingerprint(load: Callable[..., tuple[Tensor, ...]], data_dir: str | None, download: bool) -> str:
    """`tensors_fingerprint` of the images and labels `load` read (about 0.15 s for Fashion-MNIST's 70,000)."""
    return tensors_fingerprint(dict(zip(("train_x", "train_y", "test_x", "test_y"), load(data_dir, download))))


@functools.lru_cache(maxsize=2)
def _fashion_mnist_14(data_dir: str | None, download: bool) -> tuple[Tensor, ...]:
    """Fashion-MNIST averaged over 2x2 blocks to 14x14 and flattened: (N, 196) in [0, 1]."""
    train_x, train_y, test_x, test_y = _fashion_mnist(data_dir, download)
    shrink = lambda x: F.avg_pool2d(x, 2).flatten(1)   # noqa: E731
    return shrink(train_x), train_y, shrink(test_x), test_y


# The tasks whose key holds a fingerprint of the files they read (option `data`).
FILE_TASKS = ("fashion-mnist", "fashion-mlp", "cifar10")


# -- the tasks -----------------------------------------------------------------
def digits(*, device: torch.device, data_dir=None, train_size: int | None = None, val_size: int = 300,
           test_size: int = 297, hidden: int = 64, split_seed: int = 0, **protocol: Any) -> Task:
    """scikit-learn's 1,797 bundled 8x8 digits: 1,200 train, 300 validation, 297 test; an MLP child.

    Calibrated (batch 16, 64 hidden units: 75 steps an epoch) so a full
    evaluation takes about 0.1 s of CPU on one thread (docs/tasks.md; a process's
    first also pays torch's one-time costs), while SGD, Adam, PowerSign and random
    rules still end at different rewards.
    """
    x, y = _digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    test, rest = order[:test_size], order[test_size:]
    arrays = _split(x[rest], y[rest], val_size, train_size, split_seed) + (x[test], y[test])
    protocol.setdefault("batch_size", 16)
    return Task("digits", _splits(arrays, device), lambda: networks.digits_mlp(hidden), Accuracy(),
                device=device, **protocol)


def _image_task(name: str, load: Callable[..., tuple[Tensor, ...]], *, device: torch.device,
                data_dir: str | os.PathLike | None, download: bool, train_size: int | None, val_size: int,
                split_seed: int, **protocol: Any) -> Task:
    folder = str(data_dir) if data_dir is not None else None
    train_x, train_y, test_x, test_y = load(folder, download)
    arrays = _split(train_x, train_y, val_size, train_size, split_seed) + (test_x, test_y)
    channels, side = train_x.shape[1], train_x.shape[2]
    # channels_last halves the CPU step of the conv child (oneDNN's NHWC kernels); on CUDA cuDNN picks its own.
    channels_last = device.type == "cpu"
    protocol.setdefault("batch_size", 128)
    task = Task(name, _splits(arrays, device, channels_last), lambda: networks.paper_convnet(channels, side),
                Accuracy(), device=device, channels_last=channels_last, **protocol)
    task.options = {"data": _read_fingerprint(load, folder, download)}
    return task


def fashion_mnist(*, device: torch.device, data_dir=None, download: bool = True, train_size: int | None = None,
                  val_size: int = 5000, split_seed: int = 0, **protocol: Any) -> Task:
    """Fashion-MNIST: 55,000 train (or train_size), 5,000 validation, the 10,000 test images; the paper's child."""
    return _image_task("fashion-mnist", _fashion_mnist, device=device, data_dir=data_dir, download=download,
                       train_size=train_size, val_size=val_size, split_seed=split_seed, **protocol)


def fashion_mlp(*, device: torch.device, data_dir=None, download: bool = True, train_size: int | None = None,
                val_size: int = 20000, hidden: int = 64, split_seed: int = 0, **protocol: Any) -> Task:
    """Fashion-MNIST at 14x14 (2x2 averages): 40,000 train (or train_size), 20,000 validation, the 10,000 test images.

    The child is a 196-64-10 sigmoid MLP; batch 512; the sweep trains each
    rate the full 3 epochs by successive halving, so the best trial is the
    final run and the reward is its validation accuracy. Chosen by
    measurement (benchmarks/separation.py, docs/tasks.md): under a second an
    evaluation on one CPU thread, little seed-to-seed noise (the large
    validation split keeps the reward's sampling noise small, the full-length
    sweep keeps near-tied rates from flipping the reward), and the standard
    optimizers spread from 0.76 (SGD) to 0.84 (Adam), short of what the data allows.
    """
    folder = str(data_dir) if data_dir is not None else None
    train_x, train_y, test_x, test_y = _fashion_mnist_14(folder, download)
    inputs = train_x.shape[1]
    for knob, value in (("batch_size", 512), ("sweep_epochs", 3), ("epochs", 3), ("sweep", "halving")):
        protocol.setdefault(knob, value)
    splits = _split(train_x, train_y, val_size, train_size, split_seed) + (test_x, test_y)
    task = Task("fashion-mlp", _splits(splits, device), lambda: networks.fashion_mlp(inputs, hidden), Accuracy(),
                device=device, **protocol)
    task.options = {"data": _read_fingerprint(_fashion_mnist, folder, download)}   # the files, before shrinking
    return task


def cifar10(*, device: torch.device, data_dir=None, download: bool = True, train_size: int | None = None,
            val_size: int = 5000, split_seed: int = 0, **protocol: Any) -> Task:
    """CIFAR-10: 45,000 train (or train_size), 5,000 validation, the 10,000 test images; the paper's child."""
    return _image_task("cifar10", _cifar10, device=device, data_dir=data_dir, download=download,
                       train_size=train_size, val_size=val_size, split_seed=split_seed, **protocol)


def quadratic(*, device: torch.device, data_dir=None, train_size: int | None = None, dim: int = 20,
              condition: float = 100.0, noise: float = 0.1, split_seed: int = 0, **protocol: Any) -> Task:
    """Noisy linear regression, so a convex quadratic loss; score 1 / (1 + validation MSE).

    Feature scales run from 1 to sqrt(condition): the loss's Hessian has that
    condition number, which separates adaptive rules from plain SGD.
    """
    n = (train_size or 2048) + 1024
    if n * dim > MAX_SYNTHETIC_NUMBERS:
        raise ValueError(f"quadratic's data would hold {n * dim:,} numbers (train_size + 1024 examples of dim "
                         f"{dim}); keep it under {MAX_SYNTHETIC_NUMBERS:,}")
    gen = torch.Generator().manual_seed(split_seed)
    x = torch.randn(n, dim, generator=gen) * torch.logspace(0, 0.5 * math.log10(condition), dim)
    y = x @ torch.randn(dim, generator=gen) + noise * torch.randn(n, generator=gen)
    arrays = _split(x[:-512], y[:-512], 512, train_size, split_seed) + (x[-512:], y[-512:])
    protocol.setdefault("batch_size", 64)
    return Task("quadratic", _splits(arrays, device), lambda: networks.LinearRegression(dim), MeanSquaredError(),
                device=device, **protocol)


def ill_conditioned(*, device: torch.device, data_dir=None, train_size: int | None = None, val_size: int = 8192,
                    dim: int = 64, classes: int = 10, low: float = -2.0, high: float = 1.0, temperature: float = 0.5,
                    split_seed: int = 0, **protocol: Any) -> Task:
    """Softmax regression on synthetic features whose scales span three decades: 16,384 train, 8,192 val, 4,096 test.

    Each example is z * s: z standard normal in `dim` dimensions, s running
    from 10^low to 10^high. The label is drawn from a softmax teacher over z at
    `temperature`, so every feature carries as much of the signal whatever its
    scale, and the loss's curvature spans six decades. A rule must make
    progress along the small-scale features in 80 large-batch steps (batch
    2,048, 10 epochs, every rate trained to the end by halving): adaptive
    rules do, momentum gets 10x more than SGD from the same stability limit,
    and plain gradient scaling crawls. Chosen by measurement
    (benchmarks/separation.py, docs/tasks.md): SGD, momentum, RMSProp, Adam
    and PowerSign land more than 3 standard deviations of seed noise apart,
    at about 0.7 CPU seconds an evaluation on one thread.
    """
    n_train, n_test = train_size or 16384, 4096
    total = n_train + val_size + n_test
    if total * dim > MAX_SYNTHETIC_NUMBERS:
        raise ValueError(f"ill-conditioned's data would hold {total * dim:,} numbers; keep it under "
                         f"{MAX_SYNTHETIC_NUMBERS:,}")
    if not low <= high:
        raise ValueError(f"low must not exceed high, got low={low}, high={high}")
    teacher = torch.randn(dim, classes, generator=torch.Generator().manual_seed(1000 * split_seed))
    scales = torch.logspace(low, high, dim)

    def examples(count: int, stream: int) -> tuple[Tensor, Tensor]:
        # Each split draws from its own stream, so train_size never changes the validation or test examples.
        gen = torch.Generator().manual_seed(1000 * split_seed + stream)
        z = torch.randn(count, dim, generator=gen)
        logits = z @ teacher / temperature / math.sqrt(dim)
        # Gumbel-max: one draw from softmax(logits) per example.
        gumbel = -torch.log(-torch.log(torch.rand(count, classes, generator=gen).clamp_min(1e-12)))
        return z * scales, (logits + gumbel).argmax(1)

    arrays = (*examples(n_train, 1), *examples(val_size, 2), *examples(n_test, 3))
    for knob, value in (("batch_size", 2048), ("sweep_epochs", 10), ("epochs", 10), ("sweep", "halving")):
        protocol.setdefault(knob, value)
    return Task("ill-conditioned", _splits(arrays, device), lambda: networks.softmax_regression(dim, classes),
                Accuracy(), device=device, **protocol)


def rosenbrock(*, device: torch.device, data_dir=None, train_size: int | None = None, dim: int = 2, split_seed: int = 0,
               **protocol: Any) -> Task:
    """The Rosenbrock function from (-1.2, 1); score 1 / (1 + f(w)). An epoch is train_size steps (default 100).

    There is no data: the examples are placeholders that only set the number
    of steps, and every step sees the exact function (no noise).
    """
    steps = train_size or 100
    placeholder = (torch.zeros(steps, 1), torch.zeros(steps), torch.zeros(1, 1), torch.zeros(1),
                   torch.zeros(1, 1), torch.zeros(1))
    protocol.setdefault("batch_size", 1)
    return Task("rosenbrock", _splits(placeholder, device), lambda: networks.Rosenbrock(dim), ModelValue(),
                device=device, **protocol)


TASKS: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "fashion-mnist": fashion_mnist,
    "fashion-mlp": fashion_mlp,
    "cifar10": cifar10,
    "quadratic": quadratic,
    "ill-conditioned": ill_conditioned,
    "rosenbrock": rosenbrock,
}


def get_task(name: str, /, *, device: str | torch.device = "cpu", lrs=None, **options: Any) -> Task:
    """The task `name` built with `options` (see the module doc); UnknownTask lists the names.

    `name` is a built-in's, a registered task's, or a factory's: "package.module:function" (nos.tasks.custom).
    """
    options = {k: v for k, v in options.items() if v is not None}
    if lrs is not None:
        options["lrs"] = lrs
    key = normalized(name) if isinstance(name, str) else None
    if key in TASKS:
        return _builtin(key, _device(device), options)
    task = custom_task(name, _device(device), options) if isinstance(name, str) else None
    if task is None:
        names = [*TASKS, *registered_tasks()]
        close = difflib.get_close_matches(str(key or name), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownTask(f"unknown task {name!r}{hint}; known tasks: {', '.join(names)}; or a factory of your own, "
                          "package.module:function")
    return task


def _builtin(key: str, device: torch.device, options: dict[str, Any]) -> Task:
    builder = TASKS[key]
    options = check_options(key, builder, options)
    task = builder(device=device, **options)
    # Record the defaults too, so the config key changes if a default does; and what the builder adds itself
    # (the fingerprint of data read from files).
    task.options = {**recorded_options(key, inspect.signature(builder), {"device": device, **options}),
                    **task.options}
    return task


__all__ = ["PAPER_LRS", "TASKS", "UnknownTask", "get_task"]
