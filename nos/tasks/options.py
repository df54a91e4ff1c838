"""The options a task takes and what each must be, checked before any data is read.

A wrong option (a string for a number, an unknown name, an infinite learning
rate) is a ValueError that names the option; it never reaches a builder as a
Python signature error or a failed float() halfway through.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable

from ..finite import is_finite_number

# The protocol's knobs every task takes (fields of Task), beside each builder's own keywords.
PROTOCOL_OPTIONS = ("batch_size", "lrs", "sweep_epochs", "epochs", "explode", "sweep", "stacked")
# The options nos itself gives a meaning to (the protocol's, and what `--train-size`, `--data-dir` pass):
# checked by CHECKS for every task. A factory's other options are its own, whatever their names.
COMMON_OPTIONS = (*PROTOCOL_OPTIONS, "train_size", "split_seed", "data_dir")
SWEEPS = ("full", "halving")
MAX_SEED = 2**32 - 1
# Sizes beyond these cannot fit in memory (hidden: the digits MLP's width; dim: the quadratic's).
MAX_EXAMPLES = 10_000_000
MAX_HIDDEN = 100_000
MAX_DIM = 100_000
MAX_LRS = 100


def _whole(least: int, most: int) -> tuple[str, Callable[[Any], bool]]:
    return (f"a whole number from {least:,} to {most:,}",
            lambda v: isinstance(v, int) and not isinstance(v, bool) and least <= v <= most)


def _real(least: float, strict: bool = False) -> tuple[str, Callable[[Any], bool]]:
    def ok(v: Any) -> bool:
        return is_finite_number(v) and (v > least if strict else v >= least)
    return (f"a finite number {'above' if strict else 'of at least'} {least:g}", ok)


def _between(least: float, most: float) -> tuple[str, Callable[[Any], bool]]:
    # Bounded so that 10 ** value stays a finite float32.
    return (f"a number from {least:g} to {most:g}",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and least <= v <= most)


def _lrs_ok(value: Any) -> bool:
    # Different rates: trials are stored by rate, so a rate given twice cannot be stored.
    return (isinstance(value, (list, tuple)) and 0 < len(value) <= MAX_LRS
            and all(_real(0.0, strict=True)[1](lr) for lr in value) and len({float(lr) for lr in value}) == len(value))


CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "train_size": _whole(1, MAX_EXAMPLES),
    "val_size": _whole(1, MAX_EXAMPLES),
    "test_size": _whole(1, MAX_EXAMPLES),
    "batch_size": _whole(1, MAX_EXAMPLES),
    "epochs": _whole(1, 1_000_000),
    "sweep_epochs": _whole(1, 1_000_000),
    "split_seed": _whole(0, MAX_SEED),
    "hidden": _whole(1, MAX_HIDDEN),
    "dim": _whole(1, MAX_DIM),
    "classes": _whole(2, MAX_HIDDEN),
    "low": _between(-30.0, 30.0),
    "high": _between(-30.0, 30.0),
    "temperature": _real(0.0, strict=True),
    "condition": _real(1.0),
    "noise": _real(0.0),
    "explode": _real(0.0),
    "lrs": (f"a list of 1 to {MAX_LRS} positive, finite learning rates, each given once, such as [1e-3, 1e-2]",
            _lrs_ok),
    "sweep": (f"one of {', '.join(SWEEPS)}", lambda v: v in SWEEPS),
    "stacked": ("true or false", lambda v: isinstance(v, bool)),
    "download": ("true or false", lambda v: isinstance(v, bool)),
    "data_dir": ("a folder's path", lambda v: isinstance(v, (str, os.PathLike)) and str(v).strip() != ""),
}


def task_options(builder: Callable[..., Any]) -> tuple[str, ...]:
    """The option names `builder` takes: its keywords and the protocol's."""
    own = [name for name, p in inspect.signature(builder).parameters.items()
           if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "device"]
    return tuple(dict.fromkeys(own + list(PROTOCOL_OPTIONS)))


def check_options(task: str, known: Callable[..., Any] | tuple[str, ...] | None,
                  options: dict[str, Any], *, checked: tuple[str, ...] | None = None) -> dict[str, Any]:
    """`options` with the learning rates as a tuple of floats; a ValueError naming the first unknown option
    or bad value. `known`: a builder (its options are `task_options`), the names, or None for any name;
    `checked`: the names whose values CHECKS judge (None: every name CHECKS knows)."""
    if callable(known):
        known = task_options(known)
    unknown = sorted(str(k) for k in options if known is not None and k not in known)
    if unknown:
        raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"for task {task}; it takes: {', '.join(sorted(known))}")
    for name, value in options.items():
        if value is None or name not in CHECKS or (checked is not None and name not in checked):
            continue
        what, ok = CHECKS[name]
        if not ok(value):
            raise ValueError(f"task option {name} must be {what}, got {value!r}")
    if "lrs" in options:
        return {**options, "lrs": tuple(float(lr) for lr in options["lrs"])}
    return options


__all__ = ["CHECKS", "COMMON_OPTIONS", "PROTOCOL_OPTIONS", "check_options", "task_options"]
