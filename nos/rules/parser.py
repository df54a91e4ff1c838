"""Recursive-descent parser for rule text. Rules are parsed, never evaluated as Python.

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := '-' factor | power
    power  := atom (('^' | '**') factor)?          right-associative
    atom   := NUMBER ['*' 'w'] | NAME | NAME '(' expr [',' NUMBER] ')' | '(' expr ')'
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from .tree import Node, binary, const, operand, unary
from .vocabulary import FUNCTIONS, OPERANDS, WEIGHT_SCALES

# What the parser accepts, every other part of nos handles: printing, hashing, storing,
# probing and training walk the tree recursively, at most about 3 Python frames per level
# (1,000 by default), so MAX_DEPTH keeps each well inside Python's recursion limit wherever
# it is called from. MAX_NESTING bounds the parser's own recursion (about 5 frames per
# parenthesis, unary minus or power). Rules the controller samples are at most 6 deep.
MAX_LENGTH = 10_000
MAX_NESTING = 64
MAX_DEPTH = 100

# Names that stand alone in text (the operands that are not numbers or written
# with symbols) and the names that are called like functions.
_NAMES = tuple(n for n in OPERANDS if re.fullmatch(r"[a-z_]+", n))
_KNOWN_WORDS = sorted(set(_NAMES) | set(FUNCTIONS))
_WEIGHT_BY_SCALE = {scale: name for name, scale in WEIGHT_SCALES.items()}

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\*\*|[-+*/^(),])
    """,
    re.VERBOSE | re.ASCII,   # \d and \s would take Unicode digits and spaces: the language is ASCII
)


class RuleSyntaxError(ValueError):
    """Malformed rule text. The message shows the text with a caret at `position`."""

    def __init__(self, message: str, text: str, position: int):
        self.reason = message
        self.text = text
        self.position = position
        shown = "".join(c if c.isprintable() else " " for c in text)
        if len(shown) > 120:   # keep the caret visible in long text
            start = max(0, position - 60)
            shown, position = shown[start:start + 120], position - start
        super().__init__(f"{message} at position {self.position}\n  {shown}\n  {' ' * position}^")


@dataclass(frozen=True)
class _Tok:
    kind: str    # number, name, op, end
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise RuleSyntaxError(f"unexpected character {text[pos]!r}", text, pos)
        if match.lastgroup != "space":
            tokens.append(_Tok(match.lastgroup, match.group(), pos))
        pos = match.end()
    tokens.append(_Tok("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.nesting = 0
        # Depth of each operation node built so far, by id; `built` keeps them alive so ids stay unique.
        self.depths: dict[int, int] = {}
        self.built: list[Node] = []

    # -- token helpers -------------------------------------------------------
    @property
    def tok(self) -> _Tok:
        return self.tokens[self.i]

    def peek(self, offset: int = 1) -> _Tok:
        return self.tokens[min(self.i + offset, len(self.tokens) - 1)]

    def at(self, *ops: str) -> bool:
        return self.tok.kind == "op" and self.tok.text in ops

    def advance(self) -> _Tok:
        tok = self.tok
        self.i += 1
        return tok

    def expect(self, op: str) -> _Tok:
        if not self.at(op):
            found = "end of text" if self.tok.kind == "end" else repr(self.tok.text)
            self.fail(f"expected {op!r} but found {found}")
        return self.advance()

    def fail(self, message: str, pos: int | None = None) -> None:
        raise RuleSyntaxError(message, self.text, self.tok.pos if pos is None else pos)

    def deeper(self) -> None:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            self.fail(f"rule nests more than {MAX_NESTING} levels deep")

    def built_from(self, node: Node, *children: Node, pos: int) -> Node:
        """`node`, made from `children`; a rule deeper than MAX_DEPTH operations fails at `pos`."""
        depth = 1 + max(self.depths.get(id(child), 0) for child in children)
        if depth > MAX_DEPTH:
            self.fail(f"rule is more than {MAX_DEPTH} operations deep (each operator of a chain "
                      "such as g + g + g adds one level)", pos)
        self.depths[id(node)] = depth
        self.built.append(node)
        return node

    # -- grammar -------------------------------------------------------------
    def parse(self) -> Node:
        if self.tok.kind == "end":
            self.fail("empty rule")
        node = self.expr()
        if self.tok.kind != "end":
            self.fail(f"unexpected {self.tok.text!r}")
        return node

    def expr(self) -> Node:
        self.deeper()
        node = self.term()
        while self.at("+", "-"):
            pos = self.tok.pos
            op = "add" if self.advance().text == "+" else "sub"
            right = self.term()
            node = self.built_from(binary(op, node, right), node, right, pos=pos)
        self.nesting -= 1
        return node

    def term(self) -> Node:
        node = self.factor()
        while self.at("*", "/"):
            pos = self.tok.pos
            op = "mul" if self.advance().text == "*" else "div"
            right = self.factor()
            node = self.built_from(binary(op, node, right), node, right, pos=pos)
        return node

    def factor(self) -> Node:
        if self.at("-"):
            pos = self.advance().pos
            self.deeper()
            child = self.factor()
            node = self.built_from(unary("neg", child), child, pos=pos)
            self.nesting -= 1
            return node
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        if self.at("^", "**"):
            pos = self.advance().pos
            self.deeper()
            exponent = self.factor()
            self.nesting -= 1
            return self.built_from(binary("pow", base, exponent), base, exponent, pos=pos)
        return base

    def atom(self) -> Node:
        tok = self.tok
        if tok.kind == "number":
            return self.number_or_weight()
        if tok.kind == "name":
            return self.name()
        if self.at("("):
            self.advance()
            node = self.expr()
            self.expect(")")
            return node
        if tok.kind == "end":
            self.fail("rule ends where a value was expected")
        self.fail(f"expected a value but found {tok.text!r}")
        raise AssertionError  # unreachable: fail raises

    def number(self) -> float:
        tok = self.advance()
        value = float(tok.text)
        if not math.isfinite(value):
            self.fail(f"number {tok.text} is too large", tok.pos)
        if value == 0 and any(c in "123456789" for c in tok.text.lower().partition("e")[0]):
            self.fail(f"number {tok.text} is too small: it would be read as 0", tok.pos)
        return value

    def number_or_weight(self) -> Node:
        start = self.tok.pos
        value = self.number()
        if self.at("*") and self.peek().kind == "name" and self.peek().text == "w":
            if value not in _WEIGHT_BY_SCALE:
                known = ", ".join(_WEIGHT_BY_SCALE.values())
                self.fail(f"the weights can be read only as one of {known}", start)
            self.advance()
            self.advance()
            return operand(_WEIGHT_BY_SCALE[value])
        return const(value)

    def name(self) -> Node:
        tok = self.advance()
        word = tok.text
        if word in FUNCTIONS:
            return self.call(tok)
        if word in _NAMES:
            return operand(word)
        if word == "w":
            known = ", ".join(WEIGHT_SCALES)
            self.fail(f"the weights are read only scaled, as one of {known}", tok.pos)
        close = difflib.get_close_matches(word, _KNOWN_WORDS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known names: {', '.join(_KNOWN_WORDS)}"
        self.fail(f"unknown name {word!r}{hint}", tok.pos)
        raise AssertionError  # unreachable

    def call(self, name_tok: _Tok) -> Node:
        fn = name_tok.text
        self.expect("(")
        arg = self.expr()
        param, param_pos = None, name_tok.pos
        if FUNCTIONS[fn] is not None:
            self.expect(",")
            if self.tok.kind != "number":
                signed = self.tok.kind == "op" and self.tok.text in "+-"
                self.fail(f"{fn}'s second argument must be " + ("positive, with no sign" if signed else "a number"))
            param_pos = self.tok.pos
            param = self.number()
        self.expect(")")
        try:
            node = unary(fn, arg, param)
        except ValueError as exc:
            self.fail(str(exc), param_pos)
            raise AssertionError  # unreachable
        return self.built_from(node, arg, pos=name_tok.pos)


def parse(text: str) -> Node:
    """Parse rule text into its canonical tree; raises RuleSyntaxError."""
    if not isinstance(text, str):
        raise TypeError(f"rule text must be a str, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise RuleSyntaxError(f"rule is longer than {MAX_LENGTH} characters", text[:MAX_LENGTH], MAX_LENGTH - 1)
    return _Parser(text).parse()
