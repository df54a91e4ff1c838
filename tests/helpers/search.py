"""Searchers driven by a made-up reward, and comparing their states."""

from __future__ import annotations

import torch

from nos.rules.vocabulary import IDS_BY_KIND, position_kinds


def target_reward(depth: int, seed: int = 123):
    """A reward from the tokens alone: the fraction of positions that match a hidden target."""
    gen = torch.Generator().manual_seed(seed)
    target = [IDS_BY_KIND[k][torch.randint(len(IDS_BY_KIND[k]), (1,), generator=gen).item()]
              for k in position_kinds(depth)]
    return lambda tokens: sum(a == b for a, b in zip(tokens, target)) / len(target)


def run(searcher, reward, batches: int, batch_size: int = 20) -> list[float]:
    rewards = []
    for _ in range(batches):
        proposals = searcher.propose(batch_size)
        r = [reward(p.tokens) for p in proposals]
        searcher.observe([p.tokens for p in proposals], r)
        rewards += r
    return rewards


def same_state(a, b) -> bool:
    """Whether two state dicts hold equal tensors and values, nested the same way."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b
