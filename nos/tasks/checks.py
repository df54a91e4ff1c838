"""A task of the user's own, tried on one batch before anything is trained or stored for it.

A child that cannot train (inputs it does not take, labels beyond its
outputs, no trainable parameter) would fail every evaluation of a search,
one traceback each, and targets of the wrong shape can even train silently
wrong: mean squared error broadcasts outputs (N, 1) against targets (N,) to
(N, N), and the child learns the mean. One forward and backward pass on a
throwaway child finds all of these in milliseconds, with one line saying
what to change. The child then scores validation and test chunks of the
sizes the protocol scores in, in eval mode: a forward that works on a
training batch only (a batch size written into it) would fail every
evaluation at its first validation.

The same pass tells whether the child's forward draws random numbers (a
dropout layer, or `F.dropout` in a forward of the user's own): such a child
trains one learning rate at a time, as a stack cannot give each child its
own draws. A child the task would stack then trains one stacked step, an
epoch's end and a validation on a few examples, as the sweep runs them: one
that vmap cannot run (spectral_norm) trains one rate at a time too.

Last, a regression whose targets are far from unit scale gets a warning:
its rewards, 1 / (1 + MSE), all sit near 0 and a search can hardly tell
rules apart.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from ..optim import resolve_rule
from .base import Splits, Task
from .objectives import score_chunk
from .stacked import StackedChildren

# Below this reward for predicting the training targets' mean, rewards have no room to differ.
LEAST_BASELINE = 0.05
# The warnings shown in this process, by task: a task built again (by the driver, say) warns once. Not
# warnings' own registry: a catch_warnings anywhere in between (torch has some) empties that.
_WARNED: set[tuple[str, str]] = set()


class UnfitTask(ValueError):
    """The task's data or child cannot be trained: the message says what to change, in one line."""


class TargetScaleWarning(UserWarning):
    """A regression task whose targets are too large for its reward, 1 / (1 + MSE), to tell rules apart."""


def check_task(task: Task) -> Task:
    """Raise UnfitTask if `task`'s child cannot train on its data; the task, told whether its child stacks."""
    _check_finite(task.splits)
    draws = _try_child(task)
    if draws and task.stacked:
        raise UnfitTask("the child draws random numbers while training (dropout?), which a stacked sweep cannot "
                        "give each child: leave stacked unset or set it to false")
    if draws:
        task.stacked = False
    elif task.stacks:
        _try_stacked(task)
    _check_target_scale(task)
    return task


def _check_finite(splits: Splits) -> None:
    for part in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        values: Tensor = getattr(splits, part)
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise UnfitTask(f"the {part.replace('_', ' ')} data holds NaN or infinite values")


def _try_child(task: Task) -> bool:
    """One training step, then scoring in eval mode, on a throwaway child; True when its forward drew."""
    cuda = [task.device] if task.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):   # the global generators, which seed the children, are left alone
        child = _fresh_child(task)
        draws = _try_one_step(task, child)
        _try_scoring(task, child)
    return draws


def _fresh_child(task: Task) -> torch.nn.Module:
    try:
        child, other = task.new_child(), task.make_child()
    except Exception as exc:
        raise UnfitTask(f"building the child failed: {_said(exc)}") from None
    if other is child or any(a is b for a, b in zip(child.parameters(), other.parameters())):
        raise UnfitTask("make_child returned the same network twice: it must build a fresh one at each call "
                        "(every trial trains its own)")
    return child


def _try_one_step(task: Task, child: torch.nn.Module) -> bool:
    """One forward, loss and backward on the first batch; True when the forward drew random numbers."""
    x, y = task.splits.train_x[:task.batch_size], task.splits.train_y[:task.batch_size]
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
    _check_output(task, out, y)
    try:
        task.objective.loss(out, y).backward()
    except Exception as exc:
        raise UnfitTask(f"the child's output cannot be trained against the targets: {_said(exc)}") from None
    if all(p.grad is None for p in trainable):
        raise UnfitTask("no trainable parameter of the child gets a gradient from the loss: is the output "
                        "detached from them?")
    return draws


def _check_output(task: Task, out: object, y: Tensor) -> None:
    if not isinstance(out, Tensor):
        raise UnfitTask(f"the child returns a {type(out).__name__}, not a tensor of scores: wrap a model that "
                        "returns a dict or tuple so that its forward returns the tensor (return "
                        "model(x)[\"logits\"], say)")
    try:
        problem = task.objective.output_problem(out, y, task.splits)
    except Exception as exc:
        raise UnfitTask(f"the child's output cannot be judged against the targets: {_said(exc)}") from None
    if problem:
        raise UnfitTask(problem)


def _try_scoring(task: Task, child: torch.nn.Module) -> None:
    """Score validation and test chunks of every size the protocol scores them in, in eval mode."""
    chunk = score_chunk(task.device)
    splits = task.splits
    for part, x, y in (("validation", splits.val_x, splits.val_y), ("test", splits.test_x, splits.test_y)):
        for size in sorted({min(chunk, len(x)), len(x) % chunk} - {0}):
            try:
                task.objective.score(child, x[:size], y[:size])
            except Exception as exc:
                raise UnfitTask(f"the child cannot score {size} {part} examples in eval mode (they are scored "
                                f"in chunks of up to {chunk}): {_said(exc)}; its forward must take a batch of "
                                "any size, in eval mode too") from None


def _try_stacked(task: Task) -> None:
    """Train two children stacked, as the sweep will, on a few examples; where that fails, the sweep trains
    one rate at a time (or, asked to stack, the task is refused)."""
    problem = _stack_problem(task)
    if problem is None:
        return
    if task.stacked:
        raise UnfitTask(f"the child cannot train stacked ({problem}): leave stacked unset or set it to false")
    task.stacked = False


def _stack_problem(task: Task) -> str | None:
    """What fails in one stacked step, its epoch's end, validation and a child's extraction (None: nothing)."""
    splits, rows, cut = task.splits, task.batch_size, score_chunk(task.device, len(task.lrs))
    # One batch makes one step an epoch; a chunk of validation is what one stacked pass scores.
    small = dataclasses.replace(task, stacked=True, splits=Splits(
        splits.train_x[:rows], splits.train_y[:rows], splits.val_x[:cut], splits.val_y[:cut],
        splits.test_x[:cut], splits.test_y[:cut]))
    cuda = [task.device] if task.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            stack = StackedChildren(small, small.new_child(), resolve_rule("sgd"), [1e-4, 1e-3], 1, seed=0)
            stack.advance(1)
            if stack.running:
                stack.extract(stack.running[0])
        except Exception as exc:
            return _said(exc)
    return None


def _check_target_scale(task: Task) -> None:
    baseline = task.objective.baseline(task.splits)
    if baseline is None or baseline >= LEAST_BASELINE:
        return
    message = (f"predicting the training targets' mean scores {baseline:.2g} ({task.objective.reward}), so every "
               "reward sits near 0 and a search can hardly tell rules apart: standardize the regression targets, "
               "(y - y.mean(0)) / y.std(0)")
    if (task.name, message) not in _WARNED:
        _WARNED.add((task.name, message))
        # Attributed to the task, not to a line of nos: one line that names what to look at.
        warnings.warn_explicit(message, TargetScaleWarning, task.name, 0)


def _generator_states(device: torch.device) -> list[bytes]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return [bytes(s.numpy()) for s in states]


def _said(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


__all__ = ["LEAST_BASELINE", "TargetScaleWarning", "UnfitTask", "check_task"]
