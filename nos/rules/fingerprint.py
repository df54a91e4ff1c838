"""What a rule does, not how it is written: a behavioural fingerprint, and rejection before training.

    verdict = probe(parse("sign(g) * sign(g) * g"))
    verdict.fingerprint == probe(parse("g")).fingerprint      # the same behaviour
    probe(parse("g - g")).rejection                           # 'its update is zero on the probe'

The probe runs the rule for a few steps on a fixed problem (as AutoML-Zero's
functional-equivalence check does): 256 weights in float64, gradients drawn
with magnitudes from 1e-6 to 0.1 (those of a real network) and both signs,
plus a pull back towards the start (a quadratic bowl) so weight-reading
rules see their weights move. Each step's update is recorded; the
fingerprint hashes them rounded to float32, which is far coarser than the
float64 rounding that separates two ways of writing one function.

Two runs on two gradient streams give the verdict: an update that is
non-finite, zero everywhere, or the same whichever gradients came in, is
rejected with that reason. Such a rule cannot train a network (a non-finite
update diverges at every rate; the others never read the loss).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .elementwise import delta_one, update_moments_one
from .foreach import step_numbers
from .tree import Node, operands_read, state_buffers

SIZE = 256
STEPS = 8
HORIZON = 10        # the run length the schedules see: the probe covers 70% of it, where cd and rd part
LR = 1e-3
CURVATURE = 0.5     # g = stream + CURVATURE * (w - w0)
VERSION = "p1"      # part of every fingerprint: a changed probe never matches an old one


@dataclass(frozen=True)
class Verdict:
    """The probe's answer: a fingerprint, and why the rule is not worth training (None: it is)."""

    fingerprint: str
    rejection: str | None = None


def probe(tree: Node) -> Verdict:
    """Run `tree` on the probe problem: its fingerprint and, if it cannot learn, the reason."""
    first, second = _trajectory(tree, stream=1), _trajectory(tree, stream=2)
    fingerprint = _digest(first, second)
    if not (torch.isfinite(first).all() and torch.isfinite(second).all()):
        return Verdict(fingerprint, "its update is not finite on the probe")
    if not (first.any() or second.any()):
        return Verdict(fingerprint, "its update is zero on the probe")
    if torch.equal(first, second):
        return Verdict(fingerprint, "its update does not depend on the gradient")
    return Verdict(fingerprint)


def _gradients(stream: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + stream)
    magnitude = 10.0 ** (torch.rand(STEPS, SIZE, generator=gen, dtype=torch.float64) * 5 - 6)
    sign = torch.randint(0, 2, (STEPS, SIZE), generator=gen).to(torch.float64) * 2 - 1
    return magnitude * sign, torch.randn(SIZE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@torch.no_grad()
def _trajectory(tree: Node, stream: int) -> Tensor:
    """The rule's update at each probe step, [STEPS, SIZE]."""
    grads, w0 = _gradients(stream)
    reads = operands_read(tree)
    w = w0.clone()
    buffers = {name: torch.zeros_like(w) for name in state_buffers(tree)}
    noise = torch.Generator().manual_seed(0)   # the same draws for both streams
    updates = []
    for t in range(1, STEPS + 1):
        g = grads[t - 1] + CURVATURE * (w - w0)
        update_moments_one(buffers, g)
        delta = delta_one(tree, w, g, buffers, step_numbers(t, HORIZON, reads), noise).expand_as(w)
        updates.append(delta.clone())
        w = w - LR * torch.nan_to_num(delta)
    return torch.stack(updates)


def _digest(*trajectories: Tensor) -> str:
    h = hashlib.sha256(VERSION.encode())
    for values in trajectories:
        # float32 rounding; one NaN, and +0.0 for -0.0, so equal behaviour gives equal bytes.
        rounded = values.to(torch.float32) + 0.0
        rounded = torch.where(torch.isnan(rounded), torch.full_like(rounded, float("nan")), rounded)
        h.update(rounded.numpy().tobytes())
    return h.hexdigest()


__all__ = ["Verdict", "probe"]
