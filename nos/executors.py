"""Where evaluations run: a pool of local worker processes (Celery comes behind the same interface).

An executor only carries evaluation ids; every result travels through the
database, so the driver does not care who trained what. Local workers die
with their driver, however it dies (`kill -9` included): none is left behind.
"""

from __future__ import annotations

import collections
import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing import connection
from multiprocessing.connection import Connection
from typing import Iterable, Protocol

# prctl(2): deliver a signal to this process when its parent dies (Linux).
PR_SET_PDEATHSIG = 1
# Seconds between checks that the driver is still this worker's parent (where prctl is missing).
PARENT_CHECK_SECONDS = 1.0


class WorkerStartError(RuntimeError):
    """A local worker process failed before it could take any work: a new one would fail the same way."""


# A local worker's exit status when it refused an evaluation (the run's task does not build in it, or
# its device is missing): every local worker is alike, so no other would take it either.
REFUSED_EXIT = 3


class Executor(Protocol):
    def dispatch(self, evaluation_ids: Iterable[int]) -> None: ...

    def dead_workers(self) -> list[str]:
        """Names of workers known to have died since the last call (their claims can be released)."""
        ...

    def close(self) -> None: ...


def _die_with(parent: int) -> None:
    """Exit as soon as `parent` (the driver) is gone: its claims are then left to go stale and be retaken."""
    if sys.platform.startswith("linux"):
        try:
            # Linux ties this to the thread that started the worker: the driver's loop, which starts them all.
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:   # gone already, before the line above could take effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="watch-driver").start()


def _watch_parent(parent: int) -> None:
    # An orphan is adopted by another process: its parent id changes.
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


# The signals a terminal sends the whole process group, which a local worker ignores (the driver decides).
STARTUP_BLOCKED = {signal.SIGINT, signal.SIGHUP}


def _worker_main(db_url: str, device: str | None, parent: int, pack: int, orders: Connection,
                 started: multiprocessing.Event | None = None) -> None:
    if started is not None:   # the process came up (its interpreter, the caller's main module re-imported)
        started.set()
    _die_with(parent)
    # Ctrl-C, and a closed terminal's SIGHUP, reach the whole process group: the driver decides what
    # stops, not each worker (it ends them with SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTUP_BLOCKED)   # blocked by the driver through start-up
    import torch

    from .store import open_store
    from .work import Outcome, refusal_reason, run_evaluation, worker_name

    torch.set_num_threads(1)   # one thread per process: processes, not threads, share the cores
    store = open_store(db_url)
    name = worker_name()
    while True:
        try:
            orders.send(None)   # ready for the next id
            evaluation_id = orders.recv()
        except (EOFError, OSError):   # the driver is gone
            return
        if evaluation_id is None:
            return
        try:
            outcome = run_evaluation(store, evaluation_id, worker=name, device=device, pack=pack)
        except Exception:   # the database, briefly: a claim it left is retaken when stale; this worker goes on
            traceback.print_exc()
            continue
        if outcome is Outcome.REFUSED:   # left queued, for no local worker would take it; the driver fails the run
            try:
                orders.send(("refused", refusal_reason(store, evaluation_id, device)))   # for the run's error
            except Exception:
                pass
            sys.stderr.flush()
            os._exit(REFUSED_EXIT)


@dataclass
class _Worker:
    process: multiprocessing.Process
    orders: Connection                      # the driver's end of the worker's own pipe
    started: multiprocessing.Event          # set once the process came up


class LocalExecutor:
    """N worker processes on this machine, each fed evaluation ids through a pipe of its own.

    A worker says it is ready on its pipe and is sent the next id; a thread of the driver's
    process hands ids out as workers ask. Not one queue that all workers read: a process killed
    while it waits in a shared queue's get() holds the queue's lock for good, and no worker
    would get work again.

    With `pack` K, a worker given an id claims it and up to K - 1 queued companions of the
    same task key and trains them together; their own ids, when they come, are skipped.
    """

    def __init__(self, db_url: str, workers: int, device: str | None = None, pack: int = 1):
        if device is not None:   # DeviceError now, rather than workers that refuse every evaluation
            from .devices import usable_device

            usable_device(device)
        self._context = multiprocessing.get_context("spawn")   # no forked torch or database state
        self._args = (db_url, device, os.getpid(), pack)
        self._lock = threading.Lock()          # guards what follows, shared with the handing-out thread
        self._pending: collections.deque[int] = collections.deque()
        self._ready: list[Connection] = []     # pipes of workers waiting for an id
        self._refusals: dict[Connection, str] = {}   # why a worker refused its evaluation, as it said before exiting
        self._closed = False
        self._workers = [self._start() for _ in range(workers)]
        self._hands = threading.Thread(target=self._hand_out_forever, daemon=True, name="nos-local-dispatch")
        self._hands.start()

    def _start(self) -> _Worker:
        started = self._context.Event()
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_worker_main, args=(*self._args, theirs, started), daemon=True,
                                        name="nos-worker")
        # A Ctrl-C during the second a new worker takes to start (its interpreter, the re-imported main
        # module) would print its traceback: the process inherits this thread's blocked signals, and
        # _worker_main unblocks them once it ignores them.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_BLOCKED)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        theirs.close()   # the worker holds its end alone: when it dies, ours reads the end of the pipe
        return _Worker(process, ours, started)

    @property
    def worker_names(self) -> list[str]:
        host = socket.gethostname()
        return [f"{host}:{w.process.pid}" for w in self._workers]

    def dispatch(self, evaluation_ids: Iterable[int]) -> None:
        with self._lock:
            self._pending.extend(evaluation_ids)
            self._hand_out()

    def _hand_out(self) -> None:
        """Send pending ids to ready workers (under the lock)."""
        while self._ready and self._pending and not self._closed:
            orders, evaluation_id = self._ready.pop(), self._pending.popleft()
            try:
                orders.send(evaluation_id)
            except OSError:   # it died waiting: the id goes to another
                self._pending.appendleft(evaluation_id)

    def _hand_out_forever(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                pipes = [w.orders for w in self._workers if not w.orders.closed]
            try:
                answered = connection.wait(pipes, timeout=0.2)
            except (OSError, ValueError):   # a pipe closed as it was taken up: look again
                continue
            for orders in answered:
                with self._lock:
                    if orders.closed:   # its worker was replaced meanwhile
                        continue
                    try:
                        message = orders.recv()
                    except (EOFError, OSError):   # its worker died: `dead_workers` replaces it
                        orders.close()
                        continue
                    if message is not None:   # ("refused", why): it exits, and `dead_workers` says why
                        self._refusals[orders] = str(message[1])
                        continue
                    self._ready.append(orders)
                    self._hand_out()

    def dead_workers(self) -> list[str]:
        """Replace workers that died (killed, out of memory) and name the dead ones.

        WorkerStartError where one failed on its own before it started: replacing it would only
        fail again, for ever.
        """
        host, dead = socket.gethostname(), []
        with self._lock:
            for i, worker in enumerate(self._workers):
                process = worker.process
                if process.is_alive():
                    continue
                process.join(timeout=0)
                if not worker.started.is_set() and process.exitcode and process.exitcode > 0:
                    raise WorkerStartError(
                        f"a local worker process failed while starting (exit code {process.exitcode}; its error is "
                        "printed above). From a Python script this is most often a call to nos.run_search that "
                        "is not under `if __name__ == \"__main__\":`: each worker process imports the script "
                        "again, and so starts a search of its own.")
                if process.exitcode == REFUSED_EXIT:
                    why = self._refusal_of(worker.orders) or ("the task does not build in a worker process, or "
                                                              "its device is missing there (logged above)")
                    raise WorkerStartError(
                        f"a local worker refused the run's evaluations: {why}; the workers import the task's "
                        "module afresh, from the folder and PYTHONPATH the search started with")
                dead.append(f"{host}:{process.pid}")
                if worker.orders in self._ready:
                    self._ready.remove(worker.orders)
                worker.orders.close()
                self._workers[i] = self._start()
        return dead

    def _refusal_of(self, orders: Connection) -> str | None:
        """The reason a refusing worker sent before it exited (under the lock), if it reached us."""
        try:
            while orders.poll():
                message = orders.recv()
                if message is not None:
                    self._refusals[orders] = str(message[1])
        except (EOFError, OSError):
            pass
        return self._refusals.get(orders)

    def close(self, wait: bool = False) -> None:
        """Stop the workers: after their current evaluation (wait) or now."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.clear()
        self._hands.join()
        if wait:
            for worker in self._workers:
                try:
                    worker.orders.send(None)   # read once it is done with its evaluation
                except OSError:
                    pass
            for worker in self._workers:
                worker.process.join()
        for worker in self._workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in self._workers:
            worker.process.join(timeout=10)
            worker.orders.close()
