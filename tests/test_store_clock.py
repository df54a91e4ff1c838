"""Hosts whose clocks disagree share one PostgreSQL database without taking each other's work.

A host's clock is put an hour behind by replacing the `datetime` that
`nos.store.models.utcnow` reads; the database and everything else is real.
Before the store read the database's clock, such a host wrote heartbeats an
hour old, and every other host took its claims and its lease at once.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import nos.store.models
from nos.store import claim, database_now, heartbeat, requeue_stale, utcnow
from nos.store.leases import LeaseRefused, read_lease, renew_lease, take_lease

from helpers.store import new_run_with_batch

SKEW = timedelta(hours=1)
STALE = timedelta(seconds=30)
# The hosts share a PostgreSQL server, whose clock they read (SQLite's clock is its host's).
pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


class _HourBehind(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) - SKEW


@pytest.fixture
def hour_behind(monkeypatch):
    """This process's clock, as the store reads it, an hour slow: the slow host (undo: the fast one)."""
    monkeypatch.setattr(nos.store.models, "datetime", _HourBehind)
    assert utcnow() < datetime.now(timezone.utc) - SKEW + timedelta(minutes=1)
    return monkeypatch


def test_a_slow_hosts_heartbeats_keep_its_claims(store, hour_behind):
    run_id, ids = new_run_with_batch(store)
    with store.transaction() as session:   # the slow host claims and beats
        attempt = claim(session, ids[0], "slow-host:1", STALE)
        assert attempt == 1
        assert heartbeat(session, ids[0], attempt)
    hour_behind.undo()                          # another host, on time, looks for stale work
    with store.transaction() as session:
        assert requeue_stale(session, run_id, STALE, max_attempts=3).requeued == []
        assert claim(session, ids[0], "fast-host:2", STALE) is None
    with store.reading() as session:
        beat = session.get(nos.store.models.Evaluation, ids[0]).heartbeat_at
        assert abs(beat - database_now(session)) < STALE


def test_a_slow_hosts_lease_holds(store, hour_behind):
    run_id, _ = new_run_with_batch(store)
    with store.transaction() as session:
        take_lease(session, run_id, "slow-host:1")
        assert renew_lease(session, run_id, "slow-host:1")
    hour_behind.undo()
    with store.transaction() as session:
        assert read_lease(session, run_id).live()
        with pytest.raises(LeaseRefused, match=r"driven by slow-host:1 \(lease renewed \d s ago\)"):
            take_lease(session, run_id, "fast-host:2")


def test_a_fast_host_does_not_see_live_work_as_stale(store, monkeypatch):
    """The other way round: a host an hour ahead judges by the database's clock, not its own."""
    run_id, ids = new_run_with_batch(store)
    with store.transaction() as session:
        assert claim(session, ids[0], "on-time:1", STALE) == 1
    monkeypatch.setattr(nos.store.models, "datetime", type("HourAhead", (datetime,), {
        "now": classmethod(lambda cls, tz=None: datetime.now(tz) + SKEW)}))
    with store.transaction() as session:
        assert requeue_stale(session, run_id, STALE, max_attempts=3).requeued == []
        assert claim(session, ids[0], "fast-host:2", STALE) is None
