"""The paper's Table 1 for nos's tasks: each standard optimizer through the full protocol, as markdown.

    flock /tmp/nos-bench.lock python benchmarks/table1.py [--tasks digits,fashion-mnist] [--random 3]

For each task (fashion-mnist with train_size 10000) and each of SGD,
Momentum, Adam, RMSProp, PowerSign and AddSign: the validation accuracy of
every learning rate of the 1-epoch sweep, the best rate, and the final (5
epoch) validation accuracy (the reward) and test accuracy. `--random N` adds
N rules drawn uniformly from the depth-2 token sequences (seeded), the
baseline any searched rule has to beat.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from nos.rules import from_tokens, to_text
from nos.rules.vocabulary import IDS_BY_KIND, position_kinds
from nos.tasks import evaluate_rule, get_task

OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop", "powersign", "addsign")
TASK_OPTIONS = {"digits": {}, "fashion-mnist": {"train_size": 10000}}


def random_rules(n: int, seed: int = 0, depth: int = 2) -> list[str]:
    rng = random.Random(seed)
    return [to_text(from_tokens([rng.choice(IDS_BY_KIND[k]) for k in position_kinds(depth)], depth))
            for _ in range(n)]


def table(name: str, rules: list[str], seed: int) -> str:
    task = get_task(name, **TASK_OPTIONS.get(name, {}))
    head = ["optimizer"] + [f"{lr:g}" for lr in task.lrs] + ["best lr", "final val", "test", "seconds"]
    lines = [f"**{name}** {task.splits.sizes}, batch {task.batch_size}, seed {seed}; "
             f"columns 1e-05 ... 10: validation accuracy after the 1-epoch sweep (`div`: diverged)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule in rules:
        start = time.perf_counter()
        r = evaluate_rule(rule, task, seed)
        sweep = ["div" if t.diverged else f"{t.val_acc:.3f}" for t in r.trials]
        best = f"{r.best_lr:g}" if r.best_lr is not None else "-"
        label = rule if rule in OPTIMIZERS else f"`{rule}`"
        lines.append("| " + " | ".join([label, *sweep, best, f"**{r.reward:.4f}**", f"{r.test_acc:.4f}",
                                          f"{time.perf_counter() - start:.1f}"]) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,fashion-mnist")
    parser.add_argument("--random", type=int, default=0, help="add N random depth-2 rules")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    evaluate_rule("sgd", get_task("digits", lrs=[0.1], epochs=1))   # torch's one-time imports, off the clock
    rules = list(OPTIMIZERS) + random_rules(args.random)
    tables = [table(name, rules, args.seed) for name in args.tasks.split(",")]
    print(f"\ntorch {torch.__version__}, 1 thread\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
