"""nos installed into an environment that brings its own torch (`pip install --no-deps -e .`).

Each test runs a fresh interpreter, as a user's shell would: the `nos` script pip
installed, or `python -c` with some packages made unimportable to stand for a
machine that lacks them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nos import __version__

NOS = Path(sys.executable).with_name("nos")   # the console script pip installs beside this interpreter

# What a GPU machine's image may lack: everything behind the database, the queue and the downloads.
NOT_NEEDED_TO_EVALUATE = ("sqlalchemy", "alembic", "celery", "kombu", "redis", "psycopg", "torchvision")


def python_without(packages: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where importing any of `packages` fails as if absent."""
    block = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in packages)
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True)


def test_the_installed_script_answers_help_and_version():
    helped = subprocess.run([str(NOS), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert "eval" in helped.stdout
    assert "enqueue" in helped.stdout
    version = subprocess.run([str(NOS), "--version"], capture_output=True, text=True)
    assert version.returncode == 0
    assert version.stdout.split()[-1] == __version__


def test_eval_and_the_optimizer_work_without_the_database_packages():
    code = """
import torch
from nos.optim import SymbolicOptimizer

torch.manual_seed(0)
x, y = torch.randn(64, 4), torch.randn(64, 1)
model = torch.nn.Linear(4, 1)
opt = SymbolicOptimizer(model.parameters(), "g * exp(sign(g) * sign(m))", lr=0.01)
losses = []
for _ in range(30):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
print("losses", losses[0], losses[-1])

from nos.cli.main import main
sys.argv = ["nos", "eval", "sgd", "--json", "--lrs", "1e-2,1e-1", "--epochs", "1", "--train-size", "200"]
main()
"""
    done = python_without(NOT_NEEDED_TO_EVALUATE, code)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    first, last = map(float, lines[0].split()[1:])
    assert last < first
    result = json.loads(lines[-1])
    assert result["rule"] == "g"
    assert [t["lr"] for t in result["trials"]] == [1e-2, 1e-1]
    assert 0.0 <= result["reward"] <= 1.0


def test_a_command_whose_package_is_missing_names_it_in_one_line():
    code = "from nos.cli.main import main\nsys.argv = ['nos', 'runs']\nmain()\n"
    done = python_without(("sqlalchemy",), code)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "'sqlalchemy'" in done.stderr
