"""The admin API of a scale-out API process (`forewarn serve --role api` on PostgreSQL): the
embedded server's routes and answers for what can be read from the database, and a clear
refusal for the rest.

- Served as in the embedded mode: `GET /api/v1/triggers` (this process's playbooks),
  `/api/v1/subjects/{id}` and `/api/v1/subjects/{id}/why` (from the partitions' stored
  states, `admin_pg`), `DELETE /api/v1/subjects/{id}` (forgetting the person, `privacy_pg`),
  `/api/v1/audit` (`audit_pg`), beside the ingest routes, `/api/v1/firings` and `/healthz`
  that `scaleout` serves, the outreach routes, reports and backtests it mounts from
  `api_outreach` over `outreach_pg` and `report_pg`, and the dashboard (`dashboard_pg`).
- `POST /api/v1/playbooks/reload` is refused, saying what to do instead: the workers load the
  playbooks when they start, so a reload is a restart of the workers, then the API processes.
- Every other route of the embedded server answers `501` with the code `embedded_only` (`405`,
  with `Allow`, for another method of a path served here).

`/openapi.json` describes exactly the operations served.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from forewarn import (
    admin_pg,
    api,
    api_privacy,
    audit_pg,
    clock,
    live,
    openapi,
    privacy_pg,
    store_pg,
)
from forewarn.errors import ForewarnError, InputError


class EmbeddedOnlyError(ForewarnError):
    status = 501
    code = "embedded_only"


RELOAD = (
    "the scale-out processes load the playbooks when they start, and a worker keeps a "
    "partition's state only under the playbooks it was made with: put the new playbooks in "
    "place, restart every worker process, then the API processes"
)
ABOUT = (
    "A scale-out API process on PostgreSQL: the ingest routes, the admin API's reads, its "
    "outreach routes, reports and backtests, the links inside messages, the widget API and the "
    "dashboard. The embedded server's other routes answer 501 `embedded_only` here."
)
OTHER_PLAYBOOKS = (
    "the subject's state was stored by workers running other playbooks than this process"
)


def routes(app: api.Forewarn, pool: store_pg.Pool, reader: admin_pg.Reader) -> list[Route]:
    """The admin reads and the refusal of a reload."""

    async def subject(request: Request) -> Response:
        key = app.admin_key(request)
        subject_id = request.path_params["subject"]

        def read() -> dict[str, Any]:
            with pool.connection() as conn:
                return reader.subject(conn, key.workspace, subject_id)

        found = await asyncio.to_thread(read)
        found["events"] = [api._event_summary(m) for m in found["events"]]
        found["firings"] = [live.firing_dict(r) for r in found["firings"]]
        return api._json(found)

    async def why(request: Request) -> Response:
        key = app.admin_key(request)
        subject_id = request.path_params["subject"]
        trigger = request.query_params.get("trigger")
        if not trigger:
            raise InputError("give ?trigger=<trigger id>: the trigger to explain")

        def read() -> dict[str, Any]:
            with pool.connection() as conn:
                return reader.why(conn, key.workspace, subject_id, trigger, clock.now_ms())

        return api._json(await asyncio.to_thread(read))

    async def audit_log(request: Request) -> Response:
        key = app.admin_key(request)
        limit, before, action = api_privacy.audit_query(request)

        def read() -> list[dict[str, Any]]:
            with pool.connection() as conn:
                return audit_pg.read(conn, key.workspace, limit, before, action)

        return api_privacy.audit_answer(await asyncio.to_thread(read))

    async def forget(request: Request) -> Response:
        key = app.admin_key(request)
        subject_id = request.path_params["subject"]

        def job() -> dict[str, Any]:
            done = privacy_pg.forget(pool, key.workspace, subject_id, key.prefix, clock.now_ms())
            return done.to_dict()

        return api._json({"forgotten": True, **await asyncio.to_thread(job)})

    async def one_subject(request: Request) -> Response:
        # one route for both methods: a 405 on it lists both in `Allow`
        return await (forget if request.method == "DELETE" else subject)(request)

    async def reload(request: Request) -> Response:
        app.admin_key(request)
        raise EmbeddedOnlyError(RELOAD)

    return [
        Route("/api/v1/subjects/{subject}", one_subject, methods=["GET", "DELETE"]),
        Route("/api/v1/subjects/{subject}/why", why, methods=["GET"]),
        Route("/api/v1/audit", audit_log, methods=["GET"]),
        Route("/api/v1/playbooks/reload", reload, methods=["POST"]),
    ]


def complete(app: api.Forewarn, served: list[Route]) -> list[Route]:
    """`served`, then `/openapi.json` describing them (but the reload's refusal), then a
    stand-in answering `embedded_only` for every other route of the embedded server."""
    refused = {("/api/v1/playbooks/reload", "post")}
    whole = openapi.OPENAPI["paths"]
    operations = {
        (path, method)
        for path, ops in whole.items()
        for method in ops
        if (path, method) not in refused
        and any(r.path_regex.match(path) and method.upper() in (r.methods or ()) for r in served)
    }
    operations.add(("/openapi.json", "get"))
    document = openapi.subset(operations, ABOUT)
    for path in ("/api/v1/subjects/{subject}", "/api/v1/subjects/{subject}/why"):
        document["paths"][path]["get"]["responses"]["409"] = openapi._error(OTHER_PLAYBOOKS)
    body = msgspec.json.encode(document)

    async def described(request: Request) -> Response:
        return Response(body, media_type="application/json")

    def embedded_only(allowed: set[str]) -> Callable[[Request], Awaitable[Response]]:
        """The stand-in of a route served in the embedded mode only; on a path served here
        with other methods, a 405 listing them in `Allow`."""

        async def refuse(request: Request) -> Response:
            if request.url.path.startswith("/api/v1/"):
                app.admin_key(request)  # the admin API's keys, as in the embedded mode
            error = EmbeddedOnlyError(
                f"{request.method} {request.url.path} is served in the embedded mode only (one "
                "process on SQLite), not by a scale-out API process: see /openapi.json for the "
                "routes served here"
            )
            if not allowed:
                raise error
            response = api._json(error.to_dict(), 405)
            response.headers["Allow"] = ", ".join(sorted(allowed))
            return response

        return refuse

    done = [*served, Route("/openapi.json", described, methods=["GET"])]
    for route in api.routes(app):
        if not isinstance(route, Route) or route.path == "/openapi.json":
            continue
        allowed = {m for r in done if r.path == route.path for m in r.methods or ()}
        methods = set(route.methods or ()) - allowed
        if methods:
            done.append(Route(route.path, embedded_only(allowed), methods=sorted(methods)))
    return done
