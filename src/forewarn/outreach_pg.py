"""The outreach routes' store on PostgreSQL (the scale-out mode): what `api_outreach`'s routes
read and write, for a scale-out API process to serve them with the embedded contract.

Each function here is the twin of the `store_outbox` function of the same name, on the same
tables (consent, suppressions, the outbox, inbox, push subscriptions, trigger overrides,
secrets; and reports and backtests, in `report_pg`), with the same statements, rewritten for
psycopg's placeholders (`schema.placeholders`, once, at import, but for the outreach list's,
which is built per request), and the audit rows on PostgreSQL (`audit_pg`). What they write
is what the workers' policy (`store_pg.standing`, `store_pg.trigger_overrides`) and the
delivery processes (`outbox_pg`) read, so an unsubscribe or a pause takes effect as in the
embedded mode.
`runner` gives `api_outreach.routes` its way of calling them.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

import psycopg

from forewarn import audit, audit_pg, report, report_pg, store_outbox, store_pg, widget
from forewarn.schema import placeholders
from forewarn.store_outbox import PENDING, SUPPRESSED

Conn = psycopg.Connection[Any]

_CONSENT = placeholders(store_outbox.CONSENT)
_UNSUBSCRIBED = placeholders(store_outbox.UNSUBSCRIBED)
_RESUBSCRIBE = placeholders(store_outbox.RESUBSCRIBE)
_SUPPRESSION = placeholders(store_outbox.SUPPRESSION)
_SUPPRESS_WAITING = placeholders(
    store_outbox.SUPPRESS_WAITING.format(
        # a NUL a message holds (escaped: \u0000) made a space, as PostgreSQL's JSON cannot hold
        # one (as schema version 9 reads messages)
        accounts="json_array_elements_text(replace(convert_from(message, 'UTF8'),"
        " '\\u0000', '\\u0020')::json -> 'data' -> 'accounts')"
    )
)
_UNSUPPRESS = placeholders(store_outbox.UNSUPPRESS)
_INBOX = placeholders(store_outbox.INBOX)
_SUBSCRIPTIONS = placeholders(store_outbox.SUBSCRIPTIONS)
_SUBSCRIBE = placeholders(store_outbox.SUBSCRIBE)
_SECRET = placeholders(store_outbox.SECRET)
_NEW_SECRET = placeholders(store_outbox.NEW_SECRET)
_OVERRIDE = placeholders(store_outbox.OVERRIDE)
_RESUME = placeholders(store_outbox.RESUME)
_OVERRIDES = placeholders(store_outbox.OVERRIDES)
_SET_SECRET = placeholders(store_outbox.SET_SECRET)
_INBOX_AFTER = placeholders(store_outbox.INBOX_AFTER)
_CONVERSATION = placeholders(store_outbox.CONVERSATION)
_CONVERSATION_MESSAGES = placeholders(store_outbox.CONVERSATION_MESSAGES)
_ADD_CONVERSATION_MESSAGE = placeholders(store_outbox.ADD_CONVERSATION_MESSAGE) + " RETURNING id"
_ESCALATE = placeholders(store_outbox.ESCALATE)


def unsubscribe(
    conn: Conn, workspace: int, scope: str, subject: str, channel: str, source: str, now_ms: int
) -> int:
    with conn.transaction():
        conn.execute(_CONSENT, (workspace, scope, subject, channel, now_ms, source))
        cur = conn.execute(
            _UNSUBSCRIBED,
            (SUPPRESSED, now_ms, workspace, scope, subject, PENDING, channel, channel),
        )
        return cur.rowcount


def resubscribe(conn: Conn, workspace: int, scope: str, subject: str, channel: str) -> None:
    conn.execute(_RESUBSCRIBE, (workspace, scope, subject, channel, channel))


def suppress(
    conn: Conn,
    workspace: int,
    scope: str,
    subject: str,
    reason: str,
    until_ms: int | None,
    now_ms: int,
    actor: str = "cli",
) -> int:
    with conn.transaction():
        said = reason if scope == "account" else None  # (as `store_outbox.suppress`)
        detail = {"scope": scope, "reason": said, "until_ms": until_ms}
        target = audit.subject_target(workspace, scope, subject)
        audit_pg.record(conn, workspace, actor, "subject.suppressed", target, now_ms, detail)
        conn.execute(_SUPPRESSION, (workspace, scope, subject, reason, until_ms, now_ms))
        args = store_outbox.suppress_waiting_args(workspace, scope, subject, until_ms, now_ms)
        return conn.execute(_SUPPRESS_WAITING, args).rowcount


def unsuppress(
    conn: Conn, workspace: int, scope: str, subject: str, actor: str, now_ms: int
) -> bool:
    with conn.transaction():
        cur = conn.execute(_UNSUPPRESS, (workspace, scope, subject))
        if cur.rowcount > 0:
            target = audit.subject_target(workspace, scope, subject)
            detail = {"scope": scope}
            audit_pg.record(conn, workspace, actor, "subject.unsuppressed", target, now_ms, detail)
        return cur.rowcount > 0


def inbox(
    conn: Conn, workspace: int, scope: str, subject: str, limit: int = 50
) -> list[dict[str, Any]]:
    return store_outbox.inbox_rows(conn.execute(_INBOX, (workspace, scope, subject, limit)))


def inbox_after(
    conn: Conn, workspace: int, scope: str, subject: str, after_id: int
) -> list[dict[str, Any]]:
    rows = conn.execute(_INBOX_AFTER, (workspace, scope, subject, after_id))
    return store_outbox.inbox_rows(rows)


def conversation(
    conn: Conn, workspace: int, scope: str, subject: str, conversation_id: int
) -> store_outbox.Conversation | None:
    row = conn.execute(_CONVERSATION, (conversation_id, workspace, scope, subject)).fetchone()
    return None if row is None else store_outbox.conversation_from(row)


def conversation_messages(conn: Conn, conversation_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(_CONVERSATION_MESSAGES, (conversation_id,))
    return store_outbox.conversation_message_rows(rows)


def add_conversation_message(
    conn: Conn, workspace: int, conversation_id: int, author: str, text: str, now_ms: int
) -> int:
    args = (workspace, conversation_id, author, text, now_ms)
    row = conn.execute(_ADD_CONVERSATION_MESSAGE, args).fetchone()
    assert row is not None
    return int(row[0])


def escalate(conn: Conn, conversation_id: int, now_ms: int) -> bool:
    return conn.execute(_ESCALATE, (now_ms, conversation_id)).rowcount > 0


def identity_secret(conn: Conn, workspace: int) -> str:
    return secret(conn, f"identity:{workspace}")


def set_identity_secret(conn: Conn, workspace: int, secret: str) -> None:
    conn.execute(_SET_SECRET, (f"identity:{workspace}", secret))


def set_origins(conn: Conn, workspace: int, origins: str) -> None:
    conn.execute(_SET_SECRET, (widget.origins_name(workspace), widget.clean_origins(origins)))


def get_origins(conn: Conn, workspace: int) -> frozenset[str]:
    row = conn.execute(_SECRET, (widget.origins_name(workspace),)).fetchone()
    return widget.origins_of(row[0] if row else "")


def subscriptions(conn: Conn, workspace: int, scope: str, subject: str) -> list[dict[str, Any]]:
    rows = conn.execute(_SUBSCRIPTIONS, (workspace, scope, subject))
    return store_outbox.subscription_rows(rows)


def subscribe(
    conn: Conn,
    workspace: int,
    scope: str,
    subject: str,
    endpoint: str,
    p256dh: str,
    auth: str,
    now_ms: int,
) -> None:
    conn.execute(_SUBSCRIBE, (workspace, scope, subject, endpoint, p256dh, auth, now_ms))


def query_outreach(
    conn: Conn,
    workspace: int,
    subject: str | None = None,
    trigger: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    sql, args = store_outbox.outreach_query(workspace, subject, trigger, status, limit)
    return store_outbox.outreach_rows(conn.execute(placeholders(sql), args))


def secret(conn: Conn, name: str) -> str:
    """Read without a write once it exists (a pixel or a click per request)."""
    row = conn.execute(_SECRET, (name,)).fetchone()
    if row is None:
        conn.execute(_NEW_SECRET, (name, secrets.token_urlsafe(32)))
        row = conn.execute(_SECRET, (name,)).fetchone()
    assert row is not None
    return str(row[0])


def override_trigger(
    conn: Conn,
    workspace: int,
    trigger: str,
    mode: str,
    reason: str,
    by: str,
    now_ms: int,
    actor: str | None = None,
) -> None:
    with conn.transaction():
        conn.execute(_OVERRIDE, (workspace, trigger, mode, reason, by, now_ms))
        action = "trigger.paused" if mode == "paused" else "trigger.shadowed"
        detail = {"reason": reason}
        audit_pg.record(conn, workspace, actor or by, action, trigger, now_ms, detail)


def resume_trigger(conn: Conn, workspace: int, trigger: str, by: str, now_ms: int) -> bool:
    with conn.transaction():
        cur = conn.execute(_RESUME, (workspace, trigger))
        if cur.rowcount > 0:
            audit_pg.record(conn, workspace, by, "trigger.resumed", trigger, now_ms)
        return cur.rowcount > 0


def trigger_overrides(conn: Conn, workspace: int) -> dict[str, dict[str, Any]]:
    return store_outbox.override_rows(conn.execute(_OVERRIDES, (workspace,)))


# the embedded store's function -> its twin here
TWINS: dict[Callable[..., Any], Callable[..., Any]] = {
    store_outbox.unsubscribe: unsubscribe,
    store_outbox.resubscribe: resubscribe,
    store_outbox.suppress: suppress,
    store_outbox.unsuppress: unsuppress,
    store_outbox.inbox: inbox,
    store_outbox.subscriptions: subscriptions,
    store_outbox.subscribe: subscribe,
    store_outbox.secret: secret,
    store_outbox.query_outreach: query_outreach,
    store_outbox.inbox_after: inbox_after,
    store_outbox.conversation: conversation,
    store_outbox.conversation_messages: conversation_messages,
    store_outbox.add_conversation_message: add_conversation_message,
    store_outbox.escalate: escalate,
    widget.identity_secret: identity_secret,
    widget.set_identity_secret: set_identity_secret,
    widget.set_origins: set_origins,
    widget.get_origins: get_origins,
    store_outbox.override_trigger: override_trigger,
    store_outbox.resume_trigger: resume_trigger,
    store_outbox.trigger_overrides: trigger_overrides,
    report.live_report: report_pg.live_report,
    report.log_events: report_pg.log_events,
    report.new_backtest: report_pg.new_backtest,
    report.finish_backtest: report_pg.finish_backtest,
    report.read_backtest: report_pg.read_backtest,
}

# the routes of `api_outreach` these serve
PATHS = frozenset(
    {
        "/u/{token}",
        "/o/{token}",
        "/c/{token}",
        "/e/{token}",
        "/api/v1/outreach",
        "/api/v1/reports",
        "/api/v1/backtests",
        "/api/v1/backtests/{id}",
        "/api/v1/triggers/overrides",
        "/api/v1/triggers/{trigger}/pause",
        "/api/v1/triggers/{trigger}/resume",
        "/api/v1/subjects/{subject}/suppress",
        "/api/v1/subjects/{subject}/unsuppress",
        "/api/v1/subjects/{subject}/unsubscribe",
        "/api/v1/subjects/{subject}/resubscribe",
        "/api/v1/subjects/{subject}/inbox",
        "/api/v1/subjects/{subject}/push-subscriptions",
    }
)
# the routes of `widget` these serve (not the demo page)
WIDGET_PATHS = frozenset(
    {
        "/widget.js",
        "/w/v1/events",
        "/w/v1/inbox",
        "/w/v1/stream",
        "/w/v1/conversations/{id}",
        "/w/v1/conversations/{id}/reply",
    }
)


def runner(pool: store_pg.Pool) -> Callable[..., Any]:
    """`api_outreach`'s `run(fn, *args)`: `fn`'s twin here, on a connection of the pool, in a
    thread."""

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        twin = TWINS.get(fn)
        if twin is None:  # a route mounted without its twin: a bug, not the caller's error
            raise RuntimeError(f"{fn.__qualname__} has no PostgreSQL twin in outreach_pg")

        def job() -> Any:
            with pool.connection() as conn:
                return twin(conn, *args)

        return await asyncio.to_thread(job)

    return run
