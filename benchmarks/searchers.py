"""Searchers and their settings against each other on one reward landscape.

    python benchmarks/searchers.py --task digits --budget 1000 --seeds 0 1 2 3 4 \\
        [--config ppo --config "ppo update_every=5 lr=0.01" --config random ...] \\
        [--jobs 2] [--pack K] [--memo FILE] [--json RUNS.jsonl] [--plot curves.png] [--recheck 3]

Each --config is a searcher name, then `key=value` settings: `update_every` (its old name
`batch_size` is read too), `warm_start`
(builtins / none) or any of the searcher's hyperparameters (nos.search.settings). Without
--config: PPO, REINFORCE and evolution with and without the warm start, and random search,
all at nos's defaults.

Every (config, seed) runs the driver's own step logic (`nos.driver.sample_step`: proposals
until a batch passes the probe, rejections free of the budget and learned from, as in a real
run) against the real evaluation protocol, in one process per job. The children's seed is
fixed (--child-seed), so every config and searcher seed sees the same reward landscape, and
rewards are memoised by canonical text and by fingerprint in --memo (JSON lines shared by
the jobs and by later invocations; benchmarks/memo/ keeps them in the repository, so a later
checkout replays a landscape instead of training it again: delete a memo when the protocol
changes, docs/changelog.md), as a run's database cache would: a rule is trained once,
whoever proposes it. A killed benchmark restarted with the same memo replays what it had.
A rule's reward is exact on one machine but can differ on a CPU with other vector
instructions (entries record theirs as "cpu"), so a replay that must train rules the memo
lacks may follow another path than the recorded run did.
With --pack K the new rules of a step train together, up to K at a time (`nos.tasks.packed`,
as a packed worker does: equal to one at a time within rounding, and faster for MLP children
on the CPU, docs/benchmarks.md).

Prints one markdown row per config (mean and spread over seeds): the mean reward of the last
200 counted evaluations (and each seed's), the mean over evaluations 300-500, the best
reward, counted evaluations at or above --threshold, distinct rules, rejected proposals per
counted evaluation, and the seconds per run. With --plot, the paper's Figure 4 for each
config: reward against counted evaluations (a moving mean, mean over seeds with a band of
one standard deviation) and the best so far. With --recheck K, the K best rules found (over
all runs) and the best built-ins are evaluated again under 5 children's seeds, validation
and test, to say whether a found rule beats the built-ins beyond seed noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from multiprocessing import Pool
from pathlib import Path

import torch

from nos.config import SearchConfig
from nos.driver import sample_step
from nos.rules import to_text
from nos.rules.builtins import BUILTINS
from nos.search import make_searcher
from nos.tasks import evaluate_rule, get_task
from nos.tasks.packed import evaluate_rules

# torch's CPU kernels round differently on different instruction sets (AVX-512, AVX2), and a
# chaotic rule amplifies that into a different reward: a memo entry and a run say where they
# were computed, so a replay that drifts from a recorded run can be traced (docs/benchmarks.md).
CPU = torch.backends.cpu.get_cpu_capability()

DEFAULT_CONFIGS = ("ppo", "ppo warm_start=builtins", "reinforce", "reinforce warm_start=builtins", "random",
                   "evolution", "evolution warm_start=none")
STANDARD = ("sgd", "momentum", "adam", "rmsprop", "powersign", "addsign")
_TASKS: dict[str, object] = {}


def parse_config(text: str) -> tuple[str, dict]:
    name, *pairs = text.split()
    settings = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return name, settings


def task_of(name: str, options: dict):
    key = json.dumps([name, options], sort_keys=True)
    if key not in _TASKS:
        _TASKS[key] = get_task(name, **options)
    return _TASKS[key]


class Memo:
    """Rewards by canonical text and by fingerprint, in a JSON-lines file other processes append to."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.by_text: dict[str, float] = {}
        self.by_fingerprint: dict[str, float] = {}
        self.read = 0
        self.reload()

    def reload(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.read)
            for line in f:
                if not line.endswith(b"\n"):   # another process is still writing it
                    break
                self.read += len(line)
                entry = json.loads(line)
                self.by_text[entry["text"]] = entry["reward"]
                if entry.get("fingerprint"):
                    self.by_fingerprint[entry["fingerprint"]] = entry["reward"]

    def lookup(self, text: str, fingerprint: str | None) -> float | None:
        if text in self.by_text:
            return self.by_text[text]
        return self.by_fingerprint.get(fingerprint) if fingerprint else None

    def add(self, text: str, fingerprint: str | None, reward: float, test: float | None) -> None:
        self.by_text[text] = reward
        if fingerprint:
            self.by_fingerprint[fingerprint] = reward
        with open(self.path, "a") as f:
            f.write(json.dumps({"text": text, "fingerprint": fingerprint, "reward": reward, "test": test,
                                "cpu": CPU}) + "\n")


def search(job: tuple) -> dict:
    """One searcher run to `budget` counted evaluations: its rewards in order, and counts."""
    task_name, task_options, child_seed, budget, label, seed, memo_file, pack = job
    torch.set_num_threads(1)
    task = task_of(task_name, task_options)
    memo = Memo(Path(memo_file))
    name, settings = parse_config(label)
    update_every = settings.pop("update_every", settings.pop("batch_size", SearchConfig().update_every))
    warm_start = settings.pop("warm_start", None)
    searcher = make_searcher(name, 2, seed, warm_start=warm_start, **settings)
    rewards: list[float] = []
    texts: list[str] = []
    rejected = trained = 0
    start = time.perf_counter()
    while len(rewards) < budget:
        proposals, verdicts = sample_step(searcher, min(update_every, budget - len(rewards)))
        trained += train_new(proposals, verdicts, task, child_seed, memo, pack)
        step_rewards = []
        for proposal, verdict in zip(proposals, verdicts):
            if verdict.rejection:
                rejected += 1
                step_rewards.append(0.0)
                continue
            text = to_text(proposal.tree)
            reward = memo.lookup(text, verdict.fingerprint)
            texts.append(text)
            rewards.append(reward)
            step_rewards.append(reward)
        searcher.observe([p.tokens for p in proposals], step_rewards)
        memo.reload()
    seconds = time.perf_counter() - start
    print(f"{label} seed {seed}: last-200 mean {statistics.mean(rewards[-200:]):.3f}, best {max(rewards):.3f}, "
          f"{trained} trained here, {seconds:.0f} s", flush=True)
    return {"label": label, "seed": seed, "rewards": rewards, "texts": texts, "rejected": rejected,
            "trained": trained, "seconds": seconds, "cpu": CPU}


def train_new(proposals, verdicts, task, child_seed: int, memo: Memo, pack: int) -> int:
    """Train the step's rules the memo does not hold (one per behaviour), `pack` at a time, into the memo."""
    new: dict[str, tuple] = {}
    for proposal, verdict in zip(proposals, verdicts):
        text = to_text(proposal.tree)
        if not verdict.rejection and memo.lookup(text, verdict.fingerprint) is None:
            new.setdefault(verdict.fingerprint or text, (text, verdict.fingerprint, proposal.tree))
    rules = list(new.values())
    for first in range(0, len(rules), pack):
        chunk = rules[first:first + pack]
        if pack == 1:
            results = [evaluate_rule(tree, task, seed=child_seed) for _, _, tree in chunk]
        else:
            results = evaluate_rules([tree for _, _, tree in chunk], task, seed=child_seed)
        for (text, fingerprint, _), result in zip(chunk, results):
            memo.add(text, fingerprint, result.reward, result.test_acc)
    return len(rules)


def _mean_sd(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def summary(label: str, runs: list[dict], threshold: float) -> str:
    last = [statistics.mean(r["rewards"][-200:]) for r in runs]
    middle = [statistics.mean(r["rewards"][300:500]) for r in runs if len(r["rewards"]) >= 500]
    cells = [
        label,
        _mean_sd(last),
        " ".join(f"{x:.2f}" for x in last),
        _mean_sd(middle) if middle else "-",
        _mean_sd([max(r["rewards"]) for r in runs]),
        f"{statistics.mean(sum(x >= threshold for x in r['rewards']) for r in runs):.0f}",
        f"{statistics.mean(len(set(r['texts'])) for r in runs):.0f}",
        f"{statistics.mean(r['rejected'] / len(r['rewards']) for r in runs):.2f}",
        f"{statistics.mean(r['seconds'] for r in runs):.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def plot(path: str, groups: dict[str, list[dict]], window: int = 50) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (moving, best) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, runs in groups.items():
        length = min(len(r["rewards"]) for r in runs)
        window = min(window, length)
        curves = torch.tensor([r["rewards"][:length] for r in runs], dtype=torch.float32)
        kernel = torch.ones(1, 1, window) / window
        smooth = torch.nn.functional.conv1d(curves.unsqueeze(1), kernel).squeeze(1)
        x = torch.arange(window, length + 1)
        mean, sd = smooth.mean(0), smooth.std(0) if len(runs) > 1 else torch.zeros(smooth.shape[1])
        (line,) = moving.plot(x, mean, label=label)
        moving.fill_between(x, mean - sd, mean + sd, alpha=0.2, color=line.get_color())
        running = torch.cummax(curves, dim=1).values
        best.plot(torch.arange(1, length + 1), running.mean(0), label=label, color=line.get_color())
    moving.set(xlabel="counted evaluations", ylabel=f"reward, mean of the last {window}",
               title="reward (mean over seeds, band: 1 sd)")
    best.set(xlabel="counted evaluations", ylabel="best reward so far", title="best so far (mean over seeds)")
    best.set_ylim(bottom=max(0.0, float(best.get_ylim()[0])))
    moving.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def recheck(task_name: str, options: dict, rules: list[str], seeds: list[int]) -> list[tuple[str, list, list]]:
    """Each rule's validation reward and test accuracy under each children's seed."""
    torch.set_num_threads(1)
    task = task_of(task_name, options)
    out = []
    for rule in rules:
        results = [evaluate_rule(rule, task, seed=seed) for seed in seeds]
        out.append((rule, [r.reward for r in results], [r.test_acc for r in results]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--task-option", action="append", default=[], help="KEY=VALUE, e.g. sweep=halving")
    parser.add_argument("--child-seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--config", action="append", default=None)
    parser.add_argument("--threshold", type=float, default=0.9, help="count evaluations at or above this reward")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--memo", default=None, help="default: benchmarks/memo/TASK[-OPTIONS]-childSEED.jsonl")
    parser.add_argument("--json", default=None, help="append each run's record to this JSON-lines file as it "
                        "ends; runs it already holds (same task, options, children's seed, budget) are not rerun")
    parser.add_argument("--pack", type=int, default=1, metavar="K",
                        help="train up to K new rules of a step together (nos.tasks.packed; equal to one at a "
                        "time within rounding, faster for MLP children on the CPU)")
    parser.add_argument("--plot", default=None, help="write the reward curves to this PNG")
    parser.add_argument("--recheck", type=int, default=0, metavar="K",
                        help="evaluate the K best found rules and the built-ins under 5 children's seeds")
    args = parser.parse_args()
    options = parse_config("x " + " ".join(args.task_option))[1]
    memo = args.memo or str(memo_path(args.task, options, args.child_seed))
    configs = args.config or list(DEFAULT_CONFIGS)
    done = recorded_runs(args.json, args.task, options, args.child_seed, args.budget)
    jobs = [(args.task, options, args.child_seed, args.budget, label, seed, memo, args.pack)
            for label in configs for seed in args.seeds if (label, seed) not in done]
    results = [done[label, seed] for label in configs for seed in args.seeds if (label, seed) in done]
    with Pool(args.jobs) as pool:
        for r in pool.imap_unordered(search, jobs, chunksize=1):
            results.append(r)
            if args.json:   # each run as it ends: a killed benchmark keeps the runs it finished
                with open(args.json, "a") as f:
                    f.write(json.dumps({"task": args.task, "options": options, "child_seed": args.child_seed,
                                        "budget": args.budget, **r}) + "\n")
    results.sort(key=lambda r: (configs.index(r["label"]), r["seed"]))
    groups = {label: [r for r in results if r["label"] == label] for label in configs}
    print(f"\n{args.task}, {args.budget} counted evaluations, searcher seeds {args.seeds}, children's seed "
          f"{args.child_seed}, torch {torch.__version__}\n")
    print(f"| config | last-200 mean | per seed | mean 300-500 | best | >= {args.threshold} | distinct rules "
          "| rejected per counted | s per run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, runs in groups.items():
        print(summary(label, runs, args.threshold))
    if args.plot:
        plot(args.plot, groups)
        print(f"\nwrote {args.plot}")
    if args.recheck:
        found: dict[str, float] = {}
        for r in results:
            for text, reward in zip(r["texts"], r["rewards"]):
                found[text] = reward
        builtin_texts = {to_text_of(name) for name in STANDARD}
        best = [t for t, _ in sorted(found.items(), key=lambda kv: -kv[1]) if t not in builtin_texts][:args.recheck]
        seeds = list(range(100, 105))
        with Pool(args.jobs) as pool:
            rows = pool.starmap(recheck, [(args.task, options, [rule], seeds) for rule in [*STANDARD, *best]])
        print(f"\nRechecked under children's seeds {seeds}: validation reward and test accuracy, mean ± sd\n")
        print("| rule | found reward (seed " + str(args.child_seed) + ") | validation | test |")
        print("|---|---|---|---|")
        for (rule, val, test), in rows:
            shown = BUILTINS.get(rule, rule)
            reward = found.get(to_text_of(rule))
            print(f"| `{shown}` | {'-' if reward is None else f'{reward:.3f}'} | {_mean_sd(val)} | "
                  f"{_mean_sd(test)} |")


def memo_path(task: str, options: dict, child_seed: int) -> Path:
    """The memo of one reward landscape: the task, its options and the children's seed name it."""
    tag = "".join(f"-{key}={value}" for key, value in sorted(options.items())).replace("/", "_")
    return Path(__file__).parent / "memo" / f"{task}{tag}-child{child_seed}.jsonl"


def recorded_runs(path: str | None, task: str, options: dict, child_seed: int, budget: int) -> dict:
    """(label, seed) -> the run already in the --json file for this landscape and budget."""
    if not path or not Path(path).exists():
        return {}
    runs = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if (r["task"], r.get("options", {}), r.get("child_seed", 0), r["budget"]) == (task, options, child_seed,
                                                                                      budget):
            runs[r["label"], r["seed"]] = r
    return runs


def to_text_of(rule: str) -> str:
    from nos.rules.builtins import resolve_rule

    return to_text(resolve_rule(rule))


if __name__ == "__main__":
    main()
