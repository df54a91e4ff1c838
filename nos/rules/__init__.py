"""The rule language: vocabulary, tree, parser and printer, tokens, evaluation."""

from .parser import RuleSyntaxError, parse
from .printer import format_number, rule_hash, to_text
from .tokens import NotInVocabulary, from_tokens, min_depth, to_tokens
from .tree import (
    Binary,
    Const,
    Node,
    Operand,
    Unary,
    binary,
    const,
    in_vocabulary,
    is_random,
    is_scalar,
    operand,
    operands_read,
    state_buffers,
    unary,
    walk,
)

__all__ = [
    "Binary", "Const", "Node", "NotInVocabulary", "Operand", "RuleSyntaxError", "Unary", "binary", "const",
    "format_number", "from_tokens", "in_vocabulary", "is_random", "is_scalar", "min_depth", "operand",
    "operands_read", "parse", "rule_hash", "state_buffers", "to_text", "to_tokens", "unary", "walk",
]
