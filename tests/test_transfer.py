"""`nos transfer`: the Wide ResNet, the transfer protocol, its storage (resume, reuse, takeover) and the command.

Everything runs on a tiny Fashion-MNIST-shaped folder (random images) with a
WRN-10-1, two learning rates and a few epochs: seconds, not minutes.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import sqlite3
import uuid

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from click.testing import CliRunner

from nos.cli.main import cli
from nos.records import EpochRecord, TransferResult
from nos.rules import parse
from nos.store import (
    TrialRecord,
    finish_transfer,
    get_or_create_rule,
    load_transfer,
    open_store,
    open_transfer,
    record_trial,
)
from nos.store.models import TransferCheckpoint, TransferEpoch, TransferRun, TransferTrial
from nos.tasks.base import PAPER_LRS
from nos.tasks.transfer import SnapshotUnreadable, read_snapshot, train_transfer, transfer_task
from nos.tasks.wrn import WideResNet, parameter_count, parse_model, wide_resnet
from nos.tensor_state import MAGIC, to_bytes
from nos.transfer import Stat, TransferSuperseded, run_transfer, summarize

from helpers.cli import one_line_error
from helpers.fake_fashion import write_fashion, write_idx

LRS = [1e-2, 1e-1]
EPOCHS = 3
# Reads m (a state buffer) and draws dropout noise from the optimizer's generator: resuming must restore both.
NOISY = "drop(m, 0.3) * exp(sign(g) * sign(m))"


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """A Fashion-MNIST folder (torchvision layout): 128 train and 32 test random images with random labels."""
    root = tmp_path_factory.mktemp("fashion")
    write_fashion(root / "FashionMNIST" / "raw", train=128, test=32)
    return root


@pytest.fixture(scope="module")
def task(fashion_dir):
    return transfer_task("fashion-mnist", "wrn-10-1", data_dir=fashion_dir, val_size=32, batch_size=16, lrs=LRS,
                         epochs=EPOCHS)


def numbers(result):
    """Everything a result says except timings."""
    trials = [(t.lr, t.val_acc, t.train_loss, t.diverged, t.epochs, t.steps) for t in result.trials]
    epochs = [(e.epoch, e.train_loss, e.val_acc, e.test_acc, e.diverged) for e in result.epochs]
    return (result.rule, result.task_key, result.seed, result.best_lr, trials, epochs, result.final_val,
            result.final_test, result.best_val, result.best_test, result.diverged)


# --- the network ---------------------------------------------------------------------------------------

def test_wide_resnet_shapes_and_size():
    assert wide_resnet(10, 1, 1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert wide_resnet(10, 2, 3)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    wrn = wide_resnet(16, 4, 3)
    assert len(wrn.blocks) == 3 * 2   # n = (16 - 4) / 6 blocks in each of three groups
    # WRN-16-4 has 2.7M parameters (Zagoruyko & Komodakis, Table 1).
    assert 2.7e6 < sum(p.numel() for p in wrn.parameters()) < 2.8e6
    assert [b.conv2.out_channels for b in wrn.blocks] == [64, 64, 128, 128, 256, 256]


@pytest.mark.parametrize("name, expected", [("wrn-16-4", (16, 4)), ("WRN-28-10", (28, 10)), ("wrn-10-1", (10, 1))])
def test_model_names_parse(name, expected):
    assert parse_model(name) == expected


@pytest.mark.parametrize("bad", ["resnet-18", "wrn-16", "wrn-15-4", "wrn-4-1", "wrn-16-0"])
def test_bad_model_names_say_what_is_expected(bad):
    with pytest.raises(ValueError, match="wrn|depth|width"):
        parse_model(bad)


@pytest.mark.parametrize("bad, message", [
    ("wrn-1006-1", "the depth must be at most 1000, got 1006"),
    ("wrn-10-65", "the width factor must be between 1 and 64, got 65"),
    ("wrn-994-64", "has 65,311,298,010 parameters; nos trains at most 250,000,000"),
    ("wrn-6000000004-1", "expected wrn-DEPTH-WIDTH"),
    ("wrn-" + "1" * 5000 + "-1", "expected wrn-DEPTH-WIDTH"),
])
def test_a_network_too_large_to_build_is_refused_by_its_name(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_model(bad)


@pytest.mark.parametrize("depth, width, channels", [(10, 1, 1), (16, 4, 3), (22, 2, 1), (28, 10, 3)])
def test_the_parameter_count_is_the_built_networks(depth, width, channels):
    built = wide_resnet(depth, width, channels)
    assert parameter_count(depth, width, channels) == sum(p.numel() for p in built.parameters())


@pytest.mark.slow
def test_the_task_trains_the_model_and_keys_on_it(task, fashion_dir):
    assert isinstance(task.new_child(), WideResNet)
    assert task.options["model"] == "wrn-10-1"
    assert task.epochs == EPOCHS
    other = transfer_task("fashion-mnist", "wrn-16-1", data_dir=fashion_dir, val_size=32, batch_size=16, lrs=LRS,
                          epochs=EPOCHS)
    assert other.config_key() != task.config_key()
    with pytest.raises(ValueError, match="image task"):
        transfer_task("digits")


# --- the protocol ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_final_and_best_figures_come_from_the_final_runs_epochs(task):
    result = train_transfer("powersign", task, seed=0)
    assert [t.lr for t in result.trials] == LRS
    assert len(result.epochs) == EPOCHS
    assert result.best_lr == max(result.trials, key=lambda t: t.val_acc).lr
    # The first epoch of the final run is the best sweep trial, trained on.
    best = next(t for t in result.trials if t.lr == result.best_lr)
    assert (result.epochs[0].val_acc, result.epochs[0].train_loss) == (best.val_acc, best.train_loss)
    assert result.final_val == result.epochs[-1].val_acc
    assert result.final_test == result.epochs[-1].test_acc
    assert result.best_val == max(e.val_acc for e in result.epochs)
    assert result.best_test == max(e.test_acc for e in result.epochs)
    assert not result.diverged
    assert result.model == "wrn-10-1"


def _key_without_the_data(task) -> str:
    identity = task.to_dict()
    identity["options"].pop("data", None)
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def test_the_grid_is_keyed_sorted_and_the_paper_grids_key_is_unchanged(fashion_dir):
    options = dict(data_dir=fashion_dir, val_size=32, batch_size=16, epochs=EPOCHS)
    paper = transfer_task("fashion-mnist", "wrn-10-1", **options)
    # What nos gave this configuration before the grid was sorted (the data's fingerprint came with it).
    assert _key_without_the_data(paper) == "12cbd0ccc61c7786"
    given = [transfer_task("fashion-mnist", "wrn-10-1", lrs=lrs, **options) for lrs in (PAPER_LRS, PAPER_LRS[::-1])]
    assert given[0].config_key() == given[1].config_key()
    assert transfer_task("fashion-mnist", "wrn-10-1", lrs=LRS[::-1], **options).lrs == tuple(LRS)


@pytest.mark.slow
def test_a_tie_in_an_unsorted_grid_keeps_the_network_of_the_rate_it_picks(task):
    # g - g never moves the weights: every rate scores the same, and the smaller one wins.
    unsorted = dataclasses.replace(task, lrs=(1e-1, 1e-2))
    result = train_transfer("g - g", unsorted, seed=0)
    assert len({t.val_acc for t in result.trials}) == 1
    assert result.best_lr == 1e-2
    assert len(result.epochs) == EPOCHS


def _relabelled(root):
    """A copy of `fashion_dir`'s files with every training label moved to the next class."""
    write_fashion(root / "FashionMNIST" / "raw", train=128, test=32)
    path = root / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    labels = np.frombuffer(gzip.decompress(path.read_bytes())[8:], dtype=np.uint8)
    write_idx(path, (labels + 1) % 10)
    return root


def test_other_data_of_the_same_sizes_has_another_key_and_the_same_data_elsewhere_the_same(fashion_dir, tmp_path):
    options = dict(val_size=32, batch_size=16, lrs=LRS, epochs=EPOCHS)
    here = transfer_task("fashion-mnist", "wrn-10-1", data_dir=fashion_dir, **options)
    copy = tmp_path / "copy"
    write_fashion(copy / "FashionMNIST" / "raw", train=128, test=32)
    relabelled = _relabelled(tmp_path / "relabelled")
    assert transfer_task("fashion-mnist", "wrn-10-1", data_dir=copy, **options).config_key() == here.config_key()
    other = transfer_task("fashion-mnist", "wrn-10-1", data_dir=relabelled, **options)
    assert other.splits.sizes == here.splits.sizes
    assert other.config_key() != here.config_key()


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_other_numbers(task):
    a, b = train_transfer("sgd", task, seed=0), train_transfer("sgd", task, seed=0)
    assert numbers(a) == numbers(b)
    assert numbers(train_transfer("sgd", task, seed=1)) != numbers(a)


@pytest.mark.slow
def test_resuming_from_a_snapshot_or_a_stored_sweep_gives_the_uninterrupted_numbers(task):
    snapshots = []
    whole = train_transfer(NOISY, task, seed=0, on_epoch=lambda record, snap: snapshots.append(snap()))
    assert len(snapshots) == EPOCHS
    resumed = train_transfer(NOISY, task, seed=0, trials_done=whole.trials, epochs_done=whole.epochs[:1],
                             resume=snapshots[0])
    assert numbers(resumed) == numbers(whole)
    # Only the sweep stored (a crash before the first epoch's snapshot): the final run starts afresh.
    trained = []
    fresh = train_transfer(NOISY, task, seed=0, trials_done=whole.trials, on_trial=trained.append)
    assert numbers(fresh) == numbers(whole)
    assert trained == []


@pytest.mark.slow
def test_a_snapshot_holds_no_pickle_and_one_of_an_earlier_nos_without_the_draws_still_loads(task):
    snapshots = []
    whole = train_transfer(NOISY, task, seed=0, on_epoch=lambda record, snap: snapshots.append(snap()))
    assert snapshots[0].startswith(MAGIC)
    state = read_snapshot(snapshots[0])
    assert all(t.dtype == torch.uint8 and t.device.type == "cpu" for t in [state["order"], *state["draws"]])
    del state["draws"]   # as written before the child's own draws were kept (a Wide ResNet draws none)
    resumed = train_transfer(NOISY, task, seed=0, trials_done=whole.trials, epochs_done=whole.epochs[:1],
                             resume=to_bytes(state))
    assert numbers(resumed) == numbers(whole)


def test_bytes_that_are_not_a_snapshot_are_refused_clearly():
    buffer = io.BytesIO()
    torch.save({"lr": 0.1}, buffer)
    with pytest.raises(SnapshotUnreadable, match="written by torch.save"):
        read_snapshot(buffer.getvalue())
    with pytest.raises(SnapshotUnreadable, match="cannot be read"):
        read_snapshot(MAGIC + b"damaged")
    with pytest.raises(SnapshotUnreadable, match="does not hold all of lr, epochs"):
        read_snapshot(to_bytes({"lr": 0.1}))
    fields = {"lr": 0.1, "epochs": 1, "steps": 8, "val_acc": 0.5, "train_loss": 1.0, "model": {}, "optimizer": {}}
    with pytest.raises(SnapshotUnreadable, match="generator states"):
        read_snapshot(to_bytes({**fields, "order": torch.zeros(3)}))
    with pytest.raises(SnapshotUnreadable, match="generator states"):
        read_snapshot(to_bytes({**fields, "order": torch.zeros(3, dtype=torch.uint8), "draws": [torch.zeros(2)]}))


@pytest.mark.slow
def test_a_run_that_diverges_at_every_rate_scores_zero(task):
    result = train_transfer("exp(g) * 1e4", task, seed=0)   # overflows at once
    assert result.diverged
    assert result.best_lr is None
    assert result.epochs == []
    assert (result.final_val, result.final_test, result.best_val, result.best_test) == (0, 0, 0, 0)


def test_test_at_best_val_is_the_test_accuracy_of_the_earliest_best_validation_epoch(task):
    def result(seed, epochs):
        epochs = [EpochRecord(i, 1.0, val, test, False, 1.0) for i, (val, test) in enumerate(epochs, start=1)]
        return TransferResult.build("g", task, seed, [], 0.1, epochs, "cpu")

    (row,) = summarize([result(0, [(0.5, 0.3), (0.5, 0.6), (0.4, 0.9)]), result(1, [(0.4, 0.7), (0.6, 0.2)])])
    assert row.test_at_best_val.mean == pytest.approx(0.25)
    assert row.test_at_best_val.std == pytest.approx(0.1 / 2 ** 0.5)
    assert row.best_test.mean == pytest.approx(0.8)
    (none,) = summarize([TransferResult.build("g", task, 0, [], None, [], "cpu")])
    assert none.test_at_best_val == Stat(0.0, None)


@pytest.mark.slow
def test_summary_is_mean_and_sample_spread_over_seeds(task):
    results = [train_transfer("sgd", task, seed=s) for s in (0, 1)]
    (row,) = summarize(results)
    assert row.seeds == [0, 1]
    vals = [r.final_val for r in results]
    assert row.final_val.mean == pytest.approx(sum(vals) / 2)
    assert row.final_val.std == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
    assert Stat.of([0.5]).format() == "0.5000"
    assert Stat.of([0.5, 0.7]).format().startswith("0.6000 ± ")


# --- storage: reuse, crash and resume, takeover (SQLite and PostgreSQL) ----------------------------------

class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing marks the run failed."""


def _counts(store):
    with store.reading() as session:
        return {m.__tablename__: session.execute(sa.select(sa.func.count()).select_from(m)).scalar_one()
                for m in (TransferRun, TransferTrial, TransferEpoch, TransferCheckpoint)}


@pytest.mark.slow
def test_a_second_run_reads_the_stored_result_instead_of_training(store, task):
    first = run_transfer(store, "powersign", task, seed=0)
    assert not first.reused
    trained = []
    again = run_transfer(store, "g * exp(sign(g) * sign(m))", task, seed=0, on_trial=trained.append,
                         on_epoch=trained.append)
    assert again.reused
    assert trained == []
    assert again.transfer_id == first.transfer_id
    assert again.result == first.result   # every figure, timings included, read back exactly
    assert _counts(store) == {"transfer_runs": 1, "transfer_trials": len(LRS), "transfer_epochs": EPOCHS,
                              "transfer_checkpoints": 0}
    with store.reading() as session:
        row = session.get(TransferRun, first.transfer_id)
        assert (row.status, row.attempts, row.model, row.task, row.seed) == ("done", 1, "wrn-10-1", "fashion-mnist", 0)
        assert row.config == task.to_dict()
        assert row.task_key == task.config_key()
        assert row.best_test == first.result.best_test
        assert row.finished_at is not None


@pytest.mark.slow
def test_a_crash_in_the_final_run_loses_nothing_stored_and_the_rerun_matches(store, task):
    whole = train_transfer(NOISY, task, seed=0)

    def crash_after_epoch_2(record):
        if record.epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        run_transfer(store, NOISY, task, seed=0, on_epoch=crash_after_epoch_2)
    assert _counts(store) == {"transfer_runs": 1, "transfer_trials": len(LRS), "transfer_epochs": 2,
                              "transfer_checkpoints": 1}
    trials, epochs = [], []
    rerun = run_transfer(store, NOISY, task, seed=0, on_trial=trials.append, on_epoch=epochs.append)
    assert trials == []
    assert [e.epoch for e in epochs] == [3]   # only what was not stored is trained
    assert rerun.resumed
    assert not rerun.reused
    assert numbers(rerun.result) == numbers(whole)
    assert _counts(store)["transfer_checkpoints"] == 0
    with store.reading() as session:
        assert session.get(TransferRun, rerun.transfer_id).attempts == 2


DROPOUT_TASK = """
import torch
from torch import nn

from nos.tasks import from_tensors, task_factory


@task_factory
def dropout(*, device="cpu", **protocol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    child = lambda: nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 2))
    protocol.setdefault("batch_size", 16)
    return from_tensors(x, y, child, val_size=0.25, test_size=0.25, split_seed=0, device=device, **protocol)
"""


@pytest.fixture
def dropout_task(tmp_path, monkeypatch):
    """A task of our own whose child draws dropout masks from torch's generator as it trains."""
    name = f"dropout_task_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(DROPOUT_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    return transfer_task(f"{name}:dropout", lrs=LRS, epochs=4)


@pytest.mark.parametrize("crash_after", [1, 2])
def test_a_child_with_dropout_resumes_with_the_uninterrupted_numbers(store, dropout_task, crash_after):
    # The snapshot keeps the child's own generator states (Child.draws): the masks after the resume
    # are those the uninterrupted run draws, not the seed's first ones again.
    whole = train_transfer("adam", dropout_task, seed=0)

    def crash(record):
        if record.epoch == crash_after:
            raise Crash

    with pytest.raises(Crash):
        run_transfer(store, "adam", dropout_task, seed=0, on_epoch=crash)
    assert _counts(store)["transfer_checkpoints"] == 1
    epochs = []
    rerun = run_transfer(store, "adam", dropout_task, seed=0, on_epoch=epochs.append)
    assert rerun.resumed
    assert [e.epoch for e in epochs] == list(range(crash_after + 1, 5))   # continued from the snapshot
    assert numbers(rerun.result) == numbers(whole)


def _replace_snapshot(store, blob: bytes) -> None:
    with store.transaction() as session:
        session.execute(sa.update(TransferCheckpoint).values(blob=blob))


@pytest.mark.parametrize("kind", ["torch.save", "damaged"])
def test_a_snapshot_that_cannot_be_read_is_dropped_and_the_final_run_trained_again(store, dropout_task, kind,
                                                                                   monkeypatch):
    whole = train_transfer("adam", dropout_task, seed=0)

    def crash(record):
        if record.epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        run_transfer(store, "adam", dropout_task, seed=0, on_epoch=crash)
    with store.reading() as session:
        state = read_snapshot(session.execute(sa.select(TransferCheckpoint.blob)).scalar_one())
    buffer = io.BytesIO()
    torch.save(state, buffer)   # what an earlier nos stored
    _replace_snapshot(store, buffer.getvalue() if kind == "torch.save" else MAGIC + b"\x00" * 20)

    def never(*args, **kwargs):
        raise AssertionError("a snapshot was unpickled")

    monkeypatch.setattr(torch, "load", never)
    trials, epochs = [], []
    rerun = run_transfer(store, "adam", dropout_task, seed=0, on_trial=trials.append, on_epoch=epochs.append)
    assert trials == []   # the sweep stays
    assert [e.epoch for e in epochs] == [1, 2, 3, 4]   # the final run from its start
    assert numbers(rerun.result) == numbers(whole)
    assert _counts(store)["transfer_checkpoints"] == 0


@pytest.mark.slow
def test_a_crash_in_the_sweep_keeps_the_finished_trials(store, task):
    whole = train_transfer("adam", task, seed=1)

    def crash_after_first(record):
        raise Crash

    with pytest.raises(Crash):
        run_transfer(store, "adam", task, seed=1, on_trial=crash_after_first)
    assert _counts(store)["transfer_trials"] == 1
    trials = []
    rerun = run_transfer(store, "adam", task, seed=1, on_trial=trials.append)
    assert [t.lr for t in trials] == LRS[1:]
    assert numbers(rerun.result) == numbers(whole)


@pytest.mark.slow
def test_an_error_marks_the_run_failed_and_a_rerun_finishes_it(store, task):
    def boom(record):
        raise RuntimeError("out of memory, say")

    with pytest.raises(RuntimeError):
        run_transfer(store, "sgd", task, seed=0, on_epoch=boom)
    with store.reading() as session:
        (row,) = session.execute(sa.select(TransferRun)).scalars()
        assert row.status == "failed"
        assert "out of memory" in row.error
    done = run_transfer(store, "sgd", task, seed=0)
    assert done.result.epochs
    assert done.result == run_transfer(store, "sgd", task, seed=0).result
    with store.reading() as session:
        assert session.get(TransferRun, done.transfer_id).status == "done"


@pytest.mark.slow
def test_a_process_whose_run_was_taken_over_stops_and_writes_nothing_more(store, task):
    def take_over(record):
        with store.transaction() as session:
            rule_id = get_or_create_rule(session, parse("g"))
            open_transfer(session, rule_id, task=task.name, model="wrn-10-1", task_key=task.config_key(),
                          config=task.to_dict(), seed=0, device="cpu")

    with pytest.raises(TransferSuperseded):
        run_transfer(store, "sgd", task, seed=0, on_trial=take_over)
    assert _counts(store)["transfer_trials"] == 1   # the first trial, stored before the takeover
    with store.transaction() as session:
        (row,) = session.execute(sa.select(TransferRun)).scalars()
        assert row.attempts == 2
        assert row.status == "running"
        late = TrialRecord(LRS[1], 0.5, 1.0, False, 1.0, 1, 6)
        assert record_trial(session, row.id, 1, late) is False
        assert len(load_transfer(session, row.id).trials) == 1


@pytest.mark.slow
def test_each_seed_and_configuration_is_its_own_run(store, task, fashion_dir):
    run_transfer(store, "sgd", task, seed=0)
    run_transfer(store, "sgd", task, seed=1)
    longer = transfer_task("fashion-mnist", "wrn-10-1", data_dir=fashion_dir, val_size=32, batch_size=16, lrs=LRS,
                           epochs=EPOCHS + 1)
    assert not run_transfer(store, "sgd", longer, seed=0).reused
    assert _counts(store)["transfer_runs"] == 3


@pytest.mark.slow
def test_a_run_continued_on_another_device_records_both(sqlite_store, task):
    def crash_after_first(record):
        raise Crash

    with pytest.raises(Crash):
        run_transfer(sqlite_store, "adam", task, seed=0, on_trial=crash_after_first)
    with sqlite_store.transaction() as session:   # as if the first trial had been trained on a GPU
        session.execute(sa.update(TransferRun).values(device="cuda"))
    rerun = run_transfer(sqlite_store, "adam", task, seed=0)
    assert rerun.resumed
    assert rerun.result.device == "cuda+cpu"
    assert run_transfer(sqlite_store, "adam", task, seed=0).result.device == "cuda+cpu"
    with sqlite_store.reading() as session:
        assert session.get(TransferRun, rerun.transfer_id).device == "cuda+cpu"


# --- the command -------------------------------------------------------------------------------------------

def transfer(*args: str):
    return CliRunner().invoke(cli, ["transfer", *args])


def fast(fashion_dir, db):
    return ["--model", "wrn-10-1", "--lrs", "1e-2,1e-1", "--epochs", "2", "--data-dir", str(fashion_dir),
            "--val-size", "32", "--batch-size", "16", "--db", db]


@pytest.mark.slow
def test_transfer_prints_table_1_and_reuses_stored_results(fashion_dir, migrated_url):
    args = ["powersign", "--seeds", "2", *fast(fashion_dir, migrated_url)]
    result = transfer(*args)
    assert result.exit_code == 0, result.output
    for word in ("final val", "final test", "best val", "best test", "powersign", "sgd", "momentum", "adam",
                 "rmsprop", "±"):
        assert word in result.output
    again = transfer(*args, "--format", "json")
    assert again.exit_code == 0, again.output
    assert "10 of 10 results read from" in again.stderr
    data = json.loads(again.stdout)
    assert [row["optimizer"] for row in data["summary"]] == ["powersign", "sgd", "momentum", "adam", "rmsprop"]
    assert len(data["results"]) == 10
    assert all(len(r["epochs"]) == 2 for r in data["results"] if not r["diverged"])
    assert data["summary"][0]["final_val"]["std"] is not None
    markdown = transfer(*args, "--format", "markdown")
    assert "| optimizer | best lr | final val | final test | best val | best test |" in markdown.stdout


@pytest.mark.slow
def test_transfer_creates_a_new_sqlite_database(fashion_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 'new.db'}"
    result = transfer("g * exp(sign(m))", "--no-baselines", "--seeds", "1", *fast(fashion_dir, db))
    assert result.exit_code == 0, result.output
    assert "created database" in result.stderr
    assert "g * exp(sign(m))" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", ""], "unknown model '': expected wrn-DEPTH-WIDTH"),
    (["--model", "   "], "unknown model '   ': expected wrn-DEPTH-WIDTH"),
    (["--model", "wrn-1006-1"], "the depth must be at most 1000"),
    (["--model", "wrn-10-100000000"], "expected wrn-DEPTH-WIDTH"),
    (["--threads", "100000000000"], "Invalid value for '--threads'"),
    (["--lrs", "1e-1,,"], "an empty entry in '1e-1,,'"),
])
def test_a_bad_model_threads_or_grid_exits_2_with_one_line_and_creates_nothing(args, message, fashion_dir,
                                                                                tmp_path):
    # Everything else is a run of seconds: what gets through would train (and pass) rather than hang.
    db = tmp_path / "x.db"
    result = transfer("sgd", "--no-baselines", "--seeds", "1", *fast(fashion_dir, f"sqlite:///{db}"), *args)
    one_line_error(result, message)
    assert not db.exists()


@pytest.mark.slow
def test_a_reordered_grid_reuses_the_results_and_a_tie_in_a_descending_one_trains(fashion_dir, tmp_path):
    args = ["g - g", "--no-baselines", "--seeds", "1", *fast(fashion_dir, f"sqlite:///{tmp_path / 'x.db'}")]
    first = transfer(*args, "--lrs", "1e-1,1e-2")
    assert first.exit_code == 0, first.output
    again = transfer(*args, "--lrs", "1e-2,1e-1", "--format", "json")
    assert again.exit_code == 0, again.output
    assert "1 of 1 results read from" in again.stderr
    assert json.loads(again.stdout)["summary"][0]["best_lrs"] == [1e-2]


@pytest.mark.slow
def test_other_data_of_the_same_sizes_is_trained_anew(fashion_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 'x.db'}"
    args = ["sgd", "--no-baselines", "--seeds", "1", "--format", "json"]
    assert transfer(*args, *fast(fashion_dir, db)).exit_code == 0
    relabelled = _relabelled(tmp_path / "relabelled")
    other = transfer(*args, *fast(relabelled, db))
    assert other.exit_code == 0, other.output
    assert "results read from" not in other.stderr
    store = open_store(db)
    assert _counts(store)["transfer_runs"] == 2
    store.dispose()


@pytest.mark.slow
def test_the_title_names_where_the_results_were_trained_and_counts_in_words(fashion_dir, tmp_path):
    db = tmp_path / "x.db"
    args = ["sgd", "--no-baselines", "--seeds", "1", *fast(fashion_dir, f"sqlite:///{db}"), "--epochs", "1",
            "--format", "markdown"]
    first = transfer(*args)
    assert first.exit_code == 0, first.output
    assert ", 1 epoch, batch 16, seed 0, cpu: mean ± std over seeds" in first.stdout
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE transfer_runs SET device = 'cuda'")
    connection.close()
    again = transfer(*args)
    assert ", seed 0, cpu (results from cuda): mean ± std over seeds" in again.stdout


@pytest.mark.slow
def test_markdown_keeps_the_diverged_count_outside_the_code_span(fashion_dir, tmp_path):
    result = transfer("exp(g) * 1e4", "sgd", "--no-baselines", "--seeds", "1",
                      *fast(fashion_dir, f"sqlite:///{tmp_path / 'x.db'}"), "--lrs", "1e300", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert "| `exp(g) * 10000` (1 diverged) | - |" in result.stdout
    assert "| sgd (1 diverged) | - |" in result.stdout
    assert ", 2 epochs, " in result.stdout


def _store_finished(store, task, rule: str, seed: int, epochs: list[tuple[float, float]]) -> None:
    """A finished run of `rule` under `task`'s key whose final run had these (val, test) epochs."""
    records = [EpochRecord(i, 1.0, val, test, False, 1.0) for i, (val, test) in enumerate(epochs, start=1)]
    trials = [TrialRecord(lr, 0.1, 1.0, False, 1.0, 1, 6) for lr in task.lrs]
    result = TransferResult.build(rule, task, seed, trials, task.lrs[0], records, "cpu")
    with store.transaction() as session:
        opened = open_transfer(session, get_or_create_rule(session, parse(rule)), task=task.name, model="wrn-10-1",
                               task_key=task.config_key(), config=task.to_dict(), seed=seed, device="cpu")
        for trial in trials:
            record_trial(session, opened.id, opened.attempt, trial)
        finish_transfer(session, opened.id, opened.attempt, result)


def test_test_at_best_val_is_computed_from_the_stored_epochs(fashion_dir, sqlite_store, sqlite_url):
    task = transfer_task("fashion-mnist", "wrn-10-1", data_dir=fashion_dir, val_size=32, batch_size=16, lrs=LRS,
                         epochs=2)
    _store_finished(sqlite_store, task, "g", 0, [(0.5, 0.3), (0.5, 0.6)])   # a tie: the earlier epoch
    _store_finished(sqlite_store, task, "g", 1, [(0.4, 0.7), (0.6, 0.2)])
    args = ["sgd", "--no-baselines", "--seeds", "2", *fast(fashion_dir, sqlite_url)]
    result = transfer(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    assert "2 of 2 results read from" in result.stderr
    data = json.loads(result.stdout)
    assert [r["test_at_best_val"] for r in data["results"]] == [0.3, 0.2]
    summary = data["summary"][0]["test_at_best_val"]
    assert summary["mean"] == pytest.approx(0.25)
    assert summary["std"] == pytest.approx(0.1 / 2 ** 0.5)
    table = transfer(*args, "--format", "markdown")
    assert "| sgd | 0.01, 0.01 | 0.5500 ± 0.0707 | 0.4000 ± 0.2828 | 0.5500 ± 0.0707 | 0.6500 ± 0.0707 | " \
           "0.2500 ± 0.0707 |" in table.stdout


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "table"])
def test_a_stored_figure_that_is_not_finite_exits_2_and_changes_nothing(fashion_dir, tmp_path, fmt):
    db = tmp_path / "x.db"
    args = ["sgd", "--no-baselines", "--seeds", "1", *fast(fashion_dir, f"sqlite:///{db}"), "--format", fmt]
    assert transfer(*args).exit_code == 0
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE transfer_epochs SET test_acc = 9e999 WHERE epoch = 1")
    connection.close()
    before = db.read_bytes()
    result = transfer(*args)
    one_line_error(result, "transfer run 1 is damaged in the database: transfer_epochs.test_acc of epoch 1 holds "
                           "inf, not a finite number")
    assert db.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet-50"], "wrn-DEPTH-WIDTH"),
    (["--task", "digits"], "image task"),
    (["g * ("], "bad rule"),
    (["--no-baselines"], "nothing to train"),
    (["--lrs", "0"], "positive"),
])
def test_bad_input_exits_2_with_one_message(args, message, tmp_path):
    result = transfer(*args, "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "x.db").exists()


def test_an_unavailable_device_exits_2(fashion_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = transfer("sgd", "--device", "cuda", *fast(fashion_dir, f"sqlite:///{tmp_path / 'x.db'}"))
    assert result.exit_code == 2
    assert "CUDA" in result.output
