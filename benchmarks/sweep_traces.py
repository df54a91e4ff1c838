"""Replay the sweep's shortcuts on per-step traces: which explosion factor and halving ranking keep full's pick.

    python benchmarks/sweep_traces.py trace fm0.jsonl fm1.jsonl --out traces.jsonl   # from fast_protocol.py --out
    python benchmarks/sweep_traces.py replay traces.jsonl

`trace` trains every rate of the full sweep (no explosion stop, one child at
a time) for the rules of `benchmarks/fast_protocol.py` output files that
were trained and learn (full reward above --above), recording each step's
training loss and the validation accuracy at a quarter and at the end of the
epoch. `replay` then applies, on those traces, each combination of an
explosion factor and a halving ranking (none, the quarter's mean training
loss, validation accuracy at the quarter) and counts the rules whose pick is
the full sweep's, with the sweep's training cost against the full sweep's
(a validation pass counted as --val-cost quarter-epochs of one child).
Replaying is exact for the choice of rate: the kept trials are the same
trials as in the full sweep.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nos.optim import resolve_rule
from nos.records import TrialRecord
from nos.tasks import get_task
from nos.tasks.protocol import halve
from nos.tasks.training import Child, deterministic, initial_child


def trace(files: list[str], out: str, task_name: str, train_size: int | None, above: float, seed: int) -> None:
    rows = [json.loads(line) for path in files for line in Path(path).read_text().splitlines()]
    rows = [r for r in rows if r["how"] == "trained" and r["full"] > above]
    options = {"train_size": train_size} if train_size else {}
    task = get_task(task_name, explode=0, stacked=False, **options)
    steps = task.steps_per_epoch
    with open(out, "w") as sink, deterministic(task.device):
        for row in rows:
            tree, initial, rates = resolve_rule(row["rule"]), initial_child(task, seed), {}
            for lr in task.lrs:
                child = Child.fresh(task, initial, tree, lr, task.epochs * steps, seed)
                losses, vals = [], {}
                for step in range(1, steps + 1):
                    before = float(child.loss_seen)
                    child.train_steps(1)
                    if child.diverged:
                        break
                    losses.append(float(child.loss_seen) - before)
                    if step in (steps // 4, steps):
                        child.validate()
                        vals["quarter" if step == steps // 4 else "end"] = child.val_acc
                rates[repr(lr)] = dict(losses=losses, vals=vals, diverged=child.diverged)
            sink.write(json.dumps(dict(rule=row["rule"], full=row["full"], steps=steps, rates=rates)) + "\n")
            sink.flush()
            print(f"{row['full']:.4f}  {row['rule']}", flush=True)


class _TracedSweep:
    """A sweep group that replays traces, for the protocol's own `halve` to choose from.

    A rate stops at the first loss above `factor` times its first (or where its
    trace diverged); `steps` and `validations` count the work the sweep did.
    """

    def __init__(self, rates: list[dict], epoch: int, factor: float):
        self.rates, self.epoch, self.position, self.steps, self.validations = rates, epoch, 0, 0, 0
        self.stop_at = [_stop_at(rate, factor) for rate in rates]
        self.running = list(range(len(rates)))

    def advance(self, steps: int, on_scored=None, validate: bool = True) -> None:
        start, self.position = self.position, self.position + steps
        for i in list(self.running):
            stop = self.stop_at[i]
            self.steps += max(0, (self.position if stop is None else min(self.position, stop + 1)) - start)
            if stop is not None and stop < self.position:
                self.running.remove(i)
        self.validations += len(self.running) if validate else 0

    def loss_seen(self, index: int) -> float:
        return sum(self.rates[index]["losses"][:self.position])

    def record(self, index: int) -> TrialRecord:
        vals = self.rates[index]["vals"]
        val = vals["end"] if self.position == self.epoch else vals["quarter"]
        return TrialRecord(1.0, val, None, False, 0.0, 0, self.position)

    def stop(self, children: list[int]) -> None:
        self.running = [i for i in self.running if i not in children]


def _stop_at(rate: dict, factor: float) -> int | None:
    """The index of the step that stops a rate (None: it trains the whole epoch)."""
    losses = rate["losses"]
    at = next((i for i, x in enumerate(losses) if factor and x > factor * losses[0]), None)
    return len(losses) if at is None and rate["diverged"] else at


def choose(rates: list[dict], steps: int, factor: float, rank: str, val_cost: float) -> tuple[int | None, float]:
    """(the sweep's pick, its cost in quarter-epochs of one child) under an explosion factor and a ranking."""
    group = _TracedSweep(rates, steps, factor)
    if rank == "none":
        group.advance(steps)
    else:
        halve(group, len(rates), steps, {}, None, rank=rank)
    finished = [i for i in group.running if group.stop_at[i] is None]   # not diverged at the epoch's end
    pick = max(finished, key=lambda i: (rates[i]["vals"]["end"], -i), default=None)
    return pick, (group.steps + group.validations * val_cost * (steps // 4)) / (steps // 4)


def replay(path: str, factors: list[float], val_cost: float) -> None:
    traces = [json.loads(line) for line in Path(path).read_text().splitlines()]
    print(f"{len(traces)} traced rules; cost is the sweep's training against the full sweep's")
    for factor in factors:
        for rank in ("none", "loss", "val"):
            same, cost, full_cost = 0, 0.0, 0.0
            for t in traces:
                rates = list(t["rates"].values())
                full, base = choose(rates, t["steps"], 0, "none", val_cost)
                pick, spent = choose(rates, t["steps"], factor, rank, val_cost)
                same, cost, full_cost = same + (pick == full), cost + spent, full_cost + base
            print(f"explode {factor:6g}  halving {rank:4s}: full's pick kept on {same}/{len(traces)}, "
                  f"sweep cost {cost / full_cost:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trace")
    t.add_argument("files", nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--task", default="fashion-mnist")
    t.add_argument("--train-size", type=int, default=10000)
    t.add_argument("--above", type=float, default=0.2, help="trace rules whose full reward exceeds this")
    t.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("replay")
    r.add_argument("traces")
    r.add_argument("--factors", default="0,10,30,100,1000")
    r.add_argument("--val-cost", type=float, default=0.7, help="a validation pass in quarter-epochs of training "
                   "(0.7 for the Fashion-MNIST conv child on this machine's CPU)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "trace":
        trace(args.files, args.out, args.task, args.train_size, args.above, args.seed)
    else:
        replay(args.traces, [float(x) for x in args.factors.split(",")], args.val_cost)


if __name__ == "__main__":
    main()
