"""A thread that keeps a hold alive in the database: an evaluation's claim, a run's driver lease."""

from __future__ import annotations

import threading
from typing import Callable

from sqlalchemy.orm import Session

from .store import Store


class Beat(threading.Thread):
    """Calls `renew(session)` in a transaction of its own every `every` seconds until `stopped` is set.

    A renewal that returns False means the hold went to someone else: `lost` turns true and the
    beating ends. A renewal that raises (a busy or briefly unreachable database) is tried again
    at the next beat.
    """

    def __init__(self, store: Store, renew: Callable[[Session], bool], every: float, name: str):
        super().__init__(daemon=True, name=name)
        self.store, self.renew, self.every = store, renew, every
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                with self.store.transaction() as session:
                    held = self.renew(session)
            except Exception:
                continue
            if not held:
                self.lost = not self.stopped.is_set()   # not merely let go of at the end
                return
