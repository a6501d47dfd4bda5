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

import copy
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from forewarn import decide, signals
from forewarn import playbook as pb
from forewarn.errors import NotFoundError
from forewarn.model import Event
from forewarn.playbook import Trigger
from forewarn.records import Firing as Firing
from forewarn.records import Subject as Subject
from forewarn.signals import NEVER, Ctx, Leaf, as_time_ms


class Timer(NamedTuple):
    due_ms: int
    trigger: int  # index into the engine's triggers
    subject: str


# One trigger's state for one subject is a flat list: these four entries, then each stateful
# leaf's entries (see signals.Leaf.slot). A list costs less memory than an object holding one.
# ACTIVE: the condition is true; EPISODE: when the current cooldown started; DEADLINE: when to
# check again without events; FILED: the earliest timer handed to the host for it.
TState = list[Any]
ACTIVE, EPISODE, DEADLINE, FILED = range(4)
HEAD = 4


class CompiledTrigger:
    __slots__ = (
        "account",
        "always_check",
        "cond",
        "history_ms",
        "index",
        "instant",
        "leaves",
        "slot",
        "spec",
        "stateful",
    )

    def __init__(self, index: int, spec: Trigger) -> None:
        self.index = index
        self.slot = 0  # its place in a subject's `states`, numbered per scope
        self.spec = spec
        self.account = spec.scope == "account"
        self.cond: Leaf = signals.compile_condition(spec.when)
        self.leaves = self.cond.leaves()
        self.stateful = [leaf for leaf in self.leaves if leaf.slots]
        offset = HEAD
        for leaf in self.stateful:
            leaf.slot = offset
            offset += leaf.slots
        self.instant = any(
            (isinstance(leaf, signals.EventLeaf) and not leaf.within) or leaf.uses_properties
            for leaf in self.leaves
        )
        # checked after every event that feeds it, even one that left its state as it was:
        # an instant condition reads the event, spike and drop the subject's first_seen
        self.always_check = self.instant or any(
            isinstance(leaf, signals.RateLeaf) for leaf in self.leaves
        )
        # until the subject has this much history, every spike and drop in it is false
        self.history_ms = min(
            (leaf.history_ms for leaf in self.leaves if leaf.history_ms), default=0
        )

    def new_state(self) -> TState:
        ts: TState = [False, -1, NEVER, NEVER]
        for leaf in self.stateful:
            ts.extend(leaf.new())
        return ts


# a trigger, the leaves an event name feeds, and their `where` when there is just one leaf
Named = tuple[CompiledTrigger, list[Leaf], Callable[[dict[str, Any]], bool] | None]


class Playbook:
    """Triggers compiled and indexed by what can change them."""

    def __init__(
        self,
        triggers: Iterable[Trigger],
        salt: str = "forewarn",
        keep: tuple[Iterable[str], Iterable[str]] = ((), ()),
    ) -> None:
        """`keep`: traits to keep per scope (user, account) though no trigger reads them, for
        the policy and the message templates."""
        self.salt = salt
        self.triggers = [CompiledTrigger(i, t) for i, t in enumerate(triggers)]
        # event name -> [(trigger, leaves fed by it, their `where` when there is one leaf)],
        # per scope: an event the one `where` turns down needs no call
        self.by_name: tuple[dict[str, list[Named]], dict[str, list[Named]]] = ({}, {})
        self.pages: list[tuple[CompiledTrigger, list[Leaf]]] = []
        self.on_traits: tuple[list[CompiledTrigger], list[CompiledTrigger]] = ([], [])
        self.on_account_traits: list[CompiledTrigger] = []  # user triggers reading account.*
        self.on_any_track: tuple[list[CompiledTrigger], list[CompiledTrigger]] = ([], [])
        # per scope (user, account): traits read, read as dates, read as they came
        names: tuple[set[str], set[str]] = (set(), set())
        dates: tuple[set[str], set[str]] = (set(), set())
        raw: tuple[set[str], set[str]] = (set(), set())
        self.slots = [0, 0]  # triggers per scope
        for ct in self.triggers:
            scope = int(ct.account)
            ct.slot = self.slots[scope]
            self.slots[scope] += 1
            fed: dict[str, list[Leaf]] = {}
            for leaf in ct.leaves:
                for name in leaf.names:
                    fed.setdefault(name, []).append(leaf)
            for name, leaves in fed.items():
                where = leaves[0].where if len(leaves) == 1 else None
                self.by_name[scope].setdefault(name, []).append((ct, leaves, where))
            page_leaves = [leaf for leaf in ct.leaves if leaf.pages]
            if page_leaves:
                self.pages.append((ct, page_leaves))
            refs = _trait_refs(ct.spec)
            roots = {root for root, _, _ in refs}
            if ct.account and roots:
                self.on_traits[1].append(ct)
            if not ct.account and "traits" in roots:
                self.on_traits[0].append(ct)
            if not ct.account and "account" in roots:
                self.on_account_traits.append(ct)
            if ct.instant and any(leaf.uses_properties for leaf in ct.leaves):
                self.on_any_track[scope].append(ct)
            for root, path, is_date in refs:
                on = int(root == "account" or ct.account)
                names[on].add(path[0])
                (dates if is_date and len(path) == 1 else raw)[on].add(path[0])
        for scope in (0, 1):
            names[scope].update(keep[scope])
            raw[scope].update(keep[scope])
        # Only the traits some trigger reads (or the host asks to keep) are kept, each in a
        # fixed slot per scope. A trait read as a date is kept parsed: in its own slot, or in
        # an extra one when something also reads it as it came.
        self.trait_keys = tuple(tuple(sorted(n)) for n in names)
        self.trait_slots = tuple({k: i for i, k in enumerate(keys)} for keys in self.trait_keys)
        layout = [_date_slots(self.trait_keys[i], dates[i], raw[i]) for i in (0, 1)]
        self.date_slots = tuple(slots for slots, _ in layout)
        self.trait_width = tuple(width for _, width in layout)
        # first seen matters only where spike and drop wait for history
        self.needs_first_seen = tuple(
            any(
                isinstance(leaf, signals.RateLeaf)
                for ct in self.triggers
                for leaf in ct.leaves
                if ct.account == bool(scope)
            )
            for scope in (0, 1)
        )


def _date_slots(
    keys: tuple[str, ...], dates: set[str], raw: set[str]
) -> tuple[dict[str, int], int]:
    """Where each date trait's parsed value lives, and how many slots the traits take."""
    slots: dict[str, int] = {}
    width = len(keys)
    for key in sorted(dates):
        if key in raw:  # the raw value keeps its slot; the parsed one gets a new slot
            slots[key] = width
            width += 1
        else:
            slots[key] = keys.index(key)
    return slots, width


def _trait_refs(spec: Trigger) -> list[tuple[str, tuple[str, ...], bool]]:
    """(root, path, read as a date) for every trait a trigger reads."""
    refs: list[tuple[str, tuple[str, ...], bool]] = []

    def walk(cond: pb.Condition) -> None:
        if isinstance(cond, pb.AllCond | pb.AnyCond):
            for child in cond.of:
                walk(child)
        elif isinstance(cond, pb.NotCond):
            walk(cond.of)
        elif isinstance(cond, pb.ThresholdCond):
            refs.extend((r, p, False) for r, p in cond.value.names if r != "properties")
        elif isinstance(cond, pb.DateCond):
            refs.append((*cond.trait, True))
        elif isinstance(cond, pb.AgeCond):
            refs.append((*cond.since, True))
        elif isinstance(cond, pb.TraitsCond):
            refs.extend((r, p, False) for (r, p), _ in cond.pairs)

    walk(spec.when)
    return refs


class State:
    """Everything the engine remembers; plain Python objects, built only from events."""

    def __init__(self, book: Playbook) -> None:
        self.book = book
        self.users: dict[str, Subject] = {}
        self.accounts: dict[str, Subject] = {}
        self.aliases: dict[str, str] = {}
        self.members: dict[str, list[str]] = {}  # kept only when a user trigger reads account.*
        # open urgent tickets, by "user:ID" and "account:ID": the account is not to be
        # contacted while one is open
        self.urgent: dict[str, list[str]] = {}
        self.ctx = Ctx(self, Subject(0), [False, -1, NEVER, NEVER], None, 0)

    def account_traits_of(self, user: Subject) -> list[Any] | None:
        if not user.accounts:
            return None
        account = self.accounts.get(user.accounts[-1])
        return account.traits if account is not None else None

    def subjects(self, account: bool) -> dict[str, Subject]:
        return self.accounts if account else self.users


def _merge_traits(
    subject: Subject, traits: dict[str, Any], book: Playbook, scope: int, late: bool
) -> bool:
    """Newest value wins. A late update only fills traits not set yet."""
    changed = False
    keys = book.trait_keys[scope]
    dates = book.date_slots[scope]
    for i, key in enumerate(keys):
        if key in traits:
            kept = subject.traits
            if kept is None:
                kept = subject.traits = [None] * book.trait_width[scope]
            elif late and kept[i] is not None:
                continue
            value = kept[i] = traits[key]
            if key in dates:
                kept[dates[key]] = as_time_ms(value)
            changed = True
    return changed


TICKET_EVENTS = frozenset({"Ticket Created", "Ticket Solved"})
URGENT = frozenset({"urgent"})


def _ticket(state: State, person: str, user: Subject, event: Event) -> None:
    """Keep the open urgent tickets of the user and its accounts."""
    ticket = event.properties.get("ticket_id")
    if not isinstance(ticket, str):
        return
    opened = event.name == "Ticket Created" and event.properties.get("priority") in URGENT
    accounts = [event.account_id] if event.account_id is not None else user.accounts or []
    for key in [f"user:{person}", *(f"account:{a}" for a in accounts)]:
        tickets = state.urgent.get(key)
        if opened:
            if tickets is None:
                state.urgent[key] = [ticket]
            elif ticket not in tickets:
                tickets.append(ticket)
        elif tickets is not None and ticket in tickets:
            tickets.remove(ticket)
            if not tickets:
                del state.urgent[key]


def traits_of(state: State, account: bool, key: str) -> dict[str, Any]:
    """The subject's kept traits, as they came (unset ones left out)."""
    subject = state.subjects(account).get(key)
    if subject is None or subject.traits is None:
        return {}
    values = subject.traits
    names = state.book.trait_keys[int(account)]
    return {name: values[i] for i, name in enumerate(names) if values[i] is not None}


def apply(
    state: State, event: Event, now_ms: int, *, late: bool | None = None
) -> tuple[State, list[Firing], list[Timer]]:
    """Apply one event at engine time `now_ms` (>= the event's timestamp; later when the
    event arrives after the clock moved on: its counts still land in its own bucket). `late`:
    an event older than one already applied, whose traits then only fill what is not set;
    by default, when it is older than `now_ms`."""
    firings: list[Firing] = []
    timers: list[Timer] = []
    apply_into(state, event, now_ms, firings, timers, late)
    return state, firings, timers


def apply_into(
    state: State,
    event: Event,
    now: int,
    firings: list[Firing],
    timers: list[Timer],
    late: bool | None = None,
) -> None:
    """`apply`, appending to the caller's lists (the runner's hot path)."""
    book = state.book
    t = event.timestamp_ms
    if late is None:
        late = t < now  # a late trait update never overwrites what newer events set
    person = event.user_id
    if person is None:
        anon = event.anonymous_id or ""
        person = state.aliases.get(anon, anon)
    users = state.users
    user = users.get(person)
    if user is None:
        user = users[person] = Subject(t if book.needs_first_seen[0] else 0)
    elif t < user.first_seen:
        user.first_seen = t
    kind = event.kind

    if kind == "track":
        if event.name in TICKET_EVENTS:
            _ticket(state, person, user, event)
        named = book.by_name[0].get(event.name)
        if named is not None:
            for ct, leaves, where in named:
                if where is None or where(event.properties):
                    _feed_and_check(state, ct, person, user, leaves, event, now, firings, timers)
        for ct in book.on_any_track[0]:
            if named is None or not any(ct is seen for seen, _, _ in named):  # once per event
                _check(state, ct, person, user, event, now, firings, timers)
    elif kind == "page":
        states = user.states
        for ct, leaves in book.pages:
            kept = states is not None and states[ct.slot] is not None
            # most views start no dwell, for a user with none to end: nothing to do for them
            if kept or len(leaves) > 1 or leaves[0].opens(event):
                _feed_and_check(state, ct, person, user, leaves, event, now, firings, timers)
    elif kind == "identify":
        if _merge_traits(user, event.traits, book, 0, late):
            for ct in book.on_traits[0]:
                _check(state, ct, person, user, event, now, firings, timers)
    elif kind == "group":
        _group(state, person, user, event, now, late, firings, timers)
        return
    elif kind == "alias":  # the model guarantees both ids
        state.aliases[event.previous_id or ""] = person

    # account-scoped triggers see the events of all the account's users
    if event.account_id is not None:
        _apply_to_account(state, event.account_id, event, now, firings, timers)
    elif user.accounts:
        for account_id in user.accounts:
            _apply_to_account(state, account_id, event, now, firings, timers)


def _apply_to_account(
    state: State,
    account_id: str,
    event: Event,
    now: int,
    firings: list[Firing],
    timers: list[Timer],
) -> None:
    book = state.book
    t = event.timestamp_ms
    table = state.accounts
    account = table.get(account_id)
    if account is None:
        account = table[account_id] = Subject(t if book.needs_first_seen[1] else 0)
    elif t < account.first_seen:
        account.first_seen = t
    if event.kind != "track":
        return
    named = book.by_name[1].get(event.name)
    if named is not None:
        for ct, leaves, where in named:
            if where is None or where(event.properties):
                _feed_and_check(state, ct, account_id, account, leaves, event, now, firings, timers)
    for ct in book.on_any_track[1]:
        if named is None or not any(ct is seen for seen, _, _ in named):  # once per event
            _check(state, ct, account_id, account, event, now, firings, timers)


def _group(
    state: State,
    person: str,
    user: Subject,
    event: Event,
    now: int,
    late: bool,
    firings: list[Firing],
    timers: list[Timer],
) -> None:
    """A user joins an account (if not yet a member) and the account's traits merge."""
    book = state.book
    account_id = event.account_id or ""
    joined = user.accounts is None or account_id not in user.accounts
    if user.accounts is None:
        user.accounts = [account_id]
    elif joined:
        user.accounts.append(account_id)
    t = event.timestamp_ms
    account = state.accounts.get(account_id)
    if account is None:
        account = state.accounts[account_id] = Subject(t if book.needs_first_seen[1] else 0)
    elif t < account.first_seen:
        account.first_seen = t
    changed = _merge_traits(account, event.traits, book, 1, late)
    if changed:
        for ct in book.on_traits[1]:
            _check(state, ct, account_id, account, event, now, firings, timers)
    if not book.on_account_traits:
        return
    members = state.members.setdefault(account_id, [])
    if joined:
        members.append(person)
    # users whose account.* conditions read this account
    recheck = members if changed else ([person] if joined else [])
    for member in recheck:
        subject = state.users.get(member)
        if subject is not None and subject.accounts and subject.accounts[-1] == account_id:
            for ct in book.on_account_traits:
                _check(state, ct, member, subject, event, now, firings, timers)


def on_timer(state: State, timer: Timer, now_ms: int) -> tuple[State, list[Firing], list[Timer]]:
    """A timer came due. Stale timers (their deadline moved) change nothing."""
    firings: list[Firing] = []
    timers: list[Timer] = []
    on_timer_into(state, timer, now_ms, firings, timers)
    return state, firings, timers


def on_timer_into(
    state: State, timer: Timer, now_ms: int, firings: list[Firing], timers: list[Timer]
) -> None:
    """`on_timer`, appending to the caller's lists (the runner's hot path)."""
    ct = state.book.triggers[timer.trigger]
    subject = state.subjects(ct.account).get(timer.subject)
    if subject is None or subject.states is None:
        return
    ts = subject.states[ct.slot]
    if ts is None or ts[FILED] != timer.due_ms:
        return
    ts[FILED] = NEVER
    if ts[DEADLINE] > now_ms:  # the deadline moved later: hand the host the new one
        _file(ct, timer.subject, ts, timers)
        return
    _evaluate(state, ct, timer.subject, subject, ts, None, now_ms, firings, timers)


def _tstate(ct: CompiledTrigger, subject: Subject, book: Playbook) -> TState:
    states = subject.states
    if states is None:
        states = subject.states = [None] * book.slots[ct.account]
    ts = states[ct.slot]
    if ts is None:
        ts = states[ct.slot] = ct.new_state()
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
    ts: TState | None = None
    # Unless an event changed the state, the condition is as the last check left it until
    # the deadline that check gave. So it is too when the changes can only postpone its
    # becoming true, if it is false: the deadline is then early, and the engine checks again.
    changed = ct.always_check
    # an instant condition reads the event itself; spike and drop read the first seen, which
    # only a late event can move
    sooner = ct.instant or (changed and event.timestamp_ms < now)
    for leaf in leaves:
        if leaf.where is not None and not leaf.where(event.properties):
            continue
        if ts is None:
            states = subject.states
            ts = states[ct.slot] if states is not None else None
            if ts is None:
                if not leaf.opens(event):
                    continue  # nothing to end or count: keep no state for it
                ts = _tstate(ct, subject, state.book)
                sooner = True  # never checked: no deadline to keep
        if not leaf.slots:
            changed = sooner = True
            continue
        fed = leaf.feed(ts, event, now)
        if fed is not False:
            changed = True
            if fed is None:
                # spike and drop, not due before they can be true, are false until then
                if not leaf.history_ms or ts[DEADLINE] > subject.first_seen + ct.history_ms:
                    sooner = True
            elif leaf.negated:
                sooner = True
    if ts is not None and (ts[DEADLINE] <= now or (changed and (sooner or ts[ACTIVE]))):
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
    _evaluate(
        state, ct, key, subject, _tstate(ct, subject, state.book), event, now, firings, timers
    )


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
    c = state.ctx  # one context, re-filled: evaluation is never re-entrant
    c.account = ct.account
    c.subject = subject
    c.ts = ts
    c.event = event
    c.now = now
    truth, deadline = ct.cond.check(c)
    if truth and not ts[ACTIVE]:
        firings.append(_fire(state, ct, key, ts, c))
    if truth and ct.instant and event is not None:  # (instant: only true while an event is)
        c.event = None  # at rest after the instant: re-arms for the next matching event
        truth, deadline = ct.cond.check(c)
    if deadline <= now:  # a condition must name a future moment; never spin on the present
        deadline = now + 1
    ts[ACTIVE] = truth
    ts[DEADLINE] = deadline
    if deadline < ts[FILED]:
        _file(ct, key, ts, timers)


def _file(ct: CompiledTrigger, key: str, ts: TState, timers: list[Timer]) -> None:
    deadline = ts[DEADLINE]
    if deadline != NEVER:
        ts[FILED] = deadline
        timers.append(Timer(deadline, ct.index, key))


def _fire(state: State, ct: CompiledTrigger, key: str, ts: TState, c: Ctx) -> Firing:
    spec = ct.spec
    now = c.now
    episode = ts[EPISODE]
    in_cooldown = episode >= 0 and now < episode + spec.cooldown_ms
    if not in_cooldown:
        ts[EPISODE] = now
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
        cooldown=in_cooldown,
    )


def explain(state: State, trigger_id: str, subject_key: str, now_ms: int) -> dict[str, Any]:
    """Each condition's current value against its threshold, for one subject (the `why`)."""
    for ct in state.book.triggers:
        if ct.spec.id == trigger_id:
            break
    else:
        known = ", ".join(t.spec.id for t in state.book.triggers)
        raise NotFoundError(f"no trigger '{trigger_id}'; the playbooks define: {known}")
    subject = state.subjects(ct.account).get(subject_key)
    if subject is None:
        return {"trigger": trigger_id, "subject": subject_key, "known": False}
    ts = (subject.states[ct.slot] if subject.states else None) or ct.new_state()
    ts = copy.deepcopy(ts)  # reading forgets buckets that have left: never on the live state
    c = Ctx(state, subject, ts, None, now_ms)
    c.account = ct.account
    return {
        "trigger": trigger_id,
        "subject": subject_key,
        "known": True,
        "true": ct.cond.test(c),
        "active": ts[ACTIVE],
        "evidence": ct.cond.explain(c),
    }
