"""`nos eval RULE --task digits`: one rule through the paper's protocol, with its sweep and reward."""

from __future__ import annotations

import contextlib
import json
import sys

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from nos.tasks import (
    TASKS,
    DataUnavailable,
    EvaluationResult,
    TrialRecord,
    UnknownTask,
    evaluate_rule,
    get_task,
    registered_tasks,
)

from .console import make_console
from .errors import UsageProblem
from .options import (
    MAX_THREADS,
    data_dir_option,
    device_option,
    epochs_option,
    lrs_option,
    sweep_option,
    task_option,
    train_size_option,
    training_batch_option,
)
from .params import SEED
from .rules import parse_or_exit


@click.command("eval")
@click.argument("rule")
@task_option(f"{', '.join([*TASKS, *registered_tasks()])} (`nos tasks` lists them), "
             "or your own: package.module:function", "digits", dest="task_name")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Initial weights, data order and the rule's noise.")
@device_option()
@data_dir_option
@train_size_option
@lrs_option
@epochs_option(unset="the task's: 5, fashion-mlp 3, ill-conditioned 10")
@click.option("--sweep-epochs", type=click.IntRange(min=1),
              help="Epochs of each sweep trial [the task's: 1, fashion-mlp 3, ill-conditioned 10].")
@training_batch_option
@sweep_option
@click.option("--threads", type=click.IntRange(1, MAX_THREADS),
              help="Torch CPU threads [1, as search workers train: the reward a search stored].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of tables.")
def eval_command(rule: str, task_name: str, seed: int, device: str, data_dir: str | None, train_size: int | None,
                 lrs: tuple[float, ...] | None, epochs: int | None, sweep_epochs: int | None,
                 batch_size: int | None, sweep: str | None, threads: int | None, as_json: bool) -> None:
    """Train the task's child with RULE at each learning rate, then on at the best one (5 epochs on most tasks).

    RULE is rule text such as "g * exp(sign(g) * sign(m))" or a built-in name
    (sgd, momentum, adam, rmsprop, powersign, addsign, ...). The reward is the
    final validation accuracy; test accuracy is shown beside it, never used.
    """
    tree = parse_or_exit(rule)
    # One thread unless told: as workers train, so the reward is the one a search stored for the rule (another
    # thread count sums in another order), and faster on a machine whose cores are busy.
    torch.set_num_threads(threads or 1)
    try:
        # What a task's own code prints goes to stderr: with --json, stdout holds the JSON alone.
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            task = get_task(task_name, device=device, data_dir=data_dir, train_size=train_size, lrs=lrs,
                            epochs=epochs, sweep_epochs=sweep_epochs, batch_size=batch_size, sweep=sweep)
    except (UnknownTask, DataUnavailable, ValueError) as exc:
        raise UsageProblem(str(exc)) from None

    console = make_console(stderr=as_json)
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task(f"{task.name}: sweep", total=len(task.lrs) + 1)

        def advance(record: TrialRecord, stage: str) -> None:
            progress.update(bar, advance=1, description=f"{task.name}: {stage} lr={record.lr:g}")

        result = evaluate_rule(tree, task, seed, on_trial=advance)

    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        _print_result(console, result, task.objective.reward, task.objective.name == "accuracy")


def _print_result(console: Console, result: EvaluationResult, reward: str, accuracy: bool = True) -> None:
    """The trials and the reward; `accuracy`: the scores are accuracies (else another objective's scores)."""
    score = "acc" if accuracy else "score"
    table = Table(title=f"{result.rule} on {result.task} (seed {result.seed}, {result.device})")
    for column in ("run", "lr", "epochs", f"val {score}", "train loss", "seconds"):
        table.add_column(column, justify="right" if column != "run" else "left")
    runs = [("sweep", t) for t in result.trials] + ([("final", result.final)] if result.final else [])
    for stage, trial in runs:
        loss = "diverged" if trial.diverged else f"{trial.train_loss:.4f}"
        style = "bold" if stage == "final" or trial.lr == result.best_lr else None
        val_acc = "-" if trial.val_acc is None else f"{trial.val_acc:.4f}"
        table.add_row(stage, f"{trial.lr:g}", str(trial.epochs), val_acc, loss, f"{trial.wall_seconds:.2f}",
                      style=style)
    console.print(table)
    if result.best_lr is None:
        console.print("diverged at every learning rate: reward 0")
        return
    test = "test accuracy" if accuracy else "test score"
    console.print(Text.assemble(f"reward (final {reward}) ", (f"{result.reward:.4f}", "bold"),
                                f"   {test} {result.test_acc:.4f}   best lr {result.best_lr:g}   "
                                f"{'diverged   ' if result.diverged else ''}{result.wall_seconds:.1f} s"))
