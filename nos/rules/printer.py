"""Canonical text of a rule tree: `parse(to_text(t)) == t` for every tree."""

from __future__ import annotations

import hashlib
from decimal import Decimal

from .tree import Binary, Const, Node, Operand, Unary
from .vocabulary import BINARY_SYMBOLS, WEIGHT_SCALES

_ADD, _MUL, _NEG, _POW, _ATOM = 1, 2, 3, 4, 5
_BINARY_PRECEDENCE = {"add": _ADD, "sub": _ADD, "mul": _MUL, "div": _MUL, "pow": _POW}


def format_number(value: float) -> str:
    """Shortest text that reads back as the same float: 3, 0.3, 1e-4, 2.5e+20."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if 1e-2 <= abs(value) < 1e15:
        return repr(value)
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    return ("-" if sign else "") + f"{mantissa}e{exponent + len(digits) - 1}"


def _precedence(node: Node) -> int:
    if isinstance(node, Binary):
        return _BINARY_PRECEDENCE[node.op]
    if isinstance(node, Unary):
        return _NEG if node.op == "neg" else _ATOM
    if isinstance(node, Operand):
        if node.name in ("g^2", "g^3"):
            return _POW
        if node.name in WEIGHT_SCALES:
            return _MUL
    return _ATOM


def _wrap(node: Node, parens: bool) -> str:
    text = to_text(node)
    return f"({text})" if parens else text


def to_text(node: Node) -> str:
    if isinstance(node, Operand):
        return node.name
    if isinstance(node, Const):
        return format_number(node.value)
    if isinstance(node, Unary):
        if node.op == "neg":
            return "-" + _wrap(node.child, _precedence(node.child) <= _NEG)
        if node.param is not None:
            return f"{node.op}({to_text(node.child)}, {format_number(node.param)})"
        return f"{node.op}({to_text(node.child)})"
    prec = _BINARY_PRECEDENCE[node.op]
    if node.op == "pow":   # right-associative
        left = _wrap(node.left, _precedence(node.left) <= _POW)
        right = _wrap(node.right, _precedence(node.right) < _POW)
    else:
        left = _wrap(node.left, _precedence(node.left) < prec)
        right = _wrap(node.right, _precedence(node.right) <= prec)
    return f"{left} {BINARY_SYMBOLS[node.op]} {right}"


def rule_hash(node: Node) -> str:
    """Structural hash: sha256 of the canonical text, 16 hex digits."""
    return hashlib.sha256(to_text(node).encode()).hexdigest()[:16]
