"""Faults a real deployment meets: the disk filling up under the database, the server killed
with SIGKILL again and again while clients retry, and the promise behind every 2xx (the batch
was fsynced before the answer was written), checked on the system calls themselves."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from forewarn import store_sqlite

from . import server as srv
from .server import ADMIN_KEY, WRITE_KEY


def _need(what: str, ok: bool) -> None:
    if ok:
        return
    if os.environ.get("FOREWARN_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} (FOREWARN_REQUIRE_SERVICES=1)")
    pytest.skip(what)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path`: a disk that fills up for real."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    _need(
        f"cannot mount a tmpfs to fill up ({done.stderr.strip()}): needs root", not done.returncode
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def _batch(b: int, n: int = 20, pad: int = 0) -> dict[str, Any]:
    return {
        "batch": [
            {
                "type": "track",
                "event": "Payment Failed" if i == 0 else "Login",
                "userId": f"u{b}-{i}",
                "context": {"groupId": f"acc-{b}"},
                "messageId": f"m-{b}-{i}",
                "properties": {"note": "x" * pad},
            }
            for i in range(n)
        ]
    }


def _stored_ids(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [
            m["messageId"]
            for (blob,) in conn.execute("SELECT messages FROM batches")
            for m in store_sqlite.decode_messages(blob)
        ]
    finally:
        conn.close()


def test_a_full_disk_answers_507_never_acknowledges_what_it_lost_and_recovers(tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, "3m"):
        db = disk / "forewarn.db"
        server = srv.start(db)
        acknowledged: list[int] = []
        refused: dict[int, int] = {}
        try:
            with httpx.Client(timeout=10) as http:
                b = 0
                # fill the disk: 8 KB of properties per event, 20 events a batch
                while len(refused) < 5 and b < 400:
                    r = http.post(
                        f"{server.url}/v1/batch", json=_batch(b, pad=8000), auth=(WRITE_KEY, "")
                    )
                    if r.status_code == 200:
                        acknowledged.append(b)
                    else:
                        refused[b] = r.status_code
                        body = r.json()
                        assert body["error"]["code"] and "disk is full" in body["error"]["message"]
                    b += 1
                assert acknowledged and len(refused) == 5, "the 3 MB disk never filled up"
                assert set(refused.values()) <= {503, 507}, refused
                # the server stays up and says so while full; small admin writes either fit
                # in the pages already there or are refused the same way, never a 500
                assert http.get(f"{server.url}/healthz").status_code == 200
                admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
                for path, body in (
                    ("/api/v1/triggers/payment-failed/pause", {"reason": "disk full"}),
                    ("/api/v1/subjects/u1-1/suppress", {}),
                    ("/api/v1/backtests", {"since": "1d"}),
                    ("/api/v1/playbooks/reload", None),  # the engine rebuilds while full
                ):
                    r = http.post(server.url + path, json=body, headers=admin)
                    assert r.status_code in (200, 503, 507), (path, r.text)
                http.post(server.url + "/api/v1/triggers/payment-failed/resume", headers=admin)
                # space comes back: the same batches are accepted now
                _resize(disk, "64m")
                for again in refused:
                    deadline = time.monotonic() + 20
                    while True:
                        r = http.post(
                            f"{server.url}/v1/batch",
                            json=_batch(again, pad=8000),
                            auth=(WRITE_KEY, ""),
                        )
                        if r.status_code == 200 or time.monotonic() > deadline:
                            break
                        time.sleep(0.2)
                    assert r.status_code == 200, r.text
                    acknowledged.append(again)
            expected = {f"acc-{x}" for x in acknowledged}
            fired = server.wait_for(
                lambda: {f["subject"] for f in server.firings(limit=10_000)} >= expected,
                timeout_s=30,
            )
            assert fired, "the engine did not catch up after the disk was full"
            assert server.metric("forewarn_engine_up") == 1
            firings = server.firings(trigger="payment-failed", limit=10_000)
            assert sorted(f["subject"] for f in firings) == sorted(expected)  # none twice
        finally:
            srv.stop(server)
        ids = _stored_ids(db)
        assert len(ids) == len(set(ids)) == 20 * len(acknowledged)
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()


KILLS = 20  # kill -9 cycles


def test_kill_9_again_and_again_during_ingest_loses_and_repeats_nothing(tmp_path):
    """Two clients resend each batch until it is acknowledged, as real ones do, while the server
    is killed with SIGKILL 20 times at random moments. Every acknowledged event is stored once,
    nothing unacknowledged is half-stored, and each account's one failed payment fires exactly
    once."""
    db = tmp_path / "forewarn.db"
    server = srv.start(db)
    port = server.port
    rng = random.Random(20)
    acknowledged: list[int] = []
    lock = threading.Lock()

    def client(numbers: range) -> None:
        with httpx.Client(timeout=5) as http:
            for b in numbers:
                while True:
                    try:
                        r = http.post(
                            f"http://127.0.0.1:{port}/v1/batch",
                            json=_batch(b, n=10),
                            auth=(WRITE_KEY, ""),
                        )
                        if r.status_code == 200:
                            with lock:
                                acknowledged.append(b)
                            break
                        assert r.status_code in (503, 507), r.text  # never a 500
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.02)

    per_client = 150
    senders = [
        threading.Thread(target=client, args=(range(c * per_client, (c + 1) * per_client),))
        for c in range(2)
    ]
    for sender in senders:
        sender.start()
    try:
        for _ in range(KILLS):
            deadline = time.monotonic() + 5
            start = len(acknowledged)
            wanted = rng.randint(1, 12)
            while len(acknowledged) < start + wanted and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.03))  # land anywhere: mid-request, mid-commit, mid-step
            server.kill()
            server = srv.start(db, port=port)
        for sender in senders:
            sender.join(timeout=120)
            assert not sender.is_alive()
        assert sorted(acknowledged) == list(range(2 * per_client))
        expected = {f"acc-{b}" for b in range(2 * per_client)}
        server.wait_for(
            lambda: (
                {f["subject"] for f in server.firings(trigger="payment-failed", limit=1000)}
                == expected
            ),
            timeout_s=60,
        )
        firings = server.firings(trigger="payment-failed", limit=1000)
        assert sorted(f["subject"] for f in firings) == sorted(expected)
    finally:
        server.kill()
    ids = _stored_ids(db)
    assert len(ids) == len(set(ids)) == 10 * 2 * per_client


# one line of `strace -f -y -yy -s 16`: "<tid> <call>(<fd><path>>, ...) = <result>", possibly
# split by another thread into "<call>(... <unfinished ...>" and "<... <call> resumed>...) = r"
_LINE = re.compile(
    r"^(?P<tid>\d+)\s+(?:<\.\.\. (?P<resumed>\w+) resumed>|(?P<call>\w+)\()(?P<rest>.*)$"
)


def _fsynced_before_answering(trace: str) -> tuple[int, list[str]]:
    """Walk the trace of a server answering one batch at a time: the `200` written for each
    batch must come after the thread that wrote the batch to the WAL finished an fsync of it,
    both since the batch arrived. Returns (answers checked, problems)."""
    pending: dict[int, str] = {}  # tid -> the call it left unfinished
    wrote: set[int] = set()  # threads that wrote the WAL since the request arrived
    synced = waiting = False
    answers, problems = 0, []
    for number, line in enumerate(trace.splitlines(), 1):
        m = _LINE.match(line)
        if not m:
            continue
        tid, rest = int(m["tid"]), m["rest"]
        call = m["call"] or m["resumed"]
        if m["call"] and rest.endswith("<unfinished ...>"):
            pending[tid] = line
            continue
        if m["resumed"]:
            line = pending.pop(tid, "") + rest
        if call in ("recvfrom", "read", "recvmsg") and "POST /v1/batch" in line:
            wrote.clear()
            synced, waiting = False, True
        elif call in ("pwrite64", "write", "writev", "pwritev") and "-wal>" in line:
            wrote.add(tid)
        elif call in ("fdatasync", "fsync") and "-wal>" in line and line.rstrip().endswith("= 0"):
            synced = synced or tid in wrote
        elif waiting and call in ("sendto", "write", "writev") and "HTTP/1.1 200" in line:
            answers, waiting = answers + 1, False
            if not synced:
                problems.append(f"line {number}: a 200 was written before an fsync of the WAL")
    return answers, problems


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(c) for c in task.read_text().split()]
    return out


def test_every_acknowledged_batch_was_fsynced_before_its_answer_was_written(tmp_path):
    strace = shutil.which("strace")
    _need("strace is not installed: apt-get install strace", strace is not None)
    log = tmp_path / "trace.txt"
    wrap = [str(strace), "-f", "-y", "-yy", "-s", "16", "-o", str(log)]
    wrap += ["-e", "trace=pwrite64,write,writev,pwritev,fsync,fdatasync,recvfrom,read,sendto"]
    try:
        server = srv.start(tmp_path / "forewarn.db", wrap=wrap)
    except RuntimeError as exc:
        _need(f"cannot trace the server (ptrace not allowed here?): {exc}", False)
        raise
    try:
        with httpx.Client(timeout=10) as http:  # one request at a time, so answers are ordered
            for b in range(30):
                r = http.post(f"{server.url}/v1/batch", json=_batch(b, n=5), auth=(WRITE_KEY, ""))
                assert r.status_code == 200
    finally:
        for child in _children(server.process.pid):  # the server under strace
            os.kill(child, signal.SIGTERM)
        srv.stop(server)
    answers, problems = _fsynced_before_answering(log.read_text(errors="replace"))
    assert answers == 30, f"found {answers} answers in the trace, expected 30"
    assert problems == []


def test_the_fsync_check_catches_an_answer_written_before_the_sync():
    """The check above, on a hand-made trace where the answer overtakes the fsync."""
    wal = "7</db/forewarn.db-wal>"
    sock = "9<TCP:[127.0.0.1:8000->127.0.0.1:5000]>"
    request = f'100 recvfrom({sock}, "POST /v1/batch H"..., 65536, 0, NULL, NULL) = 900'
    good = [
        request,
        f'101 pwrite64({wal}, "\\x37\\x7f"..., 4096, 0) = 4096',
        f"101 fdatasync({wal} <unfinished ...>",
        "100 epoll_wait(3, [], 1, 0) = 0",
        "101 <... fdatasync resumed>) = 0",
        f'100 sendto({sock}, "HTTP/1.1 200 OK\\r\\n"..., 120, 0, NULL, 0) = 120',
    ]
    assert _fsynced_before_answering("\n".join(good)) == (1, [])
    early = [good[0], good[1], good[2], good[5], good[4]]
    answers, problems = _fsynced_before_answering("\n".join(early))
    assert answers == 1 and problems == ["line 4: a 200 was written before an fsync of the WAL"]
    other_thread = [good[0], f"102 fdatasync({wal}) = 0", good[5]]  # not the writer's sync
    assert _fsynced_before_answering("\n".join(other_thread))[1] != []
