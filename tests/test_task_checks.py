"""The check a task of your own passes before anything trains: what the sweep runs, tried first.

Each child here passed the one training batch the check used to try, then failed every evaluation
(or trained what nobody asked for): the check now refuses it in one line, or trains it another way.
"""

from __future__ import annotations

import uuid

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn.utils import parametrizations

import nos
from nos.cli.main import cli
from nos.control import RunRefused
from nos.tasks import TaskFactoryError, evaluate_rule, from_tensors, get_task
from nos.tasks.checks import TargetScaleWarning, UnfitTask, check_task

# As the stacked-against-sequential tests allow (tests/test_protocol.py).
CLOSE = 0.02

TASK_FILE = '''
import torch
from sklearn.datasets import load_diabetes
from torch import nn

from nos.tasks import from_tensors, task_factory


def _points():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    return x, (x[:, 0] > 0).long()


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.net(x)}


@task_factory
def dict_out(*, device="cpu", **protocol):
    x, y = _points()
    return from_tensors(x, y, DictOut, device=device, **protocol)


@task_factory
def swallow(*, device="cpu", **options):
    x, y = _points()
    return from_tensors(x, y, lambda: nn.Linear(4, 2), device=device)   # **options never passed on


@task_factory
def diabetes(*, device="cpu", standardized=False, **protocol):
    data = load_diabetes()
    x = torch.tensor(data.data[:200], dtype=torch.float32)
    y = torch.tensor(data.target[:200], dtype=torch.float32).unsqueeze(1)   # 25 to 346
    if standardized:
        y = (y - y.mean(0)) / y.std(0)
    return from_tensors((x - x.mean(0)) / x.std(0), y, lambda: nn.Linear(10, 1), objective="mse", device=device,
                        **protocol)
'''


@pytest.fixture
def tasks_module(tmp_path, monkeypatch) -> str:
    name = f"checked_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(TASK_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _points(n=200):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return x, (x[:, 0] > 0).long()


def _task(make_child, **protocol):
    x, y = _points()
    return from_tensors(x, y, make_child, lrs=[1e-2, 1e-1], epochs=2, **protocol)


def _spectral():
    return nn.Sequential(parametrizations.spectral_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 2))


class Counter(nn.Module):
    """Counts its training calls in a buffer, in place: a scalar per child once stacked."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return self.layer(x)


class FixedBatch(nn.Module):
    """A batch size written into the forward: every training batch fits, the validation set does not."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, x):
        return self.layer(x.view(32, 4))


def test_a_child_vmap_cannot_stack_trains_one_rate_at_a_time():
    task = check_task(_task(_spectral))   # spectral_norm's power iteration has no batching rule
    assert not task.stacks
    assert 0.5 < evaluate_rule("adam", task, seed=0).reward <= 1
    with pytest.raises(UnfitTask, match="the child cannot train stacked .*RuntimeError: .*: leave stacked unset"):
        check_task(_task(_spectral, stacked=True))


def test_a_child_that_updates_a_scalar_buffer_in_place_trains_stacked_as_alone():
    task = check_task(_task(Counter))
    assert task.stacks
    stacked, alone = evaluate_rule("adam", task, seed=0), evaluate_rule("adam", _task(Counter, stacked=False), seed=0)
    assert stacked.best_lr == alone.best_lr
    assert abs(stacked.reward - alone.reward) <= CLOSE


def test_a_child_that_cannot_score_a_validation_chunk_is_refused():
    with pytest.raises(UnfitTask, match=r"the child cannot score 40 validation examples in eval mode \(they are "
                                        r"scored in chunks of up to 256\): RuntimeError: .*any size"):
        check_task(_task(FixedBatch))


def test_a_child_that_returns_a_dict_is_refused_in_one_line(tasks_module, tmp_path):
    listed = CliRunner().invoke(cli, ["tasks", f"{tasks_module}:dict_out"])
    assert listed.exit_code == 2, listed.output
    assert listed.output.strip().splitlines() == [
        f"Error: task '{tasks_module}:dict_out': the child returns a dict, not a tensor of scores: wrap a model that "
        "returns a dict or tuple so that its forward returns the tensor (return model(x)[\"logits\"], say)"]
    db = tmp_path / "runs.db"
    with pytest.raises(RunRefused, match="the child returns a dict, not a tensor"):
        nos.run_search(task=f"{tasks_module}:dict_out", budget=2, db=f"sqlite:///{db}", progress=False)
    assert not db.exists()


@pytest.mark.parametrize("options, message", [
    ({"epochs": 1}, "was given epochs=1 but returned a Task with epochs=5: pass the options it takes"),
    ({"lrs": [0.01, 0.1]}, r"was given lrs=\[0.01, 0.1\] but returned a Task with lrs=\[1e-05, "),
    ({"train_size": 50}, "was given train_size=50 but returned a Task with 120 training examples"),
    ({"batch_size": 8}, "was given batch_size=8 but returned a Task with batch_size=32"),
])
def test_a_factory_that_ignores_a_protocol_option_it_was_given_is_refused(tasks_module, options, message):
    with pytest.raises(TaskFactoryError, match=f"task '{tasks_module}:swallow' {message}"):
        get_task(f"{tasks_module}:swallow", **options)
    assert get_task(f"{tasks_module}:swallow").epochs == 5   # nothing given, nothing ignored


def test_unscaled_regression_targets_are_warned_about(tasks_module, recwarn):
    with pytest.warns(TargetScaleWarning, match=r"predicting the training targets' mean scores 0.000\d+ .*standardize"):
        get_task(f"{tasks_module}:diabetes")
    recwarn.clear()
    task = get_task(f"{tasks_module}:diabetes", standardized=True)
    assert not [w for w in recwarn if issubclass(w.category, TargetScaleWarning)]
    assert 0.3 < task.objective.baseline(task.splits) < 1
