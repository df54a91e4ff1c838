"""The Celery app of nos workers, and its two thin tasks.

    nos worker --broker redis://HOST:6379/0 --db postgresql://... [--queues cpu|gpu|control] [--pack K]

Messages carry only ids, as JSON; every result lands in the database. Tasks
are acknowledged late and rejected (so redelivered) when their worker process
dies; claims in the database keep a redelivered or duplicate message from
training the same evaluation twice. Flower works with this app:
`celery -A nos.workers.app flower --broker=URL`.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_process_init
from celery.utils.log import get_task_logger
from kombu import Queue

from .adopter import Adopter

BROKER_ENV_VAR = "NOS_BROKER_URL"
DEVICE_ENV_VAR = "NOS_WORKER_DEVICE"
PACK_ENV_VAR = "NOS_WORKER_PACK"     # evaluations claimed and trained together (`nos worker --pack`)
QUEUES = ("cpu", "gpu", "control")

# Redis redelivers a message not acknowledged within this many seconds. It must
# exceed the longest evaluation (CIFAR-10's full protocol on a slow CPU is well
# under an hour); a redelivery of a live evaluation is refused by its claim anyway.
VISIBILITY_TIMEOUT = 6 * 3600
# A refused `nos.drive` is tried again this many times, each when the lease it met would go stale:
# a dead driver's lease is free after one wait; a live one is renewed, and the duplicate gives up.
DRIVE_RETRIES = 3

app = Celery("nos", broker=os.environ.get(BROKER_ENV_VAR))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],          # nothing from the broker is unpickled
    result_serializer="json",
    task_ignore_result=True,          # results live in the database
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,     # a worker takes one evaluation at a time
    task_queues=[Queue(name) for name in QUEUES],
    task_default_queue="cpu",
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Every message is checked before Celery reads it: a malformed one is refused for good, not requeued.
    worker_consumer="nos.workers.messages:GuardedConsumer",
)

# Control workers send again the driver loop of detached runs left without a driver.
app.steps["worker"].add(Adopter)

_store = None
logger = get_task_logger(__name__)


@worker_process_init.connect
def _one_thread(**_) -> None:
    import torch

    torch.set_num_threads(1)   # one thread per worker process: processes, not threads, share the cores


def _open_store():
    global _store
    if _store is None:
        from nos.store import open_store

        _store = open_store()   # NOS_DB_URL, set by `nos worker --db`
    return _store


STRATEGY = "nos.workers.messages:checked_strategy"


@app.task(name="nos.evaluate", Strategy=STRATEGY)
def evaluate(evaluation_id: int) -> str:
    """Evaluate one evaluation id (and, with a pack, queued companions): the function the local executor runs."""
    from nos.work import Outcome, run_evaluation

    outcome = run_evaluation(_open_store(), int(evaluation_id), device=os.environ.get(DEVICE_ENV_VAR) or None,
                             pack=int(os.environ.get(PACK_ENV_VAR) or 0) or None)
    if outcome is Outcome.REFUSED:   # left queued: the driver sends it again, for a worker with the device
        logger.warning("refused evaluation %s: this worker lacks the run's device or cannot build its task "
                       "(the reason is logged above)", evaluation_id)
    return outcome.value


@app.task(name="nos.drive", bind=True, max_retries=DRIVE_RETRIES, Strategy=STRATEGY)
def drive(self, run_id: int) -> str:
    """Drive a run's search loop (`nos enqueue --detach`), dispatching its evaluations through Celery.

    Takes the run's driver lease first. A run stopped meanwhile is left alone. A run another driver
    holds is tried again when that lease would go stale: a control worker's process killed mid-run
    has its message redelivered at once, possibly to another host, while the dead driver's lease
    still looks live there; refused for good, the run would wait undriven for a `nos resume`.
    """
    from nos.driver import RunNotHere, drive_run
    from nos.store.leases import LeaseRefused

    try:
        return drive_run(_open_store(), int(run_id), broker_url=app.conf.broker_url)
    except RunNotHere as exc:
        logger.error("not driving run %s: %s", run_id, exc)
        return "refused"
    except LeaseRefused as exc:
        wait = _lease_wait(int(run_id))
        if wait is not None and self.request.retries < self.max_retries:
            logger.warning("run %s: %s; trying again in %.0f s, when that lease would go stale", run_id, exc, wait)
            raise self.retry(countdown=wait) from None
        logger.warning("not driving run %s: %s", run_id, exc)
        return "refused"
    except Exception as exc:
        # Failed before its driver took the run (the task does not build here, its data is missing): the
        # acknowledged message is gone, and the run would sit `running` with no driver and no word why.
        from nos.control import fail_undriven

        if fail_undriven(_open_store(), int(run_id), f"its control worker could not drive it: "
                                                     f"{type(exc).__name__}: {exc}"):
            logger.error("run %s failed before its driver started: %s", run_id, exc)
        raise


def _lease_wait(run_id: int) -> float | None:
    """Seconds until the run's lease goes stale if it is still to be driven by someone; None if it is not."""
    from nos.store.leases import DRIVABLE, read_lease

    with _open_store().reading() as session:
        lease = read_lease(session, run_id)
    if lease is None or lease.status not in DRIVABLE or lease.holder is None:
        return None
    return lease.seconds_to_stale() + 1.0
