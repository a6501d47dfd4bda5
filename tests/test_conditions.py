"""Conformance suite for every condition kind and the firing semantics of DESIGN.md.

Each test states the moment a firing must happen (or that none must), at the exact thresholds and
window edges the design pins down. Windows are half-open (now - d, now]; counts live in buckets of
window/60, so events sit on bucket boundaries wherever a test asserts an exact moment. The last
section checks the windowed kinds against a brute-force reference on random input.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from forewarn import decide, engine
from forewarn.engine import Firing
from forewarn.runner import Runner
from tests.factories import (
    MINUTE,
    T0_MS,
    at,
    events,
    group,
    identify,
    message,
    ms,
    page,
    playbook,
    replay,
    times,
    track,
    trigger,
)

# --- helpers ----------------------------------------------------------------------------------


def run(
    when: str,
    messages: list[dict[str, Any]],
    *,
    until: str | None = None,
    scope: str = "user",
    extra: str = "",
) -> list[Firing]:
    """Replay one trigger `t` with condition `when` over the messages."""
    return replay(trigger(when, scope=scope, extra=extra), messages, until=until)


def seen(firings: list[Firing]) -> list[tuple[str, str]]:
    """(subject, moment) of each firing, in firing order."""
    return [(f.subject, f.to_dict()["at"]) for f in firings]


def decisions(firings: list[Firing]) -> list[tuple[str, str | None]]:
    return [(f.decision, f.reason) for f in firings]


def run_unsorted(
    triggers: list[Any], messages: list[dict[str, Any]], lateness_ms: int, until: str
) -> tuple[list[Firing], Runner]:
    """Push messages in the given (arrival) order straight into a Runner, as the live host does."""
    runner = Runner(engine.State(engine.Playbook(triggers)), lateness_ms=lateness_ms)
    firings = runner.push_many(events(messages))
    firings.extend(runner.finish(events([message("track", until, event="_")])[0].timestamp_ms))
    return firings, runner


def pageurl(url: str, when: str, user: str = "u1") -> dict[str, Any]:
    return message("page", when, user, name="Page", properties={"url": url})


# --- event ------------------------------------------------------------------------------------


def test_event_without_within_fires_on_every_matching_event():
    fs = run(
        "{event: {name: Payment Failed}}",
        [
            track("Payment Failed", at()),
            track("Payment Succeeded", at(minutes=1)),
            track("Payment Failed", at(minutes=2)),
            track("Payment Failed", at(minutes=2, seconds=1), user="u2"),
        ],
    )
    assert seen(fs) == [
        ("u1", at()),
        ("u1", at(minutes=2)),
        ("u2", at(minutes=2, seconds=1)),
    ]
    assert decisions(fs) == [("send", None)] * 3
    assert fs[0].evidence == {"condition": "event", "name": "Payment Failed", "matched": True}
    assert fs[0].scope == "user" and fs[0].trigger == "t" and fs[0].channel == "email"


def test_event_where_equality_and_list_means_any_of():
    when = "{event: {name: Export, where: {format: [csv, xlsx], big: true}}}"
    fs = run(
        when,
        [
            track("Export", at(minutes=1), format="csv", big=True),
            track("Export", at(minutes=2), format="pdf", big=True),
            track("Export", at(minutes=3), format="xlsx", big=True),
            track("Export", at(minutes=4), format="xlsx", big=False),
            track("Export", at(minutes=5), format="xlsx"),
            track("Import", at(minutes=6), format="csv", big=True),
        ],
    )
    assert times(fs) == [at(minutes=1), at(minutes=3)]
    assert fs[0].evidence["where"] == {"format": ["csv", "xlsx"], "big": True}


def test_event_where_does_not_confuse_booleans_with_numbers():
    fs = run("{event: {name: Export, where: {rows: 1}}}", [track("Export", at(), rows=True)])
    assert fs == []


def test_event_within_fires_once_while_true_and_rearms_when_the_window_empties():
    fs = run(
        "{event: {name: Error, within: 1h}}",
        [
            track("Error", at()),  # fires; true until 1h
            track("Error", at(minutes=59)),  # still true: no new episode; now true until 1h59m
            track("Error", at(hours=1, minutes=59)),  # the 59m event left exactly now: re-armed
            track("Error", at(hours=2, minutes=30)),  # still inside the window of the last one
        ],
    )
    assert times(fs) == [at(), at(hours=1, minutes=59)]
    assert fs[1].evidence == {
        "condition": "event",
        "name": "Error",
        "count": 1,
        "at_least": 1,
        "within": "1h",
    }


def test_event_count_at_exact_threshold_and_window_edge():
    when = "{event: {name: Error, count: 3, within: 1h}}"
    # 0, 30m, 59m: three inside (59m - 1h, 59m]
    inside = run(when, [track("Error", at(minutes=m)) for m in (0, 30, 59)])
    assert times(inside) == [at(minutes=59)]
    assert inside[0].evidence["count"] == 3 and inside[0].evidence["at_least"] == 3
    # 0, 30m, 60m: at 60m the first has left (the window is half-open)
    edge = run(when, [track("Error", at(minutes=m)) for m in (0, 30, 60)])
    assert edge == []
    # two events are one short
    short = run(when, [track("Error", at(minutes=m)) for m in (0, 30)], until=at(hours=3))
    assert short == []


def test_event_count_falling_below_rearms_by_timer_so_the_next_event_fires_again():
    when = "{event: {name: Error, count: 2, within: 1h}}"
    fs = run(
        when,
        [
            track("Error", at()),
            track("Error", at(minutes=30)),  # fires: 2 in the window
            # a timer at 1h (the 0 event leaves) runs before this event stamped 1h: false, then
            # this event makes 2 again (30m, 1h) -> a new rising edge at exactly 1h
            track("Error", at(hours=1)),
        ],
    )
    assert times(fs) == [at(minutes=30), at(hours=1)]


def test_event_count_stays_active_without_a_gap_and_does_not_refire():
    when = "{event: {name: Error, count: 2, within: 1h}}"
    # every event keeps the count at >= 2 at all times: one episode
    fs = run(when, [track("Error", at(minutes=m)) for m in range(0, 300, 20)])
    assert times(fs) == [at(minutes=20)]


def test_event_count_unaligned_events_end_within_one_bucket():
    # X at 0:00:30 leaves the exact window at 1h00m30s; its bucket [0, 1m) leaves at 1h.
    fs = run(
        "{not: {event: {name: X, within: 1h}}}", [track("X", at(seconds=30))], until=at(hours=2)
    )
    assert len(fs) == 1
    exact = ms(hours=1, seconds=30)
    assert exact - MINUTE <= fs[0].at_ms <= exact + MINUTE


def test_event_counts_per_subject():
    when = "{event: {name: Error, count: 2, within: 1h}}"
    fs = run(
        when,
        [
            track("Error", at(), user="u1"),
            track("Error", at(minutes=1), user="u2"),
            track("Error", at(minutes=2), user="u2"),
        ],
    )
    assert seen(fs) == [("u2", at(minutes=2))]


# --- spike ------------------------------------------------------------------------------------

# window 10m (buckets of 10s), baseline 50m (window + baseline = 1h, buckets of 1m)
SPIKE = "{spike: {name: Error, window: 10m, baseline: 50m, factor: 3, min_count: 5}}"


def test_spike_eligible_with_empty_baseline_fires_at_min_count():
    msgs = [identify(at(), plan="x")]  # first seen at 0: eligible from 1h
    four = run(SPIKE, msgs + [track("Error", at(minutes=m)) for m in (61, 62, 63, 64)])
    assert four == []
    five = run(SPIKE, msgs + [track("Error", at(minutes=m)) for m in (61, 62, 63, 64, 65)])
    assert times(five) == [at(minutes=65)]
    assert five[0].evidence == {
        "condition": "spike",
        "name": "Error",
        "count": 5,
        "window": "10m",
        "baseline_rate": 0.0,
        "baseline": "50m",
        "factor": 3.0,
        "threshold": 5.0,
        "min_count": 5,
        "eligible": True,
    }


def test_spike_new_subject_is_not_eligible_before_window_plus_baseline():
    # ten errors in the first minutes of a subject's life: no history, no spike
    fs = run(SPIKE, [track("Error", at(seconds=10 * i)) for i in range(10)], until=at(hours=3))
    assert fs == []


def test_spike_becomes_eligible_at_exactly_first_seen_plus_window_plus_baseline_by_timer():
    msgs = [identify(at(), plan="x")] + [
        track("Error", at(minutes=m)) for m in (55, 56, 57, 58, 59)
    ]
    # at 59m five errors in the window, but the subject is 59m old: not eligible yet;
    # at exactly 1h it is, and the five are still in (50m, 1h]: fires from the timer
    fs = run(SPIKE, msgs, until=at(hours=2))
    assert times(fs) == [at(hours=1)]
    assert fs[0].evidence["count"] == 5 and fs[0].evidence["eligible"] is True


def test_spike_against_baseline_rate_at_exact_factor():
    # baseline: 10 errors in (now - 1h, now - 10m] -> rate 10 * 10m / 50m = 2 per window;
    # factor 3 -> threshold 6
    base = [identify(at(), plan="x")] + [
        track("Error", at(minutes=m)) for m in (11, 12, 21, 22, 31, 32, 41, 42, 51, 52)
    ]
    five = run(SPIKE, base + [track("Error", at(minutes=m)) for m in (61, 62, 63, 64, 65)])
    assert five == []
    six = run(SPIKE, base + [track("Error", at(minutes=m)) for m in (61, 62, 63, 64, 65, 66)])
    assert times(six) == [at(minutes=66)]
    ev = six[0].evidence
    assert (ev["count"], ev["baseline_rate"], ev["threshold"]) == (6, 2.0, 6.0)


def test_spike_starts_by_timer_when_the_baseline_empties():
    # 20 errors at 4m make the baseline rate 4 per window (threshold 12) until they leave the
    # baseline at exactly 1h04m; the six errors of 58m..63m are then a spike, with no new event
    msgs = [identify(at(), plan="x")]
    msgs += [track("Error", at(minutes=4)) for _ in range(20)]
    msgs += [track("Error", at(minutes=m)) for m in range(58, 64)]
    fs = run(SPIKE, msgs, until=at(hours=2))
    assert times(fs) == [at(minutes=64)]
    ev = fs[0].evidence
    assert (ev["count"], ev["baseline_rate"], ev["threshold"]) == (6, 0.0, 5.0)


def test_spike_ends_and_rearms_for_a_second_spike():
    first = [track("Error", at(minutes=61, seconds=10 * i)) for i in range(5)]
    second = [track("Error", at(hours=3, seconds=10 * i)) for i in range(5)]
    fs = run(
        "{spike: {name: Error, window: 10m, baseline: 50m, factor: 1, min_count: 5}}",
        [identify(at(), plan="x"), *first, *second],
    )
    # the first burst has fully entered the baseline (rate 1) and left it again by 3h
    assert times(fs) == [at(minutes=61, seconds=40), at(hours=3, seconds=40)]


def test_spike_where_filters_events():
    when = (
        "{spike: {name: Error, where: {level: fatal}, window: 10m, baseline: 50m,"
        " factor: 3, min_count: 2}}"
    )
    msgs = [identify(at(), plan="x")]
    msgs += [track("Error", at(minutes=61), level="warn"), track("Error", at(minutes=62))]
    assert run(when, msgs) == []
    msgs.append(track("Error", at(minutes=63), level="fatal"))
    msgs.append(track("Error", at(minutes=64), level="fatal"))
    assert times(run(when, msgs)) == [at(minutes=64)]


# --- drop -------------------------------------------------------------------------------------

# window 1h (buckets of 1m), baseline 4h (window + baseline = 5h, buckets of 5m)
DROP = "{drop: {name: Query, window: 1h, below: 0.5, baseline: 4h}}"


def test_drop_fires_from_a_timer_when_activity_stops():
    # a query every 10 minutes from 0 to 5h50m, then silence. Baseline: 24 per 4h = 6 per hour,
    # so the threshold is 3. At 6h20m the window (5h20m, 6h20m] holds 5h30m, 5h40m, 5h50m = 3.
    msgs = [track("Query", at(minutes=m)) for m in range(0, 360, 10)]
    fs = run(DROP, msgs, until=at(hours=12))
    assert times(fs) == [at(hours=6, minutes=20)]
    assert fs[0].evidence == {
        "condition": "drop",
        "name": "Query",
        "count": 3,
        "window": "1h",
        "baseline_rate": 6.0,
        "baseline": "4h",
        "below": 0.5,
        "threshold": 3.0,
        "eligible": True,
    }


def test_drop_not_before_eligible_even_when_silent():
    # activity for 2h then silence: a drop is visible from 3h, but the subject is eligible only
    # at first_seen + 5h; by then its baseline still has the activity (1h..2h in (0, 4h])
    msgs = [track("Query", at(minutes=m)) for m in range(5, 125, 5)]
    fs = run(DROP, msgs, until=at(hours=12))
    assert times(fs) == [at(hours=5, minutes=5)]


def test_drop_needs_baseline_activity():
    # eligible at 5h (first seen at 0 by identify); the one query at 0 has left the span by then
    none = run(DROP, [identify(at(), plan="x"), track("Query", at())], until=at(hours=12))
    assert none == []
    # the same with the query at 5m (a coarse bucket boundary): still in the baseline at 5h,
    # the window is empty -> drop at exactly 5h, from the eligibility timer
    one = run(DROP, [identify(at(), plan="x"), track("Query", at(minutes=5))], until=at(hours=12))
    assert times(one) == [at(hours=5)]
    assert one[0].evidence["count"] == 0 and one[0].evidence["baseline_rate"] == 0.25


def test_drop_steady_activity_never_drops():
    msgs = [track("Query", at(minutes=m)) for m in range(0, 12 * 60, 10)]
    assert run(DROP, msgs) == []


# --- absent -----------------------------------------------------------------------------------


def test_absent_fires_at_exactly_last_match_plus_for_by_timer():
    fs = run("{absent: {name: Login, for: 1d}}", [track("Login", at())], until=at(days=3))
    assert times(fs) == [at(days=1)]
    assert fs[0].evidence == {
        "condition": "absent",
        "name": "Login",
        "last_seen": at(),
        "silent_for": "1d",
        "threshold": "1d",
    }


def test_absent_timer_at_t_runs_before_an_event_stamped_t():
    # the match at exactly +1d comes after the firing; it re-arms, and 1d later fires again
    fs = run(
        "{absent: {name: Login, for: 1d}}",
        [track("Login", at()), track("Login", at(days=1))],
        until=at(days=2, hours=12),
    )
    assert times(fs) == [at(days=1), at(days=2)]


def test_absent_a_match_before_the_deadline_moves_it():
    fs = run(
        "{absent: {name: Login, for: 1d}}",
        [track("Login", at()), track("Login", at(hours=23, minutes=59, seconds=59))],
        until=at(days=5),
    )
    assert times(fs) == [at(days=1, hours=23, minutes=59, seconds=59)]


def test_absent_never_true_for_a_subject_that_never_matched():
    fs = run(
        "{absent: {name: Login, where: {method: sso}, for: 1d}}",
        [identify(at(), plan="x"), track("Login", at(), method="password")],
        until=at(days=10),
    )
    assert fs == []


def test_absent_where_only_matching_events_reset_it():
    fs = run(
        "{absent: {name: Login, where: {method: [sso, saml]}, for: 1d}}",
        [
            track("Login", at(), method="sso"),
            track("Login", at(hours=12), method="password"),  # not a match: no reset
        ],
        until=at(days=3),
    )
    assert times(fs) == [at(days=1)]


def test_absent_inside_all_combines_as_a_level_condition():
    when = "{all: [{absent: {name: Login, for: 1d}}, {traits: {plan: pro}}]}"
    fs = run(
        when,
        [
            identify(at(), plan="pro"),
            track("Login", at()),
            identify(at(hours=12), plan="free"),  # at 1d the audience is false: no firing
            identify(at(days=2), plan="pro"),  # both true again -> fires at the identify
        ],
        until=at(days=4),
    )
    assert times(fs) == [at(days=2)]
    of = fs[0].evidence["of"]
    assert [p["condition"] for p in of] == ["absent", "traits"]
    assert all(p["true"] for p in of)


# --- threshold --------------------------------------------------------------------------------

STORAGE = '{threshold: {value: "traits.used / traits.limit", ">=": 0.85}}'


def test_threshold_over_traits_at_exact_value_and_rearming():
    fs = run(
        STORAGE,
        [
            identify(at(), used=84, limit=100),
            identify(at(hours=1), used=85),  # exactly 0.85: fires
            identify(at(hours=2), used=99),  # still true: same episode
            identify(at(hours=3), used=10),  # false: re-armed
            identify(at(hours=4), used=90),  # fires again
        ],
    )
    assert times(fs) == [at(hours=1), at(hours=4)]
    assert fs[0].evidence == {
        "condition": "threshold",
        "expression": "traits.used / traits.limit",
        "value": 0.85,
        "op": ">=",
        "threshold": 0.85,
    }


@pytest.mark.parametrize(
    ("op", "value", "fires"),
    [
        (">=", 3, True),
        (">", 3, False),
        (">", 4, True),
        ("<=", 3, True),
        ("<", 3, False),
        ("<", 2, True),
        ("==", 3, True),
        ("==", 4, False),
    ],
)
def test_threshold_comparators_at_the_boundary(op, value, fires):
    fs = run(f'{{threshold: {{value: traits.seats, "{op}": 3}}}}', [identify(at(), seats=value)])
    assert len(fs) == int(fires)


def test_threshold_division_by_zero_and_missing_trait_are_false():
    fs = run(
        STORAGE,
        [
            identify(at(), used=90, limit=0),  # division by zero: false
            identify(at(), user="u2", used=90),  # limit missing: false
            identify(at(), user="u3", used="90", limit=100),  # not a number: false
            identify(at(minutes=1), limit=100),  # u1 now 0.9: fires
        ],
    )
    assert seen(fs) == [("u1", at(minutes=1))]


def test_threshold_over_properties_fires_on_each_matching_event():
    fs = run(
        '{threshold: {value: "properties.amount * 2", ">": 200}}',
        [
            track("Purchase", at(), amount=100),  # exactly 200: not >
            track("Purchase", at(minutes=1), amount=101),
            track("Refund", at(minutes=2), amount=150),  # any track event carries properties
            track("Purchase", at(minutes=3), amount="lots"),
            track("Purchase", at(minutes=4)),
            page("/x", at(minutes=5)),
        ],
    )
    assert times(fs) == [at(minutes=1), at(minutes=2)]
    assert fs[0].evidence["value"] == 202.0


def test_threshold_mixing_traits_and_properties():
    when = '{threshold: {value: "properties.seats + traits.seats", ">=": 10}}'
    fs = run(
        when,
        [
            identify(at(), seats=8),  # no event: properties.seats missing -> false
            track("Seats Added", at(minutes=1), seats=1),
            track("Seats Added", at(minutes=2), seats=2),
        ],
    )
    assert times(fs) == [at(minutes=2)]


# --- dwell ------------------------------------------------------------------------------------

DWELL = '{dwell: {page: "/billing/*", for: 3m, unless: [Plan Upgraded, Checkout Started]}}'


def test_dwell_fires_exactly_for_later_by_timer():
    fs = run(DWELL, [page("/billing/plans", at())], until=at(hours=1))
    assert seen(fs) == [("u1", at(minutes=3))]
    assert fs[0].evidence == {
        "condition": "dwell",
        "page": "/billing/*",
        "path": "/billing/plans",
        "dwell": "3m",
        "threshold": "3m",
        "unless": ["Plan Upgraded", "Checkout Started"],
    }


def test_dwell_another_page_view_before_then_ends_it():
    fs = run(
        DWELL,
        [page("/billing/plans", at()), page("/home", at(minutes=2, seconds=59))],
        until=at(hours=1),
    )
    assert fs == []


def test_dwell_another_page_view_at_exactly_for_comes_after_the_firing():
    fs = run(DWELL, [page("/billing/plans", at()), page("/home", at(minutes=3))], until=at(hours=1))
    assert times(fs) == [at(minutes=3)]


def test_dwell_a_matching_page_view_starts_a_new_dwell():
    fs = run(
        DWELL,
        [page("/billing/plans", at()), page("/billing/invoices", at(minutes=2))],
        until=at(hours=1),
    )
    assert times(fs) == [at(minutes=5)]
    assert fs[0].evidence["path"] == "/billing/invoices"


def test_dwell_unless_event_ends_it_until_the_next_page_view():
    fs = run(
        DWELL,
        [
            page("/billing/plans", at()),
            track("Checkout Started", at(minutes=1)),  # ends the dwell; does not restart it
            track("Something Else", at(minutes=2)),
            page("/billing/plans", at(minutes=10)),  # a new dwell
        ],
        until=at(hours=1),
    )
    assert times(fs) == [at(minutes=13)]


def test_dwell_unless_event_at_exactly_for_is_too_late():
    fs = run(
        DWELL,
        [page("/billing/plans", at()), track("Plan Upgraded", at(minutes=3))],
        until=at(hours=1),
    )
    assert times(fs) == [at(minutes=3)]


def test_dwell_fires_again_after_a_new_page_view():
    fs = run(
        DWELL,
        [page("/billing/plans", at()), page("/billing/plans", at(minutes=10))],
        until=at(hours=1),
    )
    assert times(fs) == [at(minutes=3), at(minutes=13)]


def test_dwell_matches_the_path_of_a_url():
    fs = run(
        DWELL,
        [pageurl("https://app.example.com/billing/plans?tab=annual#top", at())],
        until=at(hours=1),
    )
    assert times(fs) == [at(minutes=3)]
    assert fs[0].evidence["path"] == "/billing/plans"


@pytest.mark.parametrize(
    ("pattern", "path", "fires"),
    [
        ("/projects/*/settings", "/projects/42/team/settings", True),  # * crosses /
        ("/projects/*/settings", "/projects/42/settings/extra", False),  # the whole path
        ("/billing", "/billing/plans", False),
        ("/billing", "/billing", True),
        ("*/billing", "/org/7/billing", True),
        ("/billing/*", "/billing", False),
        ("/settings/?", "/settings/a", True),
    ],
)
def test_dwell_glob_matches_the_whole_path(pattern, path, fires):
    fs = run(f'{{dwell: {{page: "{pattern}", for: 1m}}}}', [page(path, at())], until=at(hours=1))
    assert times(fs) == ([at(minutes=1)] if fires else [])


def test_dwell_is_per_user():
    fs = run(
        DWELL,
        [page("/billing/plans", at(), user="u1"), page("/home", at(minutes=1), user="u2")],
        until=at(hours=1),
    )
    assert seen(fs) == [("u1", at(minutes=3))]


# --- date -------------------------------------------------------------------------------------

RENEWAL = "{date: {trait: renewal_at, within: 30d}}"


def test_date_opens_at_exactly_date_minus_within_by_timer():
    fs = run(RENEWAL, [identify(at(), renewal_at=at(days=40))], until=at(days=60))
    assert times(fs) == [at(days=10)]
    assert fs[0].evidence == {
        "condition": "date",
        "trait": "traits.renewal_at",
        "date": at(days=40),
        "in": "30d",
        "within": "30d",
    }


def test_date_inclusive_at_both_ends():
    fs = run(
        RENEWAL,
        [
            identify(at(), user="far", renewal_at=at(days=30)),  # exactly now + within
            identify(at(), user="now", renewal_at=at()),  # exactly now
            identify(at(), user="past", renewal_at=at(seconds=-1)),
            identify(at(), user="beyond", renewal_at=at(days=30, seconds=1)),  # opens at 1s
        ],
        until=at(days=60),
    )
    assert sorted(seen(fs)) == [("beyond", at(seconds=1)), ("far", at()), ("now", at())]


def test_date_with_traits_prefix_and_epoch_millis_rearms_after_the_date_passes():
    fs = run(
        "{date: {trait: traits.trial_ends, within: 3d}}",
        [
            identify(at(), trial_ends=ms(days=5)),
            identify(at(days=10), trial_ends=ms(days=12)),  # a new date after the old passed
        ],
        until=at(days=20),
    )
    assert times(fs) == [at(days=2), at(days=10)]


def test_date_missing_or_unparseable_is_false():
    fs = run(
        RENEWAL,
        [identify(at(), plan="x"), identify(at(), user="u2", renewal_at="someday")],
        until=at(days=60),
    )
    assert fs == []


# --- age --------------------------------------------------------------------------------------


@pytest.mark.parametrize("since", ["created_at", "traits.created_at"])
def test_age_fires_at_exactly_since_plus_at_least_by_timer(since):
    fs = run(
        f"{{age: {{since: {since}, at_least: 7d}}}}",
        [identify(at(), created_at=at())],
        until=at(days=30),
    )
    assert times(fs) == [at(days=7)]
    assert fs[0].evidence == {
        "condition": "age",
        "since": "traits.created_at",
        "since_date": at(),
        "age": "7d",
        "at_least": "7d",
    }


def test_age_boundaries_at_identify_time():
    fs = run(
        "{age: {since: created_at, at_least: 7d}}",
        [
            identify(at(), user="old", created_at=at(days=-7)),  # exactly 7d: fires now
            identify(at(), user="young", created_at=at(days=-7, seconds=1)),  # 1s short
            identify(at(), user="none", plan="x"),  # no trait: never
        ],
        until=at(days=30),
    )
    assert seen(fs) == [("old", at()), ("young", at(seconds=1))]


# --- ever -------------------------------------------------------------------------------------


def test_ever_fires_once_at_the_first_match():
    fs = run(
        "{ever: {name: Invite Sent, where: {role: [admin, owner]}}}",
        [
            track("Invite Sent", at(), role="member"),
            track("Invite Sent", at(minutes=1), role="owner"),
            track("Invite Sent", at(days=30), role="admin"),
        ],
        until=at(days=60),
    )
    assert times(fs) == [at(minutes=1)]
    assert fs[0].evidence == {
        "condition": "ever",
        "name": "Invite Sent",
        "where": {"role": ["admin", "owner"]},
        "seen": True,
    }


# --- traits -----------------------------------------------------------------------------------


def test_trait_sent_as_null_counts_as_missing():
    fs = run(
        '{any: [{traits: {plan: free}}, {threshold: {value: traits.seats, "<": 1}}]}',
        [identify(at(), plan="free", seats=0), identify(at(minutes=1), plan=None, seats=None)],
    )
    assert times(fs) == [at()]
    fs = run(
        "{not: {traits: {plan: free}}}",
        [identify(at(), plan="free"), identify(at(minutes=1), plan=None)],
    )
    assert times(fs) == [at(minutes=1)]  # not of a false (missing) audience is true


def test_traits_audience_lists_and_rising_edge():
    fs = run(
        "{traits: {plan: [pro, business], country: US}}",
        [
            identify(at(), plan="pro"),  # country missing: false
            identify(at(minutes=1), country="US"),  # fires
            identify(at(minutes=2), plan="business"),  # still true
            identify(at(minutes=3), plan="free"),  # false
            identify(at(minutes=4), plan="business"),  # fires again
            identify(at(minutes=5), user="u2", plan="enterprise", country="US"),
        ],
    )
    assert seen(fs) == [("u1", at(minutes=1)), ("u1", at(minutes=4))]
    assert fs[1].evidence == {
        "condition": "traits",
        "values": {"traits.plan": "business", "traits.country": "US"},
        "expected": {"traits.plan": ["pro", "business"], "traits.country": "US"},
    }


# --- all / any / not --------------------------------------------------------------------------


def test_all_needs_every_part():
    when = "{all: [{event: {name: Error, count: 2, within: 1h}}, {traits: {plan: pro}}]}"
    fs = run(
        when,
        [
            identify(at(), plan="free"),
            track("Error", at(minutes=1)),
            track("Error", at(minutes=2)),  # 2 errors but plan free
            identify(at(minutes=3), plan="pro"),  # both true: fires at the identify
            identify(at(minutes=4), user="u2", plan="pro"),
            track("Error", at(minutes=5), user="u2"),  # one error only
        ],
    )
    assert seen(fs) == [("u1", at(minutes=3))]


def test_all_with_an_instant_event_is_a_new_episode_per_event():
    when = "{all: [{event: {name: Payment Failed}}, {traits: {plan: pro}}]}"
    fs = run(
        when,
        [
            track("Payment Failed", at()),
            identify(at(minutes=1), plan="pro"),  # no event now: false
            track("Payment Failed", at(minutes=2)),
            track("Payment Failed", at(minutes=3)),
        ],
    )
    assert times(fs) == [at(minutes=2), at(minutes=3)]


def test_any_fires_on_the_first_true_part_and_stays_active():
    when = (
        "{any: [{traits: {plan: enterprise}},"
        " {event: {name: Ticket Created, count: 2, within: 1d}}]}"
    )
    fs = run(
        when,
        [
            identify(at(), plan="enterprise"),
            track("Ticket Created", at(hours=1)),
            track("Ticket Created", at(hours=2)),  # true already: same episode
            track("Ticket Created", at(hours=1), user="u2"),
            track("Ticket Created", at(hours=3), user="u2"),
        ],
    )
    assert seen(fs) == [("u1", at()), ("u2", at(hours=3))]


def test_not_of_a_window_fires_when_the_window_empties():
    fs = run(
        "{not: {event: {name: Heartbeat, within: 1h}}}",
        [track("Heartbeat", at()), track("Heartbeat", at(minutes=30))],
        until=at(hours=5),
    )
    assert times(fs) == [at(hours=1, minutes=30)]
    assert fs[0].evidence["condition"] == "not"
    assert fs[0].evidence["of"][0]["count"] == 0


def test_not_ever_inside_all_with_an_audience():
    when = "{all: [{traits: {plan: pro}}, {not: {ever: {name: Setup Done}}}]}"
    fs = run(
        when,
        [
            identify(at(), user="u1", plan="pro"),
            track("Setup Done", at(), user="u2"),
            identify(at(minutes=1), user="u2", plan="pro"),
        ],
    )
    assert seen(fs) == [("u1", at())]


# --- subjects ---------------------------------------------------------------------------------


def test_anonymous_id_is_the_subject_without_a_user_id():
    anon = message("track", at(), None, anonymousId="anon-7", event="Error", properties={})
    fs = run("{event: {name: Error}}", [anon])
    assert seen(fs) == [("anon-7", at())]


def test_alias_maps_later_anonymous_events_to_the_user():
    alias = message("alias", at(), "u1", previousId="anon-1")
    later = message("track", at(minutes=1), None, anonymousId="anon-1", event="Error")
    fs = run("{event: {name: Error}}", [alias, later])
    assert seen(fs) == [("u1", at(minutes=1))]


def test_event_name_matches_track_events_only():
    view = message("page", at(), name="Pricing", properties={"path": "/pricing"})
    assert run("{event: {name: Pricing}}", [view]) == []
    assert run("{ever: {name: Pricing}}", [view]) == []


@pytest.mark.parametrize(
    "first",
    [
        identify(at(), plan="x"),
        page("/home", at()),
        track("Something Else", at()),
        group(at(), "acme"),
    ],
)
def test_first_seen_is_the_earliest_event_of_any_type(first):
    errors = [track("Error", at(minutes=55, seconds=10 * i)) for i in range(5)]
    fs = run(SPIKE, [first, *errors], until=at(hours=2))
    assert times(fs) == [at(hours=1)]


# --- firing: rising edge, cooldown, shadow, holdout -------------------------------------------


def test_cooldown_suppresses_a_new_rising_edge_and_is_not_deferred():
    fs = run(
        "{event: {name: Payment Failed}}",
        [
            track("Payment Failed", at()),
            track("Payment Failed", at(minutes=30)),
            track("Payment Failed", at(hours=2)),
        ],
        extra="    cooldown: 1h",
        until=at(hours=5),
    )
    assert times(fs) == [at(), at(minutes=30), at(hours=2)]  # nothing moved to 1h
    assert decisions(fs) == [("send", None), ("suppressed", "cooldown"), ("send", None)]


def test_cooldown_holds_until_exactly_plus_d():
    fs = run(
        "{event: {name: Payment Failed}}",
        [
            track("Payment Failed", at()),
            track("Payment Failed", at(minutes=59, seconds=59)),
            track("Payment Failed", at(hours=1, minutes=59, seconds=59)),  # 1h after the send
        ],
        extra="    cooldown: 1h",
    )
    assert decisions(fs) == [("send", None), ("suppressed", "cooldown"), ("send", None)]
    fs = run(
        "{event: {name: Payment Failed}}",
        [track("Payment Failed", at()), track("Payment Failed", at(hours=1))],
        extra="    cooldown: 1h",
    )
    assert decisions(fs) == [("send", None), ("send", None)]


def test_cooldown_applies_to_level_conditions_rearmed_by_timer():
    fs = run(
        "{event: {name: Error, within: 10m}}",
        [track("Error", at()), track("Error", at(minutes=20)), track("Error", at(days=1))],
        extra="    cooldown: 1d",
    )
    assert times(fs) == [at(), at(minutes=20), at(days=1)]
    assert decisions(fs) == [("send", None), ("suppressed", "cooldown"), ("send", None)]


def test_cooldown_is_per_subject():
    fs = run(
        "{event: {name: Payment Failed}}",
        [track("Payment Failed", at(), user="u1"), track("Payment Failed", at(1), user="u2")],
        extra="    cooldown: 7d",
    )
    assert decisions(fs) == [("send", None), ("send", None)]


def test_cooldown_runs_from_the_last_episode_acted_on_not_from_suppressed_ones():
    fs = run(
        "{event: {name: Payment Failed}}",
        [
            track("Payment Failed", at()),
            track("Payment Failed", at(minutes=50)),  # suppressed: does not extend the cooldown
            track("Payment Failed", at(hours=1)),  # exactly 1h after the send
            track("Payment Failed", at(hours=1, minutes=30)),
        ],
        extra="    cooldown: 1h",
    )
    assert decisions(fs) == [
        ("send", None),
        ("suppressed", "cooldown"),
        ("send", None),
        ("suppressed", "cooldown"),
    ]


def test_held_out_episode_starts_a_cooldown():
    book = trigger("{event: {name: Payment Failed}}", extra="    holdout: 0.5\n    cooldown: 1h")
    users = [f"user-{i}" for i in range(40)]
    held = [u for u in users if decide.holdout_bucket("t", u, "forewarn") < 0.5]
    assert held
    fs = replay(
        book,
        [track("Payment Failed", at(), user=held[0]), track("Payment Failed", at(1), user=held[0])],
    )
    assert decisions(fs) == [("held_out", None), ("suppressed", "cooldown")]


def test_shadow_mode_records_suppressed_shadow():
    fs = run(
        "{event: {name: Payment Failed}}",
        [track("Payment Failed", at()), track("Payment Failed", at(minutes=1))],
        extra="    mode: shadow\n    cooldown: 1h",
    )
    assert decisions(fs) == [("suppressed", "shadow"), ("suppressed", "shadow")]


def test_holdout_share_is_about_right_and_stable():
    msgs = [track("Payment Failed", at(seconds=i), user=f"user-{i}") for i in range(2000)]
    book = trigger("{event: {name: Payment Failed}}", extra="    holdout: 0.2")
    first = replay(book, msgs)
    again = replay(book, list(reversed(msgs)))
    assert len(first) == 2000  # held-out subjects still get a recorded decision
    held = {f.subject for f in first if f.decision == "held_out"}
    assert {f.decision for f in first} == {"send", "held_out"}
    assert 0.17 * 2000 <= len(held) <= 0.23 * 2000
    assert held == {f.subject for f in again if f.decision == "held_out"}
    assert all(f.reason is None for f in first)
    # a held-out subject stays held out on later episodes
    later = replay(
        book, [*msgs, *(track("Payment Failed", at(hours=1), user=s) for s in sorted(held)[:20])]
    )
    assert all(f.decision == "held_out" for f in later[2000:])
    assert held == {
        f"user-{i}"
        for i in range(2000)
        if decide.holdout_bucket("t", f"user-{i}", "forewarn") < 0.2
    }


# --- account scope ----------------------------------------------------------------------------


def test_account_event_counts_for_context_group_id_only():
    fs = run(
        "{event: {name: Export}}",
        [
            group(at(), "acme"),
            group(at(), "beta"),
            track("Export", at(minutes=1), account="beta"),
        ],
        scope="account",
    )
    assert seen(fs) == [("beta", at(minutes=1))]
    assert fs[0].scope == "account"


def test_account_event_without_group_id_counts_for_every_account_joined_before_it():
    fs = run(
        "{event: {name: Export}}",
        [
            track("Export", at()),  # no account yet
            group(at(minutes=1), "acme"),
            track("Export", at(minutes=2)),
            group(at(minutes=3), "beta"),
            track("Export", at(minutes=4)),
        ],
        scope="account",
    )
    assert sorted(seen(fs)) == [
        ("acme", at(minutes=2)),
        ("acme", at(minutes=4)),
        ("beta", at(minutes=4)),
    ]


def test_account_group_call_at_the_same_moment_counts_wherever_it_comes():
    msgs = [track("Export", at(minutes=5)), group(at(minutes=5), "acme")]
    book = trigger("{event: {name: Export}}", scope="account")
    assert seen(replay(book, msgs)) == [("acme", at(minutes=5))]
    # the same in a live runner that holds events for the lateness
    firings, runner = run_unsorted(book, msgs, MINUTE, at(hours=1))
    assert seen(firings) == [("acme", at(minutes=5))] and runner.late == 0


def test_account_aggregates_events_of_several_users():
    when = "{event: {name: Error, count: 3, within: 1h}}"
    msgs = [
        group(at(), "acme", user="u1"),
        group(at(), "acme", user="u2"),
        track("Error", at(minutes=1), user="u1"),
        track("Error", at(minutes=2), user="u2"),
        track("Error", at(minutes=3), user="u1"),
    ]
    fs = run(when, msgs, scope="account")
    assert seen(fs) == [("acme", at(minutes=3))]
    assert fs[0].evidence["count"] == 3
    assert run(when, msgs) == []  # no user alone has three


def test_account_threshold_over_group_traits_merged_from_several_calls():
    fs = run(
        STORAGE,
        [
            group(at(), "acme", user="u1", limit=100),
            group(at(minutes=1), "acme", user="u2", used=84),
            group(at(minutes=2), "acme", user="u2", used=85),  # exactly 0.85
            identify(at(minutes=3), user="u1", used=1),  # user traits are not account traits
        ],
        scope="account",
    )
    assert seen(fs) == [("acme", at(minutes=2))]


def test_account_date_from_group_traits_by_timer():
    fs = run(
        RENEWAL,
        [group(at(), "acme", renewal_at=at(days=40))],
        scope="account",
        until=at(days=60),
    )
    assert seen(fs) == [("acme", at(days=10))]


def test_account_spike_needs_account_history():
    # the account is first seen at its group call; the users' earlier events do not count
    msgs = [identify(at(), user="u1", plan="x")]
    msgs.append(group(at(minutes=30), "acme", user="u1"))
    msgs += [track("Error", at(minutes=61, seconds=i), user="u1") for i in range(5)]
    msgs += [track("Error", at(minutes=91, seconds=i), user="u1") for i in range(5)]
    fs = run(SPIKE, msgs, scope="account")
    assert seen(fs) == [("acme", at(minutes=91, seconds=4))]


def test_user_trigger_reads_account_traits():
    when = '{threshold: {value: "account.used / account.limit", ">=": 0.9}}'
    fs = run(
        when,
        [
            group(at(), "acme", user="u1", used=10, limit=100),
            group(at(minutes=1), "acme", user="u1", used=90),
        ],
    )
    assert seen(fs) == [("u1", at(minutes=1))]
    assert fs[0].scope == "user"


def test_user_reads_the_account_it_joined_most_recently():
    fs = run(
        "{traits: {account.plan: pro}}",
        [
            group(at(), "acme", plan="pro"),  # fires
            group(at(minutes=1), "beta", plan="free"),  # account.* is now beta's: false
            group(at(minutes=2), "beta", plan="pro"),  # fires again
        ],
    )
    assert times(fs) == [at(), at(minutes=2)]


def test_account_absent_over_its_users():
    fs = run(
        "{absent: {name: Login, for: 1d}}",
        [
            group(at(), "acme", user="u1"),
            group(at(), "acme", user="u2"),
            track("Login", at(minutes=1), user="u1"),
            track("Login", at(hours=12), user="u2"),
        ],
        scope="account",
        until=at(days=3),
    )
    assert seen(fs) == [("acme", at(days=1, hours=12))]


def test_user_trigger_date_on_account_trait_by_timer():
    fs = run(
        "{date: {trait: account.renewal_at, within: 30d}}",
        [group(at(), "acme", user="u1", renewal_at=at(days=40))],
        until=at(days=60),
    )
    assert seen(fs) == [("u1", at(days=10))]
    assert fs[0].evidence["trait"] == "account.renewal_at"


def test_user_trigger_on_account_traits_fires_when_the_user_joins():
    fs = run(
        "{traits: {account.plan: pro}}",
        [group(at(), "acme", user="u1", plan="pro"), group(at(minutes=1), "acme", user="u2")],
    )
    assert seen(fs) == [("u1", at()), ("u2", at(minutes=1))]


def test_user_trigger_on_account_traits_fires_for_every_member():
    fs = run(
        "{traits: {account.plan: pro}}",
        [
            group(at(), "acme", user="u1", plan="free"),
            group(at(), "acme", user="u2", plan="free"),
            group(at(minutes=1), "acme", user="u1", plan="pro"),
        ],
    )
    assert sorted(seen(fs)) == [("u1", at(minutes=1)), ("u2", at(minutes=1))]


# --- order and lateness -----------------------------------------------------------------------

MIXED = """
triggers:
  - id: burst
    when: {event: {name: Error, count: 3, within: 10m}}
    action: {channel: email, message: hi}
    cooldown: 30m
  - id: gone
    when: {absent: {name: Login, for: 1h}}
    action: {channel: email, message: hi}
  - id: busy
    scope: account
    when: {event: {name: Error, count: 5, within: 1h}}
    action: {channel: webhook, message: hi}
  - id: stuck
    when: {dwell: {page: "/billing/*", for: 3m}}
    action: {channel: in_app, message: hi}
"""


def _mixed_messages() -> list[dict[str, Any]]:
    rng = random.Random(20260105)
    users = ["u1", "u2", "u3", "u4"]
    second = 0
    msgs: list[dict[str, Any]] = [
        group(at(), "acme", user="u1"),
        group(at(seconds=1), "acme", user="u2"),
        group(at(seconds=2), "beta", user="u3"),
    ]
    second = 3
    for _ in range(400):
        second += rng.randint(1, 90)  # distinct timestamps
        user = rng.choice(users)
        kind = rng.random()
        if kind < 0.5:
            msgs.append(track("Error", at(seconds=second), user=user))
        elif kind < 0.7:
            msgs.append(track("Login", at(seconds=second), user=user))
        else:
            path = rng.choice(["/billing/plans", "/home", "/billing/invoices", "/docs"])
            msgs.append(page(path, at(seconds=second), user=user))
    return msgs


def _summary(firings: list[Firing]) -> list[dict[str, Any]]:
    return [f.to_dict() for f in firings]


def test_out_of_order_within_lateness_gives_the_same_firings():
    msgs = _mixed_messages()
    until = at(days=1)
    sorted_firings = replay(playbook(MIXED), msgs, until=until)
    assert {f.trigger for f in sorted_firings} == {"burst", "gone", "busy", "stuck"}
    assert {f.decision for f in sorted_firings} == {"send", "suppressed"}
    lateness = 5 * MINUTE
    rng = random.Random(7)
    # each message arrives up to `lateness` after its timestamp, so none is beyond the lateness
    arrival = sorted(
        msgs,
        key=lambda m: events([m])[0].timestamp_ms + rng.randrange(lateness),
    )
    assert arrival != msgs
    firings, runner = run_unsorted(playbook(MIXED), arrival, lateness, until)
    assert runner.late == 0
    assert _summary(firings) == _summary(sorted_firings)


def test_events_later_than_the_lateness_are_applied_and_counted():
    msgs = [
        track("Error", at()),
        track("Error", at(minutes=10)),
        track("Error", at(minutes=20)),
        track("Error", at(minutes=1)),  # 19 minutes late with a 1-minute lateness
    ]
    firings, runner = run_unsorted(
        trigger("{event: {name: Error, count: 4, within: 1h}}"), msgs, MINUTE, at(hours=3)
    )
    assert runner.late == 1
    assert runner.events == 4
    # applied at the engine's time then (10m) and still counted: its bucket is in the window
    assert [f.evidence["count"] for f in firings] == [4]
    assert times(firings) == [at(minutes=20)]


def test_out_of_order_identify_within_lateness_newest_value_wins():
    msgs = [
        identify(at(minutes=10), plan="pro"),
        identify(at(minutes=5), plan="free"),  # arrives later, stamped earlier, within lateness
        track("Payment Failed", at(minutes=20)),
    ]
    firings, runner = run_unsorted(
        trigger("{all: [{event: {name: Payment Failed}}, {traits: {plan: pro}}]}"),
        msgs,
        10 * MINUTE,
        at(hours=1),
    )
    assert runner.late == 0
    assert times(firings) == [at(minutes=20)]


def test_late_trait_update_fills_only_missing_traits():
    msgs = [
        identify(at(minutes=10), plan="pro"),
        identify(at(minutes=20), country="US"),
        identify(at(minutes=1), plan="free", seats=5),  # 19 minutes late: seats is new
    ]
    firings, runner = run_unsorted(
        trigger("{traits: {plan: pro, seats: 5}}"), msgs, MINUTE, at(hours=1)
    )
    assert runner.late == 1
    assert [f.evidence["values"] for f in firings] == [{"traits.plan": "pro", "traits.seats": 5}]


def test_late_identify_does_not_overwrite_newer_traits():
    msgs = [
        identify(at(), plan="free"),
        identify(at(minutes=10), plan="pro"),
        identify(at(minutes=20), seats=1),
        identify(at(minutes=1), plan="free"),  # older than the "pro", and beyond the lateness
        track("Payment Failed", at(minutes=30)),
    ]
    firings, runner = run_unsorted(
        trigger("{all: [{event: {name: Payment Failed}}, {traits: {plan: pro}}]}"),
        msgs,
        MINUTE,
        at(hours=1),
    )
    assert runner.late == 1
    assert times(firings) == [at(minutes=30)]


def test_runner_timer_due_at_t_runs_before_event_at_t_across_pushes():
    # the same boundary as the replay tests, but advancing a live runner step by step
    runner = Runner(
        engine.State(engine.Playbook(trigger("{absent: {name: Login, for: 1m}}"))),
        lateness_ms=0,
    )
    firings = runner.push_many(events([track("Login", at())]))
    firings += runner.advance(ms(seconds=59))
    assert firings == []
    firings += runner.push_many(events([track("Login", at(minutes=1))]))
    assert [f.at_ms for f in firings] == [ms(minutes=1)]
    firings += runner.advance(ms(minutes=2) - 1)
    firings += runner.advance(ms(minutes=2))
    assert [f.at_ms - T0_MS for f in firings] == [MINUTE, 2 * MINUTE]


# --- differential check against a brute-force reference ---------------------------------------
#
# The reference evaluates each condition from its definition at every instant where its truth
# could change (events; events leaving the window or the baseline; eligibility), a timer's
# instant before the events stamped there. Events sit on bucket boundaries, so the engine's
# buckets must agree exactly.


def _in(ts: list[int], lo: int, hi: int) -> int:
    """How many of ts lie in (lo, hi]."""
    return sum(1 for t in ts if lo < t <= hi)


HOUR_MS = 60 * MINUTE
# kind -> (window, baseline); window + baseline is the span an event stays visible in
REFERENCE_SPANS = {
    "count": (HOUR_MS, 0),
    "not-count": (HOUR_MS, 0),
    "absent": (HOUR_MS, 0),
    "spike": (10 * MINUTE, 50 * MINUTE),
    "drop": (HOUR_MS, 4 * HOUR_MS),
}


def _reference_truth(kind: str, now: int, ts: list[int]) -> bool:
    """The condition of REFERENCE_WHEN[kind] at `now`, from its definition, given the events
    applied so far (`ts`, times of X, never empty)."""
    w, b = REFERENCE_SPANS[kind]
    cur = _in(ts, now - w, now)
    if kind == "count":
        return cur >= 3
    if kind == "not-count":
        return cur < 2
    if kind == "absent":
        return now >= max(ts) + w
    if now - min(ts) < w + b:  # spike and drop: not eligible yet
        return False
    base = _in(ts, now - w - b, now - w)
    if kind == "spike":
        return cur >= 4 and cur >= 2.0 * (base * w / b)
    return base > 0 and cur * b <= 0.5 * base * w


def _reference_firings(kind: str, stamps: list[int]) -> list[int]:
    """Rising edges of the reference truth, checked wherever it could change: at each instant
    where an event leaves the window or the baseline and at eligibility (a timer: before the
    events stamped then), and after each event, one at a time."""
    w, b = REFERENCE_SPANS[kind]
    instants = {stamps[0] + w + b} | {t + d for t in stamps for d in (0, w, w + b)}
    fired: list[int] = []
    active = False
    applied: list[int] = []
    pending = sorted(stamps)
    for now in sorted(instants):
        states = [list(applied)]
        while pending and pending[0] == now:
            applied.append(pending.pop(0))
            states.append(list(applied))
        for state in states:
            value = bool(state) and _reference_truth(kind, now, state)
            if value and not active:
                fired.append(now)
            active = value
    return fired


REFERENCE_WHEN = {
    "count": "{event: {name: X, count: 3, within: 1h}}",
    "not-count": "{not: {event: {name: X, count: 2, within: 1h}}}",
    "absent": "{absent: {name: X, for: 1h}}",
    "spike": "{spike: {name: X, window: 10m, baseline: 50m, factor: 2, min_count: 4}}",
    "drop": "{drop: {name: X, window: 1h, below: 0.5, baseline: 4h}}",
}


def _random_stamps(kind: str, seed: int) -> list[int]:
    """Minutes of X events: bursts (several at one moment too) and lulls, so that every kind
    both holds and does not, and turns on and off with no event."""
    rng = random.Random(seed)
    step = 5 if kind == "drop" else 1  # a bucket boundary of every ring involved
    stamps: list[int] = []
    minute = 0
    for _ in range(rng.randint(10, 60)):
        if rng.random() < 0.7:
            minute += step * rng.choice([1, 1, 2, 3])
        else:
            minute += step * rng.randint(5, 80)
        stamps += [minute] * rng.choice([1, 1, 1, 2, 3, 5])
    return stamps


REFERENCE_SEEDS = range(40)


@pytest.mark.parametrize("kind", sorted(REFERENCE_WHEN))
def test_engine_matches_reference(kind):
    for seed in REFERENCE_SEEDS:
        stamps = _random_stamps(kind, seed)
        until = at(minutes=stamps[-1] + 600)  # past every window, baseline and eligibility
        fs = run(REFERENCE_WHEN[kind], [track("X", at(minutes=m)) for m in stamps], until=until)
        expected = _reference_firings(kind, [ms(minutes=m) for m in stamps])
        assert [f.at_ms for f in fs] == expected, f"seed {seed}: X at minutes {stamps}"


@pytest.mark.parametrize("kind", sorted(REFERENCE_WHEN))
def test_reference_cases_are_not_vacuous(kind):
    """The random cases do hold and stop holding: several firings for some seed of each kind."""
    counts = [
        len(_reference_firings(kind, [ms(minutes=m) for m in _random_stamps(kind, seed)]))
        for seed in REFERENCE_SEEDS
    ]
    assert max(counts) >= 3


def test_runner_chunking_and_advancing_do_not_change_firings():
    msgs = _mixed_messages()
    until = at(days=1)
    expected = _summary(replay(playbook(MIXED), msgs, until=until))
    runner = Runner(engine.State(engine.Playbook(playbook(MIXED))), lateness_ms=0)
    rng = random.Random(3)
    firings: list[Firing] = []
    evs = events(msgs)
    i = 0
    while i < len(evs):
        chunk = evs[i : i + rng.randint(1, 9)]
        i += len(chunk)
        firings += runner.push_many(chunk)
        # the live host's clock ticks somewhere between this chunk and the next event
        nxt = evs[i].timestamp_ms if i < len(evs) else chunk[-1].timestamp_ms
        firings += runner.advance(rng.randint(chunk[-1].timestamp_ms, nxt))
    firings += runner.finish(ms(days=1))
    assert _summary(firings) == expected


# --- regressions from review ------------------------------------------------------------------


def test_an_event_with_a_properties_threshold_fires_once_per_event():
    for scope, extra in (("user", {}), ("account", {"account": "acme"})):
        fs = run(
            '{all: [{event: {name: Purchase}}, {threshold: {value: "properties.amount", ">": 100}}]}',
            [
                track("Purchase", at(), amount=200, **extra),
                track("Purchase", at(minutes=1), amount=50, **extra),
            ],
            scope=scope,
        )
        assert times(fs) == [at()], scope


def test_spike_at_exactly_factor_times_the_rate_despite_float_rounding():
    # 29 errors over days 1..7, then 29 in the current day: 29 >= 7 * 29 * 1d / 7d exactly,
    # though 7 * (29 * 1 / 7) is 29.000000000000004 in floating point
    when = "{spike: {name: Error, window: 1d, baseline: 7d, factor: 7, min_count: 1}}"
    baseline = [
        track("Error", at(days=d, hours=12, minutes=m))
        for d in range(1, 8)
        for m in range(5 if d == 1 else 4)
    ]
    assert len(baseline) == 29
    burst = [track("Error", at(days=8, hours=12, minutes=30 + m)) for m in range(29)]
    fs = run(when, [identify(at(), plan="x"), *baseline, *burst])
    assert times(fs) == [at(days=8, hours=12, minutes=58)]


def test_a_trait_read_as_a_date_keeps_its_text_for_other_conditions():
    triggers = playbook(
        """
triggers:
  - id: stage
    when: {traits: {stage: "2026-02-01"}}
    action: {channel: email, message: hi}
  - id: soon
    when: {date: {trait: stage, within: 30d}}
    action: {channel: email, message: hi}
"""
    )
    fs = replay(triggers, [identify(at(), stage="2026-02-01")], until=at(days=40))
    assert [(f.trigger, f.to_dict()["at"]) for f in fs] == [
        ("stage", at()),
        ("soon", "2026-01-05T00:00:00Z"),
    ]


def test_why_does_not_change_the_state():
    triggers = trigger("{event: {name: Error, count: 2, within: 1h}}")
    state = engine.State(engine.Playbook(triggers))
    first, second = events([track("Error", at()), track("Error", at(minutes=30))])
    engine.apply(state, first, first.timestamp_ms)
    why = engine.explain(state, "t", "u1", ms(hours=2))
    assert why["evidence"]["count"] == 0
    _, fired, _ = engine.apply(state, second, second.timestamp_ms)
    assert len(fired) == 1  # the first error still counts


def test_why_names_the_known_triggers_for_an_unknown_one():
    from forewarn.errors import NotFoundError

    state = engine.State(engine.Playbook(trigger("{event: {name: X}}")))
    with pytest.raises(NotFoundError, match="no trigger 'nope'; the playbooks define: t"):
        engine.explain(state, "nope", "u1", T0_MS)


def test_a_late_page_view_from_before_the_dwell_does_not_end_it():
    triggers = trigger('{dwell: {page: "/settings*", for: 3m}}')
    fs, _ = run_unsorted(
        triggers,
        [page("/settings", at(minutes=10)), page("/home", at(minutes=5))],  # the second is late
        lateness_ms=0,
        until=at(hours=1),
    )
    assert times(fs) == [at(minutes=13)]


def test_an_event_exactly_the_lateness_late_is_still_in_order():
    triggers = trigger("{event: {name: Export}}", scope="account")
    fs, runner = run_unsorted(
        triggers,
        [
            track("Export", at(minutes=5)),
            track("Ping", at(minutes=5, seconds=10)),
            group(at(minutes=5), "acme"),
        ],
        lateness_ms=10_000,
        until=at(hours=1),
    )
    assert runner.late == 0
    assert seen(fs) == [("acme", at(minutes=5))]
