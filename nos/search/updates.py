"""Which results each update of an asynchronous search learns from, and the learning itself.

Results arrive one by one, in whatever order evaluations finish; an update is
due once `update_every` counted results (anything but a rejection) have arrived
since the last one. It takes them in arrival order together with the
rejections that arrived among them, which the probe made free but which still
teach the searcher what not to propose, as a synchronous step does. At the end
of a run the last update takes whatever is left. The driver and the simulation
in benchmarks/async_search.py both use this, so the benchmark measures the
driver's own policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .base import Searcher


@dataclass(frozen=True)
class Result:
    """One finished evaluation as an update sees it."""

    id: int                      # the evaluation's id: what a checkpoint records
    counted: bool                # not a rejection: it counts toward update_every (and the budget)
    reward: float | None         # None: failed, so consumed but not learned from
    tokens: tuple[int, ...]      # what the searcher sampled
    log_prob: float | None       # with which log-probability (None: a searcher without a policy)


class UpdateQueue:
    """Results that have arrived and not been learned from yet, in arrival order."""

    def __init__(self, update_every: int):
        if update_every < 1:
            raise ValueError(f"update_every must be at least 1, got {update_every}")
        self.update_every = update_every
        self.pending: list[Result] = []

    def arrive(self, results: Sequence[Result]) -> None:
        self.pending.extend(results)

    def due(self, final: bool = False) -> list[list[Result]]:
        """The updates due now, each a list of results in arrival order; with `final`, the rest as one more."""
        updates = []
        while True:
            counted = 0
            for i, result in enumerate(self.pending):
                counted += result.counted
                if counted == self.update_every:
                    updates.append(self.pending[:i + 1])
                    self.pending = self.pending[i + 1:]
                    break
            else:
                break
        if final and self.pending:
            updates.append(self.pending)
            self.pending = []
        return updates


def learn(searcher: "Searcher", results: Sequence[Result]) -> None:
    """One update of `searcher` from `results`, failed ones left out, with the log-probabilities they were
    sampled with when every one has one."""
    scored = [r for r in results if r.reward is not None]
    if not scored:
        return
    chances = [r.log_prob for r in scored]
    searcher.observe([r.tokens for r in scored], [r.reward for r in scored],
                     None if any(c is None for c in chances) else chances)


def to_propose(target_in_flight: int, unfinished: int, counted: int, budget: int) -> int:
    """How many counted proposals refill the evaluations in flight without passing the budget."""
    return max(0, min(target_in_flight - unfinished, budget - counted))


__all__ = ["Result", "UpdateQueue", "learn", "to_propose"]
