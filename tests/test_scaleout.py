"""Scale-out on this machine: PostgreSQL on localhost, 2 API, 3 worker and 1 delivery
processes of `forewarn serve`, fed by the real Segment client; the firings and decisions equal
those of a single-process replay of the same events, and the in-app messages reach the inbox. And a worker killed with SIGKILL in the middle of its
work loses and repeats nothing; an API process serves /metrics and describes only its routes;
a rolling restart with new playbooks stops the old workers instead of letting them reset the
new ones' partitions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from forewarn import store_pg
from forewarn.model import event_from_dict, order_key, parse_time_ms
from tests.server import ADMIN_KEY, WRITE_KEY, free_port
from tests.test_conformance import PLAYBOOK, generate, reference


def _env(url: str) -> dict[str, str]:
    return {
        **os.environ,
        "FOREWARN_DATABASE_URL": url,
        "FOREWARN_WRITE_KEY": WRITE_KEY,
        "FOREWARN_ADMIN_KEY": ADMIN_KEY,
        "FOREWARN_LOG_LEVEL": "warning",
    }


def _serve(
    role: str, env: dict[str, str], playbooks: Path, port: int = 0
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "forewarn",
        "serve",
        "--role",
        role,
        "--playbooks",
        str(playbooks),
    ]
    if port:
        command += ["--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _healthy(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            err = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"the API process did not start:\n{err}")
        time.sleep(0.1)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stderr is not None:
            p.stderr.close()


def _send(client: Any, m: dict[str, Any]) -> None:
    """One generated message through the Segment client, stamped now (events as they happen)."""
    now = datetime.now(UTC)
    m["timestamp"] = now.isoformat().replace("+00:00", "Z")
    common = {"timestamp": now, "message_id": m["messageId"]}
    if m["type"] == "identify":
        client.identify(m["userId"], m["traits"], **common)
    elif m["type"] == "group":
        client.group(m["userId"], m["groupId"], m["traits"], **common)
    else:
        client.track(
            m["userId"], m["event"], m["properties"], context=m.get("context") or {}, **common
        )


def _clients_by_customer(messages: list[dict[str, Any]], clients: list[Any]) -> list[Any]:
    """The client each message goes through: one per account (its users' calls included) or
    lone user, as each customer's backend sends its own events in order."""
    homes: dict[str, str] = {}
    for m in messages:
        account = m.get("groupId") or (m.get("context") or {}).get("groupId")
        if account:
            homes.setdefault(m["userId"], account)
    return [
        clients[sum(map(ord, homes.get(m["userId"], m["userId"]))) % len(clients)] for m in messages
    ]


def _decisions(rows: list[Any]) -> Counter[tuple[Any, ...]]:
    return Counter((r[0], r[1], r[3], r[4]) for r in rows)


def _wait_applied(url: str, sent: int, timeout_s: float = 60) -> None:
    pool = store_pg.connect(url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with pool.connection() as conn:
                ws = store_pg.workspace_id(conn, "default")
                if (
                    ws is not None
                    and store_pg.count_events(conn, ws) >= sent
                    and not store_pg.pending(conn, ws)
                ):
                    return
            time.sleep(0.2)
        raise AssertionError("the workers did not apply every event in time")
    finally:
        pool.close()


def _wait_delivered(url: str, timeout_s: float = 30) -> int:
    """The in-app messages in the inbox once the delivery process has sent every one due."""
    pool = store_pg.connect(url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with pool.connection() as conn:
                left = conn.execute(
                    "SELECT count(*) FROM outbox WHERE channel = 'in_app' AND status = 'pending'"
                ).fetchone()
                inbox = conn.execute("SELECT count(*) FROM inbox").fetchone()
            if (left is not None and left[0] == 0) or time.monotonic() > deadline:
                return int(inbox[0]) if inbox else 0
            time.sleep(0.2)
    finally:
        pool.close()


def _stored(url: str) -> tuple[Counter[tuple[Any, ...]], list[dict[str, Any]]]:
    """The decisions the workers recorded, and the messages the API processes accepted (their
    timestamps corrected for the client's clock, as the engine saw them), in time order. (The
    delivery results in the log too concern no trigger of the playbook.)"""
    pool = store_pg.connect(url)
    try:
        with pool.connection() as conn:
            ws = store_pg.workspace_id(conn, "default")
            assert ws is not None
            rows = store_pg.query_firings(conn, ws, limit=100_000)
            accepted = [
                json.loads(m)
                for (m,) in conn.execute(
                    "SELECT message FROM events WHERE source = 'segment' ORDER BY id"
                )
            ]
    finally:
        pool.close()
    accepted.sort(key=lambda m: order_key(event_from_dict(m)))
    return Counter((r[0], r[1], r[5], r[6]) for r in rows), accepted


def test_two_api_and_three_worker_processes_fire_as_one_replay(url: str, tmp_path: Path) -> None:
    from segment.analytics.client import Client  # type: ignore[import-untyped]

    playbooks = tmp_path / "playbooks"
    playbooks.mkdir()
    (playbooks / "p.yaml").write_text(PLAYBOOK)
    env = _env(url)
    subprocess.run(
        [sys.executable, "-m", "forewarn", "migrate"], env=env, check=True, capture_output=True
    )
    ports = [free_port(), free_port()]
    processes = [_serve("api", env, playbooks, port) for port in ports]
    processes += [_serve("worker", env, playbooks) for _ in range(3)]
    processes.append(_serve("delivery", env, playbooks))
    try:
        for port, process in zip(ports, processes, strict=False):
            _healthy(port, process)
        # each account's (and lone user's) events go through one client, as one customer's
        # backend would send them: in order
        clients = [
            Client(
                WRITE_KEY,
                host=f"http://127.0.0.1:{p}",
                gzip=True,
                upload_interval=0.05,
                max_retries=3,
            )
            for p in ports
        ]
        messages = generate(11, n=300)
        for m, client in zip(messages, _clients_by_customer(messages, clients), strict=True):
            _send(client, m)
            time.sleep(0.01)  # events as they happen: further apart than the network's jitter
        for c in clients:
            c.flush()
            c.join()
        _wait_applied(url, len(messages))
        found, accepted = _stored(url)
        delivered = _wait_delivered(url)
    finally:
        _stop(processes)
    assert len(accepted) == len(messages)
    until = max(parse_time_ms(m["timestamp"]) for m in accepted)
    expected = Counter((r[0], r[1], r[3], r[4]) for r in reference(accepted, until))
    assert sum(expected.values()) > 20 and len({k[0] for k in expected}) >= 3
    assert found == expected
    in_app = sum(
        n
        for (trig, _, decision, _), n in expected.items()
        if trig == "export-stuck" and decision == "send"
    )
    assert in_app and delivered == in_app  # each in-app message sent decided, in the inbox


_KILLED_WORKER = """
import sys
from forewarn import store_pg
from forewarn.worker import Worker
from tests.test_conformance import TRIGGERS
pool = store_pg.connect(sys.argv[1])
worker = Worker(pool, int(sys.argv[2]), TRIGGERS, parts_per_step=2, events_per_step=40)
while True:
    worker.step(0)
"""


def test_a_worker_killed_mid_batch_loses_and_repeats_nothing(url: str) -> None:
    from forewarn.store_sqlite import Append
    from forewarn.worker import Worker
    from tests.test_conformance import TRIGGERS, UNTIL_MS, _stored, generate

    messages = generate(5, n=1200)
    pool = store_pg.connect(url)
    try:
        ws = store_pg.ensure_workspace(pool, "default", 0)
        for i in range(0, len(messages), 100):
            chunk = messages[i : i + 100]
            store_pg.append_batches(
                pool,
                [
                    Append(
                        ws,
                        "segment",
                        UNTIL_MS,
                        chunk,
                        [m["messageId"] for m in chunk],
                        [event_from_dict(m) for m in chunk],
                    )
                ],
            )
        with pool.connection() as conn:
            queued = store_pg.pending(conn, ws)
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _KILLED_WORKER,
                url + "?application_name=forewarn-doomed",
                str(ws),
            ],
            cwd=Path(__file__).resolve().parent.parent,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while True:  # kill it once it has committed work and is inside a transaction
                with pool.connection() as conn:
                    left = store_pg.pending(conn, ws)
                    inside = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'forewarn-doomed'"
                        " AND xact_start IS NOT NULL AND state <> 'idle'"
                    ).fetchone()
                if left < queued and inside and inside[0]:
                    child.send_signal(signal.SIGKILL)
                    break
                assert child.poll() is None and time.monotonic() < deadline, (
                    "the worker did not get going"
                )
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            if child.stderr is not None:
                child.stderr.close()
        assert 0 < left < queued
        team = [Worker(pool, ws, TRIGGERS, parts_per_step=4, events_per_step=100) for _ in range(2)]
        deadline = time.monotonic() + 60
        while True:  # (the killed worker's locks go when PostgreSQL sees it gone)
            for w in team:
                w.step(0)
            with pool.connection() as conn:
                if not store_pg.pending(conn, ws):
                    break
            assert time.monotonic() < deadline
        while sum(w.step(UNTIL_MS).parts for w in team):
            pass
        with pool.connection() as conn:
            found = _stored(store_pg.query_firings(conn, ws, limit=100_000))
    finally:
        pool.close()
    assert len(found) > 20 and found == reference(messages)


def test_an_api_process_lists_what_it_serves_and_counts_dead_letters(
    url: str, tmp_path: Path
) -> None:
    from forewarn.worker import Worker
    from tests.factories import track
    from tests.test_worker import LIMIT, _poison

    playbooks = tmp_path / "playbooks"
    playbooks.mkdir()
    (playbooks / "p.yaml").write_text(PLAYBOOK)
    pool = store_pg.connect(url)
    port = free_port()
    api = _serve("api", _env(url), playbooks, port)
    try:
        _healthy(port, api)
        with pool.connection() as conn:
            ws = store_pg.workspace_id(conn, "default")
        assert ws is not None
        base = f"http://127.0.0.1:{port}"
        before = httpx.get(base + "/metrics").text
        _poison(pool, ws, track("Limit Hit", "2026-01-05T00:00:00Z", "u1", "acme"))
        Worker(pool, ws, LIMIT).run_until_idle(0)
        sent = httpx.post(
            base + "/v1/track", json=track("Login", "2026-01-05T00:01:00Z"), auth=(WRITE_KEY, "")
        )
        assert sent.status_code == 200, sent.text
        metrics = httpx.get(base + "/metrics").text
        document = httpx.get(base + "/openapi.json").json()
    finally:
        _stop([api])
        pool.close()
    assert f'forewarn_dead_letters{{workspace="{ws}"}} 0' in before  # (a series to alert on)
    assert f'forewarn_dead_letters{{workspace="{ws}"}} 1' in metrics
    assert f'forewarn_queue_events{{workspace="{ws}"}} 1' in metrics
    assert "forewarn_events_accepted_total 1" in metrics
    paths = set(document["paths"])
    assert {"/v1/batch", "/api/v1/firings", "/healthz", "/metrics", "/openapi.json"} <= paths
    assert {"/api/v1/triggers", "/api/v1/subjects/{subject}"} <= paths  # the admin reads
    assert "/w/v1/inbox" in paths and "/" not in paths  # the widget; the dashboard: embedded only
    assert set(document["paths"]["/api/v1/firings"]) == {"get"}


_LIMIT_YAML = """
triggers:
  - id: limit-hit
    scope: account
    when: {event: {name: Limit Hit}}
    action: {channel: in_app, message: MESSAGE}
"""


def test_a_rolling_restart_with_new_playbooks_stops_the_old_workers(
    url: str, tmp_path: Path
) -> None:
    from forewarn import live
    from forewarn.sources import load_playbooks
    from tests.factories import at, track

    folders = {}
    for name, text in (("old", "You hit a limit"), ("new", "You hit a limit (v2)")):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "p.yaml").write_text(_LIMIT_YAML.replace("MESSAGE", text))
    env = {**_env(url), "FOREWARN_LOG_LEVEL": "info"}
    subprocess.run(
        [sys.executable, "-m", "forewarn", "migrate"], env=env, check=True, capture_output=True
    )
    port = free_port()
    processes = [_serve("api", env, folders["old"], port), _serve("worker", env, folders["old"])]
    sent = 0

    def send(minute: int) -> None:
        nonlocal sent
        batch = [track("Limit Hit", at(minutes=minute), f"u{i}", f"a{i}") for i in range(5)]
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/batch", json={"batch": batch}, auth=(WRITE_KEY, "")
        )
        assert answer.status_code == 200, answer.text
        sent += len(batch)

    try:
        _healthy(port, processes[0])
        send(1)
        _wait_applied(url, sent)
        processes.append(_serve("worker", env, folders["new"]))  # the rollout begins
        pool = store_pg.connect(url)
        try:
            deadline = time.monotonic() + 30
            while True:
                with pool.connection() as conn:
                    rows = conn.execute("SELECT count(*) FROM playbook_generations").fetchone()
                if rows and rows[0] == 2:
                    break
                assert time.monotonic() < deadline, "the new worker did not start"
                time.sleep(0.1)
            for minute in range(2, 6):  # the same accounts again: all go to the new worker
                send(minute)
            _wait_applied(url, sent)
            restarted = _serve("worker", env, folders["old"])  # an old one restarted meanwhile
            processes.append(restarted)
            said = _wait_for_line(restarted, "claims nothing until")
            send(6)
            _wait_applied(url, sent)
            with pool.connection() as conn:
                kept = {str(b) for (b,) in conn.execute("SELECT DISTINCT playbooks FROM parts")}
        finally:
            pool.close()
        for p in processes[1:3]:
            p.terminate()
        logs = [p.communicate(timeout=15)[1].decode() for p in processes[1:3]]
    finally:
        _stop(processes)
    new = live.fingerprint(load_playbooks(str(folders["new"])))
    assert kept == {new}  # the old workers reset nothing the new one built
    old_log, new_log = logs
    assert "claims nothing until it is restarted with the current playbooks" in old_log
    assert "claims nothing" not in new_log and "are generation 2" in new_log
    assert "the current playbooks are generation 2" in said  # not a generation 3


def _wait_for_line(process: subprocess.Popen[bytes], text: str, timeout_s: float = 30) -> str:
    """The first line of the process's log holding `text`."""
    import selectors

    assert process.stderr is not None
    watch = selectors.DefaultSelector()
    watch.register(process.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if watch.select(timeout=0.2):
            line = process.stderr.readline().decode()
            if text in line:
                return line
    raise AssertionError(f"the process did not log {text!r} in time")
