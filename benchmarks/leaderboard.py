"""Time the leaderboard and run-progress queries on a large database, SQLite and PostgreSQL.

Builds a database with 100,000 evaluations (20 runs of 5,000) of 30,000
distinct rules, sampled with many repeats as a real search does, plus
700,000 learning-rate trials; then times, as medians of several runs:

- leaderboard(top=20) over all runs, over one run, and the `leaderboard` view's top 20
- run_progress(one run) and the whole `run_progress` view

Target: under 100 ms each. Run by hand, not in CI:

    flock /tmp/nos-bench.lock .venv/bin/python benchmarks/leaderboard.py

PostgreSQL: NOS_BENCH_PG_URL (default postgresql://postgres@127.0.0.1:5432/test);
the data goes to a schema of its own that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from nos.store import leaderboard, open_store, resolve_url, run_progress, upgrade, utcnow

TARGET_MS = 100.0
LRS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]


def synthetic_rows(evaluations: int, runs: int, rules: int, seed: int = 0):
    """Rows for runs, rules, evaluations and lr_trials, as tuples in column order."""
    rng = random.Random(seed)
    now = utcnow()
    run_rows = [(i + 1, f"bench-{i}", "completed", "digits" if i % 2 else "fashion-mnist", "{}", now, now, now)
                for i in range(runs)]
    rule_rows = [(i + 1, f"g * exp({i} * sign(m))", f"{i:016x}", 2, "[]", now) for i in range(rules)]
    eval_rows, trial_rows = [], []
    per_run = evaluations // runs
    for i in range(evaluations):
        run = i // per_run + 1
        # Squaring skews the choice toward low ids: popular rules recur, as sampled rules do.
        rule = int(rules * rng.random() ** 2) + 1
        roll = rng.random()
        status = "done" if roll < 0.90 else "diverged" if roll < 0.95 else "cached" if roll < 0.98 else "failed"
        # Accuracies on a 10,000-image validation set: four decimals, so ties are common.
        reward = {"done": round(rng.betavariate(5, 2), 4), "diverged": 0.0, "cached": round(rng.random(), 4),
                  "failed": None}[status]
        test_acc = None if reward is None else max(0.0, round(reward - rng.random() * 0.02, 4))
        eval_rows.append((i + 1, run, rule, (i % per_run) // 50, i % per_run, run_rows[run - 1][3], "key", status,
                          1, "bench", now, now, now, now, None if reward is None else 1e-3, reward, test_acc,
                          30.0 if reward is not None else None))
        for lr in LRS:
            trial_rows.append((i + 1, lr, rng.random(), rng.random() * 3, status == "diverged", 4.0))
    return run_rows, rule_rows, eval_rows, trial_rows


RUN_COLUMNS = "id, name, status, task, config, created_at, updated_at, finished_at"
RULE_COLUMNS = "id, text, hash, depth, tokens, created_at"
EVAL_COLUMNS = ("id, run_id, rule_id, batch, seq, task, task_key, status, attempts, worker, created_at, claimed_at, "
                "heartbeat_at, finished_at, best_lr, reward, test_acc, wall_seconds")
TRIAL_COLUMNS = "evaluation_id, lr, val_acc, train_loss, diverged, wall_seconds"


def load_sqlite(store, rows) -> None:
    """executemany on the raw sqlite3 connection, in one transaction."""
    tables = zip(("runs", "rules", "evaluations", "lr_trials"), (RUN_COLUMNS, RULE_COLUMNS, EVAL_COLUMNS,
                                                                 TRIAL_COLUMNS), rows)
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("BEGIN")
        for table, columns, data in tables:
            marks = ", ".join("?" * len(columns.split(",")))
            # SQLite stores nos's times as naive UTC text.
            data = [tuple(v.replace(tzinfo=None).isoformat(" ") if hasattr(v, "tzinfo") and v.tzinfo else v
                          for v in row) for row in data]
            cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", data)
        cursor.execute("COMMIT")
        cursor.execute("ANALYZE")
    finally:
        raw.close()


def load_postgresql(store, rows) -> None:
    """COPY on the raw psycopg connection, then ANALYZE (autovacuum would, a little later)."""
    tables = zip(("runs", "rules", "evaluations", "lr_trials"), (RUN_COLUMNS, RULE_COLUMNS, EVAL_COLUMNS,
                                                                 TRIAL_COLUMNS), rows)
    raw = store.engine.raw_connection()
    try:
        with raw.cursor() as cursor:
            for table, columns, data in tables:
                with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in data:
                        copy.write_row(row)
            for table in ("runs", "rules", "evaluations"):
                cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))")
        raw.commit()
        raw.driver_connection.autocommit = True
        raw.cursor().execute("ANALYZE")
        raw.driver_connection.autocommit = False
    finally:
        raw.close()


def median_ms(fn, repeats: int) -> float:
    fn()  # warm caches and the statement cache: steady state is what users see
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def time_queries(store, runs: int, repeats: int) -> dict[str, float]:
    some_run = runs // 2
    with store.reading() as session:
        return {
            "leaderboard(top=20)": median_ms(lambda: leaderboard(session, 20), repeats),
            "leaderboard(top=20, run_id=one run)": median_ms(lambda: leaderboard(session, 20, run_id=some_run),
                                                             repeats),
            "leaderboard(top=20, task=one task)": median_ms(lambda: leaderboard(session, 20, task="digits"),
                                                            repeats),
            "run_progress(one run)": median_ms(lambda: run_progress(session, some_run), repeats),
            "SQL: leaderboard view, top 20": median_ms(lambda: session.execute(sa.text(
                "SELECT * FROM leaderboard ORDER BY reward DESC, evaluation_id LIMIT 20")).all(), repeats),
            "SQL: run_progress view, all runs": median_ms(lambda: session.execute(sa.text(
                "SELECT * FROM run_progress")).all(), repeats),
        }


def bench(name: str, url: str, rows, loader, runs: int, repeats: int) -> dict[str, float]:
    upgrade(resolve_url(url))
    store = open_store(url)
    try:
        start = time.perf_counter()
        loader(store, rows)
        print(f"{name}: loaded {len(rows[2]):,} evaluations and {len(rows[3]):,} lr_trials "
              f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return time_queries(store, runs, repeats)
    finally:
        store.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rules", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-postgresql", action="store_true")
    args = parser.parse_args()

    rows = synthetic_rows(args.evaluations, args.runs, args.rules)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        results["SQLite"] = bench("SQLite", f"sqlite:///{Path(folder) / 'bench.db'}", rows, load_sqlite,
                                  args.runs, args.repeats)
    if not args.no_postgresql:
        results["PostgreSQL"] = bench_postgresql(rows, args.runs, args.repeats)

    names = list(next(iter(results.values())))
    width = max(map(len, names))
    print(f"{'query (median ms)':{width}}  " + "  ".join(f"{db:>10}" for db in results))
    for query in names:
        cells = "  ".join(f"{results[db][query]:10.1f}" for db in results)
        print(f"{query:{width}}  {cells}")
    worst = max(v for r in results.values() for v in r.values())
    print(f"slowest {worst:.1f} ms: {'within' if worst < TARGET_MS else 'OVER'} the {TARGET_MS:.0f} ms target")


def bench_postgresql(rows, runs: int, repeats: int) -> dict[str, float]:
    import psycopg

    admin_url = os.environ.get("NOS_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"nos_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            return bench("PostgreSQL", f"{admin_url}?options=-csearch_path%3D{schema}", rows, load_postgresql,
                         runs, repeats)
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    main()
