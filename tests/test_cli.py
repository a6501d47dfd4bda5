"""`forewarn replay` and `forewarn check` as a user runs them, including the shipped examples."""

from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path

import pytest

from forewarn.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = ROOT / "examples" / "playbooks"
EVENTS = ROOT / "examples" / "events"
UNTIL = "2026-12-31T00:00:00Z"
FIELDS = {
    "trigger",
    "subject",
    "scope",
    "at",
    "evidence",
    "decision",
    "reason",
    "channel",
    "send_at",
}


def replay(
    capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, list[dict[str, object]], str]:
    code = main(["replay", "--playbooks", str(PLAYBOOKS), *args])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


EXPECTED = {
    # trigger: (subject, first firing time)
    "error-spike": ("acme", "2026-11-09T12:03:45Z"),
    "known-bug": ("carol", "2026-11-01T10:00:00Z"),
    "usage-drop": ("globex", "2026-12-09T10:00:00Z"),
    "reports-unused": ("erin", "2026-11-10T15:00:00Z"),
    "storage-85": ("initech", "2026-11-10T00:00:00Z"),
    "renewal-at-risk": ("hooli", "2026-11-27T10:00:00Z"),
    "payment-failed": ("umbrella", "2026-11-04T06:00:00Z"),
    "onboarding-stalled": ("jack", "2026-11-08T00:00:00Z"),
    "settings-dwell": ("lea", "2026-11-02T10:03:00Z"),
}


def test_every_example_trigger_has_an_events_file():
    triggers = {p.stem for p in EVENTS.glob("*.jsonl")}
    assert triggers == set(EXPECTED)


@pytest.mark.parametrize("trigger", sorted(EXPECTED))
def test_each_example_events_file_makes_its_trigger_fire(capsys, trigger):
    code, firings, _ = replay(
        capsys, "--events", str(EVENTS / f"{trigger}.jsonl"), "--until", UNTIL
    )
    assert code == 0
    mine = [f for f in firings if f["trigger"] == trigger]
    assert mine, f"{trigger} did not fire"
    subject, first_at = EXPECTED[trigger]
    assert (mine[0]["subject"], mine[0]["at"]) == (subject, first_at)
    assert all(set(f) == FIELDS for f in firings)
    assert mine[0]["evidence"]


def test_negative_examples(capsys):
    _, firings, _ = replay(capsys, "--events", str(EVENTS), "--until", UNTIL)
    fired = {(f["trigger"], f["subject"]) for f in firings}
    assert ("settings-dwell", "max") not in fired  # searched before 3 minutes
    assert ("onboarding-stalled", "kim") not in fired  # completed onboarding
    assert ("known-bug", "dan") not in fired  # a different fingerprint
    assert ("reports-unused", "frank") not in fired  # never used reports
    second = [f for f in firings if f["trigger"] == "known-bug"]
    assert [(f["decision"], f["reason"]) for f in second] == [
        ("send", None),
        ("suppressed", "cooldown"),
    ]


def test_firings_come_out_in_time_order(capsys):
    _, firings, _ = replay(capsys, "--events", str(EVENTS), "--until", UNTIL)
    assert [f["at"] for f in firings] == sorted(f["at"] for f in firings)  # type: ignore[type-var]


def test_gzip_input_gives_the_same_firings(capsys, tmp_path):
    plain = EVENTS / "usage-drop.jsonl"
    packed = tmp_path / "usage-drop.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    _, a, _ = replay(capsys, "--events", str(plain), "--until", UNTIL)
    _, b, _ = replay(capsys, "--events", str(packed), "--until", UNTIL)
    assert a == b and a


def test_invalid_lines_are_reported_and_skipped(capsys, tmp_path):
    good = (EVENTS / "payment-failed.jsonl").read_text().splitlines()
    lines = [good[0], "{not json", '{"type": "track", "userId": "u"}', *good[1:], ""]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines))
    code, firings, err = replay(capsys, "--events", str(path))
    assert code == 0
    assert [f["trigger"] for f in firings] == ["payment-failed"]
    assert f"{path}:2: skipped: not valid JSON" in err
    assert f"{path}:3: skipped: track has no 'event' name" in err
    assert "skipped 2 invalid lines" in err


def test_unsorted_input_is_sorted(capsys, tmp_path):
    lines = (EVENTS / "settings-dwell.jsonl").read_text().splitlines()
    path = tmp_path / "reversed.jsonl"
    path.write_text("\n".join(reversed(lines)))
    _, firings, _ = replay(capsys, "--events", str(path))
    assert [(f["trigger"], f["subject"], f["at"]) for f in firings] == [
        ("settings-dwell", "lea", "2026-11-02T10:03:00Z")
    ]


def test_table_rows(capsys):
    main(
        [
            "replay",
            "--playbooks",
            str(PLAYBOOKS),
            "--events",
            str(EVENTS / "known-bug.jsonl"),
            "--format",
            "table",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["trigger", "firings", "subjects", "send", "held_out", "suppressed"]
    row = next(line.split() for line in out if line.startswith("known-bug"))
    assert row == ["known-bug", "2", "1", "1", "0", "cooldown", "1"]
    quiet = next(line.split() for line in out if line.startswith("storage-85"))
    assert quiet == ["storage-85", "0", "0", "0", "0", "0"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--events", "/nonexistent/events.jsonl"],
            "events file /nonexistent/events.jsonl does not exist",
        ),
        (["--events", str(EVENTS), "--until", "soon"], "--until 'soon' is not an ISO 8601 time"),
    ],
)
def test_unreadable_input_exits_non_zero_with_a_clear_message(capsys, args, message):
    code = main(["replay", "--playbooks", str(PLAYBOOKS), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_damaged_gzip_file_is_a_clear_error(capsys, tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:60])
    code = main(["replay", "--playbooks", str(PLAYBOOKS), "--events", str(path)])
    assert code == 2
    assert "is damaged" in capsys.readouterr().err


def test_a_bad_playbook_exits_non_zero_naming_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "triggers:\n  - id: t\n    when: {spike: {name: Error, window: 10x}}\n    action: {channel: email, message: hi}\n"
    )
    for argv in (["check", str(bad)], ["replay", "--playbooks", str(bad), "--events", str(EVENTS)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{bad}:3: trigger 't': spike.window: bad duration '10x'" in err


def test_missing_playbooks_path(capsys):
    assert main(["check", "/nonexistent/playbooks"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_check_describes_each_trigger_in_plain_words(capsys):
    assert main(["check", str(PLAYBOOKS)]) == 0
    out = capsys.readouterr().out
    assert "9 triggers valid" in out
    assert "settings-dwell" in out and "stays on a page matching /kb/settings* for 3m" in out
    assert "10% of accounts held out as a control group" in out
    assert "at most once per 7d per account" in out


def test_until_before_the_last_event_stops_the_clock_there(capsys):
    code, firings, err = replay(capsys, "--events", str(EVENTS), "--until", "2026-11-05T00:00:00Z")
    assert code == 0
    assert firings and max(str(f["at"]) for f in firings) <= "2026-11-05T00:00:00Z"
    assert "events after --until are not replayed" in err


def test_repeated_message_ids_are_replayed_once(capsys, tmp_path):
    lines = (EVENTS / "payment-failed.jsonl").read_text().splitlines()
    path = tmp_path / "retried.jsonl"
    path.write_text("\n".join(lines + lines))  # a client resent the whole batch
    code, firings, err = replay(capsys, "--events", str(path))
    assert code == 0
    assert [f["trigger"] for f in firings] == ["payment-failed"]
    assert f"skipped {len(lines)} repeated messageIds" in err


def test_a_negative_show_rejected_is_refused(capsys):
    with pytest.raises(SystemExit) as caught:
        main(
            [
                "replay",
                "--playbooks",
                str(PLAYBOOKS),
                "--events",
                str(EVENTS),
                "--show-rejected",
                "-1",
            ]
        )
    assert caught.value.code == 2
    assert "'-1' is not a whole number of 0 or more" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_on_a_terminal_for_long_inputs():
    from forewarn.cli_replay import PROGRESS_MIN_BYTES, Progress

    screen = _Terminal()
    bar = Progress("reading big.jsonl", PROGRESS_MIN_BYTES * 2, screen)
    bar(PROGRESS_MIN_BYTES)
    bar.close()
    assert "reading big.jsonl [###############               ]  50%" in screen.getvalue()
    quiet = io.StringIO()  # not a terminal: nothing is written
    Progress("reading big.jsonl", PROGRESS_MIN_BYTES * 2, quiet)(PROGRESS_MIN_BYTES)
    assert quiet.getvalue() == ""
    short = _Terminal()  # a short input: no bar
    Progress("reading small.jsonl", 100, short)(50)
    assert short.getvalue() == ""


def test_replay_runs_the_same_policy_as_the_server(tmp_path, capsys, monkeypatch):
    """Priority, problem episodes, caps and quiet hours decide a backtest's firings too."""
    (tmp_path / "p.yaml").write_text(
        "triggers:\n"
        "  - id: spike\n    problem: checkout\n    priority: 9\n"
        "    when: {event: {name: Checkout Failed}}\n    action: {channel: email, message: a}\n"
        "  - id: bug\n    problem: checkout\n    priority: 5\n"
        "    when: {event: {name: Checkout Failed}}\n    action: {channel: in_app, message: b}\n"
        "  - id: tour\n    when: {event: {name: Signed In}}\n    action: {channel: email, message: c}\n"
    )
    lines = [
        {
            "type": "identify",
            "userId": "ann",
            "traits": {"timezone": "Europe/Paris"},
            "timestamp": "2026-03-02T09:00:00Z",
        },
        {
            "type": "track",
            "userId": "ann",
            "event": "Checkout Failed",
            "timestamp": "2026-03-02T10:00:00Z",
        },
        {
            "type": "track",
            "userId": "ann",
            "event": "Signed In",
            "timestamp": "2026-03-02T11:00:00Z",
        },
        {
            "type": "track",
            "userId": "ann",
            "event": "Signed In",
            "timestamp": "2026-03-03T21:30:00Z",
        },
    ]
    events = tmp_path / "e.jsonl"
    events.write_text("".join(json.dumps(m) + "\n" for m in lines))
    monkeypatch.setenv("FOREWARN_FREQUENCY_CAPS", "1/1d")
    code = main(["replay", "--playbooks", str(tmp_path / "p.yaml"), "--events", str(events)])
    out, _ = capsys.readouterr()
    assert code == 0
    decided = [
        (f["trigger"], f["decision"], f["reason"], f["send_at"])
        for f in map(json.loads, out.splitlines())
    ]
    assert decided == [
        ("spike", "send", None, "2026-03-02T10:00:30Z"),
        # the same problem, and a lower priority at the same moment
        ("bug", "suppressed", "episode_handled", None),
        ("tour", "suppressed", "frequency_cap", None),  # one a day
        # 22:30 in Paris: held until 08:00 there
        ("tour", "send", "deferred:quiet_hours", "2026-03-04T07:00:00Z"),
    ]


def test_bad_policy_settings_are_refused_with_the_variable_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FOREWARN_QUIET_HOURS", "9pm-8am")
    code = main(["replay", "--playbooks", str(PLAYBOOKS), "--events", str(EVENTS)])
    _, err = capsys.readouterr()
    assert code == 2
    assert "FOREWARN_QUIET_HOURS: bad quiet hours '9pm-8am': write HH:MM-HH:MM" in err


def test_keys_vapid_prints_a_usable_key_pair(capsys):
    from forewarn.channel_push import PushChannel

    assert main(["keys", "vapid"]) == 0
    out, _ = capsys.readouterr()
    pairs = dict(line.split("=", 1) for line in out.splitlines())
    assert set(pairs) == {"FOREWARN_VAPID_PRIVATE_KEY", "FOREWARN_VAPID_PUBLIC_KEY"}
    channel = PushChannel(pairs["FOREWARN_VAPID_PRIVATE_KEY"], "mailto:ops@example.com")
    assert channel.public_key == pairs["FOREWARN_VAPID_PUBLIC_KEY"]


def test_plan_says_how_many_firings_and_how_long(capsys):
    assert (
        main(
            [
                "plan",
                "--baseline",
                "0.2",
                "--effect",
                "-0.05",
                "--holdout",
                "0.5",
                "--per-day",
                "100",
                "--format",
                "json",
            ]
        )
        == 0
    )
    planned = json.loads(capsys.readouterr().out)
    # the textbook two-group figure for 20% to 15% (Fleiss): 906 per group
    assert (
        planned["held_out"] == 906
        and planned["treated"] + planned["held_out"] == planned["firings"]
    )
    assert planned["days"] == pytest.approx(planned["firings"] / 100)
    assert main(["plan", "--baseline", "1.5", "--effect", "0.1"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


def _commands() -> list[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    raise AssertionError("build_parser() has no subcommands")


@pytest.mark.parametrize("command", _commands())
def test_every_command_prints_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: forewarn {command} ")
