"""Dispatch evaluation ids through Celery: the executor the driver uses when a broker is configured."""

from __future__ import annotations

import sys
from typing import Iterable

from kombu.exceptions import OperationalError

from nos.redact import mask_credentials, mask_url

from .app import app


class BrokerError(Exception):
    """The broker URL is wrong or the broker does not answer."""


def check_broker(broker_url: str) -> None:
    """Connect once, so a wrong URL or a broker that is down fails now, in one line."""
    if not broker_url.startswith(("redis://", "rediss://")):
        raise BrokerError(f"broker URL must be redis://HOST:PORT/DB, got {mask_url(broker_url)!r}")
    try:
        with app.connection_for_write(broker_url) as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
    except (OperationalError, OSError) as exc:
        raise BrokerError(f"cannot reach the broker at {mask_url(broker_url)}: {mask_credentials(str(exc))}") from None
    except (TypeError, ValueError) as exc:   # kombu's URL parser: a password twice, a port that is no number
        raise BrokerError(f"bad broker URL {mask_url(broker_url)!r}: {mask_credentials(str(exc))}") from None


class CeleryExecutor:
    """Sends each evaluation id to a Celery queue (`cpu` or `gpu`); workers anywhere take them."""

    def __init__(self, broker_url: str, queue: str = "cpu"):
        check_broker(broker_url)
        app.conf.broker_url = broker_url
        self.queue = queue

    def dispatch(self, evaluation_ids: Iterable[int]) -> None:
        """Send each id; with the broker away (a restart), say so and go on: the evaluations stay queued in
        the database, and the driver sends them again once they have waited past stale_after."""
        ids = [int(i) for i in evaluation_ids]
        for done, evaluation_id in enumerate(ids):
            try:
                app.send_task("nos.evaluate", args=[evaluation_id], queue=self.queue)
            except (OperationalError, OSError) as exc:
                print(f"nos: the broker is unreachable ({mask_credentials(str(exc))}); {len(ids) - done} "
                      "evaluations stay queued and are sent again later", file=sys.stderr, flush=True)
                return

    def dead_workers(self) -> list[str]:
        return []   # remote workers are reaped by their stale heartbeats instead

    def untaken_hint(self) -> str:
        """What to do when no worker takes the run's evaluations: where they wait, and what takes them."""
        broker = mask_url(app.conf.broker_url or "")
        return (f"they wait in the {self.queue} queue of {broker}: start a worker with `nos worker --broker "
                f"{broker} --queues {self.queue}` (without --broker or $NOS_BROKER_URL, nos trains on local workers)")

    def close(self) -> None:
        pass


def send_drive(broker_url: str, run_id: int) -> None:
    """Queue a run's driver loop on the `control` queue (`--detach`)."""
    check_broker(broker_url)
    app.conf.broker_url = broker_url
    app.send_task("nos.drive", args=[int(run_id)], queue="control")


def live_workers(broker_url: str, timeout: float = 1.0) -> dict[str, tuple[str, ...]]:
    """The workers that answer, by name, with the queues each takes (a ping says who, not what it takes)."""
    app.conf.broker_url = broker_url
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    return {name: tuple(sorted(q.get("name", "?") for q in queues if isinstance(q, dict)))
            for name, queues in sorted(replies.items()) if isinstance(queues, list)}
