"""Detached runs: driven by control workers, and sent to them again when left without a driver.

A run handed to control workers (`nos enqueue --detach`, `nos resume --detach`) has
`runs.drive_sent_at` set; a run driven in the foreground has it NULL, so a control worker never takes
over a run its user drives (or meant to drive) from a shell. A detached run still `running` whose
driver lease is not live has lost its driver: its control worker was killed whole, its host is gone,
or the broker lost the `nos.drive` message before any worker took it. Control workers look for such
runs (nos.workers.adopter) and send the run's driver loop again, once its last send is older than a
wait that starts at the run's `stale_after` and doubles at each send again, up to RESEND_AT_MOST: a
message that merely waits for a busy control worker is not copied every few seconds, and a driver that
dies each time it starts (out of memory) is not restarted in a tight loop. Recording a send happens
under the run's row lock, so among several control workers one sends.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .clock import database_now
from .leases import DRIVABLE, Lease, clear_dead_lease
from .models import Run
from .runs import set_run_status

# The longest wait, in seconds, between two sends of a driverless run's driver loop.
RESEND_AT_MOST = 600.0
# The wait's start for a run whose config names no usable stale_after (SearchConfig's default).
DEFAULT_STALE_AFTER = 25.0


def hand_to_control(session: Session, run_id: int, *, now: datetime | None = None) -> None:
    """Mark the run detached, its driver loop sent now (by its user: the wait starts again)."""
    _set(session, run_id, drive_sent_at=now or database_now(session), drive_sends=0)


def take_back(session: Session, run_id: int) -> None:
    """Mark the run driven in the foreground: control workers leave it alone."""
    _set(session, run_id, drive_sent_at=None, drive_sends=0)


def driverless_runs(session: Session) -> list[int]:
    """Ids of the detached runs, running or stopping, whose driver lease is not live."""
    now = database_now(session)
    rows = session.execute(
        select(Run.id, Run.status, Run.driver, Run.driver_heartbeat_at)
        .where(Run.drive_sent_at.is_not(None), Run.status.in_(DRIVABLE)).order_by(Run.id)).all()
    return [row.id for row in rows if not Lease(row.id, row.status, row.driver, row.driver_heartbeat_at, now).live()]


def claim_resend(session: Session, run_id: int, *, now: datetime | None = None) -> bool:
    """Record a send again of the run's driver loop if it is due; whether it was (then the caller sends it).

    Due: the run is detached and running, its lease is not live, and its last send is older than the
    wait. Read and written under the run's row lock: of two control workers asking at once, one is told
    yes. A dead holder's lease is cleared with it, so the drive that comes takes the lease at once.
    """
    row = session.execute(
        select(Run.status, Run.driver, Run.driver_heartbeat_at, Run.drive_sent_at, Run.drive_sends, Run.config)
        .where(Run.id == run_id).with_for_update()).one_or_none()
    now = now or database_now(session)
    if row is None or row.drive_sent_at is None or row.status != "running":
        return False
    if Lease(run_id, row.status, row.driver, row.driver_heartbeat_at, now).live():
        return False
    if now - row.drive_sent_at < timedelta(seconds=resend_wait(row.config, row.drive_sends)):
        return False
    clear_dead_lease(session, run_id, now=now)
    _set(session, run_id, drive_sent_at=now, drive_sends=row.drive_sends + 1)
    return True


def stop_driverless(session: Session, run_id: int) -> bool:
    """Mark a detached run `stopped` that was asked to stop and lost its driver before it could; whether it was."""
    # Under the row lock: a `nos resume --detach` committed between an unlocked read and the lock
    # would otherwise be undone (it takes no lease until a control worker starts its driver).
    status = session.execute(
        select(Run.status, Run.drive_sent_at).where(Run.id == run_id).with_for_update()).one_or_none()
    if status is None or status.drive_sent_at is None or status.status != "stopping":
        return False
    if not clear_dead_lease(session, run_id):
        return False
    set_run_status(session, run_id, "stopped")
    return True


def resend_wait(config: object, sends: int) -> float:
    """Seconds after a send before a driverless run's driver loop is sent again: the run's stale_after,
    doubled at each send again, up to RESEND_AT_MOST (or stale_after, where that is longer)."""
    stale_after = config.get("stale_after") if isinstance(config, dict) else None
    if not isinstance(stale_after, (int, float)) or isinstance(stale_after, bool) or not 0 < stale_after < 1e7:
        stale_after = DEFAULT_STALE_AFTER
    return min(stale_after * 2.0 ** min(sends, 30), max(RESEND_AT_MOST, stale_after))


def _set(session: Session, run_id: int, **values) -> None:
    done = session.execute(update(Run).where(Run.id == run_id).values(**values)
                           .execution_options(synchronize_session=False))
    if done.rowcount != 1:
        raise LookupError(f"no run {run_id}")
