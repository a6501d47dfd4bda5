"""The HTTP API: ingest routes that real client libraries can point at, and the admin API.

Ingest (write key): Segment's tracking API, PostHog capture, Sentry envelopes, ticket and
Stripe webhooks. A request is authenticated, decompressed, parsed by `ingest` / `webhooks`
(one bad event never sinks its batch), committed by the `Writer`, and only then answered.

Admin (`Authorization: Bearer <admin key>`) under `/api/v1`; `/healthz`, `/metrics` and
`/openapi.json` are open. Every error has one JSON shape: `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import sqlite3
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import brotli
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from forewarn import (
    api_outreach,
    api_privacy,
    audit,
    clock,
    dashboard,
    ingest,
    store_sqlite,
    webhooks,
    widget,
)
from forewarn import openapi as openapi_document
from forewarn.errors import ForewarnError, InputError, NotFoundError, TooLargeError
from forewarn.forgotten import REASON
from forewarn.live import firing_dict
from forewarn.server import Engines, Writer
from forewarn.store_sqlite import Append, Key

log = logging.getLogger("forewarn")
RECENT_EVENTS = 50  # events in a subject's timeline (from the latest part of the log)
MAX_BODY_BYTES = 2 * 1024 * 1024  # on the wire, before decompression
MAX_INFLATED_BYTES = ingest.MAX_ENVELOPE_BYTES + 1024  # the largest body any route takes


class AuthError(ForewarnError):
    status = 401
    code = "unauthorized"


class ForbiddenError(ForewarnError):
    status = 403
    code = "forbidden"


class RateLimitError(ForewarnError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Settings:
    """What the routes need to know; built by `forewarn serve` from flags and environment."""

    db: str
    playbooks: str
    rate_limit_per_s: float = 50_000.0  # events per second per workspace, sustained
    rate_burst: float = 100_000.0
    stripe_secret: str | None = None
    stripe_tolerance_s: int = 300
    write_key: str | None = None  # the key the server was started with: the demo uses it


@dataclass
class Bucket:
    """A token bucket of events per workspace."""

    tokens: float
    at: float


@dataclass
class Counters:
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    flagged: int = 0
    requests: dict[str, int] = field(default_factory=dict)


class Forewarn:
    """The application object the routes close over."""

    def __init__(self, settings: Settings, writer: Writer, loop: Engines) -> None:
        self.settings = settings
        self.writer = writer
        self.engines = loop
        self.counters = Counters()
        self._read = store_sqlite.connect(settings.db)
        self._keys: dict[str, tuple[Key | None, float]] = {}
        self._buckets: dict[int, Bucket] = {}
        self._origins: dict[int, tuple[frozenset[str], float]] = {}
        self._assistant: widget.Answers | None = None
        self._model: Any = None
        self._llm: tuple[str, str | None, str | None] | None = None  # url, model, key
        self.knowledge: Any = None  # the loaded knowledge base, when there is one

    def use_knowledge(
        self,
        folder: str,
        llm_url: str | None,
        llm_model: str | None,
        llm_key: str | None,
        base_url: str = "",
    ) -> int:
        """Answer chat replies from this folder of articles (and a language model, when
        given). Returns the number of articles; a broken folder raises InputError."""
        from pathlib import Path

        from forewarn.assistant import KnowledgeBase

        self.knowledge = KnowledgeBase.load(Path(folder), base_url)
        self._llm = (llm_url, llm_model, llm_key) if llm_url else None
        return len(self.knowledge)

    def assistant(self) -> widget.Answers | None:
        """The chat assistant, if a knowledge base is configured (made on first use, on the
        server's event loop, where its model client lives)."""
        if self._assistant is None and self.knowledge is not None:
            from forewarn.assistant import Assistant, OpenAICompatible

            if self._llm is not None:
                url, model, key = self._llm
                self._model = OpenAICompatible(url, model or "", key)
            self._assistant = Assistant(self.knowledge, llm=self._model)
        return self._assistant

    async def close(self) -> None:
        if self._model is not None:
            await self._model.aclose()

    async def widget_origins(self, token: str | None) -> frozenset[str]:
        """The web origins the widget of this write key's workspace may be used from."""
        key = self.key(token)
        if key is None:
            return frozenset()
        now = time.monotonic()
        cached = self._origins.get(key.workspace)
        if cached is None or now - cached[1] > 5.0:
            cached = (self.read_origins(key.workspace), now)
            self._origins[key.workspace] = cached
        return cached[0]

    def read_origins(self, workspace: int) -> frozenset[str]:
        return widget.get_origins(self._read, workspace)

    # --- auth -------------------------------------------------------------------------

    def key(self, token: str | None) -> Key | None:
        if not token:
            return None
        now = time.monotonic()
        cached = self._keys.get(token)
        if cached is not None and (cached[0] is not None or now - cached[1] < 5.0):
            return cached[0]
        found = store_sqlite.find_key(self._read, token)
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[token] = (found, now)
        return found

    def forget_keys(self) -> None:
        """Look every key up again (one was revoked)."""
        self._keys.clear()

    def write_key(self, token: str | None) -> Key:
        found = self.key(token)
        if found is None:
            raise AuthError(
                "missing or unknown write key: send it as the Basic-auth user name "
                "(Segment), as `api_key` (PostHog) or as the DSN key (Sentry)"
            )
        if found.kind != "write":
            raise ForbiddenError("an admin key cannot ingest: use the workspace's write key")
        return found

    def admin_key(self, request: Request) -> Key:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        found = self.key(token.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            raise AuthError("missing or unknown admin key: send `Authorization: Bearer <key>`")
        if found.kind != "admin":
            raise ForbiddenError("a write key cannot use the admin API: use an admin key")
        return found

    def take(self, workspace: int, events: int) -> None:
        """Charge `events` to the workspace's rate limit, or refuse the request."""
        rate, burst = self.settings.rate_limit_per_s, self.settings.rate_burst
        now = time.monotonic()
        bucket = self._buckets.get(workspace)
        if bucket is None:
            bucket = self._buckets[workspace] = Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if events > bucket.tokens:
            wait = max(1, int((events - bucket.tokens) / rate + 0.999))
            raise RateLimitError(
                f"over this workspace's limit of {rate:g} events per second: retry after {wait} s",
                wait,
            )
        bucket.tokens -= events

    # --- ingest -----------------------------------------------------------------------

    async def store(self, key: Key, source: str, parsed: ingest.Parsed, received_ms: int) -> Any:
        self.take(key.workspace, max(1, len(parsed.messages)))
        c = self.counters
        c.requests[source] = c.requests.get(source, 0) + 1
        c.rejected += len(parsed.rejected)
        c.flagged += len(parsed.flagged)
        duplicates: list[int] = []
        refused: list[int] = []
        if parsed.messages:
            ids = [str(m["messageId"]) for m in parsed.messages]
            done = await self.writer.submit(
                Append(key.workspace, source, received_ms, parsed.messages, ids, parsed.events)
            )
            c.accepted += done.stored
            c.duplicates += len(done.duplicates)
            duplicates = done.duplicates
            refused = done.forgotten
            if refused:  # a forgotten person's: rejected too, in the answer's order
                c.rejected += len(refused)
                parsed.rejected = sorted(
                    [
                        *parsed.rejected,
                        *(
                            ingest.Rejection(
                                parsed.position(i), REASON, str(parsed.messages[i]["messageId"])
                            )
                            for i in refused
                        ),
                    ],
                    key=lambda r: r.index,
                )
        return {
            "success": True,
            "accepted": len(parsed.messages) - len(duplicates) - len(refused),
            "duplicates": len(duplicates),
            "rejected": [{"index": r.index, "reason": r.reason} for r in parsed.rejected],
            "flagged": parsed.flagged,
        }


# --- bodies -------------------------------------------------------------------------------


async def body_of(request: Request) -> bytes:
    """The request body, decompressed (gzip, deflate or brotli), within the size limits."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise TooLargeError(
            f"the request body is over {MAX_BODY_BYTES} bytes: send smaller batches"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TooLargeError(
                f"the request body is over {MAX_BODY_BYTES} bytes: send smaller batches"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding in ("gzip", "deflate"):
        return _inflate(raw, 47 if encoding == "gzip" else 15, encoding)
    if encoding == "br":
        return _unbrotli(raw)
    raise InputError(f"unknown Content-Encoding '{encoding}': send gzip, deflate, br or none")


def _inflate(raw: bytes, wbits: int, encoding: str) -> bytes:
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(raw, MAX_INFLATED_BYTES + 1)
    except zlib.error as exc:
        raise InputError(f"the body is not valid {encoding}: {exc}") from None
    if len(out) > MAX_INFLATED_BYTES or d.unconsumed_tail:
        raise TooLargeError(
            f"the decompressed body is over {MAX_INFLATED_BYTES} bytes: send smaller batches"
        )
    return out


def _unbrotli(raw: bytes) -> bytes:
    d = brotli.Decompressor()
    out = bytearray()
    try:
        out += d.process(raw[:65536])
        for start in range(65536, len(raw), 65536):
            if len(out) > MAX_INFLATED_BYTES:
                break
            out += d.process(raw[start : start + 65536])
    except brotli.error as exc:
        raise InputError(f"the body is not valid brotli: {exc}") from None
    if len(out) > MAX_INFLATED_BYTES:
        raise TooLargeError(
            f"the decompressed body is over {MAX_INFLATED_BYTES} bytes: send smaller batches"
        )
    return bytes(out)


def basic_user(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, _ = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise AuthError("the Basic authorization header is not valid base64") from None
    return user or None


# --- routes -------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


def _json(data: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(data), status_code=status, media_type="application/json")


def routes(app: Forewarn) -> list[Route]:
    async def segment(request: Request) -> Response:
        route = request.path_params["kind"]
        if route not in ingest.SEGMENT_ROUTES:
            raise NotFoundError(f"no route /v1/{route}: use /v1/batch or one of /v1/track, ...")
        received = clock.now_ms()
        user = basic_user(request)
        key = app.write_key(user) if user else None  # a key in the header: checked first
        body = await body_of(request)
        parsed = _parse_keyed(key, lambda: ingest.segment(body, route, received))
        key = key or app.write_key(parsed.write_key)
        return _json(await app.store(key, "segment", parsed, received))

    async def posthog(request: Request) -> Response:
        received = clock.now_ms()
        body = await body_of(request)
        sent_at = request.headers.get("posthog-request-timestamp")
        parsed = _parse_keyed(None, lambda: ingest.posthog(body, received, sent_at=sent_at))
        key = app.write_key(parsed.write_key)
        result = await app.store(key, "posthog", parsed, received)
        if request.url.path.startswith("/i/v1/"):
            return _json(ingest.posthog_v1_results(parsed))
        return _json({"status": 1, **result})

    async def sentry(request: Request) -> Response:
        received = clock.now_ms()
        token = ingest.sentry_key(request.headers.get("x-sentry-auth"), request.url.query or None)
        body = await body_of(request)
        parsed = ingest.sentry_envelope(body, received)
        key = app.write_key(token or parsed.write_key)
        result = await app.store(key, "sentry", parsed, received)
        # Sentry SDKs read the event id back; an envelope holds one error
        first = parsed.messages[0]["messageId"] if parsed.messages else None
        return _json({"id": first, **result})

    async def tickets(request: Request) -> Response:
        flavour = request.path_params["flavour"]
        if flavour not in webhooks.TICKET_FLAVOURS:
            raise NotFoundError(
                f"no ticket webhook '{flavour}': use /webhooks/tickets/"
                + " or /webhooks/tickets/".join(webhooks.TICKET_FLAVOURS)
            )
        received = clock.now_ms()
        key = app.write_key(basic_user(request) or request.query_params.get("key"))
        parsed = webhooks.tickets(await body_of(request), flavour, received)
        return _json(await app.store(key, f"tickets:{flavour}", parsed, received))

    async def stripe(request: Request) -> Response:
        received = clock.now_ms()
        key = app.write_key(basic_user(request) or request.query_params.get("key"))
        secret = app.settings.stripe_secret
        if not secret:
            raise ForbiddenError(
                "no Stripe signing secret is configured: set FOREWARN_STRIPE_SECRET"
            )
        parsed = webhooks.stripe(
            await body_of(request),
            request.headers.get("stripe-signature", ""),
            secret,
            received,
            app.settings.stripe_tolerance_s,
        )
        return _json(await app.store(key, "stripe", parsed, received))

    # --- admin ---

    async def triggers(request: Request) -> Response:
        app.admin_key(request)
        return _json({"triggers": [_trigger(t) for t in app.engines.triggers]})

    async def firings(request: Request) -> Response:
        key = app.admin_key(request)
        q = request.query_params
        since = q.get("since")
        since_ms = None if since is None else api_outreach.date_time_ms(since, "since")
        limit = _int(q.get("limit"), 1000, "limit", 1, 10_000)
        rows = await asyncio.to_thread(
            _query_firings,
            app.settings.db,
            key.workspace,
            q.get("trigger"),
            q.get("subject"),
            since_ms,
            limit,
        )
        return _json({"firings": [firing_dict(r) for r in rows]})

    async def subject(request: Request) -> Response:
        if request.method == "DELETE":
            return await api_privacy.forget(app, request)
        key = app.admin_key(request)
        subject_id = request.path_params["subject"]
        summary = await asyncio.to_thread(app_subject, app, key.workspace, subject_id)
        return _json(summary)

    async def why(request: Request) -> Response:
        key = app.admin_key(request)
        subject_id = request.path_params["subject"]
        trigger = request.query_params.get("trigger")
        if not trigger:
            raise InputError("give ?trigger=<trigger id>: the trigger to explain")
        return _json(await asyncio.to_thread(app_why, app, key.workspace, subject_id, trigger))

    async def reload(request: Request) -> Response:
        from forewarn import compose
        from forewarn.sources import load_playbooks

        key = app.admin_key(request)
        triggers = await asyncio.to_thread(load_playbooks, app.settings.playbooks)
        await asyncio.to_thread(compose.check, app.settings.playbooks, triggers)
        app.engines.reload(triggers)
        ids = [t.id for t in triggers]
        await asyncio.to_thread(_audit_reload, app.settings.db, key, ids)
        return _json({"reloaded": True, "triggers": [t.id for t in triggers]})

    async def healthz(request: Request) -> Response:
        return _json({"ok": True})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(_metrics(app), media_type="text/plain; version=0.0.4")

    async def openapi(request: Request) -> Response:
        return _json(openapi_document.OPENAPI)

    return [
        Route("/v1/{kind}", segment, methods=["POST"]),
        Route("/batch/", posthog, methods=["POST"]),
        Route("/capture/", posthog, methods=["POST"]),
        Route("/i/v1/analytics/events", posthog, methods=["POST"]),
        Route("/api/{project}/envelope/", sentry, methods=["POST"]),
        Route("/webhooks/tickets/{flavour}", tickets, methods=["POST"]),
        Route("/webhooks/stripe", stripe, methods=["POST"]),
        Route("/api/v1/triggers", triggers, methods=["GET"]),
        Route("/api/v1/firings", firings, methods=["GET"]),
        Route("/api/v1/subjects/{subject}", subject, methods=["GET", "DELETE"]),
        Route("/api/v1/subjects/{subject}/why", why, methods=["GET"]),
        Route("/api/v1/playbooks/reload", reload, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *api_outreach.routes(app),
        *api_privacy.routes(app),
        *widget.routes(app, app.assistant),
        *widget.demo_routes(app, app.settings.write_key),
        *dashboard.routes(app),
    ]


def _parse_keyed(key: Key | None, parse: Callable[[], ingest.Parsed]) -> ingest.Parsed:
    """Parse a body that may carry the write key; without a key from anywhere, a body that
    cannot be read is refused as unauthenticated (its problems are not for strangers)."""
    try:
        return parse()
    except ForewarnError:
        if key is None:
            raise AuthError(
                "missing write key: send it as the Basic-auth user name or in the body"
            ) from None
        raise


def _int(text: str | None, default: int, name: str, low: int, high: int) -> int:
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise InputError(f"{name}={text!r}: give a whole number from {low} to {high}")
    return int(text)


def _query_firings(
    db: str, ws: int, trigger: str | None, subject: str | None, since: int | None, limit: int
) -> list[Any]:
    conn = store_sqlite.connect(db)
    try:
        return store_sqlite.query_firings(conn, ws, trigger, subject, since, limit)
    finally:
        conn.close()


def _audit_reload(db: str, key: Key, triggers: list[str]) -> None:
    conn = store_sqlite.connect(db)
    try:
        detail = {"triggers": triggers}
        audit.record(
            conn, key.workspace, key.prefix, "playbooks.reloaded", "", clock.now_ms(), detail
        )
    finally:
        conn.close()


def _trigger(t: Any) -> dict[str, Any]:
    from forewarn import describe

    return {
        "id": t.id,
        "scope": t.scope,
        "mode": t.mode,
        "channel": t.action.channel,
        "priority": t.priority,
        "holdout": t.holdout,
        "description": t.description,
        "summary": describe.condition(t.when, t.scope),
    }


def app_subject(app: Forewarn, workspace: int, subject_id: str) -> dict[str, Any]:
    found = app.engines.subject_state(workspace, subject_id)
    if not found:
        raise NotFoundError(f"no subject '{subject_id}' in this workspace's events")
    conn = store_sqlite.connect(app.settings.db)
    try:
        rows = store_sqlite.query_firings(conn, workspace, None, subject_id, None, 50)
        events = store_sqlite.recent_events(conn, workspace, subject_id, RECENT_EVENTS)
    finally:
        conn.close()
    return {
        "id": subject_id,
        "as": found,
        "events": [_event_summary(m) for m in events],
        "firings": [firing_dict(r) for r in rows],
    }


def _event_summary(message: dict[str, Any]) -> dict[str, Any]:
    kind = message.get("type")
    return {
        "kind": kind,
        "name": message.get("event") if kind == "track" else message.get("name"),
        "at": message.get("timestamp"),
        "properties": message.get("properties") or {},
        "traits": message.get("traits") or {},
    }


def app_why(app: Forewarn, workspace: int, subject_id: str, trigger: str) -> dict[str, Any]:
    return app.engines.why(workspace, subject_id, trigger, clock.now_ms())


def ingest_metrics(c: Counters, more: list[str]) -> str:
    """/metrics in the Prometheus text format: the ingest counters, `more`, then the requests
    by source."""
    lines = [
        "# HELP forewarn_events_accepted_total Events committed to the log.",
        "# TYPE forewarn_events_accepted_total counter",
        f"forewarn_events_accepted_total {c.accepted}",
        "# HELP forewarn_events_rejected_total Events refused with a reason.",
        "# TYPE forewarn_events_rejected_total counter",
        f"forewarn_events_rejected_total {c.rejected}",
        "# HELP forewarn_events_duplicate_total Events already stored (a client's resend).",
        "# TYPE forewarn_events_duplicate_total counter",
        f"forewarn_events_duplicate_total {c.duplicates}",
        "# HELP forewarn_events_flagged_total Events stamped over 23 h after their receipt.",
        "# TYPE forewarn_events_flagged_total counter",
        f"forewarn_events_flagged_total {c.flagged}",
        *more,
    ]
    for source, n in sorted(c.requests.items()):
        lines.append(f'forewarn_requests_total{{source="{source}"}} {n}')
    return "\n".join(lines) + "\n"


def _metrics(app: Forewarn) -> str:
    stats = app.engines.stats_view()
    lag = sum(stats.lag.values())
    engine = [
        "# HELP forewarn_engine_events_total Events the engine applied since it started.",
        "# TYPE forewarn_engine_events_total counter",
        f"forewarn_engine_events_total {stats.events}",
        "# HELP forewarn_engine_errors_total Engine steps that failed and were retried.",
        "# TYPE forewarn_engine_errors_total counter",
        f"forewarn_engine_errors_total {stats.errors}",
        "# HELP forewarn_engine_up Whether the engine answered (1) or not (0).",
        "# TYPE forewarn_engine_up gauge",
        f"forewarn_engine_up {int(stats.up)}",
        "# HELP forewarn_firings_total Firings the engine recorded.",
        "# TYPE forewarn_firings_total counter",
        f"forewarn_firings_total {stats.firings}",
        "# HELP forewarn_engine_lag_batches Batches committed and not yet applied.",
        "# TYPE forewarn_engine_lag_batches gauge",
        f"forewarn_engine_lag_batches {lag}",
    ]
    return ingest_metrics(app.counters, engine)


# --- errors and the app -------------------------------------------------------------------


async def _forewarn_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ForewarnError)
    response = _json(exc.to_dict(), exc.status)
    if isinstance(exc, RateLimitError):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {
        404: f"no route {request.url.path}: see /openapi.json for the routes",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    response = _json({"error": {"code": code, "message": message}}, exc.status_code)
    response.headers.update(exc.headers or {})  # a 405's `Allow` (RFC 9110)
    return response


async def _store_failure(request: Request, exc: Exception) -> Response:
    """SQLite failed under a request (a full disk, a lock held too long): the request changed
    nothing, so it is a 507 or a 503 the client can retry, never a 500."""
    assert isinstance(exc, sqlite3.Error)
    log.warning("%s %s: the store failed: %s", request.method, request.url.path, exc)
    return await _forewarn_error(request, store_sqlite.unavailable(exc))


async def _server_error(request: Request, exc: Exception) -> Response:
    return _json(
        {"error": {"code": "internal", "message": "an internal error: it is logged; retry"}}, 500
    )


def build(app: Forewarn) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        app.writer.start()
        app.engines.start()
        try:
            yield
        finally:
            app.writer.stop()
            app.engines.stop()
            await app.close()

    web = Starlette(
        lifespan=lifespan,
        routes=routes(app),
        exception_handlers={
            ForewarnError: _forewarn_error,
            HTTPException: _http_error,
            sqlite3.Error: _store_failure,
            Exception: _server_error,
        },
    )
    web.add_middleware(widget.Cors, origins=app.widget_origins)
    return web
