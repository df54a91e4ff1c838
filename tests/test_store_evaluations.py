"""An evaluation's life in the store: enqueue, claim, heartbeat, commit, fail, requeue; runs, rules, checkpoints."""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta

import pytest
import sqlalchemy as sa

from nos.rules import parse
from nos.store import (
    EvaluationResult,
    NewEvaluation,
    RuleRecord,
    batch_evaluations,
    claim,
    commit_result,
    create_run,
    enqueue_batch,
    fail,
    find_cached,
    find_rule,
    get_evaluation,
    get_or_create_rules,
    get_run,
    heartbeat,
    latest_checkpoint,
    requeue_stale,
    save_checkpoint,
    set_run_status,
    trials_of,
    unfinished_ids,
    utcnow,
)
from nos.store.evaluations import release_claims, release_the_departed

from helpers.store import LRS, RULES, new_run_with_batch, result

STALE = timedelta(minutes=5)


def row(store, evaluation_id):
    with store.reading() as session:
        return get_evaluation(session, evaluation_id)


def test_a_batch_is_queued_in_seq_order(store):
    run_id, ids = new_run_with_batch(store)
    with store.transaction() as session:
        same_rule = get_evaluation(session, ids[0]).rule_id
        more = enqueue_batch(session, run_id, 1, [NewEvaluation(same_rule, "digits", "k1")])
    with store.reading() as session:
        first = batch_evaluations(session, run_id, 0)
        second = batch_evaluations(session, run_id, 1)
    assert [e.id for e in first] == ids
    assert [e.seq for e in first] == list(range(len(RULES)))
    assert [(e.seq, e.id) for e in second] == [(len(RULES), more[0])]
    assert {e.status for e in first} == {"queued"}
    assert {e.attempts for e in first} == {0}


def test_a_full_life_claim_heartbeat_commit(store):
    _, ids = new_run_with_batch(store)
    with store.transaction() as session:
        attempt = claim(session, ids[0], "host:1", STALE)
    assert attempt == 1
    with store.transaction() as session:
        assert heartbeat(session, ids[0], attempt)
        assert commit_result(session, ids[0], attempt, result(0.91))
    e = row(store, ids[0])
    assert (e.status, e.reward, e.test_acc, e.best_lr, e.attempts, e.worker) == ("done", 0.91, 0.89, 1e-3, 1, "host:1")
    assert e.finished_at >= e.claimed_at
    with store.reading() as session:
        assert [t.lr for t in trials_of(session, ids[0])] == LRS


def test_a_claimed_evaluation_cannot_be_claimed_again_while_fresh(store):
    _, ids = new_run_with_batch(store)
    with store.transaction() as session:
        assert claim(session, ids[0], "a", STALE) == 1
    with store.transaction() as session:
        assert claim(session, ids[0], "b", STALE) is None
    assert row(store, ids[0]).worker == "a"


def test_a_stale_claim_is_retaken_and_the_old_attempt_is_refused(store):
    _, ids = new_run_with_batch(store)
    t0 = utcnow()
    with store.transaction() as session:
        assert claim(session, ids[0], "dead", STALE, now=t0) == 1
    with store.transaction() as session:  # just before the heartbeat goes stale
        assert claim(session, ids[0], "b", STALE, now=t0 + STALE) is None
    with store.transaction() as session:
        assert claim(session, ids[0], "b", STALE, now=t0 + STALE + timedelta(seconds=1)) == 2
    before = row(store, ids[0])
    with store.transaction() as session:
        assert not heartbeat(session, ids[0], 1)
        assert not commit_result(session, ids[0], 1, result(0.99))
        assert not fail(session, ids[0], 1, "boom")
    after = row(store, ids[0])
    assert (after.status, after.worker, after.reward, after.heartbeat_at) == ("running", "b", None, before.heartbeat_at)
    with store.reading() as session:
        assert trials_of(session, ids[0]) == []
    with store.transaction() as session:
        assert commit_result(session, ids[0], 2, result(0.5))
    assert row(store, ids[0]).reward == 0.5


def test_a_result_counts_once(store):
    _, ids = new_run_with_batch(store)
    with store.transaction() as session:
        attempt = claim(session, ids[0], "a", STALE)
        assert commit_result(session, ids[0], attempt, result(0.7))
    with store.transaction() as session:
        assert not commit_result(session, ids[0], attempt, result(0.8, tag=1))
        assert claim(session, ids[0], "b", timedelta(0)) is None  # finished rows are never retaken
    assert row(store, ids[0]).reward == 0.7
    with store.reading() as session:
        assert len(trials_of(session, ids[0])) == len(LRS)


def test_a_diverged_result_and_a_failure(store):
    _, ids = new_run_with_batch(store)
    with store.transaction() as session:
        a = claim(session, ids[0], "w", STALE)
        b = claim(session, ids[1], "w", STALE)
        assert commit_result(session, ids[0], a, result(0.0, diverged=True))
        assert fail(session, ids[1], b, "RuntimeError: out of memory")
    assert row(store, ids[0]).status == "diverged"
    failed = row(store, ids[1])
    assert (failed.status, failed.error, failed.reward) == ("failed", "RuntimeError: out of memory", None)


def test_the_same_learning_rate_cannot_be_stored_twice(store):
    _, ids = new_run_with_batch(store)
    doubled = result(0.5)
    doubled = EvaluationResult(**{**doubled.__dict__, "trials": [*doubled.trials, doubled.trials[0]]})
    with store.transaction() as session:
        attempt = claim(session, ids[0], "w", STALE)
    with pytest.raises(sa.exc.IntegrityError):
        with store.transaction() as session:
            commit_result(session, ids[0], attempt, doubled)
    assert row(store, ids[0]).status == "running"  # the whole commit rolled back


def test_seq_is_unique_within_a_run(store):
    run_id, ids = new_run_with_batch(store)
    e = row(store, ids[0])
    with pytest.raises(sa.exc.IntegrityError):
        with store.transaction() as session:
            session.execute(sa.insert(type(e).__table__).values(
                run_id=run_id, rule_id=e.rule_id, batch=9, seq=e.seq, task="digits", task_key="k", status="queued",
                attempts=0, created_at=utcnow()))


def test_max_attempts_stops_retaking(store):
    _, ids = new_run_with_batch(store)
    t = utcnow()
    for attempt in (1, 2):
        with store.transaction() as session:
            assert claim(session, ids[0], "w", STALE, max_attempts=2, now=t) == attempt
        t += STALE * 2
    with store.transaction() as session:
        assert claim(session, ids[0], "w", STALE, max_attempts=2, now=t) is None


def test_only_a_running_runs_evaluations_can_be_claimed(store):
    # After `nos stop` (or the run's end) the messages still in the broker must not be trained.
    run_id, ids = new_run_with_batch(store)
    other, others = new_run_with_batch(store, name="other")
    t0 = utcnow()
    with store.transaction() as session:
        assert claim(session, ids[1], "dead", STALE, now=t0) == 1   # stale later
    for status in ("stopping", "stopped", "completed", "failed"):
        with store.transaction() as session:
            set_run_status(session, run_id, status)
        with store.transaction() as session:
            assert claim(session, ids[0], "w", STALE) is None, status
            assert claim(session, ids[1], "w", STALE, now=t0 + 2 * STALE) is None, status
    queued, stale = row(store, ids[0]), row(store, ids[1])
    assert (queued.status, queued.attempts, queued.worker) == ("queued", 0, None)
    assert (stale.status, stale.attempts, stale.worker) == ("running", 1, "dead")
    with store.transaction() as session:   # the status is the evaluation's own run's, not any run's
        assert claim(session, others[0], "w", STALE) == 1
    with store.transaction() as session:   # `nos resume`: running again, its queue is taken again
        set_run_status(session, run_id, "running")
    with store.transaction() as session:
        assert claim(session, ids[0], "w", STALE) == 1
        assert claim(session, ids[1], "w", STALE, now=t0 + 2 * STALE) == 2
    with store.transaction() as session:
        set_run_status(session, other, "stopped")
    with store.transaction() as session:   # a claim already held still commits: its worker finishes it
        assert heartbeat(session, others[0], 1)
        assert commit_result(session, others[0], 1, result(0.6))
    assert row(store, others[0]).status == "done"


def test_requeue_stale_requeues_or_gives_up(store):
    run_id, ids = new_run_with_batch(store)
    t0 = utcnow()
    with store.transaction() as session:
        claim(session, ids[0], "dead", STALE, now=t0)            # attempt 1, stale later
        claim(session, ids[1], "dead", STALE, now=t0)
        claim(session, ids[1], "dead", STALE, now=t0 + 2 * STALE)  # attempt 2
        claim(session, ids[2], "alive", STALE, now=t0 + 3 * STALE)  # fresh
    with store.transaction() as session:
        sweep = requeue_stale(session, run_id, STALE, max_attempts=2, now=t0 + 3 * STALE + timedelta(seconds=1))
    assert (sweep.requeued, sweep.abandoned) == ([ids[0]], [ids[1]])
    assert (row(store, ids[0]).status, row(store, ids[0]).worker) == ("queued", None)
    assert row(store, ids[1]).status == "failed"
    assert "gave up after 2 attempts" in row(store, ids[1]).error
    assert row(store, ids[2]).status == "running"
    with store.transaction() as session:
        assert not heartbeat(session, ids[0], 1)  # the dead worker's ticket is void
        assert claim(session, ids[0], "new", STALE) == 2
        assert unfinished_ids(session, run_id) == sorted([ids[0], ids[2], *ids[3:]])


def test_claims_of_processes_gone_from_this_host_are_given_back_uncounted(store):
    """What a driver taking a run over does first: its predecessor's workers died with it."""
    exited = subprocess.Popen(["true"])
    exited.wait()
    here = socket.gethostname()
    run_id, ids = new_run_with_batch(store)
    holders = [f"{here}:{exited.pid}", f"{here}:{os.getpid()}", "elsewhere:1", f"{here}:{exited.pid}"]
    with store.transaction() as session:
        for evaluation_id, worker in zip(ids, holders):
            claim(session, evaluation_id, worker, STALE)
        commit_result(session, ids[3], 1, result(0.9))   # a finished evaluation stays as it is
    with store.transaction() as session:
        assert release_the_departed(session, run_id) == [ids[0]]
    assert [(row(store, i).status, row(store, i).attempts) for i in ids[:4]] == [
        ("queued", 0), ("running", 1), ("running", 1), ("done", 1)]
    with store.transaction() as session:
        assert release_the_departed(session, run_id) == []
        assert claim(session, ids[0], "new", STALE) == 2   # a new ticket, though the attempt was refunded
    assert (row(store, ids[0]).attempts, row(store, ids[0]).worker) == (1, "new")
    # The first holder, if it lives after all (a process of another PID namespace under the same host
    # name), holds a ticket that no longer opens anything: it cannot heartbeat, commit or fail the new claim.
    with store.transaction() as session:
        assert not heartbeat(session, ids[0], 1)
        assert not commit_result(session, ids[0], 1, result(0.1))
        assert not fail(session, ids[0], 1, "not mine to fail")
        assert commit_result(session, ids[0], 2, result(0.8))
    assert (row(store, ids[0]).status, row(store, ids[0]).reward) == ("done", 0.8)


def test_a_counted_release_past_max_attempts_fails_the_evaluation(store):
    """A rule that kills its worker every time: failed once its attempts are used, not queued for no one."""
    run_id, ids = new_run_with_batch(store)
    for attempt in range(1, 4):
        with store.transaction() as session:
            assert claim(session, ids[0], f"w{attempt}", STALE, max_attempts=3) == attempt
            released = release_claims(session, run_id, [f"w{attempt}"], max_attempts=3)
        assert released == ([ids[0]] if attempt < 3 else [])
    failed = row(store, ids[0])
    assert (failed.status, failed.attempts) == ("failed", 3)
    assert "gave up after 3 attempts: its worker died" in failed.error


def test_cached_evaluations_copy_a_scored_result(store):
    run_id, ids = new_run_with_batch(store)
    with store.transaction() as session:
        attempt = claim(session, ids[2], "w", STALE)
        commit_result(session, ids[2], attempt, result(0.93))
    with store.transaction() as session:
        rule_id = get_evaluation(session, ids[2]).rule_id
        assert find_cached(session, rule_id, "k1").id == ids[2]
        assert find_cached(session, rule_id, "other-task-config") is None
        source = find_cached(session, rule_id, "k1")
        [copy] = enqueue_batch(session, run_id, 1, [NewEvaluation(rule_id, "digits", "k1", cached_from=source.id)])
    e = row(store, copy)
    assert (e.status, e.reward, e.test_acc, e.cached_from) == ("cached", 0.93, 0.91, ids[2])
    with pytest.raises(ValueError, match="has no result"):
        with store.transaction() as session:
            enqueue_batch(session, run_id, 2, [NewEvaluation(rule_id, "digits", "k1", cached_from=ids[3])])


def test_rules_are_stored_once_by_canonical_text(store):
    trees = [parse("g*exp(sign(g)*sign(m))"), parse("g * exp(sign(g) * sign(m))"), parse("adam")]
    with store.transaction() as session:
        first = get_or_create_rules(session, [RuleRecord.from_tree(t) for t in trees])
    with store.transaction() as session:
        again = get_or_create_rules(session, [RuleRecord.from_tree(trees[2], fingerprint="f1")])
        stored = find_rule(session, "g * exp(sign(g) * sign(m))")
    assert first[0] == first[1] != first[2]
    assert again == [first[2]]
    assert (stored.depth, stored.tokens[:2], len(stored.hash)) == (2, [0, 0], 16)


def test_run_status_moves_and_finishes(store):
    with store.transaction() as session:
        run_id = create_run(session, "search", "digits", {"budget": 100})
        set_run_status(session, run_id, "stopped")
    with store.reading() as session:
        run = get_run(session, run_id)
        assert run.status == "stopped"
        assert run.finished_at is not None
    with store.transaction() as session:
        set_run_status(session, run_id, "running")  # resumed
        with pytest.raises(ValueError, match="unknown run status"):
            set_run_status(session, run_id, "paused")
        with pytest.raises(LookupError):
            set_run_status(session, run_id + 1, "failed")
    with store.reading() as session:
        run = get_run(session, run_id)
        assert run.status == "running"
        assert run.finished_at is None


def test_checkpoints_keep_json_and_bytes_and_the_latest_wins(store):
    with store.transaction() as session:
        run_id = create_run(session, "search", "digits", {})
        assert latest_checkpoint(session, run_id) is None
        save_checkpoint(session, run_id, 1, {"baseline": 0.5}, {"python": [3, [1, 2], None]})
        save_checkpoint(session, run_id, 2, {"baseline": 0.6}, {"python": [3, [4, 5], None]}, blob=b"\x00\xffweights")
    with store.reading() as session:
        latest = latest_checkpoint(session, run_id)
    assert (latest.step, latest.state, latest.rng_state, latest.blob) == (
        2, {"baseline": 0.6}, {"python": [3, [4, 5], None]}, b"\x00\xffweights")
    with pytest.raises(sa.exc.IntegrityError):
        with store.transaction() as session:
            save_checkpoint(session, run_id, 2, {}, {})


def test_only_the_latest_checkpoint_keeps_its_searcher_bytes(store):
    """A resume reads the latest blob and every checkpoint's JSON: earlier blobs (370 kB a PPO step) go."""
    from nos.store.models import Checkpoint

    with store.transaction() as session:
        run_id, other = (create_run(session, name, "digits", {}) for name in ("search", "other"))
        save_checkpoint(session, other, 1, {"n": 0}, {}, blob=b"other run")
        for step in (1, 2, 3):
            save_checkpoint(session, run_id, step, {"updates": [[step]]}, {}, blob=b"state %d" % step)
        save_checkpoint(session, run_id, 4, {"updates": []}, {})   # a checkpoint without bytes drops none
    with store.reading() as session:
        rows = session.execute(sa.select(Checkpoint.run_id, Checkpoint.step, Checkpoint.state, Checkpoint.blob)
                               .order_by(Checkpoint.run_id, Checkpoint.step)).all()
    assert [tuple(r) for r in rows] == [
        (run_id, 1, {"updates": [[1]]}, None), (run_id, 2, {"updates": [[2]]}, None),
        (run_id, 3, {"updates": [[3]]}, b"state 3"), (run_id, 4, {"updates": []}, None),
        (other, 1, {"n": 0}, b"other run")]


def test_a_claim_that_waited_for_sqlites_lock_is_stamped_when_it_got_it(sqlite_store, tmp_path):
    """A writer's BEGIN IMMEDIATE waits for another's lock (up to the busy timeout, 30 s): the claim was
    stamped with the time before the wait, so one that waited past stale_after was born stale and the
    next worker took it over at once."""
    import sqlite3
    import threading

    from nos.store import utcnow

    _, ids = new_run_with_batch(sqlite_store)
    stale_after = timedelta(seconds=1)
    locked, release = threading.Event(), threading.Event()

    def hold_the_lock():   # another process's long write: a big checkpoint, a slow disk
        other = sqlite3.connect(tmp_path / "nos.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    assert locked.wait(10)
    threading.Timer(1.5, release.set).start()
    with sqlite_store.transaction() as session:
        ticket = claim(session, ids[0], "w:1", stale_after)
    got_it = utcnow()
    holder.join()
    assert ticket == 1
    with sqlite_store.reading() as session:
        assert got_it - get_evaluation(session, ids[0]).heartbeat_at < timedelta(seconds=0.5)
    with sqlite_store.transaction() as session:
        assert claim(session, ids[0], "w:2", stale_after) is None   # still w:1's, a moment after it claimed
