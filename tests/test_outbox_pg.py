"""Delivery on PostgreSQL: the delivery worker drains the outbox the scale-out workers fill,
into the in-app inbox here, and its results come back as events for the workers to apply."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest

from forewarn import deliver, store_pg
from forewarn.channels import Channel, Failed, MemoryChannel
from forewarn.model import event_from_dict
from forewarn.outbox_pg import PgOutbox
from forewarn.store_sqlite import Append
from forewarn.worker import Worker
from tests import pg
from tests.factories import T0_MS, at, playbook, track

STUCK = playbook("""
triggers:
  - id: export-stuck
    when: {event: {name: Export Failed, count: 2, within: 30m}}
    action: {channel: in_app, message: Need help exporting?}
  - id: team-alert
    scope: account
    when: {event: {name: Export Failed, count: 2, within: 30m}}
    action: {channel: webhook, message: Exports failing}
""")


@pytest.fixture
def pool() -> Iterator[store_pg.Pool]:
    for url in pg.database():
        pool = store_pg.connect(url)
        yield pool
        pool.close()


def _decided(pool: store_pg.Pool) -> int:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    messages = [track("Export Failed", at(minutes=m), "u1", "acme") for m in (1, 2)]
    ids = [str(m["messageId"]) for m in messages]
    evs = [event_from_dict(m) for m in messages]
    store_pg.append_batches(pool, [Append(ws, "segment", T0_MS + 600_000, messages, ids, evs)])
    Worker(pool, ws, STUCK).run_until_idle(0)
    return ws


def test_the_outbox_is_drained_into_the_inbox_and_reported_back(pool: store_pg.Pool) -> None:
    ws = _decided(pool)
    outbox = PgOutbox(pool)
    refused = MemoryChannel("webhook", [Failed(detail="410 from the receiver")])
    channels: dict[str, Channel] = {
        "in_app": deliver.InboxChannel(outbox, "in_app", lambda: T0_MS),
        "webhook": refused,
    }
    worker = deliver.Worker(
        outbox, channels, now_ms=lambda: T0_MS + 3_600_000, rng=random.Random(1)
    )
    assert asyncio.run(worker.run_once()) == 2
    assert asyncio.run(worker.run_once()) == 0  # nothing left to claim
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT channel, status, reason FROM outbox ORDER BY channel"
        ).fetchall()
        inbox = conn.execute("SELECT subject, trig, title FROM inbox").fetchall()
        results = conn.execute(
            "SELECT queue.part, events.source FROM queue JOIN events USING (id) WHERE source = 'forewarn' ORDER BY 1"
        ).fetchall()
    assert rows == [("in_app", "sent", None), ("webhook", "dead", "failed")]
    assert [m.subject for m in refused.tried] == ["acme"]
    assert inbox == [("u1", "export-stuck", "export-stuck")]
    assert results == [("account:acme", "forewarn")] * 2  # u1 has a home: acme
    Worker(pool, ws, STUCK).run_until_idle(0)  # the results are applied like any event
    with pool.connection() as conn:
        assert store_pg.pending(conn, ws) == 0


def test_delivery_processes_take_different_rows(pool: store_pg.Pool) -> None:
    _decided(pool)
    first, second = PgOutbox(pool), PgOutbox(pool)
    now = T0_MS + 3_600_000
    with first.transaction():  # one claims inside its transaction; the other skips those rows
        a = first.claim(now, 60_000, 10, ["in_app", "webhook"])
        b = second.claim(now, 60_000, 10, ["in_app", "webhook"])
    assert len(a) == 2 and b == []
