"""The rule language's vocabulary and the controller's stable token ids.

Token ids are part of the on-disk format (stored token sequences, controller
checkpoints): append new items at the end, never reorder or remove.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["operand", "unary", "binary"]

# Operand names exactly as they are written in rule text.
OPERANDS: tuple[str, ...] = (
    "g", "g^2", "g^3",
    "m", "v", "gamma",
    "sign(g)", "sign(m)",
    "1", "2",
    "eps",
    "1e-4*w", "1e-3*w", "1e-2*w", "1e-1*w",
    "adam", "rmsprop",
    "ld", "cd", "rd", "eps_t",
)

# The schedules over a run's length (linear, cosine, restarts): they need the run's total steps.
SCHEDULES: tuple[str, ...] = ("ld", "cd", "rd")

# Operands that are one number per step rather than one value per element.
SCALAR_OPERANDS = frozenset({"1", "2", *SCHEDULES})

# The scale of each weight operand, keyed by operand name.
WEIGHT_SCALES: dict[str, float] = {"1e-4*w": 1e-4, "1e-3*w": 1e-3, "1e-2*w": 1e-2, "1e-1*w": 1e-1}

# Moment buffers (torch's names, so a user's tooling recognises them) and the
# operands that read each one.
MOMENT_BUFFERS: dict[str, tuple[str, ...]] = {
    "exp_avg": ("m", "sign(m)", "adam"),
    "exp_avg_sq": ("v", "adam", "rmsprop"),
    "exp_avg_cube": ("gamma",),
}

# The bias-corrected moments: each one's buffer, and the step number (foreach.step_numbers) it is divided by.
MOMENTS: dict[str, tuple[str, str]] = {
    "m": ("exp_avg", "bc1"), "v": ("exp_avg_sq", "bc2"), "gamma": ("exp_avg_cube", "bc3"),
}

# The step numbers each operand reads (the others read none).
NUMBERS_READ: dict[str, tuple[str, ...]] = {
    **{name: (bc,) for name, (_, bc) in MOMENTS.items()},
    "adam": ("bc1", "bc2"), "rmsprop": ("bc2",), "eps_t": ("eps_t",), **{name: (name,) for name in SCHEDULES},
}

BETA1, BETA2, BETA3 = 0.9, 0.999, 0.999
DIV_EPS = 1e-8          # x / y is x / (y + DIV_EPS); adam and rmsprop use it too
NOISE_STD = 0.1         # eps: Gaussian noise of variance 0.01
NOISE_DECAY = 0.55      # eps_t: variance 0.01 / t ** 0.55, t counting steps from 1
CD_PERIODS = 1.0        # cd: cosine cycles over the horizon (1 -> 0 -> 1)
RD_PERIODS = 2.0        # rd: cosine restarts over the horizon

CLIP_VALUES = (1e-5, 1e-4, 1e-3)
DROP_VALUES = (0.1, 0.3, 0.5)

# Unary ops written as functions in text, with the parameter they take if any.
FUNCTIONS: dict[str, str | None] = {
    "exp": None, "log": None, "sqrt": None, "sign": None, "clip": "c", "drop": "p",
}


@dataclass(frozen=True)
class UnaryToken:
    """One unary item of the vocabulary: an op and, for clip/drop, its constant."""

    op: str                 # identity, neg, exp, log, sqrt, clip, drop, sign
    param: float | None = None

    @property
    def name(self) -> str:
        if self.param is None:
            return self.op
        return f"{self.op}({_short(self.param)})"


def _short(x: float) -> str:
    return f"{x:g}".replace("e-0", "e-")


UNARY: tuple[UnaryToken, ...] = (
    UnaryToken("identity"),
    UnaryToken("neg"),
    UnaryToken("exp"),
    UnaryToken("log"),
    UnaryToken("sqrt"),
    *(UnaryToken("clip", c) for c in CLIP_VALUES),
    *(UnaryToken("drop", p) for p in DROP_VALUES),
    UnaryToken("sign"),
)

# add, sub, mul, div, pow, and keep-left (b(x, y) = x)
BINARY: tuple[str, ...] = ("add", "sub", "mul", "div", "pow", "left")
BINARY_SYMBOLS: dict[str, str] = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "^"}


@dataclass(frozen=True)
class Token:
    id: int
    kind: Kind
    name: str


def _build_tokens() -> tuple[Token, ...]:
    items: list[tuple[Kind, str]] = [("operand", n) for n in OPERANDS]
    items += [("unary", u.name) for u in UNARY]
    items += [("binary", b) for b in BINARY]
    return tuple(Token(i, kind, name) for i, (kind, name) in enumerate(items))


TOKENS: tuple[Token, ...] = _build_tokens()
VOCAB_SIZE = len(TOKENS)
OPERAND_IDS: tuple[int, ...] = tuple(t.id for t in TOKENS if t.kind == "operand")
UNARY_IDS: tuple[int, ...] = tuple(t.id for t in TOKENS if t.kind == "unary")
BINARY_IDS: tuple[int, ...] = tuple(t.id for t in TOKENS if t.kind == "binary")
IDS_BY_KIND: dict[Kind, tuple[int, ...]] = {
    "operand": OPERAND_IDS, "unary": UNARY_IDS, "binary": BINARY_IDS,
}

OPERAND_ID: dict[str, int] = {n: OPERAND_IDS[i] for i, n in enumerate(OPERANDS)}
UNARY_ID: dict[UnaryToken, int] = {u: UNARY_IDS[i] for i, u in enumerate(UNARY)}
BINARY_ID: dict[str, int] = {b: BINARY_IDS[i] for i, b in enumerate(BINARY)}


def unary_of(token_id: int) -> UnaryToken:
    return UNARY[token_id - UNARY_IDS[0]]


def binary_of(token_id: int) -> str:
    return BINARY[token_id - BINARY_IDS[0]]


def operand_of(token_id: int) -> str:
    return OPERANDS[token_id - OPERAND_IDS[0]]


def sequence_length(depth: int) -> int:
    """Tokens in a full tree of `depth` groups: 5, 13, 29 for depth 1, 2, 3."""
    if depth < 1:
        raise ValueError(f"depth must be 1 or more, got {depth}")
    return _length(depth)


def _length(depth: int) -> int:
    return 1 if depth == 0 else 2 * _length(depth - 1) + 3


def position_kinds(depth: int) -> tuple[Kind, ...]:
    """The kind of token each position of a depth-`depth` sequence holds.

    A group is laid out as [x..., y..., u1, u2, b] where x and y are the
    sequences of the depth below (a single operand at depth 0).
    """
    if depth < 1:
        raise ValueError(f"depth must be 1 or more, got {depth}")
    return _kinds(depth)


def _kinds(depth: int) -> tuple[Kind, ...]:
    if depth == 0:
        return ("operand",)
    below = _kinds(depth - 1)
    return below + below + ("unary", "unary", "binary")
