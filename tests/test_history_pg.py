"""A person's outreach across partitions in the scale-out mode, on a real PostgreSQL: a user of
two accounts is decided for in two partitions, possibly by two workers at once, and the
frequency caps still count every message to them (held-out ones included), as in the embedded
mode; a worker never waits for a person another worker is deciding for."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from forewarn import decide, store_pg
from forewarn.model import event_from_dict
from forewarn.store_sqlite import Append
from forewarn.worker import Worker
from tests.factories import DAY, MINUTE, SECOND, T0_MS, at, playbook, track

LIMIT = playbook("""
triggers:
  - id: limit-hit
    when: {event: {name: Limit Hit}}
    action: {channel: in_app, message: You hit a limit}
  - id: team-alert
    scope: account
    when: {event: {name: Limit Hit}}
    action: {channel: in_app, message: Someone on your account hit a limit}
""")
CAPS = decide.Policy().caps  # 2 per 7 days, 1 per day


def _ingest(pool: store_pg.Pool, ws: int, messages: list[dict[str, Any]]) -> None:
    ids = [str(m["messageId"]) for m in messages]
    evs = [event_from_dict(m) for m in messages]
    received_ms = T0_MS + 30 * DAY  # after every event (a later stamp is taken as received)
    store_pg.append_batches(pool, [Append(ws, "segment", received_ms, messages, ids, evs)])


def _decided(pool: store_pg.Pool, ws: int, scope: str) -> list[tuple[str, int, str, str | None]]:
    with pool.connection() as conn:
        return [
            (str(s), int(a), str(d), r)
            for s, a, d, r in conn.execute(
                "SELECT subject, at_ms, decision, reason FROM firings"
                " WHERE workspace = %s AND scope = %s ORDER BY at_ms, id",
                (ws, scope),
            )
        ]


def _within_caps(decided: list[tuple[str, int, str, str | None]]) -> bool:
    """Whether each subject's messages sent keep every cap (checked afresh: each send against
    the ones before it)."""
    sent: dict[str, list[int]] = {}
    for subject, at_ms, decision, _ in decided:
        if decision == decide.SEND:
            times = sent.setdefault(subject, [])
            if decide._over_cap(CAPS, times, at_ms):
                return False
            times.append(at_ms)
    return True


def test_a_user_of_two_accounts_gets_no_more_than_the_caps_allow(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    worker = Worker(pool, ws, LIMIT)
    # u1 hits a limit in acme, then in beta an hour later: two partitions fire for u1
    _ingest(pool, ws, [track("Limit Hit", at(hours=10), "u1", "acme")])
    worker.run_until_idle(0)
    _ingest(pool, ws, [track("Limit Hit", at(hours=11), "u1", "beta")])
    worker.run_until_idle(0)
    users = _decided(pool, ws, "user")
    assert [(s, d, r) for s, _, d, r in users] == [
        ("u1", "send", None),
        ("u1", "suppressed", "frequency_cap"),
    ]
    # each account's own outreach is its own: counted in its cap, not in its users'
    accounts = _decided(pool, ws, "account")
    assert [(s, d) for s, _, d, _ in accounts] == [("acme", "send"), ("beta", "send")]
    with pool.connection() as conn:
        rows = conn.execute("SELECT scope, subject FROM outbox ORDER BY id").fetchall()
    assert Counter(rows) == Counter([("user", "u1"), ("account", "acme"), ("account", "beta")])


HELD = playbook("""
triggers:
  - id: tip
    when: {event: {name: Tip Wanted}}
    action: {channel: in_app, message: A tip}
    holdout: 0.99
  - id: limit-hit
    when: {event: {name: Limit Hit}}
    action: {channel: in_app, message: You hit a limit}
""")


def test_a_held_out_firing_in_one_account_counts_in_the_caps_of_the_other(
    pool: store_pg.Pool,
) -> None:
    assert decide.holdout_bucket("tip", "u1", decide.Policy().salt) < 0.99  # u1 is held out
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    worker = Worker(pool, ws, HELD)
    _ingest(pool, ws, [track("Tip Wanted", at(hours=10), "u1", "acme")])
    worker.run_until_idle(0)
    _ingest(pool, ws, [track("Limit Hit", at(hours=11), "u1", "beta")])
    worker.run_until_idle(0)
    assert [(d, r) for _, _, d, r in _decided(pool, ws, "user")] == [
        ("held_out", None),
        ("suppressed", "frequency_cap"),  # as if the tip had been sent: 1 a day
    ]


def test_a_partition_deciding_for_a_person_another_worker_decides_for_waits_its_turn(
    url: str, pool: store_pg.Pool
) -> None:
    # a lock wait would fail the step after 2 s here instead of hanging the test
    waiting = store_pg.connect(url + "?options=-c%20lock_timeout%3D2000")
    try:
        ws = store_pg.ensure_workspace(pool, "default", T0_MS)
        worker = Worker(waiting, ws, LIMIT)
        _ingest(pool, ws, [track("Limit Hit", at(hours=10), "u1", "acme")])
        worker.run_until_idle(0)
        _ingest(
            pool,
            ws,
            [
                track("Limit Hit", at(hours=11), "u1", "beta"),
                track("Limit Hit", at(hours=11), "u2", "gamma"),
            ],
        )
        with pool.connection() as other, other.transaction():
            # another worker is deciding for u1
            other.execute("SELECT pg_advisory_xact_lock(%s)", (store_pg.lock_key(ws, "person:u1"),))
            assert worker.run_until_idle(0).parts == 1  # gamma; beta is left, not waited for
            with pool.connection() as conn:
                assert store_pg.pending(conn, ws) == 1
            assert [(s, d) for s, _, d, _ in _decided(pool, ws, "user")] == [
                ("u1", "send"),
                ("u2", "send"),
            ]
        assert worker.run_until_idle(0).parts == 1
        assert sorted((s, d, r or "") for s, _, d, r in _decided(pool, ws, "user")) == [
            ("u1", "send", ""),
            ("u1", "suppressed", "frequency_cap"),
            ("u2", "send", ""),
        ]
    finally:
        waiting.close()


_WORKER = """
import sys, time
from forewarn import store_pg
from forewarn.worker import Worker
from tests.test_history_pg import LIMIT
url, ws, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pool = store_pg.connect(url)
worker = Worker(pool, ws, LIMIT, parts_per_step=1, events_per_step=2)
time.sleep(max(0.0, start - time.time()))  # both at once
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if not worker.step(0).parts:
        with pool.connection() as conn:
            if not store_pg.pending(conn, ws):
                break
        time.sleep(0.002)
"""


def test_two_worker_processes_deciding_for_the_same_people_at_once_keep_the_caps(
    url: str, pool: store_pg.Pool
) -> None:
    """Users each in two of four accounts hit limits in both at once over four days; two worker
    processes, each claiming one partition at a time, decide for them side by side."""
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    accounts = [f"a{i}" for i in range(4)]
    messages = []
    for i in range(16):
        mine = (accounts[i % 4], accounts[(i + 1) % 4])
        for day in range(4):  # in both accounts, a second apart, each day
            for k, account in enumerate(mine):
                when = at(day * DAY + i * MINUTE + k * SECOND)
                messages.append(track("Limit Hit", when, f"u{i}", account))
    messages.sort(key=lambda m: str(m["timestamp"]))
    _ingest(pool, ws, messages)
    Worker(pool, ws, LIMIT).register(T0_MS)
    start = time.time() + 3
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, str(ws), str(start)],
            cwd=Path(__file__).resolve().parent.parent,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()
    with pool.connection() as conn:
        assert store_pg.pending(conn, ws) == 0
    users = _decided(pool, ws, "user")
    assert len(users) == len(messages)  # each event fired once, in one of the partitions
    assert _within_caps(users)
    sent = Counter(s for s, _, d, _ in users if d == decide.SEND)
    # every user could be sent two in the 7 days (not on one day), and no more
    assert sent == {f"u{i}": 2 for i in range(16)}, sent
    reasons = Counter(r for _, _, d, r in users if d != decide.SEND)
    assert reasons == {"frequency_cap": len(messages) - 32}
