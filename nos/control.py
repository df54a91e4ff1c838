"""Starting, driving, resuming and stopping a run: what `nos enqueue`, `resume`, `stop` and `nos.run_search` share.

Every check that can refuse a run (its task, its device, its checkpoint, a
live driver) runs before anything is written, and a refusal is a RunRefused
whose message is the one line the command line prints (exit 2).
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable

from sqlalchemy.exc import DBAPIError

from .config import ConfigError, SearchConfig
from .store import Store, create_run, get_run, set_run_status, shown
from .store.detached import hand_to_control, take_back
from .store.engine import first_line
from .store.leases import DRIVABLE, LeaseRefused, clear_dead_lease, read_lease, release_lease, take_lease, this_process


class RunRefused(ValueError):
    """A run that cannot be started, resumed or stopped as asked; nothing was written."""


def refuse_in_a_starting_worker(call: str) -> None:
    """RunRefused where this process is a worker still importing its parent's main module.

    Local workers are new interpreters that import the script which started them before they
    work; a search started at its top level would start again in each of them, for ever.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RunRefused(f"{call} ran in a worker process as it started: put the script's search under "
                         "`if __name__ == \"__main__\":` (worker processes import the script again)")


def check_task(config: SearchConfig, broker_url: str | None) -> None:
    """Check the device and load the task's data now, so a bad run fails before anything is written.

    Local workers train on this machine: its device must be here. Celery workers elsewhere check theirs.
    """
    from .devices import DeviceError, parse_device, usable_device
    from .tasks import DataUnavailable
    from .work import task_for

    check = parse_device if broker_url else usable_device
    try:
        check(config.device)
    except DeviceError as exc:
        hint = "; to train on GPU workers elsewhere, give --broker" if check is usable_device else ""
        raise RunRefused(f"{exc}{hint if config.device.startswith('cuda') else ''}") from None
    try:
        task_for(config, "cpu")
    except (DataUnavailable, ValueError, TypeError) as exc:   # UnknownTask and TaskFactoryError are ValueErrors
        raise RunRefused(str(exc)) from None


def store_for_writing(db_url: str | None, say: Callable[[str], Any] = print) -> Store:
    """The store at `db_url`, writable; a database with no nos schema yet (a new SQLite file) is created
    first, and `say` tells so. StoreError when it cannot be opened or written."""
    from .store import DatabaseMissing, check_writable, open_store, resolve_url, schema_state, upgrade

    url = resolve_url(db_url)
    try:
        fresh = schema_state(url).current is None
    except DatabaseMissing:
        fresh = True
    if fresh:
        upgrade(url)
        say(f"created database {shown(url)}")
    check_writable(url)
    return open_store(url)


def start_run(store: Store, config: SearchConfig, *, detach: bool = False) -> int:
    """Store a new run and take its driver lease here, or mark it for control workers to drive (`detach`)."""
    try:
        with store.transaction() as session:
            run_id = create_run(session, config.label, config.task, config.to_dict())
            if detach:
                hand_to_control(session, run_id)
            else:
                take_lease(session, run_id, this_process())
    except DBAPIError as exc:   # a database that refuses the write (read-only, full): nothing was stored
        raise RunRefused(f"cannot write to database {shown(store.url)}: {first_line(exc.orig)}") from None
    return run_id


def resumable_config(store: Store, run_id: int) -> SearchConfig:
    """The config of run `run_id`, which must exist and not be completed."""
    with store.reading() as session:
        run = get_run(session, run_id)
        if run is None:
            raise RunRefused(f"no run {run_id} in {shown(store.url)}; `nos runs` lists them")
        if run.status == "completed":
            raise RunRefused(completed(run_id))
        try:
            return SearchConfig.from_dict(run.config)
        except ConfigError as exc:
            raise RunRefused(f"run {run_id} has a config this nos cannot read: {exc}") from None


def changed_task(store: Store, run_id: int, config: SearchConfig) -> str | None:
    """One line of warning when the run's task now builds another task (key) than its evaluations had.

    Its factory's code or defaults, its data (sizes, or the files of a task read from files), or nos's
    protocol changed since the run began.
    A resume still goes on (an upgrade of nos must not strand a run), but the search's rewards are
    then judged on two tasks; evaluations still queued are trained as the new task (the driver re-keys them).
    """
    from sqlalchemy import select

    from .store.models import Evaluation
    from .work import task_for, task_key, unfingerprinted_key

    task = task_for(config, "cpu")
    now = task_key(task, config.children_seed)
    with store.reading() as session:
        before = session.execute(select(Evaluation.task_key).where(Evaluation.run_id == run_id)
                                 .order_by(Evaluation.id.desc()).limit(1)).scalar()
    if before is None or before in (now, unfingerprinted_key(task, config.children_seed)):
        return None   # the same task; or one keyed before nos fingerprinted its files, which it cannot check
    return (f"run {run_id}'s task {config.task} no longer builds the task its evaluations were trained on (its "
            f"code, defaults or data, or nos's protocol, changed): rewards from here on are judged on "
            f"another task than the earlier ones; to keep one task, restore it, or start a new run")


def check_checkpoint(store: Store, run_id: int, config: SearchConfig) -> None:
    """Load the run's latest checkpoint into a searcher now, so a damaged one fails before the run changes."""
    from .resume import CheckpointUnreadable, check_resumable

    try:
        check_resumable(store, run_id, config)
    except CheckpointUnreadable as exc:
        raise RunRefused(str(exc)) from None


def take_over(store: Store, run_id: int, *, detach: bool = False) -> None:
    """Mark the run running and take its driver lease, all in one transaction that a refusal rolls back.

    The run is read again under the write lock: it may have finished, or found a driver, since it was
    checked. A detached run's control worker takes the lease itself; a run taken to the foreground is
    left alone by control workers from now on.
    """
    with store.transaction() as session:
        lease = read_lease(session, run_id, lock=True)
        if lease.status == "completed":
            raise RunRefused(completed(run_id))
        if lease.live():
            raise RunRefused(lease.refusal())
        set_run_status(session, run_id, "running")
        if detach:
            hand_to_control(session, run_id)
        else:
            take_back(session, run_id)
            try:
                take_lease(session, run_id, this_process())
            except LeaseRefused as exc:
                raise RunRefused(str(exc)) from None


def completed(run_id: int) -> str:
    return f"run {run_id} is already completed; start a new one with `nos enqueue`"


def drive_here(store: Store, run_id: int, broker_url: str | None = None,
               on_progress: Callable[[Any], None] | None = None) -> str:
    """Drive the run in this process until its budget is spent ("completed") or it is stopped ("stopped").

    Ctrl-C stops it cleanly wherever it lands: the driver stops its own loop, and one that arrives
    before the driver took over, or after it let go, finds nothing in flight and marks the run here.
    SearchStuck, LeaseRefused and LeaseLost come through (see nos.driver).
    """
    from .driver import drive_run

    try:
        return drive_run(store, run_id, broker_url, on_progress=on_progress)
    except KeyboardInterrupt:
        return stopped_here(store, run_id)


def stopped_here(store: Store, run_id: int) -> str:
    """Mark the run stopped and free its lease, unless another driver holds it or the run has ended;
    "completed" where it had (an interrupt as the driver let go of a finished run), else "stopped"."""
    with store.transaction() as session:
        lease = read_lease(session, run_id, lock=True)
        if lease.status in DRIVABLE and lease.holder in (None, this_process()):
            release_lease(session, run_id, this_process())
            set_run_status(session, run_id, "stopped")
    return "completed" if lease.status == "completed" else "stopped"


def fail_undriven(store: Store, run_id: int, error: str) -> bool:
    """Mark the run failed (resumable) with `error` unless it has ended or a live driver holds it; whether it was."""
    with store.transaction() as session:
        lease = read_lease(session, run_id, lock=True)
        if lease is None or lease.status not in DRIVABLE or lease.live():
            return False
        set_run_status(session, run_id, "failed", error=error[:2000])
    return True


def request_stop(store: Store, run_id: int) -> bool:
    """Ask a running run to stop; True when it had no live driver and is marked stopped at once."""
    with store.transaction() as session:
        # Read under the row lock: a driver completing between an unlocked read and the lock would
        # leave no holder, and its completed run would be marked stopped (PostgreSQL).
        lease = read_lease(session, run_id, lock=True)
        if lease is None:
            raise RunRefused(f"no run {run_id} in {shown(store.url)}; `nos runs` lists them")
        if lease.status not in DRIVABLE:
            raise RunRefused(f"run {run_id} is {lease.status}, not running")
        driverless = clear_dead_lease(session, run_id)
        set_run_status(session, run_id, "stopped" if driverless else "stopping")
    return driverless


__all__ = [
    "RunRefused", "changed_task", "check_checkpoint", "check_task", "completed", "drive_here", "fail_undriven",
    "request_stop", "resumable_config", "start_run", "stopped_here", "store_for_writing", "take_over",
]
