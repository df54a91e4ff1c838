"""`nos rule ...`: look at rules without training anything."""

from __future__ import annotations

import click

from nos.rules import RuleSyntaxError, in_vocabulary, min_depth, rule_hash, state_buffers, to_text, to_tokens
from nos.rules.builtins import BUILTINS, resolve_rule
from nos.rules.tree import operands_read
from nos.rules.vocabulary import OPERANDS

from .errors import UsageProblem


@click.group("rule")
def rule_group() -> None:
    """Parse and inspect update rules."""


def parse_or_exit(text: str):
    try:
        return resolve_rule(text)
    except RuleSyntaxError as exc:
        raise UsageProblem(f"bad rule\n{exc}") from None


@rule_group.command("parse")
@click.argument("text")
def parse_command(text: str) -> None:
    """Print TEXT's canonical form, depth, operands read and state kept.

    TEXT is rule text such as "g * exp(sign(g) * sign(m))" or a built-in name
    (sgd, momentum, adam, rmsprop, powersign, addsign, powersign-ld, ...).
    """
    tree = parse_or_exit(text)
    depth = min_depth(tree)
    read = operands_read(tree)
    click.echo(f"canonical:  {to_text(tree)}")
    click.echo(f"hash:       {rule_hash(tree)}")
    if depth is None:
        why = "uses numbers or op constants outside the controller's vocabulary" if not in_vocabulary(tree) \
            else "needs more than depth 3"
        click.echo(f"depth:      none ({why})")
    else:
        click.echo(f"depth:      {depth}")
        click.echo(f"tokens:     {' '.join(map(str, to_tokens(tree, depth)))}")
    click.echo(f"operands:   {', '.join(n for n in OPERANDS if n in read)}")
    buffers = state_buffers(tree)
    click.echo(f"state:      {', '.join(buffers) if buffers else 'none'} "
               f"({len(buffers)} buffer{'s' if len(buffers) != 1 else ''} per parameter)")


@rule_group.command("builtins")
def builtins_command() -> None:
    """List the named built-in rules."""
    width = max(map(len, BUILTINS))
    for name, text in BUILTINS.items():
        click.echo(f"{name:{width}}  {text}")
