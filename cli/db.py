"""`nos db ...`: create, upgrade and inspect the database schema."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from nos.store import (
    URL_ENV_VAR,
    DatabaseMissing,
    Store,
    StoreError,
    check_writable,
    open_store,
    resolve_url,
    schema_state,
    shown,
    upgrade,
)

from .errors import UsageProblem
from .params import MAX_ID

# Shared by every command that touches the database.
db_option = click.option(
    "--db", "db_url", envvar=URL_ENV_VAR, default=None, metavar="URL",
    help=f"Database URL: sqlite:///PATH or postgresql://USER@HOST/DB [env {URL_ENV_VAR}; default sqlite:///nos.db].")


def open_store_or_exit(db_url: str | None, writing: bool = False) -> Store:
    """The up-to-date store at `db_url` (`writing`: and writable), or a one-line error and exit 2."""
    try:
        if writing:
            check_writable(resolve_url(db_url))
        return open_store(db_url)
    except StoreError as exc:
        raise UsageProblem(str(exc)) from None


def store_for_writing(db_url: str | None, say: Callable[[str], Any] = print) -> Store:
    """The store; a database with no nos schema yet (a new SQLite file) is created first, and `say` tells so."""
    from nos.control import store_for_writing as writable_store

    try:
        return writable_store(db_url, say)
    except StoreError as exc:
        raise UsageProblem(str(exc)) from None


def find_rule_or_exit(session: Any, rule: str) -> Any:
    """A stored rule by id, text or built-in name (as `nos show` takes it), or exit 2."""
    from sqlalchemy import select

    from nos.rules import RuleSyntaxError, to_text
    from nos.rules.builtins import resolve_rule
    from nos.store.models import Rule

    number = rule.strip()
    if number.isascii() and number.isdigit():
        # A number past any id (or too long for int()) names no rule; it never reaches the query.
        found = session.get(Rule, int(number)) if len(number) <= 10 and int(number) <= MAX_ID else None
    else:
        try:
            text = to_text(resolve_rule(rule))
        except RuleSyntaxError as exc:
            raise UsageProblem(f"bad rule\n{exc}") from None
        found = session.execute(select(Rule).where(Rule.text == text)).scalar_one_or_none()
    if found is None:
        raise UsageProblem(f"rule {rule!r} has not been evaluated in this database")
    return found


def store_errors_to_usage(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A StoreError (bad URL, server down, schema too old or too new, a damaged row) becomes exit 2 with its
    one line."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StoreError as exc:
            raise UsageProblem(str(exc)) from None
    return wrapped


@click.group("db")
def db_group() -> None:
    """Create, upgrade and inspect nos's database."""


@db_group.command("upgrade")
@db_option
@click.option("--force", is_flag=True,
              help="Upgrade even while workers or drivers are working against the database.")
@store_errors_to_usage
def upgrade_command(db_url: str | None, force: bool) -> None:
    """Create the schema, or bring it up to this nos's version.

    Stop every worker and driver first: each reads the schema when it starts. An upgrade that would
    change the schema under live ones is refused unless --force.
    """
    url = resolve_url(db_url)
    try:
        found = schema_state(url)
    except DatabaseMissing:
        found = None
    before = found.current if found is not None else None
    # Only an upgrade that would change the schema asks; one upgrade() refuses touches nothing, not even here.
    if found is not None and not found.refused and before is not None and before != found.head and not force:
        _refuse_while_live(url)
    state = upgrade(url)
    done = ("created, " if before is None else
            f"upgraded from revision {before}, " if before != state.current else "")
    click.echo(f"{shown(url)}: {done}{state.describe()}")


def _refuse_while_live(url) -> None:
    from nos.store import create_engine
    from nos.store.liveness import live_work

    engine = create_engine(url)
    try:
        live = live_work(engine)
    finally:
        engine.dispose()
    if live:
        raise UsageProblem(f"{live.describe()} against {shown(url)}: stop its workers and drivers "
                           "(`nos stop RUN`, then the `nos worker` processes) before `nos db upgrade`, "
                           "or pass --force")


@db_group.command("current")
@db_option
@store_errors_to_usage
def current_command(db_url: str | None) -> None:
    """Show the database's schema revision and whether it needs `nos db upgrade`.

    Exits 1 when the database is not up to date.
    """
    url = resolve_url(db_url)
    state = schema_state(url)
    click.echo(f"{shown(url)}: {state.describe()}")
    if not state.up_to_date:
        raise SystemExit(1)
