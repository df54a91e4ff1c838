"""Training children: the engine under the protocol, the stacked sweep and transfer.

    with deterministic(task.device):
        initial = initial_child(task, seed)
        group = SequentialChildren(task, initial, rule, list(task.lrs), total_steps, seed)
        group.advance(task.steps_per_epoch)              # every running child, then scored on validation
        best = best_index([group.record(i) for i in range(len(group.lrs))])
        child = group.extract(best)                      # trains on alone
        child.disable_explosion_stop()
        child.train(4)

A `Child` is one network, its optimizer and its data order, which can stop
and go on mid-epoch. A group of children (`ChildGroup`: `SequentialChildren`
here, `StackedChildren` in nos.tasks.stacked) trains children of one rule,
one learning rate each, from the same initial weights; a caller drives it
without knowing which kind it is.

Divergence: a non-finite loss or weight ends a child at once (accuracy 0).
A child also stops, diverged, when its loss climbs past `task.explode` times
its first loss (`explosion_limit`); `healthy` is the one test both apply.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from ..optim import SymbolicOptimizer
from ..records import TrialRecord
from ..rules import Node, operands_read
from ..rules.vocabulary import SCHEDULES
from .base import Task

# On CUDA, reading the loss each step stalls the GPU queue; check this often instead.
CUDA_CHECK_EVERY = 16


def check_every(device: torch.device) -> int:
    """Steps between a child's loss checks: every step where reading a loss costs nothing (the CPU)."""
    return 1 if device.type == "cpu" else CUDA_CHECK_EVERY


def reads_schedule(rule: Node) -> bool:
    """Whether the rule reads a schedule over the run's length (so a short trial is not a long run's start)."""
    return not operands_read(rule).isdisjoint(SCHEDULES)


# -- divergence -----------------------------------------------------------------
def explosion_limit(first_loss: float, factor: float) -> float | None:
    """A loss above `factor` times the child's first loss counts as exploded (None: no limit)."""
    return factor * first_loss if math.isfinite(first_loss) and first_loss > 0 else None


def explosion_limits(limits: Tensor, losses: Tensor, factor: float) -> tuple[Tensor, bool]:
    """`explosion_limit` for each child of a stack that has none yet (nan), from its loss; whether any still has none.

    A lone child without a limit takes one from each loss until one is positive; so does each child here.
    """
    losses = losses.to(limits.dtype)
    limits = torch.where(limits.isnan() & losses.isfinite() & (losses > 0), factor * losses, limits)
    return limits, bool(limits.isnan().any())


def healthy(losses: Any, steps: int, limit: float | Tensor | None) -> Any:
    """Whether `losses`, the sum of `steps` training losses, are finite and on average within `limit`.

    A float gives a bool; a tensor (one sum per child of a stack) gives a bool tensor, against one
    limit for all or, as a tensor, one per child (nan: none yet).
    """
    if isinstance(limit, Tensor):
        return torch.isfinite(losses) & ~(losses > limit * steps)
    bound = math.inf if limit is None else limit * steps
    if isinstance(losses, float):
        return math.isfinite(losses) and losses <= bound
    return torch.isfinite(losses) & (losses <= bound)


def _all_finite(model: nn.Module) -> bool:
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


# -- one child --------------------------------------------------------------------
@dataclass
class Child:
    """A child being trained: its network, optimizer and data-order generator, so training can go on later.

    Training can stop and go on mid-epoch (the successive-halving sweep scores
    children after a fraction of one): the epoch's permutation and its
    losses so far are kept until the epoch ends.
    """

    task: Task
    model: nn.Module
    optimizer: SymbolicOptimizer
    order: torch.Generator
    lr: float
    epochs: int = 0
    steps: int = 0
    val_acc: float = 0.0
    train_loss: float | None = None
    diverged: bool = False
    wall_seconds: float = 0.0
    limit: float | None = None      # a loss above this has exploded (None: set from the first loss)
    loss_seen: Any = 0.0            # every training loss so far, summed (halving ranks by it)
    # The child's own state of torch's global generator (and its CUDA device's), for the random draws
    # of its forward (dropout): swapped in while it trains, so that its masks follow from the seed
    # whatever trains between its steps. None: not kept (a child from a stack, which never draws).
    draws: list[Tensor] | None = field(default=None, repr=False)
    _data: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _position: int = 0              # steps taken in the current epoch
    _total: Any = 0.0               # their summed loss

    @classmethod
    def fresh(cls, task: Task, initial: nn.Module, rule: Node, lr: float, total_steps: int, seed: int) -> Child:
        model = copy.deepcopy(initial)
        optimizer = SymbolicOptimizer(model.parameters(), rule, lr=lr, total_steps=total_steps, seed=seed)
        draws = _seeded_draws(seed, task.device)
        return cls(task, model, optimizer, torch.Generator().manual_seed(seed), lr, draws=draws)

    def disable_explosion_stop(self) -> None:
        """Train on whatever the loss does (a non-finite one still stops it): for the run at the chosen rate.

        The explosion stop is the sweep's shortcut past rates that will not win;
        the chosen rate trains to the end, so its reward is the full sweep's.
        """
        self.limit = math.inf

    def train(self, epochs: int) -> None:
        """Train to the end of `epochs` more epochs (stopping at divergence), then score on validation."""
        self.train_steps(epochs * self.task.steps_per_epoch - self._position)
        self.validate()

    def train_steps(self, n: int) -> None:
        """Take `n` more steps, across epoch ends, stopping at divergence; no validation."""
        if self.draws is None:
            self._train_steps(n)
            return
        with torch.random.fork_rng(devices=_cuda(self.task.device)):
            _set_draws(self.draws, self.task.device)
            self._train_steps(n)
            self.draws = _get_draws(self.task.device)

    def _train_steps(self, n: int) -> None:
        start = time.perf_counter()
        steps_per_epoch = self.task.steps_per_epoch
        while n > 0 and not self.diverged:
            if self._position == 0:
                self._begin_epoch()
            take = min(n, steps_per_epoch - self._position)
            if not self._run(take):
                self._diverge()
                break
            n -= take
            if self._position == steps_per_epoch:
                self._end_epoch()
        self.wall_seconds += time.perf_counter() - start

    def validate(self) -> None:
        start = time.perf_counter()
        if not self.diverged:
            self.val_acc = self.task.objective.score(self.model, self.task.splits.val_x, self.task.splits.val_y)
            if not math.isfinite(self.val_acc):
                self._diverge()
        self.wall_seconds += time.perf_counter() - start

    def record(self) -> TrialRecord:
        return TrialRecord(self.lr, self.val_acc, self.train_loss, self.diverged, self.wall_seconds,
                           self.epochs, self.steps)

    def _diverge(self) -> None:
        self.diverged, self.val_acc, self.train_loss, self._data = True, 0.0, None, None

    def _begin_epoch(self) -> None:
        # One gather per epoch, then each batch is a contiguous slice (a view: no per-step copy).
        task = self.task
        order = torch.randperm(len(task.splits.train_x), generator=self.order).to(task.device)
        self._data = task.splits.train_x[order], task.splits.train_y[order]
        self._total = 0.0 if check_every(task.device) == 1 else torch.zeros((), dtype=torch.float64, device=task.device)

    def _end_epoch(self) -> None:
        total = float(self._total)
        self._data, self._position = None, 0
        if not math.isfinite(total) or not _all_finite(self.model):
            self._diverge()
            return
        self.epochs += 1
        self.train_loss = total / self.task.steps_per_epoch

    def _run(self, n: int) -> bool:
        """`n` steps of the current epoch; False at the first non-finite or exploded loss."""
        task, model, optimizer = self.task, self.model, self.optimizer
        x, y = self._data
        objective, batch = task.objective, task.batch_size
        params = [p for group in optimizer.param_groups for p in group["params"]]
        every = check_every(task.device)
        # Summed in float64, as the CPU sums Python floats: a float32 sum of finite losses can overflow.
        window = None if every == 1 else torch.zeros((), dtype=torch.float64, device=task.device)
        for i in range(self._position, self._position + n):
            rows = slice(i * batch, (i + 1) * batch)
            loss = objective.loss(model(x[rows]), y[rows])
            if self.limit is None and task.explode:
                self.limit = explosion_limit(float(loss.detach()), task.explode)
            if window is None:   # reading a CPU scalar costs nothing: check every step
                value = loss.item()
                if not healthy(value, 1, self.limit):
                    return False
                self._total += value
                self.loss_seen += value
            else:
                window += loss.detach()
                if (i + 1 - self._position) % every == 0:
                    if not healthy(window, every, self.limit):
                        return False
                    self._total += window
                    self.loss_seen += window
                    window = torch.zeros((), dtype=torch.float64, device=task.device)
            for p in params:   # zero_grad(set_to_none=True) without its per-call profiler bookkeeping
                p.grad = None
            loss.backward()
            optimizer.step()
            self.steps += 1
        if window is not None:
            left = n % every
            if left and not healthy(window, left, self.limit):
                return False
            self._total += window
            self.loss_seen += window
        self._position += n
        return True


# -- groups of children -------------------------------------------------------------
OnScored = Callable[[int], None]


class ChildGroup(Protocol):
    """Children of one rule, one learning rate each (`lrs`), from the same initial weights.

    A child is named by its index into `lrs`; `running` lists those still
    training (not diverged, not stopped).
    """

    lrs: list[float]
    running: list[int]

    def advance(self, steps: int, on_scored: OnScored | None = None, validate: bool = True) -> None:
        """Train every running child `steps` more steps; score each on validation unless told not to.

        `on_scored(index)` follows each child's scoring (and each child that diverged meanwhile).
        """

    def stop(self, children: list[int]) -> None:
        """Take `children` out of training for good, freeing what they hold; their records stay."""

    def extract(self, index: int) -> Child:
        """Child `index` as a `Child` that trains on alone (between epochs only)."""

    def record(self, index: int) -> TrialRecord:
        """Child `index`'s trial so far."""

    def loss_seen(self, index: int) -> float:
        """Every training loss child `index` has seen, summed."""


class SequentialChildren:
    """The group's children one after another, each a `Child` made when it first trains."""

    def __init__(self, task: Task, initial: nn.Module, rule: Node, lrs: list[float], total_steps: int, seed: int):
        self.task, self.initial, self.rule, self.total_steps, self.seed = task, initial, rule, total_steps, seed
        self.lrs = list(lrs)
        self.children: list[Child | None] = [None] * len(self.lrs)
        self.released: dict[int, TrialRecord] = {}
        self.running = list(range(len(self.lrs)))

    def child(self, index: int) -> Child:
        if index in self.released:
            raise ValueError(f"child {index} was released")
        if self.children[index] is None:
            self.children[index] = Child.fresh(self.task, self.initial, self.rule, self.lrs[index],
                                               self.total_steps, self.seed)
        return self.children[index]

    def advance(self, steps: int, on_scored: OnScored | None = None, validate: bool = True) -> None:
        for index in list(self.running):
            child = self.child(index)
            child.train_steps(steps)
            if validate:
                child.validate()
            if child.diverged:
                self.running.remove(index)
            if on_scored:
                on_scored(index)

    def stop(self, children: list[int]) -> None:
        """Take `children` out of training and free them (`release`): a stopped child never trains again.

        One that halving stops mid-epoch would otherwise keep its epoch's
        shuffled copy of the training set, besides its network and optimizer,
        for the rest of the sweep and the final run. Their records stay.
        """
        for index in children:
            if self.children[index] is not None:
                self.released[index] = self.children[index].record()
                self.children[index] = None
        self.running = [index for index in self.running if index not in children]

    def extract(self, index: int) -> Child:
        return self.child(index)

    def record(self, index: int) -> TrialRecord:
        # A copy, as a live child's record is: a caller may change the one it gets (protocol.trial_record does).
        return replace(self.released[index]) if index in self.released else self.child(index).record()

    def release(self, index: int) -> None:
        """Free child `index`'s network, optimizer and data (a large network's memory).

        It trains no more; its record stays."""
        self.released[index] = self.child(index).record()
        self.children[index] = None
        self.stop([index])

    def loss_seen(self, index: int) -> float:
        return float(self.child(index).loss_seen)


def best_index(trials: Sequence[TrialRecord], left_out: Any = ()) -> int | None:
    """The trial with the best validation score (the smallest rate of equals) among those not diverged nor left out.

    Ties go by rate, not by place in the grid, so that an unsorted grid (`--lrs 1e-4,1e-5`) picks
    what the sorted one does."""
    return max((i for i, t in enumerate(trials) if not t.diverged and i not in left_out),
               key=lambda i: (trials[i].val_acc, -trials[i].lr), default=None)


# -- the evaluation's setting -----------------------------------------------------------
@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """cuDNN's deterministic kernels for the evaluation, restored after (CPU kernels already are)."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def _cuda(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


def _get_draws(device: torch.device) -> list[Tensor]:
    return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in _cuda(device)]


def _set_draws(states: list[Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    for d, state in zip(_cuda(device), states[1:]):
        torch.cuda.set_rng_state(state, d)


def _seeded_draws(seed: int, device: torch.device) -> list[Tensor]:
    return [torch.Generator(device=d).manual_seed(seed).get_state() for d in [torch.device("cpu"), *_cuda(device)]]


def initial_child(task: Task, seed: int) -> nn.Module:
    """The child every trial starts from, drawn from `seed` without touching torch's global generators.

    The CPU's is seeded, and the task's CUDA device's for a child built there; both are put back after.
    (torch.manual_seed would seed every CUDA device's, and leave them so.)
    """
    with torch.random.fork_rng(devices=_cuda(task.device)):
        torch.random.default_generator.manual_seed(seed)
        for device in _cuda(task.device):
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        return task.new_child()


__all__ = [
    "CUDA_CHECK_EVERY", "Child", "ChildGroup", "OnScored", "SequentialChildren", "best_index",
    "check_every", "deterministic", "explosion_limit", "explosion_limits", "healthy", "initial_child", "reads_schedule",
]
