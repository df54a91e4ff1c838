"""The Searcher interface: propose rules, observe their rewards, save and restore state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from nos.rules import Node, from_tokens, to_text
from nos.tensor_state import TensorStateError, from_bytes, to_bytes


@dataclass(frozen=True)
class Proposal:
    """One sampled rule: its controller tokens, the tree they decode to, and the log-probability
    the policy sampled the tokens with (None for searchers without a policy)."""

    tokens: tuple[int, ...]
    tree: Node
    log_prob: float | None = None

    @property
    def text(self) -> str:
        return to_text(self.tree)


class Searcher(ABC):
    """What the driver needs of a search strategy.

    `observe` gets the tokens of proposals together with their rewards, not
    the proposal objects: after a crash the driver rebuilds them from the
    database and a searcher restored from its checkpoint must learn the same.
    `log_probs`, when given, are the log-probabilities the tokens were sampled
    with: the asynchronous driver passes them, since its results may come from
    a policy older than the one learning from them.
    """

    name: str

    def __init__(self, depth: int, seed: int):
        if depth not in (1, 2, 3):
            raise ValueError(f"depth must be 1, 2 or 3, got {depth}")
        self.depth = depth
        self.generator = torch.Generator().manual_seed(seed)

    @abstractmethod
    def propose(self, n: int) -> list[Proposal]: ...

    @abstractmethod
    def observe(self, tokens: Sequence[Sequence[int]], rewards: Sequence[float],
                log_probs: Sequence[float] | None = None) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "depth": self.depth, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name or state.get("depth") != self.depth:
            raise ValueError(f"checkpoint is of searcher {state.get('name')!r} depth {state.get('depth')}, "
                             f"not {self.name!r} depth {self.depth}")
        self.generator.set_state(state["generator"])

    def _proposals(self, token_rows: torch.Tensor, log_probs: torch.Tensor | None = None) -> list[Proposal]:
        rows = [tuple(int(t) for t in row) for row in token_rows]
        chances = [None] * len(rows) if log_probs is None else [float(x) for x in log_probs]
        return [Proposal(row, from_tokens(row, self.depth), chance) for row, chance in zip(rows, chances)]


def state_to_bytes(state: dict[str, Any]) -> bytes:
    """A searcher state as the bytes of a checkpoint (nos.tensor_state's format: JSON and raw tensors, no pickle)."""
    return to_bytes(state)


def state_from_bytes(data: bytes) -> dict[str, Any]:
    """The searcher state `state_to_bytes` wrote; TensorStateError (a ValueError) if `data` is not one.

    A checkpoint written by an earlier nos (torch.save's zip) is a PickledState: it is never unpickled.
    """
    state = from_bytes(data)
    if not isinstance(state, dict):
        raise TensorStateError(f"it holds a {type(state).__name__}, not a searcher's state")
    return state
