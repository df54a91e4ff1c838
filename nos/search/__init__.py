"""Search strategies behind one Searcher interface, and the LSTM controller.

The torch-backed parts load on first use, so reading a config (`nos stop`,
`nos runs`, a bad flag) does not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .settings import SEARCHERS, WARM_STARTS, EvolutionConfig, PolicyGradientConfig

_LAZY = {
    "Proposal": ".base", "Searcher": ".base", "state_from_bytes": ".base", "state_to_bytes": ".base",
    "PolicyGradientSearcher": ".policy_gradient", "PPOSearcher": ".policy_gradient",
    "ReinforceSearcher": ".policy_gradient",
    "RandomSearcher": ".random_search", "EvolutionSearcher": ".evolution",
}

if TYPE_CHECKING:
    from .base import Proposal, Searcher, state_from_bytes, state_to_bytes
    from .evolution import EvolutionSearcher
    from .policy_gradient import PolicyGradientSearcher, PPOSearcher, ReinforceSearcher
    from .random_search import RandomSearcher


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_searcher(name: str, depth: int = 2, seed: int = 0, warm_start: str | None = None,
                  **hyperparameters) -> "Searcher":
    """A searcher by name; hyperparameters are PolicyGradientConfig fields (ppo, reinforce) or
    EvolutionConfig fields (evolution). warm_start: "builtins" or "none" (None: the searcher's own
    default, which is builtins for evolution and none for the others)."""
    if name not in SEARCHERS:
        raise ValueError(f"unknown searcher {name!r}; choose from {', '.join(SEARCHERS)}")
    if warm_start is not None and warm_start not in WARM_STARTS:
        raise ValueError(f"warm_start must be one of {', '.join(WARM_STARTS)}, got {warm_start!r}")
    if name == "random":
        if hyperparameters:
            raise ValueError(f"random search takes no hyperparameters, got {', '.join(hyperparameters)}")
        if warm_start == "builtins":
            raise ValueError("random search takes no warm start")
        from .random_search import RandomSearcher
        return RandomSearcher(depth, seed)
    if name == "evolution":
        from .evolution import EvolutionSearcher
        return EvolutionSearcher(depth, seed, warm_start=warm_start != "none", **hyperparameters)
    from .policy_gradient import PPOSearcher, ReinforceSearcher
    searcher = {"ppo": PPOSearcher, "reinforce": ReinforceSearcher}[name]
    return searcher(depth, seed, warm_start=warm_start == "builtins", **hyperparameters)


__all__ = [
    "EvolutionConfig", "EvolutionSearcher", "PolicyGradientConfig", "PolicyGradientSearcher", "PPOSearcher",
    "Proposal",
    "RandomSearcher", "ReinforceSearcher",
    "SEARCHERS", "WARM_STARTS", "Searcher", "make_searcher", "state_from_bytes", "state_to_bytes",
]
