"""Trees to and from the controller's token sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from nos.rules import NotInVocabulary, from_tokens, min_depth, parse, to_tokens
from nos.rules.vocabulary import (
    BINARY_ID,
    OPERAND_ID,
    TOKENS,
    UNARY,
    UNARY_ID,
    VOCAB_SIZE,
    UnaryToken,
    position_kinds,
    sequence_length,
)

from helpers.rule_strategies import token_sequences, trees


def test_sequence_lengths_are_5_13_29():
    assert [sequence_length(d) for d in (1, 2, 3)] == [5, 13, 29]
    assert position_kinds(1) == ("operand", "operand", "unary", "unary", "binary")
    assert len(position_kinds(3)) == 29


def test_token_ids_are_stable():
    # Stored sequences and controller checkpoints depend on these ids: append, never reorder.
    assert VOCAB_SIZE == 21 + 12 + 6
    assert [t.id for t in TOKENS] == list(range(VOCAB_SIZE))
    assert OPERAND_ID["g"] == 0
    assert OPERAND_ID["eps_t"] == 20
    assert UNARY_ID[UnaryToken("identity")] == 21
    assert UNARY_ID[UnaryToken("sign")] == 32
    assert BINARY_ID["add"] == 33
    assert BINARY_ID["left"] == 38
    assert len(UNARY) == 12


def test_powersign_decodes_from_its_depth_2_sequence():
    ids = [OPERAND_ID["sign(g)"], OPERAND_ID["sign(m)"], UNARY_ID[UnaryToken("identity")],
           UNARY_ID[UnaryToken("identity")], BINARY_ID["mul"]]
    inner = from_tokens(ids, 1)
    assert str(inner) == "sign(g) * sign(m)"
    g_group = [OPERAND_ID["g"], OPERAND_ID["1"], UNARY_ID[UnaryToken("identity")], UNARY_ID[UnaryToken("neg")],
               BINARY_ID["left"]]
    top = [UNARY_ID[UnaryToken("identity")], UNARY_ID[UnaryToken("exp")], BINARY_ID["mul"]]
    assert str(from_tokens(g_group + ids + top, 2)) == "g * exp(sign(g) * sign(m))"


@pytest.mark.parametrize("depth", [1, 2, 3])
@given(data=st.data())
@settings(max_examples=300, deadline=None)
def test_sequences_decode_and_re_encode(depth, data):
    ids = data.draw(token_sequences(depth))
    tree = from_tokens(ids, depth)
    again = to_tokens(tree, depth)
    assert len(again) == sequence_length(depth)
    assert from_tokens(again, depth) == tree
    assert min_depth(tree) <= depth


@given(trees(with_consts=False, max_leaves=6))
@settings(max_examples=300, deadline=None)
def test_trees_that_fit_encode_canonically(tree):
    depth = min_depth(tree)
    if depth is None:
        return
    for d in range(depth, 4):
        ids = to_tokens(tree, d)
        assert from_tokens(ids, d) == tree
        assert to_tokens(tree, d) == ids   # one canonical encoding


@pytest.mark.parametrize(
    ("text", "depth"),
    [("g", 1), ("sign(g) * sign(m)", 1), ("g * exp(sign(g) * sign(m))", 2),
     ("(1 + sign(g) * sign(m)) * g", 3), ("exp(exp(g))", 2), ("exp(exp(exp(g)))", 3), ("clip(m, 1e-4) * exp(v)", 1)],
)
def test_min_depth(text, depth):
    assert min_depth(parse(text)) == depth


def test_rules_outside_the_vocabulary_are_refused():
    with pytest.raises(NotInVocabulary):
        to_tokens(parse("0.5 * g"), 3)
    with pytest.raises(NotInVocabulary):
        to_tokens(parse("clip(g, 0.2)"), 3)
    with pytest.raises(NotInVocabulary):
        to_tokens(parse("g * exp(sign(g) * sign(m))"), 1)   # needs depth 2
    assert min_depth(parse("0.5 * g")) is None


def test_bad_sequences_are_refused():
    with pytest.raises(ValueError, match="5 tokens"):
        from_tokens([0, 0, 21], 1)
    with pytest.raises(ValueError, match="position 2"):
        from_tokens([0, 0, 0, 21, 33], 1)
    with pytest.raises(ValueError):
        from_tokens([0, 0, 21, 21, 999], 1)
