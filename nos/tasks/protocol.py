"""The paper's evaluation protocol: a rule's reward on a task.

    result = evaluate_rule("g * exp(sign(g) * sign(m))", get_task("digits"), seed=0)

1. For each learning rate of the task's grid (1e-5 ... 1e1), train a fresh
   child from the same initial weights for `sweep_epochs` (1) epoch and
   record its validation accuracy.
2. Train a fresh child from those weights for `epochs` (5) at the best rate
   (the first of equals).
3. reward = its validation accuracy; its test accuracy is stored beside it.
4. A non-finite loss or weight ends that trial at once: diverged, accuracy 0.
   A rule that diverges at every rate gets reward 0.

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
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..optim import SymbolicOptimizer, resolve_rule
from ..rules import Node, operands_read, to_text
from .base import Task

# Rules reading these depend on the run's length, so a 1-epoch trial is not
# the first epoch of a 5-epoch run.
SCHEDULES = frozenset({"ld", "cd", "rd"})
# On CUDA, reading the loss each step stalls the GPU queue; check this often instead.
CUDA_CHECK_EVERY = 16


@dataclass
class TrialRecord:
    """One training run at one learning rate.

    val_acc is 0 when diverged; train_loss is the mean loss of the last epoch
    trained (None when diverged); steps counts optimizer steps taken.
    """

    lr: float
    val_acc: float
    train_loss: float | None
    diverged: bool
    wall_seconds: float
    epochs: int
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvaluationResult:
    """A rule's evaluation: the sweep, the best rate, the reward and the held-out test accuracy.

    `final` is the long run at best_lr (None when every rate diverged); when
    it continued a sweep trial its wall_seconds covers only the extra epochs.
    """

    rule: str
    task: str
    task_key: str
    seed: int
    trials: list[TrialRecord]
    best_lr: float | None
    reward: float
    test_acc: float
    diverged: bool
    wall_seconds: float
    final: TrialRecord | None = None
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        data = dict(data)
        data["trials"] = [TrialRecord(**t) for t in data["trials"]]
        data["final"] = TrialRecord(**data["final"]) if data.get("final") else None
        return cls(**data)


@dataclass
class _Child:
    """A child being trained: its network, optimizer and data-order generator, so training can go on later."""

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

    @classmethod
    def fresh(cls, task: Task, initial: nn.Module, rule: Node, lr: float, total_steps: int, seed: int) -> _Child:
        model = copy.deepcopy(initial)
        optimizer = SymbolicOptimizer(model.parameters(), rule, lr=lr, total_steps=total_steps, seed=seed)
        return cls(task, model, optimizer, torch.Generator().manual_seed(seed), lr)

    def train(self, epochs: int) -> None:
        """Train `epochs` more epochs (stopping at divergence), then score on validation."""
        start = time.perf_counter()
        for _ in range(epochs):
            loss = self._epoch()
            if loss is None or not _all_finite(self.model):
                self.diverged, self.val_acc, self.train_loss = True, 0.0, None
                break
            self.epochs += 1
            self.train_loss = loss
        else:
            self.val_acc = self.task.objective.score(self.model, self.task.splits.val_x, self.task.splits.val_y)
            if not math.isfinite(self.val_acc):
                self.diverged, self.val_acc = True, 0.0
        self.wall_seconds += time.perf_counter() - start

    def _epoch(self) -> float | None:
        """One pass over a fresh permutation; the mean loss, or None at the first non-finite loss."""
        task, model, optimizer = self.task, self.model, self.optimizer
        x, y, objective, batch = task.splits.train_x, task.splits.train_y, task.objective, task.batch_size
        steps = task.steps_per_epoch
        # One gather per epoch, then each batch is a contiguous slice (a view: no per-step copy).
        order = torch.randperm(len(x), generator=self.order).to(task.device)
        x, y = x[order], y[order]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        on_cpu = task.device.type == "cpu"
        total = 0.0 if on_cpu else torch.zeros((), device=task.device)
        for i in range(steps):
            rows = slice(i * batch, (i + 1) * batch)
            loss = objective.loss(model(x[rows]), y[rows])
            if on_cpu:   # reading a CPU scalar costs nothing: check every step
                value = loss.item()
                if not math.isfinite(value):
                    return None
                total += value
            else:
                total += loss.detach()
                if (i + 1) % CUDA_CHECK_EVERY == 0 and not torch.isfinite(total):
                    return None
            for p in params:   # zero_grad(set_to_none=True) without its per-call profiler bookkeeping
                p.grad = None
            loss.backward()
            optimizer.step()
            self.steps += 1
        total = float(total)
        return total / steps if math.isfinite(total) else None

    def record(self) -> TrialRecord:
        return TrialRecord(self.lr, self.val_acc, self.train_loss, self.diverged, self.wall_seconds,
                           self.epochs, self.steps)


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


OnTrial = Callable[[TrialRecord, str], None]


def evaluate_rule(rule: str | Node, task: Task, seed: int = 0, *, on_trial: OnTrial | None = None,
                  reuse_sweep: bool = True) -> EvaluationResult:
    """Run the paper's protocol for `rule` on `task` (see the module doc).

    rule: rule text, a built-in name or a tree (a bad text raises RuleSyntaxError).
    on_trial: called after each trial with its record and "sweep" or "final".
    reuse_sweep: continue the best sweep trial instead of retraining its first
        epochs (same result, less time); False always trains the final child afresh.
    """
    tree = resolve_rule(rule)
    start = time.perf_counter()
    sweep_steps = task.sweep_epochs * task.steps_per_epoch
    final_steps = task.epochs * task.steps_per_epoch
    reuse = reuse_sweep and task.sweep_epochs <= task.epochs and not (operands_read(tree) & SCHEDULES)
    with _deterministic(task.device):
        initial = initial_child(task, seed)
        trials: list[TrialRecord] = []
        best: _Child | None = None
        for lr in task.lrs:
            child = _Child.fresh(task, initial, tree, lr, final_steps if reuse else sweep_steps, seed)
            child.train(task.sweep_epochs)
            trials.append(child.record())
            if on_trial:
                on_trial(trials[-1], "sweep")
            if not child.diverged and (best is None or child.val_acc > best.val_acc):
                best = child

        final, test_acc = None, 0.0
        if best is not None:
            if reuse:   # the best sweep trial is the final child's first epochs
                final, final.wall_seconds = best, 0.0
                final.train(task.epochs - task.sweep_epochs)
            else:
                final = _Child.fresh(task, initial, tree, best.lr, final_steps, seed)
                final.train(task.epochs)
            if not final.diverged:
                test_acc = task.objective.score(final.model, task.splits.test_x, task.splits.test_y)
            if on_trial:
                on_trial(final.record(), "final")

    return EvaluationResult(
        rule=to_text(tree), task=task.name, task_key=task.config_key(), seed=seed, trials=trials,
        best_lr=best.lr if best else None,
        reward=final.val_acc if final else 0.0,
        test_acc=test_acc,
        diverged=final is None or final.diverged,
        wall_seconds=time.perf_counter() - start,
        final=final.record() if final else None,
        device=str(task.device),
    )
