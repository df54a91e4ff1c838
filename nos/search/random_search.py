"""Random search: every valid token sequence equally likely at each position."""

from __future__ import annotations

from typing import Sequence

import torch

from .base import Proposal, Searcher
from .controller import position_masks


class RandomSearcher(Searcher):
    name = "random"

    def __init__(self, depth: int = 2, seed: int = 0):
        super().__init__(depth, seed)
        self.masks = position_masks(depth)

    def propose(self, n: int) -> list[Proposal]:
        probs = self.masks.float().unsqueeze(0).expand(n, -1, -1).reshape(-1, self.masks.shape[1])
        tokens = torch.multinomial(probs, 1, generator=self.generator).view(n, -1)
        return self._proposals(tokens)

    def observe(self, tokens: Sequence[Sequence[int]], rewards: Sequence[float],
                log_probs: Sequence[float] | None = None) -> None:
        pass   # random search learns nothing, so results from any time serve alike
