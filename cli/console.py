"""The one rich Console the CLI prints through."""

from __future__ import annotations

import sys

from rich.console import Console

# Piped or captured output gets room for long rules instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
