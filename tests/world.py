"""A real `forewarn serve` fed with a small simulated world (seeded: the same every run), for
the dashboard's tests: the example playbooks, events over the last two weeks up to now."""

from __future__ import annotations

from pathlib import Path

import httpx

from forewarn import clock, simulate

from . import server as srv

ACCOUNTS = 25
DAYS = 14
SEED = 3
BATCH = 500


def serve_world(folder: Path, env: dict[str, str] | None = None) -> srv.Server:
    """The server, once every simulated event is committed and the engine has applied it."""
    full = {"FOREWARN_GUARD_EVERY": "off", "FOREWARN_DELIVERY": "off", **(env or {})}
    server = srv.start(folder / "forewarn.db", env=full)
    try:
        now = clock.now_ms()
        _, messages = simulate.generate(ACCOUNTS, DAYS, SEED, now - DAYS * simulate.DAY_MS)
        batch: list[dict[str, object]] = []
        sent = 0
        with httpx.Client(timeout=30, auth=(srv.WRITE_KEY, "")) as http:
            for message in messages:
                batch.append(message)
                if len(batch) == BATCH:
                    http.post(server.url + "/v1/batch", json={"batch": batch}).raise_for_status()
                    sent += len(batch)
                    batch = []
            if batch:
                http.post(server.url + "/v1/batch", json={"batch": batch}).raise_for_status()
                sent += len(batch)
        caught_up = server.wait_for(
            lambda: (
                server.metric("forewarn_engine_events_total") >= sent
                and server.metric("forewarn_engine_lag_batches") == 0
            ),
            timeout_s=60,
        )
        assert caught_up, "the engine did not apply the simulated events within a minute"
        return server
    except BaseException:
        srv.stop(server)
        raise
