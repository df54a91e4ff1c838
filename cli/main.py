"""Entry point of the `nos` command."""

from __future__ import annotations

import click

from .db import db_group
from .demo import demo_command
from .evaluate import eval_command
from .results import leaderboard_command, runs_command, show_command, status_command
from .rules import rule_group
from .search import enqueue_command, resume_command, stop_command
from .worker import worker_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nos")
def cli() -> None:
    """nos: Neural Optimizer Search.

    Learns update rules by reinforcement learning; any rule is a
    torch.optim.Optimizer (nos.optim.SymbolicOptimizer).
    """


cli.add_command(rule_group)
cli.add_command(demo_command)
# Subcommands of later modules register here, one line each.
cli.add_command(eval_command)
cli.add_command(db_group)
for command in (enqueue_command, resume_command, stop_command, runs_command, status_command,
                leaderboard_command, show_command, worker_command):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="nos")


if __name__ == "__main__":
    main()
