"""The paper's protocol: sweep, best rate, final run; deterministic; honest about divergence."""

from __future__ import annotations

import json

import pytest
import torch

from nos.tasks import DataUnavailable, EvaluationResult, evaluate_rule, get_task

from helpers.services import unavailable

SMALL = dict(lrs=[1e-2, 1e-1, 1.0], epochs=2, train_size=400)


def _without_times(result: EvaluationResult) -> dict:
    data = result.to_dict()
    data.pop("wall_seconds")
    for trial in data["trials"] + [data["final"]]:
        if trial:
            trial.pop("wall_seconds")
    return data


@pytest.fixture(scope="module")
def digits():
    return get_task("digits", **SMALL)


@pytest.mark.parametrize("stacked", [True, False])
def test_under_halving_every_trial_is_reported_once(stacked):
    """Those that diverge in the early round too (adam at 1 and 10): `nos eval`'s progress counts them."""
    task = get_task("digits", sweep="halving", stacked=stacked, train_size=300)
    seen = []
    result = evaluate_rule("adam", task, seed=0, on_trial=lambda record, stage: seen.append((stage, record.lr)))
    assert any(t.diverged for t in result.trials)
    assert sorted(lr for stage, lr in seen if stage == "sweep") == sorted(t.lr for t in result.trials)
    assert [stage for stage, _ in seen].count("final") == 1


def test_end_to_end_on_digits(digits):
    seen = []
    result = evaluate_rule("powersign", digits, seed=0, on_trial=lambda record, stage: seen.append(stage))
    assert seen == ["sweep"] * 3 + ["final"]
    assert [t.lr for t in result.trials] == [1e-2, 1e-1, 1.0]
    best = max(result.trials, key=lambda t: t.val_acc)
    assert result.best_lr == best.lr
    assert not result.diverged
    assert result.reward == result.final.val_acc
    assert result.final.epochs == 2
    assert result.final.lr == result.best_lr
    assert 0.5 < result.reward <= 1
    assert 0.5 < result.test_acc <= 1   # it learns something
    assert result.rule == "g * exp(sign(g) * sign(m))"
    assert result.task == "digits"
    assert result.final.steps == 2 * digits.steps_per_epoch
    # Plain JSON data, for the database and Celery.
    again = EvaluationResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result


def test_same_rule_and_seed_give_the_same_result(digits):
    for rule in ("adam", "drop(m, 0.3) * exp(1e-3*w)"):   # the second draws noise from the optimizer's generator
        first, second = evaluate_rule(rule, digits, seed=3), evaluate_rule(rule, digits, seed=3)
        assert _without_times(first) == _without_times(second)
    assert evaluate_rule("adam", digits, seed=4).trials != first.trials


def test_continuing_the_best_sweep_trial_equals_a_fresh_final_run():
    sequential = get_task("digits", stacked=False, **SMALL)   # bit for bit: the same kernels both ways
    for rule in ("momentum", "drop(g, 0.1)", "powersign-ld"):   # plain, random, and a schedule (never reused)
        reused, fresh = evaluate_rule(rule, sequential, 1), evaluate_rule(rule, sequential, 1, reuse_sweep=False)
        assert _without_times(reused) == _without_times(fresh)


@pytest.mark.parametrize("name, rules", [
    ("digits", ("sgd", "adam", "powersign", "drop(g, 0.1) * exp(1e-3*w)", "addsign-ld")),
    ("fashion-mnist", ("powersign",)),   # batch norm's running statistics, stacked
])
def test_stacked_children_train_as_the_sequential_ones_do(name, rules):
    """The stacked sweep (one vmapped network for all rates) against one child at a time, within rounding."""
    options = dict(SMALL, lrs=[1e-3, 1e-2, 1e-1, 1.0, 10.0])
    if name == "fashion-mnist":
        # The files on disk or nothing: a test never downloads (a fresh machine skips; CI fails).
        options.update(train_size=256, val_size=256, batch_size=32, epochs=2, download=False)
    try:
        stacked, sequential = (get_task(name, stacked=flag, **options) for flag in (True, False))
    except DataUnavailable as exc:
        unavailable("Fashion-MNIST (Debian package dataset-fashion-mnist)", str(exc).splitlines()[0])
    assert stacked.config_key() == sequential.config_key()
    for rule in rules:
        a, b = evaluate_rule(rule, stacked, seed=2), evaluate_rule(rule, sequential, seed=2)
        assert a.best_lr == b.best_lr, rule
        for x, y in zip(a.trials + [a.final], b.trials + [b.final]):
            assert (x.lr, x.diverged, x.steps, x.epochs) == (y.lr, y.diverged, y.steps, y.epochs), rule
            assert abs(x.val_acc - y.val_acc) <= 0.02, rule
            if x.train_loss is not None:
                assert x.train_loss == pytest.approx(y.train_loss, rel=2e-3, abs=1e-4), rule
        assert abs(a.reward - b.reward) <= 0.02, rule
        assert abs(a.test_acc - b.test_acc) <= 0.02, rule


def test_evaluation_leaves_global_state_alone(digits):
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    evaluate_rule("sgd", digits, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads


def test_a_rule_that_blows_up_finishes_as_diverged():
    # exp(exp(g)) overflows to inf at the first step on the quadratic's large gradients.
    task = get_task("quadratic", lrs=[1e-3, 1e-1])
    result = evaluate_rule("exp(exp(g))", task, seed=0)
    assert result.diverged
    assert result.reward == 0
    assert result.test_acc == 0
    assert result.best_lr is None
    assert result.final is None
    for trial in result.trials:
        assert trial.diverged
        assert trial.val_acc == 0
        assert trial.train_loss is None
        assert trial.steps <= 1   # stopped at once, not after the epoch
    json.dumps(result.to_dict())


def test_exp_exp_g_on_digits_finishes_without_an_exception(digits):
    result = evaluate_rule("exp(exp(g))", digits, seed=0)
    assert 0 <= result.reward <= 1


def test_diverging_at_some_rates_only_zeroes_those_trials():
    task = get_task("quadratic", lrs=[1e-3, 10.0], epochs=1)
    result = evaluate_rule("sgd", task, seed=0)
    low, high = result.trials
    assert not low.diverged
    assert low.val_acc > 0
    assert high.diverged
    assert high.val_acc == 0
    assert high.steps < task.steps_per_epoch
    assert result.best_lr == 1e-3
    assert not result.diverged


def test_non_finite_weights_diverge_even_when_no_loss_did():
    # log(g - g) = log(0) = -inf: the first step makes every weight infinite.
    result = evaluate_rule("log(g - g)", get_task("digits", **SMALL), seed=0)
    assert result.diverged
    assert all(t.diverged for t in result.trials)
    assert result.reward == 0


def test_loss_based_tasks_score_in_the_unit_interval():
    for name in ("quadratic", "rosenbrock"):
        result = evaluate_rule("adam", get_task(name, lrs=[1e-2, 1e-1], epochs=2), seed=0)
        assert 0 < result.reward <= 1
        assert not result.diverged


def test_schedules_get_the_run_length():
    result = evaluate_rule("addsign-cd", get_task("rosenbrock", lrs=[1e-3], epochs=2), seed=0)
    assert result.final.steps == 2 * 100


def test_a_bad_rule_raises_before_training(digits):
    from nos.rules import RuleSyntaxError

    with pytest.raises(RuleSyntaxError):
        evaluate_rule("g +", digits)


def test_successive_halving_trains_less_and_keeps_the_clear_winner():
    options = dict(lrs=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], epochs=2, train_size=400)
    full, halving = get_task("digits", **options), get_task("digits", sweep="halving", **options)
    assert full.config_key() != halving.config_key()   # a different protocol: never each other's cache
    a, b = evaluate_rule("adam", full, seed=0), evaluate_rule("adam", halving, seed=0)
    assert b.best_lr == a.best_lr
    assert b.reward == pytest.approx(a.reward, abs=1e-9)
    stopped = [t for t in b.trials if t.val_acc is None]
    kept = [t for t in b.trials if t.val_acc is not None and not t.diverged]
    assert stopped
    assert len(kept) == 4   # the better 4 on validation go on to the full epoch
    for t in stopped:
        assert not t.diverged
        assert t.steps == halving.steps_per_epoch // 4
        assert t.train_loss > 0
    steps = halving.steps_per_epoch   # each stopped trial saved the last three quarters of its epoch
    assert sum(t.steps for t in b.trials) == sum(t.steps for t in a.trials) - len(stopped) * (steps - steps // 4)
    assert all(t.steps == halving.steps_per_epoch for t in kept)


def test_a_trial_whose_loss_explodes_stops_before_it_overflows():
    # SGD just past the quadratic's stability limit: the loss grows geometrically, finite for many steps.
    options = dict(lrs=[1e-3, 0.05], epochs=1, train_size=2048)
    patient = evaluate_rule("sgd", get_task("quadratic", explode=0, **options), seed=0)
    prompt = evaluate_rule("sgd", get_task("quadratic", **options), seed=0)
    assert patient.trials[1].diverged
    assert prompt.trials[1].diverged
    assert prompt.trials[1].steps < patient.trials[1].steps
    assert prompt.trials[0].val_acc == pytest.approx(patient.trials[0].val_acc, rel=1e-5)   # a healthy one goes on


def test_the_final_run_has_no_explosion_stop():
    """The stop is the sweep's shortcut past rates that will not win: the chosen rate trains to the end."""
    options = dict(lrs=[1e-2, 1e-1, 1.0], epochs=3, train_size=400)
    # SGD at 1.0 on digits stays under 1.5x its first loss for its sweep epoch, then rises above it
    # in the final run and comes back down (with the stop there too, it scored 0 instead of 0.22).
    eager = evaluate_rule("sgd", get_task("digits", explode=1.5, **options), seed=0)
    patient = evaluate_rule("sgd", get_task("digits", explode=0, **options), seed=0)
    assert eager.best_lr == patient.best_lr == 1.0
    assert not eager.diverged
    assert eager.final.steps == patient.final.steps == 3 * 25
    assert eager.reward == patient.reward > 0.15


class _ScriptedSweep:
    """A sweep group whose children's round losses and validation scores are given, for halving's choice alone."""

    def __init__(self, losses: list[float], scores: list[float], lrs: list[float] | None = None):
        self.losses, self.val, self.steps = losses, scores, 0
        self.lrs = lrs or [10.0 ** (i - 5) for i in range(len(losses))]
        self.running = list(range(len(losses)))

    def advance(self, steps, on_scored=None, validate=True):
        self.steps += steps

    def loss_seen(self, index):
        return self.losses[index] * self.steps

    def record(self, index):
        from nos.records import TrialRecord

        return TrialRecord(self.lrs[index], self.val[index], None, False, 0.0, 0, self.steps)

    def stop(self, children):
        self.running = [i for i in self.running if i not in children]


def test_halving_ranks_its_early_round_by_validation():
    from nos.tasks import protocol

    # The largest rate's cross-entropy has climbed (confident logits) while it classifies best:
    # the full sweep would pick it, so halving must not drop it for its loss.
    losses = [2.3, 2.2, 1.5, 0.9, 0.7, 0.8, 30.0]
    scores = [0.10, 0.12, 0.40, 0.60, 0.70, 0.65, 0.75]
    stopped: dict[int, float] = {}
    group = _ScriptedSweep(losses, scores)
    protocol.halve(group, 7, 400, stopped, None)
    assert sorted(stopped) == [0, 1, 2]
    assert 6 in group.running
    assert stopped[2] == pytest.approx(1.5)   # a stopped trial keeps its round's mean loss
    stopped, group = {}, _ScriptedSweep(losses, scores)
    protocol.halve(group, 7, 400, stopped, None, rank="loss")   # a loss ranking drops the winner
    assert 6 in stopped


def test_halving_keeps_every_rate_when_none_pulls_ahead():
    """A rule too timid to learn at any rate: the first round cannot rank the rates, so none is stopped."""
    options = dict(lrs=[1e-4, 1e-3, 1e-2, 1e-1], epochs=1, train_size=400)
    full = evaluate_rule("1e-6 * sign(g)", get_task("digits", **options), seed=0)
    halving = evaluate_rule("1e-6 * sign(g)", get_task("digits", sweep="halving", **options), seed=0)
    assert all(t.val_acc is not None for t in halving.trials)
    assert (halving.best_lr, halving.reward) == (full.best_lr, full.reward)


def test_halving_keeps_the_smaller_rates_of_equals_whatever_the_grids_order():
    from nos.tasks import protocol

    # The largest rate pulls ahead; the six others tie, and three of them go on: the three smallest.
    descending = [10.0 ** (1 - i) for i in range(7)]   # 10, 1, ..., 1e-5
    scores = [0.9] + [0.5] * 6
    for lrs, order in ((descending, scores), (descending[::-1], scores[::-1])):
        stopped: dict[int, float] = {}
        group = _ScriptedSweep([1.0] * 7, order, lrs)
        protocol.halve(group, 7, 400, stopped, None)
        assert sorted(lrs[i] for i in group.running) == [1e-5, 1e-4, 1e-3, 10.0]


def test_the_best_rate_is_the_smallest_of_equals_whatever_the_grids_order():
    from nos.records import TrialRecord
    from nos.tasks.training import best_index

    trials = [TrialRecord(lr, acc, 1.0, False, 0.0, 1, 10) for lr, acc in ((1e-1, 0.5), (1e-3, 0.5), (1e-2, 0.5))]
    assert best_index(trials) == 1
    assert best_index(trials, left_out={1}) == 2
    # A rule that learns nothing ties at every rate: an unsorted grid picks what the sorted one does.
    options = dict(epochs=1, train_size=400)
    unsorted = evaluate_rule("g * 0", get_task("digits", lrs=[1e-1, 1e-2], **options), seed=0)
    ordered = evaluate_rule("g * 0", get_task("digits", lrs=[1e-2, 1e-1], **options), seed=0)
    assert unsorted.trials[0].val_acc == unsorted.trials[1].val_acc
    assert unsorted.best_lr == ordered.best_lr == 1e-2
    assert unsorted.reward == ordered.reward


def test_one_divergence_test_for_a_lone_child_and_a_stack():
    """`healthy` reads a lone child's float loss and a stack's tensor of losses alike."""
    import math

    import torch

    from nos.tasks.training import explosion_limit, healthy

    limit = explosion_limit(2.0, 100.0)
    assert limit == 200.0
    assert explosion_limit(math.nan, 100.0) is None
    assert explosion_limit(0.0, 100.0) is None
    sums = [1.0, 399.0, 401.0, math.inf, math.nan]   # summed over 2 steps: the bound is 400
    lone = [healthy(s, 2, limit) for s in sums]
    assert lone == [True, True, False, False, False]
    assert healthy(torch.tensor(sums), 2, limit).tolist() == lone
    assert healthy(1e30, 1, None)
    assert not healthy(math.inf, 1, None)


def test_a_released_child_keeps_its_record_and_trains_no_more():
    """Transfer frees the networks of trials that cannot win; their records stay."""
    from nos.rules import parse
    from nos.tasks.training import SequentialChildren, initial_child

    task = get_task("digits", train_size=160, lrs=[0.01, 0.1], epochs=1)
    group = SequentialChildren(task, initial_child(task, 0), parse("adam"), list(task.lrs), task.steps_per_epoch, 0)
    group.advance(task.steps_per_epoch // 2)
    before = group.record(0)
    group.release(0)
    group.advance(task.steps_per_epoch - task.steps_per_epoch // 2)
    assert group.running == [1]
    assert group.record(0) == before
    assert group.record(1).steps == task.steps_per_epoch
    with pytest.raises(ValueError, match="released"):
        group.extract(0)


HALVING = dict(sweep="halving", lrs=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], epochs=2, train_size=400)


def test_halving_frees_the_children_it_stops_mid_epoch():
    """A stopped child's shuffled copy of the training set (553 MB on CIFAR-10), network and optimizer go at once."""
    import gc
    import weakref

    from nos.rules import parse
    from nos.tasks import protocol
    from nos.tasks.training import SequentialChildren, deterministic, initial_child

    task = get_task("digits", stacked=False, **HALVING)
    seen = {}

    def cut(group, *args):
        # The early round ends mid-epoch: every running child holds its epoch's permuted copy of the data.
        assert all(group.children[i]._data is not None for i in group.running)
        seen.update({i: weakref.ref(group.children[i]) for i in group.running})
        return protocol.halving_cut(group, *args)

    with deterministic(task.device):
        group = SequentialChildren(task, initial_child(task, 0), parse("adam"), list(task.lrs),
                                   task.epochs * task.steps_per_epoch, 0)
        stopped: dict[int, float] = {}
        protocol.halve(group, len(task.lrs), task.steps_per_epoch, stopped, None, cut=cut)
    gc.collect()
    assert stopped and seen
    for index in stopped:
        assert group.children[index] is None and seen[index]() is None
        record = protocol.trial_record(group, index, stopped)   # its record stays
        assert (record.val_acc, record.steps, record.diverged) == (None, task.steps_per_epoch // 4, False)
        assert group.record(index).val_acc is not None   # trial_record changed a copy, not the kept record
    for index in group.running:   # those that went on finished their epoch: no copy left either
        assert group.children[index]._data is None and seen[index]() is group.children[index]


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("sweep, rule", [("halving", "adam"), ("full", "adam"), ("halving", "addsign-ld")])
def test_the_final_run_holds_nothing_of_the_sweep(monkeypatch, stacked, sweep, rule):
    """Every other child (network, optimizer, data copy), or the whole stack, is gone when the final run trains.

    adam's final run continues its best sweep child; addsign-ld's (a schedule) trains afresh.
    """
    import gc
    import weakref

    from nos.tasks import protocol
    from nos.tasks.training import Child, SequentialChildren

    groups, children, checked = [], [], []
    new_group, child, train = protocol.new_group, SequentialChildren.child, Child.train

    def made_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        groups.append(weakref.ref(group))
        return group

    def made_child(self, index):
        made = child(self, index)
        children.append(weakref.ref(made))
        return made

    def final_run(self, epochs):   # only the final child trains by `train` (the sweep's by `advance`)
        gc.collect()
        assert [ref() for ref in groups] == [None]
        assert all(ref() is None or ref() is self for ref in children)
        checked.append(self)
        return train(self, epochs)

    monkeypatch.setattr(protocol, "new_group", made_group)
    monkeypatch.setattr(SequentialChildren, "child", made_child)
    monkeypatch.setattr(Child, "train", final_run)
    result = evaluate_rule(rule, get_task("digits", **dict(HALVING, sweep=sweep, stacked=stacked)), seed=0)
    assert len(checked) == 1 and not result.diverged
    assert bool(children) != stacked
    if sweep == "halving":
        assert any(t.val_acc is None for t in result.trials)   # halving stopped some
