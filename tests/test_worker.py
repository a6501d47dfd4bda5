"""Scale-out workers on a real PostgreSQL: a user's state follows them to their home account,
events accepted under a user as their home was being set are applied there, several
workers over one queue apply each event once, what cannot be applied is set aside as a dead
letter, no worker waits for a lock while holding others, and a worker with older playbooks
than the newest started stops claiming."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from forewarn import dead_letters, store_pg
from forewarn.dead_letters import BadState
from forewarn.model import event_from_dict
from forewarn.store_sqlite import Append
from forewarn.worker import Worker
from tests import pg
from tests.factories import T0_MS, at, group, identify, playbook, track
from tests.test_conformance import TRIGGERS, UNTIL_MS, _stored, generate, reference


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from pg.database()


@pytest.fixture
def pool(server: str) -> Iterator[store_pg.Pool]:
    pool = store_pg.connect(server)
    with pool.connection() as conn:
        conn.execute(
            "TRUNCATE events, queue, parts, homes, firings, outbox, keys, workspaces,"
            " dead_letters, playbook_generations"
        )
    yield pool
    pool.close()


def _ingest(pool: store_pg.Pool, ws: int, messages: list[dict[str, Any]]) -> None:
    ids = [str(m["messageId"]) for m in messages]
    evs = [event_from_dict(m) for m in messages]
    store_pg.append_batches(pool, [Append(ws, "segment", UNTIL_MS, messages, ids, evs)])


def _firings(pool: store_pg.Pool, ws: int) -> list[Any]:
    with pool.connection() as conn:
        return _stored(store_pg.query_firings(conn, ws, limit=100_000))


FREE = playbook("""
triggers:
  - id: free-limit
    when: {all: [{traits: {plan: free}}, {event: {name: Limit Hit}}]}
    action: {channel: in_app, message: Time to upgrade?}
""")


def test_a_users_state_follows_them_to_the_account_they_join(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    worker = Worker(pool, ws, FREE)
    _ingest(pool, ws, [identify(at(minutes=1), "u1", plan="free")])
    worker.run_until_idle(0)  # applied in the user's own partition
    _ingest(
        pool,
        ws,
        [group(at(minutes=2), "acme", "u1"), track("Limit Hit", at(minutes=3), "u1", "acme")],
    )
    worker.run_until_idle(0)
    with pool.connection() as conn:
        parts = [r[0] for r in conn.execute("SELECT part FROM parts ORDER BY part")]
    assert parts == ["account:acme"]  # the user's partition was emptied into the account's
    assert [(f[0], f[1]) for f in _firings(pool, ws)] == [("free-limit", "u1")]


def test_events_queued_under_a_user_with_a_home_are_applied_at_home(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    _ingest(
        pool, ws, [group(at(minutes=1), "acme", "u1"), identify(at(minutes=2), "u2", plan="free")]
    )
    with pool.connection() as conn:  # u2's home set by an API process that read no home yet
        conn.execute("INSERT INTO homes VALUES (%s, 'u2', 'acme')", (ws,))
    _ingest(pool, ws, [track("Limit Hit", at(minutes=3), "u2", "acme")])
    Worker(pool, ws, FREE).run_until_idle(0)
    assert [(f[0], f[1]) for f in _firings(pool, ws)] == [("free-limit", "u2")]
    with pool.connection() as conn:
        assert store_pg.pending(conn, ws) == 0


def test_workers_taking_turns_in_any_chunking_decide_as_the_reference(pool: store_pg.Pool) -> None:
    messages = generate(7)
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    team = [Worker(pool, ws, TRIGGERS, parts_per_step=3, events_per_step=25) for _ in range(2)]
    # the log arrives in pieces, and the workers catch up between them
    for start in range(0, len(messages), 90):
        _ingest(pool, ws, messages[start : start + 90])
        while sum(w.step(0).parts for w in team):
            pass
    while sum(w.step(UNTIL_MS).parts for w in team):
        pass
    assert _firings(pool, ws) == reference(messages)


def test_the_same_playbooks_have_the_same_fingerprint_in_every_process() -> None:
    # workers keep one another's partition states only under the same fingerprint
    from forewarn import live
    from tests.test_conformance import PLAYBOOK

    assert live.fingerprint(playbook(PLAYBOOK)) == live.fingerprint(playbook(PLAYBOOK))


QUIET = playbook("""
triggers:
  - id: quiet-hour
    when: {absent: {name: Login, for: 1h}}
    action: {channel: in_app, message: Still there?}
""")


def test_a_user_partition_claimed_in_the_step_that_adopts_its_user_is_emptied(
    pool: store_pg.Pool,
) -> None:
    from forewarn import partition
    from tests.factories import ms, replay

    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    worker = Worker(pool, ws, QUIET)
    first = [track("Login", at(), "u1")]
    _ingest(pool, ws, first)
    worker.run_until_idle(ms(minutes=1))  # u1's own partition, with its timer due at +1h
    later = [track("Login", at(hours=2), "u1", "acme")]
    _ingest(pool, ws, later)
    stepped = worker.step(ms(hours=2, minutes=1))  # the timer and the account, in one step
    assert stepped.parts == 2
    with pool.connection() as conn:
        states = {
            p: partition.decode(bytes(s)) for p, s in conn.execute("SELECT part, state FROM parts")
        }
    assert "u1" in states["account:acme"].users and "u1" not in states["user:u1"].users
    expected = replay(QUIET, first + later, until=at(hours=2, minutes=1))
    assert [(f[0], f[1], f[2]) for f in _firings(pool, ws)] == [
        (f.trigger, f.subject, f.to_dict()["at"]) for f in expected
    ]


TWO_DAYS_QUIET = playbook("""
triggers:
  - id: gone-quiet
    scope: account
    when: {absent: {name: Login, for: 2d}}
    action: {channel: in_app, message: Anyone there?}
""")


def test_a_backlog_does_not_fire_timers_its_queued_events_would_stop(pool: store_pg.Pool) -> None:
    """A worker that claims a few events at a time, far behind the clock: an account's
    absence must not fire between its claimed events and the ones still queued."""
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    logins = [track("Login", at(days=d), "u1", "acme") for d in range(11)]
    _ingest(pool, ws, logins)
    slow = Worker(pool, ws, TWO_DAYS_QUIET, events_per_step=3)
    slow.run_until_idle(T0_MS + 30 * 86_400_000)
    fired = _firings(pool, ws)
    assert len(fired) == 1, fired
    assert fired[0][2] == at(days=12)  # two days after the last login, not after the third


def _poison(pool: store_pg.Pool, ws: int, message: dict[str, Any]) -> int:
    """Store `message` with a timestamp the engine cannot compare (as a body written by a
    Forewarn with another event layout would be); returns its id."""
    import msgspec

    from forewarn.model import Event
    from forewarn.store_sqlite import EVENTS_FORMAT_PLAIN

    _ingest(pool, ws, [message])
    fields = list(msgspec.structs.astuple(event_from_dict(message)))
    fields[Event.__struct_fields__.index("timestamp_ms")] = "soon"
    with pool.connection() as conn:
        row = conn.execute(
            "UPDATE events SET event = %s WHERE id = (SELECT max(id) FROM events) RETURNING id",
            (EVENTS_FORMAT_PLAIN + msgspec.msgpack.encode(fields),),
        ).fetchone()
    assert row is not None
    return int(row[0])


LIMIT = playbook("""
triggers:
  - id: limit-hit
    scope: account
    when: {event: {name: Limit Hit}}
    action: {channel: in_app, message: You hit a limit}
""")


def test_an_event_that_cannot_be_applied_is_set_aside_and_the_rest_go_on(
    pool: store_pg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    _ingest(pool, ws, [track("Limit Hit", at(minutes=1), "u1", "acme")])
    bad = _poison(pool, ws, track("Limit Hit", at(minutes=2), "u1", "acme"))
    _ingest(
        pool,
        ws,
        [track("Limit Hit", at(minutes=3), "u1", "acme")]
        + [track("Limit Hit", at(minutes=1), f"u{i}", f"other{i}") for i in range(5)],
    )
    worker = Worker(pool, ws, LIMIT)
    with caplog.at_level("ERROR", logger="forewarn.worker"):
        done = worker.run_until_idle(at_ms := T0_MS + 3_600_000)
    assert done.dead == 1 and worker.dead_letters == 1
    fired = sorted((f[1], f[2]) for f in _firings(pool, ws))
    # acme's two healthy events fired (the engine's rising edge per event), the others too
    assert fired == sorted(
        [("acme", at(minutes=1)), ("acme", at(minutes=3))]
        + [(f"other{i}", at(minutes=1)) for i in range(5)]
    )
    with pool.connection() as conn:
        assert store_pg.pending(conn, ws) == 0
        (letter,) = dead_letters.listed(conn, ws)
        assert dead_letters.count(conn) == {ws: 1}
    assert (letter.part, letter.event, letter.state) == ("account:acme", bad, None)
    assert "TypeError" in letter.error
    assert f"event {bad} set aside as a dead letter" in caplog.text

    # replayed as it is, it fails again; repaired, it is applied
    with pool.connection() as conn:
        assert dead_letters.replay(conn, ws) == 1
        assert store_pg.pending(conn, ws) == 1
    assert worker.run_until_idle(at_ms).dead == 1
    good = _stored_event(track("Limit Hit", at(minutes=4), "u1", "acme"))
    with pool.connection() as conn:
        conn.execute("UPDATE events SET event = %s WHERE id = %s", (good, bad))
        (letter,) = dead_letters.listed(conn, ws)
        assert dead_letters.replay(conn, ws, [letter.id]) == 1
        assert dead_letters.listed(conn, ws) == []
    worker.run_until_idle(at_ms)
    # applied as a late event: at the partition's clock, which had moved on to `at_ms`
    assert ("acme", at(hours=1)) in [(f[1], f[2]) for f in _firings(pool, ws)]


def _stored_event(message: dict[str, Any]) -> bytes:
    import msgspec

    from forewarn.store_sqlite import EVENTS_FORMAT_PLAIN

    return EVENTS_FORMAT_PLAIN + msgspec.msgpack.encode(
        msgspec.structs.astuple(event_from_dict(message))
    )


def test_a_state_that_no_longer_decodes_is_set_aside_and_its_partition_starts_afresh(
    pool: store_pg.Pool,
) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    worker = Worker(pool, ws, LIMIT)
    _ingest(pool, ws, [track("Limit Hit", at(minutes=1), "u1", "acme")])
    worker.run_until_idle(0)
    with pool.connection() as conn:
        conn.execute("UPDATE parts SET state = '\\x00ff'::bytea WHERE part = 'account:acme'")
    _ingest(
        pool,
        ws,
        [track("Limit Hit", at(minutes=2), "u1", "acme"), track("Limit Hit", at(), "u2", "beta")],
    )
    assert worker.run_until_idle(0).dead == 1
    with pool.connection() as conn:
        (letter,) = dead_letters.listed(conn, ws)
        assert store_pg.pending(conn, ws) == 0
        assert dead_letters.replay(conn, ws) == 0  # a state is not queued again
        assert dead_letters.discard(conn, ws) == 1
    assert (letter.part, letter.event, letter.state) == ("account:acme", None, b"\x00\xff")
    assert "ValidationError" in letter.error
    fired = sorted((f[1], f[2]) for f in _firings(pool, ws))
    assert fired == [("acme", at(minutes=1)), ("acme", at(minutes=2)), ("beta", at())]


def test_when_every_partition_fails_alone_nothing_is_set_aside(pool: store_pg.Pool) -> None:
    """As after an upgrade that reads no stored state: a fault of the code, not of the data,
    so no partition loses its state or its events."""
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    worker = Worker(pool, ws, LIMIT)
    _ingest(
        pool, ws, [track("Limit Hit", at(), "u1", "acme"), track("Limit Hit", at(), "u2", "beta")]
    )
    worker.run_until_idle(0)
    with pool.connection() as conn:
        conn.execute("UPDATE parts SET state = '\\x00ff'::bytea")
    _ingest(
        pool,
        ws,
        [track("Limit Hit", at(1), "u1", "acme"), track("Limit Hit", at(1), "u2", "beta")],
    )
    with pytest.raises(BadState):
        worker.step(0)
    with pool.connection() as conn:
        assert store_pg.pending(conn, ws) == 2
        assert dead_letters.listed(conn, ws) == []
        states = {bytes(s) for (s,) in conn.execute("SELECT state FROM parts")}
    assert states == {b"\x00\xff"} and worker.dead_letters == 0


def test_a_worker_never_waits_for_a_users_partition_another_holds(
    server: str, pool: store_pg.Pool
) -> None:
    # (`pool` empties the database;) a lock wait would fail the step after 2 s here instead
    # of hanging the test
    pool = store_pg.connect(server + "?options=-c%20lock_timeout%3D2000")
    try:
        ws = store_pg.ensure_workspace(pool, "default", T0_MS)
        worker = Worker(pool, ws, FREE)
        _ingest(pool, ws, [identify(at(minutes=1), "u1", plan="free")])
        worker.run_until_idle(0)  # u1's own partition
        _ingest(
            pool,
            ws,
            [group(at(minutes=2), "acme", "u1"), track("Limit Hit", at(minutes=3), "u1", "acme")],
        )
        with pool.connection() as other, other.transaction():
            # another worker holds u1's partition
            other.execute("SELECT pg_advisory_xact_lock(%s)", (store_pg.lock_key(ws, "user:u1"),))
            assert worker.run_until_idle(0).parts == 0  # acme deferred, not waited for
            with pool.connection() as conn:
                assert store_pg.pending(conn, ws) == 2
        worker.run_until_idle(0)
        assert [(f[0], f[1]) for f in _firings(pool, ws)] == [("free-limit", "u1")]
        with pool.connection() as conn:
            assert store_pg.pending(conn, ws) == 0
    finally:
        pool.close()


FREE_V2 = playbook("""
triggers:
  - id: free-limit
    when: {all: [{traits: {plan: free}}, {event: {name: Limit Hit}}]}
    action: {channel: in_app, message: Time to upgrade? (v2)}
""")


def test_a_worker_with_older_playbooks_stops_claiming_instead_of_resetting_newer_state(
    pool: store_pg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    from forewarn import live

    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    old = Worker(pool, ws, FREE)
    _ingest(pool, ws, [identify(at(minutes=1), "u1", plan="free")])
    old.run_until_idle(0)
    new = Worker(pool, ws, FREE_V2)  # a rolling restart begins
    assert new.register(T0_MS)
    _ingest(pool, ws, [identify(at(minutes=2), "u2", plan="free")])
    new.run_until_idle(0)  # u1's partition starts afresh under v2 when next claimed; u2's is v2
    _ingest(pool, ws, [track("Limit Hit", at(minutes=3), "u2")])
    with caplog.at_level("WARNING", logger="forewarn.worker"):
        stepped = old.step(0)
        assert old.step(0).stale  # said once, not at every step
    assert stepped.stale and stepped.parts == 0
    assert caplog.text.count("claims nothing until it is restarted") == 1
    with pool.connection() as conn:
        assert store_pg.pending(conn, ws) == 1
        kept = {
            str(p): str(b)
            for p, b in conn.execute("SELECT part, playbooks FROM parts WHERE part = 'user:u2'")
        }
    assert kept == {"user:u2": live.fingerprint(FREE_V2)}
    # an old worker restarted during the rollout does not take over again
    assert not Worker(pool, ws, FREE).register(T0_MS)
    new.run_until_idle(0)  # u2's traits, built by v2, are still there
    assert [(f[0], f[1]) for f in _firings(pool, ws)] == [("free-limit", "u2")]


def test_a_template_naming_another_trait_is_other_playbooks_to_the_stored_states(
    pool: store_pg.Pool,
) -> None:
    """The traits the messages name are kept in the partitions' states: a template that names
    a new one lays the state out anew, so neither a worker nor an API process reads the
    states stored before as they are (it would find plan where first_name now lives)."""
    from forewarn import admin_pg

    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    old = Worker(pool, ws, FREE)
    _ingest(pool, ws, [identify(at(minutes=1), "u1", plan="free", first_name="Ada")])
    old.run_until_idle(0)

    named = (("first_name",), ())  # the template now says "Hi {{ traits.first_name }}"
    new = Worker(pool, ws, FREE, keep=named)
    assert new.playbooks != old.playbooks
    with pool.connection() as conn:
        with pytest.raises(admin_pg.OtherPlaybooksError):
            admin_pg.Reader(FREE, named).subject(conn, ws, "u1")
        # naming a trait the trigger reads already lays out nothing anew: read as stored
        (same,) = admin_pg.Reader(FREE, (("plan",), ())).subject(conn, ws, "u1")["as"]
    assert same["traits"] == {"plan": "free"}

    assert new.register(T0_MS)  # the workers restarted with the new template
    _ingest(pool, ws, [identify(at(minutes=2), "u1", first_name="Ada", plan="free")])
    new.run_until_idle(0)  # the partition starts afresh under the new layout
    _ingest(pool, ws, [track("Limit Hit", at(minutes=3), "u1")])
    new.run_until_idle(0)
    with pool.connection() as conn:
        (held,) = admin_pg.Reader(FREE, named).subject(conn, ws, "u1")["as"]
    assert held["traits"] == {"plan": "free", "first_name": "Ada"}
    assert [(f[0], f[1]) for f in _firings(pool, ws)] == [("free-limit", "u1")]
