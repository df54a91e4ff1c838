"""How much a rule's reward depends on the CPU's vector instructions.

    python benchmarks/cpu_rounding.py [--task digits] [--rules 40] [--probes 3000] [--memo FILE] [--capability avx2]

An evaluation is exact on one machine: the same rule, seed and task give the same reward bit
for bit. But torch picks its CPU kernels by instruction set (AVX-512, AVX2, ...), and kernels
of different widths round differently. Most rules forget that difference; a rule that trains
near the edge of stability, or draws dropout noise whose effect depends on the weights,
amplifies it into a different reward. Workers of one run on different CPUs can therefore score
the same rule differently, and a benchmark memo filled on several machines mixes them.

This script measures it on this machine: the built-ins and the first `--rules` rules of a
searchers.py memo with rewards above 0.3 (so that they train), each evaluated in a process with
torch's own choice of kernels and in one limited to `--capability` (ATEN_CPU_CAPABILITY).
It prints how many rewards differ and by how much. It also probes the memo's first `--probes`
rules under both (nos.rules.fingerprint: the key the caches answer by, hashed from the probe's
float64 updates rounded to float32) and counts the fingerprints that differ between the two,
and those that differ from the ones the memo stored, which were computed on whatever machine
first trained each rule. Only torch's own kernels are switched; its matrix-multiply library
may choose by CPU model too, so two real machines can differ more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from searchers import memo_path  # benchmarks/ is this script's folder, first on sys.path

STANDARD = ["sgd", "momentum", "adam", "rmsprop", "powersign"]


def rewards_here(task: str, rules: list[str], probed: list[str]) -> dict:
    """Evaluate `rules` in this process (children's seed 0) and probe `probed`: capability, rewards,
    fingerprints."""
    import torch

    from nos.rules.builtins import resolve_rule
    from nos.rules.fingerprint import probe
    from nos.tasks import evaluate_rule, get_task

    torch.set_num_threads(1)
    spec = get_task(task)
    return {"cpu": torch.backends.cpu.get_cpu_capability(),
            "rewards": [evaluate_rule(resolve_rule(rule), spec, seed=0).reward for rule in rules],
            "fingerprints": [probe(resolve_rule(rule)).fingerprint for rule in probed]}


def rewards_under(capability: str | None, task: str, rules: list[str], probed: list[str]) -> dict:
    """The same in a fresh process whose torch kernels are limited to `capability` (None: torch's choice)."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, __file__, "--child", task], input=json.dumps([rules, probed]), env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--rules", type=int, default=40)
    parser.add_argument("--probes", type=int, default=3000)
    parser.add_argument("--memo", default=None, help="default: benchmarks/memo/TASK-child0.jsonl")
    parser.add_argument("--capability", default="avx2")
    parser.add_argument("--child", metavar="TASK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(rewards_here(args.child, *json.loads(sys.stdin.read()))))
        return
    memo = Path(args.memo) if args.memo else memo_path(args.task, {}, 0)
    entries = [json.loads(line) for line in memo.read_text().splitlines()]
    trained = [e["text"] for e in entries if e["reward"] > 0.3]
    rules = STANDARD + trained[:args.rules]   # the memo only grows: its first rules stay the same
    stored = [e for e in entries[:args.probes] if e.get("fingerprint")]
    probed = [e["text"] for e in stored]
    native = rewards_under(None, args.task, rules, probed)
    limited = rewards_under(args.capability, args.task, rules, probed)
    print(f"{args.task}, children's seed 0: {len(rules)} rules under {native['cpu']} and {limited['cpu']}\n")
    print(f"| rule | {native['cpu']} | {limited['cpu']} |")
    print("|---|---|---|")
    differences = []
    for rule, a, b in zip(rules, native["rewards"], limited["rewards"]):
        differences.append(abs(a - b))
        if rule in STANDARD or a != b:
            print(f"| `{rule}` | {a:.4f} | {b:.4f} |")
    print(f"\n{sum(d > 0 for d in differences)} of {len(rules)} rewards differ; "
          f"mean |difference| {statistics.mean(differences):.4f}, largest {max(differences):.4f}")
    switched = [rule for rule, a, b in zip(probed, native["fingerprints"], limited["fingerprints"]) if a != b]
    print(f"{len(switched)} of {len(probed)} fingerprints differ between the two" +
          "".join(f"\n  `{rule}`" for rule in switched))
    # The memo's fingerprints were computed wherever its rules were first trained: another machine's rounding.
    elsewhere = [e["text"] for e, here in zip(stored, native["fingerprints"]) if e["fingerprint"] != here]
    print(f"{len(elsewhere)} of {len(stored)} fingerprints stored in the memo differ from this machine's" +
          "".join(f"\n  `{rule}`" for rule in elsewhere))


if __name__ == "__main__":
    main()
