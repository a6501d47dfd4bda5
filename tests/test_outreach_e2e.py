"""Outreach end to end: a real `forewarn serve` (engine and delivery worker in processes of their
own), events sent as a client would, the email caught by a real SMTP server (aiosmtpd), the
webhook by a real HTTP receiver; then the one-click unsubscribe, engagement links and the admin
routes."""

from __future__ import annotations

import base64
import re
import sqlite3
import time
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks

from forewarn import store_sqlite

from . import server as srv
from .receiver import receiver

SECRET = "whsec_" + base64.b64encode(b"end-to-end-secret-32-bytes-long!").decode()
PLAYBOOK = """
triggers:
  - id: quota
    description: Quota almost used
    when: {event: {name: Quota Hit}}
    action: {channel: email, template: quota}
  - id: team
    when: {event: {name: Quota Hit}}
    action: {channel: webhook, message: "{{ subject }} hit the quota"}
  - id: tip
    when: {event: {name: Stuck}}
    action: {channel: in_app, message: "Need a hand, {{ traits.first_name }}?"}
"""
TEXT = """Subject: {{ traits.first_name }}, about your {{ evidence.name }}

Hello {{ traits.first_name }}, see {{ link("https://app.example.com/billing") }}
Unsubscribe: {{ unsubscribe_url }}
"""
HTML = """<p>Hello {{ traits.first_name }}, <a href="{{ link('https://app.example.com/billing') }}">billing</a></p>"""


class Catch:
    def __init__(self) -> None:
        self.received: list[EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = BytesParser(policy=policy.default).parsebytes(envelope.content)
        self.received.append(parsed)
        return "250 OK"


def _send(live: srv.Server, *messages: dict[str, Any]) -> None:
    r = httpx.post(
        live.url + "/v1/batch", json={"batch": list(messages)}, auth=(srv.WRITE_KEY, ""), timeout=10
    )
    assert r.status_code == 200, r.text


def _events(db: Path, name: str) -> list[bytes]:
    conn = sqlite3.connect(db)
    try:
        return [
            m
            for (raw,) in conn.execute("SELECT messages FROM batches WHERE source = 'forewarn'")
            if name.encode() in (m := store_sqlite.uncompressed(raw))
        ]
    finally:
        conn.close()


@pytest.fixture
def world(tmp_path: Path) -> Any:
    playbooks = tmp_path / "playbooks"
    (playbooks / "templates").mkdir(parents=True)
    (playbooks / "outreach.yaml").write_text(PLAYBOOK)
    (playbooks / "templates" / "quota.txt").write_text(TEXT)
    (playbooks / "templates" / "quota.html").write_text(HTML)
    catch = Catch()
    controller = srv.start_smtp(catch)
    smtp_port = controller.port
    with receiver() as hooks:
        port = srv.free_port()
        env = {
            "FOREWARN_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
            "FOREWARN_EMAIL_FROM": "Acme Support <support@acme.test>",
            "FOREWARN_WEBHOOK_URL": hooks.url + "/team",
            "FOREWARN_WEBHOOK_SECRET": SECRET,
            "FOREWARN_WEBHOOK_ALLOW_PRIVATE": "1",
            "FOREWARN_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "FOREWARN_PRIORITY_WINDOW": "0",
            "FOREWARN_QUIET_HOURS": "off",
            "FOREWARN_FREQUENCY_CAPS": "off",
        }
        live = srv.start(tmp_path / "forewarn.db", port=port, env=env, playbooks=playbooks)
        try:
            yield live, catch, hooks
        finally:
            live.process.terminate()
            live.process.wait(timeout=20)
            if live.process.stdout is not None:
                live.process.stdout.close()
            controller.stop()


def test_email_webhook_and_inbox_go_out_and_unsubscribe_takes_effect_at_once(world):
    live, catch, hooks = world
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _send(
        live,
        {
            "type": "identify",
            "userId": "ann",
            "traits": {"email": "ann@example.com", "first_name": "Ann"},
        },
        {"type": "track", "userId": "ann", "event": "Quota Hit", "timestamp": now},
        {"type": "track", "userId": "ann", "event": "Stuck", "timestamp": now},
    )
    assert live.wait_for(lambda: catch.received and hooks.seen, timeout_s=20)

    (mail,) = catch.received
    assert mail["To"] == "ann@example.com"
    assert mail["From"] == "Acme Support <support@acme.test>"
    assert mail["Subject"] == "Ann, about your Quota Hit"
    unsubscribe = mail["List-Unsubscribe"].strip("<>")
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    text = mail.get_body(("plain",)).get_content()
    assert unsubscribe in text and "Hello Ann" in text
    html = mail.get_body(("html",)).get_content()
    pixel = re.search(r'<img src="([^"]+/o/[^"]+)"', html)
    click = re.search(r'href="([^"]+/c/[^"]+)"', html)
    assert pixel and click

    (hook,) = hooks.seen
    payload = standardwebhooks.Webhook(SECRET).verify(hook.body, hook.headers)
    assert "ann hit the quota" in str(payload)

    inbox = live.admin("/api/v1/subjects/ann/inbox")["messages"]
    assert live.wait_for(lambda: live.admin("/api/v1/subjects/ann/inbox")["messages"])
    inbox = live.admin("/api/v1/subjects/ann/inbox")["messages"]
    assert [m["text"] for m in inbox] == ["Need a hand, Ann?"]
    engage = inbox[0]["engagement_url"]
    for body in ({"event": "dismissed"}, {"event": "replied", "text": "yes please"}):
        r = httpx.post(engage, json=body, timeout=10)
        assert r.status_code == 200, r.text
    refused = httpx.post(engage, json={"event": "liked"}, timeout=10)
    assert refused.status_code == 400 and "dismissed" in refused.json()["error"]["message"]
    assert live.wait_for(lambda: _events(live.db, "Message Replied"))
    (reply,) = _events(live.db, "Message Replied")
    assert b"yes please" in reply and _events(live.db, "Message Dismissed")

    # the open pixel and the tracked link record engagement; the link goes where it said
    assert httpx.get(pixel.group(1), timeout=10).headers["content-type"] == "image/gif"
    jump = httpx.get(click.group(1), timeout=10)
    assert jump.status_code == 302 and jump.headers["location"] == "https://app.example.com/billing"
    assert live.wait_for(lambda: _events(live.db, "Message Clicked"))
    assert _events(live.db, "Message Opened") and _events(live.db, "Message Sent")

    # a link scanner's GET never unsubscribes; the one-click POST does, at once
    page = httpx.get(unsubscribe, timeout=10)
    assert page.status_code == 200 and '<form method="post"' in page.text
    outreach = live.admin("/api/v1/outreach", subject="ann")["outreach"]
    assert {(o["trigger"], o["status"]) for o in outreach} == {
        ("quota", "sent"),
        ("team", "sent"),
        ("tip", "sent"),
    }
    done = httpx.post(unsubscribe, data={"List-Unsubscribe": "One-Click"}, timeout=10)
    assert done.status_code == 200
    forged = httpx.post(unsubscribe[:-3] + "AAA", timeout=10)
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "unauthorized"

    again = {"type": "track", "userId": "ann", "event": "Quota Hit", "messageId": "again"}
    _send(live, again)

    def decided() -> list[dict[str, Any]]:
        rows = live.admin("/api/v1/outreach", subject="ann", trigger="quota")["outreach"]
        return rows if len(rows) == 2 else []

    latest = live.wait_for(decided)[0]
    assert (latest["decision"], latest["reason"]) == ("suppressed", "unsubscribed")
    assert len(catch.received) == 1


def test_suppress_and_unsuppress_through_the_admin_api(world):
    live, _, _ = world
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    answer = live.admin_post("/api/v1/subjects/bob/suppress", {"reason": "incident INC-7"})
    assert answer == {"subject": "bob", "scope": "user", "suppressed": True, "stopped": 0}
    _send(live, {"type": "track", "userId": "bob", "event": "Stuck", "timestamp": now})
    rows = live.wait_for(lambda: live.admin("/api/v1/outreach", subject="bob")["outreach"])
    assert [(r["decision"], r["reason"]) for r in rows] == [("suppressed", "account_suppressed")]
    assert live.admin_post("/api/v1/subjects/bob/unsuppress", {})["lifted"] is True
    with pytest.raises(httpx.HTTPStatusError) as refused:
        live.admin_post("/api/v1/subjects/bob/suppress", {"until": "tomorrow"})
    assert refused.value.response.status_code == 400
    assert "ISO 8601" in refused.value.response.json()["error"]["message"]
    bad = httpx.get(
        live.url + "/api/v1/outreach",
        params={"status": "lost"},
        headers={"Authorization": f"Bearer {srv.ADMIN_KEY}"},
        timeout=10,
    )
    assert bad.status_code == 400 and "pending" in bad.json()["error"]["message"]


def test_push_subscriptions_are_registered_and_checked(world):
    live, _, _ = world
    sub = {
        "endpoint": "https://push.example.com/send/abc",
        "keys": {"p256dh": "BPk", "auth": "xyz"},
    }
    assert live.admin_post("/api/v1/subjects/ann/push-subscriptions", sub)["subscribed"] is True
    listed = live.admin("/api/v1/subjects/ann/push-subscriptions")["subscriptions"]
    assert listed == [sub]
    for bad, says in (
        ({**sub, "endpoint": "http://10.0.0.1/x"}, "https://"),
        ({**sub, "keys": {"p256dh": "BPk"}}, "p256dh and auth"),
    ):
        with pytest.raises(httpx.HTTPStatusError) as refused:
            live.admin_post("/api/v1/subjects/ann/push-subscriptions", bad)
        assert says in refused.value.response.json()["error"]["message"]


def test_a_backtest_through_the_api_runs_over_the_servers_log(world):
    live, catch, _ = world
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _send(live, {"type": "track", "userId": "dan", "event": "Stuck", "timestamp": now})
    live.wait_for(lambda: live.admin("/api/v1/outreach", subject="dan")["outreach"])
    started = live.admin_post("/api/v1/backtests", {"since": "1d", "triggers": ["tip"]})
    assert started["status"] == "running" and started["triggers"] == ["tip"]

    def finished() -> Any:
        got = live.admin(f"/api/v1/backtests/{started['id']}")
        return got if got["status"] != "running" else None

    done = live.wait_for(finished, timeout_s=20)
    assert done["status"] == "done", done
    (row,) = done["result"]["triggers"]
    assert row["trigger"] == "tip" and row["firings"] >= 1
    with pytest.raises(httpx.HTTPStatusError) as refused:
        live.admin_post("/api/v1/backtests", {"triggers": ["nope"]})
    assert refused.value.response.status_code == 404
    assert "loaded triggers" in refused.value.response.json()["error"]["message"]
    assert (
        httpx.get(
            live.url + "/api/v1/backtests/999",
            headers={"Authorization": f"Bearer {srv.ADMIN_KEY}"},
            timeout=10,
        ).status_code
        == 404
    )
    del catch
