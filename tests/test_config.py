"""SearchConfig.load and the Python API's arguments: what a file and keywords make together.

Bad values in a config file, refused in one line by the CLI, are in tests/test_hostile_input.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import nos
from nos.cli.main import cli
from nos.config import MAX_AT_ONCE, ConfigError, SearchConfig
from nos.search.settings import REAL_RANGES, PolicyGradientConfig
from nos.store import create_run, open_store, resolve_url, upgrade


def a_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "search.toml"
    path.write_text(text)
    return path


def test_a_flag_under_the_new_name_wins_over_the_old_name_in_the_file(tmp_path):
    """It was refused as giving both names; flags win over the file, whatever name the file uses."""
    path = a_file(tmp_path, "batch_size = 5\ncontroller = {hidden = 16}\n")
    config = SearchConfig.load(path, update_every=2, hyperparameters={"lr": 0.01})
    assert config.update_every == 2
    assert config.hyperparameters == {"hidden": 16, "lr": 0.01}
    assert config.synchronous is False   # the old name in a user's file: a new run, today's driver
    path.write_text("synchronous = true\n")   # and an old name among the keywords leaves the file's driver
    assert SearchConfig.load(path, batch_size=4).synchronous is True
    result = CliRunner().invoke(cli, ["enqueue", "--config", str(path), "--update-every", "2", "--budget", "0"])
    assert result.exit_code == 2
    assert "budget must be a whole number" in result.output   # got past the names to the next check


def test_keyword_tables_add_to_the_files_tables_key_by_key(tmp_path):
    """As the CLI's flags do; the keyword's table replaced the file's, dropping train_size and the baseline."""
    path = a_file(tmp_path, "[task_options]\ntrain_size = 300\nepochs = 1\n"
                            "[hyperparameters]\nlr = 0.01\nbaseline = \"ema\"\n")
    config = SearchConfig.load(path, task_options={"sweep": "halving", "epochs": 2}, hyperparameters={"hidden": 32})
    assert config.task_options == {"train_size": 300, "epochs": 2, "sweep": "halving"}
    assert config.hyperparameters == {"lr": 0.01, "baseline": "ema", "hidden": 32}


def test_a_relative_data_dir_is_stored_absolute(tmp_path, monkeypatch):
    """From the file's folder where the file gives it, from the working directory where a keyword does:
    a resumed run and its workers start from wherever."""
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "search.toml"
    path.write_text('[task_options]\ndata_dir = "../data"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert SearchConfig.load(path).task_options["data_dir"] == str(tmp_path / "data")
    assert SearchConfig.load(task_options={"data_dir": "cifar"}).task_options["data_dir"] == str(elsewhere / "cifar")
    assert SearchConfig.load(task_options={"data_dir": "/abs/x"}).task_options["data_dir"] == "/abs/x"


def test_a_path_object_is_stored_as_its_text_and_other_objects_are_refused():
    """A pathlib.Path passed every check and failed inside the database insert ("not JSON serializable")."""
    config = SearchConfig(task_options={"data_dir": Path("/data/cifar")})
    assert json.loads(json.dumps(config.to_dict()))["task_options"]["data_dir"] == "/data/cifar"
    with pytest.raises(ConfigError, match=r"task_options must hold only numbers, strings, .* \(a run stores it as "
                                          r"JSON\): Object of type set"):
        SearchConfig(task="mytasks:wave", task_options={"bands": {1, 2}})


def test_the_default_in_flight_is_capped_as_a_given_one_is():
    """workers x pack can exceed what one transaction proposes; a given in_flight that large is refused."""
    config = SearchConfig(workers=16, pack=1024, budget=100_000)
    assert config.target_in_flight == MAX_AT_ONCE
    with pytest.raises(ConfigError, match="in_flight must be a whole number from 1 to 10,000"):
        SearchConfig(in_flight=MAX_AT_ONCE + 1)
    assert SearchConfig(workers=2, pack=1).target_in_flight == 4   # small defaults as they were


@pytest.mark.parametrize("key", sorted(REAL_RANGES))
def test_the_config_and_the_searcher_take_the_same_hyperparameter_ranges(key):
    """The config said warm_mass went to 1e+06 and lr from 0, then the searcher refused 2 and 0."""
    interval = REAL_RANGES[key]
    for value in (interval.least, interval.most, interval.least - 1e-3, interval.most + 1e-3, 10**400):
        searcher_error = config_error = None
        try:
            PolicyGradientConfig(**{key: value})
        except ValueError as exc:
            searcher_error = str(exc)
        try:
            SearchConfig(hyperparameters={key: value})
        except ConfigError as exc:
            config_error = str(exc)
        assert (searcher_error is None) == (config_error is None), (value, searcher_error, config_error)
        assert (value in interval) == (config_error is None)
        if config_error:
            assert config_error == f"hyperparameters.{key} must be {interval}, got {value!r}"


@pytest.fixture
def stored_run(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(resolve_url(url))
    store = open_store(url)
    with store.transaction() as session:
        create_run(session, "stored", "digits", SearchConfig(budget=4).to_dict())
    store.dispose()
    return url


def test_run_ids_and_top_are_whole_numbers(stored_run):
    """Run(1.7) and Run(True) named run 1; Run(2**63) overflowed; top='3' and top=-1 passed silently."""
    assert nos.Run(torch.tensor(1), db=stored_run).status == "running"   # any integer type, numpy's too
    for bad in (1.7, True, "1", None):
        with pytest.raises(TypeError, match="a run id must be a whole number"):
            nos.Run(bad, db=stored_run)
    with pytest.raises(ValueError, match="a run id must be from 0 to 2,147,483,647, got 9,223,372,036,854,775,808"):
        nos.Run(2**63, db=stored_run)
    with pytest.raises(LookupError, match="no run 0"):
        _ = nos.Run(0, db=stored_run).status   # as `nos status 0` says
    run = nos.Run(1, db=stored_run)
    with pytest.raises(TypeError, match="top must be a whole number, got '3'"):
        run.leaderboard(top="3")
    with pytest.raises(ValueError, match="top must be from 1 to 1,000,000, got -1"):
        run.leaderboard(top=-1)
    assert run.leaderboard(top=3) == []


def test_a_task_that_is_neither_a_name_nor_a_factory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="task must be a task's name or a task factory function, got 5"):
        nos.run_search(task=5, db=f"sqlite:///{tmp_path / 'x.db'}", progress=False)
    assert not os.path.exists(tmp_path / "x.db")
