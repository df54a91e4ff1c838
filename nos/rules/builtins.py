"""The named built-in rules, and turning a name, text or tree into a rule tree."""

from __future__ import annotations

from .parser import MAX_DEPTH, MAX_LENGTH, parse
from .tree import Binary, Const, Node, Operand, Unary, binary, unary
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
        return _canonical(rule)
    raise TypeError(f"a rule is text, a built-in rule's name or a parsed tree, not {type(rule).__name__} ({rule!r})")


def _canonical(tree: Node) -> Node:
    """A tree built from the node classes directly, made again as the parser makes one.

    That is, through the constructors that keep a tree canonical (Binary("pow", g, Const(3.0)) is the operand
    g^3, whose text, hash and saved state a parsed rule has), at most MAX_DEPTH operations deep and of at most
    MAX_LENGTH operations (each operation of parsed text takes at least one of its at most MAX_LENGTH
    characters). Children before parents, from a stack: a tree built by hand may be deeper than Python's
    recursion limit. A node met twice (a subtree shared, as in n = Binary("add", n, n)) is made once, but
    counts as often as it is met: printing and hashing the tree visit it so often.
    """
    # by the node's id: it made again, its depth in operations, and its operations counted with repeats
    made: dict[int, tuple[Node, int, int]] = {}
    pending: set[int] = set()   # nodes whose children are being made: meeting one again is a cycle
    todo: list[tuple[Node, bool]] = [(tree, False)]   # (node, whether its children are made)
    while todo:
        node, ready = todo.pop()
        if id(node) in made:
            continue
        if isinstance(node, (Operand, Const)):
            made[id(node)] = node, 0, 0
            continue
        children = _children(node)
        if not ready:
            if id(node) in pending:
                raise ValueError("rule tree holds itself: it is not a tree")
            pending.add(id(node))
            todo.append((node, True))
            todo += [(child, False) for child in children if id(child) not in made]
            continue
        pending.discard(id(node))
        depth = 1 + max(made[id(child)][1] for child in children)
        if depth > MAX_DEPTH:
            raise ValueError(f"rule is more than {MAX_DEPTH} operations deep, as a parsed rule may not be")
        operations = 1 + sum(made[id(child)][2] for child in children)
        if operations > MAX_LENGTH:
            raise ValueError(f"rule has more than {MAX_LENGTH} operations (a shared subtree counts each time it "
                             f"is used), as a parsed rule of at most {MAX_LENGTH} characters cannot")
        kids = [made[id(child)][0] for child in children]
        made[id(node)] = (unary(node.op, *kids, node.param) if isinstance(node, Unary)
                          else binary(node.op, *kids)), depth, operations
    return made[id(tree)][0]


def _children(node: Unary | Binary) -> tuple[Node, ...]:
    """The node's children, each checked to be a node: a tree holding anything else is no rule."""
    named = {"child": node.child} if isinstance(node, Unary) else {"left": node.left, "right": node.right}
    for name, child in named.items():
        if not isinstance(child, (Operand, Const, Unary, Binary)):
            raise TypeError(f"a rule tree is made of Operand, Const, Unary and Binary nodes: the {name} of a "
                            f"{type(node).__name__}({node.op!r}) is {type(child).__name__} {child!r:.60}")
    return tuple(named.values())
