"""The dashboard in the scale-out mode, on a real PostgreSQL: two `forewarn serve --role api`
processes and a worker, beside an embedded server given the same events. Every page's JSON
twin answers the same as the embedded server's (but for the moments each recorded, and the
partitions scale-out adds); a session signed in on one API process is honoured by the other,
its forms act on the shared store, and it ends everywhere when its key is revoked; no login,
a write key or another workspace's key open nothing."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from forewarn import clock, scaleout, settings, store_pg
from forewarn.sources import load_playbooks
from forewarn.worker import Worker
from tests import server as srv
from tests.server import ADMIN_KEY, WRITE_KEY
from tests.test_api_pg import _playbooks, api_process
from tests.test_report_pg import PLAYBOOK, moments, outcomes

BEARER = {"Authorization": f"Bearer {ADMIN_KEY}"}
USERS = 12


@dataclass
class ScaleOut:
    """Two API processes and a worker stepped by the test, on one database."""

    a: httpx.Client
    b: httpx.Client
    pool: store_pg.Pool
    worker: Worker
    workspace: int

    def send(self, messages: list[dict[str, Any]], key: str = WRITE_KEY) -> None:
        r = self.a.post("/v1/batch", json={"batch": messages}, auth=(key, ""))
        assert r.status_code == 200 and r.json()["accepted"] == len(messages), r.text
        self.worker.run_until_idle(clock.now_ms())


@pytest.fixture
def scale_out(url: str, tmp_path: Path) -> Iterator[ScaleOut]:
    playbooks = _playbooks(tmp_path / "playbooks", PLAYBOOK)
    triggers = load_playbooks(playbooks)
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(api_process(url, playbooks))
        b = stack.enter_context(api_process(url, playbooks))
        pool = store_pg.connect(url)
        stack.callback(pool.close)
        with pool.connection() as conn:
            ws = store_pg.workspace_id(conn, "default")
        assert ws is not None
        composer, keep = scaleout.composer_for(pool, playbooks, triggers)  # as a worker's
        worker = Worker(pool, ws, triggers, settings.policy(), composer, keep)
        yield ScaleOut(a, b, pool, worker, ws)


# what differs between the modes for the same events: the moments each recorded (the
# embedded engine applies an event when it takes it in, a worker at the event's own time),
# the ids each store gave, where scale-out keeps a state, and what its engine's lag counts
MOMENTS = {"at", "send_at", "done", "created", "due", "since", "until", "last_firing", "t"}
IDS = {"firing", "id", "key", "partition", "episode_started", "lag_unit"}


def _comparable(data: Any) -> Any:
    """An answer without what differs between the modes; lists sorted (the order of items
    recorded at one moment is each store's)."""
    if isinstance(data, dict):
        return {k: _comparable(v) for k, v in data.items() if k not in MOMENTS | IDS}
    if isinstance(data, list):
        items = [_comparable(v) for v in data]
        return sorted(items, key=lambda v: msgspec.json.encode(v))
    return data


TWINS = (
    "/overview.json",
    "/triggers.json",
    "/triggers/export-trouble.json",
    "/triggers/storage-85.json",
    "/customers.json",
    "/customers/u0.json",
    "/customers/u3.json",
    "/customers/acme.json",
    "/customers/u3.json?why=export-trouble",
    "/customers/acme.json?why=storage-85",
    "/outreach.json",
    "/outreach.json?status=held_out",
    "/outreach.json?trigger=storage-85",
    "/outbox.json",
    "/backtests.json",
    "/customers/nobody.json",
    "/triggers/nope.json",
    "/backtests/1.json",
)


def test_every_page_answers_the_same_as_on_an_embedded_server(
    scale_out: ScaleOut, tmp_path: Path
) -> None:
    embedded = srv.start(
        tmp_path / "forewarn.db",
        env={"FOREWARN_DELIVERY": "off"},
        playbooks=tmp_path / "playbooks",
    )
    try:
        first = moments(USERS)
        _send(embedded, scale_out, first, len(first))
        then = outcomes(USERS)  # stamped after every firing, in both modes
        _send(embedded, scale_out, then, len(first) + len(then))
        answers = {}
        for path in TWINS:
            want = httpx.get(embedded.url + path, headers=BEARER, timeout=10)
            for client in (scale_out.a, scale_out.b):
                got = client.get(path, headers=BEARER)
                assert got.status_code == want.status_code, (path, got.text, want.text)
                assert _comparable(got.json()) == _comparable(want.json()), path
            answers[path] = want.json()
        # what was compared is what happened
        assert answers["/overview.json"]["engine"] == {"up": True, "lag": 0, "lag_unit": "batches"}
        counts = answers["/overview.json"]["counts"]
        assert counts["firings"] == USERS + 1 and counts["events"] == len(first) + len(then)
        assert counts["held_out"] and counts["firings"] - counts["held_out"] > 0
        rows = {t["id"]: t for t in answers["/triggers.json"]["triggers"]}
        assert rows["export-trouble"]["firings"] == USERS and rows["storage-85"]["firings"] == 1
        detail = answers["/triggers/export-trouble.json"]
        assert {r["kind"] for r in detail["rates"]} == {"goal", "failure"}
        assert len(answers["/customers.json"]["customers"]) == USERS + 1
        kinds = {item["kind"] for item in answers["/customers/u0.json"]["timeline"]}
        assert {"event", "firing"} <= kinds
        assert answers["/customers/acme.json?why=storage-85"]["why"]["true"] is True
        assert len(answers["/outreach.json"]["outreach"]) == USERS + 1
        assert answers["/customers/nobody.json"]["error"]["code"] == "not_found"

        # the settings: the same keys, channels and audit log (each process's environment
        # aside: the embedded server here runs without delivery)
        want = httpx.get(embedded.url + "/settings.json", headers=BEARER, timeout=10).json()
        got = scale_out.b.get("/settings.json", headers=BEARER).json()
        for part in ("keys", "channels", "suppressed_subjects", "unsubscribed", "overrides"):
            assert _comparable(got[part]) == _comparable(want[part]), part
        audit = [[(r["actor"], r["action"], r["target"]) for r in d["audit"]] for d in (got, want)]
        assert audit[0] == audit[1] and len(audit[0]) == 2

        # the pages themselves, rendered from the same data
        cookie = _sign_in(scale_out.a)[0]
        for page in ("/", "/triggers", "/triggers/export-trouble", "/customers/u0", "/outbox"):
            html = scale_out.b.get(page, headers=_session(cookie))
            assert html.status_code == 200, (page, html.text)
            assert html.headers["content-type"].startswith("text/html")
            assert "script-src 'self'" in html.headers["content-security-policy"]
        assert scale_out.b.get("/assets/dashboard.js").status_code == 200
        customer = scale_out.b.get("/customers/u0", headers=_session(cookie)).text
        assert "export-trouble" in customer and "Export Failed" in customer
    finally:
        srv.stop(embedded)


def _send(
    embedded: srv.Server, scale_out: ScaleOut, messages: list[dict[str, Any]], total: int
) -> None:
    """The messages to both modes, applied by both."""
    r = httpx.post(
        embedded.url + "/v1/batch", json={"batch": messages}, auth=(WRITE_KEY, ""), timeout=10
    )
    assert r.status_code == 200, r.text
    scale_out.send(messages)
    assert embedded.wait_for(lambda: embedded.metric("forewarn_engine_events_total") >= total)


def _session(cookie: str) -> dict[str, str]:
    return {"Cookie": f"fw_session={cookie}"}


def _sign_in(client: httpx.Client, key: str = ADMIN_KEY) -> tuple[str, str]:
    """Sign in on this process: the session cookie's value and its CSRF token."""
    page = client.get("/signin?next=/triggers")
    token = re.search(r'name="token" value="([^"]+)"', page.text)
    assert token is not None, page.text
    r = client.post(
        "/signin",
        data={"token": token.group(1), "key": key, "next": "/triggers"},
        headers={"Cookie": f"fw_signin={token.group(1)}"},
    )
    assert r.status_code == 303 and r.headers["location"] == "/triggers", r.text
    cookie = r.cookies["fw_session"]
    triggers = client.get("/triggers", headers=_session(cookie))
    csrf = re.search(r'name="csrf" value="([^"]+)"', triggers.text)
    assert csrf is not None, triggers.text
    client.cookies.clear()  # each request below says which session it is
    return cookie, csrf.group(1)


def test_a_session_from_one_api_process_is_honoured_by_another(scale_out: ScaleOut) -> None:
    scale_out.send(moments(4))
    cookie, csrf = _sign_in(scale_out.a)
    session = _session(cookie)
    seen = scale_out.b.get("/overview.json", headers=session)
    assert seen.status_code == 200 and seen.json()["counts"]["firings"] == 5
    assert seen.json()["engine"] == {"up": True, "lag": 0, "lag_unit": "events"}
    # events the workers have not applied yet show as the engine's lag
    r = scale_out.a.post("/v1/batch", json={"batch": moments(2)[1:]}, auth=(WRITE_KEY, ""))
    assert r.status_code == 200, r.text
    behind = scale_out.b.get("/", headers=session).text
    assert "The engine is 2 events behind." in behind
    scale_out.worker.run_until_idle(clock.now_ms())

    # a form posted to the other process acts on the shared store, and both see it
    r = scale_out.b.post(
        "/triggers/export-trouble/pause",
        data={"csrf": csrf, "reason": "too noisy", "next": "/triggers"},
        headers=session,
    )
    assert r.status_code == 303, r.text
    status = {
        t["id"]: (t["status"], t["override"] and t["override"]["reason"])
        for t in scale_out.a.get("/triggers.json", headers=session).json()["triggers"]
    }
    assert status == {"export-trouble": ("paused", "too noisy"), "storage-85": ("live", None)}
    scale_out.send([moments(5)[-1]])  # a new firing of the paused trigger: recorded only
    with scale_out.pool.connection() as conn:
        late = conn.execute("SELECT decision, reason FROM firings WHERE subject = 'u4'")
        assert late.fetchall() == [("suppressed", "paused")]
    stale = scale_out.b.post(
        "/triggers/export-trouble/resume", data={"csrf": "forged"}, headers=session
    )
    assert stale.status_code == 403

    # a backtest started on one process runs there, and the other shows it
    started = scale_out.a.post(
        "/backtests",
        data={"csrf": csrf, "since": "1h", "t:storage-85": "on"},
        headers=session,
    )
    assert started.status_code == 303 and started.headers["location"].startswith("/backtests/")
    job = started.headers["location"] + ".json"
    deadline = time.monotonic() + 30
    while (done := scale_out.b.get(job, headers=session).json())["status"] == "running":
        assert time.monotonic() < deadline, done
        time.sleep(0.1)
    assert done["status"] == "done" and done["triggers"] == ["storage-85"], done
    assert [t["firings"] for t in done["result"]["triggers"]] == [1]
    listed = scale_out.b.get("/backtests.json", headers=session).json()["backtests"]
    assert [b["id"] for b in listed] == [int(job.split("/")[-1].removesuffix(".json"))]

    # a key made on one process signs in on the other; revoked there, its session ends at once
    made = scale_out.b.post(
        "/settings/keys", data={"csrf": csrf, "kind": "admin", "name": "ops"}, headers=session
    )
    assert made.status_code == 200, made.text
    token = re.search(r"fw_ak_[A-Za-z0-9_-]{20,}", made.text)
    assert token is not None
    ops_cookie = _sign_in(scale_out.b, token.group(0))[0]
    assert scale_out.a.get("/overview.json", headers=_session(ops_cookie)).status_code == 200
    keys = scale_out.a.get("/settings.json", headers=session).json()["keys"]
    (ops,) = [k for k in keys if k["name"] == "ops"]
    r = scale_out.a.post(f"/settings/keys/{ops['id']}/revoke", data={"csrf": csrf}, headers=session)
    assert r.status_code == 303, r.text
    kept = [k for k in keys if k["name"] != "ops" and k["kind"] == "admin"]
    refused = scale_out.b.post(
        f"/settings/keys/{kept[0]['id']}/revoke",
        data={"csrf": csrf},
        headers={**session, "Accept": "application/json"},
    )
    assert refused.status_code == 409 and "FOREWARN_ADMIN_KEY" in refused.text, refused.text
    ended = scale_out.b.get("/overview.json", headers=_session(ops_cookie))
    assert ended.status_code == 401 and ended.json()["error"]["code"] == "unauthorized"
    audit = scale_out.b.get("/settings.json", headers=session).json()["audit"]
    assert [(r["actor"], r["action"]) for r in audit[:3]] == [
        ("dashboard:" + ADMIN_KEY[:10], "key.revoked"),
        ("dashboard:" + ADMIN_KEY[:10], "key.created"),
        ("dashboard:" + ADMIN_KEY[:10], "trigger.paused"),
    ]

    # signing out ends the cookie's use on this browser
    out = scale_out.b.post("/signout", data={"csrf": csrf}, headers=session)
    assert out.status_code == 303 and out.headers["location"] == "/signin"


def test_no_login_a_write_key_or_another_workspace_opens_nothing(scale_out: ScaleOut) -> None:
    scale_out.send(moments(3))
    b_write, b_admin = "fw_wk_beta-write-key-0123456789", "fw_ak_beta-admin-key-0123456789"
    beta = store_pg.ensure_workspace(scale_out.pool, "beta", clock.now_ms(), b_write, b_admin)
    b_worker = Worker(scale_out.pool, beta, scale_out.worker.triggers)
    secret_user = "tenant-b-user-7f3a"
    r = scale_out.a.post(
        "/v1/batch",
        json={"batch": [m | {"userId": secret_user} for m in moments(1)]},
        auth=(b_write, ""),
    )
    assert r.status_code == 200, r.text
    b_worker.run_until_idle(clock.now_ms())

    for client in (scale_out.a, scale_out.b):
        nobody = client.get("/overview.json")
        assert nobody.status_code == 401 and nobody.json()["error"]["code"] == "unauthorized"
        page = client.get("/customers/u0")
        assert page.status_code == 303 and page.headers["location"].startswith("/signin")
        for key in (WRITE_KEY, b_write):
            refused = client.get("/overview.json", headers={"Authorization": f"Bearer {key}"})
            assert refused.status_code == 403, refused.text
        forged = client.get("/overview.json", headers=_session("e30.forged"))
        assert forged.status_code == 401
        signin = client.get("/signin")
        token = re.search(r'name="token" value="([^"]+)"', signin.text)
        assert token is not None
        wrong = client.post(
            "/signin",
            data={"token": token.group(1), "key": WRITE_KEY, "next": "/"},
            headers={"Cookie": f"fw_signin={token.group(1)}"},
        )
        assert wrong.status_code == 401 and "a write key cannot sign in" in wrong.text
        client.cookies.clear()

    # each workspace's admin sees its own customers only, by key or by session
    beta_cookie = _sign_in(scale_out.b, b_admin)[0]
    mine = scale_out.a.get("/customers.json", headers=BEARER).json()["customers"]
    theirs = scale_out.a.get("/customers.json", headers=_session(beta_cookie)).json()
    assert secret_user not in {c["id"] for c in mine} and len(mine) == 4
    assert {c["id"] for c in theirs["customers"]} == {secret_user, "acme"}
    hidden = scale_out.a.get(f"/customers/{secret_user}.json", headers=BEARER)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
    assert scale_out.a.get("/customers/u0.json", headers=_session(beta_cookie)).status_code == 404
    for path in ("/overview.json", "/outreach.json", "/outbox.json", "/settings.json"):
        answer = scale_out.b.get(path, headers=BEARER).text
        assert secret_user not in answer and b_admin[:10] not in answer, path
