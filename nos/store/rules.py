"""Rules: stored once by canonical text, shared by every run that samples them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from nos.rules import Node, min_depth, rule_hash, to_text, to_tokens

from .clock import database_now
from .models import Rule

# Bound parameters per IN (...) list: well under SQLite's and PostgreSQL's limits.
CHUNK = 500


@dataclass(frozen=True)
class RuleRecord:
    """What the rules table holds about a rule, computed from its tree."""

    text: str
    hash: str
    depth: int | None
    tokens: list[int] | None
    fingerprint: str | None = None

    @classmethod
    def from_tree(cls, tree: Node, fingerprint: str | None = None) -> RuleRecord:
        depth = min_depth(tree)
        tokens = None if depth is None else [int(t) for t in to_tokens(tree, depth)]
        return cls(text=to_text(tree), hash=rule_hash(tree), depth=depth, tokens=tokens, fingerprint=fingerprint)


def get_or_create_rules(session: Session, records: Sequence[RuleRecord]) -> list[int]:
    """The ids of `records`, in order, inserting those not stored yet.

    INSERT ... ON CONFLICT DO UPDATE (the fingerprint alone, where the stored one is missing or an older
    probe's), then SELECT: safe when several processes insert the same rule at once, on SQLite and
    PostgreSQL alike.
    """
    if not records:
        return []
    unique = {r.text: r for r in records}
    insert = (postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert)(Rule)
    now = database_now(session)
    rows = [dict(text=r.text, hash=r.hash, depth=r.depth, tokens=r.tokens, fingerprint=r.fingerprint,
                 created_at=now) for r in unique.values()]
    # Sorted inserts take PostgreSQL's row locks in one order: no deadlock between two batches.
    rows.sort(key=lambda row: row["text"])
    # A rule stored before with no fingerprint (a --no-probe run) or an older probe's takes the new one:
    # workers look equivalents up by the stored fingerprint.
    given = insert.excluded.fingerprint
    newer = and_(given.is_not(None), Rule.fingerprint.is_distinct_from(given))
    session.execute(insert.on_conflict_do_update(index_elements=["text"], set_={"fingerprint": given}, where=newer),
                    rows)
    texts = list(unique)
    ids: dict[str, int] = {}
    for start in range(0, len(texts), CHUNK):
        chunk = texts[start:start + CHUNK]
        ids.update(session.execute(select(Rule.text, Rule.id).where(Rule.text.in_(chunk))).all())
    return [ids[r.text] for r in records]


def get_or_create_rule(session: Session, tree: Node, fingerprint: str | None = None) -> int:
    return get_or_create_rules(session, [RuleRecord.from_tree(tree, fingerprint)])[0]


def find_rule(session: Session, text: str) -> Rule | None:
    """The stored rule with this canonical text, if any."""
    return session.execute(select(Rule).where(Rule.text == text)).scalar_one_or_none()
