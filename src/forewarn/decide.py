"""Decide: turn a firing into send, held_out or suppressed with a named reason. Pure.

The policy, in order; the first rule that applies names the firing's reason:

1. the trigger is paused (by hand or by the auto-guard) → `paused`; it runs in shadow mode →
   `shadow`;
2. the subject unsubscribed from the channel or from everything, or its email address bounced
   or complained → `unsubscribed` / `bounced`;
3. the account is suppressed: an open urgent ticket, an incident declared, `do_not_contact`
   → `account_suppressed`;
4. another trigger about the same problem already reached out in this episode
   → `episode_handled`;
5. a new episode inside the trigger's cooldown → `cooldown`;
6. a frequency cap (global or the channel's) over a sliding window would be exceeded
   → `frequency_cap`;
7. a trigger of equal or higher priority reached out within the priority window
   → `lower_priority` (and a lower one still held back is displaced by this one);
8. the holdout draw → `held_out`: recorded as "would have sent", and counted by the caps and
   the episode like a send, so both groups meet the same policy;
9. quiet hours in the subject's time zone: sent when they end → `deferred:quiet_hours`.

Consent, caps and quiet hours protect the customer; a `webhook` goes to the team, so they do not
apply to it. Holdout is a stable hash of (trigger, subject, salt), never a random draw, so a
subject stays in the same group for a trigger across replays, restarts and machines.

Every email, push and webhook is held for the priority window before it may go (`send_at_ms`),
so that a more important trigger firing a moment later can still take its place. In-app and chat
messages are seen while the subject is using the product: they go at once, and quiet hours do
not hold them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

SEND = "send"
HELD_OUT = "held_out"
SUPPRESSED = "suppressed"
DEFERRED = "deferred:quiet_hours"

# Every reason the policy can give; docs/ must describe each one.
REASONS = {
    "paused": "the trigger is paused, by hand or by the auto-guard: recorded, not sent",
    "shadow": "the trigger runs in shadow mode: decisions are recorded, nothing is sent",
    "unsubscribed": "the subject unsubscribed from this channel or from all outreach",
    "bounced": "the subject's email address bounced for good or complained",
    "account_suppressed": (
        "the account is not to be contacted now: an open urgent ticket, an incident declared, "
        "or the do_not_contact trait"
    ),
    "episode_handled": "another trigger about the same problem already reached out this episode",
    "cooldown": "a new episode began within the trigger's cooldown for this subject",
    "frequency_cap": "sending would exceed a frequency cap for this subject",
    "lower_priority": "a trigger of equal or higher priority reached out within the window",
    DEFERRED: "sent when the subject's quiet hours end, not dropped",
}

TEAM_CHANNELS = frozenset({"webhook"})  # reach the team, not the customer
# seen while the subject is in the product, so they go at once: not held for the priority
# window (a stuck user needs the chat now) nor for quiet hours (they are using the product)
LIVE_CHANNELS = frozenset({"in_app", "chat"})
DAY_MS = 86_400_000


class Cap(NamedTuple):
    max: int
    per_ms: int


@dataclass(frozen=True)
class Policy:
    """The settings of the policy (see docs/concepts.md)."""

    caps: tuple[Cap, ...] = (Cap(2, 7 * DAY_MS), Cap(1, DAY_MS))
    channel_caps: Mapping[str, tuple[Cap, ...]] = field(default_factory=dict)
    quiet_start_min: int = 21 * 60  # local minutes after midnight
    quiet_end_min: int = 8 * 60
    timezone: str = "UTC"  # for subjects without a valid `timezone` trait
    priority_window_ms: int = 30_000
    episode_ms: int = 3 * DAY_MS
    salt: str = "forewarn"

    def horizon_ms(self) -> int:
        """How far back the history must reach for every rule to see what it needs."""
        spans = [c.per_ms for c in self.caps]
        spans += [c.per_ms for caps in self.channel_caps.values() for c in caps]
        return max([self.episode_ms, self.priority_window_ms, DAY_MS, *spans]) * 2


class Facts(NamedTuple):
    """What the host knows about the subject at the firing, beyond the firing itself."""

    traits: Mapping[str, Any] = {}  # the subject's (and, for a user, its account's merged under)
    unsubscribed: frozenset[str] = frozenset()  # channels; "*" for everything
    bounced: bool = False  # the email address is suppressed
    account_suppressed: str | None = None  # why, when the account is not to be contacted


class Spec(NamedTuple):
    """What the policy reads of a trigger."""

    id: str
    channel: str
    mode: str = "live"
    priority: int = 0
    holdout: float = 0.0
    problem: str | None = None


@dataclass(eq=False)  # compared by identity: two alike sends are still two
class Record:
    """One outreach decided (sent, pending or held out), as the caps and episodes see it."""

    trigger: str
    channel: str
    problem: str | None
    priority: int
    at_ms: int
    send_at_ms: int
    ref: Any = None  # the host's handle on it (the firing, or its row id)


class Decision(NamedTuple):
    decision: str
    reason: str | None
    send_at_ms: int | None = None
    displaced: tuple[Record, ...] = ()  # earlier outreach this one takes the place of


def holdout_bucket(trigger_id: str, subject: str, salt: str) -> float:
    """A number in [0, 1) fixed by (trigger, subject, salt)."""
    digest = hashlib.blake2b(f"{trigger_id}\x1f{subject}\x1f{salt}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2.0**64


def decide(
    trigger_id: str, subject: str, *, mode: str, holdout: float, in_cooldown: bool, salt: str
) -> tuple[str, str | None]:
    """The trigger's own verdict, before any history or fact about the subject is known."""
    if mode == "shadow":
        return SUPPRESSED, "shadow"
    if in_cooldown:
        return SUPPRESSED, "cooldown"
    if holdout > 0 and holdout_bucket(trigger_id, subject, salt) < holdout:
        return HELD_OUT, None
    return SEND, None


class History:
    """The outreach decided per subject, over the policy's horizon: the policy's only state.
    The live host rebuilds it from its decisions table; replay keeps it in memory."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.by_subject: dict[tuple[str, str], list[Record]] = {}  # (scope, subject)

    def add(self, scope: str, subject: str, record: Record) -> None:
        self.by_subject.setdefault((scope, subject), []).append(record)

    def remove(self, scope: str, subject: str, record: Record) -> None:
        records = self.by_subject.get((scope, subject))
        if records is not None and record in records:
            records.remove(record)

    def reset(self, scope: str, subject: str, records: list[Record]) -> None:
        """The subject's records are these, oldest first: for a host that keeps them elsewhere
        too (the scale-out workers read a person's from every partition's firings)."""
        self.by_subject[(scope, subject)] = records

    def of(self, scope: str, subject: str, now_ms: int) -> list[Record]:
        """The subject's records still inside the horizon (older ones are forgotten)."""
        records = self.by_subject.get((scope, subject))
        if not records:
            return []
        oldest = now_ms - self.policy.horizon_ms()
        if records[0].at_ms < oldest:
            records[:] = [r for r in records if r.at_ms >= oldest]
        return records

    def decide(
        self,
        spec: Spec,
        scope: str,
        subject: str,
        at_ms: int,
        cooldown: bool,
        facts: Facts,
        ref: Any = None,
    ) -> Decision:
        """The decision for one firing; records it (with the host's `ref`) when it reaches out
        or would have."""
        decision = evaluate(
            self.policy, spec, subject, at_ms, cooldown, facts, self.of(scope, subject, at_ms)
        )
        if decision.decision != SUPPRESSED:
            for old in decision.displaced:
                self.remove(scope, subject, old)
            send_at = decision.send_at_ms if decision.send_at_ms is not None else at_ms
            record = Record(spec.id, spec.channel, spec.problem, spec.priority, at_ms, send_at, ref)
            self.add(scope, subject, record)
        return decision


def evaluate(
    policy: Policy,
    spec: Spec,
    subject: str,
    at_ms: int,
    cooldown: bool,
    facts: Facts,
    history: Iterable[Record],
) -> Decision:
    """The policy for one firing, given the subject's recent outreach. Pure."""
    if spec.mode in ("paused", "shadow"):
        return Decision(SUPPRESSED, spec.mode)
    customer = spec.channel not in TEAM_CHANNELS
    traits = facts.traits
    if customer:
        if (
            "*" in facts.unsubscribed
            or spec.channel in facts.unsubscribed
            or traits.get("unsubscribed") is True
        ):
            return Decision(SUPPRESSED, "unsubscribed")
        if spec.channel == "email" and facts.bounced:
            return Decision(SUPPRESSED, "bounced")
    if facts.account_suppressed is not None or _truthy(traits.get("do_not_contact")):
        return Decision(SUPPRESSED, "account_suppressed")
    records = list(history)
    if spec.problem is not None:
        since = at_ms - policy.episode_ms
        for r in records:
            if r.problem == spec.problem and r.trigger != spec.id and r.at_ms > since:
                return Decision(SUPPRESSED, "episode_handled")
    if cooldown:
        return Decision(SUPPRESSED, "cooldown")
    # the messages still held back that this one would take the place of
    window_start = at_ms - policy.priority_window_ms
    displaced = tuple(
        r
        for r in records
        if r.at_ms > window_start
        and r.send_at_ms > at_ms
        and r.priority < spec.priority
        and customer == (r.channel not in TEAM_CHANNELS)
    )
    held = spec.channel not in LIVE_CHANNELS
    send_at = at_ms + policy.priority_window_ms if held else at_ms
    if customer:
        if held:
            send_at = quiet_end(policy, traits.get("timezone"), send_at)
        kept = [r for r in records if r not in displaced and r.channel not in TEAM_CHANNELS]
        if _over_cap(policy.caps, [r.send_at_ms for r in kept], send_at) or _over_cap(
            policy.channel_caps.get(spec.channel, ()),
            [r.send_at_ms for r in kept if r.channel == spec.channel],
            send_at,
        ):
            return Decision(SUPPRESSED, "frequency_cap")
    for r in records:
        if (
            r.at_ms > window_start
            and r not in displaced
            and r.priority >= spec.priority
            and customer == (r.channel not in TEAM_CHANNELS)
        ):
            return Decision(SUPPRESSED, "lower_priority")
    deferred = held and send_at > at_ms + policy.priority_window_ms
    reason = DEFERRED if deferred else None
    if spec.holdout > 0 and holdout_bucket(spec.id, subject, policy.salt) < spec.holdout:
        return Decision(HELD_OUT, reason, send_at, displaced)
    return Decision(SEND, reason, send_at, displaced)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return value is True or (isinstance(value, int | float) and value != 0)


def _over_cap(caps: Iterable[Cap], times: list[int], new_ms: int) -> bool:
    """Whether adding a send at `new_ms` puts more than `max` sends in some window of `per_ms`
    (windows are half-open, like the engine's)."""
    for cap in caps:
        near = sorted(t for t in times if new_ms - cap.per_ms < t < new_ms + cap.per_ms)
        if len(near) < cap.max:
            continue
        near.append(new_ms)
        near.sort()
        lo = 0
        for hi, t in enumerate(near):
            while t - near[lo] >= cap.per_ms:
                lo += 1
            if hi - lo + 1 > cap.max:
                return True
    return False


@lru_cache(maxsize=1024)
def zone(name: str | None, default: str) -> ZoneInfo:
    """The subject's time zone; the default when the trait is missing or not a known zone."""
    if isinstance(name, str) and name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return ZoneInfo(default)


def quiet_end(policy: Policy, timezone: Any, at_ms: int) -> int:
    """`at_ms` if it is outside the quiet hours of the zone, else the moment they end."""
    start, end = policy.quiet_start_min, policy.quiet_end_min
    if start == end:
        return at_ms
    tz = zone(timezone if isinstance(timezone, str) else None, policy.timezone)
    local = datetime.fromtimestamp(at_ms / 1000, tz)
    minute = local.hour * 60 + local.minute
    quiet = start <= minute < end if start < end else minute >= start or minute < end
    if not quiet:
        return at_ms
    day = local.date() if minute < end else local.date() + timedelta(days=1)
    ends = datetime(day.year, day.month, day.day, end // 60, end % 60, tzinfo=tz)
    return max(at_ms, int(ends.timestamp() * 1000))


# --- settings ---------------------------------------------------------------------------------

_CAP = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": DAY_MS, "w": 7 * DAY_MS}
_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def parse_caps(text: str) -> tuple[Cap, ...]:
    """`2/7d,1/1d`: at most 2 per 7 days and 1 per day. Empty or `off`: no cap."""
    if text.strip().lower() in ("off", "none"):
        return ()
    caps = []
    for part in text.split(","):
        if not part.strip():
            continue
        m = _CAP.match(part)
        if m is None or int(m.group(1)) == 0:
            raise ValueError(
                f"bad frequency cap {part.strip()!r}: write MAX/DURATION, e.g. 2/7d or 1/1d"
            )
        caps.append(Cap(int(m.group(1)), int(m.group(2)) * _UNITS[m.group(3)]))
    return tuple(caps)


def parse_channel_caps(text: str) -> dict[str, tuple[Cap, ...]]:
    """`email=1/3d;push=1/1d,3/7d`."""
    caps: dict[str, tuple[Cap, ...]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, eq, rest = part.partition("=")
        if not eq or not name.strip():
            raise ValueError(
                f"bad channel caps {part.strip()!r}: write CHANNEL=MAX/DURATION, "
                "e.g. email=1/3d;push=1/1d,3/7d"
            )
        caps[name.strip()] = parse_caps(rest)
    return caps


def parse_quiet_hours(text: str) -> tuple[int, int]:
    """`21:00-08:00` as local minutes after midnight; `off` for none."""
    if text.strip().lower() in ("off", "none", ""):
        return 0, 0
    first, dash, second = text.partition("-")
    a, b = _CLOCK.match(first.strip()), _CLOCK.match(second.strip())
    if not dash or a is None or b is None:
        raise ValueError(f"bad quiet hours {text!r}: write HH:MM-HH:MM, e.g. 21:00-08:00, or off")
    return int(a.group(1)) * 60 + int(a.group(2)), int(b.group(1)) * 60 + int(b.group(2))
