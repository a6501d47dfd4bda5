"""Delivery: workers drain the outbox onto the channels. Edge.

A worker claims due rows with a lease, sends each on its channel — one at a time per channel,
the channels side by side — and settles it in one transaction with the event that reports it
(`Message Sent`, `Message Failed`), so analytics reads one log. A passing failure is retried with
exponential back-off and full jitter; after the last attempt, or a permanent failure, the row is
dead-lettered. Right before sending, consent is checked again: an unsubscribe that came after
the message was decided stops it.

A worker killed between sending and settling leaves its lease to run out; the row is then sent
again, with the same idempotency key. The in-app inbox, chat and webhooks (whose receivers
deduplicate by `webhook-id`) drop the second copy; email and push cannot, so a crash may
duplicate at most the one message each of their lanes had in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, assert_never

from forewarn import clock, links, store_outbox, store_sqlite
from forewarn.channel_webhook import retry_delay_ms
from forewarn.channels import Bounced, Channel, Failed, Gone, Outcome, Outgoing, Retry, Sent
from forewarn.store_outbox import Claimed
from forewarn.store_sqlite import StoreError as StoreUnavailable

log = logging.getLogger("forewarn.deliver")

MAX_ATTEMPTS = 8
LEASE_MS = 300_000
BATCH = 20
RESULTS_SOURCE = "forewarn"


class Outbox(Protocol):
    """What a delivery worker reads and writes: the embedded store's (`SqliteOutbox`) or
    PostgreSQL's (`outbox_pg.PgOutbox`). Writes happen inside `transaction()`."""

    def transaction(self) -> contextlib.AbstractContextManager[None]: ...
    def claim(
        self, now_ms: int, lease_ms: int, limit: int, channels: Iterable[str]
    ) -> list[Claimed]: ...
    def still_pending(self, row: Claimed) -> bool: ...
    def trigger_mode(self, workspace: int, trigger: str) -> str | None: ...
    def standing(
        self,
        workspace: int,
        scope: str,
        subject: str,
        email: str | None,
        now_ms: int,
        accounts: list[str],
    ) -> store_outbox.Standing: ...
    def subscriptions(self, workspace: int, scope: str, subject: str) -> list[dict[str, Any]]: ...
    def endpoint_disabled(self, workspace: int, url: str) -> bool: ...
    def finish(
        self,
        row: Claimed,
        status: str,
        now_ms: int,
        *,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None: ...
    def retry_later(self, row: Claimed, due_ms: int, detail: str) -> None: ...
    def bounce(self, workspace: int, address: str, detail: str, now_ms: int) -> None: ...
    def disable_endpoint(self, workspace: int, url: str, detail: str, now_ms: int) -> None: ...
    def forget_endpoints(self, workspace: int, endpoints: Iterable[str]) -> None: ...
    def add_to_inbox(self, message: Outgoing, kind: str, now_ms: int) -> bool: ...
    def record(self, append: store_sqlite.Append) -> None: ...


class SqliteOutbox:
    """The delivery worker's `Outbox` on the embedded store."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return store_sqlite.transaction(self.conn)

    def claim(
        self, now_ms: int, lease_ms: int, limit: int, channels: Iterable[str]
    ) -> list[Claimed]:
        return store_outbox.claim(self.conn, now_ms, lease_ms, limit, channels)

    def still_pending(self, row: Claimed) -> bool:
        return store_outbox.still_pending(self.conn, row)

    def trigger_mode(self, workspace: int, trigger: str) -> str | None:
        override = store_outbox.trigger_overrides(self.conn, workspace).get(trigger)
        return None if override is None else str(override["mode"])

    def standing(
        self,
        workspace: int,
        scope: str,
        subject: str,
        email: str | None,
        now_ms: int,
        accounts: list[str],
    ) -> store_outbox.Standing:
        return store_outbox.standing(self.conn, workspace, scope, subject, email, now_ms, accounts)

    def subscriptions(self, workspace: int, scope: str, subject: str) -> list[dict[str, Any]]:
        return store_outbox.subscriptions(self.conn, workspace, scope, subject)

    def endpoint_disabled(self, workspace: int, url: str) -> bool:
        return store_outbox.endpoint_disabled(self.conn, workspace, url)

    def finish(
        self,
        row: Claimed,
        status: str,
        now_ms: int,
        *,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        store_outbox.finish(self.conn, row, status, now_ms, reason=reason, detail=detail)

    def retry_later(self, row: Claimed, due_ms: int, detail: str) -> None:
        store_outbox.retry_later(self.conn, row, due_ms, detail)

    def bounce(self, workspace: int, address: str, detail: str, now_ms: int) -> None:
        store_outbox.bounce(self.conn, workspace, address, detail, now_ms)

    def disable_endpoint(self, workspace: int, url: str, detail: str, now_ms: int) -> None:
        store_outbox.disable_endpoint(self.conn, workspace, url, detail, now_ms)

    def forget_endpoints(self, workspace: int, endpoints: Iterable[str]) -> None:
        store_outbox.forget_endpoints(self.conn, workspace, endpoints)

    def add_to_inbox(self, message: Outgoing, kind: str, now_ms: int) -> bool:
        return store_outbox.add_to_inbox(self.conn, message, kind, now_ms)

    def record(self, append: store_sqlite.Append) -> None:
        """A delivery result into the event log, in the open transaction."""
        store_sqlite.append_within(self.conn, append)


def _outbox(store: sqlite3.Connection | Outbox) -> Outbox:
    return SqliteOutbox(store) if isinstance(store, sqlite3.Connection) else store


class InboxChannel:
    """`in_app` and `chat`: the message lands in the subject's inbox in the database (chat
    marks it as a conversation's opener). The key is unique there, so a resend adds nothing."""

    deduplicates = True

    def __init__(
        self, store: sqlite3.Connection | Outbox, name: str, now_ms: Callable[[], int]
    ) -> None:
        self.store = _outbox(store)  # a connection to the embedded store, or an outbox
        self.name = name
        self.now_ms = now_ms

    async def send(self, message: Outgoing) -> Outcome:
        with self.store.transaction():
            new = self.store.add_to_inbox(message, self.name, self.now_ms())
        return Sent(detail="" if new else "already in the inbox")

    async def aclose(self) -> None:
        return None


class Worker:
    def __init__(
        self,
        store: sqlite3.Connection | Outbox,
        channels: Mapping[str, Channel],
        *,
        now_ms: Callable[[], int] = clock.now_ms,
        lease_ms: int = LEASE_MS,
        max_attempts: int = MAX_ATTEMPTS,
        batch: int = BATCH,
        rng: random.Random | None = None,
    ) -> None:
        self.store = _outbox(store)  # a connection to the embedded store, or an outbox
        self.channels = dict(channels)
        self.now_ms = now_ms
        self.lease_ms = lease_ms
        self.max_attempts = max_attempts
        self.batch = batch
        self.rng = rng or random.Random()
        self.counts: dict[str, int] = {}

    async def run_once(self) -> int:
        """Claim what is due and deliver it; returns how many rows were taken."""
        rows = self.store.claim(self.now_ms(), self.lease_ms, self.batch, self.channels)
        lanes: dict[str, list[Claimed]] = {}
        for row in rows:
            lanes.setdefault(row.channel, []).append(row)
        await asyncio.gather(*(self._lane(lane) for lane in lanes.values()))
        return len(rows)

    async def run(self, stop: asyncio.Event, idle_s: float = 0.5) -> None:
        """Deliver until `stop` is set, polling when idle."""
        while not stop.is_set():
            try:
                taken = await self.run_once()
            except (sqlite3.OperationalError, StoreUnavailable) as exc:  # locked, restarting
                log.warning("delivery: %s; trying again", exc)
                taken = 0
            if taken == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), idle_s)

    async def aclose(self) -> None:
        for channel in self.channels.values():
            await channel.aclose()

    async def _lane(self, rows: list[Claimed]) -> None:
        for row in rows:
            await self.deliver(row)

    async def deliver(self, row: Claimed) -> None:
        store = self.store
        if not store.still_pending(row):
            return  # cancelled or suppressed since it was claimed
        blocked = self._blocked(row)
        if blocked is not None:
            with store.transaction():
                store.finish(row, store_outbox.SUPPRESSED, self.now_ms(), reason=blocked)
            self._count("suppressed")
            return
        channel = self.channels[row.channel]
        outgoing = self._outgoing(row)
        if outgoing is None:
            outcome: Outcome = Failed(detail="no push subscription for the subject")
        elif row.channel == "webhook" and self._disabled(outgoing, channel):
            outcome = Failed(detail="the endpoint answered 410 Gone before: it is disabled")
        else:
            try:
                outcome = await channel.send(outgoing)
            except Exception as exc:  # a channel bug must not stop the other messages
                log.exception("channel %s failed on outbox row %d", row.channel, row.id)
                outcome = Retry(detail=f"{type(exc).__name__}: {exc}")
        self.settle(row, outcome)

    def _disabled(self, message: Outgoing, channel: Channel) -> bool:
        url = str(message.to or message.settings.get("url") or getattr(channel, "url", ""))
        return bool(url) and self.store.endpoint_disabled(message.workspace, url)

    def _blocked(self, row: Claimed) -> str | None:
        """Why the message may no longer go: its trigger paused or put in shadow since, consent
        withdrawn, or the subject (or its account) suppressed."""
        if row.firing != 0:  # (not the auto-guard's own message about the trigger)
            mode = self.store.trigger_mode(row.workspace, row.trigger)
            if mode is not None:
                return "paused" if mode == "paused" else "shadow"
        if row.channel == "webhook":
            return None
        accounts = row.message.data.get("accounts") or []
        s = self.store.standing(
            row.workspace,
            row.scope,
            row.subject,
            row.message.to or None,
            self.now_ms(),
            [str(a) for a in accounts],
        )
        if "*" in s.unsubscribed or row.channel in s.unsubscribed:
            return "unsubscribed"
        if row.channel == "email" and s.bounced:
            return "bounced"
        if s.suppressed is not None:
            return "account_suppressed"
        return None

    def _outgoing(self, row: Claimed) -> Outgoing | None:
        m = row.message
        data = m.data
        if row.channel == "push":
            subs = self.store.subscriptions(row.workspace, row.scope, row.subject)
            if not subs:
                return None
            data = {**data, "subscriptions": subs}
        return Outgoing(
            id=row.id,
            key=row.key,
            channel=row.channel,
            workspace=row.workspace,
            trigger=row.trigger,
            subject=row.subject,
            scope=row.scope,
            attempt=row.attempts,
            to=m.to,
            title=m.title,
            text=m.text,
            html=m.html,
            data=data,
            settings=m.settings,
        )

    def settle(self, row: Claimed, outcome: Outcome) -> None:
        """Record what came of a send, with its event, in one transaction."""
        store = self.store
        now = self.now_ms()
        with store.transaction():
            match outcome:
                case Sent():
                    if outcome.endpoints:
                        store.forget_endpoints(row.workspace, outcome.endpoints)
                    store.finish(row, store_outbox.SENT, now, detail=outcome.detail)
                    self._event(row, "Message Sent", now, {})
                    self._count("sent")
                case Retry():
                    if row.attempts >= self.max_attempts:
                        self._dead(row, now, "retries exhausted", outcome.detail)
                    else:
                        wait = max(retry_delay_ms(row.attempts, self.rng), outcome.after_ms or 0)
                        store.retry_later(row, now + wait, outcome.detail)
                        self._count("retried")
                case Failed():
                    self._dead(row, now, "failed", outcome.detail)
                case Bounced():
                    if row.message.to:
                        store.bounce(row.workspace, row.message.to, outcome.detail, now)
                    self._dead(row, now, "bounced", outcome.detail)
                case Gone():
                    if row.channel == "webhook":
                        for url in outcome.endpoints:
                            store.disable_endpoint(row.workspace, url, outcome.detail, now)
                    else:
                        store.forget_endpoints(row.workspace, outcome.endpoints)
                    self._dead(row, now, "gone", outcome.detail)
                case _:
                    assert_never(outcome)

    def _dead(self, row: Claimed, now: int, reason: str, detail: str) -> None:
        self.store.finish(row, store_outbox.DEAD, now, reason=reason, detail=detail)
        self._event(row, "Message Failed", now, {"failure": reason, "detail": detail[:500]})
        self._count("dead")

    def _event(self, row: Claimed, name: str, now: int, extra: dict[str, Any]) -> None:
        if row.firing == 0:
            return  # a message to the team about a trigger (the auto-guard's), not a subject
        self.store.record(
            store_sqlite.Append(
                row.workspace,
                RESULTS_SOURCE,
                now,
                [result_message(row, name, now, extra)],
                [f"{row.key}:{name}"],
            ),
        )

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


def result_message(row: Claimed, name: str, now_ms: int, extra: dict[str, Any]) -> dict[str, Any]:
    """A delivery result as a Segment track message, for the subject it concerns."""
    sent = links.About(row.workspace, row.scope, row.subject, row.trigger, row.channel, row.key)
    return links.event_message(
        sent, name, now_ms, {"attempt": row.attempts, **extra}, f"{row.key}:{name}"
    )


def channels_from_settings(conn: sqlite3.Connection | Outbox) -> dict[str, Channel]:
    """The channels this machine can deliver on. Without their settings, email and push are
    left out: their messages wait in the outbox until a worker that has them runs."""
    from forewarn import settings
    from forewarn.channel_push import PushChannel
    from forewarn.channel_webhook import WebhookChannel

    allow_private = settings.env("WEBHOOK_ALLOW_PRIVATE") in ("1", "true", "yes")
    channels: dict[str, Channel] = {
        "in_app": InboxChannel(conn, "in_app", clock.now_ms),
        "chat": InboxChannel(conn, "chat", clock.now_ms),
        "webhook": WebhookChannel(
            settings.env("WEBHOOK_URL") or "",
            settings.env("WEBHOOK_SECRET") or "",
            allow_private=allow_private,
        ),
    }
    vapid = settings.env("VAPID_PRIVATE_KEY")
    if vapid:
        channels["push"] = PushChannel(
            vapid, settings.env("VAPID_SUBJECT") or "", allow_private=allow_private
        )
    smtp = settings.env("SMTP_URL")
    if smtp:
        from forewarn.channel_email import EmailChannel

        channels["email"] = EmailChannel.from_url(smtp, settings.env("EMAIL_FROM") or "")
    return channels


def main(db: str, parent: int | None = None, url: str | None = None) -> None:
    """`forewarn deliver`: drain the outbox until stopped (SIGINT, SIGTERM, or the parent
    process gone); the outbox on PostgreSQL at `url` when given, else in the SQLite file."""
    import os
    import signal

    from forewarn import settings

    logging.basicConfig(level=logging.WARNING)
    from forewarn.errors import InputError
    from forewarn.playbook import parse_duration

    try:
        attempts = int(settings.env("DELIVERY_ATTEMPTS") or MAX_ATTEMPTS)
        lease_ms = parse_duration(settings.env("DELIVERY_LEASE") or "5m")
    except ValueError as exc:
        raise InputError(f"FOREWARN_DELIVERY_ATTEMPTS / FOREWARN_DELIVERY_LEASE: {exc}") from None

    async def run() -> None:
        store: Outbox
        close: Callable[[], None]
        if url:
            from forewarn import outbox_pg, store_pg

            pool = store_pg.connect(url, max_size=2)
            store, close = outbox_pg.PgOutbox(pool), lambda: pool.close()
        else:
            conn = store_sqlite.connect(db)
            store, close = SqliteOutbox(conn), conn.close
        worker = Worker(
            store, channels_from_settings(store), max_attempts=attempts, lease_ms=lease_ms
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        async def watch() -> None:
            while parent is not None and not stop.is_set():
                if os.getppid() != parent:
                    stop.set()
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        try:
            await worker.run(stop)
        finally:
            watcher.cancel()
            await worker.aclose()
            close()

    asyncio.run(run())
