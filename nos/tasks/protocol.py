"""The paper's evaluation protocol: a rule's reward on a task.

    result = evaluate_rule("g * exp(sign(g) * sign(m))", get_task("digits"), seed=0)

1. For each learning rate of the task's grid (1e-5 ... 1e1), train a fresh
   child from the same initial weights for `sweep_epochs` (1) epoch and
   record its validation accuracy.
2. Train a fresh child from those weights for `epochs` (5) at the best rate
   (the smallest of equals).
3. reward = its validation accuracy; its test accuracy is stored beside it.
4. A non-finite loss or weight ends that trial at once: diverged, accuracy 0.
   A rule that diverges at every rate gets reward 0. A sweep trial whose loss
   climbs past `task.explode` times its first loss ends the same way; the
   final run has no such stop.

`task.sweep == "halving"` replaces step 1 with successive halving (`halve`).

Step 2 does not repeat work it can reuse: a child trained with the same
weights, data order, optimizer seed and rate is the same child, so unless
the rule reads a schedule over the run's length (ld, cd, rd) the best sweep
trial simply trains on for the remaining epochs. The reward is the one a
fresh run gives (tests check it) and the evaluation is an epoch shorter.

Same rule, seed, task and device give the same result: the initial weights,
the data order, the optimizer's noise and a child's own random draws
(dropout) all follow from the seed.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from torch import nn

from ..optim import resolve_rule
from ..records import EvaluationResult, TrialRecord
from ..rules import Node, to_text
from .base import Task
from .stacked import StackedChildren
from .training import (
    Child,
    ChildGroup,
    OnScored,
    SequentialChildren,
    best_index,
    deterministic,
    initial_child,
    reads_schedule,
)


def new_group(task: Task, initial: nn.Module, rule: Node, total_steps: int, seed: int) -> ChildGroup:
    """The sweep's children, one per rate of the task: stacked where the task says it pays, else one by one."""
    group = StackedChildren if task.stacks else SequentialChildren
    return group(task, initial, rule, list(task.lrs), total_steps, seed)


def trial_record(children: ChildGroup, index: int, stopped: dict[int, float]) -> TrialRecord:
    """Trial `index`'s record; one stopped by halving has no validation score, and its last round's mean loss."""
    record = children.record(index)
    if index in stopped:
        record.val_acc, record.train_loss = None, stopped[index]
    return record


# Successive halving stops a rate only if its score in the round is more than this far (relative) behind the best's.
HALVING_TIE = 0.01
# What can rank the rates after the early round: validation error, or the round's mean training loss.
HALVING_RANKS = ("val", "loss")
# An early round's verdict: (group, keep, steps, seen, stopped, scored, rank) -> losses so far (see halving_cut).
Cut = Callable[[ChildGroup, int, int, dict[int, float], dict[int, float], OnScored | None, str], dict[int, float]]


def halving_rounds(rates: int, steps: int) -> list[tuple[int, int]]:
    """Successive halving's rounds: (steps trained so far, children kept after the round).

    With 7 rates and an epoch of S steps: all 7 train S/4 steps, the better
    half (4) train on to S, and the best of those is the sweep's best:
    4.75 trials' worth of training instead of 7.
    """
    if rates <= 2 or steps < 4:
        return [(steps, 1)]
    return [(steps // 4, math.ceil(rates / 2)), (steps, 1)]


def halve(group: ChildGroup, rates: int, sweep_steps: int, stopped: dict[int, float],
          scored: OnScored | None, rank: str = "val", cut: Cut | None = None) -> None:
    """Successive halving: the early round keeps the rates that score best on validation (`halving_cut`).

    rank: "val", or "loss" (the round's mean training loss, kept for comparison).
    cut: the early round's verdict, `halving_cut` by default; a pack of rules
    (nos.tasks.packed) passes one that cuts each rule's rates on their own.
    """
    if rank not in HALVING_RANKS:
        raise ValueError(f"rank must be one of {', '.join(HALVING_RANKS)}, got {rank!r}")
    cut = cut or halving_cut
    done, seen = 0, {}
    for budget, keep in halving_rounds(rates, sweep_steps):
        if budget == sweep_steps:
            group.advance(budget - done, scored)
            return
        # A child that diverges in an early round is finished: it is reported now, as the cut ones are.
        group.advance(budget - done, _diverged_only(group, scored), validate=rank == "val")
        seen = cut(group, keep, budget - done, seen, stopped, scored, rank)
        done = budget


def _diverged_only(group: ChildGroup, scored: OnScored | None) -> OnScored | None:
    """`scored`, passed on for the children that diverged only."""
    if scored is None:
        return None
    return lambda index: scored(index) if group.record(index).diverged else None


def halving_cut(group: ChildGroup, keep: int, steps: int, seen: dict[int, float], stopped: dict[int, float],
                scored: OnScored | None, rank: str = "val") -> dict[int, float]:
    """Stop the running rates outside the best `keep` after a round of `steps`; returns each one's loss so far.

    Ranked by validation, as the reward itself, rather than the round's
    training loss: a large rate can drive the cross-entropy far up (confident
    logits) while its accuracy is the best of the sweep, and a loss ranking
    drops exactly the rate the full sweep would pick (`rank="loss"` ranks by
    the round's mean training loss, for comparison). A rate outside the better half still goes on while its
    validation error is within HALVING_TIE of the best one's: when no rate has
    pulled ahead (a rule that learns nothing at any rate) the round cannot
    tell them apart, and the sweep stays full. The last round, a full sweep
    trial for the rates left, is scored as the full sweep is. `seen` holds
    the losses before the round (none: 0); a stopped rate's entry in
    `stopped` is its round's mean loss.
    """
    now = {i: group.loss_seen(i) for i in group.running}
    means = {i: (now[i] - seen.get(i, 0.0)) / steps for i in group.running}
    behind = {i: 1.0 - group.record(i).val_acc for i in group.running} if rank == "val" else means
    # Equals go by rate, smallest first, as `best_index` does: the grid's order must not matter.
    ranked = sorted(group.running, key=lambda i: (behind[i] if math.isfinite(behind[i]) else math.inf,
                                                  group.record(i).lr))
    best = behind[ranked[0]] if ranked else 0.0
    tied = best + HALVING_TIE * abs(best)
    out = [i for i in ranked[keep:] if not behind[i] <= tied]
    for index in out:
        stopped[index] = means[index]
    group.stop(out)
    if scored:
        for index in sorted(out):
            scored(index)
    return now


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
    reuse = reuse_sweep and task.sweep_epochs <= task.epochs and not reads_schedule(tree)
    with deterministic(task.device):
        initial = initial_child(task, seed)
        # The sweep's group is gone once `_sweep` returns: the final run holds its own child only.
        trials, best, final = _sweep(tree, task, seed, initial, final_steps if reuse else sweep_steps, reuse, on_trial)
        test_acc = 0.0
        if best is not None:
            if final is None:
                final = Child.fresh(task, initial, tree, trials[best].lr, final_steps, seed)
            final.disable_explosion_stop()
            final.train(task.epochs - final.epochs)
            if not final.diverged:
                test_acc = task.objective.score(final.model, task.splits.test_x, task.splits.test_y)
            if on_trial:
                on_trial(final.record(), "final")

    return evaluation_result(tree, task, seed, trials, best, final.record() if final else None, test_acc,
                             time.perf_counter() - start)


def _sweep(tree: Node, task: Task, seed: int, initial: nn.Module, total_steps: int, reuse: bool,
           on_trial: OnTrial | None) -> tuple[list[TrialRecord], int | None, Child | None]:
    """The sweep (step 1): every rate's trial, the best one's index, and its child if the final run continues it.

    total_steps: the horizon the children's schedules read. Only the returned
    child outlives the call: every other child's network, optimizer and data,
    or the whole stack with its moments, go with the group before the final
    run trains.
    """
    sweep_steps = task.sweep_epochs * task.steps_per_epoch
    group = new_group(task, initial, tree, total_steps, seed)
    stopped: dict[int, float] = {}   # trials halving stopped early -> their last round's mean loss
    scored = (lambda index: on_trial(trial_record(group, index, stopped), "sweep")) if on_trial else None
    if task.sweep == "full":
        group.advance(sweep_steps, scored)
    else:
        halve(group, len(task.lrs), sweep_steps, stopped, scored)
    trials = [trial_record(group, index, stopped) for index in range(len(task.lrs))]
    best = best_index(trials, stopped)
    if best is None or not reuse:
        return trials, best, None
    final = group.extract(best)   # the best sweep trial is the final child's first epochs
    final.wall_seconds = 0.0
    return trials, best, final


def evaluation_result(tree: Node, task: Task, seed: int, trials: list[TrialRecord], best: int | None,
                      final: TrialRecord | None, test_acc: float, wall_seconds: float) -> EvaluationResult:
    """A rule's result from its sweep's trials, the best one's index and its final run (None: every rate diverged)."""
    return EvaluationResult(
        rule=to_text(tree), task=task.name, task_key=task.config_key(), seed=seed, trials=trials,
        best_lr=trials[best].lr if best is not None else None,
        reward=final.val_acc if final else 0.0,
        test_acc=test_acc,
        diverged=final is None or final.diverged,
        wall_seconds=wall_seconds,
        final=final,
        device=str(task.device),
    )
