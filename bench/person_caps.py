"""What a user's caps across partitions cost the scale-out worker: before a partition decides
for users, it takes their locks and reads their outreach from every partition's firings
(`history_pg.take`: two statements per partition and step with user-scoped firings).

`--users` users, each in two of `--accounts` accounts, send `--events` events in both, half
of them firing a user-scoped trigger (an in-app message); one worker applies them all, in
steps as in production. Run twice on fresh databases: as Forewarn runs, with the time spent
inside `take` measured, and with `take` replaced by nothing (each partition deciding from its
own history alone, as before), for the difference. Prints JSON: per firing, the time inside
`take` and the difference in the worker's total time; events per second both ways.
`--events-per-step 2000` is a worker working off a backlog (many firings per partition and
step share the two statements); `--events-per-step 64`, one keeping up (about one event per
partition and step).

    .venv/bin/python bench/person_caps.py [--events 20000] [--events-per-step 2000] [--pg URL]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg

from forewarn import history_pg, store_pg
from forewarn.model import event_from_dict
from forewarn.playbook import parse_playbooks
from forewarn.store_sqlite import Append
from forewarn.worker import Worker

SERVER = os.environ.get("FOREWARN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PER_BATCH = 1_000
PLAYBOOK = """
triggers:
  - id: limit-hit
    when: {event: {name: Limit Hit}}
    action: {channel: in_app, message: You hit a limit}
"""
T0_MS = 1_767_571_200_000  # 2026-01-05T00:00:00Z


def _messages(events: int, users: int, accounts: int) -> list[dict[str, Any]]:
    rng = random.Random(1)
    pairs = [rng.sample(range(accounts), 2) for _ in range(users)]
    out = []
    for i in range(events):
        user = rng.randrange(users)
        out.append(
            {
                "type": "track",
                "userId": f"user-{user}",
                "event": "Limit Hit" if i % 2 else "Feature Used",
                "properties": {},
                "context": {"groupId": f"account-{rng.choice(pairs[user])}"},
                "timestamp": _iso(T0_MS + i * 10_000),
                "messageId": str(uuid.uuid4()),
            }
        )
    return out


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def _database(server: str) -> str:
    name = "forewarn_bench_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return server.rsplit("/", 1)[0] + "/" + name


def _drop(server: str, url: str) -> None:
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def run(
    messages: list[dict[str, Any]], measure: bool, server: str, per_step: int
) -> dict[str, Any]:
    url = _database(server)
    original = history_pg.take
    inside = [0.0, 0]

    def timed(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            original(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - start
            inside[1] += 1

    def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    replacement: Callable[..., None] = timed if measure else nothing
    try:
        pool = store_pg.connect(url)
        try:
            ws = store_pg.ensure_workspace(pool, "bench", T0_MS)
            for start in range(0, len(messages), PER_BATCH):
                batch = messages[start : start + PER_BATCH]
                ids = [m["messageId"] for m in batch]
                evs = [event_from_dict(m) for m in batch]
                received = T0_MS + len(messages) * 10_000
                store_pg.append_batches(pool, [Append(ws, "segment", received, batch, ids, evs)])
            triggers = parse_playbooks([("bench.yaml", PLAYBOOK)])
            worker = Worker(pool, ws, triggers, events_per_step=per_step)
            worker.register(T0_MS)
            history_pg.take = replacement
            start_s = time.perf_counter()
            done = worker.run_until_idle(0)
            took_s = time.perf_counter() - start_s
        finally:
            history_pg.take = original
            pool.close()
    finally:
        _drop(server, url)
    result = {
        "events": done.events,
        "firings": done.firings,
        "seconds": round(took_s, 3),
        "events_per_s": round(done.events / took_s),
        "us_per_firing": round(took_s / done.firings * 1e6, 1),
    }
    if measure:
        result |= {
            "take_calls": inside[1],
            "take_seconds": round(inside[0], 3),
            "take_us_per_firing": round(inside[0] / done.firings * 1e6, 1),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument(
        "--events-per-step",
        type=int,
        default=2_000,
        help="a worker working off a backlog claims 2,000; one keeping up, a few per partition",
    )
    parser.add_argument("--pg", default=SERVER)
    args = parser.parse_args()
    messages = _messages(args.events, args.users, args.accounts)
    with_read = run(messages, True, args.pg, args.events_per_step)
    without = run(messages, False, args.pg, args.events_per_step)
    print(
        json.dumps(
            {
                "bench": "person_caps",
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "users": args.users,
                "accounts": args.accounts,
                "events_per_step": args.events_per_step,
                "with_cross_partition_history": with_read,
                "each_partition_alone": without,
                "extra_us_per_firing": round(
                    with_read["us_per_firing"] - without["us_per_firing"], 1
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
