"""What pruning the scale-out tables costs on PostgreSQL: `--events` applied events past the
window, `--parts` partition states no worker will use again (half made under older
playbooks, half empty) and as many homes of people with no state left, deleted by
`pruning.prune` runs until none is left. Prints JSON: rows deleted per second, and the
longest single transaction (what a batch holds its locks for).

The events are stored through the ingest path and then taken out of the queue directly, as
if applied (the engine is not what is measured here).

    .venv/bin/python bench/pruning.py [--events 200000] [--parts 50000] [--pg postgresql://…/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import uuid
from typing import Any

import psycopg

from forewarn import partition, pruning, store_pg
from forewarn.model import event_from_dict
from forewarn.signals import NEVER
from forewarn.store_sqlite import Append

SERVER = os.environ.get("FOREWARN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DAY_MS = 86_400_000
PER_BATCH = 1_000


def _messages(n: int) -> list[dict[str, Any]]:
    return [
        {
            "type": "track",
            "userId": f"user-{i % 5_000}",
            "event": "Feature Used",
            "properties": {"feature": "export", "plan": "pro"},
            "context": {"groupId": f"account-{i % 300}"},
            "timestamp": "2026-11-01T10:00:00.000Z",
            "messageId": str(uuid.uuid4()),
        }
        for i in range(n)
    ]


def run(url: str, events: int, parts: int) -> dict[str, Any]:
    pool = store_pg.connect(url)
    now_ms = int(time.time() * 1000)
    try:
        ws = store_pg.ensure_workspace(pool, "bench", now_ms)
        for start in range(0, events, PER_BATCH):
            batch = _messages(min(PER_BATCH, events - start))
            ids = [m["messageId"] for m in batch]
            evs = [event_from_dict(m) for m in batch]
            append = Append(ws, "segment", now_ms - 8 * DAY_MS, batch, ids, evs)
            store_pg.append_batches(pool, [append])
        empty = partition.PartState(None, 0, {}, {}, {}, {}, {}, [])
        with pool.connection() as conn:
            conn.execute("DELETE FROM queue")  # as if applied
            conn.execute(  # the people of half the events' accounts have homes to prune
                "INSERT INTO homes (workspace, person, account)"
                " SELECT %s, 'person-' || i, 'gone-' || (i %% 300) FROM generate_series(1, %s) i",
                (ws, parts),
            )
            conn.execute("INSERT INTO playbook_generations VALUES (%s, 1, 'old', 0)", (ws,))
            conn.execute("INSERT INTO playbook_generations VALUES (%s, 2, 'new', 0)", (ws,))
            conn.execute(
                "INSERT INTO parts (workspace, part, state, due_ms, playbooks)"
                " SELECT %s, 'user:u' || i, %s, %s, CASE WHEN i %% 2 = 0 THEN 'old' ELSE 'new' END"
                " FROM generate_series(1, %s) AS i",
                (ws, partition.encode(empty), NEVER, parts),
            )
        start_s = time.perf_counter()
        deleted = pruning.Pruned()
        runs = 0
        while True:
            done = pruning.prune(pool, ws, now_ms, 7 * DAY_MS)
            runs += 1
            deleted.events += done.events
            deleted.parts += done.parts
            deleted.homes += done.homes
            deleted.batches += done.batches
            deleted.longest_s = max(deleted.longest_s, done.longest_s)
            if not done.events and not done.parts and not done.homes:
                break
        elapsed = time.perf_counter() - start_s
        with pool.connection() as conn:
            left = conn.execute("SELECT count(*) FROM events").fetchone()
    finally:
        pool.close()
    return {
        "events_deleted": deleted.events,
        "parts_deleted": deleted.parts,
        "homes_deleted": deleted.homes,
        "events_left": int(left[0]) if left else -1,
        "runs": runs,
        "seconds": round(elapsed, 2),
        "rows_per_s": round((deleted.events + deleted.parts + deleted.homes) / elapsed),
        "transactions": deleted.batches,
        "longest_transaction_s": round(deleted.longest_s, 3),
        "batch_rows": pruning.BATCH,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--parts", type=int, default=50_000)
    parser.add_argument("--pg", default=SERVER)
    args = parser.parse_args()
    name = "forewarn_bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        result = run(args.pg.rsplit("/", 1)[0] + "/" + name, args.events, args.parts)
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
