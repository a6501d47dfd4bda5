"""The simulated SaaS world: the same seed gives the same world, and its ground truth matches
its events."""

from __future__ import annotations

import gzip
import json
from typing import Any

from forewarn import backtest, decide, simulate
from forewarn.cli import main
from forewarn.model import event_from_dict, parse_time_ms
from forewarn.playbook import Trigger, parse_playbooks
from forewarn.simulate_outreach import EngineReach

START = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def world(
    seed: int, accounts: int = 60, days: int = 21
) -> tuple[simulate.World, list[dict[str, Any]]]:
    w, messages = simulate.generate(accounts, days, seed, START)
    return w, list(messages)


def test_the_same_seed_gives_the_same_world_and_another_seed_another():
    a, first = world(5)
    b, again = world(5)
    _, other = world(6)
    assert first == again and a.truth == b.truth
    assert first != other


def test_every_message_is_valid_and_in_time_order():
    _, messages = world(7)
    times = [parse_time_ms(m["timestamp"]) for m in messages]
    assert times == sorted(times)
    for m in messages:
        event_from_dict(m)  # raises on anything a client could not send
    assert len({m["messageId"] for m in messages}) == len(messages)


def test_the_ground_truth_matches_the_events():
    w, messages = world(11, accounts=200)
    kinds = {t.kind for t in w.truth}
    assert kinds == set(simulate.PROBLEMS)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        by_name.setdefault(m.get("event", m["type"]), []).append(m)
    for t in w.truth:
        if t.ticket_ms is not None:
            name = "Subscription Cancelled" if t.kind == "usage_decay" else "Ticket Created"
            found = [
                m
                for m in by_name[name]
                if m["properties"]["problem"] == t.kind
                and parse_time_ms(m["timestamp"]) == t.ticket_ms
            ]
            assert found, t
            low, high = simulate.TICKET_DELAY_MS[t.kind]
            assert t.onset_ms + low <= t.ticket_ms <= t.onset_ms + high
        if t.kind == "error_spike":
            errors = [m for m in by_name["Error"] if m["context"]["groupId"] == t.subject]
            assert len(errors) >= 25 and parse_time_ms(errors[0]["timestamp"]) == t.onset_ms
        if t.kind == "stuck_in_settings":
            assert any(
                m.get("userId") == t.subject and m["properties"]["path"] == "/kb/settings"
                for m in by_name["page"]
            )
    # left alone, problems lead to tickets at about their configured rates
    with_ticket = sum(t.ticket_ms is not None for t in w.truth) / len(w.truth)
    assert 0.25 < with_ticket < 0.75


def test_the_command_writes_events_and_truth(tmp_path, capsys):
    out = tmp_path / "world.jsonl.gz"
    assert (
        main(["simulate", "--accounts", "20", "--days", "10", "--seed", "2", "--out", str(out)])
        == 0
    )
    assert "events of 20 accounts over 10 days" in capsys.readouterr().err
    with gzip.open(out, "rt") as f:
        events = [json.loads(line) for line in f]
    truth = [
        json.loads(line)
        for line in (tmp_path / "world.jsonl.gz.truth.jsonl").read_text().splitlines()
    ]
    assert events and all("kind" in t and "onset_ms" in t for t in truth)
    assert main(["simulate", "--accounts", "0", "--out", str(out)]) == 2
    capsys.readouterr()
    assert main(["simulate", "--start", "yesterday", "--out", str(out)]) == 2
    assert "--start 'yesterday' is not an ISO 8601 time" in capsys.readouterr().err


def test_the_world_can_be_sent_to_a_server_through_segments_client(tmp_path, capsys):
    from . import server as srv

    live = srv.start(tmp_path / "forewarn.db")
    try:
        truth = tmp_path / "truth.jsonl"
        args = ["simulate", "--accounts", "3", "--days", "2", "--seed", "4", "--truth", str(truth)]
        code = main([*args, "--to", live.url, "--write-key", srv.WRITE_KEY])
        err = capsys.readouterr().err
        assert code == 0, err
        sent = int(err.split("sent ", 1)[1].split(" ", 1)[0])
        _, messages = simulate.generate(3, 2, 4, START)
        assert sent == len(list(messages))
        assert live.wait_for(lambda: live.metric("forewarn_events_accepted_total") == sent)
        assert truth.is_file()
    finally:
        srv.stop(live)


OUTREACH = """
triggers:
  - id: payment-failed
    scope: account
    when: {event: {name: Payment Failed}}
    action: {channel: email, message: "Your payment failed: update your card here."}
    holdout: 0.5
    failure: {event: Ticket Created, within: 3d}
  - id: storage-85
    scope: account
    when:
      threshold: {value: "traits.storage_used / traits.storage_limit", ">=": 0.85}
    action: {channel: email, message: "You are close to your storage limit."}
    holdout: 0.5
    failure: {event: Ticket Created, within: 3d}
"""


def test_outreach_in_time_lowers_tickets_and_the_report_measures_it():
    triggers = outreach_triggers()
    policy = decide.Policy(quiet_start_min=0, quiet_end_min=0)
    reach = EngineReach(triggers, policy)
    w, stream = simulate.generate(800, 6, 3, START, effect=0.9, reach=reach)
    messages = list(stream)
    kinds = ("payment_failed", "storage_limit")
    problems = [t for t in w.truth if t.kind in kinds and t.would_ticket_ms is not None]
    treated = [t for t in problems if t.reached_ms is not None]
    alone = [t for t in problems if t.reached_ms is None]
    assert len(treated) >= 10 and len(alone) >= 10
    # left alone, every would-be ticket happens; reached in time, nine in ten are prevented
    assert all(t.ticket_ms == t.would_ticket_ms for t in alone)
    rate = sum(t.ticket_ms is not None for t in treated) / len(treated)
    assert rate < 0.5
    for t in treated:
        assert t.onset_ms <= t.reached_ms < t.would_ticket_ms  # type: ignore[operator]
    # the tickets written are those the truth says happened
    tickets = {m["messageId"] for m in messages if m.get("event") == "Ticket Created"}
    assert len(tickets) == sum(t.ticket_ms is not None for t in w.truth if t.kind != "usage_decay")
    # and the backtest's lift (treated against held out) comes out with the effect's sign
    events = sorted((event_from_dict(m) for m in messages), key=lambda e: e.timestamp_ms)
    report = backtest.run(triggers, events, policy)
    for row in report["triggers"]:
        lift = row["failure_lift"]
        assert lift is not None and lift["absolute"] < 0, row


def test_without_effect_outreach_changes_nothing():
    plain, first = world(9, accounts=80, days=10)
    reach = EngineReach(outreach_triggers(), decide.Policy())
    w, stream = simulate.generate(80, 10, 9, START, effect=0.0, reach=reach)
    assert list(stream) == first and w.truth == plain.truth


def outreach_triggers() -> list[Trigger]:
    return parse_playbooks([("outreach.yaml", OUTREACH)])


def test_against_a_live_server_the_world_learns_whom_it_reached(tmp_path):
    """In real time, with the server's own decisions: every problem its outreach reached before
    the would-be ticket loses the ticket when the effect is total, and only those."""
    from itertools import takewhile

    from forewarn import clock
    from forewarn.simulate_outreach import Sender, ServerReach, send

    from . import server as srv

    playbook = OUTREACH.replace("holdout: 0.5", "holdout: 0.0")
    env = {"FOREWARN_QUIET_HOURS": "off", "FOREWARN_PRIORITY_WINDOW": "0"}
    live = srv.serve_playbook(tmp_path, playbook, env)
    try:
        sender = Sender(live.url, srv.WRITE_KEY)
        reach = ServerReach(live.url, srv.ADMIN_KEY, sender, lag_s=0.2)
        w, messages = simulate.generate(
            40,
            1,
            5,  # a seed with four would-be tickets for the playbook's problems
            clock.now_ms(),
            effect=1.0,
            reach=reach,
            onsets_within_ms=1_000,
            ticket_delay_ms=(2_000, 3_000),
        )
        watched = [t for t in w.truth if t.kind in ("payment_failed", "storage_limit")]
        due = [t.would_ticket_ms for t in watched if t.would_ticket_ms is not None]
        assert due, "the seed gives no would-be ticket to watch"
        last = simulate.stamp(max(due))
        send(takewhile(lambda m: m["timestamp"] <= last, messages), sender, realtime=True)
        sent = {f["subject"] for f in live.firings() if f["decision"] == "send"}
    finally:
        srv.stop(live)
    for t in watched:
        if t.would_ticket_ms is not None:
            assert t.subject in sent, t
            assert t.reached_ms is not None and t.ticket_ms is None, t  # prevented
