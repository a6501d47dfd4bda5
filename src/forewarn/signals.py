"""Compiled conditions: each condition kind as a small object the engine drives.

A trigger's state for one subject is one flat list (see `engine`); a stateful leaf owns
`slots` consecutive entries of it from index `slot`. A leaf has three verbs, all taking time as
an argument:

- `feed(ts, event, now)`  a matching event arrives (stateful leaves only)
- `check(ctx)`            (is it true now?, the earliest time that could change with no new
                          event, or NEVER)
- `explain(ctx)`          the numbers behind the answer (a firing's evidence, `why`)

The time `check` gives may be early (the engine then checks again), never late: that is what
lets a firing happen at its exact moment even when no event arrives.

Windowed counts live in sparse bucketed rings: a flat list `[total, b0, c0, b1, c1, ...]` of
bucket numbers and counts, oldest first. A bucket is 1/60 of the window, so a window edge moves
by at most one bucket; an event's bucket leaves the window at `bucket * width + window`.
"""

from __future__ import annotations

import bisect
import fnmatch
import operator
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from forewarn import expr, playbook
from forewarn.model import Event, format_time, parse_time_ms
from forewarn.playbook import format_duration as dur

if TYPE_CHECKING:
    from forewarn.engine import State, Subject, TState

NEVER = 1 << 62
BUCKETS = 60
Ring = list[int]


class Ctx:
    """What a condition may look at: the subject, its trigger state, the event, the time."""

    __slots__ = ("account", "event", "now", "state", "subject", "ts")

    def __init__(
        self, state: State, subject: Subject, ts: TState, event: Event | None, now: int
    ) -> None:
        self.state = state
        self.subject = subject
        self.ts = ts
        self.event = event
        self.now = now
        self.account = False  # the subject is an account

    def trait(self, root: str, path: tuple[str, ...]) -> Any:
        if root == "traits":
            traits = self.subject.traits
            slot = self.state.book.trait_slots[self.account].get(path[0])
        elif root == "account":
            traits = self.state.account_traits_of(self.subject)
            slot = self.state.book.trait_slots[1].get(path[0])
        else:
            ev = self.event
            return expr.dig(ev.properties, path) if ev is not None and ev.kind == "track" else None
        if traits is None or slot is None:
            return None
        value = traits[slot]
        return value if len(path) == 1 else expr.dig(value, path[1:])


# --- rings ------------------------------------------------------------------------------------


def ring_add(ring: Ring, t_ms: int, width: int, span: int, now: int) -> None:
    bucket = t_ms // width
    if bucket * width <= now - span:
        return  # a late event already outside the window
    ring[0] += 1
    if len(ring) > 1 and ring[-2] == bucket:
        ring[-1] += 1
    elif len(ring) == 1 or ring[-2] < bucket:
        ring.append(bucket)
        ring.append(1)
        if ring[1] * width <= now - span:
            ring_count(ring, width, span, now)  # forget what has left: memory stays bounded
    else:  # late event inside the window: keep buckets ordered
        starts = ring[1::2]
        i = bisect.bisect_left(starts, bucket)
        if starts[i] == bucket:
            ring[2 + 2 * i] += 1
        else:
            ring[1 + 2 * i : 1 + 2 * i] = [bucket, 1]


def _ring_add_newest(ring: Ring, t_ms: int, width: int, span: int, now: int) -> None:
    """`ring_add`, with the usual cases in line: the newest bucket, or a newer one."""
    bucket = t_ms // width
    n = len(ring)
    if n > 1 and ring[-2] == bucket and bucket * width > now - span:
        ring[0] += 1
        ring[-1] += 1
    elif (n == 1 or ring[-2] < bucket) and bucket * width > now - span:
        ring[0] += 1
        ring.append(bucket)
        ring.append(1)
        if ring[1] * width <= now - span:
            ring_count(ring, width, span, now)  # forget what has left: memory stays bounded
    else:
        ring_add(ring, t_ms, width, span, now)


def ring_count(ring: Ring, width: int, span: int, now: int) -> int:
    """Count in the window (now - span, now]; forgets buckets that have left."""
    edge = now - span
    if len(ring) > 1 and ring[1] * width <= edge:
        i = 1
        n = len(ring)
        while i < n and ring[i] * width <= edge:
            ring[0] -= ring[i + 1]
            i += 2
        del ring[1:i]
    return ring[0]


def ring_leaves(ring: Ring, width: int, span: int) -> int:
    """When the oldest bucket leaves the window."""
    return ring[1] * width + span if len(ring) > 1 else NEVER


def _width(span: int) -> int:
    return max(1, span // BUCKETS)


def _since(start: int, length: int, now: int) -> tuple[bool, int]:
    """True from `start + length` on (a start below 0: never); the time it turns true."""
    if start < 0:
        return False, NEVER
    due = start + length
    return (True, NEVER) if now >= due else (False, due)


# --- leaves -----------------------------------------------------------------------------------


class Leaf:
    slot = -1  # where its entries start in the trigger state, for stateful leaves
    slots = 0  # how many entries it owns
    names: tuple[str, ...] = ()  # track event names that feed it
    where: Callable[[dict[str, Any]], bool] | None = None  # the engine checks it before `feed`
    pages = False  # fed by page views
    uses_properties = False
    negated = False  # under an odd number of `not`s: its condition is true when it is false
    history_ms = 0  # spike, drop: false until the subject was first seen this long ago

    def opens(self, event: Event) -> bool:
        """Whether this event is worth keeping state for, when the subject has none yet."""
        return True

    def new(self) -> list[Any]:
        """Initial values of its entries."""
        return []

    def feed(self, ts: TState, event: Event, now: int) -> bool | None:
        """Take in a matching event. False when the state is exactly as it was: the condition
        then cannot have changed, and the engine need not check it again. True when the leaf
        changed but is now true at no moment where it would not have been true before, up to
        the time its last `check` gave (a later last login only postpones an absence): a
        condition that was false then stays false until its deadline. None otherwise."""
        return None

    def check(self, c: Ctx) -> tuple[bool, int]:
        raise NotImplementedError

    def test(self, c: Ctx) -> bool:
        return self.check(c)[0]

    def explain(self, c: Ctx) -> dict[str, Any]:
        raise NotImplementedError

    def leaves(self) -> list[Leaf]:
        return [self]


def _shown(values: tuple[playbook.Scalar, ...]) -> Any:
    """Allowed values as a playbook writes them: one value, or a list."""
    return values[0] if len(values) == 1 else list(values)


def _where_dict(where: playbook.Where) -> dict[str, Any]:
    return {k: _shown(v) for k, v in where.pairs}


def _named(kind: str, name: str, where: playbook.Where) -> dict[str, Any]:
    out: dict[str, Any] = {"condition": kind, "name": name}
    if where.pairs:
        out["where"] = _where_dict(where)
    return out


class EventLeaf(Leaf):
    def __init__(self, cond: playbook.EventCond) -> None:
        self.cond = cond
        self.names = (cond.name,)
        self.where = cond.where.matcher()
        self.within = cond.within_ms
        self.width = _width(cond.within_ms) if cond.within_ms else 0
        self.slots = 1 if self.within else 0  # without a window it only looks at the event

    def new(self) -> list[Any]:
        return [[0]]

    def feed(self, ts: TState, event: Event, now: int) -> None:
        ring_add(ts[self.slot], event.timestamp_ms, self.width, self.cond.within_ms or 0, now)

    def _now_matches(self, c: Ctx) -> bool:
        ev = c.event
        return (
            ev is not None
            and ev.kind == "track"
            and ev.name == self.cond.name
            and (self.where is None or self.where(ev.properties))
        )

    def check(self, c: Ctx) -> tuple[bool, int]:
        if not self.within:
            return self._now_matches(c), NEVER
        ring = c.ts[self.slot]
        count = ring_count(ring, self.width, self.within, c.now)
        need = self.cond.count
        if count < need:
            return False, NEVER  # only a new event can make it true
        for i in range(1, len(ring), 2):  # true until enough buckets have left
            count -= ring[i + 1]
            if count < need:
                leaves_at: int = ring[i] * self.width + self.within
                return True, leaves_at
        return True, NEVER

    def explain(self, c: Ctx) -> dict[str, Any]:
        out = _named("event", self.cond.name, self.cond.where)
        if self.within:
            count = ring_count(c.ts[self.slot], self.width, self.within, c.now)
            out.update(count=count, at_least=self.cond.count, within=dur(self.within))
        else:
            out["matched"] = self._now_matches(c)
        return out


class RateLeaf(Leaf):
    """Shared by spike and drop: the count in the window against the baseline rate.

    Entries: a fine ring over the window and a coarse ring over window + baseline, with buckets
    of 1/60 of each (a baseline bucket is 1/60 of window + baseline). The baseline count is
    coarse minus fine, never negative because the coarse buckets are wider.
    """

    slots = 2

    def __init__(self, name: str, where: playbook.Where, window: int, baseline: int) -> None:
        self.names = (name,)
        self.where = where.matcher()
        self.window = window
        self.baseline = baseline
        self.fine = _width(window)
        self.span = window + baseline
        self.coarse = _width(self.span)
        self.history_ms = self.span

    def new(self) -> list[Any]:
        return [[0], [0]]

    def feed(self, ts: TState, event: Event, now: int) -> bool | None:
        s = self.slot
        t = event.timestamp_ms
        # The usual event lands in the newest bucket of both rings, or opens a new one: done
        # here, in line (this runs for every Login and every Error); a late one, in ring_add.
        _ring_add_newest(ts[s], t, self.fine, self.window, now)
        _ring_add_newest(ts[s + 1], t, self.coarse, self.span, now)
        return None

    def counts(self, c: Ctx) -> tuple[int, int]:
        ts = c.ts
        current = ring_count(ts[self.slot], self.fine, self.window, c.now)
        total = ring_count(ts[self.slot + 1], self.coarse, self.span, c.now)
        return current, total - current

    def rate(self, base: int) -> float:
        return base * self.window / self.baseline

    def eligible_at(self, c: Ctx) -> int:
        """Once the subject has a window and a baseline of history."""
        return c.subject.first_seen + self.span

    def _explain(self, kind: str, c: Ctx, cond: playbook.SpikeCond | playbook.DropCond) -> Any:
        current, base = self.counts(c)
        out = _named(kind, cond.name, cond.where)
        out.update(
            count=current,
            window=dur(self.window),
            baseline_rate=round(self.rate(base), 4),
            baseline=dur(self.baseline),
            eligible=c.now >= self.eligible_at(c),
        )
        return out


class SpikeLeaf(RateLeaf):
    def __init__(self, cond: playbook.SpikeCond) -> None:
        super().__init__(cond.name, cond.where, cond.window_ms, cond.baseline_ms)
        self.cond = cond

    def check(self, c: Ctx) -> tuple[bool, int]:
        eligible = c.subject.first_seen + self.span  # eligible_at, in line
        if c.now < eligible:
            return False, eligible
        current, base = self.counts(c)
        cond = self.cond
        ts = c.ts
        # current >= factor * base * window / baseline, without rounding
        if (
            current >= cond.min_count
            and current * self.baseline >= cond.factor * base * self.window
        ):
            return True, ring_leaves(ts[self.slot], self.fine, self.window)  # ends as it empties
        coarse = ts[self.slot + 1]
        if base == 0 or current < cond.min_count:
            # only new events can start it; check once more when the history has all left, so
            # a quiet subject's rings are emptied rather than kept
            return False, (coarse[-2] * self.coarse + self.span if len(coarse) > 1 else NEVER)
        return False, ring_leaves(coarse, self.coarse, self.span)  # a lower baseline may start it

    def explain(self, c: Ctx) -> dict[str, Any]:
        out: dict[str, Any] = self._explain("spike", c, self.cond)
        rate = out["baseline_rate"]
        out.update(
            factor=self.cond.factor,
            threshold=round(max(self.cond.factor * rate, self.cond.min_count), 4),
            min_count=self.cond.min_count,
        )
        return out


class DropLeaf(RateLeaf):
    slots = 3  # and a cached time of the next possible change

    def __init__(self, cond: playbook.DropCond) -> None:
        super().__init__(cond.name, cond.where, cond.window_ms, cond.baseline_ms)
        self.cond = cond

    def new(self) -> list[Any]:
        return [[0], [0], 0]

    def feed(self, ts: TState, event: Event, now: int) -> bool | None:
        RateLeaf.feed(self, ts, event, now)
        # A new event only delays a drop, unless it lands in the baseline (a late event) or
        # there was no drop ahead only because there was nothing to lose.
        s = self.slot + 2
        if event.timestamp_ms < now or ts[s] == NEVER:
            ts[s] = 0
            return None
        # the cached time of the next possible drop still holds: no sooner than it
        return True if ts[s] > now else None

    def _dropped(self, current: int, base: int) -> bool:
        # current <= below * base * window / baseline, without rounding
        return base > 0 and current * self.baseline <= self.cond.below * base * self.window

    def check(self, c: Ctx) -> tuple[bool, int]:
        eligible = c.subject.first_seen + self.span  # eligible_at, in line
        if c.now < eligible:
            return False, eligible
        current, base = self.counts(c)
        ts = c.ts
        s = self.slot
        if self._dropped(current, base):  # baseline buckets leaving can end it
            ts[s + 2] = 0
            return True, ring_leaves(ts[s + 1], self.coarse, self.span)
        if ts[s + 2] > c.now:
            cached: int = ts[s + 2]
            return False, cached  # new events only delay a drop, so the cached answer holds
        # Walk the window's buckets as they leave, holding the baseline total fixed: buckets
        # leaving the baseline only make a drop less likely, so this answer is never late.
        fine = ts[s]
        answer = NEVER
        for i in range(1, len(fine), 2):
            current -= fine[i + 1]
            base += fine[i + 1]
            if self._dropped(current, base):
                answer = fine[i] * self.fine + self.window
                break
        ts[s + 2] = answer
        return False, answer

    def explain(self, c: Ctx) -> dict[str, Any]:
        out: dict[str, Any] = self._explain("drop", c, self.cond)
        out.update(
            below=self.cond.below, threshold=round(self.cond.below * out["baseline_rate"], 4)
        )
        return out


class AbsentLeaf(Leaf):
    slots = 1

    def __init__(self, cond: playbook.AbsentCond) -> None:
        self.cond = cond
        self.names = (cond.name,)
        self.where = cond.where.matcher()

    def new(self) -> list[Any]:
        return [-1]  # the last match

    def feed(self, ts: TState, event: Event, now: int) -> bool | None:
        last = ts[self.slot]
        t = event.timestamp_ms
        if t <= last:
            return False
        ts[self.slot] = t
        return True if last >= 0 else None  # a later last match only postpones the absence

    def check(self, c: Ctx) -> tuple[bool, int]:
        last: int = c.ts[self.slot]
        if last < 0:  # _since, in line: checked on every Login
            return False, NEVER
        due = last + self.cond.for_ms
        return (True, NEVER) if c.now >= due else (False, due)

    def explain(self, c: Ctx) -> dict[str, Any]:
        last = c.ts[self.slot]
        out = _named("absent", self.cond.name, self.cond.where)
        out.update(
            last_seen=format_time(last) if last >= 0 else None,
            silent_for=dur(c.now - last) if last >= 0 and c.now > last else None,
            threshold=dur(self.cond.for_ms),
        )
        return out


class ThresholdLeaf(Leaf):
    def __init__(self, cond: playbook.ThresholdCond) -> None:
        self.cond = cond
        self.uses_properties = any(root == "properties" for root, _ in cond.value.names)
        self.compare = _COMPARE[cond.op]

    def value(self, c: Ctx) -> float | None:
        return self.cond.value.evaluate(c.trait)

    def check(self, c: Ctx) -> tuple[bool, int]:
        value = self.value(c)
        return value is not None and self.compare(value, self.cond.target), NEVER

    def explain(self, c: Ctx) -> dict[str, Any]:
        value = self.value(c)
        return {
            "condition": "threshold",
            "expression": self.cond.value.source,
            "value": None if value is None else round(value, 6),
            "op": self.cond.op,
            "threshold": self.cond.target,
        }


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}


def page_path(event: Event) -> str | None:
    props = event.properties
    path = props.get("path")
    if isinstance(path, str) and path:
        return path
    url = props.get("url")
    if isinstance(url, str) and url:
        try:
            return urlsplit(url).path or "/"
        except ValueError:  # not a URL
            return None
    return None


class DwellLeaf(Leaf):
    slots = 2
    pages = True

    def __init__(self, cond: playbook.DwellCond) -> None:
        self.cond = cond
        self.names = cond.unless
        self.match = re.compile(fnmatch.translate(cond.page)).match

    def new(self) -> list[Any]:
        return [-1, None]  # when the dwell started, and on which path

    def _starts(self, event: Event) -> str | None:
        """The path, when the event is a view of a matching page: it starts a dwell."""
        if event.kind != "page":
            return None
        path = event.properties.get("path")
        if not isinstance(path, str) or not path:
            path = page_path(event)
        return path if path is not None and self.match(path) else None

    def opens(self, event: Event) -> bool:
        return self._starts(event) is not None  # anything else merely ends a dwell

    def feed(self, ts: TState, event: Event, now: int) -> bool | None:
        s = self.slot
        if event.timestamp_ms < ts[s]:
            return False  # a late event from before this dwell began changes nothing
        path = self._starts(event)
        if path is None and ts[s] < 0:
            return False  # no dwell to end: most page views, most `unless` events
        # a matching page starts a dwell; another page, or an `unless` event, ends it
        ts[s] = event.timestamp_ms if path is not None else -1
        ts[s + 1] = path
        return None

    def check(self, c: Ctx) -> tuple[bool, int]:
        start: int = c.ts[self.slot]
        return _since(start, self.cond.for_ms, c.now)

    def explain(self, c: Ctx) -> dict[str, Any]:
        start = c.ts[self.slot]
        return {
            "condition": "dwell",
            "page": self.cond.page,
            "path": c.ts[self.slot + 1],
            "dwell": dur(c.now - start) if start >= 0 and c.now > start else None,
            "threshold": dur(self.cond.for_ms),
            "unless": list(self.cond.unless),
        }


def as_time_ms(value: Any) -> int | None:
    """A trait's value as a time, or None when it is not one."""
    if value is None or isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        return parse_time_ms(value)
    except (ValueError, OverflowError):
        return None


def _trait_ms(c: Ctx, ref: tuple[str, tuple[str, ...]]) -> int | None:
    root, path = ref
    if len(path) == 1:  # parsed when the trait arrived
        scope = 1 if root == "account" else int(c.account)
        traits = c.subject.traits if root == "traits" else c.state.account_traits_of(c.subject)
        slot = c.state.book.date_slots[scope].get(path[0])
        if slot is not None:
            return None if traits is None else traits[slot]
    return as_time_ms(c.trait(root, path))


class DateLeaf(Leaf):
    def __init__(self, cond: playbook.DateCond) -> None:
        self.cond = cond

    def check(self, c: Ctx) -> tuple[bool, int]:
        date = _trait_ms(c, self.cond.trait)
        if date is None:
            return False, NEVER
        if c.now <= date <= c.now + self.cond.within_ms:
            return True, date + 1  # inclusive: still true at the date itself
        opens = date - self.cond.within_ms
        return False, (opens if opens > c.now else NEVER)

    def explain(self, c: Ctx) -> dict[str, Any]:
        date = _trait_ms(c, self.cond.trait)
        return {
            "condition": "date",
            "trait": playbook.ref_name(self.cond.trait),
            "date": None if date is None else format_time(date),
            "in": dur(date - c.now) if date is not None and date > c.now else None,
            "within": dur(self.cond.within_ms),
        }


class AgeLeaf(Leaf):
    def __init__(self, cond: playbook.AgeCond) -> None:
        self.cond = cond

    def check(self, c: Ctx) -> tuple[bool, int]:
        since = _trait_ms(c, self.cond.since)
        return _since(-1 if since is None else since, self.cond.at_least_ms, c.now)

    def explain(self, c: Ctx) -> dict[str, Any]:
        since = _trait_ms(c, self.cond.since)
        return {
            "condition": "age",
            "since": playbook.ref_name(self.cond.since),
            "since_date": None if since is None else format_time(since),
            "age": dur(c.now - since) if since is not None and c.now > since else None,
            "at_least": dur(self.cond.at_least_ms),
        }


class EverLeaf(Leaf):
    slots = 1

    def __init__(self, cond: playbook.EverCond) -> None:
        self.cond = cond
        self.names = (cond.name,)
        self.where = cond.where.matcher()

    def new(self) -> list[Any]:
        return [False]

    def feed(self, ts: TState, event: Event, now: int) -> None:
        ts[self.slot] = True

    def check(self, c: Ctx) -> tuple[bool, int]:
        return c.ts[self.slot] is True, NEVER

    def explain(self, c: Ctx) -> dict[str, Any]:
        out = _named("ever", self.cond.name, self.cond.where)
        out["seen"] = c.ts[self.slot] is True
        return out


class TraitsLeaf(Leaf):
    def __init__(self, cond: playbook.TraitsCond) -> None:
        self.cond = cond

    def check(self, c: Ctx) -> tuple[bool, int]:
        return all(
            playbook.one_of(c.trait(*ref), allowed) for ref, allowed in self.cond.pairs
        ), NEVER

    def explain(self, c: Ctx) -> dict[str, Any]:
        return {
            "condition": "traits",
            "values": {playbook.ref_name(ref): c.trait(*ref) for ref, _ in self.cond.pairs},
            "expected": {playbook.ref_name(ref): _shown(v) for ref, v in self.cond.pairs},
        }


class Group(Leaf):
    def __init__(self, kind: str, children: list[Leaf]) -> None:
        self.kind = kind
        self.children = children

    def leaves(self) -> list[Leaf]:
        return [leaf for child in self.children for leaf in child.leaves()]

    def check(self, c: Ctx) -> tuple[bool, int]:
        """Truth, and a time before which it cannot change without an event.

        `all` that is false needs every false part to change: not before the latest of their
        next changes; `all` that is true ends at the first change of any part. `any` mirrors it.
        """
        kind = self.kind
        if kind == "not":
            truth, soonest = self.children[0].check(c)
            return not truth, soonest
        # soonest change of any part; latest change among the parts that hold the whole where
        # it is (the false parts of a false `all`, the true parts of a true `any`)
        want = kind == "all"  # the value every part must have for the whole to have it
        whole = want
        soonest = NEVER
        latest = 0
        for child in self.children:
            truth, change = child.check(c)
            if change < soonest:
                soonest = change
            if truth is not want:
                if whole is want:
                    whole = not want
                    latest = change
                elif change > latest:
                    latest = change
        if whole is want:
            return whole, soonest
        return whole, latest

    def explain(self, c: Ctx) -> dict[str, Any]:
        parts = []
        for child in self.children:
            part = child.explain(c)
            part["true"] = child.test(c)
            parts.append(part)
        return {"condition": self.kind, "of": parts}


_LEAVES: dict[type, Callable[[Any], Leaf]] = {
    playbook.EventCond: EventLeaf,
    playbook.SpikeCond: SpikeLeaf,
    playbook.DropCond: DropLeaf,
    playbook.AbsentCond: AbsentLeaf,
    playbook.ThresholdCond: ThresholdLeaf,
    playbook.DwellCond: DwellLeaf,
    playbook.DateCond: DateLeaf,
    playbook.AgeCond: AgeLeaf,
    playbook.EverCond: EverLeaf,
    playbook.TraitsCond: TraitsLeaf,
}


def compile_condition(cond: playbook.Condition) -> Leaf:
    if isinstance(cond, playbook.AllCond):
        return Group("all", [compile_condition(c) for c in cond.of])
    if isinstance(cond, playbook.AnyCond):
        return Group("any", [compile_condition(c) for c in cond.of])
    if isinstance(cond, playbook.NotCond):
        inner = compile_condition(cond.of)
        for leaf in inner.leaves():
            leaf.negated = not leaf.negated
        return Group("not", [inner])
    if isinstance(cond, playbook.AnomalyCond | playbook.OverdueCond):
        from forewarn import adaptive  # builds on the leaves here

        if isinstance(cond, playbook.AnomalyCond):
            return adaptive.AnomalyLeaf(cond)
        return adaptive.OverdueLeaf(cond)
    return _LEAVES[type(cond)](cond)
