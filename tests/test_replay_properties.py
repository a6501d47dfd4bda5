"""Properties of replay: deterministic, and independent of how the stream is chunked, how often
the clock is advanced, and of disorder within the allowed lateness."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from forewarn import engine
from forewarn.model import Event, format_time
from forewarn.runner import Runner
from forewarn.sources import load_playbooks
from tests.factories import DAY, MINUTE, T0_MS, events, group, identify, page, playbook, track

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "playbooks"
EXTRA = playbook(
    """
triggers:
  - id: burst
    when: {event: {name: Error, count: 3, within: 30m}}
    action: {channel: in_app, message: hi}
    cooldown: 1h
  - id: pro-or-quiet
    scope: account
    when:
      any:
        - traits: {plan: pro}
        - not: {event: {name: Login, within: 2d}}
    action: {channel: webhook, message: hi}
  - id: big-order
    when: {threshold: {value: "properties.value / 100", ">": 2}}
    action: {channel: email, message: hi}
"""
)
TRIGGERS = load_playbooks(EXAMPLES) + EXTRA
USERS = ["u1", "u2", "u3", "u4"]
ACCOUNTS = ["acme", "globex"]
HORIZON_MS = 60 * DAY


def _iso(t: int) -> str:
    return format_time(t)


@st.composite
def streams(draw: st.DrawFn) -> list[Event]:
    n = draw(st.integers(min_value=0, max_value=60))
    messages = []
    for i in range(n):
        # distinct timestamps (+ i ms): the order of simultaneous events is arrival order
        t = T0_MS + draw(st.integers(min_value=0, max_value=HORIZON_MS // MINUTE)) * MINUTE + i
        user = draw(st.sampled_from(USERS))
        kind = draw(
            st.sampled_from(["login", "error", "page", "identify", "group", "order", "search"])
        )
        when = _iso(t)
        if kind == "login":
            messages.append(
                track("Login", when, user, account=draw(st.sampled_from([None, *ACCOUNTS])))
            )
        elif kind == "error":
            fp = draw(st.sampled_from(["billing-export-timeout", "other"]))
            messages.append(track("Error", when, user, fingerprint=fp))
        elif kind == "page":
            messages.append(page(draw(st.sampled_from(["/kb/settings/a", "/home"])), when, user))
        elif kind == "identify":
            created = _iso(t - draw(st.integers(0, 10)) * DAY)
            messages.append(identify(when, user, created_at=created))
        elif kind == "group":
            used = draw(st.integers(0, 120))
            messages.append(
                group(
                    when,
                    draw(st.sampled_from(ACCOUNTS)),
                    user,
                    storage_used=used,
                    storage_limit=100,
                    plan=draw(st.sampled_from(["free", "pro"])),
                    renewal_date=_iso(t + draw(st.integers(0, 60)) * DAY),
                )
            )
        elif kind == "order":
            messages.append(track("Order Completed", when, user, value=draw(st.integers(0, 500))))
        else:
            messages.append(track("Search Performed", when, user))
    evs = events(messages)
    evs.sort(key=lambda e: e.timestamp_ms)
    return evs


def run(
    evs: list[Event], *, chunks: list[int] | None = None, advances: bool = False, lateness: int = 0
) -> list[dict[str, object]]:
    runner = Runner(engine.State(engine.Playbook(TRIGGERS)), lateness_ms=lateness)
    out = []
    i = 0
    sizes = iter(chunks or [])
    while i < len(evs):
        size = max(1, next(sizes, 1))
        for event in evs[i : i + size]:
            out.extend(runner.push(event))
        i += size
        if advances and i < len(evs):
            # the clock may be advanced to any time up to the next event's timestamp
            out.extend(runner.advance(evs[i].timestamp_ms + lateness))
    out.extend(runner.finish(T0_MS + HORIZON_MS + 30 * DAY))
    return [f.to_dict() for f in out]


@settings(max_examples=60, deadline=None)
@given(streams())
def test_replay_is_deterministic(evs):
    assert run(evs) == run(list(evs))


@settings(max_examples=60, deadline=None)
@given(
    streams(),
    st.lists(st.integers(min_value=1, max_value=7), max_size=30),
    st.sampled_from([0, 30 * MINUTE]),
)
def test_firings_do_not_depend_on_chunking_or_clock_polling(evs, chunks, lateness):
    got = run(evs, chunks=chunks, advances=True, lateness=lateness)
    assert got == run(evs)


@settings(max_examples=60, deadline=None)
@given(streams(), st.randoms(use_true_random=False))
def test_disorder_within_the_lateness_changes_nothing(evs, rnd):
    lateness = 2 * 3_600_000
    # displace each event by less than the lateness: sort by a jittered key
    jittered = sorted(evs, key=lambda e: e.timestamp_ms + rnd.randrange(0, lateness))
    runner = Runner(engine.State(engine.Playbook(TRIGGERS)), lateness_ms=lateness)
    got = runner.push_many(jittered)
    got.extend(runner.finish(T0_MS + HORIZON_MS + 30 * DAY))
    assert runner.late == 0
    assert [f.to_dict() for f in got] == run(evs)


def test_the_streams_exercise_the_triggers():
    """Guard against a generator that never makes anything fire."""
    import random

    rnd = random.Random(7)
    example = []
    for day in range(40):
        for user in USERS:
            example.append(
                track("Login", _iso(T0_MS + day * DAY + rnd.randrange(DAY)), user, account="acme")
            )
    example.append(group(_iso(T0_MS), "acme", "u1", storage_used=90, storage_limit=100, plan="pro"))
    example.append(track("Error", _iso(T0_MS + DAY), "u1", fingerprint="billing-export-timeout"))
    example.append(page("/kb/settings/a", _iso(T0_MS + 2 * DAY), "u2"))
    evs = sorted(events(example), key=lambda e: e.timestamp_ms)
    fired = {f["trigger"] for f in run(evs)}
    assert {"storage-85", "known-bug", "settings-dwell", "pro-or-quiet"} <= fired
