"""The fast protocol against the full one on sampled rules: speed, rank agreement, halving's choices.

    flock /tmp/nos-bench.lock python benchmarks/fast_protocol.py --task digits --rules 100
    flock /tmp/nos-bench.lock python benchmarks/fast_protocol.py --task fashion-mnist --train-size 10000 \\
        --rules 50 --reference-rules 3

Rules are sampled as a search samples them (the random searcher, depth 2),
unique by canonical text. Each rule gets, in one process, one thread:

- full: the paper's protocol as `benchmarks/evaluate.py` runs it: every
  rate for an epoch, the 5-epoch run at the best; no probe, no explosion
  stop (a non-finite loss still ends a trial);
- fast: what a search does with everything on: the probe (rejected rules
  score 0 without training; a rule behaving as one already scored takes its
  reward), successive halving over the rates, the loss-explosion stop;
- halving (with --halving-check): successive halving alone, so that its
  choice of rate is judged apart from the other shortcuts.

It prints evaluations per hour (CPU time) of fast against full, Spearman's
rank correlation of their rewards, how often halving's reward is within 0.5
points of the full sweep's, and, with --reference-rules K, the plain
reference of benchmarks/evaluate.py on the first K non-rejected rules, so
that fast / reference = (full / reference on those K) x (fast / full on all).
Two figures bound what any fast protocol can show: the ceiling (Spearman if
fast equalled full on every rule it trains: rejection's reward is 0 where
full gives chance-level noise), and with --retest-seed S the full protocol
against itself under another seed. --explode and --halving-tie measure
other settings of the shortcuts' knobs (sweep_traces.py replays the halving
rankings on stored traces).
Results go to --out as JSON lines as they come (a long run can be read early).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import reference_evaluate  # noqa: E402  (the plain reference implementation)

from nos.rules import parse, to_text  # noqa: E402
from nos.rules.fingerprint import probe  # noqa: E402
from nos.search import make_searcher  # noqa: E402
from nos.tasks import evaluate_rule, get_task, protocol  # noqa: E402


def sample_rules(n: int, depth: int, seed: int) -> list[str]:
    searcher = make_searcher("random", depth, seed)
    texts: list[str] = []
    while len(texts) < n:
        for proposal in searcher.propose(n):
            text = to_text(proposal.tree)
            if text not in texts and len(texts) < n:
                texts.append(text)
    return texts


def stored_rules(url: str, run_id: int, n: int, seed: int) -> list[str]:
    """n of the distinct rules a stored run sampled, drawn uniformly (seeded)."""
    import random

    from sqlalchemy import select

    from nos.store import open_store
    from nos.store.models import Evaluation, Rule

    store = open_store(url)
    with store.reading() as session:
        texts = sorted(set(session.execute(
            select(Rule.text).join(Evaluation, Evaluation.rule_id == Rule.id).where(Evaluation.run_id == run_id)
        ).scalars()))
    store.dispose()
    return random.Random(seed).sample(texts, min(n, len(texts)))


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks, ties given their mean rank."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


@dataclass
class _Reward:
    """A full evaluation read back from an earlier run's output."""

    reward: float
    best_lr: float | None
    sweep: list | None = None


def _sweep(result) -> list:
    """Each sweep trial's validation accuracy (None: stopped by halving; "x": diverged), for reading a run later."""
    return [("x" if t.diverged else t.val_acc) for t in result.trials]


def cpu_seconds(fn):
    start = time.process_time()
    value = fn()
    return value, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="digits")
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--rules", type=int, default=100)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="samples the rules; also the evaluation seed")
    parser.add_argument("--halving-check", action="store_true", help="also evaluate with halving alone")
    parser.add_argument("--reference-rules", type=int, default=0, help="run the plain reference on the first K "
                        "rules the probe lets through; -1: on every rule (the direct fast / reference ratio)")
    parser.add_argument("--out", default=None, help="JSON lines, one per rule")
    parser.add_argument("--from-db", default=None, help="sample the rules a stored run sampled (with --run)")
    parser.add_argument("--run", type=int, default=1)
    parser.add_argument("--shard", default="0/1", help="I/N: evaluate every N-th rule from the I-th "
                        "(run shards in parallel processes, then --summary their --out files)")
    parser.add_argument("--summary", nargs="*", default=None, help="only summarise these JSON-lines files")
    parser.add_argument("--reuse-full", nargs="*", default=(), help="JSON-lines files of an earlier run: "
                        "rules found there keep their full (and reference) results; fast is measured again")
    parser.add_argument("--reuse-fast", action="store_true", help="with --reuse-full: keep their fast results "
                        "too, and only add what they lack (e.g. the reference)")
    parser.add_argument("--retest-seed", type=int, default=None, help="also run the full protocol with this "
                        "seed: how well full agrees with itself bounds what any fast protocol can show")
    parser.add_argument("--explode", type=float, default=None, help="fast's explosion factor [the task's default]")
    parser.add_argument("--halving-tie", type=float, default=None, help="override protocol.HALVING_TIE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.halving_tie is not None:   # to measure another setting of halving's knob
        protocol.HALVING_TIE = args.halving_tie
    if args.summary is not None:
        rows = [json.loads(line) for path in args.summary for line in Path(path).read_text().splitlines()]
        summarise(rows, args.halving_check)
        return

    options = {"train_size": args.train_size} if args.train_size else {}
    full_task = get_task(args.task, explode=0, **options)
    fast_task = get_task(args.task, sweep="halving", **options,
                         **({"explode": args.explode} if args.explode is not None else {}))
    halving_task = get_task(args.task, sweep="halving", explode=0, **options)
    rules = (stored_rules(args.from_db, args.run, args.rules, args.seed) if args.from_db
             else sample_rules(args.rules, args.depth, args.seed))
    shard, shards = (int(x) for x in args.shard.split("/"))
    rules = rules[shard::shards]
    out = open(args.out, "w") if args.out else None
    print(f"torch {torch.__version__}, 1 thread; {args.task} {full_task.splits.sizes}; {len(rules)} sampled rules")

    earlier = {row["rule"]: row for path in args.reuse_full
               for row in map(json.loads, Path(path).read_text().splitlines())}
    rows, scored = [], {}   # scored: fingerprint -> fast reward (the search's equivalence cache)
    for i, rule in enumerate(rules):
        if args.reuse_fast and rule in earlier:
            row = dict(earlier[rule])
            _add_reference(row, rule, full_task, args.seed, args.reference_rules, rows)
            rows.append(row)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
            print(f"{i + 1:3d} reused     reference {row.get('reference_cpu', 0):6.1f} s  {rule}", flush=True)
            continue
        if rule in earlier:
            old = earlier[rule]
            full, full_cpu = _Reward(old["full"], old["full_lr"], old.get("full_sweep")), old["full_cpu"]
        else:
            full, full_cpu = cpu_seconds(lambda: evaluate_rule(rule, full_task, args.seed))
        verdict, probe_cpu = cpu_seconds(lambda: probe(parse(rule)))
        fast_lr, fast_sweep = None, None
        if verdict.rejection:
            fast_reward, fast_cpu, how = 0.0, probe_cpu, "rejected"
        elif verdict.fingerprint in scored:
            fast_reward, fast_cpu, how = scored[verdict.fingerprint], probe_cpu, "equivalent"
        else:
            fast, fast_cpu = cpu_seconds(lambda: evaluate_rule(rule, fast_task, args.seed))
            fast_reward, fast_cpu, how = fast.reward, fast_cpu + probe_cpu, "trained"
            fast_lr, fast_sweep = fast.best_lr, _sweep(fast)
            scored[verdict.fingerprint] = fast_reward
        row = dict(rule=rule, full=full.reward, full_lr=full.best_lr, full_cpu=full_cpu, fast=fast_reward,
                   fast_cpu=fast_cpu, how=how, rejection=verdict.rejection, fast_lr=fast_lr,
                   full_sweep=full.sweep if isinstance(full, _Reward) else _sweep(full), fast_sweep=fast_sweep)
        if args.halving_check:
            halving = evaluate_rule(rule, halving_task, args.seed)
            row.update(halving=halving.reward, halving_lr=halving.best_lr)
        if args.retest_seed is not None:
            if rule in earlier and earlier[rule].get("retest_seed") == args.retest_seed:
                row.update({k: earlier[rule][k] for k in ("retest", "retest_seed")})
            else:
                row.update(retest=evaluate_rule(rule, full_task, args.retest_seed).reward, retest_seed=args.retest_seed)
        if rule in earlier and "reference" in earlier[rule]:
            row.update({k: earlier[rule][k] for k in ("reference", "reference_lr", "reference_cpu")})
        else:
            _add_reference(row, rule, full_task, args.seed, args.reference_rules, rows)
        rows.append(row)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
        print(f"{i + 1:3d} {how:10s} full {full.reward:.4f} ({full_cpu:6.1f} s)  fast {fast_reward:.4f} "
              f"({fast_cpu:6.1f} s)" + (f"  halving {row['halving']:.4f}" if args.halving_check else "")
              + f"  {rule}", flush=True)
    summarise(rows, args.halving_check)


def _add_reference(row: dict, rule: str, task, seed: int, wanted: int, rows: list[dict]) -> None:
    """The plain reference's result on `rule`, if `wanted` (-1: every rule; K: the first K the probe lets through)."""
    if "reference" in row or not wanted:
        return
    if wanted > 0 and (row["rejection"] or sum("reference" in r for r in rows) >= wanted):
        return
    (ref_lr, ref_reward, _), ref_cpu = cpu_seconds(lambda: reference_evaluate(rule, task, seed))
    row.update(reference=ref_reward, reference_lr=ref_lr, reference_cpu=ref_cpu)


def summarise(rows: list[dict], halving_check: bool) -> None:
    full_cpu = sum(r["full_cpu"] for r in rows)
    fast_cpu = sum(r["fast_cpu"] for r in rows)
    print(f"\nevaluations per hour (cpu): fast {3600 * len(rows) / fast_cpu:.0f}, "
          f"full {3600 * len(rows) / full_cpu:.0f}, "
          f"ratio {full_cpu / fast_cpu:.2f}x")
    print(f"rejected {sum(r['how'] == 'rejected' for r in rows)}, equivalent to an earlier rule "
          f"{sum(r['how'] == 'equivalent' for r in rows)}, trained {sum(r['how'] == 'trained' for r in rows)}")
    correlation = spearman([r['fast'] for r in rows], [r['full'] for r in rows])
    print(f"Spearman rank correlation, fast vs full rewards: {correlation:.3f}")
    trained = [r for r in rows if not r["rejection"]]
    if trained:
        print(f"  on the {len(trained)} rules the probe lets through (halving and the explosion stop alone): "
              f"{spearman([r['fast'] for r in trained], [r['full'] for r in trained]):.3f}")
    learned = [r for r in rows if r["full"] > 0.2]
    if learned:
        print(f"  on the {len(learned)} rules whose full reward exceeds 0.2: "
              f"{spearman([r['fast'] for r in learned], [r['full'] for r in learned]):.3f}")
    # Rejection's reward is 0 where the full protocol gives chance-level noise: even a fast
    # protocol that matched full on every rule it trains could rank no better than this.
    print(f"  ceiling with rejected rules at 0 and every other fast reward equal to full: "
          f"{spearman([0.0 if r['rejection'] else r['full'] for r in rows], [r['full'] for r in rows]):.3f}")
    retested = [r for r in rows if "retest" in r]
    if retested:
        seed = retested[0]["retest_seed"]
        above = [r for r in retested if r['full'] > 0.2]
        print(f"the full protocol against itself with seed {seed}, on {len(retested)} rules: "
              f"{spearman([r['full'] for r in retested], [r['retest'] for r in retested]):.3f}; on those above 0.2: "
              f"{spearman([r['full'] for r in above], [r['retest'] for r in above]):.3f}; "
              f"fast against full with seed {seed}: "
              f"{spearman([r['fast'] for r in retested], [r['retest'] for r in retested]):.3f}")
    rejected_rewards = [r["full"] for r in rows if r["rejection"]]
    if rejected_rewards:
        mean = sum(rejected_rewards) / len(rejected_rewards)
        print(f"rejected rules' full rewards: max {max(rejected_rewards):.4f}, mean {mean:.4f}")
    if halving_check:
        close = [abs(r["halving"] - r["full"]) <= 0.005 for r in rows]
        close_learned = [abs(r["halving"] - r["full"]) <= 0.005 for r in learned]
        print(f"halving within 0.5 points of the full sweep's reward: {sum(close)}/{len(close)} "
              f"({sum(close) / len(close):.0%}); on rules above 0.2: {sum(close_learned)}/{len(close_learned)}"
              f"; same rate chosen: {sum(r['halving_lr'] == r['full_lr'] for r in rows)}/{len(rows)}")
    with_ref = [r for r in rows if "reference" in r]
    if with_ref and len(with_ref) == len(rows):
        ref_cpu = sum(r["reference_cpu"] for r in rows)
        print(f"reference on all {len(rows)} rules: {3600 * len(rows) / ref_cpu:.0f} evaluations per hour (cpu); "
              f"full is {ref_cpu / full_cpu:.2f}x the reference, fast {ref_cpu / fast_cpu:.2f}x")
    elif with_ref:
        ref_ratio = sum(r["reference_cpu"] for r in with_ref) / sum(r["full_cpu"] for r in with_ref)
        print(f"reference on {len(with_ref)} rules: full is {ref_ratio:.2f}x the reference; "
              f"fast against the reference: {ref_ratio * full_cpu / fast_cpu:.2f}x")


if __name__ == "__main__":
    main()
