"""The driver lease: a run has at most one driver.

`runs.driver` names the holder ("host:pid") and `runs.driver_heartbeat_at`
says when it last renewed the lease. Taking it is one conditional UPDATE
that succeeds only when the lease is free, already ours, or dead: its
heartbeat is older than `stale_after` by the database's clock, or its holder is a process of this
host that no longer exists (so `nos resume` right after a `kill -9` need not
wait). Renewing and releasing act only while the caller still holds it.

Two processes are the same holder only when their names match, so a lease
can be handed from the CLI process to the Driver it starts. Hosts must have
distinct names, and a host's processes one process table (the pid check).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from .clock import database_now
from .models import Run

# A driver renews its lease every LEASE_RENEW_SECONDS; one silent for LEASE_STALE_AFTER is presumed dead.
LEASE_RENEW_SECONDS = 3.0
LEASE_STALE_AFTER = timedelta(seconds=30)
# Statuses a driver can take a run in: `nos resume` sets 'running' first, in the same transaction.
DRIVABLE = ("running", "stopping")


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseRefused(Exception):
    """The run has a live driver, or is not running: the message says which, in one line."""


@dataclass(frozen=True)
class Lease:
    run_id: int
    status: str
    holder: str | None
    heartbeat_at: datetime | None
    read_at: datetime   # the database's time when the lease was read: what `live` judges by

    def live(self, stale_after: timedelta = LEASE_STALE_AFTER, now: datetime | None = None) -> bool:
        """Is a driver holding the run now: renewed recently, and not a process this host knows is gone."""
        if self.holder is None or self.heartbeat_at is None:
            return False
        if self.heartbeat_at < (now or self.read_at) - stale_after:
            return False
        return not gone_from_this_host(self.holder)

    def seconds_to_stale(self, stale_after: timedelta = LEASE_STALE_AFTER) -> float:
        """Seconds until the lease is free for want of renewal, as of when it was read (0: already)."""
        if self.heartbeat_at is None:
            return 0.0
        return max((self.heartbeat_at + stale_after - self.read_at).total_seconds(), 0.0)

    def refusal(self, now: datetime | None = None) -> str:
        if self.status not in DRIVABLE:
            return f"run {self.run_id} is {self.status}, not running"
        age = ((now or self.read_at) - self.heartbeat_at).total_seconds() if self.heartbeat_at else 0.0
        return (f"run {self.run_id} is already driven by {self.holder} (lease renewed {max(age, 0):.0f} s ago); "
                f"stop it first with `nos stop {self.run_id}`")


def read_lease(session: Session, run_id: int, *, lock: bool = False) -> Lease | None:
    """The run's lease; `lock` holds the run's row until the transaction ends (PostgreSQL; SQLite's write
    transaction holds the whole database already)."""
    query = select(Run.status, Run.driver, Run.driver_heartbeat_at).where(Run.id == run_id)
    row = session.execute(query.with_for_update() if lock else query).one_or_none()
    return None if row is None else Lease(run_id, *row, read_at=database_now(session))


def take_lease(session: Session, run_id: int, holder: str, *, stale_after: timedelta = LEASE_STALE_AFTER,
               now: datetime | None = None) -> None:
    """Make `holder` the run's driver, or raise LeaseRefused naming the live one (nothing written)."""
    now = now or database_now(session)
    before = read_lease(session, run_id)
    if before is None:
        raise LookupError(f"no run {run_id}")
    free = or_(Run.driver.is_(None), Run.driver == holder, Run.driver_heartbeat_at < now - stale_after)
    if before.holder is not None and gone_from_this_host(before.holder):
        free = or_(free, Run.driver == before.holder)   # unless another driver took it in the meantime
    taken = session.execute(
        update(Run).where(Run.id == run_id, Run.status.in_(DRIVABLE), free)
        .values(driver=holder, driver_heartbeat_at=now).execution_options(synchronize_session=False))
    if taken.rowcount != 1:
        raise LeaseRefused((read_lease(session, run_id) or before).refusal(now))


def renew_lease(session: Session, run_id: int, holder: str, *, now: datetime | None = None) -> bool:
    """Say the holder is alive; False: it no longer holds the lease (released, or taken over)."""
    renewed = session.execute(
        update(Run).where(Run.id == run_id, Run.driver == holder)
        .values(driver_heartbeat_at=now or database_now(session)).execution_options(synchronize_session=False))
    return renewed.rowcount == 1


def release_lease(session: Session, run_id: int, holder: str) -> bool:
    """Free the lease if `holder` has it; False when it does not (then nothing is written)."""
    released = session.execute(
        update(Run).where(Run.id == run_id, Run.driver == holder)
        .values(driver=None, driver_heartbeat_at=None).execution_options(synchronize_session=False))
    return released.rowcount == 1


def clear_dead_lease(session: Session, run_id: int, *, stale_after: timedelta = LEASE_STALE_AFTER,
                     now: datetime | None = None) -> bool:
    """Free a lease whose holder is dead (for `nos stop` of a driverless run); False if a driver is live."""
    lease = read_lease(session, run_id, lock=True)
    if lease is None or lease.live(stale_after, now):
        return False
    if lease.holder is not None:
        session.execute(update(Run).where(Run.id == run_id, Run.driver == lease.holder)
                        .values(driver=None, driver_heartbeat_at=None).execution_options(synchronize_session=False))
    return True


def gone_from_this_host(holder: str) -> bool:
    """True when `holder` names a process of this host that has exited; False when alive or elsewhere."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):   # OverflowError: no process can have that number
        return False
    except PermissionError:   # someone else's process: it exists
        return True
    try:   # a zombie has exited; only its parent has not collected it yet
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True
