"""The search loop end to end with real worker processes, killed drivers and resumes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from sqlalchemy import select

from nos.config import SearchConfig
from nos.driver import Driver
from nos.executors import LocalExecutor
from nos.rules import parse
from nos.search import Proposal, Searcher, make_searcher, state_from_bytes
from nos.store import create_run, latest_checkpoint, open_store, resolve_url, upgrade
from nos.store.models import Checkpoint, LrTrial, Rule, Run

from helpers.driver import (
    TINY,
    TINY_TOML,
    InlineExecutor,
    assert_complete,
    assert_learned_once,
    finished_count,
    has_run,
    nos,
    rule_sequence,
    run_rows,
    start_nos,
    wait_for,
)
from helpers.search import same_state


@pytest.mark.slow
def test_the_synchronous_driver_runs_a_search_to_its_budget(db_url):
    upgrade(resolve_url(db_url))
    store = open_store(db_url)
    config = SearchConfig(**TINY, synchronous=True)
    with store.transaction() as session:
        run_id = create_run(session, "t", config.task, config.to_dict())
    executor = LocalExecutor(db_url, workers=2)
    seen = []
    try:
        status = Driver(store, run_id, config, executor, on_progress=seen.append).run()
    finally:
        executor.close()
    assert status == "completed"
    assert_complete(db_url, run_id, 12)
    assert seen[-1].finished == 12
    assert seen[-1].best_reward == max(e.reward for e in run_rows(db_url, run_id))
    counted_per_batch = {}
    for e in run_rows(db_url, run_id):
        counted_per_batch[e.batch] = counted_per_batch.get(e.batch, 0) + (e.status != "rejected")
    assert counted_per_batch == {0: 4, 1: 4, 2: 4}   # each step fills its batch whatever the probe rejects
    with store.reading() as session:
        steps = session.execute(select(Checkpoint.step).where(Checkpoint.run_id == run_id)
                                .order_by(Checkpoint.step)).scalars().all()
        workers = {e.worker for e in run_rows(db_url, run_id) if e.worker}
    assert steps == [0, 1, 2, 3]   # one per batch, and the final one
    assert len(workers) == 2       # both processes trained
    store.dispose()


@pytest.mark.slow
@pytest.mark.parametrize(("searcher", "settings"), [("ppo", {}), ("evolution", {"population": 4, "tournament": 2})])
def test_sigkill_of_the_synchronous_driver_mid_batch_then_resume(tmp_path, tiny_toml, searcher, settings):
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    reference = f"sqlite:///{tmp_path / 'straight.db'}"
    # The synchronous driver: the resumed run must sample exactly what the uninterrupted one did.
    table = "".join(f"{key} = {value}\n" for key, value in settings.items())
    # evolution: a population of 4, so batches 1 and 2 are children of scored members
    Path(tiny_toml).write_text(f"synchronous = true\n{TINY_TOML}" + (f"\n[hyperparameters]\n{table}" if table else ""))
    assert nos("enqueue", "--config", tiny_toml, "--searcher", searcher, "--db", reference).returncode == 0

    driver = start_nos("enqueue", "--config", tiny_toml, "--searcher", searcher, "--db", url)
    wait_for(lambda: Path(url[len("sqlite:///"):]).exists() and has_run(url))
    finished = wait_for(lambda: finished_count(url, 1) >= 5 and finished_count(url, 1))
    os.killpg(driver.pid, signal.SIGKILL)   # the driver and its workers, mid-run
    driver.wait()
    assert 0 < finished < 12
    rows = run_rows(url, 1)
    assert sum(e.status != "rejected" for e in rows) < 12 or any(e.status in ("queued", "running") for e in rows)

    store = open_store(url)
    with store.reading() as session:
        checkpoint = latest_checkpoint(session, 1)
        saved_state, saved_step = state_from_bytes(checkpoint.blob), checkpoint.step
    store.dispose()
    restored = make_searcher(searcher, depth=1, seed=3, **settings)
    restored.load_state_dict(saved_state)
    assert same_state(restored.state_dict(), saved_state)   # the checkpoint restores completely
    assert saved_step == max(e.batch for e in rows)

    resumed = nos("resume", "1", "--db", url)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_complete(url, 1, 12)
    # A crash changes nothing: the resumed run sampled and scored what the uninterrupted one did,
    # the free rejections included.
    assert rule_sequence(url, 1) == rule_sequence(reference, 1)
    if searcher == "ppo":   # evolution's children of the built-ins all pass the probe here
        assert any(e.status == "rejected" for e in run_rows(reference, 1))


@pytest.mark.slow
def test_the_asynchronous_driver_killed_three_times_loses_and_repeats_nothing(tmp_path, tiny_toml):
    """kill -9 of the driver and its workers at three points of one run, each time resumed: every
    evaluation counted once, every result learned from by exactly one recorded update."""
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    args = ("--db", url)
    # Each kill takes the workers' claims with it, and one evaluation can be in flight at all three
    # (a fresh worker's first evaluation is its slowest): with the default max_attempts of 3 it is
    # then rightly failed, as an evaluation that kills its worker would be. Four attempts let the
    # test ask what it means to: that nothing is lost or repeated.
    config = tmp_path / "four-attempts.toml"
    config.write_text("max_attempts = 4\n" + Path(tiny_toml).read_text())
    driver = start_nos("enqueue", "--config", str(config), *args, "--budget", "24", "--train-size", "1200")
    for threshold in (2, 9, 16):
        wait_for(lambda: has_run(url) and finished_count(url, 1) >= threshold, timeout=300)
        os.killpg(driver.pid, signal.SIGKILL)   # the driver and its workers, mid-run
        driver.wait()
        assert finished_count(url, 1) < 24
        driver = start_nos("resume", "1", *args)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out
    assert_complete(url, 1, 24)
    assert_learned_once(url, 1, 4)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["nos stop", "ctrl-c"])
def test_stopping_leaves_a_consistent_run_that_resumes(tmp_path, tiny_toml, how):
    url = f"sqlite:///{tmp_path / 'stopped.db'}"
    # Every rule trained (no probe), on four times the data, in 25 batches: each batch costs the
    # driver a few polls, so the run takes seconds however fast evaluations are, and the stop lands mid-run.
    driver = start_nos("enqueue", "--config", tiny_toml, "--db", url, "--budget", "100", "--train-size", "1200",
                       "--no-probe")
    wait_for(lambda: has_run(url) and finished_count(url, 1) >= 2)
    if how == "nos stop":
        stop = nos("stop", "1", "--db", url)
        assert stop.returncode == 0, stop.stderr
    else:
        os.killpg(driver.pid, signal.SIGINT)   # what Ctrl-C in a terminal sends
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 3, out   # stopped, resumable: not 0
    assert "nos resume 1" in out
    rows = run_rows(url, 1)
    assert sum(e.status != "rejected" for e in rows) < 100
    assert not any(e.status == "running" for e in rows)   # no claim left behind
    store = open_store(url)
    with store.reading() as session:
        assert session.get(Run, 1).status == "stopped"
    store.dispose()

    resumed = nos("resume", "1", "--db", url)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_complete(url, 1, 100)


@pytest.mark.slow
def test_evaluations_queued_before_the_task_changed_are_trained_as_the_new_task_on_resume(tmp_path, tiny_toml):
    """They were failed by every worker ("this worker's task differs from the driver's") and used up budget."""
    from sqlalchemy import update

    from nos.store.models import Evaluation

    url = f"sqlite:///{tmp_path / 'changed.db'}"
    driver = start_nos("enqueue", "--config", tiny_toml, "--db", url, "--budget", "60", "--train-size", "1200",
                       "--no-probe")
    # Past the first results and with work in flight: between batches (the controller updating) none is queued.
    wait_for(lambda: has_run(url) and finished_count(url, 1) >= 2
             and any(e.status in ("queued", "running") for e in run_rows(url, 1)))
    os.killpg(driver.pid, signal.SIGKILL)   # mid-run: its evaluations in flight stay queued or claimed
    driver.wait()
    store = open_store(url)
    with store.transaction() as session:   # as if queued by a task that builds another key now
        older = session.execute(update(Evaluation).where(Evaluation.status.in_(("queued", "running")))
                                .values(task_key="an-older-task")).rowcount
    store.dispose()
    assert older > 0
    resumed = nos("resume", "1", "--db", url)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_complete(url, 1, 60)
    rows = run_rows(url, 1)
    assert not any(e.status == "failed" or e.task_key == "an-older-task" for e in rows)


def test_a_rule_scored_before_is_not_trained_again(sqlite_url):
    from nos.rules import parse
    from nos.store import NewEvaluation, RuleRecord, enqueue_batch, get_or_create_rules
    from nos.work import Outcome, run_evaluation, task_for, task_key

    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**TINY)
    key = task_key(task_for(config, "cpu"), config.seed)
    with store.transaction() as session:
        run_id = create_run(session, "cache", config.task, config.to_dict())
        rule_id = get_or_create_rules(session, [RuleRecord.from_tree(parse("g * exp(sign(g) * sign(m))"))])[0]
        first, again = enqueue_batch(session, run_id, 0, [NewEvaluation(rule_id, "digits", key)] * 2)
    assert run_evaluation(store, first) is Outcome.DONE
    assert run_evaluation(store, again) is Outcome.CACHED   # a repeat within the batch: copied, not trained
    rows = run_rows(sqlite_url, run_id)
    assert rows[1].cached_from == rows[0].id
    assert rows[1].reward == rows[0].reward
    assert rows[1].wall_seconds == 0.0
    store.dispose()


@pytest.mark.slow
def test_a_second_identical_run_is_served_from_the_cache(sqlite_url):
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    # Synchronous: the second run's updates see the same results in the same groups, so it samples the same.
    config = SearchConfig(**{**TINY, "budget": 8, "synchronous": True})
    for _ in range(2):
        with store.transaction() as session:
            run_id = create_run(session, "same", config.task, config.to_dict())
        executor = LocalExecutor(sqlite_url, workers=1)
        try:
            assert Driver(store, run_id, config, executor).run() == "completed"
        finally:
            executor.close()
    first, second = run_rows(sqlite_url, 1), run_rows(sqlite_url, 2)
    # Same seed, same rules, same task key: nothing trains; rejected rules are rejected again.
    assert [e.status == "rejected" for e in second] == [e.status == "rejected" for e in first]
    assert all(e.status in ("cached", "rejected") for e in second)
    originals = {e.id: e for e in first}
    for e in second:
        if e.status == "cached":
            source = originals[e.cached_from]
            assert source.reward == e.reward
            assert source.rule_id == e.rule_id or e.reason
    store.dispose()


@pytest.mark.slow
def test_without_the_probe_every_new_rule_is_trained(sqlite_url):
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "budget": 8, "workers": 1, "probe": False,
                             "task_options": {**TINY["task_options"], "sweep": "halving"}})
    with store.transaction() as session:
        run_id = create_run(session, "no-probe", config.task, config.to_dict())
    executor = LocalExecutor(sqlite_url, workers=1)
    try:
        assert Driver(store, run_id, config, executor).run() == "completed"
    finally:
        executor.close()
    rows = run_rows(sqlite_url, run_id)
    assert {e.status for e in rows} <= {"done", "diverged", "cached"}
    assert all(e.reason is None for e in rows)
    with store.reading() as session:
        assert not any(session.execute(select(Rule.fingerprint)).scalars())
        trials = session.execute(select(LrTrial).where(LrTrial.evaluation_id == rows[0].id)).scalars().all()
    assert len(trials) == 2   # halving over 2 rates is one round: both trained, both scored
    store.dispose()


class _BrokenFleet:
    """Workers that fail every evaluation they take (a task they cannot build, a missing driver)."""

    def __init__(self, url: str):
        self.store = open_store(url)

    def dispatch(self, evaluation_ids) -> None:
        from datetime import timedelta

        from nos.store.evaluations import claim, fail

        for evaluation_id in evaluation_ids:
            with self.store.transaction() as session:
                attempt = claim(session, evaluation_id, "broken:1", timedelta(seconds=60))
                if attempt is not None:
                    fail(session, evaluation_id, attempt, "RuntimeError: no CUDA driver")

    def dead_workers(self) -> list[str]:
        return []

    def close(self) -> None:
        self.store.dispose()


@pytest.mark.parametrize("synchronous", [False, True])
def test_a_broken_fleet_stops_a_run_that_began_with_cache_hits(sqlite_url, synchronous):
    """The same seed again proposes rules the first run scored: their copies counted as trained, which
    switched the check off, and the asynchronous run used its whole budget on failures."""
    from nos.driver import SearchStuck

    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    settings = {**TINY, "searcher": "random", "probe": False, "synchronous": synchronous, "update_every": 2,
                "in_flight": 2, "budget": 2}
    for budget, executor in ((2, InlineExecutor(sqlite_url)), (40, _BrokenFleet(sqlite_url))):
        config = SearchConfig(**{**settings, "budget": budget})
        with store.transaction() as session:
            run_id = create_run(session, "again", config.task, config.to_dict())
        try:
            if budget == 2:
                Driver(store, run_id, config, executor).run()
            else:
                with pytest.raises(SearchStuck, match=r"\d+ evaluations failed and none trained"):
                    Driver(store, run_id, config, executor).run()
        finally:
            executor.close()
    statuses = [e.status for e in run_rows(sqlite_url, run_id)]
    assert statuses[:2] == ["cached", "cached"]
    assert statuses.count("failed") <= 8   # stopped after a few, not the budget of 40
    store.dispose()


def test_a_ctrl_c_just_after_the_run_completed_is_no_takeover(sqlite_url, monkeypatch):
    """From Python a Ctrl-C is a KeyboardInterrupt landing anywhere: just after the end was committed, the
    stop's release of the lease (given up at the end) raised LeaseLost, "taken over by another driver"."""
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "budget": 4})
    with store.transaction() as session:
        run_id = create_run(session, "late", config.task, config.to_dict())
    completes = Driver._complete

    def complete_then_ctrl_c(self, *args):
        completes(self, *args)
        raise KeyboardInterrupt   # the user's Ctrl-C, a moment late

    monkeypatch.setattr(Driver, "_complete", complete_then_ctrl_c)
    executor = InlineExecutor(sqlite_url)
    try:
        assert Driver(store, run_id, config, executor).run() == "completed"
    finally:
        executor.close()
    with store.reading() as session:
        assert session.get(Run, run_id).status == "completed"
    store.dispose()


class _OnlyHopeless(Searcher):
    """A searcher that proposes nothing but a rule the probe rejects (its update is zero)."""

    name = "ppo"

    def propose(self, n):
        tree = parse("g - g")
        return [Proposal((0,) * 13, tree) for _ in range(n)]

    def observe(self, tokens, rewards, log_probs=None):
        pass


@pytest.mark.slow
def test_a_searcher_that_only_proposes_rejects_stops_the_run(sqlite_url, monkeypatch):
    import nos.driver

    monkeypatch.setattr(nos.driver, "MAX_REJECTED_PER_STEP", 50)
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "workers": 1})
    with store.transaction() as session:
        run_id = create_run(session, "stuck", config.task, config.to_dict())
    executor = LocalExecutor(sqlite_url, workers=1)
    driver = Driver(store, run_id, config, executor)
    driver.searcher = _OnlyHopeless(2, 0)
    try:
        # The asynchronous driver asks for in_flight (1 worker and a margin of 2) rules at a time.
        stuck = r"proposed 5\d rules in one step that the probe rejected before finding 3 to train"
        with pytest.raises(nos.driver.SearchStuck, match=stuck):
            driver.run()
    finally:
        executor.close()
    with store.reading() as session:
        run = session.get(Run, run_id)
        assert run.status == "failed"
        assert "probe rejected" in run.error
    store.dispose()


@pytest.mark.slow
def test_failed_evaluations_are_left_out_of_learning(sqlite_url):
    from datetime import timedelta

    from nos.store import (
        EvaluationResult,
        NewEvaluation,
        RuleRecord,
        claim,
        commit_result,
        enqueue_batch,
        fail,
        get_or_create_rules,
    )

    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "workers": 1})
    with store.transaction() as session:
        run_id = create_run(session, "failures", config.task, config.to_dict())
        rule_ids = get_or_create_rules(session, [RuleRecord.from_tree(parse(t)) for t in ("g", "m", "adam")])
        ids = enqueue_batch(session, run_id, 0, [NewEvaluation(r, "digits", "key") for r in rule_ids])
    with store.transaction() as session:
        for evaluation_id, outcome in zip(ids, (0.5, None, 0.25)):
            attempt = claim(session, evaluation_id, "w", timedelta(seconds=60))
            if outcome is None:
                fail(session, evaluation_id, attempt, "a worker's bug")
            else:
                result = EvaluationResult(reward=outcome, test_acc=None, best_lr=0.1, wall_seconds=1.0)
                commit_result(session, evaluation_id, attempt, result)
    executor = LocalExecutor(sqlite_url, workers=1)
    try:
        scored = Driver(store, run_id, config, executor)._wait(0)
    finally:
        executor.close()
    assert scored == {0: 0.5, 2: 0.25}   # the failed one is neither a 0 nor anything else
    store.dispose()


class _Recorder:
    """An executor that records what the driver sends, and dies with it at the first send (a killed driver)."""

    class Died(Exception):
        pass

    def __init__(self):
        self.sent: list[list[int]] = []

    def dispatch(self, evaluation_ids) -> None:
        if evaluation_ids:
            self.sent.append(list(evaluation_ids))
            raise _Recorder.Died()

    def dead_workers(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def test_a_resumed_synchronous_batch_still_trains_a_repeated_rule_once(sqlite_url):
    """Repeats of a rule within a batch wait for the first; after a resume mid-batch they still do (they were
    all sent again, and two free workers each trained the rule)."""
    from nos.rules import to_tokens
    from nos.store import set_run_status

    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "synchronous": True, "update_every": 3})
    with store.transaction() as session:
        run_id = create_run(session, "repeats", config.task, config.to_dict())
    tree = parse("sign(m) * g")
    first = Driver(store, run_id, config, _Recorder())
    first.searcher.propose = lambda n: [Proposal(tuple(to_tokens(tree, config.depth)), tree)] * n
    with pytest.raises(_Recorder.Died):
        first.run()
    ids = [e.id for e in run_rows(sqlite_url, run_id)]
    assert first.executor.sent == [ids[:1]]   # the repeats wait for the first
    with store.transaction() as session:
        set_run_status(session, run_id, "running")
    resumed = Driver(store, run_id, config, _Recorder())
    with pytest.raises(_Recorder.Died):
        resumed.run()
    assert resumed.executor.sent == [ids[:1]]
    assert resumed.held == {ids[1]: ids[0], ids[2]: ids[0]}
    store.dispose()


class _Sent:
    """An executor that records every send, as a broker's queue would hold them."""

    def __init__(self):
        self.sent: list[int] = []

    def dispatch(self, evaluation_ids) -> None:
        self.sent += list(evaluation_ids)

    def dead_workers(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def test_an_evaluation_left_waiting_is_sent_again_ever_less_often(sqlite_url, monkeypatch):
    """With no worker free for an hour, a queued evaluation used to be sent again every stale_after (144
    messages an hour at 25 s); the waits now double, to RESEND_AT_MOST."""
    from types import SimpleNamespace

    import nos.driver

    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "stale_after": 25.0, "heartbeat_every": 5.0})
    with store.transaction() as session:
        run_id = create_run(session, "waiting", config.task, config.to_dict())
    driver = Driver(store, run_id, config, _Sent())
    now = [0.0]
    monkeypatch.setattr(nos.driver.time, "monotonic", lambda: now[0])
    driver._dispatch([7])
    waiting = SimpleNamespace(id=7, status="queued")
    sends = []
    for second in range(1, 3601):
        now[0] = float(second)
        before = len(driver.executor.sent)
        driver._release([waiting])
        if len(driver.executor.sent) > before:
            sends.append(second)
    gaps = [b - a for a, b in zip([0, *sends], sends)]
    assert gaps[:5] == [26, 51, 101, 201, 401]   # just past 25, 50, 100, 200 and 400 s
    assert set(gaps[5:]) == {601}                # then every RESEND_AT_MOST
    assert len(sends) < 10
    store.dispose()
