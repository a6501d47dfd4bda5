"""Outcomes of firings (goal, failure, engagement in their windows), precision and recall, and
backtests that decide exactly as the live server does."""

from __future__ import annotations

import json
from pathlib import Path

from forewarn import backtest, decide, store_sqlite
from forewarn.cli import main
from forewarn.engine import Firing
from forewarn.live import LiveEngine, firing_dict
from forewarn.model import event_from_dict, order_key
from forewarn.outcomes import Outcomes, tally
from forewarn.sources import load_playbooks, read_events

from .factories import DAY, HOUR, T0_MS, at, feed_live, playbook, track

ROOT = Path(__file__).resolve().parent.parent
TRIGGERS = playbook("""
triggers:
  - id: quota
    when: {event: {name: Quota Hit}}
    action: {channel: email, message: hi}
    holdout: 0.5
    goal: {event: Plan Upgraded, within: 1d}
    failure: {event: Ticket Created, within: 3d, where: {priority: [high, urgent]}}
""")


def _firing(subject: str, at_ms: int, decision: str = "send") -> Firing:
    return Firing("quota", subject, "user", at_ms, {}, decision, None, "email")


def test_goal_failure_and_engagement_count_inside_their_windows():
    outcomes = Outcomes(TRIGGERS)
    outcomes.fired(_firing("u1", T0_MS))
    outcomes.fired(_firing("u2", T0_MS, "held_out"))
    for msg in [
        track("Plan Upgraded", at(hours=20), "u1"),  # inside 1d
        track("Ticket Created", at(days=2), "u1", priority="low"),  # not the failure: low
        track("Ticket Created", at(days=2), "u2", priority="urgent"),
        track("Message Opened", at(hours=1), "u1", trigger="quota"),
        track("Message Opened", at(hours=1), "u1", trigger="another"),
        track("Plan Upgraded", at(days=2), "u2"),  # too late for the goal
    ]:
        outcomes.observe(event_from_dict(msg))
    assert outcomes.close(T0_MS + 3 * DAY - 1) == []  # the failure window is still open
    done = {o.subject: o for o in outcomes.close(T0_MS + 7 * DAY)}
    assert (done["u1"].goal, done["u1"].failure, done["u1"].engaged) == (
        True,
        False,
        frozenset({"opened"}),
    )
    assert (done["u2"].goal, done["u2"].failure) == (False, True)
    rows = tally(done.values())["quota"]
    assert rows["treated"] == {"n": 1, "goals": 1, "failures": 0, "opened": 1}
    assert rows["control"] == {"n": 1, "goals": 0, "failures": 1}


def test_an_event_before_the_firing_does_not_count_for_it():
    outcomes = Outcomes(TRIGGERS)
    outcomes.observe(event_from_dict(track("Plan Upgraded", at(hours=1), "u1")))
    outcomes.fired(_firing("u1", T0_MS + 2 * HOUR))
    (o,) = outcomes.finish()
    assert o.goal is False


def test_recall_counts_the_failures_it_fired_for_beforehand():
    outcomes = Outcomes(TRIGGERS)
    outcomes.fired(_firing("u1", T0_MS))
    urgent = {"priority": "urgent"}
    for msg in [
        track("Ticket Created", at(days=1), "u1", **urgent),  # foreseen
        track("Ticket Created", at(days=1), "u3", **urgent),  # never fired for
        track("Ticket Created", at(days=5), "u1", **urgent),  # too long after
    ]:
        outcomes.observe(event_from_dict(msg))
    recall = outcomes.recall["quota"]
    assert (recall.failures, recall.foreseen) == (3, 1)


def test_a_backtest_decides_exactly_as_the_live_server(tmp_path):
    """The same example events, once through `backtest` and once through the live engine step
    by step: the same firings with the same decisions."""
    triggers = load_playbooks(ROOT / "examples" / "playbooks")
    events = sorted(read_events(ROOT / "examples" / "events").events, key=order_key)
    policy = decide.Policy()
    firings: list[tuple[str, str, int, str, str | None]] = []
    result = backtest.run(triggers, events, policy, events[-1].timestamp_ms, keep_firings=True)
    conn = store_sqlite.connect(tmp_path / "f.db")
    store_sqlite.ensure_workspace(conn, "default", 0)
    live = LiveEngine(conn, 1, triggers, policy=policy)
    raw = [
        json.loads(line)
        for f in sorted((ROOT / "examples" / "events").glob("*.jsonl"))
        for line in f.read_text().splitlines()
        if line
    ]
    feed_live(conn, live, raw)
    for f in map(firing_dict, store_sqlite.query_firings(conn, 1, limit=10_000)):
        firings.append((f["trigger"], f["subject"], f["at"], f["decision"], f["reason"]))
    backtested = [
        (f["trigger"], f["subject"], f["at"], f["decision"], f["reason"]) for f in result["firings"]
    ]
    assert sorted(backtested) == sorted(firings)
    assert len({d for *_, d, _ in firings}) >= 2  # sends and suppressions alike


def test_the_backtest_command_reports_per_trigger(capsys):
    code = main(
        [
            "backtest",
            "--playbooks",
            str(ROOT / "examples" / "playbooks"),
            "--events",
            str(ROOT / "examples" / "events"),
            "--format",
            "json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and "backtested" in err
    result = json.loads(out)
    rows = {r["trigger"]: r for r in result["triggers"]}
    assert rows["known-bug"]["decisions"] == {"send": 1, "suppressed:cooldown": 1}
    assert rows["known-bug"]["subjects_hit_more_than_once"] == 1
    assert {tuple(o["triggers"]) for o in result["overlap"]} >= {("renewal-at-risk", "usage-drop")}


def test_the_live_report_reads_outcomes_from_the_log(tmp_path, capsys):
    from forewarn import report

    conn = store_sqlite.connect(tmp_path / "forewarn.db")
    store_sqlite.ensure_workspace(conn, "default", 0)
    live = LiveEngine(
        conn, 1, TRIGGERS, policy=decide.Policy(caps=(), quiet_start_min=0, quiet_end_min=0)
    )
    messages = []
    for i in range(40):
        messages.append(track("Quota Hit", at(days=i, hours=10), f"u{i}"))
        if i % 2:
            messages.append(track("Plan Upgraded", at(days=i, hours=12), f"u{i}"))
        if i % 5 == 0:
            messages.append(track("Ticket Created", at(days=i + 1), f"u{i}", priority="urgent"))
    feed_live(conn, live, messages)
    result = report.live_report(conn, 1, TRIGGERS, T0_MS, T0_MS + 60 * DAY)
    (row,) = result["triggers"]
    assert row["firings"] == 40 and row["subjects"] == 40
    treated, control = row["treated"], row["held_out"]
    assert treated["n"] + control["n"] == 40
    assert treated["goals"] + control["goals"] == 20  # every odd user upgraded within the day
    assert treated["failures"] + control["failures"] == 8
    assert row["recall"] == 1.0 and row["failures_in_history"] == 8
    # recorded once their windows have closed, once per firing
    for _ in range(2):
        report.live_report(conn, 1, TRIGGERS, T0_MS, T0_MS + 60 * DAY, record=True)
    recorded = conn.execute("SELECT count(*), sum(goal), sum(failure) FROM outcomes").fetchone()
    assert recorded == (40, 20, 8)
    conn.close()
    code = main(
        [
            "report",
            "--playbooks",
            str(tmp_path / "none.yaml"),
            "--db",
            str(tmp_path / "forewarn.db"),
        ]
    )
    _, err = capsys.readouterr()
    assert code == 2 and "none.yaml" in err


def test_engagement_counts_for_the_latest_message_only():
    outcomes = Outcomes(TRIGGERS)
    outcomes.fired(_firing("u1", T0_MS))
    outcomes.fired(_firing("u1", T0_MS + DAY))
    outcomes.observe(
        event_from_dict(track("Message Dismissed", at(days=1, hours=1), "u1", trigger="quota"))
    )
    first, second = outcomes.finish()
    assert (first.engaged, second.engaged) == (frozenset(), frozenset({"dismissed"}))


def test_a_backtest_sees_the_goal_that_comes_before_the_next_firing(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "triggers:\n  - id: stuck\n    when: {event: {name: Stuck}}\n"
        "    action: {channel: in_app, message: hi}\n    goal: {event: Done, within: 1d}\n"
    )
    events = [
        event_from_dict(m)
        for m in (
            track("Stuck", at(hours=1), "u1"),
            track("Done", at(hours=2), "u1"),
        )
    ]
    result = backtest.run(
        load_playbooks(tmp_path / "p.yaml"), events, decide.Policy(), T0_MS + 3 * DAY
    )
    (row,) = result["triggers"]
    assert row["treated"]["goals"] == 1 and row["goal_rate"] == {"treated": 1.0, "held_out": None}
