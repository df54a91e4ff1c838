"""Searching a task of your own, end to end: the task files in examples/, `nos enqueue` with local and
with Celery workers, the leaderboard and the SQL views, and `nos.run_search` from a script (Ctrl-C included).

The task files are found the way a user's are: on PYTHONPATH, in every process that imports them.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from helpers.doc_examples import ROOT
from helpers.driver import assert_complete, finished_count, nos, run_rows, wait_for
from helpers.workers import Workers

pytestmark = pytest.mark.slow

EXAMPLES = ROOT / "examples"
WAVE, ZEN = "wave_mlp:wave", "zen_gru:zen_gru"
# A few tenths of a second an evaluation: two rates, one epoch, few examples.
SMALL = {WAVE: {"train_size": 128, "lrs": [0.01, 0.1], "epochs": 1},
         ZEN: {"train_size": 128, "lrs": [0.01, 0.1], "epochs": 1}}


def environment() -> dict[str, str]:
    """This environment with the examples folder on PYTHONPATH, as a user sets it up for their task file."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]),
            "COLUMNS": "250"}


def config_file(folder, task: str, budget: int = 4, **options) -> str:
    path = folder / f"search-{task.replace(':', '-')}-{budget}-{len(options)}.toml"
    table = {**SMALL[task], **options}
    lines = [f'task = "{task}"', 'searcher = "random"', f"budget = {budget}", "update_every = 2", "workers = 2",
             "seed = 1", "[task_options]", *(f"{k} = {v!r}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def leaderboard_view(db_file) -> list[tuple]:
    with sqlite3.connect(db_file) as connection:
        return connection.execute("SELECT task, rule, reward FROM leaderboard ORDER BY reward DESC").fetchall()


@pytest.mark.parametrize("task", [WAVE, ZEN])
def test_an_example_task_searches_with_local_workers_into_the_leaderboard_and_the_views(task, tmp_path):
    db_file = tmp_path / "own.db"
    url = f"sqlite:///{db_file}"
    searched = nos("enqueue", "--config", config_file(tmp_path, task), "--db", url, cwd=tmp_path, env=environment())
    assert searched.returncode == 0, searched.stdout + searched.stderr
    assert f"random on {task}" in searched.stdout
    assert_complete(url, 1, 4)
    board = nos("leaderboard", "--run", "1", "--db", url, env=environment())
    assert task in board.stdout
    rows = leaderboard_view(db_file)
    assert rows and {row[0] for row in rows} == {task}
    assert all(0 <= row[2] <= 1 for row in rows)
    with sqlite3.connect(db_file) as connection:
        assert connection.execute("SELECT task, status FROM run_progress").fetchall() == [(task, "completed")]


def test_results_of_other_options_never_answer_for_a_task_and_the_same_options_do(tmp_path):
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    for options in ({}, {}, {"train_size": 64}):   # run 2 repeats run 1; run 3 is another task key
        searched = nos("enqueue", "--config", config_file(tmp_path, WAVE, **options), "--db", url, cwd=tmp_path,
                       env=environment())
        assert searched.returncode == 0, searched.stdout + searched.stderr
    first, again, other = (run_rows(url, run_id) for run_id in (1, 2, 3))
    assert {e.task_key for e in first} == {e.task_key for e in again}
    assert {e.task_key for e in first}.isdisjoint({e.task_key for e in other})
    counted = [e for e in again if e.status != "rejected"]
    assert counted and all(e.status == "cached" for e in counted)   # the same rules, scored once
    assert not any(e.status == "cached" for e in other)
    assert {e.task for e in first + again + other} == {WAVE}


def test_an_example_task_searches_with_celery_workers(sqlite_url, broker, tmp_path):
    from nos.store import resolve_url, upgrade

    upgrade(resolve_url(sqlite_url))
    pool = Workers(sqlite_url, broker, env=environment())
    try:
        pool.start("own")
        searched = nos("enqueue", "--config", config_file(tmp_path, ZEN), "--db", sqlite_url, "--broker", broker,
                       cwd=tmp_path, env=environment())
    finally:
        pool.stop_all()
    assert searched.returncode == 0, searched.stdout + searched.stderr
    assert "Celery at" in searched.stdout
    assert_complete(sqlite_url, 1, 4)
    assert {e.worker.split(":")[0] for e in run_rows(sqlite_url, 1) if e.status in ("done", "diverged")}
    assert {row[0] for row in leaderboard_view(sqlite_url.removeprefix("sqlite:///"))} == {ZEN}


def test_a_detached_run_whose_control_worker_cannot_build_its_task_fails_saying_why(sqlite_url, broker, tmp_path):
    """The task file is on the enqueuing shell's path, not on the control worker's: the run is marked failed
    with the reason, where it used to sit `running` with no driver and no word, its message acknowledged."""
    from nos.store import open_store, resolve_url, upgrade
    from nos.store.models import Run

    upgrade(resolve_url(sqlite_url))
    pool = Workers(sqlite_url, broker)   # the tests' environment: examples/ is not on its PYTHONPATH
    try:
        pool.start("control", queues="control")
        sent = nos("enqueue", "--config", config_file(tmp_path, WAVE), "--db", sqlite_url, "--broker", broker,
                   "--detach", cwd=tmp_path, env=environment())
        assert sent.returncode == 0, sent.stdout + sent.stderr

        def run_row():
            store = open_store(sqlite_url)
            with store.reading() as session:
                run = session.get(Run, 1)
                row = run.status, run.driver, run.error
            store.dispose()
            return row

        wait_for(lambda: run_row()[0] != "running", timeout=120, every=0.5)
    finally:
        pool.stop_all()
    status, driver, error = run_row()
    assert (status, driver) == ("failed", None)
    assert error.startswith("its control worker could not drive it: UnknownTask")
    assert "wave_mlp" in error
    shown = nos("status", "1", "--db", sqlite_url)
    assert "failed" in shown.stdout


SEARCH_SCRIPT = """
import sys

import nos
from wave_mlp import wave

if __name__ == "__main__":
    run = nos.run_search(task=wave, searcher="random", budget={budget}, update_every=2, workers=1, seed=1,
                     db=sys.argv[1], task_options={options!r})
    print("STATUS", run.id, run.status)
    best = run.leaderboard(top=3)
    print("BEST", best[0].task, best[0].reward)
    frame = run.frame()
    print("FRAME", len(frame), sorted(set(frame.task)))
"""


def script(folder, budget: int, options: dict) -> str:
    path = folder / f"search_{budget}.py"
    path.write_text(textwrap.dedent(SEARCH_SCRIPT.format(budget=budget, options=options)))
    return str(path)


def test_run_search_runs_a_factory_from_a_script_and_reads_the_run_back(tmp_path):
    url = f"sqlite:///{tmp_path / 'api.db'}"
    done = subprocess.run([sys.executable, script(tmp_path, 4, SMALL[WAVE]), url], capture_output=True, text=True,
                          cwd=tmp_path, env=environment(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "STATUS 1 completed" in done.stdout
    assert f"BEST {WAVE}" in done.stdout
    assert f"FRAME {len(run_rows(url, 1))} ['{WAVE}']" in done.stdout
    assert_complete(url, 1, 4)


def _sigint_reaches_python() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # as a terminal or a notebook kernel has it


def test_ctrl_c_stops_run_search_cleanly_and_run_resume_finishes_it(tmp_path):
    from nos.store import resolve_url, upgrade

    url = f"sqlite:///{tmp_path / 'interrupted.db'}"
    upgrade(resolve_url(url))   # so that the test can watch it from the start
    slower = {**SMALL[WAVE], "train_size": 1024, "epochs": 3}
    searching = subprocess.Popen([sys.executable, script(tmp_path, 12, slower), url], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=environment(),
                                 preexec_fn=_sigint_reaches_python)
    try:
        wait_for(lambda: run_rows(url, 1) and finished_count(url, 1) >= 1, timeout=240)
        searching.send_signal(signal.SIGINT)
        out, _ = searching.communicate(timeout=120)
    finally:
        if searching.poll() is None:
            searching.kill()
    assert searching.returncode == 0, out
    assert "STATUS 1 stopped" in out
    assert "run.resume()" in out
    assert finished_count(url, 1) < 12
    resumed = subprocess.run([sys.executable, "-c", f"import nos; print(nos.Run(1, {url!r}).resume(progress=False))"],
                             capture_output=True, text=True, cwd=tmp_path, env=environment(), timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "status='completed'" in resumed.stdout
    assert_complete(url, 1, 12)
