"""How long a proactive chat takes to reach the widget: from the event that makes a `chat`
trigger fire, sent through the widget API, to its opener arriving on the widget's event stream,
through a real `forewarn serve` (engine and delivery worker in processes of their own). Prints
JSON.

    .venv/bin/python bench/widget.py --trials 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import server as srv

SECRET = "bench-identity-secret-0123456789-abcdef"
PLAYBOOK = """
triggers:
  - id: stuck
    when: {event: {name: Need Help}}
    action: {channel: chat, message: "Can I help?"}
"""


def trial(live: srv.Server, user: str) -> float:
    token = jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    arrived = threading.Event()
    ready = threading.Event()

    def listen() -> None:
        params = {"key": srv.WRITE_KEY, "token": token}
        with httpx.stream("GET", f"{live.url}/w/v1/stream", params=params, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("retry:"):
                    ready.set()
                if line.startswith("data: "):
                    arrived.set()
                    return

    threading.Thread(target=listen, daemon=True).start()
    ready.wait(10)
    start = time.perf_counter()
    httpx.post(
        f"{live.url}/w/v1/events",
        params={"key": srv.WRITE_KEY},
        headers={"authorization": f"Bearer {token}"},
        json={"batch": [{"type": "track", "event": "Need Help"}]},
        timeout=10,
    ).raise_for_status()
    if not arrived.wait(30):
        raise RuntimeError("the chat never arrived")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        playbooks = Path(tmp) / "playbooks"
        playbooks.mkdir()
        (playbooks / "p.yaml").write_text(PLAYBOOK)
        env = {"FOREWARN_IDENTITY_SECRET": SECRET, "FOREWARN_FREQUENCY_CAPS": "off"}
        live = srv.start(Path(tmp) / "bench.db", env=env, playbooks=playbooks)
        try:
            times = [trial(live, f"user-{i}") for i in range(args.trials)]
        finally:
            live.process.terminate()
            live.process.wait(timeout=20)
    times.sort()
    print(
        json.dumps(
            {
                "trials": len(times),
                "event_to_chat_s_p50": round(statistics.median(times), 3),
                "event_to_chat_s_max": round(times[-1], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
