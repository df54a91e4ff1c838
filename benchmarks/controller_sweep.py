"""Searcher settings against each other on one reward landscape, in one process per job.

    python benchmarks/controller_sweep.py --task digits --budget 1000 --seeds 0 1 2 3 4 \\
        --config ppo --config "ppo batch_size=5 lr=0.01" --config random [--jobs 2] [--memo FILE]

Each --config is a searcher name, then `key=value` settings: `batch_size`, `warm_start`
(builtins / none) or any of the searcher's hyperparameters (nos.search.settings). Every
(config, seed) runs the driver's own step logic (`nos.driver.sample_step`: proposals until a
batch passes the probe, rejections free and learned from) against the real evaluation
protocol, with the children's seed fixed (--child-seed) so that every config and searcher
seed sees the same rewards. Rewards are memoised by canonical text and by fingerprint in
--memo (JSON lines, shared by the jobs and by later invocations), as the database's cache
does for a real run: a rule is trained once whatever config proposes it.

Prints one markdown row per config: the mean reward of the last 200 counted evaluations
(mean and standard deviation over seeds, and each seed's), the mean over evaluations
300-500, the best reward, distinct rules, and rejected proposals per counted evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from multiprocessing import Pool
from pathlib import Path

import torch

from nos.driver import sample_step
from nos.rules import to_text
from nos.search import make_searcher
from nos.tasks import evaluate_rule, get_task

_TASK = None


def parse_config(text: str) -> tuple[str, dict]:
    name, *pairs = text.split()
    settings = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        settings[key] = json.loads(value) if value[:1].isdigit() or value[:1] in "-.[{" or value in (
            "true", "false") else value
    return name, settings


class Memo:
    """Rewards by canonical text and by fingerprint, in a JSON-lines file other processes append to."""

    def __init__(self, path: Path):
        self.path = path
        self.by_text: dict[str, float] = {}
        self.by_fingerprint: dict[str, float] = {}
        self.reload()

    def reload(self) -> None:
        if not self.path.exists():
            return
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:   # a line another process is still writing
                continue
            self.by_text[entry["text"]] = entry["reward"]
            if entry.get("fingerprint"):
                self.by_fingerprint[entry["fingerprint"]] = entry["reward"]

    def lookup(self, text: str, fingerprint: str | None) -> float | None:
        if text in self.by_text:
            return self.by_text[text]
        return self.by_fingerprint.get(fingerprint) if fingerprint else None

    def add(self, text: str, fingerprint: str | None, reward: float) -> None:
        self.by_text[text] = reward
        if fingerprint:
            self.by_fingerprint[fingerprint] = reward
        with open(self.path, "a") as f:
            f.write(json.dumps({"text": text, "fingerprint": fingerprint, "reward": reward}) + "\n")


def search(job: tuple) -> dict:
    """One searcher run to `budget` counted evaluations; its reward sequence and counts."""
    task_name, task_options, child_seed, budget, name, settings, seed, memo_path = job
    global _TASK
    torch.set_num_threads(1)
    if _TASK is None:
        _TASK = get_task(task_name, **task_options)
    memo = Memo(Path(memo_path))
    settings = dict(settings)
    batch_size = settings.pop("batch_size", 20)
    warm_start = settings.pop("warm_start", None)
    searcher = make_searcher(name, 2, seed, warm_start=warm_start, **settings)
    rewards: list[float] = []
    texts: set[str] = set()
    rejected = trained = 0
    start = time.perf_counter()
    while len(rewards) < budget:
        proposals, verdicts = sample_step(searcher, min(batch_size, budget - len(rewards)))
        step_rewards = []
        for proposal, verdict in zip(proposals, verdicts):
            if verdict.rejection:
                rejected += 1
                step_rewards.append(0.0)
                continue
            text = to_text(proposal.tree)
            reward = memo.lookup(text, verdict.fingerprint)
            if reward is None:
                reward = evaluate_rule(proposal.tree, _TASK, seed=child_seed).reward
                memo.add(text, verdict.fingerprint, reward)
                trained += 1
            texts.add(text)
            rewards.append(reward)
            step_rewards.append(reward)
        searcher.observe([p.tokens for p in proposals], step_rewards)
        memo.reload()
    return {"name": name, "settings": settings, "batch_size": batch_size, "warm_start": warm_start, "seed": seed,
            "rewards": rewards, "rejected": rejected, "trained": trained, "distinct": len(texts),
            "seconds": time.perf_counter() - start}


def summary(label: str, runs: list[dict]) -> str:
    last = [statistics.mean(r["rewards"][-200:]) for r in runs]
    middle = [statistics.mean(r["rewards"][300:500]) for r in runs if len(r["rewards"]) >= 500]
    spread = statistics.stdev(last) if len(last) > 1 else 0.0
    cells = [
        label,
        f"{statistics.mean(last):.3f} ± {spread:.3f}",
        " ".join(f"{x:.2f}" for x in last),
        f"{statistics.mean(middle):.3f}" if middle else "-",
        f"{statistics.mean(max(r['rewards']) for r in runs):.3f}",
        f"{statistics.mean(r['distinct'] for r in runs):.0f}",
        f"{statistics.mean(r['rejected'] / len(r['rewards']) for r in runs):.2f}",
        f"{statistics.mean(r['seconds'] for r in runs):.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--task-option", action="append", default=[], help="KEY=VALUE, e.g. sweep=halving")
    parser.add_argument("--child-seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--memo", default=None, help="default: benchmarks/.memo-TASK.jsonl")
    parser.add_argument("--json", default=None, help="append each run's record to this JSON-lines file")
    args = parser.parse_args()
    options = dict(parse_config("x " + " ".join(args.task_option))[1])
    memo = args.memo or str(Path(__file__).parent / f".memo-{args.task}.jsonl")
    configs = [parse_config(c) for c in args.config]
    jobs = [(args.task, options, args.child_seed, args.budget, name, settings, seed, memo)
            for name, settings in configs for seed in args.seeds]
    with Pool(args.jobs) as pool:
        results = pool.map(search, jobs, chunksize=1)
    if args.json:
        with open(args.json, "a") as f:
            for label, r in zip((c for c in args.config for _ in args.seeds), results):
                f.write(json.dumps({"label": label, **r}) + "\n")
    print(f"\n{args.task}, budget {args.budget} counted evaluations, seeds {args.seeds}, child seed "
          f"{args.child_seed}\n")
    print("| config | last-200 mean ± sd | per seed | mean 300-500 | best | distinct | rejected/counted | s |")
    print("|---|---|---|---|---|---|---|---|")
    for i, text in enumerate(args.config):
        print(summary(text, results[i * len(args.seeds):(i + 1) * len(args.seeds)]))


if __name__ == "__main__":
    main()
