"""The widget API over a real server: identity decides whose data is read (thousands of
randomized cross-user requests), events carry the token's user, a chat arrives on the stream,
replies escalate, and CORS and CSP hold."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from typing import Any

import httpx
import jwt
import pytest

from forewarn import store_sqlite

from . import server as srv

SECRET = "identity-secret-for-tests-0123456789"
ORIGIN = "https://app.example.test"
PLAYBOOK = """
triggers:
  - id: stuck
    when: {event: {name: Need Help}}
    action: {channel: chat, message: "Can I help you with {{ traits.missing }}that?"}
  - id: tip
    when: {event: {name: Tip Me}}
    action: {channel: in_app, message: "A tip for you"}
"""


def token(user: str, *, ttl_s: int = 600, secret: str = SECRET) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + ttl_s}, secret, algorithm="HS256")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    env = {
        "FOREWARN_IDENTITY_SECRET": SECRET,
        "FOREWARN_WIDGET_ORIGINS": ORIGIN,
        "FOREWARN_PRIORITY_WINDOW": "0",
        "FOREWARN_QUIET_HOURS": "off",
        "FOREWARN_FREQUENCY_CAPS": "off",
    }
    server = srv.serve_playbook(tmp_path_factory.mktemp("widget"), PLAYBOOK, env)
    yield server
    srv.stop(server)


def call(live: Any, method: str, path: str, user: str | None = None, **kw: Any) -> httpx.Response:
    headers = kw.pop("headers", {})
    if user is not None:
        headers["authorization"] = f"Bearer {token(user)}"
    else:
        headers.setdefault("x-forewarn-anonymous-id", "anon-0123456789")
    return httpx.request(
        method,
        f"{live.url}{path}",
        params={"key": srv.WRITE_KEY},
        headers=headers,
        timeout=10,
        **kw,
    )


def send(live: Any, user: str | None, *events: dict[str, Any]) -> None:
    r = call(live, "POST", "/w/v1/events", user, json={"batch": list(events)})
    assert r.status_code == 200, r.text


def stored(live: Any, event: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(live.db)
    try:
        found = []
        for (raw,) in conn.execute("SELECT messages FROM batches"):
            found += [m for m in store_sqlite.decode_messages(raw) if m.get("event") == event]
        return found
    finally:
        conn.close()


def inbox(live: Any, user: str) -> list[dict[str, Any]]:
    r = call(live, "GET", "/w/v1/inbox", user)
    assert r.status_code == 200, r.text
    return list(r.json()["messages"])


def test_events_carry_the_tokens_user_whatever_the_page_claims(live):
    send(live, "alice", {"type": "track", "event": "Claimed", "userId": "mallory"})
    send(live, None, {"type": "track", "event": "Claimed Anonymously", "userId": "mallory"})
    assert live.wait_for(lambda: stored(live, "Claimed") and stored(live, "Claimed Anonymously"))
    (signed,) = stored(live, "Claimed")
    assert signed["userId"] == "alice"
    (anon,) = stored(live, "Claimed Anonymously")
    assert "userId" not in anon and anon["anonymousId"] == "anon:anon-0123456789"


def test_an_anonymous_id_never_names_a_signed_in_user(live):
    """A page without a token that claims a signed-in user's id as its anonymous id reads
    nothing of theirs, and its events are not theirs."""
    send(live, "victim-user-01", {"type": "track", "event": "Need Help"})
    assert live.wait_for(lambda: inbox(live, "victim-user-01"))
    r = httpx.get(
        f"{live.url}/w/v1/inbox",
        params={"key": srv.WRITE_KEY},
        headers={"x-forewarn-anonymous-id": "victim-user-01"},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["messages"] == []
    send_as = httpx.post(
        f"{live.url}/w/v1/events",
        params={"key": srv.WRITE_KEY},
        headers={"x-forewarn-anonymous-id": "victim-user-01"},
        json={"batch": [{"type": "track", "event": "Impersonated"}]},
        timeout=10,
    )
    assert send_as.status_code == 200
    (event,) = live.wait_for(lambda: stored(live, "Impersonated"))
    assert event["anonymousId"] == "anon:victim-user-01" and "userId" not in event


def test_a_page_cannot_send_engagement_tickets_or_memberships(live):
    r = call(
        live,
        "POST",
        "/w/v1/events",
        "mallory",
        json={
            "batch": [
                {"type": "track", "event": "Message Dismissed", "properties": {"trigger": "tip"}},
                {"type": "track", "event": "Ticket Created", "properties": {"priority": "urgent"}},
                {"type": "group", "groupId": "someone-elses-account"},
                {"type": "alias", "previousId": "victim-user-01"},
                {"type": "track", "event": "Allowed Event"},
            ]
        },
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert live.wait_for(lambda: stored(live, "Allowed Event"))
    assert not [m for m in stored(live, "Ticket Created") if m.get("userId") == "mallory"]


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({"authorization": f"Bearer {token('alice', ttl_s=-10)}"}, "expired"),
        (
            {
                "authorization": f"Bearer {token('alice', secret='another secret entirely, 32 bytes at least')}"
            },
            "not valid",
        ),
        ({"authorization": "Bearer not-a-jwt"}, "not valid"),
        ({}, "anonymous id"),
    ],
)
def test_a_bad_identity_is_refused(live, headers, says):
    r = httpx.get(
        f"{live.url}/w/v1/inbox", params={"key": srv.WRITE_KEY}, headers=headers, timeout=10
    )
    assert r.status_code == 401 and says in r.json()["error"]["message"]
    wrong_key = httpx.get(f"{live.url}/w/v1/inbox", params={"key": srv.ADMIN_KEY}, timeout=10)
    assert wrong_key.status_code == 401


def test_a_chat_arrives_on_the_stream(live):
    seen: list[dict[str, Any]] = []

    def listen() -> None:
        params = {"key": srv.WRITE_KEY, "token": token("bob")}
        with httpx.stream("GET", f"{live.url}/w/v1/stream", params=params, timeout=20) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.3)
    send(live, "bob", {"type": "track", "event": "Need Help"})
    listener.join(timeout=15)
    assert seen, "no message on the stream"
    (message,) = seen
    assert message["kind"] == "chat" and message["trigger"] == "stuck"
    assert "<" not in json.dumps(message["text"])  # text, and the template's missing value empty


def test_a_reply_without_a_knowledge_base_goes_to_the_team(live):
    send(live, "carol", {"type": "track", "event": "Need Help"})
    chats = live.wait_for(lambda: [m for m in inbox(live, "carol") if m["kind"] == "chat"])
    conversation = chats[0]["id"]
    r = call(
        live,
        "POST",
        f"/w/v1/conversations/{conversation}/reply",
        "carol",
        json={"text": "my export <b>fails</b>"},
    )
    assert r.status_code == 200 and r.json()["escalated"] is True
    tickets = live.wait_for(lambda: stored(live, "Ticket Created"))
    (ticket,) = [t for t in tickets if t["userId"] == "carol"]
    assert "my export <b>fails</b>" in ticket["properties"]["transcript"]
    assert live.wait_for(lambda: stored(live, "Message Replied"))
    history = call(live, "GET", f"/w/v1/conversations/{conversation}", "carol").json()
    assert [m["author"] for m in history["messages"]] == ["assistant", "user", "assistant"]
    assert history["escalated"] is True


def test_no_user_ever_reads_another_users_messages(live):
    """Thousands of requests, each user's token against every user's conversation ids."""
    users = [f"user-{i}" for i in range(12)]
    for user in users:
        send(
            live,
            user,
            {"type": "track", "event": "Need Help"},
            {"type": "track", "event": "Tip Me"},
        )
    own: dict[str, set[int]] = {}
    for user in users:
        messages = live.wait_for(lambda u=user: len(inbox(live, u)) >= 2 and inbox(live, u))
        own[user] = {m["id"] for m in messages}
        assert {m["trigger"] for m in messages} == {"stuck", "tip"}
    ids = [*sorted(set().union(*own.values())), 0, 99999]
    rng = random.Random(17)
    with httpx.Client(base_url=live.url, timeout=10) as client:
        tokens = {u: token(u) for u in users}
        for _ in range(2000):
            user = rng.choice(users)
            target = rng.choice(ids)
            headers = {"authorization": f"Bearer {tokens[user]}"}
            params = {"key": srv.WRITE_KEY}
            if rng.random() < 0.5:
                r = client.get(f"/w/v1/conversations/{target}", params=params, headers=headers)
            else:
                r = client.post(
                    f"/w/v1/conversations/{target}/reply",
                    params=params,
                    headers=headers,
                    json={"text": "hello?"},
                )
            chat_ids = {i for i in own[user]}
            if target in chat_ids and r.status_code != 404:
                assert r.status_code == 200
            else:
                assert r.status_code == 404, (user, target, r.text)
                assert r.json()["error"]["message"] == f"no conversation {target} for this user"
        for user in users:
            got = client.get(
                "/w/v1/inbox",
                params={"key": srv.WRITE_KEY},
                headers={"authorization": f"Bearer {tokens[user]}"},
            )
            assert {m["id"] for m in got.json()["messages"]} == own[user]


def test_cors_lets_in_only_the_workspaces_origins(live):
    pre = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization",
    }
    ok = httpx.options(
        f"{live.url}/w/v1/events",
        params={"key": srv.WRITE_KEY},
        headers={"origin": ORIGIN, **pre},
        timeout=10,
    )
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == ORIGIN
    evil = httpx.options(
        f"{live.url}/w/v1/events",
        params={"key": srv.WRITE_KEY},
        headers={"origin": "https://evil.test", **pre},
        timeout=10,
    )
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers
    got = call(live, "GET", "/w/v1/inbox", "alice", headers={"origin": ORIGIN})
    assert got.headers["access-control-allow-origin"] == ORIGIN
    other = call(live, "GET", "/w/v1/inbox", "alice", headers={"origin": "https://evil.test"})
    assert "access-control-allow-origin" not in other.headers


def test_the_script_and_the_demo_are_served_with_their_headers(live):
    script = httpx.get(f"{live.url}/widget.js", timeout=10)
    assert script.status_code == 200 and script.headers["content-type"].startswith(
        "text/javascript"
    )
    assert "Forewarn" in script.text and "innerHTML" not in script.text
    demo = httpx.get(f"{live.url}/demo/kb/settings", timeout=10)
    assert demo.status_code == 200
    csp = demo.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    demo_token = demo.text.split('data-token="', 1)[1].split('"', 1)[0]
    assert jwt.decode(demo_token, SECRET, algorithms=["HS256"])["sub"] == "demo-user"
    assert httpx.get(f"{live.url}/static/demo.css", timeout=10).status_code == 200
    assert httpx.get(f"{live.url}/static/../settings.py", timeout=10).status_code == 404
