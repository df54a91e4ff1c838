"""A pack: several rules' children trained as one stack give each rule the result it gets alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nos.tasks.stacked
import nos.tasks.training
from nos.rules import RuleSyntaxError
from nos.tasks import DataUnavailable, evaluate_rule, from_tensors, get_task
from nos.tasks.objectives import MeanSquaredError
from nos.tasks.packed import Member, PackedChildren, evaluate_rules
from nos.tasks.training import CUDA_CHECK_EVERY, deterministic, initial_child

from helpers.evaluations import assert_same, without_times
from helpers.services import unavailable

SMALL = dict(lrs=[1e-3, 1e-2, 1e-1, 1.0, 10.0], epochs=2, train_size=400)
# Within rounding on digits: a validation example or so (of 300), a loss to 1e-4.
DIGITS = dict(acc=0.01, loss=1e-4)
# A rule that draws noise, one that reads a schedule (its final run retrains), one that diverges at every rate.
THREE = ("drop(g, 0.1) * exp(1e-3*w)", "addsign-ld", "log(g - g)")


def _pack_and_alone(rules, task, seed=2):
    seen: list[tuple[int, str]] = []
    packed = evaluate_rules(rules, task, seed=seed, on_trial=lambda i, record, stage: seen.append((i, stage)))
    return packed, [evaluate_rule(rule, task, seed=seed) for rule in rules], seen


def test_a_pack_of_three_on_digits_equals_one_at_a_time():
    task = get_task("digits", **SMALL)
    packed, alone, seen = _pack_and_alone(THREE, task)
    for a, b in zip(packed, alone):
        assert_same(a, b, **DIGITS)
    noise, schedule, hopeless = packed
    assert noise.final.epochs == schedule.final.epochs == 2 and schedule.final.steps == 2 * task.steps_per_epoch
    assert hopeless.diverged and hopeless.final is None and hopeless.reward == 0
    assert all(t.diverged and t.steps <= 1 for t in hopeless.trials)
    # Each rule reports its own trials: a sweep trial per rate, then its final run (none where all diverged).
    rates = len(task.lrs)
    assert sorted(seen) == sorted([(0, "sweep")] * rates + [(0, "final")] + [(1, "sweep")] * rates
                                  + [(1, "final")] + [(2, "sweep")] * rates)


def test_halving_cuts_each_rules_rates_on_their_own_inside_a_pack():
    task = get_task("digits", sweep="halving", lrs=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], epochs=2,
                    train_size=400)
    packed, alone, _ = _pack_and_alone(("adam", "sgd", "1e-6 * sign(g)"), task, seed=0)
    for a, b in zip(packed, alone):
        assert_same(a, b, **DIGITS)
    adam, _, timid = packed
    assert any(t.val_acc is None for t in adam.trials)   # adam pulls ahead: halving stopped some rates
    assert all(t.val_acc is not None for t in timid.trials)   # nothing learns: every rate went on


def test_the_explosion_stop_inside_a_pack():
    """SGD past the quadratic's stability limit stops as early in a pack as alone; the healthy rate goes on."""
    options = dict(lrs=[1e-3, 0.05], epochs=1, train_size=2048)
    task = get_task("quadratic", **options)
    packed, alone, _ = _pack_and_alone(("sgd", "adam", "momentum"), task, seed=0)
    for a, b in zip(packed, alone):
        assert_same(a, b, acc=1e-6, loss=1e-5)
    patient = evaluate_rule("sgd", get_task("quadratic", explode=0, **options), seed=0)
    assert packed[0].trials[1].diverged
    assert packed[0].trials[1].steps < patient.trials[1].steps
    assert not packed[0].trials[0].diverged


@pytest.mark.slow   # stacked convolutions on the CPU, and four scorings of the 10,000 test images
def test_a_pack_of_three_on_fashion_mnist_with_batch_norm():
    """The paper's convnet (batch norm's running statistics, stacked) against one child at a time."""
    options = dict(lrs=[1e-3, 1e-2, 1e-1, 10.0], epochs=2, train_size=128, val_size=256, batch_size=32,
                   download=False)
    try:
        # Stacked, as on a GPU: on the CPU a convnet's task trains its children one at a time by default.
        task, sequential = get_task("fashion-mnist", stacked=True, **options), get_task("fashion-mnist", **options)
    except DataUnavailable as exc:
        unavailable("Fashion-MNIST (Debian package dataset-fashion-mnist)", str(exc).splitlines()[0])
    assert task.stacks and not sequential.stacks
    packed = evaluate_rules(THREE, task, seed=2)
    alone = [evaluate_rule(rule, sequential, seed=2) for rule in THREE]
    for a, b in zip(packed, alone):
        assert_same(a, b, acc=0.02, loss=2e-3)
    assert packed[2].diverged and not packed[0].diverged


def test_one_rule_is_evaluate_rule_and_a_repeat_trains_once():
    task = get_task("digits", **SMALL)
    alone = evaluate_rule("adam", task, seed=1)
    one = evaluate_rules(["adam"], task, seed=1)[0]
    assert without_times(one) == without_times(alone)
    twice = evaluate_rules(["adam", "sgd", "adam"], task, seed=1)
    assert twice[0] is twice[2]
    assert_same(twice[0], alone, **DIGITS)


def test_an_unwanted_rule_leaves_the_pack_and_the_rest_go_on():
    """A worker that lost its claim on one evaluation drops it; the others' results are untouched."""
    task = get_task("digits", **SMALL)
    kept = evaluate_rules(["adam", "sgd"], task, seed=1, wanted=lambda i: i != 1)
    assert kept[1] is None
    assert_same(kept[0], evaluate_rule("adam", task, seed=1), **DIGITS)
    assert evaluate_rules(["adam"], task, wanted=lambda i: False) == [None]


def test_a_task_whose_children_do_not_stack_evaluates_its_pack_one_rule_at_a_time():
    """stacked=False stands for a child vmap cannot stack (a GRU): each rule alone, exactly, in its own place."""
    task = get_task("digits", **SMALL, stacked=False)
    seen: list[tuple[int, str]] = []
    packed = evaluate_rules(["adam", "sgd"], task, seed=1, on_trial=lambda i, record, stage: seen.append((i, stage)))
    for result, rule in zip(packed, ["adam", "sgd"]):
        assert without_times(result) == without_times(evaluate_rule(rule, task, seed=1))
    assert seen == [(0, "sweep")] * len(task.lrs) + [(0, "final"), *[(1, "sweep")] * len(task.lrs), (1, "final")]


def test_a_bad_rule_raises_before_anything_trains():
    with pytest.raises(RuleSyntaxError):
        evaluate_rules(["adam", "g +"], get_task("digits", **SMALL))


def test_a_child_taken_out_of_a_pack_trains_on_as_its_rules_own():
    """`extract` hands a child its own rule's moments, rate and noise: it goes on as in evaluate_rule."""
    task = get_task("digits", **SMALL)
    final_steps = task.epochs * task.steps_per_epoch
    with deterministic(task.device):
        pack = PackedChildren(task, initial_child(task, 3), [
            Member(rule, tuple(task.lrs), final_steps) for rule in ("sgd", "drop(m, 0.3)")], seed=3)
        pack.advance(task.steps_per_epoch)
        alone = evaluate_rule("drop(m, 0.3)", task, seed=3)
        best = pack.first[1] + task.lrs.index(alone.best_lr)
        child = pack.extract(best)
        child.disable_explosion_stop()
        child.train(task.epochs - child.epochs)
    assert child.val_acc == pytest.approx(alone.reward, abs=1e-9)
    assert child.record().train_loss == pytest.approx(alone.final.train_loss, rel=1e-6)


def _trained(task, members, epochs, seed=3):
    pack = PackedChildren(task, initial_child(task, seed), members, seed)
    pack.advance(epochs * task.steps_per_epoch, validate=False)
    return pack


def test_two_packs_joined_between_epochs_train_on_as_each_would_alone():
    """A schedule rule's fresh final run joins the continuing children: each child's own state, rate and noise go on."""
    task = get_task("digits", **SMALL)
    steps = 2 * task.steps_per_epoch
    first = [Member("drop(m, 0.3)", (1e-2, 1e-1), steps), Member("sgd", (1e-1,), steps)]
    second = [Member("addsign-ld", (1e-1,), steps), Member("drop(g, 0.5)", (1.0, 1e-2), steps)]
    with deterministic(task.device):
        apart = [_trained(task, members, 2) for members in (first, second)]
        joined, other = _trained(task, first, 1), _trained(task, second, 1)
        joined.stop([1])   # a stopped child stays out, and its records stay
        offset = joined.join(other)
        joined.advance(task.steps_per_epoch)
        for pack in apart:
            pack.advance(0)   # score on validation
    assert offset == 3 and joined.running == [0, 2, 3, 4, 5]
    assert [joined.member_of[c] for c in range(6)] == [0, 0, 1, 2, 3, 3] and joined.lrs[3:] == [1e-1, 1.0, 1e-2]
    for child, (pack, own) in zip([0, 2, 3, 4, 5], [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2)]):
        mine, theirs = joined.record(child), apart[pack].record(own)
        assert (mine.epochs, mine.steps, mine.lr) == (theirs.epochs, theirs.steps, theirs.lr) == (2, steps, theirs.lr)
        assert mine.val_acc == pytest.approx(theirs.val_acc, abs=DIGITS["acc"])
        assert mine.train_loss == pytest.approx(theirs.train_loss, abs=DIGITS["loss"])
    assert joined.record(1).steps == task.steps_per_epoch and joined.record(1).val_acc == 0.0


def test_packs_join_only_at_the_same_point_of_the_data_order():
    task = get_task("digits", **SMALL)
    members = [Member("sgd", (1e-1,), 2 * task.steps_per_epoch)]
    with deterministic(task.device):
        ahead, behind = _trained(task, members, 1), _trained(task, members, 0)
        midway = _trained(task, members, 0)
        midway.advance(1, validate=False)
        for pack, other in ((ahead, behind), (behind, midway)):
            with pytest.raises(RuntimeError, match="between epochs"):
                pack.join(other)
    assert len(ahead.running) == len(behind.running) == 1   # a refused join changes neither


@pytest.mark.parametrize("sweep", ["full", "halving"])
def test_a_pack_that_joined_is_not_kept_through_the_final_run(monkeypatch, sweep):
    """The retrained finals' own pack, once joined (its children copied in), is freed before the final run trains."""
    import gc
    import weakref

    from nos.tasks import packed

    joined, checked = [], []
    join, finish = PackedChildren.join, packed._finish

    def join_and_watch(self, other):
        joined.append(weakref.ref(other))
        return join(self, other)

    def final_run(pack, finals, steps, report):
        gc.collect()
        assert len(joined) == 1 and joined[0]() is None
        checked.append(steps)
        return finish(pack, finals, steps, report)

    monkeypatch.setattr(PackedChildren, "join", join_and_watch)
    monkeypatch.setattr(packed, "_finish", final_run)
    task = get_task("digits", **dict(SMALL, sweep=sweep))
    adam, schedule = evaluate_rules(["adam", "addsign-ld"], task, seed=0)   # addsign-ld retrains, then joins
    assert checked == [task.steps_per_epoch] and not adam.diverged and not schedule.diverged


def test_retrained_finals_that_all_diverge_before_joining_keep_their_records():
    """A stack stops where its last child diverges, short of the continuing children's place: nothing joins."""
    # Plain SGD, but NaN at one step of the final run's horizon (ld = 1 - 1/64 at step 2 of 64), in its
    # second epoch: the catch-up to the sweep's two epochs ends there.
    nan_at_step_two = "g * (1 + 0 * log(ld - 0.984375))"
    task = get_task("digits", lrs=[1e-2, 1e-1, 1.0], sweep_epochs=2, epochs=8, train_size=128)
    packed, alone, _ = _pack_and_alone(["sgd", nan_at_step_two], task, seed=0)
    for a, b in zip(packed, alone):
        assert_same(a, b, **DIGITS)
    assert packed[1].final.diverged and packed[1].final.steps == 2 and not packed[0].final.diverged


class _Headed(nn.Module):
    """A network with a head its forward never uses: that parameter gets no gradient."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.unused = nn.Linear(16, 3)

    def forward(self, x):
        return self.body(x)


def test_a_parameter_without_a_gradient_stays_put_in_a_pack_as_alone():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    task = from_tensors(x, y, _Headed, val_size=100, test_size=100, batch_size=16, lrs=[1e-2, 1e-1, 1.0], epochs=2,
                        stacked=True)
    packed, alone, _ = _pack_and_alone(["adam", "sgd"], task, seed=0)
    for a, b in zip(packed, alone):
        assert_same(a, b, **DIGITS)



class _FrozenBody(nn.Module):
    """A frozen first layer (an embedding, a pretrained backbone) under a head that trains."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16).requires_grad_(False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_a_frozen_parameter_stays_frozen_stacked_and_in_a_pack_as_alone():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    stacked, sequential = (from_tensors(x, y, _FrozenBody, val_size=100, test_size=100, batch_size=16,
                                        lrs=[1e-2, 1e-1, 1.0], epochs=2, stacked=flag) for flag in (True, False))
    rules = ["adam", "addsign-ld"]   # the second retrains its final run, which joins the first's pack
    for in_pack, rule in zip(evaluate_rules(rules, stacked, seed=0), rules):
        alone = evaluate_rule(rule, sequential, seed=0)
        assert_same(evaluate_rule(rule, stacked, seed=0), alone, **DIGITS)
        assert_same(in_pack, alone, **DIGITS)
    with deterministic(stacked.device):
        initial = initial_child(stacked, 0)
        pack = PackedChildren(stacked, initial, [Member("adam", (1e-1, 1.0), 10), Member("sgd", (1.0,), 10)], 0)
        pack.advance(stacked.steps_per_epoch)
    for child in pack.running:
        trained = pack.model(child)
        assert all(torch.equal(a, b) for a, b in zip(trained.body.parameters(), initial.body.parameters()))
        assert not torch.equal(trained.head.weight, initial.head.weight)


def test_a_child_with_frozen_parameters_has_a_key_of_its_own_and_others_keep_theirs():
    """Results stored when stacks trained frozen parameters must not answer for the child trained right."""
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    frozen, trainable = (from_tensors(x, y, make, val_size=100, test_size=100, batch_size=16)
                         for make in (_FrozenBody, lambda: nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 3))))
    assert frozen.to_dict()["frozen"] == 2   # the body's weight and bias
    assert "frozen" not in trainable.to_dict() and "frozen" not in get_task("digits").to_dict()
    assert frozen.config_key() != trainable.config_key()


def test_a_stacks_losses_sum_past_float32s_range_as_a_lone_childs_do():
    """Each loss finite (some 5e36), an epoch's sum past 3.4e38: a float32 sum would read inf, and diverge."""
    task = get_task("digits", lrs=[1.0], sweep_epochs=1, epochs=5, train_size=1200, explode=0)
    packed, alone, _ = _pack_and_alone(["m * ld", "-1e-1*w * ld * 2.51"], task, seed=0)
    for a, b in zip(packed, alone):
        assert_same(a, b, **DIGITS)
    grown = packed[1].final
    assert not grown.diverged and grown.epochs == 5 and grown.train_loss > 1e36


class _ShiftedSquares(MeanSquaredError):
    """A loss that starts below zero: no explosion limit until a child's loss turns positive."""

    def loss(self, out, y):
        return F.mse_loss(out, y) - 1.0


def _zero_linear():
    child = nn.Linear(8, 1)
    nn.init.zeros_(child.weight)
    nn.init.zeros_(child.bias)
    return child


def test_each_stacked_child_takes_its_explosion_limit_from_its_own_losses():
    """Alone, a child without a limit takes one from its first positive loss; in a stack each child does too."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=generator)
    y = x @ torch.randn(8, 1, generator=generator) * 0.3
    task = from_tensors(x, y, _zero_linear, objective=_ShiftedSquares(), val_size=100, test_size=100, batch_size=20,
                        lrs=[1e-2, 1e-1, 1.0, 2.5], epochs=2, stacked=True, explode=3.0)
    packed, alone, _ = _pack_and_alone(["-1 * g", "sgd"], task, seed=0)
    for a, b in zip(packed, alone):
        assert_same(a, b, acc=1e-4, loss=1e-4)
    # SGD at 1.0 explodes past its own limit early (before, a stack took every child's limit from
    # its first child's loss: member 0's, another rule's, and SGD ran on for 18 steps).
    assert packed[1].trials[2].diverged and packed[1].trials[2].steps < task.steps_per_epoch


def test_on_a_gpus_check_schedule_a_stack_counts_a_diverging_childs_steps_as_alone(monkeypatch):
    """On CUDA losses are checked every CUDA_CHECK_EVERY steps, and at the end of a run; here on the CPU.

    25 steps an epoch: windows of 16 and 9. A lone child checks the short window after taking its
    steps, so a child found diverged there has taken (and counted) them all; so does the stack's.
    """
    for module in (nos.tasks.training, nos.tasks.stacked):
        monkeypatch.setattr(module, "check_every", lambda device: CUDA_CHECK_EVERY)
    task = get_task("digits", lrs=[1.0], sweep_epochs=1, epochs=4, train_size=400, explode=0)
    assert task.steps_per_epoch == 25
    packed, alone, _ = _pack_and_alone(["sgd", "-1e-1*w * 6", "-1e-1*w * 15"], task, seed=0)
    for a, b in zip(packed, alone):
        assert_same(a, b, **DIGITS)
    assert {r.final.steps % task.steps_per_epoch for r in packed[1:]} == {0}   # found at the short window's end
    assert all(r.final.diverged for r in packed[1:])
