"""The outreach routes: the admin API's view of what was decided and delivered, suppression and
consent for a subject, the in-app inbox, and the one-click unsubscribe link (RFC 8058). Edge.

An unsubscribe link carries a token signed with a secret kept in the database: it names the
workspace, the subject and the channel. `POST` to it unsubscribes at once (what mail clients send
for one-click: `List-Unsubscribe=One-Click`); `GET` only shows a page with a button that posts,
so a link scanner that fetches every URL in a mail never unsubscribes anyone.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from forewarn import clock, links, store_outbox, store_sqlite
from forewarn.errors import InputError, NotFoundError
from forewarn.links import CHANNELS, SCOPES, SECRET_NAME, read_token
from forewarn.model import MAX_TIME_MS, format_time
from forewarn.store_sqlite import Append

if TYPE_CHECKING:
    from forewarn.api import Forewarn


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def _conn(db: str) -> Any:
    return store_sqlite.connect(db)


def _scope(value: Any) -> str:
    scope = "user" if value is None else value
    if scope not in SCOPES:
        raise InputError(f"scope {value!r}: give 'user' or 'account'")
    return str(scope)


async def _body(request: Request, fields: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object a POST sends (empty: `{}`), holding only these fields: a misspelt one is
    refused rather than silently ignored."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise InputError("the body is not JSON: send a JSON object, e.g. {}") from None
    if not isinstance(data, dict):
        raise InputError('the body must be a JSON object, e.g. {"scope": "account"}')
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(
            f"unknown field {unknown[0]!r}: this route takes "
            + (", ".join(fields) if fields else "no fields")
        )
    if _has_nul(data):  # (as ingest refuses it; PostgreSQL cannot store it either)
        raise InputError("the body contains a NUL character (\\u0000): send text without it")
    return data


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _subject(request: Request) -> str:
    """The subject a path names; no id holds a NUL character (ingest refuses them)."""
    subject = str(request.path_params["subject"])
    if _has_nul(subject):
        raise InputError("the subject id contains a NUL character: no subject has one")
    return subject


_DATE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def date_time_ms(value: object, name: str) -> int:
    """An RFC 3339 date-time (`2026-11-23T18:00:00Z`, the zone required) as milliseconds,
    clamped to the years Forewarn keeps (1970 to 9999); InputError otherwise."""
    try:
        if not isinstance(value, str) or not _DATE_TIME.fullmatch(value):
            raise ValueError(value)
        when = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise InputError(
            f"{name}={value!r} is not an ISO 8601 date-time with its zone (RFC 3339), "
            "e.g. 2026-11-23T18:00:00Z"
        ) from None
    ms = (when - _EPOCH) // _ONE_MS
    return min(max(ms, 0), MAX_TIME_MS - 1)


def _since(text: object, now_ms: int) -> int:
    """The start of a period given as a duration back from now (`30d`); a period longer than
    the epoch means everything."""
    from forewarn.playbook import parse_duration

    try:
        span = parse_duration(text)
    except ValueError as exc:
        raise InputError(f"since: {exc}") from None
    return max(0, now_ms - span)


Run = Callable[..., Awaitable[Any]]


def sqlite_run(db: str) -> Run:
    """Call `fn(conn, *args)` on a connection of its own to the embedded store, in a thread
    (a `Run`)."""

    def run(fn: Any, *args: Any) -> Awaitable[Any]:
        def job() -> Any:
            conn = _conn(db)
            try:
                return fn(conn, *args)
            finally:
                conn.close()

        return asyncio.to_thread(job)

    return run


def routes(app: Forewarn, run: Run | None = None) -> list[Route]:
    """The routes; `run(fn, *args)` calls a `store_outbox` function with a connection (by
    default to the embedded store; a scale-out API process gives `outreach_pg.runner`, which
    calls its twin on PostgreSQL). Engagement goes into the log through `app.writer`."""
    db = app.settings.db
    run = run or sqlite_run(db)

    async def reports(request: Request) -> Response:
        from forewarn import report

        key = app.admin_key(request)
        q = request.query_params
        trigger = q.get("trigger")
        triggers = app.engines.triggers
        if trigger is not None and trigger not in {t.id for t in triggers}:
            raise NotFoundError(f"trigger={trigger!r}: no such trigger in the loaded playbooks")
        now = clock.now_ms()
        since_ms = _since(q.get("since", "30d"), now)
        result = await run(report.live_report, key.workspace, triggers, since_ms, now, trigger)
        return _json(result)

    async def pause(request: Request) -> Response:
        key = app.admin_key(request)
        trigger = request.path_params["trigger"]
        if trigger not in {t.id for t in app.engines.triggers}:
            raise NotFoundError(f"no trigger '{trigger}' in the loaded playbooks")
        if request.url.path.endswith("/resume"):
            resumed = await run(
                store_outbox.resume_trigger, key.workspace, trigger, key.prefix, clock.now_ms()
            )
            return _json({"trigger": trigger, "mode": None, "resumed": resumed})
        body = await _body(request, ("mode", "reason"))
        mode = body.get("mode", "paused")
        if mode not in store_outbox.OVERRIDE_MODES:
            allowed = ", ".join(store_outbox.OVERRIDE_MODES)
            raise InputError(f"mode {mode!r}: give one of {allowed}")
        reason = body.get("reason", "paused through the admin API")
        if not isinstance(reason, str) or not reason.strip():
            raise InputError('reason must be text, e.g. "too many dismissals"')
        await run(
            store_outbox.override_trigger,
            key.workspace,
            trigger,
            mode,
            reason[:500],
            "admin",
            clock.now_ms(),
            key.prefix,
        )
        return _json({"trigger": trigger, "mode": mode, "reason": reason[:500]})

    async def overrides(request: Request) -> Response:
        key = app.admin_key(request)
        found = await run(store_outbox.trigger_overrides, key.workspace)
        for value in found.values():
            value["at"] = format_time(value.pop("at_ms"))
        return _json({"overrides": found})

    async def backtest(request: Request) -> Response:
        key = app.admin_key(request)
        body = await _body(request, ("since", "triggers"))
        since = body.get("since", "30d")
        now = clock.now_ms()
        since_ms = _since(since, now)
        triggers = app.engines.triggers
        if "triggers" in body:
            chosen = body["triggers"]
            known = {t.id for t in triggers}
            if not isinstance(chosen, list) or not all(isinstance(c, str) for c in chosen):
                raise InputError(
                    f"triggers must be a list of the loaded triggers: {', '.join(sorted(known))}"
                )
            missing = [c for c in chosen if c not in known]
            if missing:
                raise NotFoundError(
                    f"no trigger {missing[0]!r}: the loaded triggers are "
                    + ", ".join(sorted(known))
                )
            triggers = [t for t in triggers if t.id in chosen]
        job = await start_backtest(run, key.workspace, triggers, since, since_ms, now)
        return _json({"id": job, "status": "running", **_backtest_params(since, triggers)})

    async def get_backtest(request: Request) -> Response:
        from forewarn import report

        key = app.admin_key(request)
        raw = request.path_params["id"]
        found = await run(report.read_backtest, key.workspace, int(raw)) if raw.isdigit() else None
        if found is None:
            raise NotFoundError(f"no backtest {raw}")
        return _json(found)

    async def target(request: Request, *fields: str) -> tuple[int, str, dict[str, Any], str]:
        """For a POST about a subject: the workspace (of the admin key), the subject, the JSON
        body (`scope` and these fields) and the scope it names."""
        key = app.admin_key(request)
        body = await _body(request, ("scope", *fields))
        scope = _scope(body.get("scope", "user") or "")
        return key.workspace, _subject(request), body, scope

    async def outreach(request: Request) -> Response:
        key = app.admin_key(request)
        q = request.query_params
        status = q.get("status")
        allowed = (*store_outbox.STATUSES, "held_out")
        if status is not None and status not in allowed:
            raise InputError(f"status={status!r}: give one of {', '.join(allowed)}")
        limit = _limit(q.get("limit"))
        if _has_nul([q.get("subject"), q.get("trigger")]):
            return _json({"outreach": []})  # (no id holds one, and PostgreSQL cannot look)
        rows = await run(
            store_outbox.query_outreach,
            key.workspace,
            q.get("subject"),
            q.get("trigger"),
            status,
            limit,
        )
        for row in rows:
            for name in ("at_ms", "send_at_ms", "done_ms"):
                value = row.pop(name)
                row[name[:-3]] = None if value is None else format_time(value)
        return _json({"outreach": rows})

    async def suppress(request: Request) -> Response:
        workspace, subject, body, scope = await target(request, "reason", "until")
        reason = body.get("reason", "suppressed by the admin API")
        if not isinstance(reason, str) or not reason.strip():
            raise InputError('reason must be text, e.g. "incident INC-42"')
        until_ms = date_time_ms(body["until"], "until") if "until" in body else None
        stopped = await run(
            store_outbox.suppress,
            workspace,
            scope,
            subject,
            reason[:500],
            until_ms,
            clock.now_ms(),
            app.admin_key(request).prefix,
        )
        return _json({"subject": subject, "scope": scope, "suppressed": True, "stopped": stopped})

    async def unsuppress(request: Request) -> Response:
        workspace, subject, _, scope = await target(request)
        actor = app.admin_key(request).prefix
        lifted = await run(
            store_outbox.unsuppress, workspace, scope, subject, actor, clock.now_ms()
        )
        return _json({"subject": subject, "scope": scope, "suppressed": False, "lifted": lifted})

    async def consent(request: Request) -> Response:
        workspace, subject, body, scope = await target(request, "channel")
        channel = body.get("channel", "*")
        if channel not in CHANNELS:
            raise InputError(f"channel {channel!r}: give one of {', '.join(CHANNELS)}")
        if request.url.path.endswith("/unsubscribe"):
            stopped = await run(
                store_outbox.unsubscribe,
                workspace,
                scope,
                subject,
                channel,
                "admin",
                clock.now_ms(),
            )
            return _json(
                {"subject": subject, "channel": channel, "unsubscribed": True, "stopped": stopped}
            )
        await run(store_outbox.resubscribe, workspace, scope, subject, channel)
        return _json({"subject": subject, "channel": channel, "unsubscribed": False})

    async def inbox(request: Request) -> Response:
        key = app.admin_key(request)
        subject = request.path_params["subject"]
        scope = _scope(request.query_params.get("scope"))
        rows = (
            []
            if _has_nul(subject)
            else await run(store_outbox.inbox, key.workspace, scope, subject, 100)
        )
        return _json({"subject": subject, "scope": scope, "messages": rows})

    async def push_subscriptions(request: Request) -> Response:
        if request.method == "GET":
            key = app.admin_key(request)
            subject = request.path_params["subject"]
            scope = _scope(request.query_params.get("scope"))
            subs = (
                []  # (no id holds a NUL character, and PostgreSQL cannot look one up)
                if _has_nul(subject)
                else await run(store_outbox.subscriptions, key.workspace, scope, subject)
            )
            return _json({"subject": subject, "scope": scope, "subscriptions": subs})
        workspace, subject, body, scope = await target(
            request, "endpoint", "expirationTime", "keys"
        )
        endpoint, keys = body.get("endpoint"), body.get("keys")
        if not isinstance(endpoint, str) or not endpoint.startswith("https://"):
            raise InputError("endpoint must be the https:// URL of the browser's PushSubscription")
        if len(endpoint) > 2000:
            raise InputError("endpoint is over 2000 characters: send the subscription unmodified")
        expires = body.get("expirationTime")
        if expires is not None and (
            isinstance(expires, bool) or not isinstance(expires, int | float)
        ):
            raise InputError("expirationTime must be a number or null, as the browser gives it")
        if (
            not isinstance(keys, dict)
            or set(keys) != {"p256dh", "auth"}
            or not all(isinstance(keys[k], str) and 0 < len(keys[k]) <= 200 for k in keys)
        ):
            raise InputError(
                "keys must hold the subscription's p256dh and auth, as PushSubscription.toJSON()"
                " gives them"
            )
        await run(
            store_outbox.subscribe,
            workspace,
            scope,
            subject,
            endpoint,
            keys["p256dh"],
            keys["auth"],
            clock.now_ms(),
        )
        return _json({"subject": subject, "scope": scope, "subscribed": True})

    async def unsubscribe_link(request: Request) -> Response:
        token = request.path_params["token"]
        secret = await run(store_outbox.secret, SECRET_NAME)
        ws, scope, subject, channel = read_token(secret, token)
        what = "all messages" if channel == "*" else f"{channel.replace('_', '-')} messages"
        if request.method == "GET":
            return HTMLResponse(_PAGE.format(what=html.escape(what), action=html.escape(token)))
        await run(store_outbox.unsubscribe, ws, scope, subject, channel, "link", clock.now_ms())
        return HTMLResponse(_DONE.format(what=html.escape(what)))

    async def record(sent: links.About, name: str, extra: dict[str, Any], mid: str) -> None:
        now = clock.now_ms()
        message = links.event_message(sent, name, now, extra, mid)
        await app.writer.submit(Append(sent.workspace, "forewarn", now, [message], [mid], None))

    async def opened(request: Request) -> Response:
        secret = await run(store_outbox.secret, SECRET_NAME)
        sent = links.read_engagement(secret, request.path_params["token"])
        await record(sent, "Message Opened", {}, f"{sent.key}:Message Opened")
        return Response(PIXEL, media_type="image/gif", headers={"cache-control": "no-store"})

    async def clicked(request: Request) -> Response:
        secret = await run(store_outbox.secret, SECRET_NAME)
        sent, url = links.read_click(secret, request.path_params["token"])
        digest = hashlib.blake2b(url.encode(), digest_size=8).hexdigest()
        await record(sent, "Message Clicked", {"url": url}, f"{sent.key}:Message Clicked:{digest}")
        return RedirectResponse(url, status_code=302)

    async def engaged(request: Request) -> Response:
        secret = await run(store_outbox.secret, SECRET_NAME)
        sent = links.read_engagement(secret, request.path_params["token"])
        body = await _body(request, ("event", "url", "text"))
        what = body.get("event")
        if not isinstance(what, str) or what not in ENGAGEMENTS:
            raise InputError(f"event {what!r}: give one of {', '.join(ENGAGEMENTS)}")
        for field in ("url", "text"):
            if not isinstance(body.get(field, ""), str):
                raise InputError(f"{field} must be text")
        name = ENGAGEMENTS[what]
        extra: dict[str, Any] = {}
        mid = f"{sent.key}:{name}"
        if what == "clicked" and isinstance(body.get("url"), str):
            extra["url"] = body["url"][:2000]
        if what == "replied":  # every reply counts
            text = body.get("text")
            if isinstance(text, str):
                extra["text"] = text[:2000]
            mid += f":{clock.now_ms()}"
        await record(sent, name, extra, mid)
        return _json({"recorded": name})

    return [
        Route("/o/{token}", opened, methods=["GET"]),
        Route("/c/{token}", clicked, methods=["GET"]),
        Route("/e/{token}", engaged, methods=["POST"]),
        Route("/api/v1/outreach", outreach, methods=["GET"]),
        Route("/api/v1/reports", reports, methods=["GET"]),
        Route("/api/v1/backtests", backtest, methods=["POST"]),
        Route("/api/v1/backtests/{id}", get_backtest, methods=["GET"]),
        Route("/api/v1/triggers/overrides", overrides, methods=["GET"]),
        Route("/api/v1/triggers/{trigger}/pause", pause, methods=["POST"]),
        Route("/api/v1/triggers/{trigger}/resume", pause, methods=["POST"]),
        Route("/api/v1/subjects/{subject}/suppress", suppress, methods=["POST"]),
        Route("/api/v1/subjects/{subject}/unsuppress", unsuppress, methods=["POST"]),
        Route("/api/v1/subjects/{subject}/unsubscribe", consent, methods=["POST"]),
        Route("/api/v1/subjects/{subject}/resubscribe", consent, methods=["POST"]),
        Route("/api/v1/subjects/{subject}/inbox", inbox, methods=["GET"]),
        Route(
            "/api/v1/subjects/{subject}/push-subscriptions",
            push_subscriptions,
            methods=["GET", "POST"],
        ),
        Route("/u/{token}", unsubscribe_link, methods=["GET", "POST"]),
    ]


# backtests run one at a time, on a thread of their own: a few long ones never hold the
# threads that requests use, and never compete with each other for the CPU
_BACKTESTS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forewarn-backtest")
_running: set[asyncio.Task[None]] = set()


def _backtest_params(since: str, triggers: list[Any]) -> dict[str, Any]:
    return {"since": since, "triggers": [t.id for t in triggers]}


async def start_backtest(
    run: Run, workspace: int, triggers: list[Any], since: str, since_ms: int, now_ms: int
) -> int:
    """Record a backtest of `triggers` over the log from `since_ms` to now and start it (it
    waits for the one before to finish); returns its id. `run`: as `routes` takes it."""
    from forewarn import report

    params = _backtest_params(since, triggers)
    job = int(await run(report.new_backtest, workspace, params, now_ms))
    task = asyncio.get_running_loop().create_task(
        _run_backtest(run, workspace, job, triggers, since_ms, now_ms)
    )
    _running.add(task)
    task.add_done_callback(_running.discard)
    return job


async def _run_backtest(
    run: Run, workspace: int, job: int, triggers: list[Any], since_ms: int, until_ms: int
) -> None:
    """The server's own log over the period, through the playbooks and the policy: read and
    run on the backtests' one thread, so one backtest's events at a time are in memory."""
    from forewarn import backtest, report, settings

    loop = asyncio.get_running_loop()

    async def called(fn: Any, *args: Any) -> Any:
        return await run(fn, *args)

    def call(fn: Any, *args: Any) -> Any:  # `run`, from the backtests' thread
        return asyncio.run_coroutine_threadsafe(called(fn, *args), loop).result()

    def work() -> None:
        try:
            events = call(report.log_events, workspace, since_ms, until_ms)
            result = backtest.run(triggers, events, settings.policy(), until_ms)
            status, payload = "done", msgspec.json.encode(result).decode()
        except Exception as exc:  # recorded for whoever asks, not lost in a log
            status, payload = "failed", msgspec.json.encode({"error": str(exc)}).decode()
        call(report.finish_backtest, job, status, payload, clock.now_ms())

    await loop.run_in_executor(_BACKTESTS, work)


def _limit(text: str | None) -> int:
    if text is None:
        return 100
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise InputError(f"limit={text!r}: give a whole number from 1 to 10000")
    return int(text)


def _json(data: Any) -> Response:
    return Response(msgspec.json.encode(data), media_type="application/json")


ENGAGEMENTS = {
    "opened": "Message Opened",
    "clicked": "Message Clicked",
    "dismissed": "Message Dismissed",
    "replied": "Message Replied",
}
# a transparent 1x1 GIF
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Unsubscribe</title></head>
<body><form method="post" action="{action}"><p>Stop receiving {what}?</p>
<button type="submit">Unsubscribe</button></form></body></html>"""
_DONE = """<!doctype html><html><head><meta charset="utf-8"><title>Unsubscribed</title></head>
<body><p>Done: you will not receive {what} any more.</p></body></html>"""
