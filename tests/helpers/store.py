"""Small builders shared by the storage tests (and the worker processes they spawn)."""

from __future__ import annotations

from nos.rules import parse
from nos.store import (
    EvaluationResult,
    NewEvaluation,
    RuleRecord,
    TrialRecord,
    create_run,
    enqueue_batch,
    get_or_create_rules,
)

RULES = ["g", "adam", "g * exp(sign(g) * sign(m))", "(1 + sign(g) * sign(m)) * g", "clip(m, 1e-4) * exp(v)"]
LRS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]


def new_run_with_batch(store, rules=RULES, *, task="digits", task_key="k1", name="run") -> tuple[int, list[int]]:
    """A run and one queued batch (batch 0) evaluating `rules`; returns (run id, evaluation ids)."""
    with store.transaction() as session:
        run_id = create_run(session, name, task, {"batch_size": len(rules)})
        rule_ids = get_or_create_rules(session, [RuleRecord.from_tree(parse(t)) for t in rules])
        ids = enqueue_batch(session, run_id, 0, [NewEvaluation(r, task, task_key) for r in rule_ids])
    return run_id, ids


def result(reward: float, *, tag: float = 0.0, diverged: bool = False) -> EvaluationResult:
    """A result with a full learning-rate sweep; `tag` marks whose result it is."""
    trials = [TrialRecord(lr=lr, val_acc=reward - i * 0.01, train_loss=1.0 + tag, diverged=False, wall_seconds=0.5)
              for i, lr in enumerate(LRS)]
    return EvaluationResult(reward=reward, test_acc=reward - 0.02, best_lr=1e-3, wall_seconds=3.5 + tag,
                            trials=trials, diverged=diverged)


# --- Bodies of the worker processes the race tests run (module level, so spawned processes can import them) ---

def claim_all(url, ids, worker, seed, barrier):
    """Try to claim every id, in an order of our own, all workers starting together; returns (id, attempt) won."""
    import random
    from datetime import timedelta

    from nos.store import claim, open_store

    store = open_store(url)
    order = list(ids)
    random.Random(seed).shuffle(order)
    won = []
    barrier.wait()
    for evaluation_id in order:
        with store.transaction() as session:
            attempt = claim(session, evaluation_id, worker, timedelta(minutes=5))
        if attempt is not None:
            won.append((evaluation_id, attempt))
    store.dispose()
    return worker, won


def insert_rules(url, texts, barrier):
    """get_or_create the same rules as the other processes, at the same moment; returns text -> id."""
    from nos.rules import parse
    from nos.store import RuleRecord, get_or_create_rules, open_store

    store = open_store(url)
    records = [RuleRecord.from_tree(parse(t)) for t in texts]
    barrier.wait()
    with store.transaction() as session:
        ids = get_or_create_rules(session, records)
    store.dispose()
    return dict(zip(texts, ids))


def claim_and_keep_beating(url, evaluation_id, out) -> None:
    """A worker that claims, reports its attempt on `out`, then heartbeats until it is killed."""
    import time
    from datetime import timedelta

    from nos.store import claim, heartbeat, open_store

    store = open_store(url)
    with store.transaction() as session:
        attempt = claim(session, evaluation_id, "doomed", timedelta(minutes=5))
    out.put(attempt)
    while True:
        with store.transaction() as session:
            heartbeat(session, evaluation_id, attempt)
        time.sleep(0.05)


def claim_at(url, evaluation_id, worker, now):
    """Claim as of `now` (a stale heartbeat is judged against it), then commit; returns (attempt, committed)."""
    from datetime import timedelta

    from nos.store import claim, commit_result, open_store

    store = open_store(url)
    with store.transaction() as session:
        attempt = claim(session, evaluation_id, worker, timedelta(minutes=5), now=now)
    with store.transaction() as session:
        committed = attempt is not None and commit_result(session, evaluation_id, attempt, result(0.8, tag=2))
    store.dispose()
    return attempt, committed


def claim_then_commit_late(url, evaluation_id, now, claimed, go):
    """Claim as of `now`, put the attempt on `claimed`, wait for `go` (meanwhile someone retakes it),
    then try to heartbeat and commit; returns (attempt, heartbeat accepted, commit accepted)."""
    from datetime import timedelta

    from nos.store import claim, commit_result, heartbeat, open_store

    store = open_store(url)
    with store.transaction() as session:
        attempt = claim(session, evaluation_id, "slow", timedelta(minutes=5), now=now)
    claimed.put(attempt)
    go.wait()
    with store.transaction() as session:
        beat = heartbeat(session, evaluation_id, attempt)
    with store.transaction() as session:
        committed = commit_result(session, evaluation_id, attempt, result(0.99, tag=1))
    store.dispose()
    return attempt, beat, committed


def upgrade_together(url, barrier):
    """`nos db upgrade` at the same moment as the other processes; returns the revision reached."""
    from nos.store import resolve_url, upgrade

    barrier.wait()
    return upgrade(resolve_url(url)).current
