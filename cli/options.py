"""Options that several commands take, each defined once: the same flag has the same type and help everywhere.

(`--db` lives beside the database helpers, in cli/db.py.) Options whose default
differs by command are made by a function that takes the default.
"""

from __future__ import annotations

import math
import os

import click

from .params import TEXT

# The most rows --top asks for: far more than a page or a terminal shows, and small enough that
# the query's LIMIT (and the grouped leaderboard's 4x of it) stays a 64-bit integer.
MAX_TOP = 10**6
# More threads than any machine has cores; torch takes a C int, which a larger number overflows with a traceback.
MAX_THREADS = 1024


def learning_rates(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    """The --lrs callback: a comma-separated grid of different positive, finite rates."""
    if value is None:
        return None
    if not all(v.strip() for v in value.split(",")):
        # "1e-1,,1e-2" is more likely a rate lost in editing than two commas meant as one.
        raise click.BadParameter(f"an empty entry in {value!r}: expected comma-separated numbers such as 1e-3,1e-2")
    try:
        rates = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 1e-3,1e-2, got {value!r}") from None
    if not rates or any(not 0 < rate < math.inf for rate in rates):
        raise click.BadParameter("learning rates must be positive, finite numbers")
    # Trials are stored by rate: a rate given twice would be two rows under one key.
    twice = sorted({rate for rate in rates if rates.count(rate) > 1})
    if twice:
        raise click.BadParameter(f"learning rates must differ; given more than once: {', '.join(map(repr, twice))}")
    return rates


def task_option(tasks: str, default: str | None = None, *, dest: str = "task", unset: str = "") -> click.Option:
    """--task: the task whose networks train; `tasks` names them in the help, `unset` says what None means."""
    default_text = f" [{unset}]" if unset else ""
    return click.option("--task", dest, type=TEXT, default=default, show_default=default is not None,
                        help=f"Task the networks train on: {tasks}{default_text}.")


# A filter of the commands that read results.
task_filter_option = click.option("--task", type=TEXT, help="Only evaluations on this task.")


def device_option(default: str | None = "cpu", *, unset: str = "") -> click.Option:
    """--device: `default` None leaves the choice to what `unset` says (a config file, the run)."""
    default_text = f" [{unset}]" if unset else ""
    return click.option("--device", default=default, show_default=default is not None, metavar="DEVICE",
                        help=f"Where the networks train: cpu, cuda, cuda:N or mps{default_text}.")


def epochs_option(default: int | None = None, *, unset: str = "") -> click.Option:
    default_text = f" [{unset}]" if unset else ""
    return click.option("--epochs", type=click.IntRange(min=1), default=default, show_default=default is not None,
                        help=f"Epochs of the final run at the best learning rate{default_text}.")


def _absolute(ctx, param, value: str | None) -> str | None:
    # A run stores the folder and is resumed, and its workers started, from wherever: "data" would be read
    # from the folder each of them happens to start in.
    return None if value is None else os.path.abspath(os.path.expanduser(value))


data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False), callback=_absolute,
    help="Folder with the data set's files, stored as an absolute path "
         "[$NOS_DATA_DIR; Fashion-MNIST also /usr/share/datasets/fashion-mnist].")
train_size_option = click.option(
    "--train-size", type=click.IntRange(min=1),
    help="Subsample the training split to N examples (rosenbrock, which has no data: N steps an epoch).")
lrs_option = click.option("--lrs", callback=learning_rates,
                          help="Learning-rate grid, comma-separated [1e-5,...,1e1].")
sweep_option = click.option(
    "--sweep", type=click.Choice(["full", "halving"]),
    help="Learning-rate sweep: every rate for the sweep's epochs (the paper), or successive halving over them "
         "[the task's: full, fashion-mlp and ill-conditioned halving].")
training_batch_option = click.option("--batch-size", type=click.IntRange(min=1),
                                     help="Training batch size [the task's].")
threads_option = click.option("--threads", type=click.IntRange(1, MAX_THREADS),
                              help="Torch CPU threads (one is fastest per process when several train at once).")
window_option = click.option("--window", type=click.IntRange(min=1), default=20, show_default=True,
                             help="Evaluations in the curve's moving mean.")
detach_option = click.option("--detach", is_flag=True,
                             help="Send the driver loop to a worker on the `control` queue and return.")
broker_option = click.option(
    "--broker", "broker_url", envvar="NOS_BROKER_URL", default=None, metavar="URL",
    help="Celery broker, redis://HOST:6379/0 [env NOS_BROKER_URL].")
