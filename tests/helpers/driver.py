"""Running `nos` in real processes and reading back what a run stored."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import select

from nos.store import open_store
from nos.store.models import Evaluation, Rule, Run

# A few tenths of a second per evaluation: long enough to kill a driver mid-batch.
TINY = dict(task="digits", budget=12, update_every=4, depth=1, workers=2, seed=3, stale_after=3.0,
            heartbeat_every=1.0, task_options={"train_size": 300, "lrs": [0.01, 0.1], "epochs": 1})
TINY_TOML = """
task = "digits"
budget = 12
update_every = 4
depth = 1
workers = 2
seed = 3
stale_after = 3.0
heartbeat_every = 1.0

[task_options]
train_size = 300
lrs = [0.01, 0.1]
epochs = 1
"""


def nos(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nos.cli.main", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def _as_from_a_terminal() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and nohup SIGHUP, and the
    # ignoring is inherited (nos keeps it): under such a CI runner neither would reach the driver. A
    # terminal's do.
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def start_nos(*args: str) -> subprocess.Popen:
    # Its own process group, so a test can kill the driver together with its workers.
    return subprocess.Popen([sys.executable, "-m", "nos.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_as_from_a_terminal)


@contextmanager
def driving(*args: str) -> Iterator[subprocess.Popen]:
    """A `nos` driver process (`start_nos`) for the block; killed at the end if it is still running."""
    driver = start_nos(*args)
    try:
        yield driver
    finally:
        if driver.poll() is None:
            driver.kill()


def run_rows(url: str, run_id: int) -> list[Evaluation]:
    store = open_store(url)
    with store.reading() as session:
        rows = session.execute(select(Evaluation).where(Evaluation.run_id == run_id)
                               .order_by(Evaluation.seq)).scalars().all()
    store.dispose()
    return rows


def rule_sequence(url: str, run_id: int) -> list[tuple[int, str, float]]:
    store = open_store(url)
    with store.reading() as session:
        rows = session.execute(select(Evaluation.seq, Rule.text, Evaluation.reward).join(Rule)
                               .where(Evaluation.run_id == run_id).order_by(Evaluation.seq)).all()
    store.dispose()
    return [tuple(r) for r in rows]


def wait_for(predicate, timeout: float = 120, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def finished_count(url: str, run_id: int) -> int:
    """Finished evaluations that count toward the budget (not the rejected ones)."""
    return sum(e.status in ("done", "diverged", "failed", "cached") for e in run_rows(url, run_id))


def assert_complete(url: str, run_id: int, budget: int) -> None:
    rows = run_rows(url, run_id)
    assert [e.seq for e in rows] == list(range(len(rows)))   # contiguous, no duplicates
    assert sum(e.status != "rejected" for e in rows) == budget   # rejections are free
    assert all(e.status in ("done", "diverged", "rejected", "cached") for e in rows)
    assert all(e.reward is not None for e in rows)
    store = open_store(url)
    with store.reading() as session:
        assert session.get(Run, run_id).status == "completed"
        fingerprints = dict(session.execute(select(Rule.id, Rule.fingerprint)).all())
    store.dispose()
    # Nothing trained twice: neither the same rule nor the same behaviour.
    trained = [fingerprints[e.rule_id] or e.rule_id for e in rows if e.status in ("done", "diverged")]
    assert len(trained) == len(set(trained))
    for e in rows:
        if e.status == "rejected":
            assert e.reward == 0
            assert e.reason
            assert e.worker is None
        if e.status == "cached" and e.reason:   # reused from an equivalent rule
            source = next(r for r in rows if r.id == e.cached_from)
            assert fingerprints[source.rule_id] == fingerprints[e.rule_id]
            assert source.rule_id != e.rule_id


def has_run(url: str) -> bool:
    """Whether the database at `url` exists, is migrated and holds run 1."""
    try:
        store = open_store(url)
    except Exception:
        return False
    try:
        with store.reading() as session:
            return session.get(Run, 1) is not None
    finally:
        store.dispose()


class InlineExecutor:
    """An executor that trains each evaluation in this process as it is dispatched, in dispatch order
    (`nos.work.run_evaluation`, what every worker runs): results arrive in the order they were sent, so an
    asynchronous run is reproducible. `crash_after` evaluations in, it raises Crash instead, as a driver
    killed at that point leaves the database."""

    class Crash(Exception):
        pass

    def __init__(self, url: str, crash_after: int | None = None):
        self.store = open_store(url)
        self.crash_after = crash_after
        self.evaluated = 0

    def dispatch(self, evaluation_ids) -> None:
        from nos.work import run_evaluation

        for evaluation_id in evaluation_ids:
            if self.crash_after is not None and self.evaluated >= self.crash_after:
                raise InlineExecutor.Crash(f"crashed after {self.evaluated} evaluations")
            run_evaluation(self.store, evaluation_id, worker="inline:1")
            self.evaluated += 1

    def dead_workers(self) -> list[str]:
        return []

    def close(self) -> None:
        self.store.dispose()


def learned_updates(url: str, run_id: int) -> list[list[int]]:
    """The evaluation ids each update of an asynchronous run learned from, in order (its checkpoints' record)."""
    from nos.store.checkpoints import checkpoint_states

    store = open_store(url)
    with store.reading() as session:
        states = checkpoint_states(session, run_id)
    store.dispose()
    return [ids for state in states for ids in state["updates"]]


def assert_learned_once(url: str, run_id: int, update_every: int) -> None:
    """Every finished evaluation of the run was learned from by exactly one update, and every update but
    the last took exactly `update_every` counted results."""
    rows = {e.id: e for e in run_rows(url, run_id)}
    updates = learned_updates(url, run_id)
    consumed = [i for ids in updates for i in ids]
    assert sorted(consumed) == sorted(rows)   # none lost, none twice
    counted = [sum(rows[i].status != "rejected" for i in ids) for ids in updates]
    assert all(n == update_every for n in counted[:-1]), counted
    assert 0 < counted[-1] <= update_every
