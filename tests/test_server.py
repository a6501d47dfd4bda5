"""The live server, as real clients see it: Segment, PostHog and Sentry libraries from PyPI
send to a running `forewarn serve`; the engine fires; the admin API reports it."""

from __future__ import annotations

import gzip
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from . import server as srv
from .server import ADMIN_KEY, WRITE_KEY


@pytest.fixture(params=["process", "thread"])
def live(tmp_path: Path, request: pytest.FixtureRequest):
    """A server with its engine in a process of its own, and one with it in a thread."""
    with srv.running(tmp_path / "forewarn.db", env={"FOREWARN_ENGINE": request.param}) as server:
        yield server


def _segment_client(url: str):
    from segment.analytics.client import Client  # type: ignore[import-untyped]

    return Client(WRITE_KEY, host=url, gzip=True, max_retries=2, sync_mode=True)


def test_the_segment_client_makes_a_trigger_fire(live):
    client = _segment_client(live.url)
    client.group("u1", "acc-1", {"plan": "pro"})
    client.track("u1", "Payment Failed", {"amount": 49}, context={"groupId": "acc-1"})
    client.flush()
    firings = live.wait_for(lambda: live.firings(trigger="payment-failed"))
    assert [(f["trigger"], f["subject"], f["scope"]) for f in firings] == [
        ("payment-failed", "acc-1", "account")
    ]
    assert firings[0]["evidence"]
    assert live.metric("forewarn_events_accepted_total") == 2
    assert live.wait_for(lambda: live.metric("forewarn_engine_events_total") == 2)
    assert live.metric("forewarn_engine_up") == 1
    assert live.metric("forewarn_engine_errors_total") == 0


def test_a_resent_batch_is_stored_once_and_fires_once(live):
    batch = {
        "batch": [
            {
                "type": "track",
                "event": "Payment Failed",
                "userId": "u2",
                "context": {"groupId": "acc-2"},
                "messageId": "resent-1",
                "timestamp": "2026-11-23T10:00:00Z",
                "sentAt": "2026-11-23T10:00:00Z",
            }
        ]
    }
    for _ in range(3):
        r = httpx.post(live.url + "/v1/batch", json=batch, auth=(WRITE_KEY, ""), timeout=10)
        assert r.status_code == 200
    assert r.json()["duplicates"] == 1
    live.wait_for(lambda: live.firings(trigger="payment-failed"))
    assert live.metric("forewarn_events_accepted_total") == 1
    assert len(live.firings(trigger="payment-failed", subject="acc-2")) == 1


def test_one_bad_event_does_not_sink_its_batch(live):
    body = {
        "batch": [
            {"type": "track", "event": "Login", "userId": "u3", "messageId": "ok-1"},
            {"type": "track", "userId": "u3", "messageId": "bad-1"},
            {"type": "identify", "userId": "u3", "traits": {"plan": "pro"}, "messageId": "ok-2"},
        ]
    }
    r = httpx.post(live.url + "/v1/batch", json=body, auth=(WRITE_KEY, ""), timeout=10)
    assert r.status_code == 200
    answer = r.json()
    assert answer["accepted"] == 2
    assert [x["index"] for x in answer["rejected"]] == [1]
    assert "event" in answer["rejected"][0]["reason"]


def test_the_posthog_client_is_accepted(live):
    from posthog import Posthog

    client = Posthog(WRITE_KEY, host=live.url, sync_mode=True, max_retries=1)
    client.capture("Login", distinct_id="u4", properties={"$groups": {"company": "acc-4"}})
    client.flush()
    assert live.wait_for(lambda: live.metric("forewarn_events_accepted_total") == 1)


def test_a_sentry_error_becomes_an_error_event_that_fires(live):
    import sentry_sdk

    dsn = f"http://{WRITE_KEY}@127.0.0.1:{live.port}/42"
    sentry_sdk.init(dsn, default_integrations=False)
    try:
        with sentry_sdk.new_scope() as scope:
            scope.set_user({"id": "u5"})
            scope.fingerprint = ["billing-export-timeout"]
            try:
                raise TimeoutError("export timed out")
            except TimeoutError as exc:
                sentry_sdk.capture_exception(exc)
        sentry_sdk.flush(timeout=5)
    finally:
        sentry_sdk.get_client().close()
    firings = live.wait_for(lambda: live.firings(trigger="known-bug"))
    assert [f["subject"] for f in firings] == ["u5"]
    assert "Error" in json.dumps(firings[0]["evidence"])


def test_keys_are_checked_on_every_route(live):
    def post(path: str, **kw):
        return httpx.post(live.url + path, json={"batch": []}, timeout=10, **kw)

    assert post("/v1/batch").status_code == 401
    assert post("/v1/batch", auth=("fw_wk_nope-nope-nope-nope", "")).status_code == 401
    assert post("/v1/batch", auth=(ADMIN_KEY, "")).status_code == 403
    for path in ("/api/v1/triggers", "/api/v1/firings", "/api/v1/subjects/u1"):
        assert httpx.get(live.url + path, timeout=10).status_code == 401
        wrong = httpx.get(
            live.url + path, headers={"Authorization": f"Bearer {WRITE_KEY}"}, timeout=10
        )
        assert wrong.status_code == 403
        assert wrong.json()["error"]["code"] == "forbidden"
    assert (
        httpx.post(
            live.url + "/api/v1/playbooks/reload",
            headers={"Authorization": f"Bearer {WRITE_KEY}"},
            timeout=10,
        ).status_code
        == 403
    )


def test_every_error_has_one_shape(live):
    answers = [
        httpx.get(live.url + "/nowhere", timeout=10),
        httpx.delete(live.url + "/v1/batch", timeout=10),
        httpx.post(live.url + "/v1/batch", content=b"{", auth=(WRITE_KEY, ""), timeout=10),
        httpx.post(live.url + "/v1/batch", timeout=10),
        httpx.get(
            live.url + "/api/v1/firings?since=yesterday",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=10,
        ),
    ]
    assert [a.status_code for a in answers] == [404, 405, 400, 401, 400]
    for a in answers:
        body = a.json()
        assert set(body) == {"error"}
        assert set(body["error"]) >= {"code", "message"}
        assert body["error"]["message"]


def _batch(n: int, size: int = 0) -> dict[str, list[dict[str, object]]]:
    return {
        "batch": [
            {
                "type": "track",
                "event": "Login",
                "userId": f"u{i}",
                "messageId": str(uuid.uuid4()),
                "properties": {"pad": "x" * size} if size else {},
            }
            for i in range(n)
        ]
    }


def test_limits_at_their_boundaries(live):
    def send(body: object, gzipped: bool = False):
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if gzipped:
            data = gzip.compress(data)
            headers["Content-Encoding"] = "gzip"
        return httpx.post(
            live.url + "/v1/batch", content=data, headers=headers, auth=(WRITE_KEY, ""), timeout=30
        )

    assert send(_batch(2_500), gzipped=True).status_code == 200
    over = send(_batch(2_501), gzipped=True)
    assert over.status_code == 413 and "2500" in over.json()["error"]["message"].replace(",", "")
    big = send({"batch": [_batch(1, 33 * 1024)["batch"][0], _batch(1)["batch"][0]]})
    assert big.status_code == 200
    assert [r["index"] for r in big.json()["rejected"]] == [0]
    huge = send(_batch(40, 13 * 1024), gzipped=True)
    assert huge.status_code == 413


def test_subject_and_why(live):
    client = _segment_client(live.url)
    client.identify("u6", {"created_at": "2026-01-01T00:00:00Z"})
    client.flush()
    live.wait_for(lambda: live.metric("forewarn_events_accepted_total") == 1)
    subject = live.wait_for(lambda: _maybe(live, "/api/v1/subjects/u6"))
    assert subject["as"][0]["traits"]["created_at"] == "2026-01-01T00:00:00Z"
    why = live.admin("/api/v1/subjects/u6/why", trigger="onboarding-stalled")
    assert why["known"] is True and why["true"] is True


def _maybe(live: srv.Server, path: str) -> object:
    try:
        return live.admin(path)
    except httpx.HTTPStatusError:
        return None


def test_openapi_lists_every_route(live):
    doc = httpx.get(live.url + "/openapi.json", timeout=10).json()
    for path in ("/v1/batch", "/batch/", "/api/{project}/envelope/", "/api/v1/firings"):
        assert path in doc["paths"]


def test_the_rate_limit_answers_429_with_retry_after(tmp_path):
    with srv.running(tmp_path / "forewarn.db", env={"FOREWARN_RATE_LIMIT": "100"}) as server:
        codes = []
        for _ in range(3):
            r = httpx.post(
                server.url + "/v1/batch", json=_batch(100), auth=(WRITE_KEY, ""), timeout=10
            )
            codes.append(r.status_code)
        assert codes == [200, 200, 429]
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limited"


def test_every_route_in_the_openapi_document_wants_its_key(live):
    doc = httpx.get(live.url + "/openapi.json", timeout=10).json()
    checked = 0
    for path, operations in doc["paths"].items():
        url = live.url + path.replace("{project}", "42").replace("{flavour}", "generic").replace(
            "{subject}", "u1"
        ).replace("{id}", "1")
        for method, op in operations.items():
            kinds = {name for s in op.get("security", []) for name in s}
            if "widgetAnonymousId" in kinds:  # the widget: a write key and who the visitor is
                for params in (
                    {"anon": "visitor-0001"},
                    {"key": ADMIN_KEY, "anon": "visitor-0001"},
                ):
                    refused = httpx.request(method.upper(), url, params=params, json={}, timeout=10)
                    assert refused.status_code == 401, (method, path, refused.text)
                checked += 1
                continue
            ingest_route = method == "post" and not path.startswith("/api/v1/")
            if not kinds and not ingest_route:
                continue  # open: health, metrics, this document
            anonymous = httpx.request(method.upper(), url, json={}, timeout=10)
            assert anonymous.status_code == 401, (method, path, anonymous.text)
            assert anonymous.json()["error"]["code"] == "unauthorized"
            wrong = ADMIN_KEY if ingest_route else WRITE_KEY
            headers = {} if ingest_route else {"Authorization": f"Bearer {wrong}"}
            auth = (wrong, "") if ingest_route and "writeKey" in kinds else None
            if headers or auth:
                other = httpx.request(
                    method.upper(), url, json={}, headers=headers, auth=auth, timeout=10
                )
                assert other.status_code == 403, (method, path, other.text)
            checked += 1
    assert checked >= 15


def test_a_generic_ticket_webhook_becomes_a_ticket_event(live):
    ticket = {
        "id": "T-1",
        "event": "created",
        "user_id": "u7",
        "account_id": "acc-7",
        "subject": "Export fails",
        "priority": "urgent",
    }
    r = httpx.post(
        live.url + "/webhooks/tickets/generic", params={"key": WRITE_KEY}, json=ticket, timeout=10
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1
    bad = httpx.post(
        live.url + "/webhooks/tickets/nonsense", params={"key": WRITE_KEY}, json=ticket, timeout=10
    )
    assert bad.status_code == 404 and "generic" in bad.json()["error"]["message"]
    subject = live.wait_for(lambda: _maybe(live, "/api/v1/subjects/u7"))
    assert [e["name"] for e in subject["events"]] == ["Ticket Created"]


def test_a_signed_stripe_webhook_fires_and_a_forged_one_is_refused(tmp_path):
    import hashlib
    import hmac
    import time

    secret = "whsec_test_0123456789"
    event = {
        "id": "evt_1",
        "object": "event",
        "type": "invoice.payment_failed",
        "created": int(time.time()),
        "data": {
            "object": {
                "id": "in_1",
                "object": "invoice",
                "customer": "cus_1",
                "amount_due": 4900,
                "currency": "usd",
                "metadata": {"account_id": "acc-s"},
            }
        },
    }
    payload = json.dumps(event).encode()
    t = int(time.time())
    v1 = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    with srv.running(tmp_path / "f.db", env={"FOREWARN_STRIPE_SECRET": secret}) as server:

        def post(signature: str) -> httpx.Response:
            return httpx.post(
                server.url + "/webhooks/stripe",
                params={"key": WRITE_KEY},
                content=payload,
                headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
                timeout=10,
            )

        forged = post(f"t={t},v1={'0' * 64}")
        assert forged.status_code == 400
        assert forged.json()["error"]["code"] == "invalid_signature"
        assert post(f"t={t},v1={v1}").status_code == 200
        firings = server.wait_for(lambda: server.firings(trigger="payment-failed"))
        assert [f["subject"] for f in firings] == ["acc-s"]


def test_reloading_playbooks_takes_effect_and_refuses_invalid_ones(tmp_path):
    books = tmp_path / "playbooks"
    books.mkdir()
    (books / "a.yaml").write_text(
        "triggers:\n  - id: first\n    when: {event: {name: A}}\n"
        "    action: {channel: email, message: hi}\n"
    )
    server = srv.start(tmp_path / "g.db", playbooks=books)
    try:
        assert [t["id"] for t in server.admin("/api/v1/triggers")["triggers"]] == ["first"]
        (books / "a.yaml").write_text(
            "triggers:\n  - id: second\n    when: {event: {name: B}}\n"
            "    action: {channel: email, message: hi}\n"
        )
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        r = httpx.post(server.url + "/api/v1/playbooks/reload", headers=headers, timeout=10)
        assert r.status_code == 200 and r.json()["triggers"] == ["second"]
        assert [t["id"] for t in server.admin("/api/v1/triggers")["triggers"]] == ["second"]
        (books / "a.yaml").write_text("triggers:\n  - id: broken\n    when: {nope: 1}\n")
        r = httpx.post(server.url + "/api/v1/playbooks/reload", headers=headers, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["problems"]
        assert [t["id"] for t in server.admin("/api/v1/triggers")["triggers"]] == ["second"]
        client = _segment_client(server.url)
        client.track("u8", "B")
        client.flush()
        assert server.wait_for(lambda: server.firings(trigger="second"))
    finally:
        server.process.kill()
        server.process.wait()
        if server.process.stdout is not None:
            server.process.stdout.close()


def test_bodies_are_bounded_before_and_after_decompression(live):
    def post(content: bytes, encoding: str | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if encoding:
            headers["Content-Encoding"] = encoding
        return httpx.post(
            live.url + "/v1/batch",
            content=content,
            headers=headers,
            auth=(WRITE_KEY, ""),
            timeout=30,
        )

    bomb = gzip.compress(b'{"batch": [' + b" " * (8 * 1024 * 1024) + b"]}")
    assert len(bomb) < 100_000
    r = post(bomb, "gzip")
    assert r.status_code == 413 and "decompressed" in r.json()["error"]["message"]
    assert post(b"x" * (2 * 1024 * 1024 + 1)).status_code == 413
    unknown = post(b"{}", "zstd")
    assert unknown.status_code == 400 and "Content-Encoding" in unknown.json()["error"]["message"]
    broken = post(b"not gzip at all", "gzip")
    assert broken.status_code == 400 and "gzip" in broken.json()["error"]["message"]
    import brotli

    small = {"batch": [{"type": "track", "event": "Login", "userId": "u9", "messageId": "br-1"}]}
    ok = post(brotli.compress(json.dumps(small).encode()), "br")
    assert ok.status_code == 200 and ok.json()["accepted"] == 1


def test_the_wal_starts_again_under_steady_writes_and_reads(tmp_path, monkeypatch):
    """With a reader always in the WAL (the engine), checkpoints alone never let it start
    again from its beginning: past its limit the checkpointer makes it, and it stays small."""
    import threading

    from forewarn import server, store_sqlite

    monkeypatch.setattr(server, "WAL_RESTART_FRAMES", 64)
    monkeypatch.setattr(server, "CHECKPOINT_EVERY_S", 0.01)
    db = tmp_path / "forewarn.db"
    store_sqlite.connect(db).close()
    writer = server.Writer(db)
    writer.start()
    done = threading.Event()
    conn = store_sqlite.connect(db, store_sqlite.NO_CHECKPOINT)
    conn.execute("PRAGMA synchronous=OFF")  # the test's own writes: no need to wait for disk
    conn.execute("CREATE TABLE scratch (x BLOB)")

    def read() -> None:
        reader = store_sqlite.connect(db, store_sqlite.NO_CHECKPOINT)
        while not done.is_set():
            reader.execute("SELECT count(*) FROM scratch").fetchall()
            time.sleep(0.001)
        reader.close()

    thread = threading.Thread(target=read)
    thread.start()
    wal = tmp_path / "forewarn.db-wal"
    largest = 0
    try:
        for _ in range(4_000):  # 4,000 commits of 8 KB: 32 MB through the WAL
            with writer.write_lock, conn:  # as the writer commits
                conn.execute("INSERT INTO scratch VALUES (zeroblob(8192))")
            time.sleep(0)  # as the writer waits for its next requests: the lock is free
            largest = max(largest, wal.stat().st_size)
    finally:
        done.set()
        thread.join()
        writer.stop()
        conn.close()
    # without the restarts it holds every page written (over 40 MB, measured); with them its
    # file stops growing once they succeed, a fraction in
    assert largest < 16 << 20, f"the WAL grew to {largest} bytes"


def test_the_checkpointer_syncs_the_database_file_outside_the_write_lock(tmp_path, monkeypatch):
    """SQLite syncs the database file only at a checkpoint that reaches the WAL's end, under
    load the RESTART inside the write lock, where a second of copies waiting to be written
    held every commit up (35-40 ms at 50,000 events/s). The checkpointer syncs it after each
    copy, outside the lock, so that little is left for that one."""
    import threading

    from forewarn import server, store_sqlite

    monkeypatch.setattr(server, "CHECKPOINT_EVERY_S", 0.01)
    db = tmp_path / "forewarn.db"
    store_sqlite.connect(db).close()
    holders: set[int] = set()  # the threads holding the write lock

    class Lock(server.WriteLock):
        def __enter__(self) -> None:
            super().__enter__()
            holders.add(threading.get_ident())

        def __exit__(self, *exc: object) -> None:
            holders.discard(threading.get_ident())
            super().__exit__(*exc)

    writer = server.Writer(db, write_lock=Lock(db))
    synced: list[tuple[bool, bool]] = []  # (the lock held meanwhile, the database's file)
    real = server._sync_data

    def sync(fd: int) -> None:
        held = threading.get_ident() in holders
        synced.append((held, os.fstat(fd).st_ino == db.stat().st_ino))
        real(fd)

    monkeypatch.setattr(server, "_sync_data", sync)
    writer.start()
    conn = store_sqlite.connect(db, store_sqlite.NO_CHECKPOINT)
    try:
        conn.execute("CREATE TABLE scratch (x BLOB)")
        for _ in range(20):
            with writer.write_lock, conn:
                conn.execute("INSERT INTO scratch VALUES (zeroblob(8192))")
            time.sleep(0.02)  # a checkpoint or two between commits
    finally:
        writer.stop()
        conn.close()
    assert synced and all(file and not held for held, file in synced), synced


def _hold_write_lock(db: str, held: Any, release: Any) -> None:
    from forewarn import server

    with server.WriteLock(db):
        held.set()
        release.wait(30)


def test_the_writer_waits_its_turn_behind_another_process_and_goes_on_when_it_is_done(
    tmp_path,
):
    """The engine process and the writer take turns through `<db>.write.lock`: a batch
    submitted while another process holds it is committed once that process lets go."""
    import asyncio
    import multiprocessing

    from forewarn import server, store_sqlite

    db = tmp_path / "forewarn.db"
    conn = store_sqlite.connect(db)
    ws = store_sqlite.ensure_workspace(conn, "default", 0, None, None)
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_write_lock, args=(str(db), held, release))
    holder.start()
    writer = server.Writer(db)
    writer.start()
    try:
        assert held.wait(30)

        async def submit() -> Any:
            message = {"type": "track", "event": "Login", "userId": "u1", "messageId": "m-1"}
            append = store_sqlite.Append(ws, "segment", 1_000, [message], ["m-1"], None)
            pending = asyncio.ensure_future(writer.submit(append))
            await asyncio.sleep(0.3)
            assert not pending.done()  # waiting for the other process's turn to end
            release.set()
            return await asyncio.wait_for(pending, 10)

        result = asyncio.run(submit())
        assert result.batch is not None
        assert conn.execute("SELECT count(*) FROM batches").fetchone()[0] == 1
    finally:
        release.set()
        holder.join(30)
        writer.stop()
        conn.close()
