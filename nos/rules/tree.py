"""The immutable expression tree of an update rule.

Trees are built through `operand`, `const`, `unary` and `binary`, which keep
them canonical: identity and keep-left vanish, `sign(g)` / `g ^ 2` become the
operands `sign(g)` / `g^2`, `1` and `2` are operands. Two rules that print the
same are the same tree, and every tree prints to text that parses back to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Union

from .vocabulary import CLIP_VALUES, DROP_VALUES, MOMENT_BUFFERS, OPERANDS, SCALAR_OPERANDS

UNARY_OPS = ("neg", "exp", "log", "sqrt", "clip", "drop", "sign")
BINARY_OPS = ("add", "sub", "mul", "div", "pow")


class _Printed:
    """str(node) is the rule's text."""

    def __str__(self) -> str:
        # The printer reads the node types defined here, so it is imported when first needed:
        # text formatting stays in printer.py and this module stays the types' only home.
        from .printer import to_text
        return to_text(self)


@dataclass(frozen=True)
class Operand(_Printed):
    name: str

    def __post_init__(self) -> None:
        if self.name not in OPERANDS:
            raise ValueError(f"unknown operand {self.name!r}")


@dataclass(frozen=True)
class Const(_Printed):
    """A number outside the controller's vocabulary (hand-written rules only)."""

    value: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and self.value >= 0) or self.value in (1.0, 2.0):
            raise ValueError(f"Const must be finite, >= 0 and not 1 or 2, got {self.value}")


@dataclass(frozen=True)
class Unary(_Printed):
    op: str
    child: "Node"
    param: float | None = None   # clip's c, drop's p

    def __post_init__(self) -> None:
        # Here, not only in unary(): a tree built from these classes directly is a rule too (SymbolicOptimizer
        # takes one), and drop(x, 1) would divide by 0, clip(x, -1) give -1 everywhere.
        if self.op not in UNARY_OPS:
            raise ValueError(f"unknown unary op {self.op!r}")
        if self.op == "clip" and not (self.param is not None and math.isfinite(self.param) and self.param > 0):
            raise ValueError(f"clip's bound must be a positive number, got {self.param}")
        if self.op == "drop" and not (self.param is not None and 0.0 <= self.param < 1.0):
            raise ValueError(f"drop's probability must be in [0, 1), got {self.param}")
        if self.op not in ("clip", "drop") and self.param is not None:
            raise ValueError(f"{self.op} takes a parameter iff it is clip or drop")


@dataclass(frozen=True)
class Binary(_Printed):
    op: str
    left: "Node"
    right: "Node"

    def __post_init__(self) -> None:
        if self.op not in BINARY_OPS:
            raise ValueError(f"unknown binary op {self.op!r}")


Node = Union[Operand, Const, Unary, Binary]


def operand(name: str) -> Operand:
    return Operand(name)


def const(value: float) -> Node:
    """A number: the operands 1 and 2, else a Const; negatives become neg(Const)."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"numbers in rules must be finite, got {value}")
    if value < 0:
        return unary("neg", const(-value))
    if value == 1.0:
        return Operand("1")
    if value == 2.0:
        return Operand("2")
    return Const(value)


def unary(op: str, child: Node, param: float | None = None) -> Node:
    if op == "identity":
        return child
    if op == "sign" and isinstance(child, Operand) and child.name in ("g", "m"):
        return Operand(f"sign({child.name})")
    return Unary(op, child, None if param is None else float(param))   # which checks clip's and drop's param


def binary(op: str, left: Node, right: Node) -> Node:
    if op == "left":
        return left
    if op == "pow" and left == Operand("g"):
        if right == Operand("2"):
            return Operand("g^2")
        if right == Const(3.0):
            return Operand("g^3")
    return Binary(op, left, right)


def walk(node: Node) -> Iterator[Node]:
    """Every node of the tree, parents before children, left before right."""
    yield node
    if isinstance(node, Unary):
        yield from walk(node.child)
    elif isinstance(node, Binary):
        yield from walk(node.left)
        yield from walk(node.right)


def operands_read(node: Node) -> frozenset[str]:
    return frozenset(n.name for n in walk(node) if isinstance(n, Operand))


def state_buffers(node: Node) -> tuple[str, ...]:
    """The per-parameter moment buffers a rule keeps, in a fixed order."""
    read = operands_read(node)
    return tuple(buf for buf, readers in MOMENT_BUFFERS.items() if read.intersection(readers))


def is_scalar(node: Node) -> bool:
    """True when the node is one number per step: no per-element operand, no dropout."""
    for n in walk(node):
        if isinstance(n, Operand) and n.name not in SCALAR_OPERANDS:
            return False
        if isinstance(n, Unary) and n.op == "drop":
            return False
    return True


def is_random(node: Node) -> bool:
    return any(
        (isinstance(n, Operand) and n.name in ("eps", "eps_t")) or (isinstance(n, Unary) and n.op == "drop")
        for n in walk(node)
    )


def in_vocabulary(node: Node) -> bool:
    """True when every leaf and op is one the controller can emit."""
    for n in walk(node):
        if isinstance(n, Const):
            return False
        if isinstance(n, Unary) and n.op == "clip" and n.param not in CLIP_VALUES:
            return False
        if isinstance(n, Unary) and n.op == "drop" and n.param not in DROP_VALUES:
            return False
    return True
