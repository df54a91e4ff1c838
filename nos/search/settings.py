"""Searcher names and controller hyperparameters: plain data, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass

SEARCHERS = ("ppo", "reinforce", "random")


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
