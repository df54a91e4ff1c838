"""The sweep's children trained as one stacked network.

Every trial of a sweep starts from the same weights and sees the same batches
in the same order; only the learning rate differs. So K children are K
copies of the weights stacked along a new first dimension, run as one
network (written out by nos.tasks.stacking for a Sequential of common
layers, else `torch.func.vmap` over `functional_call`): one forward, one
backward and one optimizer step for all of them. Each child's loss is its
own mean, and the backward of their sum gives each child exactly its own
gradient, so a child that diverges poisons nobody; it is dropped from the
stack at once.

The optimizer is a `SymbolicOptimizer` over the stacked tensors, with one
rate per child and noise drawn per child from the same seed: child k follows
the same arithmetic as a child trained alone, up to floating-point rounding
(a test holds the two paths together). On CUDA this turns seven small
kernels into one seven times larger; on the CPU it pays for small children
(the digits MLP), where a step is mostly Python and dispatch overhead, and
not for convolutions (see Task.stacks).
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ..optim import SymbolicOptimizer
from ..records import TrialRecord
from ..rules import Node
from .base import Task
from .objectives import score_chunk
from .stacking import stacked_forward
from .training import Child, OnScored, check_every, explosion_limits, healthy


class StackedChildren:
    """K children from the same initial weights, one learning rate each, trained at once.

    A `ChildGroup` (nos.tasks.training): `advance` trains and scores every
    running child, `stop` takes children out, `extract` turns one into a
    plain `Child` that trains on alone.
    """

    def __init__(self, task: Task, initial: nn.Module, rule: Node, lrs: list[float], total_steps: int, seed: int):
        self.task, self.initial, self.rule = task, initial, rule
        self.total_steps, self.seed = total_steps, seed
        self.lrs = list(lrs)
        k = len(lrs)
        params, buffers = stack_module_state([initial] * k)
        # A frozen parameter (requires_grad=False) stays frozen: no gradient, so no rule steps it, as alone.
        self.params = {name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in params.items()}
        self.buffers = {name: b.clone() for name, b in buffers.items()}
        self.skeleton = copy.deepcopy(initial).to("meta")
        # vmap's host time per op outweighs a small child's kernels: common layers get a forward written out.
        self.forward = stacked_forward(self.skeleton) or vmap(self._call, in_dims=(0, 0, None))
        self.loss = task.objective.stacked_loss
        self.score_sum = vmap(task.objective.score_sum, in_dims=(0, None))
        self._start_optimizers()
        self.order = torch.Generator().manual_seed(seed)
        self.running = list(range(k))   # the child (index into lrs) at each position of the stack
        self.steps = [0] * k
        self.epochs = [0] * k
        self.val_acc = [0.0] * k
        self.train_loss: list[float | None] = [None] * k
        self.diverged = [False] * k
        self.wall_seconds = [0.0] * k
        self._data: tuple[Tensor, Tensor] | None = None
        self._position = 0
        # Losses summed in float64, as a lone child sums them: a float32 sum of finite losses can overflow.
        self._total: Tensor | None = None
        self._seen = torch.zeros(k, dtype=torch.float64, device=task.device)   # every loss so far, per running child
        # Each running child's explosion limit, as a lone child's: from its first positive finite loss (nan: none yet).
        self._limits = torch.full((k,), math.nan, dtype=torch.float64, device=task.device)
        self._limits_open = bool(task.explode)   # whether some child may still be waiting for its limit

    # -- the optimizer: one over the whole stack (nos.tasks.packed has one per rule) --
    def _start_optimizers(self) -> None:
        self.optimizer = self._optimizer(self._rate_tensor(self.lrs))

    def _rate_tensor(self, lrs: list[float]) -> Tensor:
        return torch.tensor(lrs, dtype=next(iter(self.params.values())).dtype, device=self.task.device)

    def _optimizer(self, rates: Tensor) -> SymbolicOptimizer:
        return SymbolicOptimizer(list(self.params.values()), self.rule, lr=1.0, total_steps=self.total_steps,
                                 seed=self.seed, rates=rates)

    def _step(self) -> None:
        self.optimizer.step()

    def _keep_optimizers(self, positions: list[int]) -> None:
        """The optimizer for the stack cut down to `positions` (self.params already is)."""
        index = torch.tensor(positions, dtype=torch.long, device=self.task.device)
        old = self.optimizer
        self.optimizer = self._optimizer(old.rates.index_select(0, index))
        carry_state(old, self.optimizer, index)

    def disable_explosion_stop(self) -> None:
        """Every child trains on whatever its loss does (a non-finite one still stops it): for final runs."""
        self._limits.fill_(math.inf)
        self._limits_open = False

    def _source(self, child: int, pos: int) -> tuple[SymbolicOptimizer, int, Node, int]:
        """Where child `child` (at stack position `pos`) steps: its optimizer, its slice of it, rule and horizon."""
        return self.optimizer, pos, self.rule, self.total_steps

    def _call(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.skeleton, (params, buffers), (x,))

    # -- training --------------------------------------------------------------
    def advance(self, steps: int, on_scored: OnScored | None = None, validate: bool = True) -> None:
        """Train every running child `steps` more steps, then score each on validation.

        `on_scored` follows for each of them, those that diverged meanwhile included (as a lone child's).
        """
        start, trained = time.perf_counter(), sorted(self.running)
        steps_per_epoch = self.task.steps_per_epoch
        while steps > 0 and self.running:
            if self._position == 0:
                self._begin_epoch()
            take = min(steps, steps_per_epoch - self._position)
            self._run(take)
            steps -= take
            if self._position == steps_per_epoch:
                self._end_epoch()
        if validate:
            self._validate()
        self._charge(time.perf_counter() - start)
        if on_scored:
            for child in trained:
                on_scored(child)

    def _begin_epoch(self) -> None:
        task = self.task
        order = torch.randperm(len(task.splits.train_x), generator=self.order).to(task.device)
        self._data = task.splits.train_x[order], task.splits.train_y[order]
        self._total = torch.zeros(len(self.running), dtype=torch.float64, device=task.device)

    def _end_epoch(self) -> None:
        totals = self._total.tolist()
        self._data, self._position = None, 0
        finite = _finite_children([*self.params.values(), *self.buffers.values()])
        bad = [pos for pos, (total, ok) in enumerate(zip(totals, finite)) if not (ok and math.isfinite(total))]
        for pos, child in enumerate(self.running):
            if pos not in bad:
                self.epochs[child] += 1
                self.train_loss[child] = totals[pos] / self.task.steps_per_epoch
        self._diverge(bad)

    def _run(self, n: int) -> None:
        task = self.task
        x, y = self._data
        batch = task.batch_size
        every = check_every(task.device)   # as a lone child checks its losses
        window = torch.zeros(len(self.running), dtype=torch.float64, device=task.device)
        for i in range(self._position, self._position + n):
            rows = slice(i * batch, (i + 1) * batch)
            losses = self.loss(self.forward(self.params, self.buffers, x[rows]), y[rows])
            if self._limits_open:
                self._limits, self._limits_open = explosion_limits(self._limits, losses.detach(), task.explode)
            window += losses.detach()
            taken = i + 1 - self._position
            full = taken % every == 0
            check = full or taken == n
            bad = self._bad(window, (taken - 1) % every + 1) if check else []
            # Children found bad take this step with the rest (their gradients reach nobody else) and leave
            # the stack after it. A full window's are not counted for it: a lone child stops before that step.
            # The last, shorter window of a run is checked after its steps, as a lone child checks it.
            for p in self.params.values():
                p.grad = None
            losses.sum().backward()
            self._step()
            for pos, child in enumerate(self.running):
                if pos not in bad or not full:
                    self.steps[child] += 1
            if check:
                self._total += window
                self._seen += window
                window = torch.zeros(len(self.running) - len(bad), dtype=torch.float64, device=task.device)
                if bad:
                    self._diverge(bad)
                    if not self.running:
                        return
        self._position += n

    def _bad(self, window: Tensor, steps: int) -> list[int]:
        """Stack positions whose losses in the window were non-finite or exploded (one host sync)."""
        ok = healthy(window, steps, self._limits)
        return [pos for pos, good in enumerate(ok.tolist()) if not good]

    @torch.no_grad()
    def _validate(self) -> None:
        if not self.running:
            return
        task = self.task
        x, y = task.splits.val_x, task.splits.val_y
        chunk = score_chunk(task.device, len(self.running))
        self.skeleton.eval()   # batch norm reads its running statistics
        try:
            total = sum((self.score_sum(self.forward(self.params, self.buffers, x[i:i + chunk]), y[i:i + chunk])
                         for i in range(0, len(x), chunk)), torch.zeros(len(self.running), device=task.device))
        finally:
            self.skeleton.train()
        scores = [task.objective.finish(t, len(x)) for t in total.tolist()]
        bad = [pos for pos, s in enumerate(scores) if not math.isfinite(s)]
        for pos, child in enumerate(self.running):
            if pos not in bad:
                self.val_acc[child] = scores[pos]
        self._diverge(bad)

    def _charge(self, seconds: float) -> None:
        # Shared work, shared bill: each child trained in the stack is charged an equal part.
        share = seconds / max(len(self.running), 1)
        for child in self.running:
            self.wall_seconds[child] += share

    # -- membership ------------------------------------------------------------
    def _diverge(self, positions: list[int]) -> None:
        for pos in positions:
            child = self.running[pos]
            self.diverged[child], self.val_acc[child], self.train_loss[child] = True, 0.0, None
        self._keep([pos for pos in range(len(self.running)) if pos not in positions])

    def record(self, child: int) -> TrialRecord:
        return TrialRecord(self.lrs[child], self.val_acc[child], self.train_loss[child], self.diverged[child],
                           self.wall_seconds[child], self.epochs[child], self.steps[child])

    def loss_seen(self, child: int) -> float:
        return float(self._seen[self.running.index(child)])

    def stop(self, children: list[int]) -> None:
        """Take `children` (indices into lrs) out of training; their records stay."""
        self._keep([pos for pos, child in enumerate(self.running) if child not in children])

    def _keep(self, positions: list[int]) -> None:
        if len(positions) == len(self.running):
            return
        index = torch.tensor(positions, dtype=torch.long, device=self.task.device)
        self.params = {n: p.detach().index_select(0, index).requires_grad_(p.requires_grad)
                       for n, p in self.params.items()}
        self.buffers = {n: b.index_select(0, index) for n, b in self.buffers.items()}
        self._keep_optimizers(positions)
        if self._total is not None:
            self._total = self._total.index_select(0, index)
        self._seen = self._seen.index_select(0, index)
        self._limits = self._limits.index_select(0, index)
        self.running = [self.running[pos] for pos in positions]

    def extract(self, child: int) -> Child:
        """Child `child` as a plain `Child`, to train on alone.

        Only between epochs: the data order's generator is the one all children share.
        """
        if self._position:
            raise RuntimeError("children can be extracted only between epochs")
        pos = self.running.index(child)
        model = self.model(child)
        source, local, rule, total_steps = self._source(child, pos)
        optimizer = SymbolicOptimizer(model.parameters(), rule, lr=self.lrs[child], total_steps=total_steps,
                                      seed=self.seed)
        for p, stacked in zip(model.parameters(), source.param_groups[0]["params"]):
            state = source.state.get(stacked)
            if state:
                optimizer.state[p] = {k: torch.empty_like(p).copy_(v[local]) if torch.is_tensor(v) else v
                                      for k, v in state.items()}
        optimizer.set_noise_state(source.noise_state())
        order = torch.Generator()
        order.set_state(self.order.get_state())
        limit = float(self._limits[pos])
        return Child(self.task, model, optimizer, order, self.lrs[child], epochs=self.epochs[child],
                    steps=self.steps[child], val_acc=self.val_acc[child], train_loss=self.train_loss[child],
                    wall_seconds=self.wall_seconds[child], limit=None if math.isnan(limit) else limit)


    def model(self, child: int) -> nn.Module:
        """A plain network holding running child `child`'s weights and statistics now."""
        pos = self.running.index(child)
        model = copy.deepcopy(self.initial)
        with torch.no_grad():
            for name, tensor in (*model.named_parameters(), *model.named_buffers()):
                source = self.params[name] if name in self.params else self.buffers[name]
                tensor.copy_(source[pos])
        return model


def carry_state(old: SymbolicOptimizer, new: SymbolicOptimizer, index: Tensor) -> None:
    """`new` (over the survivors of `old`'s stack) takes their moments, picked by `index`, and the noise."""
    for fresh, previous in zip(new.param_groups[0]["params"], old.param_groups[0]["params"]):
        state = old.state.get(previous)
        if state:
            new.state[fresh] = {k: v.index_select(0, index) if torch.is_tensor(v) else v for k, v in state.items()}
    new.set_noise_state(old.noise_state())


def _finite_children(tensors: list[Tensor]) -> list[bool]:
    """Per stack position: whether every floating value of that child is finite."""
    floats = [t for t in tensors if t.is_floating_point()]
    # reshape, not flatten(1): a child's scalar (a 0-dim buffer) is 1-dim stacked.
    per_tensor = torch.stack([t.reshape(len(t), -1).isfinite().all(1) for t in floats])
    return per_tensor.all(0).tolist()

