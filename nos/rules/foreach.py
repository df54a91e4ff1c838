"""Evaluate a rule on all of a bucket's tensors at once, with `torch._foreach_*` ops.

A value is either one Python float per step (constants, decay schedules) or a
list of tensors, one per parameter: a step costs one kernel launch per op per
tensor and no Python loop per element. Temporaries that nothing else holds
are updated in place; on a CPU the others are copied into buffers kept from
step to step (`Scratch`), because a fresh 50 MB tensor costs more in page
faults than the op that fills it.

The operand context computes only the operands a rule reads, once per step,
and moment buffers exist only for rules that read them. `elementwise.py`
holds the same semantics one tensor at a time; the tests hold the two equal.
"""

from __future__ import annotations

import functools
import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .elementwise import fit
from .tree import Binary, Const, Node, Operand, Unary, is_scalar, walk
from .vocabulary import (
    BETA1,
    BETA2,
    BETA3,
    CD_PERIODS,
    DIV_EPS,
    MOMENTS,
    NOISE_DECAY,
    NOISE_STD,
    RD_PERIODS,
    SCHEDULES,
    WEIGHT_SCALES,
)

# Unary ops too costly per element to run on a value that takes only three values.
_TABULATED = frozenset({"exp", "log", "sqrt"})

# The root operands apply_update writes straight into the parameters.
_ADAM, _M = Operand("adam"), Operand("m")


@dataclass
class Tensors:
    """A per-parameter list of tensors; `owned` means ops may overwrite it."""

    items: list[Tensor]
    owned: bool


Value = float | Tensors


def step_numbers(step: int, total_steps: int | None, reads: frozenset[str] = frozenset()) -> dict[str, float]:
    """The per-step numbers a rule may read: bias corrections, schedules, noise scale.

    `step` counts from 1 (as Adam's bias correction does); the schedules see
    t = step - 1 of `total_steps`, as TensorFlow's sign decays do.
    """
    numbers = {
        "bc1": 1.0 - BETA1 ** step,
        "bc2": 1.0 - BETA2 ** step,
        "bc3": 1.0 - BETA3 ** step,
        "eps_t": NOISE_STD * step ** (-NOISE_DECAY / 2),
    }
    schedules = reads.intersection(SCHEDULES)
    if schedules and total_steps is None:
        raise ValueError(f"the rule reads {', '.join(sorted(schedules))}: "
                         "pass total_steps=T, the run's length in steps")
    if schedules:
        frac = min(step - 1, total_steps) / total_steps
        numbers["ld"] = 1.0 - frac
        numbers["cd"] = 0.5 * (1.0 + math.cos(2.0 * math.pi * CD_PERIODS * frac))
        numbers["rd"] = 0.5 * (1.0 + math.cos(math.pi * ((RD_PERIODS * frac) % 1.0)))
    return numbers


class TreeFacts:
    """What a step asks of a rule's tree that does not change from step to step, worked out once.

    Keyed by the nodes' identity: the caller keeps one per tree, with the tree,
    for as long as it steps with that tree (the tree holds the nodes, so no id
    is reused meanwhile). A pack steps dozens of small optimizers per training
    step, each in Python: walking each tree again at every step is host time
    the card waits for.
    """

    def __init__(self) -> None:
        self._scalar: dict[int, bool] = {}
        self._split: dict[int, tuple[Node | None, Node] | None] = {}

    def scalar(self, node: Node) -> bool:
        known = self._scalar.get(id(node))
        if known is None:
            known = self._scalar[id(node)] = is_scalar(node)
        return known

    def split(self, node: Node) -> tuple[Node | None, Node] | None:
        key = id(node)
        if key not in self._split:
            self._split[key] = _scaled_ternary(node)
        return self._split[key]


class Scratch:
    """Temporaries kept from one step to the next, handed out by shape.

    A bucket's temporaries are kept as lists, by the shapes of all of its tensors: a step takes each with
    one lookup. The tensors that step change as gradients come and go (layers dropped, experts not routed
    to, a layer unfrozen), and each new set would keep lists of its own for good: `trim`, once a step, cuts
    the lists no step took since the last trim into loose tensors, which the next lists are made of, and
    lets the loose ones go that no list took meanwhile. What is kept is then at most two steps' worth.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[list[Tensor]]] = {}
        self._lent: list[tuple[tuple, list[Tensor]]] = []
        self._taken: Counter = Counter()   # lists taken since the last trim, by key
        self._loose: dict[tuple, list[Tensor]] = {}   # by dtype, device, shape and strides

    def take(self, like: Sequence[Tensor]) -> list[Tensor]:
        """Tensors shaped like `like`; their contents are garbage."""
        key = (like[0].dtype, like[0].device, tuple(t.shape for t in like))
        free = self._free.get(key)
        out = free.pop() if free else [self._loose_or(t.dtype, t.device, t.shape, t.stride(), t) for t in like]
        self._lent.append((key, out))
        return out

    def take_flat(self, numel: int, like: Tensor) -> Tensor:
        key = (like.dtype, like.device, ((numel,),))
        free = self._free.get(key)
        out = free.pop() if free else [self._loose_or(like.dtype, like.device, (numel,), (1,), like, numel)]
        self._lent.append((key, out))
        return out[0]

    def _loose_or(self, dtype: torch.dtype, device: torch.device, shape: Sequence[int], strides: Sequence[int],
                  like: Tensor, numel: int | None = None) -> Tensor:
        """A loose tensor of this layout, or else a new one: like `like`, or flat with `numel` elements."""
        loose = self._loose.get((dtype, device, tuple(shape), tuple(strides)))
        if loose:
            return loose.pop()
        return torch.empty_like(like) if numel is None else like.new_empty(numel)

    def release(self) -> None:
        for key, out in self._lent:
            self._free.setdefault(key, []).append(out)
            self._taken[key] += 1
        self._lent.clear()

    def trim(self) -> None:
        """Keep as many lists of each key as were taken since the last trim; cut the rest loose, and drop
        the loose tensors that were not taken since then."""
        if all(self._taken[key] >= len(lists) for key, lists in self._free.items()) and not self._loose:
            self._taken.clear()
            return   # the same tensors stepped: nothing to cut
        self._loose = {}
        for key in list(self._free):
            lists = self._free[key]
            for out in lists[self._taken[key]:]:
                for t in out:
                    self._loose.setdefault((t.dtype, t.device, tuple(t.shape), t.stride()), []).append(t)
            del lists[self._taken[key]:]
            if not lists:
                del self._free[key]
        self._taken.clear()


@dataclass
class StepContext:
    """What one step of one bucket of same-device, same-dtype tensors sees.

    `buffers` maps moment buffer names (exp_avg, exp_avg_sq, exp_avg_cube) to
    their per-parameter tensors, already updated for this step; `numbers`
    comes from `step_numbers`. Without `scratch`, temporaries are new tensors.
    """

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    buffers: dict[str, list[Tensor]]
    numbers: dict[str, float]
    generator: torch.Generator | None = None
    uses: Counter = field(default_factory=Counter)
    scratch: Scratch | None = None
    # Stacked children (dim 0 of every tensor is a child, see nos.tasks.stacked): each
    # tensor's per-child step sizes, shaped to broadcast; noise is drawn per child.
    rates: Sequence[Tensor] | None = None
    facts: TreeFacts = field(default_factory=TreeFacts)   # kept with the tree from step to step, where it can be
    _cache: dict[str, Value] = field(default_factory=dict)

    def operand(self, name: str) -> Value:
        if name in self._cache:
            return self._cache[name]
        value = self._compute(name)
        if self.uses[name] > 1 and isinstance(value, Tensors):
            value.owned = False
            self._cache[name] = value
        return value

    def apply(self, x: Tensors, name: str, *args) -> Tensors:
        """torch._foreach_<name>_(x, *args) on x, or on a copy when others hold x."""
        args = tuple(fit(a, x.items[0].dtype) if isinstance(a, float) else a for a in args)
        in_place, out_of_place = _foreach_ops(name)
        if x.owned:
            in_place(x.items, *args)
            return x
        if self.scratch is None:
            return Tensors(out_of_place(x.items, *args), owned=True)
        out = self.scratch.take(x.items)
        torch._foreach_copy_(out, x.items)
        in_place(out, *args)
        return Tensors(out, owned=True)

    def random(self, kind: str, arg: float) -> list[Tensor]:
        """One draw for all tensors (one kernel), split into views shaped like the parameters.

        kind "normal": Gaussian noise of standard deviation `arg`; "keep": a
        dropout keep-mask for drop probability `arg`, scaled by 1 / (1 - arg).
        """
        # Stacked children draw one child's worth and share it: each child then sees the
        # noise it would have drawn alone, from the same seed.
        shapes = [p.shape[1:] if self.rates is not None else p.shape for p in self.params]
        numels = [shape.numel() for shape in shapes]
        first = self.params[0]
        flat = (self.scratch.take_flat(sum(numels), first) if self.scratch is not None
                else first.new_empty(sum(numels)))
        if kind == "normal":
            torch.randn(flat.shape, generator=self.generator, out=flat).mul_(arg)
        else:
            torch.rand(flat.shape, generator=self.generator, out=flat)
            flat.copy_(flat >= arg).div_(1.0 - arg)
        pieces = [piece.view(shape) for piece, shape in zip(flat.split(numels), shapes)]
        if self.rates is not None:
            return [piece.expand_as(p).clone() for piece, p in zip(pieces, self.params)]
        return [piece.view_as(p) for piece, p in zip(pieces, self.params)]

    def adam_denominator(self) -> Tensors:
        """sqrt(v_hat) + eps in the order of operations torch.optim.Adam uses."""
        denom = self.apply(Tensors(self.buffers["exp_avg_sq"], owned=False), "sqrt")
        torch._foreach_div_(denom.items, math.sqrt(self.numbers["bc2"]))
        torch._foreach_add_(denom.items, DIV_EPS)
        return denom

    def _compute(self, name: str) -> Value:
        if name == "g":
            return self._g()
        if name in ("1", "2"):
            return float(name)
        if name in SCHEDULES:
            return self.numbers[name]
        if name == "g^2":
            return self.apply(self._g(), "mul", self.grads)
        if name == "g^3":
            cube = self.apply(self._g(), "mul", self.grads)
            torch._foreach_mul_(cube.items, self.grads)
            return cube
        if name in MOMENTS:
            buf, bc = MOMENTS[name]
            return self.apply(Tensors(self.buffers[buf], owned=False), "div", self.numbers[bc])
        if name == "sign(g)":
            return self.apply(self._g(), "sign")
        if name == "sign(m)":   # bias correction is positive: the raw buffer has the same sign
            return self.apply(Tensors(self.buffers["exp_avg"], owned=False), "sign")
        if name == "eps":
            return Tensors(self.random("normal", NOISE_STD), owned=True)
        if name == "eps_t":
            return Tensors(self.random("normal", self.numbers["eps_t"]), owned=True)
        if name in WEIGHT_SCALES:
            return self.apply(Tensors(list(self.params), owned=False), "mul", WEIGHT_SCALES[name])
        if name == "adam":   # m_hat / denom as m / (denom * bc1)
            denom = self.adam_denominator()
            torch._foreach_mul_(denom.items, self.numbers["bc1"])
            torch._foreach_reciprocal_(denom.items)
            torch._foreach_mul_(denom.items, self.buffers["exp_avg"])
            return denom
        if name == "rmsprop":
            denom = self.adam_denominator()
            torch._foreach_reciprocal_(denom.items)
            torch._foreach_mul_(denom.items, self.grads)
            return denom
        raise KeyError(name)

    def _g(self) -> Tensors:
        return Tensors(list(self.grads), owned=False)


# -- ops on values ---------------------------------------------------------------

@functools.cache
def _foreach_ops(name: str) -> tuple:
    """torch._foreach_<name>_ and torch._foreach_<name>."""
    return getattr(torch, f"_foreach_{name}_"), getattr(torch, f"_foreach_{name}")


def _unary(op: str, x: Tensors, param: float | None, ctx: StepContext) -> Tensors:
    if op == "drop":
        mask = Tensors(ctx.random("keep", param), owned=True)
        return _binary_lists("mul", mask, x, ctx)
    if op == "clip":
        out = ctx.apply(x, "clamp_min", -param)
        torch._foreach_clamp_max_(out.items, fit(param, out.items[0].dtype))
        return out
    if op in ("log", "sqrt"):   # of |x|
        out = ctx.apply(x, "abs")
        getattr(torch, f"_foreach_{op}_")(out.items)
        return out
    return ctx.apply(x, op)   # neg, exp, sign


def _binary_lists(op: str, x: Tensors, y: Tensors, ctx: StepContext) -> Tensors:
    if op == "div":
        y = ctx.apply(y, "add", DIV_EPS)
    if y.owned and not x.owned and op in ("add", "mul"):
        return ctx.apply(y, op, x.items)
    return ctx.apply(x, op, y.items)


def _binary_list_scalar(op: str, x: Tensors, s: float, ctx: StepContext) -> Tensors:
    return ctx.apply(x, op, _divisor(s, x.items[0].dtype) if op == "div" else s)


def _binary_scalar_list(op: str, s: float, y: Tensors, ctx: StepContext) -> Tensors:
    if op in ("add", "mul"):
        return _binary_list_scalar(op, y, s, ctx)
    if op == "pow":
        return Tensors(torch._foreach_pow(fit(s, y.items[0].dtype), y.items), owned=True)
    if op == "sub":   # s - y = (-y) + s
        out = ctx.apply(y, "neg")
        return ctx.apply(out, "add", s)
    out = ctx.apply(y, "add", DIV_EPS)   # div: s / (y + eps)
    torch._foreach_reciprocal_(out.items)
    return ctx.apply(out, "mul", s)


def _is_ternary(node: Node) -> bool:
    """True when every element of the node's value is -1, 0 or 1 (products of signs)."""
    if isinstance(node, Operand):
        return node.name in ("sign(g)", "sign(m)")
    if isinstance(node, Unary):
        return node.op == "sign" or (node.op == "neg" and _is_ternary(node.child))
    if isinstance(node, Binary):
        return node.op == "mul" and _is_ternary(node.left) and _is_ternary(node.right)
    return False


def _scaled_ternary(node: Node) -> tuple[Node | None, Node] | None:
    """(k, s) when node = k * s with k one number per step (None for 1) and s ternary."""
    if _is_ternary(node):
        return None, node
    if isinstance(node, Binary) and node.op == "mul":
        for k, s in ((node.left, node.right), (node.right, node.left)):
            if is_scalar(k) and _is_ternary(s):
                return k, s
    return None


@functools.lru_cache(maxsize=1024)
def _table(op: str, k: float, param: float | None, dtype: torch.dtype) -> tuple[float, float, float] | None:
    """(f0, c1, c2) with op(k * s) = f0 + c1 * s + c2 * s * s for s in {-1, 0, 1}, in `dtype` (a pure op: exp,
    log or sqrt), or None where the three terms do not give op's own values to a few ulps.

    Kept from step to step: building and reading nine tiny tensors each step cost PowerSign's eager step a
    sixth of its host time.
    """
    evaluator = _Evaluator(StepContext([], [], {}, {}), dtype)
    exact = [evaluator.on_numbers(op, x, param=param) for x in (-k, 0.0, k)]
    f_minus, f_zero, f_plus = exact
    c1, c2 = (f_plus - f_minus) / 2, (f_plus + f_minus) / 2 - f_zero
    if not all(map(math.isfinite, (f_zero, c1, c2))):
        return None
    # The terms cancel: exp(k * s) at s = -1 is 1 - c1 + c2 with c1, c2 near e^k / 2, so for a large k
    # only their rounding is left (e^-7.4 came out -1 in bfloat16, e^-14.8 0 in float32). The step's ops on
    # the three values of s show what it would give; off by more than a few ulps, the plain op runs.
    signs = Tensors([torch.tensor([s], dtype=dtype) for s in (-1.0, 0.0, 1.0)], owned=False)
    got = _three_terms(StepContext([], [], {}, {}), signs, f_zero, c1, c2)
    info = torch.finfo(dtype)
    for value, want in zip(got.items, exact):
        # Relative, so that a subnormal e^-k is not taken for 0; an exact 0 takes the smallest normal.
        if not abs(value.item() - want) <= (4 * info.eps * abs(want) if want else info.tiny):
            return None   # (`not <=`: a nan fails too)
    return f_zero, c1, c2


def _three_terms(ctx: StepContext, s: Tensors, f_zero: float, c1: float, c2: float) -> Tensors:
    """f0 + c1 * s + c2 * s * s: three cheap passes over s, which others may hold."""
    out = ctx.apply(Tensors(s.items, owned=False), "mul", c1)
    out = ctx.apply(out, "add", f_zero)
    torch._foreach_addcmul_(out.items, s.items, s.items, fit(c2, s.items[0].dtype))
    return out


class _Evaluator:
    def __init__(self, ctx: StepContext, dtype: torch.dtype | None = None):
        self.ctx = ctx
        self.facts = ctx.facts
        self.dtype = dtype or (ctx.params[0].dtype if ctx.params else torch.float64)

    def on_numbers(self, op: str, *xs: float, param: float | None = None) -> float:
        # The op on 0-dim tensors of the parameters' dtype: numbers follow torch's semantics
        # (inf, nan, rounding) exactly as the same op on the parameters would.
        ts = [Tensors([torch.tensor(x, dtype=self.dtype)], owned=True) for x in xs]
        scalar_ctx = StepContext([], [], {}, self.ctx.numbers)
        out = _unary(op, ts[0], param, scalar_ctx) if len(ts) == 1 else _binary_lists(op, *ts, scalar_ctx)
        return out.items[0].item()

    def tabulated(self, node: Unary) -> Value | None:
        """f(k * s) for s in {-1, 0, 1} as c0 + c1 * s + c2 * s * s: three cheap passes, not one exp.

        PowerSign's exp(sign(g) * sign(m)) costs as much as the rest of its
        step together; this is where its eager step gets ahead of Adam's.
        """
        split = self.facts.split(node.child)
        if split is None:
            return None
        k_node, s_node = split
        k = 1.0 if k_node is None else self.value(k_node)
        table = _table(node.op, k, node.param, self.dtype)
        if table is None:
            return None
        return _three_terms(self.ctx, self.value(s_node), *table)

    def value(self, node: Node) -> Value:
        if isinstance(node, Operand):
            return self.ctx.operand(node.name)
        if isinstance(node, Const):
            return node.value
        if isinstance(node, Unary):
            if node.op in _TABULATED and not self.facts.scalar(node):
                out = self.tabulated(node)
                if out is not None:
                    return out
            x = self.value(node.child)
            if isinstance(x, float):
                if node.op != "drop":
                    return self.on_numbers(node.op, x, param=node.param)
                x = self.broadcast(x)   # a dropped number is dropped per element
            return _unary(node.op, x, node.param, self.ctx)
        x, y = self.value(node.left), self.value(node.right)
        if isinstance(x, float) and isinstance(y, float):
            return self.on_numbers(node.op, x, y)
        if isinstance(y, float):
            return _binary_list_scalar(node.op, x, y, self.ctx)
        if isinstance(x, float):
            return _binary_scalar_list(node.op, x, y, self.ctx)
        return _binary_lists(node.op, x, y, self.ctx)

    def broadcast(self, s: float) -> Tensors:
        return Tensors([torch.full_like(p, fit(s, p.dtype)) for p in self.ctx.params], owned=True)


def operand_uses(tree: Node) -> Counter:
    return Counter(n.name for n in walk(tree) if isinstance(n, Operand))


def compute_update(tree: Node, ctx: StepContext) -> Value:
    """The rule's delta for every tensor of the bucket (w <- w - lr * delta)."""
    if not ctx.uses:
        ctx.uses = operand_uses(tree)
    return _Evaluator(ctx).value(tree)


def update_moments(buffers: dict[str, list[Tensor]], grads: Sequence[Tensor]) -> None:
    """Advance the moment buffers a rule keeps by one step (torch.optim.Adam's ops for m and v)."""
    grads = list(grads)
    if "exp_avg" in buffers:
        torch._foreach_lerp_(buffers["exp_avg"], grads, 1.0 - BETA1)
    if "exp_avg_sq" in buffers:
        torch._foreach_mul_(buffers["exp_avg_sq"], BETA2)
        torch._foreach_addcmul_(buffers["exp_avg_sq"], grads, grads, 1.0 - BETA2)
    if "exp_avg_cube" in buffers:
        square = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(buffers["exp_avg_cube"], BETA3)
        torch._foreach_addcmul_(buffers["exp_avg_cube"], square, grads, 1.0 - BETA3)


# A dtype whose largest value is below this (float16's 65504) overflows within a rule's ordinary values:
# the root's scalar factors above 1 are computed per element there, as the per-tensor step does (and in
# wider dtypes those above the square root of the range).
NARROW_RANGE = 1e10


def _narrow(dtype: torch.dtype) -> bool:
    return torch.finfo(dtype).max < NARROW_RANGE


class _Factor(NamedTuple):
    """One of the root's scalar factors (see _root_factors)."""

    op: str           # how the step size takes `number`: "mul" or "div"
    number: float     # k, or for x / s the denominator s + DIV_EPS; the dtype's value where that is inf or nan
    held: float       # what the per-tensor step multiplies each element by, in the dtype (1 / denominator for "div")
    below: Node       # the node it applies to


def _root_factors(tree: Node, evaluator: _Evaluator, dtype: torch.dtype) -> list[_Factor]:
    """The root's scalar factors, outermost first: -x, k * x, x * k and x / k for k one number per step."""
    scalar = evaluator.facts.scalar
    factors: list[_Factor] = []
    node = tree
    while True:
        if isinstance(node, Unary) and node.op == "neg":
            factors.append(_Factor("mul", -1.0, -1.0, node.child))
        elif isinstance(node, Binary) and node.op == "mul" and (scalar(node.left) or scalar(node.right)):
            k, below = ((evaluator.value(node.left), node.right) if scalar(node.left)
                        else (evaluator.value(node.right), node.left))
            held = _held(k, dtype)
            factors.append(_Factor("mul", k if math.isfinite(held) else held, held, below))
        elif isinstance(node, Binary) and node.op == "div" and scalar(node.right):
            s = evaluator.value(node.right)
            denominator = _denominator(s, dtype)
            if denominator == 0:
                break   # x / 0 gives inf or nan per element, as the tree computed as it stands does
            number = s + DIV_EPS if math.isfinite(denominator) else denominator
            factors.append(_Factor("div", number, 1.0 / denominator, node.left))
        else:
            break
        node = factors[-1].below
    return factors


def _folded(factors: list[_Factor], lr: float, dtype: torch.dtype) -> tuple[float, int]:
    """The step size with the outermost n of `factors` folded in, and n: as many as give what the per-tensor
    step gives (see _step_size)."""
    for n in range(len(factors), 0, -1):
        alpha = _step_size(factors[:n], lr, dtype)
        if alpha is not None:
            return alpha, n
    return -lr, 0


def _step_size(factors: list[_Factor], lr: float, dtype: torch.dtype) -> float | None:
    """-lr with `factors` folded in, or None where the step would then differ from the per-tensor step.

    That step multiplies each element by the factors one by one, innermost first, each product rounded to the
    dtype: an element it takes past the dtype's range becomes inf, where folded factors would leave it finite
    (g / clip(1, 1e-5) in float16, g * 1e30 * 1e30 * 1e-30 * 1e-30 in float32). No element can get there
    while every partial product of the factors, from the innermost, is at most 1 in magnitude, or once one of
    them is inf (every element is then inf or nan both ways). So in float16 a factor above 1 costs a pass
    over the tensors, where it appears; the built-in rules have none. In wider dtypes an element would
    have to come within that factor of 3e38 first: there factors fold up to the square root of the
    dtype's range, which keeps the step as fast, and its results as they were, for rules such as
    g * exp(ld) or 3 * g, and leaves only elements beyond 1e19 to round otherwise.
    """
    product, infinite = 1.0, False
    bound = 1.0 if _narrow(dtype) else math.sqrt(torch.finfo(dtype).max)
    for factor in reversed(factors):
        product *= factor.held
        infinite = infinite or math.isinf(factor.held)
        if abs(product) > bound and not infinite:
            return None
    alpha = -lr
    for factor in factors:
        alpha = alpha * factor.number if factor.op == "mul" else alpha / factor.number
    # A step size the dtype holds as inf or 0 where no factor is: inf * 0 = nan for an element the
    # per-tensor step takes to 0, and 0 * inf for one it takes to inf.
    held = _held(alpha, dtype)
    if (held == 0 or not math.isfinite(held)) and all(x != 0 and math.isfinite(x)
                                                        for x in (lr, *(factor.held for factor in factors))):
        return None
    return alpha


def _held(x: float, dtype: torch.dtype) -> float:
    """x as a 0-dim tensor of `dtype` holds it: the number the per-tensor step computes with."""
    if dtype == torch.float64:
        return x
    if dtype == torch.float32:   # struct rounds as torch does (a C cast), in a fraction of the time
        try:
            return struct.unpack("f", struct.pack("f", x))[0]
        except OverflowError:
            return math.copysign(math.inf, x)
    return torch.tensor(x, dtype=dtype).item()


def _divisor(s: float, dtype: torch.dtype) -> float:
    """What x / s divides by: s + DIV_EPS, as the dtype sums it where that is 0 (the per-tensor step then
    gives inf or nan) or where the dtype is narrow; elsewhere summed in double, as it always was, so that
    a rule's results in float32 keep their last bits."""
    denominator = _denominator(s, dtype)
    if denominator == 0 or _narrow(dtype):
        return denominator
    return s + DIV_EPS


def _denominator(s: float, dtype: torch.dtype) -> float:
    """y + DIV_EPS for y = s held in `dtype`, as the per-tensor step computes x / (y + DIV_EPS): a number that
    cancels the guard there divides by 0, though the sum in Python's double is not 0."""
    if dtype in (torch.float64, torch.float32):   # a float32 sum computed in double rounds to the float32 sum
        return _held(_held(s, dtype) + _held(DIV_EPS, dtype), dtype)
    return (torch.tensor(s, dtype=dtype) + DIV_EPS).item()


def apply_update(tree: Node, ctx: StepContext, lr: float) -> None:
    """params <- params - lr * delta, with the root's last op fused into the update.

    Scalar factors of the root fold into the step size, and a root product or
    quotient becomes one addcmul/addcdiv: one or two passes over the
    parameters saved, and for `adam` the exact ops of torch.optim.Adam. A
    factor folds only where the step then gives what the per-tensor step
    gives (see _folded); the others stay in the tree, which then gives inf or
    nan where the per-tensor step does.
    """
    if not ctx.uses:
        ctx.uses = operand_uses(tree)
    params = list(ctx.params)
    dtype = params[0].dtype
    evaluator = _Evaluator(ctx)
    scalar = ctx.facts.scalar
    factors = _root_factors(tree, evaluator, dtype)
    alpha, folded = _folded(factors, lr, dtype) if factors else (-lr, 0)
    node = factors[folded - 1].below if folded else tree
    alpha = fit(alpha, dtype)
    if ctx.rates is not None:   # stacked children: one rate per child, so no fused root
        delta = evaluator.value(node)
        if isinstance(delta, Tensors):
            torch._foreach_addcmul_(params, delta.items, list(ctx.rates), alpha)
        else:
            torch._foreach_add_(params, [rate * fit(alpha * delta, p.dtype) for p, rate in zip(params, ctx.rates)])
    elif node in (_ADAM, _M) and math.isfinite(scaled := fit(alpha / ctx.numbers["bc1"], dtype)):
        # m_hat = m / bc1 with 1 / bc1 in the step size; where that overflows, m_hat is computed as delta.
        if node == _ADAM:
            torch._foreach_addcdiv_(params, ctx.buffers["exp_avg"], ctx.adam_denominator().items, scaled)
        else:
            torch._foreach_add_(params, ctx.buffers["exp_avg"], alpha=scaled)
    elif isinstance(node, Binary) and node.op in ("mul", "div") and not (scalar(node.left) or scalar(node.right)):
        x, y = evaluator.value(node.left), evaluator.value(node.right)
        if node.op == "mul":
            torch._foreach_addcmul_(params, x.items, y.items, alpha)
        else:
            torch._foreach_addcdiv_(params, x.items, ctx.apply(y, "add", DIV_EPS).items, alpha)
    else:
        delta = evaluator.value(node)
        if isinstance(delta, float):
            torch._foreach_add_(params, fit(alpha * delta, dtype))
        else:
            torch._foreach_add_(params, delta.items, alpha=alpha)
    if ctx.scratch is not None:
        ctx.scratch.release()


__all__ = [
    "Scratch", "StepContext", "Tensors", "TreeFacts", "apply_update", "compute_update", "operand_uses", "step_numbers",
    "update_moments",
]
