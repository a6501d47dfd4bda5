"""A partition of the scale-out mode: an account with its users, or a user without an account.
Its engine state (the subjects, the clock) and its policy state (the outreach history) are
stored as one record; a worker that claims the partition restores them into a fresh engine,
applies the partition's events, and stores them again. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from forewarn import decide, engine
from forewarn.engine import Subject, Timer
from forewarn.model import Event
from forewarn.policy import Outreach
from forewarn.runner import Runner
from forewarn.signals import NEVER


class PartState(msgspec.Struct, array_like=True):
    """One partition's state as stored: the engine's and the policy's."""

    clock_ms: int | None
    applied_ms: int
    users: dict[str, Subject]
    accounts: dict[str, Subject]
    aliases: dict[str, str]
    members: dict[str, list[str]]
    urgent: dict[str, list[str]]
    # (scope, subject, trigger, channel, problem, priority, at_ms, send_at_ms, firing id)
    history: list[tuple[str, str, str, str, str | None, int, int, int, int]]


encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder(PartState).decode


@dataclass
class Part:
    """A partition claimed for a step: its engine, its policy, its events in log order."""

    name: str
    runner: Runner
    outreach: Outreach
    events: list[Event] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


def restore(runner: Runner, outreach: Outreach, snap: PartState) -> None:
    """Load a stored state into a fresh engine and policy; the timers are the deadlines
    filed in the subjects' trigger states."""
    state = runner.state
    state.users, state.accounts = snap.users, snap.accounts
    state.aliases, state.members, state.urgent = snap.aliases, snap.members, snap.urgent
    runner.clock_ms, runner.applied_ms = snap.clock_ms, snap.applied_ms
    for ct in state.book.triggers:
        for key, subject in state.subjects(ct.account).items():
            ts = subject.states[ct.slot] if subject.states else None
            if ts is not None and ts[engine.FILED] != NEVER:
                runner._timers.add(Timer(ts[engine.FILED], ct.index, key))
    history = outreach.history
    for scope, who, trig, channel, problem, priority, at, send_at, fid in snap.history:
        history.add(scope, who, decide.Record(trig, channel, problem, priority, at, send_at, fid))


def snapshot(runner: Runner, outreach: Outreach) -> bytes:
    """The engine's and the policy's state, to store (the policy's history within its
    horizon)."""
    state = runner.state
    clock = runner.clock_ms or 0
    history = []
    for scope, subject in list(outreach.history.by_subject):
        for r in outreach.history.of(scope, subject, clock):
            ref = r.ref if isinstance(r.ref, int) else 0
            history.append(
                (
                    scope,
                    subject,
                    r.trigger,
                    r.channel,
                    r.problem,
                    r.priority,
                    r.at_ms,
                    r.send_at_ms,
                    ref,
                )
            )
    return encode(
        PartState(
            runner.clock_ms,
            runner.applied_ms,
            state.users,
            state.accounts,
            state.aliases,
            state.members,
            state.urgent,
            history,
        )
    )


def next_due(*tables: dict[str, Subject]) -> int:
    """The earliest timer filed in the states of these subjects (NEVER when none is)."""
    due = NEVER
    for table in tables:
        for subject in table.values():
            for ts in subject.states or ():
                if ts is not None and ts[engine.FILED] < due:
                    due = ts[engine.FILED]
    return due


def move_user(snap: PartState, into: Part, who: str) -> None:
    """Move a user's subject, aliases, open tickets, policy history and timers from a user
    partition's state into an account partition's."""
    runner, outreach = into.runner, into.outreach
    state = runner.state
    if who in state.users:  # met here already: what it did elsewhere stays there
        return
    subject = snap.users.pop(who, None)
    if subject is not None:
        state.users[who] = subject
        for ct in state.book.triggers:
            ts = subject.states[ct.slot] if subject.states and not ct.account else None
            if ts is not None and ts[engine.FILED] != NEVER:
                runner._timers.add(Timer(ts[engine.FILED], ct.index, who))
    for alias, target in list(snap.aliases.items()):
        if target == who:
            state.aliases[alias] = snap.aliases.pop(alias)
    tickets = snap.urgent.pop("user:" + who, None)
    if tickets is not None:
        state.urgent["user:" + who] = tickets
    kept = []
    for entry in snap.history:
        scope, subject_id, trig, channel, problem, priority, at, send_at, fid = entry
        if scope == "user" and subject_id == who:
            outreach.history.add(
                scope, who, decide.Record(trig, channel, problem, priority, at, send_at, fid)
            )
        else:
            kept.append(entry)
    snap.history = kept
