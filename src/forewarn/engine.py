"""The trigger engine: pure, deterministic and incremental.

    apply(state, event, now_ms)    -> (state, firings, timers)
    on_timer(state, timer, now_ms) -> (state, firings, timers)

No I/O, no wall clock, no randomness. `state` is mutated in place and returned. `timers` are
requests to call `on_timer` at `timer.due_ms`; the host keeps them. A subject's deadline lives in
its trigger state, so a timer whose deadline has since moved is recognised and ignored: the host
never has to cancel anything, and moving a deadline later costs no new timer.

A trigger fires on the rising edge of its condition for a subject, once per episode; it re-arms
when the condition has been false again. A rising edge within the cooldown is recorded as
suppressed with reason `cooldown`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec

from forewarn import decide, signals
from forewarn import playbook as pb
from forewarn.model import Event, format_time
from forewarn.playbook import Trigger
from forewarn.signals import NEVER, Ctx, Leaf


class Timer(NamedTuple):
    due_ms: int
    trigger: int  # index into the engine's triggers
    subject: str


class Firing(msgspec.Struct):
    trigger: str
    subject: str
    scope: str
    at_ms: int
    evidence: dict[str, Any]
    decision: str
    reason: str | None
    channel: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger,
            "subject": self.subject,
            "scope": self.scope,
            "at": format_time(self.at_ms),
            "evidence": self.evidence,
            "decision": self.decision,
            "reason": self.reason,
            "channel": self.channel,
        }


_NO_LEAVES: list[Any] = []


class TState:
    """One trigger's state for one subject."""

    __slots__ = ("active", "deadline", "episode", "filed", "leaves")

    def __init__(self, leaves: list[Any]) -> None:
        self.active = False
        self.episode = -1  # when the current cooldown started
        self.deadline = NEVER  # when the condition must be checked again without events
        self.filed = NEVER  # the earliest timer handed to the host for this key
        self.leaves = leaves


class Subject:
    """A user or an account: first seen, the traits the playbooks read, trigger states."""

    __slots__ = ("accounts", "first_seen", "states", "traits")

    def __init__(self, first_seen: int) -> None:
        self.first_seen = first_seen
        self.traits: dict[str, Any] | None = None
        self.states: dict[int, TState] | None = None
        self.accounts: list[str] | None = None  # users: accounts joined, newest last


class CompiledTrigger:
    __slots__ = (
        "account",
        "cond",
        "index",
        "instant",
        "leaves",
        "spec",
        "stateful",
        "trait_driven",
    )

    def __init__(self, index: int, spec: Trigger) -> None:
        self.index = index
        self.spec = spec
        self.account = spec.scope == "account"
        self.cond: Leaf = signals.compile_condition(spec.when)
        self.leaves = self.cond.leaves()
        stateful = [leaf for leaf in self.leaves if leaf.names or leaf.pages]
        for slot, leaf in enumerate(stateful):
            leaf.slot = slot
        self.stateful = bool(stateful)
        self.instant = any(
            (isinstance(leaf, signals.EventLeaf) and not leaf.within) or leaf.uses_properties
            for leaf in self.leaves
        )
        self.trait_driven = any(leaf.uses_traits for leaf in self.leaves)

    def new_state(self) -> TState:
        if not self.stateful:
            return TState(_NO_LEAVES)  # shared: triggers without stateful leaves never write it
        return TState([leaf.new() for leaf in self.leaves if leaf.slot >= 0])


class Playbook:
    """Triggers compiled and indexed by what can change them."""

    def __init__(self, triggers: Iterable[Trigger], salt: str = "forewarn") -> None:
        self.salt = salt
        self.triggers = [CompiledTrigger(i, t) for i, t in enumerate(triggers)]
        # event name -> [(trigger, leaves fed by it)], per scope
        self.by_name: tuple[dict[str, list[tuple[CompiledTrigger, list[Leaf]]]], ...] = ({}, {})
        self.pages: list[tuple[CompiledTrigger, list[Leaf]]] = []
        self.on_traits: tuple[list[CompiledTrigger], list[CompiledTrigger]] = ([], [])
        self.on_any_track: tuple[list[CompiledTrigger], list[CompiledTrigger]] = ([], [])
        user_traits: set[str] = set()
        account_traits: set[str] = set()
        for ct in self.triggers:
            scope = int(ct.account)
            names: dict[str, list[Leaf]] = {}
            for leaf in ct.leaves:
                for name in leaf.names:
                    names.setdefault(name, []).append(leaf)
            for name, leaves in names.items():
                self.by_name[scope].setdefault(name, []).append((ct, leaves))
            page_leaves = [leaf for leaf in ct.leaves if leaf.pages]
            if page_leaves:
                self.pages.append((ct, page_leaves))
            if ct.trait_driven:
                self.on_traits[scope].append(ct)
            if ct.instant and any(leaf.uses_properties for leaf in ct.leaves):
                self.on_any_track[scope].append(ct)
            for root, path in _trait_refs(ct.spec):
                if root == "account" or ct.account:
                    account_traits.add(path[0])
                else:
                    user_traits.add(path[0])
        self.user_traits = frozenset(user_traits)
        self.account_traits = frozenset(account_traits)


def _trait_refs(spec: Trigger) -> list[tuple[str, tuple[str, ...]]]:
    refs: list[tuple[str, tuple[str, ...]]] = []

    def walk(cond: pb.Condition) -> None:
        if isinstance(cond, pb.AllCond | pb.AnyCond):
            for child in cond.of:
                walk(child)
        elif isinstance(cond, pb.NotCond):
            walk(cond.of)
        elif isinstance(cond, pb.ThresholdCond):
            refs.extend(n for n in cond.value.names if n[0] != "properties")
        elif isinstance(cond, pb.DateCond):
            refs.append(cond.trait)
        elif isinstance(cond, pb.AgeCond):
            refs.append(cond.since)
        elif isinstance(cond, pb.TraitsCond):
            refs.extend(ref for ref, _ in cond.pairs)

    walk(spec.when)
    return refs


class State:
    """Everything the engine remembers; plain Python objects, built only from events."""

    def __init__(self, book: Playbook) -> None:
        self.book = book
        self.users: dict[str, Subject] = {}
        self.accounts: dict[str, Subject] = {}
        self.aliases: dict[str, str] = {}

    def account_traits_of(self, user: Subject) -> dict[str, Any] | None:
        if not user.accounts:
            return None
        account = self.accounts.get(user.accounts[-1])
        return account.traits if account is not None else None

    def subjects(self, account: bool) -> dict[str, Subject]:
        return self.accounts if account else self.users


def _merge_traits(subject: Subject, traits: dict[str, Any], keep: frozenset[str]) -> bool:
    changed = False
    for key in keep:
        if key in traits:
            if subject.traits is None:
                subject.traits = {}
            subject.traits[key] = traits[key]
            changed = True
    return changed


def _subject(table: dict[str, Subject], key: str, t_ms: int) -> Subject:
    subject = table.get(key)
    if subject is None:
        subject = table[key] = Subject(t_ms)
    elif t_ms < subject.first_seen:
        subject.first_seen = t_ms
    return subject


def apply(state: State, event: Event, now_ms: int) -> tuple[State, list[Firing], list[Timer]]:
    """Apply one event at engine time `now_ms` (>= the event's timestamp; later for late
    events, whose counts still land in the event's own bucket)."""
    firings: list[Firing] = []
    timers: list[Timer] = []
    book = state.book
    t = event.timestamp_ms
    person = event.user_id
    if person is None:
        anon = event.anonymous_id or ""
        person = state.aliases.get(anon, anon)
    user = _subject(state.users, person, t)
    kind = event.kind
    user_traits_changed = account_traits_changed = False
    if kind == "identify":
        user_traits_changed = _merge_traits(user, event.traits, book.user_traits)
    elif kind == "group":
        account_id = event.account_id or ""
        if user.accounts is None:
            user.accounts = [account_id]
        elif account_id not in user.accounts:
            user.accounts.append(account_id)
        account = _subject(state.accounts, account_id, t)
        account_traits_changed = _merge_traits(account, event.traits, book.account_traits)
    elif kind == "alias" and event.previous_id is not None and event.user_id is not None:
        state.aliases[event.previous_id] = event.user_id
    accounts = [event.account_id] if event.account_id is not None else (user.accounts or ())

    # user-scoped triggers
    if kind == "track":
        for ct, leaves in book.by_name[0].get(event.name, ()):
            _feed_and_check(state, ct, person, user, leaves, event, now_ms, firings, timers)
        for ct in book.on_any_track[0]:
            _check(state, ct, person, user, event, now_ms, firings, timers)
    elif kind == "page":
        for ct, leaves in book.pages:
            _feed_and_check(state, ct, person, user, leaves, event, now_ms, firings, timers)
    elif user_traits_changed or account_traits_changed:  # account.* may have changed
        for ct in book.on_traits[0]:
            _check(state, ct, person, user, event, now_ms, firings, timers)

    # account-scoped triggers see the events of all the account's users
    for account_id in accounts:
        account = _subject(state.accounts, account_id, t)
        if kind == "track":
            for ct, leaves in book.by_name[1].get(event.name, ()):
                _feed_and_check(
                    state, ct, account_id, account, leaves, event, now_ms, firings, timers
                )
            for ct in book.on_any_track[1]:
                _check(state, ct, account_id, account, event, now_ms, firings, timers)
        elif account_traits_changed and account_id == event.account_id:
            for ct in book.on_traits[1]:
                _check(state, ct, account_id, account, event, now_ms, firings, timers)
    return state, firings, timers


def on_timer(state: State, timer: Timer, now_ms: int) -> tuple[State, list[Firing], list[Timer]]:
    """A timer came due. Stale timers (their deadline moved) change nothing."""
    firings: list[Firing] = []
    timers: list[Timer] = []
    ct = state.book.triggers[timer.trigger]
    subject = state.subjects(ct.account).get(timer.subject)
    if subject is None or subject.states is None:
        return state, firings, timers
    ts = subject.states.get(ct.index)
    if ts is None or ts.filed != timer.due_ms:
        return state, firings, timers
    ts.filed = NEVER
    if ts.deadline > now_ms:  # the deadline moved later: hand the host the new one
        _file(ct, timer.subject, ts, timers)
        return state, firings, timers
    _evaluate(state, ct, timer.subject, subject, ts, None, now_ms, firings, timers)
    return state, firings, timers


def _tstate(ct: CompiledTrigger, subject: Subject) -> TState:
    states = subject.states
    if states is None:
        states = subject.states = {}
    ts = states.get(ct.index)
    if ts is None:
        ts = states[ct.index] = ct.new_state()
    return ts


def _feed_and_check(
    state: State,
    ct: CompiledTrigger,
    key: str,
    subject: Subject,
    leaves: list[Leaf],
    event: Event,
    now: int,
    firings: list[Firing],
    timers: list[Timer],
) -> None:
    ts = _tstate(ct, subject)
    fed = False
    for leaf in leaves:
        if leaf.feed(ts, event, now):
            fed = True
    if fed:
        _evaluate(state, ct, key, subject, ts, event, now, firings, timers)


def _check(
    state: State,
    ct: CompiledTrigger,
    key: str,
    subject: Subject,
    event: Event,
    now: int,
    firings: list[Firing],
    timers: list[Timer],
) -> None:
    _evaluate(state, ct, key, subject, _tstate(ct, subject), event, now, firings, timers)


def _evaluate(
    state: State,
    ct: CompiledTrigger,
    key: str,
    subject: Subject,
    ts: TState,
    event: Event | None,
    now: int,
    firings: list[Firing],
    timers: list[Timer],
) -> None:
    c = Ctx(state, subject, ts, event, now)
    truth = ct.cond.test(c)
    if truth and not ts.active:
        firings.append(_fire(state, ct, key, ts, c))
    if truth and ct.instant and event is not None:
        c.event = None  # at rest after the instant: re-arms for the next matching event
        truth = ct.cond.test(c)
    ts.active = truth
    ts.deadline = ct.cond.next(c, truth)
    if ts.deadline < ts.filed:
        _file(ct, key, ts, timers)


def _file(ct: CompiledTrigger, key: str, ts: TState, timers: list[Timer]) -> None:
    if ts.deadline != NEVER:
        ts.filed = ts.deadline
        timers.append(Timer(ts.deadline, ct.index, key))


def _fire(state: State, ct: CompiledTrigger, key: str, ts: TState, c: Ctx) -> Firing:
    spec = ct.spec
    now = c.now
    in_cooldown = ts.episode >= 0 and now < ts.episode + spec.cooldown_ms
    if not in_cooldown:
        ts.episode = now
    decision, reason = decide.decide(
        spec.id,
        key,
        mode=spec.mode,
        holdout=spec.holdout,
        in_cooldown=in_cooldown,
        salt=state.book.salt,
    )
    return Firing(
        trigger=spec.id,
        subject=key,
        scope=spec.scope,
        at_ms=now,
        evidence=ct.cond.explain(c),
        decision=decision,
        reason=reason,
        channel=spec.action.channel,
    )


def explain(state: State, trigger_id: str, subject_key: str, now_ms: int) -> dict[str, Any]:
    """Each condition's current value against its threshold, for one subject (the `why`)."""
    for ct in state.book.triggers:
        if ct.spec.id == trigger_id:
            break
    else:
        raise KeyError(trigger_id)
    subject = state.subjects(ct.account).get(subject_key)
    if subject is None:
        return {"trigger": trigger_id, "subject": subject_key, "known": False}
    ts = (subject.states or {}).get(ct.index) or ct.new_state()
    c = Ctx(state, subject, ts, None, now_ms)
    return {
        "trigger": trigger_id,
        "subject": subject_key,
        "known": True,
        "true": ct.cond.test(c),
        "active": ts.active,
        "evidence": ct.cond.explain(c),
    }
