"""Reports, backtests and the auto-guard in the scale-out mode, on a real PostgreSQL: the same
events give the same report and backtest through a scale-out API process (with a worker) as
through an embedded server; the new routes refuse write keys and never show another
workspace; the guard, run by the worker processes, stops a harmful trigger once, and the
workers then stop sending for it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from forewarn import (
    clock,
    decide,
    guard_pg,
    outreach_pg,
    report_pg,
    scaleout,
    settings,
    store_outbox,
    store_pg,
)
from forewarn.schema import placeholders
from forewarn.sources import load_playbooks
from forewarn.store_sqlite import Append
from forewarn.worker import Worker
from tests import server as srv
from tests.factories import DAY
from tests.server import ADMIN_KEY, WRITE_KEY
from tests.test_api_pg import _playbooks, api_process
from tests.test_scaleout import _env, _serve, _stop

PLAYBOOK = """
triggers:
  - id: export-trouble
    when: {event: {name: Export Failed}}
    action: {channel: in_app, message: "Exports failing?"}
    holdout: 0.5
    goal: {event: Export Done, within: 1d}
    failure: {event: Ticket Created, within: 3d}
  - id: storage-85
    scope: account
    when: {threshold: {value: "traits.storage_used / traits.storage_limit", ">=": 0.85}}
    action: {channel: in_app, message: Storage is nearly full}
"""

GUARDED = """
triggers:
  - id: harmful
    when: {event: {name: Harmful Moment}}
    action: {channel: email, message: hi}
    holdout: 0.5
    failure: {event: Ticket Created, within: 3d}
    guard: {action: pause}
  - id: helpful
    when: {event: {name: Helpful Moment}}
    action: {channel: email, message: hi}
    holdout: 0.5
    failure: {event: Ticket Created, within: 3d}
"""


def stamp(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def msg(kind: str, user: str, at_ms: int, **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "userId": user,
        "timestamp": stamp(at_ms),
        "messageId": str(uuid.uuid4()),
        **fields,
    }


@dataclass
class ScaleOut:
    client: httpx.Client
    pool: store_pg.Pool
    worker: Worker
    workspace: int

    def send(self, messages: list[dict[str, Any]], key: str = WRITE_KEY) -> None:
        r = self.client.post("/v1/batch", json={"batch": messages}, auth=(key, ""))
        assert r.status_code == 200 and r.json()["accepted"] == len(messages), r.text
        self.worker.run_until_idle(clock.now_ms())

    def call(self, method: str, path: str, key: str = ADMIN_KEY, **kw: Any) -> httpx.Response:
        return self.client.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kw)


@pytest.fixture
def scale_out(url: str, tmp_path: Path) -> Iterator[ScaleOut]:
    playbooks = _playbooks(tmp_path / "playbooks", PLAYBOOK)
    triggers = load_playbooks(playbooks)
    keep = scaleout.kept_traits(playbooks, triggers)
    with api_process(url, playbooks) as client:
        pool = store_pg.connect(url)
        try:
            with pool.connection() as conn:
                ws = store_pg.workspace_id(conn, "default")
            assert ws is not None
            worker = Worker(pool, ws, triggers, settings.policy(), keep=keep)
            yield ScaleOut(client, pool, worker, ws)
        finally:
            pool.close()


def moments(users: int) -> list[dict[str, Any]]:
    """Each user joins acme (nearly out of storage) and fails an export, now."""
    now = clock.now_ms()
    out = [
        msg(
            "group",
            "u0",
            now - 2000,
            groupId="acme",
            traits={"storage_used": 90, "storage_limit": 100},
        )
    ]
    for i in range(users):
        out.append(
            msg("track", f"u{i}", now - 1000, event="Export Failed", context={"groupId": "acme"})
        )
    return out


def outcomes(users: int) -> list[dict[str, Any]]:
    """After the firings: tickets from every third user, exports done by every fourth, and an
    engagement with the message (which names its trigger)."""
    now = clock.now_ms()
    out = []
    for i in range(users):
        if i % 3 == 0:
            out.append(msg("track", f"u{i}", now, event="Ticket Created"))
        if i % 4 == 0:
            out.append(msg("track", f"u{i}", now, event="Export Done"))
    out.append(
        msg("track", "u1", now, event="Message Dismissed", properties={"trigger": "export-trouble"})
    )
    return out


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    """A report without its period's ends (each server's own `now`)."""
    return {k: v for k, v in report.items() if k not in ("since", "until")}


def _finished(get: Any, job: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        answer: dict[str, Any] = get(f"/api/v1/backtests/{job}")
        if answer["status"] != "running" or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def _cli(command: list[str], env: dict[str, str]) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "forewarn", *command], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_same_events_report_and_backtest_the_same_as_on_an_embedded_server(
    scale_out: ScaleOut, url: str, tmp_path: Path
) -> None:
    users = 24
    playbooks = str(tmp_path / "playbooks")
    embedded = srv.start(
        tmp_path / "forewarn.db",
        env={"FOREWARN_DELIVERY": "off"},
        playbooks=tmp_path / "playbooks",
    )
    try:
        first = moments(users)
        r = httpx.post(
            embedded.url + "/v1/batch", json={"batch": first}, auth=(WRITE_KEY, ""), timeout=10
        )
        assert r.status_code == 200, r.text
        scale_out.send(first)
        assert embedded.wait_for(lambda: len(embedded.firings()) == users + 1)
        then = outcomes(users)  # stamped after every firing, in both modes
        r = httpx.post(
            embedded.url + "/v1/batch", json={"batch": then}, auth=(WRITE_KEY, ""), timeout=10
        )
        assert r.status_code == 200, r.text
        scale_out.send(then)
        total = len(first) + len(then)
        assert embedded.wait_for(lambda: embedded.metric("forewarn_engine_events_total") >= total)

        for params in ({}, {"trigger": "export-trouble"}, {"since": "1h"}):
            want = embedded.admin("/api/v1/reports", **params)
            got = scale_out.call("GET", "/api/v1/reports", params=params)
            assert got.status_code == 200, got.text
            assert _comparable(got.json()) == _comparable(want), params
        report = embedded.admin("/api/v1/reports")
        assert report["events"] == total
        row = {r["trigger"]: r for r in report["triggers"]}["export-trouble"]
        treated, held = row["treated"], row["held_out"]
        assert treated["n"] + held["n"] == users and treated["n"] and held["n"]
        assert treated["failures"] + held["failures"] == users // 3
        assert treated["goals"] + held["goals"] == users // 4
        assert row["failure_lift"] is not None and "prevented" in row["failure_lift"]

        # the commands read the same store as the processes
        pg_env = {**_env(url), "FOREWARN_DB": ""}
        sqlite_env = {**os.environ, "FOREWARN_DB": str(embedded.db), "FOREWARN_DATABASE_URL": ""}
        command = ["report", "--playbooks", playbooks, "--format", "json"]
        want_cli, got_cli = _cli(command, sqlite_env), _cli(command, pg_env)
        assert _comparable(got_cli) == _comparable(want_cli) == _comparable(report)
        command = ["backtest", "--playbooks", playbooks, "--since", "1h", "--format", "json"]
        want_cli, got_cli = _cli(command, sqlite_env), _cli(command, pg_env)
        assert got_cli == want_cli and got_cli["events"] == total

        body = {"since": "1h", "triggers": ["export-trouble"]}
        want_job = embedded.admin_post("/api/v1/backtests", body)
        got_job = scale_out.call("POST", "/api/v1/backtests", json=body)
        assert got_job.status_code == 200, got_job.text
        assert {k: v for k, v in got_job.json().items() if k != "id"} == {
            k: v for k, v in want_job.items() if k != "id"
        }
        want_done = _finished(embedded.admin, want_job["id"])
        got_done = _finished(lambda p: scale_out.call("GET", p).json(), got_job.json()["id"])
        assert got_done["status"] == want_done["status"] == "done", (got_done, want_done)
        assert got_done["result"] == want_done["result"]
        assert got_done["result"]["events"] == total
        [backtested] = got_done["result"]["triggers"]
        assert backtested["firings"] == users  # the replay fires for each user again
    finally:
        srv.stop(embedded)


def test_reports_and_backtests_refuse_write_keys_and_other_workspaces(
    scale_out: ScaleOut,
) -> None:
    scale_out.send(moments(4))
    b_write, b_admin = "fw_wk_beta-write-key-0123456789", "fw_ak_beta-admin-key-0123456789"
    beta = store_pg.ensure_workspace(scale_out.pool, "beta", clock.now_ms(), b_write, b_admin)
    b_worker = Worker(scale_out.pool, beta, scale_out.worker.triggers)
    r = scale_out.client.post("/v1/batch", json={"batch": moments(2)}, auth=(b_write, ""))
    assert r.status_code == 200, r.text
    b_worker.run_until_idle(clock.now_ms())

    for method, path in (
        ("GET", "/api/v1/reports"),
        ("POST", "/api/v1/backtests"),
        ("GET", "/api/v1/backtests/1"),
    ):
        for key in (WRITE_KEY, b_write):
            refused = scale_out.call(method, path, key)
            assert refused.status_code == 403, (method, path, refused.text)
            assert refused.json()["error"]["code"] == "forbidden"
        nobody = scale_out.call(method, path, "fw_ak_no-such-key-0123456789")
        assert nobody.status_code == 401, (method, path, nobody.text)

    def firings(key: str) -> dict[str, int]:
        rows = scale_out.call("GET", "/api/v1/reports", key).json()["triggers"]
        return {r["trigger"]: r["firings"] for r in rows}

    assert firings(ADMIN_KEY) == {"export-trouble": 4, "storage-85": 1}
    assert firings(b_admin) == {"export-trouble": 2, "storage-85": 1}

    job = scale_out.call("POST", "/api/v1/backtests", b_admin, json={"since": "1h"}).json()["id"]
    mine = scale_out.call("GET", f"/api/v1/backtests/{job}")
    assert mine.status_code == 404 and mine.json()["error"]["message"] == f"no backtest {job}"
    theirs = _finished(lambda p: scale_out.call("GET", p, b_admin).json(), job)
    assert theirs["status"] == "done" and theirs["result"]["events"] == 3  # beta's only

    unknown = scale_out.call("GET", "/api/v1/reports", params={"trigger": "nope"})
    assert unknown.status_code == 404 and "no such trigger" in unknown.text
    bad = scale_out.call("POST", "/api/v1/backtests", json={"triggers": ["nope"]})
    assert bad.status_code == 404 and "the loaded triggers are" in bad.text
    period = scale_out.call("GET", "/api/v1/reports", params={"since": "soon"})
    assert period.status_code == 400 and period.json()["error"]["message"].startswith("since:")


# --- the auto-guard -------------------------------------------------------------------------


def _population(pool: store_pg.Pool, workspace: int, worker: Worker, now: int) -> None:
    """600 firings of the two triggers over the last 25 days, and tickets that follow their
    decisions: the harmful trigger's messages raise them, the helpful one's lower them."""
    rng = random.Random(4)
    start = now - 25 * DAY
    first = [
        msg(
            "track",
            f"u{i}",
            start + (i // 40) * DAY + (i % 24) * 3_600_000,
            event="Harmful Moment" if i % 2 else "Helpful Moment",
        )
        for i in range(600)
    ]
    _append(pool, workspace, now, first)
    worker.run_until_idle(now)
    rates = {
        ("harmful", "send"): 0.35,
        ("harmful", "held_out"): 0.15,
        ("helpful", "send"): 0.10,
        ("helpful", "held_out"): 0.20,
    }
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT trig, subject, at_ms, decision FROM firings WHERE workspace = %s", (workspace,)
        ).fetchall()
    assert len(rows) == 600 and {r[3] for r in rows} == {"send", "held_out"}
    tickets = [
        msg("track", subject, at + DAY, event="Ticket Created")
        for trig, subject, at, decision in rows
        if rng.random() < rates[(trig, decision)]
    ]
    _append(pool, workspace, now, tickets)
    worker.run_until_idle(now)


def _append(pool: store_pg.Pool, workspace: int, now: int, messages: list[dict[str, Any]]) -> None:
    ids = [str(m["messageId"]) for m in messages]
    store_pg.append_batches(pool, [Append(workspace, "test", now, messages, ids)])


def _guarded(pool: store_pg.Pool, playbooks: str) -> tuple[int, Worker]:
    triggers = load_playbooks(playbooks)
    ws = store_pg.ensure_workspace(pool, "default", clock.now_ms(), WRITE_KEY, ADMIN_KEY)
    policy = decide.Policy(caps=(), quiet_start_min=0, quiet_end_min=0, priority_window_ms=0)
    return ws, Worker(pool, ws, triggers, policy)


def _late_moment(pool: store_pg.Pool, workspace: int, now: int) -> None:
    _append(pool, workspace, now, [msg("track", "late-user", now, event="Harmful Moment")])


def test_the_guard_pauses_the_harmful_trigger_and_the_workers_stop_sending_for_it(
    pool: store_pg.Pool, tmp_path: Path
) -> None:
    ws, worker = _guarded(pool, _playbooks(tmp_path / "playbooks", GUARDED))
    now = clock.now_ms()
    _population(pool, ws, worker, now)
    with pool.connection() as conn:
        # with events kept 7 days, it judges only the firings of the last 7 days (none here):
        # the tickets of older ones may have been pruned
        assert guard_pg.run(conn, ws, worker.triggers, now, keep_events_ms=7 * DAY) == []
        assert outreach_pg.trigger_overrides(conn, ws) == {}
        stopped = guard_pg.run(conn, ws, worker.triggers, now)
        assert [(s.trigger, s.mode) for s in stopped] == [("harmful", "paused")]
        assert "raises failures" in stopped[0].reason
        overrides = outreach_pg.trigger_overrides(conn, ws)
        assert set(overrides) == {"harmful"}
        assert (overrides["harmful"]["mode"], overrides["harmful"]["by"]) == (
            "paused",
            "auto-guard",
        )
        audit = conn.execute(
            "SELECT actor, action, target FROM audit WHERE workspace = %s AND actor = 'auto-guard'",
            (ws,),
        ).fetchall()
        assert audit == [("auto-guard", "trigger.paused", "harmful")]
        (team,) = conn.execute(
            "SELECT channel, status, message FROM outbox WHERE trig = 'harmful' AND firing = 0"
        ).fetchall()
        assert team[:2] == ("webhook", "pending") and b"raises failures" in bytes(team[2])
        closed = conn.execute("SELECT count(*) FROM outcomes WHERE workspace = %s", (ws,))
        assert closed.fetchone() == (600,)  # every window had closed: each outcome recorded
        sending = conn.execute(
            "SELECT count(*) FROM outbox WHERE trig = 'harmful' AND firing <> 0"
        ).fetchone()
        # the next firing of the paused trigger is recorded, not sent
        _late_moment(pool, ws, now + 1000)
        worker.run_until_idle(now + 1000)
        late = conn.execute(
            "SELECT decision, reason FROM firings WHERE subject = 'late-user'"
        ).fetchall()
        assert late == [("suppressed", "paused")]
        after = conn.execute(
            "SELECT count(*) FROM outbox WHERE trig = 'harmful' AND firing <> 0"
        ).fetchone()
        assert after == sending
        assert guard_pg.run(conn, ws, worker.triggers, now) == []  # a person resumes it
        # the report the admin API serves counts what the guard saw
        report = report_pg.live_report(conn, ws, worker.triggers, now - 30 * DAY, now)
        harmful = {r["trigger"]: r for r in report["triggers"]}["harmful"]
        assert harmful["failure_lift"]["verdict"] != "no effect"


def test_one_worker_process_runs_the_guard_on_its_own(
    pool: store_pg.Pool, url: str, tmp_path: Path
) -> None:
    playbooks = _playbooks(tmp_path / "playbooks", GUARDED)
    ws, worker = _guarded(pool, playbooks)
    now = clock.now_ms()
    _population(pool, ws, worker, now)
    env = {**_env(url), "FOREWARN_GUARD_EVERY": "1s", "FOREWARN_PG_KEEP_EVENTS": "30d"}
    workers = [_serve("worker", env, Path(playbooks)) for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        with pool.connection() as conn:
            while "harmful" not in outreach_pg.trigger_overrides(conn, ws):
                assert all(w.poll() is None for w in workers), "a worker process stopped"
                assert time.monotonic() < deadline, "the guard never ran"
                time.sleep(0.2)
            time.sleep(3)  # more looks, by both processes: it was run once, and only once
            stops = conn.execute(
                "SELECT count(*) FROM audit WHERE actor = 'auto-guard' AND workspace = %s", (ws,)
            ).fetchone()
            team = conn.execute("SELECT count(*) FROM outbox WHERE firing = 0").fetchone()
            assert stops == (1,) and team == (1,)
            # the worker processes decide the paused trigger's next firing: recorded, not sent
            _late_moment(pool, ws, clock.now_ms())
            while not conn.execute("SELECT 1 FROM firings WHERE subject = 'late-user'").fetchone():
                assert time.monotonic() < deadline + 30, "the workers never applied it"
                time.sleep(0.2)
            late = conn.execute(
                "SELECT f.decision, f.reason, o.id FROM firings f"
                " LEFT JOIN outbox o ON o.firing = f.id WHERE f.subject = 'late-user'"
            ).fetchall()
            assert late == [("suppressed", "paused", None)]
    finally:
        _stop(workers)


def test_an_unsubscribe_counts_against_the_trigger_whose_message_came_last(
    pool: store_pg.Pool,
) -> None:
    ws = store_pg.ensure_workspace(pool, "default", 0, WRITE_KEY, ADMIN_KEY)
    message = store_outbox.Message(to="a@x.test")
    enqueue = placeholders(store_outbox.ENQUEUE)
    with pool.connection() as conn:
        for i, (trig, done) in enumerate((("harmful", 100), ("helpful", 200))):
            row = (ws, i + 1, f"k{i}", "email", trig, "user", "u1", message, 0, 0)
            conn.execute(enqueue, store_outbox.enqueue_args(*row))
            conn.execute(
                "UPDATE outbox SET status = 'sent', done_ms = %s WHERE key = %s", (done, f"k{i}")
            )
        outreach_pg.unsubscribe(conn, ws, "user", "u1", "email", "link", 300)
        assert guard_pg.STORE.unsubscribed(conn, ws, "helpful", 0) == 1
        assert guard_pg.STORE.unsubscribed(conn, ws, "harmful", 0) == 0
        assert guard_pg.STORE.unsubscribed(conn, ws, "helpful", 301) == 0  # before the period


def test_one_process_at_a_time_finds_the_guard_due_once_per_interval(pool: store_pg.Pool) -> None:
    ws = store_pg.ensure_workspace(pool, "default", 0, WRITE_KEY, ADMIN_KEY)
    every = 3_600_000
    with pool.connection() as a, pool.connection() as b:
        assert not guard_pg.due(a, ws, 1_000, every)  # the first look starts the clock
        assert not guard_pg.due(b, ws, 1_000 + every - 1, every)
        # due an interval later: to the first process that looks, and then to no other
        assert guard_pg.due(b, ws, 1_000 + every, every)
        assert not guard_pg.due(a, ws, 1_000 + every, every)
        assert not guard_pg.due(a, ws, 1_000 + 2 * every - 1, every)
        # while a process holds the lock (its look not yet committed), the others find it busy
        with a.transaction():
            key = store_pg.lock_key(ws, guard_pg.GUARD)
            a.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            assert not guard_pg.due(b, ws, 1_000 + 3 * every, every)
        assert guard_pg.due(b, ws, 1_000 + 3 * every, every)
        # each workspace has its own clock
        other = store_pg.ensure_workspace(pool, "other", 0)
        assert not guard_pg.due(a, other, 1_000 + 3 * every, every)
