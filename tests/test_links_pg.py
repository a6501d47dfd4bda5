"""The outreach routes of a scale-out API process (`forewarn serve --role api`) on a real
PostgreSQL, with a worker and a delivery worker stepped by the test: the signed links inside
the messages the workers decide (unsubscribe, open pixel, tracked click, engagement) work, and
what they record reaches the workers and the delivery; the admin API's suppression, consent,
inbox, push subscription and trigger pause routes answer as the embedded server's, write the
same audit rows, and the workers and the delivery honour what they write."""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import httpx
import jwt
import msgspec
import pytest

from forewarn import (
    api,
    api_outreach,
    clock,
    compose,
    decide,
    deliver,
    outreach_pg,
    scaleout,
    store_pg,
)
from forewarn.audit import subject_target
from forewarn.channels import Channel, MemoryChannel
from forewarn.compose import Composer
from forewarn.links import SECRET_NAME
from forewarn.outbox_pg import PgOutbox
from forewarn.sources import load_playbooks
from forewarn.templates import Templates
from forewarn.worker import Worker
from tests import server as srv
from tests.server import ADMIN_KEY, WRITE_KEY
from tests.test_api_pg import _playbooks, ago, api_process, batch
from tests.test_outreach_e2e import Catch
from tests.test_scaleout import _env, _serve, _stop

PLAYBOOK = """
triggers:
  - id: export-trouble
    when: {event: {name: Export Failed, count: 2, within: 1d}}
    action: {channel: email, template: exports}
  - id: seats-full
    when: {event: {name: Seat Limit Hit}}
    action: {channel: email, message: Your seats are full}
  - id: import-nudge
    when: {event: {name: Import Failed}}
    action: {channel: in_app, message: Need a hand with imports?}
  - id: help-chat
    when: {event: {name: Need Help}}
    action: {channel: chat, message: Can I help you with that?}
"""


@dataclass
class Deployment:
    """An API process, and a worker and a delivery worker the test steps, on one database."""

    client: httpx.Client
    pool: store_pg.Pool
    workspace: int
    worker: Worker
    email: MemoryChannel

    def send(self, *messages: dict[str, Any]) -> None:
        r = self.client.post("/v1/batch", json=batch(*messages), auth=(WRITE_KEY, ""))
        assert r.status_code == 200, r.text
        self.worker.run_until_idle(clock.now_ms())

    def deliver(self) -> int:
        outbox = PgOutbox(self.pool)
        channels: dict[str, Channel] = {
            "email": self.email,
            "in_app": deliver.InboxChannel(outbox, "in_app", clock.now_ms),
            "chat": deliver.InboxChannel(outbox, "chat", clock.now_ms),
        }
        later = deliver.Worker(outbox, channels, now_ms=lambda: clock.now_ms() + 3_600_000)
        return asyncio.run(later.run_once())

    def admin(self, method: str, path: str, key: str = ADMIN_KEY, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.client.request(method, path, headers=headers, **kw)

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.pool.connection() as conn:
            return conn.execute(sql, args).fetchall()

    def outbox(self, trigger: str) -> tuple[str, str, dict[str, Any]]:
        """The status, reason and message of the trigger's (one) outbox row."""
        [(status, reason, message)] = self.rows(
            "SELECT status, reason, message FROM outbox WHERE trig = %s", trigger
        )
        return status, reason, msgspec.json.decode(bytes(message))

    def decision(self, trigger: str) -> tuple[str, str | None]:
        [(decision, reason)] = self.rows(
            "SELECT decision, reason FROM firings WHERE trig = %s", trigger
        )
        return decision, reason

    def logged(self, name: str) -> list[str]:
        """The message ids of the events called `name` in the log."""
        return [
            str(m["messageId"])
            for (raw,) in self.rows("SELECT message FROM events ORDER BY id")
            if (m := msgspec.json.decode(bytes(raw))).get("event") == name
        ]


ORIGIN = "https://app.example.com"
IDENTITY = "an-identity-secret-of-at-least-32-bytes-0123456789"


@pytest.fixture
def deployment(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    # the API process takes the widget's settings from its environment
    monkeypatch.setenv("FOREWARN_WIDGET_ORIGINS", ORIGIN)
    monkeypatch.setenv("FOREWARN_IDENTITY_SECRET", IDENTITY)
    playbooks = _playbooks(tmp_path / "playbooks", PLAYBOOK)
    templates = compose.templates_dir(playbooks)
    templates.mkdir()
    (templates / "exports.txt").write_text("Subject: Exports failing?\n\nWe can help.\n")
    (templates / "exports.html").write_text(
        '<p>Exports failing? <a href="{{ link("https://help.example.com/exports") }}">Help</a></p>'
    )
    triggers = load_playbooks(playbooks)
    with api_process(url, playbooks) as client:
        pool = store_pg.connect(url)
        try:
            with pool.connection() as conn:
                ws = store_pg.workspace_id(conn, "default")
                secret = outreach_pg.secret(conn, SECRET_NAME)
            assert ws is not None
            # the messages' links point at the API process, as FOREWARN_PUBLIC_URL would
            composer = Composer(Templates(templates), str(client.base_url), secret)
            # the messages are decided on the wall clock: without this, the default quiet hours
            # (21:00-08:00 UTC) would hold the mail the delivery process is meant to send
            quiet_off = decide.Policy(quiet_start_min=0, quiet_end_min=0)
            worker = Worker(pool, ws, triggers, compose=composer, policy=quiet_off)
            yield Deployment(client, pool, ws, worker, MemoryChannel("email"))
        finally:
            pool.close()


def identify(user: str = "u1", account: str = "acme") -> dict[str, Any]:
    return {
        "type": "identify",
        "userId": user,
        "traits": {"email": f"{user}@example.com"},
        "context": {"groupId": account},
        "timestamp": ago(30),
    }


def joins(user: str, account: str = "acme") -> dict[str, Any]:
    return {"type": "group", "userId": user, "groupId": account, "timestamp": ago(29)}


def track(
    name: str, user: str = "u1", account: str = "acme", minutes: float = 20
) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user,
        "event": name,
        "context": {"groupId": account},
        "timestamp": ago(minutes),
    }


def test_an_emails_unsubscribe_link_works_and_delivery_honours_it(deployment: Deployment) -> None:
    d = deployment
    d.send(identify(), track("Export Failed", minutes=21), track("Export Failed"))
    status, _, message = d.outbox("export-trouble")
    assert status == "pending"
    link = message["data"]["unsubscribe_url"]
    assert link.startswith(str(d.client.base_url) + "/u/")

    page = d.client.get(link)  # what a link scanner fetches: a page, and nothing changes
    assert page.status_code == 200 and "Stop receiving email messages?" in page.text
    assert re.search(r'<form method="post" action="[^"]+">', page.text)
    assert d.outbox("export-trouble")[0] == "pending"
    assert d.rows("SELECT count(*) FROM consent") == [(0,)]

    done = d.client.post(link, data={"List-Unsubscribe": "One-Click"})  # RFC 8058
    assert done.status_code == 200 and "you will not receive email messages" in done.text
    assert d.rows("SELECT scope, subject, channel, source FROM consent") == [
        ("user", "u1", "email", "link")
    ]
    assert d.outbox("export-trouble")[:2] == ("suppressed", "unsubscribed")

    # a later email: the worker's policy reads the consent, and the delivery sends nothing
    d.send(track("Seat Limit Hit", minutes=1))
    assert d.decision("seats-full") == ("suppressed", "unsubscribed")
    d.deliver()
    assert d.email.tried == []

    forged = d.client.post(link[:-3] + "AAA")
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "unauthorized"


def test_the_link_in_an_email_a_delivery_process_sent_unsubscribes(
    deployment: Deployment, url: str, tmp_path: Path
) -> None:
    """The same through a real `forewarn serve --role delivery` and a real SMTP server: the
    mail's List-Unsubscribe link, posted as a mail client does, stops the next mail."""
    d = deployment
    catch = Catch()
    controller = srv.start_smtp(catch)
    env = {
        **_env(url),
        "FOREWARN_SMTP_URL": f"smtp://127.0.0.1:{controller.port}",
        "FOREWARN_EMAIL_FROM": "Acme Support <support@acme.test>",
    }
    delivery = _serve("delivery", env, tmp_path / "playbooks")
    try:
        d.send(identify(), track("Export Failed", minutes=21), track("Export Failed"))
        deadline = time.monotonic() + 20
        while not catch.received and time.monotonic() < deadline:
            time.sleep(0.1)
        [mail] = catch.received
        assert mail["To"] == "u1@example.com"
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        link = mail["List-Unsubscribe"].strip("<>")
        done = d.client.post(link, content=b"List-Unsubscribe=One-Click")
        assert done.status_code == 200, done.text

        d.send(track("Seat Limit Hit", minutes=1))
        assert d.decision("seats-full") == ("suppressed", "unsubscribed")
        while not d.logged("Message Sent") and time.monotonic() < deadline:
            time.sleep(0.1)  # (the delivery settles its row once the SMTP server took the mail)
        [(key,)] = d.rows("SELECT key FROM outbox WHERE trig = 'export-trouble'")
        [sent] = d.logged("Message Sent")
        assert sent.startswith(key) and d.outbox("export-trouble")[0] == "sent"
    finally:
        _stop([delivery])
        controller.stop()
    assert len(catch.received) == 1


def test_opens_clicks_and_engagement_are_recorded_once_and_reach_the_worker(
    deployment: Deployment,
) -> None:
    d = deployment
    d.send(
        identify(),
        identify("u2"),
        track("Export Failed", minutes=21),
        track("Export Failed"),
        track("Import Failed", user="u2", minutes=19),  # (one message a subject at a time)
    )
    _, _, email = d.outbox("export-trouble")
    _, _, in_app = d.outbox("import-nudge")
    pixel = re.search(r'<img src="([^"]+/o/[^"]+)"', email["html"])
    click = re.search(r'href="([^"]+/c/[^"]+)"', email["html"])
    assert pixel and click, email["html"]
    for _ in range(2):  # a client loading the pixel again, a second click: counted once
        opened = d.client.get(pixel.group(1))
        assert opened.status_code == 200 and opened.headers["content-type"] == "image/gif"
        assert opened.headers["cache-control"] == "no-store"
        followed = d.client.get(click.group(1))
        assert followed.status_code == 302
        assert followed.headers["location"] == "https://help.example.com/exports"
    engagement = in_app["data"]["engagement_url"]
    for _ in range(2):
        for body in ({"event": "dismissed"}, {"event": "replied", "text": "yes please"}):
            r = d.client.post(engagement, json=body)
            assert r.status_code == 200, r.text
    refused = d.client.post(engagement, json={"event": "liked"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_input"

    [(key,)] = d.rows("SELECT key FROM outbox WHERE trig = 'export-trouble'")
    [(in_app_key,)] = d.rows("SELECT key FROM outbox WHERE trig = 'import-nudge'")
    # the message ids the embedded server gives them, so a resend is recognised the same way
    assert d.logged("Message Opened") == [f"{key}:Message Opened"]
    [clicked] = d.logged("Message Clicked")
    assert clicked.startswith(f"{key}:Message Clicked:")
    assert d.logged("Message Dismissed") == [f"{in_app_key}:Message Dismissed"]
    assert len(d.logged("Message Replied")) == 2  # every reply counts

    with d.pool.connection() as conn:  # queued for the workers, in the subjects' partitions
        assert store_pg.pending(conn, d.workspace) == 5
    d.worker.run_until_idle(clock.now_ms())
    with d.pool.connection() as conn:
        assert store_pg.pending(conn, d.workspace) == 0
    for user, engaged in (
        ("u1", ["Message Clicked", "Message Opened"]),
        ("u2", ["Message Dismissed", "Message Replied", "Message Replied"]),
    ):
        timeline = d.admin("GET", f"/api/v1/subjects/{user}").json()["events"]
        assert (
            sorted(e["name"] for e in timeline if (e["name"] or "").startswith("Message "))
            == engaged
        )


SUBSCRIPTION = {
    "endpoint": "https://push.example.com/send/abc",
    "expirationTime": None,
    "keys": {
        "p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM",
        "auth": "tBHItJI5svbpez7KI4CCXg",
    },
}

# the admin writes, in order, as (method, path, body); the same on both servers
WRITES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/api/v1/subjects/u1/suppress", {"reason": "incident INC-7"}),
    ("POST", "/api/v1/subjects/u1/suppress", {"until": "2099-01-01T00:00:00Z"}),
    ("POST", "/api/v1/subjects/u1/unsuppress", {}),
    ("POST", "/api/v1/subjects/u1/unsuppress", {}),
    ("POST", "/api/v1/subjects/acme/suppress", {"scope": "account", "reason": "outage"}),
    ("POST", "/api/v1/subjects/acme/unsuppress", {"scope": "account"}),
    ("POST", "/api/v1/subjects/u1/unsubscribe", {"channel": "push"}),
    ("POST", "/api/v1/subjects/u1/resubscribe", {"channel": "push"}),
    ("POST", "/api/v1/subjects/u1/unsubscribe", {}),
    ("POST", "/api/v1/subjects/u1/resubscribe", {}),
    ("POST", "/api/v1/subjects/u1/unsubscribe", {"channel": "fax"}),
    ("POST", "/api/v1/subjects/u1/suppress", {"scope": "team"}),
    ("POST", "/api/v1/subjects/u1/suppress", {"until": "tomorrow"}),
    ("POST", "/api/v1/subjects/u1/suppress", {"reasons": "typo"}),
    ("POST", "/api/v1/subjects/u1/suppress", {"reason": "nul \x00 inside"}),
    ("POST", "/api/v1/subjects/u1%00/unsubscribe", {}),
    ("POST", "/api/v1/subjects/u1/push-subscriptions", SUBSCRIPTION),
    ("POST", "/api/v1/subjects/u1/push-subscriptions", {"endpoint": "http://insecure"}),
    ("GET", "/api/v1/subjects/u1/push-subscriptions", None),
    ("GET", "/api/v1/subjects/u1/push-subscriptions?scope=account", None),
    ("GET", "/api/v1/subjects/u1/inbox", None),
    ("GET", "/api/v1/subjects/u1/inbox?scope=galaxy", None),
    ("POST", "/api/v1/triggers/seats-full/pause", {"reason": "copy under review"}),
    ("POST", "/api/v1/triggers/import-nudge/pause", {"mode": "shadow"}),
    ("POST", "/api/v1/triggers/import-nudge/pause", {"mode": "off"}),
    ("POST", "/api/v1/triggers/nope/pause", {}),
    ("GET", "/api/v1/triggers/overrides", None),
    ("GET", "/api/v1/outreach", None),
    ("GET", "/api/v1/outreach?status=lost", None),
    ("POST", "/api/v1/triggers/import-nudge/resume", None),
    ("POST", "/api/v1/triggers/import-nudge/resume", None),
]


def _without_times(answer: Any) -> Any:
    if isinstance(answer, dict):
        return {k: _without_times(v) for k, v in answer.items() if k not in ("at", "created_ms")}
    if isinstance(answer, list):
        return [_without_times(v) for v in answer]
    return answer


def test_the_admin_writes_answer_and_audit_as_on_an_embedded_server(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    embedded = srv.start(
        tmp_path / "forewarn.db", env={"FOREWARN_DELIVERY": "off"}, playbooks=tmp_path / "playbooks"
    )
    try:
        for method, path, body in WRITES:
            kw: dict[str, Any] = {} if body is None else {"json": body}
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
            want = httpx.request(method, embedded.url + path, headers=headers, timeout=10, **kw)
            got = d.admin(method, path, **kw)
            assert got.status_code == want.status_code, (path, got.text, want.text)
            assert _without_times(got.json()) == _without_times(want.json()), (path, got.text)
        audit = [
            [(r["actor"], r["action"], r["target"], r["detail"]) for r in answer["audit"]]
            for answer in (embedded.admin("/api/v1/audit"), d.admin("GET", "/api/v1/audit").json())
        ]
    finally:
        srv.stop(embedded)
    assert audit[0] == audit[1]
    person = subject_target(d.workspace, "user", "u1")
    assert [row[:3] for row in audit[1][:9]] == [
        (ADMIN_KEY[:10], "trigger.resumed", "import-nudge"),
        (ADMIN_KEY[:10], "trigger.shadowed", "import-nudge"),
        (ADMIN_KEY[:10], "trigger.paused", "seats-full"),
        (ADMIN_KEY[:10], "subject.unsuppressed", "acme"),
        (ADMIN_KEY[:10], "subject.suppressed", "acme"),
        (ADMIN_KEY[:10], "subject.unsuppressed", person),
        (ADMIN_KEY[:10], "subject.suppressed", person),
        (ADMIN_KEY[:10], "subject.suppressed", person),
        ("environment", "key.created", ADMIN_KEY[:10]),
    ]
    # a person's suppression reason stays out of the log; an account's is kept
    assert audit[1][6][3] == {"scope": "user", "reason": None, "until_ms": 4070908800000}
    assert audit[1][4][3]["reason"] == "outage"


def test_what_the_admin_writes_is_honoured_by_the_workers_and_the_delivery(
    deployment: Deployment,
) -> None:
    d = deployment
    d.send(identify(), identify("u2"), joins("u1"), joins("u2"))
    d.send(track("Export Failed", minutes=21), track("Export Failed"))
    d.send(track("Import Failed", user="u2", minutes=19))
    # a waiting message holding a NUL (a trait's, say), which PostgreSQL's JSON cannot hold
    nul = {"text": "hi \x00", "data": {"accounts": ["acme"]}}
    d.rows(
        "INSERT INTO outbox (workspace, firing, key, channel, trig, subject, scope, message,"
        " due_ms, created_ms, status) VALUES (%s, 0, 'k-nul', 'in_app', 'seats-full', 'u9',"
        " 'user', %s, 0, 0, 'pending') RETURNING id",
        d.workspace,
        msgspec.json.encode(nul),
    )
    # suppressing the account stops its users' waiting messages (read from the messages)
    r = d.admin("POST", "/api/v1/subjects/acme/suppress", json={"scope": "account"})
    assert r.json() == {"subject": "acme", "scope": "account", "suppressed": True, "stopped": 3}
    assert d.outbox("export-trouble")[:2] == ("suppressed", "account_suppressed")
    assert d.outbox("import-nudge")[:2] == ("suppressed", "account_suppressed")
    d.send(track("Seat Limit Hit", minutes=2))
    assert d.decision("seats-full") == ("suppressed", "account_suppressed")
    listed = d.admin("GET", "/api/v1/outreach", params={"subject": "u1"}).json()["outreach"]
    assert [(o["trigger"], o["status"], o["status_reason"]) for o in listed] == [
        ("seats-full", "suppressed", None),
        ("export-trouble", "suppressed", "account_suppressed"),
    ]
    d.admin("POST", "/api/v1/subjects/acme/unsuppress", json={"scope": "account"})

    # a paused trigger's firings are recorded and not sent
    d.admin("POST", "/api/v1/triggers/import-nudge/pause", json={"reason": "wording"})
    d.send(track("Import Failed", user="u3", account="globex", minutes=3))
    [(decision, reason)] = d.rows(
        "SELECT decision, reason FROM firings WHERE subject = 'u3' AND trig = 'import-nudge'"
    )
    assert (decision, reason) == ("suppressed", "paused")
    overrides = d.admin("GET", "/api/v1/triggers/overrides").json()["overrides"]
    assert overrides["import-nudge"]["mode"] == "paused"
    assert overrides["import-nudge"]["by"] == "admin"

    # resumed: the next in-app message goes to the inbox the admin API reads
    d.admin("POST", "/api/v1/triggers/import-nudge/resume")
    d.send(track("Import Failed", user="u4", account="initech", minutes=1))
    assert d.deliver() == 1
    inbox = d.admin("GET", "/api/v1/subjects/u4/inbox").json()
    assert [(m["trigger"], m["kind"], m["text"]) for m in inbox["messages"]] == [
        ("import-nudge", "in_app", "Need a hand with imports?")
    ]
    assert inbox["messages"][0]["engagement_url"].startswith(str(d.client.base_url) + "/e/")


def test_the_new_routes_need_an_admin_key_of_the_workspace(deployment: Deployment) -> None:
    d = deployment
    b_write, b_admin = "fw_wk_beta-write-key-0123456789", "fw_ak_beta-admin-key-0123456789"
    beta = store_pg.ensure_workspace(d.pool, "beta", clock.now_ms(), b_write, b_admin)
    d.admin("POST", "/api/v1/subjects/u1/suppress", json={"reason": "ours"})
    d.admin("POST", "/api/v1/subjects/u1/push-subscriptions", json=SUBSCRIPTION)
    d.admin("POST", "/api/v1/triggers/seats-full/pause")
    for method, path, body in WRITES:
        kw: dict[str, Any] = {} if body is None else {"json": body}
        for key in ("", WRITE_KEY, b_write, "fw_ak_no-such-key-0123456789"):
            r = d.admin(method, path, key, **kw)
            assert r.status_code in (401, 403), (method, path, key, r.text)
            assert set(r.json()) == {"error"}, r.text
    # beta's admin key sees none of the default workspace's, and changes none of it
    assert d.admin("GET", "/api/v1/triggers/overrides", b_admin).json() == {"overrides": {}}
    subs = d.admin("GET", "/api/v1/subjects/u1/push-subscriptions", b_admin).json()
    assert subs["subscriptions"] == []
    d.admin("POST", "/api/v1/subjects/u1/unsuppress", b_admin)
    d.admin("POST", "/api/v1/triggers/seats-full/resume", b_admin)
    with d.pool.connection() as conn:
        assert store_pg.standing(conn, d.workspace, "user", "u1", None, 0).suppressed == "ours"
        assert store_pg.standing(conn, beta, "user", "u1", None, 0).suppressed is None
        assert store_pg.trigger_overrides(conn, d.workspace) == {"seats-full": "paused"}
        assert store_pg.trigger_overrides(conn, beta) == {}


def test_each_postgresql_twin_takes_what_the_embedded_function_takes() -> None:
    """The routes call `store_outbox`'s functions; the twin called in their place must take
    the same parameters, with the same defaults."""
    for embedded, twin in outreach_pg.TWINS.items():
        want = list(inspect.signature(embedded).parameters.values())[1:]  # after the connection
        got = list(inspect.signature(twin).parameters.values())[1:]
        assert [(p.name, p.default, p.kind) for p in got] == [
            (p.name, p.default, p.kind) for p in want
        ], embedded.__qualname__
    routes = {r.path for r in api_outreach.routes(Mock())}
    assert routes >= outreach_pg.PATHS


def test_the_widget_reads_the_inbox_and_converses_through_an_api_process(
    deployment: Deployment,
) -> None:
    d = deployment
    signed = jwt.encode({"sub": "u5", "exp": int(time.time()) + 600}, IDENTITY, algorithm="HS256")

    def widget(method: str, path: str, token: str | None = signed, **kw: Any) -> httpx.Response:
        headers = kw.pop("headers", {})
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return d.client.request(method, path, params={"key": WRITE_KEY}, headers=headers, **kw)

    # the page sends an event as the signed-in user; the worker decides, the delivery delivers
    r = widget("POST", "/w/v1/events", json={"batch": [{"type": "track", "event": "Need Help"}]})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    d.worker.run_until_idle(clock.now_ms())
    assert d.deliver() == 1
    [message] = widget("GET", "/w/v1/inbox").json()["messages"]
    assert (message["kind"], message["text"]) == ("chat", "Can I help you with that?")
    conversation = message["id"]
    # someone else, or nobody signed in, sees none of it
    other = jwt.encode({"sub": "u6", "exp": int(time.time()) + 600}, IDENTITY, algorithm="HS256")
    assert widget("GET", "/w/v1/inbox", other).json() == {"messages": []}
    anonymous = {"x-forewarn-anonymous-id": "anon-0123456789"}
    assert widget("GET", "/w/v1/inbox", None, headers=anonymous).json() == {"messages": []}
    assert widget("GET", f"/w/v1/conversations/{conversation}", other).status_code == 404
    forged = jwt.encode({"sub": "u5", "exp": int(time.time()) + 600}, "x" * 32, algorithm="HS256")
    assert widget("GET", "/w/v1/inbox", forged).status_code == 401

    # a reply: no assistant is set up here, so a person takes over (a Ticket Created event)
    r = widget("POST", f"/w/v1/conversations/{conversation}/reply", json={"text": "yes"})
    assert r.status_code == 200 and r.json()["escalated"] is True, r.text
    history = widget("GET", f"/w/v1/conversations/{conversation}").json()
    assert history["escalated"] is True
    assert [m["author"] for m in history["messages"]] == ["assistant", "user", "assistant"]
    assert len(d.logged("Ticket Created")) == 1 and len(d.logged("Message Replied")) == 1

    # the stream sends what lands in the inbox
    headers = {"authorization": f"Bearer {signed}"}
    params = {"key": WRITE_KEY, "since": "0"}
    with d.client.stream("GET", "/w/v1/stream", params=params, headers=headers) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("event:")) == "event: message"
        assert f'"id":{conversation}' in next(lines)

    # CORS: the workspace's origins only
    pre = {"origin": ORIGIN, "access-control-request-method": "POST"}
    assert widget("OPTIONS", "/w/v1/events", None, headers=pre).status_code == 204
    evil = {**pre, "origin": "https://evil.test"}
    assert widget("OPTIONS", "/w/v1/events", None, headers=evil).status_code == 403
    got = widget("GET", "/w/v1/inbox", headers={"origin": ORIGIN})
    assert got.headers["access-control-allow-origin"] == ORIGIN
    assert d.client.get("/widget.js").headers["content-type"].startswith("text/javascript")


def test_with_the_database_gone_the_widget_lets_no_origin_in(url: str, tmp_path: Path) -> None:
    """The CORS middleware runs outside the error handlers: a database that fails there must
    not make a 500 (the route answers 503 itself)."""
    playbooks = _playbooks(tmp_path / "playbooks", PLAYBOOK)
    pool = store_pg.connect(url)
    store_pg.ensure_workspace(pool, "default", clock.now_ms(), WRITE_KEY)
    settings = api.Settings(db=":memory:", playbooks=playbooks)
    app = scaleout.IngestApp(settings, pool, load_playbooks(playbooks))
    with pool.connection() as conn:
        outreach_pg.set_origins(conn, 1, ORIGIN)
    assert asyncio.run(app.widget_origins(WRITE_KEY)) == frozenset({ORIGIN})
    pool.close()
    app._keys.clear()
    app._origins.clear()
    assert asyncio.run(app.widget_origins(WRITE_KEY)) == frozenset()
