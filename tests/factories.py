"""Factories for tests: events as Segment messages, playbooks from YAML, a replay in one call."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from forewarn import engine
from forewarn.dedup import SeenIds
from forewarn.engine import Firing
from forewarn.model import Event, event_from_dict, order_key
from forewarn.playbook import Trigger, parse_playbooks
from forewarn.runner import Runner

T0 = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday, midnight UTC
T0_MS = int(T0.timestamp() * 1000)
SECOND, MINUTE, HOUR, DAY = 1_000, 60_000, 3_600_000, 86_400_000
_ids = itertools.count(1)


def at(ms: int = 0, **delta: float) -> str:
    """ISO 8601 for T0 + ms + a timedelta: at(days=7, minutes=3)."""
    when = T0 + timedelta(milliseconds=ms) + timedelta(**delta)
    return when.isoformat().replace("+00:00", "Z")


def ms(**delta: float) -> int:
    """Milliseconds since the epoch for T0 + a timedelta."""
    return T0_MS + int(timedelta(**delta).total_seconds() * 1000)


def message(kind: str, when: str, user: str | None = "u1", **fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": kind, "timestamp": when, "messageId": f"m{next(_ids)}"}
    if user is not None:
        msg["userId"] = user
    msg.update(fields)
    return msg


def track(
    name: str, when: str, user: str = "u1", account: str | None = None, **properties: Any
) -> dict[str, Any]:
    msg = message("track", when, user, event=name, properties=properties)
    if account is not None:
        msg["context"] = {"groupId": account}
    return msg


def identify(when: str, user: str = "u1", **traits: Any) -> dict[str, Any]:
    return message("identify", when, user, traits=traits)


def group(when: str, account: str, user: str = "u1", **traits: Any) -> dict[str, Any]:
    return message("group", when, user, groupId=account, traits=traits)


def page(path: str, when: str, user: str = "u1") -> dict[str, Any]:
    return message("page", when, user, name="Page", properties={"path": path})


def playbook(yaml_text: str) -> list[Trigger]:
    return parse_playbooks([("test.yaml", yaml_text)])


def trigger(when: str, *, scope: str = "user", extra: str = "") -> list[Trigger]:
    """One trigger `t` with the given `when:` body (YAML flow or block, indented by the caller)."""
    text = f"""
triggers:
  - id: t
    scope: {scope}
    when: {when}
    action: {{channel: email, message: hi}}
{extra}"""
    return playbook(text)


def events(messages: Iterable[dict[str, Any]]) -> list[Event]:
    return [event_from_dict(m) for m in messages]


def replay(
    triggers: list[Trigger],
    messages: Iterable[dict[str, Any]],
    until: str | None = None,
    lateness_ms: int = 0,
) -> list[Firing]:
    """Run like `forewarn replay`: sort by timestamp, push through a Runner, run on to `until`."""
    evs = sorted(events(messages), key=order_key)
    runner = Runner(engine.State(engine.Playbook(triggers)), lateness_ms=lateness_ms)
    firings = runner.push_many(evs)
    end = None
    if until is not None:
        end = event_from_dict(message("track", until, event="_")).timestamp_ms
    elif evs:
        end = evs[-1].timestamp_ms
    firings.extend(runner.finish(end))
    return firings


def times(firings: Iterable[Firing]) -> list[str]:
    """Firing moments as ISO strings, for readable assertions."""
    return [f.to_dict()["at"] for f in firings]


def feed_live(conn: Any, live: Any, messages: Iterable[dict[str, Any]]) -> None:
    """Each message into the log as its own batch, received at its timestamp, and a live
    engine step right then: the live server with events arriving as they happen."""
    from forewarn import store_sqlite

    ordered = sorted(messages, key=lambda m: order_key(event_from_dict(m)))
    for m in ordered:
        t = event_from_dict(m).timestamp_ms
        store_sqlite.append_batches(
            conn,
            [store_sqlite.Append(1, "t", t, [m], [str(m["messageId"])])],
            SeenIds(),
        )
        live.step(t)
