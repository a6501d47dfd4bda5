"""The simulated world meets Forewarn: its messages sent to a server through Segment's own
client (at full speed, or paced to the wall clock), and the two ways the world learns who was
reached, for its true effect. Edge (network, clock).

- `EngineReach` runs playbooks and the policy in-process over the world as it unfolds, exactly
  as `forewarn replay` would over the same events: what is written to a file then already holds
  the tickets the outreach prevented. Honest for the playbooks given, the policy as configured,
  and perfect delivery (a message decided `send` counts as received when it is due).
- `ServerReach` asks a live server, through its admin API, which firings it decided to send:
  the real loop, for `--to URL --realtime` and the demo.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import httpx

from forewarn import clock, decide, engine
from forewarn.errors import InputError
from forewarn.model import event_from_dict, format_time, parse_time_ms
from forewarn.playbook import Trigger
from forewarn.policy import POLICY_TRAITS, Holding, Outreach
from forewarn.runner import Runner
from forewarn.simulate import Truth


class EngineReach:
    """The playbooks and the policy, in-process, fed each message of the world in time order."""

    def __init__(
        self,
        triggers: list[Trigger],
        policy: decide.Policy,
        watch: Callable[[engine.Firing], None] | None = None,
    ) -> None:
        self.watch = watch  # given every firing once decided, whatever the decision
        keep = (POLICY_TRAITS, POLICY_TRAITS)
        self.runner = Runner(engine.State(engine.Playbook(triggers, keep=keep)), lateness_ms=0)
        self.outreach = Outreach(self.runner.state, triggers, policy)
        self.holding = Holding(self.outreach, self._decided)
        self.sent: dict[str, list[int]] = {}  # subject -> when messages to it were due

    def _decided(self, firing: engine.Firing) -> None:
        if self.watch is not None:
            self.watch(firing)
        if firing.decision == decide.SEND:
            due = firing.send_at_ms if firing.send_at_ms is not None else firing.at_ms
            self.sent.setdefault(firing.subject, []).append(due)

    def saw(self, message: dict[str, Any]) -> None:
        for firing in self.runner.push(event_from_dict(message)):
            self.holding(firing)

    def reached(self, truth: Truth, until_ms: int) -> int | None:
        for firing in self.runner.advance(until_ms):  # the timers due by then
            self.holding(firing)
        # a firing still open to displacement could not have been sent yet
        self.holding.release(until_ms - self.outreach.policy.priority_window_ms)
        times = [t for t in self.sent.get(truth.subject, ()) if truth.onset_ms <= t < until_ms]
        return min(times) if times else None

    def finish(self, until_ms: int) -> None:
        """The world has ended: run the timers due by `until_ms` and pass every firing on."""
        for firing in self.runner.finish(until_ms):
            self.holding(firing)
        self.holding.release()


class Sender:
    """Segment's Python client pointed at a server: batched and gzipped as it sends."""

    def __init__(self, url: str, write_key: str) -> None:
        from segment.analytics.client import Client  # type: ignore[import-untyped]

        self.errors: list[str] = []
        self.client = Client(
            write_key,
            host=url.rstrip("/"),
            gzip=True,
            max_queue_size=200_000,
            upload_size=100,
            on_error=lambda error, batch: self.errors.append(str(error)),
        )
        self.count = 0

    def send(self, m: dict[str, Any]) -> None:
        when = datetime.fromisoformat(m["timestamp"].replace("Z", "+00:00"))
        common = {"timestamp": when, "message_id": m["messageId"]}
        kind = m["type"]
        client = self.client
        if kind == "track":
            client.track(m["userId"], m["event"], m.get("properties"), m.get("context"), **common)
        elif kind == "identify":
            client.identify(m["userId"], m.get("traits"), **common)
        elif kind == "group":
            client.group(m["userId"], m["groupId"], m.get("traits"), **common)
        elif kind == "page":
            client.page(m["userId"], None, m.get("name"), m.get("properties"), **common)
        self.count += 1

    def flush(self) -> None:
        """Returns once everything sent so far has been answered."""
        self.client.flush()

    def close(self) -> None:
        """Flush, stop the client's thread; raises InputError if the server refused any."""
        self.client.flush()
        self.client.join()
        if self.errors:
            raise InputError(
                f"the server refused some events: {self.errors[0]} "
                f"(and {len(self.errors) - 1} more)"
            )


class ServerReach:
    """Who a live server decided to send outreach to, from its admin API. Its firings are
    stamped with its clock, so this is the world's only when the world runs in real time."""

    def __init__(
        self,
        url: str,
        admin_key: str,
        sender: Sender,
        stop: threading.Event | None = None,
        lag_s: float = 0.5,
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_key}"}
        self.sender = sender
        self.stop = stop or threading.Event()
        self.lag_s = lag_s  # how long the server's engine may take to apply what it accepted

    def saw(self, message: dict[str, Any]) -> None:
        pass

    def reached(self, truth: Truth, until_ms: int) -> int | None:
        # asked when the ticket is next in line: wait for its time, as the sending will
        wait_s = (until_ms - clock.now_ms()) / 1000
        if wait_s > 0 and self.stop.wait(wait_s):
            return None
        self.sender.flush()
        self.stop.wait(self.lag_s)
        r = self._firings(truth)
        if r.status_code != 200:
            raise InputError(f"the server's admin API answered {r.status_code}: {r.text[:200]}")
        times = [
            parse_time_ms(f["send_at"] or f["at"])
            for f in r.json()["firings"]
            if f["decision"] == decide.SEND
        ]
        times = [t for t in times if truth.onset_ms <= t < until_ms]
        return min(times) if times else None

    def _firings(self, truth: Truth) -> httpx.Response:
        """The subject's firings since the onset; a busy server (a 503, a network hiccup) is
        asked again, a few times, before the simulation gives up."""
        r: httpx.Response | None = None
        for attempt in range(RETRIES):
            try:
                r = httpx.get(
                    self.url + "/api/v1/firings",
                    params={"subject": truth.subject, "since": format_time(truth.onset_ms)},
                    headers=self.headers,
                    timeout=10,
                )
                if r.status_code < 500 and r.status_code != 429:
                    return r
            except httpx.HTTPError as exc:
                if attempt == RETRIES - 1:
                    raise InputError(f"the server's admin API did not answer: {exc}") from None
            if self.stop.wait(0.5 * 2**attempt):
                break
        if r is None:
            raise InputError("the server's admin API did not answer")
        return r


RETRIES = 5


def send(
    messages: Iterable[dict[str, Any]],
    sender: Sender,
    realtime: bool = False,
    stop: threading.Event | None = None,
) -> int:
    """Send the messages; with `realtime`, each when the wall clock reaches its timestamp (until
    `stop` is set). Returns how many were sent."""
    stop = stop or threading.Event()
    for m in messages:
        if realtime:
            wait_s = (parse_time_ms(m["timestamp"]) - clock.now_ms()) / 1000
            if wait_s > 0 and stop.wait(wait_s):
                break
        if stop.is_set():
            break
        sender.send(m)
    sender.close()
    return sender.count
