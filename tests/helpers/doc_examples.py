"""Examples in Markdown documents, extracted and run as a reader would run them.

A fenced block is an example when its info string is one of:

- `console`: lines starting with `$ ` are shell commands (a trailing `\\`
  continues one onto the next line); the other lines are the output the
  command shows. Each command must exit 0, unless the next command is
  `echo $?`, whose shown output then says the status expected. Every shown
  output line must appear in what the commands print, compared with runs of
  whitespace collapsed; `...` in a shown line stands for any text, a line of
  only `...` or of only table borders is not compared.
- `python`: run as a script; it must exit 0.
- `sql`: run against a database created by `nos db upgrade`.
- `toml`: a search config: it must load as a `SearchConfig`.

A block whose nearest non-blank line before it is `<!-- file: NAME -->` is a
file the reader saves (a task file the later commands import): it is written
to NAME in the folder, and a `python` one must compile. A block whose nearest
non-blank line before it is `<!-- not run: REASON -->` is listed and skipped
with that reason; `<!-- needs: fashion-mnist -->` runs
it only where Debian's Fashion-MNIST files are (a skip, or a failure under
NOS_REQUIRE_SERVICES=1, elsewhere). Other blocks (`text`, `sh`, none) are not
examples.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.services import unavailable

ROOT = Path(__file__).resolve().parents[2]
# `nos` and `python` of the environment the tests run in, first on PATH.
VENV_BIN = Path(sys.executable).parent
KINDS = ("console", "python", "sql", "toml")
SKIP = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->$")
NEEDS = re.compile(r"^<!--\s*needs:\s*(.+?)\s*-->$")
FILE = re.compile(r"^<!--\s*file:\s*([\w.-]+)\s*-->$")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
BORDER = set("─━│┃┏┓┗┛┡┩┣┫╇╈┳┻┼╋└┘┌┐├┤┬┴═║ ")
# Shell words that are not programs on PATH.
BUILTINS = {"cd", "echo", "export", "test", "[", "for", "do", "done", "true", "false", "exit"}
BLOCK_TIMEOUT = 600
# Commands that train in worker processes of their own (a detached enqueue leaves that to Celery).
STARTS_WORKERS = re.compile(r"^(\S+=\S*\s+)*nos\s+(enqueue|resume|transfer|worker)\b")


@dataclass
class Example:
    path: Path
    line: int            # 1-based line of the opening fence
    kind: str
    text: str
    skip: str | None     # the reason it is not run, or None
    needs: str | None = None   # data it needs: "fashion-mnist"
    file: str | None = None    # the name it is saved under, for a file the reader saves

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"


def examples(path: Path) -> list[Example]:
    """The example blocks of a Markdown file, in order."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, kind, start = match.group(1), match.group(2), i
        body, i = [], i + 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        if kind in KINDS:
            found.append(Example(path, start + 1, kind, "\n".join(body) + "\n", _marker(SKIP, lines, start),
                                 _marker(NEEDS, lines, start), _marker(FILE, lines, start)))
    return found


def starts_workers(example: Example) -> bool:
    """Whether running `example` starts worker processes."""
    if example.skip or example.kind != "console":
        return False
    return any(STARTS_WORKERS.match(c.text) and "--detach" not in c.text for c in commands(example.text))


def params(found: list[Example]) -> list:
    """pytest parameters for `found`, ids from their places; all of a document's examples are marked
    slow when one of them starts workers, since the later ones read the runs the earlier ones made."""
    slow_paths = {e.path for e in found if starts_workers(e)}
    return [pytest.param(e, id=e.id, marks=[pytest.mark.slow] if e.path in slow_paths else []) for e in found]


def _marker(pattern: re.Pattern, lines: list[str], fence: int) -> str | None:
    """What the comment on the nearest non-blank line before the fence says, if it is one."""
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    match = pattern.match(lines[j].strip()) if j >= 0 else None
    return match.group(1) if match else None


def environment(workdir: Path) -> dict[str, str]:
    """A reader's shell in `workdir`: this environment's nos first, a database of the folder's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOS_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["NOS_DB_URL"] = "sqlite:///nos.db"
    return env


def run(example: Example, workdir: Path) -> None:
    """Run one example in `workdir`; a failed check fails the calling test."""
    if example.skip:
        pytest.skip(f"{example.id} not run: {example.skip}")
    if example.needs == "fashion-mnist" and not FASHION_MNIST.is_dir():
        unavailable("Fashion-MNIST", f"{example.id} needs {FASHION_MNIST} (Debian: dataset-fashion-mnist)")
    assert example.needs in (None, "fashion-mnist"), f"{example.id}: unknown need {example.needs!r}"
    if example.file:
        if example.kind == "python":
            compile(example.text, example.file, "exec")
        (workdir / example.file).write_text(example.text)
        return
    {"console": _console, "python": _python, "sql": _sql, "toml": _toml}[example.kind](example, workdir)


# --- console ---


@dataclass
class Command:
    text: str
    shown: list[str]     # the output lines shown under it


def commands(text: str) -> list[Command]:
    found: list[Command] = []
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1] + " " + next(lines, "").strip()
            found.append(Command(command, []))
        elif found:
            found[-1].shown.append(line)
    return found


def _console(example: Example, workdir: Path) -> None:
    cmds = commands(example.text)
    assert cmds, f"{example.id}: a console block without `$ ` commands"
    for cmd in cmds:
        program = _program(cmd.text)
        if program not in BUILTINS and not (VENV_BIN / program).exists() and shutil.which(program) is None:
            pytest.skip(f"{example.id}: `{program}` is not installed here")
    script = ["exec 2>&1", "__rc=0"]
    for n, cmd in enumerate(cmds):
        # (exit $__rc) hands the previous command's status to `echo $?`.
        script += [f"printf '\\n@@cmd {n}\\n'", f"(exit $__rc); {cmd.text}", "__rc=$?",
                   f"printf '\\n@@rc {n} %s\\n' \"$__rc\""]
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=workdir, env=environment(workdir),
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    outputs, statuses = _split(done.stdout)
    for n, cmd in enumerate(cmds):
        out = outputs.get(n, "")
        assert n in statuses, f"{example.id}: `{cmd.text}` did not finish:\n{done.stdout[-3000:]}"
        expected = _expected_status(cmds, n)
        assert statuses[n] == expected, (
            f"{example.id}: `{cmd.text}` exited {statuses[n]}, expected {expected}:\n{out[-3000:]}")
        for line in cmd.shown:
            pattern = _pattern(line)
            if pattern is not None:
                assert any(pattern.fullmatch(_squash(got)) for got in out.splitlines()), (
                    f"{example.id}: `{cmd.text}` did not print the line\n  {line.strip()}\nit printed:\n{out[-3000:]}")


def _program(command: str) -> str:
    """The program a command line starts: past `(` and VAR=value assignments."""
    words = command.lstrip("( ").split()
    while words and "=" in words[0]:
        words.pop(0)
    return words[0] if words else "true"


def _split(stdout: str) -> tuple[dict[int, str], dict[int, int]]:
    outputs: dict[int, list[str]] = {}
    statuses: dict[int, int] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("@@cmd "):
            current = int(line.split()[1])
            outputs[current] = []
        elif line.startswith("@@rc "):
            _, n, rc = line.split()
            statuses[int(n)] = int(rc)
            current = None
        elif current is not None:
            outputs[current].append(line)
    return {n: "\n".join(lines) for n, lines in outputs.items()}, statuses


def _expected_status(cmds: list[Command], n: int) -> int:
    following = cmds[n + 1] if n + 1 < len(cmds) else None
    if following is not None and following.text.strip() == "echo $?":
        shown = [line.strip() for line in following.shown if line.strip()]
        return int(shown[0]) if shown else 0
    return 0


def _squash(line: str) -> str:
    return " ".join(line.split())


def _pattern(line: str) -> re.Pattern | None:
    squashed = _squash(line)
    if not squashed or squashed == "..." or set(squashed) <= BORDER:
        return None
    parts = squashed.split("...")
    # Spaces next to `...` are part of what it stands for: "0.1 ..." also matches "0.1".
    parts = [part.lstrip() if i else part for i, part in enumerate(parts)]
    parts = [part.rstrip() if i < len(parts) - 1 else part for i, part in enumerate(parts)]
    return re.compile(".*".join(re.escape(part) for part in parts))


# --- python, sql, toml ---


def _python(example: Example, workdir: Path) -> None:
    script = workdir / f"example_{example.path.stem}_{example.line}.py"
    script.write_text(example.text)
    done = subprocess.run([sys.executable, script.name], cwd=workdir, env=environment(workdir),
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    assert done.returncode == 0, f"{example.id} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"


def _sql(example: Example, workdir: Path) -> None:
    database = workdir / "nos.db"
    if not database.exists():
        done = subprocess.run([str(VENV_BIN / "nos"), "db", "upgrade"], cwd=workdir, env=environment(workdir),
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
        assert done.returncode == 0, done.stdout + done.stderr
    with sqlite3.connect(database) as connection:
        connection.execute(example.text.strip().rstrip(";")).fetchall()


def _toml(example: Example, workdir: Path) -> None:
    from nos.config import SearchConfig

    SearchConfig.from_dict(tomllib.loads(example.text))
