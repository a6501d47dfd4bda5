"""Pruning of the scale-out tables, run now and then by the workers (`scaleout.run_worker`):

- `events`: rows received longer ago than the window kept (`FOREWARN_PG_KEEP_EVENTS`, at
  least the 7 days within which a resent message id is recognised, since the unique index on
  the rows that remain is what recognises it), once applied: never an event still queued,
  nor one set aside as a dead letter (it is replayed from its row);
- `parts`: partition states no worker will use again: those made under playbooks other than
  the current generation's (read from the database by each statement) with nothing queued (a
  worker would start them afresh anyway), and those left empty (no subject, alias, ticket
  nor outreach history: a user's partition emptied into their home account, say).

- `homes`: the home of a person with no state left anywhere (no partition of their own, no
  partition of their home account: pruned as above; nothing queued for either). A returning
  person starts afresh, as their state did, and their home is the first account seen from
  then on. (An API process forgets the homes it cached within `store_pg.HOMES_FOR_S`; until
  then, it still sends such a person's events without an account to the old one.)

Each batch is a transaction of its own, of at most `batch` rows, under a lock that one worker
at a time holds; a partition is only deleted under its own lock (tried, never waited for), so
never in the middle of a worker's step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from forewarn import dead_letters, partition, store_pg

log = logging.getLogger("forewarn.worker")

PRUNE = "prune"  # the advisory lock (as a partition name) of the worker pruning
BATCH = 5_000
BATCHES = 40  # per run and table: a run's work stays bounded, the next run goes on
SMALL_STATE = 64  # bytes: an empty partition state is smaller; only those are decoded

_EVENTS = """
DELETE FROM events WHERE id IN (
    SELECT id FROM events e
    WHERE e.workspace = %(ws)s AND e.received_ms < %(before)s
      AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.id = e.id)
      AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event = e.id)
    ORDER BY id LIMIT %(n)s
)
"""

# read in each statement: a generation started during a run is seen by the next statement
# (its workers build nothing before it is recorded)
CURRENT = """(
    SELECT fingerprint FROM playbook_generations WHERE workspace = %s
    ORDER BY generation DESC LIMIT 1
)"""

_OLD_PLAYBOOKS = f"""
SELECT part FROM parts p
WHERE p.workspace = %s AND p.playbooks <> {CURRENT}
  AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.workspace = p.workspace AND q.part = p.part)
ORDER BY part LIMIT %s
"""

_SMALL = """
SELECT part, state FROM parts p
WHERE p.workspace = %(ws)s AND p.part > %(after)s AND octet_length(p.state) <= %(small)s
  AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.workspace = p.workspace AND q.part = p.part)
ORDER BY part LIMIT %(n)s
"""


@dataclass
class Pruned:
    events: int = 0
    parts: int = 0
    homes: int = 0
    batches: int = 0
    longest_s: float = 0.0  # the longest batch's transaction: how long it held its locks


def prune(
    pool: store_pg.Pool, workspace: int, now_ms: int, keep_events_ms: int, batch: int = BATCH
) -> Pruned:
    """One run over the workspace (`keep_events_ms`: 0 keeps every event). Returns what it
    deleted."""
    done = Pruned()
    if keep_events_ms:
        for _ in range(BATCHES):
            n = _batch(pool, workspace, done, _events, now_ms - keep_events_ms, batch)
            if n is None:
                return done  # another worker is pruning
            done.events += n
            if n < batch:
                break
    for _ in range(BATCHES):
        n = _batch(pool, workspace, done, _old_parts, None, batch)
        if n is None:
            return done
        done.parts += n
        if n < batch:
            break
    after: str | None = ""
    for _ in range(BATCHES):
        got = _batch(pool, workspace, done, _empty_parts, after, batch)
        if got is None:
            return done
        n, after = got
        done.parts += n
        if after is None:
            break
    after = ""
    for _ in range(BATCHES):
        got = _batch(pool, workspace, done, _homes, after, batch)
        if got is None:
            return done
        n, after = got
        done.homes += n
        if after is None:
            break
    if done.events or done.parts or done.homes:
        log.info(
            "pruned %d events, %d partition states and %d homes in %d transactions"
            " (the longest %.3f s)",
            done.events,
            done.parts,
            done.homes,
            done.batches,
            done.longest_s,
        )
    return done


def _lock(conn: psycopg.Connection[Any], workspace: int) -> bool:
    key = store_pg.lock_key(workspace, PRUNE)
    row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone()
    return bool(row and row[0])


def _batch(
    pool: store_pg.Pool, workspace: int, done: Pruned, step: Any, arg: Any, batch: int
) -> Any:
    """One transaction of `step`, under the pruning lock; None when another worker has it."""
    start = time.perf_counter()
    with pool.connection() as conn, conn.transaction():
        if not _lock(conn, workspace):
            return None
        result = step(conn, workspace, arg, batch)
    done.batches += 1
    done.longest_s = max(done.longest_s, time.perf_counter() - start)
    return result


def _events(conn: psycopg.Connection[Any], workspace: int, before_ms: int, batch: int) -> int:
    return conn.execute(_EVENTS, {"ws": workspace, "before": before_ms, "n": batch}).rowcount


def _old_parts(conn: psycopg.Connection[Any], workspace: int, _: None, batch: int) -> int:
    parts = [str(p) for (p,) in conn.execute(_OLD_PLAYBOOKS, (workspace, workspace, batch))]
    return _delete(conn, workspace, parts, f"playbooks <> {CURRENT}", workspace)


def _empty_parts(
    conn: psycopg.Connection[Any], workspace: int, after: str, batch: int
) -> tuple[int, str | None]:
    """The empty states among the small ones after `after`, deleted; with where the next
    batch starts (None at the end)."""
    rows = conn.execute(
        _SMALL, {"ws": workspace, "after": after, "small": SMALL_STATE, "n": batch}
    ).fetchall()
    empty = [str(p) for p, s in rows if _empty(bytes(s))]
    n = _delete(conn, workspace, empty, "octet_length(state) <= %s", SMALL_STATE)
    return n, (str(rows[-1][0]) if len(rows) == batch else None)


_HOMES = """
SELECT person FROM homes WHERE workspace = %(ws)s AND person > %(after)s
ORDER BY person LIMIT %(n)s
"""

_ORPHANS = """
DELETE FROM homes h WHERE h.workspace = %(ws)s AND h.person = ANY(%(people)s)
  AND NOT EXISTS (SELECT 1 FROM parts p WHERE p.workspace = h.workspace
                  AND p.part IN ('account:' || h.account, 'user:' || h.person))
  AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.workspace = h.workspace
                  AND q.part IN ('account:' || h.account, 'user:' || h.person))
"""


def _homes(
    conn: psycopg.Connection[Any], workspace: int, after: str, batch: int
) -> tuple[int, str | None]:
    """The homes after `after` of people with no state left, deleted; with where the next
    batch starts (None at the end)."""
    people = [
        str(p) for (p,) in conn.execute(_HOMES, {"ws": workspace, "after": after, "n": batch})
    ]
    if not people:
        return 0, None
    n = conn.execute(_ORPHANS, {"ws": workspace, "people": people}).rowcount
    return n, (people[-1] if len(people) == batch else None)


def _delete(
    conn: psycopg.Connection[Any], workspace: int, parts: list[str], still: str, arg: Any
) -> int:
    """Delete those of `parts` whose lock this transaction gets, if `still` holds and nothing
    was queued for them meanwhile."""
    if not parts:
        return 0
    keys = [store_pg.lock_key(workspace, p) for p in parts]
    locked = [str(p) for (p,) in conn.execute(dead_letters.TRY_LOCKS, (parts, keys))]
    if not locked:
        return 0
    return conn.execute(
        f"DELETE FROM parts p WHERE p.workspace = %s AND p.part = ANY(%s) AND {still}"
        " AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.workspace = p.workspace"
        " AND q.part = p.part)",
        (workspace, locked, arg),
    ).rowcount


def _empty(raw: bytes) -> bool:
    try:
        snap = partition.decode(raw)
    except Exception:  # not for pruning to judge: a worker sets it aside when it claims it
        return False
    return not (
        snap.users or snap.accounts or snap.aliases or snap.members or snap.urgent or snap.history
    )
