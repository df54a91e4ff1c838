"""`nos tasks`: the tasks a search can run, built-in and registered, with their sizes, child and reward."""

from __future__ import annotations

import click
from rich.table import Table

from nos.tasks.catalog import summaries

from .console import console
from .errors import UsageProblem


@click.command("tasks")
@click.argument("names", nargs=-1, metavar="[TASK]...")
def tasks_command(names: tuple[str, ...]) -> None:
    """List the built-in tasks and those installed packages register (entry points `nos.tasks`).

    Each is built with its defaults (nothing is downloaded) to show its sizes, child and reward.
    TASK... lists only those, and takes your own too: package.module:function
    (docs/your-own-task.md).
    """
    try:
        found = summaries(list(names) or None)
    except ValueError as exc:   # an unknown task, or a factory that fails
        raise UsageProblem(str(exc)) from None
    table = Table(title="tasks")
    for column in ("task", "train / val / test", "child", "reward", "from"):
        table.add_column(column, overflow="fold")
    for summary in found:
        sizes = "-" if summary.sizes is None else " / ".join(f"{summary.sizes[k]:,}" for k in ("train", "val", "test"))
        table.add_row(summary.name, sizes, summary.child, summary.reward, summary.source)
    console.print(table)
