"""The dashboard over HTTP, without a browser: each page's JSON twin against a server fed by the
simulator, sign-in and sessions, CSRF on every form, and hostile values shown as text."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from forewarn import dashboard_auth, store_sqlite

from . import server as srv
from .world import serve_world

XSS = '<img src=x onerror="window.__xss=1">'
BEARER = {"Authorization": f"Bearer {srv.ADMIN_KEY}"}


@pytest.fixture(scope="module")
def maildir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("maildir")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, maildir: Path) -> Any:
    server = serve_world(
        tmp_path_factory.mktemp("dashboard"), {"FOREWARN_DEMO_MAILDIR": str(maildir)}
    )
    yield server
    srv.stop(server)


@contextmanager
def signed_in(live: srv.Server) -> Iterator[tuple[httpx.Client, str]]:
    """A client with a dashboard session, and the session's CSRF token."""
    with httpx.Client(base_url=live.url, timeout=10) as client:
        yield client, _sign_in(client)


def _sign_in(client: httpx.Client) -> str:
    page = client.get("/signin?next=/triggers")
    token = re.search(r'name="token" value="([^"]+)"', page.text)
    assert token is not None
    r = client.post(
        "/signin", data={"token": token.group(1), "key": srv.ADMIN_KEY, "next": "/triggers"}
    )
    assert r.status_code == 303 and r.headers["location"] == "/triggers"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and srv.ADMIN_KEY not in cookie
    triggers = client.get("/triggers")
    csrf = re.search(r'name="csrf" value="([^"]+)"', triggers.text)
    assert csrf is not None
    return csrf.group(1)


TWINS = {
    "/overview.json": {"counts", "suppressed_by_reason", "per_hour", "latest"},
    "/triggers.json": {"triggers"},
    "/triggers/payment-failed.json": {"rates", "per_day", "suppressed_by_reason", "examples"},
    "/customers.json": {"customers"},
    "/outreach.json": {"outreach", "filters"},
    "/outbox.json": {"counts", "messages", "emails"},
    "/backtests.json": {"backtests"},
    "/settings.json": {"keys", "channels", "policy"},
}


def test_every_page_has_a_json_twin_from_the_same_data(live):
    with signed_in(live) as (client, _):
        for path, keys in TWINS.items():
            by_suffix = httpx.get(live.url + path, headers=BEARER, timeout=10)
            assert by_suffix.status_code == 200, (path, by_suffix.text)
            data = by_suffix.json()
            assert keys <= set(data), (path, sorted(data))
            page = path.removesuffix(".json").replace("/overview", "/") or "/"
            by_accept = client.get(page, headers={"Accept": "application/json"})
            assert by_accept.status_code == 200, page
            assert set(by_accept.json()) == set(data), page
            html = client.get(page)
            assert html.headers["content-type"].startswith("text/html"), page
            assert "script-src 'self'" in html.headers["content-security-policy"]


def test_the_overview_counts_what_the_api_lists(live):
    data = httpx.get(live.url + "/overview.json?since=30d", headers=BEARER, timeout=10).json()
    firings = live.firings(limit=10_000)
    assert data["counts"]["firings"] == len(firings) > 0
    held = sum(1 for f in firings if f["decision"] == "held_out")
    assert data["counts"]["held_out"] == held
    assert sum(data["per_hour"]["send"]) + sum(data["per_hour"]["held_out"]) + sum(
        data["per_hour"]["suppressed"]
    ) == len(firings)
    assert data["counts"]["events"] == live.metric("forewarn_events_accepted_total")
    assert len(data["latest"]) == min(20, len(firings))


def test_a_triggers_rates_carry_intervals(live):
    data = httpx.get(
        live.url + "/triggers/onboarding-stalled.json?since=30d", headers=BEARER, timeout=10
    ).json()
    assert data["status"] == "live"
    (goal,) = data["rates"]
    assert goal["kind"] == "goal" and goal["event"] == "Onboarding Completed"
    for group in (goal["treated"], goal["held_out"]):
        low, high = group["ci"]
        assert 0.0 <= low <= high <= 1.0
        if group["n"]:
            assert low <= group["rate"] <= high
    r = httpx.get(live.url + "/triggers/nope.json", headers=BEARER, timeout=10)
    assert r.status_code == 404 and "no trigger 'nope'" in r.json()["error"]["message"]


def test_the_customer_timeline_and_why(live):
    subject = live.firings(trigger="payment-failed", limit=1)[0]["subject"]
    data = httpx.get(
        live.url + f"/customers/{subject}.json?why=payment-failed", headers=BEARER, timeout=10
    ).json()
    kinds = {item["kind"] for item in data["timeline"]}
    assert {"event", "firing", "message"} <= kinds
    firing = next(i for i in data["timeline"] if i["kind"] == "firing")
    assert firing["evidence"]["condition"] == "event" and firing["decision"]
    assert data["why"]["trigger"] == "payment-failed" and data["why"]["known"] is True
    times = [i["at"] for i in data["timeline"]]
    assert times == sorted(times, reverse=True)
    missing = httpx.get(live.url + "/customers/nobody-at-all.json", headers=BEARER, timeout=10)
    assert missing.status_code == 404


# --- who may look -----------------------------------------------------------------------------


def test_without_a_session_pages_redirect_and_twins_refuse(live):
    r = httpx.get(live.url + "/triggers?since=7d", timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/signin?next=/triggers%3Fsince%3D7d"
    for path in TWINS:
        r = httpx.get(live.url + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
    wrong = httpx.get(
        live.url + "/triggers.json",
        headers={"Authorization": f"Bearer {srv.WRITE_KEY}"},
        timeout=10,
    )
    assert wrong.status_code == 403


def test_signing_in_needs_an_admin_key_and_the_forms_token(live):
    with httpx.Client(base_url=live.url, timeout=10) as client:
        page = client.get("/signin")
        token = re.search(r'name="token" value="([^"]+)"', page.text)
        assert token is not None
        for key in (srv.WRITE_KEY, "fw_ak_not-a-key-of-this-server", ""):
            r = client.post("/signin", data={"token": token.group(1), "key": key})
            assert r.status_code == 401 and "not an admin key" in r.text
            token = re.search(r'name="token" value="([^"]+)"', r.text)
            assert token is not None
        # another site's form has no token (and no sign-in cookie): refused
        stranger = httpx.post(live.url + "/signin", data={"key": srv.ADMIN_KEY, "token": "x"})
        assert stranger.status_code == 403 and "fw_session" not in stranger.headers.get(
            "set-cookie", ""
        )


def test_forms_need_the_sessions_csrf_token(live):
    with signed_in(live) as (client, csrf):
        path = "/triggers/storage-85/pause"
        for fields, headers in (
            ({}, {}),
            ({"csrf": "forged"}, {}),
            ({"csrf": csrf}, {"Origin": "https://evil.example"}),
            ({"csrf": csrf}, {"Origin": "null"}),
        ):
            r = client.post(path, data=fields, headers=headers)
            assert r.status_code == 403, (fields, headers, r.text)
            assert "stale or came from another site" in r.text
        assert "storage-85" not in live.admin("/api/v1/triggers/overrides")["overrides"]
        anonymous = httpx.post(live.url + path, data={"csrf": csrf}, timeout=10)
        assert anonymous.status_code == 401
        r = client.post(path, data={"csrf": csrf, "next": "//evil.example/", "reason": "too noisy"})
        assert r.status_code == 303 and r.headers["location"] == "/"  # never to another site
        override = live.admin("/api/v1/triggers/overrides")["overrides"]["storage-85"]
        assert override == {**override, "mode": "paused", "by": "dashboard", "reason": "too noisy"}
        # behind a proxy that ends TLS, the page's origin is FOREWARN_PUBLIC_URL's
        public = {"Origin": "http://127.0.0.1:8750"}
        r = client.post(
            "/triggers/storage-85/resume",
            data={"csrf": csrf, "next": "/triggers"},
            headers=public,
        )
        assert r.status_code == 303 and r.headers["location"] == "/triggers"
        assert "storage-85" not in live.admin("/api/v1/triggers/overrides")["overrides"]
        r = client.post("/triggers/storage-85/explode", data={"csrf": csrf})
        assert r.status_code == 404


def test_a_session_ends_when_its_key_is_revoked(live, tmp_path):
    conn = store_sqlite.connect(live.db)
    try:
        workspace = store_sqlite.workspaces(conn)[0][0]
        token = store_sqlite.add_key(conn, workspace, "admin", 0, name="temporary")
    finally:
        conn.close()
    with httpx.Client(base_url=live.url, timeout=10) as client:
        page = client.get("/signin")
        form = re.search(r'name="token" value="([^"]+)"', page.text)
        assert form is not None
        r = client.post("/signin", data={"token": form.group(1), "key": token})
        assert r.status_code == 303
        assert client.get("/settings").status_code == 200
        conn = sqlite3.connect(live.db)
        conn.execute(
            "UPDATE keys SET revoked_ms = 1 WHERE hash = ?", (store_sqlite.hash_key(token),)
        )
        conn.commit()
        conn.close()
        assert client.get("/settings").status_code == 303


def test_a_tampered_or_expired_cookie_is_no_session(tmp_path):
    conn = store_sqlite.connect(tmp_path / "forewarn.db")
    store_sqlite.ensure_workspace(conn, "default", 0, admin_key=srv.ADMIN_KEY)
    key = dashboard_auth.admin_key_id(conn, srv.ADMIN_KEY)
    assert key is not None and dashboard_auth.admin_key_id(conn, srv.WRITE_KEY) is None
    secret = dashboard_auth.secret(conn)
    value, csrf = dashboard_auth.issue(secret, key[0], key[1], 1_000)
    viewer = dashboard_auth.read(conn, secret, value, 1_001)
    assert viewer is not None and viewer.workspace == key[1] and viewer.csrf == csrf
    body, mac = value.split(".")
    assert dashboard_auth.read(conn, secret, body + "x." + mac, 1_001) is None
    assert dashboard_auth.read(conn, "another secret", value, 1_001) is None
    assert dashboard_auth.read(conn, secret, value, 1_000 + dashboard_auth.SESSION_S) is None
    assert dashboard_auth.read(conn, secret, "garbage", 1_001) is None
    assert dashboard_auth.read(conn, secret, body + ".é" + mac, 1_001) is None  # not ASCII
    assert not dashboard_auth.same(csrf, "é" + csrf)
    conn.close()


def test_non_ascii_cookies_and_tokens_are_refused_not_errors(live):
    with httpx.Client(base_url=live.url, timeout=10) as client:
        raw = [(b"Cookie", "fw_session=YQ.é".encode("latin-1"))]  # as a browser may send it
        assert client.get("/settings", headers=raw).status_code == 303  # no session: sign in
        r = client.post("/signin", data={"token": "é", "key": srv.ADMIN_KEY})
        assert r.status_code == 403
    with signed_in(live) as (client, _):
        r = client.post("/triggers/storage-85/pause", data={"csrf": "é"})
        assert r.status_code == 403


def test_a_key_cannot_take_the_name_of_the_keys_from_the_environment(live):
    with signed_in(live) as (client, csrf):
        r = client.post(
            "/settings/keys", data={"csrf": csrf, "kind": "write", "name": "from the environment"}
        )
        assert r.status_code == 400 and "choose another" in r.text


# --- hostile values ---------------------------------------------------------------------------


def test_hostile_traits_and_properties_show_as_text(live):
    events = [
        {"type": "identify", "userId": "hostile", "traits": {"first_name": XSS}},
        {"type": "track", "userId": "hostile", "event": "Login", "properties": {"note": XSS}},
    ]
    r = httpx.post(
        live.url + "/v1/batch", json={"batch": events}, auth=(srv.WRITE_KEY, ""), timeout=10
    )
    r.raise_for_status()
    with signed_in(live) as (client, _):
        page = live.wait_for(
            lambda: (r := client.get("/customers/hostile")).status_code == 200 and r.text,
            timeout_s=20,
        )
        assert page and "onerror=&#34;window.__xss=1&#34;" in page
        assert XSS not in page and "<img" not in page


def test_the_outbox_shows_captured_emails_as_text_only(live, maildir):
    mail = EmailMessage()
    mail["Subject"] = f"Storage almost full {XSS}"
    mail["From"] = "Forewarn <noreply@example.com>"
    mail["To"] = "ops@example.com"
    mail.set_content(f"<p>Hello <script>alert(1)</script>{XSS}</p>", subtype="html")
    (maildir / "0001.eml").write_bytes(bytes(mail))
    data = httpx.get(live.url + "/outbox.json", headers=BEARER, timeout=10).json()
    (found,) = data["emails"]
    assert found["to"] == "ops@example.com" and found["subject"].startswith("Storage almost")
    assert "<" not in found["text"] and "Hello" in found["text"]
    with signed_in(live) as (client, _):
        page = client.get("/outbox").text
        assert XSS not in page and "<script>alert" not in page


def test_a_chat_conversation_is_on_the_customers_timeline(tmp_path):
    from forewarn import dashboard_data, store_outbox
    from forewarn.channels import Outgoing

    conn = store_sqlite.connect(tmp_path / "forewarn.db")
    opener = Outgoing(
        id=1,
        key="k1",
        channel="chat",
        workspace=1,
        trigger="settings-dwell",
        subject="u1",
        scope="user",
        text="Looking for something in settings?",
    )
    assert store_outbox.add_to_inbox(conn, opener, "chat", 1_000)
    (row,) = store_outbox.inbox(conn, 1, "user", "u1")
    store_outbox.add_conversation_message(conn, 1, row["id"], "user", "custom domain?", 2_000)
    store_outbox.add_conversation_message(conn, 1, row["id"], "assistant", "See DNS.", 3_000)
    data = dashboard_data.customer(conn, 1, "u1", [], [])
    chat = [(i["author"], i["text"]) for i in data["timeline"] if i["kind"] == "chat"]
    # newest first; the customer's own words come from their reply events, not twice
    assert chat == [("assistant", "See DNS."), ("assistant", "Looking for something in settings?")]
    conn.close()


def test_after_a_form_the_dashboard_only_goes_to_its_own_pages():
    from forewarn.dashboard import _safe_next

    for own in ("/", "/triggers", "/triggers/storage-85?since=30d", "/customers/a%2Fb"):
        assert _safe_next(own) == own
    for away in (
        "//evil.example",
        "/\t/evil.example",
        "/\\evil.example",
        "https://evil.example",
        "",
        None,
        "/a\nb",
    ):
        assert _safe_next(away) == "/", away


def test_settings_show_where_channels_point_never_their_secrets(tmp_path, monkeypatch):
    from forewarn import dashboard_more

    monkeypatch.setenv("FOREWARN_SMTP_URL", "smtp://mailer:hunter2@mail.example.com:587")
    monkeypatch.setenv("FOREWARN_WEBHOOK_URL", "https://hooks.slack.com/services/T0/B0/s3cr3t")
    monkeypatch.setenv("FOREWARN_WEBHOOK_SECRET", "whsec_dG9wc2VjcmV0")
    conn = store_sqlite.connect(tmp_path / "forewarn.db")
    store_sqlite.ensure_workspace(conn, "default", 0, srv.WRITE_KEY, srv.ADMIN_KEY)
    data = dashboard_more.settings_view(conn, 1)
    conn.close()
    shown = repr(data)
    for secret in ("hunter2", "s3cr3t", "whsec_", srv.ADMIN_KEY, srv.WRITE_KEY):
        assert secret not in shown, secret
    channels = {c["channel"]: c for c in data["channels"]}
    assert channels["email"]["detail"] == "smtp://mail.example.com:587"
    assert channels["webhook"]["detail"] == "https://hooks.slack.com"
    assert channels["webhook"]["signed"] is True
    assert {k["kind"] for k in data["keys"]} == {"write", "admin"}


def test_a_customer_id_with_slashes_and_quotes_has_its_page(live):
    odd = "o'brien/ops team"
    r = httpx.post(
        live.url + "/v1/identify",
        json={"userId": odd, "traits": {"plan": "pro"}},
        auth=(srv.WRITE_KEY, ""),
        timeout=10,
    )
    r.raise_for_status()
    path = "/customers/" + quote(odd, safe="")
    data = live.wait_for(
        lambda: (
            (r := httpx.get(live.url + path + ".json", headers=BEARER, timeout=10)).status_code
            == 200
            and r.json()
        ),
        timeout_s=20,
    )
    assert data and data["id"] == odd
    with signed_in(live) as (client, _):
        page = client.get(path).text
    assert f'action="{path}"' in page  # the why form comes back to the same customer


def test_the_triggers_page_says_who_stopped_a_trigger_and_why():
    from forewarn import dashboard_data

    from .factories import playbook

    loaded = playbook("""
triggers:
  - id: noisy
    when: {event: {name: X}}
    action: {channel: email, message: hi}
    holdout: 0.5
    failure: {event: Ticket Created, within: 3d}
  - id: trial
    when: {event: {name: Y}}
    action: {channel: email, message: hi}
    mode: shadow
  - id: fine
    when: {event: {name: Z}}
    action: {channel: email, message: hi}
""")
    row = {
        "trigger": "noisy",
        "firings": 600,
        "firings_per_day": 20.0,
        "precision": 0.2,
        "goal_lift": None,
        "failure_lift": {"absolute": 0.2, "absolute_ci": [0.15, 0.25], "verdict": "harms"},
    }
    reason = "reaching out raises failures: 105/300 treated against 45/300 held out"
    overrides = {"noisy": {"mode": "paused", "reason": reason, "by": "auto-guard", "at_ms": 0}}
    data = dashboard_data.triggers(loaded, {"triggers": [row]}, overrides)
    shown = {t["id"]: t for t in data["triggers"]}
    assert shown["noisy"]["status"] == "paused"
    assert shown["noisy"]["override"]["by"] == "auto-guard"
    assert shown["noisy"]["override"]["reason"] == reason
    assert (
        shown["noisy"]["lift"]["on"] == "failure" and shown["noisy"]["lift"]["verdict"] == "harms"
    )
    assert shown["trial"]["status"] == "shadow" and shown["trial"]["override"] is None
    assert shown["fine"]["status"] == "live" and shown["fine"]["firings"] == 0


def test_an_auto_guard_pause_shows_with_its_reason(live):
    from forewarn import store_outbox

    reason = "3 of 40 treated subjects unsubscribed after it <over the limit>"
    conn = store_sqlite.connect(live.db)
    try:
        store_outbox.override_trigger(conn, 1, "usage-drop", "shadow", reason, "auto-guard", 0)
    finally:
        conn.close()
    try:
        with signed_in(live) as (client, _):
            page = client.get("/triggers").text
            detail = client.get("/triggers/usage-drop").text
        row = page.split('data-trigger="usage-drop"', 1)[1].split("</tr>", 1)[0]
        escaped = "3 of 40 treated subjects unsubscribed after it &lt;over the limit&gt;"
        assert "status-shadow" in row and escaped in row and "auto-guard" in row
        assert escaped in detail
    finally:
        live.admin_post("/api/v1/triggers/usage-drop/resume", {})


def test_keys_are_created_once_shown_and_revoked_from_settings(live):
    with signed_in(live) as (client, csrf):
        r = client.post("/settings/keys", data={"csrf": csrf, "kind": "admin", "name": "ops"})
        assert r.status_code == 200 and "shown only this once" in r.text
        token = re.search(r"data-new-key>([^<]+)<", r.text)
        assert token is not None and token.group(1).startswith("fw_ak_")
        new = {"Authorization": f"Bearer {token.group(1)}"}
        assert httpx.get(live.url + "/triggers.json", headers=new, timeout=10).status_code == 200
        assert token.group(1) not in client.get("/settings").text  # never again
        keys = httpx.get(live.url + "/settings.json", headers=BEARER, timeout=10).json()["keys"]
        ops = next(k for k in keys if k["name"] == "ops")
        env_admin = next(k for k in keys if k["kind"] == "admin" and k["name"] != "ops")

        r = client.post(f"/settings/keys/{ops['id']}/revoke", data={"csrf": csrf})
        assert r.status_code == 303
        refused = httpx.get(live.url + "/triggers.json", headers=new, timeout=10)
        assert refused.status_code == 401  # at once, not after a cache expires

        r = client.post(f"/settings/keys/{env_admin['id']}/revoke", data={"csrf": csrf})
        assert r.status_code == 409 and "FOREWARN_WRITE_KEY / FOREWARN_ADMIN_KEY" in r.text
        r = client.post("/settings/keys/99999/revoke", data={"csrf": csrf})
        assert r.status_code == 404
        r = client.post("/settings/keys", data={"csrf": csrf, "kind": "root", "name": "x"})
        assert r.status_code == 400 and "give one of write, admin" in r.text
        r = client.post("/settings/keys", data={"csrf": "forged", "kind": "admin", "name": "x"})
        assert r.status_code == 403
    assert httpx.get(live.url + "/triggers.json", headers=BEARER, timeout=10).status_code == 200


def test_the_last_admin_key_is_kept(tmp_path):
    conn = store_sqlite.connect(tmp_path / "forewarn.db")
    store_sqlite.ensure_workspace(conn, "default", 0)
    store_sqlite.add_key(conn, 1, "admin", 0, name="only one")
    (key_id,) = conn.execute("SELECT id FROM keys WHERE kind = 'admin'").fetchone()
    refused = dashboard_auth.revoke(conn, 1, key_id, 5)
    assert refused is not None and "last admin key" in refused
    store_sqlite.add_key(conn, 1, "admin", 0, name="second")
    assert dashboard_auth.revoke(conn, 1, key_id, 5) is None
    assert dashboard_auth.revoke(conn, 1, key_id, 6) is None  # already: nothing to do
    conn.close()


def test_a_bad_period_is_explained(live):
    r = httpx.get(live.url + "/triggers.json?since=soon", headers=BEARER, timeout=10)
    assert r.status_code == 400
    assert "since='soon'" in r.json()["error"]["message"]
    with signed_in(live) as (client, _):
        page = client.get("/?since=soon")
    assert page.status_code == 400 and "since=&#39;soon&#39;" in page.text


def test_a_session_survives_a_restart(tmp_path):
    db = tmp_path / "forewarn.db"
    env = {"FOREWARN_DELIVERY": "off", "FOREWARN_GUARD_EVERY": "off"}
    with srv.running(db, env=env) as first, httpx.Client(base_url=first.url, timeout=10) as client:
        _sign_in(client)
        cookie = client.cookies["fw_session"]
    with srv.running(db, env=env) as second:
        again = httpx.get(second.url + "/settings", cookies={"fw_session": cookie}, timeout=10)
        assert again.status_code == 200 and "Sign out" in again.text
        signin = httpx.get(second.url + "/signin?next=/outbox", cookies={"fw_session": cookie})
        assert signin.status_code == 303 and signin.headers["location"] == "/outbox"
        forged = httpx.get(
            second.url + "/settings", cookies={"fw_session": cookie[:-2] + "xx"}, timeout=10
        )
        assert forged.status_code == 303


def test_the_triggers_page_counts_firings_per_day(live):
    data = httpx.get(live.url + "/triggers.json?since=30d", headers=BEARER, timeout=10).json()
    firings = live.firings(limit=10_000)
    for t in data["triggers"]:
        assert len(t["per_day"]) in (30, 31)
        assert sum(t["per_day"]) == sum(1 for f in firings if f["trigger"] == t["id"]), t["id"]
    assert any(sum(t["per_day"]) for t in data["triggers"])
