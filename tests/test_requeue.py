"""How soon a dead worker's evaluation is retaken, and that a live worker's never is."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest

from nos.config import SearchConfig
from nos.driver import Driver
from nos.executors import LocalExecutor
from nos.rules import parse
from nos.store import (
    NewEvaluation,
    RuleRecord,
    claim,
    create_run,
    enqueue_batch,
    get_or_create_rules,
    heartbeat,
    open_store,
    requeue_stale,
    resolve_url,
    upgrade,
    utcnow,
)

from helpers.driver import TINY, run_rows

DEFAULTS = SearchConfig()


def test_by_default_a_dead_workers_evaluation_is_requeued_within_30_seconds(store):
    # A live worker has five heartbeats' slack; a dead one is requeued within the limit of its last
    # heartbeat (so of its death), plus one poll of the driver (0.2 s): well within 30 s.
    assert DEFAULTS.heartbeat_every * 5 <= DEFAULTS.stale_after <= 29
    limit = timedelta(seconds=DEFAULTS.stale_after)
    with store.transaction() as session:
        run_id = create_run(session, "r", "digits", DEFAULTS.to_dict())
        rule_id = get_or_create_rules(session, [RuleRecord.from_tree(parse("sign(g)"))])[0]
        evaluation_id = enqueue_batch(session, run_id, 0, [NewEvaluation(rule_id, "digits", "k")])[0]
    start = utcnow()
    with store.transaction() as session:
        attempt = claim(session, evaluation_id, "host:1", limit, now=start)
        last = start + timedelta(seconds=DEFAULTS.heartbeat_every)
        assert heartbeat(session, evaluation_id, attempt, now=last)
    # The worker dies right after that heartbeat. Until the limit its claim stands ...
    with store.transaction() as session:
        before = requeue_stale(session, run_id, limit, DEFAULTS.max_attempts, now=last + limit - timedelta(seconds=1))
        assert before.requeued == []
        assert claim(session, evaluation_id, "host:2", limit, now=last + limit) is None
    # ... and the driver's next poll after it (every 0.2 s) puts it back in the queue.
    with store.transaction() as session:
        after = requeue_stale(session, run_id, limit, DEFAULTS.max_attempts, now=last + limit + timedelta(seconds=0.2))
    assert after.requeued == [evaluation_id]


HOG = "while True: pass"


@pytest.mark.slow
def test_a_live_worker_on_a_busy_machine_is_never_retaken(sqlite_url):
    """Evaluations that outlive the stale limit, on cores every process fights for, are never taken over."""
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    # The defaults' ratio (a heartbeat every fifth of the limit), on a limit short enough to be outlived.
    # Evolution's first proposals are SGD and momentum: rules that train, neither diverges and ends early.
    config = SearchConfig(**{**TINY, "searcher": "evolution", "depth": 2, "budget": 2, "update_every": 2,
                             "probe": False, "stale_after": 5.0, "heartbeat_every": 1.0,
                             "task_options": {"lrs": [0.001, 0.01], "epochs": 30, "sweep_epochs": 15,
                                              "batch_size": 4}})
    with store.transaction() as session:
        run_id = create_run(session, "busy", config.task, config.to_dict())
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(2)]
    executor = LocalExecutor(sqlite_url, workers=2)
    try:
        assert Driver(store, run_id, config, executor).run() == "completed"
    finally:
        executor.close()
        for hog in hogs:
            hog.kill()
            hog.wait()
    rows = run_rows(sqlite_url, run_id)
    assert min(e.wall_seconds for e in rows) > config.stale_after   # each outlived the limit: a real test
    assert [(e.status, e.attempts) for e in rows] == [("done", 1)] * 2
    store.dispose()
