"""`nos enqueue`, `nos resume`, `nos stop`: start, continue and stop searches."""

from __future__ import annotations

import signal
import threading

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nos import control
from nos.config import ConfigError, SearchConfig
from nos.redact import mask_url
from nos.search.settings import SEARCHERS
from nos.store import Store, shown
from nos.store.leases import LeaseRefused

from .console import console, printable
from .db import db_option, open_store_or_exit, store_for_writing
from .errors import UsageProblem
from .options import (
    broker_option,
    data_dir_option,
    detach_option,
    device_option,
    sweep_option,
    task_option,
    train_size_option,
)
from .params import ID, SEED, TEXT
from .results import print_leaderboard
from .worker import check_broker_or_exit


def _refused_to_usage(check, *args, **kwargs):
    """Run one of nos.control's checks; its refusal is the command's one-line error, exit 2."""
    try:
        return check(*args, **kwargs)
    except control.RunRefused as exc:
        raise UsageProblem(str(exc)) from None


# The exit status of `nos enqueue` and `nos resume` when the run stopped before its budget (resumable).
STOPPED = 3
# Ctrl-C, `kill` (a service manager, a batch system) and a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_on_signals() -> None:
    """Ctrl-C, SIGTERM (`kill`, a service manager, a batch system) and SIGHUP (a closed terminal) stop the
    run cleanly: the handler only sets `nos.driver.STOP_ASKED`, which the driver reads at its next poll
    (a fraction of a second), wherever the signal lands, before the run exists or as it completes.
    A second signal changes nothing: the first one's stop goes on."""
    if threading.current_thread() is not threading.main_thread():
        return   # signal handlers belong to the main thread
    from nos.driver import STOP_ASKED

    def ask_to_stop(signum, frame) -> None:
        STOP_ASKED.set()

    for signum in STOP_SIGNALS:
        # `nohup` ignores SIGHUP, and a script's background job SIGINT: they asked that it not stop the run.
        # SIGTERM, the request to end cleanly, is always taken.
        if signum == signal.SIGTERM or signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, ask_to_stop)


def _deaf_to_signals() -> None:
    """Once the run has ended, a signal can change nothing: ignored, it cannot turn exit 0 or 3 into 130 during
    the second Python takes to shut down (which resets the handlers first)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _stop_if_asked(what: str) -> None:
    """Exit STOPPED, having changed nothing, when a signal asked to stop before `what` began."""
    from nos.driver import STOP_ASKED

    if STOP_ASKED.is_set():
        console.print(f"stopped before {what} began")
        raise SystemExit(STOPPED)


def _drive(store: Store, run_id: int, config: SearchConfig, broker_url: str | None = None) -> None:
    from nos.driver import Progress as DriverProgress, SearchStuck, one_thread
    from nos.executors import WorkerStartError
    from nos.lease import LeaseLost

    one_thread()

    columns = (TextColumn("run {task.fields[run]}", markup=False), BarColumn(), MofNCompleteColumn(),
               TextColumn("best reward {task.fields[best]}", markup=False), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("search", total=config.budget, run=run_id, best="-")

        def show(p: DriverProgress) -> None:
            bar.update(task, completed=p.finished, best="-" if p.best_reward is None else f"{p.best_reward:.4f}")

        try:
            status = control.drive_here(store, run_id, broker_url, on_progress=show)
        except SearchStuck as exc:   # the run is marked failed with this message
            raise click.ClickException(f"run {run_id} failed: {exc}") from None
        except LeaseRefused as exc:   # another driver took the run between our check and now
            raise UsageProblem(str(exc)) from None
        except LeaseLost as exc:
            raise click.ClickException(str(exc)) from None
        except WorkerStartError as exc:   # the run is marked failed with this message
            raise click.ClickException(f"run {run_id} failed: {exc}") from None
    _deaf_to_signals()
    if status == "stopped":
        console.print(f"run {run_id} stopped; continue it with:  nos resume {run_id}")
        # Not 0: `nos enqueue ... && nos report ...`, or a batch system, must not take it for a finished run.
        raise SystemExit(STOPPED)
    console.print(f"run {run_id} completed")
    with store.reading() as session:
        print_leaderboard(session, top=10, run_id=run_id, fmt="table")


@click.command("enqueue")
@task_option("digits, ill-conditioned, fashion-mlp, fashion-mnist, cifar10, quadratic, rosenbrock, "
             "a registered one (`nos tasks`), or your own: package.module:function", unset="digits")
@click.option("--searcher", type=click.Choice(list(SEARCHERS)), help="Search strategy [ppo].")
@click.option("--budget", type=int,
              help="Evaluations trained, answered from the cache or failed; rejections are free [200].")
@click.option("--update-every", type=int, help="Counted results per controller update [5].")
@click.option("--synchronous/--asynchronous", default=None,
              help="Propose, wait for every result, learn (reproducible), or keep --in-flight evaluations going "
                   "and learn every --update-every results [asynchronous].")
@click.option("--in-flight", type=int, help="Evaluations the asynchronous driver keeps queued or running "
                                            "[workers x pack + max(2, pack, an eighth of that)].")
@click.option("--pack", type=int, help="Queued evaluations of one task key a local worker claims and trains "
                                       "together, as one stacked network [32 on cuda, else 1].")
@click.option("--warm-start", type=click.Choice(["builtins", "none"]),
              help="Start the searcher from the built-in rules [builtins for evolution, none otherwise].")
@click.option("--depth", type=click.IntRange(1, 3), help="Rule depth: 1, 2 or 3 [2].")
@click.option("--seed", type=SEED, help="Seeds the searcher and the children's initial weights [0].")
@click.option("--workers", type=int, help="Local worker processes [one per core; 1 on cuda or mps].")
@device_option(None, unset="cpu")
@click.option("--name", type=TEXT, help="A label for the run.")
@data_dir_option
@train_size_option
@sweep_option
@click.option("--probe/--no-probe", default=None,
              help="Fingerprint rules and reject hopeless ones before training [probe].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with any of these keys (flags given on the command line win).")
@detach_option
@db_option
@broker_option
def enqueue_command(config_file, db_url, broker_url, detach, data_dir, train_size, sweep, **flags) -> None:
    """Start a search and drive it in the foreground until its budget is spent.

    Prints the RUN_ID first. Ctrl-C stops the run cleanly; `nos resume RUN_ID`
    continues it. Without --broker, local worker processes train the
    evaluations; with it, Celery workers (`nos worker`) do, and with --detach
    too, a worker on the `control` queue drives the run.
    """
    try:
        given = {k: v for k, v in (("data_dir", data_dir), ("train_size", train_size), ("sweep", sweep))
                 if v is not None}
        config = SearchConfig.load(config_file, task_options=given or None, **flags)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    _stop_on_signals()
    _check_executor(broker_url, detach)
    if broker_url and flags.get("workers") is not None:
        click.echo("warning: --workers sets local workers, and this run's evaluations go to Celery workers (its "
                   "broker comes from --broker or $NOS_BROKER_URL): it is left unused", err=True)
    _refused_to_usage(control.check_task, config, broker_url)
    store = store_for_writing(db_url, console.print)
    _stop_if_asked("the run")
    run_id = _refused_to_usage(control.start_run, store, config, detach=detach)
    where = (f"Celery at {mask_url(broker_url)}" if broker_url
             else f"{config.workers} local worker{'s' if config.workers != 1 else ''}")
    console.print(f"RUN_ID {run_id}  ({config.label}: {config.searcher} on {config.task}, budget {config.budget}, "
                  f"{where}, db {shown(store.url)})")
    _start(store, run_id, config, broker_url, detach)


def _check_executor(broker_url: str | None, detach: bool) -> None:
    if detach and not broker_url:
        raise UsageProblem("--detach needs a broker: --broker redis://HOST:6379/0 or NOS_BROKER_URL")
    if broker_url:
        check_broker_or_exit(broker_url)


def _start(store: Store, run_id: int, config: SearchConfig, broker_url: str | None, detach: bool) -> None:
    if detach:
        from nos.workers.executor import send_drive

        send_drive(broker_url, run_id)
        console.print(f"run {run_id} sent to the control queue; watch it with:  nos status {run_id}")
        return
    _drive(store, run_id, config, broker_url)


@click.command("resume")
@click.argument("run_id", type=ID)
@detach_option
@db_option
@broker_option
def resume_command(run_id: int, detach: bool, db_url: str | None, broker_url: str | None) -> None:
    """Continue a stopped (or crashed) run to its budget from its last checkpoint."""
    _stop_on_signals()
    store = open_store_or_exit(db_url, writing=True)
    config = _refused_to_usage(control.resumable_config, store, run_id)
    _check_executor(broker_url, detach)
    _refused_to_usage(control.check_task, config, broker_url)
    _refused_to_usage(control.check_checkpoint, store, run_id, config)
    changed = control.changed_task(store, run_id, config)
    if changed:
        click.echo(f"warning: {printable(changed)}", err=True)
    _stop_if_asked("the resume")
    _refused_to_usage(control.take_over, store, run_id, detach=detach)
    console.print(f"resuming run {run_id} ({config.label})")
    _start(store, run_id, config, broker_url, detach)


@click.command("stop")
@click.argument("run_id", type=ID)
@db_option
def stop_command(run_id: int, db_url: str | None) -> None:
    """Ask a running search to stop; its driver stops cleanly within a second.

    A run whose driver is gone (killed, its machine lost) is marked stopped at once.
    """
    store = open_store_or_exit(db_url, writing=True)
    driverless = _refused_to_usage(control.request_stop, store, run_id)
    if driverless:
        console.print(f"run {run_id} had no live driver: marked stopped; continue it with:  nos resume {run_id}")
    else:
        console.print(f"run {run_id}: stop requested")
