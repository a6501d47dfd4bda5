"""Two workspaces on one server: every route in the OpenAPI document is tried with the other
workspace's keys and with the write key. Workspace B's data never appears in an answer to A's
keys, A's keys never change B, the write key is refused on every admin route, and no key is
written in plain text to the database (WAL included) or the server's output."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from . import server as srv
from .server import ADMIN_KEY, WRITE_KEY

B_SUBJECT = "tenant-b-user-7f3a"
B_MARKERS = (B_SUBJECT, "b-secret-reason", "https://push.example/b-secret", "b-secret-plan")
A_MARKER = "written-with-a-key"
ANON = "same-anonymous-id-01"  # the same anonymous visitor id in both workspaces


def _cli_key(db: Path, workspace: str, kind: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "forewarn",
            "keys",
            "create",
            "--db",
            str(db),
            "--workspace",
            workspace,
            "--kind",
            kind,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _events(subject: str, plan: str) -> dict[str, Any]:
    batch: list[dict[str, Any]] = [
        {"type": "identify", "userId": subject, "traits": {"plan": plan}},
        {"type": "group", "userId": subject, "groupId": f"{subject}-account"},
        *({"type": "track", "userId": subject, "event": "Export Failed"} for _ in range(6)),
    ]
    for msg in batch:
        msg["messageId"] = str(uuid.uuid4())
    return {"batch": batch}


@pytest.fixture
def two(tmp_path: Path):
    db = tmp_path / "forewarn.db"
    server = srv.start(db, env={"FOREWARN_LOG_LEVEL": "debug"})
    try:
        b_write, b_admin = _cli_key(db, "beta", "write"), _cli_key(db, "beta", "admin")
        yield server, b_write, b_admin
    finally:
        if server.process.poll() is None:
            server.process.terminate()
            server.process.wait(timeout=20)
        if server.process.stdout is not None:
            server.process.stdout.close()


def _b_state(server: srv.Server, b_admin: str) -> dict[str, Any]:
    """What workspace B has, as B's own admin key sees it (and its consent rows)."""

    def get(path: str) -> httpx.Response:
        return httpx.get(server.url + path, headers=_bearer(b_admin), timeout=10)

    conn = sqlite3.connect(server.db)
    try:
        consent = conn.execute(
            "SELECT scope, subject, channel FROM consent WHERE workspace = 2 ORDER BY 1, 2, 3"
        ).fetchall()
        suppressed = conn.execute(
            "SELECT scope, subject, reason FROM suppressions WHERE workspace = 2 ORDER BY 1, 2"
        ).fetchall()
    finally:
        conn.close()
    return {
        "overrides": get("/api/v1/triggers/overrides").json(),
        "subject": get(f"/api/v1/subjects/{B_SUBJECT}").json(),
        "push": get(f"/api/v1/subjects/{B_SUBJECT}/push-subscriptions").json(),
        "consent": consent,
        "suppressed": suppressed,
    }


def _fill(path: str, backtest: int) -> str:
    return (
        path.replace("{subject}", B_SUBJECT)
        .replace("{trigger}", "known-bug")
        .replace("{id}", str(backtest))  # a backtest of B's, or a conversation
        .replace("{project}", "1")
        .replace("{flavour}", "generic")
    )


ADMIN_BODIES: dict[str, Any] = {
    "/api/v1/subjects/{subject}/push-subscriptions": {
        "endpoint": "https://push.example/a-endpoint",
        "keys": {"p256dh": "a-p256dh", "auth": "a-auth"},
    },
    "/api/v1/subjects/{subject}/suppress": {"reason": "by A"},
}


def test_no_route_crosses_workspaces_and_no_key_is_kept_in_plain_text(two) -> None:
    server, b_write, b_admin = two
    url = server.url
    # B's data: events, a paused trigger, a suppression, an unsubscribe, a push subscription,
    # a backtest
    r = httpx.post(
        url + "/v1/batch", json=_events(B_SUBJECT, "b-secret-plan"), auth=(b_write, ""), timeout=10
    )
    assert r.status_code == 200 and r.json()["accepted"] == 8, r.text
    subject_url = url + f"/api/v1/subjects/{B_SUBJECT}"
    server.wait_for(lambda: httpx.get(subject_url, headers=_bearer(b_admin)).status_code == 200)

    def b_post(path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(url + path, json=body, headers=_bearer(b_admin), timeout=10)

    assert b_post("/api/v1/triggers/known-bug/pause", {"reason": "b-secret-reason"}).is_success
    assert b_post(
        f"/api/v1/subjects/{B_SUBJECT}/suppress", {"reason": "b-secret-reason"}
    ).is_success
    assert b_post(f"/api/v1/subjects/{B_SUBJECT}/unsubscribe", {"channel": "email"}).is_success
    push = {"endpoint": "https://push.example/b-secret", "keys": {"p256dh": "p", "auth": "a"}}
    assert b_post(f"/api/v1/subjects/{B_SUBJECT}/push-subscriptions", push).is_success
    backtest = b_post("/api/v1/backtests", {}).json()["id"]
    widget = {"key": b_write, "anon": ANON}
    b_widget = {"batch": [{"type": "identify", "traits": {"plan": "b-secret-plan"}}]}
    assert httpx.post(url + "/w/v1/events", json=b_widget, params=widget).is_success
    before = _b_state(server, b_admin)
    assert before["overrides"]["overrides"]["known-bug"]["mode"] == "paused"
    assert before["push"]["subscriptions"] and before["consent"] and before["suppressed"]

    doc = httpx.get(url + "/openapi.json", timeout=10).json()
    tried = 0
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            kinds = {name for s in op.get("security", [{}]) for name in s}
            target = url + _fill(path, backtest)
            if "adminKey" in kinds:
                for key in (WRITE_KEY, b_write):  # a write key never opens the admin API
                    refused = httpx.request(
                        method, target, json={}, headers=_bearer(key), timeout=10
                    )
                    assert refused.status_code in (401, 403), (method, path, refused.text)
                body = ADMIN_BODIES.get(path, {}) if method == "post" else None
                params = {"subject": B_SUBJECT} if method == "get" else None
                answer = httpx.request(
                    method, target, json=body, params=params, headers=_bearer(ADMIN_KEY), timeout=30
                )
                assert answer.status_code < 500, (method, path, answer.text)
                for marker in B_MARKERS[1:]:
                    assert marker not in answer.text, (method, path, answer.text)
                if method == "get" and answer.status_code == 200 and "{subject}" in path:
                    assert "b-secret-plan" not in answer.text
                if path.startswith("/api/v1/backtests/"):
                    assert answer.status_code == 404, answer.text  # B's backtest, not A's
                tried += 1
            elif "widgetAnonymousId" in kinds:
                if path == "/w/v1/stream":
                    continue  # never ends: its first message is what /w/v1/inbox answers
                visitor = {"key": WRITE_KEY, "anon": ANON}
                body = (
                    {"batch": [{"type": "track", "event": A_MARKER}]} if method == "post" else None
                )
                if path.endswith("/reply"):
                    body = {"text": A_MARKER}
                answer = httpx.request(method, target, json=body, params=visitor, timeout=10)
                assert answer.status_code in (200, 404), (method, path, answer.text)
                for marker in B_MARKERS[1:]:
                    assert marker not in answer.text, (method, path, answer.text)
                visitor["key"] = ADMIN_KEY
                refused = httpx.request(method, target, json=body, params=visitor, timeout=10)
                assert refused.status_code == 401, (method, path, refused.text)
                tried += 1
            elif method == "post" and not path.startswith(("/u/", "/e/")):
                # ingest with A's keys: what A writes lands in A, never in B
                message = {
                    "type": "track",
                    "userId": B_SUBJECT,
                    "event": A_MARKER,
                    "messageId": str(uuid.uuid4()),
                }
                body = {"batch": [message]} if path == "/v1/batch" else message
                if path in ("/batch/", "/capture/", "/i/v1/analytics/events"):
                    body = {"api_key": WRITE_KEY, "event": A_MARKER, "distinct_id": B_SUBJECT}
                answer = httpx.post(
                    target, json=body, auth=(WRITE_KEY, ""), params={"key": WRITE_KEY}, timeout=10
                )
                assert answer.status_code < 500, (path, answer.text)
                if "api_key" in body:
                    body["api_key"] = ADMIN_KEY
                admin = httpx.post(
                    target, json=body, auth=(ADMIN_KEY, ""), params={"key": ADMIN_KEY}, timeout=10
                )
                assert admin.status_code in (400, 401, 403), (path, admin.text)
                tried += 1
    assert tried >= 30

    after = _b_state(server, b_admin)
    assert after["overrides"] == before["overrides"]
    assert after["push"] == before["push"]
    assert after["consent"] == before["consent"]
    assert after["suppressed"] == before["suppressed"]
    assert A_MARKER not in str(after["subject"])
    b_backtest = httpx.get(url + f"/api/v1/backtests/{backtest}", headers=_bearer(b_admin))
    assert b_backtest.status_code == 200

    server.process.terminate()
    server.process.wait(timeout=20)
    assert server.process.stdout is not None
    output = server.process.stdout.read()
    stored = b"".join(
        p.read_bytes() for p in server.db.parent.iterdir() if p.name.startswith(server.db.name)
    )
    assert len(stored) > 10_000
    for key in (WRITE_KEY, ADMIN_KEY, b_write, b_admin):
        assert key.encode() not in stored, f"a key in plain text in {server.db}"
        assert key.encode() not in output, f"a key in the server's output:\n{output.decode()}"


def test_a_server_started_without_keys_and_without_a_terminal_logs_none(tmp_path: Path) -> None:
    """Keys made on the first start are printed on a terminal only: a service's output is a
    log, and a key printed there would be kept in plain text."""
    env = {"FOREWARN_WRITE_KEY": "", "FOREWARN_ADMIN_KEY": ""}
    server = srv.start(tmp_path / "forewarn.db", env=env)
    try:
        conn = sqlite3.connect(server.db)
        try:
            assert conn.execute("SELECT count(*) FROM keys").fetchone() == (0,)
        finally:
            conn.close()
    finally:
        server.process.terminate()
        server.process.wait(timeout=20)
        assert server.process.stdout is not None
        output = server.process.stdout.read().decode()
        server.process.stdout.close()
    assert "fw_wk_" not in output and "fw_ak_" not in output, output
    assert "has no write key: make one with `forewarn keys create" in output, output
