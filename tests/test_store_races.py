"""Races between real worker processes (spawned, each with its own connections) on SQLite and PostgreSQL.

Nothing here depends on timing: processes start together at a barrier, and
staleness is judged against an explicit `now`. The worker processes are
spawned once per module and reused, because starting Python is the slow part.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta

import pytest
import sqlalchemy as sa

from nos.store import Evaluation, LrTrial, Rule, get_evaluation, trials_of

from helpers import store as store_helpers
from helpers.schema import schema_state_head
from helpers.store import LRS, new_run_with_batch

# Every test here races spawned worker processes against one database.
pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")
WORKERS = 4
TIMEOUT_S = 120  # a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolExecutor(WORKERS, mp_context=SPAWN) as executor:
        yield executor


@pytest.fixture(scope="module")
def manager():
    with SPAWN.Manager() as m:
        yield m


def test_concurrent_claimers_each_evaluation_goes_to_exactly_one(store, migrated_url, pool, manager):
    texts = [f"clip(m, 1e-4) * exp({x})" for x in ("g", "m", "v", "adam")] * 10  # 40 evaluations, 4 rules
    _, ids = new_run_with_batch(store, texts)
    barrier = manager.Barrier(WORKERS)
    futures = [pool.submit(store_helpers.claim_all, migrated_url, ids, f"w{i}", i, barrier) for i in range(WORKERS)]
    won = [(worker, e, attempt) for f in futures for worker, pairs in [f.result(TIMEOUT_S)] for e, attempt in pairs]
    assert sorted(e for _, e, _ in won) == sorted(ids)  # every one taken, none twice
    assert {a for _, _, a in won} == {1}
    with store.reading() as session:
        stored = {e.id: (e.worker, e.attempts, e.status) for e in session.execute(sa.select(Evaluation)).scalars()}
    assert stored == {e: (w, 1, "running") for w, e, _ in won}


def test_concurrent_get_or_create_stores_each_rule_once(store, migrated_url, pool, manager):
    shared = ["g", "adam", "rmsprop", "g * exp(sign(g) * sign(m))", "(1 + sign(g) * sign(m)) * g", "sign(m) * g"]
    barrier = manager.Barrier(WORKERS)
    futures = [pool.submit(store_helpers.insert_rules, migrated_url, shared[i:] + shared[:i] + [f"exp(m) * {i + 1}"],
                           barrier) for i in range(WORKERS)]
    results = [f.result(TIMEOUT_S) for f in futures]
    for text in shared:
        assert len({r[text] for r in results}) == 1
    with store.reading() as session:
        assert session.execute(sa.select(sa.func.count()).select_from(Rule)).scalar_one() == len(shared) + WORKERS


def test_a_killed_workers_claim_is_retaken_once_stale(store, migrated_url, pool):
    _, ids = new_run_with_batch(store)
    out = SPAWN.Queue()
    doomed = SPAWN.Process(target=store_helpers.claim_and_keep_beating, args=(migrated_url, ids[0], out))
    doomed.start()
    assert out.get(timeout=TIMEOUT_S) == 1
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(TIMEOUT_S)
    assert doomed.exitcode == -signal.SIGKILL
    with store.reading() as session:
        last_beat = get_evaluation(session, ids[0]).heartbeat_at

    early = pool.submit(store_helpers.claim_at, migrated_url, ids[0], "early", last_beat + timedelta(minutes=1))
    assert early.result(TIMEOUT_S) == (None, False)  # the dead worker's heartbeat is not stale yet
    later = last_beat + timedelta(minutes=5, seconds=1)
    assert pool.submit(store_helpers.claim_at, migrated_url, ids[0], "rescuer", later).result(TIMEOUT_S) == (2, True)
    with store.reading() as session:
        e = get_evaluation(session, ids[0])
        assert (e.status, e.worker, e.attempts, e.reward) == ("done", "rescuer", 2, 0.8)


def test_a_superseded_attempts_late_commit_is_refused_and_changes_nothing(store, migrated_url, pool, manager):
    _, ids = new_run_with_batch(store)
    with store.reading() as session:
        t0 = get_evaluation(session, ids[0]).created_at
    claimed, go = manager.Queue(), manager.Event()
    slow = pool.submit(store_helpers.claim_then_commit_late, migrated_url, ids[0], t0, claimed, go)
    assert claimed.get(timeout=TIMEOUT_S) == 1
    # Its heartbeat (as of t0) is stale ten minutes later: another worker retakes and finishes it.
    fast = pool.submit(store_helpers.claim_at, migrated_url, ids[0], "fast", t0 + timedelta(minutes=10))
    assert fast.result(TIMEOUT_S) == (2, True)
    with store.reading() as session:
        before = {c.name: getattr(get_evaluation(session, ids[0]), c.name) for c in Evaluation.__table__.columns}
    go.set()
    assert slow.result(TIMEOUT_S) == (1, False, False)
    with store.reading() as session:
        after = {c.name: getattr(get_evaluation(session, ids[0]), c.name) for c in Evaluation.__table__.columns}
        trials = trials_of(session, ids[0])
        assert session.execute(sa.select(sa.func.count()).select_from(LrTrial)).scalar_one() == len(LRS)
    assert after == before
    assert {t.train_loss for t in trials} == {3.0}  # the retaking worker's sweep (tag 2), not the late one's


def test_concurrent_upgrades_of_a_new_database_all_succeed(db_url, pool, manager):
    barrier = manager.Barrier(WORKERS)
    futures = [pool.submit(store_helpers.upgrade_together, db_url, barrier) for _ in range(WORKERS)]
    assert {f.result(TIMEOUT_S) for f in futures} == {schema_state_head()}
