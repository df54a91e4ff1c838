"""How the CLI reports bad input: one clear message, exit status 2, nothing written."""

from __future__ import annotations

import click


class UsageProblem(click.ClickException):
    """Bad input from the user: printed as 'Error: ...' with exit status 2."""

    exit_code = 2
