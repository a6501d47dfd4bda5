"""The outbox from decision to delivery: rows committed with the engine step, drained by the
worker with retries, dead letters, consent checked again at send time, and results back in the
log as events."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from forewarn import decide, store_outbox, store_sqlite
from forewarn.channels import Bounced, Failed, Gone, MemoryChannel, Outcome, Retry, Sent
from forewarn.dedup import SeenIds
from forewarn.deliver import InboxChannel, Worker
from forewarn.live import LiveEngine, events_of

from .factories import HOUR, MINUTE, T0_MS, at, identify, playbook, track

NOON = T0_MS + 12 * HOUR
PLAYBOOK = """
triggers:
  - id: quota
    when: {event: {name: Quota Hit}}
    action: {channel: email, message: "You hit your quota"}
    priority: 5
  - id: spike
    when: {event: {name: Error Burst}}
    action: {channel: in_app, message: "We saw errors"}
    priority: 9
  - id: team
    when: {event: {name: Quota Hit}}
    action: {channel: webhook, message: "quota hit"}
"""


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    conn = store_sqlite.connect(tmp_path / "forewarn.db")
    store_sqlite.ensure_workspace(conn, "default", 0)
    return conn


def _engine(conn: sqlite3.Connection, **policy: Any) -> LiveEngine:
    return LiveEngine(conn, 1, playbook(PLAYBOOK), policy=decide.Policy(**policy))


def _feed(conn: sqlite3.Connection, live: LiveEngine, message: dict[str, Any], now: int) -> None:
    store_sqlite.append_batches(
        conn,
        [store_sqlite.Append(1, "test", now, [message], [str(message["messageId"])])],
        SeenIds(),
    )
    live.step(now)


def _outbox(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT trig, channel, status, reason, attempts, due_ms FROM outbox ORDER BY id"
    ).fetchall()


def _events(conn: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for batch in store_sqlite.read_log(conn, 1, 0, 1000):
        for e in events_of(batch):
            if e.name.startswith("Message "):
                found.append((e.name, e.properties))
    return found


def _worker(conn: sqlite3.Connection, clock: Clock, **channels: Any) -> Worker:
    return Worker(conn, channels, now_ms=clock, rng=random.Random(7))


def test_a_decision_and_its_outbox_row_commit_with_the_step(conn):
    live = _engine(conn)
    _feed(conn, live, identify(at(hours=11), "u1", email="ann@example.com"), NOON)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    assert _outbox(conn) == [
        ("quota", "email", "pending", None, 0, NOON + 30_000),
        ("team", "webhook", "pending", None, 0, NOON + 30_000),
    ]
    (message,) = [
        store_outbox._decode_message(m)
        for (m,) in conn.execute("SELECT message FROM outbox WHERE channel = 'email'")
    ]
    assert message.to == "ann@example.com" and message.text == "You hit your quota"


def test_the_worker_sends_when_due_and_reports_it_in_the_log(conn):
    live = _engine(conn)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    clock = Clock(NOON + 1_000)
    email, hook = MemoryChannel("email"), MemoryChannel("webhook", dedup=True)
    worker = _worker(conn, clock, email=email, webhook=hook)
    assert asyncio.run(worker.run_once()) == 0  # held for the priority window
    clock.ms = NOON + 30_000
    assert asyncio.run(worker.run_once()) == 2
    assert [m.trigger for m in email.sent] == ["quota"] and [m.trigger for m in hook.sent] == [
        "team"
    ]
    assert [s for _, _, s, *_ in _outbox(conn)] == ["sent", "sent"]
    assert sorted(name for name, _ in _events(conn)) == ["Message Sent", "Message Sent"]
    assert asyncio.run(worker.run_once()) == 0  # nothing twice


def test_passing_failures_back_off_then_dead_letter(conn):
    live = _engine(conn)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    clock = Clock(NOON + 30_000)
    email = MemoryChannel("email", [Retry("451 try later", after_ms=3_600_000)] * 3)
    worker = Worker(conn, {"email": email}, now_ms=clock, rng=random.Random(1), max_attempts=3)
    dues = []
    for _ in range(3):
        assert asyncio.run(worker.run_once()) == 1
        (row,) = [r for r in _outbox(conn) if r[1] == "email"]
        dues.append(row[5])
        clock.ms = row[5]
    # Retry-After of an hour is honoured over the shorter back-off
    assert dues[1] - dues[0] >= 3_600_000 - 30_000
    assert [r[2:5] for r in _outbox(conn) if r[1] == "email"] == [("dead", "retries exhausted", 3)]
    assert [(n, p["failure"]) for n, p in _events(conn)] == [
        ("Message Failed", "retries exhausted")
    ]


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [(Failed("550 5.1.1 no such user"), "failed"), (Gone("410", endpoints=("x",)), "gone")],
)
def test_a_permanent_failure_is_dead_at_once(conn, outcome: Outcome, reason: str):
    live = _engine(conn)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    worker = _worker(conn, Clock(NOON + 30_000), email=MemoryChannel("email", [outcome]))
    asyncio.run(worker.run_once())
    assert [r[2:5] for r in _outbox(conn) if r[1] == "email"] == [("dead", reason, 1)]


def test_a_bounce_suppresses_the_address_for_the_next_decision(conn):
    live = _engine(conn, caps=())
    _feed(conn, live, identify(at(hours=11), "u1", email="Ann@Example.com"), NOON)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    worker = _worker(conn, Clock(NOON + 30_000), email=MemoryChannel("email", [Bounced("550")]))
    asyncio.run(worker.run_once())
    _feed(conn, live, track("Quota Hit", at(hours=14)), NOON + 2 * HOUR)
    decided = conn.execute("SELECT decision, reason FROM firings WHERE trig = 'quota'").fetchall()
    assert decided == [("send", None), ("suppressed", "bounced")]


def test_an_unsubscribe_between_enqueue_and_send_stops_the_message(conn):
    live = _engine(conn)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    store_outbox.unsubscribe(conn, 1, "user", "u1", "email", "link", NOON + 1_000)
    email, hook = MemoryChannel("email"), MemoryChannel("webhook")
    asyncio.run(_worker(conn, Clock(NOON + 30_000), email=email, webhook=hook).run_once())
    assert email.tried == []
    assert [r[1:4] for r in _outbox(conn)] == [
        ("email", "suppressed", "unsubscribed"),
        ("webhook", "sent", None),  # the team still hears of it
    ]


def test_consent_withdrawn_after_the_claim_is_still_honoured(conn):
    live = _engine(conn)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    clock = Clock(NOON + 30_000)
    worker = _worker(conn, clock, email=MemoryChannel("email"))
    (row,) = store_outbox.claim(conn, clock.ms, 60_000, 10, ["email"])
    # unsubscribed after the row was claimed: the worker reads consent right before it sends
    conn.execute("INSERT INTO consent VALUES (1, 'user', 'u1', '*', ?, 'admin')", (clock.ms,))
    asyncio.run(worker.deliver(row))
    assert [r[1:4] for r in _outbox(conn) if r[1] == "email"] == [
        ("email", "suppressed", "unsubscribed")
    ]


def test_a_suppressed_subject_gets_nothing_until_lifted(conn):
    live = _engine(conn, caps=())
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    # what waits for the subject stops, the team's webhook about it included
    assert store_outbox.suppress(conn, 1, "user", "u1", "incident", None, NOON + 1) == 2
    _feed(conn, live, track("Quota Hit", at(hours=13)), NOON + HOUR)
    store_outbox.unsuppress(conn, 1, "user", "u1", "cli", NOON + 2)
    _feed(conn, live, track("Quota Hit", at(hours=14)), NOON + 2 * HOUR)
    rows = conn.execute(
        "SELECT f.decision, f.reason, o.status FROM firings f LEFT JOIN outbox o ON o.firing = f.id"
        " WHERE f.trig = 'quota' ORDER BY f.id"
    ).fetchall()
    assert rows == [
        ("send", None, "suppressed"),
        ("suppressed", "account_suppressed", None),
        ("send", None, "pending"),
    ]


def test_a_higher_priority_in_a_later_step_cancels_the_waiting_message(conn):
    live = _engine(conn)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    _feed(conn, live, track("Error Burst", at(hours=12, seconds=10)), NOON + 10_000)
    rows = conn.execute(
        "SELECT f.trig, f.decision, f.reason, o.status, o.reason FROM firings f"
        " LEFT JOIN outbox o ON o.firing = f.id ORDER BY f.id"
    ).fetchall()
    assert rows == [
        ("quota", "suppressed", "lower_priority", "cancelled", "lower_priority"),
        ("team", "send", None, "pending", None),  # webhooks contend only with webhooks
        ("spike", "send", None, "pending", None),
    ]


def test_the_policy_history_survives_a_restart(conn):
    live = _engine(conn)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    again = _engine(conn)  # a new process on the same database
    _feed(conn, again, track("Error Burst", at(hours=13)), NOON + HOUR)
    (row,) = conn.execute("SELECT decision, reason FROM firings WHERE trig = 'spike'").fetchall()
    assert row == ("suppressed", "frequency_cap")  # one a day, counted across the restart


def test_the_inbox_keeps_one_copy_of_a_resent_message(conn):
    live = _engine(conn)
    _feed(conn, live, track("Error Burst", at(hours=12)), NOON)
    clock = Clock(NOON + 30_000)
    inbox = InboxChannel(conn, "in_app", clock)
    worker = Worker(conn, {"in_app": inbox}, now_ms=clock, lease_ms=1_000)
    # a worker that sent and died before settling: the lease runs out, another sends again
    (row,) = store_outbox.claim(conn, clock.ms, 1_000, 10, ["in_app"])
    asyncio.run(inbox.send(worker._outgoing(row)))  # type: ignore[arg-type]
    clock.ms += 2_000
    assert asyncio.run(worker.run_once()) == 1
    messages = store_outbox.inbox(conn, 1, "user", "u1")
    assert [(m["title"], m["text"]) for m in messages] == [("spike", "We saw errors")]
    assert [r[2:5] for r in _outbox(conn)] == [("sent", None, 2)]


def test_a_push_without_subscriptions_fails_and_with_them_goes_to_each(conn):
    text = PLAYBOOK.replace("channel: in_app", "channel: push")
    live = LiveEngine(conn, 1, playbook(text))
    _feed(conn, live, track("Error Burst", at(hours=12)), NOON)
    _feed(conn, live, track("Error Burst", at(days=2, hours=12)), NOON + 2 * 86_400_000)
    clock = Clock(NOON + 30_000)
    push = MemoryChannel("push", [Sent(endpoints=("https://push.example/gone",))])
    worker = _worker(conn, clock, push=push)
    asyncio.run(worker.run_once())
    assert _outbox(conn)[0][2:4] == ("dead", "failed")
    for endpoint in ("https://push.example/a", "https://push.example/gone"):
        store_outbox.subscribe(conn, 1, "user", "u1", endpoint, "p", "a", NOON)
    clock.ms = NOON + 2 * 86_400_000 + 30_000
    asyncio.run(worker.run_once())
    (sent,) = push.sent
    assert [s["endpoint"] for s in sent.data["subscriptions"]] == [
        "https://push.example/a",
        "https://push.example/gone",
    ]
    assert [s["endpoint"] for s in store_outbox.subscriptions(conn, 1, "user", "u1")] == [
        "https://push.example/a"
    ]


def test_a_channel_that_raises_is_retried_not_fatal(conn):
    class Broken(MemoryChannel):
        async def send(self, message: Any) -> Outcome:
            raise RuntimeError("bug")

    live = _engine(conn)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    worker = _worker(
        conn, Clock(NOON + MINUTE), email=Broken("email"), webhook=MemoryChannel("webhook")
    )
    asyncio.run(worker.run_once())
    assert sorted(r[1:3] for r in _outbox(conn)) == [("email", "pending"), ("webhook", "sent")]


def test_an_open_urgent_ticket_survives_a_restart_from_the_snapshot(conn):
    live = LiveEngine(conn, 1, playbook(PLAYBOOK), snapshot_every_ms=0)
    ticket = {"ticket_id": "T-1", "priority": "urgent"}
    _feed(conn, live, track("Ticket Created", at(hours=11), **ticket), NOON)
    again = LiveEngine(conn, 1, playbook(PLAYBOOK))  # restored from the snapshot
    assert again.runner.state.urgent == {"user:u1": ["T-1"]}
    _feed(conn, again, track("Quota Hit", at(hours=12)), NOON + HOUR)
    decided = conn.execute("SELECT decision, reason FROM firings").fetchall()
    assert decided == [("suppressed", "account_suppressed")] * 2


def test_a_webhook_endpoint_that_answered_410_is_not_called_again(conn):
    text = PLAYBOOK + (
        "  - id: team2\n    when: {event: {name: Error Burst}}\n"
        "    action: {channel: webhook, message: errors, url: 'https://hooks.example/team'}\n"
    )
    live = LiveEngine(conn, 1, playbook(text), policy=decide.Policy(caps=()))
    _feed(conn, live, track("Error Burst", at(hours=12)), NOON)
    clock = Clock(NOON + 30_000)
    hook = MemoryChannel("webhook", [Gone("410", endpoints=("https://hooks.example/team",))])
    worker = _worker(conn, clock, webhook=hook, in_app=MemoryChannel("in_app"))
    asyncio.run(worker.run_once())
    _feed(conn, live, track("Error Burst", at(hours=13)), NOON + HOUR)
    clock.ms = NOON + HOUR + 30_000
    asyncio.run(worker.run_once())
    assert len(hook.tried) == 1  # the second message never reached the channel
    rows = conn.execute(
        "SELECT status, reason, detail FROM outbox WHERE channel = 'webhook' ORDER BY id"
    ).fetchall()
    assert [r[:2] for r in rows] == [("dead", "gone"), ("dead", "failed")]
    assert "410" in rows[1][2]


def test_a_paused_trigger_records_its_firings_and_sends_nothing_until_resumed(conn):
    live = _engine(conn, caps=())
    store_outbox.override_trigger(conn, 1, "quota", "paused", "too many dismissals", "admin", NOON)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    store_outbox.override_trigger(conn, 1, "team", "shadow", "trying it quietly", "admin", NOON)
    _feed(conn, live, track("Quota Hit", at(hours=13)), NOON + HOUR)
    assert store_outbox.resume_trigger(conn, 1, "quota", "cli", NOON)
    _feed(conn, live, track("Quota Hit", at(hours=14)), NOON + 2 * HOUR)
    decided = conn.execute("SELECT trig, decision, reason FROM firings ORDER BY id").fetchall()
    assert decided == [
        ("quota", "suppressed", "paused"),
        ("team", "send", None),
        ("quota", "suppressed", "paused"),
        ("team", "suppressed", "shadow"),
        ("quota", "send", None),
        ("team", "suppressed", "shadow"),
    ]
    assert store_outbox.trigger_overrides(conn, 1)["team"]["reason"] == "trying it quietly"


def test_suppressing_an_account_stops_its_users_messages(conn):
    from .factories import group

    live = _engine(conn, caps=())
    _feed(conn, live, group(at(hours=11), "acme", "u1"), NOON)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)  # u1's email, waiting
    # what waits for its users stops, as a suppression of the user itself would
    assert store_outbox.suppress(conn, 1, "account", "acme", "incident", None, NOON + 1) == 2
    _feed(conn, live, track("Error Burst", at(hours=13)), NOON + HOUR)
    rows = conn.execute(
        "SELECT f.trig, f.decision, f.reason, o.status FROM firings f"
        " LEFT JOIN outbox o ON o.firing = f.id ORDER BY f.id"
    ).fetchall()
    assert rows == [
        ("quota", "send", None, "suppressed"),
        ("team", "send", None, "suppressed"),
        ("spike", "suppressed", "account_suppressed", None),  # and none decided after
    ]


def test_a_trigger_paused_after_its_message_was_queued_stops_it(conn):
    live = _engine(conn)
    _feed(conn, live, track("Quota Hit", at(hours=12)), NOON)
    store_outbox.override_trigger(conn, 1, "quota", "paused", "harm found", "auto-guard", NOON)
    email, hook = MemoryChannel("email"), MemoryChannel("webhook")
    asyncio.run(_worker(conn, Clock(NOON + 30_000), email=email, webhook=hook).run_once())
    assert email.tried == [] and len(hook.sent) == 1
    assert [r[1:4] for r in _outbox(conn)] == [
        ("email", "suppressed", "paused"),
        ("webhook", "sent", None),
    ]
