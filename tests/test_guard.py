"""The auto-guard stops a trigger whose outreach does harm and leaves a helpful one alone, on a
simulated population with a known effect, through the live engine and the server's log."""

from __future__ import annotations

import random
import time
from typing import Any

from forewarn import decide, guard, store_outbox, store_sqlite
from forewarn.dedup import SeenIds
from forewarn.live import LiveEngine

from .factories import DAY, T0_MS, at, feed_live, playbook, track

TRIGGERS = playbook("""
triggers:
  - id: harmful
    when: {event: {name: Harmful Moment}}
    action: {channel: email, message: hi}
    holdout: 0.5
    failure: {event: Ticket Created, within: 3d}
  - id: helpful
    when: {event: {name: Helpful Moment}}
    action: {channel: email, message: hi}
    holdout: 0.5
    failure: {event: Ticket Created, within: 3d}
  - id: unguarded
    when: {event: {name: Harmful Moment}}
    action: {channel: webhook, message: hi}
    holdout: 0.5
    failure: {event: Ticket Created, within: 3d}
    guard: {action: off}
""")


def _row(n1: int, x1: int, n2: int, x2: int, **extra: int) -> dict[str, Any]:
    return {
        "treated": {"n": n1, "failures": x1, "goals": 0, **extra},
        "held_out": {"n": n2, "failures": x2, "goals": 0},
    }


def test_judge_on_clear_cases():
    harmful, helpful, off = TRIGGERS
    found = guard.judge(harmful, _row(500, 150, 500, 100), 0)
    assert found is not None and found.mode == "shadow" and "raises failures" in found.reason
    assert guard.judge(helpful, _row(500, 50, 500, 100), 0) is None
    assert guard.judge(off, _row(500, 150, 500, 100), 0) is None
    assert guard.judge(harmful, _row(10, 9, 10, 0), 0) is None  # too few to judge
    unsubscribes = guard.judge(helpful, _row(500, 50, 500, 100), 40)
    assert unsubscribes is not None and "unsubscribed" in unsubscribes.reason


def _population(tmp_path: Any) -> tuple[Any, LiveEngine, int]:
    """600 firings of the two triggers, and tickets that follow their decisions: the harmful
    trigger's messages raise them, the helpful one's lower them."""
    rng = random.Random(4)
    conn = store_sqlite.connect(tmp_path / "forewarn.db")
    store_sqlite.ensure_workspace(conn, "default", 0)
    policy = decide.Policy(caps=(), quiet_start_min=0, quiet_end_min=0, priority_window_ms=0)
    live = LiveEngine(conn, 1, TRIGGERS, policy=policy)
    moments = []
    for i in range(600):
        which = "Harmful Moment" if i % 2 else "Helpful Moment"
        moments.append(track(which, at(days=i // 40, hours=i % 24), f"u{i}"))
    feed_live(conn, live, moments)
    # tickets follow the decisions: the harmful trigger's messages raise them
    rates = {
        ("harmful", "send"): 0.35,
        ("harmful", "held_out"): 0.15,
        ("helpful", "send"): 0.10,
        ("helpful", "held_out"): 0.20,
    }
    tickets = []
    for trig, subject, at_ms, decision in conn.execute(
        "SELECT trig, subject, at_ms, decision FROM firings WHERE trig != 'unguarded'"
    ):
        if rng.random() < rates[(trig, decision)]:
            tickets.append(
                track("Ticket Created", at(at_ms - T0_MS + DAY), subject, priority="normal")
            )
    now = T0_MS + 20 * DAY
    store_sqlite.append_batches(
        conn,
        [store_sqlite.Append(1, "t", now, tickets, [str(m["messageId"]) for m in tickets])],
        SeenIds(),
    )
    return conn, live, now


def test_the_guard_stops_the_harmful_trigger_and_leaves_the_helpful_one(tmp_path):
    conn, live, now = _population(tmp_path)
    stopped = guard.run(conn, 1, TRIGGERS, now)
    assert [s.trigger for s in stopped] == ["harmful"]
    overrides = store_outbox.trigger_overrides(conn, 1)
    assert overrides["harmful"]["mode"] == "shadow" and overrides["harmful"]["by"] == "auto-guard"
    assert "helpful" not in overrides and "unguarded" not in overrides
    (team,) = conn.execute(
        "SELECT channel, message FROM outbox WHERE trig = 'harmful' AND firing = 0"
    ).fetchall()
    assert team[0] == "webhook" and b"raises failures" in team[1]
    # the next firing of the stopped trigger is recorded, not sent
    m = track("Harmful Moment", at(days=20), "late-user")
    store_sqlite.append_batches(
        conn, [store_sqlite.Append(1, "t", now, [m], [str(m["messageId"])])], SeenIds()
    )
    live.step(now)
    (row,) = conn.execute(
        "SELECT decision, reason FROM firings WHERE subject = 'late-user' AND trig = 'harmful'"
    ).fetchall()
    assert row == ("suppressed", "shadow")
    assert guard.run(conn, 1, TRIGGERS, now) == []  # already stopped: a person resumes it


def test_the_engine_loop_runs_the_guard_on_its_own(tmp_path, monkeypatch):
    import threading

    from forewarn.server import EngineLoop

    conn, _, now = _population(tmp_path)
    conn.close()
    monkeypatch.setenv("FOREWARN_GUARD_EVERY", "1s")
    ticks = iter(range(now, now + 10**9, 700))
    lock = threading.Lock()

    def clock() -> int:
        with lock:
            return next(ticks)

    loop = EngineLoop(tmp_path / "forewarn.db", TRIGGERS, tick_ms=50, now_ms=clock)
    loop.start()
    try:
        check = store_sqlite.connect(tmp_path / "forewarn.db")
        deadline = time.monotonic() + 20
        while "harmful" not in store_outbox.trigger_overrides(check, 1):
            assert time.monotonic() < deadline, "the guard never ran"
            time.sleep(0.05)
        recorded = check.execute("SELECT count(*) FROM outcomes").fetchone()[0]
        assert recorded > 0  # and the closed outcomes were recorded
        check.close()
    finally:
        loop.stop()


def test_an_unsubscribe_counts_against_the_trigger_whose_message_came_last(tmp_path):
    conn = store_sqlite.connect(tmp_path / "f.db")
    store_sqlite.ensure_workspace(conn, "default", 0)
    message = store_outbox.Message(to="a@x.test")
    for i, (trig, done) in enumerate((("harmful", 100), ("helpful", 200))):
        store_outbox.enqueue(conn, 1, i + 1, f"k{i}", "email", trig, "user", "u1", message, 0, 0)
        conn.execute(
            "UPDATE outbox SET status = 'sent', done_ms = ? WHERE key = ?", (done, f"k{i}")
        )
    store_outbox.unsubscribe(conn, 1, "user", "u1", "email", "link", 300)
    assert guard._unsubscribed(conn, 1, "helpful", 0) == 1
    assert guard._unsubscribed(conn, 1, "harmful", 0) == 0
