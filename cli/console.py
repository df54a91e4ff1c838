"""The rich Consoles the CLI prints through.

Markup is off: run names, rule text, error messages and paths come from users
and the database, and a '[' in one of them prints as itself; it never restyles
the output or raises. Control characters (an escape sequence in a stored name,
say) print as visible escapes instead of reaching the terminal. Styling goes
through `style=` or `rich.text.Text`.
"""

from __future__ import annotations

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
    """A Console that renders every string as plain, printable text."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        kwargs["markup"] = False
        kwargs["emoji"] = False
        return super().render_str(printable(text), **kwargs)


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped or captured output gets room for long rules instead of rich's 80 columns.
    return PlainConsole(stderr=stderr, width=None if stream.isatty() else 200, markup=False, emoji=False)


console = make_console()
