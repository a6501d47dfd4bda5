"""`forewarn deliver` killed with SIGKILL over and over while it drains the outbox: every decided
message is delivered at least once, and a crash repeats at most the one message each channel
had in flight, which the receivers can recognise by its key."""

from __future__ import annotations

import asyncio
import base64
import collections
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import standardwebhooks

from forewarn import decide, store_outbox, store_sqlite
from forewarn.dedup import SeenIds
from forewarn.live import LiveEngine

from .factories import HOUR, T0_MS, at, identify, playbook, track
from .receiver import Answer, receiver
from .server import start_smtp

SECRET = "whsec_" + base64.b64encode(b"crash-test-secret-32-bytes-long!").decode()
USERS = 40
KILLS = 20  # kill -9 cycles
NOON = T0_MS + 12 * HOUR
PLAYBOOK = """
triggers:
  - id: team
    when: {event: {name: Quota Hit}}
    action: {channel: webhook, message: "quota hit"}
  - id: nudge
    when: {event: {name: Quota Hit}}
    action: {channel: in_app, message: "you hit your quota"}
  - id: mail
    when: {event: {name: Quota Hit}}
    action: {channel: email, message: "you hit your quota"}
"""
CHANNELS = 3


class SlowMailbox:
    """An SMTP server's handler that takes its time, so that kills land mid-send."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(0.3)
        message = BytesParser(policy=policy.default).parsebytes(envelope.content)
        self.ids.append(str(message["Message-ID"]))
        return "250 OK"


def _decide_everything(db: Path) -> int:
    conn = store_sqlite.connect(db)
    store_sqlite.ensure_workspace(conn, "default", 0)
    policy = decide.Policy(caps=(), quiet_start_min=0, quiet_end_min=0, priority_window_ms=0)
    live = LiveEngine(conn, 1, playbook(PLAYBOOK), policy=policy)
    messages = [identify(at(hours=11), f"u{i}", email=f"u{i}@example.com") for i in range(USERS)]
    messages += [track("Quota Hit", at(hours=12), f"u{i}") for i in range(USERS)]
    store_sqlite.append_batches(
        conn,
        [store_sqlite.Append(1, "test", NOON, messages, [str(m["messageId"]) for m in messages])],
        SeenIds(),
    )
    live.step(NOON)
    (count,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
    conn.close()
    return int(count)


def _pending(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(
            conn.execute("SELECT count(*) FROM outbox WHERE status = 'pending'").fetchone()[0]
        )
    finally:
        conn.close()


def test_kill_9_of_the_delivery_worker_loses_nothing_and_repeats_little(tmp_path):
    db = tmp_path / "forewarn.db"
    assert _decide_everything(db) == CHANNELS * USERS
    mailbox = SlowMailbox()
    smtp = start_smtp(mailbox)
    rng = random.Random(11)
    # a slow receiver, so that kills land while a message is in flight
    with receiver(*[Answer(delay_s=0.4) for _ in range(10_000)]) as hooks:
        env = {
            **os.environ,
            "FOREWARN_WEBHOOK_URL": hooks.url + "/hook",
            "FOREWARN_WEBHOOK_SECRET": SECRET,
            "FOREWARN_WEBHOOK_ALLOW_PRIVATE": "1",
            "FOREWARN_DELIVERY_LEASE": "1s",
            "FOREWARN_SMTP_URL": f"smtp://127.0.0.1:{smtp.port}",
            "FOREWARN_EMAIL_FROM": "help@example.com",
        }
        command = [sys.executable, "-m", "forewarn", "deliver", "--db", str(db)]
        crashes = 0
        deadline = time.monotonic() + 180  # 20 restarts of a worker, on a loaded machine too
        while _pending(db) and time.monotonic() < deadline:
            worker = subprocess.Popen(command, env=env)
            if crashes < KILLS:
                time.sleep(rng.uniform(0.4, 0.9))
                worker.send_signal(signal.SIGKILL)
                worker.wait()
                crashes += 1
            else:  # enough: let the last one finish
                while _pending(db) and time.monotonic() < deadline:
                    time.sleep(0.1)
                worker.terminate()
                assert worker.wait(timeout=30) == 0
        assert _pending(db) == 0, "messages left undelivered"
        assert crashes == KILLS, "the worker finished before it could be killed: slow the receiver"
        seen = list(hooks.seen)
    smtp.stop()

    conn = store_sqlite.connect(db)
    statuses = collections.Counter(s for (s,) in conn.execute("SELECT status FROM outbox"))
    assert statuses == {"sent": CHANNELS * USERS}
    # webhooks: every one arrived, verified; a crash repeated at most one
    ids: collections.Counter[str] = collections.Counter()
    for request in seen:
        standardwebhooks.Webhook(SECRET).verify(request.body, request.headers)
        ids[request.headers["webhook-id"]] += 1
    keys = {k for (k,) in conn.execute("SELECT key FROM outbox WHERE channel = 'webhook'")}
    assert set(ids) == keys
    assert sum(ids.values()) - len(keys) <= crashes
    # email cannot deduplicate: each crash may repeat the one mail in flight, never more
    mails = collections.Counter(mailbox.ids)
    assert len(mails) == USERS
    assert sum(mails.values()) - USERS <= crashes
    # the inbox stored each message once, however often it was sent
    inbox = conn.execute("SELECT key, count(*) FROM inbox GROUP BY key").fetchall()
    assert len(inbox) == USERS and all(n == 1 for _, n in inbox)
    # and each result is in the log once
    sent = collections.Counter(
        key
        for batch in store_sqlite.read_log(conn, 1, 0, 10_000)
        for key in [
            m["properties"].get("key") for m in batch.messages if m.get("event") == "Message Sent"
        ]
    )
    assert len(sent) == CHANNELS * USERS and set(sent.values()) == {1}
    assert store_outbox.query_outreach(conn, 1, status="pending") == []
    conn.close()
