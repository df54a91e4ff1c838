"""Runs built directly in a store, as the reporting commands (`nos plot`, `nos report`) and frames read them."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from click.testing import CliRunner

from nos.cli.main import cli
from nos.rules import parse
from nos.store import (
    NewEvaluation,
    RuleRecord,
    claim,
    commit_result,
    create_run,
    enqueue_batch,
    fail,
    get_or_create_rules,
)

from helpers.store import RULES, result

# Strings a careless page would let run as markup.
NASTY_NAME = "<script>alert('name')</script> & co"
NASTY_ERROR = "Traceback (most recent call last):\n  File \"x.py\"\nValueError: <b>boom</b> & \"more\""
CLAIM_FOR = timedelta(minutes=5)


def invoke(*args: str):
    """`nos ARGS` in this process; exceptions propagate."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def build_run(store, name: str, searcher: str, rewards: list[float], *, extra: bool = True) -> dict:
    """A finished-looking run: batch 0 trains RULES with `rewards`; with `extra`, batch 1 holds a cache hit
    of RULES[0], a failure, and an evaluation still queued. Returns the ids by role."""
    with store.transaction() as session:
        run_id = create_run(session, name, "digits", {"searcher": searcher, "budget": 8, "batch_size": 5, "seed": 0})
        rule_ids = get_or_create_rules(session, [RuleRecord.from_tree(parse(t)) for t in RULES])
        trained = enqueue_batch(session, run_id, 0, [NewEvaluation(r, "digits", "k1") for r in rule_ids])
    for evaluation_id, reward in zip(trained, rewards):
        with store.transaction() as session:
            attempt = claim(session, evaluation_id, f"w{evaluation_id % 2}", CLAIM_FOR)
            assert commit_result(session, evaluation_id, attempt, result(reward, diverged=reward == 0.0))
    ids = dict(run_id=run_id, trained=trained, rule_ids=rule_ids)
    if extra:
        with store.transaction() as session:
            fails = get_or_create_rules(session, [RuleRecord.from_tree(parse("sqrt(exp(v) ^ (-2))"))])[0]
            batch = enqueue_batch(session, run_id, 1, [
                NewEvaluation(rule_ids[0], "digits", "k1", cached_from=trained[0]),
                NewEvaluation(fails, "digits", "k1"),
                NewEvaluation(rule_ids[1], "digits", "k1")])
        with store.transaction() as session:
            attempt = claim(session, batch[1], "w9", CLAIM_FOR)
            assert fail(session, batch[1], attempt, NASTY_ERROR)
        ids.update(cached=batch[0], failed=batch[1], queued=batch[2], failing_rule=fails)
    return ids


def two_runs(store, url) -> tuple:
    """Run 1 (ppo, nasty name) with a cache hit, a failure and a queued evaluation; run 2 (random) plain.
    Returns (store, url, run 1's ids, run 2's ids)."""
    first = build_run(store, NASTY_NAME, "ppo", [0.9, 0.95, 0.5, 0.0, 0.7])
    second = build_run(store, "random run", "random", [0.2, 0.4, 0.6, 0.1, 0.3], extra=False)
    return store, url, first, second


def pixels(path: Path):
    """The pixels of a PNG (rows, columns, channels), checked to be a picture of some size."""
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3
    assert image.shape[0] > 100
    assert image.shape[1] > 100
    return image
