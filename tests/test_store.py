"""The SQLite store: schema migrations, keys kept only as hashes, and the event log's dedup."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forewarn import schema, store_sqlite
from forewarn.dedup import SeenIds
from forewarn.errors import InputError
from forewarn.store_sqlite import Append


def _append(
    conn: sqlite3.Connection, ids: list[str], received_ms: int = 0, workspace: int = 1
) -> list[store_sqlite.Appended]:
    messages = [{"type": "track", "event": "X", "userId": "u", "messageId": i} for i in ids]
    seen = SEEN[id(conn)]
    return store_sqlite.append_batches(
        conn, [Append(workspace, "t", received_ms, messages, ids)], seen
    )


SEEN: dict[int, SeenIds] = {}


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = store_sqlite.connect(tmp_path / "f.db")
    store_sqlite.ensure_workspace(c, "default", 0)
    SEEN[id(c)] = SeenIds()  # what the server's writer keeps beside its connection
    yield c
    del SEEN[id(c)]


def test_an_old_database_is_migrated_and_a_newer_one_refused(tmp_path):
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path, isolation_level=None)
    for statement in schema.statements(1, "sqlite"):
        raw.execute(statement)
    raw.execute("PRAGMA user_version=1")
    raw.execute("INSERT INTO workspaces (name, created_ms) VALUES ('w', 0)")
    raw.close()
    conn = store_sqlite.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store_sqlite.SCHEMA_VERSION
    columns = {row[1] for row in conn.execute("PRAGMA table_info(firings)")}
    assert "recorded_ms" in columns
    assert store_sqlite.workspace_id(conn, "w") == 1  # the data stayed
    conn.execute(f"PRAGMA user_version={store_sqlite.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(store_sqlite.StoreError, match="upgrade Forewarn"):
        store_sqlite.connect(path)


def test_an_engine_snapshot_moves_to_its_own_table_and_steps_leave_it_alone(tmp_path):
    """Each engine step updates its `engine` row, which SQLite writes again whole: with the
    snapshot (megabytes) in it, every step wrote the snapshot again."""
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path, isolation_level=None)
    for version in range(1, 13):
        for statement in schema.statements(version, "sqlite"):
            raw.execute(statement)
    raw.execute("PRAGMA user_version=12")
    raw.execute(
        "INSERT INTO engine (workspace, cursor, clock_ms, tick, snapshot, snapshot_tick,"
        " playbooks) VALUES (1, 7, 1000, 3, x'c0ffee', 2, 'pb')"
    )
    raw.close()
    conn = store_sqlite.connect(path)
    row = store_sqlite.load_engine(conn, 1)
    assert row == store_sqlite.EngineRow(7, 1000, 3, b"\xc0\xff\xee", 2, "pb")
    assert conn.execute("SELECT snapshot FROM engine").fetchall() == [(None,)]
    store_sqlite.commit_step(conn, 1, 4, 9, 2000, [], "pb")  # a step without a snapshot
    assert store_sqlite.load_engine(conn, 1) == store_sqlite.EngineRow(
        9, 2000, 4, b"\xc0\xff\xee", 2, "pb"
    )
    store_sqlite.commit_step(conn, 1, 5, 10, 3000, [], "pb", snapshot=b"new")
    assert store_sqlite.load_engine(conn, 1) == store_sqlite.EngineRow(10, 3000, 5, b"new", 5, "pb")
    assert conn.execute("SELECT snapshot FROM engine").fetchall() == [(None,)]
    assert conn.execute("SELECT count(*) FROM engine_snapshots").fetchone()[0] == 1


def test_keys_are_stored_only_as_hashes(conn, tmp_path):
    token = store_sqlite.add_key(conn, 1, "admin", 0)
    assert token.startswith("fw_ak_") and len(token) > 30
    assert store_sqlite.find_key(conn, token) == store_sqlite.Key(1, "admin", token[:10])
    assert store_sqlite.find_key(conn, token + "x") is None
    conn.close()
    assert token.encode() not in (tmp_path / "f.db").read_bytes()


def test_keys_from_the_environment_are_added_once(conn):
    write, admin = "fw_wk_from-env-0123456789", "fw_ak_from-env-0123456789"
    for _ in range(2):
        assert store_sqlite.ensure_workspace(conn, "default", 0, write, admin) == 1
    assert conn.execute("SELECT count(*) FROM keys").fetchone()[0] == 2
    with pytest.raises(InputError, match="one use"):
        store_sqlite.ensure_workspace(conn, "default", 0, admin, None)
    with pytest.raises(InputError, match="at least 16"):
        store_sqlite.add_key(conn, 1, "write", 0, "short")


def test_a_message_id_is_stored_once_per_workspace(conn):
    store_sqlite.ensure_workspace(conn, "other", 0)
    first = _append(conn, ["a", "b", "a"])[0]
    assert (first.stored, first.duplicates) == (2, [2])
    again = _append(conn, ["b", "c"])[0]
    assert (again.stored, again.duplicates) == (1, [0])
    none = _append(conn, ["a", "b"])[0]
    assert none.batch is None and none.duplicates == [0, 1]
    elsewhere = _append(conn, ["a"], workspace=2)[0]
    assert elsewhere.stored == 1
    assert store_sqlite.count_events(conn, 1) == 3
    log = store_sqlite.read_log(conn, 1, 0, 10)
    assert [[m["messageId"] for m in b.messages] for b in log] == [["a", "b"], ["c"]]


def test_ids_are_kept_for_at_least_the_window_then_forgotten(conn):
    day = store_sqlite.DAY_MS
    seen = SeenIds()
    h = store_sqlite.id_hash
    seen.add(0, [h(1, "early")], [0], 1)
    seen.add(6 * day + 5, [h(1, "late")], [6 * day], 2)
    seen.add(8 * day, [h(1, "day8")], [8 * day], 3)  # 8 days after the first: it is kept
    assert h(1, "early") in seen and h(1, "late") in seen
    assert h(2, "early") not in seen  # another workspace
    seen.add(9 * day, [h(1, "day9")], [9 * day], 4)
    assert h(1, "early") not in seen and h(1, "late") in seen


def test_the_ids_are_rebuilt_from_the_log(conn):
    _append(conn, ["a", "b"], received_ms=store_sqlite.DAY_MS * 100)
    rebuilt = SeenIds()
    rebuilt.load(conn, store_sqlite.DAY_MS * 100 + 5)
    assert len(rebuilt) == 2 and store_sqlite.id_hash(1, "a") in rebuilt
    later = SeenIds()
    later.load(conn, store_sqlite.DAY_MS * 109)
    assert len(later) == 0  # received more than the window ago


def test_many_requests_share_one_transaction(conn):
    appends = [
        Append(1, "t", 0, [{"type": "track", "event": "X", "userId": "u", "messageId": i}], [i])
        for i in ("x", "y", "x")
    ]
    results = store_sqlite.append_batches(conn, appends, SeenIds())
    assert [r.stored for r in results] == [1, 1, 0]
    assert store_sqlite.log_end(conn, 1) == 2


def _example_batch() -> tuple[list[dict[str, Any]], list[Any], list[str]]:
    from forewarn.model import event_from_dict

    root = Path(__file__).resolve().parent.parent / "examples" / "events"
    messages = [
        json.loads(line)
        for file in sorted(root.glob("*.jsonl"))
        for line in file.read_text().splitlines()
        if line
    ]
    return messages, [event_from_dict(m) for m in messages], [str(m["messageId"]) for m in messages]


def test_stored_events_read_back_as_their_messages_do(conn):
    from forewarn.live import events_of

    messages, events, ids = _example_batch()
    store_sqlite.append_batches(conn, [Append(1, "t", 0, messages, ids, events)], SeenIds())
    (batch,) = store_sqlite.read_log(conn, 1, 0, 10)
    assert batch.event_rows() is not None
    assert events_of(batch) == events
    without = store_sqlite.LogBatch(batch.id, batch.received_ms, batch.raw_messages, None)
    assert events_of(without) == events  # from the messages, as for an older batch


def test_the_events_format_names_the_fields_it_was_made_for():
    """Stored events are tuples of Event's fields; if these change, change EVENTS_FORMAT and
    EVENTS_FORMAT_PLAIN (a batch in another format is then read from its messages)."""
    import msgspec

    from forewarn.model import Event

    assert (store_sqlite.EVENTS_FORMAT, store_sqlite.EVENTS_FORMAT_PLAIN) == (b"\x02", b"\x01")
    assert [f.name for f in msgspec.structs.fields(Event)] == [
        "kind",
        "name",
        "user_id",
        "anonymous_id",
        "account_id",
        "properties",
        "traits",
        "timestamp_ms",
        "message_id",
        "previous_id",
    ]


def test_batches_are_stored_compressed_and_read_back_as_they_came(conn):
    import msgspec

    messages, events, ids = _example_batch()
    store_sqlite.append_batches(conn, [Append(1, "t", 0, messages, ids, events)], SeenIds())
    raw_messages, raw_events = conn.execute("SELECT messages, events FROM batches").fetchone()
    assert raw_messages[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    assert raw_events[:1] == store_sqlite.EVENTS_FORMAT
    plain = msgspec.json.encode(messages)
    assert len(raw_messages) * 4 < len(plain)
    (batch,) = store_sqlite.read_log(conn, 1, 0, 10)
    assert batch.messages == msgspec.json.decode(plain)
    assert store_sqlite.uncompressed(raw_messages) == plain
    assert batch.event_rows() == [msgspec.structs.astuple(e) for e in events]


def test_batches_stored_uncompressed_by_an_earlier_version_are_read(conn):
    """A database written before compression: its messages a plain JSON array, its events
    msgpack after EVENTS_FORMAT_PLAIN. The engine, the timeline and forgetting read them."""
    import msgspec

    from forewarn import privacy

    messages, events, _ = _example_batch()
    rows = [msgspec.structs.astuple(e) for e in events]
    conn.execute(
        "INSERT INTO batches (workspace, received_ms, source, count, ids, events, messages)"
        " VALUES (1, 0, 't', ?, ?, ?, ?)",
        (
            len(messages),
            b"\0" * 8 * len(messages),
            store_sqlite.EVENTS_FORMAT_PLAIN + msgspec.msgpack.encode(rows),
            msgspec.json.encode(messages),
        ),
    )
    (batch,) = store_sqlite.read_log(conn, 1, 0, 10)
    assert batch.messages == msgspec.json.decode(msgspec.json.encode(messages))
    assert [tuple(r) for r in msgspec.msgpack.decode(msgspec.msgpack.encode(rows))] == (
        batch.event_rows()
    )
    subject = next(m["userId"] for m in messages if m.get("userId"))
    theirs = [m for m in messages if subject in (m.get("userId"), m.get("anonymousId"))]
    found = store_sqlite.recent_events(conn, 1, subject, limit=1000)
    assert len(found) == len(theirs) > 0
    done = privacy.forget(conn, 1, subject, "test", 1)
    assert done.events == len(theirs)
    (batch,) = store_sqlite.read_log(conn, 1, 0, 10)
    assert len(batch.messages) == len(messages) - len(theirs)
    assert subject not in {m.get("userId") for m in batch.messages}
    assert batch.raw_messages[:4] == b"\x28\xb5\x2f\xfd"  # written again, compressed
    assert len(batch.event_rows() or []) == len(batch.messages)


def test_message_id_hashes_stay_what_logs_and_indexes_already_hold():
    """The hashes are stored (each batch's `ids`, the message-id index): however they are
    computed, they must stay 64 bits of BLAKE2b salted with the workspace."""
    import hashlib
    import struct

    pinned = struct.Struct("<q")
    for workspace in (1, 2, 1_000):
        for mid in ("m-1", "5aa91193-5c71-4990-963c-000000000001", "é"):
            digest = hashlib.blake2b(mid.encode(), digest_size=8, salt=pinned.pack(workspace))
            expected = pinned.unpack(digest.digest())[0]
            assert store_sqlite.id_hash(workspace, mid) == expected
    assert store_sqlite.id_hash(1, "m-1") != store_sqlite.id_hash(2, "m-1")


def test_a_request_prepared_before_its_turn_stores_only_the_messages_kept(tmp_path):
    """The writer's thread receives requests with their hashes, events and messages already
    encoded for the whole request; when some are duplicates, only the others are stored."""
    import msgspec

    from forewarn import ingest

    conn = store_sqlite.connect(tmp_path / "forewarn.db")
    ws = store_sqlite.ensure_workspace(conn, "default", 0, None, None)
    seen = SeenIds()

    def request(*ids: str) -> Append:
        batch = [{"type": "track", "event": f"E-{i}", "userId": "u1", "messageId": i} for i in ids]
        parsed = ingest.segment(msgspec.json.encode({"batch": batch}), "batch", 1_000)
        append = Append(ws, "segment", 1_000, parsed.messages, list(ids), parsed.events)
        return store_sqlite.prepare(append)

    first = request("a", "b")
    assert first.hashes == [store_sqlite.id_hash(ws, "a"), store_sqlite.id_hash(ws, "b")]
    (done,) = store_sqlite.append_batches(conn, [first], seen)
    assert done.stored == 2 and done.kept is None
    second = request("b", "c")
    (again,) = store_sqlite.append_batches(conn, [second], seen)
    assert again.duplicates == [0] and again.kept == [1] and again.stored == 1
    logged = store_sqlite.read_log(conn, ws, 0, 10)
    assert [[m["event"] for m in b.messages] for b in logged] == [["E-a", "E-b"], ["E-c"]]
    assert second.events is not None
    parsed_c = second.events[1]
    rows = logged[1].event_rows()
    assert rows is not None and [row[:3] for row in rows] == [msgspec.structs.astuple(parsed_c)[:3]]
    conn.close()
