"""`nos export`: a rule as a Python snippet that trains, as written, in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nos.cli.main import cli

from helpers.reports import invoke

ROOT = Path(__file__).resolve().parents[1]


def _run_main(source: str) -> str:
    """Run a snippet as __main__ in this process (torch is already imported); returns what it printed."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "<snippet>", "exec"), {"__name__": "__main__"})
    return printed.getvalue()


def _losses(printed: str) -> tuple[float, float]:
    found = re.search(r"loss ([\d.]+) -> ([\d.]+) after 200 steps", printed)
    assert found, printed
    return float(found.group(1)), float(found.group(2))


def test_export_snippet_trains_in_a_fresh_python():
    result = invoke("export", "g*exp(sign(g)*sign(m))", "--lr", "0.1")
    assert result.exit_code == 0, result.output
    assert 'RULE = "g * exp(sign(g) * sign(m))"' in result.output
    assert "LR = 0.1" in result.output
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", result.output], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    first, last = _losses(out.stdout)
    assert last < first / 10


@pytest.mark.parametrize(("rule", "flags", "expect"), [
    ("adam", ["--lr", "0.01"], "built-in rule adam"),
    ("addsign-ld", ["--lr", "0.01"], "pass total_steps"),              # reads ld: the demo passes its length
    ("addsign-ld", ["--lr", "0.01", "--total-steps", "150"], "TOTAL_STEPS = 150"),
    ("drop(m, 0.3) * exp(1e-3*w)", ["--lr", "0.05", "--seed", "7"], "SEED = 7"),
    ("drop(m, 0.3) * exp(1e-3*w)", ["--lr", "0.05"], "SEED = None"),
])
def test_export_variants_train(rule, flags, expect):
    result = invoke("export", rule, *flags)
    assert result.exit_code == 0, result.output
    assert expect in result.output
    first, last = _losses(_run_main(result.output))
    assert last < first / 2


def test_export_without_demo_and_to_a_file(tmp_path):
    import torch

    out = tmp_path / "opt.py"
    result = CliRunner().invoke(cli, ["export", "powersign", "--no-demo", "-o", str(out)])
    assert result.exit_code == 0
    source = out.read_text()
    assert "__main__" not in source
    assert len(source.splitlines()) < 20
    namespace: dict = {}
    exec(compile(source, str(out), "exec"), namespace)
    optimizer = namespace["make_optimizer"](torch.nn.Linear(2, 1).parameters(), lr=0.5)
    assert optimizer.rule_text == "g * exp(sign(g) * sign(m))"
    assert optimizer.defaults["lr"] == 0.5


@pytest.mark.parametrize(("args", "message"), [
    (("g * exp(sgn(m))",), "unknown name 'sgn'"),
    (("g +",), "bad rule"),
    (("g", "--lr", "0"), "learning rate must be positive"),
    (("g", "--lr", "-1"), "learning rate must be positive"),
])
def test_export_bad_input_exits_2(args, message):
    result = invoke("export", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_an_exported_noise_rule_takes_its_seed_and_draws_the_same_noise_again():
    import torch

    result = invoke("export", "g + eps", "--no-demo")
    assert result.exit_code == 0
    namespace: dict = {}
    exec(compile(result.output, "exported", "exec"), namespace)

    def trained(seed):
        model = torch.nn.Linear(2, 1)
        torch.nn.init.zeros_(model.weight)
        optimizer = namespace["make_optimizer"](model.parameters(), lr=0.1, seed=seed)
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        return model.weight.detach().clone()

    assert torch.equal(trained(3), trained(3)) and not torch.equal(trained(3), trained(4))


def test_a_number_exports_the_stored_rule_with_its_best_rate(two_runs):
    """`nos export 17` reads a rule id, as `nos show 17` does: it exported the constant rule 17 before."""
    from sqlalchemy import update

    from nos.store.models import Evaluation, Rule

    store, url, first, _ = two_runs
    best = first["trained"][1]   # reward 0.95: its rule's best evaluation
    with store.transaction() as session:
        session.execute(update(Evaluation).where(Evaluation.id == best).values(best_lr=0.0316))
    with store.reading() as session:
        rule_id = session.get(Evaluation, best).rule_id
        text = session.get(Rule, rule_id).text
    exported = invoke("export", str(rule_id), "--db", url, "--no-demo")
    assert exported.exit_code == 0, exported.output
    assert f"delta = {text}\n" in exported.output
    with store.reading() as session:
        task = session.get(Evaluation, best).task
    # the rate is the best on one task: the snippet says which, and the note goes where the rate is not the stored one
    assert f"LR = 0.0316   # the best rate of evaluation {best} (task {task}, reward 0.9500)\n" in exported.output
    assert "LR = 0.25\n" in invoke("export", str(rule_id), "--lr", "0.25", "--db", url).output
    missing = invoke("export", "424242", "--db", url)
    assert (missing.exit_code, "rule '424242' has not been evaluated" in missing.output) == (2, True)
    assert "LR = 0.001" in invoke("export", "g * 3", "--db", url).output   # text: no database read


@pytest.mark.parametrize(("column", "value", "problem"), [
    ("best_lr", "'abc'", "holds 'abc', not a positive finite number"),
    ("best_lr", "-1.0", "holds -1.0, not a positive finite number"),
    ("reward", "'abc'", "holds 'abc', not a number"),
])
def test_a_stored_rule_whose_best_evaluation_holds_text_in_a_number_column(two_runs, column, value, problem):
    """SQLite keeps text in a REAL column: `nos export RULE_ID` failed with a TypeError's traceback (or a
    format code's ValueError) where `show` and `report` name the row."""
    from sqlalchemy import text

    store, url, first, _ = two_runs
    best = first["trained"][1]   # reward 0.95: its rule's best evaluation (text sorts above every number)
    with store.transaction() as session:
        session.execute(text(f"UPDATE evaluations SET {column} = {value} WHERE id = :id"), {"id": best})
    with store.reading() as session:
        rule_id, run_id = session.execute(text("SELECT rule_id, run_id FROM evaluations WHERE id = :id"),
                                          {"id": best}).one()
    result = invoke("export", str(rule_id), "--db", url)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: run {run_id} is damaged in the database: evaluations.{column} of evaluation {best} "
                      f"{problem}"], result.output


def test_export_snippet_refuses_a_rate_that_is_not_a_number():
    from nos.export import export_snippet

    for lr in ("abc", None, True, float("nan")):
        with pytest.raises(ValueError, match="the learning rate must be positive and finite"):
            export_snippet("g", lr=lr)
