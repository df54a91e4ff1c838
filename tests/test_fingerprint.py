"""Behavioural fingerprints and rejection before training: the probe, the store, the worker."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings

from nos.rules import parse
from nos.rules.builtins import BUILTINS, resolve_rule
from nos.rules.fingerprint import probe
from nos.store import (
    NewEvaluation,
    RuleRecord,
    claim,
    commit_result,
    create_run,
    enqueue_batch,
    equivalence_reason,
    find_equivalent,
    get_evaluation,
    get_or_create_rules,
    leaderboard,
    run_progress,
)
from nos.store.models import Rule
from nos.tasks import evaluate_rule, get_task

from helpers.rule_strategies import trees as rule_trees
from helpers.store import result


def fingerprint(text: str) -> str:
    return probe(parse(text)).fingerprint


@pytest.mark.parametrize("a, b", [
    ("sign(g) * sign(g) * g", "g"),
    ("exp(log(g))", "sqrt(g^2)"),                 # |g| two ways, different float64 rounding
    ("g * exp(sign(g) * sign(m))", "g * exp(sign(m) * sign(g))"),
    ("g + g", "2 * g"),
    ("sign(clip(g, 1e-5))", "sign(g)"),
])
def test_equal_behaviour_gives_equal_fingerprints(a, b):
    assert fingerprint(a) == fingerprint(b)


@pytest.mark.parametrize("a, b", [
    ("g", "2 * g"), ("clip(g, 1e-4)", "clip(g, 1e-3)"), ("m", "g"), ("adam", "rmsprop"),
    ("g * exp(sign(g) * sign(m))", "(1 + sign(g) * sign(m)) * g"), ("drop(g, 0.1)", "drop(g, 0.3)"),
    ("g * ld", "g * cd"), ("g + 1e-4*w", "g + 1e-3*w"),
])
def test_different_behaviour_gives_different_fingerprints(a, b):
    assert fingerprint(a) != fingerprint(b)


@pytest.mark.parametrize("task, a, b", [
    ("digits", "m / (sign(g) * sign(g))", "m / 1"),      # differ where a gradient is exactly zero (dead units)
    ("quadratic", "sign(1e-1*w) * sign(1e-1*w) * g", "g"),   # differ where a weight is exactly zero (its start)
    ("quadratic", "sign(1 - g^2) * g", "g"),              # differ where |g| > 1 (its first steps reach hundreds)
])
def test_rules_that_differ_only_on_inputs_a_network_meets_are_told_apart(task, a, b):
    """Each pair trains to different rewards, so neither may be answered with the other's result."""
    assert fingerprint(a) != fingerprint(b)
    chosen = get_task(task, lrs=[1e-3, 1e-1, 10.0], epochs=1, train_size=300) if task == "digits" \
        else get_task(task, lrs=[1e-3, 1e-2], epochs=1)
    assert abs(evaluate_rule(a, chosen, seed=0).reward - evaluate_rule(b, chosen, seed=0).reward) > 0.05


def test_a_rule_that_learns_only_from_large_gradients_is_kept():
    """Zero on gradients below 1 (those of a classifier), it learns on the quadratic, where they are larger."""
    rule = "g - g * sign(1 - g^2)"
    assert probe(parse(rule)).rejection is None
    task = get_task("quadratic", lrs=[1e-3, 1e-2], epochs=1)
    assert evaluate_rule(rule, task, seed=0).reward > evaluate_rule("g", task, seed=0).reward


def test_a_stored_rule_takes_the_fingerprint_it_lacked_or_the_one_it_is_given_now(store):
    """The proposer's probe is the current one; workers look equivalents up by the stored fingerprint."""
    with store.transaction() as session:
        (rule_id,) = get_or_create_rules(session, [RuleRecord.from_tree(parse("m"))])   # a --no-probe run's
        assert session.get(Rule, rule_id).fingerprint is None
        get_or_create_rules(session, [RuleRecord.from_tree(parse("m"), fingerprint("m"))])
        assert session.get(Rule, rule_id).fingerprint == fingerprint("m")
        get_or_create_rules(session, [RuleRecord.from_tree(parse("m"), "an older probe's")])
        assert session.get(Rule, rule_id).fingerprint == "an older probe's"
        get_or_create_rules(session, [RuleRecord.from_tree(parse("m"))])   # none given: the stored one stays
        assert session.get(Rule, rule_id).fingerprint == "an older probe's"


def test_every_built_in_is_kept_and_told_apart():
    verdicts = {name: probe(resolve_rule(name)) for name in BUILTINS}
    assert {name: v.rejection for name, v in verdicts.items()} == dict.fromkeys(BUILTINS)
    assert len({v.fingerprint for v in verdicts.values()}) == len({str(resolve_rule(n)) for n in BUILTINS})


@pytest.mark.parametrize("rule, reason", [
    ("g - g", "zero"),
    ("sign(g) - sign(g)", "zero"),
    ("1", "does not depend on the gradient"),
    ("1e-2*w", "does not depend on the gradient"),
    ("ld * 1e-3*w", "does not depend on the gradient"),
    ("eps", "does not depend on the gradient"),
    ("sign(g) * sign(g)", "does not depend on the gradient"),   # reads only where the gradient is zero
    ("(g - g) ^ -1", "not finite"),
    ("(-2) ^ g", "not finite"),
])
def test_rules_that_cannot_learn_are_rejected_with_a_reason(rule, reason):
    verdict = probe(parse(rule))
    assert verdict.rejection is not None
    assert reason in verdict.rejection


def test_a_rejected_rule_really_does_not_learn():
    """What rejection saves is training that ends at chance or diverged: check a few on digits."""
    task = get_task("digits", lrs=[1e-3, 1e-1, 10.0], epochs=1, train_size=300)
    chance = 0.2
    for rule in ("1e-2*w", "ld", "g - g", "(-2) ^ g"):
        assert probe(parse(rule)).rejection
        assert evaluate_rule(rule, task, seed=0).reward < chance, rule


@settings(max_examples=60, deadline=None)
@given(rule_trees(max_leaves=8))
def test_the_probe_is_deterministic_and_total(tree):
    """Any rule of the language gets a verdict (no exception), the same one every time."""
    first, second = probe(tree), probe(tree)
    assert first == second
    assert len(first.fingerprint) == 64


def test_an_equivalent_rule_is_found_under_the_same_task_key_only(store):
    with store.transaction() as session:
        run_id = create_run(session, "r", "digits", {})
        trained, twin, other = get_or_create_rules(session, [
            RuleRecord.from_tree(parse(t), fingerprint(t)) for t in ("g", "sign(g) * sign(g) * g", "m")])
        (first,) = enqueue_batch(session, run_id, 0, [NewEvaluation(trained, "digits", "k1")])
        assert find_equivalent(session, fingerprint("g"), "k1") is None   # queued: no result yet
        attempt = claim(session, first, "w", timedelta(minutes=5))
        assert commit_result(session, first, attempt, result(0.9))
        source = find_equivalent(session, fingerprint("g"), "k1")
        assert source.id == first
        assert find_equivalent(session, fingerprint("g"), "k2") is None
        assert find_equivalent(session, fingerprint("m"), "k1") is None
        reason = equivalence_reason(session, source)
        copy, rejected = enqueue_batch(session, run_id, 1, [
            NewEvaluation(twin, "digits", "k1", cached_from=source.id, reason=reason),
            NewEvaluation(other, "digits", "k1", rejected=True, reason="its update is zero on the probe")])
    with store.reading() as session:
        copy, rejected = get_evaluation(session, copy), get_evaluation(session, rejected)
        assert (copy.status, copy.reward, copy.cached_from) == ("cached", 0.9, first)
        assert copy.reason == f"behaves as g (evaluation {first}): same fingerprint"
        assert (rejected.status, rejected.reward) == ("rejected", 0.0)
        assert rejected.reason == "its update is zero on the probe"
        assert rejected.finished_at is not None
        assert rejected.worker is None
        progress = run_progress(session, run_id)
        assert progress.counts["rejected"] == 1
        assert progress.counts["cached"] == 1
        assert progress.equivalent == 1
        assert progress.cache_hit_rate == pytest.approx(1 / 3)
        assert progress.rejection_rate == pytest.approx(1 / 3)


def test_the_leaderboard_can_group_rules_that_behave_the_same(store):
    texts = ["g", "sign(g) * sign(g) * g", "m", "adam"]
    rewards = [0.8, 0.9, 0.7, 0.6]
    with store.transaction() as session:
        run_id = create_run(session, "r", "digits", {})
        rule_ids = get_or_create_rules(session, [RuleRecord.from_tree(parse(t), fingerprint(t)) for t in texts])
        ids = enqueue_batch(session, run_id, 0, [NewEvaluation(r, "digits", "k1") for r in rule_ids])
        for evaluation_id, reward in zip(ids, rewards):
            attempt = claim(session, evaluation_id, "w", timedelta(minutes=5))
            assert commit_result(session, evaluation_id, attempt, result(reward))
    with store.reading() as session:
        plain = leaderboard(session, 10)
        grouped = leaderboard(session, 10, group_equivalent=True)
        top2 = leaderboard(session, 2, group_equivalent=True)
    assert [r.rule for r in plain] == ["sign(g) * sign(g) * g", "g", "m", "adam"]
    assert [(r.place, r.rule, r.equivalent_rules) for r in grouped] == [
        (1, "sign(g) * sign(g) * g", 2), (2, "m", 1), (3, "adam", 1)]
    assert [r.rule for r in top2] == ["sign(g) * sign(g) * g", "m"]
