"""Starting a search from the built-in rules.

Evolution seeds its population with them; the policy-gradient searchers take
a few maximum-likelihood steps on their token sequences, stopping while the
controller still explores: once those sequences' probability reaches
`warm_mass`, or after `warm_steps` steps. Other sequences write the same
rules and rise with them, so the built-ins' share of samples ends 2 to 3.5
times `warm_mass` (docs/searching.md).
"""

from __future__ import annotations

import torch

from nos.rules import NotInVocabulary, parse, to_text, to_tokens
from nos.rules.builtins import BUILTINS

from .controller import Controller

WARM_LR = 3e-3   # Adam step size of the likelihood steps: gentle, so the policy sharpens gradually


def builtin_sequences(depth: int) -> list[tuple[int, ...]]:
    """The built-in rules that a depth-`depth` sequence can express, one sequence per distinct rule."""
    seen: set[str] = set()
    out = []
    for text in BUILTINS.values():
        tree = parse(text)
        canonical = to_text(tree)
        if canonical in seen:
            continue
        try:
            tokens = tuple(to_tokens(tree, depth))
        except NotInVocabulary:
            continue
        seen.add(canonical)
        out.append(tokens)
    return out


def builtin_mass(controller: Controller, sequences: torch.Tensor) -> float:
    """The probability that the controller samples one of `sequences` (distinct rows)."""
    with torch.no_grad():
        log_prob, _ = controller.log_prob_and_entropy(sequences)
    return float(log_prob.exp().sum())


def warm_start(controller: Controller, depth: int, steps: int, mass: float) -> int:
    """Likelihood steps on the built-ins until they take `mass` of the samples; returns the steps taken."""
    sequences = torch.tensor(builtin_sequences(depth), dtype=torch.long)
    optimizer = torch.optim.Adam(controller.parameters(), lr=WARM_LR)
    for step in range(steps):
        if builtin_mass(controller, sequences) >= mass:
            return step
        log_prob, _ = controller.log_prob_and_entropy(sequences)
        optimizer.zero_grad()
        (-log_prob.mean()).backward()
        optimizer.step()
    return steps
