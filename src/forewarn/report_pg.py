"""Reports and backtests of the scale-out mode: the reads of `report` on PostgreSQL, where
the firings the workers recorded and the event log (one row per event) are. The computation
is `report`'s and `backtest`'s, and the statements are theirs (`schema.placeholders`), but
for the log's, whose table differs from SQLite's.

The events read are those the API processes stored, each as the workers applied it (stamped
no later than its arrival). The workers prune applied events older than
`FOREWARN_PG_KEEP_EVENTS` (7 days by default): a report over a longer period only sees the
outcomes of what is still kept.
"""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg

from forewarn import report
from forewarn.engine import State
from forewarn.errors import EventError
from forewarn.model import Event, event_from_dict
from forewarn.playbook import Trigger
from forewarn.schema import placeholders
from forewarn.store_sqlite import EVENTS_FORMAT_PLAIN

Conn = psycopg.Connection[Any]

_FIRINGS = placeholders(report.FIRINGS)
_RECORD = placeholders(report.RECORD)
_NEW_BACKTEST = placeholders(report.NEW_BACKTEST) + " RETURNING id"
_READ_BACKTEST = placeholders(report.READ_BACKTEST)
_FINISH_BACKTEST = placeholders(report.FINISH_BACKTEST)
# (the message, what the client sent, only for an event stored in another format)
_EVENTS = """
SELECT id, received_ms, event, CASE WHEN get_byte(event, 0) = %s THEN NULL ELSE message END
FROM events WHERE workspace = %s AND id > %s AND received_ms >= %s
ORDER BY id LIMIT %s
"""
PAGE = 5_000  # events per statement: each is a short read, none holds a transaction open

_decode_fields = msgspec.msgpack.Decoder(tuple[Any, ...]).decode
_decode_message = msgspec.json.Decoder(dict[str, Any]).decode


def live_report(
    conn: Conn,
    workspace: int,
    triggers: list[Trigger],
    since_ms: int,
    until_ms: int,
    trigger: str | None = None,
    record: bool = False,
    state: State | None = None,
) -> dict[str, Any]:
    """`report.live_report` on PostgreSQL."""
    return report.report_from(
        READS, conn, workspace, triggers, since_ms, until_ms, trigger, record, state
    )


def log_events(conn: Conn, workspace: int, since_ms: int, until_ms: int) -> list[Event]:
    """The log's events stamped in [since, until], in time order (`report.log_events`)."""
    out: list[Event] = []
    cursor = 0
    received = since_ms - report.RECEIVED_BEFORE_MS
    while True:
        args = (EVENTS_FORMAT_PLAIN[0], workspace, cursor, received, PAGE)
        rows = conn.execute(_EVENTS, args).fetchall()
        for _, received_ms, raw, message in rows:
            event = _event(bytes(raw), message)
            if event is None:
                continue
            if event.timestamp_ms > received_ms:  # as the worker applied it (a clock ahead)
                event.timestamp_ms = received_ms
            if since_ms <= event.timestamp_ms <= until_ms:
                out.append(event)
        if len(rows) < PAGE:
            break
        cursor = int(rows[-1][0])
    out.sort(key=lambda e: e.timestamp_ms)
    return out


def _event(raw: bytes, message: bytes | None) -> Event | None:
    """An event row as the engine reads it; from its message when stored in another format,
    skipped when neither reads (as `live.events_of` does with a batch)."""
    if message is None:
        try:
            return Event(*_decode_fields(raw[1:]))
        except (TypeError, msgspec.DecodeError):
            return None  # (the worker sets such an event aside as a dead letter)
    try:
        return event_from_dict(_decode_message(bytes(message)))
    except (EventError, msgspec.DecodeError):
        return None


def _firings(conn: Conn, workspace: int, since_ms: int, until_ms: int) -> list[Any]:
    return conn.execute(_FIRINGS, (workspace, since_ms, until_ms)).fetchall()


def _record(conn: Conn, rows: list[tuple[Any, ...]]) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(_RECORD, rows)


READS = report.Reads(_firings, log_events, _record)


# --- the admin API's backtests, as `report`'s ------------------------------------------------


def new_backtest(conn: Conn, workspace: int, params: dict[str, Any], now_ms: int) -> int:
    args = (workspace, now_ms, msgspec.json.encode(params).decode())
    row = conn.execute(_NEW_BACKTEST, args).fetchone()
    assert row is not None
    return int(row[0])


def finish_backtest(conn: Conn, job: int, status: str, payload: str, now_ms: int) -> None:
    conn.execute(_FINISH_BACKTEST, (status, payload, now_ms, job))


def read_backtest(conn: Conn, workspace: int, job: int) -> dict[str, Any] | None:
    return report.backtest_answer(conn.execute(_READ_BACKTEST, (job, workspace)).fetchone())
