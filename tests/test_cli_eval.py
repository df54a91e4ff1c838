"""`nos eval`: a table and a reward for good input, exit status 2 and one clear line for bad input."""

from __future__ import annotations

import json

from click.testing import CliRunner

from nos.cli.main import cli

FAST = ["--lrs", "1e-2,1e-1", "--epochs", "1", "--train-size", "200"]


def run(*args: str):
    return CliRunner().invoke(cli, ["eval", *args])


def test_eval_prints_the_sweep_and_the_reward():
    result = run("powersign", "--task", "digits", *FAST)
    assert result.exit_code == 0, result.output
    assert "reward" in result.output
    assert "sweep" in result.output
    assert "final" in result.output
    assert "val acc" in result.output and "test accuracy" in result.output


def test_eval_calls_a_regression_tasks_scores_scores_not_accuracies():
    result = run("sgd", "--task", "quadratic", "--lrs", "1e-2,1e-1", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "1 / (1 + validation MSE)" in result.output
    assert "val score" in result.output and "test score" in result.output and "accura" not in result.output


def test_eval_json_is_the_evaluation_result():
    result = run("sgd", "--json", "--seed", "2", *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["rule"] == "g"
    assert data["seed"] == 2
    assert [t["lr"] for t in data["trials"]] == [1e-2, 1e-1]


def test_eval_trains_on_one_thread_unless_told_as_search_workers_do():
    """Another thread count sums in another order: the reward a search stored is the one-thread one."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert run("sgd", "--json", *FAST).exit_code == 0
        assert torch.get_num_threads() == 1
        assert run("sgd", "--json", "--threads", "2", *FAST).exit_code == 0
        assert torch.get_num_threads() == 2
        # torch takes a C int: a larger count was a traceback, after the training
        too_many = run("sgd", "--threads", "100000000000", *FAST)
        assert too_many.exit_code == 2
        assert "Traceback" not in too_many.output and "1<=x<=1024" in too_many.output
    finally:
        torch.set_num_threads(before)


def test_bad_rule_exits_2():
    result = run("g * (", *FAST)
    assert result.exit_code == 2
    assert "bad rule" in result.output


def test_unknown_task_exits_2_and_lists_tasks():
    result = run("sgd", "--task", "mnist")
    assert result.exit_code == 2
    assert "unknown task" in result.output
    assert "fashion-mnist" in result.output


def test_missing_cifar10_exits_2_and_says_where_files_go(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    result = run("sgd", "--task", "cifar10", "--data-dir", str(tmp_path))
    assert result.exit_code == 2
    assert "cifar-10-batches-py" in result.output
    assert "--data-dir" in result.output


def test_bad_learning_rates_exit_2():
    assert run("sgd", "--lrs", "1e-2,abc").exit_code == 2
    assert run("sgd", "--lrs", "0").exit_code == 2


def test_unavailable_device_exits_2():
    import torch

    if torch.cuda.is_available():
        return   # the machine has the device: nothing to refuse
    result = run("sgd", "--device", "cuda", *FAST)
    assert result.exit_code == 2
    assert "CUDA" in result.output


def test_eval_with_a_halving_sweep_shows_the_stopped_rates():
    result = run("adam", "--json", "--sweep", "halving", "--lrs", "1e-4,1e-3,1e-2,1e-1", "--epochs", "1",
                 "--train-size", "400")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    stopped = [t for t in data["trials"] if t["val_acc"] is None]
    assert len(stopped) == 2
    assert all(t["steps"] < data["final"]["steps"] for t in stopped)
    table = run("adam", "--sweep", "halving", "--lrs", "1e-4,1e-3,1e-2,1e-1", "--epochs", "1", "--train-size", "400")
    assert table.exit_code == 0
    assert "reward" in table.output


def test_eval_refuses_an_unknown_sweep():
    result = run("sgd", "--sweep", "quarter", *FAST)
    assert result.exit_code == 2
    assert "quarter" in result.output


def test_help_lists_every_command_without_importing_torch():
    import subprocess
    import sys

    from nos.cli.main import COMMANDS, cli

    code = ("import sys; from click.testing import CliRunner; from nos.cli.main import cli; "
            "print(CliRunner().invoke(cli, ['--help']).output); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")   # `nos --help` answers at once, not after torch's import
    for name, (_, summary) in COMMANDS.items():
        assert f"  {name} " in out
        assert summary.split()[0] in out
        assert cli.get_command(None, name).name == name   # the table points at the real command


def test_ctrl_c_in_eval_exits_130_with_one_line():
    """click answered a Ctrl-C with "Aborted!" and exit status 1, the status nos gives a failure."""
    import os
    import signal
    import subprocess
    import sys
    import time

    evaluating = subprocess.Popen([sys.executable, "-m", "nos.cli.main", "eval", "adam", "--epochs", "10000"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # torch is imported by the command itself: once it is mapped, click has handed over to `nos eval`.
        while "libtorch_cpu" not in open(f"/proc/{evaluating.pid}/maps").read() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        os.kill(evaluating.pid, signal.SIGINT)
        _, stderr = evaluating.communicate(timeout=120)
    finally:
        if evaluating.poll() is None:
            evaluating.kill()
    assert evaluating.returncode == 130, stderr
    assert stderr.strip() == "interrupted"
