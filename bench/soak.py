"""Soak: a real `forewarn serve` under a steady ingest load for minutes; prints JSON.

A load generator in another process sends Segment `/v1/batch` requests of 100 events on a
fixed schedule (open loop) at `--rate` events/s for `--seconds`, every event with a message id
of its own, from a fixed population of 5,000 users in 300 accounts, over keep-alive
connections. Every `--sample` seconds the resident memory (RSS) of the server and of its engine
process is read from /proc. The verdict:

- `errors`: answers other than 200, and connection failures: must be 0;
- `memory_growth`: RSS (server + engine) over the last minute against the minute after the
  warm-up: must stay within 10%. The warm-up is twice the message-id dedup's memory window
  (`dedup.MEMORY_MS`, ids of the last minutes, plus the minute filling and the one leaving;
  older ones are on disk): the window is full after one, but the dicts of the id map reach
  their lasting size only once each has grown again with ids leaving as many arrive, which
  takes up to one more window (a dict that loses entries keeps their places until it grows,
  and then sizes itself for three times what it holds);
- `ack_ms_p99` per minute: that the tail does not creep up.

    .venv/bin/python bench/soak.py                       # 15 minutes at 30,000 events/s
    .venv/bin/python bench/soak.py --seconds 60 --rate 5000     # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from forewarn import dedup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_load

BATCH = http_load.BATCH
PAGE = os.sysconf("SC_PAGE_SIZE")


TEMPLATES = 64
WARM_UP_S = 2 * (dedup.MEMORY_MS / 1000 + 120)


def _templates() -> list[bytes]:
    """Request bodies over a fixed population (5,000 users in 300 accounts, as in
    http_load), their message ids a placeholder to fill per request: the load brings new
    events, not an ever-growing number of customers."""
    out = []
    for body in http_load.bodies(TEMPLATES, "soak"):
        data = json.loads(body)
        for i, message in enumerate(data["batch"]):
            message["messageId"] = f"soak-@@-{i}"
        out.append(json.dumps(data).encode())
    return out


async def _load(port: int, rate: float, seconds: float, connections: int) -> dict[str, Any]:
    templates = _templates()
    interval = BATCH / rate
    total = int(seconds / interval)
    queue: asyncio.Queue[tuple[int, float]] = asyncio.Queue(maxsize=connections * 64)
    minutes: dict[int, list[float]] = {}
    codes: dict[str, int] = {}
    start = time.perf_counter()

    async def worker() -> None:
        reader = writer = None
        while True:
            n, due = await queue.get()
            if n < 0:
                break
            body = templates[n % TEMPLATES].replace(b"@@", str(n).encode())
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert reader is not None
                code = await http_load._send(reader, writer, http_load._request(port, body))
                key = str(code)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                key = type(exc).__name__
                if writer is not None:
                    writer.close()
                reader = writer = None
            codes[key] = codes.get(key, 0) + 1
            latency = (time.perf_counter() - due) * 1000
            minutes.setdefault(int((due - start) // 60), []).append(latency)
        if writer is not None:
            writer.close()

    tasks = [asyncio.create_task(worker()) for _ in range(connections)]
    for n in range(total):
        due = start + n * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await queue.put((n, due))
    for _ in tasks:
        await queue.put((-1, 0.0))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    per_minute = []
    for minute in sorted(minutes):
        lat = sorted(minutes[minute])
        per_minute.append(
            {
                "minute": minute,
                "requests": len(lat),
                "ack_ms_p50": round(lat[len(lat) // 2], 1),
                "ack_ms_p99": round(lat[int(len(lat) * 0.99)], 1),
            }
        )
    return {
        "requests": total,
        "events_per_s": round(codes.get("200", 0) * BATCH / elapsed),
        "answers": codes,
        "per_minute": per_minute,
    }


def _generator(port: int, rate: float, seconds: float, connections: int, out: Any) -> None:
    out.put(asyncio.run(_load(port, rate, seconds, connections)))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1e6


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(c) for c in task.read_text().split()]
    return out


def run(rate: float, seconds: float, connections: int, sample_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "soak.db"
        port = http_load._free_port()
        server = http_load.serve(db, port)
        samples: list[dict[str, float]] = []
        try:
            http_load._wait(port)
            ctx = multiprocessing.get_context("spawn")
            out = ctx.Queue()
            gen = ctx.Process(target=_generator, args=(port, rate, seconds, connections, out))
            gen.start()
            t0 = time.monotonic()
            while gen.is_alive() and out.empty():
                pids = [server.pid, *_children(server.pid)]
                samples.append(
                    {
                        "s": round(time.monotonic() - t0, 1),
                        "server_mb": round(_rss_mb(pids[0]), 1),
                        "engine_mb": round(sum(_rss_mb(p) for p in pids[1:]), 1),
                    }
                )
                time.sleep(sample_s)
            load = out.get()
            gen.join()
            db_mb = round(sum(f.stat().st_size for f in Path(tmp).glob("soak.db*")) / 1e6, 1)
        finally:
            server.terminate()
            server.wait(timeout=60)
    return {"load": load, "memory": samples, "database_mb": db_mb}


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    samples = result["memory"]

    def mean_total(lo: float, hi: float) -> float | None:
        window = [m["server_mb"] + m["engine_mb"] for m in samples if lo <= m["s"] < hi]
        return sum(window) / len(window) if window else None

    end = samples[-1]["s"] if samples else 0.0
    warm = WARM_UP_S
    after_warm_up = mean_total(warm, warm + 60)
    last_minute = mean_total(max(warm, end - 60), end + 1)
    growth = (
        round(last_minute / after_warm_up - 1, 4)
        if after_warm_up and last_minute and end >= warm + 180
        else None
    )
    answers = result["load"]["answers"]
    errors = sum(n for code, n in answers.items() if code != "200")
    return {
        "errors": errors,
        "warm_up_s": warm,
        "memory_after_warm_up_mb": None if after_warm_up is None else round(after_warm_up, 1),
        "memory_last_minute_mb": None if last_minute is None else round(last_minute, 1),
        "memory_growth": growth,
        "met": {
            "no_errors": errors == 0,
            "memory_flat_within_10pct": None if growth is None else abs(growth) <= 0.10,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=30_000, help="events/s (default 30000)")
    parser.add_argument("--seconds", type=float, default=900, help="how long (default 900)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    args = parser.parse_args()
    result = run(args.rate, args.seconds, args.connections, args.sample)
    out = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "rate": args.rate,
        "seconds": args.seconds,
        **result,
        "verdict": verdict(result),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
