"""nos: Neural Optimizer Search. Learns update rules; any rule is a torch.optim.Optimizer.

    import nos
    run = nos.run_search(task="digits", budget=40)    # a search from Python (nos.api)
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `import nos` stays light (no torch, no SQLAlchemy) until the search API is used.
    if name in ("run_search", "Run"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'nos' has no attribute {name!r}")


__all__ = ["Run", "__version__", "run_search"]
