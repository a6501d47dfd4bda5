"""What the event log's indexes for the admin API's timelines (by person, by partition; schema
version 9) cost an API process's commits on PostgreSQL: `store_pg.append_batches` alone, no
HTTP, 4 requests of 100 events per transaction (as the API's writer groups them), into a
fresh database, with the two indexes and without them, in alternating rounds on the same
machine. Prints JSON: events per second of each round, and the medians.

With `--forget-check`, the rounds compare instead each commit's check of the workspace's
forgotten people (schema version 11: a lock and a lookup per transaction, and a hash per
person), with 1,000 people forgotten, against the same commits without it.

    .venv/bin/python bench/pg_append.py [--requests 400] [--rounds 5] [--forget-check]
        [--pg postgresql://…/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from typing import Any

import psycopg

from forewarn import store_pg
from forewarn.forgotten import Forgotten, subject_hash
from forewarn.model import event_from_dict
from forewarn.store_sqlite import Append

SERVER = os.environ.get("FOREWARN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
INDEXES = {
    "events_person": "CREATE INDEX events_person ON events (workspace, person, part, id)",
    "events_part": "CREATE INDEX events_part ON events (workspace, part, id)",
}


def requests(n: int) -> list[list[dict[str, Any]]]:
    """`n` requests of 100 track events: 3,000 users in 300 accounts."""
    out = []
    for i in range(n):
        out.append(
            [
                {
                    "type": "track",
                    "userId": f"user-{(i * 13 + j) % 3000}",
                    "event": "Feature Used",
                    "context": {"groupId": f"account-{(i * 7 + j) % 300}"},
                    "properties": {"feature": f"f{j % 20}"},
                    "messageId": str(uuid.uuid4()),
                    "timestamp": "2026-11-24T09:00:00Z",
                }
                for j in range(100)
            ]
        )
    return out


def one_round(pool: store_pg.Pool, ws: int, indexed: bool, n: int) -> float:
    with pool.connection() as conn:
        conn.execute("TRUNCATE events, queue, homes")
        for name, create in INDEXES.items():
            conn.execute(f"DROP INDEX IF EXISTS {name}")
            if indexed:
                conn.execute(create)
    load = [
        Append(ws, "segment", 0, r, [m["messageId"] for m in r], [event_from_dict(m) for m in r])
        for r in requests(n)
    ]
    start = time.perf_counter()
    for i in range(0, len(load), 4):
        store_pg.append_batches(pool, load[i : i + 4])
    return n * 100 / (time.perf_counter() - start)


def forget_check(pool: store_pg.Pool, ws: int, n_rounds: int, n: int) -> dict[str, list[float]]:
    """Rounds with the check of forgotten people, and with it replaced by an empty list."""
    with pool.connection() as conn:
        for i in range(1_000):
            conn.execute(
                "INSERT INTO forgotten (workspace, hash, at_ms) VALUES (%s, %s, 0)",
                (ws, subject_hash(ws, f"gone-{i}")),
            )
    checked = store_pg._forgotten_in
    rounds: dict[str, list[float]] = {"with_check": [], "without_check": []}
    try:
        for _ in range(n_rounds):
            for on in (True, False):
                store_pg._forgotten_in = checked if on else (lambda *_: Forgotten())
                key = "with_check" if on else "without_check"
                rounds[key].append(round(one_round(pool, ws, True, n)))
    finally:
        store_pg._forgotten_in = checked
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="requests of 100 events")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pg", default=SERVER, help="a server where a database may be made")
    parser.add_argument(
        "--forget-check", action="store_true", help="compare commits with and without it"
    )
    args = parser.parse_args()
    name = "forewarn_bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        pool = store_pg.connect(args.pg.rsplit("/", 1)[0] + "/" + name)
        try:
            ws = store_pg.ensure_workspace(pool, "default", 0)
            if args.forget_check:
                rounds = forget_check(pool, ws, args.rounds, args.requests)
            else:
                rounds = {"with_indexes": [], "without_indexes": []}
                for _ in range(args.rounds):
                    for indexed in (True, False):
                        key = "with_indexes" if indexed else "without_indexes"
                        rounds[key].append(round(one_round(pool, ws, indexed, args.requests)))
        finally:
            pool.close()
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(
        json.dumps(
            {
                "events_per_round": args.requests * 100,
                "events_per_s": rounds,
                "median_events_per_s": {k: statistics.median(v) for k, v in rounds.items()},
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
