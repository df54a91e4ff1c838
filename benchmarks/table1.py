"""The paper's Table 1 for nos's tasks: each standard optimizer through the full protocol, as markdown.

    flock /tmp/nos-bench.lock python benchmarks/table1.py [--tasks digits,fashion-mnist] [--random 3]

For each task (fashion-mnist with train_size 10000) and each of SGD,
Momentum, Adam, RMSProp, PowerSign and AddSign: the validation accuracy of
every learning rate of the 1-epoch sweep, the best rate, and the final (5
epoch) validation accuracy (the reward) and test accuracy. `--random N` adds
N rules drawn uniformly from the depth-2 token sequences (seeded), the
baseline any searched rule has to beat.

`--model wrn-D-K` trains that Wide ResNet instead of the small child, by
`nos transfer`'s protocol (nos.tasks.transfer: the same sweep, then
`--epochs` at the best rate with validation and test after each epoch), over
`--seeds` seeds, and prints the paper's Table 1 columns (final and best
validation and test accuracy, mean ± std over seeds) beside seed 0's sweep.
`nos transfer` is the same with storage and resume; this script keeps nothing.

    flock /tmp/nos-bench.lock python benchmarks/table1.py --tasks fashion-mnist --model wrn-10-1 \
        --seeds 2 --epochs 3 --train-size 3000
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


def transfer_table(name: str, rules: list[str], model: str, seeds: int, epochs: int, train_size: int | None) -> str:
    from nos.tasks.transfer import train_transfer, transfer_task
    from nos.transfer import summarize

    task = transfer_task(name, model, epochs=epochs, train_size=train_size)
    head = ["optimizer"] + [f"{lr:g}" for lr in task.lrs] + ["best lr", "final val", "final test", "best val",
                                                            "best test", "seconds"]
    lines = [f"**{name}**, {model}, {task.splits.sizes}, batch {task.batch_size}, {epochs} epochs, "
             f"seeds 0-{seeds - 1}; "
             f"columns 1e-05 ... 10: seed 0's validation accuracy after the 1-epoch sweep (`div`: diverged); "
             f"the rest mean ± std over seeds", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule in rules:
        results = [train_transfer(rule, task, seed) for seed in range(seeds)]
        (row,) = summarize(results)
        sweep = ["div" if t.diverged else f"{t.val_acc:.3f}" for t in results[0].trials]
        best = ", ".join("-" if lr is None else f"{lr:g}" for lr in row.best_lrs)
        label = rule if rule in OPTIMIZERS else f"`{rule}`"
        figures = [s.format() for s in (row.final_val, row.final_test, row.best_val, row.best_test)]
        lines.append("| " + " | ".join([label, *sweep, best, *figures, f"{row.wall_seconds:.1f}"]) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,fashion-mnist")
    parser.add_argument("--random", type=int, default=0, help="add N random depth-2 rules")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="train this Wide ResNet (wrn-D-K) by the transfer protocol instead")
    parser.add_argument("--seeds", type=int, default=2, help="with --model: seeds 0..K-1")
    parser.add_argument("--epochs", type=int, default=10, help="with --model: epochs of the final run")
    parser.add_argument("--train-size", type=int, help="with --model: subsample the training split")
    args = parser.parse_args()
    torch.set_num_threads(1)
    evaluate_rule("sgd", get_task("digits", lrs=[0.1], epochs=1))   # torch's one-time imports, off the clock
    rules = list(OPTIMIZERS) + random_rules(args.random)
    if args.model:
        tables = [transfer_table(name, rules, args.model, args.seeds, args.epochs, args.train_size)
                  for name in args.tasks.split(",")]
    else:
        tables = [table(name, rules, args.seed) for name in args.tasks.split(",")]
    print(f"\ntorch {torch.__version__}, 1 thread\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
