"""Revision 0003 (transfer runs) and its store functions, on real SQLite files and a real PostgreSQL."""

from __future__ import annotations

import argparse
import os

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError

from nos.rules import parse
from nos.store import (
    Base,
    EpochRecord,
    TransferResult,
    TrialRecord,
    create_engine,
    finish_transfer,
    get_or_create_rule,
    load_transfer,
    open_transfer,
    record_epoch,
    record_trial,
    resolve_url,
    restart_final,
    schema_state,
    transfer_runs_of,
    upgrade,
)
from nos.store.models import TransferCheckpoint, TransferEpoch, TransferRun, TransferTrial
from nos.store.schema import alembic_config, migrating

TRANSFER_TABLES = {"transfer_runs", "transfer_trials", "transfer_epochs", "transfer_checkpoints"}
CONFIG = {"name": "fashion-mnist", "options": {"model": "wrn-16-4"}, "epochs": 10}


def _migrate(url, direction: str, revision: str, x: tuple[str, ...] = ()) -> None:
    """`alembic -x X <direction> <revision>`, in the transaction `nos db upgrade` migrates in."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection, migrating(connection):
            config = alembic_config(url)
            config.attributes["connection"] = connection
            config.cmd_opts = argparse.Namespace(x=list(x))
            getattr(command, direction)(config, revision)
    finally:
        engine.dispose()


def _open(session, rule="g * exp(sign(g) * sign(m))", seed=0, key="k1"):
    rule_id = get_or_create_rule(session, parse(rule))
    return open_transfer(session, rule_id, task="fashion-mnist", model="wrn-16-4", task_key=key, config=CONFIG,
                         seed=seed, device="cpu")


def test_0003_adds_the_transfer_tables_and_downgrade_to_0002_removes_only_them(migrated_url):
    url = resolve_url(migrated_url)
    engine = create_engine(url)
    assert TRANSFER_TABLES <= set(sa.inspect(engine).get_table_names())
    with engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO runs (name, status, task, config, created_at, updated_at) "
                                   "VALUES ('r', 'running', 'digits', '{}', '2026-01-01', '2026-01-01')")
    engine.dispose()

    _migrate(url, "downgrade", "0002")
    engine = create_engine(url)
    tables = set(sa.inspect(engine).get_table_names())
    assert not tables & TRANSFER_TABLES
    assert {"runs", "rules", "evaluations", "lr_trials", "checkpoints"} <= tables
    with engine.connect() as connection:   # the rest of the database is untouched
        assert connection.exec_driver_sql("SELECT COUNT(*) FROM runs").scalar_one() == 1
    engine.dispose()
    assert schema_state(url).current == "0002"

    assert upgrade(url).up_to_date
    engine = create_engine(url)
    assert TRANSFER_TABLES <= set(sa.inspect(engine).get_table_names())
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def _transfer_rows(url) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return sum(connection.exec_driver_sql(f"SELECT COUNT(*) FROM {table}").scalar_one()
                       for table in sorted(TRANSFER_TABLES))
    finally:
        engine.dispose()


def test_a_downgrade_that_would_delete_transfer_results_is_refused_unless_forced(store, migrated_url):
    """Dropping the transfer tables deleted every `nos transfer` result without a word."""
    with store.transaction() as session:
        opened = _open(session)
        record_trial(session, opened.id, opened.attempt, TrialRecord(0.1, 0.8, 0.5, False, 2.0, 1, 100))
        record_epoch(session, opened.id, opened.attempt, EpochRecord(1, 1.0, 0.8, 0.8, False, 3.0), b"snap")
    url = resolve_url(migrated_url)
    with pytest.raises(CommandError, match=r"^a downgrade below revision 0003 would delete 4 row\(s\) of `nos "
                                           r"transfer` results .*; nothing was changed; give `-x force=1` to "
                                           r"delete them$"):
        _migrate(url, "downgrade", "0002")
    assert schema_state(url).up_to_date
    assert _transfer_rows(url) == 4

    _migrate(url, "downgrade", "0002", x=("force=1",))
    assert schema_state(url).current == "0002"
    engine = create_engine(url)
    assert not set(sa.inspect(engine).get_table_names()) & TRANSFER_TABLES
    engine.dispose()


def test_a_run_is_unique_per_rule_configuration_and_seed(store):
    with store.transaction() as session:
        first = _open(session)
        assert _open(session).id == first.id                      # the same run, taken again
        assert _open(session, seed=1).id != first.id
        assert _open(session, key="k2").id != first.id
        assert _open(session, rule="adam").id != first.id
    with pytest.raises(sa.exc.IntegrityError):
        with store.transaction() as session:
            run = session.get(TransferRun, first.id)
            session.add(TransferRun(rule_id=run.rule_id, task=run.task, model=run.model, task_key=run.task_key,
                                    config={}, seed=run.seed, status="running", attempts=0,
                                    created_at=run.created_at, updated_at=run.updated_at))


def test_each_open_is_a_new_attempt_and_only_the_latest_may_write(store):
    with store.transaction() as session:
        one = _open(session)
        two = _open(session)
    assert (one.attempt, two.attempt) == (1, 2)
    assert not one.done
    trial = TrialRecord(0.1, 0.8, 0.5, False, 2.0, 1, 100)
    with store.transaction() as session:
        assert record_trial(session, one.id, 1, trial) is False
        assert record_trial(session, two.id, 2, trial) is True
    with store.transaction() as session:
        with pytest.raises(sa.exc.IntegrityError):   # an lr is stored once per run
            record_trial(session, two.id, 2, trial)


def test_epochs_and_the_snapshot_are_stored_together_then_the_result_drops_the_snapshot(store):
    blob = os.urandom(1 << 20)   # binary, 1 MiB: survives the round trip byte for byte
    with store.transaction() as session:
        opened = _open(session)
        record_trial(session, opened.id, opened.attempt, TrialRecord(0.1, 0.8, 0.5, False, 2.0, 1, 100))
    epochs = [EpochRecord(e, 1.0 / e, 0.8 + e / 100, 0.79 + e / 100, False, 3.0) for e in (1, 2, 3)]
    with store.transaction() as session:
        assert record_epoch(session, opened.id, opened.attempt, epochs[0], b"old")
        assert record_epoch(session, opened.id, opened.attempt, epochs[1], blob)
    with store.reading() as session:
        stored = load_transfer(session, opened.id)
        assert stored.epochs == epochs[:2]
        assert stored.checkpoint == blob
        assert stored.checkpoint_epoch == 2
        assert stored.run.status == "running"
        assert stored.trials[0].lr == 0.1
    result = TransferResult(rule="g", task="fashion-mnist", model="wrn-16-4", task_key="k1", seed=0,
                            trials=stored.trials, best_lr=0.1, epochs=epochs, final_val=0.83, final_test=0.82,
                            best_val=0.83, best_test=0.82, diverged=False, wall_seconds=11.0)
    with store.transaction() as session:
        assert finish_transfer(session, opened.id, opened.attempt, result)
    with store.reading() as session:
        stored = load_transfer(session, opened.id)
        assert stored.epochs == epochs
        assert stored.checkpoint is None
        assert (stored.run.status, stored.run.final_val, stored.run.best_test) == ("done", 0.83, 0.82)
        assert [r.id for r in transfer_runs_of(session, "k1")] == [opened.id]
        assert transfer_runs_of(session, "k1", seeds=[1]) == []
    with store.transaction() as session:
        again = _open(session)
        assert again.done
        assert again.id == opened.id   # a finished run is not taken again
        assert record_trial(session, opened.id, opened.attempt, TrialRecord(1.0, 0.1, 2.0, False, 2.0, 1, 100)) \
            is False


def test_restarting_the_final_run_forgets_its_epochs_and_deleting_a_run_cascades(store):
    with store.transaction() as session:
        opened = _open(session)
        record_trial(session, opened.id, 1, TrialRecord(0.1, 0.8, 0.5, False, 2.0, 1, 100))
        record_epoch(session, opened.id, 1, EpochRecord(1, 1.0, 0.8, 0.8, False, 3.0), b"snap")
    with store.transaction() as session:
        assert restart_final(session, opened.id, 1)
        stored = load_transfer(session, opened.id)
        assert stored.epochs == []
        assert stored.checkpoint is None
        assert len(stored.trials) == 1
        record_epoch(session, opened.id, 1, EpochRecord(1, 1.0, 0.8, 0.8, False, 3.0), b"snap")
    with store.transaction() as session:
        session.execute(sa.delete(TransferRun).where(TransferRun.id == opened.id))
    with store.reading() as session:
        for model in (TransferTrial, TransferEpoch, TransferCheckpoint):
            assert session.execute(sa.select(sa.func.count()).select_from(model)).scalar_one() == 0


def test_a_rule_with_transfer_runs_cannot_be_deleted(store):
    with store.transaction() as session:
        opened = _open(session)
    with pytest.raises(sa.exc.IntegrityError):
        with store.transaction() as session:
            rule_id = session.get(TransferRun, opened.id).rule_id
            session.execute(sa.text("DELETE FROM rules WHERE id = :id"), {"id": rule_id})


def _open_on(session, device: str):
    rule_id = get_or_create_rule(session, parse("g"))
    return open_transfer(session, rule_id, task="fashion-mnist", model="wrn-16-4", task_key="k1", config=CONFIG,
                         seed=0, device=device)


def test_a_run_records_every_device_its_stored_numbers_come_from(store):
    with store.transaction() as session:
        assert _open_on(session, "cpu").device == "cpu"
    with store.transaction() as session:   # nothing stored on the CPU: the run is the GPU's alone
        on_gpu = _open_on(session, "cuda")
        assert on_gpu.device == "cuda"
        record_trial(session, on_gpu.id, on_gpu.attempt, TrialRecord(0.1, 0.8, 0.5, False, 2.0, 1, 100))
    with store.transaction() as session:
        assert _open_on(session, "cpu").device == "cuda+cpu"
    with store.transaction() as session:
        assert _open_on(session, "cuda").device == "cuda+cpu"
    with store.reading() as session:
        assert session.get(TransferRun, on_gpu.id).device == "cuda+cpu"


def _finished(store) -> int:
    with store.transaction() as session:
        opened = _open(session)
        trial = TrialRecord(0.1, 0.8, 0.5, False, 2.0, 1, 100)
        record_trial(session, opened.id, opened.attempt, trial)
        epoch = EpochRecord(1, 1.0, 0.8, 0.79, False, 3.0)
        result = TransferResult(rule="g", task="fashion-mnist", model="wrn-16-4", task_key="k1", seed=0,
                                trials=[trial], best_lr=0.1, epochs=[epoch], final_val=0.8, final_test=0.79,
                                best_val=0.8, best_test=0.79, diverged=False, wall_seconds=5.0)
        finish_transfer(session, opened.id, opened.attempt, result)
    return opened.id


@pytest.mark.parametrize("model, column, value, said", [
    (TransferEpoch, "test_acc", float("inf"), "transfer_epochs.test_acc of epoch 1 holds inf, not a finite number"),
    (TransferTrial, "val_acc", float("-inf"), "transfer_trials.val_acc of lr 0.1 holds -inf, not a finite number"),
    (TransferRun, "best_lr", float("inf"), "transfer_runs.best_lr holds inf, not a finite number"),
])
def test_a_stored_figure_that_is_not_finite_is_named_when_loaded(store, model, column, value, said):
    from nos.store.queries import DamagedRow

    transfer_id = _finished(store)
    with store.transaction() as session:
        session.execute(sa.update(model).values({column: value}))
    with store.reading() as session:
        with pytest.raises(DamagedRow) as raised:
            load_transfer(session, transfer_id)
    assert str(raised.value) == f"transfer run {transfer_id} is damaged in the database: {said}"


def test_text_in_a_stored_figure_or_a_date_is_named_when_loaded(sqlite_store):
    from nos.store.queries import DamagedRow

    transfer_id = _finished(sqlite_store)   # SQLite keeps any value in any column
    with sqlite_store.transaction() as session:
        session.execute(sa.text("UPDATE transfer_epochs SET val_acc = 'high'"))
    with sqlite_store.reading() as session, pytest.raises(DamagedRow, match=r"transfer_epochs.val_acc of epoch 1 "
                                                                            r"holds 'high', not a finite number$"):
        load_transfer(session, transfer_id)
    with sqlite_store.transaction() as session:
        session.execute(sa.text("UPDATE transfer_epochs SET val_acc = 0.8"))
        session.execute(sa.text("UPDATE transfer_runs SET created_at = 'yesterday'"))
    with sqlite_store.reading() as session, pytest.raises(DamagedRow, match=r"^transfer run \d+ is damaged in the "
                                                                            r"database: transfer_runs.created_at "
                                                                            r"cannot be read"):
        load_transfer(session, transfer_id)
