"""Scale-out workers on a real PostgreSQL: a user's state follows them to their home account,
events accepted under a user as their home was being set are applied there, and several
workers over one queue apply each event once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from forewarn import store_pg
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
        conn.execute("TRUNCATE events, queue, parts, homes, firings, outbox, keys, workspaces")
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
