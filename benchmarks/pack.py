"""Packed evaluation on the CPU: K rules trained as one stack against the same K one at a time.

    python benchmarks/pack.py [--tasks digits,fashion-mlp] [--packs 1,2,4,8] [--repeats 2] [--threads 1]
                              [--train-size N]

For each task and each K, `evaluate_rules` on the first K rules of RULES
(nos.tasks.packed: one stacked network for all K x 7 sweep children) and
`evaluate_rule` on each of the same K rules in turn, taking turns in one
process (each going first every other seed) so that load on the machine hits
both alike. Prints evaluations per second of each, by wall clock and by this
process's CPU time (with one thread, CPU time is the work done), their ratio,
and the largest difference in reward between the two paths (within rounding:
a validation example or so).
K = 1 is `evaluate_rule` on both sides (a pack of one is not packed): its
ratio is the noise floor.
"""

from __future__ import annotations

import argparse
import time

import torch

from nos.tasks import Task, evaluate_rule, get_task
from nos.tasks.packed import evaluate_rules

# Built-ins and searched shapes: moments, noise, a schedule (its final run retrains from the start).
RULES = ("powersign", "adam", "sgd", "drop(g, 0.1) * exp(1e-3*w)", "addsign-ld", "rmsprop", "momentum",
         "g * exp(sign(g) * sign(m))")


def timed(run) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure(task: Task, k: int, repeats: int) -> dict[str, float]:
    rules = RULES[:k]
    seconds = {"pack wall": 0.0, "pack cpu": 0.0, "alone wall": 0.0, "alone cpu": 0.0}
    gap = 0.0
    for seed in range(repeats):
        runs = {"pack": lambda: evaluate_rules(rules, task, seed=seed),
                "alone": lambda: [evaluate_rule(rule, task, seed=seed) for rule in rules]}
        results = {}
        for side in ("pack", "alone") if seed % 2 == 0 else ("alone", "pack"):   # neither always goes first
            results[side], wall, cpu = timed(runs[side])
            seconds[f"{side} wall"] += wall
            seconds[f"{side} cpu"] += cpu
        gap = max([gap] + [abs(a.reward - b.reward) for a, b in zip(results["pack"], results["alone"])])
    n = k * repeats
    return {**{key: n / value for key, value in seconds.items()}, "gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="digits,fashion-mlp")
    parser.add_argument("--packs", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=2, help="seeds per K (each a pack and K lone evaluations)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-size", type=int, help="every task's training examples (default: the task's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    packs = [int(k) for k in args.packs.split(",")]
    if max(packs) > len(RULES):
        parser.error(f"--packs go up to {len(RULES)} (the rules in RULES)")
    print(f"torch {torch.__version__}, {args.threads} thread(s); rules: {', '.join(RULES[:max(packs)])}")
    for name in args.tasks.split(","):
        task = get_task(name, **({"train_size": args.train_size} if args.train_size else {}))
        evaluate_rules(RULES[:2], task, seed=99)   # one-time costs (torch._dynamo's import) outside the timing
        print(f"\n{name} {task.splits.sizes}, batch {task.batch_size}, sweep {task.sweep}")
        print("| K | evals/s packed (wall / cpu) | evals/s one at a time (wall / cpu) | ratio wall / cpu "
              "| reward gap |")
        print("|---|---|---|---|---|")
        for k in packs:
            m = measure(task, k, args.repeats)
            print(f"| {k} | {m['pack wall']:.2f} / {m['pack cpu']:.2f} | {m['alone wall']:.2f} / {m['alone cpu']:.2f} "
                  f"| **{m['pack wall'] / m['alone wall']:.2f}x / {m['pack cpu'] / m['alone cpu']:.2f}x** "
                  f"| {m['gap']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
