"""The timer wheel hands timers back in exact (due, trigger, subject) order, whatever the order
they were added in and however far apart the polls are."""

from __future__ import annotations

import heapq

from hypothesis import given
from hypothesis import strategies as st

from forewarn import engine
from forewarn.engine import Timer
from forewarn.model import order_key
from forewarn.runner import Runner, TimerWheel
from tests.factories import DAY, at, events, track, trigger

timers = st.lists(
    st.builds(
        Timer,
        st.integers(min_value=0, max_value=10 * 60_000),
        st.integers(min_value=0, max_value=3),
        st.sampled_from(["a", "b", "c"]),
    ),
    max_size=60,
)


@given(timers, timers, st.lists(st.integers(min_value=0, max_value=11 * 60_000), max_size=8))
def test_wheel_pops_in_exact_order(first, later, polls):
    wheel = TimerWheel(width_ms=60_000)
    reference: list[Timer] = []
    for timer in first:
        wheel.add(timer)
        heapq.heappush(reference, timer)
    popped: list[Timer] = []
    expected: list[Timer] = []
    for i, upto in enumerate(sorted(polls)):
        while (timer := wheel.pop_due(upto)) is not None:
            popped.append(timer)
        while reference and reference[0].due_ms <= upto:
            expected.append(heapq.heappop(reference))
        assert popped == expected
        assert wheel.next_due_ms <= (reference[0].due_ms if reference else wheel.next_due_ms)
        # timers added while draining, some in the bucket being drained
        for timer in later[i::8]:
            moved = timer._replace(due_ms=max(timer.due_ms, upto + 1))
            wheel.add(moved)
            heapq.heappush(reference, moved)
    while (timer := wheel.pop_due(1 << 62)) is not None:
        popped.append(timer)
    expected.extend(heapq.heappop(reference) for _ in range(len(reference)))
    assert popped == expected
    assert len(wheel) == 0


def test_the_runner_counts_the_timers_it_ran():
    """The first login files an absence timer; the second moves the deadline a day later without
    a new timer, so the first comes due early and files one for the new deadline: two timers run,
    one firing."""
    runner = Runner(engine.State(engine.Playbook(trigger("{absent: {name: Login, for: 2d}}"))), 0)
    evs = sorted(events([track("Login", at(days=0)), track("Login", at(days=1))]), key=order_key)
    fired: list[engine.Firing] = []
    runner.replay(evs, evs[-1].timestamp_ms + 5 * DAY, fired.append)
    assert [f.trigger for f in fired] == ["t"]
    assert runner.timers_run == 2
