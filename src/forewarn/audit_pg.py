"""The audit log on PostgreSQL (the scale-out mode): the same rows as `audit` writes on SQLite,
in the transaction of the action itself, and read back the same way. The table is
append-only there too: a trigger refuses every UPDATE and DELETE (schema version 8)."""

from __future__ import annotations

from typing import Any

import psycopg

from forewarn import audit


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
    audit.record(conn, workspace, actor, action, target, now_ms, detail, "postgresql")


def read(
    conn: psycopg.Connection[Any],
    workspace: int,
    limit: int = 100,
    before: int | None = None,
    action: str | None = None,
) -> list[dict[str, Any]]:
    """The workspace's latest rows, newest first; `before` an id, to read further back."""
    return audit.read(conn, workspace, limit, before, action, "postgresql")
