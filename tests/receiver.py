"""A real HTTP receiver on loopback, in a thread: records every request and answers from a
script (then 200 for ever). For the webhook and push channel tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hold: threading.Event | None = None  # wait for this before answering (a slow peer)
    delay_s: float = 0.0  # or wait this long


@dataclass
class Receiver:
    url: str
    seen: list[Seen]
    script: list[Answer]


@contextmanager
def receiver(*script: Answer) -> Iterator[Receiver]:
    seen: list[Seen] = []
    queue = list(script)
    lock = threading.Lock()
    released: list[threading.Event] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with lock:
                seen.append(
                    Seen("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                answer = queue.pop(0) if queue else Answer()
            if answer.delay_s:
                time.sleep(answer.delay_s)
            if answer.hold is not None:
                released.append(answer.hold)
                answer.hold.wait(5)
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # a client that went away mid-answer (a killed worker): nothing to report

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield Receiver(f"http://127.0.0.1:{server.server_address[1]}", seen, queue)
    finally:
        for event in released:
            event.set()
        server.shutdown()
        server.server_close()
        thread.join()
