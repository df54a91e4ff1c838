"""SymbolicOptimizer: a real torch.optim.Optimizer."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.optim.optimizer import register_optimizer_step_pre_hook

import nos.optim
from nos.optim import BUILTINS, SymbolicOptimizer
from nos.rules import RuleSyntaxError
from nos.rules.builtins import PAPER_EXAMPLES

from helpers.rule_strategies import trees

PAPER_RULES = list(PAPER_EXAMPLES)


def small_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10),
    )


DATA = torch.Generator().manual_seed(1)
X = torch.randn(32, 1, 8, 8, generator=DATA)
Y = torch.randint(0, 10, (32,), generator=DATA)


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(X), Y)


def train(model, opt, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    ("rule", "reference"),
    [
        ("g", lambda ps: torch.optim.SGD(ps, lr=0.05)),
        ("adam", lambda ps: torch.optim.Adam(ps, lr=0.05)),
    ],
)
@pytest.mark.parametrize("foreach", [True, False])
def test_reproduces_torch_sgd_and_adam(rule, reference, foreach):
    ours, theirs = small_convnet(), small_convnet()
    train(theirs, reference(theirs.parameters()), 100)
    train(ours, SymbolicOptimizer(ours.parameters(), rule, lr=0.05, foreach=foreach), 100)
    a, b = flat(ours), flat(theirs)
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-6


def test_state_only_for_what_the_rule_reads():
    model = small_convnet()
    n = len(list(model.parameters()))
    for rule, buffers in [("sgd", set()), ("powersign", {"exp_avg"}), ("adam", {"exp_avg", "exp_avg_sq"}),
                          ("gamma * g", {"exp_avg_cube"}), ("rmsprop", {"exp_avg_sq"})]:
        opt = SymbolicOptimizer(model.parameters(), rule, lr=0.0)
        train(model, opt, 1)
        assert len(opt.state) == n
        for state in opt.state.values():
            assert set(state) - {"step"} == buffers


@pytest.mark.parametrize("rule", ["powersign", "adam", "drop(m, 0.3) * exp(1e-3*w) + eps_t", "addsign-cd"])
@pytest.mark.parametrize("foreach", [True, False])
def test_resume_from_state_dict_follows_the_same_trajectory(rule, foreach):
    straight = small_convnet()
    opt = SymbolicOptimizer(straight.parameters(), rule, lr=0.01, total_steps=40, seed=5, foreach=foreach)
    train(straight, opt, 40)

    first = small_convnet()
    opt1 = SymbolicOptimizer(first.parameters(), rule, lr=0.01, total_steps=40, seed=5, foreach=foreach)
    train(first, opt1, 20)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)   # no pickle needed

    resumed = small_convnet()
    resumed.load_state_dict(saved["model"])
    opt2 = SymbolicOptimizer(resumed.parameters(), rule, lr=0.01, total_steps=40, seed=999, foreach=foreach)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, 20)
    assert torch.equal(flat(resumed), flat(straight))


def test_state_dict_of_another_rule_is_refused():
    model = small_convnet()
    opt = SymbolicOptimizer(model.parameters(), "powersign", lr=0.01)
    train(model, opt, 2)
    other = SymbolicOptimizer(model.parameters(), "addsign", lr=0.01)
    with pytest.raises(ValueError, match="saved for rule"):
        other.load_state_dict(opt.state_dict())


def test_a_state_dict_not_saved_by_a_symbolic_optimizer_is_refused():
    """torch.optim.Adam's state dict (no "rule") would load, and the next step fail on a missing buffer."""
    w = torch.zeros(3, requires_grad=True)
    adam = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(3)
    adam.step()
    opt = SymbolicOptimizer([w], "adam", lr=0.1)
    with pytest.raises(ValueError, match="not saved by a SymbolicOptimizer"):
        opt.load_state_dict(adam.state_dict())
    opt.step()   # refused before anything was loaded: the optimizer still steps
    assert opt.state[w]["step"] == 1


@pytest.mark.parametrize("touch", [False, True], ids=["cleared", "cleared-then-read"])
@pytest.mark.parametrize("foreach", [True, False])
def test_clearing_the_state_starts_the_optimizer_afresh(foreach, touch):
    """opt.state.clear() resets a torch optimizer: the next steps move as a new optimizer's would.

    "cleared-then-read": reading state[w] after clear() makes a new entry, so len(state) is as before.
    """
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    opt = SymbolicOptimizer([w], "adam", lr=0.1, foreach=foreach)
    for _ in range(3):
        w.grad = torch.ones(4, 3)
        opt.step()
    opt.state.clear()
    if touch:
        assert opt.state[w] == {}
    again = w.detach().clone().requires_grad_()
    fresh = SymbolicOptimizer([again], "adam", lr=0.1, foreach=foreach)
    for grad in (-torch.ones(4, 3), torch.randn(4, 3, generator=torch.Generator().manual_seed(1))):
        w.grad, again.grad = grad.clone(), grad.clone()
        opt.step()
        fresh.step()
    assert torch.equal(w, again)
    assert opt.state[w]["step"] == 2


def test_param_groups_closure_and_zero_grad():
    model = small_convnet()
    conv, rest = list(model[0].parameters()), [p for m in list(model)[1:] for p in m.parameters()]
    opt = SymbolicOptimizer([{"params": conv, "lr": 0.0}, {"params": rest}], "powersign", lr=0.05)
    conv_before = [p.detach().clone() for p in conv]
    rest_before = [p.detach().clone() for p in rest]

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(conv, conv_before))   # lr 0 group did not move
    assert any(not torch.equal(a, b) for a, b in zip(rest, rest_before))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_parameters_without_gradients_are_left_alone():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = SymbolicOptimizer([a, b], "adam", lr=0.1)
    (a * 2).sum().backward()
    opt.step()
    assert not torch.equal(a, torch.ones(3))
    assert torch.equal(b.detach(), torch.ones(3))
    assert b not in opt.state


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = SymbolicOptimizer(emb.parameters(), "powersign", lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_schedules_need_a_horizon():
    with pytest.raises(ValueError, match="total_steps"):
        SymbolicOptimizer(small_convnet().parameters(), "powersign-ld", lr=0.1)
    SymbolicOptimizer(small_convnet().parameters(), "powersign-ld", lr=0.1, total_steps=100)


def test_bad_arguments():
    with pytest.raises(RuleSyntaxError):
        SymbolicOptimizer(small_convnet().parameters(), "g * exp(", lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        SymbolicOptimizer(small_convnet().parameters(), "g", lr=-1.0)


def test_overflowing_rule_gives_non_finite_weights_not_an_error():
    model = small_convnet()
    opt = SymbolicOptimizer(model.parameters(), "exp(exp(100 * g))", lr=1.0)
    train(model, opt, 3)
    assert not torch.isfinite(flat(model)).all()
    opt = SymbolicOptimizer(small_convnet().parameters(), "exp(exp(exp(2))) * 1e30", lr=10.0)
    train(small_convnet(), opt, 1)   # a number too big for float32 is inf, not a crash


@pytest.mark.parametrize("rule", PAPER_RULES + sorted(BUILTINS))
def test_paper_rules_and_builtins_train(rule):
    best = min(
        train(model := small_convnet(),
              SymbolicOptimizer(model.parameters(), rule, lr=lr, total_steps=30, seed=0), 30)[-1]
        for lr in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    )
    assert best < loss_of(small_convnet()).item() - 0.05


@given(tree=trees(max_leaves=8, deterministic=True))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_foreach_step_equals_per_tensor_step(tree):
    """The fused foreach update (root peeling, addcmul/addcdiv, scratch reuse) against plain ops."""
    results = []
    for foreach in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
        opt = SymbolicOptimizer(params, tree, lr=0.01, total_steps=10, foreach=foreach)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 10 + i))
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in params]))
    fast, plain = results
    finite = torch.isfinite(fast) & torch.isfinite(plain)
    torch.testing.assert_close(fast[finite], plain[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("rule, compile", [
    ("powersign-ld", True), ("powersign-ld", {}), ("powersign-ld", {"mode": "reduce-overhead"})],
    ids=["combo", "inductor-defaults", "cudagraphs-mode"])
def test_compiled_step_matches_eager(rule, compile):
    eager, compiled = small_convnet(), small_convnet()
    train(eager, SymbolicOptimizer(eager.parameters(), rule, lr=0.01, total_steps=6), 6)
    opt = SymbolicOptimizer(compiled.parameters(), rule, lr=0.01, total_steps=6, compile=compile)
    train(compiled, opt, 6)
    torch.testing.assert_close(flat(compiled), flat(eager), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_adam_matches_eager_adam(layout):
    # Random unit gradients: a convnet's tiny ones make Adam's first steps hang on rounding (m / sqrt(v)).
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) for s in [(40, 30), (30,), (8, 3, 3, 3)]]
    eager, compiled = ([w.clone().requires_grad_() for w in weights] for _ in range(2))
    optimizers = [SymbolicOptimizer(ws, "adam", lr=1e-2, compile=flag)
                  for ws, flag in ((eager, False), (compiled, True))]
    for _ in range(5):
        for e, c in zip(eager, compiled):
            e.grad = c.grad = torch.randn(e.shape, generator=gen)
        for opt in optimizers:
            opt.step()
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.detach(), e.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_compiled_step_takes_a_rule_as_deep_as_the_parser_allows():
    """Dynamo traces the per-tensor step, which once evaluated the tree recursively: a rule 90 operations
    deep took dynamo past Python's recursion limit at the first step."""
    rule = "-" * 50 + "(" + "+".join(["g", "m"] * 25 + ["g"]) + ")"   # 100 operations deep
    moved = []
    for compile in (False, True):
        w = torch.ones(4, requires_grad=True)
        opt = SymbolicOptimizer([w], rule, lr=1e-3, foreach=False, compile=compile)
        for step in range(2):
            w.grad = torch.full((4,), 0.5 + step)
            opt.step()
        moved.append(w.detach())
    torch.testing.assert_close(moved[1], moved[0], rtol=1e-6, atol=1e-7)


@pytest.fixture(params=["per-tensor", "flat"])
def layout(request, monkeypatch):
    """The compiled step as it runs on a CPU (a graph over every parameter) and as on a GPU (flat tensors)."""
    if request.param == "flat":
        monkeypatch.setattr(nos.optim, "FLAT_DEVICES", ("cpu",))
    return request.param


@pytest.mark.slow
def test_a_compiled_step_reads_no_number_back(monkeypatch, layout):
    """Nothing reads a tensor's value back at a step: on a GPU that waits for the device.

    Dynamo's guards once did, on the 0-dim tensor that held lr."""
    scalar = torch.zeros((), requires_grad=True)   # a 0-dim parameter steps too
    weights = [torch.randn(4, 3, requires_grad=True), scalar]
    opt = SymbolicOptimizer(weights, "powersign-ld", lr=1e-2, total_steps=10, compile=True)
    reads = []
    item = torch.Tensor.item
    graphs = torch._dynamo.utils.counters["stats"]
    for step in range(4):
        if step == 2:   # compiled by now
            monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(self) or item(self))
            compiled = graphs["unique_graphs"]
        for w in weights:
            w.grad = torch.ones_like(w)
        opt.param_groups[0]["lr"] = 1e-2 * (step + 1)   # a new lr is not a new graph
        opt.step()
    assert reads == []
    assert graphs["unique_graphs"] == compiled > 0
    assert scalar.item() != 0.0


def test_steps_follow_gradients_that_come_and_go():
    """Each tensor counts its own steps, whichever others have gradients: as one optimizer per tensor would."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(5, generator=gen) for _ in range(3)]
    together = [w.clone().requires_grad_() for w in start]
    apart = [w.clone().requires_grad_() for w in start]
    one = SymbolicOptimizer(together, "adam", lr=0.1)
    each = [SymbolicOptimizer([w], "adam", lr=0.1) for w in apart]
    for who in ([0], [0, 1], [0, 1, 2], [1, 2], [2], [0, 1, 2]):
        for ws in (together, apart):
            for i, w in enumerate(ws):
                w.grad = (w ** 3).detach() + 1.0 if i in who else None
        one.step()
        for i in who:
            each[i].step()
    for a, b in zip(together, apart):
        assert torch.equal(a, b)
    assert [one.state[w]["step"] for w in together] == [4, 4, 4]


def test_a_tensor_put_in_a_group_in_place_of_another_steps():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = SymbolicOptimizer([a], "sgd", lr=0.5)
    a.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["params"][0] = b   # the same list, another tensor
    b.grad = torch.ones(3)
    opt.step()
    assert torch.equal(a.detach(), torch.full((3,), 0.5))
    assert torch.equal(b.detach(), torch.full((3,), 0.5))


def test_loading_a_state_dict_into_a_stepping_optimizer_takes_effect():
    model = small_convnet()
    opt = SymbolicOptimizer(model.parameters(), "adam", lr=0.01)
    train(model, opt, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = io.BytesIO()
    torch.save(opt.state_dict(), saved_opt)
    first = train(model, opt, 3)
    model.load_state_dict(saved_model)
    saved_opt.seek(0)
    opt.load_state_dict(torch.load(saved_opt, weights_only=True))
    assert train(model, opt, 3) == first


@pytest.mark.slow
def test_a_compiled_step_keeps_its_state_through_changing_gradients_and_state_dict(layout):
    """The compiled step keeps a rule's moments in one flat tensor per buffer: tensors whose gradients
    come and go, and state saved from it or loaded into it, step as the eager optimizer steps them."""
    gen = torch.Generator().manual_seed(4)
    start = [torch.randn(s, generator=gen) for s in [(6, 5), (5,), ()]]
    pattern = ([0, 1, 2], [0, 2], [1, 2], [0, 1, 2], [0], [0, 1, 2])
    grads = [[torch.randn(w.shape, generator=gen) for w in start] for _ in pattern]

    def run(compile, steps=range(len(pattern)), weights=None, state=None):
        weights = weights or [w.clone().requires_grad_() for w in start]
        opt = SymbolicOptimizer(weights, "adam", lr=1e-2, compile=compile)
        if state is not None:
            opt.load_state_dict(state)
        for step in steps:
            for i, w in enumerate(weights):
                w.grad = grads[step][i].clone() if i in pattern[step] else None
            opt.step()
        return weights, opt

    eager, _ = run(False)
    compiled, _ = run(True)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)

    half, opt = run(True, range(3))   # save from the compiled step, resume both ways
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    for compile in (False, True):
        saved.seek(0)
        weights = [w.detach().clone().requires_grad_() for w in half]
        resumed, _ = run(compile, range(3, len(pattern)), weights, torch.load(saved, weights_only=True))
        for a, b in zip(resumed, eager):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_compile_takes_true_false_or_torch_compiles_arguments():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        SymbolicOptimizer([w], "sgd", compile="yes")
    with pytest.raises(ValueError, match="per-slice rates need the foreach step"):
        SymbolicOptimizer([w], "sgd", compile={"mode": "default"}, rates=torch.ones(3))


@pytest.mark.parametrize("shaped", ["views", "full"])
@pytest.mark.parametrize("rule", ["powersign", "adam", "g * ld"])
def test_per_slice_rates_train_each_slice_as_its_own_optimizer(rule, shaped, monkeypatch):
    """A stack of K tensors with one rate each moves as K optimizers at those rates would.

    "full": the rates copied to each parameter's shape, as on a GPU (FULL_RATE_DEVICES).
    """
    if shaped == "full":
        monkeypatch.setattr(nos.optim, "FULL_RATE_DEVICES", ("cpu",))
    rates = torch.tensor([1e-3, 1e-2, 1e-1])
    start = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(2))
    stacked = start.clone().requires_grad_()
    alone = [start[k].clone().requires_grad_() for k in range(3)]
    together = SymbolicOptimizer([stacked], rule, lr=1.0, rates=rates, total_steps=10)
    apart = [SymbolicOptimizer([p], rule, lr=float(r), total_steps=10) for p, r in zip(alone, rates)]
    for _ in range(3):
        (stacked ** 3).sum().backward()
        together.step()
        for p, opt in zip(alone, apart):
            (p ** 3).sum().backward()
            opt.step()
        stacked.grad = None
        for p in alone:
            p.grad = None
    for k in range(3):
        torch.testing.assert_close(stacked[k].detach(), alone[k].detach())


@pytest.mark.parametrize("devices", [(), ("cpu",)], ids=["views", "full"])
def test_per_slice_rates_changed_or_replaced_take_effect_at_the_next_step(devices, monkeypatch):
    monkeypatch.setattr(nos.optim, "FULL_RATE_DEVICES", devices)
    stacked = torch.zeros(2, 3, requires_grad=True)
    optimizer = SymbolicOptimizer([stacked], "g", lr=1.0, rates=torch.tensor([1.0, 2.0]))
    moves = []
    for change in (None, lambda: optimizer.rates.mul_(10), lambda: setattr(optimizer, "rates", torch.ones(2))):
        if change:
            change()
        before = stacked.detach().clone()
        stacked.grad = torch.ones(2, 3)
        optimizer.step()
        moves.append((before - stacked.detach())[:, 0].tolist())
    assert moves == [[1.0, 2.0], [10.0, 20.0], [1.0, 1.0]]


def test_full_shaped_rates_step_exactly_as_views_do(monkeypatch):
    """On the CPU both shapes run the same kernels: the parameters agree to the bit."""
    ends = []
    for devices in ((), ("cpu",)):
        monkeypatch.setattr(nos.optim, "FULL_RATE_DEVICES", devices)
        gen = torch.Generator().manual_seed(6)
        params = [torch.randn(3, 8, 5, generator=gen).requires_grad_(), torch.randn(3, 5, generator=gen)]
        optimizer = SymbolicOptimizer(params, "powersign", lr=1.0, rates=torch.tensor([1e-3, 1e-2, 1e-1]))
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        ends.append([p.detach() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*ends))


def test_per_slice_rates_need_the_foreach_step():
    w = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="foreach"):
        SymbolicOptimizer([w], "g", rates=torch.ones(2), foreach=False)


def test_per_slice_rates_refuse_a_group_that_sets_foreach_false():
    """The per-tensor step has no rates: such a group would move every slice alike."""
    w, other = torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="foreach"):
        SymbolicOptimizer([{"params": [w], "foreach": False}], "g", rates=torch.ones(2))
    opt = SymbolicOptimizer([w], "g", rates=torch.ones(2))
    with pytest.raises(ValueError, match="foreach"):
        opt.add_param_group({"params": [other], "foreach": False})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [other]})


@pytest.mark.parametrize(("rule", "dtype", "lr"), [
    ("g / -1e-8", torch.float64, 1e-3),                      # folded: -lr / (s + 1e-8) = -lr / 0
    ("sign(g) * g / (1e-8 - 2e-8)", torch.float64, 1e-3),
    ("1e38 * g", torch.float32, 10.0),                       # folded: -lr * 1e38 overflows float32
    ("-(2 * (exp(exp(2) + 2) * g))", torch.float16, 10.0),   # overflows float16 at the second factor
    ("g * 1e38 / 0.5", torch.float32, 10.0),
    ("m", torch.float16, 1e4),                               # -lr / bc1 overflows float16
    ("adam", torch.float16, 1e4),
])
def test_a_step_size_folded_from_the_root_gives_what_the_per_tensor_step_gives(rule, dtype, lr):
    """The foreach step folds the root's scalar factors into the step size: where that would divide by 0 or
    overflow the dtype (0 * inf = nan for a zero gradient), it computes delta as the per-tensor step does."""
    moved = []
    for foreach in (True, False):
        w = torch.zeros(4, dtype=dtype, requires_grad=True)
        opt = SymbolicOptimizer([w], rule, lr=lr, foreach=foreach)
        w.grad = torch.tensor([0.0, 1e-3, -0.5, 1.0], dtype=dtype)
        opt.step()
        moved.append(w.detach())
    torch.testing.assert_close(*moved, equal_nan=True)


def _moved_by_both_paths(rule, dtype, lr, grad):
    """Where one step of each path takes a weight of zeros: foreach, then per-tensor."""
    moved = []
    for foreach in (True, False):
        w = torch.zeros(len(grad), dtype=dtype, requires_grad=True)
        opt = SymbolicOptimizer([w], rule, lr=lr, foreach=foreach, seed=0, total_steps=10)
        w.grad = torch.tensor(grad, dtype=dtype)
        opt.step()
        moved.append(w.detach())
    return moved


@pytest.mark.parametrize(("rule", "dtype", "lr"), [
    ("g / clip(1, 1e-5)", torch.float16, 1e-2),                # 1 / 1e-5 is past float16's range, g / 1e-5 not
    ("g * 1e5 * 0.5", torch.float16, 1e-3),                    # 1e5 is inf in float16
    ("g * 1e30 * 1e30 * 1e-30 * 1e-30", torch.float32, 1e-3),  # g * 1e60 overflows float32
    ("g / (0 - 1e-8)", torch.float32, 1e-3),                   # float32's -1e-8 + 1e-8 is 0, Python's is not
    ("(g / (0 - 1e-8)) * sign(g)", torch.float32, 1e-3),       # so too below the root
])
def test_factors_whose_products_overflow_the_dtype_are_not_folded(rule, dtype, lr):
    """The per-tensor step multiplies each element by the root's factors one by one, in the dtype: the foreach
    step folds them into the step size only where no element can overflow on the way."""
    torch.testing.assert_close(*_moved_by_both_paths(rule, dtype, lr, [0.0, 1e-3, -0.5, 1.0]), equal_nan=True)


@pytest.mark.parametrize(("rule", "dtype", "grad"), [
    ("g * 3e4", torch.float16, [0.0, 1e-3, -0.5, 4.0]),       # 4 * 3e4 is past float16's 65504
    ("g / 0.5 * 0.5", torch.float16, [0.0, 1e-3, -0.5, 4e4]),  # 4e4 / 0.5 is past it: 4e4 * 1 is not
    ("-(g * 1e30)", torch.float32, [0.0, 1e-3, -0.5, 1e10]),
])
def test_a_factor_above_1_is_not_folded_since_a_large_element_would_overflow(rule, dtype, grad):
    torch.testing.assert_close(*_moved_by_both_paths(rule, dtype, 1e-3, grad), equal_nan=True)


@pytest.mark.parametrize(("rule", "dtype", "same_as"), [
    ("clip(g, 1e5)", torch.float16, "g"),                  # a bound past the dtype's range clips nothing
    ("clip(g, 1e39)", torch.float32, "g"),
    ("clip(g, 65519)", torch.float16, "clip(g, 65504)"),   # as torch.tensor(65519, dtype=float16) holds it
    ("g^2 ^ 1e5", torch.float16, None),                    # an exponent as the dtype holds it: inf
    ("drop(1e39, 0.5) * g", torch.float32, None),          # a dropped constant that is inf in float32
    ("drop(1e5, 0.5) * g", torch.float16, None),
])
def test_a_number_past_the_dtypes_range_is_taken_as_the_dtype_holds_it(rule, dtype, same_as):
    """torch refuses such a Python number in an op ("value cannot be converted ... without overflow")."""
    grad = [0.0, 1e-3, -0.5, 2.0, 70000.0 if dtype == torch.float16 else 1e39]   # the last one is inf
    fast, plain = _moved_by_both_paths(rule, dtype, 1e-3, grad)
    torch.testing.assert_close(fast, plain, equal_nan=True)
    if same_as is not None:
        torch.testing.assert_close(fast, _moved_by_both_paths(same_as, dtype, 1e-3, grad)[1], equal_nan=True)


def test_noise_state_hands_the_noise_over():
    """An optimizer given another's noise state draws what the other would draw next."""
    w1, w2 = torch.zeros(50, requires_grad=True), torch.zeros(50, requires_grad=True)
    first = SymbolicOptimizer([w1], "g + eps", lr=0.1, seed=3)
    second = SymbolicOptimizer([w2], "g + eps", lr=0.1, seed=99)
    w1.grad = torch.ones(50)
    first.step()                       # the first draws once, then hands its generator on
    second.set_noise_state(first.noise_state())
    before = w1.detach().clone()
    w1.grad, w2.grad = torch.ones(50), torch.ones(50)
    first.step()
    second.step()
    torch.testing.assert_close(w1.detach() - before, w2.detach())
    assert SymbolicOptimizer([w1], "g", seed=3).noise_state() == {}   # a rule without noise has none


def _stepped_pairs(rules: list[str]) -> tuple[list[SymbolicOptimizer], list[SymbolicOptimizer]]:
    """Two copies of the same optimizers over the same (leaf, requires-grad) parameters and gradients."""
    copies = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(4)
        optimizers = []
        for rule in rules:
            params = [torch.randn(3, 5, 4, generator=gen).requires_grad_(), torch.randn(3, generator=gen)]
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optimizers.append(SymbolicOptimizer(params, rule, lr=1.0, total_steps=10, seed=5,
                                                rates=torch.tensor([1e-3, 1e-2, 1e-1])))
        copies.append(optimizers)
    return copies[0], copies[1]


def test_step_together_steps_each_optimizer_as_its_own_step_would():
    rules = ["powersign", "adam", "drop(g, 0.3) * exp(1e-3 * w)", "g * ld", "1"]
    one_by_one, together = _stepped_pairs(rules)   # leaves that require grad: stepping them needs no_grad
    for _ in range(3):
        for opt in one_by_one:
            opt.step()
        nos.optim.step_together(together)
    for a, b in zip(one_by_one, together):
        for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
            assert torch.equal(p, q), a.rule_text
        assert a.state_dict()["state"][0]["step"] == b.state_dict()["state"][0]["step"] == 3


def test_step_together_calls_the_step_hooks_an_optimizer_has():
    plain, hooked = _stepped_pairs(["sgd", "sgd"])[1]
    called = []
    hooked.register_step_pre_hook(lambda opt, args, kwargs: called.append("own pre"))
    hooked.register_step_post_hook(lambda opt, args, kwargs: called.append("own post"))
    nos.optim.step_together([plain, hooked])
    assert called == ["own pre", "own post"]
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: called.append(opt))
    try:
        nos.optim.step_together([plain])
    finally:
        handle.remove()
    assert called[2:] == [plain]
