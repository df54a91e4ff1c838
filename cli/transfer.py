"""`nos transfer RULE...`: rules and the standard optimizers on a Wide ResNet, as the paper's Table 1."""

from __future__ import annotations

import json

import click
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nos.rules import to_text
from nos.rules.builtins import BUILTINS
from nos.store import StoreError, shown
from nos.tasks import DataUnavailable, UnknownTask
from nos.tasks.transfer import DEFAULT_EPOCHS, DEFAULT_MODEL, TRANSFER_TASKS, transfer_task

from .console import console, make_console
from .db import db_option, store_for_writing
from .errors import UsageProblem
from .options import (
    data_dir_option,
    device_option,
    epochs_option,
    lrs_option,
    task_option,
    threads_option,
    train_size_option,
    training_batch_option,
)
from .rules import parse_or_exit

# The paper's Table 1 baselines, each tuned by the same sweep as the rules under test. They are the rule
# language's operands (docs/transfer.md, "Baselines"), not torch's SGD-momentum and RMSprop.
BASELINES = ("sgd", "momentum", "adam", "rmsprop")
COLUMNS = ("final val", "final test", "best val", "best test", "test at best val")
# Each seed trains every rule and baseline in full: more than this is no run anyone waits for.
MAX_SEEDS = 1000


@click.command("transfer")
@click.argument("rules", nargs=-1, metavar="RULE...")
@task_option(f"{', '.join(TRANSFER_TASKS)}, or your own: package.module:function", "fashion-mnist",
             dest="task_name")
@click.option("--model", help=f"Wide ResNet wrn-DEPTH-WIDTH (depth 6n+4: 10, 16, 22, 28, 40, ... to 1000; width 1-64) "
              f"[{DEFAULT_MODEL}; your own task: the child its factory builds].")
@epochs_option(DEFAULT_EPOCHS)
@click.option("--seeds", type=click.IntRange(1, MAX_SEEDS), default=3, show_default=True,
              help="Train each rule with seeds 0..K-1 (initial weights, data order, the rule's noise).")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help=f"Also train {', '.join(BASELINES)}.")
@lrs_option
@train_size_option
@click.option("--val-size", type=click.IntRange(min=1), help="Validation examples carved from training [5000].")
@training_batch_option
@data_dir_option
@device_option()
@threads_option
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json"]), default="table",
              show_default=True, help="How to print the results.")
@db_option
def transfer_command(rules: tuple[str, ...], task_name: str, model: str | None, epochs: int, seeds: int,
                     baselines: bool, lrs: tuple[float, ...] | None, train_size: int | None, val_size: int | None,
                     batch_size: int | None, data_dir: str | None, device: str, threads: int | None, fmt: str,
                     db_url: str | None) -> None:
    """Train a Wide ResNet with each RULE and with SGD, Momentum, Adam and RMSProp.

    The baselines are the search's operands, not torch's optimizers: momentum
    is the bias-corrected mean of g (beta 0.9), rmsprop is Adam with beta1 = 0.

    Every optimizer gets the same learning-rate sweep (1 epoch per rate from
    the same initial weights), then trains EPOCHS at its best rate; validation
    and test accuracy are measured after every epoch. The table shows, per
    optimizer, the final and the best (over epochs) validation and test
    accuracy, and the test accuracy at the epoch of best validation, mean ±
    standard deviation over the seeds. Final test is the figure no choice saw:
    validation chose the rate, and test picks "best test". Every trial and epoch
    is stored in the database as it finishes: running the same command again
    reads finished results instead of training, and continues unfinished ones.
    RULE is rule text such as "g * exp(sign(g) * sign(m))" or a built-in name.
    """
    trees, labels = _rules_to_train(rules, baselines)
    if threads:
        torch.set_num_threads(threads)
    try:
        task = transfer_task(task_name, model, device=device, lrs=lrs, data_dir=data_dir, train_size=train_size,
                             val_size=val_size, batch_size=batch_size, epochs=epochs)
    except (UnknownTask, DataUnavailable, ValueError) as exc:
        raise UsageProblem(str(exc)) from None

    from nos.transfer import summarize

    messages = make_console(stderr=True)
    store = store_for_writing(db_url, messages.print)
    try:
        results, reused = _train_all(store, trees, labels, task, seeds, messages)
    except KeyboardInterrupt:
        messages.print("interrupted: what finished is stored; the same command continues from there")
        raise SystemExit(130) from None
    except StoreError as exc:   # a damaged stored value: read inside the transaction that would have taken the run
        raise UsageProblem(str(exc)) from None
    finally:
        store.dispose()

    rows = summarize(results)
    if reused:
        messages.print(f"{reused} of {len(results)} results read from {shown(store.url)} (already trained)")
    title = _title(task, seeds, results)
    if fmt == "json":
        click.echo(_json(task, seeds, results, rows, labels))
    elif fmt == "markdown":
        click.echo(_markdown(title, rows, labels))
    else:
        console.print(_table(title, rows, labels))


def _rules_to_train(rules: tuple[str, ...], baselines: bool) -> tuple[list, dict[str, str]]:
    """The distinct rules to train (parsed; the baselines after the RULEs) and each one's label by canonical text."""
    names = list(rules) + (list(BASELINES) if baselines else [])
    if not names:
        raise UsageProblem("nothing to train: give a RULE, or leave out --no-baselines")
    trees, labels = [], {}
    for name in names:
        tree = parse_or_exit(name)
        text = to_text(tree)
        if text not in labels:   # `adam` given and a baseline: trained once
            trees.append(tree)
            labels[text] = name if name.strip().lower() in BUILTINS else text
    return trees, labels


def _train_all(store, trees: list, labels: dict[str, str], task, seeds: int, messages) -> tuple[list, int]:
    """Every rule with every seed, under a progress bar: (their results, how many were read back from `store`)."""
    from nos.transfer import TransferSuperseded, run_transfer

    per_run = len(task.lrs) + task.epochs
    results, reused = [], 0
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=messages, transient=True) as progress:
        bar = progress.add_task("", total=len(trees) * seeds * per_run)
        for seed in range(seeds):
            for tree in trees:
                label = labels[to_text(tree)]
                start = progress.tasks[0].completed
                progress.update(bar, description=f"{label} seed {seed}")

                def trial(record, label=label, seed=seed) -> None:
                    progress.update(bar, advance=1, description=f"{label} seed {seed}: sweep lr={record.lr:g}")

                def epoch(record, label=label, seed=seed) -> None:
                    progress.update(bar, advance=1, description=f"{label} seed {seed}: epoch {record.epoch}")

                try:
                    outcome = run_transfer(store, tree, task, seed, on_trial=trial, on_epoch=epoch)
                except TransferSuperseded as exc:
                    raise click.ClickException(str(exc)) from None
                reused += outcome.reused
                results.append(outcome.result)
                progress.update(bar, completed=start + per_run)
    return results, reused


def _title(task, seeds: int, results) -> str:
    sizes = task.splits.sizes
    epochs = f"{task.epochs} epoch" + ("s" if task.epochs != 1 else "")
    seed_range = "seed 0" if seeds == 1 else f"seeds 0-{seeds - 1}"
    return (f"{task.options['model']} on {task.name} ({sizes['train']:,} train / {sizes['val']:,} val / "
            f"{sizes['test']:,} test), {epochs}, batch {task.batch_size}, "
            f"{seed_range}, {_devices(str(task.device), results)}: mean ± std over seeds")


def _devices(here: str, results) -> str:
    """This invocation's device, and where the results shown were trained when that is somewhere else too."""
    trained = sorted({part for r in results for part in (r.device or here).split("+")})
    return here if trained in ([], [here]) else f"{here} (results from {', '.join(trained)})"


def _table(title: str, rows, labels: dict[str, str]) -> Table:
    table = Table(title=title)
    table.add_column("optimizer")
    table.add_column("best lr", justify="right")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    table.add_column("seconds (all seeds)", justify="right")
    for row in rows:
        table.add_row(*_cells(row, labels))
    return table


def _cells(row, labels: dict[str, str], code: bool = False) -> list[str]:
    """The row's cells; `code`: rule text (not a built-in's name) as a markdown code span."""
    lrs = ", ".join("-" if lr is None else f"{lr:g}" for lr in row.best_lrs)
    figures = [s.format() for s in (row.final_val, row.final_test, row.best_val, row.best_test,
                                    row.test_at_best_val)]
    label = labels.get(row.rule, row.rule)
    if code and label.strip().lower() not in BUILTINS:
        label = f"`{label}`"
    if row.diverged:
        label += f" ({row.diverged} diverged)"
    return [label, lrs, *figures, f"{row.wall_seconds:.0f}"]


def _markdown(title: str, rows, labels: dict[str, str]) -> str:
    head = ["optimizer", "best lr", *COLUMNS, "seconds (all seeds)"]
    lines = [f"{title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(_cells(row, labels, code=True)) + " |")
    return "\n".join(lines)


def _json(task, seeds: int, results, rows, labels: dict[str, str]) -> str:
    """The results and the summary; a non-finite figure is refused rather than written as invalid JSON."""
    from nos.transfer import at_best_val

    return json.dumps({"task": task.to_dict(), "task_key": task.config_key(), "seeds": list(range(seeds)),
                       "results": [{**r.to_dict(), "test_at_best_val": at_best_val(r.epochs)} for r in results],
                       "summary": [_summary_dict(row, labels) for row in rows]}, allow_nan=False)


def _summary_dict(row, labels: dict[str, str]) -> dict:
    def stat(s):
        return {"mean": s.mean, "std": s.std}

    return {"optimizer": labels.get(row.rule, row.rule), "rule": row.rule, "seeds": row.seeds,
            "best_lrs": row.best_lrs, "final_val": stat(row.final_val), "final_test": stat(row.final_test),
            "best_val": stat(row.best_val), "best_test": stat(row.best_test),
            "test_at_best_val": stat(row.test_at_best_val), "diverged": row.diverged,
            "wall_seconds": row.wall_seconds}
