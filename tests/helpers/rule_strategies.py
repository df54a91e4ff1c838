"""Hypothesis strategies for rule trees, shared by the rule tests."""

from __future__ import annotations

from hypothesis import strategies as st

from nos.rules import binary, const, operand, unary
from nos.rules.tree import BINARY_OPS
from nos.rules.vocabulary import IDS_BY_KIND, OPERANDS, position_kinds

_PLAIN_UNARY = ("neg", "exp", "log", "sqrt", "sign")
_NUMBERS = st.one_of(
    st.sampled_from([0.0, 0.5, 3.0, 1e-3, 1e-12, 2.5e20, 123456.0]),
    st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
)


# Constants a person writes; subnormal ones round differently in float32 and float64.
_MODERATE_NUMBERS = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e6))


def _leaf(with_consts: bool, moderate: bool = False):
    leaves = st.sampled_from(OPERANDS).map(operand)
    numbers = _MODERATE_NUMBERS if moderate else _NUMBERS
    return st.one_of(leaves, numbers.map(const)) if with_consts else leaves


def _unary(children, with_params: bool):
    plain = st.tuples(st.sampled_from(_PLAIN_UNARY), children).map(lambda a: unary(a[0], a[1]))
    clip_values = st.floats(min_value=1e-6, max_value=10) if with_params else st.sampled_from([1e-5, 1e-4, 1e-3])
    drop_values = st.floats(min_value=0, max_value=0.9) if with_params else st.sampled_from([0.1, 0.3, 0.5])
    clip = st.tuples(children, clip_values).map(lambda a: unary("clip", a[0], a[1]))
    drop = st.tuples(children, drop_values).map(lambda a: unary("drop", a[0], a[1]))
    return st.one_of(plain, clip, drop)


def trees(with_consts: bool = True, max_leaves: int = 12, deterministic: bool = False):
    """Canonical rule trees built through the smart constructors.

    deterministic: no noise or dropout, and only moderate constants (for numeric comparisons).
    """
    leaf = _leaf(with_consts, moderate=deterministic)
    if deterministic:
        leaf = leaf.filter(lambda n: getattr(n, "name", None) not in ("eps", "eps_t"))

    def extend(children):
        binaries = st.tuples(st.sampled_from(BINARY_OPS), children, children).map(lambda a: binary(*a))
        unaries = _unary(children, with_consts)
        if deterministic:
            unaries = unaries.filter(lambda n: getattr(n, "op", None) != "drop")
        return st.one_of(binaries, unaries)

    return st.recursive(leaf, extend, max_leaves=max_leaves)


def token_sequences(depth: int):
    """Valid controller token sequences of a depth: each position from its kind's ids."""
    return st.tuples(*(st.sampled_from(IDS_BY_KIND[kind]) for kind in position_kinds(depth))).map(list)
