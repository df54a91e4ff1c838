"""nos.run_search and nos.Run: what they refuse before anything is written, and a run read back.

Searches that train are in tests/test_own_task_search.py (real worker processes).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import nos
from nos.config import ConfigError
from nos.control import RunRefused
from nos.store import create_run, open_store, resolve_url, upgrade


def a_factory_in_main(**options):
    return None


@pytest.mark.parametrize("settings, error, message", [
    ({"task": "mnist"}, RunRefused, "unknown task 'mnist'"),
    ({"task": "nowhere_at_all:task"}, RunRefused, "no module named 'nowhere_at_all'"),
    ({"task": "digits", "budget": 0}, ConfigError, "budget must be a whole number"),
    ({"task": "digits", "searcher": "annealing"}, ConfigError, "searcher must be one of"),
    ({"task": "digits", "momentum": 0.9}, ConfigError, "unknown config keys 'momentum'"),
    ({"task": "digits", "device": "cuda:7"}, RunRefused, "cuda"),
    ({"task": "digits", "broker": "amqp://x"}, RunRefused, "must be redis://"),
    ({"task": lambda **options: None}, ValueError, "not importable by name"),
])
def test_a_search_that_cannot_run_raises_before_anything_is_written(tmp_path, settings, error, message):
    db = tmp_path / "api.db"
    with pytest.raises(error, match=message):
        nos.run_search(db=f"sqlite:///{db}", progress=False, **settings)
    assert not db.exists()


def test_a_factory_defined_in_a_script_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(a_factory_in_main, "__module__", "__main__")
    with pytest.raises(ValueError, match="define the task factory in a module file"):
        nos.run_search(task=a_factory_in_main, progress=False)


def test_a_stored_run_reads_back_and_a_finished_one_refuses_stop_and_resume(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    upgrade(resolve_url(url))
    store = open_store(url)
    with store.transaction() as session:
        run_id = create_run(session, "done-already", "digits", {"task": "digits", "budget": 4})
        from nos.store import set_run_status

        set_run_status(session, run_id, "completed")
    store.dispose()
    run = nos.Run(run_id, db=url)
    assert run.status == "completed"
    assert run.config.budget == 4
    assert run.leaderboard() == []
    assert repr(run) == f"Run(id={run_id}, status='completed', db='{url}')"
    with pytest.raises(RunRefused, match="is completed, not running"):
        run.stop()
    with pytest.raises(RunRefused, match="already completed"):
        run.resume(progress=False)
    with pytest.raises(LookupError, match="no run 99"):
        nos.Run(99, db=url).status


def test_a_script_without_a_main_guard_fails_its_one_run_at_once(tmp_path):
    """Worker processes import the script that started them: an unguarded search must not start again in each."""
    db = tmp_path / "unguarded.db"
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import nos
        nos.run_search(task="quadratic", searcher="random", budget=2, update_every=2, workers=1,
                       db="sqlite:///{db}", progress=False)
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert 'if __name__ == "__main__":' in done.stderr and "WorkerStartError" in done.stderr
    store = open_store(f"sqlite:///{db}")
    try:
        with store.reading() as session:
            from nos.store.models import Run

            statuses = [run.status for run in session.query(Run).all()]
    finally:
        store.dispose()
    assert statuses == ["failed"]   # the script's own run, marked failed; none started by its workers


def test_progress_into_a_file_is_a_line_per_change_not_carriage_returns(tmp_path):
    """A log file or a notebook's captured output got one line of updates joined by \\r."""
    script = tmp_path / "logged.py"
    script.write_text(textwrap.dedent(f"""
        import nos
        if __name__ == "__main__":
            nos.run_search(task="quadratic", searcher="random", budget=4, update_every=2, workers=1,
                           db="sqlite:///{tmp_path / 'logged.db'}")
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout
    lines = done.stdout.splitlines()
    assert "1 local worker," in lines[1]   # not "1 local worker(s)"
    progress = [line for line in lines if line.startswith("run 1: ")]
    assert progress[-1].startswith("run 1: 4/4 evaluations, best reward 0.")
    assert len(progress) == len(set(progress))   # each said once
    assert lines[-1] == "run 1 completed"
