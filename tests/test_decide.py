"""The policy: each rule and its order, and the invariants a storm of firings keeps."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forewarn import decide, engine
from forewarn.decide import Cap, Facts, History, Policy, Spec
from forewarn.model import event_from_dict
from forewarn.policy import POLICY_TRAITS, Outreach
from tests.factories import DAY, HOUR, MINUTE, T0_MS, at, group, identify, playbook, track

NOON = T0_MS + 12 * HOUR  # 12:00 UTC, outside the default quiet hours
EMAIL = Spec("a", "email", priority=10)


NO_FACTS = Facts()
DEFAULT = Policy()


def one(
    spec: Spec = EMAIL,
    facts: Facts = NO_FACTS,
    at: int = NOON,
    cooldown: bool = False,
    history: History | None = None,
    policy: Policy = DEFAULT,
) -> decide.Decision:
    h = history or History(policy)
    return h.decide(spec, "user", "u1", at, cooldown, facts)


def test_a_plain_firing_is_sent_after_the_priority_window():
    assert one() == decide.Decision("send", None, NOON + 30_000)


@pytest.mark.parametrize(
    ("spec", "facts", "cooldown", "reason"),
    [
        (EMAIL._replace(mode="shadow"), Facts(unsubscribed=frozenset("*")), True, "shadow"),
        (EMAIL, Facts(unsubscribed=frozenset({"*"}), account_suppressed="x"), True, "unsubscribed"),
        (EMAIL, Facts(unsubscribed=frozenset({"email"})), False, "unsubscribed"),
        (EMAIL, Facts(traits={"unsubscribed": True}), False, "unsubscribed"),
        (EMAIL, Facts(bounced=True, account_suppressed="incident"), True, "bounced"),
        (EMAIL, Facts(account_suppressed="incident"), True, "account_suppressed"),
        (EMAIL, Facts(traits={"do_not_contact": "true"}), True, "account_suppressed"),
        (EMAIL, Facts(), True, "cooldown"),
    ],
)
def test_the_first_rule_that_applies_names_the_reason(spec, facts, cooldown, reason):
    assert one(spec, facts, cooldown=cooldown) == decide.Decision("suppressed", reason)


def test_consent_is_per_channel_and_never_stops_a_team_webhook():
    assert one(Spec("a", "push"), Facts(unsubscribed=frozenset({"email"}))).decision == "send"
    assert one(Spec("a", "push"), Facts(bounced=True)).decision == "send"
    team = Spec("a", "webhook")
    assert one(team, Facts(unsubscribed=frozenset({"*"}), bounced=True)).decision == "send"
    # but an account that is not to be contacted is not raised to the team either
    assert one(team, Facts(account_suppressed="incident")).reason == "account_suppressed"


def test_triggers_naming_one_problem_reach_out_once_per_episode():
    h = History(Policy())
    spike = Spec("error-spike", "email", problem="checkout")
    known = Spec("known-bug", "in_app", problem="checkout")
    other = Spec("storage", "in_app", problem="storage")
    assert one(spike, history=h).decision == "send"
    assert one(known, at=NOON + HOUR, history=h).reason == "episode_handled"
    # another problem is not this episode (the daily cap stops it, not the episode)
    assert one(other, at=NOON + HOUR, history=h).reason == "frequency_cap"
    # the episode ends after FOREWARN_EPISODE (3 days)
    assert one(known, at=NOON + 3 * DAY + MINUTE, history=h).decision == "send"


def test_held_out_handles_the_episode_so_the_control_group_stays_untreated():
    h = History(Policy(salt="s"))
    held = next(
        s for s in (f"u{i}" for i in range(100)) if decide.holdout_bucket("spike", s, "s") < 0.5
    )
    spike = Spec("spike", "email", holdout=0.5, problem="p")
    d = h.decide(spike, "user", held, NOON, False, Facts())
    assert d.decision == "held_out"
    d = h.decide(Spec("bug", "in_app", problem="p"), "user", held, NOON + HOUR, False, Facts())
    assert d.reason == "episode_handled"


def test_frequency_caps_slide():
    h = History(Policy(caps=(Cap(2, 7 * DAY), Cap(1, DAY))))
    spec = Spec("a", "in_app")
    decisions = [one(spec, at=NOON + i * DAY // 2, history=h).decision for i in range(20)]
    # one a day at most, two a week at most: sends on day 0 and day 1, then again on day 7
    sent = [i / 2 for i, d in enumerate(decisions) if d == "send"]
    assert sent == [0.0, 1.0, 7.0, 8.0]


def test_channel_caps_add_to_the_global_ones():
    policy = Policy(caps=(), channel_caps={"email": (Cap(1, 3 * DAY),)})
    h = History(policy)
    assert one(Spec("a", "email"), history=h, policy=policy).decision == "send"
    assert (
        one(Spec("b", "email"), at=NOON + DAY, history=h, policy=policy).reason == "frequency_cap"
    )
    assert one(Spec("c", "push"), at=NOON + DAY, history=h, policy=policy).decision == "send"


def test_the_higher_priority_takes_the_place_of_one_still_waiting():
    h = History(Policy(caps=()))
    low, high = Spec("low", "email", priority=1), Spec("high", "in_app", priority=9)
    first = one(low, history=h)
    second = one(high, at=NOON + 10_000, history=h)
    assert first.decision == "send" and second.decision == "send"
    assert [r.trigger for r in second.displaced] == ["low"]
    assert [r.trigger for r in h.of("user", "u1", NOON)] == ["high"]
    # equal or lower priority inside the window loses
    assert (
        one(Spec("same", "push", priority=9), at=NOON + 20_000, history=h).reason
        == "lower_priority"
    )
    # outside the window there is no contest
    assert one(Spec("later", "push", priority=0), at=NOON + HOUR, history=h).decision == "send"


def test_a_displaced_message_frees_its_place_under_the_cap():
    h = History(Policy(caps=(Cap(1, DAY),)))
    one(Spec("low", "email", priority=1), history=h)
    assert one(Spec("high", "email", priority=5), at=NOON + 1000, history=h).decision == "send"


@pytest.mark.parametrize(
    ("zone", "local", "deferred_to"),
    [
        ("Europe/Paris", (2026, 1, 5, 22, 30), (2026, 1, 6, 8, 0)),
        ("Europe/Paris", (2026, 1, 5, 7, 59), (2026, 1, 5, 8, 0)),
        ("America/Los_Angeles", (2026, 3, 8, 1, 0), (2026, 3, 8, 8, 0)),  # the night clocks move
        ("Asia/Kolkata", (2026, 1, 5, 21, 0), (2026, 1, 6, 8, 0)),
    ],
)
def test_quiet_hours_hold_the_message_in_the_subjects_time_zone(zone, local, deferred_to):
    tz = ZoneInfo(zone)

    def moment(parts: tuple[int, ...]) -> int:
        y, mo, d, h, mi = parts
        return int(datetime(y, mo, d, h, mi, tzinfo=tz).timestamp() * 1000)

    at = moment(local)
    d = one(facts=Facts(traits={"timezone": zone}), at=at)
    assert d.decision == "send" and d.reason == "deferred:quiet_hours"
    assert d.send_at_ms == moment(deferred_to)


def test_an_unknown_time_zone_falls_back_to_the_default():
    at = T0_MS + 23 * HOUR  # 23:00 UTC
    assert (
        one(facts=Facts(traits={"timezone": "Mars/Olympus"}), at=at).send_at_ms
        == T0_MS + DAY + 8 * HOUR
    )
    paris = Policy(timezone="Europe/Paris")
    assert (
        one(facts=Facts(traits={"timezone": 7}), at=at, policy=paris).send_at_ms
        == T0_MS + DAY + 7 * HOUR
    )


def test_a_team_webhook_ignores_quiet_hours_and_caps():
    h = History(Policy())
    at = T0_MS + 2 * HOUR
    for i in range(5):
        d = one(Spec("team", "webhook"), at=at + i * HOUR, history=h)
        assert (d.decision, d.reason, d.send_at_ms) == ("send", None, at + i * HOUR + 30_000)


@pytest.mark.parametrize(
    ("text", "caps"),
    [("2/7d,1/1d", (Cap(2, 7 * DAY), Cap(1, DAY))), ("", ()), (" 3 / 12h ", (Cap(3, 12 * HOUR),))],
)
def test_caps_parse(text, caps):
    assert decide.parse_caps(text) == caps


@pytest.mark.parametrize("text", ["2/7", "0/1d", "x/1d", "2/7y"])
def test_bad_caps_say_how_to_write_them(text):
    with pytest.raises(ValueError, match=r"MAX/DURATION, e.g. 2/7d"):
        decide.parse_caps(text)


def test_quiet_hours_parse():
    assert decide.parse_quiet_hours("21:00-08:00") == (21 * 60, 8 * 60)
    assert decide.parse_quiet_hours("off") == (0, 0)
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        decide.parse_quiet_hours("9pm-8am")
    assert decide.parse_channel_caps("email=1/3d;push=1/1d,3/7d") == {
        "email": (Cap(1, 3 * DAY),),
        "push": (Cap(1, DAY), Cap(3, 7 * DAY)),
    }


# --- storms -----------------------------------------------------------------------------------

ZONES = [
    "UTC",
    "Europe/Paris",
    "America/Los_Angeles",
    "Asia/Kolkata",
    "Pacific/Chatham",
    "America/St_Johns",
    "Australia/Lord_Howe",
]
SPECS = [
    Spec(f"t{i}", ch, priority=p, holdout=h, problem=pr)
    for i, (ch, p, h, pr) in enumerate(
        [
            ("email", 5, 0.0, None),
            ("in_app", 9, 0.2, "x"),
            ("push", 1, 0.0, "x"),
            ("chat", 5, 0.5, None),
            ("email", 0, 0.1, "y"),
        ]
    )
]

storm = st.lists(
    st.tuples(
        st.integers(0, 20 * DAY),  # when
        st.sampled_from(SPECS),
        st.sampled_from(["u1", "u2", "u3"]),
        st.sampled_from(ZONES),
    ),
    max_size=120,
)


def _local_minute(ms: int, zone: str) -> int:
    local = datetime.fromtimestamp(ms / 1000, ZoneInfo(zone))
    return local.hour * 60 + local.minute


@settings(max_examples=150, deadline=None)
@given(storm, st.sampled_from([(2, 7), (1, 1), (3, 2)]))
def test_storm_never_exceeds_a_cap_and_never_sends_in_quiet_hours(firings, cap):
    limit, days = cap
    policy = Policy(caps=(Cap(limit, days * DAY), Cap(1, DAY)))
    h = History(policy)
    zone_of: dict[str, str] = {}
    for when, spec, subject, zone in sorted(firings, key=lambda f: f[0]):
        zone = zone_of.setdefault(subject, zone)  # a subject lives in one zone
        h.decide(spec, "user", subject, T0_MS + when, False, Facts(traits={"timezone": zone}))
    for (_, subject), records in h.by_subject.items():
        times = sorted(r.send_at_ms for r in records)
        for i, t in enumerate(times):
            in_week = [u for u in times[i:] if u - t < days * DAY]
            assert len(in_week) <= limit
            assert len([u for u in times[i:] if u - t < DAY]) <= 1
        for r in records:
            if r.channel in decide.LIVE_CHANNELS:
                assert r.send_at_ms == r.at_ms  # seen in the product: at once
                continue
            minute = _local_minute(r.send_at_ms, zone_of[subject])
            assert 8 * 60 <= minute < 21 * 60, "sent inside the quiet hours"


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=20), st.text(max_size=8), st.floats(0.01, 0.99))
def test_holdout_assignment_is_stable(subject, salt, share):
    spec = Spec("t", "email", holdout=share)
    first = History(Policy(salt=salt, caps=())).decide(spec, "user", subject, NOON, False, Facts())
    again = History(Policy(salt=salt, caps=())).decide(
        spec, "user", subject, NOON + 40 * DAY, False, Facts()
    )
    assert first.decision == again.decision
    assert (first.decision == "held_out") == (decide.holdout_bucket("t", subject, salt) < share)


# --- from the engine's state ------------------------------------------------------------------


def test_an_open_urgent_ticket_suppresses_the_account_until_it_is_solved():
    (trigger,) = playbook("""
triggers:
  - id: quota
    when: {event: {name: Quota Hit}}
    action: {channel: email, message: "hi"}
""")
    state = engine.State(engine.Playbook([trigger], keep=(POLICY_TRAITS, POLICY_TRAITS)))
    outreach = Outreach(state, [trigger], Policy(caps=()))
    ticket = {"ticket_id": "7", "priority": "urgent"}

    def fire(msg: dict[str, Any], when_ms: int) -> list[tuple[str, str | None]]:
        _, firings, _ = engine.apply(state, event_from_dict(msg), when_ms)
        for f in firings:
            outreach.decide(f)
        return [(f.decision, f.reason) for f in firings]

    fire(identify(at(hours=12), "u1", email="a@example.com"), NOON)
    fire(group(at(hours=12), "acme", "u1", timezone="Europe/Paris"), NOON)
    # another user of the account opened the urgent ticket
    fire(track("Ticket Created", at(hours=12), "u2", "acme", **ticket), NOON)
    fire(track("Ticket Created", at(hours=12), "u2", "acme", ticket_id="8", priority="low"), NOON)
    assert fire(track("Quota Hit", at(hours=13), "u1", "acme"), NOON + HOUR) == [
        ("suppressed", "account_suppressed")
    ]
    fire(track("Ticket Solved", at(hours=14), "u2", "acme", ticket_id="7"), NOON + 2 * HOUR)
    assert fire(track("Quota Hit", at(hours=15), "u1", "acme"), NOON + 3 * HOUR) == [("send", None)]
    # a user's traits lie over its account's
    assert outreach.traits("user", "u1") == {"email": "a@example.com", "timezone": "Europe/Paris"}


def test_in_app_and_chat_go_at_once_even_at_night():
    at = T0_MS + 23 * HOUR  # 23:00 UTC: quiet hours for an email
    for channel in ("in_app", "chat"):
        d = one(Spec("live", channel), at=at, history=History(Policy()))
        assert (d.decision, d.reason, d.send_at_ms) == ("send", None, at)
    assert one(Spec("mail", "email"), at=at).reason == "deferred:quiet_hours"
