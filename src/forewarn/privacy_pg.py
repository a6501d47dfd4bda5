"""Forgetting a person, and keeping data no longer than the retention: the scale-out store
(PostgreSQL). The same contract as the embedded store's (`privacy`):

`forget` runs in two transactions and a search between them:

1. the request goes to the audit log, and the id's hash joins `forgotten` under the
   workspace's forget lock, taken exclusive (each append takes it shared, `store_pg`): appends
   in flight commit first, and every later one reads the new hash and refuses the person's
   events (`forgotten.REASON`). From this commit on nothing of theirs is stored.
2. the log is searched, with no lock taken, for events that name the id as `anonymousId` or
   alias `previousId` while their person (user id, else anonymous id) is someone else: a byte
   search of the stored messages, each hit checked decoded. (Events whose person is the id are
   found by the `events_person` index in step 3.)
3. in one transaction, under the forget lock and then each partition's advisory lock (blocking,
   in name order, as workers take them): their events and queue rows, their home, their
   user-scoped rows of the other tables (the embedded store's statements, `privacy.delete_rows`),
   and the state of every partition their events went to (their own, their home account's,
   each account they sent events with) are deleted; each such partition gets a rebuild (the
   `rebuilds` row a worker reads, `worker`): its remaining events are queued again and the next
   worker applies them from an empty state without recording firings, up to where the dropped
   state was, then goes on as before. The policy's history of the others in it is kept. A
   worker that read the partition before the forget commits before it (it holds the lock), and
   one that reads it after finds no state: neither brings the person back. The completion goes
   into the audit log.

A process stopped between 1 and 3 leaves the person refused but their data in place: forget
them again (forgetting twice is harmless).

`purge` deletes what is older than the retention, in transactions of `privacy`'s chunk size,
one process at a time (an advisory lock): applied events, firings and their outcomes, finished
outbox rows, inbox items and their conversations. The audit log and `forgotten` are kept.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import psycopg

from forewarn import audit_pg, partition, privacy, store_pg
from forewarn.errors import InputError
from forewarn.forgotten import people_of, subject_hash

# the tables `forget` deletes rows from on PostgreSQL (it has no subject index: events are
# found by their person)
TABLES = tuple(t for t in privacy.TABLES if t != "subject_index")
PURGE_LOCK = 0x666F72657761727F  # one process purges at a time
_messages = msgspec.json.Decoder(dict[str, Any]).decode

_LOCK_ALL = """
SELECT pg_advisory_xact_lock(key) FROM (
    SELECT key FROM unnest(%s::bigint[]) WITH ORDINALITY AS k(key, n) ORDER BY n
) ordered
"""


def forget(
    pool: store_pg.Pool, workspace: int, subject: str, actor: str, now_ms: int
) -> privacy.Forgot:
    """Remove the person `subject` from every table of the workspace, and every partition's
    state, and refuse their events from now on."""
    if not subject:
        raise InputError("give the person's user id or anonymous id")
    h = subject_hash(workspace, subject)
    with pool.connection() as conn:
        with conn.transaction():
            audit_pg.record(conn, workspace, actor, "subject.forget_requested", h, now_ms)
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (store_pg.forget_lock(workspace),))
            conn.execute(
                "INSERT INTO forgotten (workspace, hash, at_ms) VALUES (%s, %s, %s)"
                " ON CONFLICT (workspace, hash) DO NOTHING",
                (workspace, h, now_ms),
            )
        # the search reads the whole log, and the removal waits for workers' steps and queues
        # whole partitions again: neither is cut short by the processes' statement timeout
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = 0")
            named = _naming(conn, workspace, subject)
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = 0")
            done = _remove(conn, workspace, subject, named, h)
            audit_pg.record(conn, workspace, actor, "subject.forgotten", h, now_ms, done.to_dict())
    return done


def _naming(conn: psycopg.Connection[Any], workspace: int, subject: str) -> list[int]:
    """The events of others (by their person) whose message names the id as a person."""
    needles = [msgspec.json.encode(subject)]
    if subject.isascii() and subject.isdigit() and str(int(subject)) == subject:
        needles += [f'"{f}":{subject}'.encode() for f in ("userId", "anonymousId", "previousId")]
    found = []
    rows = conn.execute(
        "SELECT id, message FROM events WHERE workspace = %s AND person IS DISTINCT FROM %s"
        " AND EXISTS (SELECT 1 FROM unnest(%s::bytea[]) n WHERE position(n IN message) > 0)",
        (workspace, subject, needles),
    )
    for event_id, message in rows:
        try:
            if subject in people_of(_messages(bytes(message))):
                found.append(int(event_id))
        except msgspec.DecodeError:
            continue
    return found


def _remove(
    conn: psycopg.Connection[Any], workspace: int, subject: str, named: list[int], h: str
) -> privacy.Forgot:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (store_pg.forget_lock(workspace),))
    # a delivery settling one of their messages (and logging its result) commits first
    conn.execute(
        "SELECT 1 FROM outbox WHERE workspace = %s AND scope = 'user' AND subject = %s FOR UPDATE",
        (workspace, subject),
    )
    rows = conn.execute(
        "SELECT e.id, e.part, q.part, e.message FROM events e LEFT JOIN queue q ON q.id = e.id"
        " WHERE e.workspace = %s AND (e.person = %s OR e.id = ANY(%s))",
        (workspace, subject, named),
    ).fetchall()
    home = conn.execute(
        "SELECT account FROM homes WHERE workspace = %s AND person = %s", (workspace, subject)
    ).fetchone()
    parts = {"user:" + subject}
    if home is not None:
        parts.add("account:" + str(home[0]))
    ids: list[int] = []
    addresses: set[str] = set()
    for event_id, part, queued, message in rows:
        ids.append(int(event_id))
        parts.add(str(part))
        if queued is not None:
            parts.add(str(queued))
        with contextlib.suppress(msgspec.DecodeError):
            addresses.update(privacy.emails_of(_messages(bytes(message))))
    names = sorted(parts)  # the order every worker takes partition locks in
    conn.execute(_LOCK_ALL, ([store_pg.lock_key(workspace, n) for n in names],))
    done = privacy.Forgot(h)
    done.removed = privacy.delete_rows(
        lambda sql, args: conn.execute(sql.replace("?", "%s"), args).rowcount,
        workspace,
        subject,
        addresses,
        TABLES,
    )
    done.removed["subject_index"] = 0
    conn.execute("DELETE FROM queue WHERE id = ANY(%s)", (ids,))
    # their events set aside as dead letters, and the states set aside of the partitions that
    # held them (kept for inspection only: they hold the person too)
    done.removed["dead_letters"] = conn.execute(
        "DELETE FROM dead_letters WHERE workspace = %s AND (event = ANY(%s)"
        " OR (event IS NULL AND part = ANY(%s)))",
        (workspace, ids, sorted(parts)),
    ).rowcount
    done.events = conn.execute("DELETE FROM events WHERE id = ANY(%s)", (ids,)).rowcount
    done.batches = done.events  # each event is a row of its own here
    conn.execute("DELETE FROM homes WHERE workspace = %s AND person = %s", (workspace, subject))
    requeued = 0
    for name in names:
        requeued += _rebuild(conn, workspace, name, subject)
    done.removed["partitions"] = len(names)
    done.removed["requeued"] = requeued
    return done


def _rebuild(conn: psycopg.Connection[Any], workspace: int, name: str, subject: str) -> int:
    """Drop a partition's state, and queue its remaining applied events again for a worker to
    rebuild it (see `worker`); returns the events queued again."""
    old = conn.execute(
        "DELETE FROM parts WHERE workspace = %s AND part = %s RETURNING state, playbooks",
        (workspace, name),
    ).fetchone()
    prior = conn.execute(
        "DELETE FROM rebuilds WHERE workspace = %s AND part = %s"
        " RETURNING upto, clock_ms, state, playbooks",
        (workspace, name),
    ).fetchone()
    # the users an account adopted from their own partitions: their events from before they
    # had it as home are part of its state
    sources = [name]
    if name.startswith("account:"):
        sources += [
            str(p)
            for (p,) in conn.execute(
                "SELECT 'user:' || h.person FROM homes h WHERE h.workspace = %s"
                " AND h.account = %s AND NOT EXISTS (SELECT 1 FROM parts p"
                " WHERE p.workspace = h.workspace AND p.part = 'user:' || h.person)",
                (workspace, name[len("account:") :]),
            )
        ]
    queued = [
        int(i)
        for (i,) in conn.execute(
            "INSERT INTO queue (id, workspace, part) SELECT id, workspace, %s FROM events e"
            " WHERE workspace = %s AND part = ANY(%s)"
            " AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event = e.id)"
            " ON CONFLICT (id) DO NOTHING RETURNING id",
            (name, workspace, sources),
        )
    ]
    upto = max([*queued, int(prior[0]) if prior else 0])
    if not upto:
        return 0
    history: list[Any] = []
    clock_ms: int | None = None
    playbooks = ""
    for found in (prior and (prior[2], prior[3], prior[1]), old and (old[0], old[1], None)):
        if not found:
            continue
        try:
            snap = partition.decode(bytes(found[0]))
        except msgspec.DecodeError:
            continue
        history += [e for e in snap.history if not (e[0] == "user" and e[1] == subject)]
        clocks = [c for c in (clock_ms, snap.clock_ms, found[2]) if c is not None]
        clock_ms = max(clocks) if clocks else None
        playbooks = str(found[1])
    fresh = [
        int(i)
        for (i,) in conn.execute(
            "SELECT id FROM queue WHERE workspace = %s AND part = ANY(%s) AND id < %s"
            " AND NOT (id = ANY(%s))",
            (workspace, sources, upto, queued),
        )
    ]
    blank = partition.PartState(None, -1, {}, {}, {}, {}, {}, history)
    conn.execute(
        "INSERT INTO rebuilds (workspace, part, upto, clock_ms, fresh, state, playbooks)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (workspace, name, upto, clock_ms, fresh, partition.encode(blank), playbooks),
    )
    return len(queued)


# --- retention ---------------------------------------------------------------------------------


def purge(
    pool: store_pg.Pool, workspace: int, before_ms: int, actor: str, now_ms: int
) -> dict[str, int] | None:
    """Delete the workspace's data from before `before_ms`, `privacy.CHUNK` rows per
    transaction; returns the rows deleted per table (recorded in the audit log), or None when
    another process is purging (it holds the purge lock)."""
    with pool.connection() as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (PURGE_LOCK,)).fetchone()
        if row is None or not row[0]:
            return None
        try:
            return _purge(conn, workspace, before_ms, actor, now_ms)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (PURGE_LOCK,))


_PURGES = (
    (
        "outcomes",
        "SELECT o.firing FROM outcomes o JOIN firings f ON f.id = o.firing"
        " WHERE o.workspace = %(ws)s AND f.at_ms < %(before)s",
        "DELETE FROM outcomes WHERE firing = ANY(%s)",
    ),
    (
        "firings",
        "SELECT id FROM firings WHERE workspace = %(ws)s AND at_ms < %(before)s",
        "DELETE FROM firings WHERE id = ANY(%s)",
    ),
    (
        "outbox",
        "SELECT id FROM outbox WHERE workspace = %(ws)s AND created_ms < %(before)s"
        " AND status != 'pending'",
        "DELETE FROM outbox WHERE id = ANY(%s)",
    ),
    (
        "inbox",
        "SELECT id FROM inbox WHERE workspace = %(ws)s AND created_ms < %(before)s",
        "DELETE FROM inbox WHERE id = ANY(%s)",
    ),
    # old chat messages, and every message of a conversation whose opener went
    (
        "conversation_messages",
        "SELECT c.id FROM conversation_messages c LEFT JOIN inbox i ON i.id = c.conversation"
        " WHERE c.workspace = %(ws)s AND (c.at_ms < %(before)s OR i.id IS NULL)",
        "DELETE FROM conversation_messages WHERE id = ANY(%s)",
    ),
)


def _purge(
    conn: psycopg.Connection[Any], workspace: int, before_ms: int, actor: str, now_ms: int
) -> dict[str, int]:
    counts = {"events": _purge_events(conn, workspace, before_ms)}
    args = {"ws": workspace, "before": before_ms}
    for table, select, delete in _PURGES:
        total = 0
        while True:
            with conn.transaction():
                ids = [r[0] for r in conn.execute(f"{select} LIMIT {privacy.CHUNK}", args)]
                if ids:
                    conn.execute(delete, (ids,))
            if not ids:
                break
            total += len(ids)
        counts[table] = total
    with conn.transaction():
        detail: dict[str, Any] = {"before_ms": before_ms, **counts}
        audit_pg.record(conn, workspace, actor, "retention.purged", "", now_ms, detail)
    return counts


_OLD_EVENTS = """
SELECT e.id, e.received_ms < %(before)s, q.id IS NULL AND d.id IS NULL FROM events e
LEFT JOIN queue q ON q.id = e.id LEFT JOIN dead_letters d ON d.event = e.id
WHERE e.workspace = %(ws)s AND e.id > %(after)s ORDER BY e.id LIMIT %(chunk)s
"""


def _purge_events(conn: psycopg.Connection[Any], workspace: int, before_ms: int) -> int:
    """The applied events received before `before_ms` (one still queued, queued again for a
    rebuild, or set aside as a dead letter, stays), walked in log order: ids are given out as
    events arrive, so the walk stops at the first chunk holding none old enough."""
    total, after = 0, 0
    args = {"ws": workspace, "before": before_ms, "chunk": privacy.CHUNK}
    while True:
        with conn.transaction():
            rows = conn.execute(_OLD_EVENTS, {**args, "after": after}).fetchall()
            old = [int(i) for i, aged, applied in rows if aged and applied]
            if old:
                conn.execute("DELETE FROM events WHERE id = ANY(%s)", (old,))
        total += len(old)
        if not any(aged for _, aged, _ in rows):
            return total
        after = int(rows[-1][0])
