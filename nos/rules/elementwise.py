"""A rule evaluated on one tensor with plain torch ops: the language's semantics, readable.

Used where plain ops are what is wanted: `compile=True` (inductor fuses the
whole step into one kernel per tensor) and `foreach=False`. The foreach path
in `foreach.py` must agree with this one; the tests hold them to it.

Per-step numbers arrive as floats or 0-dim tensors (a compiled step takes
them as tensors, so a new step does not recompile).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from .tree import Binary, Const, Node, Operand, Unary
from .vocabulary import BETA1, BETA2, BETA3, DIV_EPS, MOMENTS, NOISE_STD, NUMBERS_READ, SCHEDULES, WEIGHT_SCALES

Number = float | Tensor


def fit(x: float, dtype: torch.dtype) -> float:
    """A number past the dtype's range as a tensor of that dtype holds it: its largest value or inf, as
    `torch.tensor(x, dtype=dtype)` rounds it (a number within the range is left to torch to round).

    Every Python number a step hands to torch passes here: torch refuses one past the range of the tensors
    it works on ("value cannot be converted ... without overflow"), where the rule means the number the
    dtype holds: `clip(g, 1e5)` in float16 clips nothing, and a constant 1e39 in float32 is inf.
    """
    if not (dtype.is_floating_point and math.isfinite(x)):
        return x
    info = torch.finfo(dtype)
    if abs(x) <= info.max:
        return x
    half_ulp = info.max * info.eps / (2 - info.eps) / 2   # half the gap between max and the next power of two
    return math.copysign(info.max if abs(x) < info.max + half_ulp else math.inf, x)


def unary_op(op: str, x: Tensor, param: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    if op == "neg":
        return -x
    if op == "exp":
        return torch.exp(x)
    if op == "log":
        return torch.log(torch.abs(x))
    if op == "sqrt":
        return torch.sqrt(torch.abs(x))
    if op == "sign":
        return torch.sign(x)
    if op == "clip":
        bound = fit(param, x.dtype)
        return torch.clamp(x, -bound, bound)
    if op == "drop":
        keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= param
        return x * keep / (1.0 - param)
    raise ValueError(f"unknown unary op {op!r}")


def binary_op(op: str, x: Tensor, y: Tensor) -> Tensor:
    if op == "add":
        return x + y
    if op == "sub":
        return x - y
    if op == "mul":
        return x * y
    if op == "div":
        return x / (y + DIV_EPS)
    if op == "pow":
        return torch.pow(x, y)
    raise ValueError(f"unknown binary op {op!r}")


def update_moments_one(buffers: Mapping[str, Tensor], g: Tensor) -> None:
    if "exp_avg" in buffers:
        buffers["exp_avg"].lerp_(g, 1.0 - BETA1)
    if "exp_avg_sq" in buffers:
        buffers["exp_avg_sq"].mul_(BETA2).addcmul_(g, g, value=1.0 - BETA2)
    if "exp_avg_cube" in buffers:
        buffers["exp_avg_cube"].mul_(BETA3).add_(g * g * g, alpha=1.0 - BETA3)


def delta_one(
    node: Node,
    p: Tensor,
    g: Tensor,
    buffers: Mapping[str, Tensor],
    numbers: Mapping[str, Number],
    generator: torch.Generator | None = None,
) -> Tensor:
    """The rule's delta for one parameter; scalar rules give a 0-dim tensor."""
    cache: dict[str, Tensor] = {}

    def operand(name: str) -> Tensor:
        if name not in cache:
            cache[name] = _operand(name, p, g, buffers, numbers, generator)
        return cache[name]

    # Children before parents, from a stack of its own rather than by recursion: torch.compile traces this,
    # and dynamo's frames for each nested call took a rule 90 operations deep past Python's recursion limit.
    # The ops (and so the noise draws) come in the recursive order: a child's subtree, left before right.
    values: list[Tensor] = []   # the finished subtrees' values, in that order
    todo: list[tuple[Node, bool]] = [(node, False)]   # (node, whether its children are in `values`)
    while todo:
        n, ready = todo.pop()
        if isinstance(n, Operand):
            values.append(operand(n.name))
        elif isinstance(n, Const):
            values.append(torch.tensor(n.value, dtype=p.dtype, device=p.device))
        elif ready:
            values.append(_apply(n, values, p, generator))
        else:
            todo.append((n, True))
            todo += [(child, False) for child in reversed(_evaluated_children(n))]
    return values[0]


def _evaluated_children(n: Unary | Binary) -> tuple[Node, ...]:
    if isinstance(n, Unary):
        return (n.child,)
    if n.op == "pow" and isinstance(n.right, Const):
        return (n.left,)   # a Python exponent: see _apply
    return (n.left, n.right)


def _apply(n: Unary | Binary, values: list[Tensor], p: Tensor, generator: torch.Generator | None) -> Tensor:
    """n's op on its children's values, taken off the end of `values`."""
    if isinstance(n, Unary):
        x = values.pop()
        if n.op == "drop" and x.dim() == 0 and p.dim() > 0:
            x = x.expand_as(p)   # a dropped number is dropped per element
        return unary_op(n.op, x, n.param, generator)
    if n.op == "pow" and isinstance(n.right, Const):
        # A Python exponent, as the foreach path passes it: torch.pow with a 0-d tensor exponent
        # rounds a huge non-integral one (x ^ 524288.97 of a negative x gives -0, not nan).
        x = values.pop()
        return torch.pow(x, fit(n.right.value, x.dtype))
    y, x = values.pop(), values.pop()
    return binary_op(n.op, x, y)


def numbers_read(operands: frozenset[str]) -> tuple[str, ...]:
    """The step numbers a rule reading `operands` needs, in a fixed order."""
    return tuple(sorted({n for op in operands for n in NUMBERS_READ.get(op, ())}))


def _number(x: Number, like: Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _operand(name: str, p: Tensor, g: Tensor, buffers, numbers, generator) -> Tensor:
    if name == "g":
        return g
    if name == "g^2":
        return g * g
    if name == "g^3":
        return g * g * g
    if name in MOMENTS:
        buf, bc = MOMENTS[name]
        return buffers[buf] / numbers[bc]
    if name == "sign(g)":
        return torch.sign(g)
    if name == "sign(m)":
        return torch.sign(buffers["exp_avg"])
    if name in ("1", "2"):
        return _number(float(name), p)
    if name in SCHEDULES:
        return _number(numbers[name], p)
    if name in ("eps", "eps_t"):
        std = NOISE_STD if name == "eps" else numbers["eps_t"]
        return torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * std
    if name in WEIGHT_SCALES:
        return p * WEIGHT_SCALES[name]
    if name in ("adam", "rmsprop"):
        top = buffers["exp_avg"] / numbers["bc1"] if name == "adam" else g
        return top / _adam_denominator(buffers, numbers)
    raise KeyError(name)


def _adam_denominator(buffers: Mapping[str, Tensor], numbers: Mapping[str, Number]) -> Tensor:
    return torch.sqrt(buffers["exp_avg_sq"]) / numbers["bc2"] ** 0.5 + DIV_EPS


def step_one(
    node: Node,
    p: Tensor,
    g: Tensor,
    buffers: Mapping[str, Tensor],
    numbers: Mapping[str, Number],
    lr: Number,
    generator: torch.Generator | None = None,
) -> None:
    """One optimizer step for one parameter: moments, then w <- w - lr * delta."""
    update_moments_one(buffers, g)
    # torch.optim.Adam's own order of operations, to the last bit.
    if isinstance(node, Operand) and node.name == "adam":
        if isinstance(lr, Tensor):   # a compiled step's: `value` takes a number, which would cost a sync
            p.addcdiv_(buffers["exp_avg"] * (-lr / numbers["bc1"]), _adam_denominator(buffers, numbers))
        else:
            p.addcdiv_(buffers["exp_avg"], _adam_denominator(buffers, numbers), value=-lr / numbers["bc1"])
        return
    p.sub_(lr * delta_one(node, p, g, buffers, numbers, generator))


def change_one(node: Node, g: Tensor, buffers: Mapping[str, Tensor], numbers: Mapping[str, Number],
               lr: Tensor) -> Tensor:
    """What a step adds to w, -lr * delta, for a rule that reads neither w nor noise; moments already updated.

    w + change_one(...) rounds exactly as step_one's update (x - y is x + (-y) to the bit).
    """
    if isinstance(node, Operand) and node.name == "adam":
        return buffers["exp_avg"] * (-lr / numbers["bc1"]) / _adam_denominator(buffers, numbers)
    return -(lr * delta_one(node, g, g, buffers, numbers))
