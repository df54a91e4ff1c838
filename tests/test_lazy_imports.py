"""nos.store and the reporting commands import torch, matplotlib and pandas only when they use them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_and_store_stay_lazy():
    """nos.store and `nos plot|report|export` load neither torch nor matplotlib nor pandas until they draw;
    `nos --help` loads neither matplotlib nor pandas."""
    code = """
import sys
from click.testing import CliRunner
from nos.cli.main import cli

def loaded():
    return sorted(m for m in ("torch", "matplotlib", "pandas") if m in sys.modules)

import nos.store, nos.store.frames, nos.plots, nos.report, nos.export
for args in (["plot", "--help"], ["report", "--help"], ["export", "--help"], ["export", "powersign"]):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (args, result.output)
print(loaded())
assert CliRunner().invoke(cli, ["--help"]).exit_code == 0
print(loaded())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    ours, help_too = out.stdout.splitlines()
    assert ours == "[]"
    assert "matplotlib" not in help_too
    assert "pandas" not in help_too
