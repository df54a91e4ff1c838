"""Click parameter types shared by the commands: ids and seeds within what the database and torch hold."""

from __future__ import annotations

import click

from nos.config import MAX_SEED

# Ids are 32-bit INTEGER columns on PostgreSQL: a larger number names nothing and must not reach the query.
MAX_ID = 2**31 - 1

ID = click.IntRange(0, MAX_ID)
SEED = click.IntRange(0, MAX_SEED)


class PrintableText(click.ParamType):
    """A string without control characters: a NUL or an escape sequence is refused here, not by the database."""

    name = "text"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.isprintable():
            self.fail(f"{value!r} holds control characters (NUL, escape, ...); use printable text", param, ctx)
        return value


TEXT = PrintableText()
