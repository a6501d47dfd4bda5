"""What privacy costs: forgetting one person in a log of `--events` events (the byte search over
the whole log, the rewrite of the batches holding them, the deletes), and the log's append
rate with no one forgotten against `--forgotten` people forgotten (every event's ids hashed
and looked up). Prints JSON.

    .venv/bin/python bench/privacy.py
    .venv/bin/python bench/privacy.py --events 100000 --forgotten 1000   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from forewarn import privacy, store_sqlite
from forewarn.dedup import SeenIds
from forewarn.forgotten import Forgotten, subject_hash
from forewarn.store_sqlite import Append

PER_BATCH = 100
USERS = 10_000


def _batch(i: int, received_ms: int) -> Append:
    messages: list[dict[str, Any]] = [
        {
            "type": "track",
            "userId": f"user-{(i * PER_BATCH + j) % USERS}",
            "event": "Feature Used",
            "properties": {"feature": "export", "plan": "pro"},
            "timestamp": "2026-11-23T10:00:00.000Z",
            "messageId": str(uuid.uuid4()),
        }
        for j in range(PER_BATCH)
    ]
    return Append(1, "segment", received_ms, messages, [str(m["messageId"]) for m in messages])


def _fill(db: Path, events: int, forgotten: Forgotten | None) -> float:
    """Append the events, 10 requests per transaction; returns events per second."""
    conn = store_sqlite.connect(db)
    store_sqlite.ensure_workspace(conn, "default", 0)
    seen = SeenIds()
    batches = [_batch(i, 1_000 + i) for i in range(events // PER_BATCH)]
    started = time.perf_counter()
    for k in range(0, len(batches), 10):
        store_sqlite.append_batches(conn, batches[k : k + 10], seen, forgotten)
    seconds = time.perf_counter() - started
    conn.close()
    return events / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--forgotten", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "privacy.db"
        plain = _fill(db, args.events, None)
        conn = store_sqlite.connect(db)
        started = time.perf_counter()
        done = privacy.forget(conn, 1, "user-42", "bench", 2)
        forget_s = time.perf_counter() - started
        size_mb = db.stat().st_size / 1e6
        conn.close()
        checked = _fill(Path(tmp) / "checked.db", args.events, None)
        # the same appends with a list of forgotten people (who send nothing any more) in force
        other = Path(tmp) / "forgotten.db"
        conn = store_sqlite.connect(other)
        with store_sqlite.transaction(conn):
            for n in range(args.forgotten):
                conn.execute(
                    "INSERT INTO forgotten (workspace, hash, at_ms) VALUES (1, ?, 3)",
                    (subject_hash(1, f"gone-{n}"),),
                )
        conn.close()
        with_list = _fill(other, args.events, Forgotten())
    result: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "events": args.events,
        "log_mb": round(size_mb, 1),
        "forget": {
            "seconds": round(forget_s, 2),
            "events_removed": done.events,
            "batches_rewritten": done.batches,
        },
        "append_events_per_s": {
            "no_one_forgotten": round(max(plain, checked)),
            f"{args.forgotten}_forgotten": round(with_list),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
