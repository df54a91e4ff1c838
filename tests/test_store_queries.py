"""Leaderboard and run progress: the functions, the SQL views, and the README's ad-hoc SQL, on both databases."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import sqlalchemy as sa

from nos.rules import parse
from nos.store import (
    EVALUATION_STATUSES,
    Evaluation,
    LrTrial,
    RuleRecord,
    create_run,
    get_or_create_rules,
    leaderboard,
    run_progress,
    utcnow,
)

# The three queries the README shows users; they must run unchanged on SQLite and PostgreSQL.
TOP_RULES_SQL = """SELECT rule, reward, test_acc, run_id
FROM leaderboard
ORDER BY reward DESC, evaluation_id
LIMIT 10;"""
RUNS_SQL = """SELECT run_id, name, status, total, queued + running AS pending, best_reward
FROM run_progress
ORDER BY run_id;"""
LR_SQL = """SELECT t.lr, COUNT(*) AS trials, AVG(t.val_acc) AS mean_val_acc,
       SUM(CASE WHEN t.diverged THEN 1 ELSE 0 END) AS diverged
FROM lr_trials AS t JOIN evaluations AS e ON e.id = t.evaluation_id
WHERE e.run_id = 1
GROUP BY t.lr
ORDER BY t.lr;"""
AD_HOC = [TOP_RULES_SQL, RUNS_SQL, LR_SQL]

SCORED = ("done", "diverged", "cached")
TEXTS = [f"{u}({x}) * {y}" for u in ("exp", "sqrt", "sign") for x in ("g", "m", "v") for y in ("g", "m")]  # 18


def populate(store, seed=0, evaluations=300):
    """Three runs over two tasks with many tied rewards and every status; returns the rows as dicts."""
    rng = random.Random(seed)
    now = utcnow()
    with store.transaction() as session:
        runs = [create_run(session, f"run{i}", ("digits", "quadratic", "digits")[i], {}) for i in range(3)]
        rules = get_or_create_rules(session, [RuleRecord.from_tree(parse(t)) for t in TEXTS])
        rows = []
        for i in range(evaluations):
            run = rng.randrange(3)
            status = rng.choice(EVALUATION_STATUSES)
            scored = status in SCORED
            rows.append(dict(
                run_id=runs[run], rule_id=rng.choice(rules), batch=i // 10, seq=i,
                task=("digits", "quadratic")[run % 2], task_key="k", status=status, attempts=int(status != "queued"),
                created_at=now,
                reward=rng.choice([0.0, 0.25, 0.5, 0.75, 0.9]) if scored else None,
                test_acc=rng.random() if scored else None, best_lr=1e-3 if scored else None))
        session.execute(sa.insert(Evaluation), rows)
        stored = [dict(r._mapping) for r in session.execute(sa.select(Evaluation.__table__).order_by(Evaluation.id))]
        trials = [dict(evaluation_id=r["id"], lr=lr, val_acc=rng.random(), train_loss=1.0, diverged=rng.random() < 0.2)
                  for r in stored if r["status"] in ("done", "diverged") for lr in (1e-3, 1e-2, 1e-1)]
        session.execute(sa.insert(LrTrial), trials)
    return runs, stored


def expected_leaderboard(rows, top, run_id=None, task=None):
    """Brute force: best reward per rule, ties to the earliest evaluation."""
    best, counts = {}, {}
    for r in sorted(rows, key=lambda r: (-r["reward"] if r["reward"] is not None else 0, r["id"])):
        if r["reward"] is None or (run_id and r["run_id"] != run_id) or (task and r["task"] != task):
            continue
        best.setdefault(r["rule_id"], r)
        counts[r["rule_id"]] = counts.get(r["rule_id"], 0) + 1
    ordered = sorted(best.values(), key=lambda r: (-r["reward"], r["id"]))[:top]
    return [(r["rule_id"], r["reward"], r["id"], counts[r["rule_id"]]) for r in ordered]


@pytest.mark.parametrize("top", [1, 5, 18, 50, 10**20])   # the last: more than any LIMIT takes
def test_leaderboard_matches_brute_force(store, top):
    runs, rows = populate(store)
    with store.reading() as session:
        filters = [(None, None), (runs[1], None), (None, "digits"), (runs[0], "digits"), (runs[0], "quadratic")]
        for run_id, task in filters:
            got = [(r.rule_id, r.reward, r.evaluation_id, r.evaluations)
                   for r in leaderboard(session, top, run_id=run_id, task=task)]
            assert got == expected_leaderboard(rows, top, run_id, task), (run_id, task)


def test_leaderboard_rows_carry_the_rule_and_its_place(store):
    _, rows = populate(store)
    with store.reading() as session:
        board = leaderboard(session, 3)
    assert [r.place for r in board] == [1, 2, 3]
    by_id = {r["id"]: r for r in rows}
    for entry in board:
        source = by_id[entry.evaluation_id]
        assert entry.rule in TEXTS
        assert ((entry.test_acc, entry.run_id, entry.task) == (
            source["test_acc"], source["run_id"], source["task"]))


def test_leaderboard_view_agrees_with_the_function(store):
    populate(store)
    with store.reading() as session:
        from_view = session.execute(sa.text(
            "SELECT rule_id, reward, evaluation_id, evaluations FROM leaderboard "
            "ORDER BY reward DESC, evaluation_id")).all()
        from_function = [(r.rule_id, r.reward, r.evaluation_id, r.evaluations) for r in leaderboard(session, 1000)]
    assert [tuple(r) for r in from_view] == from_function


def test_an_empty_leaderboard(store):
    with store.reading() as session:
        assert leaderboard(session, 20) == []
        assert leaderboard(session, 0) == []


def test_run_progress_counts_by_status_and_the_view_agrees(store):
    runs, rows = populate(store)
    with store.transaction() as session:
        empty_run = create_run(session, "empty", "digits", {})
    with store.reading() as session:
        for run_id in runs:
            progress = run_progress(session, run_id)
            mine = [r for r in rows if r["run_id"] == run_id]
            assert progress.counts == {s: sum(r["status"] == s for r in mine) for s in EVALUATION_STATUSES}
            assert progress.total == len(mine)
            assert progress.best_reward == max(r["reward"] for r in mine if r["reward"] is not None)
            view = session.execute(sa.text("SELECT * FROM run_progress WHERE run_id = :r"),
                                   {"r": run_id}).one()._mapping
            assert {s: view[s] for s in EVALUATION_STATUSES} == progress.counts
            assert (view["total"], view["best_reward"], view["name"]) == (progress.total, progress.best_reward,
                                                                         progress.name)
        nothing = run_progress(session, empty_run)
        assert (nothing.total, nothing.best_reward) == (0, None)
        assert run_progress(session, 999) is None
        view = session.execute(sa.text("SELECT total, queued FROM run_progress WHERE run_id = :r"),
                               {"r": empty_run}).one()
        assert view.total == 0


def test_the_readme_queries_run_on_both_databases(store):
    runs, rows = populate(store)
    with store.reading() as session:
        top, progress, by_lr = (session.execute(sa.text(sql)).all() for sql in AD_HOC)
    assert [r.reward for r in top] == [r[1] for r in expected_leaderboard(rows, 10)]
    assert [(r.run_id, r.total) for r in progress] == [(run, sum(x["run_id"] == run for x in rows)) for run in runs]
    assert [r.lr for r in by_lr] == [1e-3, 1e-2, 1e-1]
    assert all(0 <= r.mean_val_acc <= 1 for r in by_lr)
    assert all(0 <= r.diverged <= r.trials for r in by_lr)


def test_the_docs_show_these_queries():
    root = Path(__file__).resolve().parent.parent
    docs = (root / "README.md").read_text() + (root / "docs" / "storage.md").read_text()
    for sql in AD_HOC:
        assert sql in docs
