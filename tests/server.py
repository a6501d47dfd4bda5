"""A real `forewarn serve` in a subprocess, for tests that talk HTTP to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = ROOT / "examples" / "playbooks"
WRITE_KEY = "fw_wk_test-write-key-0123456789"
ADMIN_KEY = "fw_ak_test-admin-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_smtp(handler: Any, port: int | None = None, **options: Any) -> Controller:
    """A real SMTP server (aiosmtpd) on a free local port, started. A free port can be taken by
    another process between finding it and binding it, so a port taken is tried again with
    another (only when no port was asked for)."""
    for _ in range(20):
        controller = Controller(handler, hostname="127.0.0.1", port=port or free_port(), **options)
        try:
            controller.start()
        except OSError:
            if port:
                raise
            continue
        return controller
    raise RuntimeError("no free local port for the SMTP server after 20 tries")


@dataclass
class Server:
    url: str
    db: Path
    process: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]

    def admin(self, path: str, **params: Any) -> Any:
        return self.admin_call("GET", path, params=params)

    def admin_post(self, path: str, body: dict[str, Any]) -> Any:
        return self.admin_call("POST", path, json=body)

    def admin_call(self, method: str, path: str, **kw: Any) -> Any:
        """An admin API call; raises httpx.HTTPStatusError on an error answer."""
        r = httpx.request(
            method,
            self.url + path,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=10,
            **kw,
        )
        r.raise_for_status()
        return r.json()

    def firings(self, **params: Any) -> list[dict[str, Any]]:
        return list(self.admin("/api/v1/firings", **params)["firings"])

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def wait_for(self, check: Any, timeout_s: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = check()
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.05)


def start(
    db: Path,
    port: int | None = None,
    env: dict[str, str] | None = None,
    playbooks: Path = PLAYBOOKS,
    wrap: list[str] | None = None,
) -> Server:
    """`wrap` is a command the server runs under (strace, say)."""
    port = port or free_port()
    full_env = {
        **os.environ,
        "FOREWARN_WRITE_KEY": WRITE_KEY,
        "FOREWARN_ADMIN_KEY": ADMIN_KEY,
        **(env or {}),
    }
    process = subprocess.Popen(
        [
            *(wrap or []),
            sys.executable,
            "-m",
            "forewarn",
            "serve",
            "--db",
            str(db),
            "--playbooks",
            str(playbooks),
            "--port",
            str(port),
        ],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            output = process.stdout.read().decode() if process.stdout else ""
            process.kill()
            raise RuntimeError(f"forewarn serve did not start:\n{output}")
        time.sleep(0.05)
    return Server(url, db, process, port, full_env)


@contextmanager
def running(db: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = start(db, env=env)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.terminate()
            try:
                server.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        if server.process.stdout is not None:
            server.process.stdout.close()


def serve_playbook(folder: Path, playbook: str, env: dict[str, str]) -> Server:
    """A server running one playbook file written into `folder`."""
    playbooks = folder / "playbooks"
    playbooks.mkdir(exist_ok=True)
    (playbooks / "p.yaml").write_text(playbook)
    return start(folder / "forewarn.db", env=env, playbooks=playbooks)


def stop(server: Server) -> None:
    server.process.terminate()
    server.process.wait(timeout=20)
    if server.process.stdout is not None:
        server.process.stdout.close()
