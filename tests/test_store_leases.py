"""The driver lease on its own, on SQLite and PostgreSQL, with time decided by the test."""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta

import pytest

from nos.store import create_run, get_run, set_run_status, utcnow
from nos.store.leases import (
    LEASE_STALE_AFTER,
    LeaseRefused,
    clear_dead_lease,
    gone_from_this_host,
    read_lease,
    release_lease,
    renew_lease,
    take_lease,
)

# Holders on other machines: only their heartbeats say whether they are alive.
A, B = "host-a:101", "host-b:202"


@pytest.fixture
def run_id(store) -> int:
    with store.transaction() as session:
        return create_run(session, "leased", "digits", {})


def take(store, run_id, holder, now=None) -> None:
    with store.transaction() as session:
        take_lease(session, run_id, holder, now=now)


def test_one_driver_at_a_time_until_it_releases(store, run_id):
    take(store, run_id, A)
    take(store, run_id, A)   # the same holder again: the CLI hands its lease to the driver it starts
    with pytest.raises(LeaseRefused, match=r"run \d+ is already driven by host-a:101 \(lease renewed \d+ s ago\); "
                                           r"stop it first with `nos stop \d+`"):
        take(store, run_id, B)
    with store.transaction() as session:
        assert renew_lease(session, run_id, A)
        assert not release_lease(session, run_id, B)   # only the holder frees it
        assert release_lease(session, run_id, A)
    take(store, run_id, B)
    with store.reading() as session:
        assert read_lease(session, run_id).holder == B
    with store.transaction() as session:
        assert not renew_lease(session, run_id, A)   # A learns it lost the lease


def test_a_dead_drivers_lease_expires(store, run_id):
    start = utcnow()
    take(store, run_id, A, now=start)
    with pytest.raises(LeaseRefused):
        take(store, run_id, B, now=start + LEASE_STALE_AFTER - timedelta(seconds=1))
    take(store, run_id, B, now=start + LEASE_STALE_AFTER + timedelta(seconds=1))
    with store.reading() as session:
        lease = read_lease(session, run_id)
    assert lease.holder == B
    assert lease.heartbeat_at == start + LEASE_STALE_AFTER + timedelta(seconds=1)


def test_a_driver_gone_from_this_host_frees_its_lease_at_once(store, run_id):
    exited = subprocess.Popen(["true"])
    exited.wait()
    here = socket.gethostname()
    take(store, run_id, f"{here}:{os.getppid()}")   # a live process of this host: its lease holds
    with pytest.raises(LeaseRefused, match=f"driven by {here}:{os.getppid()}"):
        take(store, run_id, B)
    with store.transaction() as session:
        release_lease(session, run_id, f"{here}:{os.getppid()}")
    take(store, run_id, f"{here}:{exited.pid}")   # then one that has exited: no waiting for staleness
    take(store, run_id, B)
    with store.reading() as session:
        assert read_lease(session, run_id).holder == B


def test_a_holder_named_with_an_impossible_pid_is_taken_for_gone(store, run_id):
    """A hand-edited or foreign holder string must not crash `nos resume` (os.kill raised OverflowError)."""
    here = socket.gethostname()
    take(store, run_id, f"{here}:{2**40}")
    assert gone_from_this_host(f"{here}:{2**40}")
    take(store, run_id, B)
    with store.reading() as session:
        assert read_lease(session, run_id).holder == B


def test_only_a_running_run_can_be_driven(store, run_id):
    with store.transaction() as session:
        set_run_status(session, run_id, "stopped")
    with pytest.raises(LeaseRefused, match=r"run \d+ is stopped, not running"):
        take(store, run_id, A)
    with store.reading() as session:
        assert read_lease(session, run_id).holder is None


def test_clearing_a_dead_lease_leaves_a_live_one(store, run_id):
    start = utcnow()
    take(store, run_id, A, now=start)
    with store.transaction() as session:
        assert not clear_dead_lease(session, run_id, now=start + timedelta(seconds=5))
        assert get_run(session, run_id).driver == A
        assert clear_dead_lease(session, run_id, now=start + LEASE_STALE_AFTER + timedelta(seconds=1))
    with store.reading() as session:
        lease = read_lease(session, run_id)
    assert lease.holder is None
    assert lease.heartbeat_at is None
