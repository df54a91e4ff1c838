"""PPO (the default) and REINFORCE over the LSTM controller.

Both centre each batch's rewards on a baseline (the batch's own mean, or an
EMA of batch means) and divide by the batch's reward spread, floored so that
rewards that barely differ (rules all at chance, say) give small advantages
rather than noise blown up to unit size. With the batch baseline, a batch
whose rewards are all equal says nothing about which rules are better: its
advantages are all zero, and only the entropy bonus moves the policy. With the
EMA baseline every result teaches, a batch of one included. The entropy bonus
applies on every update, as in the paper, and keeps the policy exploring: a
policy collapsed onto one rule samples batches of that rule alone, tied, and
the bonus is what spreads it out again. PPO takes several epochs of
clipped-surrogate steps on each batch; REINFORCE one plain policy-gradient
step.

Which policy sampled a batch: under the synchronous driver no update happens
between proposing and observing, so the policy an update starts from is the one
that sampled its batch. Under the asynchronous driver results arrive from
policies several updates old; it passes the log-probabilities each rule was
sampled with (`log_probs`), and each sample's advantage is weighted by
min(1, pi_old / pi_sampled), where pi_old is the policy as the update finds it:
a truncated importance weight (as in V-trace). Without it a stale sample
counts as the current policy's; an untruncated ratio can blow up the update's
variance, and truncating at 1 only ever weighs a stale sample down. PPO then
clips its ratio pi / pi_old around the policy the update started from, not
around the stale one (the decoupled objective of Hilton et al. 2021, "Batch
size-invariance for policy optimization"): clipping around pi_sampled would
zero the gradient of every sample the policy has moved more than `clip` from
since it was sampled, which after a few updates in flight is most of them.
REINFORCE takes its one step with the same weights. Without `log_probs` every
weight is exactly 1, and both are what they were.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Sequence

import torch
from torch import Tensor

from .base import Proposal, Searcher
from .controller import Controller
from .settings import PolicyGradientConfig
from .warm_start import warm_start

# Settings that checkpoints written before they existed ran with.
_EARLIER_DEFAULTS = {"baseline": "ema", "advantage_floor": 1e-8, "warm_steps": 100, "warm_mass": 0.1}


def advantages(rewards: Tensor, baseline: float, floor: float) -> Tensor:
    """(reward - baseline) / max(spread of the batch's rewards, floor)."""
    spread = rewards.std().item() if len(rewards) > 1 else 0.0
    return (rewards - baseline) / max(spread, floor)


class PolicyGradientSearcher(Searcher):
    """What PPO and REINFORCE share: the controller, advantages, the entropy bonus, checkpoints.

    A subclass says how many gradient steps each batch gets (`_steps`) and the
    policy loss of one step (`_loss`).
    """

    def __init__(self, depth: int = 2, seed: int = 0, config: PolicyGradientConfig | None = None, *,
                 warm_start: bool = False, **overrides):
        super().__init__(depth, seed)
        self.config = config or PolicyGradientConfig(**overrides)
        # The controller's initial weights come from `seed`; the caller's global generator is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            self.controller = Controller(depth, self.config.hidden, self.config.embedding)
        self.warm_steps = self._warm_start() if warm_start else 0
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=self.config.lr)
        self.baseline: float | None = None
        self.observed = 0

    def _warm_start(self) -> int:
        return warm_start(self.controller, self.depth, self.config.warm_steps, self.config.warm_mass)

    def propose(self, n: int) -> list[Proposal]:
        return self._proposals(*self.controller.sample(n, self.generator))

    def observe(self, tokens: Sequence[Sequence[int]], rewards: Sequence[float],
                log_probs: Sequence[float] | None = None) -> None:
        if not tokens:
            return
        seqs = torch.tensor([list(t) for t in tokens], dtype=torch.long)
        reward = torch.tensor(list(rewards), dtype=torch.float32)
        sampled = None if log_probs is None else torch.tensor([float(x) for x in log_probs])
        mean = reward.mean().item()
        advantage = advantages(reward, self._baseline(mean), self.config.advantage_floor)
        # Every batch takes its steps, even one of equal rewards (advantages all 0): the entropy bonus
        # still applies, as in the paper, and is what lets a policy collapsed onto one rule (whose
        # batches are that rule again and again, tied) explore its way out.
        self._step(seqs, advantage, sampled)
        decay = self.config.baseline_decay
        self.baseline = mean if self.baseline is None else decay * self.baseline + (1 - decay) * mean
        self.observed += len(tokens)

    def _step(self, seqs: Tensor, advantage: Tensor, sampled: Tensor | None) -> None:
        with torch.no_grad():   # the policy as this update finds it
            old_log_prob, _ = self.controller.log_prob_and_entropy(seqs)
        # Each sample weighted by min(1, pi_old / pi_sampled): 1 when the controller as it is now sampled it.
        weight = torch.ones_like(old_log_prob) if sampled is None else torch.exp(old_log_prob - sampled).clamp(max=1.0)
        advantage = advantage * weight
        for _ in range(self._steps()):
            log_prob, entropy = self.controller.log_prob_and_entropy(seqs)
            loss = self._loss(log_prob, old_log_prob, advantage) - self.config.entropy_weight * entropy.mean()
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.controller.parameters(), self.config.max_grad_norm)
            self.optimizer.step()

    def _baseline(self, mean: float) -> float:
        if self.config.baseline == "batch" or self.baseline is None:
            return mean
        return self.baseline

    def _steps(self) -> int:
        raise NotImplementedError

    def _loss(self, log_prob, old_log_prob, advantage):
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "config": asdict(self.config),
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
            "observed": self.observed,
            "warm_steps": self.warm_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint; the run continues with the hyperparameters it was started with."""
        super().load_state_dict(state)
        known = {f.name for f in fields(PolicyGradientConfig)}
        saved = {**_EARLIER_DEFAULTS, **state["config"]}
        unknown = set(saved) - known
        if unknown:
            raise ValueError(f"checkpoint has controller settings this nos does not know: {', '.join(sorted(unknown))}")
        config = PolicyGradientConfig(**saved)
        if (config.hidden, config.embedding) != (self.config.hidden, self.config.embedding):
            self.controller = Controller(self.depth, config.hidden, config.embedding)
        if config != self.config:
            self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=config.lr)
        self.config = config
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
        self.observed = state["observed"]
        self.warm_steps = state.get("warm_steps", 0)


class PPOSearcher(PolicyGradientSearcher):
    """PPO: `epochs` clipped-surrogate steps on each batch (the default searcher)."""

    name = "ppo"

    def _steps(self) -> int:
        return self.config.epochs

    def _loss(self, log_prob, old_log_prob, advantage):
        ratio = torch.exp(log_prob - old_log_prob)
        clipped = torch.clamp(ratio, 1 - self.config.clip, 1 + self.config.clip)
        return -torch.min(ratio * advantage, clipped * advantage).mean()


class ReinforceSearcher(PolicyGradientSearcher):
    """Williams' REINFORCE: one step of -advantage * log-probability per batch."""

    name = "reinforce"

    def _steps(self) -> int:
        return 1

    def _loss(self, log_prob, old_log_prob, advantage):
        return -(advantage * log_prob).mean()
