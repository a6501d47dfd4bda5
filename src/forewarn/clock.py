"""The wall clock: the one place Forewarn reads it. Everything else takes time as `now_ms`."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the Unix epoch, UTC."""
    return time.time_ns() // 1_000_000


def monotonic_ms() -> float:
    """For measuring durations (lag, latency), never for event time."""
    return time.monotonic() * 1000.0
