"""A control worker's watch over detached runs left without a driver (see nos.store.detached).

A control worker's main process looks every ADOPT_EVERY seconds, and as it starts, for detached runs
whose driver is gone, and sends each one's `nos.drive` again; whichever control worker takes the
message drives the run on from its latest checkpoint. Without it, a control worker killed whole (its
main process too) left its run's message unacknowledged in Redis for the 6-hour visibility timeout,
and a broker flushed before a control worker took the message lost it: the run sat `running`,
undriven, until someone ran `nos resume RUN_ID --detach`. A detached run asked to stop that lost
its driver first is marked `stopped`.
"""

from __future__ import annotations

import threading

from celery import bootsteps
from celery.utils.log import get_logger

ADOPT_EVERY = 10.0   # seconds between two looks

logger = get_logger(__name__)


class Adopter(bootsteps.StartStopStep):
    """The worker step that runs the watch, in workers that take the control queue only."""

    label = "nos adopter"
    # After the pool's processes are forked: a child forked while the watch's thread was importing a
    # module inherited that module's import lock, held for ever, and hung when it imported the module.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent, **kwargs):
        self.watch: Watch | None = None
        super().__init__(parent, **kwargs)

    def include_if(self, parent) -> bool:
        return "control" in parent.app.amqp.queues.consume_from

    def start(self, parent) -> None:
        self.watch = Watch(parent.app)
        # The first look here, in the worker's main thread: every module a look needs (the database's driver
        # among them) is imported now, so the thread never imports while the pool forks a new process.
        self.watch.look_once()
        self.watch.start()

    def stop(self, parent) -> None:
        if self.watch is not None:
            self.watch.stopped.set()

    shutdown = stop


class Watch(threading.Thread):
    """Looks for driverless detached runs until `stopped` is set; one that fails (the database or the
    broker away) is logged and tried again at the next look."""

    def __init__(self, app, every: float = ADOPT_EVERY):
        super().__init__(daemon=True, name="nos-adopter")
        self.app, self.every = app, every
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.look_once()

    def look_once(self) -> None:
        """A look; one that fails (the database or the broker away) is logged, and the next tries again."""
        try:
            self.look()
        except Exception as exc:
            logger.warning("nos adopter: could not look for driverless runs: %s: %s", type(exc).__name__, exc)

    def look(self) -> None:
        from nos.store import open_store
        from nos.store.detached import claim_resend, driverless_runs, stop_driverless

        # A store of its own, closed after each look: Celery forks pool processes from this one, and a
        # child must not inherit an open database connection.
        store = open_store()
        try:
            with store.reading() as session:
                found = driverless_runs(session)
            for run_id in found:
                with store.transaction() as session:
                    if stop_driverless(session, run_id):
                        logger.warning("nos adopter: run %s was asked to stop and lost its driver: marked stopped",
                                       run_id)
                        continue
                    due = claim_resend(session, run_id)
                if due:
                    self.app.send_task("nos.drive", args=[run_id], queue="control")
                    logger.warning("nos adopter: run %s lost its driver; sent its driver loop again", run_id)
        finally:
            store.dispose()
