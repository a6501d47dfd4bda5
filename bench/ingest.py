"""Ingest throughput on one core: request bodies shaped like the real clients' (see
../shared/datasets/wire-captures), parsed into validated messages; prints JSON.

- `segment_batch`: `/v1/batch` bodies of 100 messages (track, identify, group, page), as
  analytics-python sends them, with `sentAt` (so every timestamp is skew-corrected);
- `posthog_batch`: `/batch/` bodies of 100 events (track, `$pageview`, `$set`), as posthog-python;
- `sentry_envelope`: one error per envelope, as sentry-python sends it;
- `decode_only`: msgspec decoding the Segment bodies to Python objects (the floor).

Best of 5 passes of `--requests` bodies each.

    .venv/bin/python bench/ingest.py
    .venv/bin/python bench/ingest.py --requests 50     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from forewarn import ingest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_load

RECEIVED_MS = 1_795_428_000_500
STAMP = "2026-11-23T10:00:00.000+00:00"
LIBRARY = {"library": {"name": "analytics-python", "version": "2.4.0"}}


def segment_body(n: int) -> bytes:
    kinds: list[dict[str, Any]] = [
        {"type": "track", "event": "API Error", "properties": {"error_rate": 0.12, "plan": "pro"}},
        {"type": "identify", "traits": {"email": "u42@example.com", "plan": "pro"}},
        {"type": "group", "groupId": "acct-7", "traits": {"name": "Acme", "seats_used": 48}},
        {"type": "page", "name": "Getting started", "properties": {"path": "/docs"}},
    ]
    batch = [
        {
            "integrations": {},
            "anonymousId": None,
            "timestamp": STAMP,
            "context": LIBRARY,
            "userId": f"user-{i % 50}",
            "messageId": f"5aa91193-5c71-4990-963c-{i:012d}",
            **kinds[i % 4],
        }
        for i in range(n)
    ]
    return json.dumps({"batch": batch, "sentAt": "2026-11-23T10:00:00.300+00:00"}).encode()


def posthog_body(n: int) -> bytes:
    lib = {"$lib": "posthog-python", "$lib_version": "7.91.1", "$geoip_disable": True}
    kinds: list[dict[str, Any]] = [
        {"event": "API Error", "properties": {"error_rate": 0.12, "plan": "pro", **lib}},
        {
            "event": "$pageview",
            "properties": {"$current_url": "https://app.example.com/export", **lib},
        },
        {"event": "$set", "$set": {"plan": "pro"}, "properties": lib},
    ]
    batch = [
        {
            "timestamp": "2026-11-23T10:00:00.000+00:00",
            "distinct_id": f"user-{i % 50}",
            "uuid": f"813f0be9-e891-412d-aee0-{i:012d}",
            **kinds[i % 3],
        }
        for i in range(n)
    ]
    return json.dumps(
        {"batch": batch, "sent_at": "2026-11-23T10:00:00.300+00:00", "api_key": "phc_KEY"}
    ).encode()


def sentry_body() -> bytes:
    error = {
        "level": "error",
        "exception": {
            "values": [
                {
                    "mechanism": {"type": "generic", "handled": True},
                    "type": "ZeroDivisionError",
                    "value": "division by zero",
                    "stacktrace": {
                        "frames": [{"filename": "app.py", "function": "export", "lineno": 36}]
                    },
                }
            ]
        },
        "event_id": "f0b7be73870e4ccf8e0c7a1c15aad946",
        "timestamp": "2026-11-23T10:00:00.000Z",
        "user": {"id": "user-42"},
        "tags": {"account_id": "acct-7"},
        "release": "demo@1.0.0",
        "environment": "production",
        "platform": "python",
    }
    payload = json.dumps(error).encode()
    header = {"event_id": error["event_id"], "sent_at": "2026-11-23T10:00:00.300Z"}
    item = {"type": "event", "content_type": "application/json", "length": len(payload)}
    return b"\n".join([json.dumps(header).encode(), json.dumps(item).encode(), payload, b""])


def measure(parse: Callable[[], int], requests: int) -> dict[str, Any]:
    best = float("inf")
    events = 0
    for _ in range(5):
        start = time.perf_counter()
        events = sum(parse() for _ in range(requests))
        best = min(best, time.perf_counter() - start)
    return {"events_per_s": round(events / best), "us_per_event": round(best / events * 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="bodies per timed pass")
    parser.add_argument("--no-http", action="store_true", help="parsing only, no server")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each HTTP run")
    parser.add_argument("--rate", type=float, default=50_000.0, help="events/s of the paced run")
    parser.add_argument("--connections", type=int, default=16, help="client connections")
    args = parser.parse_args()
    seg, ph, env = segment_body(100), posthog_body(100), sentry_body()
    for parsed in (
        ingest.segment(seg, "batch", RECEIVED_MS),
        ingest.posthog(ph, RECEIVED_MS),
        ingest.sentry_envelope(env, RECEIVED_MS),
    ):
        assert parsed.messages and not parsed.rejected, parsed.rejected
    result = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "segment_batch": measure(
            lambda: len(ingest.segment(seg, "batch", RECEIVED_MS).events), args.requests
        ),
        "posthog_batch": measure(
            lambda: len(ingest.posthog(ph, RECEIVED_MS).events), args.requests
        ),
        "sentry_envelope": measure(
            lambda: len(ingest.sentry_envelope(env, RECEIVED_MS).events), args.requests * 20
        ),
        "decode_only": measure(lambda: len(msgspec.json.decode(seg)["batch"]), args.requests),
    }
    if not args.no_http:
        http = http_load.run(args.seconds, args.rate, args.connections)
        result["http"] = http
        paced = http["at_rate"]
        result["targets"] = {
            "acknowledged_events_per_s": 50_000,
            "ack_ms_p99": 50,
            "event_to_firing_ms_p99": 100,
            "met": {
                "rate": paced["acknowledged_events_per_s"] >= 0.98 * args.rate
                and args.rate >= 50_000,
                "ack_p99": paced["ack_ms_p99"] <= 50,
                "event_to_firing_p99": paced.get("event_to_firing_ms_p99", 1e9) <= 100,
            },
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
