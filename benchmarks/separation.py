"""Does a task tell optimizers apart? Each rule's reward over several seeds, and each adjacent pair's margin.

    flock /tmp/nos-bench.lock python benchmarks/separation.py [--task fashion-mlp] [--seeds 5] \
        [--rules sgd,momentum,adam,rmsprop,powersign] [--option epochs=5 --option train_size=10000]

Every rule is evaluated by the full protocol (`evaluate_rule`) on seeds
0..N-1, one thread, seed by seed with the rules taking turns so that load on
the machine hits them alike. Prints a markdown table sorted by mean reward:
mean and standard deviation (n - 1) of the reward over seeds, the per-seed
rewards and best rates, the mean test accuracy, and wall and CPU seconds per
evaluation (with one thread, CPU time is the work done; wall time also
counts what other processes took). Then, for each adjacent pair in that
order, the difference of the means against 3x the larger of the two standard
deviations: a ratio above 1 separates the pair. Last, how many of all pairs
separate by the same test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from nos.tasks import evaluate_rule, get_task

DEFAULT_RULES = "sgd,momentum,adam,rmsprop,powersign"
# A pair separates when its means differ by more than this many of the larger standard deviation.
MARGIN = 3.0


@dataclass
class Scores:
    rule: str
    rewards: list[float] = field(default_factory=list)
    tests: list[float] = field(default_factory=list)
    best_lrs: list[float | None] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.mean(self.rewards)

    @property
    def std(self) -> float:
        return statistics.stdev(self.rewards) if len(self.rewards) > 1 else 0.0


def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as a JSON list (lrs=[1e-3,1e-2]), else an int, else a float, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if value.strip().startswith("["):
        try:
            return key.strip(), json.loads(value)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"{key}: not a JSON list: {error}") from None
    for kind in (int, float):
        try:
            return key.strip(), kind(value)
        except ValueError:
            pass
    return key.strip(), value


def measure(task, rules: list[str], seeds: int) -> list[Scores]:
    scores = {rule: Scores(rule) for rule in rules}
    for seed in range(seeds):
        for rule in rules:
            wall, cpu = time.perf_counter(), time.process_time()
            result = evaluate_rule(rule, task, seed)
            s = scores[rule]
            s.wall.append(time.perf_counter() - wall)
            s.cpu.append(time.process_time() - cpu)
            s.rewards.append(result.reward)
            s.tests.append(result.test_acc)
            s.best_lrs.append(result.best_lr)
        print(f"seed {seed} done", flush=True)
    return sorted(scores.values(), key=lambda s: s.mean)


def ratio(low: Scores, high: Scores) -> float:
    """(difference of means) / (MARGIN x the larger std); above 1 separates."""
    spread = MARGIN * max(low.std, high.std)
    return (high.mean - low.mean) / spread if spread > 0 else float("inf")


def table(rows: list[Scores]) -> str:
    head = ["rule", "mean reward", "std", "rewards by seed", "best lr by seed", "mean test acc", "s/eval wall",
            "s/eval cpu"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        rewards = ", ".join(f"{r:.4f}" for r in s.rewards)
        lrs = ", ".join("-" if lr is None else f"{lr:g}" for lr in s.best_lrs)
        lines.append(f"| {s.rule} | **{s.mean:.4f}** | {s.std:.4f} | {rewards} | {lrs} | "
                     f"{statistics.mean(s.tests):.4f} | {statistics.mean(s.wall):.2f} | {statistics.mean(s.cpu):.2f} |")
    return "\n".join(lines)


def pairs(rows: list[Scores]) -> str:
    lines = [f"Adjacent pairs (difference / ({MARGIN:g} x larger std); above 1 separates):", ""]
    for low, high in zip(rows, rows[1:]):
        r = ratio(low, high)
        verdict = "separates" if r > 1 else "does NOT separate"
        lines.append(f"- {low.rule} < {high.rule}: difference {high.mean - low.mean:.4f}, "
                     f"{MARGIN:g} x max std {MARGIN * max(low.std, high.std):.4f}, ratio {r:.2f}: {verdict}")
    every = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]]
    apart = [f"{a.rule}/{b.rule}" for a, b in every if ratio(a, b) > 1]
    lines += ["", f"All pairs: {len(apart)} of {len(every)} separate ({', '.join(apart) or 'none'})."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mlp")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--rules", default=DEFAULT_RULES, help=f"comma-separated (default {DEFAULT_RULES})")
    parser.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a task option (get_task's keyword), repeatable: --option epochs=5")
    parser.add_argument("--data-dir", help="where the task's data files are")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 to have a standard deviation")
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    torch.set_num_threads(1)
    task = get_task(args.task, data_dir=args.data_dir, **dict(args.option))
    evaluate_rule(rules[0], get_task(args.task, data_dir=args.data_dir, **{**dict(args.option), "lrs": [0.1],
                                                                            "epochs": 1}))   # one-time costs
    load_before = os.getloadavg()[0]
    rows = measure(task, rules, args.seeds)
    load_after = os.getloadavg()[0]
    print(f"\n**{args.task}** {task.splits.sizes}, batch {task.batch_size}, sweep {task.sweep} "
          f"({task.sweep_epochs} epoch), {task.epochs} epochs, options {dict(args.option) or 'defaults'}; "
          f"seeds 0-{args.seeds - 1}; torch {torch.__version__}, 1 thread, {os.cpu_count()} cores, "
          f"load average {load_before:.1f} before / {load_after:.1f} after\n")
    print(table(rows))
    print()
    print(pairs(rows))


if __name__ == "__main__":
    main()
