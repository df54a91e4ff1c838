"""What a nos worker takes from its broker: the two tasks' messages, of the one shape nos sends.

A message of another shape could stop Celery's consumer: a body or a header it did not expect raised
in the worker's main process (an unrecoverable error: the worker exited, with status 0) or broke its
connection (and it reconnected and took the same message again, forever), and the message went back
to the queue for the next worker, so one message stopped a whole fleet. Here each is refused for good.
Below those, an item on a queue's list that is no kombu envelope at all (not JSON, headers that are not a
table, no delivery tag) failed inside kombu as it was taken off the list: the worker stopped. Such an item
is dropped with a log line (it is off the list already, and was never a message).
"""

from __future__ import annotations

from queue import Empty
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.utils.log import get_logger
from celery.worker.consumer import Consumer
from vine import promise

TASKS = ("nos.evaluate", "nos.drive")   # Celery's own built-in tasks (celery.starmap, ...) are not taken
logger = get_logger(__name__)


def header_problem(headers: Any) -> str | None:
    """What is wrong with a task message's headers, or None."""
    if not isinstance(headers, dict):
        return "its headers are not a table"
    if headers.get("task") not in TASKS:
        return f"it names task {headers.get('task')!r:.80}, not one of {', '.join(TASKS)}"
    if not isinstance(headers.get("id"), str):
        return "it has no task id"
    # Read by the worker after it has reserved the task: a bad one there left the worker reserved for good,
    # taking no other message.
    limits = headers.get("timelimit")
    if limits is not None and not (isinstance(limits, (list, tuple)) and len(limits) == 2
                                   and all(_seconds_or_none(limit) for limit in limits)):
        return f"its time limit {limits!r:.80} is not [soft, hard] seconds"
    retries = headers.get("retries")
    if retries is not None and (type(retries) is not int or retries < 0):
        return f"its retry count {retries!r:.80} is not a whole number"
    return None


def _seconds_or_none(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and 0 <= value < float("inf"))


def message_problem(payload: object) -> str | None:
    """What is wrong with a task message's decoded body, or None: nos sends `[[id], {}, {...}]` only."""
    if not isinstance(payload, (list, tuple)) or len(payload) != 3:
        return "its body is not [args, kwargs, embed]"
    args, kwargs, embed = payload
    if not isinstance(args, list) or len(args) != 1 or type(args[0]) is not int or not 0 < args[0] < 2**63:
        return "its arguments are not one id"
    if kwargs != {} or not isinstance(embed, dict):
        return "it carries keyword arguments or a malformed embed"
    if any(embed.get(key) is not None for key in ("callbacks", "errbacks", "chain", "chord")):
        return "it asks for callbacks, a chain or a chord"
    return None


def checked_strategy(task, app, consumer, **options):
    """Celery's default strategy behind a check of the message's body; InvalidTaskError rejects it for good."""
    from celery.worker.strategy import default

    handle = default(task, app, consumer, **options)

    def checked(message, body, *args, **kwargs):
        problem = message_problem(message.payload)
        if problem:
            raise InvalidTaskError(f"{task.name} message refused: {problem}")
        return handle(message, body, *args, **kwargs)

    return checked


def envelope_problem(raw: Any) -> str | None:
    """What is wrong with a decoded kombu envelope (as the Redis transport stores a message), or None.

    Checked before kombu reads it: kombu's Redis transport counts a KeyError as a lost connection (a missing
    delivery tag made the worker reconnect) and redis-py refuses a tag that is not text (the worker stopped).
    """
    if not isinstance(raw, dict):
        return "it is not a table"
    properties = raw.get("properties")
    if not isinstance(properties, dict):
        return "its properties are not a table"
    if not isinstance(properties.get("delivery_tag"), str) or not properties["delivery_tag"]:
        return "it has no delivery tag"
    info = properties.get("delivery_info")
    if not (isinstance(info, dict) and isinstance(info.get("exchange"), str)
            and isinstance(info.get("routing_key"), str)):
        return "its delivery info names no exchange and routing key"
    if raw.get("headers") is not None and not isinstance(raw["headers"], dict):
        return "its headers are not a table"
    if raw.get("body") is not None and not isinstance(raw["body"], str):
        return "its body is not text"
    return None


def guard_deliveries(transport) -> None:
    """Make `transport` drop, with a log line, an item it takes off a queue but cannot read as a message.

    Lost connections and the broker's own errors still propagate: Celery reconnects after the first and
    stops the worker (exit status 1) after the second, as it would without this guard.
    """
    read, deliver = transport.on_readable, transport._deliver   # the event loop's callback; kombu's hand-over
    passed = (Empty, *transport.connection_errors, *transport.channel_errors)

    def on_readable(fileno):
        try:
            return read(fileno)
        except passed:
            raise
        except Exception as exc:   # not JSON, or a body kombu cannot decode
            _drop(f"{type(exc).__name__}: {str(exc)[:200]}")

    def checked_deliver(raw, queue):
        problem = envelope_problem(raw)
        if problem:
            return _drop(problem)
        return deliver(raw, queue)

    transport.on_readable = on_readable
    transport._deliver = checked_deliver   # looked up on the transport at each delivery, queue and fanout alike


def _drop(problem: str) -> None:
    logger.error("message refused: the broker handed over an item that is not a message (%s)", problem)


class GuardedConsumer(Consumer):
    """Celery's consumer, refusing (rejecting without requeueing) a message whose headers are not nos's, or
    whose handling raises anything but a lost connection, and dropping an item that is not a message."""

    def connection_for_read(self, heartbeat=None):
        connection = self.app.connection_for_read(heartbeat=heartbeat)
        guard_deliveries(connection.transport)   # before the connection registers with the event loop
        return self.ensure_connected(connection)

    def create_task_handler(self, promise=promise):
        handle = super().create_task_handler(promise)

        def guarded(message):
            problem = header_problem(message.headers)
            if problem is None:
                try:
                    return handle(message)
                except self.connection_errors:
                    raise
                except Exception as exc:   # a header Celery could not read (a time limit of "abc", say)
                    problem = f"{type(exc).__name__}: {str(exc)[:200]}"
            self._refuse(message, problem)

        return guarded

    def _refuse(self, message, problem: str) -> None:
        logger.error("message refused: %s", problem)
        if not message.acknowledged:
            message.reject_log_error(logger, self.connection_errors)


__all__ = ["GuardedConsumer", "TASKS", "checked_strategy", "envelope_problem", "guard_deliveries", "header_problem",
           "message_problem"]
