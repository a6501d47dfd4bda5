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
probability per kind (churn: to a `Subscription Cancelled` within one to three weeks), also in
the ground truth, so a trigger's precision and recall, and the delay from onset to outreach, can
be measured.

The loop closes: outreach sent to the problem's subject between its onset and the would-be
ticket lowers the ticket's probability by the world's true `effect` (0.5 halves it). Who was
reached is asked of a `Reach` when the ticket comes due (in time order, so everything before
it has been seen): nobody (`NO_REACH`), the playbooks run in-process (`simulate_outreach`), or a
live server. Subjects held out as control get no outreach, so the lift a report measures can be
set against the true effect. Messages are Segment-spec dicts, in time order; the same seed (and
the same outreach) gives the same world.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

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
# when the ticket comes after the onset, if it does: (earliest, latest); churn takes longer
TICKET_DELAY_MS = {kind: (HOUR_MS, 3 * DAY_MS - HOUR_MS) for kind in PROBLEMS}
TICKET_DELAY_MS["usage_decay"] = (7 * DAY_MS, 21 * DAY_MS)


@dataclass
class Truth:
    """One injected problem. Its ticket is settled when it comes due (`ticket_ms` is None until
    then, and stays None if the problem did not lead to one)."""

    kind: str
    scope: str  # user | account
    subject: str
    onset_ms: int
    ticket_ms: int | None = None  # when it led to a ticket (or a cancellation), if it did
    would_ticket_ms: int | None = None  # when it would have, left alone (None: it would not)
    reached_ms: int | None = None  # outreach first sent to the subject in (onset, would-be ticket)


class Reach(Protocol):
    """Who the outreach reached, as the world unfolds."""

    def saw(self, message: dict[str, Any]) -> None:
        """`message` happened (called for each, in time order, before it is yielded)."""

    def reached(self, truth: Truth, until_ms: int) -> int | None:
        """When outreach was first sent to `truth.subject` at or after its onset and before
        `until_ms`; None if it was not."""


class _NoReach:
    def saw(self, message: dict[str, Any]) -> None:
        pass

    def reached(self, truth: Truth, until_ms: int) -> int | None:
        return None


NO_REACH: Reach = _NoReach()


@dataclass
class World:
    accounts: int
    days: int
    seed: int
    start_ms: int
    effect: float = 0.0  # the true effect: outreach in time multiplies P(ticket) by 1 - effect
    onsets_within_ms: int | None = None  # problems start within this of the start (the demo)
    ticket_delay_ms: tuple[int, int] | None = None  # tickets this soon after onset (the demo)
    truth: list[Truth] = field(default_factory=list)
    # would-be tickets not yet due, by messageId: the problem and its draw
    due: dict[str, tuple[Truth, float]] = field(default_factory=dict)


_DAYS: dict[int, str] = {}
_CLOCK: list[str] = []  # "HH:MM:SS" for each second of a day, made on first use
_MILLIS = ["Z"] + [f".{ms:03d}Z" for ms in range(1, 1000)]


def stamp(ms: int) -> str:
    """`model.format_time`, several times faster: the date once per day, the time of day and
    the milliseconds from tables."""
    day, rest = divmod(ms, DAY_MS)
    prefix = _DAYS.get(day)
    if prefix is None:
        prefix = _DAYS[day] = format_time(day * DAY_MS)[:11]
    if not _CLOCK:
        _CLOCK.extend(f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86_400))
    second, milli = divmod(rest, 1000)
    return prefix + _CLOCK[second] + _MILLIS[milli]


def activity(hour_of_week: int) -> float:
    """Relative activity by hour of the week (Monday 00:00 = 0): busy weekday working hours,
    quiet nights, quieter weekends."""
    day, hour = divmod(hour_of_week, 24)
    base = 1.0 if 9 <= hour < 18 else 0.35 if 7 <= hour < 22 else 0.05
    return base * (0.3 if day >= 5 else 1.0)


def generate(
    accounts: int,
    days: int,
    seed: int,
    start_ms: int,
    effect: float = 0.0,
    reach: Reach = NO_REACH,
    onsets_within_ms: int | None = None,
    ticket_delay_ms: tuple[int, int] | None = None,
) -> tuple[World, Iterator[dict[str, Any]]]:
    """The world (its problems known at once, their tickets settled as the messages are read),
    and its messages in time order, generated hour by hour across all accounts, so memory holds
    one hour of them. `reach` says who outreach reached, for the true `effect` (0 to 1)."""
    if not 0.0 <= effect <= 1.0:
        raise ValueError(f"the effect must be between 0 and 1, not {effect}")
    world = World(accounts, days, seed, start_ms, effect, onsets_within_ms, ticket_delay_ms)
    built = [_Account(world, i, random.Random(f"{seed}:{i}")) for i in range(accounts)]
    return world, _stream(world, built, reach)


def _stream(world: World, accounts: list[_Account], reach: Reach) -> Iterator[dict[str, Any]]:
    due = world.due
    saw = None if reach is NO_REACH else reach.saw
    for hour in range(-1, world.days * 24 + 3 * 24):  # -1: what comes before the first hour
        until = world.start_ms + (hour + 1) * HOUR_MS
        batch: list[tuple[int, int, int, dict[str, Any]]] = []
        for i, account in enumerate(accounts):
            for t, seq, message in account.until(hour, until):
                batch.append((t, i, seq, message))
        batch.sort()  # (time, account, seq) never tie: the messages are not compared
        for t, _, _, message in batch:
            pending = due.pop(message["messageId"], None) if due else None
            if pending is not None and not _settle(world, reach, *pending, t):
                continue  # outreach prevented this ticket
            if saw is not None:
                saw(message)
            yield message


def _settle(world: World, reach: Reach, truth: Truth, draw: float, t: int) -> bool:
    """Whether the would-be ticket at `t` happens: with outreach in time, only if the draw is
    also under the lowered probability."""
    p = PROBLEMS[truth.kind][1]
    if world.effect > 0.0:
        truth.reached_ms = reach.reached(truth, t)
    if truth.reached_ms is not None and draw >= p * (1.0 - world.effect):
        return False
    truth.ticket_ms = t
    return True


class _Account:
    """One account: its users, rhythm and problems, decided at the start; its everyday
    events made hour by hour."""

    def __init__(self, world: World, index: int, rng: random.Random) -> None:
        self.world, self.rng = world, rng
        self.name = f"acct-{index:06d}"
        self.ids = f"sim-{world.seed}-{self.name}-"  # + seq: each message's id
        self.hours = world.days * 24
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
            "email": f"{self.users[0]}@example.test",  # the account's contact
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
        if world.onsets_within_ms is not None:
            span = min(span, world.onsets_within_ms)
        if rng.random() < PROBLEMS["usage_decay"][0]:
            self.decay_at = start + rng.randint(7, max(8, world.days - 7)) * DAY_MS
            if world.onsets_within_ms is not None:
                self.decay_at = start + rng.randrange(span)
            self.truth("usage_decay", "account", self.name, self.decay_at)
        if rng.random() < PROBLEMS["error_spike"][0]:
            onset = start + rng.randrange(max(1, span - 2 * HOUR_MS))
            t = onset
            for _ in range(rng.randint(25, 80)):
                self.track(t, self.users[0], "Error", type="ExportError")
                t += rng.randint(20_000, 70_000)
            self.truth("error_spike", "account", self.name, onset)
        if rng.random() < PROBLEMS["stuck_in_settings"][0]:
            user = rng.choice(self.users)
            onset = start + rng.randrange(max(1, span - HOUR_MS))
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
            onset = start + rng.randrange(min(span, max(1, world.days - 8) * DAY_MS))
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
        message["timestamp"] = stamp(t)
        message["messageId"] = f"{self.ids}{self.seq}"
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
        truth = Truth(kind, scope, subject, onset)
        self.world.truth.append(truth)
        draw = self.rng.random()
        if draw >= PROBLEMS[kind][1]:
            return
        ticket = onset + self.rng.randint(*(self.world.ticket_delay_ms or TICKET_DELAY_MS[kind]))
        if ticket >= self.end:
            return
        truth.would_ticket_ms = ticket
        user = self.users[0] if scope == "account" else subject
        name = "Subscription Cancelled" if kind == "usage_decay" else "Ticket Created"
        _, _, message = self.track(
            ticket, user, name, ticket_id=f"t-{self.name}-{kind}", priority="normal", problem=kind
        )
        self.world.due[message["messageId"]] = (truth, draw)

    def until(self, hour: int, until_ms: int) -> list[tuple[int, int, dict[str, Any]]]:
        """This hour's everyday events, and the decided ones before `until_ms`."""
        out = []
        pending = self.pending
        while self.next < len(pending) and pending[self.next][0] < until_ms:
            out.append(pending[self.next])
            self.next += 1
        later = self.later
        while later and later[0][0] < until_ms:
            out.append(heapq.heappop(later))
        if 0 <= hour < self.hours:
            for item in self._hour(hour):
                if item[0] < until_ms:
                    out.append(item)
                else:  # (a feature used a minute after the hour)
                    heapq.heappush(later, item)
        return out

    def _hour(self, hour: int) -> list[tuple[int, int, dict[str, Any]]]:
        rng = self.rng
        random = rng.random
        t0 = self.start + hour * HOUR_MS
        level = activity((t0 // HOUR_MS + 72) % 168)  # the epoch was a Thursday
        if self.decay_at is not None and t0 > self.decay_at:
            level *= max(0.0, 1.0 - (t0 - self.decay_at) / (14 * DAY_MS))
        chance = self.rate * level
        out: list[tuple[int, int, dict[str, Any]]] = []
        name = self.name
        ids = self.ids
        for user in self.users:
            if random() < chance:
                t = t0 + rng.randrange(HOUR_MS)
                seq = self.seq
                out.append(
                    (
                        t,
                        seq + 1,
                        {
                            "type": "track",
                            "event": "Login",
                            "userId": user,
                            "properties": {},
                            "context": {"groupId": name},
                            "timestamp": stamp(t),
                            "messageId": f"{ids}{seq + 1}",
                        },
                    )
                )
                out.append(
                    (
                        t + 1000,
                        seq + 2,
                        {
                            "type": "page",
                            "userId": user,
                            "name": "Dashboard",
                            "properties": {"path": "/dashboard"},
                            "timestamp": stamp(t + 1000),
                            "messageId": f"{ids}{seq + 2}",
                        },
                    )
                )
                seq += 2
                if random() < 0.5:
                    feature = rng.choice(FEATURES)
                    seq += 1
                    out.append(
                        (
                            t + 60_000,
                            seq,
                            {
                                "type": "track",
                                "event": "Feature Used",
                                "userId": user,
                                "properties": {"feature": feature},
                                "context": {"groupId": name},
                                "timestamp": stamp(t + 60_000),
                                "messageId": f"{ids}{seq}",
                            },
                        )
                    )
                self.seq = seq
        return out


def write_truth(truth: list[Truth], path: Path) -> Path:
    """The ground truth, one JSON line per problem."""
    with open(path, "wb") as f:
        for t in truth:
            f.write(msgspec.json.encode(t.__dict__) + b"\n")
    return path
