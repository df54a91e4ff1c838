"""Rule evaluations per hour: nos.tasks.evaluate_rule against a plain implementation of the same protocol.

    flock /tmp/nos-bench.lock python benchmarks/evaluate.py [--tasks digits,fashion-mnist] [--rules sgd,adam,powersign]

The reference below is the protocol as one would first write it: a
torch DataLoader over a TensorDataset, the textbook NCHW child, the loss read
with .item() every step for logging, validation in loader batches under
no_grad, every trial trained to its end (a non-finite loss only zeroes its
accuracy afterwards), and the final run retrained from scratch. Same child
function, same initial weights, same learning-rate grid, same seeds.

Both run in this process with one thread (how nos runs one evaluation per
worker process), taking turns rule by rule so that load on the machine hits
both alike. Prints each evaluation's best rate and reward for both, and the
ratio of evaluations per hour by wall clock and by this process's CPU time
(with one thread, CPU time is the work done: it moves far less than wall time
when other jobs share the cores).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nos.optim import SymbolicOptimizer
from nos.tasks import Task, evaluate_rule, get_task

TASK_OPTIONS = {"digits": {}, "fashion-mnist": {"train_size": 10000}}


def textbook_child(task: Task) -> nn.Module:
    """The task's child as usually written: for the conv child, conv-BN-ReLU-pool in NCHW."""
    if task.name == "digits":
        return task.make_child()
    channels, side = task.splits.train_x.shape[1], task.splits.train_x.shape[2]
    layers: list[nn.Module] = []
    for cin in (channels, 32):
        layers += [nn.Conv2d(cin, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * (side // 4) ** 2, 10))


def reference_evaluate(rule: str, task: Task, seed: int) -> tuple[float | None, float, float]:
    """(best lr, reward, test accuracy) by the plain implementation."""
    s = task.splits
    plain = lambda t: t.cpu().contiguous()   # noqa: E731 - the reference keeps NCHW tensors
    train_set = TensorDataset(plain(s.train_x), plain(s.train_y))
    val_set = TensorDataset(plain(s.val_x), plain(s.val_y))
    test_set = TensorDataset(plain(s.test_x), plain(s.test_y))
    torch.manual_seed(seed)
    initial = textbook_child(task)
    steps_per_epoch = len(train_set) // task.batch_size

    def accuracy(model: nn.Module, data: TensorDataset) -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in DataLoader(data, batch_size=task.batch_size):
                correct += (model(x).argmax(1) == y).sum().item()
        model.train()
        return correct / len(data)

    def train(lr: float, epochs: int) -> tuple[nn.Module, float]:
        model = copy.deepcopy(initial)
        opt = SymbolicOptimizer(model.parameters(), rule, lr=lr, total_steps=epochs * steps_per_epoch, seed=seed)
        loader = DataLoader(train_set, batch_size=task.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed))
        running = 0.0
        for _ in range(epochs):
            running = 0.0
            for x, y in loader:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                running += loss.item()
        finite = math.isfinite(running) and all(torch.isfinite(p).all() for p in model.parameters())
        return model, accuracy(model, val_set) if finite else 0.0

    sweep = [(train(lr, task.sweep_epochs)[1], lr) for lr in task.lrs]
    best_acc, best_lr = max(sweep, key=lambda pair: pair[0])
    if best_acc == 0:
        return None, 0.0, 0.0
    model, reward = train(best_lr, task.epochs)
    return best_lr, reward, accuracy(model, test_set) if reward else 0.0


@contextlib.contextmanager
def timed(into: list[tuple[float, float]]) -> Iterator[None]:
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    into.append((time.perf_counter() - wall, time.process_time() - cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,fashion-mnist")
    parser.add_argument("--rules", default="sgd,adam,powersign")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; rules {args.rules}; seed {args.seed}\n")
    for name in args.tasks.split(","):
        task = get_task(name, **TASK_OPTIONS.get(name, {}))
        evaluate_rule("sgd", get_task(name, **TASK_OPTIONS.get(name, {}), lrs=[0.1], epochs=1))   # warm-up
        print(f"{name} {task.splits.sizes}, batch {task.batch_size}")
        ours, theirs = [], []   # (wall, cpu) seconds per evaluation
        for rule in args.rules.split(","):
            with timed(ours):
                result = evaluate_rule(rule, task, args.seed)
            with timed(theirs):
                ref_lr, ref_reward, ref_test = reference_evaluate(rule, task, args.seed)
            print(f"  {rule:10s} nos: {ours[-1][0]:6.1f} s ({ours[-1][1]:6.1f} cpu)  best lr {result.best_lr:<6g} "
                  f"reward {result.reward:.4f} test {result.test_acc:.4f} | reference: {theirs[-1][0]:6.1f} s "
                  f"({theirs[-1][1]:6.1f} cpu)  best lr {ref_lr:<6g} reward {ref_reward:.4f} test {ref_test:.4f}",
                  flush=True)
        for clock, i in (("wall", 0), ("cpu", 1)):
            per_hour = [3600 / statistics.mean(t[i] for t in times) for times in (ours, theirs)]
            print(f"  evaluations per hour ({clock}): nos {per_hour[0]:.0f}, reference {per_hour[1]:.0f}, "
                  f"ratio {per_hour[0] / per_hour[1]:.2f}x", flush=True)
        print()


if __name__ == "__main__":
    main()
