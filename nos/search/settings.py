"""Searcher names and their hyperparameters: plain data, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass

SEARCHERS = ("ppo", "reinforce", "random", "evolution")


@dataclass(frozen=True)
class PolicyGradientConfig:
    hidden: int = 64              # LSTM hidden units
    embedding: int = 32           # token and position embedding size
    lr: float = 3e-3              # Adam learning rate of the controller
    entropy_weight: float = 0.01  # bonus on the policy's entropy, for exploration
    baseline_decay: float = 0.9   # EMA reward baseline: b <- decay * b + (1 - decay) * mean reward
    clip: float = 0.2             # PPO: ratio clipped to [1 - clip, 1 + clip]
    epochs: int = 4               # PPO: gradient steps per observed batch
    max_grad_norm: float = 1.0    # gradient clipping of each controller step
    normalize_advantage: bool = True  # divide advantages by the batch's reward spread


@dataclass(frozen=True)
class EvolutionConfig:
    population: int = 50          # members kept; the oldest is evicted when a child is scored
    tournament: int = 10          # members sampled per selection; the best of them is the parent

    def __post_init__(self) -> None:
        for key in ("population", "tournament"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a whole number of at least 1, got {value!r}")
        if self.tournament > self.population:
            raise ValueError(f"tournament ({self.tournament}) must be at most population ({self.population})")


# Each searcher's hyperparameters (the `[controller]` table of a config): None takes none.
SEARCHER_SETTINGS: dict[str, type | None] = {
    "ppo": PolicyGradientConfig, "reinforce": PolicyGradientConfig, "random": None, "evolution": EvolutionConfig,
}
