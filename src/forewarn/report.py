"""Reports on the live server's outreach: the firings it recorded, and what happened after each,
read from its own event log. Edge (reads the database).

The outcomes are computed from the log when asked, not kept apart: the log is the record of
what happened, so a report is never out of step with it. Firings are those recorded in the
period; the events read run on past its end by the longest window, so that a firing near the
end still gets its whole window (or as much of it as has passed).
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from forewarn import backtest, store_sqlite
from forewarn.engine import Firing, State
from forewarn.live import events_of
from forewarn.model import Event
from forewarn.outcomes import ENGAGEMENT_MS, Outcome, Outcomes
from forewarn.playbook import Trigger


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
    chosen = [t for t in triggers if trigger is None or t.id == trigger]
    ids: list[int] = []
    firings = _firings(conn, workspace, since_ms, until_ms, {t.id for t in chosen}, ids)
    span = max(
        [ENGAGEMENT_MS]
        + [s.within_ms for t in chosen for s in (t.goal, t.failure) if s is not None]
    )
    events = log_events(conn, workspace, since_ms - span, until_ms + span)
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
        _record(conn, workspace, [o for o in done if o.closes_ms <= until_ms])
    days = max(1.0, (until_ms - since_ms) / backtest.DAY_MS)
    result = backtest.report(chosen, firings, done, outcomes, days, len(events))
    result["since"], result["until"] = since_ms, until_ms
    return result


def _record(conn: sqlite3.Connection, workspace: int, closed: list[Outcome]) -> None:
    def flag(value: bool | None) -> int | None:
        return None if value is None else int(value)

    with store_sqlite.transaction(conn):
        conn.executemany(
            "INSERT OR IGNORE INTO outcomes (firing, workspace, trig, goal, failure, engaged,"
            " closed_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
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
            ],
        )


def _firings(
    conn: sqlite3.Connection,
    workspace: int,
    since_ms: int,
    until_ms: int,
    wanted: set[str],
    ids: list[int],
) -> list[Firing]:
    rows = conn.execute(
        "SELECT trig, subject, scope, at_ms, evidence, decision, reason, channel, send_at_ms, id"
        " FROM firings WHERE workspace = ? AND at_ms >= ? AND at_ms <= ? ORDER BY at_ms, id",
        (workspace, since_ms, until_ms),
    ).fetchall()
    rows = [r for r in rows if r[0] in wanted]
    ids.extend(int(r[9]) for r in rows)
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
        for trig, subject, scope, at, ev, decision, reason, channel, send_at, _ in rows
    ]


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
            if batch.received_ms < since_ms - 86_400_000:
                continue  # received a day before the period: its events are older still
            out.extend(e for e in events_of(batch) if since_ms <= e.timestamp_ms <= until_ms)
    out.sort(key=lambda e: e.timestamp_ms)
    return out
