"""Trees to and from the controller's token sequences.

A depth-d sequence is a full tree of groups b(u1(x), u2(y)), laid out as
[x..., y..., u1, u2, b] with x and y the depth d-1 sequences (one operand at
depth 0): 5, 13 and 29 tokens for depth 1, 2, 3. Many sequences decode to the
same tree (identity, keep-left); `to_tokens` picks one canonical encoding.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from .tree import Binary, Node, Operand, Unary, binary, operand, unary
from .vocabulary import (
    BINARY_ID,
    OPERAND_ID,
    TOKENS,
    UNARY_ID,
    UnaryToken,
    binary_of,
    operand_of,
    position_kinds,
    sequence_length,
    unary_of,
)

_IDENTITY = UNARY_ID[UnaryToken("identity")]
_LEFT = BINARY_ID["left"]
_FILLER_OPERAND = OPERAND_ID["g"]


class NotInVocabulary(ValueError):
    """The tree cannot be written as a token sequence of the requested depth."""


def from_tokens(ids: Sequence[int], depth: int) -> Node:
    """Decode a depth-`depth` token sequence into its canonical tree."""
    ids = [int(i) for i in ids]
    if len(ids) != sequence_length(depth):
        raise ValueError(f"a depth-{depth} sequence has {sequence_length(depth)} tokens, got {len(ids)}")
    for pos, (kind, token_id) in enumerate(zip(position_kinds(depth), ids)):
        if not (0 <= token_id < len(TOKENS)) or TOKENS[token_id].kind != kind:
            raise ValueError(f"token {token_id} at position {pos} is not a valid {kind}")
    node, _ = _decode(ids, 0, depth)
    return node


def _decode(ids: list[int], pos: int, depth: int) -> tuple[Node, int]:
    if depth == 0:
        return operand(operand_of(ids[pos])), pos + 1
    x, pos = _decode(ids, pos, depth - 1)
    y, pos = _decode(ids, pos, depth - 1)
    u1, u2, b = unary_of(ids[pos]), unary_of(ids[pos + 1]), binary_of(ids[pos + 2])
    return binary(b, unary(u1.op, x, u1.param), unary(u2.op, y, u2.param)), pos + 3


def to_tokens(node: Node, depth: int) -> list[int]:
    """One canonical depth-`depth` sequence that decodes to `node`.

    Raises NotInVocabulary when the tree holds a constant or op parameter the
    controller cannot emit, or needs more depth than given.
    """
    sequence_length(depth)  # validates depth
    encoded = _encode(node, depth)
    if encoded is None:
        raise NotInVocabulary(f"rule {node} cannot be written as a depth-{depth} token sequence")
    return list(encoded)


def min_depth(node: Node, limit: int = 3) -> int | None:
    """The smallest depth (1..limit) whose sequences can express the tree, or None."""
    for depth in range(1, limit + 1):
        if _encode(node, depth) is not None:
            return depth
    return None


@lru_cache(maxsize=4096)
def _encode(node: Node, depth: int) -> tuple[int, ...] | None:
    if depth == 0:
        if isinstance(node, Operand):
            return (OPERAND_ID[node.name],)
        return None
    # A binary node uses this level's b; anything else passes through keep-left.
    if isinstance(node, Binary):
        halves = _encode_side(node.left, depth), _encode_side(node.right, depth)
        if halves[0] is not None and halves[1] is not None:
            (x, u1), (y, u2) = halves
            return x + y + (u1, u2, BINARY_ID[node.op])
    side = _encode_side(node, depth)
    if side is None:
        return None
    x, u1 = side
    return x + _filler(depth - 1) + (u1, _IDENTITY, _LEFT)


def _encode_side(node: Node, depth: int) -> tuple[tuple[int, ...], int] | None:
    """Encode `node` as u(x) with x a depth-1-lower sequence: (x tokens, u id)."""
    below = _encode(node, depth - 1)
    if below is not None:
        return below, _IDENTITY
    for child, unary_token in _unary_splits(node):
        below = _encode(child, depth - 1)
        if below is not None:
            return below, UNARY_ID[unary_token]
    return None


def _unary_splits(node: Node) -> list[tuple[Node, UnaryToken]]:
    """Ways to see `node` as a vocabulary unary applied to a child."""
    if isinstance(node, Unary):
        token = UnaryToken(node.op, node.param)
        return [(node.child, token)] if token in UNARY_ID else []
    if isinstance(node, Operand) and node.name in ("sign(g)", "sign(m)"):
        return [(Operand({"sign(g)": "g", "sign(m)": "m"}[node.name]), UnaryToken("sign"))]
    return []


@lru_cache(maxsize=8)
def _filler(depth: int) -> tuple[int, ...]:
    """A sequence whose value is discarded by keep-left: g passed through."""
    if depth == 0:
        return (_FILLER_OPERAND,)
    below = _filler(depth - 1)
    return below + below + (_IDENTITY, _IDENTITY, _LEFT)


__all__ = ["NotInVocabulary", "from_tokens", "min_depth", "to_tokens"]
