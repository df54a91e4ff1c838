"""Detached runs left without a driver, as the store sees them, on SQLite and PostgreSQL (nos.store.detached)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from nos.store import create_run, get_run, set_run_status, utcnow
from nos.store.detached import (
    RESEND_AT_MOST,
    claim_resend,
    driverless_runs,
    hand_to_control,
    resend_wait,
    stop_driverless,
    take_back,
)
from nos.store.leases import LEASE_STALE_AFTER, release_lease, take_lease
from nos.store.models import Run

ELSEWHERE = "host-elsewhere:101"   # a driver on another machine: only its heartbeat says it lives


def new_run(store, *, detached: bool, stale_after: float = 10.0) -> int:
    with store.transaction() as session:
        run_id = create_run(session, "r", "digits", {"stale_after": stale_after})
        if detached:
            hand_to_control(session, run_id)
    return run_id


def sent(store, run_id) -> tuple:
    with store.reading() as session:
        run = get_run(session, run_id)
        return run.drive_sent_at, run.drive_sends


def set_sent(store, run_id, ago: float) -> None:
    with store.transaction() as session:
        session.execute(update(Run).where(Run.id == run_id).values(drive_sent_at=utcnow() - timedelta(seconds=ago)))


def driverless(store) -> list[int]:
    with store.reading() as session:
        return driverless_runs(session)


def resend(store, run_id, now=None) -> bool:
    with store.transaction() as session:
        return claim_resend(session, run_id, now=now)


def test_only_detached_runs_without_a_live_driver_are_driverless(store):
    foreground = new_run(store, detached=False)
    waiting = new_run(store, detached=True)      # sent, no control worker took it yet
    driven = new_run(store, detached=True)
    dead = new_run(store, detached=True)
    stopped = new_run(store, detached=True)
    now = utcnow()
    with store.transaction() as session:
        take_lease(session, driven, ELSEWHERE, now=now)
        take_lease(session, dead, "host-b:7", now=now - LEASE_STALE_AFTER - timedelta(seconds=1))
        set_run_status(session, stopped, "stopped")
    assert driverless(store) == [waiting, dead]
    with store.transaction() as session:
        take_back(session, waiting)   # `nos resume` without --detach: the user drives it from a shell
    assert driverless(store) == [dead]
    assert sent(store, foreground) == (None, 0)


def test_a_send_again_waits_stale_after_then_doubles_and_one_claimer_wins(store):
    run_id = new_run(store, detached=True, stale_after=10.0)
    first, _ = sent(store, run_id)
    assert not resend(store, run_id, now=first + timedelta(seconds=9))   # the user's send may still be waiting
    assert resend(store, run_id, now=first + timedelta(seconds=10))
    assert not resend(store, run_id, now=first + timedelta(seconds=10))  # recorded: the next claimer is told no
    second, sends = sent(store, run_id)
    assert (second - first, sends) == (timedelta(seconds=10), 1)
    assert not resend(store, run_id, now=second + timedelta(seconds=19))
    assert resend(store, run_id, now=second + timedelta(seconds=20))
    assert sent(store, run_id)[1] == 2
    with store.transaction() as session:
        hand_to_control(session, run_id)   # `nos resume --detach`: the user's own send starts the waits again
    assert sent(store, run_id)[1] == 0


def test_a_dead_drivers_lease_is_cleared_with_the_send_and_a_live_one_is_left(store):
    run_id = new_run(store, detached=True, stale_after=1.0)
    set_sent(store, run_id, ago=3600)
    now = utcnow()
    with store.transaction() as session:
        take_lease(session, run_id, ELSEWHERE, now=now)
    assert not resend(store, run_id, now=now + LEASE_STALE_AFTER - timedelta(seconds=1))
    assert resend(store, run_id, now=now + LEASE_STALE_AFTER + timedelta(seconds=1))
    with store.transaction() as session:
        assert get_run(session, run_id).driver is None   # the drive that comes need not wait for it
        take_lease(session, run_id, "host-c:3")


def test_foreground_and_finished_runs_are_never_sent(store):
    foreground = new_run(store, detached=False)
    finished = new_run(store, detached=True)
    stopping = new_run(store, detached=True)
    later = utcnow() + timedelta(hours=1)
    with store.transaction() as session:
        set_run_status(session, finished, "completed")
        set_run_status(session, stopping, "stopping")
    assert not any(resend(store, run_id, now=later) for run_id in (foreground, finished, stopping))


def test_a_stopping_run_that_lost_its_driver_is_stopped(store):
    run_id = new_run(store, detached=True)
    live = new_run(store, detached=True)
    foreground = new_run(store, detached=False)
    with store.transaction() as session:
        take_lease(session, run_id, "host-b:7", now=utcnow() - LEASE_STALE_AFTER - timedelta(seconds=1))
        take_lease(session, live, ELSEWHERE)
        for each in (run_id, live, foreground):
            set_run_status(session, each, "stopping")
    with store.transaction() as session:
        assert stop_driverless(session, run_id)
        assert not stop_driverless(session, live)         # its driver stops it
        assert not stop_driverless(session, foreground)   # `nos stop` or `nos resume` of its user does
    with store.reading() as session:
        run = get_run(session, run_id)
        assert (run.status, run.driver, run.finished_at is not None) == ("stopped", None, True)
        assert [get_run(session, i).status for i in (live, foreground)] == ["stopping", "stopping"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_control_workers_asking_at_once_send_once(store):
    run_id = new_run(store, detached=True, stale_after=1.0)
    set_sent(store, run_id, ago=3600)
    with store.transaction() as session:
        take_lease(session, run_id, ELSEWHERE, now=utcnow() - timedelta(hours=1))
    barrier, answers = threading.Barrier(8), []

    def ask():
        barrier.wait()
        answers.append(resend(store, run_id))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [False] * 7 + [True]
    with store.reading() as session:
        assert session.execute(select(Run.drive_sends).where(Run.id == run_id)).scalar() == 1


def test_the_wait_reads_the_runs_stale_after_and_is_capped():
    assert resend_wait({"stale_after": 4.0}, 0) == 4.0
    assert resend_wait({"stale_after": 4.0}, 3) == 32.0
    assert resend_wait({"stale_after": 4.0}, 1000) == RESEND_AT_MOST
    assert resend_wait({"stale_after": 3600.0}, 2) == 3600.0   # never below the run's own stale_after
    for unusable in ({}, {"stale_after": "x"}, {"stale_after": True}, {"stale_after": -1}, None, []):
        assert resend_wait(unusable, 0) == 25.0


def test_release_leaves_a_detached_run_driverless(store):
    run_id = new_run(store, detached=True)
    with store.transaction() as session:
        take_lease(session, run_id, ELSEWHERE)
    assert driverless(store) == []
    with store.transaction() as session:
        release_lease(session, run_id, ELSEWHERE)
    assert driverless(store) == [run_id]


def _meanwhile(store, act, monkeypatch, module, name="clear_dead_lease"):
    """Run `act(other_store)` from another connection just before `module.name` runs, waiting a second
    for it: a commit that races the caller's transaction between its first read and the row lock."""
    from nos.store import open_store

    other = open_store(store.url)
    real = getattr(module, name)

    def racing(session, run_id, **kwargs):
        thread = threading.Thread(target=act, args=(other, run_id))
        thread.start()
        thread.join(1.0)   # blocks on the row lock where the caller holds it: then it goes after the commit
        racing.threads.append(thread)
        return real(session, run_id, **kwargs)

    racing.threads = []
    monkeypatch.setattr(module, name, racing)
    return racing, other


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_stop_racing_the_drivers_completion_leaves_the_run_completed(store, monkeypatch):
    """`nos stop` read the run unlocked; a driver completing before the lock left no holder, and the
    completed run was marked stopped ("had no live driver")."""
    import nos.control

    def complete(other, run_id):
        with other.transaction() as session:
            release_lease(session, run_id, ELSEWHERE)
            set_run_status(session, run_id, "completed")

    run_id = new_run(store, detached=False)
    with store.transaction() as session:
        take_lease(session, run_id, ELSEWHERE)
    racing, other = _meanwhile(store, complete, monkeypatch, nos.control)
    try:
        assert nos.control.request_stop(store, run_id) is False   # it had a live driver when asked
        racing.threads[0].join(10)
    finally:
        other.dispose()
    with store.reading() as session:
        assert get_run(session, run_id).status == "completed"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_resume_racing_the_stop_of_a_driverless_run_is_kept(store, monkeypatch):
    """A control worker read a driverless run `stopping` unlocked; a `nos resume --detach` committing
    before its lock was undone: the run went back to stopped, and its drive message was refused."""
    import nos.control
    import nos.store.detached

    run_id = new_run(store, detached=True)
    with store.transaction() as session:
        set_run_status(session, run_id, "stopping")
    racing, other = _meanwhile(store, lambda other, rid: nos.control.take_over(other, rid, detach=True),
                               monkeypatch, nos.store.detached)
    try:
        with store.transaction() as session:
            assert stop_driverless(session, run_id)
        racing.threads[0].join(10)
    finally:
        other.dispose()
    with store.reading() as session:
        assert get_run(session, run_id).status == "running"
