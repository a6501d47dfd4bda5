"""The scale-out workers' dead letters, on a real PostgreSQL and through the real command
line: `forewarn dead-letters list|replay|discard` over an event that poisons a worker step
(listed, replayed once the cause is fixed, or discarded, each action in the audit log), a
partition state set aside, ids that name no dead letter, and the embedded mode, which has
none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

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
