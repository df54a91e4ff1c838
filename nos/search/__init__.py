"""Search strategies behind one Searcher interface, and the LSTM controller."""

from __future__ import annotations

from .base import Proposal, Searcher, state_from_bytes, state_to_bytes
from .policy_gradient import PolicyGradientConfig, PolicyGradientSearcher, ReinforceSearcher
from .random_search import RandomSearcher

SEARCHERS = {"ppo": PolicyGradientSearcher, "reinforce": ReinforceSearcher, "random": RandomSearcher}


def make_searcher(name: str, depth: int = 2, seed: int = 0, **hyperparameters) -> Searcher:
    """A searcher by name; hyperparameters are PolicyGradientConfig fields (ppo, reinforce)."""
    if name not in SEARCHERS:
        raise ValueError(f"unknown searcher {name!r}; choose from {', '.join(SEARCHERS)}")
    if name == "random":
        if hyperparameters:
            raise ValueError(f"random search takes no hyperparameters, got {', '.join(hyperparameters)}")
        return RandomSearcher(depth, seed)
    return SEARCHERS[name](depth, seed, **hyperparameters)


__all__ = [
    "PolicyGradientConfig", "PolicyGradientSearcher", "Proposal", "RandomSearcher", "ReinforceSearcher",
    "SEARCHERS", "Searcher", "make_searcher", "state_from_bytes", "state_to_bytes",
]
