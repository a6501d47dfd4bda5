"""Outreach throughput; prints JSON.

- `policy`: decisions per second through the whole policy (`decide.History.decide`), for a
  storm of firings over many subjects, with the default caps and quiet hours in several zones;
- `outbox_<channel>`: messages per second from the outbox to a real peer on loopback, through
  one delivery worker (claims, consent check, send, settle with its result event, each on
  SQLite with synchronous=FULL): `webhook` to an HTTP receiver (uvicorn, its own process),
  `email` to an SMTP server (aiosmtpd, its own process), `in_app` into the inbox.

    .venv/bin/python bench/outreach.py
    .venv/bin/python bench/outreach.py --firings 20000 --messages 200     # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from forewarn import store_outbox, store_sqlite
from forewarn.decide import Facts, History, Policy, Spec

DAY = 86_400_000
T0 = 1_767_571_200_000  # 2026-01-05T00:00:00Z
ZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney"]
SPECS = [
    Spec("error-spike", "email", priority=50, holdout=0.1, problem="errors"),
    Spec("known-bug", "in_app", priority=60, problem="errors"),
    Spec("storage-85", "email", priority=40, holdout=0.1),
    Spec("renewal", "chat", priority=30),
    Spec("team-alert", "webhook", priority=10),
]


def bench_policy(firings: int, subjects: int) -> dict[str, Any]:
    rng = random.Random(3)
    plan = sorted(
        (T0 + rng.randrange(30 * DAY), rng.choice(SPECS), f"u{rng.randrange(subjects)}")
        for _ in range(firings)
    )
    zone = {f"u{i}": ZONES[i % len(ZONES)] for i in range(subjects)}
    facts = {s: Facts(traits={"timezone": z}) for s, z in zone.items()}
    best = float("inf")
    decisions: dict[str, int] = {}
    for _ in range(3):
        history = History(Policy())
        decisions = {}
        start = time.process_time()
        for at_ms, spec, subject in plan:
            d = history.decide(spec, "user", subject, at_ms, False, facts[subject])
            key = d.decision if d.decision != "suppressed" else f"suppressed:{d.reason}"
            decisions[key] = decisions.get(key, 0) + 1
        best = min(best, time.process_time() - start)
    return {
        "firings": firings,
        "subjects": subjects,
        "decisions_per_s": round(firings / best),
        "us_per_decision": round(best / firings * 1e6, 2),
        "decisions": dict(sorted(decisions.items())),
    }


# --- peers in processes of their own ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_peer(port: int) -> None:
    import uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False)


def _smtp_peer(port: int) -> None:
    from aiosmtpd.controller import Controller

    class Sink:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 OK"

    controller = Controller(Sink(), hostname="127.0.0.1", port=port)
    controller.start()
    while True:
        time.sleep(3600)


def _wait_for(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _fill(conn: Any, channel: str, n: int, to: str) -> None:
    message = store_outbox.Message(to=to, title="Storage almost full", text="You are at 91%.")
    conn.execute("BEGIN")
    for i in range(n):
        conn.execute(
            "INSERT INTO firings (workspace, trig, subject, scope, at_ms, evidence, decision,"
            " channel, cursor) VALUES (1, 'bench', ?, 'user', 0, '{}', 'send', ?, 0)",
            (f"u{i}", channel),
        )
        store_outbox.enqueue(
            conn, 1, i + 1, f"fw_{channel}_{i}", channel, "bench", "user", f"u{i}", message, 0, 0
        )
    conn.execute("COMMIT")


def bench_outbox(channel: str, n: int) -> dict[str, Any]:
    from forewarn.channels import Channel
    from forewarn.deliver import InboxChannel, Worker

    peer = None
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    if channel in ("webhook", "email"):
        peer = ctx.Process(target=_http_peer if channel == "webhook" else _smtp_peer, args=(port,))
        peer.start()
        _wait_for(port)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            conn = store_sqlite.connect(Path(tmp) / "bench.db")
            store_sqlite.ensure_workspace(conn, "default", 0)
            _fill(conn, channel, n, "someone@example.com" if channel == "email" else "")
            channels: dict[str, Channel]
            if channel == "webhook":
                from forewarn.channel_webhook import WebhookChannel

                secret = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
                channels = {
                    "webhook": WebhookChannel(
                        f"http://127.0.0.1:{port}/hook", secret, allow_private=True
                    )
                }
            elif channel == "email":
                from forewarn.channel_email import EmailChannel

                channels = {
                    "email": EmailChannel.from_url(
                        f"smtp://127.0.0.1:{port}", "Bench <bench@example.com>"
                    )
                }
            else:
                channels = {"in_app": InboxChannel(conn, "in_app", lambda: 1)}
            worker = Worker(conn, channels, now_ms=lambda: 1, batch=100)

            async def drain() -> float:
                start = time.perf_counter()
                while await worker.run_once():
                    pass
                elapsed = time.perf_counter() - start
                await worker.aclose()
                return elapsed

            cpu = time.process_time()
            elapsed = asyncio.run(drain())
            cpu = time.process_time() - cpu
            (sent,) = conn.execute("SELECT count(*) FROM outbox WHERE status = 'sent'").fetchone()
            conn.close()
    finally:
        if peer is not None:
            peer.kill()
            peer.join()
    return {
        "messages": n,
        "sent": sent,
        "messages_per_s": round(n / elapsed),
        "worker_cpu_us_per_message": round(cpu / n * 1e6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--firings", type=int, default=200_000)
    parser.add_argument("--subjects", type=int, default=50_000)
    parser.add_argument("--messages", type=int, default=2_000)
    parser.add_argument("--channels", default="in_app,webhook,email")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "policy": bench_policy(args.firings, args.subjects),
    }
    for channel in args.channels.split(","):
        result[f"outbox_{channel}"] = bench_outbox(channel, args.messages)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
