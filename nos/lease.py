"""A driver's hold on its run (store/leases.py): taken at the start, renewed from a thread, released at the end.

    with DriverLease(store, run_id) as lease:   # LeaseRefused: another driver is alive
        ...  lease.check()                      # in the loop: LeaseLost once another driver took over
        ...  lease.hold(session)                # in a transaction that writes the run's batches or checkpoints
        ...  lease.release(session)             # in the transaction that stops, completes or fails the run

The renewals come from a thread, so a long step of the loop (a large batch
to propose, a slow database) does not let the lease go stale.
"""

from __future__ import annotations

from types import TracebackType

from .beat import Beat
from .store import Store
from .store.leases import LEASE_RENEW_SECONDS, release_lease, renew_lease, take_lease, this_process


class LeaseLost(Exception):
    """Another driver took the run over after this one missed its renewals: this one writes nothing more."""


class DriverLease:
    def __init__(self, store: Store, run_id: int, holder: str | None = None,
                 every: float = LEASE_RENEW_SECONDS):
        self.store, self.run_id, self.every = store, run_id, every
        self.holder = holder or this_process()
        self._found_lost = False   # another driver held it when this one came to write or release it
        self._beat: Beat | None = None

    @property
    def _lost(self) -> bool:
        return self._found_lost or (self._beat is not None and self._beat.lost)

    def __enter__(self) -> "DriverLease":
        self._found_lost = False
        with self.store.transaction() as session:
            take_lease(session, self.run_id, self.holder)
        self._beat = Beat(self.store, lambda session: renew_lease(session, self.run_id, self.holder), self.every,
                          f"lease-{self.run_id}")
        self._beat.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._beat is not None:
            self._beat.stopped.set()
            self._beat.join()
        if self._lost:
            return
        try:   # left without a release (an error the run's end could not record): free it now
            with self.store.transaction() as session:
                release_lease(session, self.run_id, self.holder)
        except Exception:   # the database is what failed: the lease goes stale on its own
            pass

    def check(self) -> None:
        """Raise LeaseLost once the lease has gone to another driver."""
        if self._lost:
            raise LeaseLost(self._lost_message())

    def hold(self, session) -> None:
        """Renew the lease in the caller's transaction; LeaseLost (roll it back) if another driver has it.

        The renewal thread notices a takeover only at its next renewal: a driver cut off from the
        database for longer than the lease lasts, then back, would write one more batch or checkpoint
        beside the new driver's. Checked in the writing transaction, the lease fences those writes:
        the row it updates stays locked (SQLite: the database) until the transaction ends.
        """
        if self._lost or not renew_lease(session, self.run_id, self.holder):
            self._found_lost = True
            raise LeaseLost(self._lost_message())

    def release(self, session) -> None:
        """Free the lease in the caller's transaction; LeaseLost (roll it back) if another driver has it."""
        if not release_lease(session, self.run_id, self.holder):
            self._found_lost = True
            raise LeaseLost(self._lost_message())
        if self._beat is not None:
            self._beat.stopped.set()

    def _lost_message(self) -> str:
        return (f"run {self.run_id} was taken over by another driver after this one ({self.holder}) "
                "missed its lease renewals; this one wrote nothing more")
