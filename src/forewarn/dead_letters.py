"""Dead letters of the scale-out worker: an event it could not apply, or a partition state it
could not decode, set aside with the error so that the partition's other events go on.

A worker step that fails on the data it claimed is tried again one partition at a time
(`worker`); what still fails alone comes here, in the transaction that takes it out of the
queue (an event) or out of `parts` (a state: the partition then starts afresh). An event's
row stays in the log, so once the cause is fixed it can be queued again (`replay`); a state is
kept for inspection and can only be discarded. A partition whose step keeps hitting the
statement timeout on its own is set aside in the same way after a few tries in a row
(`count_timeout`), though a timeout is otherwise a failure of the database, retried.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from forewarn import store_pg

log = logging.getLogger("forewarn.worker")


class BadEvent(Exception):
    """An event of a partition could not be decoded or applied."""

    def __init__(self, part: str, event: int, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.part, self.event = part, event


class BadState(Exception):
    """A partition's stored state could not be decoded (or restored)."""

    def __init__(self, part: str, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.part = part


def transient(exc: BaseException) -> bool:
    """A failure of the database or of the connection to it (down, restarting, a timeout, a
    deadlock, a schema it lacks): the step is retried as it was (a timeout is counted too:
    `timed_out`). Any other failure depends on the data of the partitions the step claimed,
    and may be a poison one."""
    if isinstance(exc, (BadEvent, BadState)):
        return False
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return False  # a value the database refuses: it comes from the partition's data
    return isinstance(exc, (psycopg.Error, PoolTimeout))


def timed_out(exc: BaseException) -> bool:
    """A statement cancelled by `statement_timeout` (or by an administrator): transient, but
    a partition whose step times out on its own time after time may be slow because of its
    data, so the worker counts these (`count_timeout`) instead of retrying for ever. A
    database down or restarting fails otherwise (the connection is lost) and is never
    counted."""
    return isinstance(exc, psycopg.errors.QueryCanceled)


def count_timeout(conn: psycopg.Connection[Any], workspace: int, part: str) -> int:
    """In the caller's transaction, count one more timeout of `part` on its own, on what
    `set_aside` would take (its oldest queued event, else its state); returns the count so
    far, 0 when another worker holds the partition now or its row is locked (not counted:
    this never waits for a lock)."""
    if not conn.execute(TRY_LOCKS, ([part], [store_pg.lock_key(workspace, part)])).fetchall():
        return 0
    row = conn.execute(
        "UPDATE queue SET timeouts = timeouts + 1 WHERE id = (SELECT id FROM queue"
        " WHERE workspace = %s AND part = %s ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)"
        " RETURNING timeouts",
        (workspace, part),
    ).fetchone()
    if row is None:
        row = conn.execute(
            "UPDATE parts SET timeouts = timeouts + 1 WHERE (workspace, part) IN (SELECT"
            " workspace, part FROM parts WHERE workspace = %s AND part = %s"
            " FOR UPDATE SKIP LOCKED) RETURNING timeouts",
            (workspace, part),
        ).fetchone()
    return int(row[0]) if row else 0


# the given partitions whose lock this transaction got (never waiting for one)
TRY_LOCKS = """
SELECT part FROM unnest(%s::text[], %s::bigint[]) AS c(part, key)
WHERE pg_try_advisory_xact_lock(key)
"""


def set_aside(
    conn: psycopg.Connection[Any], workspace: int, part: str, exc: BaseException, now_ms: int
) -> bool:
    """Set aside, in the caller's transaction, what made `part` fail alone: the event at
    fault (`BadEvent`), the state that does not decode (`BadState`, maybe of another
    partition the step read), else the partition's oldest queued event, else (only its
    timers failed) its state. Logged; False when another worker holds the partition now (it
    meets the same failure) or there was nothing to set aside."""
    if isinstance(exc, (BadEvent, BadState)):
        at, error = exc.part, str(exc)
    else:
        at, error = part, f"{type(exc).__name__}: {exc}"
    if not conn.execute(TRY_LOCKS, ([at], [store_pg.lock_key(workspace, at)])).fetchall():
        return False
    event: int | None = None
    if isinstance(exc, BadEvent):
        event = exc.event
    elif not isinstance(exc, BadState):
        row = conn.execute(
            "SELECT id FROM queue WHERE workspace = %s AND part = %s ORDER BY id LIMIT 1",
            (workspace, at),
        ).fetchone()
        event = int(row[0]) if row else None
    if event is not None:
        conn.execute("DELETE FROM queue WHERE id = %s", (event,))
        conn.execute(
            "INSERT INTO dead_letters (workspace, part, event, error, at_ms)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (event) DO NOTHING",
            (workspace, at, event, error, now_ms),
        )
        log.error("partition %s: event %d set aside as a dead letter: %s", at, event, error)
        return True
    cur = conn.execute(
        "WITH gone AS (DELETE FROM parts WHERE workspace = %s AND part = %s RETURNING state)"
        " INSERT INTO dead_letters (workspace, part, state, error, at_ms)"
        " SELECT %s, %s, state, %s, %s FROM gone",
        (workspace, at, workspace, at, error, now_ms),
    )
    if not cur.rowcount:
        return False
    log.error("partition %s: its state set aside as a dead letter, it starts afresh: %s", at, error)
    return True


@dataclass(frozen=True)
class DeadLetter:
    """An event (`event`, its id in the log) or a partition's state (`state`) a worker could
    not apply and set aside, with the error."""

    id: int
    part: str
    event: int | None
    state: bytes | None
    error: str
    at_ms: int
    workspace: int


def listed(
    conn: psycopg.Connection[Any],
    workspace: int | None,
    limit: int | None = 1000,
    ids: Sequence[int] | None = None,
) -> list[DeadLetter]:
    """The workspace's dead letters (every workspace's when None; those of `ids` only when
    given), oldest first, at most `limit` (None: all)."""
    chosen = None if ids is None else list(ids)
    rows = conn.execute(
        "SELECT id, part, event, state, error, at_ms, workspace FROM dead_letters"
        " WHERE (%s::bigint IS NULL OR workspace = %s) AND (%s::bigint[] IS NULL OR id = ANY(%s))"
        " ORDER BY id LIMIT %s",
        (workspace, workspace, chosen, chosen, limit),
    ).fetchall()
    return [
        DeadLetter(
            id=int(i),
            part=str(p),
            event=None if e is None else int(e),
            state=None if s is None else bytes(s),
            error=str(err),
            at_ms=int(at),
            workspace=int(w),
        )
        for i, p, e, s, err, at, w in rows
    ]


def count(conn: psycopg.Connection[Any]) -> dict[int, int]:
    """Dead letters waiting, by workspace."""
    return {
        int(w): int(n)
        for w, n in conn.execute("SELECT workspace, count(*) FROM dead_letters GROUP BY 1")
    }


def replay(conn: psycopg.Connection[Any], workspace: int, ids: Sequence[int] | None = None) -> int:
    """Queue the dead-lettered events again (those of `ids`, else all of the workspace's),
    for the workers to apply once what failed is fixed; returns how many. Each goes back
    under its partition with its place in the log, and is applied as an event arriving
    late. (A partition's state set aside is not replayed: see `discard_dead_letters`.)"""
    with conn.transaction():
        rows = conn.execute(
            "DELETE FROM dead_letters d WHERE workspace = %s AND event IS NOT NULL"
            " AND (%s::bigint[] IS NULL OR id = ANY(%s))"
            " AND EXISTS (SELECT 1 FROM events e WHERE e.id = d.event)"
            " RETURNING event, part",
            (workspace, None if ids is None else list(ids), None if ids is None else list(ids)),
        ).fetchall()
        if rows:
            conn.execute(
                "INSERT INTO queue (id, workspace, part)"
                " SELECT id, %s, part FROM unnest(%s::bigint[], %s::text[]) AS r(id, part)"
                " ON CONFLICT (id) DO NOTHING",
                (workspace, [int(e) for e, _ in rows], [str(p) for _, p in rows]),
            )
    return len(rows)


def discard(conn: psycopg.Connection[Any], workspace: int, ids: Sequence[int] | None = None) -> int:
    """Forget dead letters (those of `ids`, else all of the workspace's); returns how many.
    Their events stay in the log until it is pruned."""
    cur = conn.execute(
        "DELETE FROM dead_letters WHERE workspace = %s AND (%s::bigint[] IS NULL OR id = ANY(%s))",
        (workspace, None if ids is None else list(ids), None if ids is None else list(ids)),
    )
    return cur.rowcount
