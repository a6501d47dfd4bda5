"""The runner: drives the engine through events and timers in time order.

Events may arrive out of order; each waits in a buffer until the newest timestamp seen has passed
it by the allowed lateness, then events are applied in timestamp order. Before an event stamped
t, every timer due at or before t runs, each at its own due time, so the firings do not depend on
how the stream was chunked or how often the runner was advanced. An event later than the allowed
lateness is still applied, at the current engine time, and counted in `late`.

Pure: the host supplies the time. Replay feeds it event timestamps; the live server, its clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from forewarn import engine
from forewarn.engine import Firing, State, Timer
from forewarn.model import Event, order_key
from forewarn.signals import NEVER

DEFAULT_LATENESS_MS = 300_000
WHEEL_WIDTH_MS = 60_000


class TimerWheel:
    """Timers in buckets of one minute of due time: adding one is an append, and only the
    bucket being drained is kept ordered (a small heap), so timers still run in exact
    (due, trigger, subject) order. A heap of every timer costs a cache miss per level at a
    million subjects; this touches one small list."""

    def __init__(self, width_ms: int = WHEEL_WIDTH_MS) -> None:
        self.width_ms = width_ms
        self.next_due_ms = NEVER  # never later than the earliest timer held
        self._buckets: dict[int, list[Timer]] = {}
        self._keys: list[int] = []  # a heap of the keys in _buckets
        self._hot = -1  # the key of the bucket kept as a heap, if any
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, timer: Timer) -> None:
        due = timer[0]
        key = due // self.width_ms
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [timer]
            heapq.heappush(self._keys, key)
        elif key == self._hot:
            heapq.heappush(bucket, timer)
        else:
            bucket.append(timer)
        if due < self.next_due_ms:
            self.next_due_ms = due
        self._size += 1

    def pop_due(self, upto_ms: int) -> Timer | None:
        """The earliest timer due at or before `upto_ms`, removed; None if there is none."""
        if self.next_due_ms > upto_ms or not self._keys:
            return None
        key = self._keys[0]
        bucket = self._buckets[key]
        if key != self._hot:
            heapq.heapify(bucket)
            self._hot = key
        if bucket[0][0] > upto_ms:
            self.next_due_ms = bucket[0][0]
            return None
        timer = heapq.heappop(bucket)
        self._size -= 1
        if bucket:
            self.next_due_ms = bucket[0][0]
        else:
            del self._buckets[key]
            heapq.heappop(self._keys)
            self._hot = -1
            self.next_due_ms = self._keys[0] * self.width_ms if self._keys else NEVER
        return timer


class Runner:
    def __init__(self, state: State, lateness_ms: int = DEFAULT_LATENESS_MS) -> None:
        self.state = state
        self.lateness_ms = lateness_ms
        self.clock_ms: int | None = None  # engine time: never goes backwards
        self.newest_ms: int | None = None  # newest event timestamp seen
        self.applied_ms = -1  # newest event timestamp applied: an older one is late
        self.late = 0
        self.events = 0
        self.timers_run = 0  # timers that came due and were handed to the engine
        self._buffer: list[tuple[int, int, Event]] = []
        self._timers = TimerWheel()
        self._new_timers: list[Timer] = []
        self._seq = 0

    def push(self, event: Event) -> list[Firing]:
        """Accept one event; returns the firings of whatever this lets the runner apply."""
        if self.newest_ms is None or event.timestamp_ms > self.newest_ms:
            self.newest_ms = event.timestamp_ms
        if self.lateness_ms == 0 and not self._buffer:  # nothing to wait for: apply now
            firings: list[Firing] = []
            self._apply(event, firings)
            return firings
        self._seq += 1
        heapq.heappush(self._buffer, (order_key(event), self._seq, event))
        return self._release(self.newest_ms - self.lateness_ms)

    def _push_into(self, event: Event, firings: list[Firing]) -> None:
        firings.extend(self.push(event))

    def push_many(self, events: Iterable[Event]) -> list[Firing]:
        firings: list[Firing] = []
        for event in events:
            self._push_into(event, firings)
        return firings

    def replay(
        self, events: Iterable[Event], until_ms: int | None, emit: Callable[[Firing], None]
    ) -> None:
        """`push` each event, then `finish(until_ms)`; each firing goes to `emit` as it happens.
        With no lateness (input already in `order_key` order) it skips the buffer: what
        `forewarn replay` and backtests use."""
        if self.lateness_ms == 0 and not self._buffer:
            self._apply_in_order(events, emit)
        else:
            firings: list[Firing] = []
            for event in events:
                self._push_into(event, firings)
                if firings:
                    for firing in firings:
                        emit(firing)
                    firings.clear()
        for firing in self.finish(until_ms):
            emit(firing)

    def _apply_in_order(self, events: Iterable[Event], emit: Callable[[Firing], None]) -> None:
        """`_apply` for each event, its clock and counters kept in locals: the loop replay
        spends its time in, a million times over."""
        firings: list[Firing] = []
        timers = self._new_timers
        wheel = self._timers
        add = wheel.add
        state = self.state
        apply_into = engine.apply_into
        clock = self.clock_ms
        applied = self.applied_ms
        late = count = 0
        try:
            for event in events:
                t = event.timestamp_ms
                if wheel.next_due_ms <= t:
                    self.clock_ms = clock
                    firings.extend(self._run_timers(t))
                    clock = self.clock_ms
                if clock is None or t >= clock:
                    now = clock = t
                else:
                    now = clock
                    late += 1
                count += 1
                older = t < applied
                if not older:
                    applied = t
                apply_into(state, event, now, firings, timers, older)
                if timers:
                    for timer in timers:
                        add(timer)
                    timers.clear()
                if firings:
                    for firing in firings:
                        emit(firing)
                    firings.clear()
        finally:
            self.clock_ms = clock
            self.applied_ms = applied
            self.late += late
            self.events += count

    def advance(self, now_ms: int) -> list[Firing]:
        """The clock reached `now_ms`. Everything up to `now_ms - lateness` is settled: buffered
        events up to then are applied and the timers due by then run."""
        settled = now_ms - self.lateness_ms
        firings = self._release(settled)
        firings.extend(self._run_timers(settled))
        if self.clock_ms is None or settled > self.clock_ms:
            self.clock_ms = settled  # an event stamped before this is applied now, late
        return firings

    def finish(self, until_ms: int | None = None) -> list[Firing]:
        """End of input: apply everything buffered, then run timers up to `until_ms`."""
        firings = self._release(None)
        if until_ms is not None:
            firings.extend(self._run_timers(until_ms))
        return firings

    @property
    def pending_timers(self) -> int:
        """Timers handed out and not yet due (some may be stale)."""
        return len(self._timers)

    def _run_timers(self, upto_ms: int) -> list[Firing]:
        firings: list[Firing] = []
        wheel = self._timers
        state = self.state
        new = self._new_timers
        while (timer := wheel.pop_due(upto_ms)) is not None:
            now = timer.due_ms
            if self.clock_ms is None or now > self.clock_ms:
                self.clock_ms = now
            else:
                now = self.clock_ms
            self.timers_run += 1
            engine.on_timer_into(state, timer, now, firings, new)
            if new:
                for t in new:
                    wheel.add(t)
                new.clear()
        return firings

    def _release(self, watermark_ms: int | None) -> list[Firing]:
        firings: list[Firing] = []
        buffer = self._buffer
        # strictly before the watermark: an event exactly `lateness` late is still in time
        limit = None if watermark_ms is None else watermark_ms * 2 - 1  # in order_key units
        while buffer and (limit is None or buffer[0][0] <= limit):
            self._apply(heapq.heappop(buffer)[2], firings)
        return firings

    def _apply(self, event: Event, firings: list[Firing]) -> None:
        t = event.timestamp_ms
        if self._timers.next_due_ms <= t:
            firings.extend(self._run_timers(t))
        clock = self.clock_ms
        if clock is None or t >= clock:
            now = self.clock_ms = t
        else:
            now = clock
            self.late += 1
        self.events += 1
        late = t < self.applied_ms
        if not late:
            self.applied_ms = t
        timers = self._new_timers
        engine.apply_into(self.state, event, now, firings, timers, late)
        if timers:
            add = self._timers.add
            for timer in timers:
                add(timer)
            timers.clear()
