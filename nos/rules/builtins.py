"""The named built-in rules, and turning a name, text or tree into a rule tree."""

from __future__ import annotations

from .parser import parse
from .tree import Binary, Const, Node, Operand, Unary
from .vocabulary import SCHEDULES

# TensorFlow's PowerSign / AddSign with a sign decay f(t) in {ld, cd, rd}:
# base^(f(t) * sign(g) * sign(m)) * g with base e, and (alpha + f(t) * sign(g) * sign(m)) * g with alpha 1.
BUILTINS: dict[str, str] = {
    "sgd": "g",
    # The rule language's m is bias-corrected; SGD-momentum's buffer is that
    # times (1 - 0.9^t) / 0.1, a factor the learning-rate sweep absorbs.
    "momentum": "m",
    "adam": "adam",
    "rmsprop": "rmsprop",
    "powersign": "g * exp(sign(g) * sign(m))",
    "addsign": "(1 + sign(g) * sign(m)) * g",
    **{f"powersign-{d}": f"g * exp({d} * sign(g) * sign(m))" for d in SCHEDULES},
    **{f"addsign-{d}": f"(1 + {d} * sign(g) * sign(m)) * g" for d in SCHEDULES},
}


# Rules from the paper (and a clipped one) that must parse and train (the demo and the tests use them).
PAPER_EXAMPLES: tuple[str, ...] = (
    "g * exp(sign(g) * sign(m))",
    "(1 + sign(g) * sign(m)) * g",
    "clip(m, 1e-4) * exp(v)",
    "drop(m, 0.3) * exp(1e-3*w)",
    "adam * exp(sign(g) * sign(m))",
    "g - clip(g^2, 1e-4)",
)


def resolve_rule(rule: str | Node) -> Node:
    """A rule tree from a tree, a built-in name, or rule text; TypeError for anything else."""
    if isinstance(rule, str):
        return parse(BUILTINS.get(rule.strip().lower(), rule))
    if isinstance(rule, (Operand, Const, Unary, Binary)):
        return rule
    raise TypeError(f"a rule is text, a built-in rule's name or a parsed tree, not {type(rule).__name__} ({rule!r})")
