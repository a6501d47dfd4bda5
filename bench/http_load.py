"""The HTTP half of bench/ingest.py: a real `forewarn serve`, and a load generator in another
process sending Segment `/v1/batch` requests of 100 events over keep-alive connections.

Two runs against one server each:

- `at_rate`: requests sent on a fixed schedule (open loop) at `--rate` events/s, so latency is
  measured as a client sending at that rate sees it, not inflated by the generator waiting;
- `max`: as fast as the server answers, on `--connections` connections (closed loop).

and, as the physical reference on the same server and connections, `noop`: `GET /healthz`
(routing and the HTTP stack, no parsing, no storage) as fast as it answers.

A p99 is usually made by a few episodes, not by every request being a little slow: each run
also reports its `slow_episodes`, the stretches of `WINDOW_S` windows in which some answer took
longer than `SLOW_MS` (when, for how long, the worst answer), and how idle the machine's cores
were and how much time the hypervisor took from them (`cpu`, from /proc/stat, on Linux), so
that a run on a busy or noisy machine can be told from a regression.

Each event carries its `timestamp` and each batch its `sentAt`, as the Segment libraries send
them. Each batch carries one `Payment Failed` for an account of its own, so each batch makes one
firing; event→firing latency is when the firing was recorded minus when its event was received.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "fw_wk_bench-write-key-0123456789"
ADMIN_KEY = "fw_ak_bench-admin-key-0123456789"
BATCH = 100
SLOW_MS = 50.0  # the acknowledgement target
WINDOW_S = 0.25


def bodies(count: int, run: str) -> list[bytes]:
    out = []
    made = int(time.time() * 1000)
    for b in range(count):
        events: list[dict[str, Any]] = [
            {
                "type": "track",
                "event": "Payment Failed",
                "userId": f"{run}-u{b}",
                "context": {"groupId": f"{run}-acc{b}"},
                "messageId": str(uuid.uuid4()),
            }
        ]
        for i in range(1, BATCH):
            user = f"{run}-u{(b * 7 + i) % 5000}"
            kind = i % 4
            if kind == 0:
                events.append(
                    {"type": "page", "name": "Docs", "properties": {"path": "/docs/start"}}
                )
            elif kind == 1:
                events.append({"type": "track", "event": "Login"})
            elif kind == 2:
                events.append(
                    {"type": "track", "event": "Feature Used", "properties": {"feature": "reports"}}
                )
            else:
                events.append({"type": "identify", "traits": {"plan": "pro", "seats": i}})
            events[-1].update(
                {
                    "userId": user,
                    "messageId": str(uuid.uuid4()),
                    "context": {
                        "groupId": f"{run}-acc{i % 300}",
                        "library": {"name": "analytics-python", "version": "2.4.0"},
                    },
                }
            )
        # as analytics-python sends them: each event's own time, the batch's send time; the
        # server times an event by their difference, so a body sent long after it was made
        # still holds events of a moment ago
        for j, event in enumerate(events):
            event["timestamp"] = _iso(made - 1_000 + j)
        out.append(json.dumps({"batch": events, "sentAt": _iso(made)}).encode())
    return out


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _request(port: int, body: bytes) -> bytes:
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    head = (
        f"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Basic {auth}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def _generate(
    port: int, reqs: list[bytes], rate: float | None, connections: int
) -> dict[str, Any]:
    latencies: list[float] = []
    timed: list[tuple[float, float]] = []  # (due, seconds after the start; latency, ms)
    codes: dict[int, int] = {}
    sent_ms: list[float] = [0.0] * len(reqs)  # wall clock, to compare with the server's
    queue: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    start = time.perf_counter()
    if rate is None:
        for i in range(len(reqs)):
            queue.put_nowait((i, 0.0))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while True:
            try:
                i, due = queue.get_nowait() if rate is None else await queue.get()
            except asyncio.QueueEmpty:
                break
            if i < 0:
                break
            sent = time.perf_counter()
            sent_ms[i] = time.time() * 1000
            code = await _send(reader, writer, reqs[i])
            done = time.perf_counter()
            # open loop: latency counts from when the request was due, queueing included
            latency = (done - (due or sent)) * 1000
            latencies.append(latency)
            timed.append(((due or sent) - start, latency))
            codes[code] = codes.get(code, 0) + 1
        writer.close()

    tasks = [asyncio.create_task(worker()) for _ in range(connections)]
    if rate is not None:
        interval = BATCH / rate
        for i in range(len(reqs)):
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((i, due))
        for _ in tasks:
            queue.put_nowait((-1, 0.0))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    latencies.sort()
    ok = codes.get(200, 0)
    return {
        "requests": len(reqs),
        "status": {str(k): v for k, v in sorted(codes.items())},
        "acknowledged_events_per_s": round(ok * BATCH / elapsed),
        "seconds": round(elapsed, 2),
        "ack_ms_p50": round(latencies[len(latencies) // 2], 1),
        "ack_ms_p99": round(latencies[int(len(latencies) * 0.99)], 1),
        "ack_ms_max": round(latencies[-1], 1),
        "slow_episodes": slow_episodes(timed),
        "sent_ms": sent_ms,
    }


def slow_episodes(timed: list[tuple[float, float]], most: int = 10) -> dict[str, Any]:
    """Runs of consecutive `WINDOW_S` windows each holding an answer slower than `SLOW_MS`:
    how many, and the `most` worst (start and length in seconds, worst answer, answers)."""
    worst: dict[int, float] = {}
    count: dict[int, int] = {}
    for at, latency in timed:
        w = int(at / WINDOW_S)
        worst[w] = max(worst.get(w, 0.0), latency)
        count[w] = count.get(w, 0) + 1
    runs: list[list[int]] = []  # consecutive slow windows
    for w in sorted(w for w, latency in worst.items() if latency > SLOW_MS):
        if runs and runs[-1][-1] == w - 1:
            runs[-1].append(w)
        else:
            runs.append([w])
    episodes = [
        {
            "at_s": round(run[0] * WINDOW_S, 2),
            "seconds": round(len(run) * WINDOW_S, 2),
            "max_ms": round(max(worst[w] for w in run), 1),
            "requests": sum(count[w] for w in run),
        }
        for run in runs
    ]
    slow_s = sum(e["seconds"] for e in episodes)
    return {
        "over_ms": SLOW_MS,
        "count": len(episodes),
        "seconds": round(slow_s, 2),
        "worst": sorted(episodes, key=lambda e: -e["max_ms"])[:most],
    }


def _cpu_ticks() -> list[int] | None:
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def _cpu_between(before: list[int] | None, after: list[int] | None) -> dict[str, float] | None:
    """Idle and stolen time between two readings, in cores (of all the machine's)."""
    if before is None or after is None:
        return None
    d = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(d) or 1
    cores = os.cpu_count() or 1
    steal = d[7] if len(d) > 7 else 0
    return {
        "cores": cores,
        "idle": round(cores * d[3] / total, 2),
        "steal": round(cores * steal / total, 3),
    }


def _generator(port: int, count: int, run: str, rate: float | None, conns: int, out: Any) -> None:
    if run == "noop":
        reqs = [f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()] * count
    else:
        reqs = [_request(port, b) for b in bodies(count, run)]
    out.put("ready")
    # no cycle collection while timing: a full pass over the generator's own lists (52 ms in a
    # 120-s run) stalls its schedule, and the requests due meanwhile count it as the server's
    # latency; the process makes little cyclic garbage and exits after the run
    gc.collect()
    gc.disable()
    out.put(asyncio.run(_generate(port, reqs, rate, conns)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _firing_latency(
    db: Path, run: str, sent_ms: list[float], timeout_s: float = 60
) -> dict[str, Any]:
    """Firing recorded minus its event sent, per batch (each batch's account fires once)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    deadline = time.monotonic() + timeout_s
    rows: list[tuple[str, int]] = []
    while time.monotonic() < deadline:
        rows = conn.execute(
            "SELECT subject, recorded_ms FROM firings WHERE trig = 'payment-failed'"
            " AND subject LIKE ?",
            (f"{run}-%",),
        ).fetchall()
        if len(rows) >= len(sent_ms):
            break
        time.sleep(0.2)
    conn.close()
    prefix = f"{run}-acc"
    lags = sorted(recorded - sent_ms[int(subject[len(prefix) :])] for subject, recorded in rows)
    if not lags:
        return {"firings": 0}
    return {
        "firings": len(lags),
        "expected": len(sent_ms),
        "event_to_firing_ms_p50": round(lags[len(lags) // 2], 1),
        "event_to_firing_ms_p99": round(lags[int(len(lags) * 0.99)], 1),
        "event_to_firing_ms_max": round(lags[-1], 1),
    }


def serve(db: Path, port: int) -> subprocess.Popen[bytes]:
    """`forewarn serve` with the example playbooks and no rate limit, in a process of its own."""
    env = {**os.environ, "FOREWARN_WRITE_KEY": WRITE_KEY, "FOREWARN_ADMIN_KEY": ADMIN_KEY}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forewarn",
            "serve",
            "--db",
            str(db),
            "--port",
            str(port),
            "--playbooks",
            str(ROOT / "examples" / "playbooks"),
            "--rate-limit",
            "1000000000",
        ],
        env=env,
        stdout=subprocess.DEVNULL,  # its banner would mix with the JSON on stdout
    )


def run(seconds: float, rate: float, connections: int) -> dict[str, Any]:
    """Start a server, load it at `rate`, then at its maximum; measure both."""
    results: dict[str, Any] = {"batch_events": BATCH, "connections": connections}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        port = _free_port()
        server = serve(db, port)
        try:
            _wait(port)
            ctx = multiprocessing.get_context("spawn")
            for name, load_rate, conns in (
                ("at_rate", rate, connections),
                ("max", None, connections),
                ("noop", None, connections),
            ):
                count = int((load_rate or rate * 2) * seconds / BATCH)
                if name == "noop":
                    count *= 5  # each is much cheaper: run about as long
                out = ctx.Queue()
                gen = ctx.Process(
                    target=_generator, args=(port, count, name, load_rate, conns, out)
                )
                gen.start()
                out.get()  # "ready": the bodies are built, the timed part starts
                ticks = _cpu_ticks()
                result = out.get()
                result["cpu"] = _cpu_between(ticks, _cpu_ticks())
                gen.join()
                result["target_events_per_s"] = load_rate
                sent_ms = result.pop("sent_ms")
                if name == "noop":  # no events: requests answered per second
                    result["requests_per_s"] = round(result["acknowledged_events_per_s"] / BATCH)
                    del result["acknowledged_events_per_s"]
                else:
                    result.update(_firing_latency(db, name, sent_ms))
                results[name] = result
        finally:
            server.terminate()
            server.wait(timeout=30)
    return results


def _wait(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")
