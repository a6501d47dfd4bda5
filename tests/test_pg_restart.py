"""PostgreSQL restarted in the middle of ingest, in scale-out mode: while it is down the API
answers 503 (never a 500, never a 2xx for what it could not commit), clients retrying get in
once it is back, and no acknowledged event is lost or stored twice; the worker then applies
them all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from forewarn import store_pg
from tests.server import ADMIN_KEY, WRITE_KEY, free_port
from tests.test_conformance import PLAYBOOK
from tests.test_faults import _batch
from tests.test_scaleout import _env, _healthy, _serve, _stop, _wait_applied


def _cluster() -> tuple[str, str]:
    """This machine's PostgreSQL cluster (version, name), restartable by this process."""
    lister = shutil.which("pg_lsclusters")
    if lister is None or os.geteuid() != 0:
        why = "restarting PostgreSQL needs pg_ctlcluster and root"
        if os.environ.get("FOREWARN_REQUIRE_SERVICES") == "1":
            pytest.fail(why + " (FOREWARN_REQUIRE_SERVICES=1)")
        pytest.skip(why)
    for line in subprocess.run(
        [lister, "--no-header"], capture_output=True, text=True
    ).stdout.splitlines():
        version, name, port, status = line.split()[:4]
        if port == "5432" and status.startswith("online"):
            return version, name
    pytest.skip("no online PostgreSQL cluster on port 5432 to restart")


def test_a_postgresql_restart_mid_load_loses_and_repeats_nothing(url: str, tmp_path: Path) -> None:
    version, name = _cluster()
    playbooks = tmp_path / "playbooks"
    playbooks.mkdir()
    (playbooks / "p.yaml").write_text(PLAYBOOK)
    env = _env(url)
    subprocess.run(
        [sys.executable, "-m", "forewarn", "migrate"], env=env, check=True, capture_output=True
    )
    port = free_port()
    processes = [_serve("api", env, playbooks, port), _serve("worker", env, playbooks)]
    batches = 120
    answers: Counter[int] = Counter()
    acknowledged: list[int] = []
    try:
        _healthy(port, processes[0])

        def client() -> None:
            with httpx.Client(timeout=10) as http:
                for b in range(batches):
                    while True:
                        try:
                            r = http.post(
                                f"http://127.0.0.1:{port}/v1/batch",
                                json=_batch(b, n=10),
                                auth=(WRITE_KEY, ""),
                            )
                            answers[r.status_code] += 1
                            if r.status_code == 200:
                                acknowledged.append(b)
                                break
                        except httpx.HTTPError:
                            answers[0] += 1
                        time.sleep(0.05)

        pool = store_pg.connect(url)
        try:
            with pool.connection() as conn:
                ws = store_pg.workspace_id(conn, "default")
                assert ws is not None
                other_key = store_pg.add_key(conn, ws, "write", 0, name="another source")
        finally:
            pool.close()
        sender = threading.Thread(target=client)
        sender.start()
        while len(acknowledged) < 20:
            time.sleep(0.01)
        ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", version, name]
        subprocess.run([*ctl, "stop", "-m", "fast"], check=True, capture_output=True)
        try:
            down = sum(answers.values())
            time.sleep(3)  # down for a while: the API must say so, not hang or fail
            asked_while_down = sum(answers.values()) - down
            # a key the API has not seen yet cannot be looked up now: a 503 too, not a 500
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/batch",
                json=_batch(999, n=1),
                auth=(other_key, ""),
                timeout=10,
            )
            assert r.status_code == 503, r.text
            # not ready, and the admin API says why instead of failing
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 503
            r = httpx.get(
                f"http://127.0.0.1:{port}/api/v1/firings",
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=10,
            )
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        finally:
            subprocess.run([*ctl, "start"], check=True, capture_output=True)
        sender.join(timeout=120)
        assert not sender.is_alive(), "the client never got its batches in after the restart"
        assert acknowledged == list(range(batches))
        assert asked_while_down > 0 and answers[503] > 0, dict(answers)
        assert set(answers) <= {0, 200, 503}, dict(answers)  # never a 500
        _wait_applied(url, 10 * batches, timeout_s=90)
        pool = store_pg.connect(url)
        try:
            with pool.connection() as conn:
                ids: list[Any] = [
                    json.loads(m)["messageId"]
                    for (m,) in conn.execute("SELECT message FROM events WHERE source = 'segment'")
                ]
        finally:
            pool.close()
        assert len(ids) == len(set(ids)) == 10 * batches
        # back: ready again, and the firings page through with since and limit
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        first = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/firings", params={"limit": 1}, headers=admin
        ).json()["firings"]
        assert len(first) <= 1
        print("answers during the run:", dict(answers))
    finally:
        _stop(processes)
