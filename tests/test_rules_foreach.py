"""Every operand and op against its formula, on both evaluation paths."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from nos.rules import operands_read, parse
from nos.rules.elementwise import delta_one, fit, numbers_read
from nos.rules.foreach import StepContext, Tensors, _table, compute_update, step_numbers
from nos.rules.tree import is_random
from nos.rules.vocabulary import OPERANDS, SCHEDULES

from helpers.rule_strategies import trees

STEP, HORIZON = 7, 20
BC1, BC2, BC3 = 1 - 0.9 ** STEP, 1 - 0.999 ** STEP, 1 - 0.999 ** STEP


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 4), (3,), (2, 3, 3)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    grads[0][0, 0] = 0.0   # exact zeros matter for sign and the three-valued tables
    buffers = {
        "exp_avg": [torch.randn(s, generator=gen) * 0.1 for s in shapes],
        "exp_avg_sq": [torch.rand(s, generator=gen) * 0.1 for s in shapes],
        "exp_avg_cube": [torch.randn(s, generator=gen) * 0.01 for s in shapes],
    }
    buffers["exp_avg"][1][0] = 0.0
    return params, grads, buffers


def both_paths(text, inputs, generator_seed=None):
    """(foreach result, elementwise result): one list of tensors each, numbers broadcast."""
    tree = parse(text)
    params, grads, buffers = inputs
    numbers = step_numbers(STEP, HORIZON, operands_read(tree))
    gen = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    ctx = StepContext(params, grads, {k: list(v) for k, v in buffers.items()}, numbers, gen)
    fast = compute_update(tree, ctx)
    fast = [torch.tensor(fast).expand_as(p) for p in params] if isinstance(fast, float) else fast.items
    gen = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    plain = [
        delta_one(tree, p, g, {k: v[i] for k, v in buffers.items()}, numbers, gen).expand_as(p)
        for i, (p, g) in enumerate(zip(params, grads))
    ]
    return fast, plain


def expected(fn, inputs):
    params, grads, buffers = inputs
    return [fn(p, g, buffers["exp_avg"][i], buffers["exp_avg_sq"][i], buffers["exp_avg_cube"][i])
            for i, (p, g) in enumerate(zip(params, grads))]


def assert_lists_close(actual, wanted, rtol=1e-5, atol=1e-7):
    assert len(actual) == len(wanted)
    for a, w in zip(actual, wanted):
        torch.testing.assert_close(a, torch.as_tensor(w, dtype=a.dtype).expand_as(a), rtol=rtol, atol=atol,
                                   equal_nan=True)


LD = 1 - (STEP - 1) / HORIZON
CD = 0.5 * (1 + math.cos(2 * math.pi * (STEP - 1) / HORIZON))
RD = 0.5 * (1 + math.cos(math.pi * ((2 * (STEP - 1) / HORIZON) % 1)))

OPERAND_FORMULAS = {
    "g": lambda p, g, m, v, c: g,
    "g^2": lambda p, g, m, v, c: g * g,
    "g^3": lambda p, g, m, v, c: g * g * g,
    "m": lambda p, g, m, v, c: m / BC1,
    "v": lambda p, g, m, v, c: v / BC2,
    "gamma": lambda p, g, m, v, c: c / BC3,
    "sign(g)": lambda p, g, m, v, c: torch.sign(g),
    "sign(m)": lambda p, g, m, v, c: torch.sign(m),
    "1": lambda p, g, m, v, c: torch.ones_like(p),
    "2": lambda p, g, m, v, c: torch.full_like(p, 2.0),
    "1e-4*w": lambda p, g, m, v, c: 1e-4 * p,
    "1e-3*w": lambda p, g, m, v, c: 1e-3 * p,
    "1e-2*w": lambda p, g, m, v, c: 1e-2 * p,
    "1e-1*w": lambda p, g, m, v, c: 1e-1 * p,
    "adam": lambda p, g, m, v, c: (m / BC1) / (torch.sqrt(v / BC2) + 1e-8),
    "rmsprop": lambda p, g, m, v, c: g / (torch.sqrt(v / BC2) + 1e-8),
    "ld": lambda p, g, m, v, c: torch.full_like(p, LD),
    "cd": lambda p, g, m, v, c: torch.full_like(p, CD),
    "rd": lambda p, g, m, v, c: torch.full_like(p, RD),
}


@pytest.mark.parametrize("name", sorted(OPERAND_FORMULAS))
def test_operand_matches_formula(name, inputs):
    fast, plain = both_paths(name, inputs)
    want = expected(OPERAND_FORMULAS[name], inputs)
    assert_lists_close(fast, want)
    assert_lists_close(plain, want)


@pytest.mark.parametrize(("name", "std"), [("eps", 0.1), ("eps_t", 0.1 * STEP ** -0.275)])
def test_noise_operands_have_their_variance(name, std):
    big = ([torch.zeros(200_000)], [torch.ones(200_000)], {})
    for values in both_paths(name, big, generator_seed=3):
        assert abs(values[0].std().item() - std) < 0.02 * std
        assert abs(values[0].mean().item()) < 0.02 * std


UNARY_FORMULAS = {
    "-g": lambda p, g, m, v, c: -g,
    "exp(g)": lambda p, g, m, v, c: torch.exp(g),
    "log(g)": lambda p, g, m, v, c: torch.log(torch.abs(g)),
    "sqrt(g)": lambda p, g, m, v, c: torch.sqrt(torch.abs(g)),
    "sign(v - 0.05)": lambda p, g, m, v, c: torch.sign(v / BC2 - 0.05),
    "clip(g, 1e-5)": lambda p, g, m, v, c: g.clamp(-1e-5, 1e-5),
    "clip(g, 1e-4)": lambda p, g, m, v, c: g.clamp(-1e-4, 1e-4),
    "clip(g, 1e-3)": lambda p, g, m, v, c: g.clamp(-1e-3, 1e-3),
    "g + m": lambda p, g, m, v, c: g + m / BC1,
    "g - m": lambda p, g, m, v, c: g - m / BC1,
    "g * m": lambda p, g, m, v, c: g * (m / BC1),
    "g / m": lambda p, g, m, v, c: g / (m / BC1 + 1e-8),
    "g ^ m": lambda p, g, m, v, c: torch.pow(g, m / BC1),
    "v ^ g": lambda p, g, m, v, c: torch.pow(v / BC2, g),
    # numbers on either side, and numbers with numbers
    "ld * g": lambda p, g, m, v, c: LD * g,
    "2 / g": lambda p, g, m, v, c: 2 / (g + 1e-8),
    "g / 2": lambda p, g, m, v, c: g / (2 + 1e-8),
    "1 - g": lambda p, g, m, v, c: 1 - g,
    "2 ^ g": lambda p, g, m, v, c: torch.pow(2.0, g),
    "g ^ 3.5": lambda p, g, m, v, c: torch.pow(g, 3.5),
    "exp(ld) * g": lambda p, g, m, v, c: math.exp(LD) * g,
    "log(1 - 1) + g": lambda p, g, m, v, c: g - math.inf,
    "(2 - 1) ^ 0.5 * sqrt(-2) * g": lambda p, g, m, v, c: math.sqrt(2) * g,
    # the three-valued tables (exp, log, sqrt of scaled products of signs)
    "exp(sign(g) * sign(m))": lambda p, g, m, v, c: torch.exp(torch.sign(g) * torch.sign(m)),
    "exp(-(ld * sign(g)))": lambda p, g, m, v, c: torch.exp(-(LD * torch.sign(g))),
    "sqrt(sign(m) * 2)": lambda p, g, m, v, c: torch.sqrt(torch.abs(torch.sign(m) * 2)),
    "log(sign(g))": lambda p, g, m, v, c: torch.log(torch.abs(torch.sign(g))),
    "g * exp(cd * sign(g) * sign(m))": lambda p, g, m, v, c: g * torch.exp(CD * torch.sign(g) * torch.sign(m)),
}


@pytest.mark.parametrize("text", sorted(UNARY_FORMULAS))
def test_op_matches_formula(text, inputs):
    fast, plain = both_paths(text, inputs)
    want = expected(UNARY_FORMULAS[text], inputs)
    assert_lists_close(fast, want, rtol=2e-6)
    assert_lists_close(plain, want, rtol=2e-6)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drop_zeroes_a_fraction_p_and_rescales_the_rest(p):
    g = torch.randn(100_000)
    for values in both_paths(f"drop(g, {p})", ([torch.zeros_like(g)], [g], {}), generator_seed=1):
        kept = values[0] != 0
        assert abs((~kept).float().mean().item() - p) < 0.01
        torch.testing.assert_close(values[0][kept], g[kept] / (1 - p))


def test_drop_of_a_number_drops_per_element():
    (fast,), (plain,) = both_paths("drop(ld, 0.5)", ([torch.zeros(10_000)], [torch.ones(10_000)], {}), 2)
    for values in (fast, plain):
        assert values.unique().tolist() == [0.0, torch.tensor(LD / 0.5).item()]


def test_overflow_gives_non_finite_values_not_an_error(inputs):
    for values in both_paths("exp(exp(g * 100))", inputs):
        assert not all(torch.isfinite(v).all() for v in values)


def test_inputs_are_not_modified(inputs):
    params, grads, buffers = inputs
    before = [t.clone() for t in params + grads + [b for bs in buffers.values() for b in bs]]
    both_paths("exp(sign(g) * sign(m)) * -g + clip(m, 1e-3) / sqrt(v) - 1e-2*w ^ 2", inputs)
    after = params + grads + [b for bs in buffers.values() for b in bs]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@given(tree=trees(max_leaves=10, deterministic=True))
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
def test_foreach_path_equals_elementwise_path(tree, inputs):
    assert not is_random(tree)
    fast, plain = both_paths(str(tree), inputs)
    for a, b in zip(fast, plain):
        both_finite = torch.isfinite(a) & torch.isfinite(b)
        torch.testing.assert_close(a[both_finite], b[both_finite], rtol=1e-4, atol=1e-6)
        # where one is not finite the other must not be either (overflow happens on both paths)
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)) or _near_overflow(a, b)


def _near_overflow(a, b):
    # Different op orders can overflow one step apart: only at huge magnitudes.
    mismatch = torch.isfinite(a) != torch.isfinite(b)
    finite_side = torch.where(torch.isfinite(a), a, b)[mismatch]
    return bool((finite_side.abs() > 1e30).all() | torch.isnan(finite_side).any())


def test_schedule_numbers():
    for step, total, ld, cd, rd in [(1, 10, 1.0, 1.0, 1.0), (6, 10, 0.5, 0.0, 1.0), (11, 10, 0.0, 1.0, 1.0),
                                    (50, 10, 0.0, 1.0, 1.0), (3, 8, 0.75, 0.5, 0.5)]:
        n = step_numbers(step, total, frozenset(SCHEDULES))
        assert n["ld"] == pytest.approx(ld)
        assert n["cd"] == pytest.approx(cd, abs=1e-12)
        assert n["rd"] == pytest.approx(rd, abs=1e-12)
    with pytest.raises(ValueError, match="total_steps"):
        step_numbers(1, None, frozenset({"ld"}))


def test_tensors_marked_shared_are_never_written(inputs):
    params, grads, _ = inputs
    ctx = StepContext(params, grads, {}, step_numbers(1, None))
    shared = Tensors([g.clone() for g in grads], owned=False)
    out = ctx.apply(shared, "exp")
    assert all(torch.equal(a, b) for a, b in zip(shared.items, grads))
    assert out.owned
    assert out.items[0] is not shared.items[0]


@pytest.mark.parametrize("name", OPERANDS)
def test_each_operand_needs_only_the_step_numbers_it_is_said_to_read(name, inputs):
    """A compiled step passes only numbers_read's numbers: every operand computes from those alone."""
    params, grads, buffers = inputs
    every = step_numbers(STEP, HORIZON, frozenset(SCHEDULES))
    only = {k: every[k] for k in numbers_read(frozenset({name}))}
    tree = parse(name)
    bufs = {k: v[0] for k, v in buffers.items()}
    gen = torch.Generator().manual_seed(1)
    alone = delta_one(tree, params[0], grads[0], bufs, only, gen)
    torch.testing.assert_close(alone, delta_one(tree, params[0], grads[0], bufs, every, gen.manual_seed(1)))


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _cast(inputs, dtype):
    params, grads, buffers = inputs
    return ([p.to(dtype) for p in params], [g.to(dtype) for g in grads],
            {k: [t.to(dtype) for t in v] for k, v in buffers.items()})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("text", ["g * exp((2 + 2) * sign(g))", "g * exp(exp(2) * sign(g))",
                                  "g * exp(exp(2) * 2 * sign(g))", "exp(exp(2 + 1) * (sign(g) * sign(m)))"])
def test_exp_of_a_large_multiple_of_a_sign_is_as_faithful_as_the_plain_op(text, dtype, inputs):
    """exp(k * s) tabulated as f0 + c1 * s + c2 * s * s cancels at s = -1 down to the rounding of c1 and c2,
    which are near e^k / 2: e^-7.4 came out -1 in bfloat16, e^-14.8 0 in float32. Those run the plain op."""
    fast, plain = both_paths(text, _cast(inputs, dtype))
    eps = torch.finfo(dtype).eps
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=4 * eps, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_a_number_past_the_dtypes_range_fits_as_a_tensor_of_the_dtype_holds_it(dtype):
    """What torch.tensor(x, dtype=dtype) holds: the largest value up to half a step past it, then inf."""
    info = torch.finfo(dtype)
    step = info.max * info.eps / (2 - info.eps)   # from max to the next power of two
    for x in (1.0, info.max, info.max + step * 0.49, info.max + step / 2, info.max * 2, 1e300, math.inf, math.nan):
        for signed in (x, -x):
            held = torch.tensor(signed, dtype=dtype).item()
            assert fit(signed, dtype) == held or math.isnan(held) and math.isnan(fit(signed, dtype)), signed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_powersigns_table_is_kept_where_it_is_faithful(dtype, inputs):
    """exp(k * sign(g) * sign(m)) for k up to 1 (PowerSign, its sign decays) keeps its three cheap passes."""
    for k in (1.0, 0.75, 0.5, 0.1, 0.0):
        assert _table("exp", k, None, dtype) is not None
    assert _table("sqrt", 2.0, None, dtype) is not None
    fast, plain = both_paths("g * exp(sign(g) * sign(m))", _cast(inputs, dtype))
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=4 * torch.finfo(dtype).eps, atol=0)
