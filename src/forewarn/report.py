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
from forewarn.engine import Firing
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
) -> dict[str, Any]:
    chosen = [t for t in triggers if trigger is None or t.id == trigger]
    firings = _firings(conn, workspace, since_ms, until_ms, {t.id for t in chosen})
    span = max(
        [ENGAGEMENT_MS]
        + [s.within_ms for t in chosen for s in (t.goal, t.failure) if s is not None]
    )
    events = log_events(conn, workspace, since_ms - span, until_ms + span)
    outcomes = Outcomes(chosen)
    done: list[Outcome] = []
    i = 0
    for event in events:
        t = event.timestamp_ms
        while i < len(firings) and firings[i].at_ms < t:
            outcomes.fired(firings[i])
            i += 1
        done.extend(outcomes.close(t))
        outcomes.observe(event)
    for f in firings[i:]:
        outcomes.fired(f)
    done.extend(outcomes.finish())
    days = max(1.0, (until_ms - since_ms) / backtest.DAY_MS)
    result = backtest.report(chosen, firings, done, outcomes, days, len(events))
    result["since"], result["until"] = since_ms, until_ms
    return result


def _firings(
    conn: sqlite3.Connection, workspace: int, since_ms: int, until_ms: int, ids: set[str]
) -> list[Firing]:
    rows = conn.execute(
        "SELECT trig, subject, scope, at_ms, evidence, decision, reason, channel, send_at_ms"
        " FROM firings WHERE workspace = ? AND at_ms >= ? AND at_ms <= ? ORDER BY at_ms, id",
        (workspace, since_ms, until_ms),
    ).fetchall()
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
        for trig, subject, scope, at, ev, decision, reason, channel, send_at in rows
        if trig in ids
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
