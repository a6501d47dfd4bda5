"""Scale-out, end to end, in one run: events per second from the first Segment request to the
last event applied (firings, decisions and outbox rows committed), on

- embedded SQLite: one `forewarn serve` (its engine in a process of its own);
- PostgreSQL: one `forewarn serve --role api` and 1, 2 and 4 `forewarn serve --role worker`.

The load is the same for each: `/v1/batch` requests of 100 events (bench/http_load.py's
bodies: ~300 accounts, page views, logins, feature use, identify calls) sent as fast as the
API answers on a few keep-alive connections. `ack_events_per_s` is how fast requests were
acknowledged; `end_to_end_events_per_s`, events over the time until the last was applied;
`drain_events_per_s` (PostgreSQL), the workers alone working off the same load accepted while
they were stopped (from their start, so their start-up counts).
Everything shares this machine's cores: the load generator, the API, the workers and the
database.

    .venv/bin/python bench/scaleout.py [--requests 300] [--pg postgresql://…/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_load

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = ROOT / "examples" / "playbooks"
SERVER = os.environ.get("FOREWARN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "FOREWARN_WRITE_KEY": http_load.WRITE_KEY,
        "FOREWARN_ADMIN_KEY": http_load.ADMIN_KEY,
        "FOREWARN_RATE_LIMIT": "1000000000",
        "FOREWARN_DELIVERY": "off",
        **extra,
    }


def _serve(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "forewarn", "serve", "--playbooks", str(PLAYBOOKS), *args],
        env=env,
        stdout=subprocess.DEVNULL,
    )


def _load(port: int, requests: int, connections: int) -> tuple[dict[str, Any], int]:
    run = uuid.uuid4().hex[:6]
    reqs = [http_load._request(port, b) for b in http_load.bodies(requests, run)]
    result = asyncio.run(http_load._generate(port, reqs, None, connections))
    result.pop("sent_ms")
    return result, requests * http_load.BATCH


def _measure(
    port: int, requests: int, connections: int, applied: Any, timeout_s: float = 600
) -> dict[str, Any]:
    http_load._wait(port)
    start = time.perf_counter()
    result, events = _load(port, requests, connections)
    deadline = time.monotonic() + timeout_s
    while not applied(events):
        if time.monotonic() > deadline:
            raise RuntimeError("the events were not all applied in time")
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    return {
        "events": events,
        "ack_events_per_s": result["acknowledged_events_per_s"],
        "end_to_end_events_per_s": round(events / elapsed),
        "seconds": round(elapsed, 2),
        "status": result["status"],
    }


def sqlite_run(requests: int, connections: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        port = http_load._free_port()
        server = _serve(["--db", str(db), "--port", str(port)], _env({}))

        def applied(events: int) -> bool:
            try:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
                try:
                    end = conn.execute("SELECT coalesce(max(id), 0) FROM batches").fetchone()[0]
                    row = conn.execute("SELECT cursor FROM engine").fetchone()
                    stored = conn.execute("SELECT coalesce(sum(count), 0) FROM batches")
                    return bool(row and row[0] >= end and stored.fetchone()[0] >= events)
                finally:
                    conn.close()
            except sqlite3.Error:
                return False

        try:
            return _measure(port, requests, connections, applied)
        finally:
            server.terminate()
            server.wait(timeout=30)


def pg_run(workers: int, requests: int, connections: int) -> dict[str, Any]:
    name = "forewarn_bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(SERVER, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = SERVER.rsplit("/", 1)[0] + "/" + name
    env = _env({"FOREWARN_DATABASE_URL": url})
    processes: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(
            [sys.executable, "-m", "forewarn", "migrate"], env=env, check=True, capture_output=True
        )
        port = http_load._free_port()
        processes.append(_serve(["--role", "api", "--port", str(port)], env))
        processes += [_serve(["--role", "worker"], env) for _ in range(workers)]
        watch = psycopg.connect(url, autocommit=True)

        def applied(events: int) -> bool:
            stored = watch.execute("SELECT count(*) FROM events").fetchone()
            queued = watch.execute("SELECT count(*) FROM queue").fetchone()
            return bool(stored and queued and stored[0] >= events and queued[0] == 0)

        try:
            result = _measure(port, requests, connections, applied)
            row = watch.execute("SELECT count(*) FROM firings").fetchone()
            result["firings"] = row[0] if row else 0
            # the workers alone: a backlog accepted while they were stopped, then drained
            for p in processes[1:]:
                p.terminate()
                p.wait(timeout=30)
            _, events = _load(port, requests, connections)
            start = time.perf_counter()
            processes[1:] = [_serve(["--role", "worker"], env) for _ in range(workers)]
            total = result["events"] + events
            deadline = time.monotonic() + 600
            while not applied(total):
                if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                    raise RuntimeError("the workers stopped or did not drain the backlog in time")
                time.sleep(0.05)
            result["drain_events_per_s"] = round(events / (time.perf_counter() - start))
            return result
        finally:
            watch.close()
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=30)
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300, help="requests of 100 events each")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--workers", default="1,2,4", help="worker counts on PostgreSQL")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "requests": args.requests,
        "batch_events": http_load.BATCH,
        "sqlite": sqlite_run(args.requests, args.connections),
    }
    for n in [int(w) for w in args.workers.split(",")]:
        results[f"postgresql_{n}_workers"] = pg_run(n, args.requests, args.connections)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
