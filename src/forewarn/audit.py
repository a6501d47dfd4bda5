"""The audit log: one row per admin action, written in the transaction of the action itself,
so that an action without its row (or a row without its action) cannot be committed.

Who acted is an admin key's prefix (`fw_ak_…`), `cli`, `environment` (keys set at start),
`dashboard:<key prefix>` or `auto-guard`. The table is append-only: SQLite triggers refuse
every UPDATE and DELETE on it (schema version 7), retention purges leave it alone, and
people (user ids) appear in it only by the hash of their id (`subject_target`), so that a
person forgotten later is not kept in it; for the same reason a person's suppression is
logged without the reason typed for it (which may name them).
"""

from __future__ import annotations

from typing import Any

import msgspec

from forewarn.forgotten import subject_hash

# every action the log records
ACTIONS = (
    "key.created",
    "key.revoked",
    "playbooks.reloaded",
    "trigger.paused",
    "trigger.shadowed",
    "trigger.resumed",
    "subject.suppressed",
    "subject.unsuppressed",
    "subject.forget_requested",
    "subject.forgotten",
    "retention.purged",
    "dead_letter.replayed",
    "dead_letter.discarded",
)


def subject_target(workspace: int, scope: str, subject: str) -> str:
    """How a row names a subject: an account by its id; a person by the hash of theirs (the
    one `forewarn forget` keeps), since a forgotten person's rows cannot be deleted."""
    return subject if scope == "account" else subject_hash(workspace, subject)


# each statement for both stores: `?` marks a parameter in SQLite, `%s` in PostgreSQL
_INSERT = (
    "INSERT INTO audit (workspace, at_ms, actor, action, target, detail)"
    " VALUES ({p}, {p}, {p}, {p}, {p}, {p})"
)
_READ = (
    "SELECT id, at_ms, actor, action, target, detail FROM audit WHERE workspace = {p}"
    " AND (CAST({p} AS BIGINT) IS NULL OR id < {p}) AND (CAST({p} AS TEXT) IS NULL"
    " OR action = {p}) ORDER BY id DESC LIMIT {p}"
)
SQL = {
    dialect: {"insert": _INSERT.format(p=mark), "read": _READ.format(p=mark)}
    for dialect, mark in (("sqlite", "?"), ("postgresql", "%s"))
}


def record(
    conn: Any,
    workspace: int,
    actor: str,
    action: str,
    target: str,
    now_ms: int,
    detail: dict[str, Any] | None = None,
    dialect: str = "sqlite",
) -> None:
    """Append one row; the caller holds the action's transaction (or this is its own). `conn`
    is an SQLite connection, or a PostgreSQL one with `dialect="postgresql"`."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    conn.execute(
        SQL[dialect]["insert"],
        (workspace, now_ms, actor, action, target, msgspec.json.encode(detail or {}).decode()),
    )


def read(
    conn: Any,
    workspace: int,
    limit: int = 100,
    before: int | None = None,
    action: str | None = None,
    dialect: str = "sqlite",
) -> list[dict[str, Any]]:
    """The workspace's latest rows, newest first; `before` an id, to read further back."""
    rows = conn.execute(
        SQL[dialect]["read"], (workspace, before, before, action, action, limit)
    ).fetchall()
    return [
        {
            "id": int(i),
            "at_ms": int(at),
            "actor": str(actor),
            "action": str(act),
            "target": str(target),
            "detail": msgspec.json.decode(detail),
        }
        for i, at, actor, act, target, detail in rows
    ]
