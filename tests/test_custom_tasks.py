"""Tasks of your own: factories named package.module:function, and tasks an installed package registers.

The task files are real modules written to a folder on sys.path; the registered task comes from a
real wheel installed by pip into a folder that the `nos` subprocesses find on PYTHONPATH.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from nos.cli.main import cli
from nos.config import SearchConfig
from nos.tasks import TaskFactoryError, UnknownTask, evaluate_rule, get_task
from nos.work import task_for

TASK_FILE = '''
import torch
from torch import nn

from nos.tasks import from_tensors, task_factory


@task_factory
def blobs(*, device="cpu", train_size=None, width=8, split_seed=0, **protocol):
    g = torch.Generator().manual_seed(split_seed)
    x = torch.randn(400, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return from_tensors(x, y, lambda: nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2)),
                        val_size=100, test_size=100, train_size=train_size, split_seed=split_seed, device=device,
                        **protocol)


@task_factory
def same_blobs(**options):
    return blobs(**options)


@task_factory
def plain(width=8):
    return blobs(width=width)


def unmarked(**options):
    return blobs(**options)


@task_factory
def broken(**options):
    raise RuntimeError("no data today")


@task_factory
def not_a_task(**options):
    return [1, 2]


@task_factory
def odd_default(*, device="cpu", dtype=torch.float64):
    return blobs(device=device)


def _points(n=300):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] > 0).long()


@task_factory
def child_of(*, child="ok", device="cpu", **protocol):
    x, y = _points()
    shared = nn.Linear(4, 2)
    frozen = nn.Linear(4, 2).requires_grad_(False)
    make = {"ok": lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
            "too_wide": lambda: nn.Linear(7, 2),
            "frozen": lambda: nn.Linear(4, 2).requires_grad_(False),
            "parameterless": lambda: nn.ReLU(),
            "one_output": lambda: nn.Linear(4, 1),
            "the_same": lambda: shared,
            "detached": lambda: nn.Sequential(frozen, nn.Linear(2, 2).requires_grad_(False)),
            "dropout": lambda: nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2)),
            "drawing": lambda: Drawing()}[child]
    return from_tensors(x, y, make, device=device, **protocol)


class Drawing(nn.Module):
    """Random draws in a forward of its own (no dropout layer to see)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.nn.functional.dropout(self.a(x).relu(), 0.3, self.training))


@task_factory
def data_of(*, kind="nan", device="cpu", **protocol):
    x, y = _points()
    if kind == "nan":
        x[5, 1] = float("nan")
        return from_tensors(x, y, lambda: nn.Linear(4, 2), device=device, **protocol)
    if kind == "labels":
        return from_tensors(x, y * 3, lambda: nn.Linear(4, 2), device=device, **protocol)
    if kind == "flat_targets":   # one output per example against targets of shape (N,): would broadcast to (N, N)
        return from_tensors(x, x[:, 0], lambda: nn.Linear(4, 1), objective="mse", device=device, **protocol)
    return from_tensors(x, x[:, :1], lambda: nn.Linear(4, 1), objective="mse", device=device, **protocol)


class FailsAfterOneBatch(nn.Module):
    """Takes one batch (the start-up check's), then fails every training step: a bug only training finds."""

    def __init__(self):
        super().__init__()
        self.layer, self.calls = nn.Linear(4, 2), 0

    def forward(self, x):
        self.calls += 1
        if self.training and self.calls > 1:
            raise RuntimeError("out of memory, say")
        return self.layer(x)


@task_factory
def fails_in_training(*, device="cpu", **protocol):
    x, y = _points()
    return from_tensors(x, y, FailsAfterOneBatch, device=device, **protocol)


@task_factory
def only_in_the_driver(*, device="cpu", **protocol):
    import multiprocessing

    if multiprocessing.current_process().name == "nos-worker":
        raise RuntimeError("the data is not here")
    return blobs(device=device, **protocol)


@task_factory
def chatty(**options):
    print("loading my data...")
    return blobs(**options)


@task_factory
def exits(**options):
    raise SystemExit(0)


@task_factory
def named_like_builtins(*, hidden=(8, 8), classes=1, noise=-0.5, val_size=0.25, name="mine", device="cpu",
                        **protocol):
    x, y = _points()
    return from_tensors(x, y, lambda: nn.Sequential(nn.Linear(4, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], 2)),
                        val_size=val_size, device=device, **protocol)
'''


@pytest.fixture
def tasks_module(tmp_path, monkeypatch) -> str:
    """The name of a fresh module holding TASK_FILE's factories, importable from sys.path."""
    name = f"own_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(TASK_FILE)
    (tmp_path / f"{name}_boom.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_factory_builds_its_task_under_its_own_name(tasks_module):
    task = get_task(f"{tasks_module}:blobs", train_size=150, lrs=[0.1], epochs=2)
    assert task.name == f"{tasks_module}:blobs"
    assert task.splits.sizes == {"train": 150, "val": 100, "test": 100}
    assert task.options == {"train_size": 150, "width": 8, "split_seed": 0, "lrs": [0.1], "epochs": 2}
    assert (task.lrs, task.epochs) == ((0.1,), 2)
    result = evaluate_rule("adam", task, seed=0)
    assert result.task == task.name
    assert 0.5 < result.reward <= 1


def test_the_task_key_holds_the_factory_name_and_every_option(tasks_module):
    def key(name, **options):
        return get_task(f"{tasks_module}:{name}", lrs=[0.1], **options).config_key()

    assert key("blobs") == key("blobs", width=8)                # a default given or not: the same task
    assert key("blobs") != key("blobs", width=16)
    assert key("blobs") != key("blobs", split_seed=1)
    assert key("blobs") != key("same_blobs")                    # the same data under another name: apart


def test_protocol_knobs_a_factory_does_not_take_are_applied_to_its_task(tasks_module):
    task = get_task(f"{tasks_module}:plain", width=4, epochs=3, lrs=[0.01, 0.1], sweep="halving")
    assert (task.epochs, task.lrs, task.sweep) == (3, (0.01, 0.1), "halving")
    assert task.options == {"width": 4, "epochs": 3, "lrs": [0.01, 0.1], "sweep": "halving"}


@pytest.mark.parametrize("attribute, error, message", [
    ("nowhere_at_all:blobs", UnknownTask, "no module named 'nowhere_at_all'"),
    ("{m}:missing", UnknownTask, "has no 'missing'"),
    ("{m}.py:blobs", UnknownTask, "name a module, not a file: run nos from the file's folder (or put that folder "
                                  "on PYTHONPATH) and use {m}:blobs"),
    ("./sub dir/{m}.py:blobs", UnknownTask, "name a module, not a file"),
    ("{m}_boom:blobs", TaskFactoryError, "raised ZeroDivisionError"),
    ("{m}:unmarked", TaskFactoryError, "not marked as a task factory"),
    ("shutil:rmtree", TaskFactoryError, "not marked as a task factory"),   # a stored name calls no arbitrary code
    ("os:sep", TaskFactoryError, "is a str, not a function"),
    ("{m}:broken", TaskFactoryError, "raised RuntimeError: no data today"),
    ("{m}:not_a_task", TaskFactoryError, "returned a list, not a nos.tasks.Task"),
    ("{m}:odd_default", TaskFactoryError, "option dtype's value torch.float64 is not plain data"),
    ("{m}:plain", ValueError, "unknown option 'hidden' for task"),
    ("{m}:blobs", TaskFactoryError, "task '{m}:blobs': option 'widht' (did you mean 'width'?) is neither its own "
                                    "(train_size, width, split_seed) nor the protocol's (batch_size, lrs"),
    ("{m}:blobs", ValueError, "task option train_size must be a whole number"),
])
def test_a_factory_that_cannot_build_says_why(tasks_module, attribute, error, message):
    options = {"hidden": 3} if attribute.endswith(":plain") else {"widht": 4} if "neither its own" in message \
        else {"train_size": "many"} if attribute.endswith(":blobs") and "boom" not in attribute \
        and "nowhere" not in attribute else {}
    with pytest.raises(error, match=re.escape(message.format(m=tasks_module))):
        get_task(attribute.format(m=tasks_module), **options)


@pytest.mark.parametrize("options, message", [
    ({"child": "too_wide"}, "the child cannot take a batch of the training inputs (shape (32, 4), torch.float32): "
                            "RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ({"child": "frozen"}, "the child has no trainable parameters"),
    ({"child": "parameterless"}, "the child has no trainable parameters"),
    ({"child": "one_output"}, "the labels run from 0 to 1, but the child outputs 1 scores per example"),
    ({"child": "the_same"}, "make_child returned the same network twice"),
    ({"kind": "nan"}, "the train x data holds NaN or infinite values"),
    ({"kind": "labels"}, "the labels run from 0 to 3, but the child outputs 2 scores per example"),
    ({"kind": "flat_targets"}, "the child outputs shape (32, 1) for targets of shape (32,): give the targets"),
    ({"child": "drawing", "stacked": True}, "the child draws random numbers while training"),
])
def test_a_child_that_cannot_train_is_refused_before_anything_trains(tasks_module, options, message):
    factory = "data_of" if "kind" in options else "child_of"
    with pytest.raises(TaskFactoryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_task(f"{tasks_module}:{factory}", **options)


def test_a_child_that_draws_random_numbers_trains_one_rate_at_a_time(tasks_module):
    import torch

    from nos.tasks.checks import check_task

    for child in ("dropout", "drawing"):
        task = get_task(f"{tasks_module}:child_of", child=child, lrs=[0.01, 0.1], epochs=1)
        assert not task.stacks
        torch.manual_seed(7)
        check_task(task)
        after_check = torch.rand(())
        torch.manual_seed(7)
        assert after_check == torch.rand(())   # the check's draws left no trace
        result = evaluate_rule("adam", task, seed=0)   # a stack would raise vmap's randomness error
        assert 0.5 < result.reward <= 1
        again = evaluate_rule("adam", task, seed=0)   # each child's draws follow from the seed
        assert (again.reward, again.test_acc, again.best_lr) == (result.reward, result.test_acc, result.best_lr)
        afresh = evaluate_rule("adam", task, seed=0, reuse_sweep=False)   # whatever trained in between
        assert (afresh.reward, afresh.test_acc) == (result.reward, result.test_acc)
    assert get_task(f"{tasks_module}:child_of").stacks   # the same child without dropout stacks
    assert 0 < evaluate_rule("adam", get_task(f"{tasks_module}:data_of", kind="columns", lrs=[0.1])).reward <= 1


def test_a_factorys_own_options_are_its_own_whatever_their_names(tasks_module):
    """Names the built-in tasks check (hidden, classes, noise, val_size) mean what the factory says; a
    factory may even take `name`. The options nos gives a meaning to are still checked."""
    task = get_task(f"{tasks_module}:named_like_builtins", hidden=[16, 16], classes=1, noise=-0.5,
                    val_size=0.3, name="yours")
    assert task.splits.sizes["val"] == 90
    assert task.options["name"] == "yours"
    with pytest.raises(ValueError, match="task option epochs must be a whole number"):
        get_task(f"{tasks_module}:named_like_builtins", epochs=0)


def test_a_search_config_names_a_factory_and_workers_build_it_by_that_name(tasks_module):
    config = SearchConfig.from_dict({"task": f"{tasks_module}:blobs", "task_options": {"width": 4, "lrs": [0.1]}})
    task = task_for(config)
    assert task.name == f"{tasks_module}:blobs"
    assert task.options["width"] == 4


def test_nos_eval_takes_a_factory_and_refuses_a_broken_one_with_exit_2(tasks_module):
    ok = CliRunner().invoke(cli, ["eval", "adam", "--task", f"{tasks_module}:blobs", "--lrs", "1e-2,1e-1",
                                  "--epochs", "1"])
    assert ok.exit_code == 0, ok.output
    assert f"adam on {tasks_module}:blobs" in ok.output
    broken = CliRunner().invoke(cli, ["eval", "adam", "--task", f"{tasks_module}:broken"])
    assert broken.exit_code == 2
    assert "raised RuntimeError: no data today" in broken.output


@pytest.mark.parametrize("factory, message", [
    ("broken", "no data today"), ("not_a_task", "not a nos.tasks.Task"), ("unmarked", "not marked"),
])
def test_enqueue_refuses_a_factory_that_fails_and_stores_nothing(tasks_module, tmp_path, factory, message):
    db = tmp_path / "runs.db"
    result = CliRunner().invoke(cli, ["enqueue", "--task", f"{tasks_module}:{factory}", "--budget", "2",
                                      "--db", f"sqlite:///{db}"])
    assert result.exit_code == 2
    assert message in result.output
    assert not db.exists()


def test_a_task_file_in_the_current_folder_is_found(tmp_path, monkeypatch):
    name = f"here_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(TASK_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert get_task(f"{name}:blobs", lrs=[0.1]).name == f"{name}:blobs"


def test_nos_transfer_trains_the_factorys_own_child_and_a_wide_resnet_only_on_images(tasks_module, tmp_path):
    common = ["sgd", "--task", f"{tasks_module}:blobs", "--epochs", "1", "--seeds", "1", "--lrs", "0.1",
              "--no-baselines", "--db", f"sqlite:///{tmp_path / 'transfer.db'}"]
    trained = CliRunner().invoke(cli, ["transfer", *common, "--format", "json"])
    assert trained.exit_code == 0, trained.output
    assert '"model": "own child"' in trained.stdout
    assert f'"name": "{tasks_module}:blobs"' in trained.stdout
    refused = CliRunner().invoke(cli, ["transfer", *common, "--model", "wrn-10-1"])
    assert refused.exit_code == 2
    assert "a Wide ResNet reads images" in refused.output


def test_nos_tasks_describes_a_factory_and_refuses_an_unknown_one(tasks_module):
    listed = CliRunner().invoke(cli, ["tasks", f"{tasks_module}:blobs", "digits"])
    assert listed.exit_code == 0, listed.output
    squashed = " ".join(listed.output.split())
    assert "200 / 100 / 100" in squashed
    assert "Linear 4-8, ReLU, Linear 8-2" in squashed
    assert "1,200 / 300 / 297" in squashed
    unknown = CliRunner().invoke(cli, ["tasks", "mnist"])
    assert unknown.exit_code == 2
    assert "unknown task 'mnist'" in unknown.output


# --- a task registered by an installed package (entry-point group nos.tasks) ---

PLUGIN = "nos_plugin_blobs"
PLUGIN_MODULE = TASK_FILE.replace("def blobs(", "def blobs_factory(").replace("return blobs(", "return blobs_factory(")


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build_wheel(folder: Path) -> Path:
    """A wheel of the package `nos_plugin_blobs` that registers `plugin-blobs` and `Plugin_Broken` under nos.tasks."""
    info = f"{PLUGIN}-0.1.dist-info"
    files = {
        f"{PLUGIN}/__init__.py": PLUGIN_MODULE.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 0.1\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: nos-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": textwrap.dedent(f"""\
            [nos.tasks]
            plugin-blobs = {PLUGIN}:blobs_factory
            plugin-broken = {PLUGIN}:broken
            """).encode(),
    }
    record = [_record_line(path, data) for path, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{PLUGIN}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """A folder pip installed the plugin's wheel into (with its .dist-info), as a site-packages."""
    folder = tmp_path_factory.mktemp("plugin")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                                "--target", str(folder / "site"), str(build_wheel(folder))],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert (folder / "site" / f"{PLUGIN}-0.1.dist-info" / "entry_points.txt").is_file()
    return folder / "site"


def nos_with(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "250"}   # table cells on one line
    return subprocess.run([sys.executable, "-m", "nos.cli.main", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_a_registered_task_is_listed_in_the_help_and_by_nos_tasks(plugin_site):
    helped = nos_with(plugin_site, "eval", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "plugin-blobs" in "".join(helped.stdout.split())   # click wraps lines after a hyphen
    listed = nos_with(plugin_site, "tasks", "plugin-blobs")
    assert listed.returncode == 0, listed.stderr
    squashed = " ".join(listed.stdout.split())
    assert "200 / 100 / 100" in squashed   # its default train_size: everything the splits leave
    assert f"{PLUGIN}:blobs_factory" in squashed


def test_a_registered_task_evaluates_by_its_name_and_a_broken_one_exits_2(plugin_site):
    evaluated = nos_with(plugin_site, "eval", "sgd", "--task", "Plugin_Blobs", "--lrs", "0.1", "--epochs", "1",
                         "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert '"task": "plugin-blobs"' in evaluated.stdout
    broken = nos_with(plugin_site, "eval", "sgd", "--task", "plugin-broken")
    assert broken.returncode == 2
    assert "raised RuntimeError: no data today" in broken.stderr


def test_a_resume_warns_when_the_task_no_longer_builds_what_the_run_trained_on(tasks_module, sqlite_store):
    """An edited factory (here: another width) would silently mix two tasks' rewards in one search."""
    from nos import control
    from nos.rules import parse
    from nos.store import NewEvaluation, RuleRecord, create_run, enqueue_batch, get_or_create_rules
    from nos.work import task_key

    def config(width):
        return SearchConfig.from_dict({"task": f"{tasks_module}:blobs", "task_options": {"width": width}})

    before = config(8)
    with sqlite_store.transaction() as session:
        run_id = create_run(session, "edited", before.task, before.to_dict())
        rule_id, = get_or_create_rules(session, [RuleRecord.from_tree(parse("adam"))])
        enqueue_batch(session, run_id, 0, [NewEvaluation(rule_id, before.task,
                                                         task_key(task_for(before), before.children_seed))])
    assert control.changed_task(sqlite_store, run_id, before) is None
    warning = control.changed_task(sqlite_store, run_id, config(16))
    assert warning.startswith(f"run {run_id}'s task {tasks_module}:blobs no longer builds the task its evaluations")


def _enqueue(folder, task: str, budget: int, db: str) -> subprocess.CompletedProcess:
    """`nos enqueue` of `task` with one local worker, in a process that finds the task file in `folder`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nos.cli.main", "enqueue", "--task", task, "--budget", str(budget),
                           "--workers", "1", "--db", db], capture_output=True, text=True, timeout=300, env=env,
                          cwd=folder)


def test_a_search_whose_evaluations_all_fail_stops_instead_of_spending_its_budget(tasks_module, tmp_path):
    from nos.driver import FAILING_START
    from nos.store import open_store
    from nos.store.models import Evaluation, Run

    db = f"sqlite:///{tmp_path / 'failing.db'}"
    done = _enqueue(tmp_path, f"{tasks_module}:fails_in_training", 30, db)
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"run 1 failed: \d+ evaluations failed and none trained \(the last: RuntimeError: out of "
                     r"memory, say\); fix the cause, then `nos resume 1`", done.stderr), done.stderr
    store = open_store(db)
    with store.reading() as session:
        assert session.get(Run, 1).status == "failed"
        statuses = [e.status for e in session.query(Evaluation).filter(Evaluation.run_id == 1)]
    store.dispose()
    assert FAILING_START <= statuses.count("failed") < 30
    assert "done" not in statuses


def test_a_small_budget_that_all_fails_fails_the_run_instead_of_completing_it(tasks_module, tmp_path):
    """Under FAILING_START evaluations in all: it ended `completed`, exit status 0, no word of a failure."""
    db = f"sqlite:///{tmp_path / 'small.db'}"
    done = _enqueue(tmp_path, f"{tasks_module}:fails_in_training", 3, db)
    assert done.returncode == 1, done.stdout + done.stderr
    assert ("run 1 failed: 3 evaluations failed and none trained (the last: RuntimeError: out of memory, say); fix "
            "the cause, then start the search again with `nos enqueue` (this run's budget is spent)") in done.stderr
    status = subprocess.run([sys.executable, "-m", "nos.cli.main", "status", "1", "--db", db], capture_output=True,
                            text=True, timeout=60)
    assert "failed, 3/3 evaluations finished" in status.stdout
    assert "  failed: SearchStuck: 3 evaluations failed and none trained" in status.stdout


def test_a_local_search_whose_workers_cannot_build_the_task_fails_at_once(tasks_module, tmp_path):
    """Left queued for another worker, as a Celery worker does, the evaluation would wait for ever: every
    local worker is alike."""
    done = _enqueue(tmp_path, f"{tasks_module}:only_in_the_driver", 4, f"sqlite:///{tmp_path / 'refused.db'}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot be built here" in done.stderr and "the data is not here" in done.stderr
    # One line, the worker's reason in it (it was a traceback saying the reason was "logged above") ...
    line = (f"Error: run 1 failed: a local worker refused the run's evaluations: its {tasks_module}:only_in_the_driver "
            f"task cannot be built here: task '{tasks_module}:only_in_the_driver' raised RuntimeError: the data is "
            "not here; the workers import")
    assert line in done.stderr and "Traceback" not in done.stderr, done.stderr
    # ... and stored as the run's error, which `nos status` shows.
    from nos.store import open_store
    from nos.store.models import Run

    store = open_store(f"sqlite:///{tmp_path / 'refused.db'}")
    with store.reading() as session:
        assert "raised RuntimeError: the data is not here" in session.get(Run, 1).error
    store.dispose()


def test_what_a_factory_prints_stays_out_of_json_and_its_exit_is_an_error(tasks_module):
    import json

    done = CliRunner().invoke(cli, ["eval", "adam", "--task", f"{tasks_module}:chatty", "--lrs", "0.1", "--epochs",
                                    "1", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["rule"] == "adam"
    assert "loading my data..." in done.stderr
    ended = CliRunner().invoke(cli, ["eval", "adam", "--task", f"{tasks_module}:exits"])
    assert ended.exit_code == 2
    assert "raised SystemExit: 0" in ended.output
