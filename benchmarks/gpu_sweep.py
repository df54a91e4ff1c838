"""The stacked sweep against one child at a time, on the paper's CIFAR-10 child.

    python benchmarks/gpu_sweep.py                      # cuda, CIFAR-shaped synthetic data
    python benchmarks/gpu_sweep.py --device cpu --train-size 512 --rules sgd   # a smoke run anywhere

Both runs use `evaluate_rule` on the same task; only `Task.stacked` differs:
True trains the sweep's 7 children as one vmapped network (grouped
convolutions), False one after another. The data is synthetic but
CIFAR-shaped (3x32x32, 10 classes, labels from a fixed random teacher so
there is something to learn) and resident on the device, so no download is
needed. Prints evaluations per hour of each and their ratio, plus the
rewards, which must agree within rounding.
"""

from __future__ import annotations

import argparse
import time

import torch

from nos.tasks import evaluate_rule
from nos.tasks.base import Splits, Task
from nos.tasks.networks import paper_convnet
from nos.tasks.objectives import Accuracy


def synthetic_cifar(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    teacher = torch.randn(3 * 32 * 32, 10, generator=torch.Generator().manual_seed(99))
    y = (x.flatten(1) @ teacher).argmax(1)
    return x.to(device), y.to(device)


def cifar_task(train: int, device: torch.device, stacked: bool, epochs: int) -> Task:
    train_x, train_y = synthetic_cifar(train, device, 0)
    val_x, val_y = synthetic_cifar(max(train // 10, 256), device, 1)
    test_x, test_y = synthetic_cifar(max(train // 10, 256), device, 2)
    channels_last = device.type == "cpu"
    if channels_last:
        train_x, val_x, test_x = (t.contiguous(memory_format=torch.channels_last) for t in (train_x, val_x, test_x))
    return Task("cifar10-synthetic", Splits(train_x, train_y, val_x, val_y, test_x, test_y),
                lambda: paper_convnet(3, 32), Accuracy(), batch_size=128, epochs=epochs, device=device,
                channels_last=channels_last, stacked=stacked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-size", type=int, default=45000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rules", default="sgd,adam,powersign")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    rules = args.rules.split(",")
    tasks = {flag: cifar_task(args.train_size, device, flag, args.epochs) for flag in (True, False)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}; synthetic CIFAR-10 {tasks[True].splits.sizes}, "
          f"{args.epochs} epochs, rules {', '.join(rules)}")

    evaluate_rule("sgd", cifar_task(1024, device, True, 1), 0)    # warm up kernels and cuDNN
    evaluate_rule("sgd", cifar_task(1024, device, False, 1), 0)
    seconds = {True: 0.0, False: 0.0}
    for _ in range(args.repeats):
        for rule in rules:
            results = {}
            for flag in (True, False):   # taking turns: drift in the machine hits both
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                results[flag] = evaluate_rule(rule, tasks[flag], 0)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[flag] += time.perf_counter() - start
            a, b = results[True], results[False]
            print(f"  {rule:10s} stacked: best lr {a.best_lr:<6g} reward {a.reward:.4f} | "
                  f"sequential: best lr {b.best_lr:<6g} reward {b.reward:.4f}", flush=True)
    n = len(rules) * args.repeats
    per_hour = {flag: 3600 * n / seconds[flag] for flag in seconds}
    print(f"evaluations per hour: stacked {per_hour[True]:.0f}, sequential {per_hour[False]:.0f}, "
          f"ratio {per_hour[True] / per_hour[False]:.2f}x")


if __name__ == "__main__":
    main()
