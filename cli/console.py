"""The rich Consoles the CLI prints through.

Markup is off: run names, rule text, error messages and paths come from users
and the database, and a '[' in one of them prints as itself; it never restyles
the output or raises. Control characters (an escape sequence in a stored name,
say) print as visible escapes instead of reaching the terminal. Styling goes
through `style=` or `rich.text.Text`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console
from rich.text import Text


def printable(text: str) -> str:
    """`text` with every control character but newline and tab written as an escape (\\x1b, \\x00)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else ascii(c)[1:-1] for c in text)


class PlainConsole(Console):
    """A Console that renders every string as plain, printable text, and goes quiet when its output is gone.

    Output is a side channel of a search: a pipe whose reader exited (`nos enqueue | head -1`) or a
    terminal that hung up (EIO) must not end the driver. rich's default exits at a broken pipe, which
    left a run `running` with no driver; here the stream is pointed at /dev/null instead (so Python's
    flush at exit succeeds too) and the command goes on. Signals, not output, decide whether it stops.
    """

    def render_str(self, text: str, **kwargs: Any) -> Text:
        kwargs["markup"] = False
        kwargs["emoji"] = False
        return super().render_str(printable(text), **kwargs)

    def on_broken_pipe(self) -> None:
        self._output_gone()

    def _check_buffer(self) -> None:
        try:
            super()._check_buffer()
        except OSError:   # a hung-up terminal: EIO
            self._output_gone()

    def _output_gone(self) -> None:
        self.quiet = True
        try:
            fd = self.file.fileno()
        except (OSError, ValueError):   # a stream with no descriptor (captured output): quiet is enough
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped or captured output gets room for long rules instead of rich's 80 columns.
    return PlainConsole(stderr=stderr, width=None if stream.isatty() else 200, markup=False, emoji=False)


console = make_console()
