"""SearchConfig: one validated object for a search, from flags or a TOML file.

A run stores its config as JSON (`runs.config`); `nos resume` rebuilds the
same object from there, so a resumed run searches exactly as it began.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .search.settings import SEARCHER_SETTINGS, SEARCHERS


class ConfigError(ValueError):
    """A search configuration that cannot run: the message says which key and why."""


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass(frozen=True)
class SearchConfig:
    task: str = "digits"                   # child task: digits, fashion-mnist, cifar10, quadratic, rosenbrock
    searcher: str = "ppo"                  # ppo, reinforce, random or evolution
    budget: int = 200                      # evaluations in the run, cached ones included
    batch_size: int = 20                   # rules proposed per controller step
    depth: int = 2                         # rule depth: 1, 2 or 3 (5, 13, 29 tokens)
    seed: int = 0                          # seeds the searcher and every child's initial weights
    workers: int = field(default_factory=default_workers)   # local worker processes
    device: str = "cpu"                    # where children train: cpu, cuda, cuda:1
    name: str = ""                         # a label for `nos runs`; defaults to TASK-SEARCHER
    task_options: dict[str, Any] = field(default_factory=dict)   # data_dir, train_size, lrs, epochs, ...
    controller: dict[str, Any] = field(default_factory=dict)     # the searcher's settings (search/settings.py)
    # A dead worker's evaluation is requeued within stale_after of its last heartbeat; a live one beats
    # five times in that span, so only a worker silent for all five (dead, frozen, or cut off from the
    # database) loses it.
    stale_after: float = 25.0              # seconds without a heartbeat before a claim is retaken
    max_attempts: int = 3                  # claims of one evaluation before it is failed
    heartbeat_every: float = 5.0           # seconds between a worker's heartbeats
    probe: bool = True                     # fingerprint rules and reject hopeless ones before training

    def __post_init__(self) -> None:
        problems = []
        if self.searcher not in SEARCHERS:
            problems.append(f"searcher must be one of {', '.join(SEARCHERS)}, got {self.searcher!r}")
        if self.depth not in (1, 2, 3):
            problems.append(f"depth must be 1, 2 or 3, got {self.depth}")
        for key in ("budget", "batch_size", "workers", "max_attempts"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{key} must be a whole number of at least 1, got {value!r}")
        for key in ("stale_after", "heartbeat_every"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) <= 0:
                problems.append(f"{key} must be a positive number of seconds, got {getattr(self, key)!r}")
        if not isinstance(self.probe, bool):
            problems.append(f"probe must be true or false, got {self.probe!r}")
        if isinstance(self.heartbeat_every, (int, float)) and isinstance(self.stale_after, (int, float)) \
                and self.heartbeat_every * 2 > self.stale_after:
            problems.append("heartbeat_every must be at most half of stale_after, or live workers look dead")
        settings = SEARCHER_SETTINGS.get(self.searcher)
        if settings is None:
            if self.controller and self.searcher in SEARCHER_SETTINGS:
                problems.append(f"{self.searcher} search takes no controller settings")
        else:
            known = {f.name for f in fields(settings)}
            unknown = set(self.controller) - known
            if unknown:
                problems.append(f"unknown controller keys {', '.join(sorted(unknown))}; "
                                f"{self.searcher} knows: {', '.join(sorted(known))}")
            else:
                try:
                    settings(**self.controller)
                except (TypeError, ValueError) as exc:
                    problems.append(f"controller: {exc}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def label(self) -> str:
        return self.name or f"{self.task}-{self.searcher}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config keys {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> "SearchConfig":
        """Defaults, then the TOML file's keys, then the flags that were given (not None)."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = tomllib.loads(Path(path).read_text())
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)
