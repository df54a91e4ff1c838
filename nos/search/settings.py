"""Searcher names and their hyperparameters: plain data, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..finite import is_finite_number

SEARCHERS = ("ppo", "reinforce", "random", "evolution")
WARM_STARTS = ("none", "builtins")   # what a searcher starts from: nothing, or the built-in rules


BASELINES = ("batch", "ema")


@dataclass(frozen=True)
class Interval:
    """The values a real-valued setting takes: least to most, each end in or out."""

    least: float
    most: float
    least_in: bool = True
    most_in: bool = True

    def __contains__(self, value: Any) -> bool:
        if not is_finite_number(value):
            return False
        above = value >= self.least if self.least_in else value > self.least
        below = value <= self.most if self.most_in else value < self.most
        return above and below

    def __str__(self) -> str:
        if not self.least_in and self.least == 0:
            return f"a positive number, at most {self.most:g}" if self.most_in else \
                f"a positive number below {self.most:g}"
        return f"a number in {'[' if self.least_in else '('}{self.least:g}, {self.most:g}{']' if self.most_in else ')'}"


# The real-valued hyperparameters' ranges, checked by the config and by the searcher alike.
REAL_RANGES = {
    "lr": Interval(0.0, 1e6, least_in=False),
    "entropy_weight": Interval(0.0, 1e6),
    "baseline_decay": Interval(0.0, 1.0, most_in=False),
    "advantage_floor": Interval(0.0, 1e6, least_in=False),
    "clip": Interval(0.0, 1.0, least_in=False),
    "max_grad_norm": Interval(0.0, 1e6, least_in=False),
    "warm_mass": Interval(0.0, 1.0, most_in=False),
}


@dataclass(frozen=True)
class PolicyGradientConfig:
    hidden: int = 64              # LSTM hidden units
    embedding: int = 32           # token and position embedding size
    lr: float = 3e-3              # Adam learning rate of the controller
    entropy_weight: float = 0.01  # bonus on the policy's entropy, for exploration
    baseline: str = "batch"       # what advantages are centred on: the batch's mean reward, or an EMA of it
    baseline_decay: float = 0.9   # ema baseline: b <- decay * b + (1 - decay) * mean reward
    advantage_floor: float = 0.05  # advantages are divided by max(batch reward spread, this)
    clip: float = 0.2             # PPO: ratio clipped to [1 - clip, 1 + clip]
    epochs: int = 4               # PPO: gradient steps per observed batch
    max_grad_norm: float = 1.0    # gradient clipping of each controller step
    warm_steps: int = 100         # warm start: at most this many likelihood steps on the built-ins
    warm_mass: float = 0.1        # warm start: stop once the built-ins' own sequences have this probability

    def __post_init__(self) -> None:
        _check_whole(self, ("hidden", "embedding", "epochs", "warm_steps"))
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        for key, interval in REAL_RANGES.items():
            value = getattr(self, key)
            if value not in interval:
                raise ValueError(f"{key} must be {interval}, got {value!r}")


def _check_whole(config: Any, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a whole number of at least 1, got {value!r}")


@dataclass(frozen=True)
class EvolutionConfig:
    population: int = 50          # members kept; the oldest is evicted when a child is scored
    tournament: int = 10          # members sampled per selection; the best of them is the parent

    def __post_init__(self) -> None:
        _check_whole(self, ("population", "tournament"))
        if self.tournament > self.population:
            raise ValueError(f"tournament ({self.tournament}) must be at most population ({self.population})")


# Each searcher's hyperparameters (the `[hyperparameters]` table of a config): None takes none.
SEARCHER_SETTINGS: dict[str, type | None] = {
    "ppo": PolicyGradientConfig, "reinforce": PolicyGradientConfig, "random": None, "evolution": EvolutionConfig,
}
