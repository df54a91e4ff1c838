"""A task of the user's own, tried on one batch before anything is trained or stored for it.

A child that cannot train (inputs it does not take, labels beyond its
outputs, no trainable parameter) would fail every evaluation of a search,
one traceback each, and targets of the wrong shape can even train silently
wrong: mean squared error broadcasts outputs (N, 1) against targets (N,) to
(N, N), and the child learns the mean. One forward and backward pass on a
throwaway child finds all of these in milliseconds, with one line saying
what to change.

The same pass tells whether the child's forward draws random numbers (a
dropout layer, or `F.dropout` in a forward of the user's own): such a child
trains one learning rate at a time, as a stack cannot give each child its
own draws.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Splits, Task


class UnfitTask(ValueError):
    """The task's data or child cannot be trained: the message says what to change, in one line."""


def check_task(task: Task) -> Task:
    """Raise UnfitTask if `task`'s child cannot train on its data; the task, told whether its child draws."""
    _check_finite(task.splits)
    draws = _try_one_step(task)
    if draws and task.stacked:
        raise UnfitTask("the child draws random numbers while training (dropout?), which a stacked sweep cannot "
                        "give each child: leave stacked unset or set it to false")
    if draws:
        task.stacked = False
    return task


def _check_finite(splits: Splits) -> None:
    for part in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        values: Tensor = getattr(splits, part)
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise UnfitTask(f"the {part.replace('_', ' ')} data holds NaN or infinite values")


def _try_one_step(task: Task) -> bool:
    """One forward, loss and backward on the first batch; True when the forward drew random numbers."""
    x, y = task.splits.train_x[:task.batch_size], task.splits.train_y[:task.batch_size]
    cuda = [task.device] if task.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):   # the global generators, which seed the children, are left alone
        try:
            child, other = task.new_child(), task.make_child()
        except Exception as exc:
            raise UnfitTask(f"building the child failed: {_said(exc)}") from None
        if other is child or any(a is b for a, b in zip(child.parameters(), other.parameters())):
            raise UnfitTask("make_child returned the same network twice: it must build a fresh one at each call "
                            "(every trial trains its own)")
        trainable = [p for p in child.parameters() if p.requires_grad]
        if not trainable:
            raise UnfitTask("the child has no trainable parameters (none, or all with requires_grad=False): "
                            "a rule has nothing to update")
        before = _generator_states(task.device)
        try:
            out = child(x)
        except Exception as exc:
            raise UnfitTask(f"the child cannot take a batch of the training inputs (shape {tuple(x.shape)}, "
                            f"{x.dtype}): {_said(exc)}") from None
        draws = _generator_states(task.device) != before
        problem = task.objective.output_problem(out, y, task.splits)
        if problem:
            raise UnfitTask(problem)
        try:
            task.objective.loss(out, y).backward()
        except Exception as exc:
            raise UnfitTask(f"the child's output cannot be trained against the targets: {_said(exc)}") from None
        if all(p.grad is None for p in trainable):
            raise UnfitTask("no trainable parameter of the child gets a gradient from the loss: is the output "
                            "detached from them?")
    return draws


def _generator_states(device: torch.device) -> list[bytes]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return [bytes(s.numpy()) for s in states]


def _said(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


__all__ = ["UnfitTask", "check_task"]
