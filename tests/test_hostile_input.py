"""Hostile and careless input through the CLI: one clear line, exit status 2, the database unchanged, no secret shown.

Each test does what a user did (a command line, a config file, a damaged row)
and checks the message, the exit status and a snapshot of every table.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from nos.cli.main import cli
from nos.config import SearchConfig
from nos.store import create_run, open_store, resolve_url, save_checkpoint, set_run_status, upgrade
from nos.store.models import Base

from helpers.cli import one_line_error
from helpers.services import unavailable

REPO = Path(__file__).resolve().parent.parent
MARKUP_NAME = "[/x] [bold red]boom"


def invoke(*args: str, env: dict | None = None):
    # catch_exceptions=False: a traceback fails the test instead of passing as "exit 1".
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, env=env)


def snapshot(url: str) -> dict[str, list[dict]]:
    """Every row of every table (alembic's too), in key order: equal snapshots, unchanged database.

    Values are compared as the driver returns them, not through nos's column types, so a value those cannot
    convert (the damaged rows of section 10) is compared too instead of failing the snapshot.
    """
    tables = [sa.table(t.name, *(sa.column(c.name) for c in t.columns)) for t in Base.metadata.sorted_tables]
    keys = {t.name: [c.name for c in t.primary_key.columns] for t in Base.metadata.sorted_tables}
    version = sa.table("alembic_version", sa.column("version_num"))
    engine = sa.create_engine(resolve_url(url))
    try:
        with engine.connect() as connection:
            rows = {t.name: connection.execute(sa.select(t).order_by(*(t.c[k] for k in keys[t.name]))).mappings().all()
                    for t in tables}
            rows["alembic_version"] = connection.execute(sa.select(version)).mappings().all()
            return {name: [dict(row) for row in found] for name, found in rows.items()}
    finally:
        engine.dispose()


def small_config(**changes) -> dict:
    return SearchConfig(task="rosenbrock", budget=4, update_every=2, depth=1, workers=1, stale_after=30.0,
                        heartbeat_every=1.0, task_options={"train_size": 5, "lrs": [0.01], "epochs": 1},
                        **changes).to_dict()


@pytest.fixture(scope="module")
def marked_up(tmp_path_factory):
    """The user's command: a run named with rich markup, searched to its budget on a new SQLite file."""
    db = tmp_path_factory.mktemp("markup") / "nos.db"
    url = f"sqlite:///{db}"
    result = invoke("enqueue", "--task", "rosenbrock", "--budget", "4", "--workers", "1", "--name", MARKUP_NAME,
                    "--db", url)
    return url, result


@pytest.fixture
def pg_with_a_run(pg_url) -> str:
    """A migrated PostgreSQL schema holding one stopped run with a checkpoint."""
    upgrade(resolve_url(pg_url))
    store = open_store(pg_url)
    with store.transaction() as session:
        run_id = create_run(session, "stored", "rosenbrock", small_config())
        save_checkpoint(session, run_id, 0, {"batch": 0, "tokens": []}, {}, b"not used")
    store.dispose()
    return pg_url


# -- 1. what users and the database wrote is printed as text ---------------------

@pytest.mark.slow
def test_a_run_name_with_markup_prints_as_itself_everywhere(marked_up):
    url, enqueued = marked_up
    assert enqueued.exit_code == 0, enqueued.output
    assert f"RUN_ID 1  ({MARKUP_NAME}: ppo on rosenbrock" in enqueued.output
    for args in (("runs",), ("status",), ("status", "1")):
        result = invoke(*args, "--db", url)
        assert result.exit_code == 0, result.output
        assert MARKUP_NAME in result.output


def test_valid_tags_in_a_name_restyle_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'nos.db'}"
    upgrade(resolve_url(url))
    store = open_store(url)
    with store.transaction() as session:
        create_run(session, "[bold red]boom[/bold red] :smile:", "rosenbrock", small_config())
    store.dispose()
    result = invoke("runs", "--db", url)
    assert result.exit_code == 0
    assert "[bold red]boom[/bold red] :smile:" in result.output
    assert "\x1b[" not in result.output   # no colour codes: the tags were not applied


@pytest.mark.slow
def test_error_text_in_show_prints_as_text_with_control_characters_escaped(marked_up, tmp_path):
    url, _ = marked_up
    copy = tmp_path / "copy.db"
    with contextlib.closing(sqlite3.connect(Path(url.removeprefix("sqlite:///")))) as source, \
            contextlib.closing(sqlite3.connect(copy)) as target:
        source.backup(target)
        rule_id, = target.execute("SELECT rule_id FROM evaluations ORDER BY id LIMIT 1").fetchone()
        target.execute("UPDATE evaluations SET error = ? WHERE rule_id = ?",
                       ("Traceback\nValueError: [/x] [red]bad[/red] \x1b[2J", rule_id))
        target.commit()
    result = invoke("show", str(rule_id), "--db", f"sqlite:///{copy}")
    assert result.exit_code == 0, result.output
    assert "error: ValueError: [/x] [red]bad[/red] \\x1b[2J" in result.output
    assert "\x1b" not in result.output


# -- 2. credentials are masked wherever they are shown or stored -----------------

@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (("--broker", "redis://:SECRET@127.0.0.1:1/10"), "cannot reach the broker at redis://:***@127.0.0.1:1/10"),
    (("--broker", "amqp://u:SECRET@h/"), "got 'amqp://u:***@h/'"),
    (("--broker", "redis://127.0.0.1:6379/0?password=SECRET"),
     "bad broker URL 'redis://127.0.0.1:6379/0?password=***'"),
    (("--db", "postgresql://u:SECRET@h:notaport/db"), "bad database URL 'postgresql://u:***@h:notaport/db'"),
    (("--db", "postgresql://u:SECRET@127.0.0.1:1/db"), "postgresql+psycopg://u:***@127.0.0.1:1/db"),
])
def test_passwords_never_reach_the_output(marked_up, args, message):
    url, _ = marked_up
    before = snapshot(url)
    db = () if "--db" in args else ("--db", url)
    result = invoke("enqueue", "--task", "rosenbrock", *args, *db)
    one_line_error(result, message)
    assert "SECRET" not in result.output
    assert snapshot(url) == before


@pytest.mark.slow
def test_status_masks_the_broker_password(marked_up):
    url, _ = marked_up
    result = invoke("status", "--broker", "redis://:SECRET@127.0.0.1:1/3", "--db", url)
    one_line_error(result, "cannot reach the broker at redis://:***@127.0.0.1:1/3")
    assert "SECRET" not in result.output


def test_the_enqueue_banner_masks_the_broker_password(tmp_path):
    import redis

    index = 1 + uuid.uuid4().int % 15
    client = redis.Redis.from_url(f"redis://127.0.0.1:6379/{index}", socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        unavailable("Redis", f"127.0.0.1:6379 does not answer: {exc}")
    try:
        result = invoke("enqueue", "--task", "rosenbrock", "--budget", "2", "--detach",
                        "--broker", f"redis://:SECRET@127.0.0.1:6379/{index}", "--db", f"sqlite:///{tmp_path}/n.db")
    finally:
        client.flushdb()   # the detached driver's message: no worker here takes it
    assert result.exit_code == 0, result.output
    assert f"Celery at redis://:***@127.0.0.1:6379/{index}" in result.output
    assert "SECRET" not in result.output


def test_stored_errors_are_masked(tmp_path):
    from nos.store import set_run_status

    url = f"sqlite:///{tmp_path / 'nos.db'}"
    upgrade(resolve_url(url))
    store = open_store(url)
    with store.transaction() as session:
        run_id = create_run(session, "r", "rosenbrock", small_config())
        set_run_status(session, run_id, "failed",
                       error="OperationalError: cannot reach redis://:SECRET@h:6379/0 or postgresql://u:PW@h/db")
    store.dispose()
    error = snapshot(url)["runs"][0]["error"]
    assert error == "OperationalError: cannot reach redis://:***@h:6379/0 or postgresql://u:***@h/db"


def test_mask_url_and_mask_credentials():
    from nos.redact import mask_credentials, mask_url

    assert mask_url("redis://:SECRET@127.0.0.1:6379/10") == "redis://:***@127.0.0.1:6379/10"
    assert mask_url(sa.make_url("postgresql://u:S@h/db?password=S")) == "postgresql://u:***@h/db?password=***"
    assert mask_url("redis://:p@ss@h:1/0") == "redis://:***@h:1/0"   # an unescaped '@' in the password
    assert mask_url("postgresql://user@host:5432/db") == "postgresql://user@host:5432/db"
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert mask_credentials("a amqp://u:S@h/ b rediss://:T@k:1") == "a amqp://u:***@h/ b rediss://:***@k:1"


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql//postgres:S3cretPW@127.0.0.1/test", "postgresql//postgres:***@127.0.0.1/test"),   # no ':'
    ("postgresql:/u:S3cretPW@h/db", "postgresql:***@h/db"),
    ("u:S3cretPW@h/db", "u:***@h/db"),
    ("postgresql:u:S3cret@PW@h/db?password=S3cretPW", "postgresql:***@h/db?password=***"),
])
def test_a_url_without_its_scheme_slashes_keeps_its_password_out_of_sight(tmp_path, monkeypatch, url, masked):
    """`_USERINFO` needs `scheme://`: a mistyped URL was quoted whole, password and all."""
    from nos.redact import mask_url

    assert mask_url(url) == masked
    monkeypatch.chdir(tmp_path)
    for command in (("runs",), ("enqueue", "--task", "rosenbrock")):
        result = invoke(*command, "--db", url)
        one_line_error(result, f"bad database URL {masked!r} (it is not a URL)")
        assert "S3cret" not in result.output
    assert list(tmp_path.iterdir()) == []


# -- 7. every bad value is refused before anything is written --------------------

BAD_CONFIGS = [
    (b"task = 5\n", "task must be a string, got 5"),
    (b"task_options = 5\n", "task_options must be a table of options, got 5"),
    (b"\x00\xff\xfe\x89PNG binary", "is not UTF-8 text"),
    (b"[hyperparameters]\nhidden = -1\n", "hyperparameters.hidden must be a whole number from 1 to 4,096, got -1"),
    (b"controller = {hidden = -1}\n", "hyperparameters.hidden must be a whole number"),   # the earlier name
    (b"controller = {}\n[hyperparameters]\n", "controller is the old name of hyperparameters: give one of them"),
    (b"seed = 99999999999999999999\n", "seed must be a whole number from 0 to 4,294,967,295"),
    (b"stale_after = nan\n", "stale_after must be a number of seconds from 0.5 to 10,000,000"),
    (b"stale_after = 1e308\n", "stale_after must be a number of seconds from 0.5"),
    # TOML reads integers of any size: past a float's range they were an OverflowError's traceback.
    (b"stale_after = 1" + b"0" * 400 + b"\n", "stale_after must be a number of seconds from 0.5"),
    (b"[hyperparameters]\nlr = 1" + b"0" * 400 + b"\n", "hyperparameters.lr must be a positive number, at most"),
    (b"[task_options]\nexplode = 1" + b"0" * 400 + b"\n", "task option explode must be a finite number"),
    (b"[task_options]\nlrs = [1" + b"0" * 400 + b"]\n", "task option lrs must be a list"),
    # Claims of live workers were retaken: a heartbeat every millisecond cannot keep up.
    (b"stale_after = 0.002\nheartbeat_every = 0.001\n", "stale_after must be a number of seconds from 0.5"),
    (b"heartbeat_every = 0.05\n", "heartbeat_every must be a number of seconds from 0.1"),
    # The ranges said are the ranges taken (warm_mass was said to go to 1e+06, lr to start at 0).
    (b"[hyperparameters]\nwarm_mass = 2.0\n", "hyperparameters.warm_mass must be a number in [0, 1), got 2.0"),
    (b"[hyperparameters]\nlr = 0\n", "hyperparameters.lr must be a positive number, at most 1e+06, got 0"),
    (b"\xef\xbb\xbfbudget = 0\n", "budget must be a whole number"),   # read past a byte-order mark
    (b"device = 'bogus'\n", "unknown device 'bogus': expected cpu, cuda, cuda:N or mps"),
    (b"name = \"a\\u0000b\"\n", "name must be printable text"),
    (b"[task_options]\ndevice = 'cpu'\n", "device is not a task option"),
    (b"update_every = 1000000000\n", "update_every must be a whole number from 1 to 10,000"),
    (b"batch_size = 0\n", "update_every must be a whole number from 1 to 10,000, got 0 "
                           "(batch_size is the old name of update_every)"),
    (b"batch_size = 4\nupdate_every = 4\n", "batch_size is the old name of update_every"),
    (b"in_flight = 0\n", "in_flight must be a whole number from 1 to 10,000"),
    (b"synchronous = 1\n", "synchronous must be true or false"),
    (b"seed = 1979-05-27\n", "seed must be a whole number"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("content", "message"), BAD_CONFIGS)
def test_bad_config_values_change_nothing(marked_up, tmp_path, content, message):
    url, _ = marked_up
    config = tmp_path / "bad.toml"
    config.write_bytes(content)
    before = snapshot(url)
    one_line_error(invoke("enqueue", "--config", str(config), "--db", url), message)
    assert snapshot(url) == before
    fresh = tmp_path / "fresh.db"
    one_line_error(invoke("enqueue", "--config", str(config), "--db", f"sqlite:///{fresh}"), message)
    assert not fresh.exists()


@pytest.mark.slow
def test_resuming_a_run_stored_with_a_bad_config_says_so(marked_up, tmp_path):
    url, _ = marked_up
    copy = tmp_path / "copy.db"
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as source, \
            contextlib.closing(sqlite3.connect(copy)) as target:
        source.backup(target)
        target.execute("UPDATE runs SET status = 'stopped', "
                       "config = json_set(config, '$.seed', 99999999999999999999.0)")
        target.commit()
    before = snapshot(f"sqlite:///{copy}")
    result = invoke("resume", "1", "--db", f"sqlite:///{copy}")
    one_line_error(result, "run 1 has a config this nos cannot read: seed must be a whole number")
    assert snapshot(f"sqlite:///{copy}") == before


@pytest.mark.slow
def test_ids_beyond_any_stored_one(marked_up, pg_with_a_run):
    url, _ = marked_up
    before = snapshot(url)
    result = invoke("status", "99999999999999999999", "--db", url)
    assert result.exit_code == 2
    assert "is not in the range" in result.output
    assert "Traceback" not in result.output
    assert snapshot(url) == before
    pg_before = snapshot(pg_with_a_run)
    one_line_error(invoke("show", "99999999999", "--db", pg_with_a_run), "rule '99999999999' has not been evaluated")
    one_line_error(invoke("show", "9" * 5000, "--db", pg_with_a_run), "has not been evaluated")
    result = invoke("status", "3000000000", "--db", pg_with_a_run)
    assert result.exit_code == 2
    assert "is not in the range" in result.output
    assert snapshot(pg_with_a_run) == pg_before


@pytest.mark.parametrize(("db", "message"), [
    ("postgresql://u:p@h:notaport/db", "its port is not a number"),
    ("sqlite://nos.db", "bad SQLite URL 'sqlite://nos.db': write sqlite:///nos.db"),
    # a slash too many: PostgreSQL would quote "u:SECRET@h/db" as a database that does not exist
    ("postgresql:///u:SECRET@h/db", "bad PostgreSQL URL 'postgresql:///u:***@h/db': its database name holds"),
    ("postgresql://h/u:SECRET@x", "bad PostgreSQL URL 'postgresql://h/u:***@x'"),
])
def test_malformed_database_urls(tmp_path, monkeypatch, db, message):
    monkeypatch.chdir(tmp_path)
    for command in (("runs",), ("enqueue", "--task", "rosenbrock")):
        result = invoke(*command, "--db", db)
        one_line_error(result, message)
        assert "SECRET" not in result.output
    assert list(tmp_path.iterdir()) == []   # no nos.db (or anything else) created


def test_a_name_with_nul_on_postgresql(pg_with_a_run, tmp_path):
    before = snapshot(pg_with_a_run)
    result = invoke("enqueue", "--task", "rosenbrock", "--name", "a\x00b", "--db", pg_with_a_run)
    assert result.exit_code == 2
    assert "control characters" in result.output
    assert "Traceback" not in result.output
    config = tmp_path / "nul.toml"
    config.write_text('task = "rosenbrock"\nname = "a\\u0000b"\n')
    one_line_error(invoke("enqueue", "--config", str(config), "--db", pg_with_a_run), "name must be printable text")
    assert snapshot(pg_with_a_run) == before


def _read_only(path: Path):
    """Make `path` unwritable, even for root (who ignores file modes): chattr +i there, chmod elsewhere."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        return lambda: path.chmod(0o644)
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a file read-only as root here: {done.stderr.decode().strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.slow
def test_a_read_only_sqlite_file(marked_up, tmp_path):
    url, _ = marked_up
    copy = tmp_path / "ro.db"
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as source, \
            contextlib.closing(sqlite3.connect(copy)) as target:
        source.backup(target)
        target.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = snapshot(f"sqlite:///{copy}")
    restore = _read_only(copy)
    try:
        result = invoke("enqueue", "--task", "rosenbrock", "--budget", "2", "--db", f"sqlite:///{copy}")
        one_line_error(result, f"cannot write to database {copy}")
        one_line_error(invoke("stop", "1", "--db", f"sqlite:///{copy}"), f"cannot write to database {copy}")
    finally:
        restore()
    assert snapshot(f"sqlite:///{copy}") == before


@pytest.mark.parametrize(("args", "message"), [
    (("eval", "g", "--seed", "99999999999999999999"), "is not in the range 0<=x<=4294967295"),
    (("eval", "g", "--device", "bogus"), "unknown device 'bogus': expected cpu, cuda, cuda:N or mps"),
    (("transfer", "g", "--no-baselines", "--device", "bogus"), "unknown device 'bogus'"),
    (("export", "g", "--seed", "-1"), "is not in the range"),
])
def test_eval_transfer_and_export_arguments(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def _stopped_copy(url: str, folder: Path, blob: bytes | None) -> str:
    """A copy of the run's database with run 1 stopped and (blob given) its latest checkpoint's bytes replaced."""
    copy = folder / "resume.db"
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as source, \
            contextlib.closing(sqlite3.connect(copy)) as target:
        source.backup(target)
        target.execute("UPDATE runs SET status = 'stopped', finished_at = NULL")
        if blob is not None:
            target.execute("UPDATE checkpoints SET blob = ? WHERE id = (SELECT max(id) FROM checkpoints)", (blob,))
        target.commit()
    return f"sqlite:///{copy}"


@pytest.mark.slow
@pytest.mark.parametrize("blob", [b"\x00damaged", b"PK\x03\x04 not a zip", b""])
def test_a_damaged_checkpoint_stops_resume_before_the_run_changes(marked_up, tmp_path, blob):
    url, _ = marked_up
    copy = _stopped_copy(url, tmp_path, blob)
    before = snapshot(copy)
    result = invoke("resume", "1", "--db", copy)
    one_line_error(result, "run 1: its checkpoint of step")
    assert "cannot be read" in result.output
    assert "the run cannot resume from it" in result.output
    assert snapshot(copy) == before   # still stopped, not "running"


@pytest.mark.slow
def test_a_driver_that_meets_a_damaged_checkpoint_fails_the_run(marked_up, tmp_path):
    from nos.driver import drive_run
    from nos.resume import CheckpointUnreadable

    url, _ = marked_up
    copy = _stopped_copy(url, tmp_path, b"\x00damaged")
    store = open_store(copy)
    with store.transaction() as session:   # as `nos resume` leaves it for its driver
        set_run_status(session, 1, "running")
    try:
        with pytest.raises(CheckpointUnreadable):
            drive_run(store, 1)
    finally:
        store.dispose()
    run = snapshot(copy)["runs"][0]
    assert run["status"] == "failed"
    assert run["error"].startswith("CheckpointUnreadable: run 1: its checkpoint")


# -- 8. smaller ones ---------------------------------------------------------------

def test_a_mistyped_data_dir_creates_nothing(tmp_path):
    typo = tmp_path / "dtaa" / "fashion"
    result = invoke("eval", "g", "--task", "fashion-mnist", "--data-dir", str(typo))
    assert result.exit_code == 2, result.output
    assert f"the folder {typo} does not exist" in result.output, result.output
    assert not (tmp_path / "dtaa").exists()


@pytest.mark.parametrize(("args", "message"), [
    (("eval", "g", "--lrs", "inf"), "learning rates must be positive, finite numbers"),
    (("eval", "g", "--lrs", "1e-3,nan"), "learning rates must be positive, finite numbers"),
    (("export", "g", "--lr", "inf"), "the learning rate must be positive and finite, got inf"),
    (("export", "g", "--lr", "nan"), "the learning rate must be positive and finite, got nan"),
])
def test_infinite_learning_rates(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output


# Small enough that the commands would finish (or crash) quickly if the grid got through.
_TWICE_COMMANDS = [("eval", "g", "--epochs", "1", "--train-size", "100"),
                   ("transfer", "adam", "--task", "fashion-mnist", "--model", "wrn-10-1", "--epochs", "1",
                    "--seeds", "1", "--train-size", "100", "--no-baselines")]


@pytest.mark.parametrize("command", _TWICE_COMMANDS, ids=["eval", "transfer"])
@pytest.mark.parametrize("lrs", ["0.1,0.01,0.1", "1e-1,0.01,0.10"])
def test_a_learning_rate_given_twice_is_refused(tmp_path, command, lrs):
    """Trials are stored by rate: a rate twice crashed the transfer when its second trial was stored."""
    db = tmp_path / "nos.db"
    result = invoke(*command, "--lrs", lrs, *(("--db", f"sqlite:///{db}") if command[0] == "transfer" else ()))
    one_line_error(result, "Invalid value for '--lrs': learning rates must differ; given more than once: 0.1")
    assert not db.exists()


@pytest.mark.slow
@pytest.mark.parametrize(("content", "message"), [
    (b'depth = "2"\n', "depth must be 1, 2 or 3, got '2'"),
    (b"[task_options]\nlrs = [0.1, 0.01, 0.1]\n", "task option lrs must be a list of 1 to 100 positive, finite "
                                                   "learning rates, each given once"),
    (b'[task_options]\nlrs = "abc"\n', "task option lrs must be a list of 1 to 100 positive, finite learning rates"),
    (b"[task_options]\nlrs = [1e-3, inf]\n", "task option lrs must be a list"),
    (b"[task_options]\nbogus = 1\n", "unknown option 'bogus' for task digits; it takes: batch_size, data_dir"),
    (b"[task_options]\ntrain_size = 'many'\n", "task option train_size must be a whole number"),
    (b"task = 'quadratic'\n[task_options]\ntrain_size = 9000000\ndim = 100\n", "quadratic's data would hold"),
    (b"task = 'ill-conditioned'\n[task_options]\ntemperature = 0\n",
     "task option temperature must be a finite number above 0"),
    (b"task = 'ill-conditioned'\n[task_options]\nhigh = 1e9\n", "task option high must be a number from -30 to 30"),
])
def test_config_messages_name_the_key(marked_up, tmp_path, content, message):
    url, _ = marked_up
    config = tmp_path / "c.toml"
    config.write_bytes(content)
    before = snapshot(url)
    one_line_error(invoke("enqueue", "--config", str(config), "--db", url), message)
    assert snapshot(url) == before


@pytest.mark.slow
def test_leaderboard_of_a_task_without_results(marked_up):
    url, _ = marked_up
    result = invoke("leaderboard", "--task", "typo", "--db", url)
    one_line_error(result, "no task 'typo' has results in this database; tasks with results: rosenbrock")


@pytest.mark.parametrize("command", ["leaderboard", "report"])
def test_top_beyond_any_page(tmp_path, command):
    """A --top past 64 bits overflowed SQLite's LIMIT with a traceback."""
    url, page = f"sqlite:///{tmp_path / 'nos.db'}", tmp_path / "r.html"
    upgrade(resolve_url(url))
    store = open_store(url)
    with store.transaction() as session:
        create_run(session, "r", "rosenbrock", small_config())
    store.dispose()
    before = snapshot(url)
    run = ("1", "-o", str(page)) if command == "report" else ()
    result = invoke(command, *run, "--top", "99999999999999999999", "--db", url)
    one_line_error(result, "Invalid value for '--top': 99999999999999999999 is not in the range")
    assert snapshot(url) == before
    assert not page.exists()


def test_an_empty_csv_leaderboard_has_every_column(tmp_path):
    import csv
    import io
    from dataclasses import fields

    from nos.store import LeaderboardRow

    url = f"sqlite:///{tmp_path / 'nos.db'}"
    upgrade(resolve_url(url))
    result = invoke("leaderboard", "--format", "csv", "--db", url)
    assert result.exit_code == 0
    header, = list(csv.reader(io.StringIO(result.output)))
    assert header == [f.name for f in fields(LeaderboardRow)]
    assert len(header) == 13


@pytest.mark.slow
def test_the_search_batch_has_an_upper_bound(marked_up):
    url, _ = marked_up
    before = snapshot(url)
    result = invoke("enqueue", "--task", "rosenbrock", "--update-every", "100000000", "--budget", "100000000",
                    "--db", url)
    one_line_error(result, "update_every must be a whole number from 1 to 10,000, got 100000000")
    assert snapshot(url) == before


class _Planted:
    """A pickle that, fully unpickled, would create a file: what a crafted data file could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_cifar10_batches_are_read_as_data_never_as_code(tmp_path):
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    planted = tmp_path / "planted"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.zeros((4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3],
                 "note": _Planted(planted) if name == "data_batch_3" else "ok"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    result = invoke("eval", "g", "--task", "cifar10", "--data-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert f"{folder / 'data_batch_3'} is not a CIFAR-10 python batch (UnpicklingError: it names" in result.output
    assert not planted.exists()


# -- 9. a fresh machine's test command ---------------------------------------------

@pytest.mark.parametrize(("require", "outcome"), [("", "1 skipped"), ("1", "1 failed")])
def test_the_stacked_fashion_mnist_test_skips_without_the_data(tmp_path, require, outcome):
    """The test run on a machine without Debian's Fashion-MNIST: skipped, or failed where CI requires it."""
    node = "tests/test_protocol.py::test_stacked_children_train_as_the_sequential_ones_do[fashion-mnist-rules1]"
    script = ("import pathlib, sys, pytest, nos.tasks.data as data; "
              "data.DEBIAN_FASHION_MNIST = pathlib.Path(sys.argv[1]); "
              "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', sys.argv[2]]))")
    env = {k: v for k, v in os.environ.items() if k not in ("NOS_DATA_DIR", "NOS_REQUIRE_SERVICES")}
    env.update(HOME=str(tmp_path), NOS_REQUIRE_SERVICES=require)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "no-such-package"), node], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert outcome in done.stdout, done.stdout + done.stderr
    assert not (tmp_path / ".cache").exists()   # nothing was downloaded


# -- 10. stored values of a shape nos never writes ----------------------------------
# A hand edit or another tool can leave any value in a SQLite column, and any JSON in a PostgreSQL one: the
# commands that read a run name the run and the column (exit 2), `nos runs` lists the other runs, and nothing
# stored changes.

def _damaged_copy(url: str, folder: Path, statement: str) -> str:
    """A copy of the searched database with a sound second run, then `statement` applied to it."""
    copy = folder / "damaged.db"
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as source, \
            contextlib.closing(sqlite3.connect(copy)) as target:
        source.backup(target)
        target.execute("INSERT INTO runs (name, status, task, config, created_at, updated_at) "
                       "SELECT 'sound', status, task, config, created_at, updated_at FROM runs WHERE id = 1")
        target.execute(statement)
        target.commit()
    return f"sqlite:///{copy}"


def _run_readers_refuse(url: str, folder: Path, message: str, commands=("status", "report", "plot")) -> None:
    """Each of `commands` on run 1 stops with `message`, and writes no page or picture."""
    page, picture = folder / "r.html", folder / "p.png"
    arguments = {"status": ("status", "1"), "report": ("report", "1", "-o", str(page)),
                 "plot": ("plot", "1", "-o", str(picture))}
    for command in commands:
        one_line_error(invoke(*arguments[command], "--db", url), message)
    assert not page.exists() and not picture.exists()


@pytest.mark.slow
@pytest.mark.parametrize(("config", "message"), [
    ("'[1, 2]'", "run 1 is damaged in the database: runs.config holds [1, 2], not a JSON object"),
    ("'not json'", "run 1 is damaged in the database: runs.config is not valid JSON"),
], ids=["array", "not-json"])
def test_a_run_config_of_another_shape(marked_up, tmp_path, config, message):
    url, _ = marked_up
    copy = _damaged_copy(url, tmp_path, f"UPDATE runs SET config = {config} WHERE id = 1")
    before = snapshot(copy)
    _run_readers_refuse(copy, tmp_path, message)
    listed = invoke("runs", "--db", copy)
    assert listed.exit_code == 0, listed.output
    assert "sound" in listed.output          # the other run is listed as ever
    assert message in listed.output.splitlines()   # and the damaged one is named under the table
    board = invoke("leaderboard", "--run", "1", "--db", copy)   # the board reads no column of the run
    assert board.exit_code == 0, board.output
    assert snapshot(copy) == before


def test_a_run_config_of_another_shape_on_postgresql(pg_with_a_run, tmp_path):
    engine = sa.create_engine(resolve_url(pg_with_a_run))
    try:
        with engine.begin() as connection:   # PostgreSQL's JSON type takes any JSON
            connection.execute(sa.text("UPDATE runs SET config = '[1, 2]'"))
    finally:
        engine.dispose()
    before = snapshot(pg_with_a_run)
    message = "run 1 is damaged in the database: runs.config holds [1, 2], not a JSON object"
    _run_readers_refuse(pg_with_a_run, tmp_path, message)
    listed = invoke("runs", "--db", pg_with_a_run)
    assert listed.exit_code == 0, listed.output
    assert message in listed.output.splitlines()
    assert snapshot(pg_with_a_run) == before


@pytest.mark.slow
@pytest.mark.parametrize(("change", "problem"), [
    ("created_at = 'garbage'", "evaluations.created_at of evaluation {} cannot be read "
                               "(Invalid isoformat string: 'garbage')"),
    ("reward = 'abc'", "evaluations.reward of evaluation {} holds 'abc', not a number"),
    # SQLite reads 9e999 as an infinity, which nos never stores: JSON would have carried it as `Infinity`
    ("reward = 9e999", "evaluations.reward of evaluation {} holds inf, not a finite number"),
], ids=["datetime", "text-in-real", "infinite"])
def test_an_evaluation_value_of_another_type(marked_up, tmp_path, change, problem):
    url, _ = marked_up
    # The run's last evaluation: the one damaged value is found among the others, not merely the first row.
    copy = _damaged_copy(url, tmp_path, f"UPDATE evaluations SET {change} "
                                        "WHERE id = (SELECT max(id) FROM evaluations WHERE run_id = 1)")
    with contextlib.closing(sqlite3.connect(copy.removeprefix("sqlite:///"))) as db:
        last, = db.execute("SELECT max(id) FROM evaluations WHERE run_id = 1").fetchone()
    before = snapshot(copy)
    message = f"run 1 is damaged in the database: {problem.format(last)}"
    # `nos status` and `nos runs` read the run's best reward (SQL's max, which an infinity or text wins).
    _run_readers_refuse(copy, tmp_path, message,
                        commands=("status", "report", "plot") if "reward" in change else ("report", "plot"))
    if "reward" in change:   # the board reads the reward too, whatever the format
        for fmt in ("table", "json"):
            one_line_error(invoke("leaderboard", "--format", fmt, "--db", copy), message)
        listed = invoke("runs", "--db", copy)
        assert listed.exit_code == 0, listed.output
        assert message in listed.output.splitlines() and "sound" in listed.output   # the other run listed
    assert snapshot(copy) == before


_EARLIER_CHECKPOINT = ("INSERT INTO checkpoints (run_id, step, state, rng_state, created_at) "
                       "SELECT run_id, step - 1, {}, rng_state, created_at FROM checkpoints ORDER BY step LIMIT 1")


@pytest.mark.slow
@pytest.mark.parametrize(("statement", "message"), [
    (_EARLIER_CHECKPOINT.format("'[1, 2]'"), "its checkpoint of step -1 cannot be read (its state is not a table)"),
    (_EARLIER_CHECKPOINT.format("'not json'"), "its checkpoint of step -1 cannot be read (its state is not JSON)"),
    (_EARLIER_CHECKPOINT.format("'{\"updates\": 5}'"),
     "its checkpoint of step -1 cannot be read (its updates are not rows of evaluation ids)"),
    ("UPDATE checkpoints SET rng_state = 'not json'", "its latest checkpoint cannot be read (its JSON is damaged)"),
], ids=["earlier-array", "earlier-not-json", "earlier-updates", "latest-not-json"])
def test_a_checkpoint_of_another_shape_stops_resume_before_the_run_changes(marked_up, tmp_path, statement, message):
    """The asynchronous driver reads every checkpoint's recorded updates back, not only the latest's: a damaged
    earlier one passed `nos resume`'s check, then failed the run."""
    url, _ = marked_up
    copy = _stopped_copy(url, tmp_path, None)
    with contextlib.closing(sqlite3.connect(copy.removeprefix("sqlite:///"))) as db:
        db.execute(statement)
        db.commit()
    before = snapshot(copy)
    one_line_error(invoke("resume", "1", "--db", copy), f"run 1: {message}; the run cannot resume from it")
    assert snapshot(copy) == before   # still stopped, not failed
