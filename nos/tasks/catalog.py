"""What `nos tasks` lists: every task nos knows, built with its defaults, and what it is.

A task whose data is not on this machine, or whose factory fails, is listed
with the reason in place of its sizes; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .custom import find_registered, is_factory_name, normalized, registered_tasks
from .data import DataUnavailable
from .registry import TASKS, get_task

# Image tasks read files; listing them must not start a download.
NO_DOWNLOAD = ("fashion-mnist", "fashion-mlp", "cifar10")


@dataclass(frozen=True)
class TaskSummary:
    name: str
    source: str                      # "built-in", or the registering package's factory (module:function)
    sizes: dict[str, int] | None     # train, val, test examples; None when the task could not be built
    child: str                       # the child network, or why the task could not be built
    reward: str


def summaries(names: list[str] | None = None) -> list[TaskSummary]:
    """The tasks `names` (built-in, registered or package.module:function); by default the built-in tasks, then
    the registered ones (entry-point group `nos.tasks`), by name. A built-in's name stays the built-in's.

    Tasks named in `names` must build: an unknown name or a failing factory raises (UnknownTask,
    TaskFactoryError); in the full list it is shown in place, as missing data always is.
    """
    if names is not None:
        return [_summary(name, strict=True) for name in names]
    names = [*TASKS, *(name for name in registered_tasks() if normalized(name) not in TASKS)]
    return [_summary(name, strict=False) for name in names]


def _source(name: str) -> str:
    if normalized(name) in TASKS:
        return "built-in"
    entry = find_registered(name) if not is_factory_name(name) else None
    return entry.value if entry is not None else "your own"


def _summary(name: str, strict: bool) -> TaskSummary:
    source = _source(name)
    try:
        task = get_task(name, **({"download": False} if normalized(name) in NO_DOWNLOAD else {}))
    except (DataUnavailable, ValueError) as exc:   # UnknownTask and TaskFactoryError are ValueErrors
        if strict and not isinstance(exc, DataUnavailable):
            raise
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return TaskSummary(name, source, None, f"(not available here: {why})", "-")
    return TaskSummary(name, source, task.splits.sizes, describe_child(task.make_child()), task.objective.reward)


def describe_child(child: nn.Module) -> str:
    """A network in a few words: its layers (a Sequential's in order) and its parameter count."""
    parameters = sum(p.numel() for p in child.parameters())
    layers = list(child.children())
    if isinstance(child, nn.Sequential) or not layers:
        parts = [_layer(m) for m in (layers or [child])]
    else:
        parts = [type(child).__name__ + ": " + ", ".join(_layer(m) for m in layers)]
    return f"{', '.join(parts)} ({parameters:,} parameters)"


def _layer(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}-{module.out_features}"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{type(module).__name__} {module.in_channels}-{module.out_channels}"
    if isinstance(module, nn.RNNBase):
        return f"{type(module).__name__} {module.input_size}-{module.hidden_size}"
    if isinstance(module, nn.Embedding):
        return f"Embedding {module.num_embeddings}x{module.embedding_dim}"
    return type(module).__name__


__all__ = ["TaskSummary", "describe_child", "summaries"]
