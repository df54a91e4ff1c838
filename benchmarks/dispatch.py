"""Overhead per evaluation: Celery + Redis + PostgreSQL against the local executor and in-process calls.

    python benchmarks/dispatch.py [--n 200] [--db postgresql://postgres@127.0.0.1:5432/test]
                                  [--broker redis://127.0.0.1:6379/9]

Every path runs the same `run_evaluation` on a trivially short task (one
Rosenbrock step per trial, one learning rate) over fresh queued evaluations of
distinct rules. In-process calls are the reference; the difference per
evaluation is what dispatching, the queue and the worker add. Throughput with 1
and 2 workers is evaluations per second from the first dispatch to the last
commit (worker start-up excluded).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid

import psycopg
from sqlalchemy import func, select

from nos.config import SearchConfig
from nos.executors import LocalExecutor
from nos.search import RandomSearcher
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
from nos.store.models import Evaluation
from nos.work import run_evaluation, task_for, task_key

CONFIG = SearchConfig(task="rosenbrock", depth=2, seed=0, workers=1, stale_after=60.0, heartbeat_every=10.0,
                      task_options={"train_size": 1, "lrs": [0.1], "epochs": 1, "sweep_epochs": 1})


def fresh_schema(admin_url: str) -> str:
    schema = f"nos_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{admin_url}?options=-csearch_path%3D{schema}"


def queue_evaluations(store, n: int, seed: int) -> tuple[int, list[int]]:
    rules = {p.text: p.tree for p in RandomSearcher(depth=2, seed=seed).propose(n * 3)}
    trees = list(rules.values())[:n]
    key = task_key(task_for(CONFIG, "cpu"), CONFIG.seed)
    with store.transaction() as session:
        run_id = create_run(session, f"dispatch-{seed}", CONFIG.task, CONFIG.to_dict())
        rule_ids = get_or_create_rules(session, [RuleRecord.from_tree(t) for t in trees])
        ids = enqueue_batch(session, run_id, 0, [NewEvaluation(r, CONFIG.task, key) for r in rule_ids])
    return run_id, ids


def wait_finished(store, run_id: int, n: int) -> None:
    while True:
        with store.reading() as session:
            done = session.execute(select(func.count()).select_from(Evaluation).where(
                Evaluation.run_id == run_id, Evaluation.status.not_in(("queued", "running")))).scalar_one()
        if done >= n:
            return
        time.sleep(0.01)


def timed(store, n: int, seed: int, dispatch) -> float:
    run_id, ids = queue_evaluations(store, n, seed)
    start = time.perf_counter()
    dispatch(ids)
    wait_finished(store, run_id, n)
    return time.perf_counter() - start


def start_celery_workers(k: int, db_url: str, broker: str) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-m", "nos.cli.main", "worker", "--db", db_url, "--broker", broker,
                               "--concurrency", "1", "--name", f"bench{i}@%h"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for i in range(k)]
    from nos.workers.executor import live_workers

    while len(live_workers(broker)) < k:
        time.sleep(0.5)
    return procs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args()
    url = fresh_schema(args.db)
    upgrade(resolve_url(url))
    store = open_store(url)
    task_for(CONFIG, "cpu")   # build the task once, outside the timings

    seed = iter(range(1, 1000))
    timed(store, 4, next(seed), lambda ids: [run_evaluation(store, i) for i in ids])   # warm, like the workers
    reference = timed(store, args.n, next(seed), lambda ids: [run_evaluation(store, i) for i in ids]) / args.n
    rows = [("in-process run_evaluation (reference)", 1, reference)]
    for k in (1, 2):
        local = LocalExecutor(url, k)
        timed(store, 4, next(seed), local.dispatch)   # workers started and warm
        rows.append(("local executor", k, timed(store, args.n, next(seed), local.dispatch) / args.n))
        local.close()
    import redis

    from nos.workers.executor import CeleryExecutor
    redis.Redis.from_url(args.broker).flushdb()
    for k in (1, 2):
        procs = start_celery_workers(k, url, args.broker)
        celery = CeleryExecutor(args.broker)
        timed(store, 4, next(seed), celery.dispatch)
        rows.append(("Celery + Redis", k, timed(store, args.n, next(seed), celery.dispatch) / args.n))
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()
    print(f"{args.n} trivially short evaluations each, PostgreSQL store, one process per worker\n")
    print("| path | workers | wall ms per evaluation | evaluations/s | overhead per evaluation, ms |")
    print("|---|---|---|---|---|")
    for name, k, seconds in rows:
        # With one worker the difference to the in-process call is what the path adds.
        overhead = f"{(seconds - reference) * 1e3:+.1f}" if k == 1 and seconds != reference else "-"
        print(f"| {name} | {k} | {seconds * 1e3:.1f} | {1 / seconds:.0f} | {overhead} |")


if __name__ == "__main__":
    main()
