"""`forewarn demo`: Forewarn at work on a simulated product, on this machine. Edge.

Starts, in one data folder: an SMTP sink (aiosmtpd) that keeps each email it receives as an
`.eml` file in `demo-mail/`; `forewarn serve` on `forewarn.db` with the example playbooks and
knowledge base, sending its email to that sink; and the simulated SaaS (`simulate`) feeding it
live traffic through Segment's client, in real time from now. The demo world puts its problems
into its first minutes and makes its tickets come within minutes of them, so triggers fire,
emails go out and tickets are prevented (or not) while one watches; the world learns from the
server's own firings whom it reached (`simulate_outreach.ServerReach`).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from forewarn import clock, simulate, simulate_outreach
from forewarn.errors import InputError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WRITE_KEY = "fw_wk_local-write-key-change-me"
ADMIN_KEY = "fw_ak_local-admin-key-change-me"
ONSETS_WITHIN_MS = 30 * 60_000  # problems start within the first half hour
TICKET_DELAY_MS = (60_000, 5 * 60_000)  # and lead to tickets within five minutes of their onset
DAYS = 7  # the world runs on for a week of everyday use after that


class Maildir:
    """An aiosmtpd handler that writes each message it accepts into a folder, one `.eml` file
    per message, written whole before it appears under its name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.count += 1
            name = f"{clock.now_ms()}-{self.count:05d}.eml"
        content = envelope.content
        data = content if isinstance(content, bytes) else str(content).encode()
        part = self.folder / (name + ".part")
        part.write_bytes(data)
        part.rename(self.folder / name)
        return "250 Message accepted for delivery"


@dataclass
class Options:
    folder: Path
    host: str = "127.0.0.1"
    port: int = 8750
    accounts: int = 2000
    seed: int = 1
    effect: float = 0.5
    playbooks: Path = EXAMPLES / "playbooks"
    kb: Path | None = EXAMPLES / "kb"
    duration_s: float | None = None  # None: until interrupted


def run(options: Options, out: IO[str] = sys.stdout) -> int:
    from aiosmtpd.controller import Controller

    if not options.playbooks.exists():
        raise InputError(
            f"no playbooks at {options.playbooks}: give --playbooks (the examples are in the "
            "source tree, examples/playbooks)"
        )
    write_key = os.environ.get("FOREWARN_WRITE_KEY") or WRITE_KEY
    admin_key = os.environ.get("FOREWARN_ADMIN_KEY") or ADMIN_KEY
    if not _loopback(options.host) and (write_key == WRITE_KEY or admin_key == ADMIN_KEY):
        raise InputError(
            f"--host {options.host} would let anyone who can reach it in with the demo's "
            "published keys: set FOREWARN_WRITE_KEY and FOREWARN_ADMIN_KEY to keys of your own "
            "(forewarn keys create makes them), or keep --host 127.0.0.1"
        )
    folder = options.folder
    maildir = folder / "demo-mail"
    maildir.mkdir(parents=True, exist_ok=True)
    sink = Maildir(maildir)
    smtp = Controller(sink, hostname="127.0.0.1", port=_free_port())
    smtp.start()
    url = f"http://{options.host}:{options.port}"
    env = {
        **os.environ,
        "FOREWARN_WRITE_KEY": write_key,
        "FOREWARN_ADMIN_KEY": admin_key,
        "FOREWARN_SMTP_URL": f"smtp://127.0.0.1:{smtp.port}",
        "FOREWARN_EMAIL_FROM": "support@demo.forewarn.test",
        "FOREWARN_DEMO_MAILDIR": str(maildir),
        "FOREWARN_QUIET_HOURS": "off",  # the demo runs at any hour
        "FOREWARN_PRIORITY_WINDOW": "5s",  # and emails leave within seconds
        "FOREWARN_PUBLIC_URL": url,
    }
    if options.kb is not None and options.kb.exists():
        env["FOREWARN_KB"] = str(options.kb)
    log = open(folder / "server.log", "ab")  # noqa: SIM115 (closed in the finally below)
    try:
        server = _start_server(options, folder, env, log)
    except BaseException:
        log.close()
        smtp.stop()
        raise
    stop = threading.Event()
    feeder: threading.Thread | None = None
    result: dict[str, Any] = {}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        _wait_until_up(url, server, folder / "server.log")
        _print_urls(out, url, folder, maildir, write_key, admin_key, options)
        feeder = threading.Thread(
            target=_feed, args=(options, url, write_key, admin_key, stop, result), daemon=True
        )
        feeder.start()
        deadline = None if options.duration_s is None else time.monotonic() + options.duration_s
        while not stop.is_set() and feeder.is_alive():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            stop.wait(1.0 if left is None else min(1.0, left))
            if server.poll() is not None:
                raise InputError(
                    f"the server stopped (exit {server.returncode}); see {folder / 'server.log'}"
                )
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        stopped = clock.now_ms()
        if feeder is not None:
            feeder.join(timeout=15)
        signal.signal(signal.SIGTERM, previous)
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()
        smtp.stop()
    if "error" in result:
        print(f"the simulator stopped: {result['error']}", file=sys.stderr)
    world, sender = result.get("world"), result.get("sender")
    truth = world.truth if world is not None else []
    simulate.write_truth(truth, folder / "truth.jsonl")
    settled = [t for t in truth if t.would_ticket_ms is not None and t.would_ticket_ms < stopped]
    prevented = sum(1 for t in settled if t.ticket_ms is None)
    print(
        f"demo stopped: {sender.count if sender else 0} events sent, {len(truth)} problems, "
        f"{len(settled) - prevented} tickets, {prevented} prevented by outreach; "
        f"{sink.count} emails in {maildir}; the ground truth in {folder / 'truth.jsonl'}",
        file=out,
        flush=True,
    )
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(
    options: Options, folder: Path, env: dict[str, str], log: IO[bytes]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forewarn",
            "serve",
            "--db",
            str(folder / "forewarn.db"),
            "--playbooks",
            str(options.playbooks),
            "--host",
            options.host,
            "--port",
            str(options.port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _wait_until_up(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise InputError(f"the server did not start (exit {server.returncode}); see {log}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise InputError(f"the server did not answer on {url} within a minute; see {log}")


def _print_urls(
    out: IO[str],
    url: str,
    folder: Path,
    maildir: Path,
    write_key: str,
    admin_key: str,
    options: Options,
) -> None:
    lines = [
        f"Forewarn demo: a simulated product of {options.accounts} accounts feeding {url}",
        f"  dashboard:            {url}/",
        f"  demo app with widget: {url}/demo/",
        f"  firings (admin API):  curl -H 'Authorization: Bearer {admin_key}' {url}/api/v1/firings",
        f"  write key: {write_key}   admin key: {admin_key}",
        f"  emails sent land in:  {maildir}",
        f"  database and logs:    {folder}",
        "Triggers start firing within a minute. Ctrl-C stops everything.",
    ]
    out.write("\n".join(lines) + "\n")
    out.flush()


def _feed(
    options: Options,
    url: str,
    write_key: str,
    admin_key: str,
    stop: threading.Event,
    result: dict[str, Any],
) -> None:
    """The simulated world, sent in real time from now until it ends or `stop` is set."""
    try:
        sender = simulate_outreach.Sender(url, write_key)
        reach = simulate_outreach.ServerReach(url, admin_key, sender, stop)
        world, messages = simulate.generate(
            options.accounts,
            DAYS,
            options.seed,
            clock.now_ms(),
            options.effect,
            reach,
            onsets_within_ms=ONSETS_WITHIN_MS,
            ticket_delay_ms=TICKET_DELAY_MS,
        )
        result["world"], result["sender"] = world, sender
        simulate_outreach.send(messages, sender, realtime=True, stop=stop)
    except Exception as exc:  # reported when the demo stops; the server stays up meanwhile
        result["error"] = str(exc)
