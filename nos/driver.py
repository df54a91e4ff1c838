"""The search loop of one run, in one of two modes (config `synchronous`).

The asynchronous loop (the default; nos/asynchronous.py) keeps `in_flight`
evaluations queued or running and updates the searcher whenever
`update_every` new results have arrived. The synchronous loop, here:

    propose a batch -> store its rules, queued evaluations and a checkpoint in one
    transaction -> dispatch the ids -> wait, reading rewards from the database ->
    observe -> next batch, until the budget is spent.

The budget counts evaluations that train or are answered from the cache.
Proposals the probe rejects cost milliseconds: they are stored (status
`rejected`, reward 0) and the searcher learns from them, but a step keeps
proposing until it has `update_every` counted evaluations (or what is left of
the budget). A step that meets MAX_REJECTED_PER_STEP rejections first stops
the run with SearchStuck. Evaluations that `failed` (a crashed worker, a bug:
not the rule's fault) count toward the budget but are left out of learning;
FAILING_START of them (or all of a smaller budget) with none trained since the
driver began stop the run with SearchStuck too (a broken task or fleet would
fail the whole budget).

Checkpoint k is written with batch k: the searcher's state after proposing it
(its generator included) and the batch's sampled token sequences. A driver
that dies anywhere resumes from the latest checkpoint: if its batch is in the
database it waits for that batch and observes it, exactly as the dead driver
would have; if not (the final checkpoint) there is nothing left to do.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from .config import SearchConfig
from .executors import Executor
from .lease import DriverLease, LeaseLost
from .resume import restore_searcher
from .rules.fingerprint import Verdict, probe
from .search import Proposal, Searcher, make_searcher, state_to_bytes
from .store import (
    NewEvaluation,
    RuleRecord,
    Store,
    batch_evaluations,
    enqueue_batch,
    equivalence_reason,
    find_cached,
    find_equivalent,
    get_or_create_rules,
    get_run,
    latest_checkpoint,
    requeue_stale,
    save_checkpoint,
    set_run_status,
)
from .store.engine import first_line, shown
from .store.evaluations import refusals, rekey_queued, release_claims, release_the_departed
from .store.models import COUNTED_STATUSES as COUNTED, FINISHED_STATUSES as FINISHED, Evaluation, Rule
from .store.outages import is_transient, retrying
from .work import task_for, task_key

POLL_SECONDS = 0.2
UNFINISHED = ("queued", "running")
# Set by the command line's signal handlers (Ctrl-C, SIGTERM, SIGHUP): the driver stops cleanly at
# its next poll. A flag, not the KeyboardInterrupt Python raises by default: that lands wherever the
# main thread happens to be, in a `finally` half done, or in a garbage collector's callback, where it
# is printed and lost (and a run asked to stop went on to its end).
STOP_ASKED = threading.Event()
# Rejected proposals a step may make before the run stops: a searcher stuck on hopeless rules.
MAX_REJECTED_PER_STEP = 1000
# The longest wait, in seconds, before a still-queued evaluation is sent again (see Driver._resend_after).
RESEND_AT_MOST = 600.0
# Evaluations failed, none trained, since a driver began: the task or the workers are broken (a
# rule's own trouble ends as `diverged`, not `failed`), and the rest of the budget would fail alike.
FAILING_START = 5
# The least wait, in seconds, with evaluations sent and none taken by a remote worker, before the driver says so
# (the wait is the run's stale_after where that is longer; see _say_if_untaken).
UNTAKEN_AFTER = 10.0


@dataclass
class Progress:
    """What the driver tells its caller after each change: for progress bars."""

    run_id: int
    finished: int               # counted evaluations finished (rejections are not counted)
    budget: int
    best_reward: float | None
    batch: int


class StopRequested(Exception):
    """`nos stop` asked this run to stop."""


class SearchStuck(RuntimeError):
    """The search cannot go anywhere: the searcher proposed MAX_REJECTED_PER_STEP rules in one step that
    the probe rejected, or FAILING_START evaluations failed and none trained since the driver began."""


def sample_step(searcher: Searcher, n: int, use_probe: bool = True) -> tuple[list[Proposal], list[Verdict | None]]:
    """One step's proposals: until `n` of them pass the probe, the rejected ones kept among them.

    All come from one policy (the searcher learns nothing in between); SearchStuck after
    MAX_REJECTED_PER_STEP rejections.
    """
    proposals: list[Proposal] = []
    verdicts: list[Verdict | None] = []
    accepted = rejected = 0
    while accepted < n:
        for proposal in searcher.propose(n - accepted):
            verdict = probe(proposal.tree) if use_probe else None
            proposals.append(proposal)
            verdicts.append(verdict)
            if verdict is not None and verdict.rejection:
                rejected += 1
            else:
                accepted += 1
        if rejected >= MAX_REJECTED_PER_STEP and accepted < n:
            raise SearchStuck(
                f"the {searcher.name} searcher proposed {rejected} rules in one step that the probe "
                f"rejected before finding {n} to train (it found {accepted}); "
                f"try another seed or searcher, a warm start, or --no-probe")
    return proposals, verdicts


class Driver:
    def __init__(self, store: Store, run_id: int, config: SearchConfig, executor: Executor,
                 on_progress: Callable[[Progress], None] | None = None):
        self.store = store
        self.run_id = run_id
        self.config = config
        self.executor = executor
        self.on_progress = on_progress or (lambda progress: None)
        # The driver only needs the task's configuration key; it loads the data on the CPU.
        self.task = task_for(config, "cpu")
        self.task_key = task_key(self.task, config.children_seed)
        self.searcher: Searcher = self._new_searcher()
        self.best: float | None = None
        # Repeats of a rule within the open batch, held back until the first is scored
        # (then a worker copies its result): evaluation id -> the first one's id.
        self.held: dict[int, int] = {}
        self.dispatched_at: dict[int, float] = {}   # evaluation id -> when last sent (monotonic)
        self.resent: dict[int, int] = {}            # evaluation id -> times sent again as lost
        self.lease = DriverLease(store, run_id)   # one driver per run (nos/lease.py)
        self.outcomes_before: tuple[int, int] | None = None   # (failed, trained) when this driver began
        self.trained_since_start = False
        # Claims of the run's evaluations when this driver began, and when it began; None once one was taken.
        self.untaken: tuple[int | None, float] | None = (None, time.monotonic())

    # -- the loop ----------------------------------------------------------------
    def run(self) -> str:
        """Drive the run to its budget; returns the run's final status (completed or stopped).

        Ctrl-C (KeyboardInterrupt) and `nos stop` both leave a stopped, consistent run.
        LeaseRefused: another driver is alive; LeaseLost: another took over, and this one wrote nothing more.
        """
        with self.lease:
            # Claims of workers that died with the driver before this one: queued again, uncounted, and
            # sent as the loop resumes (not left to the stale-claim sweep).
            with self.store.transaction() as session:
                release_the_departed(session, self.run_id)
                rekey_queued(session, self.run_id, self.task_key)
            if self.config.synchronous:
                return self._guarded(self._drive)
            from .asynchronous import AsynchronousLoop

            return self._guarded(lambda: AsynchronousLoop(self).drive())

    def _guarded(self, drive: Callable[[], None]) -> str:
        """Run `drive` to the end of the budget; a stop or an error leaves the run consistent.

        A database briefly away (nos.store.outages) is waited for, then `drive` starts over from
        the latest checkpoint, as a resume would; workers go on meanwhile, their results kept.
        """
        tries = 0

        def attempt() -> None:
            nonlocal tries
            if tries:
                if self._completed():   # its end was committed, and the answer lost with the connection
                    return
                self._start_over()
            tries += 1
            drive()

        try:
            retrying(self.store, attempt, what=f"the driver of run {self.run_id}", stop=STOP_ASKED.is_set)
        except (KeyboardInterrupt, StopRequested):
            return self._stop_as_asked()
        except Exception as exc:
            if STOP_ASKED.is_set() and is_transient(exc):   # asked to stop while waiting for the database
                return self._stop_as_asked()
            self._fail(exc)   # mark the run failed (resumable), then let the caller see why
            raise
        return "completed"

    def _stop_as_asked(self) -> str:
        """Stop: the run marked stopped, its workers' claims given back. Asked while the database is away
        (locked, restarting), the run is stopped, not failed: if the database still does not answer, the
        run stays as it was, its lease going stale, and `nos resume` takes it up."""
        try:
            self._stop()
        except LeaseLost:
            if not self._completed():
                raise
            return "completed"   # the stop came a moment after the run's end was committed, its lease given up
        except Exception as exc:
            if not is_transient(exc):
                raise
            self.executor.close()
            print(f"nos: the database did not answer the stop ({first_line(exc)}); run {self.run_id} is left "
                  f"without a driver: `nos resume {self.run_id}` continues it", file=sys.stderr)
        return "stopped"

    def _completed(self) -> bool:
        with self.store.reading() as session:
            return get_run(session, self.run_id).status == "completed"

    def _start_over(self) -> None:
        """Forget what the loop held in memory: the next starts from the latest checkpoint with a searcher made
        afresh (this one may have learned from results that checkpoint does not record)."""
        self.searcher = self._new_searcher()
        self.held.clear()
        self.dispatched_at.clear()
        self.resent.clear()

    def _new_searcher(self) -> Searcher:
        config = self.config
        return make_searcher(config.searcher, config.depth, config.seed, warm_start=config.warm_start,
                             **config.hyperparameters)

    def _drive(self) -> None:
        step, tokens = self._restore()
        while True:
            batch = self._batch(step)
            if not batch:
                if self._count(statuses=COUNTED) >= self.config.budget:
                    break
                tokens = self._propose(step)
            else:   # resumed in the middle of this batch: its repeats wait for their first, as they did
                self._resend(self._unfinished(step), {})
            scored = self._wait(step)
            self.searcher.observe([tokens[i] for i in scored], [scored[i] for i in scored])
            step += 1
        self._complete(step, {"batch": step, "tokens": []})

    def _complete(self, step: int, state: dict) -> None:
        """The final checkpoint and the run's end, in one transaction."""
        with self.store.transaction() as session:
            self._check_not_all_failing(session)   # the last failures may have come after the last poll
            self.lease.release(session)
            save_checkpoint(session, self.run_id, step, state, self._rng_state(),
                            state_to_bytes(self.searcher.state_dict()))
            set_run_status(session, self.run_id, "completed")

    def _restore(self) -> tuple[int, list[list[int]]]:
        with self.store.reading() as session:
            checkpoint = latest_checkpoint(session, self.run_id)
            if checkpoint is None:
                return 0, []
            state = self._restore_from(checkpoint)
            self.best = session.execute(
                select(func.max(Evaluation.reward)).where(Evaluation.run_id == self.run_id)).scalar_one()
            return checkpoint.step, state["tokens"]

    def _restore_from(self, checkpoint) -> dict:
        """Load `checkpoint` into the searcher; its state. CheckpointUnreadable fails the run (`_guarded`)
        with the reason, rather than leaving it running."""
        return restore_searcher(self.searcher, checkpoint, self.config.synchronous)

    def _propose(self, step: int) -> list[list[int]]:
        n = min(self.config.update_every, self.config.budget - self._count(statuses=COUNTED))
        proposals, verdicts = sample_step(self.searcher, n, self.config.probe)
        tokens = [list(p.tokens) for p in proposals]
        stored = self._store(step, proposals, verdicts, (step, {"batch": step, "tokens": tokens}))
        self._send(stored, {})   # repeats within the batch wait for the first
        return tokens

    def _store(self, batch: int, proposals: list[Proposal], verdicts: list[Verdict | None],
               checkpoint: tuple[int, dict] | None) -> list[tuple[int, object, NewEvaluation]]:
        """Store a batch's rules and evaluations, and a checkpoint (step, state) if given, in one
        transaction; returns each evaluation's id, its repeat key (same fingerprint or rule) and entry."""
        with self.store.transaction() as session:
            self.lease.hold(session)
            rule_ids = get_or_create_rules(session, [
                RuleRecord.from_tree(p.tree, v.fingerprint if v else None) for p, v in zip(proposals, verdicts)])
            entries = [self._entry(session, rule_id, verdict, proposal)
                       for rule_id, verdict, proposal in zip(rule_ids, verdicts, proposals)]
            ids = enqueue_batch(session, self.run_id, batch, entries)
            if checkpoint is not None:
                step, state = checkpoint
                save_checkpoint(session, self.run_id, step, state, self._rng_state(),
                                state_to_bytes(self.searcher.state_dict()))
        keys = [verdict.fingerprint if verdict else rule_id for rule_id, verdict in zip(rule_ids, verdicts)]
        return list(zip(ids, keys, entries))

    def _send(self, stored: list[tuple[int, object, NewEvaluation]], first: dict[object, int]) -> None:
        """Dispatch what must train; a repeat of a rule in `first` (key -> the evaluation that trains it)
        waits for that one, whose result a worker then copies."""
        dispatch = []
        for evaluation_id, key, entry in stored:
            if entry.cached_from is not None or entry.rejected:
                continue
            if key in first:
                self.held[evaluation_id] = first[key]
            else:
                first[key] = evaluation_id
                dispatch.append(evaluation_id)
        self._dispatch(dispatch)

    def _unfinished(self, batch: int) -> list[tuple[Evaluation, str | None]]:
        """The batch's queued and running evaluations in proposal order, each with its rule's fingerprint."""
        with self.store.reading() as session:
            return list(session.execute(
                select(Evaluation, Rule.fingerprint).join(Rule, Rule.id == Evaluation.rule_id)
                .where(Evaluation.run_id == self.run_id, Evaluation.batch == batch,
                       Evaluation.status.in_(UNFINISHED)).order_by(Evaluation.seq)).all())

    def _resend(self, unfinished: list[tuple[Evaluation, str | None]], first: dict[object, int]) -> None:
        """After a resume, send the queued evaluations again: the first of each rule (or behaviour) only,
        its repeats held until it is scored, as `_send` did when they were proposed."""
        dispatch = []
        for e, fingerprint in unfinished:
            key = fingerprint if self.config.probe and fingerprint else e.rule_id
            if key in first:
                self.held[e.id] = first[key]
                continue
            first[key] = e.id
            if e.status == "queued":
                dispatch.append(e.id)
        self._dispatch(dispatch)

    def _entry(self, session, rule_id: int, verdict: Verdict | None, proposal: Proposal) -> NewEvaluation:
        """How a proposed rule enters the queue: rejected, a copy of an earlier result, or to train.

        The probe's rejection comes first, so that whether a proposal counts toward the budget
        is known before anything is stored (`sample_step`).
        """
        common = dict(rule_id=rule_id, task=self.task.name, task_key=self.task_key,
                      tokens=[int(t) for t in proposal.tokens], log_prob=proposal.log_prob)
        if verdict is not None and verdict.rejection:
            return NewEvaluation(**common, rejected=True, reason=verdict.rejection)
        source = find_cached(session, rule_id, self.task_key)   # the same rule, scored before
        if source is not None:
            return NewEvaluation(**common, cached_from=source.id)
        if verdict is None:
            return NewEvaluation(**common)
        source = find_equivalent(session, verdict.fingerprint, self.task_key)   # a rule that behaves the same
        if source is not None:
            return NewEvaluation(**common, cached_from=source.id, reason=equivalence_reason(session, source))
        return NewEvaluation(**common)

    def _dispatch(self, ids: list[int]) -> None:
        now = time.monotonic()
        for evaluation_id in ids:
            self.dispatched_at[evaluation_id] = now
        self.executor.dispatch(ids)

    def _tend(self) -> None:
        """One poll's upkeep: the lease, `nos stop`, and dead workers' and stale claims back in the queue."""
        if STOP_ASKED.is_set():
            raise StopRequested()
        self.lease.check()
        with self.store.transaction() as session:
            if get_run(session, self.run_id).status == "stopping":
                raise StopRequested()
            redo = release_claims(session, self.run_id, self.executor.dead_workers(),
                                  max_attempts=self.config.max_attempts)
            sweep = requeue_stale(session, self.run_id, timedelta(seconds=self.config.stale_after),
                                  self.config.max_attempts)
            self._check_not_all_failing(session)
            self._say_if_untaken(session)
        self._dispatch(redo + sweep.requeued)

    def _say_if_untaken(self, session) -> None:
        """One line on stderr when no remote worker took any of the run's evaluations for stale_after seconds
        (at least UNTAKEN_AFTER) since this driver began: none is running, or none takes this queue (a
        broker given by $NOS_BROKER_URL alone sends a search to Celery workers nobody started)."""
        hint = getattr(self.executor, "untaken_hint", None)
        if self.untaken is None or hint is None:
            return
        claims = session.execute(select(func.coalesce(func.sum(Evaluation.claims), 0))
                                 .where(Evaluation.run_id == self.run_id)).scalar()
        before, since = self.untaken
        if before is None:
            self.untaken = claims, since
        elif claims > before:
            self.untaken = None
        elif self.dispatched_at and time.monotonic() - since >= max(UNTAKEN_AFTER, self.config.stale_after):
            _, refused = refusals(session, self.run_id)
            why = (f"workers refuse them (the last: {refused})" if refused else
                   "none runs, all are busy elsewhere, or they use another database, which their logs say")
            print(f"nos: no worker has taken an evaluation of run {self.run_id} in {time.monotonic() - since:.0f} s "
                  f"({why}); {hint()}", file=sys.stderr, flush=True)
            self.untaken = None   # said once

    def _check_not_all_failing(self, session) -> None:
        """SearchStuck when FAILING_START evaluations failed and none trained since this driver began, or
        fewer where the budget left when it began is smaller: a budget of 4 that all failed ended `completed`."""
        if self.trained_since_start:   # then it can never fire: no need to count at every poll
            return
        counts = dict(session.execute(
            select(Evaluation.status, func.count()).where(Evaluation.run_id == self.run_id)
            .where(Evaluation.status.in_(("failed", "done", "diverged", "cached"))).group_by(Evaluation.status)).all())
        # A copy from the cache says nothing of whether the workers can train: a second run of a seed starts
        # with cache hits, and counting them as trained switched the check off for good.
        failed, trained = counts.get("failed", 0), counts.get("done", 0) + counts.get("diverged", 0)
        if self.outcomes_before is None:
            self.outcomes_before = failed, trained, sum(counts.values())
        failed, trained = failed - self.outcomes_before[0], trained - self.outcomes_before[1]
        self.trained_since_start = trained > 0
        left = self.config.budget - self.outcomes_before[2]
        if failed >= max(min(FAILING_START, left), 1) and not self.trained_since_start:
            error = session.execute(select(Evaluation.error).where(
                Evaluation.run_id == self.run_id, Evaluation.status == "failed")
                .order_by(Evaluation.finished_at.desc()).limit(1)).scalar()
            said = (error or "no error recorded").strip().splitlines()[-1][:300]   # a traceback's last line
            then = (f"`nos resume {self.run_id}`" if failed < left else
                    "start the search again with `nos enqueue` (this run's budget is spent)")
            raise SearchStuck(f"{failed} evaluations failed and none trained (the last: {said}); fix the cause, "
                              f"then {then}")

    def _release(self, rows: list[Evaluation]) -> None:
        """Send the held repeats whose first has finished (one not among `rows` has), and ids lost on
        their way: a worker killed between taking one and claiming it, a broker that lost its queue,
        so still queued long after dispatch."""
        status = {e.id: e.status for e in rows}
        ready = [i for i, original in self.held.items() if status.get(original, "done") in FINISHED]
        for i in ready:
            del self.held[i]
        now = time.monotonic()
        lost = [e.id for e in rows if e.status == "queued" and e.id not in self.held
                and now - self.dispatched_at.get(e.id, now) > self._resend_after(e.id)]
        for i in lost:
            self.resent[i] = self.resent.get(i, 0) + 1
        self._dispatch(ready + lost)

    def _resend_after(self, evaluation_id: int) -> float:
        """Seconds after its last send that a still-queued evaluation is taken for lost: stale_after, doubled at
        each send again up to RESEND_AT_MOST. An evaluation that merely waits for a busy or absent fleet would
        otherwise add a message to the broker's queue every stale_after for as long as it waits."""
        return min(self.config.stale_after * 2 ** self.resent.get(evaluation_id, 0),
                   max(RESEND_AT_MOST, self.config.stale_after))

    def _wait(self, step: int) -> dict[int, float]:
        """Block until batch `step` is finished; the rewards of its scored evaluations by position
        in the batch (failed ones are left out: their failure says nothing about the rule)."""
        last = None
        while True:
            self._tend()
            with self.store.reading() as session:
                batch = batch_evaluations(session, self.run_id, step)
                finished = self._count(session, tuple(s for s in FINISHED if s in COUNTED))
            self._release(batch)
            rewards = [e.reward for e in batch if e.reward is not None]
            if rewards:
                self.best = max(rewards + ([self.best] if self.best is not None else []))
            if finished != last:
                last = finished
                self.on_progress(Progress(self.run_id, finished, self.config.budget, self.best, step))
            if all(e.status in FINISHED for e in batch):
                return {i: e.reward for i, e in enumerate(batch) if e.status != "failed"}
            time.sleep(POLL_SECONDS)

    def _stop(self) -> None:
        """Leave a consistent run: no claim held by our own (now stopped) workers."""
        names = getattr(self.executor, "worker_names", [])
        self.executor.close()
        with self.store.transaction() as session:
            self.lease.release(session)
            release_claims(session, self.run_id, names, refund=True)
            set_run_status(session, self.run_id, "stopped")

    def _fail(self, exc: Exception) -> None:
        names = getattr(self.executor, "worker_names", [])
        self.executor.close()
        try:
            with self.store.transaction() as session:
                self.lease.release(session)
                release_claims(session, self.run_id, names, refund=True)   # its workers are gone with it
                set_run_status(session, self.run_id, "failed", error=_error_line(exc)[:2000])
        except Exception:   # the database itself may be what failed; the run stays resumable
            pass

    # -- reading the run ---------------------------------------------------------
    def _batch(self, step: int) -> list[Evaluation]:
        with self.store.reading() as session:
            return batch_evaluations(session, self.run_id, step)

    def _count(self, session=None, statuses: tuple[str, ...] | None = None) -> int:
        query = select(func.count()).select_from(Evaluation).where(Evaluation.run_id == self.run_id)
        if statuses:
            query = query.where(Evaluation.status.in_(statuses))
        if session is not None:
            return session.execute(query).scalar_one()
        with self.store.reading() as session:
            return session.execute(query).scalar_one()

    def _rng_state(self) -> dict:
        # The searcher's generator also travels inside the blob; here it is readable from SQL.
        return {"searcher_generator": self.searcher.generator.get_state().numpy().tobytes().hex()}


def make_executor(store: Store, config: SearchConfig, broker_url: str | None) -> Executor:
    """Celery when a broker is given (workers anywhere), else local worker processes."""
    if broker_url:
        from nos.workers.executor import CeleryExecutor  # Celery only where it is used

        return CeleryExecutor(broker_url, queue="gpu" if config.device.startswith("cuda") else "cpu")
    from .executors import LocalExecutor

    return LocalExecutor(store.url.render_as_string(hide_password=False), config.workers, config.device,
                         config.pack_size)


def _error_line(exc: Exception) -> str:
    """What a failed run stores as its error: a database error's first line, not SQLAlchemy's statement and
    link (`nos status` shows the line; the traceback went to the driver's terminal)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc.orig).__name__}: {first_line(exc.orig)}"
    return f"{type(exc).__name__}: {exc}"


def one_thread() -> None:
    """Torch on one thread in this process. Not for a forked child (a Celery worker's): there the
    parent's OpenMP pool may not survive the fork, and such workers already run on one thread."""
    torch.set_num_threads(1)


class RunNotHere(LookupError):
    """The run to drive is not in this database: the worker was started with another `--db`."""


def drive_run(store: Store, run_id: int, broker_url: str | None = None,
              on_progress: Callable[[Progress], None] | None = None) -> str:
    """Drive run `run_id` with the config it was created with; returns its final status.

    Call `one_thread()` first in a process of its own: the controller's updates
    then run on one thread, which on a machine whose cores the workers keep
    busy is faster than contending with them.
    """
    with store.reading() as session:
        run = get_run(session, run_id)
        if run is None:   # a control worker on another database than the run's driver (`nos worker --db`)
            raise RunNotHere(f"run {run_id} is not in this worker's database {shown(store.url)}: a control worker "
                             "must use the database of the command that started the run")
        config = SearchConfig.from_dict(run.config)
    executor = make_executor(store, config, broker_url)
    try:
        return Driver(store, run_id, config, executor, on_progress).run()
    finally:
        executor.close()
