"""The asynchronous driver: every result learned from once, resumes from anywhere, and the old config key.

Evaluations train in this process as they are dispatched (`helpers.driver.InlineExecutor`), so results
arrive in the order they were sent and a run is reproducible: a driver that crashes anywhere must resume
to exactly the run an uninterrupted driver makes. Killed drivers with real worker processes and Celery
workers are in test_driver.py and test_celery.py.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from nos.config import SearchConfig
from nos.driver import Driver
from nos.store import create_run, get_run, open_store, resolve_url, set_run_status, upgrade
from nos.store.models import Checkpoint

from helpers.driver import TINY, InlineExecutor, assert_complete, assert_learned_once, rule_sequence, run_rows

# Rosenbrock trains in milliseconds: the whole run takes about a second in this process.
QUICK = {**TINY, "task": "rosenbrock", "budget": 14, "update_every": 3, "in_flight": 4,
         "task_options": {"train_size": 5, "lrs": [0.01, 0.1], "epochs": 1}}


def drive(url: str, run_id: int, config: SearchConfig, crash_after: int | None = None) -> str:
    store = open_store(url)
    executor = InlineExecutor(url, crash_after)
    try:
        return Driver(store, run_id, config, executor).run()
    finally:
        executor.close()
        store.dispose()


def new_run(url: str, config: dict) -> int:
    upgrade(resolve_url(url))
    store = open_store(url)
    with store.transaction() as session:
        run_id = create_run(session, "async", "rosenbrock", config)
    store.dispose()
    return run_id


@pytest.mark.parametrize("searcher", ["ppo", "reinforce", "evolution", "random"])
def test_every_result_is_learned_from_once_and_the_budget_is_exact(sqlite_url, searcher):
    config = SearchConfig(**{**QUICK, "searcher": searcher})
    run_id = new_run(sqlite_url, config.to_dict())
    assert drive(sqlite_url, run_id, config) == "completed"
    assert_complete(sqlite_url, run_id, 14)
    assert_learned_once(sqlite_url, run_id, 3)
    rows = run_rows(sqlite_url, run_id)
    assert all(e.tokens for e in rows)   # what was sampled, for updates after a resume
    assert all((e.log_prob is not None) == (searcher in ("ppo", "reinforce")) for e in rows)
    assert all(e.log_prob is None or e.log_prob < 0 for e in rows)


@pytest.mark.parametrize(("searcher", "crash_after"), [("ppo", 0), ("ppo", 5), ("ppo", 11), ("evolution", 5)])
def test_a_driver_that_dies_anywhere_resumes_to_the_same_run(tmp_path, searcher, crash_after):
    settings = {"population": 4, "tournament": 2} if searcher == "evolution" else {}
    config = SearchConfig(**{**QUICK, "searcher": searcher, "hyperparameters": settings})
    straight = f"sqlite:///{tmp_path / 'straight.db'}"
    assert drive(straight, new_run(straight, config.to_dict()), config) == "completed"

    url = f"sqlite:///{tmp_path / 'crashed.db'}"
    run_id = new_run(url, config.to_dict())
    with pytest.raises(InlineExecutor.Crash):
        drive(url, run_id, config, crash_after)
    store = open_store(url)
    with store.transaction() as session:   # as `nos resume` leaves it for its driver
        assert get_run(session, run_id).status == "failed"
        set_run_status(session, run_id, "running")
    store.dispose()
    assert drive(url, run_id, config) == "completed"

    assert_complete(url, run_id, 14)
    assert_learned_once(url, run_id, 3)
    # The replayed proposals and the re-learned updates put the searcher exactly where it was.
    assert rule_sequence(url, run_id) == rule_sequence(straight, 1)


def test_a_run_stored_with_batch_size_resumes_synchronously(sqlite_url):
    # A run stored before update_every replaced batch_size: the synchronous driver made it, and
    # its checkpoints are that driver's.
    old = {key: value for key, value in SearchConfig(**QUICK).to_dict().items()
           if key not in ("update_every", "synchronous", "in_flight")}
    old["batch_size"] = 3
    config = SearchConfig.from_dict(old)
    assert (config.update_every, config.synchronous) == (3, True)
    run_id = new_run(sqlite_url, old)
    with pytest.raises(InlineExecutor.Crash):
        drive(sqlite_url, run_id, config, crash_after=5)
    store = open_store(sqlite_url)
    with store.transaction() as session:
        set_run_status(session, run_id, "running")
        stored = SearchConfig.from_dict(get_run(session, run_id).config)
    with store.reading() as session:
        states = session.execute(select(Checkpoint.state).where(Checkpoint.run_id == run_id)).scalars().all()
    store.dispose()
    assert stored == config
    assert all("tokens" in state for state in states)   # the synchronous driver's checkpoints
    assert drive(sqlite_url, run_id, stored) == "completed"
    assert_complete(sqlite_url, run_id, 14)


def test_the_old_key_in_a_users_file_means_update_every(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text("batch_size = 7\n")
    config = SearchConfig.load(path)
    assert (config.update_every, config.synchronous) == (7, False)   # a new run: today's default driver
    assert "batch_size" not in config.to_dict()
    assert SearchConfig.load(path, synchronous=True).synchronous


def test_in_flight_defaults_to_the_workers_and_a_margin():
    # What the workers train at once, and a margin of at least 2, a pack, and an eighth of that.
    assert SearchConfig(workers=2).target_in_flight == 4
    assert SearchConfig(workers=8).target_in_flight == 10
    assert SearchConfig(workers=64).target_in_flight == 72
    assert SearchConfig(workers=1, pack=32).target_in_flight == 64
    assert SearchConfig(workers=8, in_flight=3).target_in_flight == 3


@pytest.mark.parametrize("synchronous", [False, True])
def test_a_run_whose_end_was_committed_as_its_connection_dropped_completes(sqlite_url, monkeypatch, synchronous):
    """The run's final transaction commits, then the connection's error arrives: the driver, waiting the
    database out, finds the run completed instead of trying to end it again (which met its own released lease)."""
    from sqlalchemy.exc import OperationalError

    import nos.driver

    config = SearchConfig(**{**QUICK, "synchronous": synchronous})
    run_id = new_run(sqlite_url, config.to_dict())
    complete, dropped = nos.driver.Driver._complete, []

    def complete_then_drop(self, *args):
        complete(self, *args)
        if not dropped:
            dropped.append(True)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(nos.driver.Driver, "_complete", complete_then_drop)
    assert drive(sqlite_url, run_id, config) == "completed"
    assert dropped
    assert_complete(sqlite_url, run_id, 14)


def test_a_driver_whose_lease_was_taken_over_writes_no_batch_or_checkpoint(sqlite_url):
    """A driver cut off from the database past its lease, then back: its renewal thread had not yet seen
    the takeover, and it stored one more batch and checkpoint beside the new driver's. The writing
    transaction now checks the lease and is rolled back."""
    from sqlalchemy import func, update

    from nos.lease import LeaseLost
    from nos.store import database_now
    from nos.store.models import Evaluation, Run

    class TakenOverMidRun(InlineExecutor):
        def dispatch(self, evaluation_ids) -> None:
            super().dispatch(evaluation_ids)
            if self.evaluated >= 5 and self.counts is None:   # another driver takes the run over now
                with self.store.transaction() as session:
                    session.execute(update(Run).where(Run.id == run_id).values(
                        driver="elsewhere:1", driver_heartbeat_at=database_now(session)))
                    self.counts = rows(session)

    def rows(session):
        return [session.execute(select(func.count()).select_from(table).where(table.run_id == run_id)).scalar()
                for table in (Evaluation, Checkpoint)]

    config = SearchConfig(**QUICK)
    run_id = new_run(sqlite_url, config.to_dict())
    store = open_store(sqlite_url)
    executor = TakenOverMidRun(sqlite_url)
    executor.counts = None
    try:
        with pytest.raises(LeaseLost, match="taken over by another driver"):
            Driver(store, run_id, config, executor).run()
        with store.reading() as session:
            assert rows(session) == executor.counts
            run = get_run(session, run_id)
            assert (run.status, run.driver) == ("running", "elsewhere:1")   # the new driver's, untouched
    finally:
        executor.close()
        store.dispose()
