"""Regularized evolution (Real et al. 2019, "Regularized Evolution for Image
Classifier Architecture Search"), over the controller's token sequences.

The population is the last `population` scored rules, oldest first. A child
is made by tournament selection (sample `tournament` members, take the best)
and a one-token mutation of that parent: one position gets another token
allowed there, so the sequence still decodes, preferring changes that alter
the decoded rule's canonical text (most of a keep-left branch is dead code).
A scored child joins the population and the oldest member leaves, whatever
its reward: that ageing is the "regularized" part.

The population is warm-started (unless `warm_start=False`): the first
`population` proposals are the built-in rules that fit the depth (SGD,
momentum, Adam, RMSProp, PowerSign, AddSign and their decayed variants), then
uniform random sequences to fill it. Children are proposed once some members have rewards.

Proposing never changes the population, only the generator and the count of
warm-start proposals made; `observe` adds what was scored. So the state
checkpointed right after a proposal, restored and shown the same batch,
continues exactly as the uninterrupted searcher does.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict
from typing import Any, Sequence

import torch

from nos.rules import from_tokens, to_text

from .base import Proposal, Searcher
from .controller import position_masks
from .settings import EvolutionConfig
from .warm_start import builtin_sequences

# Tries at a text-changing mutation before taking a change that only touches dead code.
MUTATION_TRIES = 32


class EvolutionSearcher(Searcher):
    name = "evolution"

    def __init__(self, depth: int = 2, seed: int = 0, config: EvolutionConfig | None = None, *,
                 warm_start: bool = True, **overrides):
        super().__init__(depth, seed)
        self.config = config or EvolutionConfig(**overrides)
        self.masks = position_masks(depth)
        self.choices = [torch.nonzero(row).flatten() for row in self.masks]   # allowed ids per position
        # Without the warm start the first population is all random sequences.
        self.warm = builtin_sequences(depth)[: self.config.population] if warm_start else []
        self.warm_proposed = 0    # warm-start proposals made: built-ins first, then random fills
        self.population: deque[tuple[tuple[int, ...], float]] = deque(maxlen=self.config.population)
        self.observed = 0

    # -- proposing ---------------------------------------------------------------
    def propose(self, n: int) -> list[Proposal]:
        rows = []
        for _ in range(n):
            if self.warm_proposed < self.config.population or not self.population:
                rows.append(self._warm_member())
            else:
                rows.append(self.mutate(self.select()))
        return [Proposal(row, from_tokens(row, self.depth)) for row in rows]

    def _warm_member(self) -> tuple[int, ...]:
        index = self.warm_proposed
        self.warm_proposed += 1
        if index < len(self.warm):
            return self.warm[index]
        return self.random_sequence()

    def random_sequence(self) -> tuple[int, ...]:
        picks = torch.multinomial(self.masks.float(), 1, generator=self.generator).flatten()
        return tuple(int(t) for t in picks)

    def select(self) -> tuple[int, ...]:
        """Tournament selection: the best of `tournament` members drawn without replacement."""
        size = min(self.config.tournament, len(self.population))
        drawn = torch.randperm(len(self.population), generator=self.generator)[:size].tolist()
        best = max(drawn, key=lambda i: self.population[i][1])   # ties: the first drawn
        return self.population[best][0]

    def mutate(self, parent: Sequence[int]) -> tuple[int, ...]:
        """`parent` with exactly one token changed to another allowed at its position.

        Prefers a change that alters the rule's canonical text; after
        MUTATION_TRIES changes that all land in dead code, takes the last.
        """
        parent = tuple(int(t) for t in parent)
        text = to_text(from_tokens(parent, self.depth))
        child = parent
        for _ in range(MUTATION_TRIES):
            pos = int(torch.randint(len(parent), (1,), generator=self.generator))
            others = self.choices[pos][self.choices[pos] != parent[pos]]
            token = int(others[int(torch.randint(len(others), (1,), generator=self.generator))])
            child = parent[:pos] + (token,) + parent[pos + 1:]
            if to_text(from_tokens(child, self.depth)) != text:
                break
        return child

    # -- learning ----------------------------------------------------------------
    def observe(self, tokens: Sequence[Sequence[int]], rewards: Sequence[float],
                log_probs: Sequence[float] | None = None) -> None:
        # Children join in the order their results arrive, whenever they were proposed: the
        # tournament draws from whatever has arrived, which is asynchronous evolution as Real et al. ran it.
        for row, reward in zip(tokens, rewards, strict=True):
            reward = float(reward)
            # A full deque drops its leftmost (oldest) member on append.
            self.population.append((tuple(int(t) for t in row), reward if math.isfinite(reward) else 0.0))
        self.observed += len(tokens)

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        length = self.masks.shape[0]
        return {
            **super().state_dict(),
            "config": asdict(self.config),
            "warm": torch.tensor(self.warm, dtype=torch.long).view(-1, length),
            "warm_proposed": self.warm_proposed,
            "population_tokens": torch.tensor([m[0] for m in self.population], dtype=torch.long).view(-1, length),
            "population_rewards": torch.tensor([m[1] for m in self.population], dtype=torch.float64),
            "observed": self.observed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["config"] != asdict(self.config):
            raise ValueError("checkpoint was made with other evolution hyperparameters")
        # The warm start as it was: a later version's built-ins do not change a resumed run.
        self.warm = [tuple(int(t) for t in row) for row in state["warm"]]
        self.warm_proposed = state["warm_proposed"]
        self.population.clear()
        for row, reward in zip(state["population_tokens"], state["population_rewards"].tolist()):
            self.population.append((tuple(int(t) for t in row), float(reward)))
        self.observed = state["observed"]
