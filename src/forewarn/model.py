"""Events: Segment-spec messages normalised into one `Event`.

Every source (recorded JSONL, the Segment HTTP API, later PostHog and Sentry adapters) ends here,
so the engine reads exactly one shape. Decoding goes straight into typed msgspec Structs with
only the fields the engine needs: that is the fastest JSON path in Python (see PERFORMANCE.md).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import msgspec

from forewarn.errors import EventError
from forewarn.records import Event as Event
from forewarn.records import SegmentContext as SegmentContext
from forewarn.records import SegmentMessage as SegmentMessage

KINDS = ("track", "identify", "group", "page", "screen", "alias")


_decoder = msgspec.json.Decoder(SegmentMessage)
decode_message = _decoder.decode  # raises msgspec errors; decode_event says them in words
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TIME_MS = 253_402_300_800_000  # 10000-01-01: times are kept within years 1970 to 9999
# each kind as one shared string: a million events keep one copy, and compare by identity
_KIND: dict[str | None, str] = {kind: kind for kind in KINDS}
_FIRST_AT_A_MOMENT = frozenset(("identify", "group", "alias"))


def order_key(event: Event) -> int:
    """Time order; at one moment, who-is-who (identify, group, alias) before what happened, so
    that a group call counts events stamped at the same moment for its account."""
    return event.timestamp_ms * 2 + (event.kind not in _FIRST_AT_A_MOMENT)


_EMPTY: dict[str, Any] = {}


def parse_time_ms(value: str | int | float) -> int:
    """ISO 8601 (a missing zone means UTC) or an integer count of milliseconds since the epoch,
    between 1970 and 9999; ValueError otherwise."""
    if type(value) is str:
        try:
            when = datetime.fromisoformat(value)  # Python 3.11 reads Z and most of ISO 8601
        except ValueError:
            text = value.strip()
            if text.endswith("z"):
                text = text[:-1] + "+00:00"
            when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        since = when - _EPOCH
        # exact, truncating below a millisecond: since // 1 ms, without its big-integer division
        ms = (since.days * 86_400 + since.seconds) * 1000 + since.microseconds // 1000
    elif isinstance(value, bool):
        raise ValueError("a boolean is not a time")
    elif isinstance(value, int):
        ms = value
    elif isinstance(value, float) and math.isfinite(value):
        ms = int(value)
    else:
        raise ValueError(f"{value!r} is not a time")
    if not 0 <= ms < MAX_TIME_MS:
        raise ValueError(f"{value!r} is outside 1970-01-01 .. 9999-12-31")
    return ms


def format_time(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC with a Z, to the millisecond when needed."""
    when = datetime.fromtimestamp(ms / 1000, tz=UTC)
    if ms % 1000:
        return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: str | int | None) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if text else None


def from_message(msg: SegmentMessage) -> Event:
    """Validate one decoded Segment message and normalise it; raises EventError with the reason."""
    kind = _KIND.get(msg.type)
    if kind is None:
        kind = msg.type
        if kind is None:
            raise EventError("missing 'type': use one of " + ", ".join(KINDS))
        raise EventError(f"unknown type '{kind}': use one of " + ", ".join(KINDS))
    user_id = msg.user_id
    if type(user_id) is not str or not user_id:
        user_id = _text(user_id)
    anonymous_id = msg.anonymous_id
    if anonymous_id is not None and (type(anonymous_id) is not str or not anonymous_id):
        anonymous_id = _text(anonymous_id)
    if user_id is None and anonymous_id is None:
        raise EventError(f"{kind} has neither 'userId' nor 'anonymousId': set one of them")
    if kind == "track":
        name = msg.event
        if not name:
            raise EventError("track has no 'event' name: set 'event' to what happened")
    elif kind in ("page", "screen"):
        name = msg.name or ""
    else:
        name = ""
    if kind == "group":
        account_id = _text(msg.group_id)
        if account_id is None:
            raise EventError("group has no 'groupId': set it to the account's id")
    else:
        context = msg.context
        group_id = None if context is None else context.group_id
        account_id = group_id if type(group_id) is str and group_id else _text(group_id)
    previous_id = None
    if kind == "alias":
        previous_id = _text(msg.previous_id)
        if previous_id is None or user_id is None:
            raise EventError("alias needs both 'previousId' and 'userId'")
    stamp = msg.timestamp
    if stamp is None:
        stamp = msg.original_timestamp
        if stamp is None:
            raise EventError("no 'timestamp': set it to when the event happened (ISO 8601)")
    try:
        timestamp_ms = parse_time_ms(stamp)
    except (ValueError, OverflowError):
        raise EventError(
            f"timestamp {stamp!r} is not ISO 8601 (e.g. 2026-11-23T10:00:00Z) "
            "nor milliseconds since the epoch, between 1970 and 9999"
        ) from None
    message_id = msg.message_id
    return Event(
        kind,
        name,
        user_id,
        anonymous_id,
        account_id,
        msg.properties or _EMPTY,  # one shared empty dict, as for a missing one
        msg.traits or _EMPTY,
        timestamp_ms,
        message_id if type(message_id) is str else (_text(message_id) or ""),
        previous_id,
    )


def decode_event(data: bytes | str) -> Event:
    """Decode one JSON Segment message; raises EventError saying what was wrong."""
    try:
        msg = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise EventError(f"not a valid Segment message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise EventError(f"not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise EventError("not valid JSON: the line is not UTF-8") from None
    except RecursionError:
        raise EventError("not valid JSON: nested too deeply") from None
    return from_message(msg)


def event_from_dict(data: object) -> Event:
    """Normalise a Segment message already parsed into Python objects."""
    try:
        msg = msgspec.convert(data, SegmentMessage)
    except msgspec.ValidationError as exc:
        raise EventError(f"not a valid Segment message: {exc}") from None
    return from_message(msg)
