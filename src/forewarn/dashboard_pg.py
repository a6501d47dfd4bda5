"""The dashboard in the scale-out mode: what its pages call in a store, on PostgreSQL, and
the way a scale-out API process runs its work (`dashboard_store`). Edge.

The pages, their statements and their computation are the embedded server's; the twins here
are those the admin API's outreach routes already use (`outreach_pg`, `report_pg`), the
keys' (`store_pg`), a subject's timeline from the event log, and what the engine knows of a
subject read from the states the workers stored (`admin_pg`), on the page's own connection.
Sessions need nothing of their own: the cookie is signed with a secret kept in the `secrets`
table, and its key is looked up on every request, so any API process honours a session
another issued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg

from forewarn import (
    admin_pg,
    dashboard_pages,
    dashboard_store,
    outreach_pg,
    store_pg,
    store_sqlite,
)

if TYPE_CHECKING:
    from forewarn.api import Forewarn

Conn = psycopg.Connection[Any]


def _reader(app: Forewarn) -> admin_pg.Reader:
    from forewarn.scaleout import IngestApp  # (the API process that mounts the dashboard)

    assert isinstance(app, IngestApp), "the scale-out dashboard runs in an API process"
    return app.reader


def engine_lag(conn: Conn, app: Forewarn, workspace: int) -> dict[str, Any]:
    """The workers' lag: the workspace's events queued and not yet applied."""
    row = conn.execute("SELECT count(*) FROM queue WHERE workspace = %s", (workspace,)).fetchone()
    return {"up": True, "lag": int(row[0]) if row else 0, "lag_unit": "events"}


def engine_states(conn: Conn, app: Forewarn, workspace: int, subject: str) -> list[dict[str, Any]]:
    return _reader(app).states(conn, workspace, subject)


def engine_why(
    conn: Conn, app: Forewarn, workspace: int, subject: str, trigger: str, now_ms: int
) -> dict[str, Any]:
    return _reader(app).why(conn, workspace, subject, trigger, now_ms)


TWINS: dict[Callable[..., Any], Callable[..., Any]] = {
    **outreach_pg.TWINS,
    store_sqlite.recent_events: admin_pg.recent_events,
    store_sqlite.add_key: store_pg.add_key,
    dashboard_pages.engine_lag: engine_lag,
    dashboard_pages.engine_states: engine_states,
    dashboard_pages.engine_why: engine_why,
}


def runner(pool: store_pg.Pool) -> Callable[..., Any]:
    """`dashboard.routes`' `run(fn, *args)`: `fn` (or its twin) on a connection of the pool,
    in a thread."""

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        def job() -> Any:
            with pool.connection() as conn:
                return dashboard_store.call(fn, conn, *args)

        return await asyncio.to_thread(job)

    return run
