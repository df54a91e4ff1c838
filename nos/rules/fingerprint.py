"""What a rule does, not how it is written: a behavioural fingerprint, and rejection before training.

    verdict = probe(parse("sign(g) * sign(g) * g"))
    verdict.fingerprint == probe(parse("g")).fingerprint      # the same behaviour
    probe(parse("g - g")).rejection                           # 'its update is zero on the probe'

The probe runs the rule for a few steps on a fixed problem (as AutoML-Zero's
functional-equivalence check does): 256 weights in float64, plus a pull back
towards the start (a quadratic bowl) so weight-reading rules see their
weights move. It does so on two kinds of input:

- typical: gradients with magnitudes from 1e-6 to 0.1 and both signs, and
  weights drawn from a normal distribution (those of a trained network);
- hard: what real children also meet. Gradients that are exactly zero (a
  quarter of the weights at every step, as behind a dead ReLU or an
  always-black pixel, and a tenth at random each step), gradients from 1e-8
  to 1e3 (a quadratic's or Rosenbrock's first steps reach hundreds), and
  weights that start at exactly zero (a bias, a zero-initialised layer) or
  at scales from 1e-3 to 100.

Each step's update is recorded; the fingerprint hashes all of them rounded
to float32, which is far coarser than the float64 rounding that separates
two ways of writing one function. Rules that differ only where a gradient
or a weight is zero, or only beyond 0.1, get different fingerprints.

Two runs of each kind, on two gradient streams, give the verdict: an update
that is non-finite on the typical inputs, zero everywhere on all of them,
or the same whichever gradients came in (on both kinds), is rejected with
that reason. Such a rule cannot train a network (a non-finite update
diverges at every rate; the others never read the loss). The hard inputs
only keep rules apart and alive: `m / g` is infinite where g is zero, yet a
task without zero gradients trains it.
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
VERSION = "p2"      # part of every fingerprint: a changed probe never matches an old one
DEAD = 0.25         # hard inputs: the share of weights whose gradient is zero at every step
GAPS = 0.1          # and the share of the others whose gradient is zero at a given step
TYPICAL, HARD = (1, 2), (3, 4)   # the two gradient streams of each kind of input


@dataclass(frozen=True)
class Verdict:
    """The probe's answer: a fingerprint, and why the rule is not worth training (None: it is)."""

    fingerprint: str
    rejection: str | None = None


def probe(tree: Node) -> Verdict:
    """Run `tree` on the probe problem: its fingerprint and, if it cannot learn, the reason."""
    typical = [_trajectory(tree, stream) for stream in TYPICAL]
    hard = [_trajectory(tree, stream) for stream in HARD]
    fingerprint = _digest(*typical, *hard)
    if not all(torch.isfinite(t).all() for t in typical):
        return Verdict(fingerprint, "its update is not finite on the probe")
    if not any(t.any() for t in typical + hard):
        return Verdict(fingerprint, "its update is zero on the probe")
    if torch.equal(*typical) and torch.equal(*hard):
        return Verdict(fingerprint, "its update does not depend on the gradient")
    return Verdict(fingerprint)


def _inputs(stream: int) -> tuple[Tensor, Tensor, Tensor]:
    """The stream's gradients [STEPS, SIZE], its starting weights [SIZE], and where gradients are forced
    to zero [STEPS, SIZE]; the two streams of a kind share their weights and their zeros."""
    gen = torch.Generator().manual_seed(1000 + stream)
    sign = torch.randint(0, 2, (STEPS, SIZE), generator=gen).to(torch.float64) * 2 - 1
    fixed = torch.Generator().manual_seed(7)
    w0 = torch.randn(SIZE, generator=fixed, dtype=torch.float64)
    if stream in TYPICAL:
        magnitude = 10.0 ** (torch.rand(STEPS, SIZE, generator=gen, dtype=torch.float64) * 5 - 6)
        return magnitude * sign, w0, torch.zeros(STEPS, SIZE, dtype=torch.bool)
    magnitude = 10.0 ** (torch.rand(STEPS, SIZE, generator=gen, dtype=torch.float64) * 11 - 8)
    scale = 10.0 ** (torch.rand(SIZE, generator=fixed, dtype=torch.float64) * 5 - 3)
    w0 = torch.where(torch.rand(SIZE, generator=fixed) < DEAD, 0.0, w0 * scale)
    dead = torch.rand(SIZE, generator=fixed) < DEAD
    # Shared by both hard streams: a rule that reads only where gradients are zero (`sign(g) ^ 2`: 1, or 0
    # at a dead unit) gives both the same updates, and is rejected as not depending on the gradient.
    zero = dead | (torch.rand(STEPS, SIZE, generator=fixed) < GAPS)
    return magnitude * sign, w0, zero


@torch.no_grad()
def _trajectory(tree: Node, stream: int) -> Tensor:
    """The rule's update at each probe step, [STEPS, SIZE]."""
    grads, w0, zero = _inputs(stream)
    reads = operands_read(tree)
    w = w0.clone()
    buffers = {name: torch.zeros_like(w) for name in state_buffers(tree)}
    noise = torch.Generator().manual_seed(0)   # the same draws for every stream
    updates = []
    for t in range(1, STEPS + 1):
        g = (grads[t - 1] + CURVATURE * (w - w0)).masked_fill(zero[t - 1], 0.0)
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
