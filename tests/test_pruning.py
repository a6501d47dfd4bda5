"""Pruning the scale-out tables on a real PostgreSQL: applied events past the window go, while
queued ones, dead letters and the 7 days of message ids that recognise a resend stay;
partition states no worker will use again go, the others stay."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from forewarn import live, pruning, scaleout, settings, store_pg
from forewarn.errors import InputError
from forewarn.model import event_from_dict
from forewarn.store_sqlite import Append
from forewarn.worker import Worker
from tests import pg
from tests.factories import T0_MS, at, identify, ms, track
from tests.test_worker import FREE, LIMIT, QUIET, _poison

DAY_MS = 86_400_000
NOW_MS = T0_MS + 30 * DAY_MS


@pytest.fixture
def pool() -> Iterator[store_pg.Pool]:
    for url in pg.database():
        pool = store_pg.connect(url)
        yield pool
        pool.close()


def _ingest(pool: store_pg.Pool, ws: int, received_ms: int, messages: list[dict[str, Any]]) -> int:
    ids = [str(m["messageId"]) for m in messages]
    appends = [
        Append(ws, "segment", received_ms, messages, ids, [event_from_dict(m) for m in messages])
    ]
    return store_pg.append_batches(pool, appends)[0].stored


def _ids(pool: store_pg.Pool) -> set[int]:
    with pool.connection() as conn:
        return {int(i) for (i,) in conn.execute("SELECT id FROM events")}


def test_applied_events_past_the_window_go_and_what_is_still_needed_stays(
    pool: store_pg.Pool,
) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    old_ms, recent_ms = NOW_MS - 8 * DAY_MS, NOW_MS - 6 * DAY_MS
    old = [track("Limit Hit", at(minutes=i), f"u{i}", f"a{i}") for i in range(7)]
    recent = [track("Limit Hit", at(days=1), "u1", "a1")]
    _ingest(pool, ws, old_ms, old)
    _ingest(pool, ws, recent_ms, recent)
    dead = _poison(pool, ws, track("Limit Hit", at(minutes=9), "u9", "a9"))
    with pool.connection() as conn:  # (the poison's row as old as the others)
        conn.execute("UPDATE events SET received_ms = %s WHERE id = %s", (old_ms, dead))
    worker = Worker(pool, ws, LIMIT)
    worker.run_until_idle(NOW_MS)
    assert worker.dead_letters == 1
    late = [track("Limit Hit", at(minutes=30), "u8", "a8")]  # old, and still queued
    _ingest(pool, ws, old_ms, late)
    before = _ids(pool)

    done = pruning.prune(pool, ws, NOW_MS, 7 * DAY_MS, batch=3)

    assert done.events == 7  # in transactions of at most 3
    assert len(before - _ids(pool)) == 7 and dead in _ids(pool)
    with pool.connection() as conn:
        assert store_pg.pending(conn, ws) == 1
    assert _ingest(pool, ws, NOW_MS, recent) == 0  # still recognised as a resend
    worker.run_until_idle(NOW_MS)  # the queued one is applied from its row
    with pool.connection() as conn:
        assert store_pg.pending(conn, ws) == 0
        fired = {str(s) for (s,) in conn.execute("SELECT subject FROM firings")}
    assert "a8" in fired


def test_partition_states_no_worker_will_use_again_go(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    _ingest(
        pool,
        ws,
        T0_MS,
        [
            track("Login", at(), "u1"),  # user:u1, with its absence's timer
            track("Signup", at(), "u3", "acme"),
            track("Signup", at(), "u5", "beta"),
        ],
    )
    Worker(pool, ws, QUIET).run_until_idle(ms(minutes=1))
    new = Worker(pool, ws, FREE)  # new playbooks
    _ingest(pool, ws, T0_MS, [identify(at(), "u2", plan="free")])
    new.run_until_idle(ms(hours=2))  # u2 built; u1 claimed for its timer, afresh: empty
    _ingest(pool, ws, T0_MS, [track("Signup", at(1), "u4", "acme")])  # queued
    with pool.connection() as conn:
        states = {str(p): str(b) for p, b in conn.execute("SELECT part, playbooks FROM parts")}
    assert states == {
        "user:u1": live.fingerprint(FREE),
        "user:u2": live.fingerprint(FREE),
        "account:acme": live.fingerprint(QUIET),
        "account:beta": live.fingerprint(QUIET),
    }

    done = pruning.prune(pool, ws, NOW_MS, 0)

    with pool.connection() as conn:
        left = {str(p) for (p,) in conn.execute("SELECT part FROM parts")}
    # u1's empty state and beta's under old playbooks go; u2's is in use; acme's old one has
    # an event queued, and starts afresh under the new playbooks when it is applied
    assert (done.parts, left) == (2, {"user:u2", "account:acme"})
    new.run_until_idle(ms(hours=2))
    assert pruning.prune(pool, ws, NOW_MS, 0).parts == 0


def test_a_partition_a_worker_holds_is_not_pruned_under_it(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    Worker(pool, ws, QUIET).run_until_idle(0)
    _ingest(pool, ws, T0_MS, [track("Login", at(), "u1")])
    Worker(pool, ws, QUIET).run_until_idle(0)
    Worker(pool, ws, FREE).register(T0_MS)  # u1's state is under older playbooks now
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (store_pg.lock_key(ws, "user:u1"),))
        assert pruning.prune(pool, ws, NOW_MS, 0).parts == 0
    assert pruning.prune(pool, ws, NOW_MS, 0).parts == 1


def test_the_current_generation_is_the_newest_in_the_database(pool: store_pg.Pool) -> None:
    # (read by each statement: a generation started during a run keeps what it builds)
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    _ingest(pool, ws, T0_MS, [identify(at(), "u1", plan="free")])
    Worker(pool, ws, QUIET).run_until_idle(0)
    newer = Worker(pool, ws, FREE)  # registers, then builds u2's partition
    _ingest(pool, ws, T0_MS, [identify(at(), "u2", plan="free")])
    newer.run_until_idle(0)
    assert pruning.prune(pool, ws, NOW_MS, 0).parts == 1
    with pool.connection() as conn:
        left = {str(p) for (p,) in conn.execute("SELECT part FROM parts")}
    assert left == {"user:u2"}


def test_a_worker_prunes_every_so_often(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    _ingest(pool, ws, T0_MS, [track("Limit Hit", at(), "u1", "acme")])
    worker = Worker(pool, ws, LIMIT)
    clock = iter(range(NOW_MS, NOW_MS + 10**9, 1000))
    stop = threading.Event()

    def now() -> int:
        t = next(clock)
        if not _ids(pool):  # pruned: the applied event was past the window
            stop.set()
        return t

    thread = threading.Thread(
        target=scaleout.run_worker,
        args=(worker, stop, now),
        kwargs={"idle_s": 0.001, "prune_every_ms": 5000, "keep_events_ms": 7 * DAY_MS},
    )
    thread.start()
    thread.join(timeout=60)
    stop.set()
    assert stop.is_set() and not _ids(pool)


def test_the_window_is_at_least_the_dedup_window(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings.pg_keep_events_ms() == 7 * DAY_MS
    monkeypatch.setenv("FOREWARN_PG_KEEP_EVENTS", "3d")
    with pytest.raises(InputError, match="at least 7d"):
        settings.pg_keep_events_ms()
    monkeypatch.setenv("FOREWARN_PG_KEEP_EVENTS", "off")
    assert settings.pg_keep_events_ms() == 0
    monkeypatch.setenv("FOREWARN_PG_PRUNE_EVERY", "often")
    with pytest.raises(InputError, match="FOREWARN_PG_PRUNE_EVERY"):
        settings.pg_prune_every_ms()


def test_the_home_of_a_person_with_no_state_left_goes(pool: store_pg.Pool) -> None:
    from tests.factories import group

    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    _ingest(pool, ws, T0_MS, [group(at(), "acme", "u1"), group(at(), "beta", "u2")])
    Worker(pool, ws, QUIET).run_until_idle(0)
    newer = Worker(pool, ws, FREE)
    _ingest(pool, ws, T0_MS, [track("Login", at(1), "u2", "beta")])  # beta goes on, under FREE
    newer.run_until_idle(0)

    done = pruning.prune(pool, ws, NOW_MS, 0)

    with pool.connection() as conn:
        homes = {str(p): str(a) for p, a in conn.execute("SELECT person, account FROM homes")}
        parts = {str(p) for (p,) in conn.execute("SELECT part FROM parts")}
    assert (done.parts, done.homes) == (1, 1)  # acme's state under QUIET, then u1's home
    assert homes == {"u2": "beta"} and parts == {"account:beta"}
    # u1 comes back (to an API process that never cached their home): afresh, a new home
    store_pg._HOMES.clear()
    _ingest(pool, ws, NOW_MS, [identify(at(2), "u1", plan="free")])
    _ingest(pool, ws, NOW_MS, [track("Login", at(3), "u1", "zeta")])
    newer.run_until_idle(0)
    with pool.connection() as conn:
        homes = {str(p): str(a) for p, a in conn.execute("SELECT person, account FROM homes")}
        parts = {str(p) for (p,) in conn.execute("SELECT part FROM parts")}
    assert homes == {"u1": "zeta", "u2": "beta"}
    assert parts == {"account:beta", "account:zeta"}  # u1's own partition adopted by zeta
