"""SearchConfig: one validated object for a search, from flags or a TOML file.

A run stores its config as JSON (`runs.config`); `nos resume` rebuilds the
same object from there, so a resumed run searches exactly as it began.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from .finite import is_finite_number
from .search.settings import REAL_RANGES, SEARCHER_SETTINGS, SEARCHERS, WARM_STARTS, Interval


class ConfigError(ValueError):
    """A search configuration that cannot run: the message says which key and why."""


def default_workers(device: str = "cpu") -> int:
    """Local workers: one per core on the CPU; one on a GPU, which more would only share (and run out of)."""
    if isinstance(device, str) and device.startswith(("cuda", "mps")):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(MAX_WORKERS, max(1, cores))


@dataclass(frozen=True)
class SearchConfig:
    task: str = "digits"                   # child task: `nos tasks` lists them
    searcher: str = "ppo"                  # ppo, reinforce, random or evolution
    budget: int = 200                      # evaluations trained, cached or failed (rejections are free)
    update_every: int = 5                  # counted results per controller update
    depth: int = 2                         # rule depth: 1, 2 or 3 (5, 13, 29 tokens)
    seed: int = 0                          # seeds the searcher (and the children, unless child_seed is set)
    child_seed: int | None = None          # seeds every child's initial weights and batch order; default: seed
    warm_start: str | None = None          # builtins or none; unset: builtins for evolution, none for the rest
    workers: int | None = None             # local worker processes; default: default_workers(device)
    device: str = "cpu"                    # where children train: cpu, cuda, cuda:1
    name: str = ""                         # a label for `nos runs`; defaults to TASK-SEARCHER
    task_options: dict[str, Any] = field(default_factory=dict)   # data_dir, train_size, lrs, epochs, ...
    hyperparameters: dict[str, Any] = field(default_factory=dict)   # the searcher's (search/settings.py)
    # A dead worker's evaluation is requeued within stale_after of its last heartbeat; a live one beats
    # five times in that span, so only a worker silent for all five (dead, frozen, or cut off from the
    # database) loses it.
    stale_after: float = 25.0              # seconds without a heartbeat before a claim is retaken
    max_attempts: int = 3                  # claims of one evaluation before it is failed
    heartbeat_every: float = 5.0           # seconds between a worker's heartbeats
    probe: bool = True                     # fingerprint rules and reject hopeless ones before training
    # The synchronous driver proposes update_every rules, waits for all of them, learns, and proposes
    # again: bit-for-bit reproducible. The asynchronous one keeps in_flight evaluations queued or
    # running and learns whenever update_every new results have arrived.
    synchronous: bool = False
    in_flight: int | None = None           # evaluations kept queued or running; default: see target_in_flight
    pack: int | None = None                # evaluations a worker claims and trains together (same task key);
                                           # default: default_pack(device)

    def __post_init__(self) -> None:
        if self.workers is None:   # resolved here, so that a run's stored config names its workers
            object.__setattr__(self, "workers", default_workers(self.device))
        options = self.task_options
        if isinstance(options, dict) and isinstance(options.get("data_dir"), os.PathLike):   # a pathlib.Path
            object.__setattr__(self, "task_options", {**options, "data_dir": os.fsdecode(options["data_dir"])})
        problems = [*_check_fields(self), *_check_hyperparameters(self.searcher, self.hyperparameters)]
        if not problems:
            problems = _unstorable(self)
        if _is_seconds("heartbeat_every", self.heartbeat_every) and _is_seconds("stale_after", self.stale_after) \
                and self.heartbeat_every * 2 > self.stale_after:
            problems.append("heartbeat_every must be at most half of stale_after, or live workers look dead")
        if not problems and self._learns_nothing():
            problems.append(f"update_every = 1 with the {self.searcher} searcher's batch baseline learns nothing "
                            "(each result is its own baseline): raise update_every, or set "
                            "hyperparameters.baseline = \"ema\"")
        if problems:
            raise ConfigError("; ".join(problems))

    def _learns_nothing(self) -> bool:
        """A policy-gradient searcher centring each one-result update on its own mean: every advantage is 0."""
        return (self.update_every == 1 and self.searcher in ("ppo", "reinforce")
                and self.hyperparameters.get("baseline", "batch") == "batch")

    @property
    def children_seed(self) -> int:
        """The seed of the children's initial weights and batch order."""
        return self.seed if self.child_seed is None else self.child_seed

    @property
    def pack_size(self) -> int:
        """The pack a worker trains for this run: `pack` where set, else the run's device's default."""
        return self.pack_on(self.device)

    def pack_on(self, device: str) -> int:
        """The pack a worker training on `device` takes for this run: `pack` where set, else the default."""
        return self.pack if self.pack is not None else default_pack(device)

    @property
    def target_in_flight(self) -> int:
        """Evaluations the asynchronous driver keeps queued or running.

        By default what the workers train at once (workers x pack) and a margin queued behind it, so
        that a worker that finishes finds its next evaluation (or a full pack) already waiting: at
        least 2, one pack, and an eighth of the total. Not more: every evaluation in flight is one
        whose result the searcher learns from later, and in simulation (docs/benchmarks.md) halving
        in_flight at 64 workers, from 2 x workers to this, learned markedly more per result at the
        same utilization.
        """
        if self.in_flight is not None:
            return self.in_flight
        return min(MAX_AT_ONCE, default_in_flight(self.workers, self.pack_size))

    @property
    def label(self) -> str:
        return self.name or f"{self.task}-{self.searcher}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config is a table of keys, got {type(data).__name__}")
        with _naming_old_keys(data):
            data = _renamed_keys(data)
            known = {f.name for f in fields(cls)}
            unknown = set(data) - known
            if unknown:
                guesses = [f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k) for k in sorted(unknown)
                           for close in [difflib.get_close_matches(k, known, n=1)]]
                raise ConfigError(f"unknown config keys {', '.join(guesses)}; known: {', '.join(sorted(known))}")
            try:
                return cls(**data)
            except TypeError as exc:
                raise ConfigError(str(exc)) from None

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> "SearchConfig":
        """Defaults, then the TOML file's keys, then the keywords that were given (not None).

        A table given as a keyword (task_options, hyperparameters) adds to the file's table key by key,
        as flags such as --train-size do. A relative `task_options.data_dir` is made absolute: from the
        file's folder where the file gives it, else from the working directory, because a run is
        resumed, and its workers started, from wherever.
        """
        raw = _read_toml(path) if path is not None else {}
        keywords = {k: v for k, v in overrides.items() if v is not None}
        with _naming_old_keys({**raw, **keywords}):
            # An old name in a user's file or keywords is a new run's: today's default driver, not the stored one's.
            data, given = _renamed_keys(raw, stored=False), _renamed_keys(keywords, stored=False)
            if path is not None:
                _absolute_data_dir(data, Path(path).parent)
            _absolute_data_dir(given, Path.cwd())
            for table in TABLES:
                if isinstance(data.get(table), dict) and isinstance(given.get(table), dict):
                    given[table] = {**data[table], **given[table]}
            return cls.from_dict({**data, **given})


# Keys read under an earlier name (runs store their config, users keep their files): old -> new.
RENAMED_KEYS = {"controller": "hyperparameters", "batch_size": "update_every"}
# The keys whose values are tables of their own.
TABLES = ("task_options", "hyperparameters")


@contextmanager
def _naming_old_keys(data: dict[str, Any]) -> Iterator[None]:
    """A ConfigError raised within, with a word on each old key name in `data`, which its message calls by the new."""
    old = [f"{key} is the old name of {RENAMED_KEYS[key]}" for key in RENAMED_KEYS if key in data]
    try:
        yield
    except ConfigError as exc:
        if not old or "old name" in str(exc):
            raise
        raise ConfigError(f"{exc} ({'; '.join(old)})") from None


def _read_toml(path: str | Path) -> dict[str, Any]:
    try:
        # utf-8-sig: a byte-order mark, which some Windows editors write, is not part of the TOML.
        return tomllib.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} is not): "
                          "is it the right file?") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _absolute_data_dir(data: dict[str, Any], base: Path) -> None:
    """`data`'s task_options.data_dir, where it is a relative path, made absolute from `base` (in place)."""
    options = data.get("task_options")
    folder = options.get("data_dir") if isinstance(options, dict) else None
    if isinstance(folder, (str, os.PathLike)) and str(folder).strip():
        path = os.path.join(base, os.path.expanduser(os.fsdecode(folder)))
        data["task_options"] = {**options, "data_dir": os.path.abspath(path)}


def _renamed_keys(data: dict[str, Any], stored: bool = True) -> dict[str, Any]:
    """`data` with each earlier key under its present name; both names at once is an error.

    A stored config that says `batch_size` was written before `update_every` replaced it, when the
    synchronous driver was the only one: its checkpoints are the synchronous driver's, so it
    resumes synchronously.
    """
    both = [old for old, new in RENAMED_KEYS.items() if old in data and new in data]
    if both:
        raise ConfigError("; ".join(f"{old} is the old name of {RENAMED_KEYS[old]}: give one of them"
                                    for old in both))
    renamed = {RENAMED_KEYS.get(key, key): value for key, value in data.items()}
    if stored and "batch_size" in data:
        renamed.setdefault("synchronous", True)
    return renamed


# -- validation: every value is checked here, before a run row is written ------

# Seeds are drawn from torch and numpy generators and stored as JSON: one 32-bit range for all.
MAX_SEED = 2**32 - 1
# Rules proposed at once are sampled, probed and stored in one transaction: this many fit in memory.
MAX_AT_ONCE = 10_000
# Evaluation numbers (`seq`) are 32-bit integers in the database.
MAX_BUDGET = 2**31 - 1
MAX_WORKERS = 1024
MAX_PACK = 1024
MAX_ATTEMPTS = 1000
MAX_SECONDS = 10_000_000        # stale_after and heartbeat_every: about 115 days
# Shorter than these, a busy worker's heartbeat cannot keep up and its live claims are taken from it.
LEAST_SECONDS = {"stale_after": 0.5, "heartbeat_every": 0.1}
MAX_NAME = 200                  # the runs.name column
MAX_TASK_NAME = 100             # the runs.task column
# Devices nos trains on; whether one is present is checked when the task is built.
DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?|mps")
# The searchers' whole-number hyperparameters: (least, most). Larger networks than these do not fit.
HYPERPARAMETER_INTS = {"hidden": (1, 4096), "embedding": (1, 4096), "epochs": (1, 1000)}
HYPERPARAMETER_INT_DEFAULT = (1, 1_000_000)
# A real-valued hyperparameter of a searcher that search/settings.py gives no range of its own.
HYPERPARAMETER_REAL_DEFAULT = Interval(0.0, 1e6)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(key: str, value: Any) -> bool:
    return is_finite_number(value) and LEAST_SECONDS[key] <= value <= MAX_SECONDS


def _whole(key: str, value: Any, least: int, most: int) -> list[str]:
    if _is_whole(value) and least <= value <= most:
        return []
    return [f"{key} must be a whole number from {least:,} to {most:,}, got {value!r}"]


def _text(key: str, value: Any, longest: int, empty_ok: bool) -> list[str]:
    if not isinstance(value, str):
        return [f"{key} must be a string, got {value!r}"]
    if not empty_ok and not value.strip():
        return [f"{key} must not be empty"]
    if len(value) > longest:
        return [f"{key} must be at most {longest} characters, got {len(value)}"]
    if not value.isprintable():
        return [f"{key} must be printable text (no control characters such as NUL or escape), got {value!r}"]
    return []


# The best pack measured on a GPU (an H200: 1,971 evaluations per hour on the paper's CIFAR-10
# protocol at K = 32, against 822 at K = 1 and fewer at K = 64; docs/benchmarks.md, "The GPU check").
# On the CPU one at a time: packed convnets train slower there, and MLPs gain too little to default.
CUDA_PACK = 32


def default_pack(device: str) -> int:
    """Evaluations a worker packs on `device` when no pack is set."""
    return CUDA_PACK if device.startswith("cuda") else 1


def default_in_flight(workers: int, pack: int = 1) -> int:
    """workers x pack training, and a margin of max(2, pack, an eighth of that) queued (`target_in_flight`)."""
    busy = workers * pack
    return busy + max(2, pack, -(-busy // 8))


def _check_fields(config: "SearchConfig") -> list[str]:
    """What is wrong with the config's own keys (the searcher's hyperparameters are checked apart)."""
    problems = [*_text("task", config.task, MAX_TASK_NAME, empty_ok=False),
                *_text("name", config.name, MAX_NAME, empty_ok=True)]
    if not isinstance(config.searcher, str) or config.searcher not in SEARCHERS:
        problems.append(f"searcher must be one of {', '.join(SEARCHERS)}, got {config.searcher!r}")
    if not (_is_whole(config.depth) and config.depth in (1, 2, 3)):
        problems.append(f"depth must be 1, 2 or 3, got {config.depth!r}")
    problems += _whole("budget", config.budget, 1, MAX_BUDGET)
    problems += _whole("update_every", config.update_every, 1, MAX_AT_ONCE)
    if config.in_flight is not None:
        problems += _whole("in_flight", config.in_flight, 1, MAX_AT_ONCE)
    problems += _whole("workers", config.workers, 1, MAX_WORKERS)
    if config.pack is not None:
        problems += _whole("pack", config.pack, 1, MAX_PACK)
    problems += _whole("max_attempts", config.max_attempts, 1, MAX_ATTEMPTS)
    problems += _whole("seed", config.seed, 0, MAX_SEED)
    if config.child_seed is not None:
        problems += _whole("child_seed", config.child_seed, 0, MAX_SEED)
    if config.warm_start is not None and config.warm_start not in WARM_STARTS:
        problems.append(f"warm_start must be one of {', '.join(WARM_STARTS)}, got {config.warm_start!r}")
    if config.warm_start == "builtins" and config.searcher == "random":
        problems.append("random search takes no warm start")
    if not (isinstance(config.device, str) and DEVICE.fullmatch(config.device)):
        problems.append(f"unknown device {config.device!r}: expected cpu, cuda, cuda:N or mps")
    for key in ("stale_after", "heartbeat_every"):
        if not _is_seconds(key, getattr(config, key)):
            problems.append(f"{key} must be a number of seconds from {LEAST_SECONDS[key]:g} to {MAX_SECONDS:,}, "
                            f"got {getattr(config, key)!r}")
    for key in ("probe", "synchronous"):
        if not isinstance(getattr(config, key), bool):
            problems.append(f"{key} must be true or false, got {getattr(config, key)!r}")
    if not isinstance(config.task_options, dict):
        problems.append(f"task_options must be a table of options, got {config.task_options!r}")
    elif not all(isinstance(key, str) for key in config.task_options):
        problems.append("task_options' keys must be strings")
    elif "device" in config.task_options:
        problems.append("device is not a task option: set it at the top level (device = \"cuda\")")
    return problems


def _unstorable(config: "SearchConfig") -> list[str]:
    """A run stores its config as JSON: a value of another type (a set, a path object) cannot be stored.

    Infinite and NaN numbers are left to the checks of the keys that take numbers, which say more.
    """
    for key, value in asdict(config).items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            return [f"{key} must hold only numbers, strings, true or false, lists and tables "
                    f"(a run stores it as JSON): {exc}"]
    return []


def _check_hyperparameters(searcher: Any, hyperparameters: Any) -> list[str]:
    """The `[hyperparameters]` table against the searcher's settings: known keys, each of its type and range."""
    if not isinstance(hyperparameters, dict):
        return [f"hyperparameters must be a table of settings, got {hyperparameters!r}"]
    settings = SEARCHER_SETTINGS.get(searcher) if isinstance(searcher, str) else None
    if settings is None:
        if hyperparameters and searcher in SEARCHER_SETTINGS:
            return [f"{searcher} search takes no hyperparameters"]
        return []
    defaults = {f.name: f.default for f in fields(settings)}
    unknown = set(hyperparameters) - set(defaults)
    if unknown:
        return [f"unknown hyperparameters {', '.join(sorted(map(str, unknown)))}; "
                f"{searcher} knows: {', '.join(sorted(defaults))}"]
    problems = []
    for key, value in hyperparameters.items():
        default = defaults[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                problems.append(f"hyperparameters.{key} must be true or false, got {value!r}")
        elif isinstance(default, int):
            least, most = HYPERPARAMETER_INTS.get(key, HYPERPARAMETER_INT_DEFAULT)
            problems += _whole(f"hyperparameters.{key}", value, least, most)
        elif isinstance(default, float):
            interval = REAL_RANGES.get(key, HYPERPARAMETER_REAL_DEFAULT)
            if value not in interval:
                problems.append(f"hyperparameters.{key} must be {interval}, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            problems.append(f"hyperparameters.{key} must be a string, got {value!r}")
    if not problems:
        try:
            settings(**hyperparameters)
        except (TypeError, ValueError) as exc:
            problems.append(f"hyperparameters: {exc}")
    return problems
