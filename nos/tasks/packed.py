"""Several rules evaluated at once: one stacked network for all their children.

    results = evaluate_rules(["powersign", "adam", "sgd"], get_task("digits"), seed=0)

Evaluations that share a task key share the data and the seed, so every
rule's sweep children start from the same initial weights and see the same
batches in the same order; only the rule and the rate differ. So K rules'
sweeps (K x 7 children) train as one stack (nos.tasks.stacked): one forward
and one backward for all of them, while each rule's own `SymbolicOptimizer`
steps that rule's slice of every stacked tensor, with its own noise generator
seeded as when the rule trains alone. A child that diverges or is stopped
(the explosion stop; successive halving, which cuts each rule's rates on
their own) leaves the stack at once.

Then the final runs, packed the same way: a rule whose best sweep child goes
on (see nos.tasks.protocol) keeps that child in the stack while every other
child leaves it; the rules that read a schedule (ld, cd, rd) retrain from
scratch, together, in a second pack, which joins the first once it has
caught up (the sweep's epochs trained: the same point of the same data
order), so that the two do not step in turn for the rest. Each rule's
result equals `evaluate_rule`'s within rounding (tests/test_packed.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..optim import SymbolicOptimizer, resolve_rule, step_together
from ..records import EvaluationResult, TrialRecord
from ..rules import Node, to_text
from .base import Task
from .protocol import evaluate_rule, evaluation_result, halve, halving_cut, trial_record
from .stacked import StackedChildren, carry_state
from .training import OnScored, best_index, deterministic, initial_child, reads_schedule


@dataclass(frozen=True)
class Member:
    """One rule of a pack: its children's rates and the horizon its schedules read."""

    rule: Node
    lrs: tuple[float, ...]
    total_steps: int


class PackedChildren(StackedChildren):
    """The children of several rules, one rate each, from the same initial weights, trained as one stack.

    Children are numbered member by member: member m's are `children(m)`, in
    the order of its rates. Member m's optimizer holds views of its slice of
    every stacked tensor, and its gradients are views of the stack's.
    """

    def __init__(self, task: Task, initial: nn.Module, members: Sequence[Member], seed: int):
        self.members = list(members)
        self.member_of = [m for m, member in enumerate(self.members) for _ in member.lrs]
        sizes = [len(member.lrs) for member in self.members]
        self.first = [sum(sizes[:m]) for m in range(len(sizes))]
        # No rule nor horizon for the whole stack: each member brings its own (`_source`, `_optimizer_for`).
        super().__init__(task, initial, None, [lr for member in self.members for lr in member.lrs], 0, seed)

    def children(self, member: int) -> range:
        return range(self.first[member], self.first[member] + len(self.members[member].lrs))

    # -- one optimizer per member, over its slice of the stack ------------------
    def _start_optimizers(self) -> None:
        self._spans = [(self.first[m], self.first[m] + len(member.lrs)) for m, member in enumerate(self.members)]
        self.optimizers: list[SymbolicOptimizer | None] = [
            self._optimizer_for(m, self._rate_tensor(list(member.lrs))) for m, member in enumerate(self.members)]

    def _optimizer_for(self, member: int, rates: Tensor) -> SymbolicOptimizer:
        start, end = self._spans[member]
        views = [p.detach()[start:end] for p in self.params.values()]
        rule, total_steps = self.members[member].rule, self.members[member].total_steps
        return SymbolicOptimizer(views, rule, lr=1.0, total_steps=total_steps, seed=self.seed, rates=rates)

    def _step(self) -> None:
        step_together(self.hand_gradients())

    def hand_gradients(self) -> list[SymbolicOptimizer]:
        """Give each member's optimizer its slices of the stack's gradients; the optimizers that step."""
        # Each stacked gradient cut into the members' slices at once: one call per tensor, not per member.
        # A parameter the loss does not reach has none: no member's slice of it steps, as for a lone optimizer.
        sizes = [end - start for start, end in self._spans]
        slices = [[None] * len(sizes) if stacked.grad is None else stacked.grad.split(sizes)
                  for stacked in self.params.values()]
        stepping = []
        for m, optimizer in enumerate(self.optimizers):
            if optimizer is not None:
                for view, grads in zip(optimizer.param_groups[0]["params"], slices):
                    view.grad = grads[m]
                stepping.append(optimizer)
        return stepping

    def _keep_optimizers(self, positions: list[int]) -> None:
        kept, old_spans, start = set(positions), self._spans, 0
        self._spans = []
        for (first, end) in old_spans:
            survivors = sum(1 for pos in range(first, end) if pos in kept)
            self._spans.append((start, start + survivors))
            start += survivors
        for m, (old, (first, end)) in enumerate(zip(list(self.optimizers), old_spans)):
            local = [pos - first for pos in range(first, end) if pos in kept]
            if not local:
                self.optimizers[m] = None
                continue
            self.optimizers[m] = self._moved(m, old, torch.tensor(local, dtype=torch.long, device=self.task.device))

    def join(self, other: PackedChildren) -> int:
        """Take `other`'s members and running children into this stack; returns the number added to its children's.

        Both stacks must stand between epochs at the same point of the same
        data order: every child then goes on seeing the batches it would have
        seen in its own stack, with its own optimizer's state and noise.
        """
        if self._position or other._position or not torch.equal(self.order.get_state(), other.order.get_state()):
            raise RuntimeError("packs join only between epochs, at the same point of the same data order")
        offset, members, positions = len(self.lrs), len(self.members), len(self.running)
        self.members += other.members
        self.member_of += [members + m for m in other.member_of]
        self.first += [offset + first for first in other.first]
        for name in ("lrs", "steps", "epochs", "val_acc", "train_loss", "diverged", "wall_seconds"):
            getattr(self, name).extend(getattr(other, name))
        self.params = {n: torch.cat([p.detach(), other.params[n].detach()]).requires_grad_(p.requires_grad)
                       for n, p in self.params.items()}
        self.buffers = {n: torch.cat([b, other.buffers[n]]) for n, b in self.buffers.items()}
        self._seen = torch.cat([self._seen, other._seen])
        self._limits = torch.cat([self._limits, other._limits])
        self._limits_open = self._limits_open or other._limits_open
        self._total = None   # an epoch's running sum: the next epoch starts it afresh
        self.running += [offset + child for child in other.running]
        self._spans += [(positions + start, positions + end) for start, end in other._spans]
        old = self.optimizers + other.optimizers
        self.optimizers = [None if previous is None else self._moved(
            m, previous, torch.arange(len(previous.rates), device=self.task.device)) for m, previous in enumerate(old)]
        return offset

    def _moved(self, member: int, previous: SymbolicOptimizer, index: Tensor) -> SymbolicOptimizer:
        """Member `member`'s optimizer over its slice of the stack now: `previous`'s children at `index`."""
        optimizer = self._optimizer_for(member, previous.rates.index_select(0, index))
        carry_state(previous, optimizer, index)
        return optimizer

    def _source(self, child: int, pos: int) -> tuple[SymbolicOptimizer, int, Node, int]:
        m = self.member_of[child]
        return self.optimizers[m], pos - self._spans[m][0], self.members[m].rule, self.members[m].total_steps


class _MemberView:
    """One member's children of a pack, as successive halving's cut sees a rule's sweep."""

    def __init__(self, pack: PackedChildren, member: int):
        self.pack, self.member = pack, member

    @property
    def running(self) -> list[int]:
        return [c for c in self.pack.running if self.pack.member_of[c] == self.member]

    def record(self, child: int) -> TrialRecord:
        return self.pack.record(child)

    def loss_seen(self, child: int) -> float:
        return self.pack.loss_seen(child)

    def stop(self, children: list[int]) -> None:
        self.pack.stop(children)


def _cut_each_rule(pack: PackedChildren, keep: int, steps: int, seen: dict[int, float],
                   stopped: dict[int, float], scored: OnScored | None, rank: str = "val") -> dict[int, float]:
    """Successive halving's early round, for each member on its own (a rule's rates compete with each other)."""
    now: dict[int, float] = {}
    for m in range(len(pack.members)):
        now.update(halving_cut(_MemberView(pack, m), keep, steps, seen, stopped, scored, rank))
    return now


OnRuleTrial = Callable[[int, TrialRecord, str], None]
Wanted = Callable[[int], bool]


def evaluate_rules(rules: Sequence[str | Node], task: Task, seed: int = 0, *, on_trial: OnRuleTrial | None = None,
                   reuse_sweep: bool = True, wanted: Wanted | None = None) -> list[EvaluationResult | None]:
    """`evaluate_rule` for each of `rules` on `task` with `seed`, trained together (see the module doc).

    Returns one result per rule, in order; equal to `evaluate_rule`'s within
    rounding. A rule given twice trains once and both get its result. One
    distinct rule, or any rules of a task whose children do not stack
    (`Task.stacks`), go through `evaluate_rule` one at a time.

    on_trial(i, record, stage): called after each trial of rules[i], stage "sweep" or "final".
    wanted(i): asked after the sweep and after the final runs; False takes
        rules[i] out of the pack (its children stop) and its result is None.
        A worker that lost its claim on one evaluation drops it, not the pack.
        (An exception from either callback ends the whole pack.)
    """
    trees = [resolve_rule(rule) for rule in rules]   # a bad rule raises before anything trains
    texts = [to_text(tree) for tree in trees]
    distinct = list(dict.fromkeys(texts))
    places = [[i for i, text in enumerate(texts) if text == member] for member in distinct]

    def report(member: int, record: TrialRecord, stage: str) -> None:
        for i in places[member] if on_trial else ():
            on_trial(i, record, stage)

    def still(member: int) -> bool:
        return wanted is None or any(wanted(i) for i in places[member])

    trees = [trees[texts.index(member)] for member in distinct]
    if not trees:
        return []
    if len(trees) == 1 or not task.stacks:   # a child vmap cannot stack (a GRU, say) trains one rule at a time
        found = [_alone(m, tree, task, seed, reuse_sweep, report, still) for m, tree in enumerate(trees)]
    else:
        found = _pack(trees, task, seed, reuse_sweep, report, still)
    return [found[distinct.index(text)] for text in texts]


class _Unwanted(Exception):
    """The lone rule's evaluation is no longer wanted."""


def _alone(member: int, tree: Node, task: Task, seed: int, reuse_sweep: bool, report: OnRuleTrial,
           still: Wanted) -> EvaluationResult | None:
    def on_trial(record: TrialRecord, stage: str) -> None:
        report(member, record, stage)
        if not still(member):
            raise _Unwanted()

    try:
        return evaluate_rule(tree, task, seed, on_trial=on_trial, reuse_sweep=reuse_sweep)
    except _Unwanted:
        return None


def _pack(trees: list[Node], task: Task, seed: int, reuse_sweep: bool, report: OnRuleTrial,
          still: Wanted) -> list[EvaluationResult | None]:
    start = time.perf_counter()
    lrs = tuple(task.lrs)
    sweep_steps = task.sweep_epochs * task.steps_per_epoch
    final_steps = task.epochs * task.steps_per_epoch
    reuse = [reuse_sweep and task.sweep_epochs <= task.epochs and not reads_schedule(tree) for tree in trees]
    with deterministic(task.device):
        initial = initial_child(task, seed)
        pack = PackedChildren(task, initial, [Member(tree, lrs, final_steps if goes_on else sweep_steps)
                                              for tree, goes_on in zip(trees, reuse)], seed)
        stopped: dict[int, float] = {}   # children halving stopped early -> their last round's mean loss

        def scored(child: int) -> None:
            report(pack.member_of[child], trial_record(pack, child, stopped), "sweep")

        if task.sweep == "full":
            pack.advance(sweep_steps, scored)
        else:
            halve(pack, len(lrs), sweep_steps, stopped, scored, cut=_cut_each_rule)
        trials = [[trial_record(pack, c, stopped) for c in pack.children(m)] for m in range(len(trees))]
        wanted = [still(m) for m in range(len(trees))]
        best = [best_index(trials[m], {c - pack.first[m] for c in stopped if pack.member_of[c] == m})
                if wanted[m] else None for m in range(len(trees))]

        # The rules whose best sweep child is the start of their final run: it trains on in the stack.
        continuing = {m: pack.first[m] + b for m, b in enumerate(best) if b is not None and reuse[m]}
        pack.stop([c for c in pack.running if c not in continuing.values()])
        pack.disable_explosion_stop()
        for child in continuing.values():
            pack.wall_seconds[child] = 0.0
        # The others train their final run from the start, a pack of their own ...
        retrain = {m: b for m, b in enumerate(best) if b is not None and not reuse[m]}
        finals = {}
        if retrain:
            fresh = PackedChildren(task, initial, [Member(trees[m], (lrs[b],), final_steps)
                                                   for m, b in retrain.items()], seed)
            fresh.disable_explosion_stop()
            at = {m: fresh.first[i] for i, m in enumerate(retrain)}
            if pack.running:
                # ... which, once it has trained the sweep's epochs, stands where the continuing children do (an
                # epoch boundary of the same data order): the two go on as one stack rather than stepping in turn.
                fresh.advance(sweep_steps, validate=False)
                if fresh.running:
                    offset = pack.join(fresh)
                    continuing.update({m: offset + child for m, child in at.items()})
                    # Its children train on in `pack`, from copies: its own tensors and moments are dead weight.
                    del fresh
                else:   # all diverged on the way (a stack stops where its last child does): their records stand
                    finals = _finish(fresh, at, 0, report)
            else:
                finals = _finish(fresh, at, final_steps, report)
        finals.update(_finish(pack, continuing, final_steps - sweep_steps, report))

    share = (time.perf_counter() - start) / len(trees)
    return [evaluation_result(trees[m], task, seed, trials[m], best[m], *finals.get(m, (None, 0.0)), share)
            if wanted[m] and still(m) else None for m in range(len(trees))]


def _finish(pack: PackedChildren, finals: dict[int, int], steps: int,
            report: OnRuleTrial) -> dict[int, tuple[TrialRecord, float]]:
    """Train the final children (member -> child) `steps` more steps; each one's record and test score."""
    if not finals:
        return {}
    pack.advance(steps)
    task, done = pack.task, {}
    for m, child in finals.items():
        test_acc = 0.0 if pack.diverged[child] else task.objective.score(
            pack.model(child), task.splits.test_x, task.splits.test_y)
        done[m] = pack.record(child), test_acc
        report(m, done[m][0], "final")
    return done


__all__ = ["Member", "PackedChildren", "evaluate_rules"]
