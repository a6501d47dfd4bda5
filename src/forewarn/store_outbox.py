"""The outreach in the embedded store: the outbox, consent, bounces, suppressions, the in-app
inbox and push subscriptions (tables made by `store_sqlite`'s migration 3).

- `outbox`: one row per message decided (`send`), written in the engine step's transaction
  with its firing. `status` is `pending` until a delivery worker finishes it: `sent`, `dead`
  (dead-lettered after the last attempt or a permanent failure), `cancelled` (displaced by a
  higher priority before it went) or `suppressed` (consent withdrawn before it went). The
  idempotency `key` is unique per (trigger, subject, episode, channel). A worker claims rows
  by setting `lease_ms` in the future; a lease that runs out (the worker died) makes the row
  claimable again.
- `consent`: unsubscribed (scope, subject, channel or `*`); `bounces`: email addresses
  suppressed after a hard bounce or complaint; `suppressions`: subjects not to be contacted
  (an incident, say), until a time or until lifted.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from forewarn import audit, store_sqlite
from forewarn.channels import Outgoing

PENDING, SENT, DEAD, CANCELLED, SUPPRESSED = "pending", "sent", "dead", "cancelled", "suppressed"
STATUSES = (PENDING, SENT, DEAD, CANCELLED, SUPPRESSED)


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """The rendered message kept in an outbox row (see channels.Outgoing)."""

    to: str = ""
    title: str = ""
    text: str = ""
    html: str = ""
    data: dict[str, Any] = {}
    settings: dict[str, str] = {}


_encode = msgspec.json.Encoder().encode
_decode_message = msgspec.json.Decoder(Message).decode


def idempotency_key(
    workspace: int, trigger: str, scope: str, subject: str, episode_ms: int, channel: str
) -> str:
    text = f"{workspace}\x1f{trigger}\x1f{scope}\x1f{subject}\x1f{episode_ms}\x1f{channel}"
    return "fw_" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# --- written by the engine step ---------------------------------------------------------------


def enqueue(
    conn: sqlite3.Connection,
    workspace: int,
    firing: int,
    key: str,
    channel: str,
    trigger: str,
    scope: str,
    subject: str,
    message: Message,
    due_ms: int,
    now_ms: int,
    failed: str | None = None,
) -> None:
    """A message to send; or, with `failed` (why it could not be made), a dead letter."""
    row = (workspace, firing, key, channel, trigger, scope, subject, message, due_ms, now_ms)
    conn.execute(ENQUEUE, enqueue_args(*row, failed))


def enqueue_args(
    workspace: int,
    firing: int,
    key: str,
    channel: str,
    trigger: str,
    scope: str,
    subject: str,
    message: Message,
    due_ms: int,
    now_ms: int,
    failed: str | None = None,
) -> tuple[Any, ...]:
    """`ENQUEUE`'s arguments (`enqueue`'s)."""
    status, reason, done = (DEAD, "failed", now_ms) if failed is not None else (PENDING, None, None)
    row = (workspace, firing, key, channel, trigger, subject, scope, _encode(message), due_ms)
    return (*row, now_ms, status, reason, failed, done)


ENQUEUE = (
    "INSERT INTO outbox (workspace, firing, key, channel, trig, subject, scope,"
    " message, due_ms, created_ms, status, reason, detail, done_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (workspace, key) DO NOTHING"
)


def displace(conn: sqlite3.Connection, firing_ids: Iterable[int], now_ms: int) -> None:
    """Firings a higher priority took the place of: their message is cancelled if it has not
    gone yet, and their record says `lower_priority`."""
    for fid in firing_ids:
        # not one a worker holds right now: that one may be on its way, and its record stays
        cur = conn.execute(
            "UPDATE outbox SET status = ?, reason = 'lower_priority', done_ms = ?"
            " WHERE firing = ? AND status = ? AND lease_ms <= ?",
            (CANCELLED, now_ms, fid, PENDING, now_ms),
        )
        held_out = conn.execute(
            "SELECT 1 FROM firings WHERE id = ? AND decision = 'held_out'", (fid,)
        ).fetchone()
        if cur.rowcount or held_out:
            conn.execute(
                "UPDATE firings SET decision = 'suppressed', reason = 'lower_priority',"
                " send_at_ms = NULL WHERE id = ?",
                (fid,),
            )


# the firings that count as outreach for the policy's history (caps, episodes, priority)
OUTREACH = "decision IN ('send', 'held_out')"


def recent_outreach(
    conn: sqlite3.Connection, workspace: int, since_ms: int
) -> list[tuple[int, str, str, str, str, int, int]]:
    """(id, trigger, scope, subject, channel, at_ms, send_at_ms) of the firings sent or held
    out since `since_ms`: the policy's history after a restart."""
    return [
        (int(i), str(t), str(sc), str(su), str(c), int(a), int(s if s is not None else a))
        for i, t, sc, su, c, a, s in conn.execute(
            "SELECT id, trig, scope, subject, channel, at_ms, send_at_ms FROM firings"
            f" WHERE workspace = ? AND at_ms >= ? AND {OUTREACH}"
            " ORDER BY at_ms, id",
            (workspace, since_ms),
        )
    ]


# --- consent and suppression ------------------------------------------------------------------


def unsubscribe(
    conn: sqlite3.Connection,
    workspace: int,
    scope: str,
    subject: str,
    channel: str,
    source: str,
    now_ms: int,
) -> int:
    """Takes effect at once: what is still waiting in the outbox for the subject on that
    channel (every channel for `*`) is suppressed. Returns how many messages that stopped."""
    with store_sqlite.transaction(conn):
        conn.execute(CONSENT, (workspace, scope, subject, channel, now_ms, source))
        cur = conn.execute(
            UNSUBSCRIBED,
            (SUPPRESSED, now_ms, workspace, scope, subject, PENDING, channel, channel),
        )
        return cur.rowcount


# The statements below that end in the SQL both stores read (upserts as `ON CONFLICT`) are
# shared with PostgreSQL (`outreach_pg`), rewritten there for its placeholders.
CONSENT = (
    "INSERT INTO consent (workspace, scope, subject, channel, at_ms, source)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (workspace, scope, subject, channel)"
    " DO UPDATE SET at_ms = excluded.at_ms, source = excluded.source"
)
UNSUBSCRIBED = (
    "UPDATE outbox SET status = ?, reason = 'unsubscribed', done_ms = ?"
    " WHERE workspace = ? AND scope = ? AND subject = ? AND status = ?"
    " AND channel != 'webhook' AND (? = '*' OR channel = ?)"
)
RESUBSCRIBE = (
    "DELETE FROM consent WHERE workspace = ? AND scope = ? AND subject = ?"
    " AND (? = '*' OR channel = ?)"
)


def resubscribe(
    conn: sqlite3.Connection, workspace: int, scope: str, subject: str, channel: str
) -> None:
    conn.execute(RESUBSCRIBE, (workspace, scope, subject, channel, channel))


def bounce(
    conn: sqlite3.Connection, workspace: int, address: str, detail: str, now_ms: int
) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO bounces (workspace, address, detail, at_ms) VALUES (?, ?, ?, ?)",
        (workspace, address.strip().lower(), detail, now_ms),
    )


def suppress(
    conn: sqlite3.Connection,
    workspace: int,
    scope: str,
    subject: str,
    reason: str,
    until_ms: int | None,
    now_ms: int,
    actor: str = "cli",
) -> int:
    """The subject is not to be contacted until `until_ms` (or until lifted); messages still
    waiting for it are suppressed. Returns how many. `actor` goes into the audit log."""
    with store_sqlite.transaction(conn):
        # a person's suppression reason stays out of the log that a forget cannot clear
        said = reason if scope == "account" else None
        detail = {"scope": scope, "reason": said, "until_ms": until_ms}
        target = audit.subject_target(workspace, scope, subject)
        audit.record(conn, workspace, actor, "subject.suppressed", target, now_ms, detail)
        conn.execute(SUPPRESSION, (workspace, scope, subject, reason, until_ms, now_ms))
        cur = conn.execute(
            SUPPRESS_WAITING_SQLITE,
            suppress_waiting_args(workspace, scope, subject, until_ms, now_ms),
        )
        return cur.rowcount


SUPPRESSION = (
    "INSERT INTO suppressions (workspace, scope, subject, reason, until_ms, at_ms)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (workspace, scope, subject)"
    " DO UPDATE SET reason = excluded.reason, until_ms = excluded.until_ms, at_ms = excluded.at_ms"
)
# the subject's own messages waiting, and for an account those of its users ({accounts}: the
# accounts a message names, as rows of `value`, in each database's JSON functions)
SUPPRESS_WAITING = (
    "UPDATE outbox SET status = ?, reason = 'account_suppressed', done_ms = ?"
    " WHERE workspace = ? AND status = ? AND (CAST(? AS BIGINT) IS NULL OR due_ms < ?)"
    " AND ((scope = ? AND subject = ?) OR (? = 'account' AND scope = 'user' AND"
    " EXISTS (SELECT 1 FROM {accounts} WHERE value = ?)))"
)
SUPPRESS_WAITING_SQLITE = SUPPRESS_WAITING.format(
    accounts="json_each(CAST(message AS TEXT), '$.data.accounts')"
)
UNSUPPRESS = "DELETE FROM suppressions WHERE workspace = ? AND scope = ? AND subject = ?"


def suppress_waiting_args(
    workspace: int, scope: str, subject: str, until_ms: int | None, now_ms: int
) -> tuple[Any, ...]:
    """The parameters of `SUPPRESS_WAITING`."""
    window = (until_ms, until_ms)
    return (SUPPRESSED, now_ms, workspace, PENDING, *window, scope, subject, scope, subject)


def unsuppress(
    conn: sqlite3.Connection,
    workspace: int,
    scope: str,
    subject: str,
    actor: str,
    now_ms: int,
) -> bool:
    with store_sqlite.transaction(conn):
        cur = conn.execute(UNSUPPRESS, (workspace, scope, subject))
        if cur.rowcount > 0:
            detail = {"scope": scope}
            target = audit.subject_target(workspace, scope, subject)
            audit.record(conn, workspace, actor, "subject.unsuppressed", target, now_ms, detail)
        return cur.rowcount > 0


@dataclass(frozen=True)
class Standing:
    """What stands between a subject and a message, as the store knows it."""

    unsubscribed: frozenset[str]
    bounced: bool
    suppressed: str | None


def standing(
    conn: sqlite3.Connection,
    workspace: int,
    scope: str,
    subject: str,
    email: str | None,
    now_ms: int,
    accounts: Iterable[str] = (),
) -> Standing:
    """`accounts`: a user's accounts, whose suppression covers the user too."""
    channels = frozenset(
        str(c)
        for (c,) in conn.execute(
            "SELECT channel FROM consent WHERE workspace = ? AND scope = ? AND subject = ?",
            (workspace, scope, subject),
        )
    )
    bounced = False
    if isinstance(email, str) and email:
        bounced = (
            conn.execute(
                "SELECT 1 FROM bounces WHERE workspace = ? AND address = ?",
                (workspace, email.strip().lower()),
            ).fetchone()
            is not None
        )
    held = [(scope, subject)] + [("account", a) for a in accounts]
    suppressed = None
    for held_scope, held_subject in held:
        row = conn.execute(
            "SELECT reason FROM suppressions WHERE workspace = ? AND scope = ? AND subject = ?"
            " AND (until_ms IS NULL OR until_ms > ?)",
            (workspace, held_scope, held_subject, now_ms),
        ).fetchone()
        if row is not None:
            suppressed = str(row[0])
            break
    return Standing(channels, bounced, suppressed)


# --- the delivery worker's side ---------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    id: int
    workspace: int
    firing: int
    key: str
    channel: str
    trigger: str
    subject: str
    scope: str
    message: Message
    attempts: int  # including this one


def claim(
    conn: sqlite3.Connection, now_ms: int, lease_ms: int, limit: int, channels: Iterable[str]
) -> list[Claimed]:
    """Take up to `limit` due rows on these channels for `lease_ms`."""
    names = sorted(channels)
    marks = ", ".join("?" * len(names))
    with store_sqlite.transaction(conn):
        rows = conn.execute(
            "UPDATE outbox SET lease_ms = ?, attempts = attempts + 1 WHERE id IN ("
            f" SELECT id FROM outbox WHERE status = ? AND due_ms <= ? AND lease_ms <= ?"
            f" AND channel IN ({marks}) ORDER BY due_ms, id LIMIT ?)"
            " RETURNING id, workspace, firing, key, channel, trig, subject, scope, message,"
            " attempts",
            (now_ms + lease_ms, PENDING, now_ms, now_ms, *names, limit),
        ).fetchall()
    claimed = [
        Claimed(
            int(r[0]),
            int(r[1]),
            int(r[2]),
            str(r[3]),
            str(r[4]),
            str(r[5]),
            str(r[6]),
            str(r[7]),
            _decode_message(r[8]),
            int(r[9]),
        )
        for r in rows
    ]
    claimed.sort(key=lambda c: c.id)
    return claimed


def finish(
    conn: sqlite3.Connection,
    row: Claimed,
    status: str,
    now_ms: int,
    *,
    reason: str | None = None,
    detail: str | None = None,
) -> None:
    conn.execute(
        "UPDATE outbox SET status = ?, reason = ?, detail = ?, done_ms = ?, lease_ms = 0"
        " WHERE id = ?",
        (status, reason, detail, now_ms, row.id),
    )


def retry_later(conn: sqlite3.Connection, row: Claimed, due_ms: int, detail: str) -> None:
    conn.execute(
        "UPDATE outbox SET due_ms = ?, lease_ms = 0, detail = ? WHERE id = ?",
        (due_ms, detail, row.id),
    )


def still_pending(conn: sqlite3.Connection, row: Claimed) -> bool:
    found = conn.execute("SELECT status FROM outbox WHERE id = ?", (row.id,)).fetchone()
    return found is not None and found[0] == PENDING


def next_due(conn: sqlite3.Connection, channels: Iterable[str]) -> int | None:
    names = sorted(channels)
    marks = ", ".join("?" * len(names))
    row = conn.execute(
        f"SELECT min(max(due_ms, lease_ms)) FROM outbox WHERE status = ? AND channel IN ({marks})",
        (PENDING, *names),
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


# --- inbox, push subscriptions, endpoints -------------------------------------------------------


def add_to_inbox(conn: sqlite3.Connection, m: Outgoing, kind: str, now_ms: int) -> bool:
    """The message in the subject's inbox (`kind`: in_app, or chat for a conversation's
    opener); once per key. Whether it was new."""
    engagement = str(m.data.get("engagement_url", ""))
    # why it was sent, for the assistant of a chat: the trigger and its evidence
    context = _encode({"trigger": m.trigger, "evidence": m.data.get("evidence", {})}).decode()
    values = (m.workspace, m.scope, m.subject, m.key, m.trigger, kind, m.title, m.text)
    cur = conn.execute(
        "INSERT OR IGNORE INTO inbox (workspace, scope, subject, key, trig, kind, title, text,"
        " html, engagement_url, context, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*values, m.html, engagement, context, now_ms),
    )
    if cur.rowcount and kind == "chat":  # the opener is the conversation's first message
        conn.execute(
            "INSERT INTO conversation_messages (workspace, conversation, author, text, at_ms)"
            " VALUES (?, ?, 'assistant', ?, ?)",
            (m.workspace, cur.lastrowid, m.text, now_ms),
        )
    return cur.rowcount > 0


_INBOX = (
    "id",
    "kind",
    "trig",
    "title",
    "text",
    "html",
    "engagement_url",
    "created_ms",
    "read_ms",
    "dismissed_ms",
)


def inbox(
    conn: sqlite3.Connection, workspace: int, scope: str, subject: str, limit: int = 50
) -> list[dict[str, Any]]:
    """The subject's inbox, newest first."""
    return inbox_rows(conn.execute(INBOX, (workspace, scope, subject, limit)))


def inbox_after(
    conn: sqlite3.Connection, workspace: int, scope: str, subject: str, after_id: int
) -> list[dict[str, Any]]:
    """The subject's inbox messages newer than `after_id`, oldest first (for the stream)."""
    return inbox_rows(conn.execute(INBOX_AFTER, (workspace, scope, subject, after_id)))


_OF_SUBJECT = f"SELECT {', '.join(_INBOX)} FROM inbox WHERE workspace = ? AND scope = ?"
INBOX = _OF_SUBJECT + " AND subject = ? ORDER BY id DESC LIMIT ?"
INBOX_AFTER = _OF_SUBJECT + " AND subject = ? AND id > ? ORDER BY id LIMIT 100"


def inbox_rows(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """Rows of `INBOX` as the API answers them."""
    names = ["trigger" if c == "trig" else c for c in _INBOX]
    return [dict(zip(names, r, strict=True)) for r in rows]


@dataclass(frozen=True)
class Conversation:
    id: int
    trigger: str
    key: str
    context: dict[str, Any]
    escalated: bool


def conversation(
    conn: sqlite3.Connection, workspace: int, scope: str, subject: str, conversation_id: int
) -> Conversation | None:
    """The subject's own conversation with that id; None for anyone else's."""
    row = conn.execute(CONVERSATION, (conversation_id, workspace, scope, subject)).fetchone()
    return None if row is None else conversation_from(row)


CONVERSATION = (
    "SELECT id, trig, key, context, escalated_ms FROM inbox WHERE id = ? AND workspace = ?"
    " AND scope = ? AND subject = ? AND kind = 'chat'"
)
CONVERSATION_MESSAGES = (
    "SELECT id, author, text, at_ms FROM conversation_messages WHERE conversation = ? ORDER BY id"
)
ADD_CONVERSATION_MESSAGE = (
    "INSERT INTO conversation_messages (workspace, conversation, author, text, at_ms)"
    " VALUES (?, ?, ?, ?, ?)"
)
ESCALATE = "UPDATE inbox SET escalated_ms = ? WHERE id = ? AND escalated_ms IS NULL"


def conversation_from(row: Sequence[Any]) -> Conversation:
    return Conversation(
        int(row[0]), str(row[1]), str(row[2]), msgspec.json.decode(row[3]), row[4] is not None
    )


def conversation_message_rows(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    return [{"id": i, "author": a, "text": t, "at_ms": at} for i, a, t, at in rows]


def conversation_messages(conn: sqlite3.Connection, conversation_id: int) -> list[dict[str, Any]]:
    return conversation_message_rows(conn.execute(CONVERSATION_MESSAGES, (conversation_id,)))


def add_conversation_message(
    conn: sqlite3.Connection,
    workspace: int,
    conversation_id: int,
    author: str,
    text: str,
    now_ms: int,
) -> int:
    cur = conn.execute(ADD_CONVERSATION_MESSAGE, (workspace, conversation_id, author, text, now_ms))
    return int(cur.lastrowid or 0)


def escalate(conn: sqlite3.Connection, conversation_id: int, now_ms: int) -> bool:
    cur = conn.execute(ESCALATE, (now_ms, conversation_id))
    return cur.rowcount > 0


def subscriptions(
    conn: sqlite3.Connection, workspace: int, scope: str, subject: str
) -> list[dict[str, Any]]:
    return subscription_rows(conn.execute(SUBSCRIPTIONS, (workspace, scope, subject)))


SUBSCRIPTIONS = (
    "SELECT endpoint, p256dh, auth FROM push_subscriptions"
    " WHERE workspace = ? AND scope = ? AND subject = ? ORDER BY created_ms"
)
SUBSCRIBE = (
    "INSERT INTO push_subscriptions (workspace, scope, subject, endpoint, p256dh, auth,"
    " created_ms) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (workspace, endpoint) DO UPDATE SET"
    " scope = excluded.scope, subject = excluded.subject, p256dh = excluded.p256dh,"
    " auth = excluded.auth, created_ms = excluded.created_ms"
)


def subscription_rows(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    return [{"endpoint": e, "keys": {"p256dh": p, "auth": a}} for e, p, a in rows]


def subscribe(
    conn: sqlite3.Connection,
    workspace: int,
    scope: str,
    subject: str,
    endpoint: str,
    p256dh: str,
    auth: str,
    now_ms: int,
) -> None:
    conn.execute(SUBSCRIBE, (workspace, scope, subject, endpoint, p256dh, auth, now_ms))


def forget_endpoints(conn: sqlite3.Connection, workspace: int, endpoints: Iterable[str]) -> None:
    conn.executemany(
        "DELETE FROM push_subscriptions WHERE workspace = ? AND endpoint = ?",
        [(workspace, e) for e in endpoints],
    )


def disable_endpoint(
    conn: sqlite3.Connection, workspace: int, url: str, detail: str, now_ms: int
) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO disabled_endpoints (workspace, url, detail, at_ms)"
        " VALUES (?, ?, ?, ?)",
        (workspace, url, detail, now_ms),
    )


def endpoint_disabled(conn: sqlite3.Connection, workspace: int, url: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM disabled_endpoints WHERE workspace = ? AND url = ?", (workspace, url)
    ).fetchone()
    return row is not None


# --- the admin API's view -----------------------------------------------------------------------


def query_outreach(
    conn: sqlite3.Connection,
    workspace: int,
    subject: str | None = None,
    trigger: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Each decided firing with its delivery: `status` is the outbox row's, or the decision
    (`held_out`, `suppressed`) when nothing was to be sent."""
    sql, args = outreach_query(workspace, subject, trigger, status, limit)
    return outreach_rows(conn.execute(sql, args))


def outreach_query(
    workspace: int, subject: str | None, trigger: str | None, status: str | None, limit: int
) -> tuple[str, list[Any]]:
    """The statement of `query_outreach` (in the SQL both stores read) and its arguments."""
    where, args = store_sqlite.filters(
        ("f.workspace = ?", workspace),
        ("f.subject = ?", subject),
        ("f.trig = ?", trigger),
        ("coalesce(o.status, f.decision) = ?", status),
    )
    args.append(limit)
    sql = (
        "SELECT f.id, f.trig, f.subject, f.scope, f.channel, f.at_ms, f.decision, f.reason,"
        " f.send_at_ms, coalesce(o.status, f.decision), o.reason, o.attempts, o.done_ms,"
        " o.detail, o.key FROM firings f LEFT JOIN outbox o ON o.firing = f.id"
        f" WHERE {where} ORDER BY f.id DESC LIMIT ?"
    )
    return sql, args


def outreach_rows(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    cols = (
        "firing",
        "trigger",
        "subject",
        "scope",
        "channel",
        "at_ms",
        "decision",
        "reason",
        "send_at_ms",
        "status",
        "status_reason",
        "attempts",
        "done_ms",
        "detail",
        "key",
    )
    return [dict(zip(cols, r, strict=True)) for r in rows]


def secret(conn: sqlite3.Connection, name: str) -> str:
    """A random secret kept in the database, made on first use (e.g. for unsubscribe links);
    read without a write once it exists, so readers never wait for the write lock."""
    row = conn.execute(SECRET, (name,)).fetchone()
    if row is None:
        conn.execute(NEW_SECRET, (name, secrets.token_urlsafe(32)))
        row = conn.execute(SECRET, (name,)).fetchone()
    return str(row[0])


SECRET = "SELECT value FROM secrets WHERE name = ?"
NEW_SECRET = "INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"
SET_SECRET = (
    "INSERT INTO secrets (name, value) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)


# --- triggers paused or put in shadow (by hand, or by the auto-guard) -------------------------

OVERRIDE_MODES = ("paused", "shadow")


def override_trigger(
    conn: sqlite3.Connection,
    workspace: int,
    trigger: str,
    mode: str,
    reason: str,
    by: str,
    now_ms: int,
    actor: str | None = None,
) -> None:
    """Pause the trigger or put it in shadow. `by` is what the dashboard shows (`admin`,
    `dashboard`, `auto-guard`); `actor`, who the audit log names (a key's prefix), `by` if
    not given."""
    with store_sqlite.transaction(conn):
        conn.execute(OVERRIDE, (workspace, trigger, mode, reason, by, now_ms))
        action = "trigger.paused" if mode == "paused" else "trigger.shadowed"
        detail = {"reason": reason}
        audit.record(conn, workspace, actor or by, action, trigger, now_ms, detail)


OVERRIDE = (
    'INSERT INTO trigger_overrides (workspace, trig, mode, reason, "by", at_ms)'
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (workspace, trig) DO UPDATE SET"
    ' mode = excluded.mode, reason = excluded.reason, "by" = excluded."by",'
    " at_ms = excluded.at_ms"
)
RESUME = "DELETE FROM trigger_overrides WHERE workspace = ? AND trig = ?"
OVERRIDES = 'SELECT trig, mode, reason, "by", at_ms FROM trigger_overrides WHERE workspace = ?'


def resume_trigger(
    conn: sqlite3.Connection,
    workspace: int,
    trigger: str,
    by: str,
    now_ms: int,
) -> bool:
    with store_sqlite.transaction(conn):
        cur = conn.execute(RESUME, (workspace, trigger))
        if cur.rowcount > 0:
            audit.record(conn, workspace, by, "trigger.resumed", trigger, now_ms)
        return cur.rowcount > 0


def trigger_overrides(conn: sqlite3.Connection, workspace: int) -> dict[str, dict[str, Any]]:
    return override_rows(conn.execute(OVERRIDES, (workspace,)))


def override_rows(rows: Iterable[Sequence[Any]]) -> dict[str, dict[str, Any]]:
    return {str(t): {"mode": m, "reason": r, "by": b, "at_ms": a} for t, m, r, b, a in rows}
