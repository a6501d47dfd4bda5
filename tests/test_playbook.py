"""Playbook validation: every error names the file, the line, the trigger and what is allowed."""

from __future__ import annotations

import pytest

from forewarn import playbook as pb
from forewarn.errors import PlaybookError
from forewarn.playbook import parse_duration, parse_playbooks

GOOD = """\
triggers:
  - id: storage-85
    description: Approaching the storage limit
    scope: account
    when:
      threshold: {value: "traits.storage_used / traits.storage_limit", ">=": 0.85}
    action: {channel: email, template: storage-85}
    cooldown: 7d
    priority: 50
    holdout: 0.10
    goal: {event: "Plan Upgraded", within: 14d}
    failure: {event: "Ticket Created", within: 3d, where: {priority: [high, urgent]}}
    mode: shadow
"""


def problems(text: str, file: str = "p.yaml") -> list[str]:
    with pytest.raises(PlaybookError) as caught:
        parse_playbooks([(file, text)])
    return [str(p) for p in caught.value.problems]


def one_trigger(when: str, **keys: str) -> str:
    extra = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    return (
        "triggers:\n"
        "  - id: t1\n"
        f"    when: {when}\n"
        "    action: {channel: email, message: hi}\n"
        f"{extra}"
    )


def test_an_action_carries_its_channel_settings_and_a_trigger_its_problem():
    (t,) = parse_playbooks(
        [
            (
                "p.yaml",
                "triggers:\n  - id: t\n    when: {event: {name: X}}\n    problem: checkout\n"
                "    action: {channel: webhook, message: hi, title: Alert, url: 'https://h.test/x',"
                " format: slack}\n",
            )
        ]
    )
    assert t.problem == "checkout"
    assert t.action.title == "Alert"
    assert dict(t.action.settings) == {"url": "https://h.test/x", "format": "slack"}


def test_a_full_trigger_parses_into_typed_fields():
    (t,) = parse_playbooks([("p.yaml", GOOD)])
    assert t.id == "storage-85"
    assert t.scope == "account"
    assert t.cooldown_ms == 7 * 86_400_000
    assert t.priority == 50
    assert t.holdout == pytest.approx(0.10)
    assert t.mode == "shadow"
    assert t.action == pb.Action("email", template="storage-85")
    assert t.goal == pb.Signal("Plan Upgraded", 14 * 86_400_000)
    assert t.failure is not None and t.failure.where.pairs == (("priority", ("high", "urgent")),)
    assert isinstance(t.when, pb.ThresholdCond)
    assert t.when.op == ">=" and t.when.target == 0.85
    assert (t.file, t.line) == ("p.yaml", 2)


def test_defaults():
    (t,) = parse_playbooks([("p.yaml", one_trigger("{event: {name: Login}}"))])
    assert (t.scope, t.cooldown_ms, t.priority, t.holdout, t.mode) == ("user", 0, 0, 0.0, "live")
    assert t.goal is None and t.failure is None
    (s,) = parse_playbooks([("p.yaml", one_trigger("{spike: {name: Error}}"))])
    assert s.when == pb.SpikeCond("Error", pb.Where(), 600_000, 5.0, 604_800_000, 10)
    (d,) = parse_playbooks([("p.yaml", one_trigger("{drop: {name: Login}}"))])
    assert d.when == pb.DropCond("Login", pb.Where(), 604_800_000, 0.5, 2_419_200_000)


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("30s", 30_000),
        ("10m", 600_000),
        ("3h", 10_800_000),
        ("7d", 604_800_000),
        ("2w", 1_209_600_000),
    ],
)
def test_durations(text, ms):
    assert parse_duration(text) == ms


@pytest.mark.parametrize("bad", ["7", "7x", "-1d", "1.5h", "0m", "", "d", 7, None])
def test_bad_durations_say_what_is_allowed(bad):
    with pytest.raises(ValueError, match=r"s, m, h, d or w"):
        parse_duration(bad)


def test_every_condition_kind_parses():
    when = """
      all:
        - event: {name: Login, where: {plan: [pro, business]}, count: 3, within: 1h}
        - any:
            - spike: {name: Error, window: 10m, factor: 5, baseline: 7d, min_count: 10}
            - drop: {name: Login, window: 7d, below: 0.5, baseline: 28d}
        - not: {absent: {name: Login, for: 7d}}
        - threshold: {value: "(traits.a + 1) * 2 - traits.b / 4", "<": 3}
        - dwell: {page: "/kb/settings*", for: 3m, unless: [Search Performed]}
        - date: {trait: renewal_date, within: 30d}
        - age: {since: traits.created_at, at_least: 7d}
        - ever: {name: Onboarding Completed}
        - traits: {plan: [pro, business], country: US}"""
    (t,) = parse_playbooks([("p.yaml", one_trigger(when))])
    assert isinstance(t.when, pb.AllCond)
    kinds = [type(c).__name__ for c in t.when.of]
    assert kinds == [
        "EventCond",
        "AnyCond",
        "NotCond",
        "ThresholdCond",
        "DwellCond",
        "DateCond",
        "AgeCond",
        "EverCond",
        "TraitsCond",
    ]
    date = t.when.of[5]
    assert isinstance(date, pb.DateCond) and date.trait == ("traits", ("renewal_date",))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            one_trigger("{event: {name: Login}}", colour="red"),
            "p.yaml:5: trigger 't1': unknown key 'colour' in a trigger; allowed: id, when, action, description",
        ),
        (
            one_trigger("{spike: {name: Error, window: 10x}}"),
            "p.yaml:3: trigger 't1': spike.window: bad duration '10x'",
        ),
        (
            one_trigger("{spike: {name: Error, windw: 10m}}"),
            "p.yaml:3: trigger 't1': unknown key 'windw' in spike; allowed: name, where, window",
        ),
        (
            one_trigger("{surge: {name: Error}}"),
            "p.yaml:3: trigger 't1': unknown condition 'surge'; allowed: event, spike, drop",
        ),
        (
            one_trigger("{anomaly: {name: Error, window: 10m, direction: sideways}}"),
            "p.yaml:3: trigger 't1': anomaly.direction 'sideways': give one of up, down, both",
        ),
        (
            one_trigger('{threshold: {value: "traits.a / ", ">=": 1}}'),
            "p.yaml:3: trigger 't1': threshold.value does not parse:",
        ),
        (
            one_trigger('{threshold: {value: "traits.a ** 2", ">=": 1}}'),
            "p.yaml:3: trigger 't1': threshold.value does not parse: unexpected '*'",
        ),
        (one_trigger('{threshold: {value: "__import__", ">=": 1}}'), "unknown name '__import__'"),
        (
            one_trigger('{threshold: {value: "traits.a", ">=": 1, "<": 2}}'),
            "threshold needs exactly one comparison",
        ),
        (one_trigger('{threshold: {value: "traits.a", "=>": 1}}'), "unknown key '=>' in threshold"),
        (one_trigger("{event: {name: Login, count: 3}}"), "event.count needs 'within'"),
        (one_trigger("{not: {event: {name: Login}}}"), "not: cannot negate"),
        (one_trigger("{event: {name: Login}, ever: {name: X}}"), "exactly one key"),
        (one_trigger("{all: []}"), "all takes a non-empty list"),
        (
            one_trigger("{event: {name: Login}}", scope="team"),
            "unknown scope 'team'; allowed: user, account",
        ),
        (
            one_trigger("{event: {name: Login}}", mode="dry"),
            "unknown mode 'dry'; allowed: live, shadow",
        ),
        (
            one_trigger("{event: {name: Login}}", holdout="1.5"),
            "holdout must be between 0.0 and 0.99",
        ),
        (one_trigger("{event: {name: Login}}", priority="high"), "priority must be a whole number"),
        (one_trigger("{event: {name: Login}}", cooldown="soon"), "cooldown: bad duration 'soon'"),
        (one_trigger("{event: {name: Login}}", goal="{event: X}"), "goal needs 'within'"),
        (one_trigger("{dwell: {page: /x, for: 3m}}", scope="account"), "use it with scope: user"),
        (
            "triggers:\n  - id: Bad_Id\n    when: {event: {name: X}}\n    action: {channel: email, message: hi}\n",
            "p.yaml:2: trigger 'Bad_Id': trigger id 'Bad_Id' must use only a-z, 0-9 and '-'",
        ),
        (
            "triggers:\n  - id: t\n    when: {event: {name: X}}\n    action: {channel: sms, message: hi}\n",
            "unknown channel 'sms'; allowed: email, in_app, push, webhook, chat",
        ),
        (
            "triggers:\n  - id: t\n    when: {event: {name: X}}\n    action: {channel: email}\n",
            "action needs exactly one of 'template'",
        ),
        (
            "triggers:\n  - id: t\n    when: {event: {name: X}}\n    action: {channel: email, message: hi, url: 'https://x'}\n",
            "'url' is not a setting of the email channel; it takes: from, reply_to",
        ),
        (
            "triggers:\n  - id: t\n    when: {event: {name: X}}\n    action: {channel: webhook, message: hi, format: xml}\n",
            "format 'xml': give one of standard, slack",
        ),
        (
            "triggers:\n  - id: t\n    when: {event: {name: X}}\n    action: {channel: webhook, message: hi, url: 'ftp://x'}\n",
            "url 'ftp://x' must start with https://",
        ),
        (
            one_trigger("{event: {name: Login}}", problem="Checkout Errors"),
            "problem 'Checkout Errors' must use only a-z",
        ),
        (
            "triggers:\n  - id: t\n    action: {channel: email, message: hi}\n",
            "a trigger needs 'when'",
        ),
        (
            "trigers:\n  - id: t\n",
            "p.yaml:1: unknown key 'trigers' in a playbook file; allowed: triggers",
        ),
        ("triggers: {id: t}\n", "triggers must be a list"),
        ("triggers:\n  - id: t\n    when: {event: {name: X}\n", "p.yaml:4: not valid YAML"),
    ],
)
def test_validation_errors_name_file_line_trigger_and_what_is_allowed(text, expected):
    found = problems(text)
    assert any(expected in p for p in found), found


def test_duplicate_ids_across_files_point_at_the_first():
    a = one_trigger("{event: {name: Login}}")
    with pytest.raises(PlaybookError) as caught:
        parse_playbooks([("a.yaml", a), ("b.yaml", a)])
    (problem,) = caught.value.problems
    assert str(problem) == "b.yaml:2: trigger 't1': duplicate trigger id; first defined at a.yaml:2"


def test_every_problem_in_every_file_is_reported_at_once():
    bad1 = one_trigger("{spike: {name: Error, window: 10x}}")
    bad2 = one_trigger("{surge: {}}").replace("t1", "t2")
    with pytest.raises(PlaybookError) as caught:
        parse_playbooks([("a.yaml", bad1), ("b.yaml", bad2)])
    assert [(p.file, p.trigger) for p in caught.value.problems] == [
        ("a.yaml", "t1"),
        ("b.yaml", "t2"),
    ]
    body = caught.value.to_dict()
    assert body["error"]["code"] == "invalid_playbook"  # type: ignore[index]


def test_an_empty_file_has_no_triggers():
    assert parse_playbooks([("empty.yaml", "")]) == []


def test_account_traits_are_refused_in_account_scope():
    text = one_trigger('{threshold: {value: "account.seats", ">": 1}}', scope="account")
    assert any("read account traits as traits.*" in p for p in problems(text))


def test_only_true_and_false_are_booleans():
    (t,) = parse_playbooks(
        [("p.yaml", one_trigger("{traits: {country: NO, beta: yes, paid: true}}"))]
    )
    assert isinstance(t.when, pb.TraitsCond)
    assert [values for _, values in t.when.pairs] == [("NO",), ("yes",), (True,)]
