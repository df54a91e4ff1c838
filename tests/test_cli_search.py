"""The search CLI end to end on temporary SQLite files, error cases included."""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import io
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from nos.cli.main import cli

from helpers.driver import TINY_TOML


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A database holding one completed run (id 1) of the tiny search, and its enqueue output."""
    folder = tmp_path_factory.mktemp("searched")
    config = folder / "tiny.toml"
    config.write_text(TINY_TOML)
    db = folder / "nos.db"
    result = invoke("enqueue", "--config", str(config), "--db", f"sqlite:///{db}", "--name", "tiny")
    assert result.exit_code == 0, result.output
    # Fold the write-ahead log into the file now: otherwise a connection left to the garbage
    # collector may do it in the middle of a later test that checks the file is unchanged.
    gc.collect()
    with contextlib.closing(sqlite3.connect(db)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db, result.output, config


@pytest.mark.slow
def test_enqueue_prints_the_run_id_progress_and_top_rules(searched):
    db, output, _ = searched
    assert output.splitlines()[0] == f"created database sqlite:///{db}"
    assert "RUN_ID 1" in output
    assert "12/12" in output
    assert "run 1 completed" in output
    assert "leaderboard of run 1" in output


@pytest.mark.slow
def test_runs_status_leaderboard_show(searched):
    db, _, _ = searched
    url = f"sqlite:///{db}"
    runs = invoke("runs", "--db", url)
    assert runs.exit_code == 0
    assert "tiny" in runs.output
    assert "completed" in runs.output
    assert "12/12" in runs.output

    status = invoke("status", "1", "--db", url)
    assert status.exit_code == 0
    assert "completed, 12/12 evaluations finished" in status.output
    with contextlib.closing(sqlite3.connect(db)) as connection:
        counts = dict(connection.execute("SELECT status, count(*) FROM evaluations GROUP BY status").fetchall())
    trained = counts.get("done", 0) + counts.get("diverged", 0)
    assert (f"({trained} trained, {counts.get('cached', 0)} from the cache; "
            f"{counts.get('rejected', 0)} more rejected before training, free)") in status.output
    assert invoke("status", "--db", url).output == status.output   # the latest run by default

    as_json = json.loads(invoke("leaderboard", "--run", "1", "--format", "json", "--db", url).output)
    rewards = [row["reward"] for row in as_json]
    assert rewards == sorted(rewards, reverse=True)
    assert len(as_json) <= 20
    assert [row["place"] for row in as_json] == list(range(1, len(as_json) + 1))
    as_csv = list(csv.DictReader(io.StringIO(invoke("leaderboard", "--format", "csv", "--top", "3",
                                                     "--db", url).output)))
    assert [row["rule"] for row in as_csv] == [row["rule"] for row in as_json[:3]]
    table = invoke("leaderboard", "--task", "digits", "--db", url)
    assert table.exit_code == 0
    assert as_json[0]["rule"] in table.output

    best = as_json[0]
    by_id = invoke("show", str(best["rule_id"]), "--db", url)
    assert by_id.exit_code == 0
    assert best["rule"] in by_id.output
    assert "val score" in by_id.output
    by_text = invoke("show", best["rule"], "--db", url)
    assert by_text.output == by_id.output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("resume", "99"), "no run 99"),
        (("resume", "1"), "already completed"),
        (("stop", "99"), "no run 99"),
        (("stop", "1"), "is completed, not running"),
        (("status", "99"), "no run 99"),
        (("leaderboard", "--run", "99"), "no run 99"),
        (("show", "424242"), "has not been evaluated"),
        (("show", "g * exp("), "bad rule"),
        (("enqueue", "--budget", "0"), "budget must be"),
        (("enqueue", "--task", "nope"), "unknown task 'nope'"),
        (("enqueue", "--task", "digit"), "unknown task 'digit'; did you mean 'digits'?"),
        (("enqueue", "--depth", "4"), "4 is not in the range"),
        (("enqueue", "--searcher", "annealing"), "'annealing' is not one of"),
        (("enqueue", "--workers", "-1"), "workers must be"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(searched, args, message):
    db, _, _ = searched
    before = digest(db)
    result = invoke(*args, "--db", f"sqlite:///{db}")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert digest(db) == before


def test_bad_config_files(tmp_path):
    db = tmp_path / "new.db"
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("budget = [")
    unknown_key = tmp_path / "unknown.toml"
    unknown_key.write_text("budgett = 3\n")
    bad_hyperparameters = tmp_path / "hyperparameters.toml"
    bad_hyperparameters.write_text("[hyperparameters]\nlearning_rate = 1\n")
    for path, message in [(bad_toml, "not valid TOML"),
                          (unknown_key, "unknown config keys 'budgett' (did you mean 'budget'?)"),
                          (tmp_path / "missing.toml", "No such file"),
                          (bad_hyperparameters, "unknown hyperparameters learning_rate")]:
        result = invoke("enqueue", "--config", str(path), "--db", f"sqlite:///{db}")
        assert result.exit_code == 2, result.output
        assert message in result.output, result.output
        assert not db.exists()   # nothing written, not even an empty database


@pytest.mark.slow
def test_a_run_stored_under_the_earlier_controller_key_resumes_with_its_settings(tmp_path):
    """`hyperparameters` was once called `controller`: such config files and stored runs still work."""
    import os
    import signal

    from nos.search import state_from_bytes
    from nos.store import latest_checkpoint, open_store

    from helpers.driver import assert_complete, finished_count, has_run, start_nos, wait_for

    config = tmp_path / "evolution.toml"
    config.write_text(f'searcher = "evolution"\n{TINY_TOML}\n[controller]\npopulation = 4\ntournament = 2\n')
    db = tmp_path / "nos.db"
    url = f"sqlite:///{db}"
    driver = start_nos("enqueue", "--config", str(config), "--db", url)
    wait_for(lambda: db.exists() and has_run(url))
    wait_for(lambda: finished_count(url, 1) >= 5)
    os.killpg(driver.pid, signal.SIGKILL)   # the driver and its workers, mid-run
    driver.wait()
    with contextlib.closing(sqlite3.connect(db)) as connection:
        stored = json.loads(connection.execute("SELECT config FROM runs WHERE id = 1").fetchone()[0])
        assert stored["hyperparameters"] == {"population": 4, "tournament": 2}
        stored["controller"] = stored.pop("hyperparameters")   # as an earlier nos stored it
        connection.execute("UPDATE runs SET config = ? WHERE id = 1", (json.dumps(stored),))
        connection.commit()
    # The checkpoint holds the searcher's settings: a searcher built with others would refuse it.
    result = invoke("resume", "1", "--db", url)
    assert result.exit_code == 0, result.output
    assert_complete(url, 1, 12)
    store = open_store(url)
    with store.reading() as session:
        assert state_from_bytes(latest_checkpoint(session, 1).blob)["config"] == {"population": 4, "tournament": 2}
    store.dispose()


def test_bad_database_urls(tmp_path):
    for url, message in [("nosuch://x", "nosuch"), ("postgresql://nos@127.0.0.1:1/nos", "cannot"),
                         (f"sqlite:///{tmp_path}/no/such/folder/x.db", "no database at")]:
        result = invoke("runs", "--db", url)
        assert result.exit_code == 2, result.output
        assert message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    result = invoke("enqueue", "--db", f"sqlite:///{tmp_path}/no/such/folder/x.db")
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_status_says_who_drives_a_run_or_what_will(sqlite_store, sqlite_url):
    from datetime import timedelta

    from sqlalchemy import update

    from nos.store import create_run, utcnow
    from nos.store.detached import hand_to_control
    from nos.store.leases import take_lease
    from nos.store.models import Run

    with sqlite_store.transaction() as session:
        ids = [create_run(session, "r", "digits", {"budget": 4}) for _ in range(3)]
        take_lease(session, ids[0], "elsewhere:1")                                 # driven in a shell
        take_lease(session, ids[1], "elsewhere:2", now=utcnow() - timedelta(minutes=5))   # its driver died
        hand_to_control(session, ids[2])                                           # detached, lost twice
        session.execute(update(Run).where(Run.id == ids[2]).values(drive_sends=2))
    lines = [invoke("status", str(i), "--db", sqlite_url).output.splitlines()[2] for i in ids]
    assert lines[0].startswith("  driven by elsewhere:1 (lease renewed ")
    assert lines[1] == "  no live driver (the last, elsewhere:2, is gone): continue it with `nos resume 2`"
    assert lines[2] == ("  no live driver: waiting for a control worker, which sends its driver loop again if it "
                        "was lost; sent again 2 times")


def test_status_says_why_a_run_failed(sqlite_store, sqlite_url):
    from nos.store import create_run, set_run_status

    with sqlite_store.transaction() as session:
        run_id = create_run(session, "r", "digits", {"budget": 4})
        set_run_status(session, run_id, "failed", error="Traceback (most recent call last):\n  ...\n"
                                                        "SearchStuck: 4 evaluations failed and none trained")
    lines = invoke("status", str(run_id), "--db", sqlite_url).output.splitlines()
    assert lines[2] == ("  failed: SearchStuck: 4 evaluations failed and none trained; fix the cause, then "
                        "`nos resume 1`")
    # A detached run whose control worker could not drive it: resumed in the foreground, it took over the shell.
    from nos.store.detached import hand_to_control

    with sqlite_store.transaction() as session:
        detached = create_run(session, "d", "digits", {"budget": 4})
        hand_to_control(session, detached)
        set_run_status(session, detached, "failed", error="its control worker could not drive it: ...")
    lines = invoke("status", str(detached), "--db", sqlite_url).output.splitlines()
    assert lines[2] == (f"  failed: its control worker could not drive it: ...; fix the cause, then "
                        f"`nos resume {detached} --detach`")


def test_a_relative_data_dir_is_stored_absolute(tmp_path, monkeypatch):
    """A resume, or a worker, started in another folder must read the same data, not that folder's `data`."""
    from nos.store import get_run, open_store

    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'n.db'}"
    done = invoke("enqueue", "--task", "digits", "--data-dir", "data", "--budget", "2", "--update-every", "2",
                  "--workers", "1", "--train-size", "200", "--db", db)
    assert done.exit_code == 0, done.output
    store = open_store(db)
    with store.reading() as session:
        assert get_run(session, 1).config["task_options"]["data_dir"] == str(tmp_path / "data")
    store.dispose()


def test_a_leaderboard_over_several_tasks_says_their_rewards_do_not_compare(sqlite_store, sqlite_url):
    from datetime import timedelta

    from nos.rules import parse
    from nos.store import (
        NewEvaluation,
        RuleRecord,
        claim,
        commit_result,
        create_run,
        enqueue_batch,
        get_or_create_rules,
    )

    from helpers.store import result

    for task, reward in (("quadratic", 0.99), ("digits", 0.95)):
        with sqlite_store.transaction() as session:
            run_id = create_run(session, task, task, {"budget": 1})
            rule_id, = get_or_create_rules(session, [RuleRecord.from_tree(parse("adam"))])
            evaluation_id, = enqueue_batch(session, run_id, 0, [NewEvaluation(rule_id, task, f"key-{task}")])
        with sqlite_store.transaction() as session:
            attempt = claim(session, evaluation_id, "w:1", timedelta(minutes=5))
            assert commit_result(session, evaluation_id, attempt, result(reward))
    both = invoke("leaderboard", "--db", sqlite_url).output
    assert both.rstrip().splitlines()[-1] == ("rewards of 2 tasks (digits, quadratic) are not comparable: add --task "
                                              "or --run")
    assert "not comparable" not in invoke("leaderboard", "--task", "digits", "--db", sqlite_url).output


def test_a_leaderboard_marks_rules_that_were_rejected_or_diverged_instead_of_printing_a_test_score(
        sqlite_store, sqlite_url):
    from datetime import timedelta

    from nos.records import EvaluationResult, TrialRecord
    from nos.rules import parse
    from nos.store import (
        NewEvaluation,
        RuleRecord,
        claim,
        commit_result,
        create_run,
        enqueue_batch,
        get_or_create_rules,
    )

    from helpers.store import result

    never_settles = EvaluationResult(
        reward=0.0, test_acc=0.0, best_lr=None, wall_seconds=1.0, diverged=True,
        trials=[TrialRecord(lr=lr, val_acc=0.0, train_loss=None, diverged=True, wall_seconds=0.001)
                for lr in (0.1, 1.0)])
    with sqlite_store.transaction() as session:
        run_id = create_run(session, "mixed", "digits", {"budget": 2})
        trained, diverging, rejected = get_or_create_rules(
            session, [RuleRecord.from_tree(parse(t)) for t in ("adam", "exp(g)", "log(exp(1e-4*w))")])
        ids = enqueue_batch(session, run_id, 0, [NewEvaluation(trained, "digits", "k"),
                                                 NewEvaluation(diverging, "digits", "k"),
                                                 NewEvaluation(rejected, "digits", "k", rejected=True, reason="zero")])
    for evaluation_id, outcome in zip(ids, (result(0.9), never_settles)):
        with sqlite_store.transaction() as session:
            attempt = claim(session, evaluation_id, "w:1", timedelta(minutes=5))
            assert commit_result(session, evaluation_id, attempt, outcome)
    rows = {line.split("│")[3].strip(): [cell.strip() for cell in line.split("│")[4:7]]
            for line in invoke("leaderboard", "--db", sqlite_url).output.splitlines() if line.startswith("│")}
    assert rows == {"adam": ["0.9000", "0.8800", "0.0010"], "exp(g)": ["0.0000", "-", "diverged"],
                    "log(exp(1e-4*w))": ["0.0000", "-", "rejected"]}
    csv_rows = invoke("leaderboard", "--format", "csv", "--db", sqlite_url).output.splitlines()
    header = csv_rows[0].split(",")
    assert sorted(dict(zip(header, r.split(",")))["status"] for r in csv_rows[1:]) == ["diverged", "done", "rejected"]
    diverged = invoke("show", "exp(g)", "--db", sqlite_url).output
    assert "diverged, reward 0.0000, test -, best lr -" in diverged
    assert diverged.count("<0.01") == 2 and "reward: the val score" not in diverged
    assert "reward: the val score of the final run at lr 0.0010" in invoke("show", "adam", "--db", sqlite_url).output

    # Another run proposes the diverged rule again: its cached copy carries the figures, and was shown as a
    # measured test score of 0.0000 and a best rate of "-".
    with sqlite_store.transaction() as session:
        again = create_run(session, "again", "digits", {"budget": 1})
        enqueue_batch(session, again, 0, [NewEvaluation(diverging, "digits", "k", cached_from=ids[1])])
    rows = {line.split("│")[3].strip(): [cell.strip() for cell in line.split("│")[4:7]]
            for line in invoke("leaderboard", "--run", str(again), "--db", sqlite_url).output.splitlines()
            if line.startswith("│")}
    assert rows == {"exp(g)": ["0.0000", "-", "diverged"]}
    assert f"cached, reward 0.0000, test -, best lr -, cached from {ids[1]}" in \
        invoke("show", "exp(g)", "--db", sqlite_url).output


def test_an_empty_database_says_so_instead_of_printing_empty_tables(sqlite_store, sqlite_url):
    assert invoke("runs", "--db", sqlite_url).output == "no runs yet; start one with `nos enqueue`\n"
    assert invoke("leaderboard", "--db", sqlite_url).output == ("no scored evaluations yet; start a search with "
                                                                "`nos enqueue`\n")
