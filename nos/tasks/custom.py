"""Tasks of your own: a factory named `package.module:function`, or one an installed package registers.

    # mytasks.py, importable where the driver and every worker run
    from nos.tasks import from_tensors, task_factory

    @task_factory
    def wave(*, device="cpu", train_size=512, split_seed=0, **protocol):
        ...
        return from_tensors(x, y, make_child, objective="mse", device=device, **protocol)

    get_task("mytasks:wave", train_size=256)      # what `nos enqueue --task mytasks:wave` builds

A factory takes the task options as keywords (`device` and the protocol's
knobs too, when it names them or takes `**protocol`; those it does not take
are applied to the Task it returns) and returns a `nos.tasks.Task`. The
task's name becomes the factory's name and its options are recorded with
their defaults, so both are part of the task key: results of another factory,
or of other options, never answer for this one.

A run's task name is stored in the database and every worker imports it:
only functions marked with `@task_factory` are called, so that a name cannot
make a worker call an arbitrary function with arguments of the database's
choosing. Installed packages register tasks under the entry-point group
`nos.tasks` (`name = "package.module:function"`); their factories need no mark,
as the package's metadata declares them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import json
import os
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .base import Splits, Task
from .checks import UnfitTask, check_task
from .options import COMMON_OPTIONS, PROTOCOL_OPTIONS, check_options

ENTRY_POINT_GROUP = "nos.tasks"
MARK = "__nos_task_factory__"
# The runs.task and evaluations.task columns hold this many characters.
MAX_TASK_NAME = 100
# Options recorded in the task key are the factory's arguments less these: where the data lives and
# how it trains, not what it computes.
UNKEYED = ("device", "data_dir", "download", "stacked")

Factory = TypeVar("Factory", bound=Callable[..., Any])


class UnknownTask(ValueError):
    """No task of that name: not a built-in, not an importable factory, not a registered one."""


class TaskFactoryError(ValueError):
    """A task factory that cannot build its task: it raised, or returned something that is not a Task."""


def task_factory(factory: Factory) -> Factory:
    """Mark `factory` as a task factory that `--task module:function` may name (see the module doc)."""
    setattr(factory, MARK, True)
    return factory


def normalized(name: str) -> str:
    """How task names compare: case and `_` against `-` do not matter."""
    return name.strip().lower().replace("_", "-")


def is_factory_name(name: str) -> bool:
    return ":" in name


@functools.lru_cache(maxsize=1)
def registered_tasks() -> dict[str, EntryPoint]:
    """The tasks installed packages register (entry-point group `nos.tasks`), by name."""
    return {ep.name: ep for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)}


def find_registered(name: str) -> EntryPoint | None:
    key = normalized(name)
    return next((ep for ep_name, ep in registered_tasks().items() if normalized(ep_name) == key), None)


def load_factory(name: str) -> Callable[..., Any]:
    """The marked callable `name` ("package.module:function") names; UnknownTask or TaskFactoryError says why not.

    The current folder is searched last, as `python -m` would, so a task file beside the command is found.
    """
    module_name, _, attribute = name.strip().partition(":")
    if not module_name or not attribute:
        raise UnknownTask(f"task {name!r}: a factory is named package.module:function")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        module = Path(module_name).name.removesuffix(".py")
        raise UnknownTask(f"task {name!r}: name a module, not a file: run nos from the file's folder (or put "
                          f"that folder on PYTHONPATH) and use {module}:{attribute}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) and module_name[len(exc.name):][:1] in ("", "."):
            raise UnknownTask(f"task {name!r}: no module named {exc.name!r} (install it, put it on PYTHONPATH, "
                              "or run nos from its folder; every worker must be able to import it)") from None
        raise TaskFactoryError(f"task {name!r}: importing {module_name} failed: {exc}") from None
    except Exception as exc:
        raise TaskFactoryError(f"task {name!r}: importing {module_name} raised {_described(exc)}") from None
    factory: Any = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            where = getattr(module, "__file__", None)   # another module of that name may shadow the user's
            raise UnknownTask(f"task {name!r}: module {module_name}{f' ({where})' if where else ''} has no "
                              f"{attribute!r}")
    if not callable(factory):
        raise TaskFactoryError(f"task {name!r} is a {type(factory).__name__}, not a function that builds a task")
    if not getattr(factory, MARK, False):
        raise TaskFactoryError(f"task {name!r} is not marked as a task factory: decorate it with "
                               "@nos.tasks.task_factory (a run's task is called by every worker, so only "
                               "marked functions are)")
    return factory


def _load_registered(entry: EntryPoint) -> Callable[..., Any]:
    try:
        factory = entry.load()
    except Exception as exc:
        raise TaskFactoryError(f"task {entry.name!r} ({entry.value}) cannot be loaded: {_described(exc)}") from None
    if not callable(factory):
        raise TaskFactoryError(f"task {entry.name!r} ({entry.value}) is not a function that builds a task")
    return factory


def custom_task(name: str, device: torch.device, options: dict[str, Any]) -> Task | None:
    """The task built by factory `name` (module:function or a registered name); None when `name` is neither."""
    if is_factory_name(name):
        factory, label = load_factory(name), name.strip()
    else:
        entry = find_registered(name)
        if entry is None:
            return None
        factory, label = _load_registered(entry), entry.name
    if len(label) > MAX_TASK_NAME:
        raise UnknownTask(f"task name {label[:40]!r}... is longer than {MAX_TASK_NAME} characters")
    return build_with(label, factory, device, options)


def factory_options(factory: Callable[..., Any]) -> tuple[tuple[str, ...], bool]:
    """The option names `factory` takes by keyword (less device), and whether it takes any (`**options`)."""
    named, anything = [], False
    for parameter in inspect.signature(factory).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            anything = True
        elif parameter.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) \
                and parameter.name != "device":
            named.append(parameter.name)
    return tuple(named), anything


def build_with(label: str, factory: Callable[..., Any], device: torch.device, options: dict[str, Any]) -> Task:
    """Call `factory` with `options`, check what it returns, and give the task its name and recorded options."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        raise TaskFactoryError(f"task {label!r}: cannot read the signature of {factory!r}") from None
    named, anything = factory_options(factory)
    # Only the options nos gives a meaning to are judged here; the factory's own are its to judge.
    options = check_options(label, None if anything else named + PROTOCOL_OPTIONS, options, checked=COMMON_OPTIONS)
    takes_device = anything or "device" in signature.parameters
    passed = {k: v for k, v in options.items() if anything or k in named}
    applied = {k: v for k, v in options.items() if k not in passed}   # protocol knobs it does not take
    if takes_device:
        passed["device"] = device
    try:
        task = factory(**passed)
    except (Exception, SystemExit) as exc:   # sys.exit() in a factory would end the command, or a worker, silently
        raise TaskFactoryError(_failed(label, named, options, exc)) from None
    if not isinstance(task, Task):
        raise TaskFactoryError(f"task {label!r} returned a {type(task).__name__}, not a nos.tasks.Task")
    _check_passed_on(label, task, passed)
    try:
        task = dataclasses.replace(task, name=label, **_moved(task, device), **applied)
    except (TypeError, ValueError) as exc:
        raise TaskFactoryError(f"task {label!r}: {exc}") from None
    task.options = recorded_options(label, signature, passed, applied)
    try:
        return check_task(task)
    except UnfitTask as exc:
        raise TaskFactoryError(f"task {label!r}: {exc}") from None


def _check_passed_on(label: str, task: Task, passed: dict[str, Any]) -> None:
    """Refuse a task that ignores a protocol knob it was given: the knob is in its key, so results would claim it."""
    built = {knob: getattr(task, knob) for knob in PROTOCOL_OPTIONS}
    built["train_size"] = task.splits.sizes["train"]
    for knob, given in passed.items():
        if knob in built and given is not None and not _same(given, built[knob]):
            has = f"{built[knob]} training examples" if knob == "train_size" else f"{knob}={_plain(built[knob])}"
            raise TaskFactoryError(f"task {label!r} was given {knob}={_plain(given)} but returned a Task with {has}: "
                                   "pass the options it takes (its **protocol too) on to from_tensors or from_dataset")


def _same(given: Any, built: Any) -> bool:
    if isinstance(given, (list, tuple)):
        return isinstance(built, (list, tuple)) and [float(v) for v in given] == [float(v) for v in built]
    return given == built


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _moved(task: Task, device: torch.device) -> dict[str, Any]:
    """The fields that put a task built elsewhere (a factory that ignores `device`) on `device`."""
    if task.device == device and all(t.device == device for t in dataclasses.astuple(task.splits)):
        return {}
    return {"device": device, "splits": Splits(*(t.to(device) for t in dataclasses.astuple(task.splits)))}


def recorded_options(label: str, signature: inspect.Signature, passed: dict[str, Any],
                     applied: dict[str, Any] | None = None) -> dict[str, Any]:
    """A builder's arguments with its defaults (and the knobs `applied` after it), as plain JSON data:
    the options part of the task key, which thus changes when a default does."""
    bound = signature.bind_partial(**passed)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(parameter.name, {}))
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            arguments.pop(parameter.name, None)
    recorded = {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**arguments, **(applied or {})}.items()
                if k not in UNKEYED}
    for key, value in recorded.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise TaskFactoryError(f"task {label!r}: option {key}'s value {value!r} is not plain data (numbers, "
                                   "strings, true/false, lists): it cannot be part of the task key") from None
    return recorded


def _failed(label: str, named: tuple[str, ...], options: dict[str, Any], exc: BaseException) -> str:
    """Why a factory failed; first, where given, the options that are neither its own nor the protocol's: a typo
    passed on through `**protocol` fails in `from_tensors`, and reads as a crash of the factory."""
    strays = sorted(k for k in options if k not in named and k not in PROTOCOL_OPTIONS)
    if not strays:
        return f"task {label!r} raised {_described(exc)}"
    names = [*named, *PROTOCOL_OPTIONS]
    given = ", ".join(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, names, 1))
                                  else "") for k in strays)
    return (f"task {label!r}: option {given} is neither its own ({', '.join(named) or 'none'}) nor the "
            f"protocol's ({', '.join(PROTOCOL_OPTIONS)}); building it raised {_described(exc)}")


def _described(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


__all__ = [
    "ENTRY_POINT_GROUP", "TaskFactoryError", "UnknownTask", "build_with", "custom_task", "factory_options",
    "find_registered", "is_factory_name", "load_factory", "normalized", "recorded_options", "registered_tasks",
    "task_factory",
]
