"""Entry point of the `nos` command.

Subcommands load on use: `nos stop` or `nos runs` does not wait for torch to import.
"""

from __future__ import annotations

from importlib import import_module

import click

COMMANDS = {
    "demo": ".demo:demo_command",
    "rule": ".rules:rule_group",
    "eval": ".evaluate:eval_command",
    "transfer": ".transfer:transfer_command",
    "db": ".db:db_group",
    "enqueue": ".search:enqueue_command",
    "resume": ".search:resume_command",
    "stop": ".search:stop_command",
    "runs": ".results:runs_command",
    "status": ".results:status_command",
    "leaderboard": ".results:leaderboard_command",
    "show": ".results:show_command",
    "worker": ".worker:worker_command",
    "plot": ".reports:plot_command",
    "report": ".reports:report_command",
    "export": ".reports:export_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(import_module(module, __package__), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nos")
def cli() -> None:
    """nos: Neural Optimizer Search.

    Learns update rules by reinforcement learning; any rule is a
    torch.optim.Optimizer (nos.optim.SymbolicOptimizer).
    """


def main() -> None:
    cli(prog_name="nos")


if __name__ == "__main__":
    main()
