"""What a report costs on each store: `--events` events over the last 20 days (a tenth of them
tickets) and `--firings` firings of one trigger with a holdout, stored the same in a SQLite
file and in PostgreSQL, then `GET /api/v1/reports`'s computation (`report.live_report`,
`report_pg.live_report`) timed over the last 30 days, the median of 3. Prints JSON: seconds
and events read per second on each store, and whether both gave the same report.

    .venv/bin/python bench/report_pg.py [--events 200000] [--firings 5000] [--pg postgresql://…/postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from forewarn import report, report_pg, store_pg, store_sqlite
from forewarn.dedup import SeenIds
from forewarn.model import event_from_dict, format_time
from forewarn.playbook import parse_playbooks
from forewarn.schema import placeholders
from forewarn.store_sqlite import Append

SERVER = os.environ.get("FOREWARN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DAY_MS = 86_400_000
PER_BATCH = 1_000
TRIGGERS = parse_playbooks(
    [
        (
            "bench.yaml",
            """
triggers:
  - id: trouble
    when: {event: {name: Export Failed}}
    action: {channel: in_app, message: hi}
    holdout: 0.5
    goal: {event: Export Done, within: 1d}
    failure: {event: Ticket Created, within: 3d}
""",
        )
    ]
)
FIRING = (
    f"INSERT INTO firings (workspace, {store_sqlite.FIRING_COLUMNS}, cursor)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _messages(n: int, start_ms: int, now_ms: int) -> list[dict[str, Any]]:
    step = (now_ms - start_ms) // max(n, 1)
    names = ("Feature Used", "Export Failed", "Export Done", "Ticket Created")
    return [
        {
            "type": "track",
            "userId": f"user-{i % 5_000}",
            "event": names[0] if i % 10 < 7 else names[i % 10 - 6],
            "properties": {"feature": "export", "plan": "pro"},
            "context": {"groupId": f"account-{i % 300}"},
            "timestamp": format_time(start_ms + i * step),
            "messageId": str(uuid.uuid4()),
        }
        for i in range(n)
    ]


def _firings(n: int, start_ms: int, now_ms: int) -> list[tuple[Any, ...]]:
    step = (now_ms - start_ms) // max(n, 1)
    return [
        (
            "trouble",
            f"user-{i % 5_000}",
            "user",
            start_ms + i * step,
            "{}",
            "send" if i % 2 else "held_out",
            None,
            "in_app",
            None,
            0,
        )
        for i in range(n)
    ]


def _median_s(job: Any) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(3):
        start = time.perf_counter()
        result = job()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def load(conn: Any, pool: store_pg.Pool, events: int, firings: int, now_ms: int) -> tuple[int, int]:
    """The same events and firings stored in both stores; the workspace of each."""
    start_ms = now_ms - 20 * DAY_MS
    messages = _messages(events, start_ms, now_ms)
    rows = _firings(firings, start_ms, now_ms)
    lite = store_sqlite.ensure_workspace(conn, "bench", now_ms)
    pg = store_pg.ensure_workspace(pool, "bench", now_ms)
    seen = SeenIds()
    for first in range(0, events, PER_BATCH):
        batch = messages[first : first + PER_BATCH]
        ids = [m["messageId"] for m in batch]
        evs = [event_from_dict(m) for m in batch]
        store_sqlite.append_batches(conn, [Append(lite, "t", now_ms, batch, ids, evs)], seen)
        store_pg.append_batches(pool, [Append(pg, "t", now_ms, batch, ids, evs)])
    conn.executemany(FIRING, [(lite, *r) for r in rows])
    with pool.connection() as pg_conn:
        pg_conn.execute("DELETE FROM queue")  # as if applied
        pg_conn.execute("ANALYZE events")  # as autovacuum does after such a load
        with pg_conn.cursor() as cur:
            cur.executemany(placeholders(FIRING), [(pg, *r) for r in rows])
    return lite, pg


def run(url: str, folder: Path, events: int, firings: int) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    conn = store_sqlite.connect(folder / "bench.db")
    pool = store_pg.connect(url)
    try:
        lite, pg = load(conn, pool, events, firings, now_ms)
        with pool.connection() as pg_conn:
            since = now_ms - 30 * DAY_MS
            sqlite_s, want = _median_s(
                lambda: report.live_report(conn, lite, TRIGGERS, since, now_ms)
            )
            pg_s, got = _median_s(
                lambda: report_pg.live_report(pg_conn, pg, TRIGGERS, since, now_ms)
            )
    finally:
        conn.close()
        pool.close()
    return {
        "events": events,
        "firings": firings,
        "sqlite_s": round(sqlite_s, 2),
        "postgresql_s": round(pg_s, 2),
        "sqlite_events_per_s": round(events / sqlite_s),
        "postgresql_events_per_s": round(events / pg_s),
        "same_report": want == got,
        "treated": got["triggers"][0]["treated"],
    }


@contextlib.contextmanager
def scratch(server: str) -> Iterator[tuple[str, Path]]:
    """A new PostgreSQL database on `server` and a folder, both removed afterwards."""
    name = "forewarn_bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with tempfile.TemporaryDirectory() as folder:
            yield server.rsplit("/", 1)[0] + "/" + name, Path(folder)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--firings", type=int, default=5_000)
    parser.add_argument("--pg", default=SERVER)
    args = parser.parse_args()
    with scratch(args.pg) as (url, folder):
        result = run(url, folder, args.events, args.firings)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
