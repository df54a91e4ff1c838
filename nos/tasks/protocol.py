"""The paper's evaluation protocol: a rule's reward on a task.

    result = evaluate_rule("g * exp(sign(g) * sign(m))", get_task("digits"), seed=0)

1. For each learning rate of the task's grid (1e-5 ... 1e1), train a fresh
   child from the same initial weights for `sweep_epochs` (1) epoch and
   record its validation accuracy.
2. Train a fresh child from those weights for `epochs` (5) at the best rate
   (the first of equals).
3. reward = its validation accuracy; its test accuracy is stored beside it.
4. A non-finite loss or weight ends that trial at once: diverged, accuracy 0.
   A rule that diverges at every rate gets reward 0. A sweep trial whose loss
   climbs past `task.explode` times its first loss ends the same way; the
   final run has no such stop.

`task.sweep == "halving"` replaces step 1 with successive halving (`_halve`).

Step 2 does not repeat work it can reuse: a child trained with the same
weights, data order, optimizer seed and rate is the same child, so unless
the rule reads a schedule over the run's length (ld, cd, rd) the best sweep
trial simply trains on for the remaining epochs. The reward is the one a
fresh run gives (tests check it) and the evaluation is an epoch shorter.

Same rule, seed, task and device give the same result: the initial weights,
the data order and the optimizer's noise are all drawn from the seed.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..optim import SymbolicOptimizer, resolve_rule
from ..records import EvaluationResult, TrialRecord
from ..rules import Node, operands_read, to_text
from .base import Task

# Rules reading these depend on the run's length, so a 1-epoch trial is not
# the first epoch of a 5-epoch run.
SCHEDULES = frozenset({"ld", "cd", "rd"})
# On CUDA, reading the loss each step stalls the GPU queue; check this often instead.
CUDA_CHECK_EVERY = 16


@dataclass
class _Child:
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
    _data: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _position: int = 0              # steps taken in the current epoch
    _total: Any = 0.0               # their summed loss
    _limit: float | None = None     # a loss above this has exploded (set from the first loss)
    loss_seen: Any = 0.0            # every training loss so far, summed (halving ranks by it)

    @classmethod
    def fresh(cls, task: Task, initial: nn.Module, rule: Node, lr: float, total_steps: int, seed: int) -> _Child:
        model = copy.deepcopy(initial)
        optimizer = SymbolicOptimizer(model.parameters(), rule, lr=lr, total_steps=total_steps, seed=seed)
        return cls(task, model, optimizer, torch.Generator().manual_seed(seed), lr)

    def train(self, epochs: int) -> None:
        """Train to the end of `epochs` more epochs (stopping at divergence), then score on validation."""
        self.train_steps(epochs * self.task.steps_per_epoch - self._position)
        self.validate()

    def train_steps(self, n: int) -> None:
        """Take `n` more steps, across epoch ends, stopping at divergence; no validation."""
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

    def _diverge(self) -> None:
        self.diverged, self.val_acc, self.train_loss, self._data = True, 0.0, None, None

    def _begin_epoch(self) -> None:
        # One gather per epoch, then each batch is a contiguous slice (a view: no per-step copy).
        task = self.task
        order = torch.randperm(len(task.splits.train_x), generator=self.order).to(task.device)
        self._data = task.splits.train_x[order], task.splits.train_y[order]
        self._total = 0.0 if task.device.type == "cpu" else torch.zeros((), device=task.device)

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
        on_cpu = task.device.type == "cpu"
        window = None if on_cpu else torch.zeros((), device=task.device)
        for i in range(self._position, self._position + n):
            rows = slice(i * batch, (i + 1) * batch)
            loss = objective.loss(model(x[rows]), y[rows])
            if self._limit is None and task.explode:
                self._limit = _explosion_limit(float(loss.detach()), task.explode)
            if on_cpu:   # reading a CPU scalar costs nothing: check every step
                value = loss.item()
                if not math.isfinite(value) or (self._limit is not None and value > self._limit):
                    return False
                self._total += value
                self.loss_seen += value
            else:
                window += loss.detach()
                if (i + 1 - self._position) % CUDA_CHECK_EVERY == 0:
                    if not self._window_ok(window, CUDA_CHECK_EVERY):
                        return False
                    self._total += window
                    self.loss_seen += window
                    window = torch.zeros((), device=task.device)
            for p in params:   # zero_grad(set_to_none=True) without its per-call profiler bookkeeping
                p.grad = None
            loss.backward()
            optimizer.step()
            self.steps += 1
        if window is not None:
            left = n % CUDA_CHECK_EVERY
            if left and not self._window_ok(window, left):
                return False
            self._total += window
            self.loss_seen += window
        self._position += n
        return True

    def _window_ok(self, window: torch.Tensor, steps: int) -> bool:
        """One host sync for CUDA_CHECK_EVERY steps: every loss finite, their mean below the limit."""
        limit = math.inf if self._limit is None else self._limit * steps
        return bool(torch.isfinite(window) & (window <= limit))

    def record(self) -> TrialRecord:
        return TrialRecord(self.lr, self.val_acc, self.train_loss, self.diverged, self.wall_seconds,
                           self.epochs, self.steps)


def _explosion_limit(first_loss: float, factor: float) -> float | None:
    """A loss above `factor` times the child's first loss counts as exploded (None: no limit)."""
    return factor * first_loss if math.isfinite(first_loss) and first_loss > 0 else None


def _all_finite(model: nn.Module) -> bool:
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
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


def initial_child(task: Task, seed: int) -> nn.Module:
    """The child every trial starts from, drawn from `seed` without touching torch's global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return task.new_child()


class _SequentialChildren:
    """The sweep's children one after another: the same interface as StackedChildren."""

    def __init__(self, task: Task, initial: nn.Module, rule: Node, lrs: list[float], total_steps: int, seed: int):
        self.lrs = list(lrs)
        self.children = [_Child.fresh(task, initial, rule, lr, total_steps, seed) for lr in lrs]
        self.running = list(range(len(lrs)))

    def advance(self, steps: int, on_scored: Callable[[int], None] | None = None, validate: bool = True) -> None:
        for index in list(self.running):
            child = self.children[index]
            child.train_steps(steps)
            if validate:
                child.validate()
            if child.diverged:
                self.running.remove(index)
            if on_scored:
                on_scored(index)

    def loss_seen(self, index: int) -> float:
        return float(self.children[index].loss_seen)


    def stop(self, children: list[int]) -> None:
        self.running = [index for index in self.running if index not in children]

    def extract(self, index: int, make: Callable[..., _Child]) -> _Child:
        return self.children[index]

    def record(self, index: int) -> TrialRecord:
        return self.children[index].record()


def _record(children: Any, index: int, stopped: dict[int, float]) -> TrialRecord:
    """Trial `index`'s record; one stopped by halving has no validation score, and its last round's mean loss."""
    record = children.record(index)
    if index in stopped:
        record.val_acc, record.train_loss = None, stopped[index]
    return record


# Successive halving stops a rate only if its score in the round is more than this far (relative) behind the best's.
HALVING_TIE = 0.01
# What ranks the rates after the early round: "val" (validation error) or "loss" (the round's mean training loss).
HALVING_RANK = "val"


def halving_rounds(rates: int, steps: int) -> list[tuple[int, int]]:
    """Successive halving's rounds: (steps trained so far, children kept after the round).

    With 7 rates and an epoch of S steps: all 7 train S/4 steps, the better
    half (4) train on to S, and the best of those is the sweep's best:
    4.75 trials' worth of training instead of 7.
    """
    if rates <= 2 or steps < 4:
        return [(steps, 1)]
    return [(steps // 4, math.ceil(rates / 2)), (steps, 1)]


def _halve(group: Any, rates: int, sweep_steps: int, stopped: dict[int, float],
           scored: Callable[[int], None] | None) -> None:
    """Successive halving: the early round keeps the rates that score best on validation.

    Validation, as the reward itself, rather than the round's training loss:
    a large rate can drive the cross-entropy far up (confident logits) while
    its accuracy is the best of the sweep, and a loss ranking drops exactly
    the rate the full sweep would pick (measured: see the README). A rate
    outside the better half still goes on while its validation error is
    within HALVING_TIE of the best one's: when no rate has pulled ahead (a
    rule that learns nothing at any rate) the round cannot tell them apart,
    and the sweep stays full. The last round, a full sweep trial for the
    rates left, is scored as the full sweep is.
    """
    done, seen = 0, {i: 0.0 for i in range(rates)}
    for budget, keep in halving_rounds(rates, sweep_steps):
        if budget == sweep_steps:
            group.advance(budget - done, scored)
            return
        group.advance(budget - done, validate=HALVING_RANK == "val")
        now = {i: group.loss_seen(i) for i in group.running}
        means = {i: (now[i] - seen[i]) / (budget - done) for i in group.running}
        behind = {i: 1.0 - group.record(i).val_acc for i in group.running} if HALVING_RANK == "val" else means
        ranked = sorted(group.running, key=lambda i: (behind[i] if math.isfinite(behind[i]) else math.inf, i))
        best = behind[ranked[0]] if ranked else 0.0
        tied = best + HALVING_TIE * abs(best)
        out = [i for i in ranked[keep:] if not behind[i] <= tied]
        for index in out:
            stopped[index] = means[index]
        group.stop(out)
        if scored:
            for index in sorted(out):
                scored(index)
        done, seen = budget, now


OnTrial = Callable[[TrialRecord, str], None]


def evaluate_rule(rule: str | Node, task: Task, seed: int = 0, *, on_trial: OnTrial | None = None,
                  reuse_sweep: bool = True) -> EvaluationResult:
    """Run the paper's protocol for `rule` on `task` (see the module doc).

    rule: rule text, a built-in name or a tree (a bad text raises RuleSyntaxError).
    on_trial: called after each trial with its record and "sweep" or "final".
    reuse_sweep: continue the best sweep trial instead of retraining its first
        epochs (same result, less time); False always trains the final child afresh.
    """
    from .stacked import StackedChildren

    tree = resolve_rule(rule)
    start = time.perf_counter()
    sweep_steps = task.sweep_epochs * task.steps_per_epoch
    final_steps = task.epochs * task.steps_per_epoch
    reuse = reuse_sweep and task.sweep_epochs <= task.epochs and not (operands_read(tree) & SCHEDULES)
    with _deterministic(task.device):
        initial = initial_child(task, seed)
        group = (StackedChildren if task.stacks else _SequentialChildren)(
            task, initial, tree, list(task.lrs), final_steps if reuse else sweep_steps, seed)
        stopped: dict[int, float] = {}   # trials halving stopped early -> their last round's mean loss
        scored = (lambda index: on_trial(_record(group, index, stopped), "sweep")) if on_trial else None
        if task.sweep == "full":
            group.advance(sweep_steps, scored)
        else:
            _halve(group, len(task.lrs), sweep_steps, stopped, scored)
        trials = [_record(group, index, stopped) for index in range(len(task.lrs))]
        best_index = max((i for i, t in enumerate(trials) if not t.diverged and i not in stopped),
                         key=lambda i: (trials[i].val_acc, -i), default=None)

        final, test_acc = None, 0.0
        if best_index is not None:
            best_lr = trials[best_index].lr
            if reuse:   # the best sweep trial is the final child's first epochs
                final = group.extract(best_index, _Child)
                final.wall_seconds = 0.0
            else:
                final = _Child.fresh(task, initial, tree, best_lr, final_steps, seed)
            # The explosion stop is the sweep's shortcut past rates that will not win; the chosen
            # rate trains to the end (only a non-finite loss stops it), so its reward is full's.
            final._limit = math.inf
            final.train(task.epochs - final.epochs)
            if not final.diverged:
                test_acc = task.objective.score(final.model, task.splits.test_x, task.splits.test_y)
            if on_trial:
                on_trial(final.record(), "final")

    return EvaluationResult(
        rule=to_text(tree), task=task.name, task_key=task.config_key(), seed=seed, trials=trials,
        best_lr=trials[best_index].lr if best_index is not None else None,
        reward=final.val_acc if final else 0.0,
        test_acc=test_acc,
        diverged=final is None or final.diverged,
        wall_seconds=time.perf_counter() - start,
        final=final.record() if final else None,
        device=str(task.device),
    )
