"""Hostile input: every problem is the project's own error, said plainly, never a traceback."""

from __future__ import annotations

import gzip
import json

import pytest

from forewarn import engine
from forewarn.cli import main
from forewarn.errors import EventError, PlaybookError
from forewarn.expr import MAX_TOKENS, ExpressionError, parse
from forewarn.model import decode_event, event_from_dict
from forewarn.playbook import parse_playbooks
from tests.factories import at, events, page, replay, track, trigger


@pytest.mark.parametrize(
    ("stamp", "reason"),
    [
        (-1, "between 1970 and 9999"),
        (10**17, "between 1970 and 9999"),
        ("9999-12-31T23:59:59-14:00", "between 1970 and 9999"),
        ("1969-12-31T23:59:59Z", "between 1970 and 9999"),
        (1e300, "Expected `int | str | null`, got `float`"),
        (True, "Expected `int | str | null`, got `bool`"),
    ],
)
def test_times_out_of_range_are_rejected(stamp, reason):
    with pytest.raises(EventError, match=reason):
        event_from_dict({"type": "track", "event": "X", "userId": "u", "timestamp": stamp})


@pytest.mark.parametrize(
    "data",
    [b'{"type": "track", "event": "\xff\xfe", "userId": "u", "timestamp": 0}', b"[" * 200_000],
)
def test_undecodable_lines_are_event_errors(data):
    with pytest.raises(EventError):
        decode_event(data)


def test_a_huge_integer_trait_makes_a_threshold_false_not_a_crash():
    fs = replay(
        trigger('{threshold: {value: "traits.used / 2", ">": 1}}'),
        [{"type": "identify", "userId": "u1", "timestamp": at(), "traits": {"used": 10**400}}],
    )
    assert fs == []


def test_a_page_url_that_is_not_a_url_ends_no_dwell_and_crashes_nothing():
    url_page = {
        "type": "page",
        "userId": "u1",
        "timestamp": at(minutes=1),
        "properties": {"url": "http://[::1"},
    }
    fs = replay(
        trigger('{dwell: {page: "/s*", for: 3m}}'), [page("/s", at()), url_page], until=at(hours=1)
    )
    assert [f.subject for f in fs] == []  # the unreadable page view still ended the dwell


def test_bad_dates_in_traits_are_not_dates():
    when = "{age: {since: created_at, at_least: 1d}}"
    for value in ("0001-01-01T00:00:00+14:00", -(10**16), "soon", 1e400):
        msg = {
            "type": "identify",
            "userId": "u1",
            "timestamp": at(),
            "traits": {"created_at": value},
        }
        assert replay(trigger(when), [msg], until=at(days=3)) == []


def test_expressions_are_bounded():
    with pytest.raises(ExpressionError, match=f"at most {MAX_TOKENS}"):
        parse(" + ".join(["traits.a"] * 1000))
    with pytest.raises(ExpressionError):
        parse("(" * 150 + "1" + ")" * 150)
    assert parse("-" * 100 + "1").evaluate(lambda root, path: None) == 1.0


def problems(text: str) -> list[str]:
    with pytest.raises(PlaybookError) as caught:
        parse_playbooks([("p.yaml", text)])
    return [str(p) for p in caught.value.problems]


TRIGGER = "triggers:\n  - id: t\n    when: {when}\n    action: {{channel: email, message: hi}}\n"


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("{spike: {name: E, factor: !!float abc}}", "cannot read the value 'abc'"),
        ("{spike: {name: E, min_count: !!int abc}}", "cannot read the value 'abc'"),
        ("{traits: {flag: !!bool maybe}}", "cannot read the value 'maybe'"),
        ("{traits: {day: !!timestamp abc}}", "cannot read the value 'abc'"),
        ("{spike: {name: E, factor: .inf}}", "spike.factor must be a finite number"),
        ("{spike: {name: E, factor: " + "9" * 400 + "}}", "spike.factor must be a finite number"),
        ("{drop: {name: E, below: .nan}}", "drop.below must be a finite number"),
        ("&a {all: [*a]}", "YAML aliases (*a) are not supported"),
        ("{not: " * 40 + "{ever: {name: X}}" + "}" * 40, "nested"),
    ],
)
def test_hostile_playbooks_get_a_located_problem(when, message):
    found = problems(TRIGGER.format(when=when))
    assert any(message in p for p in found), found


def test_alias_bombs_and_deep_nesting_are_refused_quickly():
    bomb = "a: &a [x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(20)
    )
    assert any("aliases" in p for p in problems(bomb))
    assert any(
        "nested too deeply" in p for p in problems("triggers: " + "[" * 50_000 + "]" * 50_000)
    )


def test_a_holdout_that_is_not_a_number_is_refused():
    text = TRIGGER.format(when="{event: {name: X}}") + "    holdout: .nan\n"
    assert any("holdout must be a finite number" in p for p in problems(text))


def test_a_corrupted_gzip_file_is_a_clear_error(capsys, tmp_path):
    packed = bytearray(gzip.compress(b'{"type": "track"}\n' * 2000))
    for i in range(20, len(packed) - 20, 7):
        packed[i] ^= 0x5A
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(packed))
    code = main(["replay", "--playbooks", "examples/playbooks", "--events", str(path)])
    assert code == 2
    assert "is damaged" in capsys.readouterr().err


def test_odd_but_valid_events_do_not_crash_the_engine():
    triggers = trigger('{threshold: {value: "properties.x * 2", ">": 1}}')
    state = engine.State(engine.Playbook(triggers))
    odd = [
        track("E", at(), x=float("inf")),
        track("E", at(), x=[1, 2]),
        track("E", at(), x={"deep": {"er": 1}}),
        track("E", at(), x=None),
        {"type": "track", "event": "E", "userId": 7, "timestamp": 0, "properties": {"x": 2}},
    ]
    for event in events(odd):
        engine.apply(state, event, event.timestamp_ms)
    assert json.dumps(engine.explain(state, "t", "7", 0))
