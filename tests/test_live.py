"""The live engine over the SQLite log: the same firings as a replay, and after a crash at any
step, nothing lost and nothing fired twice."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forewarn import store_sqlite
from forewarn.dedup import SeenIds
from forewarn.live import LiveEngine, firing_dict
from forewarn.model import event_from_dict, order_key
from forewarn.sources import load_playbooks

from .factories import DAY, T0_MS, at, identify, ms, playbook, replay, track
from .test_replay_properties import HORIZON_MS, TRIGGERS, run, streams

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = ROOT / "examples" / "playbooks"


def _example_messages() -> list[dict[str, object]]:
    messages: list[dict[str, object]] = []
    for file in sorted((ROOT / "examples" / "events").glob("*.jsonl")):
        messages.extend(json.loads(line) for line in file.read_text().splitlines() if line)
    return sorted(messages, key=lambda m: order_key(event_from_dict(m)))


@pytest.fixture
def db(tmp_path: Path) -> sqlite3.Connection:
    conn = store_sqlite.connect(tmp_path / "forewarn.db")
    store_sqlite.ensure_workspace(conn, "default", 0)
    return conn


def _append(conn: sqlite3.Connection, message: dict[str, object], received_ms: int) -> None:
    store_sqlite.append_batches(
        conn,
        [store_sqlite.Append(1, "test", received_ms, [message], [str(message["messageId"])])],
        SeenIds(),  # the messages of these tests are all different
    )


def _firings(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    return [
        (f["trigger"], f["subject"], f["at"])
        for f in map(firing_dict, store_sqlite.query_firings(conn, 1, limit=10_000))
    ]


def _expected(until_ms: int) -> list[tuple[str, str, str]]:
    triggers = load_playbooks(PLAYBOOKS)
    from forewarn.model import format_time

    fired = replay(triggers, _example_messages(), until=format_time(until_ms))
    return sorted((f.trigger, f.subject, f.to_dict()["at"]) for f in fired)


def test_live_steps_give_the_replay_firings(db):
    messages = _example_messages()
    live = LiveEngine(db, 1, load_playbooks(PLAYBOOKS))
    for m in messages:
        t = event_from_dict(m).timestamp_ms
        _append(db, m, t)
        live.step(t)
    end = event_from_dict(messages[-1]).timestamp_ms + 40 * DAY
    live.step(end)
    assert sorted(_firings(db)) == _expected(end)
    assert live.lag() == 0


@pytest.mark.parametrize("snapshot_every_ms", [0, DAY, 10**15])
@pytest.mark.parametrize("crash_every", [1, 3, 7])
def test_a_restart_at_any_step_loses_and_repeats_nothing(db, snapshot_every_ms, crash_every):
    messages = _example_messages()
    triggers = load_playbooks(PLAYBOOKS)
    live = LiveEngine(db, 1, triggers, snapshot_every_ms)
    for i, m in enumerate(messages):
        t = event_from_dict(m).timestamp_ms
        _append(db, m, t)
        if i % crash_every == 0:
            # the process dies: its memory is gone, the database stays
            live = LiveEngine(db, 1, triggers, snapshot_every_ms)
        live.step(t)
    end = event_from_dict(messages[-1]).timestamp_ms + 40 * DAY
    live = LiveEngine(db, 1, triggers, snapshot_every_ms)
    live.step(end)
    firings = _firings(db)
    assert len(firings) == len(set(firings)), "a firing was recorded twice"
    assert sorted(firings) == _expected(end)


def test_a_timer_due_while_down_fires_at_its_due_time_after_restart(db):
    triggers = load_playbooks(PLAYBOOKS)
    used = track("Feature Used", at(), feature="reports")
    live = LiveEngine(db, 1, triggers)
    _append(db, used, ms())
    live.step(ms())
    live.step(ms(days=6))
    assert _firings(db) == []
    # down from day 6 to day 10; the first step after fires what came due at day 7
    LiveEngine(db, 1, triggers).step(ms(days=10))
    assert _firings(db) == [("reports-unused", "u1", at(days=7))]


def test_batches_not_yet_stepped_are_read_after_a_restart(db):
    triggers = load_playbooks(PLAYBOOKS)
    messages = _example_messages()
    for m in messages:
        _append(db, m, event_from_dict(m).timestamp_ms)
    live = LiveEngine(db, 1, triggers)
    assert live.lag() == len(messages)
    while live.lag():
        live.step(event_from_dict(messages[-1]).timestamp_ms)
    assert live.cursor == store_sqlite.log_end(db, 1)


def test_other_playbooks_rebuild_from_the_log_without_firing_the_past(db):
    triggers = load_playbooks(PLAYBOOKS)
    messages = _example_messages()
    live = LiveEngine(db, 1, triggers)
    for m in messages:
        t = event_from_dict(m).timestamp_ms
        _append(db, m, t)
        live.step(t)
    recorded = _firings(db)
    fewer = [t for t in triggers if t.id != "payment-failed"]
    rebuilt = LiveEngine(db, 1, fewer)
    assert rebuilt.cursor == live.cursor
    assert len(rebuilt.runner.state.users) == len(live.runner.state.users)
    assert _firings(db) == recorded


FREE_PLAN = playbook("""
triggers:
  - id: free-limit
    when: {all: [{traits: {plan: free}}, {event: {name: Limit Hit}}]}
    action: {channel: in_app, template: free-limit}
""")


def test_a_template_naming_another_trait_rebuilds_the_state_instead_of_misreading_it(db):
    """The traits a message template names are kept in the state, in slots laid out with the
    triggers' own: a template that names a new one moves them, so the snapshot taken before
    cannot be read as it is."""
    from forewarn.server import subject_state

    live = LiveEngine(db, 1, FREE_PLAN, snapshot_every_ms=0)
    _append(db, identify(at(), "u1", plan="free", first_name="Ada"), T0_MS)
    live.step(T0_MS)
    assert subject_state(live.runner.state, "u1")[0]["traits"] == {"plan": "free"}

    # the template now says "Hi {{ traits.first_name }}": the engine keeps first_name too
    named = LiveEngine(db, 1, FREE_PLAN, keep=(("first_name",), ()))
    assert named.playbooks != live.playbooks
    traits = subject_state(named.runner.state, "u1")[0]["traits"]
    assert traits == {"plan": "free", "first_name": "Ada"}  # rebuilt from the log

    # a template naming only what the triggers or the policy read already (plan, email)
    # changes nothing: the snapshot is read as it is, not rebuilt
    plan = LiveEngine(db, 1, FREE_PLAN, keep=(("plan", "email"), ()))
    assert plan.playbooks == live.playbooks
    assert subject_state(plan.runner.state, "u1")[0]["traits"] == {"plan": "free"}


@settings(max_examples=25, deadline=None)
@given(
    streams(),
    st.lists(st.integers(min_value=0, max_value=3), max_size=60),
    st.sampled_from([0, DAY, 10**15]),
)
def test_live_steps_restarts_and_idle_polls_give_the_replay_firings(evs, plan, every):
    """Whatever the engine does between events (idle steps at any moment up to the next event,
    restarts with its memory lost), what it records is what a replay fires, once each."""
    import tempfile

    from forewarn.model import format_time

    with tempfile.TemporaryDirectory() as tmp:
        conn = store_sqlite.connect(Path(tmp) / "f.db")
        store_sqlite.ensure_workspace(conn, "default", 0)
        live = LiveEngine(conn, 1, TRIGGERS, every)
        moves = iter(plan)
        for i, event in enumerate(evs):
            message = {
                "type": event.kind,
                "userId": event.user_id,
                "timestamp": format_time(event.timestamp_ms),
                "messageId": f"m{i}",
                "properties": event.properties,
                "traits": event.traits,
            }
            if event.kind == "track":
                message["event"] = event.name
            elif event.kind == "page":
                message["name"] = event.name
            if event.kind == "group":
                message["groupId"] = event.account_id
            elif event.account_id is not None:
                message["context"] = {"groupId": event.account_id}
            move = next(moves, 0)
            if move == 1 and i:  # an idle step somewhere since the previous event
                before = evs[i - 1].timestamp_ms
                live.step(before + (event.timestamp_ms - before) // 2)
            elif move == 2:  # the process dies; a new one starts from the database
                live = LiveEngine(conn, 1, TRIGGERS, every)
            _append(conn, message, event.timestamp_ms)
            live.step(event.timestamp_ms)
        end = T0_MS + HORIZON_MS + 30 * DAY
        LiveEngine(conn, 1, TRIGGERS, every).step(end)
        recorded = _firings(conn)
        conn.close()
    expected = sorted((f["trigger"], f["subject"], f["at"]) for f in run(evs))
    assert len(recorded) == len(set(recorded)), "a firing was recorded twice"
    assert sorted(recorded) == expected


def test_a_subjects_timeline_reaches_past_the_latest_batches_through_the_index(db):
    """A customer seen once, thousands of batches ago, still has that event on their timeline:
    the engine's steps index which batches hold which subjects. Batches committed after the
    last step, and batches logged before the index existed, are looked through as well."""
    live = LiveEngine(db, 1, load_playbooks(PLAYBOOKS))
    _append(db, track("Login", at(minutes=1), "early-bird", "acme"), T0_MS)
    for i in range(2_100):  # more than the 2,000 batches a timeline looks through unindexed
        _append(db, track("Login", at(minutes=2), f"u{i}", "acme"), T0_MS + i)
    while live.step(T0_MS + DAY):  # a step reads at most a few hundred batches
        pass
    _append(db, track("Logout", at(minutes=3), "early-bird"), T0_MS + DAY)  # not stepped yet
    timeline = store_sqlite.recent_events(db, 1, "early-bird", 10)
    assert [m["event"] for m in timeline] == ["Logout", "Login"]  # newest first
    assert len(store_sqlite.recent_events(db, 1, "acme", 5)) == 5
    # a log from before the index: its latest part is still looked through
    db.execute("DELETE FROM subject_batches")
    db.execute("UPDATE subject_index SET since_batch = 2100")
    assert [m["userId"] for m in store_sqlite.recent_events(db, 1, "u2050", 10)] == ["u2050"]
    db.execute("UPDATE engine SET cursor = 200")  # and the engine far behind: each batch once
    assert [m["userId"] for m in store_sqlite.recent_events(db, 1, "u2050", 10)] == ["u2050"]
    assert [m["event"] for m in store_sqlite.recent_events(db, 1, "early-bird", 10)] == [
        "Logout"
    ]  # batch 1 is beyond both the index and the 2,000 batches looked through


def test_no_cycle_collection_runs_while_a_step_holds_the_write_lock(db):
    """A full pass over a large engine state takes a tenth of a second: inside the write lock
    it would hold every commit up. The step pauses the collector around the lock only."""
    import gc

    seen: list[tuple[str, bool]] = []

    class Lock:
        def __enter__(self) -> None:
            seen.append(("taken", gc.isenabled()))

        def __exit__(self, *exc: object) -> None:
            seen.append(("let go", gc.isenabled()))

    live = LiveEngine(db, 1, load_playbooks(PLAYBOOKS), write_lock=Lock())
    _append(db, track("Feature Used", at(), feature="reports"), ms())
    assert gc.isenabled()
    live.step(ms())
    assert seen == [("taken", False), ("let go", False)]
    assert gc.isenabled()  # and on again after
