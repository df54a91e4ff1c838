"""The asynchronous search loop: workers never wait for the controller, the controller learns every few results.

The driver keeps `in_flight` counted evaluations queued or running. Each
poll it reads the results that arrived since the last one, updates the
searcher once for every `update_every` counted results among them
(`nos.search.updates`), and at once proposes replacements for the
evaluations that finished, without passing the budget. Rejections stay free
and are learned from with the update they arrived in; a repeat of a rule in
flight waits for the first; failed evaluations count toward the budget but
are not learned from.

What is stored, and how a driver killed anywhere resumes:

- Each evaluation row holds the tokens the searcher sampled and their
  log-probability (`evaluations.tokens`, `evaluations.log_prob`): an update
  learns from results sampled by older policies, and PPO's ratio needs theirs.
- Evaluations are stored in numbered batches, one per top-up. A top-up made
  after an update is stored in one transaction with a checkpoint: the
  searcher's state after the update and the proposals, the last batch that
  state includes, and the evaluation ids each update since the previous
  checkpoint learned from, in order. An update with no top-up after it gets a
  checkpoint of its own. So a batch stored without a checkpoint was proposed
  by the policy of the latest checkpoint before it.
- Resuming loads the latest checkpoint, replays the proposals of the batches
  stored after it (same state, same generator, same counts: the same rules;
  proposing costs milliseconds), and takes as arrived, in the order they
  were proposed, the finished evaluations that no recorded update consumed. Queued evaluations are sent
  again; running ones are left to their workers, or to the stale-claim sweep
  when those died. No result is lost or learned from twice: an update that
  was not checkpointed is forgotten with the driver, and its results are
  learned from after the resume.

Which results an update sees depends on when evaluations finish, so an
asynchronous run is not reproducible bit for bit; `synchronous = true` is.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from .driver import COUNTED, FINISHED, POLL_SECONDS, UNFINISHED, Progress, sample_step
from .search import state_to_bytes
from .search.updates import Result, UpdateQueue, learn, to_propose
from .store import latest_checkpoint, save_checkpoint
from .store.checkpoints import checkpoint_states
from .store.models import Evaluation, Rule
from .store.rules import CHUNK

if TYPE_CHECKING:
    from .driver import Driver



class AsynchronousLoop:
    def __init__(self, driver: "Driver"):
        self.driver = driver
        self.config = driver.config
        self.queue = UpdateQueue(self.config.update_every)
        self.batch = -1                  # the last batch proposed: its proposals are in the searcher's state
        self.step = -1                   # the latest checkpoint's step
        self.updates = 0                 # updates made, over the run
        self.unrecorded: list[list[int]] = []   # updates since the latest checkpoint: the ids each consumed
        self.waiting: set[int] = set()   # evaluations of this run not yet arrived
        self.first: dict[object, int] = {}      # repeat key -> the unfinished evaluation that trains it

    # -- the loop ----------------------------------------------------------------
    def drive(self) -> None:
        self._restore()
        last = None
        while True:
            self.driver._tend()
            arrived, unfinished, finished, counted = self._poll()
            if finished != last:
                last = finished
                self.driver.on_progress(Progress(self.driver.run_id, finished, self.config.budget,
                                                 self.driver.best, self.updates))
            self.queue.arrive(arrived)
            final = counted >= self.config.budget and not unfinished
            for update in self.queue.due(final):
                learn(self.driver.searcher, update)
                self.unrecorded.append([r.id for r in update])
                self.updates += 1
            n = to_propose(self.config.target_in_flight, len(unfinished), counted, self.config.budget)
            if final:
                self.driver._complete(self.step + 1, self._state(final=True))
                return
            if n:
                self._propose(n)
            elif self.unrecorded:
                self._checkpoint()
            if not arrived and not n:
                time.sleep(POLL_SECONDS)

    def _poll(self) -> tuple[list[Result], list[Evaluation], int, int]:
        """What arrived since the last poll (by id), the unfinished evaluations, and the counts of
        counted evaluations finished and stored."""
        driver = self.driver
        with driver.store.reading() as session:
            unfinished = list(session.execute(
                select(Evaluation).where(Evaluation.run_id == driver.run_id, Evaluation.status.in_(UNFINISHED))
            ).scalars())
            done = self.waiting - {e.id for e in unfinished}
            rows = _rows(session, sorted(done))
            counts = dict(session.execute(
                select(Evaluation.status, func.count()).where(Evaluation.run_id == driver.run_id)
                .group_by(Evaluation.status)).all())
        self.waiting -= done
        driver._release(unfinished)
        self._forget_finished({e.id for e in rows})
        arrived = [_result(e) for e in rows]
        rewards = [r.reward for r in arrived if r.reward is not None]
        if rewards:
            driver.best = max(rewards + ([driver.best] if driver.best is not None else []))
        finished = sum(counts.get(s, 0) for s in FINISHED if s in COUNTED)
        counted = sum(counts.get(s, 0) for s in COUNTED)
        return arrived, unfinished, finished, counted

    def _forget_finished(self, ids: set[int]) -> None:
        for key in [key for key, evaluation_id in self.first.items() if evaluation_id in ids]:
            del self.first[key]

    def _propose(self, n: int) -> None:
        """Top up with `n` counted proposals (and the rejections among them): a new batch, stored with a
        checkpoint when the searcher has learned since the last one."""
        proposals, verdicts = sample_step(self.driver.searcher, n, self.config.probe)
        self.batch += 1
        checkpoint = None
        if self.unrecorded:
            self.step += 1
            checkpoint = (self.step, self._state())
        stored = self.driver._store(self.batch, proposals, verdicts, checkpoint)
        self.unrecorded = []
        self.waiting.update(evaluation_id for evaluation_id, _, _ in stored)
        self.driver._send(stored, self.first)

    def _checkpoint(self) -> None:
        self.step += 1
        driver = self.driver
        with driver.store.transaction() as session:
            driver.lease.hold(session)
            save_checkpoint(session, driver.run_id, self.step, self._state(), driver._rng_state(),
                            state_to_bytes(driver.searcher.state_dict()))
        self.unrecorded = []

    def _state(self, final: bool = False) -> dict:
        return {"mode": "asynchronous", "batch": self.batch, "updates": self.unrecorded, "final": final}

    # -- resuming ----------------------------------------------------------------
    def _restore(self) -> None:
        driver = self.driver
        with driver.store.reading() as session:
            checkpoint = latest_checkpoint(session, driver.run_id)
            if checkpoint is not None:
                self.batch = driver._restore_from(checkpoint)["batch"]
                self.step = checkpoint.step
                recorded = [ids for state in checkpoint_states(session, driver.run_id)
                            for ids in state.get("updates", [])]
                self.updates = len(recorded)
                consumed = {i for ids in recorded for i in ids}
            else:
                consumed = set()
            rows = list(session.execute(
                select(Evaluation, Rule.fingerprint).join(Rule, Rule.id == Evaluation.rule_id)
                .where(Evaluation.run_id == driver.run_id).order_by(Evaluation.id)).all())
            driver.best = session.execute(
                select(func.max(Evaluation.reward)).where(Evaluation.run_id == driver.run_id)).scalar_one()
        self._replay([e for e, _ in rows if e.batch > self.batch])
        # What no recorded update learned from arrives at the first poll, in the order it was proposed.
        self.waiting = {e.id for e, _ in rows if e.id not in consumed}
        driver._resend([(e, fingerprint) for e, fingerprint in rows if e.status in UNFINISHED], self.first)

    def _replay(self, later: list[Evaluation]) -> None:
        """Propose again what the batches stored after the checkpoint proposed, so the searcher's
        generator (and evolution's count of warm-start proposals) is where it was."""
        counts: dict[int, int] = {}
        for e in later:
            counts[e.batch] = counts.get(e.batch, 0) + (e.status != "rejected")
        for batch in sorted(counts):
            sample_step(self.driver.searcher, counts[batch], self.config.probe)
            self.batch = batch


def _rows(session, ids: list[int]) -> list[Evaluation]:
    rows = []
    for start in range(0, len(ids), CHUNK):
        rows += session.execute(select(Evaluation).where(Evaluation.id.in_(ids[start:start + CHUNK]))
                                .order_by(Evaluation.id)).scalars().all()
    return rows


def _result(e: Evaluation) -> Result:
    return Result(id=e.id, counted=e.status != "rejected", reward=None if e.status == "failed" else e.reward,
                  tokens=tuple(e.tokens or ()), log_prob=e.log_prob)
