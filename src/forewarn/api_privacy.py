"""The admin routes about privacy: forgetting a person, and reading the audit log."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from forewarn import audit, clock, privacy, store_sqlite
from forewarn.errors import InputError
from forewarn.model import format_time

if TYPE_CHECKING:
    from forewarn.api import Forewarn

AUDIT_LIMIT = 100


def _json(data: Any, status: int = 200) -> Response:
    return JSONResponse(data, status_code=status)


async def forget(app: Forewarn, request: Request) -> Response:
    """`DELETE /api/v1/subjects/{subject}`: forget the person, now."""
    key = app.admin_key(request)
    subject = request.path_params["subject"]

    def job() -> privacy.Forgot:
        conn = store_sqlite.connect(app.settings.db)
        try:
            return privacy.forget(conn, key.workspace, subject, key.prefix, clock.now_ms())
        finally:
            conn.close()

    done = await asyncio.to_thread(job)
    return _json({"forgotten": True, **done.to_dict()})


def _int(text: str | None, name: str, low: int, high: int) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise InputError(f"{name}={text!r}: give a whole number from {low} to {high}")
    return int(text)


def audit_query(request: Request) -> tuple[int, int | None, str | None]:
    """`GET /api/v1/audit`'s parameters: limit, before (an id), action."""
    q = request.query_params
    limit = _int(q.get("limit"), "limit", 1, 1000) or AUDIT_LIMIT
    before = _int(q.get("before"), "before", 1, 2**63 - 1)
    action = q.get("action")
    if action is not None and action not in audit.ACTIONS:
        raise InputError(f"action={action!r}: give one of {', '.join(audit.ACTIONS)}")
    return limit, before, action


def audit_answer(rows: list[dict[str, Any]]) -> Response:
    for row in rows:
        row["at"] = format_time(row.pop("at_ms"))
    return _json({"audit": rows})


def routes(app: Forewarn) -> list[Route]:
    async def audit_log(request: Request) -> Response:
        key = app.admin_key(request)
        limit, before, action = audit_query(request)

        def job() -> list[dict[str, Any]]:
            conn = store_sqlite.connect(app.settings.db)
            try:
                return audit.read(conn, key.workspace, limit, before, action)
            finally:
                conn.close()

        return audit_answer(await asyncio.to_thread(job))

    return [Route("/api/v1/audit", audit_log, methods=["GET"])]
