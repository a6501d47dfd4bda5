"""The scale-out workers' dead letters, on a real PostgreSQL and through the real command
line: `forewarn dead-letters list|replay|discard` over an event that poisons a worker step
(listed, replayed once the cause is fixed, or discarded, each action in the audit log), a
partition state set aside, ids that name no dead letter, and the embedded mode, which has
none. A partition whose step keeps hitting a real statement timeout is set aside after the
retries, while a connection lost mid-step (PostgreSQL restarting) never is."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from forewarn import cli, dead_letters, store_pg
from forewarn.model import format_time
from forewarn.worker import Worker
from tests import pg
from tests.factories import T0_MS, at, track
from tests.test_worker import LIMIT, _firings, _ingest, _poison, _stored_event


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from pg.database()


@pytest.fixture
def pool(server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[store_pg.Pool]:
    monkeypatch.setenv("FOREWARN_DATABASE_URL", server)
    pool = store_pg.connect(server)
    with pool.connection() as conn:
        conn.execute(
            "TRUNCATE events, queue, parts, homes, firings, outbox, keys, workspaces,"
            " dead_letters, playbook_generations, audit"
        )
    yield pool
    pool.close()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["dead-letters", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _audit(pool: store_pg.Pool) -> list[tuple[str, str, str, dict[str, Any]]]:
    with pool.connection() as conn:
        return [
            (str(actor), str(action), str(target), json.loads(detail))
            for actor, action, target, detail in conn.execute(
                "SELECT actor, action, target, detail FROM audit"
                " WHERE action LIKE 'dead_letter.%%' ORDER BY id"
            )
        ]


def _poisoned(pool: store_pg.Pool) -> tuple[int, int, Worker]:
    """A workspace where one of acme's events poisons the worker step: set aside, with
    the healthy events around it applied. Returns the workspace, the event and the worker."""
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    _ingest(pool, ws, [track("Limit Hit", at(minutes=1), "u1", "acme")])
    bad = _poison(pool, ws, track("Limit Hit", at(minutes=2), "u1", "acme"))
    _ingest(pool, ws, [track("Limit Hit", at(minutes=1), "u2", "beta")])
    worker = Worker(pool, ws, LIMIT)
    assert worker.run_until_idle(T0_MS + 3_600_000).dead == 1
    return ws, bad, worker


def test_a_poison_event_is_listed_and_replayed_once_fixed(
    pool: store_pg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    ws, bad, worker = _poisoned(pool)
    code, out, _ = _cli(capsys, "list", "--format", "jsonl")
    assert code == 0
    (row,) = [json.loads(line) for line in out.splitlines()]
    with pool.connection() as conn:
        (letter,) = dead_letters.listed(conn, ws)
    assert row == {
        "workspace": "default",
        "id": letter.id,
        "kind": "event",
        "partition": "account:acme",
        "event": bad,
        "error": letter.error,
        "at": format_time(letter.at_ms),
    }
    assert row["error"].startswith("TypeError")

    code, out, _ = _cli(capsys, "list", "--workspace", "default")
    head, line = out.splitlines()
    assert head.split() == ["workspace", "id", "kind", "partition", "event", "error", "at"]
    assert line.split()[:5] == ["default", str(letter.id), "event", "account:acme", str(bad)]

    # the cause fixed (here: the stored event repaired), it is queued again and applied
    with pool.connection() as conn:
        good = _stored_event(track("Limit Hit", at(minutes=2), "u1", "acme"))
        conn.execute("UPDATE events SET event = %s WHERE id = %s", (good, bad))
    code, out, err = _cli(capsys, "replay", str(letter.id))
    assert code == 0 and json.loads(out) == {"replayed": 1, "ids": [letter.id]}
    assert "queued again" in err
    with pool.connection() as conn:
        assert store_pg.pending(conn, ws) == 1
    assert worker.run_until_idle(T0_MS + 3_600_000).dead == 0
    fired = sorted((f[1], f[2]) for f in _firings(pool, ws))
    # applied as a late event, at the partition's clock
    assert fired == [("acme", at(minutes=1)), ("acme", at(hours=1)), ("beta", at(minutes=1))]
    code, out, err = _cli(capsys, "list")
    assert (code, out, err.strip()) == (0, "", "no dead letters")
    assert _audit(pool) == [
        ("cli", "dead_letter.replayed", str(letter.id), {"ids": [letter.id], "count": 1})
    ]


def test_a_poison_event_replayed_unfixed_comes_back_and_can_be_discarded(
    pool: store_pg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    ws, bad, worker = _poisoned(pool)
    assert _cli(capsys, "replay", "--all")[0] == 0
    assert worker.run_until_idle(T0_MS + 3_600_000).dead == 1  # the same failure again
    with pool.connection() as conn:
        (letter,) = dead_letters.listed(conn, ws)
    assert letter.event == bad
    code, out, err = _cli(capsys, "discard", "--all", "--workspace", "default")
    assert code == 0 and json.loads(out) == {"discarded": 1, "ids": [letter.id]}
    assert "discarded 1 dead letter(s) in workspace 'default'" in err
    with pool.connection() as conn:
        assert dead_letters.listed(conn, ws) == []
        assert store_pg.pending(conn, ws) == 0
        # the event stays in the log (until it is pruned), only the dead letter is gone
        assert conn.execute("SELECT 1 FROM events WHERE id = %s", (bad,)).fetchone()
    actions = [(a, t, d["count"]) for _, a, t, d in _audit(pool)]
    assert actions == [("dead_letter.replayed", "all", 1), ("dead_letter.discarded", "all", 1)]


def test_ids_that_name_no_dead_letter_are_refused_and_nothing_is_done(
    pool: store_pg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    ws, _, _ = _poisoned(pool)
    with pool.connection() as conn:
        (letter,) = dead_letters.listed(conn, ws)
    code, out, err = _cli(capsys, "replay", str(letter.id), "999999")
    assert code == 2 and out == ""
    assert "no dead letter 999999" in err and "forewarn dead-letters list" in err
    code, _, err = _cli(capsys, "discard", str(letter.id), "--workspace", "nope")
    assert code == 2 and "no workspace 'nope'" in err
    store_pg.ensure_workspace(pool, "other", T0_MS)
    code, _, err = _cli(capsys, "discard", str(letter.id), "--workspace", "other")
    assert code == 2 and f"no dead letter {letter.id} in workspace 'other'" in err
    for argv in (("replay",), ("discard", "--all", str(letter.id)), ("list", "--all")):
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and ("--all" in err), err
    with pool.connection() as conn:
        assert [d.id for d in dead_letters.listed(conn, ws)] == [letter.id]
        assert store_pg.pending(conn, ws) == 0
    assert _audit(pool) == []


def test_a_state_set_aside_is_only_discarded(
    pool: store_pg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    worker = Worker(pool, ws, LIMIT)
    _ingest(pool, ws, [track("Limit Hit", at(minutes=1), "u1", "acme")])
    worker.run_until_idle(0)
    with pool.connection() as conn:
        conn.execute("UPDATE parts SET state = '\\x00ff'::bytea WHERE part = 'account:acme'")
    _ingest(pool, ws, [track("Limit Hit", at(minutes=2), "u1", "acme")])
    _ingest(pool, ws, [track("Limit Hit", at(minutes=2), "u2", "beta")])
    assert worker.run_until_idle(0).dead == 1
    with pool.connection() as conn:
        (letter,) = dead_letters.listed(conn, ws)
    code, out, _ = _cli(capsys, "list", "--format", "jsonl")
    assert json.loads(out)["kind"] == "state" and json.loads(out)["event"] is None
    code, _, err = _cli(capsys, "replay", str(letter.id))
    assert code == 2 and "partition's state" in err and "discard it" in err
    code, out, err = _cli(capsys, "replay", "--all")
    assert code == 0 and json.loads(out)["replayed"] == 0
    assert "1 partition state(s) set aside are not replayed: discard them" in err
    # IDs may follow the options
    assert _cli(capsys, "discard", "--workspace", "default", str(letter.id))[0] == 0
    with pool.connection() as conn:
        assert dead_letters.listed(conn, ws) == []


def test_the_embedded_mode_has_no_dead_letters(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FOREWARN_DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "forewarn", "dead-letters", "list"],
        capture_output=True,
        text=True,
        env={**env, "FOREWARN_DB": str(tmp_path / "forewarn.db")},
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "dead letters exist only in scale-out mode" in done.stderr
    assert "FOREWARN_DATABASE_URL" in done.stderr


# --- timeouts -------------------------------------------------------------------------------


def _locked(server: str, part: str) -> psycopg.Connection[Any]:
    """Another connection holding the lock on a partition's state row (as a long
    transaction of some other program would): a worker saving it waits, until its statement
    timeout."""
    holder = psycopg.connect(server)
    assert holder.execute("SELECT 1 FROM parts WHERE part = %s FOR UPDATE", (part,)).fetchone()
    return holder


def _timeouts(pool: store_pg.Pool) -> list[int]:
    with pool.connection() as conn:
        return [int(n) for (n,) in conn.execute("SELECT timeouts FROM queue ORDER BY id")]


def test_a_partition_that_times_out_alone_is_set_aside_after_the_retries(
    server: str, pool: store_pg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    slow = store_pg.connect(server + "?options=-c%20statement_timeout%3D300")
    try:
        ws = store_pg.ensure_workspace(pool, "default", T0_MS)
        now = T0_MS + 3_600_000
        Worker(slow, ws, LIMIT).run_until_idle(now)
        _ingest(pool, ws, [track("Limit Hit", at(minutes=1), "u1", "acme")])
        assert Worker(slow, ws, LIMIT).run_until_idle(now).events == 1
        _ingest(pool, ws, [track("Limit Hit", at(minutes=2), "u1", "acme")])
        _ingest(pool, ws, [track("Limit Hit", at(minutes=1), "u2", "beta")])
        with _locked(server, "account:acme") as holder:
            worker = Worker(slow, ws, LIMIT, timeout_retries=3)
            first = worker.step(now)
            # the step timed out as a whole; alone, beta went on and acme timed out once more
            assert (first.events, first.dead) == (1, 0)
            assert _timeouts(pool) == [1]
            assert worker.step(now).dead == 0
            assert _timeouts(pool) == [2]
            restarted = Worker(slow, ws, LIMIT, timeout_retries=3)  # the count is kept
            assert restarted.step(now).dead == 1
            with pool.connection() as conn:
                (letter,) = dead_letters.listed(conn, ws)
                assert store_pg.pending(conn, ws) == 0
            assert letter.part == "account:acme" and letter.event is not None
            assert letter.error.startswith(
                "QueryCanceled: canceling statement due to statement timeout"
            )
            assert restarted.step(now).parts == 0  # nothing left to burn the worker's time
            holder.rollback()  # the cause gone, the event is replayed and applied
        assert _cli(capsys, "replay", str(letter.id))[0] == 0
        assert restarted.run_until_idle(now).events == 1
        fired = sorted((f[1], f[2]) for f in _firings(pool, ws))
        assert fired == [("acme", at(minutes=1)), ("acme", at(hours=1)), ("beta", at(minutes=1))]
    finally:
        slow.close()


def test_the_timeout_retries_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from forewarn import settings
    from forewarn.errors import InputError

    monkeypatch.delenv("FOREWARN_PG_TIMEOUT_RETRIES", raising=False)
    assert settings.pg_timeout_retries() == 3
    monkeypatch.setenv("FOREWARN_PG_TIMEOUT_RETRIES", "5")
    assert settings.pg_timeout_retries() == 5
    for bad in ("0", "-1", "three", "2.5"):
        monkeypatch.setenv("FOREWARN_PG_TIMEOUT_RETRIES", bad)
        with pytest.raises(InputError, match=r"FOREWARN_PG_TIMEOUT_RETRIES=.*1 or more"):
            settings.pg_timeout_retries()


def test_a_database_connection_lost_mid_step_is_retried_and_never_set_aside(
    server: str, pool: store_pg.Pool
) -> None:
    """A worker's connection ended under it (as a restart or failover of PostgreSQL does)
    fails its step every time: the step is retried, nothing is counted or set aside."""
    ws = store_pg.ensure_workspace(pool, "default", T0_MS)
    worker = Worker(pool, ws, LIMIT, timeout_retries=1)
    _ingest(pool, ws, [track("Limit Hit", at(minutes=1), "u1", "acme")])
    worker.run_until_idle(T0_MS)
    _ingest(pool, ws, [track("Limit Hit", at(minutes=2), "u1", "acme")])
    with (
        _locked(server, "account:acme") as holder,
        psycopg.connect(server, autocommit=True) as admin,
        concurrent.futures.ThreadPoolExecutor(1) as one,
    ):
        for _ in range(3):
            stepping = one.submit(worker.step, T0_MS)
            _terminate_waiting(admin)
            with pytest.raises(psycopg.OperationalError) as failed:
                stepping.result(timeout=30)
            assert dead_letters.transient(failed.value)
            assert not dead_letters.timed_out(failed.value)
        assert _timeouts(pool) == [0]
        with pool.connection() as conn:
            assert dead_letters.listed(conn, ws) == []
        holder.rollback()
    assert worker.run_until_idle(T0_MS).events == 1


def _terminate_waiting(admin: psycopg.Connection[Any]) -> None:
    """End the connection of the backend waiting for a lock (the worker's)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        row = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database()"
        ).fetchone()
        if row:
            admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))
            return
        time.sleep(0.02)
    raise AssertionError("no worker waited for the lock")
