"""How long each dashboard page's data takes: a real `forewarn serve` fed with a simulated world
(example playbooks), then every JSON twin fetched a few times. Prints JSON: the world's size and,
per page, the median and the slowest answer in milliseconds.

    .venv/bin/python bench/dashboard.py --accounts 200 --days 30 --trials 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import server as srv
from tests import world

PAGES = (
    "/overview.json",
    "/overview.json?since=30d",
    "/triggers.json",
    "/triggers.json?since=30d",
    "/triggers/payment-failed.json?since=30d",
    "/customers.json",
    "/outreach.json",
    "/outbox.json",
    "/settings.json",
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    world.ACCOUNTS, world.DAYS = args.accounts, args.days
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        live = world.serve_world(Path(folder))
        fed_s = time.perf_counter() - started
        try:
            headers = {"Authorization": f"Bearer {srv.ADMIN_KEY}"}
            firings = live.firings(limit=10_000)
            subject = firings[0]["subject"]
            pages = (*PAGES, f"/customers/{subject}.json?why=payment-failed")
            results = {}
            with httpx.Client(base_url=live.url, headers=headers, timeout=120) as http:
                for path in pages:
                    times = []
                    for _ in range(args.trials):
                        t = time.perf_counter()
                        http.get(path).raise_for_status()
                        times.append((time.perf_counter() - t) * 1000)
                    results[path] = {
                        "median_ms": round(statistics.median(times), 1),
                        "max_ms": round(max(times), 1),
                    }
            events = int(live.metric("forewarn_events_accepted_total"))
        finally:
            srv.stop(live)
    out = {
        "accounts": args.accounts,
        "days": args.days,
        "events": events,
        "firings": len(firings),
        "feed_s": round(fed_s, 1),
        "pages": results,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
