"""The parser's limits: what it accepts works everywhere, what it refuses is a syntax error, never a RecursionError."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
from click.testing import CliRunner

from nos.cli.main import cli
from nos.export import export_snippet
from nos.optim import SymbolicOptimizer
from nos.rules import RuleSyntaxError, min_depth, operands_read, parse, rule_hash, state_buffers, to_text
from nos.rules.elementwise import delta_one
from nos.rules.fingerprint import probe
from nos.rules.foreach import step_numbers
from nos.rules.parser import MAX_DEPTH, MAX_LENGTH, MAX_NESTING
from nos.rules.tree import Binary, Unary
from nos.store import RuleRecord, get_or_create_rules, open_store, resolve_url, upgrade

# Python frames every operation below may use on the deepest rule the parser accepts; the
# default recursion limit is 1,000, so callers keep more than half of it for their own stack.
HEADROOM = 480


def depth(node) -> int:
    stack, deepest = [(node, 1)], 0
    while stack:
        n, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(n, Unary):
            stack.append((n.child, d + 1))
        elif isinstance(n, Binary):
            stack += [(n.left, d + 1), (n.right, d + 1)]
    return deepest - 1


def balanced(leaves: int) -> str:
    if leaves == 1:
        return "g"
    half = leaves // 2
    return f"({balanced(half)}*{balanced(leaves - half)})"


def longest_and_deepest() -> str:
    """A rule of exactly MAX_LENGTH characters and exactly MAX_DEPTH operations deep.

    A chain of MAX_DEPTH + 1 terms is MAX_DEPTH deep along its left edge; its last
    term is a balanced product (about 12 deep) as long as the length allows.
    """
    chain = "+".join(["m"] * MAX_DEPTH) + "+"
    leaves = (MAX_LENGTH - len(chain) + 3) // 4   # balanced(n) is 4n - 3 characters
    text = chain + balanced(leaves)
    return text + " " * (MAX_LENGTH - len(text))


DEEPEST = [
    "+".join(["g"] * (MAX_DEPTH + 1)),                            # a left-leaning chain
    "*".join(["m"] * 40) + "/" + "-(" * 30 + "g" + ")" * 30,      # a chain, then negations
    "exp(" * (MAX_NESTING - 1) + "+".join(["g"] * 38) + ")" * (MAX_NESTING - 1),   # both limits at once
]


def _step(tree, foreach: bool) -> None:
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 0.5)
    SymbolicOptimizer([p], tree, lr=1e-3, foreach=foreach, total_steps=10).step()


OPERATIONS = {
    "parse": parse,
    "to_text": lambda t: to_text(parse(t)),
    "rule_hash": lambda t: rule_hash(parse(t)),
    "hash": lambda t: hash(parse(t)),
    "min_depth": lambda t: min_depth(parse(t)),
    "probe": lambda t: probe(parse(t)),
    "foreach step": lambda t: _step(parse(t), True),
    "elementwise step": lambda t: _step(parse(t), False),
    "export": export_snippet,
    "stored record": lambda t: RuleRecord.from_tree(parse(t), None),
}


@pytest.mark.parametrize("text", DEEPEST, ids=["chain", "chain-then-negations", "nested-and-chained"])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_the_deepest_rules_work_within_a_bounded_stack(text, operation):
    tree = parse(text)
    assert depth(tree) <= MAX_DEPTH
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + HEADROOM)
    try:
        OPERATIONS[operation](text)
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("text", DEEPEST, ids=["chain", "chain-then-negations", "nested-and-chained"])
def test_the_per_tensor_delta_takes_no_stack_per_operation(text):
    """torch.compile traces delta_one, and dynamo takes several frames of its own for each Python frame: a
    recursive evaluation took it past the recursion limit at 90 operations (compile=True: test_optim.py)."""
    tree = parse(text)
    p, g = torch.ones(4), torch.full((4,), 0.5)
    buffers = {buf: torch.zeros(4) for buf in state_buffers(tree)}
    numbers = step_numbers(1, 10, operands_read(tree))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 40)
    try:
        delta_one(tree, p, g, buffers, numbers)
    finally:
        sys.setrecursionlimit(limit)


def test_one_level_deeper_is_a_syntax_error_at_the_operator():
    text = "+".join(["g"] * (MAX_DEPTH + 2))
    with pytest.raises(RuleSyntaxError, match=f"more than {MAX_DEPTH} operations deep") as info:
        parse(text)
    assert info.value.position == 2 * (MAX_DEPTH + 1) - 1   # the operator that went one too deep
    with pytest.raises(RuleSyntaxError, match="operations deep"):
        parse("exp(" * 60 + "*".join(["m"] * 50) + ")" * 60)


@pytest.mark.parametrize("terms", [500, 2000, 5000])
def test_the_reported_rules_are_refused_in_every_command(tmp_path, terms):
    text = "+".join(["g"] * terms)
    url = f"sqlite:///{tmp_path}/x.db"
    upgrade(resolve_url(url))
    for args in (("rule", "parse", text), ("eval", text), ("export", text), ("show", text, "--db", url),
                 ("plot", "--sweep", text, "-o", str(tmp_path / "x.png"), "--db", url)):
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 2, (args[0], result.output)
        assert f"rule is more than {MAX_DEPTH} operations deep" in result.output, (args[0], result.output)


def test_a_rule_at_both_limits_works_in_every_command(tmp_path):
    text = longest_and_deepest()
    assert len(text) == MAX_LENGTH
    assert depth(parse(text)) == MAX_DEPTH
    url = f"sqlite:///{tmp_path / 'nos.db'}"
    upgrade(resolve_url(url))
    store = open_store(url)
    with store.transaction() as session:
        rule_id, = get_or_create_rules(session, [RuleRecord.from_tree(parse(text), None)])
    store.dispose()

    def run(*args):
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    parsed = run("rule", "parse", text)
    assert parsed.exit_code == 0
    assert "depth:      none" in parsed.output
    evaluated = run("eval", text, "--task", "rosenbrock", "--train-size", "2", "--lrs", "1e-3", "--epochs", "1",
                    "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert run("export", text).exit_code == 0
    for key in (str(rule_id), text):
        shown = run("show", key, "--db", url)
        assert shown.exit_code == 0
        assert f"rule {rule_id}: " in shown.output
    plotted = run("plot", "--sweep", text, "-o", str(tmp_path / "x.png"), "--db", url)
    assert plotted.exit_code == 2
    assert "has no stored learning-rate sweep" in plotted.output


# -- trees built by hand: no bigger than a parsed rule, however they share subtrees -------------------------

def _doubled(times: int):
    """g added to itself `times` times over, each sum's two sides one shared node: `times` nodes, 2**times - 1
    operations when printed, hashed or stepped."""
    from nos.rules import Operand

    node = Operand("g")
    for _ in range(times):
        node = Binary("add", node, node)
    return node


def test_a_shared_subtree_of_a_hand_built_tree_is_made_once(monkeypatch):
    """_canonical made a shared node again each time it was met: 2**d times for a tree of d nodes (depth 20
    took 15 s, depth 60 would never end)."""
    from nos.rules import builtins

    made = []
    real = builtins.binary
    monkeypatch.setattr(builtins, "binary", lambda *args: made.append(args) or real(*args))
    tree = builtins.resolve_rule(_doubled(10))
    assert len(made) == 10
    assert parse(to_text(tree)) == tree   # the tree the parser makes of its text


def test_a_hand_built_tree_past_what_text_can_hold_is_refused_at_once():
    """Each operation of a parsed rule takes at least one of its MAX_LENGTH characters: a hand-built tree of
    more operations (a shared subtree counted each time it is used) is refused before it is made."""
    from nos.rules.builtins import resolve_rule

    assert to_text(resolve_rule(_doubled(13))).count("+") == 2 ** 13 - 1   # 8,191 operations
    message = f"rule has more than {MAX_LENGTH} operations"
    with pytest.raises(ValueError, match=message):   # 16,383
        resolve_rule(_doubled(14))
    for times in (20, 60, MAX_DEPTH):   # 2**MAX_DEPTH operations: rebuilt node by node, this would never end
        with pytest.raises(ValueError, match=message):
            resolve_rule(_doubled(times))
        with pytest.raises(ValueError, match=message):
            SymbolicOptimizer([torch.nn.Parameter(torch.ones(2))], _doubled(times))


def test_a_hand_built_tree_that_holds_itself_is_refused():
    """A node that is its own descendant (frozen dataclasses, changed by object.__setattr__) looped for ever,
    its stack growing; run in a process of its own with its memory and time bounded."""
    import subprocess
    import textwrap

    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (300 << 20, 300 << 20))
        from nos.rules.builtins import resolve_rule
        from nos.rules.tree import Binary, Operand, Unary
        loop = Unary("neg", Operand("g"))
        object.__setattr__(loop, "child", Binary("mul", Operand("m"), loop))
        try:
            resolve_rule(loop)
        except ValueError as exc:
            print(exc)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("resolve_rule looped on a tree that holds itself")
    assert done.stdout.strip() == "rule tree holds itself: it is not a tree", done.stderr[-500:]
