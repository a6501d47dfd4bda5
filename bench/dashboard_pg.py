"""What each dashboard page's reads cost on each store: the events and firings of
`bench/report_pg.py` stored the same in a SQLite file and in PostgreSQL, then each page's
data (`dashboard_data`, `dashboard_more`) read on both, the median of 5 in milliseconds. The
report that the trigger pages also show is timed by `bench/report_pg.py`. Prints JSON.

    .venv/bin/python bench/dashboard_pg.py [--events 200000] [--firings 5000] [--pg postgresql://…/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from forewarn import dashboard_data, dashboard_more, store_pg, store_sqlite
from forewarn.dashboard_store import call
from report_pg import DAY_MS, SERVER, TRIGGERS, load, scratch

PAGES: dict[str, Callable[[Any, int, int], Any]] = {
    "overview 7d": lambda c, w, now: dashboard_data.overview(c, w, now, now - 7 * DAY_MS),
    "overview 30d": lambda c, w, now: dashboard_data.overview(c, w, now, now - 30 * DAY_MS),
    "triggers (per day)": lambda c, w, now: dashboard_data.daily(c, w, now - 7 * DAY_MS, now),
    "trigger": lambda c, w, now: dashboard_data.trigger_detail(
        c, w, TRIGGERS[0], {}, None, now, now - 30 * DAY_MS
    ),
    "customer": lambda c, w, now: dashboard_data.customer(
        c, w, "user-7", [], call(store_sqlite.recent_events, c, w, "user-7", 100)
    ),
    "customers": lambda c, w, now: dashboard_more.recent_customers(c, w),
    "outreach": lambda c, w, now: dashboard_data.outreach(c, w, None, None, None, 200),
    "outbox": lambda c, w, now: dashboard_more.outbox(c, w, now),
    "settings": lambda c, w, now: dashboard_more.settings_view(c, w),
}


def _median_ms(job: Callable[[], Any]) -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        job()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def run(url: str, folder: Path, events: int, firings: int) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    conn = store_sqlite.connect(folder / "bench.db")
    pool = store_pg.connect(url)
    try:
        lite, pg = load(conn, pool, events, firings, now_ms)
        with pool.connection() as pg_conn:
            pages = {
                name: {
                    "sqlite_ms": _median_ms(partial(page, conn, lite, now_ms)),
                    "postgresql_ms": _median_ms(partial(page, pg_conn, pg, now_ms)),
                }
                for name, page in PAGES.items()
            }
    finally:
        conn.close()
        pool.close()
    return {"events": events, "firings": firings, "pages": pages}


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
