"""The delivery worker's outbox on PostgreSQL (`deliver.Outbox`): what `forewarn serve --role
delivery` drains. Rows are claimed with a lease, as on the embedded store, and with `FOR UPDATE
SKIP LOCKED`, so any number of delivery processes take different rows. A delivery's result
(`Message Sent`, `Message Failed`) goes into the event log and its queue in the transaction that
settles the row, for the workers to apply like any event.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec
import psycopg

from forewarn import outreach_pg, store_outbox, store_pg
from forewarn.channels import Outgoing
from forewarn.store_outbox import Claimed, Message, Standing
from forewarn.store_sqlite import Append, StoreError

_decode_message = msgspec.json.Decoder(Message).decode
_json = msgspec.json.Encoder().encode

_CLAIM = """
UPDATE outbox SET lease_ms = %s, attempts = attempts + 1 WHERE id IN (
    SELECT id FROM outbox WHERE status = %s AND due_ms <= %s AND lease_ms <= %s
    AND channel = ANY(%s) ORDER BY due_ms, id LIMIT %s FOR UPDATE SKIP LOCKED
)
RETURNING id, workspace, firing, key, channel, trig, subject, scope, message, attempts
"""


class PgOutbox:
    """`deliver.Outbox` over a pool: reads take any connection; the writes of one
    `transaction()` share one."""

    def __init__(self, pool: store_pg.Pool) -> None:
        self.pool = pool
        self._conn: psycopg.Connection[Any] | None = None

    @contextlib.contextmanager
    def _use(self) -> Iterator[psycopg.Connection[Any]]:
        if self._conn is not None:
            yield self._conn
            return
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:  # down, restarting, or a value refused: retried
            raise StoreError(f"PostgreSQL is unavailable ({exc}); retrying") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self._conn is not None:  # a part of the transaction already open
            yield
            return
        with self._use() as conn, conn.transaction():
            self._conn = conn
            try:
                yield
            finally:
                self._conn = None

    def claim(
        self, now_ms: int, lease_ms: int, limit: int, channels: Iterable[str]
    ) -> list[Claimed]:
        with self._use() as conn:
            rows = conn.execute(
                _CLAIM,
                (now_ms + lease_ms, store_outbox.PENDING, now_ms, now_ms, sorted(channels), limit),
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
                _decode_message(bytes(r[8])),
                int(r[9]),
            )
            for r in rows
        ]
        claimed.sort(key=lambda c: c.id)
        return claimed

    def still_pending(self, row: Claimed) -> bool:
        with self._use() as conn:
            found = conn.execute("SELECT status FROM outbox WHERE id = %s", (row.id,)).fetchone()
        return found is not None and found[0] == store_outbox.PENDING

    def trigger_mode(self, workspace: int, trigger: str) -> str | None:
        with self._use() as conn:
            return store_pg.trigger_overrides(conn, workspace).get(trigger)

    def standing(
        self,
        workspace: int,
        scope: str,
        subject: str,
        email: str | None,
        now_ms: int,
        accounts: list[str],
    ) -> Standing:
        with self._use() as conn:
            s = store_pg.standing(conn, workspace, scope, subject, email, now_ms, accounts)
        return Standing(s.unsubscribed, s.bounced, s.suppressed)

    def subscriptions(self, workspace: int, scope: str, subject: str) -> list[dict[str, Any]]:
        with self._use() as conn:
            return outreach_pg.subscriptions(conn, workspace, scope, subject)

    def endpoint_disabled(self, workspace: int, url: str) -> bool:
        with self._use() as conn:
            row = conn.execute(
                "SELECT 1 FROM disabled_endpoints WHERE workspace = %s AND url = %s",
                (workspace, url),
            ).fetchone()
        return row is not None

    def finish(
        self,
        row: Claimed,
        status: str,
        now_ms: int,
        *,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        with self._use() as conn:
            conn.execute(
                "UPDATE outbox SET status = %s, reason = %s, detail = %s, done_ms = %s,"
                " lease_ms = 0 WHERE id = %s",
                (status, reason, detail, now_ms, row.id),
            )

    def retry_later(self, row: Claimed, due_ms: int, detail: str) -> None:
        with self._use() as conn:
            conn.execute(
                "UPDATE outbox SET due_ms = %s, lease_ms = 0, detail = %s WHERE id = %s",
                (due_ms, detail, row.id),
            )

    def bounce(self, workspace: int, address: str, detail: str, now_ms: int) -> None:
        with self._use() as conn:
            conn.execute(
                "INSERT INTO bounces (workspace, address, detail, at_ms) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (workspace, address) DO UPDATE SET detail = excluded.detail,"
                " at_ms = excluded.at_ms",
                (workspace, address.strip().lower(), detail, now_ms),
            )

    def disable_endpoint(self, workspace: int, url: str, detail: str, now_ms: int) -> None:
        with self._use() as conn:
            conn.execute(
                "INSERT INTO disabled_endpoints (workspace, url, detail, at_ms)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (workspace, url) DO UPDATE SET"
                " detail = excluded.detail, at_ms = excluded.at_ms",
                (workspace, url, detail, now_ms),
            )

    def forget_endpoints(self, workspace: int, endpoints: Iterable[str]) -> None:
        with self._use() as conn:
            conn.execute(
                "DELETE FROM push_subscriptions WHERE workspace = %s AND endpoint = ANY(%s)",
                (workspace, list(endpoints)),
            )

    def add_to_inbox(self, message: Outgoing, kind: str, now_ms: int) -> bool:
        m = message
        engagement = str(m.data.get("engagement_url", ""))
        context = _json({"trigger": m.trigger, "evidence": m.data.get("evidence", {})}).decode()
        with self._use() as conn:
            row = conn.execute(
                "INSERT INTO inbox (workspace, scope, subject, key, trig, kind, title, text, html,"
                " engagement_url, context, created_ms) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (workspace, key) DO NOTHING RETURNING id",
                (
                    m.workspace,
                    m.scope,
                    m.subject,
                    m.key,
                    m.trigger,
                    kind,
                    m.title,
                    m.text,
                    m.html,
                    engagement,
                    context,
                    now_ms,
                ),
            ).fetchone()
            if row is not None and kind == "chat":  # the opener starts the conversation
                conn.execute(
                    "INSERT INTO conversation_messages (workspace, conversation, author, text,"
                    " at_ms) VALUES (%s, %s, 'assistant', %s, %s)",
                    (m.workspace, row[0], m.text, now_ms),
                )
        return row is not None

    def record(self, append: Append) -> None:
        """A delivery result into the log and its queue, in the open transaction."""
        with self._use() as conn:
            store_pg.append_within(conn, append)
