"""Conditions that learn each subject's own normal: `anomaly` and `overdue`. Pure, like the
other leaves in `signals`; the learning itself is `detect`'s.

`anomaly` cuts time into periods of `window` (aligned to the epoch, so every subject's periods
line up). Each matching event adds to the current period: one to its count, or its `value` to
a sum. When a period is over — at the next matching event after it, or on a timer at its end
for `direction: down` and `both` — its count (or the mean of its values) goes to the detector,
which judges it against the normal learned so far and then learns it. The condition is true
while the last closed period was alarming, or, for `up` and `both`, as soon as the period still
filling already is (counts only): a burst of errors is noticed as it happens, not ten minutes
later. Periods
with no events count as zeros (counts only), learned in closed form past the first
(`Detector.idle`), so a long silence costs no more than a short one.

`overdue` keeps the subject's typical gap between matching events and is true once the silence
since the last one is longer than `factor` times it (a timer at that moment).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from forewarn import detect, expr, playbook
from forewarn.model import Event, format_time
from forewarn.playbook import format_duration as dur
from forewarn.signals import NEVER, Ctx, Leaf, _named

if TYPE_CHECKING:
    from forewarn.engine import TState

# the current period: [start_ms, events, sum of values, alarm, score, expected, observed]
START, EVENTS, TOTAL, ALARM, SCORE, EXPECTED, OBSERVED = range(7)
QUIET = 0.5  # an expected count below this is not worth a timer for a drop


class AnomalyLeaf(Leaf):
    slots = 2  # the detector's state, the current period

    def __init__(self, cond: playbook.AnomalyCond) -> None:
        self.cond = cond
        self.packing = struct.Struct(f"<{len(detect.Detector(60_000).new_state())}f")
        self.names = (cond.name,)
        self.where = cond.where.matcher()
        self.period = cond.window_ms
        self.counts = cond.value is None
        self.detector = detect.Detector(
            cond.window_ms, cond.direction, cond.sensitivity, counts=self.counts
        )
        # a count still filling can already be too high; a partial mean of values cannot be
        # judged against the normal of whole periods
        self.early = self.counts and cond.direction != "down"

    def new(self) -> list[Any]:
        return [self.pack(self.detector.new_state()), [-1, 0, 0.0, False, 0.0, 0.0, 0.0]]

    # The detector's numbers are kept packed as 32-bit floats: 56 bytes where a list of
    # Python floats takes about 450, for every subject a trigger watches.
    def pack(self, state: list[float]) -> bytes:
        return self.packing.pack(*state)

    def unpack(self, packed: bytes) -> list[float]:
        return list(self.packing.unpack(packed))

    def feed(self, ts: TState, event: Event, now: int) -> bool | None:
        current = ts[self.slot + 1]
        start = event.timestamp_ms // self.period * self.period
        if current[START] < 0:
            current[START] = start
        elif start > current[START]:
            self._close(ts, start)
        # an event of a period already closed (a late one) counts in the current period
        if self.counts:
            current[EVENTS] += 1
            return None
        props = event.properties
        value = self.cond.value.evaluate(lambda root, path: expr.dig(props, path))  # type: ignore[union-attr]
        if value is None:
            return False  # nothing to measure: nothing changed
        current[EVENTS] += 1
        current[TOTAL] += value
        return None

    def _sample(self, current: list[Any]) -> float | None:
        if self.counts:
            return float(current[EVENTS])
        return current[TOTAL] / current[EVENTS] if current[EVENTS] else None

    def _close(self, ts: TState, upto: int) -> None:
        """Learn every period before the one starting at `upto`; keep the last verdict."""
        state, current = self.unpack(ts[self.slot]), ts[self.slot + 1]
        detector, period = self.detector, self.period
        verdict = None
        sample = self._sample(current)
        if sample is not None:
            verdict = detector.update(state, current[START], sample)
        if self.counts:  # the periods with no events in between were zeros
            first = current[START] + period
            silent = detector.idle(state, first, (upto - first) // period)
            verdict = silent or verdict
        ts[self.slot] = self.pack(state)
        if verdict is None:
            current[ALARM] = False
        else:
            current[ALARM] = verdict.alarm
            current[SCORE], current[EXPECTED], current[OBSERVED] = (
                verdict.score,
                verdict.expected,
                verdict.observed,
            )
        current[START], current[EVENTS], current[TOTAL] = upto, 0, 0.0

    def check(self, c: Ctx) -> tuple[bool, int]:
        ts = c.ts
        current = ts[self.slot + 1]
        if current[START] < 0:
            return False, NEVER
        start = c.now // self.period * self.period
        if start > current[START]:
            self._close(ts, start)
        state = self.unpack(ts[self.slot])
        detector = self.detector
        truth = bool(current[ALARM])
        if not truth and self.early and current[EVENTS] and detector.warm(state):
            sample = self._sample(current)
            truth = sample is not None and detector.peek(state, current[START], sample).alarm
        end = current[START] + self.period
        if truth:
            return True, end  # looked at again when this period is over
        if self.cond.direction == "up":
            return False, NEVER  # only events can make it high
        # a drop shows at the end of a period, even one with no events: look then, while the
        # subject's normal is busy enough for silence to mean something
        if detector.warm(state) and detector.peek(state, end, 0.0).expected >= QUIET:
            return False, end
        return False, NEVER

    def explain(self, c: Ctx) -> dict[str, Any]:
        cond = self.cond
        out = _named("anomaly", cond.name, cond.where)
        if cond.value is not None:
            out["value"] = cond.value.source
        current = c.ts[self.slot + 1]
        state = self.unpack(c.ts[self.slot])
        out.update(window=dur(self.period), direction=cond.direction)
        out["sensitivity"] = cond.sensitivity
        out["warm"] = self.detector.warm(state)
        sample = self._sample(current) if current[START] >= 0 else None
        partial = None
        if sample is not None and current[EVENTS] and self.detector.warm(state):
            partial = self.detector.peek(state, current[START], sample)
        if partial is not None and (partial.alarm or not current[ALARM]):
            out.update(
                period=format_time(current[START]),
                expected=round(partial.expected, 4),
                observed=round(partial.observed, 4),
                score=round(partial.score, 4),
            )
        elif current[START] >= 0:
            out.update(
                period=format_time(current[START] - self.period),
                expected=round(current[EXPECTED], 4),
                observed=round(current[OBSERVED], 4),
                score=round(current[SCORE], 4),
            )
        return out


class OverdueLeaf(Leaf):
    slots = 2  # the gaps' state, the last match

    def __init__(self, cond: playbook.OverdueCond) -> None:
        self.cond = cond
        self.names = (cond.name,)
        self.where = cond.where.matcher()
        self.gaps = detect.Gaps(cond.factor, cond.min_events, cond.lapse)

    def new(self) -> list[Any]:
        return [self.gaps.new_state(), -1]

    def feed(self, ts: TState, event: Event, now: int) -> bool | None:
        t = event.timestamp_ms
        if t < ts[self.slot + 1]:
            return False  # a late one: the gaps are learned in order
        self.gaps.update(ts[self.slot], t)
        ts[self.slot + 1] = t
        return None

    def check(self, c: Ctx) -> tuple[bool, int]:
        due = self.gaps.due_ms(c.ts[self.slot])
        if due is None:
            return False, NEVER
        return (True, NEVER) if c.now >= due else (False, due)

    def explain(self, c: Ctx) -> dict[str, Any]:
        out = _named("overdue", self.cond.name, self.cond.where)
        state, last = c.ts[self.slot], c.ts[self.slot + 1]
        typical = self.gaps.typical_gap_ms(state)
        gap = None if typical is None else round(typical)
        silent = c.now - last if last >= 0 else None
        out.update(last_seen=format_time(last) if last >= 0 else None)
        stopped = self.gaps.stopped(state, c.now)
        out["stopped"] = None if stopped is None else round(stopped, 4)
        if self.cond.lapse is not None:
            due = self.gaps.due_ms(state)
            out.update(
                lapse=self.cond.lapse,
                expected=None if gap is None else dur(int(gap)),
                observed=None if silent is None else dur(max(0, int(silent))),
                threshold=None if due is None else dur(max(0, due - int(last))),
                score=out["stopped"],
            )
            return out
        out["factor"] = self.cond.factor
        if gap is None or silent is None:
            out.update(expected=None, observed=None, score=None)
            return out
        limit = self.cond.factor * gap
        out.update(
            expected=dur(int(gap)),
            observed=dur(max(0, int(silent))),
            threshold=dur(int(limit)),
            score=round(min(1.0, max(0.0, silent / limit)), 4) if limit > 0 else 1.0,
        )
        return out
