"""A synthetic SaaS product with known problems: the events it would send, and the truth about
who had which problem when. An edge, for tests, benchmarks and the demo: a seeded generator
(`random.Random` per account, so the same seed gives the same world), time as an argument.

Accounts on plans, with 1 to 6 users; each user logs in and uses features with a daily and
weekly rhythm (busy weekday working hours, quiet nights and weekends). Into that, problems are
injected, each recorded in the ground truth with its subject and onset:

- `error_spike`: a bug hits an account: a burst of `Error` events over about an hour;
- `stuck_in_settings`: a user opens the knowledge-base settings page and stays there, with no
  other page and no search, for several minutes;
- `usage_decay`: an account's users log in less and less over two weeks (drifting to churn);
- `storage_limit`: an account's storage grows past 85% of its limit;
- `payment_failed`: an account's payment fails;
- `stalled_onboarding`: a new user signs up and never completes onboarding.

A problem left alone leads to a ticket (`Ticket Created`) within three days with a known
probability per kind (churn: to a `Subscription Cancelled`), also in the ground truth, so a
trigger's precision and recall, and the delay from onset to outreach, can be measured.
Messages are Segment-spec dicts, in time order; the same seed gives the same world.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from forewarn.model import format_time

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
PLANS = (("starter", 10.0), ("pro", 50.0), ("business", 200.0))  # name, storage limit (GB)
FEATURES = ("reports", "search", "export", "automation")
# per kind: the share of accounts (or users) it hits over the period, and P(ticket | alone)
PROBLEMS = {
    "error_spike": (0.08, 0.6),
    "stuck_in_settings": (0.05, 0.3),
    "usage_decay": (0.06, 0.5),
    "storage_limit": (0.05, 0.4),
    "payment_failed": (0.04, 0.5),
    "stalled_onboarding": (0.05, 0.35),
}


@dataclass(frozen=True)
class Truth:
    """One injected problem."""

    kind: str
    scope: str  # user | account
    subject: str
    onset_ms: int
    ticket_ms: int | None  # when it led to a ticket (or a cancellation), if it did


@dataclass
class World:
    accounts: int
    days: int
    seed: int
    start_ms: int
    truth: list[Truth] = field(default_factory=list)


def activity(hour_of_week: int) -> float:
    """Relative activity by hour of the week (Monday 00:00 = 0): busy weekday working hours,
    quiet nights, quieter weekends."""
    day, hour = divmod(hour_of_week, 24)
    base = 1.0 if 9 <= hour < 18 else 0.35 if 7 <= hour < 22 else 0.05
    return base * (0.3 if day >= 5 else 1.0)


def generate(
    accounts: int, days: int, seed: int, start_ms: int
) -> tuple[World, Iterator[dict[str, Any]]]:
    """The world, and its messages in time order (generated lazily, account by account, and
    merged)."""
    world = World(accounts, days, seed, start_ms)
    streams = [_account(world, i, random.Random(f"{seed}:{i}")) for i in range(accounts)]
    return world, _merge(streams)


def _merge(streams: list[Iterator[tuple[int, int, dict[str, Any]]]]) -> Iterator[dict[str, Any]]:
    for _, _, message in heapq.merge(*streams, key=lambda item: (item[0], item[1])):
        yield message


def _account(
    world: World, index: int, rng: random.Random
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """One account's messages, in time order, as (time, sequence, message)."""
    out: list[tuple[int, int, dict[str, Any]]] = []
    seq = [0]
    account = f"acct-{index:06d}"
    start, end = world.start_ms, world.start_ms + world.days * DAY_MS
    plan, limit = rng.choice(PLANS)
    users = [f"{account}-u{j}" for j in range(rng.randint(1, 6))]

    def emit(t: int, msg: dict[str, Any]) -> None:
        seq[0] += 1
        msg["timestamp"] = format_time(t)
        msg["messageId"] = f"sim-{world.seed}-{account}-{seq[0]}"
        out.append((t, seq[0], msg))

    def track(t: int, user: str, name: str, **props: Any) -> None:
        emit(
            t,
            {
                "type": "track",
                "event": name,
                "userId": user,
                "properties": props,
                "context": {"groupId": account},
            },
        )

    def truth(kind: str, scope: str, subject: str, onset: int) -> None:
        p_ticket = PROBLEMS[kind][1]
        ticket = None
        if rng.random() < p_ticket:
            ticket = onset + rng.randint(HOUR_MS, 3 * DAY_MS - HOUR_MS)
            if ticket < end:
                user = users[0] if scope == "account" else subject
                name = "Subscription Cancelled" if kind == "usage_decay" else "Ticket Created"
                track(
                    ticket,
                    user,
                    name,
                    ticket_id=f"t-{account}-{kind}",
                    priority="normal",
                    problem=kind,
                )
            else:
                ticket = None
        world.truth.append(Truth(kind, scope, subject, onset, ticket))

    used = rng.uniform(0.2, 0.6) * limit
    emit(
        start,
        {
            "type": "group",
            "userId": users[0],
            "groupId": account,
            "traits": {
                "plan": plan,
                "storage_limit": limit,
                "storage_used": round(used, 2),
                "renewal_date": format_time(start + rng.randint(10, 120) * DAY_MS),
            },
        },
    )
    for user in users:
        emit(
            start,
            {
                "type": "identify",
                "userId": user,
                "traits": {
                    "email": f"{user}@example.test",
                    "timezone": "Europe/London",
                    "created_at": format_time(start - rng.randint(30, 700) * DAY_MS),
                },
            },
        )
        emit(start, {"type": "group", "userId": user, "groupId": account, "traits": {}})
        # long since: they are established (stamped before their traits arrive, so that no
        # onboarding trigger sees them as new for an instant)
        track(start - 1_000, user, "Onboarding Completed")

    decay_at = None
    if rng.random() < PROBLEMS["usage_decay"][0]:
        decay_at = start + rng.randint(7, max(8, world.days - 7)) * DAY_MS
        truth("usage_decay", "account", account, decay_at)
    # daily life: logins and feature use, hour by hour
    rate = rng.uniform(0.2, 1.2)  # logins per user per busy hour
    for hour in range(world.days * 24):
        t0 = start + hour * HOUR_MS
        level = activity((t0 // HOUR_MS + 72) % 168)  # the epoch was a Thursday
        if decay_at is not None and t0 > decay_at:
            level *= max(0.0, 1.0 - (t0 - decay_at) / (14 * DAY_MS))
        for user in users:
            if rng.random() < rate * level:
                t = t0 + rng.randrange(HOUR_MS)
                track(t, user, "Login")
                emit(
                    t + 1000,
                    {
                        "type": "page",
                        "userId": user,
                        "name": "Dashboard",
                        "properties": {"path": "/dashboard"},
                    },
                )
                if rng.random() < 0.5:
                    track(t + 60_000, user, "Feature Used", feature=rng.choice(FEATURES))
    if rng.random() < PROBLEMS["error_spike"][0]:
        onset = start + rng.randrange(world.days * DAY_MS - 2 * HOUR_MS)
        for k in range(rng.randint(25, 80)):
            track(onset + k * rng.randint(20_000, 70_000), users[0], "Error", type="ExportError")
        truth("error_spike", "account", account, onset)
    if rng.random() < PROBLEMS["stuck_in_settings"][0]:
        user = rng.choice(users)
        onset = start + rng.randrange(world.days * DAY_MS - HOUR_MS)
        emit(
            onset,
            {
                "type": "page",
                "userId": user,
                "name": "Settings",
                "properties": {"path": "/kb/settings"},
            },
        )
        truth("stuck_in_settings", "user", user, onset)
    if rng.random() < PROBLEMS["storage_limit"][0]:
        onset = start + rng.randrange(world.days * DAY_MS)
        emit(
            onset,
            {
                "type": "group",
                "userId": users[0],
                "groupId": account,
                "traits": {"storage_used": round(limit * rng.uniform(0.86, 0.97), 2)},
            },
        )
        truth("storage_limit", "account", account, onset)
    if rng.random() < PROBLEMS["payment_failed"][0]:
        onset = start + rng.randrange(world.days * DAY_MS)
        track(onset, users[0], "Payment Failed", amount=49)
        truth("payment_failed", "account", account, onset)
    if rng.random() < PROBLEMS["stalled_onboarding"][0]:
        user = f"{account}-new"
        onset = start + rng.randrange(max(1, world.days - 8) * DAY_MS)
        emit(
            onset,
            {
                "type": "identify",
                "userId": user,
                "traits": {"email": f"{user}@example.test", "created_at": format_time(onset)},
            },
        )
        emit(onset, {"type": "group", "userId": user, "groupId": account, "traits": {}})
        track(onset + 60_000, user, "Login")
        users.append(user)
        truth("stalled_onboarding", "user", user, onset + 7 * DAY_MS)
    out.sort(key=lambda item: (item[0], item[1]))
    yield from out
