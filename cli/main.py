"""Entry point of the `nos` command.

Subcommands load on use: `nos stop` or `nos runs` does not wait for torch to import.
"""

from __future__ import annotations

from importlib import import_module

import click

COMMANDS = {   # name -> (where it lives, its one-line help: `nos --help` lists them without importing any)
    "demo": (".demo:demo_command", "Parse the paper's rules and train on digits with each built-in."),
    "rule": (".rules:rule_group", "Parse and inspect update rules."),
    "eval": (".evaluate:eval_command", "Evaluate RULE: the learning-rate sweep, then the final run."),
    "tasks": (".tasks:tasks_command", "List the built-in and registered tasks: sizes, child and reward."),
    "transfer": (".transfer:transfer_command", "Train a Wide ResNet with each RULE and the standard optimizers."),
    "db": (".db:db_group", "Create, upgrade and inspect nos's database."),
    "enqueue": (".search:enqueue_command", "Start a search and drive it until its budget is spent."),
    "resume": (".search:resume_command", "Continue a stopped (or crashed) run from its last checkpoint."),
    "stop": (".search:stop_command", "Ask a running search to stop; its driver stops cleanly."),
    "runs": (".results:runs_command", "List the runs with their progress."),
    "status": (".results:status_command", "A run's counts by status and its evaluations in flight."),
    "leaderboard": (".results:leaderboard_command", "The best rules by reward: over all runs, one run, or one task."),
    "show": (".results:show_command", "A rule's evaluations and learning-rate sweeps."),
    "worker": (".worker:worker_command", "Start a Celery worker (until Ctrl-C or SIGTERM)."),
    "plot": (".reports:plot_command", "Draw reward against evaluation for runs, or a rule's sweep."),
    "report": (".reports:report_command", "Write one self-contained HTML page about a run."),
    "export": (".reports:export_command", "Print a snippet that trains with RULE in any PyTorch loop."),
}


# The exit status of a command interrupted by Ctrl-C (where it does not stop cleanly with 3, as a search does).
INTERRUPTED = 130


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context):
        # Ctrl-C in a command that does not stop on it itself (`nos eval`, a long report): click said
        # "Aborted!" with exit status 1, which nos gives a failure; 130 is a shell's status for SIGINT.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(INTERRUPTED)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name][0].split(":")
        try:
            return getattr(import_module(module, __package__), attribute)
        except ModuleNotFoundError as exc:
            # `pip install --no-deps` leaves nos's own dependencies to the environment:
            # say which one this command lacks instead of a traceback.
            if exc.name is None or exc.name.split(".")[0] == "nos":
                raise
            raise click.ClickException(
                f"`nos {name}` needs the Python package {exc.name.split('.')[0]!r}, which is not installed "
                "here; install nos's dependencies (docs/install.md)") from exc

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click would import every command for its help line, and with them torch (seconds).
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


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
