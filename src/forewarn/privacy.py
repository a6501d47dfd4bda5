"""Forgetting a person, and keeping data no longer than the retention: the embedded store.

`forget` removes everything a workspace holds about one person (a user id or anonymous id):

1. the request is written to the audit log (by the hash of the id), in a transaction of its own;
2. the log is searched for batches holding the id (a byte search over the stored JSON, with
   no write lock held);
3. in one write transaction: the id's hash joins `forgotten` (from then on ingest refuses
   their events, `forgotten.REASON`); the batches found (and any committed since the search)
   are rewritten without their events, their message-id hashes and events included (a batch
   left empty is kept, empty, so that log positions never move); their firings, outcomes,
   outbox rows, inbox items and conversations, consent, suppressions, push subscriptions, the
   bounces of the addresses they used and their rows of the subject index are deleted; the
   engine's snapshot is dropped, so that its state is rebuilt from the rewritten log (the
   running engine notices the change in its next step's transaction and rebuilds too); and
   the completion goes into the audit log.

Every connection runs with `secure_delete`, so deleted rows are overwritten in the file, not
only unlinked; a checkpoint then copies the new pages over the old ones and empties the WAL.

`purge` deletes what is older than the retention: batches the engine has read, firings and
their outcomes, finished outbox rows, inbox items and their conversations. The audit log and
the list of forgotten people are kept.
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from forewarn import audit, store_sqlite
from forewarn.errors import InputError
from forewarn.forgotten import PEOPLE_FIELDS as _PEOPLE_FIELDS
from forewarn.forgotten import people_of, subject_hash

_encode = msgspec.json.Encoder().encode
_HASH = struct.Struct("<q")
CHUNK = 2_000  # rows per delete of a purge: short write transactions, ingest goes on between
# the tables `forget` deletes rows from, as its answer counts them
TABLES = (
    "outcomes",
    "firings",
    "outbox",
    "conversation_messages",
    "inbox",
    "consent",
    "suppressions",
    "push_subscriptions",
    "subject_index",
    "bounces",
)


@dataclass
class Forgot:
    """What forgetting one person removed."""

    hash: str
    events: int = 0
    batches: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    checkpointed: bool = False  # the WAL emptied too; else at the server's next checkpoint

    def to_dict(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "events": self.events,
            "batches": self.batches,
            **self.removed,
            "checkpointed": self.checkpointed,
        }


def forget(
    conn: sqlite3.Connection, workspace: int, subject: str, actor: str, now_ms: int
) -> Forgot:
    """Remove the person `subject` from every table of the workspace and refuse their events
    from now on. Forgetting someone twice removes what came in between (nothing, as ingest
    refuses it) and is harmless."""
    if not subject:
        raise InputError("give the person's user id or anonymous id")
    h = subject_hash(workspace, subject)
    with store_sqlite.transaction(conn):
        audit.record(conn, workspace, actor, "subject.forget_requested", h, now_ms)
    needles = _needles(subject)
    end = store_sqlite.log_end_all(conn)
    found = _holding(conn, workspace, needles, 0, end)
    done = Forgot(h)
    conn.execute("PRAGMA secure_delete=ON")
    with store_sqlite.transaction(conn):
        conn.execute(
            "INSERT OR IGNORE INTO forgotten (workspace, hash, at_ms) VALUES (?, ?, ?)",
            (workspace, h, now_ms),
        )
        found += _holding(conn, workspace, needles, end, None)  # committed since the search
        addresses: set[str] = set()
        for batch in found:
            events = _rewrite(conn, batch, subject, addresses)
            done.events += events
            done.batches += 1 if events else 0
        done.removed = delete_rows(
            lambda sql, args: conn.execute(sql, args).rowcount, workspace, subject, addresses
        )
        # the engine's state is rebuilt from the rewritten log, not restored from a snapshot
        conn.execute(
            "UPDATE engine SET snapshot_tick = 0, playbooks = '' WHERE workspace = ?",
            (workspace,),
        )
        conn.execute("DELETE FROM engine_snapshots WHERE workspace = ?", (workspace,))
        audit.record(conn, workspace, actor, "subject.forgotten", h, now_ms, done.to_dict())
    done.checkpointed = checkpoint(conn)
    return done


def _needles(subject: str) -> list[bytes]:
    """The id as it is written inside the stored JSON: a string, or (Segment allows it) a
    number in one of the fields that name a person."""
    needles = [_encode(subject)]
    if subject.isascii() and subject.isdigit() and str(int(subject)) == subject:
        needles += [_encode(field)[:-1] + b'":' + subject.encode() for field in _PEOPLE_FIELDS]
    return needles


def _holding(
    conn: sqlite3.Connection, workspace: int, needles: list[bytes], after: int, upto: int | None
) -> list[int]:
    """The batches whose stored JSON holds one of the needles (a byte search in the JSON,
    decompressed: no decoding)."""
    conn.create_function("uncompressed", 1, store_sqlite.uncompressed, deterministic=True)
    anywhere = " OR ".join("instr(uncompressed(messages), ?) > 0" for _ in needles)
    return [
        int(i)
        for (i,) in conn.execute(
            "SELECT id FROM batches WHERE workspace = ? AND id > ? AND (? IS NULL OR id <= ?)"
            f" AND ({anywhere})",
            (workspace, after, upto, upto, *needles),
        )
    ]


def _rewrite(conn: sqlite3.Connection, batch: int, subject: str, addresses: set[str]) -> int:
    """The batch without the person's events; returns how many were taken out."""
    row = conn.execute(
        "SELECT messages, events, ids FROM batches WHERE id = ?", (batch,)
    ).fetchone()
    if row is None:
        return 0
    messages = store_sqlite.decode_messages(row[0])
    theirs = {i for i, m in enumerate(messages) if subject in people_of(m)}
    if not theirs:
        return 0  # the id is only mentioned, in someone else's event
    for i in theirs:
        addresses.update(emails_of(messages[i]))
    keep = [i for i in range(len(messages)) if i not in theirs]
    ids = [h for (h,) in _HASH.iter_unpack(row[2])]
    events = row[1]
    rows = store_sqlite.event_rows(events)
    if rows is not None:
        events = store_sqlite.pack_rows([rows[i] for i in keep if i < len(rows)])
    elif events is not None:
        events = None  # an older format: the engine reads the messages instead
    conn.execute(
        "UPDATE batches SET count = ?, messages = ?, events = ?, ids = ? WHERE id = ?",
        (
            len(keep),
            store_sqlite.encode_messages([messages[i] for i in keep]),
            events,
            struct.pack(f"<{len(keep)}q", *(ids[i] for i in keep if i < len(ids))),
            batch,
        ),
    )
    return len(theirs)


def emails_of(message: dict[str, Any]) -> list[str]:
    found = []
    for holder in (message.get("traits"), (message.get("context") or {}).get("traits")):
        if isinstance(holder, dict) and isinstance(holder.get("email"), str):
            found.append(holder["email"].strip().lower())
    return found


def delete_rows(
    execute: Callable[[str, tuple[Any, ...]], int],
    workspace: int,
    subject: str,
    addresses: set[str],
    tables: tuple[str, ...] = TABLES,
) -> dict[str, int]:
    """Everything else kept about the person, table by table, through `execute` (a statement
    with `?` placeholders and its arguments -> the rows it changed: the SQL both stores read);
    only `tables` (PostgreSQL has no subject index). Returns the counts."""
    ws_user = (workspace, subject)
    counts: dict[str, int] = {}

    def delete(name: str, sql: str, args: tuple[Any, ...] = ws_user) -> None:
        if name in tables:
            counts[name] = counts.get(name, 0) + execute(sql, args)

    own = "workspace = ? AND scope = 'user' AND subject = ?"
    delete(
        "outcomes",
        f"DELETE FROM outcomes WHERE firing IN (SELECT id FROM firings WHERE {own})",
    )
    delete("firings", f"DELETE FROM firings WHERE {own}")
    delete("outbox", f"DELETE FROM outbox WHERE {own}")
    delete(
        "conversation_messages",
        "DELETE FROM conversation_messages WHERE conversation IN"
        f" (SELECT id FROM inbox WHERE {own})",
    )
    delete("inbox", f"DELETE FROM inbox WHERE {own}")
    delete("consent", f"DELETE FROM consent WHERE {own}")
    delete("suppressions", f"DELETE FROM suppressions WHERE {own}")
    delete("push_subscriptions", f"DELETE FROM push_subscriptions WHERE {own}")
    delete(
        "subject_index",
        "DELETE FROM subject_batches WHERE workspace = ? AND subject = ?",
    )
    for address in sorted(addresses):
        delete(
            "bounces",
            "DELETE FROM bounces WHERE workspace = ? AND address = ?",
            (workspace, address),
        )
    counts.setdefault("bounces", 0)
    return counts


def checkpoint(conn: sqlite3.Connection) -> bool:
    """Copy the WAL into the file and empty it, so that the pages a deletion overwrote are
    gone from both; False when a reader kept it from finishing (the server's own checkpoints
    complete it shortly after)."""
    # while it waits for readers, writers wait too: wait a second at most, not ingest's ten
    timeout = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute("PRAGMA busy_timeout=1000")
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error:
        return False
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(timeout)}")
    return int(busy) == 0


# --- retention ---------------------------------------------------------------------------------


def purge(
    conn: sqlite3.Connection,
    workspace: int,
    before_ms: int,
    actor: str,
    now_ms: int,
    truncate: bool = True,
) -> dict[str, int]:
    """Delete the workspace's data from before `before_ms`, in short transactions; returns the
    rows deleted per table and records the purge in the audit log. The log's batches go only
    once the engine has read them (up to its snapshot), and the newest batch of the file is
    kept (a log position is never given out twice). `truncate`: empty the WAL afterwards."""
    conn.execute("PRAGMA secure_delete=ON")
    cursor = _read_up_to(conn, workspace)
    newest = store_sqlite.log_end_all(conn)
    counts = {
        "batches": _in_chunks(
            conn,
            "SELECT id FROM batches WHERE workspace = ? AND received_ms < ? AND id <= ? AND id < ?",
            (workspace, before_ms, cursor, newest),
            "DELETE FROM batches WHERE id IN ({})",
        ),
        "outcomes": _in_chunks(
            conn,
            "SELECT o.firing FROM outcomes o JOIN firings f ON f.id = o.firing"
            " WHERE o.workspace = ? AND f.at_ms < ?",
            (workspace, before_ms),
            "DELETE FROM outcomes WHERE firing IN ({})",
        ),
        "firings": _in_chunks(
            conn,
            "SELECT id FROM firings WHERE workspace = ? AND at_ms < ?",
            (workspace, before_ms),
            "DELETE FROM firings WHERE id IN ({})",
        ),
        "outbox": _in_chunks(
            conn,
            "SELECT id FROM outbox WHERE workspace = ? AND created_ms < ? AND status != 'pending'",
            (workspace, before_ms),
            "DELETE FROM outbox WHERE id IN ({})",
        ),
        "inbox": _in_chunks(
            conn,
            "SELECT id FROM inbox WHERE workspace = ? AND created_ms < ?",
            (workspace, before_ms),
            "DELETE FROM inbox WHERE id IN ({})",
        ),
    }
    # old chat messages, and every message of a conversation whose opener went
    counts["conversation_messages"] = _in_chunks(
        conn,
        "SELECT c.id FROM conversation_messages c LEFT JOIN inbox i ON i.id = c.conversation"
        " WHERE c.workspace = ? AND (c.at_ms < ? OR i.id IS NULL)",
        (workspace, before_ms),
        "DELETE FROM conversation_messages WHERE id IN ({})",
    )
    with store_sqlite.transaction(conn):
        # the subject index's blocks that no longer hold any batch of the workspace
        first = conn.execute(
            "SELECT min(id) FROM batches WHERE workspace = ?", (workspace,)
        ).fetchone()[0]
        if first is not None:
            counts["subject_index"] = conn.execute(
                "DELETE FROM subject_batches WHERE workspace = ? AND batch < ?",
                (workspace, int(first) // store_sqlite.SUBJECT_BLOCK),
            ).rowcount
        detail: dict[str, Any] = {"before_ms": before_ms, **counts}
        audit.record(conn, workspace, actor, "retention.purged", "", now_ms, detail)
    if truncate:
        checkpoint(conn)
    return counts


class _Cursor(msgspec.Struct):
    cursor: int


_snapshot_cursor = msgspec.msgpack.Decoder(_Cursor).decode


def _read_up_to(conn: sqlite3.Connection, workspace: int) -> int:
    """The last batch the engine no longer needs after a restart: what it has read, and not
    past its snapshot, from which a restart redoes the batches after it."""
    row = conn.execute(
        "SELECT e.cursor, s.snapshot FROM engine e"
        " LEFT JOIN engine_snapshots s ON s.workspace = e.workspace WHERE e.workspace = ?",
        (workspace,),
    ).fetchone()
    if row is None:
        return 0
    cursor, snapshot = int(row[0]), row[1]
    if snapshot is not None:
        try:
            cursor = min(cursor, _snapshot_cursor(store_sqlite.uncompressed(snapshot)).cursor)
        except msgspec.DecodeError:
            return 0
    return cursor


def _in_chunks(conn: sqlite3.Connection, select: str, args: tuple[Any, ...], delete: str) -> int:
    """Delete the rows `select` finds, `CHUNK` at a time, each chunk its own transaction."""
    total = 0
    while True:
        with store_sqlite.transaction(conn):
            ids = [row[0] for row in conn.execute(f"{select} LIMIT {CHUNK}", args)]
            if not ids:
                return total
            conn.execute(delete.format(",".join("?" * len(ids))), ids)
        total += len(ids)
