"""Parsing and printing: the vocabulary, canonical text, round trips, errors."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nos.rules import (
    Binary,
    Const,
    Operand,
    RuleSyntaxError,
    Unary,
    binary,
    const,
    format_number,
    parse,
    rule_hash,
    to_text,
    unary,
)
from nos.rules.builtins import PAPER_EXAMPLES
from nos.rules.tree import BINARY_OPS
from nos.rules.vocabulary import BINARY, OPERANDS, UNARY

from helpers.rule_strategies import trees

PAPER_RULES = list(PAPER_EXAMPLES)


@pytest.mark.parametrize("name", OPERANDS)
def test_every_operand_parses_to_itself(name):
    assert parse(name) == Operand(name)
    assert to_text(parse(name)) == name


@pytest.mark.parametrize("token", UNARY, ids=lambda u: u.name)
def test_every_unary_op_round_trips(token):
    tree = unary(token.op, Operand("v"), token.param)
    assert parse(to_text(tree)) == tree
    if token.op == "identity":
        assert tree == Operand("v")   # identity leaves no trace in the tree
    else:
        assert isinstance(tree, Unary)
        assert tree.op == token.op
        assert tree.param == token.param


@pytest.mark.parametrize("op", BINARY)
def test_every_binary_op_round_trips(op):
    tree = binary(op, Operand("m"), Operand("v"))
    assert parse(to_text(tree)) == tree
    if op == "left":
        assert tree == Operand("m")   # keep-left drops its right side
    else:
        assert tree == Binary(op, Operand("m"), Operand("v"))


@pytest.mark.parametrize("text", PAPER_RULES)
def test_paper_rules_parse_and_print_as_written(text):
    assert to_text(parse(text)) == text


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("g**2", "g^2"),
        ("g ^ 3", "g^3"),
        ("sign( g )", "sign(g)"),
        ("0.001 * w", "1e-3*w"),
        ("g / 1e-3*w", "g / (1e-3*w)"),
        ("1e-3*w^2", "(1e-3*w) ^ 2"),
        ("-g^2", "-g^2"),
        ("(-g)^2", "(-g) ^ 2"),
        ("2 ^ -g", "2 ^ (-g)"),
        ("--g", "-(-g)"),
        ("a-(b)".replace("a", "m").replace("b", "v"), "m - v"),
        ("m - (v - g)", "m - (v - g)"),
        ("(m - v) - g", "m - v - g"),
        ("g ^ m ^ v", "g ^ m ^ v"),
        ("(g ^ m) ^ v", "(g ^ m) ^ v"),
        ("1.0 * g", "1 * g"),
        ("1.5E-3 * g", "1.5e-3 * g"),
        ("-0.5 * g", "-0.5 * g"),
    ],
)
def test_canonical_form(text, canonical):
    assert to_text(parse(text)) == canonical
    assert parse(canonical) == parse(text)


def test_operator_precedence():
    assert parse("g + m * v") == Binary("add", Operand("g"), Binary("mul", Operand("m"), Operand("v")))
    assert parse("-g * m") == Binary("mul", Unary("neg", Operand("g")), Operand("m"))
    assert parse("-g ^ m") == Unary("neg", Binary("pow", Operand("g"), Operand("m")))
    assert parse("g ^ m ^ v") == Binary("pow", Operand("g"), Binary("pow", Operand("m"), Operand("v")))
    assert parse("g - m - v") == Binary("sub", Binary("sub", Operand("g"), Operand("m")), Operand("v"))


def test_numbers_and_constants():
    assert parse("1") == Operand("1")
    assert parse("2.0") == Operand("2")
    assert parse("3") == Const(3.0)
    assert parse("-1") == Unary("neg", Operand("1"))
    assert const(-0.5) == Unary("neg", Const(0.5))
    with pytest.raises(ValueError):
        Const(float("inf"))


@pytest.mark.parametrize("value", [0.0, 3.0, 0.5, 1e-4, 1e-5, 1.5e-4, 2.5e20, 1e15, 123.456, 1 / 3])
def test_format_number_reads_back_exactly(value):
    assert float(format_number(value)) == value


@given(trees())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_trees_round_trip(tree):
    text = to_text(tree)
    assert parse(text) == tree
    assert to_text(parse(text)) == text


def test_structural_hash_is_of_the_canonical_form():
    assert rule_hash(parse("g*exp(sign(g)*sign(m))")) == rule_hash(parse("g * exp( sign(g) * sign(m) )"))
    assert rule_hash(parse("g * m")) != rule_hash(parse("m * g"))
    assert len(rule_hash(parse("g"))) == 16


# -- errors --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "position", "words"),
    [
        ("g * exp(", 8, "ends where a value was expected"),
        ("g * exp(g", 9, "expected ')'"),
        ("g $ m", 2, "unexpected character"),
        ("", 0, "empty rule"),
        ("g m", 2, "unexpected 'm'"),
        ("clip(g)", 6, "expected ','"),
        ("clip(g, m)", 8, "must be a number"),
        ("clip(g, 0)", 8, "positive"),
        ("drop(g, 1.5)", 8, "[0, 1)"),
        ("2*w", 0, "1e-4*w"),
        ("w", 0, "scaled"),
        ("1e999 * g", 0, "too large"),
        ("g * 1e-400", 4, "too small: it would be read as 0"),
        ("drop(g, -0.1)", 8, "positive, with no sign"),
        ("clip(g, -1e-4)", 8, "positive, with no sign"),
        # the language is ASCII: other scripts' digits were read as numbers
        ("\u0661 * g", 0, "unexpected character"),
        ("g * \uff13", 4, "unexpected character"),
        ("g * 1\u0663", 5, "unexpected character"),
    ],
)
def test_syntax_errors_point_at_the_problem(text, position, words):
    with pytest.raises(RuleSyntaxError) as info:
        parse(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.position == position
    assert words in str(err)
    lines = str(err).splitlines()
    assert lines[-1].index("^") - 2 == position   # the caret sits under the position
    assert lines[-2] == "  " + text


def test_only_ascii_spaces_separate_tokens():
    for space in ("\u00a0", "\u2003", "\x1f"):
        with pytest.raises(RuleSyntaxError, match="unexpected character"):
            parse(f"g{space}+ g")


def test_unknown_name_lists_closest_known_names():
    with pytest.raises(RuleSyntaxError) as info:
        parse("g * exp(sgn(m))")
    assert "'sgn'" in str(info.value)
    assert "sign" in str(info.value)
    with pytest.raises(RuleSyntaxError, match="rmsprop"):
        parse("rmsprp")
    with pytest.raises(RuleSyntaxError, match="known names: .*adam"):
        parse("zzzzzz")


def test_deep_nesting_is_a_syntax_error_not_a_crash():
    with pytest.raises(RuleSyntaxError, match="nests more than"):
        parse("(" * 500 + "g" + ")" * 500)
    with pytest.raises(RuleSyntaxError):
        parse("-" * 500 + "g")
    with pytest.raises(RuleSyntaxError, match="longer than"):
        parse("g+" * 6000 + "g")


_RULE_ALPHABET = st.sampled_from(list("gmvwe12.()+-*/^,_ \t") + ["sign(", "exp(", "clip(", "drop(", "**", "1e-4",
                                                                  "adam", "eps_t", "gamma", "log", "sqrt("])


@given(st.one_of(st.text(max_size=60), st.lists(_RULE_ALPHABET, max_size=40).map("".join)))
@settings(max_examples=1500, deadline=None)
def test_fuzzed_text_raises_only_rule_syntax_errors(text):
    try:
        tree = parse(text)
    except RuleSyntaxError:
        return
    assert parse(to_text(tree)) == tree


@given(st.sampled_from(PAPER_RULES), st.integers(0, 40), st.text(max_size=3))
@settings(max_examples=500, deadline=None)
def test_mutated_paper_rules_raise_only_rule_syntax_errors(text, at, insert):
    mutated = text[:at] + insert + text[at + len(insert):]
    try:
        parse(mutated)
    except RuleSyntaxError:
        pass


def test_binary_ops_table_matches_vocabulary():
    assert set(BINARY) == set(BINARY_OPS) | {"left"}
