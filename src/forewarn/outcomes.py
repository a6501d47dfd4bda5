"""Outcomes: what happened after each firing. Pure.

Every firing — sent, held out or suppressed — is watched for its trigger's `goal` and `failure`
signals, and for engagement with its message (`Message Opened`, `Clicked`, `Dismissed`,
`Replied`, and an escalated chat's `Ticket Created`), each inside its attribution window: an
event counts for a firing when it comes after it and no later than `within`. When the longest
window has closed the outcome is final and handed on (`close`).

Alongside, for the precision and recall of a trigger against its failure signal: every failure
event in the population is counted, with whether the trigger fired for that subject in the
`within` before it (`Recall`).

The host feeds events and firings in time order: `observe(event)` before the event is applied,
`fired(firing)` as firings come, `close(now_ms)` as time passes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from forewarn.engine import Firing, State
from forewarn.model import Event
from forewarn.playbook import Signal, Trigger

ENGAGEMENT_MS = 7 * 86_400_000  # engagement with a message counts for a week after it
ENGAGEMENTS = {
    "Message Opened": "opened",
    "Message Clicked": "clicked",
    "Message Dismissed": "dismissed",
    "Message Replied": "replied",
}


class Outcome(NamedTuple):
    trigger: str
    subject: str
    scope: str
    at_ms: int
    decision: str
    reason: str | None
    goal: bool | None  # None: the trigger has no goal
    failure: bool | None  # None: the trigger has no failure signal
    engaged: frozenset[str]  # opened, clicked, dismissed, replied, escalated
    closes_ms: int
    ref: Any = None  # the host's handle on the firing (its row id)


@dataclass
class _Watch:
    firing: Firing
    closes_ms: int
    ref: Any = None
    goal_at: int | None = None
    failure_at: int | None = None
    engaged: set[str] = field(default_factory=set)

    def outcome(self, goal: Signal | None, failure: Signal | None) -> Outcome:
        f = self.firing
        return Outcome(
            f.trigger,
            f.subject,
            f.scope,
            f.at_ms,
            f.decision,
            f.reason,
            None if goal is None else self.goal_at is not None,
            None if failure is None else self.failure_at is not None,
            frozenset(self.engaged),
            self.closes_ms,
            self.ref,
        )


@dataclass
class Recall:
    """Failures in the population, and those the trigger fired for beforehand."""

    failures: int = 0
    foreseen: int = 0

    @property
    def rate(self) -> float | None:
        return self.foreseen / self.failures if self.failures else None


class Outcomes:
    def __init__(self, triggers: Iterable[Trigger], state: State | None = None) -> None:
        self.specs = {t.id: t for t in triggers}
        self.state = state  # to tell which accounts a user belongs to
        self.members: dict[str, list[str]] = {}  # learned from group calls, without a state
        self.open: dict[tuple[str, str], list[_Watch]] = {}  # (scope, subject) -> watches
        self._closing: list[tuple[int, int, _Watch]] = []
        self._seq = 0
        self.recall = {t.id: Recall() for t in self.specs.values() if t.failure is not None}
        # per trigger with a failure signal: the subjects' firing times, for recall
        self._fired: dict[str, dict[str, list[int]]] = {tid: {} for tid in self.recall}
        self._failure_names = {t.failure.event for t in self.specs.values() if t.failure}
        self._goal_names = {t.goal.event for t in self.specs.values() if t.goal}

    def fired(self, firing: Firing, ref: Any = None) -> None:
        spec = self.specs.get(firing.trigger)
        if spec is None:
            return
        spans = [s.within_ms for s in (spec.goal, spec.failure) if s is not None]
        span = max([*spans, ENGAGEMENT_MS if firing.decision == "send" else 0])
        watch = _Watch(firing, firing.at_ms + span, ref)
        self.open.setdefault((firing.scope, firing.subject), []).append(watch)
        self._seq += 1
        heapq.heappush(self._closing, (watch.closes_ms, self._seq, watch))
        if firing.trigger in self._fired:
            self._fired[firing.trigger].setdefault(firing.subject, []).append(firing.at_ms)

    def observe(self, event: Event) -> None:
        """An event, before it is applied: does it settle a goal, a failure or engagement?"""
        if event.kind == "group" and self.state is None and event.account_id is not None:
            person = event.user_id or event.anonymous_id
            if person is not None:
                joined = self.members.setdefault(person, [])
                if event.account_id not in joined:
                    joined.append(event.account_id)
        if event.kind != "track":
            return
        name = event.name
        engagement = ENGAGEMENTS.get(name)
        escalation = name == "Ticket Created" and event.properties.get("escalation") is True
        interesting = engagement is not None or escalation or name in self._failure_names
        if not interesting and name not in self._goal_names:
            return
        for scope, subject in self._subjects_of(event):
            if name in self._failure_names:
                self._count_failure(scope, subject, event)
            watches = self.open.get((scope, subject), ())
            for watch in watches:
                self._settle(watch, event)
            if engagement is not None or escalation:
                self._engage(watches, event, engagement or "escalated")

    def _subjects_of(self, event: Event) -> list[tuple[str, str]]:
        found = []
        person = event.user_id or event.anonymous_id
        if person is not None:
            found.append(("user", person))
        if event.account_id is not None:
            found.append(("account", event.account_id))
        elif person is not None and self.state is not None:
            user = self.state.users.get(person)
            for account in (user.accounts or []) if user is not None else []:
                found.append(("account", account))
        elif person is not None:
            found.extend(("account", a) for a in self.members.get(person, ()))
        return found

    def _engage(self, watches: Iterable[_Watch], event: Event, what: str) -> None:
        """Engagement is with one message: the trigger's latest before it, for the subject."""
        t = event.timestamp_ms
        trigger = event.properties.get("trigger")
        latest = None
        for watch in watches:
            f = watch.firing
            if (
                f.trigger == trigger
                and f.at_ms < t <= f.at_ms + ENGAGEMENT_MS
                and (latest is None or f.at_ms > latest.firing.at_ms)
            ):
                latest = watch
        if latest is not None:
            latest.engaged.add(what)

    def _settle(self, watch: _Watch, event: Event) -> None:
        f = watch.firing
        t = event.timestamp_ms
        if t <= f.at_ms:
            return
        spec = self.specs[f.trigger]
        for signal, attr in ((spec.goal, "goal_at"), (spec.failure, "failure_at")):
            if (
                signal is not None
                and getattr(watch, attr) is None
                and event.name == signal.event
                and t <= f.at_ms + signal.within_ms
                and signal.where.matches(event.properties)
            ):
                setattr(watch, attr, t)

    def _count_failure(self, scope: str, subject: str, event: Event) -> None:
        t = event.timestamp_ms
        for tid, recall in self.recall.items():
            spec = self.specs[tid]
            failure = spec.failure
            assert failure is not None
            if spec.scope != scope or not failure.where.matches(event.properties):
                continue
            if event.name != failure.event:
                continue
            recall.failures += 1
            times = self._fired[tid].get(subject, ())
            if any(t - failure.within_ms <= at < t for at in times):
                recall.foreseen += 1

    def close(self, now_ms: int) -> list[Outcome]:
        """The outcomes whose windows have closed by `now_ms`."""
        out = []
        closing = self._closing
        while closing and closing[0][0] <= now_ms:
            _, _, watch = heapq.heappop(closing)
            out.append(self._done(watch))
        return out

    def finish(self) -> list[Outcome]:
        """Every outcome still open (at the end of the data: windows cut short)."""
        out = [self._done(w) for _, _, w in sorted(self._closing, key=lambda c: (c[0], c[1]))]
        self._closing.clear()
        return out

    def _done(self, watch: _Watch) -> Outcome:
        f = watch.firing
        watches = self.open.get((f.scope, f.subject))
        if watches is not None:
            watches.remove(watch)
            if not watches:
                del self.open[(f.scope, f.subject)]
        spec = self.specs[f.trigger]
        return watch.outcome(spec.goal, spec.failure)


def tally(
    outcomes: Iterable[Outcome], key: Callable[[Outcome], Any] = lambda o: o.trigger
) -> dict[Any, dict[str, Any]]:
    """Counts per trigger (or `key`): firings, subjects, decisions and reasons, and per group
    (treated = sent, control = held out) the goals, failures and engagement."""
    rows: dict[Any, dict[str, Any]] = {}
    subjects: dict[Any, set[str]] = {}
    for o in outcomes:
        k = key(o)
        row = rows.get(k)
        if row is None:
            row = rows[k] = {
                "firings": 0,
                "decisions": {},
                "treated": _group(),
                "control": _group(),
            }
            subjects[k] = set()
        row["firings"] += 1
        subjects[k].add(o.subject)
        decided = o.decision if o.decision != "suppressed" else f"suppressed:{o.reason}"
        row["decisions"][decided] = row["decisions"].get(decided, 0) + 1
        if o.reason == "deferred:quiet_hours":  # sent, but later: what quiet hours held back
            row["decisions"][o.reason] = row["decisions"].get(o.reason, 0) + 1
        group = {"send": "treated", "held_out": "control"}.get(o.decision)
        if group is None:
            continue
        g = row[group]
        g["n"] += 1
        g["goals"] += bool(o.goal)
        g["failures"] += bool(o.failure)
        for what in o.engaged:
            g[what] = g.get(what, 0) + 1
    for k, row in rows.items():
        row["subjects"] = len(subjects[k])
    return rows


def _group() -> dict[str, int]:
    return {"n": 0, "goals": 0, "failures": 0}
