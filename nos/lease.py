"""A driver's hold on its run (store/leases.py): taken at the start, renewed from a thread, released at the end.

    with DriverLease(store, run_id) as lease:   # LeaseRefused: another driver is alive
        ...  lease.check()                      # in the loop: LeaseLost once another driver took over
        ...  lease.release(session)             # in the transaction that stops, completes or fails the run

The renewals come from a thread, so a long step of the loop (a large batch
to propose, a slow database) does not let the lease go stale.
"""

from __future__ import annotations

import threading
from types import TracebackType

from .store import Store
from .store.leases import LEASE_RENEW_SECONDS, release_lease, renew_lease, take_lease, this_process


class LeaseLost(Exception):
    """Another driver took the run over after this one missed its renewals: this one writes nothing more."""


class DriverLease:
    def __init__(self, store: Store, run_id: int, holder: str | None = None,
                 every: float = LEASE_RENEW_SECONDS):
        self.store, self.run_id, self.every = store, run_id, every
        self.holder = holder or this_process()
        self._stopped = threading.Event()
        self._lost = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "DriverLease":
        self._stopped, self._lost = threading.Event(), False
        with self.store.transaction() as session:
            take_lease(session, self.run_id, self.holder)
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.run_id}")
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost:
            return
        try:   # left without a release (an error the run's end could not record): free it now
            with self.store.transaction() as session:
                release_lease(session, self.run_id, self.holder)
        except Exception:   # the database is what failed: the lease goes stale on its own
            pass

    def _renew(self) -> None:
        while not self._stopped.wait(self.every):
            try:
                with self.store.transaction() as session:
                    held = renew_lease(session, self.run_id, self.holder)
            except Exception:   # a busy or briefly unreachable database: try again next time
                continue
            if not held:
                self._lost = not self._stopped.is_set()   # not merely released at the run's end
                return

    def check(self) -> None:
        """Raise LeaseLost once the lease has gone to another driver."""
        if self._lost:
            raise LeaseLost(self._lost_message())

    def release(self, session) -> None:
        """Free the lease in the caller's transaction; LeaseLost (roll it back) if another driver has it."""
        if not release_lease(session, self.run_id, self.holder):
            self._lost = True
            raise LeaseLost(self._lost_message())
        self._stopped.set()

    def _lost_message(self) -> str:
        return (f"run {self.run_id} was taken over by another driver after this one ({self.holder}) "
                "missed its lease renewals; this one wrote nothing more")
