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
    """The world (its ground truth complete at once), and its messages in time order,
    generated hour by hour across all accounts, so memory holds one hour of them."""
    world = World(accounts, days, seed, start_ms)
    built = [_Account(world, i, random.Random(f"{seed}:{i}")) for i in range(accounts)]
    return world, _stream(world, built)


def _stream(world: World, accounts: list[_Account]) -> Iterator[dict[str, Any]]:
    for hour in range(-1, world.days * 24 + 3 * 24):  # -1: what comes before the first hour
        until = world.start_ms + (hour + 1) * HOUR_MS
        batch: list[tuple[int, int, int, dict[str, Any]]] = []
        for i, account in enumerate(accounts):
            for t, seq, message in account.until(hour, until):
                batch.append((t, i, seq, message))
        batch.sort(key=lambda item: (item[0], item[1], item[2]))
        for *_, message in batch:
            yield message


class _Account:
    """One account: its users, rhythm and problems, decided at the start; its everyday
    events made hour by hour."""

    def __init__(self, world: World, index: int, rng: random.Random) -> None:
        self.world, self.rng = world, rng
        self.name = f"acct-{index:06d}"
        self.seq = 0
        self.start, self.end = world.start_ms, world.start_ms + world.days * DAY_MS
        start = self.start
        plan, limit = rng.choice(PLANS)
        self.users = [f"{self.name}-u{j}" for j in range(rng.randint(1, 6))]
        self.rate = rng.uniform(0.2, 1.2)  # logins per user per busy hour
        self.pending: list[tuple[int, int, dict[str, Any]]] = []  # setup, problems, tickets
        used = rng.uniform(0.2, 0.6) * limit
        renewal = format_time(start + rng.randint(10, 120) * DAY_MS)
        traits = {
            "plan": plan,
            "storage_limit": limit,
            "storage_used": round(used, 2),
            "renewal_date": renewal,
        }
        self.emit(
            start,
            {"type": "group", "userId": self.users[0], "groupId": self.name, "traits": traits},
        )
        for user in self.users:
            # long since onboarded: stamped before their traits arrive, so that no onboarding
            # trigger sees them as new for an instant
            self.track(start - 1_000, user, "Onboarding Completed")
            created = format_time(start - rng.randint(30, 700) * DAY_MS)
            self.emit(
                start,
                {
                    "type": "identify",
                    "userId": user,
                    "traits": {
                        "email": f"{user}@example.test",
                        "timezone": "Europe/London",
                        "created_at": created,
                    },
                },
            )
            self.emit(start, {"type": "group", "userId": user, "groupId": self.name, "traits": {}})
        self.decay_at = None
        span = world.days * DAY_MS
        if rng.random() < PROBLEMS["usage_decay"][0]:
            self.decay_at = start + rng.randint(7, max(8, world.days - 7)) * DAY_MS
            self.truth("usage_decay", "account", self.name, self.decay_at)
        if rng.random() < PROBLEMS["error_spike"][0]:
            onset = start + rng.randrange(span - 2 * HOUR_MS)
            t = onset
            for _ in range(rng.randint(25, 80)):
                self.track(t, self.users[0], "Error", type="ExportError")
                t += rng.randint(20_000, 70_000)
            self.truth("error_spike", "account", self.name, onset)
        if rng.random() < PROBLEMS["stuck_in_settings"][0]:
            user = rng.choice(self.users)
            onset = start + rng.randrange(span - HOUR_MS)
            self.emit(
                onset,
                {
                    "type": "page",
                    "userId": user,
                    "name": "Settings",
                    "properties": {"path": "/kb/settings"},
                },
            )
            self.truth("stuck_in_settings", "user", user, onset)
        if rng.random() < PROBLEMS["storage_limit"][0]:
            onset = start + rng.randrange(span)
            used = round(limit * rng.uniform(0.86, 0.97), 2)
            self.emit(
                onset,
                {
                    "type": "group",
                    "userId": self.users[0],
                    "groupId": self.name,
                    "traits": {"storage_used": used},
                },
            )
            self.truth("storage_limit", "account", self.name, onset)
        if rng.random() < PROBLEMS["payment_failed"][0]:
            onset = start + rng.randrange(span)
            self.track(onset, self.users[0], "Payment Failed", amount=49)
            self.truth("payment_failed", "account", self.name, onset)
        self.newcomer = None
        if rng.random() < PROBLEMS["stalled_onboarding"][0]:
            user = f"{self.name}-new"
            onset = start + rng.randrange(max(1, world.days - 8) * DAY_MS)
            self.emit(
                onset,
                {
                    "type": "identify",
                    "userId": user,
                    "traits": {"email": f"{user}@example.test", "created_at": format_time(onset)},
                },
            )
            self.emit(onset, {"type": "group", "userId": user, "groupId": self.name, "traits": {}})
            self.track(onset + 60_000, user, "Login")
            self.truth("stalled_onboarding", "user", user, onset + 7 * DAY_MS)
        self.pending.sort(key=lambda item: (item[0], item[1]))
        self.next = 0
        self.later: list[tuple[int, int, dict[str, Any]]] = []  # everyday events not yet due

    def emit(self, t: int, message: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
        self.seq += 1
        message["timestamp"] = format_time(t)
        message["messageId"] = f"sim-{self.world.seed}-{self.name}-{self.seq}"
        item = (t, self.seq, message)
        self.pending.append(item)
        return item

    def track(self, t: int, user: str, name: str, **props: Any) -> tuple[int, int, dict[str, Any]]:
        return self.emit(
            t,
            {
                "type": "track",
                "event": name,
                "userId": user,
                "properties": props,
                "context": {"groupId": self.name},
            },
        )

    def truth(self, kind: str, scope: str, subject: str, onset: int) -> None:
        ticket = None
        if self.rng.random() < PROBLEMS[kind][1]:
            ticket = onset + self.rng.randint(HOUR_MS, 3 * DAY_MS - HOUR_MS)
            if ticket < self.end:
                user = self.users[0] if scope == "account" else subject
                name = "Subscription Cancelled" if kind == "usage_decay" else "Ticket Created"
                self.track(
                    ticket,
                    user,
                    name,
                    ticket_id=f"t-{self.name}-{kind}",
                    priority="normal",
                    problem=kind,
                )
            else:
                ticket = None
        self.world.truth.append(Truth(kind, scope, subject, onset, ticket))

    def until(self, hour: int, until_ms: int) -> list[tuple[int, int, dict[str, Any]]]:
        """This hour's everyday events, and the decided ones before `until_ms`."""
        out = []
        pending = self.pending
        while self.next < len(pending) and pending[self.next][0] < until_ms:
            out.append(pending[self.next])
            self.next += 1
        later = self.later
        if 0 <= hour < self.world.days * 24:
            for item in self._hour(hour):
                heapq.heappush(later, item)
        while later and later[0][0] < until_ms:  # (a feature used a minute after the hour)
            out.append(heapq.heappop(later))
        return out

    def _hour(self, hour: int) -> list[tuple[int, int, dict[str, Any]]]:
        rng = self.rng
        t0 = self.start + hour * HOUR_MS
        level = activity((t0 // HOUR_MS + 72) % 168)  # the epoch was a Thursday
        if self.decay_at is not None and t0 > self.decay_at:
            level *= max(0.0, 1.0 - (t0 - self.decay_at) / (14 * DAY_MS))
        out = []
        for user in self.users:
            if rng.random() < self.rate * level:
                t = t0 + rng.randrange(HOUR_MS)
                out.append(
                    self._make(
                        t,
                        {
                            "type": "track",
                            "event": "Login",
                            "userId": user,
                            "properties": {},
                            "context": {"groupId": self.name},
                        },
                    )
                )
                out.append(
                    self._make(
                        t + 1000,
                        {
                            "type": "page",
                            "userId": user,
                            "name": "Dashboard",
                            "properties": {"path": "/dashboard"},
                        },
                    )
                )
                if rng.random() < 0.5:
                    feature = rng.choice(FEATURES)
                    out.append(
                        self._make(
                            t + 60_000,
                            {
                                "type": "track",
                                "event": "Feature Used",
                                "userId": user,
                                "properties": {"feature": feature},
                                "context": {"groupId": self.name},
                            },
                        )
                    )
        return out

    def _make(self, t: int, message: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
        self.seq += 1
        message["timestamp"] = format_time(t)
        message["messageId"] = f"sim-{self.world.seed}-{self.name}-{self.seq}"
        return (t, self.seq, message)


def send(messages: Iterator[dict[str, Any]], url: str, write_key: str) -> int:
    """Send the messages to a Forewarn server (or anything speaking the Segment HTTP API)
    through Segment's own Python client, batched and gzipped as it sends them. Returns how
    many were sent; raises InputError if the server refused any."""
    from datetime import datetime

    from segment.analytics.client import Client  # type: ignore[import-untyped]

    from forewarn.errors import InputError

    errors: list[str] = []
    client = Client(
        write_key,
        host=url.rstrip("/"),
        gzip=True,
        max_queue_size=200_000,
        upload_size=100,
        on_error=lambda error, batch: errors.append(str(error)),
    )
    count = 0
    for m in messages:
        when = datetime.fromisoformat(m["timestamp"].replace("Z", "+00:00"))
        common = {"timestamp": when, "message_id": m["messageId"]}
        kind = m["type"]
        if kind == "track":
            client.track(m["userId"], m["event"], m.get("properties"), m.get("context"), **common)
        elif kind == "identify":
            client.identify(m["userId"], m.get("traits"), **common)
        elif kind == "group":
            client.group(m["userId"], m["groupId"], m.get("traits"), **common)
        elif kind == "page":
            client.page(m["userId"], None, m.get("name"), m.get("properties"), **common)
        count += 1
    client.flush()
    client.join()
    if errors:
        raise InputError(
            f"the server refused some events: {errors[0]} (and {len(errors) - 1} more)"
        )
    return count
