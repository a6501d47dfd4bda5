"""One contract, three hosts: generated event sequences give the same firings and decisions in
the in-memory reference (a replay), the embedded live engine on SQLite and the scale-out
workers on PostgreSQL. Also for people who belong to two accounts, whom the scale-out mode
decides for in two partitions: with workers applying the log in order, their caps, holdouts
and priorities come out as in one process."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forewarn import engine, live, store_pg, store_sqlite
from forewarn.dedup import SeenIds
from forewarn.engine import Firing
from forewarn.model import event_from_dict, format_time, order_key
from forewarn.playbook import Trigger
from forewarn.policy import POLICY_TRAITS, Holding, Outreach
from forewarn.runner import Runner
from forewarn.store_sqlite import Append
from forewarn.worker import Worker
from tests import pg
from tests.factories import DAY, MINUTE, T0_MS, at, group, identify, playbook, track

PLAYBOOK = """
triggers:
  - id: error-burst
    scope: account
    when: {event: {name: Error, count: 3, within: 1h}}
    action: {channel: email, message: Errors on your account}
    cooldown: 1d
    holdout: 0.3
    priority: 10
  - id: gone-quiet
    scope: account
    when: {absent: {name: Login, for: 2d}}
    action: {channel: webhook, message: Account went quiet}
  - id: storage-85
    scope: account
    when: {threshold: {value: "traits.used / traits.limit", ">=": 0.85}}
    action: {channel: email, message: Storage almost full}
    priority: 30
  - id: export-stuck
    when: {event: {name: Export Failed, count: 2, within: 30m}}
    action: {channel: in_app, message: Need help exporting?}
    priority: 50
  - id: free-limit
    when:
      all:
        - traits: {plan: free}
        - event: {name: Limit Hit}
    action: {channel: email, message: Time to upgrade?}
    cooldown: 2d
    holdout: 0.2
"""
TRIGGERS = playbook(PLAYBOOK)
NAMES = ["Login", "Error", "Error", "Export Failed", "Limit Hit", "Report Viewed"]
UNTIL_MS = T0_MS + 12 * DAY
Row = tuple[str, str, str, str, str | None, str | None]


def generate(seed: int, n: int = 400) -> list[dict[str, Any]]:
    """Accounts with their users, users without one; identify, group and track calls over ten
    days, in time order. A user's events carry their account as `context.groupId`."""
    rng = random.Random(seed)
    accounts = [f"acct{i}" for i in range(5)]
    home = {f"u{i}": rng.choice(accounts) for i in range(12)}
    solo = [f"solo{i}" for i in range(3)]
    start = T0_MS + 9 * 3_600_000
    messages = []
    for user, account in home.items():
        when = at(start - T0_MS + rng.randrange(60) * MINUTE)
        messages.append(
            identify(when, user, plan=rng.choice(["free", "pro"]), email=f"{user}@example.com")
        )
        messages.append(group(when, account, user, limit=100, used=rng.randrange(60, 80)))
    for _ in range(n):
        t = start + rng.randrange(10 * DAY)
        if rng.random() < 0.15:
            user = rng.choice(solo)
            messages.append(track(rng.choice(NAMES), at(t - T0_MS), user))
            continue
        user = rng.choice(list(home))
        if rng.random() < 0.04:
            messages.append(group(at(t - T0_MS), home[user], user, used=rng.randrange(70, 100)))
        elif rng.random() < 0.1:  # a burst: errors or failed exports minutes apart
            name = rng.choice(["Error", "Export Failed"])
            for k in range(rng.randrange(2, 5)):
                when = at(t - T0_MS + k * rng.randrange(1, 10) * MINUTE)
                messages.append(track(name, when, user, home[user]))
        else:
            messages.append(track(rng.choice(NAMES), at(t - T0_MS), user, home[user]))
    return sorted(messages, key=lambda m: order_key(event_from_dict(m)))


def _row(f: Firing) -> Row:
    send_at = None if f.send_at_ms is None else format_time(f.send_at_ms)
    return (f.trigger, f.subject, format_time(f.at_ms), f.decision, f.reason, send_at)


def _stored(rows: list[store_sqlite.FiringRow]) -> list[Row]:
    found = []
    for trig, subject, _, at_ms, _, decision, reason, _, send_at_ms in rows:
        send_at = None if send_at_ms is None else format_time(send_at_ms)
        found.append((trig, subject, format_time(at_ms), decision, reason, send_at))
    return sorted(found)


def reference(
    messages: list[dict[str, Any]], until_ms: int = UNTIL_MS, triggers: list[Trigger] = TRIGGERS
) -> list[Row]:
    """What `forewarn replay` prints: the engine and the policy in memory."""
    keep = (POLICY_TRAITS, POLICY_TRAITS)
    runner = Runner(engine.State(engine.Playbook(triggers, keep=keep)), lateness_ms=0)
    out: list[Firing] = []
    holding = Holding(Outreach(runner.state, triggers), out.append)
    runner.replay([event_from_dict(m) for m in messages], until_ms, holding)
    holding.release()
    return sorted(_row(f) for f in out)


def _appends(ws: int, messages: list[dict[str, Any]], size: int = 50) -> list[Append]:
    chunks = [messages[i : i + size] for i in range(0, len(messages), size)]
    return [
        Append(
            ws,
            "segment",
            UNTIL_MS,
            c,
            [str(m["messageId"]) for m in c],
            [event_from_dict(m) for m in c],
        )
        for c in chunks
    ]


def embedded(
    messages: list[dict[str, Any]], path: Path, triggers: list[Trigger] = TRIGGERS
) -> list[Row]:
    """The live engine on SQLite, the log received in batches."""
    conn = store_sqlite.connect(path)
    ws = store_sqlite.ensure_workspace(conn, "default", T0_MS)
    seen = SeenIds()
    for a in _appends(ws, messages):
        store_sqlite.append_batches(conn, [a], seen)
    engine_ = live.LiveEngine(conn, ws, triggers)
    while engine_.lag():
        engine_.step(0)
    engine_.step(UNTIL_MS)
    rows = store_sqlite.query_firings(conn, ws, limit=100_000)
    conn.close()
    return _stored(rows)


def scaled_out(
    messages: list[dict[str, Any]],
    url: str,
    workers: int = 3,
    triggers: list[Trigger] = TRIGGERS,
    events_per_step: int = 40,
) -> list[Row]:
    """Workers on PostgreSQL taking turns, each claiming a few partitions per step (and at
    most `events_per_step` events: with 1, the steps apply the log in its order)."""
    pool = store_pg.connect(url)
    try:
        ws = store_pg.ensure_workspace(pool, "default", T0_MS)
        store_pg.append_batches(pool, _appends(ws, messages))
        team = [
            Worker(pool, ws, triggers, parts_per_step=2, events_per_step=events_per_step)
            for _ in range(workers)
        ]
        for now in (0, UNTIL_MS):
            while sum(w.step(now).parts for w in team):
                pass
        with pool.connection() as conn:
            assert store_pg.pending(conn, ws) == 0
            rows = store_pg.query_firings(conn, ws, limit=100_000)
    finally:
        pool.close()
    return _stored(rows)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    yield from pg.database()


def _clear(url: str) -> None:
    with store_pg.connect(url) as pool, pool.connection() as conn:
        conn.execute("TRUNCATE events, queue, parts, homes, firings, outbox, keys, workspaces")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generated_sequences_fire_and_decide_alike_on_every_host(
    seed: int, url: str, tmp_path: Path
) -> None:
    messages = generate(seed)
    expected = reference(messages)
    assert len({r[0] for r in expected}) >= 4  # the sequence exercises most triggers
    assert embedded(messages, tmp_path / "fw.db") == expected
    _clear(url)
    assert scaled_out(messages, url) == expected


SHARED = """
triggers:
  - id: limit-hit
    when: {event: {name: Limit Hit}}
    action: {channel: email, message: You hit a limit}
    holdout: 0.3
    priority: 10
  - id: export-failed
    when: {event: {name: Export Failed}}
    action: {channel: in_app, message: Need help exporting?}
    priority: 40
  - id: error-burst
    scope: account
    when: {event: {name: Error, count: 3, within: 1h}}
    action: {channel: email, message: Errors on your account}
    cooldown: 1d
"""
SHARED_TRIGGERS = playbook(SHARED)


def generate_shared(seed: int, n: int = 300) -> list[dict[str, Any]]:
    """Users each in two accounts, active in both over ten days: the user-scoped triggers fire
    on single events (no window, count or cooldown a partition would keep on its own), so
    every host fires them alike, and decides them from the user's outreach in both accounts.
    Bursts put a limit and a failed export seconds apart, often in the two accounts."""
    rng = random.Random(seed)
    accounts = [f"acct{i}" for i in range(4)]
    pairs = {f"u{i}": rng.sample(accounts, 2) for i in range(8)}
    start = T0_MS + 9 * 3_600_000
    messages = []
    for _ in range(n):
        t = start + rng.randrange(10 * DAY)
        user = rng.choice(list(pairs))
        if rng.random() < 0.2:
            for k, name in enumerate(["Limit Hit", "Export Failed"]):
                account = rng.choice(pairs[user])
                messages.append(
                    track(name, at(t - T0_MS + k * rng.randrange(1, 20_000)), user, account)
                )
        else:
            name = rng.choice(["Limit Hit", "Limit Hit", "Export Failed", "Error", "Login"])
            messages.append(track(name, at(t - T0_MS), user, rng.choice(pairs[user])))
    return sorted(messages, key=lambda m: order_key(event_from_dict(m)))


@pytest.mark.parametrize("seed", [1, 2])
def test_people_in_two_accounts_are_decided_alike_on_every_host(
    seed: int, url: str, tmp_path: Path
) -> None:
    messages = generate_shared(seed)
    expected = reference(messages, triggers=SHARED_TRIGGERS)
    reasons = {r[4] for r in expected}
    assert {"frequency_cap", "lower_priority"} <= reasons  # the policy is exercised
    assert "held_out" in {r[3] for r in expected}
    assert embedded(messages, tmp_path / "fw.db", SHARED_TRIGGERS) == expected
    _clear(url)
    assert scaled_out(messages, url, 3, SHARED_TRIGGERS, events_per_step=1) == expected
