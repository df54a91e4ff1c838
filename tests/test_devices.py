"""A run's device is checked before anything is written; a worker without it refuses the work, leaving it queued."""

from __future__ import annotations

import hashlib

import pytest
import torch
from click.testing import CliRunner

from nos.cli.main import cli
from nos.config import SearchConfig
from nos.devices import DeviceError
from nos.executors import LocalExecutor
from nos.rules import parse
from nos.store import (
    NewEvaluation,
    RuleRecord,
    create_run,
    enqueue_batch,
    get_or_create_rules,
    open_store,
    resolve_url,
    upgrade,
)
from nos.store.models import Evaluation
from nos.work import Outcome, run_evaluation, task_for, task_key

from helpers.driver import TINY, TINY_TOML

# A CUDA device no machine has: one past the last that torch sees (cuda:0 where there is none).
ABSENT = f"cuda:{torch.cuda.device_count()}"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("device", "message"), [
    ("bogus", "unknown device 'bogus': expected cpu, cuda, cuda:N or mps"),
    ("cuda:x", "unknown device 'cuda:x'"),
    (ABSENT, f"device '{ABSENT}' asked for, but torch sees"),
])
def test_enqueue_on_a_device_this_machine_lacks_exits_2_and_writes_nothing(tmp_path, device, message):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    new, existing = tmp_path / "new.db", tmp_path / "existing.db"
    upgrade(resolve_url(f"sqlite:///{existing}"))
    before = digest(existing)
    for db in (new, existing):
        result = CliRunner().invoke(cli, ["enqueue", "--config", str(config), "--device", device,
                                          "--db", f"sqlite:///{db}"])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("Error: ")
        assert message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not new.exists()
    assert digest(existing) == before


def test_eval_and_worker_refuse_a_bad_device_in_one_line():
    for args, message in [(["eval", "sgd", "--device", "bogus"], "unknown device 'bogus'"),
                          (["worker", "--broker", "redis://127.0.0.1:1/0", "--device", ABSENT], "asked for, but")]:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_local_workers_are_not_started_for_a_device_this_machine_lacks(sqlite_url):
    upgrade(resolve_url(sqlite_url))
    with pytest.raises(DeviceError, match="asked for, but torch sees"):
        LocalExecutor(sqlite_url, workers=1, device=ABSENT)


def test_a_worker_without_the_runs_device_refuses_the_evaluation_and_leaves_it_queued(sqlite_url):
    upgrade(resolve_url(sqlite_url))
    store = open_store(sqlite_url)
    config = SearchConfig(**{**TINY, "device": ABSENT})
    key = task_key(task_for(config, "cpu"), config.seed)   # the key does not depend on the device
    with store.transaction() as session:
        run_id = create_run(session, "gpu run", config.task, config.to_dict())
        rule_id = get_or_create_rules(session, [RuleRecord.from_tree(parse("sign(g)"))])[0]
        evaluation_id = enqueue_batch(session, run_id, 0, [NewEvaluation(rule_id, config.task, key)])[0]

    assert run_evaluation(store, evaluation_id, worker="w:1") is Outcome.REFUSED
    with store.reading() as session:
        row = session.get(Evaluation, evaluation_id)
        assert (row.status, row.attempts, row.worker) == ("queued", 0, None)
        assert row.error.startswith(f"refused by w:1: device {ABSENT!r} asked for, but")   # what `nos status` shows
    status = CliRunner().invoke(cli, ["status", str(run_id), "--db", sqlite_url]).output
    assert f"1 queued evaluation refused by a worker (the last: refused by w:1: device {ABSENT!r}" in status

    # A worker that has a device it is told to use (`nos worker --device cpu`) takes it as usual.
    assert run_evaluation(store, evaluation_id, device="cpu") in (Outcome.DONE, Outcome.DIVERGED)
    store.dispose()
