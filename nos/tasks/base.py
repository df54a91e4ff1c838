"""A child task: the data, the child network and the knobs of the evaluation protocol."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .objectives import Objective

# The paper's learning-rate sweep: 1e-5, 1e-4, ..., 1e1.
PAPER_LRS: tuple[float, ...] = tuple(10.0 ** k for k in range(-5, 2))
# "full": every rate trains sweep_epochs (the paper); "halving": successive halving over them.
SWEEPS = ("full", "halving")
# The protocol's revision, part of every task key: bumped when the same knobs train differently,
# so that results of the old protocol never answer for the new one. 2: the explosion stop is
# for sweep trials only; halving ranks its early round by validation.
PROTOCOL = 2
# Layers that draw random numbers while training (dropout masks, RReLU's slopes): their children
# train one at a time, drawing from the global generator as the paper's one-network protocol does.
_RANDOM_LAYERS = (nn.modules.dropout._DropoutNd, nn.RReLU)


@dataclass(frozen=True)
class Splits:
    """Train, validation (carved from the training set) and held-out test tensors, on one device."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_x), "val": len(self.val_x), "test": len(self.test_x)}


def tensors_fingerprint(named: dict[str, Tensor], chunk: int = 4096) -> str:
    """A short sha256 of tensors' names, shapes, types and values, in `named`'s order.

    A task's key holds this of its data where the data comes from files nos does not control: the files'
    folder is not part of the key, and without it other data of the same sizes (another version of the
    data set, a corrected label file, a damaged copy on one worker's disk) would be answered with results
    trained on the first. The tensors are hashed where they already are, a chunk of rows at a time.
    """
    digest = hashlib.sha256()
    for name, tensor in named.items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        for part in torch.split(tensor, chunk):
            # Logical order, whatever the memory format or device: the same data gives the same bytes.
            digest.update(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


@dataclass
class Task:
    """Everything `evaluate_rule` needs to turn a rule into a reward.

    `options` are the arguments that built the task (`get_task(name, **options)`);
    with the protocol's knobs they make `config_key()`, so two tasks with the
    same key give the same reward for the same rule and seed.
    """

    name: str
    splits: Splits
    make_child: Callable[[], nn.Module]
    objective: Objective
    batch_size: int
    lrs: tuple[float, ...] = PAPER_LRS
    sweep_epochs: int = 1
    epochs: int = 5
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False   # image children run faster on CPU in NHWC
    # A sweep trial whose loss exceeds this many times its first loss has exploded: it stops,
    # diverged (0 turns the check off; non-finite losses always stop a trial). Not 10: a large
    # rate can push the cross-entropy past 10x while its accuracy is the sweep's best.
    explode: float = 100.0
    sweep: str = "full"
    # Train the sweep's children as one stacked network (nos.tasks.stacked). None: where
    # it pays, which is on CUDA and for children without convolutions on the CPU.
    stacked: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)
    _frozen: int | None = field(default=None, init=False, repr=False, compare=False)   # see frozen_tensors

    def __post_init__(self) -> None:
        if not self.lrs or any(not (0 < lr < math.inf) for lr in self.lrs):
            raise ValueError(f"learning rates must be positive, finite numbers, got {self.lrs}")
        if len({float(lr) for lr in self.lrs}) != len(self.lrs):
            # Trials are stored and resumed by rate: a rate given twice would be two rows under one key.
            raise ValueError(f"learning rates must differ, got {self.lrs}")
        if self.batch_size < 1 or self.sweep_epochs < 1 or self.epochs < 1:
            raise ValueError("batch_size, sweep_epochs and epochs must be at least 1")
        if self.batch_size > len(self.splits.train_x):
            raise ValueError(f"batch_size {self.batch_size} exceeds the {len(self.splits.train_x)} training examples")
        self.lrs = tuple(float(lr) for lr in self.lrs)
        if self.sweep not in SWEEPS:
            raise ValueError(f"sweep must be one of {', '.join(SWEEPS)}, got {self.sweep!r}")
        if not self.explode >= 0:
            raise ValueError(f"explode must be 0 (off) or a positive factor, got {self.explode}")

    @property
    def steps_per_epoch(self) -> int:
        # The last partial batch is dropped: every step sees a full batch, and
        # with a fresh permutation each epoch no example is left out for good.
        return len(self.splits.train_x) // self.batch_size

    def new_child(self) -> nn.Module:
        """A child on the task's device, initialised from torch's global generator."""
        child = self.make_child().to(self.device)
        return child.to(memory_format=torch.channels_last) if self.channels_last else child

    @property
    def stacks(self) -> bool:
        """Whether the sweep trains its children stacked (see `stacked`)."""
        if self.stacked is not None:
            return self.stacked
        with torch.random.fork_rng(devices=[]):   # building a child draws its initial weights
            modules = list(self.make_child().modules())
        if any(isinstance(m, nn.RNNBase) for m in modules):
            return False   # vmap has no batching rule for torch's recurrent kernels (GRU, LSTM, RNN)
        if _backward_hooked(modules):
            return False   # a stack runs backward hooks on all its children at once, or not at all
        if any(isinstance(m, _RANDOM_LAYERS) for m in modules):
            return False   # vmap refuses a random draw in a stack; allowed, it would not draw each child's own
        if self.device.type == "cuda":
            return True
        # On the CPU a stack's grouped convolutions take about twice the time of separate ones.
        return not any(isinstance(m, nn.modules.conv._ConvNd) for m in modules)

    def to_dict(self) -> dict[str, Any]:
        """The task's identity as plain JSON data.

        The device and stacking are left out: like a GPU against a CPU, they
        change rounding, not the protocol.
        """
        identity = {
            "protocol": PROTOCOL,
            "name": self.name,
            "options": dict(sorted(self.options.items())),
            "objective": self.objective.name,
            "batch_size": self.batch_size,
            "lrs": list(self.lrs),
            "sweep_epochs": self.sweep_epochs,
            "epochs": self.epochs,
            "explode": self.explode,
            "sweep": self.sweep,
            "sizes": self.splits.sizes,
        }
        if self.frozen_tensors:
            # Stacks and packs trained frozen parameters until they kept them frozen: a child with any has a key
            # of its own from then on, so results stored before are not reused. Other keys are unchanged.
            identity["frozen"] = self.frozen_tensors
        return identity

    @property
    def frozen_tensors(self) -> int:
        """How many of the child's parameter tensors are frozen (requires_grad False); built once to count."""
        if self._frozen is None:
            with torch.random.fork_rng(devices=[]):   # building a child draws its initial weights
                self._frozen = sum(not p.requires_grad for p in self.make_child().parameters())
        return self._frozen

    def config_key(self) -> str:
        """A stable short hash of `to_dict()`: equal keys, same protocol on the same data."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _backward_hooked(modules: list[nn.Module]) -> bool:
    """Whether a backward hook, the network's own or one for every module, would run in the child's backward."""
    if nn.modules.module._global_backward_hooks or nn.modules.module._global_backward_pre_hooks:
        return True
    return any(m._backward_hooks or m._backward_pre_hooks for m in modules)
