"""The README's main job (`nos enqueue` with no flags: PPO on digits, local workers) at --pack 1 and --pack K.

    python benchmarks/pack_search.py [--packs 1,4] [--seeds 0 1 2 3 4] [--budget 200] [--last 100]

Each seed runs once at every pack, in turn (the order rotating with the seed,
so that load on the machine hits each alike), each in a SQLite file of its
own in a temporary folder. Printed per pack: the run's seconds from its
creation to its end as stored (the driver's start-up, imports and worker
start-up before the run exists are left out), the mean reward of the last
--last counted evaluations, and the best reward; mean ± sd over seeds, and
each pack's seconds against the first pack's. With more in flight a pack
changes which rules are proposed, so rewards differ by seed noise, not
rounding.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from nos.store import open_store
from nos.store.models import Evaluation, Run

COUNTED = ("done", "diverged", "cached", "failed")


def one_run(folder: Path, seed: int, pack: int, budget: int, last: int) -> dict[str, float]:
    url = f"sqlite:///{folder / f'{seed}-{pack}.db'}"
    subprocess.run([sys.executable, "-m", "nos.cli.main", "enqueue", "--db", url, "--seed", str(seed),
                    "--pack", str(pack), "--budget", str(budget)], check=True, capture_output=True, text=True)
    store = open_store(url)
    with store.reading() as session:
        run = session.get(Run, 1)
        rewards = [e.reward or 0.0 for e in session.query(Evaluation)
                   .filter(Evaluation.run_id == 1, Evaluation.status.in_(COUNTED))
                   .order_by(Evaluation.finished_at, Evaluation.id)]
        seconds = (run.finished_at - run.created_at).total_seconds()
    store.dispose()
    return {"seconds": seconds, "last": statistics.mean(rewards[-last:]), "best": max(rewards)}


def _mean_sd(values: list[float], digits: int) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packs", default="1,4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--last", type=int, default=100)
    args = parser.parse_args()
    packs = [int(k) for k in args.packs.split(",")]
    runs: dict[int, list[dict[str, float]]] = {k: [] for k in packs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            turn = seed % len(packs)
            for pack in packs[turn:] + packs[:turn]:
                runs[pack].append(one_run(Path(tmp), seed, pack, args.budget, args.last))
                print(f"seed {seed} pack {pack}: {runs[pack][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    base = [r["seconds"] for r in runs[packs[0]]]
    print(f"\n`nos enqueue --budget {args.budget}` (PPO on digits, local workers), seeds {args.seeds}\n")
    print(f"| pack | run seconds | speed against pack {packs[0]} | last-{args.last} mean reward | best reward |")
    print("|---|---|---|---|---|")
    for pack in packs:
        seconds = [r["seconds"] for r in runs[pack]]
        ratios = [b / s for b, s in zip(base, seconds)]
        print(f"| {pack} | {_mean_sd(seconds, 1)} | {statistics.mean(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {_mean_sd([r['last'] for r in runs[pack]], 3)} | "
              f"{_mean_sd([r['best'] for r in runs[pack]], 3)} |")


if __name__ == "__main__":
    main()
