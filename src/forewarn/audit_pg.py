"""The audit log on PostgreSQL (the scale-out mode): the same rows as `audit` writes on SQLite,
in the transaction of the action itself, and read back the same way. The table is
append-only there too: a trigger refuses every UPDATE and DELETE (schema version 8)."""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg

from forewarn.audit import ACTIONS


def record(
    conn: psycopg.Connection[Any],
    workspace: int,
    actor: str,
    action: str,
    target: str,
    now_ms: int,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one row; the caller holds the action's transaction (or this is its own)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    conn.execute(
        "INSERT INTO audit (workspace, at_ms, actor, action, target, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (workspace, now_ms, actor, action, target, msgspec.json.encode(detail or {}).decode()),
    )


def read(
    conn: psycopg.Connection[Any],
    workspace: int,
    limit: int = 100,
    before: int | None = None,
    action: str | None = None,
) -> list[dict[str, Any]]:
    """The workspace's latest rows, newest first; `before` an id, to read further back."""
    rows = conn.execute(
        "SELECT id, at_ms, actor, action, target, detail FROM audit WHERE workspace = %s"
        " AND (%s::bigint IS NULL OR id < %s) AND (%s::text IS NULL OR action = %s)"
        " ORDER BY id DESC LIMIT %s",
        (workspace, before, before, action, action, limit),
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
