"""A database briefly away: a worker keeps its trained result until it can commit it, and a driver waits,
then takes its run up again, instead of failing it.

SQLite's write lock held by another connection past the busy timeout, and a real PostgreSQL database
that refuses connections for a few seconds after every one of its backends was terminated (a restart,
as its clients see it).
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

import nos.store.engine
from nos.store import claim, get_evaluation, open_store, resolve_url, upgrade
from nos.store.models import Evaluation
from nos.store.outages import retrying
from nos.work import Claim, Outcome, _commit

from helpers.driver import assert_complete, driving, finished_count, has_run, wait_for
from helpers.services import unavailable
from helpers.store import new_run_with_batch, result

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture
def locked_store(sqlite_url, monkeypatch):
    """A migrated SQLite store whose busy timeout is 0.2 s, and a function that holds its write lock
    from another connection for `seconds` (for ever with None), as a frozen process would."""
    monkeypatch.setattr(nos.store.engine, "SQLITE_BUSY_TIMEOUT_MS", 200)
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    holders = []

    def hold(seconds: float | None) -> None:
        holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None,
                                 check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        holders.append(holder)
        if seconds is not None:
            threading.Timer(seconds, holder.rollback).start()

    yield store, hold
    for holder in holders:
        holder.close()
    store.dispose()


def _claimed(store) -> Claim:
    _, ids = new_run_with_batch(store, ["g"])
    with store.transaction() as session:
        attempt = claim(session, ids[0], "w1", timedelta(minutes=5))
    return Claim(ids[0], attempt, None, "g", "k1", 1)


def test_a_worker_keeps_its_result_until_the_lock_is_free_and_then_commits_it(locked_store, capsys):
    store, hold = locked_store
    claimed = _claimed(store)
    hold(1.5)   # past the busy timeout several times over
    assert _commit(store, claimed, result(0.9)) is Outcome.DONE
    with store.reading() as session:
        row = get_evaluation(session, claimed.evaluation_id)
        assert (row.status, row.reward) == ("done", 0.9)
    said = capsys.readouterr().err
    assert f"the result of evaluation {claimed.evaluation_id} waits up to 300 s" in said
    assert "database is locked" in said


def test_a_commit_repeated_after_its_answer_was_lost_is_reported_done(store, monkeypatch):
    """The connection went after the commit and before its answer: the repeat finds the row settled, by this
    very claim, and the worker reported its stored result LOST."""
    import nos.work

    def answer_lost_then_repeated(store, work, **_):
        work()
        return work()

    monkeypatch.setattr(nos.work, "retrying", answer_lost_then_repeated)
    claimed = _claimed(store)
    assert _commit(store, claimed, result(0.9)) is Outcome.DONE
    with store.transaction() as session:   # superseded: another worker claimed it again meanwhile
        session.execute(Evaluation.__table__.update().where(Evaluation.id == claimed.evaluation_id)
                        .values(status="running", claims=Evaluation.claims + 1))
    assert _commit(store, claimed, result(0.5)) is Outcome.LOST
    with store.reading() as session:
        assert get_evaluation(session, claimed.evaluation_id).reward == 0.9


def test_a_database_away_past_patience_gives_the_last_error(locked_store):
    store, hold = locked_store
    claimed = _claimed(store)
    hold(None)
    tries = []

    def write():
        tries.append(1)
        with store.transaction() as session:
            session.execute(Evaluation.__table__.update().values(worker="x"))

    with pytest.raises(OperationalError, match="database is locked"):
        retrying(store, write, patience=1.5)
    assert len(tries) > 1   # tried again before giving up
    with store.reading() as session:
        assert get_evaluation(session, claimed.evaluation_id).worker == "w1"   # nothing written


def test_a_wrong_statement_is_not_tried_again(store):
    new_run_with_batch(store, ["g", "adam"])
    tries = []

    def write():
        tries.append(1)
        with store.transaction() as session:   # two evaluations of one run with the same seq
            session.execute(Evaluation.__table__.update().values(seq=0))

    with pytest.raises(IntegrityError):
        retrying(store, write, patience=30)
    assert len(tries) == 1


@pytest.fixture
def own_pg_database():
    """A PostgreSQL database of the test's own (it is made to refuse connections), dropped afterwards,
    and a function that terminates its backends and refuses new ones for `seconds`."""
    import psycopg

    try:
        admin = psycopg.connect(f"{PG_SERVER}/test", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        unavailable("PostgreSQL", f"{PG_SERVER} does not answer: {str(exc).strip().splitlines()[0]}")
    name = f"nos_outage_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')

    def outage(seconds: float) -> int:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = %s", (name,)).fetchone()[0]
            threading.Event().wait(seconds)
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        return killed

    try:
        yield f"{PG_SERVER}/{name}", outage
    finally:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


@pytest.mark.slow
def test_a_search_rides_out_its_database_going_away(own_pg_database, tiny_toml):
    """The driver and its local workers all lose their connections mid-run and cannot connect for 4 s;
    the run then completes, every evaluation counted once, nothing failed."""
    url, outage = own_pg_database
    with driving("enqueue", "--config", tiny_toml, "--db", url, "--budget", "16", "--no-probe") as driver:
        wait_for(lambda: has_run(url) and finished_count(url, 1) >= 3)
        assert outage(4.0) >= 3   # the driver's and both workers' connections
        out, _ = driver.communicate(timeout=240)
    assert driver.returncode == 0, out
    assert "the driver of run 1 waits up to 300 s" in out
    assert "answers again" in out
    assert "run 1 completed" in out
    assert_complete(url, 1, 16)


@pytest.mark.parametrize("stop_after", [0.0, 1.0])
def test_a_stop_asked_while_the_database_is_locked_stops_the_run_not_fails_it(locked_store, monkeypatch,
                                                                            stop_after):
    """Ctrl-C while another process held SQLite's lock: the wait for the database gave up (a stop was asked)
    and its error marked the run `failed`, with SQLAlchemy's statement as its error; or the stop itself
    could not be written, and its error came out of the driver. With stop_after, the stop comes while the
    driver waits for the database."""
    import nos.driver
    from nos.config import SearchConfig
    from nos.driver import Driver
    from nos.store import create_run, get_run

    from helpers.driver import TINY, InlineExecutor

    store, hold = locked_store
    config = SearchConfig(**{**TINY, "task": "rosenbrock", "budget": 8, "update_every": 2, "in_flight": 2,
                             "task_options": {"train_size": 5, "lrs": [0.01, 0.1], "epochs": 1}})
    with store.transaction() as session:
        run_id = create_run(session, "locked", "rosenbrock", config.to_dict())

    class LockedThenStopped(InlineExecutor):
        def dispatch(self, evaluation_ids) -> None:
            super().dispatch(evaluation_ids)
            if self.evaluated >= 2 and not self.locked:
                self.locked = True
                hold(None)   # another process takes the write lock and keeps it, and the user presses Ctrl-C
                threading.Timer(stop_after, nos.driver.STOP_ASKED.set).start()

    executor = LockedThenStopped(str(store.url))
    executor.locked = False
    monkeypatch.setattr(nos.driver, "STOP_ASKED", type(nos.driver.STOP_ASKED)())
    try:
        assert Driver(store, run_id, config, executor).run() == "stopped"
    finally:
        executor.close()
    with store.reading() as session:
        run = get_run(session, run_id)
        assert run.status != "failed", run.error
