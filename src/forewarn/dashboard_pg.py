"""The dashboard in the scale-out mode: what its pages call in a store, on PostgreSQL, and
the way a scale-out API process runs its work (`dashboard_store`). Edge.

The pages, their statements and their computation are the embedded server's; the twins here
are those the admin API's outreach routes already use (`outreach_pg`, `report_pg`), the
keys' (`store_pg`) and a subject's timeline from the event log (`admin_pg`). Sessions need
nothing of their own: the cookie is signed with a secret kept in the `secrets` table, and its
key is looked up on every request, so any API process honours a session another issued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from forewarn import admin_pg, dashboard_store, outreach_pg, store_pg, store_sqlite

TWINS: dict[Callable[..., Any], Callable[..., Any]] = {
    **outreach_pg.TWINS,
    store_sqlite.recent_events: admin_pg.recent_events,
    store_sqlite.add_key: store_pg.add_key,
}


def runner(pool: store_pg.Pool) -> dashboard_store.Run:
    """`dashboard.routes`' `run(fn, *args)`: `fn` (or its twin) on a connection of the pool,
    in a thread."""

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        def job() -> Any:
            with pool.connection() as conn:
                return dashboard_store.call(fn, conn, *args)

        return await asyncio.to_thread(job)

    return run
