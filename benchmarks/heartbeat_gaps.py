"""The longest silence between a training worker's heartbeats, on a CPU that busy loops fight for.

    python benchmarks/heartbeat_gaps.py [--hogs 2] [--every 0.25] [--epochs 60]

Runs one evaluation in this process (the code every worker runs: training in
the main thread, heartbeats from a side thread) with `--hogs` extra processes
spinning, and records when each heartbeat reached the database. A live worker
loses its claim only if a gap reaches stale_after, so the printed ratio is the
margin the defaults leave.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import torch

import nos.work as work
from nos.config import SearchConfig
from nos.rules import parse
from nos.store import (
    NewEvaluation,
    RuleRecord,
    create_run,
    enqueue_batch,
    get_or_create_rules,
    open_store,
    resolve_url,
    upgrade,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hogs", type=int, default=2)
    parser.add_argument("--every", type=float, default=0.25, help="seconds between heartbeats here")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)   # as in every worker process

    url = f"sqlite:///{tempfile.mkdtemp(prefix='nos-beats-')}/nos.db"
    upgrade(resolve_url(url))
    store = open_store(url)
    config = SearchConfig(task="digits", probe=False, stale_after=max(60.0, 2 * args.every), heartbeat_every=args.every,
                          task_options={"lrs": [0.001, 0.01], "epochs": args.epochs, "sweep_epochs": 5})
    key = work.task_key(work.task_for(config, "cpu"), config.seed)
    with store.transaction() as session:
        run_id = create_run(session, "beats", config.task, config.to_dict())
        rule_id = get_or_create_rules(session, [RuleRecord.from_tree(parse("g"))])[0]
        evaluation_id = enqueue_batch(session, run_id, 0, [NewEvaluation(rule_id, config.task, key)])[0]

    beats: list[float] = []
    original = work.heartbeat

    def recorded(*a, **k):
        alive = original(*a, **k)
        beats.append(time.monotonic())
        return alive

    work.heartbeat = recorded
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    try:
        start = time.monotonic()
        outcome = work.run_evaluation(store, evaluation_id)
        end = time.monotonic()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    store.dispose()
    marks = [start, *beats, end]   # silence before the first beat and after the last counts too
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    longest = max(gaps)
    default = SearchConfig()
    print(f"{outcome} in {end - start:.1f} s, {len(beats)} heartbeats every {args.every:g} s, {args.hogs} busy loops")
    print(f"longest gap {longest:.2f} s ({longest / args.every:.1f}x the interval); "
          f"the default stale_after {default.stale_after:g} s is {default.stale_after / longest:.0f}x it")


if __name__ == "__main__":
    main()
