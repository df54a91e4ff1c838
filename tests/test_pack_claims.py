"""A worker with a pack claims up to K queued evaluations of one task key and trains them together."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from nos.config import SearchConfig
from nos.rules import parse
from nos.store import open_store, resolve_url, upgrade
from nos.store.evaluations import NewEvaluation, enqueue_batch, requeue_stale
from nos.store.models import Evaluation
from nos.store.rules import RuleRecord, get_or_create_rules
from nos.store.runs import create_run, set_run_status
from nos.tasks import evaluate_rule
from nos.work import Outcome, run_pack, task_for, task_key

from helpers.driver import TINY, run_rows

RULES = ("g", "sign(g)", "g * exp(sign(g) * sign(m))", "m")


def _queue(store, config: SearchConfig, rules=RULES, key: str | None = None) -> tuple[int, list[int]]:
    key = key or task_key(task_for(config, "cpu"), config.children_seed)
    with store.transaction() as session:
        run_id = create_run(session, "pack", config.task, config.to_dict())
        rule_ids = get_or_create_rules(session, [RuleRecord.from_tree(parse(r)) for r in rules])
        ids = enqueue_batch(session, run_id, 0, [NewEvaluation(r, config.task, key) for r in rule_ids])
    return run_id, ids


def test_a_pack_claims_its_companions_and_commits_each_result(sqlite_url):
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "probe": False})
    run_id, ids = _queue(store, config)
    outcomes = run_pack(store, ids[0], worker="host:1", pack=3)
    assert set(outcomes) == set(ids[:3])   # K = 3: the named one and the next two queued
    assert all(o in (Outcome.DONE, Outcome.DIVERGED) for o in outcomes.values())
    rows = run_rows(sqlite_url, run_id)
    assert all(r.status in ("done", "diverged") for r in rows[:3]) and rows[3].status == "queued"
    assert {r.worker for r in rows[:3]} == {"host:1"}
    assert len({r.claimed_at for r in rows[:3]}) == 1   # claimed together, in one transaction
    task = task_for(config, "cpu")
    for row, rule in zip(rows[:3], RULES):
        alone = evaluate_rule(rule, task, seed=config.children_seed)
        assert row.reward == pytest.approx(alone.reward, abs=1e-6)
    # The companions' own messages, when they come, find nothing to do.
    assert run_pack(store, ids[1], pack=3) == {ids[1]: Outcome.SKIPPED}
    store.dispose()


def test_a_worker_without_a_pack_takes_the_runs(sqlite_url):
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    run_id, ids = _queue(store, SearchConfig(**{**TINY, "probe": False, "pack": 2}))
    assert set(run_pack(store, ids[0], pack=None)) == set(ids[:2])
    _, unset = _queue(store, SearchConfig(**{**TINY, "probe": False}))   # no pack: the cpu's default, 1
    assert set(run_pack(store, unset[0], pack=None)) == {unset[0]}
    store.dispose()


def test_a_gpu_run_gets_one_local_worker_by_default():
    assert SearchConfig(**{**TINY, "workers": None}).workers >= 1   # one per core
    assert SearchConfig(**{**TINY, "workers": None, "device": "cuda"}).workers == 1
    assert SearchConfig(**{**TINY, "workers": None, "device": "cuda"}).to_dict()["workers"] == 1   # stored resolved
    assert SearchConfig(**{**TINY, "device": "cuda:1"}).workers == 2   # as given


def test_the_default_pack_is_the_devices():
    assert SearchConfig(**TINY).pack_size == 1
    assert SearchConfig(**{**TINY, "device": "cuda"}).pack_size == 32   # the best K measured on a GPU
    assert SearchConfig(**{**TINY, "device": "cuda:1", "pack": 4}).pack_size == 4
    assert SearchConfig(**{**TINY, "device": "cuda", "workers": 1}).target_in_flight == 64   # one training, one queued
    with pytest.raises(ValueError, match="pack must be a whole number"):
        SearchConfig(**{**TINY, "pack": 0})


def test_a_pack_takes_only_evaluations_of_the_same_run_and_task_key(sqlite_url):
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "probe": False})
    run_id, ids = _queue(store, config, RULES[:1])
    _queue(store, config, RULES[1:2], key="another-key")
    _queue(store, config, RULES[2:3])
    assert set(run_pack(store, ids[0], pack=8)) == {ids[0]}
    assert [r.status for r in run_rows(sqlite_url, run_id + 1)] == ["queued"]
    assert [r.status for r in run_rows(sqlite_url, run_id + 2)] == ["queued"]
    store.dispose()


def test_a_pack_leaves_out_repeats_of_what_it_trains_or_another_worker_trains(sqlite_url):
    """The driver holds a repeat back until its first is scored (then a worker answers it from the cache);
    a pack took held repeats as companions and trained the same rule twice at once."""
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "probe": False})
    rules = ("g", "g", "sign(g)", "m", "sign(g)", "m * 2", "m * 3", "m * 3")
    run_id, ids = _queue(store, config, rules)
    assert set(run_pack(store, ids[3], pack=2, worker="other:1")) == {ids[3], ids[0]}   # m, and g's first
    with store.transaction() as session:   # another worker trains m * 3's first
        session.execute(update(Evaluation).where(Evaluation.id == ids[6]).values(status="running"))
    outcomes = run_pack(store, ids[2], pack=8)   # sign(g): g and m are scored, their repeats answered
    assert outcomes[ids[2]] in (Outcome.DONE, Outcome.DIVERGED)
    assert ids[4] not in outcomes   # sign(g)'s own repeat waits for it, as the driver sends it later
    assert ids[7] not in outcomes   # and m * 3's for the other worker's
    assert outcomes[ids[1]] is Outcome.CACHED and outcomes[ids[5]] in (Outcome.DONE, Outcome.DIVERGED)
    rows = run_rows(sqlite_url, run_id)
    assert rows[4].status == rows[7].status == "queued"
    assert run_pack(store, ids[4], pack=8) == {ids[4]: Outcome.CACHED}
    store.dispose()


WORKER = """
import sys
import threading
from nos.store import open_store
from nos.work import run_pack
run_pack(open_store(sys.argv[1]), int(sys.argv[2]), worker="doomed:1", pack=int(sys.argv[3]))
"""


@pytest.mark.slow
def test_a_stopped_runs_pack_is_left_queued(store, migrated_url):
    config = SearchConfig(**{**TINY, "probe": False})
    run_id, ids = _queue(store, config)
    with store.transaction() as session:
        set_run_status(session, run_id, "stopping")   # `nos stop` asked: its driver has not stopped yet
    assert run_pack(store, ids[0], worker="host:1", pack=3) == {ids[0]: Outcome.SKIPPED}
    assert {(r.status, r.attempts, r.worker) for r in run_rows(migrated_url, run_id)} == {("queued", 0, None)}
    with store.transaction() as session:
        set_run_status(session, run_id, "running")
    assert set(run_pack(store, ids[0], worker="host:1", pack=3)) == set(ids[:3])


def test_a_worker_killed_mid_pack_loses_nothing(sqlite_url):
    """All K claims of a killed worker go stale, are retaken, and finish."""
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "probe": False, "stale_after": 3.0, "heartbeat_every": 1.0,
                             "task_options": {"train_size": 300, "lrs": [0.01, 0.1], "epochs": 120,
                                              "batch_size": 4}})
    run_id, ids = _queue(store, config, RULES[:3])
    worker = subprocess.Popen([sys.executable, "-c", WORKER, sqlite_url, str(ids[0]), "3"])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows = run_rows(sqlite_url, run_id)
            if all(r.status == "running" and r.worker == "doomed:1" for r in rows):
                break
            assert worker.poll() is None, "the worker ended before it was killed"
            time.sleep(0.2)
        else:
            pytest.fail("the worker never held the whole pack")
        time.sleep(2)   # mid-training, heartbeating
        worker.kill()
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert {r.status for r in run_rows(sqlite_url, run_id)} == {"running"}   # nothing written, nothing lost
    time.sleep(config.stale_after + 0.5)
    with store.transaction() as session:
        swept = requeue_stale(session, run_id, timedelta(seconds=config.stale_after), config.max_attempts)
    assert sorted(swept.requeued) == sorted(ids)
    outcomes = run_pack(store, ids[0], worker="heir:1", pack=3)
    assert set(outcomes) == set(ids)
    rows = run_rows(sqlite_url, run_id)
    assert all(r.status in ("done", "diverged") and r.worker == "heir:1" and r.attempts == 2 for r in rows)
    store.dispose()


def test_status_shows_the_packs_in_flight(sqlite_url):
    from click.testing import CliRunner

    from nos.cli.main import cli
    from nos.store import claim, utcnow

    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "probe": False})
    run_id, ids = _queue(store, config)
    stale, now = timedelta(seconds=config.stale_after), utcnow()
    with store.transaction() as session:   # as a worker with a pack of 3 claims, and one with a pack of 1
        for evaluation_id in ids[:3]:
            claim(session, evaluation_id, "gpu-host:7", stale, now=now)
        claim(session, ids[3], "cpu-host:8", stale)
    store.dispose()
    result = CliRunner().invoke(cli, ["status", str(run_id), "--db", sqlite_url], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "2 packs in flight: 1 of 3, 1 of 1" in result.output
    lines = [line for line in result.output.splitlines() if "host:" in line]
    assert sum("1/3" in line and "gpu-host:7" in line for line in lines) == 3
    assert sum("1/1" in line and "cpu-host:8" in line for line in lines) == 1


@pytest.mark.slow
def test_a_search_with_packed_local_workers_completes(db_url):
    from collections import Counter

    from nos.driver import Driver
    from nos.executors import LocalExecutor

    from helpers.driver import assert_complete

    upgrade(resolve_url(db_url))
    store = open_store(db_url)
    config = SearchConfig(**{**TINY, "pack": 3})
    assert config.target_in_flight == config.workers * 3 + 3   # the packs, and one more pack queued
    with store.transaction() as session:
        run_id = create_run(session, "packed", config.task, config.to_dict())
    executor = LocalExecutor(db_url, workers=config.workers, pack=config.pack)
    try:
        assert Driver(store, run_id, config, executor).run() == "completed"
    finally:
        executor.close()
    store.dispose()
    assert_complete(db_url, run_id, config.budget)
    trained = [r for r in run_rows(db_url, run_id) if r.status in ("done", "diverged")]
    assert max(Counter((r.worker, r.claimed_at) for r in trained).values()) > 1   # some trained as a pack


def test_a_rule_that_fails_in_a_pack_fails_alone(sqlite_url):
    """An error in one evaluation (here a stored rule text that no longer parses) fails it, not its pack."""
    from sqlalchemy import update

    from nos.store.models import Evaluation, Rule

    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "probe": False})
    run_id, ids = _queue(store, config, RULES[:3])
    with store.transaction() as session:
        broken = session.get(Evaluation, ids[1]).rule_id
        session.execute(update(Rule).where(Rule.id == broken).values(text="g +"))
    outcomes = run_pack(store, ids[0], pack=3)
    assert outcomes[ids[1]] is Outcome.FAILED
    assert all(outcomes[i] in (Outcome.DONE, Outcome.DIVERGED) for i in (ids[0], ids[2]))
    rows = run_rows(sqlite_url, run_id)
    assert rows[1].error and rows[0].reward is not None and rows[2].reward is not None
    store.dispose()


def _spend_attempts(store, run_id, ids, n):
    """n claims of each evaluation, each released by the death of its worker (counted)."""
    from nos.store import claim
    from nos.store.evaluations import release_claims

    for i in range(n):
        with store.transaction() as session:
            for evaluation_id in ids:
                claim(session, evaluation_id, f"dead:{i}", timedelta(seconds=30))
            release_claims(session, run_id, [f"dead:{i}"], max_attempts=3)


def test_an_evaluations_last_attempt_trains_alone(sqlite_url):
    """A worker's death charges its whole pack: on the last attempt no rule shares the charge of another's."""
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "probe": False, "max_attempts": 3})
    run_id, ids = _queue(store, config)
    _spend_attempts(store, run_id, ids[:2], 1)   # one death: the retry still packs
    _spend_attempts(store, run_id, ids[2:3], 2)   # two deaths: its next claim is its last
    outcomes = run_pack(store, ids[0], worker="heir:1", pack=3)
    assert set(outcomes) == {ids[0], ids[1], ids[3]}   # the one on its last attempt is left out
    assert run_pack(store, ids[2], worker="heir:1", pack=3) .keys() == {ids[2]}   # and takes no companion
    rows = {r.id: r for r in run_rows(sqlite_url, run_id)}
    assert rows[ids[2]].attempts == 3 and rows[ids[2]].status in ("done", "diverged")
    store.dispose()


def test_a_pack_that_fails_whole_keeps_the_claims_waiting_their_turn_alive(sqlite_url, monkeypatch):
    """Retrained one by one after the pack raised, each claim is heartbeated while the others train."""
    import nos.work

    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "probe": False, "stale_after": 0.8, "heartbeat_every": 0.2,
                             "task_options": {"train_size": 300, "lrs": [0.01, 0.1], "epochs": 24,
                                              "batch_size": 4}})
    run_id, ids = _queue(store, config, RULES[:3])
    trained = nos.work.evaluate_rules

    def no_packs(rules, *args, **kwargs):   # as a pack too big for the card fails, and one rule does not
        if len(rules) > 1:
            raise RuntimeError("CUDA out of memory (a pack of several)")
        return trained(rules, *args, **kwargs)

    monkeypatch.setattr(nos.work, "evaluate_rules", no_packs)
    swept: list[int] = []
    stop = threading.Event()

    def sweep():   # the driver's stale sweep, running all along
        while not stop.wait(0.3):
            with store.transaction() as session:
                swept.extend(requeue_stale(session, run_id, timedelta(seconds=0.8), 3).requeued)

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    try:
        outcomes = run_pack(store, ids[0], worker="w:1", pack=3)
    finally:
        stop.set()
        sweeper.join()
    assert set(outcomes) == set(ids) and all(o in (Outcome.DONE, Outcome.DIVERGED) for o in outcomes.values())
    assert swept == []   # each training alone outlasts stale_after: the last waited for two of them
    assert all(r.attempts == 1 for r in run_rows(sqlite_url, run_id))
    store.dispose()


def test_packing_workers_on_postgresql_skip_rows_another_is_claiming(pg_url):
    """Two workers packing at once must not wait for each other's rows (they deadlocked: each held one)."""
    from nos.store import claim

    upgrade(resolve_url(pg_url))
    store, other = open_store(pg_url), open_store(pg_url)
    config = SearchConfig(**{**TINY, "probe": False})
    run_id, ids = _queue(store, config, RULES[:3])
    done = threading.Event()
    outcomes: dict = {}

    def pack_the_rest():
        outcomes.update(run_pack(store, ids[0], worker="b:1", pack=3))
        done.set()

    with other.transaction() as session:   # worker A, mid-claim: its row is locked until it commits
        claim(session, ids[1], "a:1", timedelta(seconds=30))
        packer = threading.Thread(target=pack_the_rest)
        packer.start()
        finished_first = done.wait(timeout=60)
    packer.join()
    assert finished_first   # B packed without waiting for A's row ...
    assert set(outcomes) == {ids[0], ids[2]}   # ... and left it to A
    assert {r.id: r.worker for r in run_rows(pg_url, run_id)}[ids[1]] == "a:1"
    store.dispose()
    other.dispose()


def test_a_worker_without_the_tasks_data_refuses_and_leaves_the_evaluation_queued(sqlite_url, tmp_path):
    """Its data missing here is this worker's problem, not the rule's: nothing is failed or counted."""
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "task": "fashion-mlp", "probe": False,
                             "task_options": {"data_dir": str(tmp_path / "no-data-here")}})
    run_id, ids = _queue(store, config, RULES[:2], key="the-drivers-key")
    assert run_pack(store, ids[0], worker="w:1", pack=2) == {ids[0]: Outcome.REFUSED}
    rows = run_rows(sqlite_url, run_id)
    assert [(r.status, r.attempts) for r in rows] == [("queued", 0)] * 2
    assert rows[0].error.startswith("refused by w:1: its fashion-mlp task cannot be built here: ")
    assert rows[1].error is None   # not looked at
    store.dispose()



def test_a_worker_whose_task_differs_from_the_drivers_fails_the_evaluation(sqlite_url):
    """Another nos or other data: no worker like this one would ever train it as the driver meant."""
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "probe": False})
    run_id, ids = _queue(store, config, RULES[:1], key="another-version-of-the-task")
    assert run_pack(store, ids[0], worker="w:1") == {ids[0]: Outcome.FAILED}
    [row] = run_rows(sqlite_url, run_id)
    assert row.status == "failed" and "differs from the driver's" in row.error
    store.dispose()


def test_a_worker_whose_copy_of_the_data_differs_fails_the_evaluation(sqlite_url, tmp_path):
    """Another machine's files at the run's data_dir, of the same sizes but one label changed: its worker trained
    them as the driver's task, and their rewards were mixed with the others under one key."""
    import gzip

    from nos import work
    from nos.tasks import registry

    from helpers.fake_fashion import write_fashion

    raw = write_fashion(tmp_path / "FashionMNIST" / "raw", train=60, test=20)
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "task": "fashion-mlp", "probe": False,
                             "task_options": {"data_dir": str(tmp_path), "val_size": 10, "batch_size": 8}})
    run_id, ids = _queue(store, config, RULES[:1])   # keyed by the driver, on the files as they were
    labels = raw / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[-1] = (content[-1] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(content)))
    # What a worker process on that machine starts from: nothing read or built yet.
    work._TASKS.clear()
    for cached in (registry._fashion_mnist, registry._fashion_mnist_14, registry._read_fingerprint):
        cached.cache_clear()
    assert run_pack(store, ids[0], worker="w:1") == {ids[0]: Outcome.FAILED}
    [row] = run_rows(sqlite_url, run_id)
    assert row.status == "failed" and "differs from the driver's" in row.error
    store.dispose()


def test_a_run_keyed_before_data_fingerprints_resumes_without_a_warning_and_one_on_other_data_warns(
        sqlite_url, tmp_path):
    """Runs on files began before nos put a fingerprint of them in the key: the same task under the earlier key
    is not "a task of another key" (nothing can check which files those were), other data of other sizes is."""
    from nos import control
    from nos.work import unfingerprinted_key

    from helpers.fake_fashion import write_fashion

    write_fashion(tmp_path / "FashionMNIST" / "raw", train=60, test=20)
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    options = {"data_dir": str(tmp_path), "val_size": 10, "batch_size": 8}
    config = SearchConfig(**{**TINY, "task": "fashion-mlp", "probe": False, "task_options": options})
    task = task_for(config, "cpu")
    assert unfingerprinted_key(task, config.children_seed) != task_key(task, config.children_seed)
    earlier, _ = _queue(store, config, RULES[:1], key=unfingerprinted_key(task, config.children_seed))
    assert control.changed_task(store, earlier, config) is None
    smaller = SearchConfig(**{**TINY, "task": "fashion-mlp", "probe": False,
                              "task_options": {**options, "val_size": 20}})
    assert control.changed_task(store, earlier, smaller).startswith(f"run {earlier}'s task fashion-mlp no longer")
    store.dispose()


def test_an_evaluation_not_in_the_workers_database_is_skipped_and_said(sqlite_url, caplog):
    """A worker started with another --db than the driver's skipped everything it was sent without a word: the
    run crawled on the other workers, or waited with "no worker has taken" while this one ran."""
    import logging

    from nos.driver import RunNotHere, drive_run

    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    with caplog.at_level(logging.WARNING, logger="nos.work"):
        assert run_pack(store, 4242, worker="w:1") == {4242: Outcome.SKIPPED}
    assert "evaluation 4242 is not in this worker's database sqlite:///" in caplog.text
    # A control worker on another database: one line, not an AttributeError from a run it cannot read.
    with pytest.raises(RunNotHere, match="run 7 is not in this worker's database sqlite:///"):
        drive_run(store, 7)
    store.dispose()
