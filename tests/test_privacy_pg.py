"""Privacy in the scale-out mode, on a real PostgreSQL: forgetting a person removes their rows
from every table and their state from every partition (rebuilt by the workers without them,
firing nothing again), refuses their events from then on, and holds against a worker step in
flight; the retention purge; the audit rows; the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import msgspec

from forewarn import live, partition, privacy_pg, scaleout, store_pg
from forewarn.forgotten import REASON, subject_hash
from forewarn.model import event_from_dict
from forewarn.store_sqlite import Append, Appended
from forewarn.worker import Worker
from tests.factories import T0_MS, at, group, identify, message, ms, playbook, track
from tests.test_conformance import TRIGGERS, UNTIL_MS, generate

FREE = playbook("""
triggers:
  - id: free-limit
    when: {all: [{traits: {plan: free}}, {event: {name: Limit Hit}}]}
    action: {channel: in_app, message: Time to upgrade?}
""")
VICTIM = "victim-8c1e5a"


def _ingest(
    pool: store_pg.Pool, ws: int, messages: list[dict[str, Any]], received_ms: int = T0_MS
) -> Appended:
    ids = [str(m["messageId"]) for m in messages]
    evs = [event_from_dict(m) for m in messages]
    [done] = store_pg.append_batches(pool, [Append(ws, "segment", received_ms, messages, ids, evs)])
    return done


def _customers(pool: store_pg.Pool, ws: int) -> None:
    """The victim (a state of their own before joining acme, then acme's, then beta's where
    one event went; an alias and another person's event naming them as anonymous id) and
    `u2`, who shares acme with them."""
    _ingest(pool, ws, [identify(at(minutes=1), VICTIM, plan="free", email="V@example.com")])
    Worker(pool, ws, FREE).run_until_idle(0)  # applied in the victim's own partition
    _ingest(
        pool,
        ws,
        [
            group(at(minutes=2), "acme", VICTIM),
            track("Limit Hit", at(minutes=3), VICTIM, "acme"),
            track("Limit Hit", at(minutes=4), VICTIM, "beta"),
            message("alias", at(minutes=5), "u9", previousId=VICTIM),
            track("Seen", at(minutes=6), "u8", "acme") | {"anonymousId": VICTIM},
            identify(at(minutes=7), "u2", plan="free", email="u2@example.com"),
            group(at(minutes=8), "acme", "u2"),
            track("Limit Hit", at(minutes=9), "u2", "acme"),
        ],
    )


def _outreach_rows(pool: store_pg.Pool, ws: int) -> None:
    """Rows of every other table for the victim and for u2, as the outreach routes and the
    delivery would leave them."""
    with pool.connection() as conn:
        for who, email in ((VICTIM, "v@example.com"), ("u2", "u2@example.com")):
            args = (ws, who)
            conn.execute("INSERT INTO consent VALUES (%s, 'user', %s, 'email', 1, 'link')", args)
            conn.execute("INSERT INTO suppressions VALUES (%s, 'user', %s, 'asked', NULL, 1)", args)
            conn.execute(
                "INSERT INTO push_subscriptions VALUES"
                " (%s, 'user', %s, 'https://push.example/' || %s, 'k', 'a', 1)",
                (ws, who, who),
            )
            conn.execute("INSERT INTO bounces VALUES (%s, %s, 'hard', 1)", (ws, email))
            row = conn.execute(
                "INSERT INTO inbox (workspace, scope, subject, key, trig, kind, title, text,"
                " html, created_ms) VALUES (%s, 'user', %s, 'chat-' || %s, 't', 'chat', 'Hi',"
                " 'hi', 'hi', 1) RETURNING id",
                (ws, who, who),
            ).fetchone()
            assert row is not None
            conn.execute(
                "INSERT INTO conversation_messages (workspace, conversation, author, text,"
                " at_ms) VALUES (%s, %s, 'user', 'help', 1)",
                (ws, row[0]),
            )
            conn.execute(
                "INSERT INTO outcomes SELECT id, workspace, trig, 1, NULL, 'yes', 1"
                " FROM firings WHERE workspace = %s AND subject = %s",
                args,
            )


def _count(pool: store_pg.Pool, table: str, where: str, *args: Any) -> int:
    with pool.connection() as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE {where}", args).fetchone()
    assert row is not None
    return int(row[0])


def _states(pool: store_pg.Pool, ws: int) -> dict[str, partition.PartState]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT part, state FROM parts WHERE workspace = %s ORDER BY part", (ws,)
        ).fetchall()
    return {str(p): partition.decode(bytes(s)) for p, s in rows}


def _firings(pool: store_pg.Pool, ws: int) -> list[tuple[str, str, str]]:
    with pool.connection() as conn:
        rows = store_pg.query_firings(conn, ws)
    return [(live.firing_dict(r)["trigger"], r[1], r[5]) for r in rows]


def _named(pool: store_pg.Pool, who: str) -> int:
    """Stored messages holding the id anywhere, byte for byte."""
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*) FROM events WHERE position(%s IN message) > 0", (who.encode(),)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_forget_removes_the_person_from_every_table_and_every_partition(
    pool: store_pg.Pool,
) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    _customers(pool, ws)
    worker = Worker(pool, ws, FREE)
    worker.run_until_idle(ms(minutes=30))
    _outreach_rows(pool, ws)
    assert _firings(pool, ws) == [
        ("free-limit", VICTIM, "send"),
        ("free-limit", "u2", "send"),
    ]
    states = _states(pool, ws)
    assert {p for p, s in states.items() if VICTIM in s.users} == {"account:acme", "account:beta"}
    u2_before = states["account:acme"].users["u2"]

    done = privacy_pg.forget(pool, ws, VICTIM, "cli", ms(minutes=31))

    assert done.events == 6  # their 4, the alias from their id and u8's event as them
    removed = done.to_dict()
    for table in ("firings", "outbox", "outcomes", "consent", "suppressions"):
        assert removed[table] == 1, table
    for table in ("push_subscriptions", "inbox", "conversation_messages", "bounces"):
        assert removed[table] == 1, table
    # their own, acme (their home), beta, and u9's where the alias naming them went
    assert removed["partitions"] == 4
    assert _named(pool, VICTIM) == 0
    who = (ws, VICTIM)
    for table in ("consent", "suppressions", "push_subscriptions", "inbox", "firings", "outbox"):
        assert _count(pool, table, "workspace = %s AND subject = %s", *who) == 0, table
        assert _count(pool, table, "workspace = %s AND subject = 'u2'", ws) == 1, table
    assert _count(pool, "bounces", "address = 'v@example.com'") == 0
    assert _count(pool, "bounces", "address = 'u2@example.com'") == 1
    assert _count(pool, "conversation_messages", "true") == 1
    assert _count(pool, "outcomes", "true") == 1
    assert _count(pool, "homes", "workspace = %s AND person = %s", *who) == 0
    assert _count(pool, "events", "workspace = %s AND person = %s", *who) == 0
    assert _count(pool, "queue", "id NOT IN (SELECT id FROM events)") == 0
    assert _count(pool, "forgotten", "hash = %s", subject_hash(ws, VICTIM)) == 1
    # the partitions that held them are dropped, to be rebuilt from the others' events
    assert set(_states(pool, ws)) == set()
    assert _count(pool, "rebuilds", "true") == 1  # acme: beta and their own held only them

    assert worker.run_until_idle(ms(minutes=32)).events == 3  # u2's, applied again
    after = _states(pool, ws)
    assert set(after) == {"account:acme"}
    assert set(after["account:acme"].users) == {"u2"}  # u8's only event was the victim's
    assert after["account:acme"].users["u2"].traits == u2_before.traits
    assert after["account:acme"].users["u2"].states == u2_before.states
    # nothing fired again, and the policy still knows what u2 was sent
    assert _firings(pool, ws) == [("free-limit", "u2", "send")]
    assert [h[1] for h in after["account:acme"].history] == ["u2"]
    assert _count(pool, "rebuilds", "true") == 0

    with pool.connection() as conn:
        rows = conn.execute("SELECT action, target, detail FROM audit ORDER BY id").fetchall()
    assert [(a, t) for a, t, _ in rows][-2:] == [
        ("subject.forget_requested", subject_hash(ws, VICTIM)),
        ("subject.forgotten", subject_hash(ws, VICTIM)),
    ]
    assert msgspec.json.decode(rows[-1][2])["events"] == 6


def test_a_forgotten_persons_events_are_refused_from_the_next_commit_on(
    pool: store_pg.Pool, url: str
) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    theirs = identify(at(minutes=1), VICTIM)
    first = _ingest(pool, ws, [theirs])
    assert first.stored == 1 and first.forgotten == []
    other = store_pg.connect(url, max_size=1)  # another process's pool forgets them
    try:
        privacy_pg.forget(other, ws, VICTIM, "cli", ms(minutes=2))
    finally:
        other.close()
    again = [
        track("Limit Hit", at(minutes=3), "u2"),
        track("Limit Hit", at(minutes=3), VICTIM),
        message("alias", at(minutes=3), "u3", previousId=VICTIM),
        message("track", at(minutes=3), None, event="Seen", anonymousId=VICTIM),
    ]
    done = _ingest(pool, ws, again)
    assert (done.stored, done.forgotten, done.kept) == (1, [1, 2, 3], [0])
    assert _named(pool, VICTIM) == 0
    # a resend of their first event is refused too, not taken for a duplicate
    resent = _ingest(pool, ws, [theirs])
    assert resent.forgotten == [0] and resent.duplicates == []
    assert REASON.startswith("this person was forgotten")


def test_a_forget_waits_for_a_worker_step_in_flight_and_drops_what_it_committed(
    pool: store_pg.Pool,
) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    inside, go = threading.Event(), threading.Event()

    def compose(*args: Any) -> Any:  # the step holds acme's lock while it composes
        inside.set()
        assert go.wait(10)
        return live.plain_message(*args)

    _ingest(
        pool,
        ws,
        [
            identify(at(minutes=1), "u2", plan="free"),
            group(at(minutes=1), "acme", "u2"),
            identify(at(minutes=2), VICTIM, plan="free"),
            group(at(minutes=2), "acme", VICTIM),
            track("Limit Hit", at(minutes=3), VICTIM, "acme"),
        ],
    )
    slow = Worker(pool, ws, FREE, compose=compose)
    stepping = threading.Thread(target=slow.step, args=(ms(minutes=10),))
    stepping.start()
    assert inside.wait(10)
    forgetting = threading.Thread(
        target=privacy_pg.forget, args=(pool, ws, VICTIM, "cli", ms(minutes=10))
    )
    forgetting.start()
    forgetting.join(1.0)
    assert forgetting.is_alive()  # waiting for acme's lock
    go.set()
    stepping.join(10)
    forgetting.join(10)
    assert not forgetting.is_alive()
    # the step committed the victim's firing and state; the forget, after it, removed both
    assert _firings(pool, ws) == []
    assert "account:acme" not in _states(pool, ws)
    Worker(pool, ws, FREE).run_until_idle(ms(minutes=11))
    [acme] = _states(pool, ws).values()
    assert set(acme.users) == {"u2"}
    assert _firings(pool, ws) == []


def test_the_retention_purge_removes_old_rows_and_keeps_new_ones(
    pool: store_pg.Pool, url: str
) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    old_ms, new_ms = ms(days=1), ms(days=20)
    _ingest(
        pool,
        ws,
        [identify(at(days=1), "u1", plan="free"), track("Limit Hit", at(days=1), "u1")],
        old_ms,
    )
    Worker(pool, ws, FREE).run_until_idle(old_ms)
    _ingest(
        pool,
        ws,
        [identify(at(days=20), "u2", plan="free"), track("Limit Hit", at(days=20), "u2")],
        new_ms,
    )
    Worker(pool, ws, FREE).run_until_idle(new_ms)
    _ingest(pool, ws, [track("Queued", at(days=1), "u3")], old_ms)  # old, not yet applied
    with pool.connection() as conn:
        conn.execute("UPDATE outbox SET status = 'sent'")
        conn.execute(
            "INSERT INTO outcomes SELECT id, workspace, trig, 1, NULL, 'yes', 1 FROM firings"
        )
        for created in (old_ms, new_ms):
            conn.execute(
                "INSERT INTO inbox (workspace, scope, subject, key, trig, kind, title, text,"
                " html, created_ms) VALUES (%s, 'user', 'u1', %s, 't', 'chat', 'Hi', 'hi',"
                " 'hi', %s)",
                (ws, f"k{created}", created),
            )
    holder = store_pg.connect(url, max_size=1)
    try:
        with holder.connection() as conn:  # another process is purging
            conn.execute("SELECT pg_advisory_lock(%s)", (privacy_pg.PURGE_LOCK,))
            assert privacy_pg.purge(pool, ws, ms(days=10), "retention", new_ms) is None
            conn.execute("SELECT pg_advisory_unlock(%s)", (privacy_pg.PURGE_LOCK,))
    finally:
        holder.close()

    counts = privacy_pg.purge(pool, ws, ms(days=10), "retention", new_ms)

    assert counts == {
        "events": 2,
        "outcomes": 1,
        "firings": 1,
        "outbox": 1,
        "inbox": 1,
        "conversation_messages": 0,
    }
    assert _count(pool, "events", "person = 'u1'") == 0
    assert _count(pool, "events", "person = 'u2'") == 2
    assert _count(pool, "events", "person = 'u3'") == 1  # queued: kept until applied
    assert _firings(pool, ws) == [("free-limit", "u2", "send")]
    assert _count(pool, "outbox", "subject = 'u2'") == 1
    assert _count(pool, "inbox", "created_ms = %s", new_ms) == 1
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT actor, detail FROM audit WHERE action = 'retention.purged'"
        ).fetchone()
    assert row is not None and row[0] == "retention"
    assert msgspec.json.decode(row[1])["events"] == 2


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FOREWARN_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "forewarn", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_forget_and_purge_on_the_command_line(pool: store_pg.Pool, url: str) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    assert _ingest(pool, ws, [identify(at(minutes=1), VICTIM)]).stored == 1
    done = _cli(url, "forget", VICTIM)
    assert done.returncode == 0, done.stderr
    answer = msgspec.json.decode(done.stdout)
    assert answer["forgotten"] is True and answer["events"] == 1
    assert answer["hash"] == subject_hash(ws, VICTIM)
    assert "their events are refused from now on" in done.stderr
    # this process learnt the forgotten people before: it reads the change at its next commit
    assert _ingest(pool, ws, [track("Seen", at(minutes=2), VICTIM)]).forgotten == [0]

    purged = _cli(url, "purge", "--retention", "8d")
    assert purged.returncode == 0, purged.stderr
    assert set(msgspec.json.decode(purged.stdout)) >= {"events", "firings", "outbox", "inbox"}
    unknown = _cli(url, "forget", VICTIM, "--workspace", "nope")
    assert unknown.returncode == 2 and "no workspace 'nope' in PostgreSQL" in unknown.stderr
    with pool.connection() as conn:
        actions = [a for (a,) in conn.execute("SELECT action FROM audit ORDER BY id")]
    assert actions[-3:] == ["subject.forget_requested", "subject.forgotten", "retention.purged"]


def test_a_worker_process_purges_when_it_starts(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    _ingest(pool, ws, [identify(at(days=1), "u1")], ms(days=1))
    Worker(pool, ws, FREE).run_until_idle(ms(days=1))
    stop = threading.Event()
    purging = threading.Thread(
        target=scaleout.run_purges,
        args=(pool, ws, 8 * 86_400_000, stop, lambda: ms(days=20)),
    )
    purging.start()
    try:
        for _ in range(100):
            if _count(pool, "audit", "action = 'retention.purged'"):
                break
            stop.wait(0.05)
    finally:
        stop.set()
        purging.join(10)
    assert not purging.is_alive()
    assert _count(pool, "audit", "action = 'retention.purged' AND actor = 'retention'") == 1
    assert _count(pool, "events", "true") == 0


def test_rebuilt_partitions_equal_a_run_without_the_person_and_fire_nothing_again(
    pool: store_pg.Pool,
) -> None:
    """Generated traffic (the conformance suite's) in two workspaces, one without the person's
    events: after the forget, and workers rebuilding a few events per step, the first holds the
    same states as the second, and no firing was recorded by the rebuild."""
    messages = generate(7)
    victim = "u3"
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    without = store_pg.ensure_workspace(pool, "without", T0_MS)
    theirs = [m for m in messages if m.get("userId") == victim]
    assert theirs
    for chunk in range(0, len(messages), 50):  # requests of 50
        part = messages[chunk : chunk + 50]
        _ingest(pool, ws, part)
        _ingest(pool, without, [m for m in part if m.get("userId") != victim])
    Worker(pool, ws, TRIGGERS, events_per_step=60).run_until_idle(UNTIL_MS)
    Worker(pool, without, TRIGGERS).run_until_idle(UNTIL_MS)
    fired = _firings(pool, ws)
    kept = [f for f in fired if f[1] != victim]
    assert len(kept) < len(fired)

    done = privacy_pg.forget(pool, ws, victim, "cli", UNTIL_MS)
    assert done.events == len(theirs)
    Worker(pool, ws, TRIGGERS, events_per_step=7).run_until_idle(UNTIL_MS)

    assert _firings(pool, ws) == kept
    assert _count(pool, "rebuilds", "true") == 0
    rebuilt, reference = _states_of(pool, ws), _states_of(pool, without)
    assert rebuilt == reference


def _states_of(pool: store_pg.Pool, ws: int) -> dict[str, Any]:
    return {
        name: (s.clock_ms, s.users, s.accounts, s.aliases, s.members)
        for name, s in _states(pool, ws).items()
    }


def test_an_append_in_flight_when_a_forget_starts_commits_first_and_is_removed(
    pool: store_pg.Pool,
) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    theirs = [track("Limit Hit", at(minutes=1), VICTIM)]
    append = Append(ws, "segment", T0_MS, theirs, [m["messageId"] for m in theirs])
    with pool.connection() as conn:
        with conn.transaction():  # an API process's commit, its check made: no one forgotten
            known = store_pg._forgotten_in(conn, store_pg._database(conn), [ws])
            forgetting = threading.Thread(
                target=privacy_pg.forget, args=(pool, ws, VICTIM, "cli", ms(minutes=2))
            )
            forgetting.start()
            forgetting.join(1.0)
            assert forgetting.is_alive()  # waiting for the commit in flight
            assert store_pg._append(conn, append, {}, known).stored == 1
        forgetting.join(10)
    assert not forgetting.is_alive()
    assert _named(pool, VICTIM) == 0  # stored before the forget, removed by it
    assert _ingest(pool, ws, [track("Limit Hit", at(minutes=3), VICTIM)]).forgotten == [0]


def test_a_numeric_id_is_found_wherever_it_names_the_person(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    _ingest(
        pool,
        ws,
        [
            message("track", at(minutes=1), None, event="Seen", anonymousId=9071),
            message("track", at(minutes=2), "u5", event="Seen", anonymousId=9071),
            message("track", at(minutes=3), "u5", event="Seen", anonymousId=90712),
        ],
    )
    done = privacy_pg.forget(pool, ws, "9071", "cli", ms(minutes=4))
    assert done.events == 2
    assert _count(pool, "events", "true") == 1  # the one of 90712 stays


def test_forget_removes_their_dead_letters_and_keeps_the_others(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    _ingest(
        pool,
        ws,
        [
            track("Limit Hit", at(minutes=1), VICTIM, "acme"),
            track("Limit Hit", at(minutes=1), "u2", "beta"),
        ],
    )
    with pool.connection() as conn:  # as a worker sets aside what it cannot apply
        conn.execute(
            "INSERT INTO dead_letters (workspace, part, event, error, at_ms)"
            " SELECT workspace, part, id, 'boom', 1 FROM events"
        )
        conn.execute("DELETE FROM queue")
        for part in ("account:acme", "account:beta"):
            conn.execute(
                "INSERT INTO dead_letters (workspace, part, state, error, at_ms)"
                " VALUES (%s, %s, 'x', 'unreadable', 1)",
                (ws, part),
            )
    done = privacy_pg.forget(pool, ws, VICTIM, "cli", ms(minutes=2))
    assert done.to_dict()["dead_letters"] == 2
    assert _count(pool, "dead_letters", "part = 'account:beta'") == 2
    assert _count(pool, "dead_letters", "part = 'account:acme'") == 0
    # beta's set-aside event is not queued again by anything here
    assert _count(pool, "queue", "true") == 0


def test_a_forget_amid_ingest_and_running_workers_leaves_nothing_of_the_person(
    pool: store_pg.Pool,
) -> None:
    """Requests of the person and of others keep coming and two workers keep stepping while
    the person is forgotten: afterwards no row, state or firing of theirs is left."""
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    stop, forgot = threading.Event(), threading.Event()
    refused: list[int] = []

    def send() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            who = [VICTIM, "u2", "u3"][n % 3]
            account = ["acme", "beta"][n % 2]
            done = _ingest(
                pool,
                ws,
                [
                    identify(at(minutes=n), who, plan="free"),
                    track("Limit Hit", at(minutes=n), who, account),
                ],
            )
            if forgot.is_set() and who == VICTIM:
                refused.append(len(done.forgotten))

    workers = [
        threading.Thread(target=scaleout.run_worker, args=(Worker(pool, ws, FREE), stop))
        for _ in range(2)
    ]
    sender = threading.Thread(target=send)
    for thread in (sender, *workers):
        thread.start()
    try:
        for _ in range(100):  # until the workers have fired for them
            if _count(pool, "firings", "subject = %s", VICTIM):
                break
            stop.wait(0.05)
        stop.wait(0.5)
        assert _count(pool, "firings", "subject = %s", VICTIM)
        privacy_pg.forget(pool, ws, VICTIM, "cli", ms(days=1))
        forgot.set()
        stop.wait(1.5)
    finally:
        stop.set()
        for thread in (sender, *workers):
            thread.join(30)
    assert refused and set(refused) == {2}  # every later request of theirs refused whole
    Worker(pool, ws, FREE).run_until_idle(ms(days=1))
    assert _named(pool, VICTIM) == 0
    assert _count(pool, "firings", "subject = %s", VICTIM) == 0
    assert _count(pool, "outbox", "subject = %s", VICTIM) == 0
    states = _states(pool, ws)
    assert all(VICTIM not in s.users for s in states.values())
    assert any("u2" in s.users for s in states.values())
    assert _count(pool, "firings", "subject = 'u2'") >= 1
