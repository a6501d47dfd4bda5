"""Reports on the live server's outreach: the firings it recorded, and what happened after each,
read from its own event log. Edge (reads the database).

The computation is the same for both stores; only the reads differ: `live_report` reads
SQLite, `report_pg.live_report` PostgreSQL, each through a `Reads` of the same statements.

The outcomes are computed from the log when asked, not kept apart: the log is the record of
what happened, so a report is never out of step with it. Firings are those recorded in the
period; the events read run on past its end by the longest window, so that a firing near the
end still gets its whole window (or as much of it as has passed).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import msgspec

from forewarn import backtest, store_sqlite
from forewarn.engine import Firing, State
from forewarn.live import events_of
from forewarn.model import Event, format_time
from forewarn.outcomes import ENGAGEMENT_MS, Outcome, Outcomes
from forewarn.playbook import Trigger

# The statements both stores read (PostgreSQL's through `schema.placeholders`).
FIRINGS = (
    "SELECT trig, subject, scope, at_ms, evidence, decision, reason, channel, send_at_ms, id"
    " FROM firings WHERE workspace = ? AND at_ms >= ? AND at_ms <= ? ORDER BY at_ms, id"
)
RECORD = (
    "INSERT INTO outcomes (firing, workspace, trig, goal, failure, engaged, closed_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (firing) DO NOTHING"
)
NEW_BACKTEST = (
    "INSERT INTO backtests (workspace, created_ms, status, params) VALUES (?, ?, 'running', ?)"
)
READ_BACKTEST = (
    "SELECT id, status, params, result, created_ms, done_ms FROM backtests"
    " WHERE id = ? AND workspace = ?"
)
FINISH_BACKTEST = "UPDATE backtests SET status = ?, result = ?, done_ms = ? WHERE id = ?"


class Reads(NamedTuple):
    """What a report reads and writes in one store: the firings' rows (as `FIRINGS` selects
    them), the log's events stamped in a period (in time order), the closed outcomes' rows
    written (as `RECORD` takes them)."""

    firings: Callable[[Any, int, int, int], Iterable[Sequence[Any]]]
    events: Callable[[Any, int, int, int], list[Event]]
    record: Callable[[Any, list[tuple[Any, ...]]], None]


def live_report(
    conn: sqlite3.Connection,
    workspace: int,
    triggers: list[Trigger],
    since_ms: int,
    until_ms: int,
    trigger: str | None = None,
    record: bool = False,
    state: State | None = None,
) -> dict[str, Any]:
    """The report; with `record`, the outcomes whose windows have closed are also written to
    the `outcomes` table (once per firing). `state`: the live engine's, to know which
    accounts each user belongs to (without it, only the group calls read in the period tell)."""
    return report_from(
        SQLITE, conn, workspace, triggers, since_ms, until_ms, trigger, record, state
    )


def report_from(
    reads: Reads,
    conn: Any,
    workspace: int,
    triggers: list[Trigger],
    since_ms: int,
    until_ms: int,
    trigger: str | None = None,
    record: bool = False,
    state: State | None = None,
) -> dict[str, Any]:
    """`live_report` over the store that `reads` reads."""
    chosen = [t for t in triggers if trigger is None or t.id == trigger]
    ids: list[int] = []
    rows = reads.firings(conn, workspace, since_ms, until_ms)
    firings = _firings(rows, {t.id for t in chosen}, ids)
    span = max(
        [ENGAGEMENT_MS]
        + [s.within_ms for t in chosen for s in (t.goal, t.failure) if s is not None]
    )
    events = reads.events(conn, workspace, since_ms - span, until_ms + span)
    outcomes = Outcomes(chosen, state)
    done: list[Outcome] = []
    i = 0
    for event in events:
        t = event.timestamp_ms
        while i < len(firings) and firings[i].at_ms < t:
            outcomes.fired(firings[i], ids[i])
            i += 1
        done.extend(outcomes.close(t))
        outcomes.observe(event)
    for f, fid in zip(firings[i:], ids[i:], strict=True):
        outcomes.fired(f, fid)
    done.extend(outcomes.finish())
    if record:
        reads.record(conn, _closed(workspace, [o for o in done if o.closes_ms <= until_ms]))
    days = max(1.0, (until_ms - since_ms) / backtest.DAY_MS)
    result = backtest.report(chosen, firings, done, outcomes, days, len(events))
    result["since"], result["until"] = since_ms, until_ms
    return result


def _closed(workspace: int, closed: list[Outcome]) -> list[tuple[Any, ...]]:
    """The `outcomes` rows of the outcomes whose windows have closed."""

    def flag(value: bool | None) -> int | None:
        return None if value is None else int(value)

    return [
        (
            o.ref,
            workspace,
            o.trigger,
            flag(o.goal),
            flag(o.failure),
            ",".join(sorted(o.engaged)),
            o.closes_ms,
        )
        for o in closed
        if o.ref is not None
    ]


def _firings(rows: Iterable[Sequence[Any]], wanted: set[str], ids: list[int]) -> list[Firing]:
    kept = [r for r in rows if r[0] in wanted]
    ids.extend(int(r[9]) for r in kept)
    return [
        Firing(
            trig,
            subject,
            scope,
            at,
            msgspec.json.decode(ev),
            decision,
            reason,
            channel,
            send_at_ms=send_at,
        )
        for trig, subject, scope, at, ev, decision, reason, channel, send_at, _ in kept
    ]


def _sqlite_firings(
    conn: sqlite3.Connection, workspace: int, since_ms: int, until_ms: int
) -> list[Any]:
    return conn.execute(FIRINGS, (workspace, since_ms, until_ms)).fetchall()


def _sqlite_record(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    with store_sqlite.transaction(conn):
        conn.executemany(RECORD, rows)


def log_events(
    conn: sqlite3.Connection, workspace: int, since_ms: int, until_ms: int
) -> list[Event]:
    """The log's events stamped in [since, until], in time order."""
    out: list[Event] = []
    cursor = 0
    while True:
        batches = store_sqlite.read_log(conn, workspace, cursor, 500)
        if not batches:
            break
        for batch in batches:
            cursor = batch.id
            if batch.received_ms < since_ms - RECEIVED_BEFORE_MS:
                continue  # received a day before the period: its events are older still
            out.extend(e for e in events_of(batch) if since_ms <= e.timestamp_ms <= until_ms)
    out.sort(key=lambda e: e.timestamp_ms)
    return out


RECEIVED_BEFORE_MS = 86_400_000  # an event is stamped at most this long before it arrives
SQLITE = Reads(_sqlite_firings, log_events, _sqlite_record)


# --- backtests of the server's log, run in the background (`api_outreach`) -----------------


def new_backtest(
    conn: sqlite3.Connection, workspace: int, params: dict[str, Any], now_ms: int
) -> int:
    cur = conn.execute(NEW_BACKTEST, (workspace, now_ms, msgspec.json.encode(params).decode()))
    return int(cur.lastrowid or 0)


def finish_backtest(
    conn: sqlite3.Connection, job: int, status: str, payload: str, now_ms: int
) -> None:
    conn.execute(FINISH_BACKTEST, (status, payload, now_ms, job))


def read_backtest(conn: sqlite3.Connection, workspace: int, job: int) -> dict[str, Any] | None:
    return backtest_answer(conn.execute(READ_BACKTEST, (job, workspace)).fetchone())


def backtest_answer(row: Sequence[Any] | None) -> dict[str, Any] | None:
    """A backtest's row as the admin API answers it."""
    if row is None:
        return None
    out: dict[str, Any] = {"id": row[0], "status": row[1], **msgspec.json.decode(row[2])}
    out["created"] = format_time(row[4])
    if row[3] is not None:
        out["result"] = msgspec.json.decode(row[3])
    if row[5] is not None:
        out["done"] = format_time(row[5])
    return out
