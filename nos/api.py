"""Searches from Python, for notebooks and scripts: the machinery of `nos enqueue`, without the command line.

    import nos

    run = nos.run_search(task="mytasks:wave", searcher="ppo", budget=100, workers=2, db="sqlite:///nos.db")
    run.leaderboard(top=5)      # the run's best rules (nos.store.LeaderboardRow)
    run.frame()                 # its evaluations as a pandas DataFrame
    run.resume()                # continue it after a Ctrl-C, a `run.stop()` or a crash
    nos.Run(3).status           # any stored run, by id

`run_search` blocks until the budget is spent. Ctrl-C (a notebook's interrupt)
stops the run cleanly, as in the terminal: it returns the stopped run, which
`resume()` continues. Local workers are started the way multiprocessing's
"spawn" starts processes, which imports the calling script again: in a
script, call `run_search` under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import operator
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import control
from .config import ConfigError, SearchConfig
from .redact import mask_url
from .store import LeaderboardRow, Store, get_run, leaderboard, open_store, resolve_url, shown

if TYPE_CHECKING:
    import pandas


# Run ids are 32-bit integers in the database; `top` is capped as `nos leaderboard --top` is.
MAX_ID = 2**31 - 1
MAX_TOP = 10**6


def _whole(name: str, value: Any, least: int, most: int) -> int:
    """`value` where it is a whole number from least to most; a ValueError (a TypeError for a non-number) naming it.

    Any integer type is taken (a numpy or pandas id included); a float or a bool is not, lest 1.7 name run 1.
    """
    try:
        whole = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        whole = None
    if whole is None:
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if not least <= whole <= most:
        raise ValueError(f"{name} must be from {least:,} to {most:,}, got {whole:,}")
    return whole


class Run:
    """A stored run: its id and the database (and broker) it lives in."""

    def __init__(self, id: int, db: str | None = None, broker: str | None = None):
        self.id = _whole("a run id", id, 0, MAX_ID)
        self.db = resolve_url(db).render_as_string(hide_password=False)
        self.broker = broker

    def __repr__(self) -> str:
        return f"Run(id={self.id}, status={self.status!r}, db={mask_url(self.db)!r})"

    def _store(self) -> Store:
        return open_store(self.db)

    def _read(self, read: Callable[[Any], Any]) -> Any:
        store = self._store()
        try:
            with store.reading() as session:
                run = get_run(session, self.id)
                if run is None:
                    raise LookupError(f"no run {self.id} in {shown(store.url)}")
                return read(session)
        finally:
            store.dispose()

    @property
    def status(self) -> str:
        """running, stopping, stopped, completed or failed."""
        return self._read(lambda session: get_run(session, self.id).status)

    @property
    def config(self) -> SearchConfig:
        return self._read(lambda session: SearchConfig.from_dict(get_run(session, self.id).config))

    def leaderboard(self, top: int = 10) -> list[LeaderboardRow]:
        """The run's `top` rules by best reward, as `nos leaderboard --run ID` lists them."""
        top = _whole("top", top, 1, MAX_TOP)
        return self._read(lambda session: leaderboard(session, top, run_id=self.id))

    def frame(self) -> pandas.DataFrame:
        """One row per evaluation, in order (nos.store.evaluations_frame; needs pandas)."""
        from .store import evaluations_frame

        return evaluations_frame(self.db, self.id)

    def trials(self) -> pandas.DataFrame:
        """One row per learning rate tried (nos.store.trials_frame; needs pandas)."""
        from .store import trials_frame

        return trials_frame(self.db, self.id)

    def stop(self) -> None:
        """Ask the run's driver (another process or thread) to stop; a run without a live driver stops at once."""
        store = self._store()
        try:
            control.request_stop(store, self.id)
        finally:
            store.dispose()

    def resume(self, progress: bool = True) -> "Run":
        """Continue the run from its last checkpoint until its budget is spent, or Ctrl-C; returns the run."""
        control.refuse_in_a_starting_worker("Run.resume")
        store = control.store_for_writing(self.db, _quiet)
        try:
            config = control.resumable_config(store, self.id)
            control.check_task(config, self.broker)
            control.check_checkpoint(store, self.id, config)
            changed = control.changed_task(store, self.id, config)
            if changed:
                warnings.warn(changed, stacklevel=2)
            control.take_over(store, self.id)
            _drive(store, self, config, progress)
        finally:
            store.dispose()
        return self


def run_search(task: str | Callable[..., Any] | None = None, *, searcher: str | None = None,
               budget: int | None = None, db: str | None = None, workers: int | None = None,
               broker: str | None = None, config: str | Path | None = None, progress: bool = True,
               **settings: Any) -> Run:
    """Start a search and drive it here until its budget is spent; returns its Run.

    task: a built-in or registered task's name, "package.module:function", or the `@task_factory`
        function itself (it must live in a module the workers can import, not in a notebook);
        default: the config file's, else digits.
    searcher, budget, workers and any other key of the config file (update_every, depth, seed,
        device, name, task_options, ...; docs/searching.md) as keywords; `config` reads them from
        a TOML file first, and the keywords given here win (a table such as task_options key by key).
    db: a database URL (default $NOS_DB_URL, else sqlite:///nos.db); created when it is a new SQLite file.
    broker: a Redis URL: Celery workers (`nos worker`) train the evaluations instead of local processes.
    progress: print the run's id and a line of progress as evaluations finish.

    Bad settings raise ConfigError, a run that cannot start RunRefused (both ValueErrors), before
    anything is written.
    """
    control.refuse_in_a_starting_worker("nos.run_search")
    if not (task is None or isinstance(task, str) or callable(task)):
        raise ConfigError(f"task must be a task's name or a task factory function, got {task!r}")
    name = task if task is None or isinstance(task, str) else factory_name(task)
    chosen = SearchConfig.load(config, task=name, searcher=searcher, budget=budget, workers=workers, **settings)
    if broker:
        from .workers.executor import BrokerError, check_broker  # Celery only where it is used

        try:
            check_broker(broker)
        except BrokerError as exc:
            raise control.RunRefused(str(exc)) from None
    control.check_task(chosen, broker)
    say = print if progress else _quiet
    store = control.store_for_writing(db, say)
    try:
        run = Run(control.start_run(store, chosen), store.url.render_as_string(hide_password=False), broker)
        plural = "s" if chosen.workers != 1 else ""
        where = f"Celery at {mask_url(broker)}" if broker else f"{chosen.workers} local worker{plural}"
        say(f"RUN_ID {run.id}  ({chosen.label}: {chosen.searcher} on {chosen.task}, budget {chosen.budget}, "
            f"{where}, db {shown(store.url)})")
        _drive(store, run, chosen, progress)
    finally:
        store.dispose()
    return run


def factory_name(factory: Callable[..., Any]) -> str:
    """The "module:function" name under which workers import `factory`; ValueError when they could not."""
    from .tasks.custom import load_factory

    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise ValueError(f"{factory!r} is not importable by name: define the task factory in a module file "
                         "(workers import it by name), not in a notebook, a script's __main__ or a function")
    name = f"{module}:{qualname}"
    if load_factory(name) is not factory:
        raise ValueError(f"{name} names another object than {factory!r}")
    return name


def _drive(store: Store, run: Run, config: SearchConfig, progress: bool) -> None:
    """Drive `run` in this process with torch on one thread (as `nos enqueue` does), then restore the thread count."""
    import torch

    from .driver import one_thread

    threads = torch.get_num_threads()
    one_thread()
    try:
        status = control.drive_here(store, run.id, run.broker, on_progress=_progress_line if progress else None)
    finally:
        torch.set_num_threads(threads)
    if progress:
        if sys.stdout.isatty():
            print()   # ends the line rewritten in place
        print(f"run {run.id} completed" if status == "completed" else
              f"run {run.id} stopped; continue it with run.resume() or `nos resume {run.id}`")


_shown: dict[int, tuple] = {}   # by run: what the last line said, where output is not a terminal


def _progress_line(p: Any) -> None:
    """One line rewritten in place on a terminal; elsewhere (a log file, a notebook's captured output) a line per
    change of the count or the best reward, not one line joined by carriage returns."""
    best = "-" if p.best_reward is None else f"{p.best_reward:.4f}"
    line = f"run {p.run_id}: {p.finished}/{p.budget} evaluations, best reward {best}"
    if sys.stdout.isatty():
        print(f"\r{line}", end="", flush=True)
    elif _shown.get(p.run_id) != (p.finished, best):
        _shown[p.run_id] = (p.finished, best)
        print(line, flush=True)


def _quiet(_: str) -> None:
    pass


__all__ = ["Run", "factory_name", "run_search"]
