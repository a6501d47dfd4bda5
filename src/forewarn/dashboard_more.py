"""The dashboard's other pages as plain data: the outbox (with the demo's captured emails), the
backtests, the settings and the customers seen lately. Edge (reads the database, either
store (`dashboard_store`), the environment and the demo's mail folder).
"""

from __future__ import annotations

import email
import email.policy
import html
import re
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import nh3

from forewarn import audit, settings, store_outbox
from forewarn.dashboard_store import call, dialect, execute
from forewarn.model import format_time

MAILS = 50  # captured emails shown at most
MAIL_BYTES = 1024 * 1024  # of a larger file, this much is read and shown
OUTBOX_ROWS = 100


def _time(ms: int | None) -> str | None:
    return None if ms is None else format_time(ms)


# --- the outbox -------------------------------------------------------------------------------


def outbox(conn: Any, workspace: int, now_ms: int) -> dict[str, Any]:
    """Messages waiting or retrying, those that gave up (dead letters), the latest sent, and
    the emails the demo's mail sink captured (when FOREWARN_DEMO_MAILDIR is set)."""
    counts = {
        str(status): int(n)
        for status, n in execute(
            conn,
            "SELECT status, count(*) FROM outbox WHERE workspace = ? GROUP BY status",
            (workspace,),
        )
    }
    rows = execute(
        conn,
        "SELECT id, firing, channel, trig, subject, scope, status, reason, attempts, due_ms,"
        " created_ms, done_ms, detail, message FROM outbox WHERE workspace = ?"
        " ORDER BY (status = 'pending') DESC, id DESC LIMIT ?",
        (workspace, OUTBOX_ROWS),
    ).fetchall()
    messages = []
    for row in rows:
        fid, firing, channel, trig, subject, scope, status, reason, attempts, *rest = row
        due, created, done, detail, message = rest
        body = msgspec.json.decode(message)
        messages.append(
            {
                "id": fid,
                "firing": firing,
                "channel": channel,
                "trigger": trig,
                "subject": subject,
                "scope": scope,
                "status": status,
                "reason": reason,
                "attempts": attempts,
                "due": _time(due) if status == "pending" else None,
                "created": _time(created),
                "done": _time(done),
                "detail": detail,
                "to": body.get("to", ""),
                "title": body.get("title", ""),
                "text": body.get("text", ""),
            }
        )
    # the mail folder is one for the whole server and holds every workspace's mail: it is
    # shown to the first workspace only, the one a demo or a test server runs
    first = execute(conn, "SELECT min(id) FROM workspaces").fetchone()[0]
    folder = settings.env("DEMO_MAILDIR") if workspace == first else ""
    return {
        "counts": counts,
        "messages": messages,
        "maildir": folder,
        "emails": captured_emails(Path(folder)) if folder else [],
    }


def captured_emails(folder: Path, limit: int = MAILS) -> list[dict[str, Any]]:
    """The newest `.eml` files in `folder`: sender, recipients, subject, date and the text
    (an HTML-only message is shown as its text, all markup removed)."""
    if not folder.is_dir():
        return []
    dated = []
    for path in folder.glob("*.eml"):
        try:
            dated.append((path.stat().st_mtime, path))
        except OSError:
            continue  # gone since it was listed
    out = []
    for _, path in sorted(dated, reverse=True)[:limit]:
        item: dict[str, Any] = {"file": path.name, "text": ""}
        try:
            with path.open("rb") as f:
                raw = f.read(MAIL_BYTES)  # a larger one is shown cut short
            parsed = email.message_from_bytes(raw, policy=email.policy.default)
        except OSError as exc:
            item["error"] = f"could not read it: {exc}"
            out.append(item)
            continue
        assert isinstance(parsed, EmailMessage)
        for header in ("subject", "from", "to", "date"):
            item[header] = str(parsed.get(header, ""))
        item["text"] = _text_of(parsed)
        out.append(item)
    return out


def _text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    try:
        content = part.get_content()
    except (LookupError, ValueError):
        return "(this part could not be decoded)"
    if not isinstance(content, str):
        return ""
    if part.get_content_subtype() == "html":  # text only: never the sender's markup
        content = _BLOCK_END.sub("\n", content)  # paragraphs stay apart as lines
        content = html.unescape(nh3.clean(content, tags=set(), strip_comments=True))
        content = re.sub(r"\n{3,}", "\n\n", content)
    return content.strip()


_BLOCK_END = re.compile(r"<br\s*/?>|</(?:p|div|li|tr|h[1-6]|blockquote|table)\s*>", re.I)


# --- backtests --------------------------------------------------------------------------------


def backtests(conn: Any, workspace: int) -> dict[str, Any]:
    rows = execute(
        conn,
        "SELECT id, status, params, created_ms, done_ms FROM backtests WHERE workspace = ?"
        " ORDER BY id DESC LIMIT 50",
        (workspace,),
    ).fetchall()
    return {
        "backtests": [
            {
                "id": i,
                "status": status,
                **msgspec.json.decode(params),
                "created": format_time(created),
                "done": _time(done),
            }
            for i, status, params, created, done in rows
        ]
    }


# --- settings ---------------------------------------------------------------------------------


def _endpoint(url: str | None) -> str | None:
    """Where a URL points, without what it may carry (passwords, tokens in the path)."""
    if not url:
        return None
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


SETTINGS_AUDIT_ROWS = 20


def settings_view(conn: Any, workspace: int) -> dict[str, Any]:
    """Keys (their prefixes, never the keys), channels and whether each is configured, and the
    policy: caps, quiet hours, the holdout and the auto-guard. Secrets are never shown."""
    keys = [
        {
            "id": i,
            "kind": kind,
            "prefix": prefix,
            "name": name,
            "created": format_time(created),
            "revoked": _time(revoked),
        }
        for i, kind, prefix, name, created, revoked in execute(
            conn,
            "SELECT id, kind, prefix, name, created_ms, revoked_ms FROM keys WHERE workspace = ?"
            " ORDER BY id",
            (workspace,),
        )
    ]
    env = settings.env
    channels = [
        {
            "channel": "email",
            "configured": bool(env("SMTP_URL")),
            "detail": _endpoint(env("SMTP_URL")),
            "from": env("EMAIL_FROM"),
        },
        {
            "channel": "webhook",
            "configured": bool(env("WEBHOOK_URL")),
            "detail": _endpoint(env("WEBHOOK_URL")),
            "signed": bool(env("WEBHOOK_SECRET")),
        },
        {
            "channel": "push",
            "configured": bool(env("VAPID_PRIVATE_KEY") and env("VAPID_PUBLIC_KEY")),
            "detail": env("VAPID_SUBJECT"),
        },
        {"channel": "in_app", "configured": True, "detail": "the widget's inbox"},
        {
            "channel": "chat",
            "configured": True,
            "detail": "answers from " + (env("KB") or "no knowledge base"),
        },
    ]
    policy = {
        name.lower(): env(name)
        for name in (
            "FREQUENCY_CAPS",
            "CHANNEL_CAPS",
            "QUIET_HOURS",
            "TIMEZONE",
            "PRIORITY_WINDOW",
            "EPISODE",
            "GUARD_EVERY",
            "RETENTION",
            "DELIVERY",
            "DELIVERY_ATTEMPTS",
        )
    }
    suppressed = execute(
        conn, "SELECT count(*) FROM suppressions WHERE workspace = ?", (workspace,)
    ).fetchone()[0]
    unsubscribed = execute(
        conn, "SELECT count(*) FROM consent WHERE workspace = ?", (workspace,)
    ).fetchone()[0]
    return {
        "keys": keys,
        "channels": channels,
        "policy": policy,
        "public_url": env("PUBLIC_URL"),
        "widget_origins": env("WIDGET_ORIGINS"),
        "suppressed_subjects": int(suppressed),
        "unsubscribed": int(unsubscribed),
        "overrides": {
            t: {**o, "at": format_time(o["at_ms"])}
            for t, o in call(store_outbox.trigger_overrides, conn, workspace).items()
        },
        "audit": [
            {**row, "at": format_time(row.pop("at_ms"))}
            for row in audit.read(conn, workspace, SETTINGS_AUDIT_ROWS, dialect=dialect(conn))
        ],
    }


# --- customers --------------------------------------------------------------------------------


def recent_customers(conn: Any, workspace: int) -> dict[str, Any]:
    """The subjects fired for most recently: where a look usually starts."""
    rows = execute(
        conn,
        "SELECT subject, scope, max(at_ms), count(*) FROM firings WHERE workspace = ?"
        " GROUP BY subject, scope ORDER BY 3 DESC, 1, 2 LIMIT 50",
        (workspace,),
    ).fetchall()
    return {
        "customers": [
            {"id": s, "scope": scope, "last_firing": format_time(at), "firings": n}
            for s, scope, at, n in rows
        ]
    }
