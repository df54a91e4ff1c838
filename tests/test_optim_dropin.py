"""SymbolicOptimizer where torch users step outside the plain training loop: it behaves as torch's own optimizers.

Editing `optimizer.state`, copying or pickling the optimizer, torch.distributed.checkpoint's state-dict
helpers, resuming noise, tensor learning rates, param-group checks, and the smaller refusals.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from nos.optim import UNSUPPORTED_GROUP_KEYS, SymbolicOptimizer
from nos.rules import Binary, Const, Operand, Unary, parse, rule_hash
from nos.rules.builtins import resolve_rule
from nos.rules.parser import MAX_DEPTH

NOISY = "g + eps"


def weights(n: int = 2, size: int = 4, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=gen).requires_grad_() for _ in range(n)]


def grads_for(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def run(optimizer: torch.optim.Optimizer, steps: range, edit=None, at: int = -1) -> list[torch.Tensor]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step in steps:
        if step == at:
            edit(optimizer, params)
        grads_for(params, step)
        optimizer.step()
    return [p.detach().clone() for p in params]


# -- 1: a step reads optimizer.state as it is now -------------------------------------------------------------

def _reset_momentum(opt, params):
    for p in params:
        opt.state[p]["exp_avg"] = torch.zeros_like(p)


def _restart_one(opt, params):
    opt.state[params[1]] = {}


def _offload_and_back(opt, params):
    for state in opt.state.values():
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.dim() > 0:
                state[key] = value.clone()


def _rewind_one_step_count(opt, params):
    opt.state[params[1]]["step"] = opt.state[params[1]]["step"] * 0   # Adam's is a tensor, ours an int


def _clear_one(opt, params):
    opt.state[params[1]].clear()   # its dict emptied in place, not replaced


def _step_count_as_a_tensor(opt, params):
    opt.state[params[1]]["step"] = torch.tensor(1.0)   # torch's kind of step count, in either optimizer


@pytest.mark.parametrize("edit", [_reset_momentum, _restart_one, _offload_and_back, _rewind_one_step_count,
                                  _clear_one, _step_count_as_a_tensor])
@pytest.mark.parametrize("foreach", [True, False])
def test_state_put_in_place_of_the_old_is_what_steps_and_what_is_saved(edit, foreach):
    adam = torch.optim.Adam(weights(), lr=0.1)
    ours = SymbolicOptimizer(weights(), "adam", lr=0.1, foreach=foreach)
    expected, got = run(adam, range(6), edit, at=3), run(ours, range(6), edit, at=3)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    theirs, saved = adam.state_dict()["state"], ours.state_dict()["state"]
    for i in theirs:
        torch.testing.assert_close(saved[i]["exp_avg"], theirs[i]["exp_avg"], rtol=1e-6, atol=1e-7)
        assert saved[i]["step"] == int(theirs[i]["step"])


# -- 2, 6: resume through torch.distributed.checkpoint's helpers, and the noise's edges -----------------------

def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()


@pytest.mark.parametrize("rule", ["adam", NOISY])
def test_distributed_checkpoint_helpers_save_and_restore_the_optimizer(rule):
    straight = _model()
    _train(straight, SymbolicOptimizer(straight.parameters(), rule, lr=0.1, seed=1), range(6))

    first = _model()
    opt = SymbolicOptimizer(first.parameters(), rule, lr=0.1, seed=1)
    _train(first, opt, range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # the helpers' notes on their own API
        saved = get_optimizer_state_dict(first, opt)
        assert set(saved) == {"state", "param_groups"}   # rule and noise travel in the param groups
        resumed = _model()
        resumed.load_state_dict(first.state_dict())
        opt2 = SymbolicOptimizer(resumed.parameters(), rule, lr=0.1, seed=2)
        set_optimizer_state_dict(resumed, opt2, copy.deepcopy(saved))
    _train(resumed, opt2, range(3, 6))
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_a_state_dict_of_the_earlier_format_still_loads_and_resumes():
    """Saved by nos before the rule and noise went into the param groups: "rule" and "generators" at the top."""
    straight = weights()
    run(SymbolicOptimizer(straight, NOISY, lr=0.1, seed=4), range(6))
    first = weights()
    opt = SymbolicOptimizer(first, NOISY, lr=0.1, seed=4)
    run(opt, range(3))
    new = opt.state_dict()
    old = {"state": new["state"], "rule": new["rule"], "generators": new["generators"],
           "param_groups": [{k: v for k, v in g.items() if k not in ("rule", "seed", "generators")}
                            for g in new["param_groups"]]}
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = SymbolicOptimizer(resumed, NOISY, lr=0.1, seed=5)
    opt2.load_state_dict(old)
    run(opt2, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
    assert opt2.param_groups[0].keys() == {"params", "lr", "total_steps", "foreach"}


def test_a_checkpoint_from_before_the_first_step_resumes_the_same_noise():
    straight = weights()
    run(SymbolicOptimizer(straight, NOISY, lr=0.1, seed=123), range(3))
    start = weights()
    saved = SymbolicOptimizer(start, NOISY, lr=0.1, seed=123).state_dict()
    opt = SymbolicOptimizer(start, NOISY, lr=0.1)   # another process: another seed
    opt.load_state_dict(saved)
    run(opt, range(3))
    assert all(torch.equal(a, b) for a, b in zip(start, straight))


def test_noise_saved_on_another_device_of_the_same_type_continues_there():
    """A generator state is the same on any device of a type: one saved for cuda:0 resumes on cuda:1. Here
    with the CPU, which a device string can also name with an index."""
    straight = weights()
    run(SymbolicOptimizer(straight, NOISY, lr=0.1, seed=7), range(6))
    first = weights()
    opt = SymbolicOptimizer(first, NOISY, lr=0.1, seed=7)
    run(opt, range(3))
    saved = opt.state_dict()
    saved["generators"] = {"cpu:0": saved["generators"]["cpu"]}
    opt2 = SymbolicOptimizer(first, NOISY, lr=0.1, seed=8)
    opt2.load_state_dict(saved)
    run(opt2, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(first, straight))


def test_noise_saved_on_a_gpu_loads_on_a_machine_without_one_with_a_warning():
    opt = SymbolicOptimizer(weights(), NOISY, lr=0.1, seed=0)
    run(opt, range(2))
    saved = opt.state_dict()
    saved["generators"] = {"cuda:0": torch.zeros(16, dtype=torch.uint8)}   # a CUDA generator's size
    for group in saved["param_groups"]:
        group.pop("generators", None)
    other = SymbolicOptimizer(weights(), NOISY, lr=0.1, seed=0)
    with pytest.warns(UserWarning, match="no noise state for cpu"):
        other.load_state_dict(saved)
    run(other, range(2, 4))   # the CPU's noise starts from the seed; the CUDA state waits, unused
    assert "cuda:0" in other.state_dict()["generators"]


# -- 3: copies and pickles ----------------------------------------------------------------------------------

@pytest.mark.parametrize("clone", [copy.deepcopy, lambda opt: pickle.loads(pickle.dumps(opt))],
                         ids=["deepcopy", "pickle"])
def test_a_copied_or_unpickled_optimizer_steps_on_as_the_original(clone):
    opt = SymbolicOptimizer(weights(), "drop(m, 0.3) + eps_t", lr=0.1, seed=3)
    run(opt, range(2))
    twin = clone(opt)
    assert repr(twin) == repr(opt)
    assert all(torch.equal(a, b) for a, b in zip(run(twin, range(2, 5)), run(opt, range(2, 5))))


# -- 4: temporaries kept from step to step --------------------------------------------------------------------

def _tensor_bytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def test_temporaries_stay_bounded_when_the_tensors_with_gradients_change_every_step():
    """Layer drop: each step, another half of the layers has gradients. The CPU step's kept temporaries
    (SymbolicOptimizer._scratch) grew with every new set (71 MB for 1 MB of parameters after 400 steps)."""
    params = [torch.zeros(16 + 4 * i, 16, requires_grad=True) for i in range(8)]
    opt = SymbolicOptimizer(params, "powersign", lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        drop = torch.rand(len(params), generator=gen) < 0.5
        for p, dropped in zip(params, drop.tolist()):
            p.grad = None if dropped else torch.ones_like(p)
        opt.step()
    kept = _tensor_bytes(vars(opt._scratch))
    assert kept <= 8 * _tensor_bytes(params)


# -- 5: the global generator ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["adam", NOISY])
def test_making_an_optimizer_leaves_torchs_global_generator_as_it_was(rule):
    state = torch.get_rng_state()
    first = SymbolicOptimizer(weights(), rule, lr=0.1)
    second = SymbolicOptimizer(weights(), rule, lr=0.1)
    assert torch.equal(torch.get_rng_state(), state)
    if rule == NOISY:   # each draws its own noise
        assert first.state_dict()["seed"] != second.state_dict()["seed"]


# -- 7, 13: what is refused, and how --------------------------------------------------------------------------

def test_complex_parameters_are_refused_naming_their_dtype():
    w = torch.randn(4, dtype=torch.complex64, requires_grad=True)
    opt = SymbolicOptimizer([w], "adam", lr=0.1)
    w.grad = torch.ones_like(w)
    with pytest.raises(RuntimeError, match="complex parameters.*complex64"):
        opt.step()


def test_a_gradient_that_turns_sparse_is_refused_clearly():
    emb = torch.nn.Embedding(10, 3)
    opt = SymbolicOptimizer(emb.parameters(), "adam", lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    emb.sparse, emb.weight.grad = True, None
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


# -- 8: a tensor learning rate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("foreach", [True, False])
def test_a_tensor_lr_steps_as_the_number_it_holds_and_follows_changes_in_place(foreach):
    by_number, by_tensor = weights(), weights()
    number = SymbolicOptimizer(by_number, "powersign", lr=0.01, foreach=foreach)
    lr = torch.tensor(0.01)
    tensor = SymbolicOptimizer(by_tensor, "powersign", lr=lr, foreach=foreach)
    run(number, range(2))
    run(tensor, range(2))
    number.param_groups[0]["lr"] = 0.03
    lr.fill_(0.03)   # as a scheduler changes a tensor lr
    assert all(torch.equal(a, b) for a, b in zip(run(tensor, range(2, 4)), run(number, range(2, 4))))


@pytest.mark.parametrize("lr", [torch.tensor([0.1, 0.2]), torch.tensor(-0.1), "0.1"])
def test_an_lr_that_is_not_one_non_negative_number_is_refused(lr):
    with pytest.raises(ValueError, match="learning rate"):
        SymbolicOptimizer(weights(), "g", lr=lr)
    opt = SymbolicOptimizer(weights(), "g", lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": weights(seed=1), "lr": lr})


# -- 9, 10, 11: param groups ------------------------------------------------------------------------------------

@pytest.mark.parametrize("total_steps", [None, 0, -5])
def test_a_group_without_a_usable_horizon_is_refused_before_anything_steps(total_steps):
    a = weights(1)
    opt = SymbolicOptimizer(a, "powersign-ld", lr=0.1, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        opt.add_param_group({"params": weights(1, seed=1), "total_steps": total_steps})
    with pytest.raises(ValueError, match="total_steps"):
        SymbolicOptimizer([{"params": weights(1, seed=1), "total_steps": total_steps}], "powersign-ld",
                          total_steps=10)
    assert len(opt.param_groups) == 1
    run(opt, range(1))
    assert opt.state[a[0]]["step"] == 1


def test_foreach_none_takes_the_foreach_step_as_in_torch():
    """Per-slice rates need the foreach step: foreach=None is that step, as torch's optimizers take it."""
    stacked = torch.zeros(2, 3, requires_grad=True)
    opt = SymbolicOptimizer([stacked], "g", lr=1.0, rates=torch.tensor([1.0, 2.0]), foreach=None)
    stacked.grad = torch.ones(2, 3)
    opt.step()
    assert stacked[:, 0].tolist() == [-1.0, -2.0]
    fast, auto = weights(), weights()
    run(SymbolicOptimizer(fast, "adam", lr=0.1, foreach=True), range(3))
    run(SymbolicOptimizer(auto, "adam", lr=0.1, foreach=None), range(3))
    assert all(torch.equal(a, b) for a, b in zip(fast, auto))


@pytest.mark.parametrize("key", UNSUPPORTED_GROUP_KEYS)
def test_a_group_setting_a_torch_hyperparameter_the_rule_does_not_read_is_refused(key):
    with pytest.raises(ValueError, match=f"'{key}'.*write it into the rule"):
        SymbolicOptimizer([{"params": weights(), key: 0.5}], "g", lr=0.1)
    opt = SymbolicOptimizer(weights(), "g", lr=0.1)
    with pytest.raises(ValueError, match=f"'{key}'"):
        opt.add_param_group({"params": weights(seed=1), key: 0.5})
    assert len(opt.param_groups) == 1


# -- 12: rules that are neither text nor a valid tree ---------------------------------------------------------

@pytest.mark.parametrize("rule", [None, 5, b"g", ["g"]])
def test_a_rule_that_is_neither_text_nor_a_tree_is_a_type_error(rule):
    with pytest.raises(TypeError, match="a rule is text"):
        resolve_rule(rule)
    with pytest.raises(TypeError, match="a rule is text"):
        SymbolicOptimizer(weights(), rule)


@pytest.mark.parametrize("step", [torch.tensor(2.5), -1, "3", torch.ones(2)])
def test_a_step_count_that_is_not_a_whole_number_is_refused(step):
    params = weights()
    opt = SymbolicOptimizer(params, "adam", lr=0.1)
    run(opt, range(2))
    opt.state[params[0]]["step"] = step
    with pytest.raises((TypeError, ValueError), match="'step'"):
        run(opt, range(2, 3))


def test_a_tree_built_by_hand_is_the_tree_its_text_parses_to():
    """Binary("pow", g, Const(3.0)) is the operand g^3: the same rule text, hash and state dict as parse("g^3")."""
    params = weights()
    built = SymbolicOptimizer(params, Binary("mul", Unary("sign", Operand("m")), Binary("pow", Operand("g"),
                                                                                        Const(3.0))), lr=0.1)
    assert built.rule == parse("sign(m) * g^3")
    assert built.rule_text == "sign(m) * g^3"
    assert rule_hash(built.rule) == rule_hash(parse("sign(m) * g^3"))
    run(built, range(2))
    SymbolicOptimizer(weights(), "sign(m) * g^3", lr=0.1).load_state_dict(built.state_dict())


@pytest.mark.parametrize(("tree", "where"), [
    (Binary("add", Operand("g"), "g"), "the right of a Binary('add') is str"),
    (Unary("exp", Binary("mul", Operand("g"), 3.0)), "the right of a Binary('mul') is float"),
    (Unary("neg", None), "the child of a Unary('neg') is NoneType"),
])
def test_a_tree_holding_something_other_than_a_node_is_a_type_error_saying_where(tree, where):
    with pytest.raises(TypeError, match=re.escape(where)):
        SymbolicOptimizer(weights(), tree)


def test_a_tree_built_deeper_than_a_parsed_rule_may_be_is_refused():
    tree = Operand("g")
    for _ in range(MAX_DEPTH + 1):
        tree = Unary("neg", tree)
    with pytest.raises(ValueError, match=f"more than {MAX_DEPTH} operations deep"):
        SymbolicOptimizer(weights(), tree)


@pytest.mark.parametrize(("op", "param", "message"), [
    ("drop", 1.0, "drop's probability"), ("drop", -0.1, "drop's probability"),
    ("clip", -1.0, "clip's bound"), ("clip", 0.0, "clip's bound"), ("clip", float("inf"), "clip's bound"),
])
def test_a_tree_built_by_hand_gets_the_checks_the_parser_makes(op, param, message):
    with pytest.raises(ValueError, match=message):
        Unary(op, Operand("g"), param)


# -- 14: state_dict hooks, repr ---------------------------------------------------------------------------------

def test_a_state_dict_post_hook_sees_the_rule_and_the_noise():
    opt = SymbolicOptimizer(weights(), NOISY, lr=0.1, seed=0)
    seen = []
    opt.register_state_dict_post_hook(lambda optimizer, state_dict: seen.append(set(state_dict)))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    assert seen == [{"state", "param_groups", "rule", "seed", "generators"}]


def test_repr_lists_the_groups_as_they_are_now():
    opt = SymbolicOptimizer([{"params": weights(1)}, {"params": weights(1, seed=1), "lr": 0.5}], "powersign",
                            lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    run(opt, range(1))
    scheduler.step()
    text = repr(opt)
    assert text.startswith("SymbolicOptimizer('g * exp(sign(g) * sign(m))') (")
    assert "Parameter Group 1" in text and "lr: 0.05" in text


def test_a_numpy_learning_rate_is_taken_as_torch_takes_it():
    """A LambdaLR computing with NumPy leaves np.float32 in the groups: the steps went on, but the optimizer's own
    state dict was then refused on load, where torch.optim.Adam's loads."""
    import numpy as np
    from torch.optim.lr_scheduler import LambdaLR

    stepped = []
    for optimizer in (SymbolicOptimizer(weights(), "adam", lr=0.1), torch.optim.Adam(weights(), lr=0.1)):
        schedule = LambdaLR(optimizer, lambda epoch: np.float32(0.5) ** epoch)
        params = optimizer.param_groups[0]["params"]
        for step in range(3):
            grads_for(params, step)
            optimizer.step()
            schedule.step()
            optimizer.load_state_dict(optimizer.state_dict())
        stepped.append([p.detach().clone() for p in params])
    for ours, torchs in zip(*stepped):
        torch.testing.assert_close(ours, torchs)
    SymbolicOptimizer(weights(), "adam", lr=np.float64(0.01), total_steps=np.int64(10))   # taken, as by torch


def test_a_compiled_training_step_runs_the_optimizer_step_once_outside_the_graph():
    """torch.compile of a whole training step traced the step's per-step numbers (the bias corrections, a tensor
    lr read as a float) into every graph: a new compile at every step until dynamo's recompile limit, then eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def trained(compiled: bool) -> tuple[list[torch.Tensor], list[int]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        optimizer = SymbolicOptimizer(model.parameters(), "adam", lr=torch.tensor(0.01))
        x, y = torch.randn(32, 8), torch.randn(32, 1)

        def train_step():
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            optimizer.step()

        step = torch.compile(train_step, backend="eager") if compiled else train_step
        frames = []
        for _ in range(10):
            step()
            frames.append(counters["frames"]["total"])
        return [p.detach().clone() for p in model.parameters()], frames

    torch._dynamo.reset()
    counters.clear()
    compiled, frames = trained(compiled=True)
    eager, _ = trained(compiled=False)
    assert frames[2:] == [frames[2]] * 8, frames   # nothing compiled again after the first steps
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
