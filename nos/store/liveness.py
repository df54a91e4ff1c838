"""Who is working on a database now: what `nos db upgrade` asks before it changes the schema under them.

A worker or driver reads the schema's revision once, when it opens the
database, and goes on writing what that revision holds. Upgraded under it,
it can break what the new revision relies on: a worker from before
revision 0006 takes stale evaluations without touching their claim
tickets, so a newer worker and an older one could both hold one. Live work
is told by its own signs: a driver lease renewed within LEASE_STALE_AFTER,
or an evaluation whose worker's heartbeat is fresher than its run's
`stale_after`. Works on every revision nos has had, reading only the
columns the database has.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ..config import SearchConfig
from ..finite import is_finite_number
from .clock import database_now
from .leases import DRIVABLE, LEASE_STALE_AFTER
from .models import Evaluation, Run

# Named in the refusal: enough to find them, short enough for one line.
SHOWN_RUNS = 5


@dataclass(frozen=True)
class LiveWork:
    driven: tuple[int, ...]   # runs whose driver renewed its lease lately
    training: int             # evaluations whose worker beat lately

    def __bool__(self) -> bool:
        return bool(self.driven or self.training)

    def describe(self) -> str:
        parts = []
        if self.training:
            parts.append(f"{self.training} evaluation{'s are' if self.training != 1 else ' is'} being trained")
        if self.driven:
            names = ", ".join(str(run_id) for run_id in self.driven[:SHOWN_RUNS])
            more = len(self.driven) - SHOWN_RUNS
            names += f" and {more} more" if more > 0 else ""
            parts.append(f"run{'s' if len(self.driven) != 1 else ''} {names} "
                         f"{'are' if len(self.driven) != 1 else 'is'} being driven")
        return " and ".join(parts)


def live_work(engine: Engine) -> LiveWork:
    """The runs being driven and the evaluations being trained against the database now."""
    with Session(engine) as session:
        connection = session.connection()
        inspector = sa.inspect(connection)
        if not {"runs", "evaluations"} <= set(inspector.get_table_names()):
            return LiveWork((), 0)
        run_columns = {c["name"] for c in inspector.get_columns("runs")}
        now = database_now(session)
        driven: tuple[int, ...] = ()
        if "driver_heartbeat_at" in run_columns:   # the lease came with revision 0004
            driven = tuple(session.execute(
                select(Run.id).where(Run.status.in_(DRIVABLE), Run.driver_heartbeat_at > now - LEASE_STALE_AFTER)
                .order_by(Run.id)).scalars())
        training = 0
        for run_id, config in session.execute(select(Run.id, Run.config).where(Run.status.in_(DRIVABLE))).all():
            since = now - timedelta(seconds=_stale_after(config))
            training += session.execute(
                select(func.count()).where(Evaluation.run_id == run_id, Evaluation.status == "running",
                                           Evaluation.heartbeat_at > since)).scalar_one()
        return LiveWork(driven, training)


def _stale_after(config: object) -> float:
    """The run's `stale_after`; the default where its stored config does not say (or says nonsense)."""
    value = config.get("stale_after") if isinstance(config, dict) else None
    return float(value) if is_finite_number(value) and 0 < value < 1e7 else SearchConfig.stale_after


__all__ = ["LiveWork", "live_work"]
