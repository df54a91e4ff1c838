"""Host time of one training step of a pack: how much of it is the K rules' optimizer steps.

    python benchmarks/pack_host.py [--device cpu] [--packs 8,32] [--repeats 200]
    python benchmarks/pack_host.py --whole [--device cpu] [--packs 8,32]

A pack of K rules (nos.tasks.packed) trains as one stacked network, but each
rule steps its own slice with its own optimizer: K optimizer calls per
training step, launched from Python. Here the paper's convnet child is cut to
one filter on 4 x 4 images and a batch of 2, so the device has next to no
work and what is timed is the host's: the stacked forward and backward, and
the optimizers' steps, taken the way a pack takes them (`nos.optim.step_together`)
and, as the reference in the same process, by each optimizer's own `step()`.
Both take turns, 10 steps at a time; the medians are printed for a sweep
(7 rates per rule) and a final run (1 rate per rule). On CUDA every timed
block ends with a synchronize, so the figures include the launches. The last
column times the same optimizers with the stack's per-child rates shaped the
other way (nos.optim.FULL_RATE_DEVICES: full copies, one foreach launch for
all of a rule's tensors on a GPU, or views that broadcast, one per tensor).

--whole times whole packs instead: `evaluate_rules` on K rules, the protocol
(7 rates for one epoch, then the best for 5) on 128 such images, so each
pack is some 64 x 6 steps of a stack that shrinks from K x 7 children to K.
Its seconds are the host's time for a pack's whole life; its reward sum
tells whether two checkouts trained alike, to compare their times.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from gpu_pack import rules, sync
from gpu_sweep import synthetic_cifar

import nos.optim
from nos.optim import resolve_rule
from nos.tasks.base import Splits, Task
from nos.tasks.networks import paper_convnet
from nos.tasks.objectives import Accuracy
from nos.tasks.packed import Member, PackedChildren, evaluate_rules
from nos.tasks.training import initial_child

BLOCK = 10   # steps per timed block


def tiny_task(device: torch.device, images: int = 16, epochs: int = 1) -> Task:
    """The one-filter child on `images` 4x4 images (validation and test: the first 16)."""
    x, y = synthetic_cifar(images, device, 0)
    x = x[:, :, :4, :4].contiguous()
    return Task("tiny-convnet", Splits(x, y, x[:16], y[:16], x[:16], y[:16]),
                lambda: paper_convnet(3, 4, filters=1), Accuracy(), batch_size=2, sweep_epochs=1, epochs=epochs,
                device=device, stacked=True)


def whole_packs(device: torch.device, packs: list[int], repeats: int) -> None:
    task = tiny_task(device, images=128, epochs=5)
    print("| K | seconds per pack (median) | evaluations per second | reward sum |")
    print("|---|---|---|---|")
    for k in packs:
        seconds, rewards = [], 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            results = evaluate_rules(rules(k), task, seed=0)
            sync(device)
            seconds.append(time.perf_counter() - start)
            rewards = sum(result.reward for result in results)
        median = statistics.median(seconds)
        print(f"| {k} | {median:.2f} | {k / median:.1f} | {rewards:.4f} |", flush=True)


def pack_of(task: Task, k: int, lrs: tuple[float, ...]) -> tuple[PackedChildren, torch.Tensor, torch.Tensor]:
    members = [Member(resolve_rule(rule), lrs, 100) for rule in rules(k)]
    pack = PackedChildren(task, initial_child(task, 0), members, seed=0)
    return pack, task.splits.train_x[:2], task.splits.train_y[:2]


def forward_backward(pack: PackedChildren, x: torch.Tensor, y: torch.Tensor) -> None:
    for p in pack.params.values():
        p.grad = None
    pack.loss(pack.forward(pack.params, pack.buffers, x), y).sum().backward()


def one_by_one(pack: PackedChildren) -> None:
    """The reference: the same gradients handed over, then each rule's optimizer's own step()."""
    for optimizer in pack.hand_gradients():
        optimizer.step()


def timed(device: torch.device, run) -> float:
    """Milliseconds per step over a block of BLOCK steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(BLOCK):
        run()
    sync(device)
    return (time.perf_counter() - start) * 1e3 / BLOCK


def full_rates(device: torch.device) -> bool:
    """Whether nos keeps a stack's per-child rates at each parameter's full shape on `device`."""
    return device.type in nos.optim.FULL_RATE_DEVICES


@contextlib.contextmanager
def rates_shaped_otherwise(device: torch.device):
    """Optimizers that build their buckets meanwhile shape the rates the way nos does not on `device`."""
    saved = nos.optim.FULL_RATE_DEVICES
    nos.optim.FULL_RATE_DEVICES = () if full_rates(device) else (device.type,)
    try:
        yield
    finally:
        nos.optim.FULL_RATE_DEVICES = saved


def measure(task: Task, k: int, lrs: tuple[float, ...], repeats: int) -> dict[str, float]:
    pack, x, y = pack_of(task, k, lrs)
    other, _, _ = pack_of(task, k, lrs)
    device = task.device
    forward_backward(pack, x, y)
    forward_backward(other, x, y)
    with rates_shaped_otherwise(device):
        timed(device, other._step)   # builds (and keeps) its buckets' rates the other way
    runs = {"forward + backward": lambda: forward_backward(pack, x, y),
            "optimizers, together": pack._step,
            "optimizers, one by one": lambda: one_by_one(pack),
            "rates shaped otherwise": other._step}
    for run in runs.values():   # warm up: first calls allocate and build the kept buckets
        timed(device, run)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(max(repeats // BLOCK, 1)):
        names = list(runs) if i % 2 == 0 else list(reversed(runs))   # neither side always goes first
        for name in names:
            times[name].append(timed(device, runs[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--packs", default="8,32")
    parser.add_argument("--repeats", type=int, default=200, help="timed steps of each kind per row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU)")
    parser.add_argument("--whole", action="store_true", help="instead: whole packs, the protocol end to end "
                        "(3 of each K; --repeats is ignored)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.whole:
        print(f"whole packs' host time, torch {torch.__version__} on {name}: the convnet child cut to 1 filter, "
              "4x4 images, batch 2; 128 images, 7 rates x 1 epoch then 5")
        whole_packs(device, [int(k) for k in args.packs.split(",")], 3)
        return
    task = tiny_task(device)
    print(f"pack host time, torch {torch.__version__} on {name}: the convnet child cut to 1 filter, 4x4 images, "
          f"batch 2; medians of {args.repeats} steps, ms per training step")
    shapes = ("full copies", "views") if full_rates(device) else ("views", "full copies")
    print(f"per-child rates: {shapes[0]} here (nos.optim.FULL_RATE_DEVICES); the last column steps the same "
          f"optimizers with the rates as {shapes[1]}")
    print("| K | rates per rule | forward + backward | optimizers, together | one by one | together / one by one "
          f"| rates as {shapes[1]} / together |")
    print("|---|---|---|---|---|---|---|")
    for k in (int(k) for k in args.packs.split(",")):
        for lrs in (tuple(task.lrs), (0.01,)):
            t = measure(task, k, lrs, args.repeats)
            together, apart = t["optimizers, together"], t["optimizers, one by one"]
            print(f"| {k} | {len(lrs)} | {t['forward + backward']:.2f} | {together:.2f} | {apart:.2f} "
                  f"| {together / apart:.2f}x | {t['rates shaped otherwise'] / together:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
