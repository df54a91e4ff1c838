"""PPO (the default) and REINFORCE over the LSTM controller.

Both use an exponential-moving-average reward baseline and an entropy bonus.
PPO takes several epochs of clipped-surrogate steps on each batch; REINFORCE
one plain policy-gradient step. The log-probabilities a batch was sampled
with are recomputed in `observe` from the controller as it was when it
proposed (no update happens in between), so a searcher restored from a
checkpoint learns exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import torch

from .base import Proposal, Searcher
from .policy import Controller
from .settings import PolicyGradientConfig


class PolicyGradientSearcher(Searcher):
    name = "ppo"

    def __init__(self, depth: int = 2, seed: int = 0, config: PolicyGradientConfig | None = None, **overrides):
        super().__init__(depth, seed)
        self.config = config or PolicyGradientConfig(**overrides)
        torch.manual_seed(seed)   # controller initialisation
        self.controller = Controller(depth, self.config.hidden, self.config.embedding)
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=self.config.lr)
        self.baseline: float | None = None
        self.observed = 0

    def propose(self, n: int) -> list[Proposal]:
        return self._proposals(self.controller.sample(n, self.generator))

    def observe(self, tokens: Sequence[Sequence[int]], rewards: Sequence[float]) -> None:
        if not tokens:
            return
        seqs = torch.tensor([list(t) for t in tokens], dtype=torch.long)
        reward = torch.tensor(list(rewards), dtype=torch.float32)
        mean = reward.mean().item()
        baseline = mean if self.baseline is None else self.baseline
        advantage = reward - baseline
        if self.config.normalize_advantage and len(tokens) > 1:
            # Rewards of a batch often differ by little (most rules are bad); scaling
            # the advantages to unit spread keeps the step size independent of that.
            advantage = advantage / (reward.std() + 1e-8)
        with torch.no_grad():
            old_log_prob, _ = self.controller.log_prob_and_entropy(seqs)
        for _ in range(self._steps()):
            log_prob, entropy = self.controller.log_prob_and_entropy(seqs)
            loss = self._loss(log_prob, old_log_prob, advantage) - self.config.entropy_weight * entropy.mean()
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.controller.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
        decay = self.config.baseline_decay
        self.baseline = mean if self.baseline is None else decay * self.baseline + (1 - decay) * mean
        self.observed += len(tokens)

    def _steps(self) -> int:
        return self.config.epochs

    def _loss(self, log_prob, old_log_prob, advantage):
        ratio = torch.exp(log_prob - old_log_prob)
        clipped = torch.clamp(ratio, 1 - self.config.clip, 1 + self.config.clip)
        return -torch.min(ratio * advantage, clipped * advantage).mean()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "config": asdict(self.config),
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
            "observed": self.observed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["config"] != asdict(self.config):
            raise ValueError("checkpoint was made with other controller hyperparameters")
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
        self.observed = state["observed"]


class ReinforceSearcher(PolicyGradientSearcher):
    """Williams' REINFORCE: one step of -advantage * log-probability per batch."""

    name = "reinforce"

    def _steps(self) -> int:
        return 1

    def _loss(self, log_prob, old_log_prob, advantage):
        return -(advantage * log_prob).mean()
