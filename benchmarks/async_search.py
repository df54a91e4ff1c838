"""Asynchronous against synchronous search: worker utilization, time to a reward, and learning per result.

    python benchmarks/async_search.py simulate [--workers 8 16 32 64] [--seeds 0 1 2 3 4] [--results 1000]
        [--update-every 5] [--mean-seconds 30] [--searchers ppo reinforce evolution random] [--threshold 0.35]
    python benchmarks/async_search.py digits [--budget 100] [--seeds 0 1] [--workers 2] [--threshold 0.9]

`simulate` is a discrete-event simulation in one process, with no training: a
task whose reward is a fixed function of the sampled tokens (the fraction of
positions that match a hidden target, so that a searcher can learn it) and whose
evaluation time is drawn from a fixed distribution (rules scoring under 0.25
"diverge" and stop after a tenth of the protocol; the others take
--mean-seconds times a log-normal factor, sd 0.25). Simulated workers take
queued evaluations first come first served. The driver's side is the driver's
own logic: `nos.driver.sample_step` proposes (without the probe, to keep the
simulation cheap), `nos.search.updates` decides which results each update learns
from and how many proposals refill the evaluations in flight, and the real
searchers learn. The driver notices a result at its next poll (up to
`nos.driver.POLL_SECONDS` later), and the CPU time its proposing and learning
take on this machine is added to the simulated clock, so a driver too slow for
its workers shows.

Synchronous: propose update_every rules, wait for the slowest, learn, propose.
Asynchronous: keep in_flight (--in-flight, default the driver's own default for that
many workers, `nos.config.default_in_flight`) queued or running, learn every
update_every results, refill at once.

Printed per configuration (mean over seeds): worker utilization (simulated
training time over workers x wall time; over the whole run, and until the
last proposal, before the workers drain at the end of the budget), wall time to the first moving mean of
50 results at or above --threshold, and the mean reward over windows of
results; the learning-curve table compares the modes at equal numbers of
results, mean ± sd over seeds: asynchronous, synchronous in steps of
update_every, and synchronous in steps of one rule per worker (the barrier
search that keeps as many workers going).

`digits` runs real searches (`nos enqueue`, local workers, SQLite in a temporary
folder), synchronous then asynchronous for each seed, and reads utilization
(the evaluations' stored wall seconds over workers x the run's elapsed time)
and the time to the first moving mean of 20 rewards at or above --threshold
from the database.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import torch
from searchers import parse_config  # benchmarks/ is this script's folder, first on sys.path

from nos.config import default_in_flight
from nos.driver import POLL_SECONDS, sample_step
from nos.rules.vocabulary import IDS_BY_KIND, position_kinds
from nos.search import make_searcher
from nos.search.updates import Result, UpdateQueue, learn, to_propose

DIVERGED_BELOW = 0.25   # simulated rules scoring under this stop early, as diverged ones do
WINDOW = 50


class SimulatedTask:
    """Reward: the fraction of positions matching a hidden target. Time: drawn per evaluation."""

    def __init__(self, depth: int, mean_seconds: float, seed: int):
        gen = torch.Generator().manual_seed(123)
        self.target = [IDS_BY_KIND[k][torch.randint(len(IDS_BY_KIND[k]), (1,), generator=gen).item()]
                       for k in position_kinds(depth)]
        self.mean_seconds = mean_seconds
        self.rng = random.Random(seed)

    def reward(self, tokens) -> float:
        return sum(a == b for a, b in zip(tokens, self.target)) / len(self.target)

    def seconds(self, reward: float) -> float:
        if reward < DIVERGED_BELOW:
            return self.mean_seconds * 0.1 * self.rng.uniform(0.5, 1.5)
        return self.mean_seconds * self.rng.lognormvariate(0.0, 0.25)


class Clock:
    """The driver's simulated time: advanced by waiting, and by the real time its own work takes."""

    def __init__(self, rng: random.Random):
        self.now = 0.0
        self.rng = rng
        self.compute = 0.0

    def timed(self, work):
        # CPU time, not wall time: what the work takes on a core of its own, however loaded this machine is.
        start = time.process_time()
        value = work()
        spent = time.process_time() - start
        self.now += spent
        self.compute += spent
        return value

    def notice(self, finished_at: float) -> None:
        """The driver sees a result at its next poll after it finished (and not before it is free)."""
        self.now = max(self.now, finished_at + self.rng.uniform(0, POLL_SECONDS))


def searcher_of(spec: str, seed: int):
    """A searcher from `name key=value ...`: its hyperparameters, as `nos.search.settings` names them."""
    name, settings = parse_config(spec)
    return make_searcher(name, 2, seed, **settings)


def simulate(searcher_name: str, seed: int, workers: int, update_every: int, results: int, mean_seconds: float,
             synchronous: bool, in_flight: int | None = None) -> dict:
    torch.set_num_threads(1)
    searcher = searcher_of(searcher_name, seed)
    task = SimulatedTask(2, mean_seconds, seed)
    clock = Clock(random.Random(seed + 1000))
    run = (_synchronous if synchronous else _asynchronous)(searcher, task, clock, workers, update_every, results,
                                                          in_flight or default_in_flight(workers))
    rewards, times, spans, last_proposal = run
    return {"searcher": searcher_name, "seed": seed, "workers": workers, "update_every": update_every,
            "mode": "sync" if synchronous else "async", "rewards": rewards, "times": times,
            "utilization": busy_share(spans, workers, times[-1]),
            "steady": busy_share(spans, workers, last_proposal) if last_proposal else 0.0,
            "wall": times[-1], "compute": clock.compute}


def _synchronous(searcher, task, clock, workers, update_every, results, _in_flight):
    rewards, times, spans, last_proposal = [], [], [], 0.0
    while len(rewards) < results:
        n = min(update_every, results - len(rewards))
        proposals, _ = clock.timed(lambda: sample_step(searcher, n, use_probe=False))
        last_proposal = clock.now
        scored = [task.reward(p.tokens) for p in proposals]
        free = [clock.now] * workers           # when each worker is next free: first come, first served
        heapq.heapify(free)
        end = clock.now
        for reward in scored:
            start = heapq.heappop(free)
            seconds = task.seconds(reward)
            spans.append((start, start + seconds))
            end = max(end, start + seconds)
            heapq.heappush(free, start + seconds)
        clock.notice(end)
        clock.timed(lambda: searcher.observe([p.tokens for p in proposals], scored))
        rewards += scored
        times += [clock.now] * len(scored)
    return rewards, times, spans, last_proposal


def _asynchronous(searcher, task, clock, workers, update_every, results, in_flight):
    queue = UpdateQueue(update_every)
    waiting: deque = deque()                  # (queued at, order proposed, proposal) not yet on a worker
    running: list = []                        # (finishes at, order, proposal, reward)
    idle = workers
    proposed = finished = 0
    spans, rewards, times = [], [], []
    last_proposal = 0.0

    def start(at: float) -> None:
        nonlocal idle
        while idle and waiting:
            queued_at, index, proposal = waiting.popleft()
            reward = task.reward(proposal.tokens)
            seconds = task.seconds(reward)
            spans.append((max(at, queued_at), max(at, queued_at) + seconds))
            idle -= 1
            heapq.heappush(running, (max(at, queued_at) + seconds, index, proposal, reward))

    def top_up() -> None:
        nonlocal proposed, last_proposal
        n = to_propose(in_flight, proposed - finished, proposed, results)
        if n:
            proposals, _ = clock.timed(lambda: sample_step(searcher, n, use_probe=False))
            last_proposal = clock.now
            waiting.extend((clock.now, proposed + i, p) for i, p in enumerate(proposals))
            proposed += len(proposals)
            start(clock.now)

    top_up()
    while finished < results:
        arrived = []
        clock.notice(running[0][0])
        while running and running[0][0] <= clock.now:   # everything finished by the time the driver looks
            finished_at, index, proposal, reward = heapq.heappop(running)
            idle += 1
            start(finished_at)
            arrived.append((index, proposal, reward))
        arrived.sort(key=lambda item: item[0])
        queue.arrive([Result(index, True, reward, proposal.tokens, proposal.log_prob)
                      for index, proposal, reward in arrived])
        finished += len(arrived)
        rewards += [reward for _, _, reward in arrived]
        times += [clock.now] * len(arrived)
        for update in queue.due(final=finished == results):
            clock.timed(lambda: learn(searcher, update))
        top_up()
    return rewards, times, spans, last_proposal


def busy_share(spans: list[tuple[float, float]], workers: int, until: float) -> float:
    """Training time within [0, until] over workers x until."""
    return sum(max(0.0, min(end, until) - start) for start, end in spans) / (workers * until)


def moving_mean(rewards: list[float], window: int = WINDOW) -> list[float]:
    out, total = [], 0.0
    for i, reward in enumerate(rewards):
        total += reward - (rewards[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def time_to(rewards: list[float], times: list[float], threshold: float, window: int = WINDOW) -> float | None:
    for i, mean in enumerate(moving_mean(rewards, window)):
        if i + 1 >= window and mean >= threshold:
            return times[i]
    return None


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def simulate_main(args) -> None:
    runs = []
    for searcher in args.searchers:
        for seed in args.seeds:
            runs.append(simulate(searcher, seed, args.workers[0], args.update_every, args.results,
                                 args.mean_seconds, synchronous=True))
            for workers in args.workers:
                runs.append(simulate(searcher, seed, workers, args.update_every, args.results, args.mean_seconds,
                                     synchronous=False, in_flight=args.in_flight))
                # the synchronous alternative with one rule per worker
                runs.append(simulate(searcher, seed, workers, workers, args.results, args.mean_seconds,
                                     synchronous=True))
            print(f"{searcher} seed {seed} done", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for run in runs:
                f.write(json.dumps(run) + "\n")
    print(f"\nSimulated: {args.results} results, evaluations of {args.mean_seconds:g} s on average, "
          f"seeds {args.seeds}, torch {torch.__version__}\n")
    print(f"| searcher | mode | workers | update every | utilization | until the last proposal | wall (s) "
          f"| to moving mean {args.threshold} (s) | driver compute (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for searcher in args.searchers:
        for workers in args.workers:
            for mode, every in (("sync", args.update_every), ("sync", workers), ("async", args.update_every)):
                group = [r for r in runs if r["searcher"] == searcher and r["mode"] == mode
                         and r["update_every"] == every and (r["workers"] == workers)]
                if mode == "sync" and every == args.update_every:   # simulated once, at the first count
                    group = [dict(r, workers=workers, utilization=r["utilization"] * r["workers"] / workers,
                                  steady=r["steady"] * r["workers"] / workers)
                             for r in runs if r["searcher"] == searcher and r["mode"] == "sync"
                             and r["update_every"] == every and r["workers"] == args.workers[0]]
                if not group or (mode == "sync" and every == workers and every == args.update_every):
                    continue
                reached = [t for t in (time_to(r["rewards"], r["times"], args.threshold) for r in group) if t]
                print(f"| {searcher} | {mode} | {workers} | {every} | "
                      f"{statistics.mean(r['utilization'] for r in group):.1%} | "
                      f"{statistics.mean(r['steady'] for r in group):.1%} | "
                      f"{statistics.mean(r['wall'] for r in group):,.0f} | "
                      f"{_mean_sd(reached, 0) if reached else '-'} ({len(reached)}/{len(group)}) | "
                      f"{statistics.mean(r['compute'] for r in group):.1f} |")
    edges = list(range(0, args.results + 1, args.results // 5))
    print(f"\nMean reward per window of results (mean ± sd over {len(args.seeds)} seeds), "
          f"update every {args.update_every}:\n")
    print("| searcher | mode | " + " | ".join(f"{a}-{b}" for a, b in zip(edges, edges[1:])) + " |")
    print("|---|---|" + "---|" * (len(edges) - 1))
    for searcher in args.searchers:
        rows = [("sync", args.workers[0], args.update_every, f"sync, steps of {args.update_every}")]
        for w in args.workers:
            rows += [("sync", w, w, f"sync, {w} workers, steps of {w}"), ("async", w, args.update_every,
                                                                         f"async, {w} workers")]
        for mode, workers, every, label in rows:
            group = [r for r in runs if r["searcher"] == searcher and r["mode"] == mode
                     and r["update_every"] == every and r["workers"] == workers]
            if not group:
                continue
            cells = [_mean_sd([statistics.mean(r["rewards"][a:b]) for r in group], 3) for a, b in zip(edges, edges[1:])]
            print(f"| {searcher} | {label} | " + " | ".join(cells) + " |")


# -- real runs on digits --------------------------------------------------------

DIGITS = """
task = "digits"
depth = 2
stale_after = 25.0
"""


def digits_run(folder: Path, seed: int, budget: int, workers: int, synchronous: bool) -> dict:
    from nos.store import open_store
    from nos.store.models import Evaluation, Run

    url = f"sqlite:///{folder / f'{seed}-{synchronous}.db'}"
    config = folder / "digits.toml"
    config.write_text(DIGITS)
    command = [sys.executable, "-m", "nos.cli.main", "enqueue", "--config", str(config), "--db", url,
               "--budget", str(budget), "--seed", str(seed), "--workers", str(workers),
               "--synchronous" if synchronous else "--asynchronous"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    store = open_store(url)
    with store.reading() as session:
        run = session.get(Run, 1)
        rows = session.query(Evaluation).filter(Evaluation.run_id == 1, Evaluation.status != "rejected") \
            .order_by(Evaluation.finished_at, Evaluation.id).all()
        start, end = run.created_at, run.finished_at
        rewards = [e.reward for e in rows]
        times = [(e.finished_at - start).total_seconds() for e in rows]
        training = sum(e.wall_seconds or 0.0 for e in rows)
    store.dispose()
    wall = (end - start).total_seconds()
    return {"seed": seed, "mode": "sync" if synchronous else "async", "rewards": rewards, "times": times,
            "utilization": training / (workers * wall), "wall": wall}


def digits_main(args) -> None:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for synchronous in (True, False):
                runs.append(digits_run(Path(tmp), seed, args.budget, args.workers, synchronous))
                print(f"seed {seed} {runs[-1]['mode']}: {runs[-1]['wall']:.0f} s", file=sys.stderr, flush=True)
    print(f"\ndigits, PPO, {args.budget} counted evaluations, {args.workers} local workers, seeds {args.seeds}\n")
    print(f"| mode | utilization | wall (s) | to moving mean {args.threshold} of 20 (s) | last-20 mean |")
    print("|---|---|---|---|---|")
    for mode in ("sync", "async"):
        group = [r for r in runs if r["mode"] == mode]
        reached = [t for t in (time_to(r["rewards"], r["times"], args.threshold, 20) for r in group) if t]
        print(f"| {mode} | {_mean_sd([r['utilization'] for r in group], 2)} | "
              f"{_mean_sd([r['wall'] for r in group], 0)} | {_mean_sd(reached, 0)} ({len(reached)}/{len(group)}) | "
              f"{_mean_sd([statistics.mean(r['rewards'][-20:]) for r in group], 3)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate")
    sim.add_argument("--workers", type=int, nargs="+", default=[8, 16, 32, 64])
    sim.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    sim.add_argument("--results", type=int, default=1000)
    sim.add_argument("--update-every", type=int, default=5)
    sim.add_argument("--in-flight", type=int, default=None, help="default: the driver's for that many workers")
    sim.add_argument("--mean-seconds", type=float, default=30.0)
    sim.add_argument("--searchers", nargs="+", default=["ppo", "reinforce", "evolution", "random"],
                     help='each a name, or "name key=value ..." with its hyperparameters')
    sim.add_argument("--threshold", type=float, default=0.35)
    sim.add_argument("--json", default=None, help="append each run's record to this JSON-lines file")
    digits = commands.add_parser("digits")
    digits.add_argument("--budget", type=int, default=100)
    digits.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    digits.add_argument("--workers", type=int, default=2)
    digits.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    (simulate_main if args.command == "simulate" else digits_main)(args)


if __name__ == "__main__":
    main()
