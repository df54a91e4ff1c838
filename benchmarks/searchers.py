"""PPO vs REINFORCE vs random search vs evolution on a task at equal budget, each over several seeds.

    python benchmarks/searchers.py [--task digits] [--budget 300] [--seeds 0 1] [--db sqlite:///searchers.db]

Runs each (searcher, seed) as a real nos run with local workers and prints a
markdown table: mean reward of the last 100 samples, best reward, and the best
rules found. Runs already completed in the database are reused, so an
interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import statistics
import time

from sqlalchemy import select

from nos.config import SearchConfig
from nos.driver import Driver
from nos.executors import LocalExecutor
from nos.store import create_run, leaderboard, open_store, resolve_url, upgrade
from nos.store.models import Evaluation, Run
from nos.store.schema import schema_state


def run_search(url: str, config: SearchConfig) -> int:
    store = open_store(url)
    with store.reading() as session:
        done = session.execute(select(Run.id).where(Run.name == config.label, Run.status == "completed")).scalar()
    if done is not None:
        return done
    with store.transaction() as session:
        run_id = create_run(session, config.label, config.task, config.to_dict())
    executor = LocalExecutor(url, config.workers)
    try:
        Driver(store, run_id, config, executor).run()
    finally:
        executor.close()
    return run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--budget", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--searchers", nargs="+", default=["ppo", "reinforce", "random", "evolution"])
    parser.add_argument("--db", default="sqlite:///searchers.db")
    args = parser.parse_args()
    url = resolve_url(args.db)
    try:
        fresh = schema_state(url).current is None
    except Exception:
        fresh = True
    if fresh:
        upgrade(url)
    rows = []
    for seed in args.seeds:   # every searcher at one seed first: a partial run still compares them
        for name in args.searchers:
            config = SearchConfig(task=args.task, searcher=name, budget=args.budget, seed=seed,
                                  name=f"bench-{args.task}-{name}-s{seed}-b{args.budget}")
            start = time.perf_counter()
            run_id = run_search(args.db, config)
            store = open_store(args.db)
            with store.reading() as session:
                rewards = session.execute(select(Evaluation.reward).where(Evaluation.run_id == run_id)
                                          .order_by(Evaluation.seq)).scalars().all()
                top = leaderboard(session, 3, run_id=run_id)
            store.dispose()
            rewards = [r or 0.0 for r in rewards]
            rows.append((name, seed, statistics.mean(rewards[-100:]), max(rewards), top,
                         time.perf_counter() - start))
            print(f"{name} seed {seed}: last-100 mean {rows[-1][2]:.4f}, best {rows[-1][3]:.4f}", flush=True)
    print(f"\n| searcher | seed | mean reward, last 100 | best reward | best rules (reward) |")
    print("|---|---|---|---|---|")
    for name, seed, mean, best, top, _ in rows:
        rules = "; ".join(f"`{r.rule}` ({r.reward:.3f})" for r in top)
        print(f"| {name} | {seed} | {mean:.4f} | {best:.4f} | {rules} |")
    print()
    for name in args.searchers:
        means = [r[2] for r in rows if r[0] == name]
        bests = [r[3] for r in rows if r[0] == name]
        print(f"{name}: last-100 mean {statistics.mean(means):.4f} over {len(means)} seeds, "
              f"best {statistics.mean(bests):.4f}")


if __name__ == "__main__":
    main()
