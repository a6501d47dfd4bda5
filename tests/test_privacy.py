"""Privacy: forgetting a person (HTTP and CLI), the retention purge, and the audit log."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from forewarn import cli, forgotten, privacy, schema, store_outbox, store_sqlite
from forewarn.dashboard_auth import revoke
from forewarn.dedup import SeenIds
from forewarn.store_sqlite import Append

from . import server as srv

VICTIM = "victim-8c1e5a"  # a marker: after forgetting, these bytes are nowhere in the file
OTHER = "other-user-42"
PLAYBOOK = """
triggers:
  - id: tip
    when: {event: {name: Stuck}}
    action: {channel: in_app, message: "Need a hand?"}
  - id: opener
    when: {event: {name: Lost}}
    action: {channel: chat, message: "Can I help you find it?"}
"""
ENV = {
    "FOREWARN_PRIORITY_WINDOW": "0",
    "FOREWARN_QUIET_HOURS": "off",
    "FOREWARN_FREQUENCY_CAPS": "off",
    "FOREWARN_RETENTION": "400d",  # purges at start: nothing is that old
}
DAY_MS = 86_400_000


def _msg(user: str, kind: str = "track", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "userId": user, "messageId": str(uuid.uuid4()), **fields}


def _person(user: str) -> list[dict[str, Any]]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return [
        _msg(user, "identify", traits={"email": f"{user}@example.com", "plan": f"{user}-plan"}),
        _msg(user, event="Stuck", timestamp=now, properties={"note": f"{user}-note"}),
        _msg(user, event="Lost", timestamp=now),
    ]


def _send(server: srv.Server, messages: list[dict[str, Any]]) -> dict[str, Any]:
    r = httpx.post(
        server.url + "/v1/batch", json={"batch": messages}, auth=(srv.WRITE_KEY, ""), timeout=10
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _count(db: Path, sql: str, *args: Any) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(sql, args).fetchone()[0])
    finally:
        conn.close()


def _stored(db: Path) -> bytes:
    """The database file and its WAL, after a checkpoint that empties the WAL, and the log's
    messages and events decompressed: compressed, an id in them would escape a byte search.
    (What SQLite frees it overwrites, compressed or not: `secure_delete`.)"""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    logged = [
        store_sqlite.uncompressed(messages)
        + msgspec.msgpack.encode(store_sqlite.event_rows(events))
        for messages, events in conn.execute("SELECT messages, events FROM batches")
    ]
    conn.close()
    files = [p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name)]
    return b"".join(files + logged)


def test_forgetting_a_person_removes_them_from_the_file_and_refuses_their_events(
    tmp_path: Path,
) -> None:
    server = srv.serve_playbook(tmp_path, PLAYBOOK, ENV)
    db = server.db
    try:
        _send(server, [*_person(VICTIM), *_person(OTHER)])
        inbox = "SELECT count(*) FROM inbox WHERE subject = ?"
        assert server.wait_for(
            lambda: _count(db, inbox, VICTIM) == 2 and _count(db, inbox, OTHER) == 2, 30
        )
        for user in (VICTIM, OTHER):  # what else a person leaves behind
            subject = f"/api/v1/subjects/{user}"
            server.admin_post(subject + "/suppress", {"reason": f"{user}-incident"})
            server.admin_post(subject + "/unsubscribe", {"channel": "email"})
            push = {
                "endpoint": f"https://push.example/{user}",
                "keys": {"p256dh": "p", "auth": "a"},
            }
            server.admin_post(subject + "/push-subscriptions", push)
        conn = store_sqlite.connect(db)
        with store_sqlite.transaction(conn):
            for user in (VICTIM, OTHER):
                (chat,) = conn.execute(
                    "SELECT id FROM inbox WHERE subject = ? AND kind = 'chat'", (user,)
                ).fetchone()
                store_outbox.add_conversation_message(conn, 1, chat, "user", f"{user} asks", 1)
                conn.execute(
                    "INSERT INTO outcomes (firing, workspace, trig, goal, failure, engaged,"
                    " closed_ms) SELECT id, 1, trig, 1, 0, 'clicked', 1 FROM firings"
                    " WHERE subject = ?",
                    (user,),
                )
            conn.execute(
                "INSERT INTO bounces VALUES (1, ?, 'mailbox full', 1)", (f"{VICTIM}@example.com",)
            )
        conn.close()
        before = {user: len(server.firings(subject=user)) for user in (VICTIM, OTHER)}
        assert before == {VICTIM: 2, OTHER: 2}

        done = server.admin_call("DELETE", f"/api/v1/subjects/{VICTIM}")
        assert done["forgotten"] and done["events"] >= 3 and done["firings"] == 2
        assert done["outcomes"] == 2 and done["inbox"] == 2 and done["conversation_messages"] == 2
        assert done["bounces"] == 1 and done["push_subscriptions"] == 1
        assert done["hash"] == forgotten.subject_hash(1, VICTIM)

        # the engine forgets them at once, with no new event to make it step
        def gone() -> bool:
            answer = httpx.get(
                server.url + f"/api/v1/subjects/{VICTIM}",
                headers={"Authorization": f"Bearer {srv.ADMIN_KEY}"},
                timeout=10,
            )
            return answer.status_code == 404

        assert server.wait_for(gone, 20)
        # their events are refused from now on, new ones and resent ones alike
        resent = _send(server, [_msg(VICTIM, event="Stuck"), _msg("third-user", event="Stuck")])
        assert resent["accepted"] == 1
        assert resent["rejected"] == [{"index": 0, "reason": forgotten.REASON}]
        posthog = {
            "api_key": srv.WRITE_KEY,
            "event": "Stuck",
            "distinct_id": VICTIM,
            "uuid": "ph-1",
        }
        answer = httpx.post(server.url + "/i/v1/analytics/events", json=posthog, timeout=10)
        assert answer.json()["results"]["ph-1"] == {"result": "drop", "details": forgotten.REASON}
        # the engine rebuilt without them, and keeps firing for others
        assert server.wait_for(lambda: server.firings(subject="third-user"), 20)
        assert gone()
        kept = server.admin(f"/api/v1/subjects/{OTHER}")
        assert [f["trigger"] for f in kept["firings"]] == ["tip", "opener"]
        assert server.firings(subject=VICTIM) == []
        rows = server.admin("/api/v1/audit")["audit"]
        actions = [row["action"] for row in rows]
        assert actions[:2] == ["subject.forgotten", "subject.forget_requested"]
        assert {row["actor"] for row in rows if row["action"] == "retention.purged"} == {
            "retention"
        }
        assert {row["actor"] for row in rows if row["action"] == "subject.suppressed"} == {
            srv.ADMIN_KEY[:10]
        }
        shown = server.admin("/settings.json")["audit"]  # and on the dashboard's Settings page
        assert [row["action"] for row in shown] == actions[:20]
        assert (
            done["hash"]
            in httpx.get(
                server.url + "/settings", headers={"Authorization": f"Bearer {srv.ADMIN_KEY}"}
            ).text
        )
        # a snapshot taken after the rebuild: the state written to the file holds them no more
        assert server.wait_for(lambda: _count(db, "SELECT count(*) FROM engine_snapshots") == 1, 90)
        # the admin API's other audited actions, each one row naming the key
        server.admin_post("/api/v1/triggers/tip/pause", {"reason": "too loud"})
        server.admin_post("/api/v1/triggers/tip/resume", {})
        server.admin_post("/api/v1/playbooks/reload", {})
        latest = server.admin("/api/v1/audit", limit=3)["audit"]
        assert [(r["action"], r["actor"], r["target"]) for r in latest] == [
            ("playbooks.reloaded", srv.ADMIN_KEY[:10], ""),
            ("trigger.resumed", srv.ADMIN_KEY[:10], "tip"),
            ("trigger.paused", srv.ADMIN_KEY[:10], "tip"),
        ]
        older = server.admin("/api/v1/audit", before=latest[-1]["id"], action="trigger.paused")
        assert older["audit"] == []
    finally:
        srv.stop(server)
    stored = _stored(db)
    assert VICTIM.encode() not in stored, "the forgotten id is still in the database file"
    for other in (OTHER, f"{OTHER}-plan", f"{OTHER}-note", f"{OTHER}-incident"):
        assert other.encode() in stored, f"{other}: someone else's data went too"
    for table in ("outcomes", "conversation_messages", "push_subscriptions", "consent"):
        assert _count(db, f"SELECT count(*) FROM {table}") >= 1, table


def _log(db: Path) -> sqlite3.Connection:
    conn = store_sqlite.connect(db)
    store_sqlite.ensure_workspace(conn, "default", 0)
    return conn


def _append(conn: sqlite3.Connection, received_ms: int, *users: str) -> int:
    messages = [_msg(u, event="Stuck", timestamp="2026-01-01T00:00:00Z") for u in users]
    ids = [m["messageId"] for m in messages]
    (done,) = store_sqlite.append_batches(
        conn, [Append(1, "segment", received_ms, messages, ids)], SeenIds()
    )
    assert done.batch is not None
    return done.batch


def test_forget_on_the_command_line_rewrites_batches_and_keeps_log_positions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "forewarn.db"
    conn = _log(db)
    mixed = _append(conn, 1_000, VICTIM, OTHER, VICTIM)
    alone = _append(conn, 2_000, VICTIM)
    conn.close()
    assert cli.main(["forget", VICTIM, "--db", str(db), "--workspace", "default"]) == 0
    assert '"events":3' in capsys.readouterr().out
    conn = store_sqlite.connect(db)
    (kept,) = store_sqlite.read_log(conn, 1, mixed - 1, 1)
    assert [m["userId"] for m in kept.messages] == [OTHER]
    assert conn.execute("SELECT count, length(ids) FROM batches WHERE id = ?", (mixed,)).fetchone()
    assert conn.execute("SELECT count, length(ids) FROM batches WHERE id = ?", (alone,)).fetchone()
    assert conn.execute("SELECT count FROM batches WHERE id = ?", (alone,)).fetchone()[0] == 0
    assert store_sqlite.log_end_all(conn) == alone  # an emptied batch keeps its position
    # a later append refuses them, whatever else it holds
    messages = [_msg(VICTIM, kind="alias", previousId="x"), _msg(OTHER, event="Back")]
    append = Append(1, "segment", 3_000, messages, [m["messageId"] for m in messages])
    (done,) = store_sqlite.append_batches(conn, [append], SeenIds())
    assert done.forgotten == [0] and done.stored == 1 and done.kept == [1]
    conn.close()
    assert VICTIM.encode() not in _stored(db)


def test_a_delivery_result_about_a_forgotten_person_is_not_logged(tmp_path: Path) -> None:
    conn = _log(tmp_path / "forewarn.db")
    privacy.forget(conn, 1, VICTIM, "cli", 1)
    results = [_msg(VICTIM, event="Message Delivered"), _msg(OTHER, event="Message Delivered")]
    with store_sqlite.transaction(conn):
        done = store_sqlite.append_within(
            conn, Append(1, "forewarn", 2, results, [m["messageId"] for m in results])
        )
    assert done.stored == 1 and done.forgotten == [0]
    conn.close()


def test_a_numeric_user_id_is_found_and_forgotten(tmp_path: Path) -> None:
    db = tmp_path / "forewarn.db"
    conn = _log(db)
    message = {"type": "track", "userId": 9071, "event": "Stuck", "messageId": "m-9071"}
    other = {"type": "track", "userId": "90710", "event": "Stuck", "messageId": "m-other"}
    (stored,) = store_sqlite.append_batches(
        conn,
        [Append(1, "segment", 1, [message, other], ["m-9071", "m-other"])],
        SeenIds(),
    )
    assert stored.stored == 2
    forgot = privacy.forget(conn, 1, "9071", "cli", 2)
    assert forgot.events == 1
    (kept,) = store_sqlite.read_log(conn, 1, 0, 1)
    assert [m["userId"] for m in kept.messages] == ["90710"]
    conn.close()


def test_forget_refuses_an_unknown_workspace_and_a_database_it_cannot_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "forewarn.db"
    _log(db).close()
    assert cli.main(["forget", VICTIM, "--db", str(db), "--workspace", "nope"]) == 2
    assert "no workspace 'nope'" in capsys.readouterr().err
    # the scale-out store is used when it is set (tests/test_privacy_pg.py)
    monkeypatch.setenv("FOREWARN_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert cli.main(["forget", VICTIM, "--db", str(db), "--workspace", "default"]) == 2
    assert "cannot connect to PostgreSQL" in capsys.readouterr().err


def test_the_retention_purge_removes_old_rows_and_keeps_new_ones(tmp_path: Path) -> None:
    db = tmp_path / "forewarn.db"
    now = 1_000 * DAY_MS
    old, new = now - 500 * DAY_MS, now - DAY_MS
    conn = _log(db)
    batches = [_append(conn, old, "old-user"), _append(conn, new, "new-user")]
    firing = ("tip", "old-user", "user", old, "{}", "send", None, "in_app", None)
    fresh = ("tip", "new-user", "user", new, "{}", "send", None, "in_app", None)
    ids = store_sqlite.commit_step(conn, 1, 1, batches[-1], new, [firing, fresh], "p")
    with store_sqlite.transaction(conn):
        for fid, at in zip(ids, (old, new), strict=True):
            conn.execute(
                "INSERT INTO outcomes VALUES (?, 1, 'tip', 1, 0, '', ?)", (fid, at + DAY_MS)
            )
            conn.execute(
                "INSERT INTO outbox (workspace, firing, key, channel, trig, subject, scope,"
                " message, status, due_ms, created_ms) VALUES (1, ?, ?, 'in_app', 'tip', 's',"
                " 'user', x'00', 'sent', ?, ?)",
                (fid, f"k{fid}", at, at),
            )
        conn.execute(
            "INSERT INTO outbox (workspace, firing, key, channel, trig, subject, scope, message,"
            " due_ms, created_ms) VALUES (1, 0, 'waiting', 'email', 'tip', 's', 'user', x'00',"
            " ?, ?)",
            (old, old),
        )
    with store_sqlite.transaction(conn):  # a conversation opened long ago, still going on
        conn.execute(
            "INSERT INTO inbox (workspace, scope, subject, key, trig, kind, title, text, html,"
            " created_ms) VALUES (1, 'user', 'old-user', 'chat-1', 'opener', 'chat', '', '',"
            " '', ?)",
            (old,),
        )
        store_outbox.add_conversation_message(conn, 1, 1, "user", "still there?", new)
    counts = privacy.purge(conn, 1, now - 400 * DAY_MS, "cli", now)
    assert counts["inbox"] == 1 and counts["conversation_messages"] == 1
    assert counts["batches"] == 1 and counts["firings"] == 1 and counts["outcomes"] == 1
    assert counts["outbox"] == 1  # the message still waiting to go out is kept
    assert [b.id for b in store_sqlite.read_log(conn, 1, 0, 10)] == batches[1:]
    assert [r[1] for r in store_sqlite.query_firings(conn, 1)] == ["new-user"]
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 2
    assert conn.execute("SELECT count(*) FROM outcomes").fetchone()[0] == 1
    # the log's newest batch stays, however old: its position is never given out again
    everything = privacy.purge(conn, 1, now + 1, "retention", now)
    assert everything["batches"] == 0 and everything["firings"] == 1
    assert store_sqlite.log_end_all(conn) == batches[-1]
    rows = conn.execute("SELECT actor, detail FROM audit WHERE action = 'retention.purged'")
    assert [(actor, '"batches":1' in detail) for actor, detail in rows] == [
        ("cli", True),
        ("retention", False),
    ]
    conn.close()


def test_purge_on_the_command_line_needs_a_retention_of_at_least_8_days(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "forewarn.db"
    _log(db).close()
    base = ["purge", "--db", str(db), "--workspace", "default"]
    assert cli.main([*base, "--retention", "3d"]) == 2
    assert "at least 8d" in capsys.readouterr().err
    assert cli.main([*base, "--retention", "off"]) == 2
    assert "no retention" in capsys.readouterr().err
    assert cli.main([*base, "--retention", "400d"]) == 0
    assert '"batches":0' in capsys.readouterr().out


def test_every_audited_action_leaves_one_row_and_the_log_refuses_changes(tmp_path: Path) -> None:
    db = tmp_path / "forewarn.db"
    conn = _log(db)
    assert cli.main(["keys", "create", "--kind", "admin", "--db", str(db)]) == 0
    key = store_sqlite.add_key(conn, 1, "admin", 2, name="second", actor="dashboard:fw_ak_abc")
    (key_id,) = conn.execute("SELECT id FROM keys WHERE hash = ?", (store_sqlite.hash_key(key),))
    assert revoke(conn, 1, key_id[0], 3, "dashboard:fw_ak_abc") is None
    store_outbox.override_trigger(conn, 1, "tip", "paused", "too loud", "fw_ak_abc", 4)
    store_outbox.override_trigger(conn, 1, "tip", "shadow", "harm found", "auto-guard", 5)
    assert store_outbox.resume_trigger(conn, 1, "tip", "fw_ak_abc", 6)
    assert not store_outbox.resume_trigger(conn, 1, "tip", "fw_ak_abc", 7)  # nothing: no row
    store_outbox.suppress(conn, 1, "user", "u1", "incident", None, 8, "fw_ak_abc")
    assert store_outbox.unsuppress(conn, 1, "user", "u1", "fw_ak_abc", 9)
    privacy.forget(conn, 1, "u1", "cli", 10)
    privacy.purge(conn, 1, 0, "retention", 11)
    rows = conn.execute("SELECT actor, action, target FROM audit ORDER BY id").fetchall()
    assert [r[1] for r in rows] == [
        "key.created",
        "key.created",
        "key.revoked",
        "trigger.paused",
        "trigger.shadowed",
        "trigger.resumed",
        "subject.suppressed",
        "subject.unsuppressed",
        "subject.forget_requested",
        "subject.forgotten",
        "retention.purged",
    ]
    assert rows[0][:2] == ("cli", "key.created")
    assert rows[2] == ("dashboard:fw_ak_abc", "key.revoked", key[:10])
    assert rows[4][0] == "auto-guard"
    assert all(r[2] != "u1" for r in rows[8:10])  # a forgotten person: by hash only
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET actor = 'someone else'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit WHERE id = 1")
    assert conn.execute("SELECT count(*) FROM audit").fetchone()[0] == len(rows)
    conn.close()


def test_a_migration_keeps_a_trigger_body_whole() -> None:
    statements = schema.statements(7, "sqlite")
    bodies = [s for s in statements if s.startswith("CREATE TRIGGER")]
    assert len(bodies) == 2 and all(s.endswith("END") for s in bodies)
    assert schema.statements(7, "postgresql") == []
