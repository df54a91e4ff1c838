"""`nos worker`: a Celery worker that trains evaluations from the broker's queues."""

from __future__ import annotations

import os
import socket

import click

from nos.store import URL_ENV_VAR, StoreError, open_store, resolve_url

from .db import db_option
from .errors import UsageProblem
from .options import broker_option, device_option


def check_broker_or_exit(broker_url: str) -> None:
    from nos.workers.executor import BrokerError, check_broker

    try:
        check_broker(broker_url)
    except BrokerError as exc:
        raise UsageProblem(str(exc)) from None


def _check_device(device: str | None, queues: list[str]) -> None:
    """The worker's device must be here; a gpu-queue worker without --device trains on cuda."""
    from nos.devices import DeviceError, usable_device

    wanted = device or ("cuda" if "gpu" in queues else None)
    if wanted is None:
        return
    try:
        usable_device(wanted)
    except DeviceError as exc:
        raise UsageProblem(f"{exc}{'' if device else ' (the gpu queue trains on cuda; give --device)'}") from None


@click.command("worker")
@click.option("--queues", default="cpu", show_default=True,
              help="Comma-separated queues to take work from: cpu, gpu, control.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Evaluations trained at once (worker processes).")
@click.option("--pack", type=click.IntRange(1, 1024),
              help="Queued evaluations of one task key each process claims and trains together "
                   "[the run's pack: 32 on cuda, else 1].")
@device_option(None, unset="the run's device")
@click.option("--name", default=None, help="Worker name [nos-QUEUES@HOST].")
@db_option
@broker_option
def worker_command(queues, concurrency, pack, device, name, db_url, broker_url) -> None:
    """Start a Celery worker (runs until stopped with Ctrl-C or SIGTERM)."""
    from celery.signals import worker_shutdown

    from nos.workers.app import DEVICE_ENV_VAR, PACK_ENV_VAR, QUEUES, app

    if not broker_url:
        raise UsageProblem("nos worker needs a broker: --broker redis://HOST:6379/0 or NOS_BROKER_URL")
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = set(wanted) - set(QUEUES)
    if unknown or not wanted:
        raise UsageProblem(f"unknown queue {', '.join(sorted(unknown)) or '(none)'}; queues: {', '.join(QUEUES)}")
    if "control" in wanted and len(wanted) > 1:
        # A process that takes a run's nos.drive is busy with it until the run ends: beside cpu or gpu work,
        # as many detached runs as processes would leave nothing to train their evaluations.
        raise UsageProblem("the control queue needs a worker of its own (nos worker --queues control): a "
                           "process driving a run is busy until it ends, and could leave none to train")
    _check_device(device, wanted)
    check_broker_or_exit(broker_url)
    try:
        url = resolve_url(db_url)
        open_store(url).dispose()   # up to date and reachable, or a clear error now
    except StoreError as exc:
        raise UsageProblem(str(exc)) from None
    # The worker's processes read these when a task first needs the store or the device.
    os.environ[URL_ENV_VAR] = url.render_as_string(hide_password=False)
    if device:
        os.environ[DEVICE_ENV_VAR] = device
    if pack:
        os.environ[PACK_ENV_VAR] = str(pack)
    app.conf.broker_url = broker_url
    hostname = name or f"nos-{'-'.join(wanted)}@{socket.gethostname()}"
    # app.worker_main drops the worker's exit status: a worker stopped by an unrecoverable error exited 0,
    # and a supervisor restarting it on failure left it down. The worker says its status as it stops.
    stopped: dict[str, int] = {}

    def note_status(sender, **_) -> None:
        stopped["status"] = getattr(sender, "exitcode", 0) or 0

    worker_shutdown.connect(note_status, weak=False)
    app.worker_main(["worker", "--loglevel=INFO", "-Q", ",".join(wanted), "-c", str(concurrency),
                     "-n", hostname, "--without-gossip", "--without-mingle"])
    if stopped.get("status"):
        raise SystemExit(stopped["status"])
